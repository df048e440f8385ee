//! Scores and circuit files (EAP-IG's JSON layout) as `roc`, `circuit` and `evaluate` read
//! them: every edge required, or missing ones filled (`--allow-missing`). Both bound the graph
//! by the names in the file, so a fuzzed `cfg` cannot ask for a huge allocation.
#![no_main]

use eap::graph::{CircuitFile, MissingEdges};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return;
    };
    for missing in [MissingEdges::Refuse, MissingEdges::Fill] {
        let _ = CircuitFile::from_json_with(&value, "scores.json", missing);
    }
});
