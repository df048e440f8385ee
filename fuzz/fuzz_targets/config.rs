//! `config.json` as eap reads it: duplicate-key-refusing JSON, then every family's fields.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(value) = eap::model::config::parse_json_unique(text) {
        let _ = eap::model::ModelConfig::parse(&value, std::path::Path::new("config.json"));
    }
});
