//! ACDC checkpoints (`--resume`): a corrupt or edited one must be an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path =
        std::env::temp_dir().join(format!("eap-fuzz-{}.checkpoint.json", std::process::id()));
    std::fs::write(&path, data).unwrap();
    let _ = eap::acdc::Checkpoint::read(&path);
});
