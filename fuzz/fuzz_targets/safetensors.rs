//! `model.safetensors` (header length, header JSON, offsets, data) under the GPT-2 fixture's
//! config, loaded as `eap` loads a model folder. The reader takes a path, so each input is
//! written to a scratch folder of this process.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("eap-fuzz-safetensors-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/models/gpt2_hf"
        );
        std::fs::copy(format!("{fixture}/config.json"), dir.join("config.json")).unwrap();
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    std::fs::write(dir.join("model.safetensors"), data).unwrap();
    let _ = eap::model::Model::load_dir(dir, &candle_core::Device::Cpu);
});
