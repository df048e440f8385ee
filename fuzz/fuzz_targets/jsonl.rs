//! JSONL datasets (`--data`): prompts as text or token ids, answers as tokens, ids or lists.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("eap-fuzz-{}.jsonl", std::process::id()));
    std::fs::write(&path, data).unwrap();
    let _ = eap::tasks::Dataset::from_jsonl(&path, None);
});
