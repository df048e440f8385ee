//! Helpers shared by the integration tests: fixture paths and tensor comparisons.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};

/// Every fixture model: the GPT-2 / TransformerLens ones (`scripts/make_fixtures.py`), then the
/// Llama-family ones (`scripts/make_family_fixtures.py`).
pub const MODEL_FIXTURES: [&str; 10] = [
    "gpt2_hf",
    "gpt2_hf_noprefix",
    "tl_attn_only_shortformer",
    "tl_relu_nonorm",
    "tl_lnpre_gelu_bidir",
    "llama_gqa",
    "mistral_sharded",
    "qwen2_bias",
    "neox_parallel",
    "gemma2_full",
];

/// The Llama-family fixtures: rotary, grouped-query attention, gated MLPs, biases, sharding,
/// parallel blocks, Gemma-2's post-norms and soft-caps.
pub const FAMILY_FIXTURES: [&str; 5] = [
    "llama_gqa",
    "mistral_sharded",
    "qwen2_bias",
    "neox_parallel",
    "gemma2_full",
];

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

/// The reference tensors written by `scripts/make_fixtures.py`.
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture_dir(name).join("reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

pub fn tokens(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|row| row.into_iter().map(|v| v as u32).collect())
        .collect()
}

pub fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a − b| / max |b|.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

/// Runs the `eap` binary in `dir` with `args`, stderr piped (so not a terminal); returns the
/// exit code (-1 when killed by a signal), stdout and stderr.
pub fn eap_code(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_eap"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`eap_code`] with success as a flag.
pub fn eap(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let (code, stdout, stderr) = eap_code(dir, args);
    (code == 0, stdout, stderr)
}
