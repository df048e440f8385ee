//! Malformed inputs: broken fixture copies (truncated or garbage safetensors, missing tensors,
//! wrong shapes and dtypes, unknown or unsupported configurations, missing files), hub-cache
//! resolution, and bad forward inputs. Every case must return `Err` with a message naming the
//! file and the tensor or field, and must never panic.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::Device;
use eap::model::{resolve_model_dir_in, Batch, ForwardOptions, Model};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Map, Value};
use tempfile::TempDir;

use crate::util::fixture_dir;

/// A temporary copy of fixture `name` (config and weights only).
fn copy_fixture(name: &str) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture_dir(name).join(file), dir.path().join(file)).unwrap();
    }
    dir
}

/// Loads `dir`, asserting that loading neither panics nor succeeds; returns the message.
fn load_err(dir: &Path) -> String {
    let result = catch_unwind(AssertUnwindSafe(|| Model::load_dir(dir, &Device::Cpu)));
    match result {
        Err(_) => panic!("loading {} panicked", dir.display()),
        Ok(Ok(_)) => panic!("loading {} succeeded but should fail", dir.display()),
        Ok(Err(e)) => e.to_string(),
    }
}

/// Asserts that `message` contains every one of `parts`.
fn assert_names(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "error message lacks {part:?}: {message}"
        );
    }
}

fn weights(dir: &TempDir) -> PathBuf {
    dir.path().join("model.safetensors")
}

fn config(dir: &TempDir) -> PathBuf {
    dir.path().join("config.json")
}

// ---- safetensors bytes ----

fn truncate(dir: &TempDir, len: usize) {
    let bytes = std::fs::read(weights(dir)).unwrap();
    std::fs::write(weights(dir), &bytes[..len]).unwrap();
}

fn header_len(dir: &TempDir) -> usize {
    let bytes = std::fs::read(weights(dir)).unwrap();
    u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

/// Every tensor of a safetensors file: name, dtype, shape, bytes.
type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

/// Reads the weights of `dir`, lets `edit` change the tensor list, and writes it back with
/// `safetensors::serialize_to_file`.
fn rewrite(dir: &TempDir, edit: impl FnOnce(&mut Tensors)) {
    let bytes = std::fs::read(weights(dir)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Tensors = st
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &weights(dir)).unwrap();
}

fn find<'a>(tensors: &'a mut Tensors, name: &str) -> &'a mut (String, Dtype, Vec<usize>, Vec<u8>) {
    tensors
        .iter_mut()
        .find(|t| t.0 == name)
        .unwrap_or_else(|| panic!("fixture has no tensor {name}"))
}

#[test]
fn unmodified_copy_loads() {
    // The breakage below is what fails, not the copying.
    for name in ["gpt2_hf", "tl_relu_nonorm"] {
        let dir = copy_fixture(name);
        rewrite(&dir, |_| {});
        Model::load_dir(dir.path(), &Device::Cpu).unwrap();
    }
}

#[test]
fn truncated_inside_the_length_field() {
    for len in [0, 1, 4, 7] {
        let dir = copy_fixture("gpt2_hf");
        truncate(&dir, len);
        let msg = load_err(dir.path());
        assert_names(
            &msg,
            &[
                "model.safetensors",
                "malformed safetensors",
                &format!("the file is {len} bytes"),
                "8-byte header length",
            ],
        );
    }
}

#[test]
fn truncated_inside_the_header() {
    let dir = copy_fixture("gpt2_hf");
    let n = header_len(&dir);
    for len in [8, 9, 8 + n / 2, 8 + n - 1] {
        truncate(&dir, len);
        let msg = load_err(dir.path());
        assert_names(
            &msg,
            &[
                "model.safetensors",
                &format!("header length field reads {n} bytes"),
                &format!("holds only {} bytes after it", len - 8),
                "truncated",
            ],
        );
        std::fs::copy(
            fixture_dir("gpt2_hf").join("model.safetensors"),
            weights(&dir),
        )
        .unwrap();
    }
}

#[test]
fn truncated_inside_the_data() {
    let full = std::fs::metadata(fixture_dir("gpt2_hf").join("model.safetensors"))
        .unwrap()
        .len() as usize;
    let dir = copy_fixture("gpt2_hf");
    let n = header_len(&dir);
    let data = full - 8 - n;
    for len in [8 + n, 8 + n + 1, 8 + n + data / 2, full - 1] {
        truncate(&dir, len);
        let msg = load_err(dir.path());
        assert_names(
            &msg,
            &[
                "model.safetensors",
                &format!("describes {data} data bytes"),
                &format!("holds only {}", len - 8 - n),
                "truncated",
            ],
        );
        std::fs::copy(
            fixture_dir("gpt2_hf").join("model.safetensors"),
            weights(&dir),
        )
        .unwrap();
    }
}

#[test]
fn trailing_bytes_after_the_data() {
    let dir = copy_fixture("gpt2_hf");
    let mut bytes = std::fs::read(weights(&dir)).unwrap();
    bytes.extend_from_slice(&[0u8; 5]);
    std::fs::write(weights(&dir), &bytes).unwrap();
    let msg = load_err(dir.path());
    assert_names(&msg, &["model.safetensors", "trailing bytes"]);
}

#[test]
fn header_length_beyond_the_file() {
    let dir = copy_fixture("gpt2_hf");
    let mut bytes = std::fs::read(weights(&dir)).unwrap();
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&len.to_le_bytes());
    std::fs::write(weights(&dir), &bytes).unwrap();
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &[
            "model.safetensors",
            &format!("header length field reads {len} bytes"),
            &format!("only {} bytes after it", len - 8),
        ],
    );

    // A length no header can have: u64::MAX.
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(weights(&dir), &bytes).unwrap();
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &[
            "model.safetensors",
            "over the 100 MB limit",
            "not a safetensors",
        ],
    );
}

#[test]
fn garbage_bytes() {
    let dir = copy_fixture("gpt2_hf");
    // A deterministic xorshift stream: no seed, no flakiness.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(weights(&dir), &garbage).unwrap();
    let msg = load_err(dir.path());
    assert_names(&msg, &["model.safetensors", "malformed safetensors"]);

    // A plausible length followed by a header that is not JSON.
    let mut bytes = 16u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"this is not json");
    std::fs::write(weights(&dir), &bytes).unwrap();
    let msg = load_err(dir.path());
    assert_names(&msg, &["model.safetensors", "invalid JSON in header"]);

    // A text file saved under the safetensors name.
    std::fs::write(
        weights(&dir),
        "version https://git-lfs.github.com/spec/v1\n",
    )
    .unwrap();
    let msg = load_err(dir.path());
    assert_names(&msg, &["model.safetensors", "malformed safetensors"]);
}

// ---- tensors ----

#[test]
fn missing_tensor() {
    let cases = [
        ("gpt2_hf", "transformer.h.1.mlp.c_fc.bias"),
        ("gpt2_hf", "transformer.h.0.attn.c_attn.weight"),
        // The tensor the `transformer.` prefix used to be detected from.
        ("gpt2_hf", "transformer.wte.weight"),
        ("gpt2_hf_noprefix", "wpe.weight"),
        ("tl_relu_nonorm", "blocks.0.attn.W_Q"),
        ("tl_relu_nonorm", "unembed.W_U"),
        ("tl_attn_only_shortformer", "blocks.2.ln1.b"),
    ];
    for (fixture, name) in cases {
        let dir = copy_fixture(fixture);
        rewrite(&dir, |t| {
            let before = t.len();
            t.retain(|t| t.0 != name);
            assert_eq!(t.len(), before - 1, "{fixture} has no {name}");
        });
        let msg = load_err(dir.path());
        assert_names(
            &msg,
            &["model.safetensors", &format!("missing tensor `{name}`")],
        );
    }
}

#[test]
fn tensor_of_the_wrong_shape() {
    let dir = copy_fixture("gpt2_hf");
    let name = "transformer.h.1.attn.c_attn.weight";
    rewrite(&dir, |t| find(t, name).2 = vec![96, 32]);
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &[
            "model.safetensors",
            &format!("tensor `{name}` has shape [96, 32], expected [32, 96]"),
        ],
    );

    let dir = copy_fixture("tl_relu_nonorm");
    let name = "blocks.1.attn.W_O";
    rewrite(&dir, |t| find(t, name).2 = vec![3, 24, 8]);
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &[&format!(
            "tensor `{name}` has shape [3, 24, 8], expected [3, 8, 24]"
        )],
    );

    // The config, not the file, is wrong: a larger vocabulary than the embedding holds.
    let dir = copy_fixture("gpt2_hf");
    edit_config(&dir, |c| {
        c.insert("vocab_size".into(), 100.into());
    });
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &["tensor `transformer.wte.weight` has shape [96, 32], expected [100, 32]"],
    );
}

#[test]
fn integer_tensor_where_floats_are_expected() {
    let dir = copy_fixture("gpt2_hf");
    let name = "transformer.h.0.mlp.c_proj.weight";
    rewrite(&dir, |t| find(t, name).1 = Dtype::I32);
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &[
            "model.safetensors",
            &format!("tensor `{name}` has dtype I32, expected f32, f16 or bf16"),
        ],
    );

    let dir = copy_fixture("tl_relu_nonorm");
    let name = "embed.W_E";
    rewrite(&dir, |t| find(t, name).1 = Dtype::I16);
    let msg = load_err(dir.path());
    assert_names(&msg, &[&format!("tensor `{name}` has dtype I16")]);
}

// ---- configuration ----

fn edit_config(dir: &TempDir, edit: impl FnOnce(&mut Map<String, Value>)) {
    let text = std::fs::read_to_string(config(dir)).unwrap();
    let mut value: Value = serde_json::from_str(&text).unwrap();
    edit(value.as_object_mut().unwrap());
    std::fs::write(config(dir), serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

/// Sets `field` to `value` in a copy of `fixture` and returns the load error.
fn with_field(fixture: &str, field: &str, value: Value) -> String {
    let dir = copy_fixture(fixture);
    edit_config(&dir, |c| {
        c.insert(field.into(), value);
    });
    load_err(dir.path())
}

#[test]
fn unknown_model_type() {
    let msg = with_field("gpt2_hf", "model_type", "bert".into());
    assert_names(
        &msg,
        &[
            "config.json",
            "unsupported model_type = \"bert\"",
            "supported: \"gpt2\"",
        ],
    );
}

#[test]
fn neither_hf_nor_transformer_lens() {
    let dir = copy_fixture("tl_relu_nonorm");
    edit_config(&dir, |c| {
        c.remove("d_head");
    });
    let msg = load_err(dir.path());
    assert_names(&msg, &["config.json", "unknown model architecture"]);

    std::fs::write(config(&dir), "[1, 2, 3]").unwrap();
    let msg = load_err(dir.path());
    assert_names(&msg, &["config.json", "expected a JSON object"]);
}

#[test]
fn unsupported_activation() {
    let msg = with_field("gpt2_hf", "activation_function", "silu".into());
    assert_names(
        &msg,
        &[
            "config.json",
            "unsupported activation_function = silu",
            "supported: gelu_new, gelu, relu",
        ],
    );
    for act in ["solu", "solu_ln"] {
        let msg = with_field("tl_relu_nonorm", "act_fn", act.into());
        assert_names(
            &msg,
            &["config.json", &format!("unsupported act_fn = {act}")],
        );
    }
    // A model with MLPs must say which activation they use.
    let msg = with_field("tl_relu_nonorm", "act_fn", Value::Null);
    assert_names(&msg, &["config.json", "`act_fn` is required"]);
}

#[test]
fn unsupported_transformer_lens_fields() {
    let cases: [(&str, Value, &str); 8] = [
        (
            "positional_embedding_type",
            "rotary".into(),
            "unsupported positional_embedding_type = rotary",
        ),
        (
            "normalization_type",
            "RMS".into(),
            "unsupported normalization_type = RMS",
        ),
        (
            "normalization_type",
            "RMSPre".into(),
            "unsupported normalization_type = RMSPre",
        ),
        ("gated_mlp", true.into(), "unsupported gated_mlp = true"),
        (
            "parallel_attn_mlp",
            true.into(),
            "unsupported parallel_attn_mlp = true",
        ),
        (
            "n_key_value_heads",
            1.into(),
            "unsupported n_key_value_heads = 1 (grouped-query attention",
        ),
        (
            "attention_dir",
            "sideways".into(),
            "unsupported attention_dir = sideways",
        ),
        (
            "output_logits_soft_cap",
            30.0.into(),
            "unsupported output_logits_soft_cap = 30",
        ),
    ];
    for (field, value, expected) in cases {
        let msg = with_field("tl_relu_nonorm", field, value);
        assert_names(&msg, &["config.json", expected]);
    }
    // Values equal to the implemented behaviour are accepted.
    let dir = copy_fixture("tl_relu_nonorm");
    edit_config(&dir, |c| {
        c.insert("n_key_value_heads".into(), 3.into());
        c.insert("gated_mlp".into(), false.into());
    });
    Model::load_dir(dir.path(), &Device::Cpu).unwrap();
}

#[test]
fn unsupported_hf_fields() {
    let msg = with_field("gpt2_hf", "scale_attn_by_inverse_layer_idx", true.into());
    assert_names(
        &msg,
        &[
            "config.json",
            "unsupported scale_attn_by_inverse_layer_idx = true",
        ],
    );
}

#[test]
fn missing_or_mistyped_config_fields() {
    let dir = copy_fixture("gpt2_hf");
    edit_config(&dir, |c| {
        c.remove("n_embd");
    });
    let msg = load_err(dir.path());
    assert_names(&msg, &["config.json", "missing field `n_embd`"]);

    // Issue 13: GPT-2's field is `n_positions` (`n_ctx` its older alias, still read).
    let dir = copy_fixture("gpt2_hf");
    edit_config(&dir, |c| {
        c.remove("n_positions");
    });
    let msg = load_err(dir.path());
    assert_names(&msg, &["config.json", "missing field `n_positions`"]);
    edit_config(&dir, |c| {
        c.insert("n_ctx".into(), 16.into());
    });
    Model::load_dir(dir.path(), &Device::Cpu).unwrap();

    let msg = with_field("gpt2_hf", "n_layer", "two".into());
    assert_names(
        &msg,
        &[
            "config.json",
            "`n_layer` must be a non-negative integer, found \"two\"",
        ],
    );

    let msg = with_field("tl_relu_nonorm", "n_heads", 0.into());
    assert_names(&msg, &["config.json", "`n_heads` must be positive"]);

    let msg = with_field("gpt2_hf", "n_head", 5.into());
    assert_names(
        &msg,
        &["config.json", "n_embd = 32 is not divisible by n_head = 5"],
    );
}

#[test]
fn malformed_json_config_names_the_line() {
    let dir = copy_fixture("tl_relu_nonorm");
    std::fs::write(
        config(&dir),
        "{\n  \"n_layers\": 2,\n  \"d_model\": 24,,\n  \"d_head\": 8\n}\n",
    )
    .unwrap();
    let msg = load_err(dir.path());
    assert_names(&msg, &["config.json:3:", "line 3"]);

    std::fs::write(config(&dir), "").unwrap();
    let msg = load_err(dir.path());
    assert_names(&msg, &["config.json:1:", "EOF"]);
}

// ---- files ----

#[test]
fn missing_config_json() {
    let dir = copy_fixture("gpt2_hf");
    std::fs::remove_file(config(&dir)).unwrap();
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &["config.json", "no config.json in the model directory"],
    );
}

#[test]
fn missing_weights() {
    let dir = copy_fixture("gpt2_hf");
    std::fs::remove_file(weights(&dir)).unwrap();
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &[
            "model.safetensors",
            "expected model.safetensors beside config.json",
        ],
    );
}

#[test]
fn only_pytorch_model_bin() {
    let dir = copy_fixture("gpt2_hf");
    std::fs::rename(weights(&dir), dir.path().join("pytorch_model.bin")).unwrap();
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &[
            "model.safetensors",
            "only pytorch_model.bin is present",
            "from safetensors.torch import save_file",
        ],
    );
}

#[test]
fn sharded_checkpoint() {
    let dir = copy_fixture("gpt2_hf");
    std::fs::remove_file(weights(&dir)).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        "{\"weight_map\": {}}",
    )
    .unwrap();
    // Sharded checkpoints load (tests/loading.rs); an index naming no tensors is malformed.
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &[
            "model.safetensors.index.json",
            "`weight_map` names no tensors",
        ],
    );
}

#[test]
fn weights_path_is_a_directory() {
    let dir = copy_fixture("gpt2_hf");
    std::fs::remove_file(weights(&dir)).unwrap();
    std::fs::create_dir(weights(&dir)).unwrap();
    let msg = load_err(dir.path());
    assert_names(&msg, &["model.safetensors"]);
}

// ---- hub ids and the hub cache ----

#[test]
fn hub_id_not_in_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let err = resolve_model_dir_in("some-org/absent-model", Some(cache.path())).unwrap_err();
    let msg = err.to_string();
    assert_names(
        &msg,
        &[
            "some-org/absent-model: no such directory",
            "models--some-org--absent-model",
            "eap does not download",
            "huggingface-cli download some-org/absent-model",
        ],
    );

    let err = resolve_model_dir_in("gpt2-absent", None).unwrap_err();
    assert_names(&err.to_string(), &["gpt2-absent", "no cache directory"]);

    // A repository folder whose snapshots lack config.json.
    let snap = cache.path().join("models--org--empty/snapshots/abc");
    std::fs::create_dir_all(&snap).unwrap();
    let msg = resolve_model_dir_in("org/empty", Some(cache.path()))
        .unwrap_err()
        .to_string();
    assert_names(&msg, &["org/empty", "with a config.json in"]);
}

#[test]
fn a_file_is_not_a_model_directory() {
    let dir = copy_fixture("gpt2_hf");
    let spec = config(&dir);
    let msg = resolve_model_dir_in(spec.to_str().unwrap(), None)
        .unwrap_err()
        .to_string();
    assert_names(&msg, &["config.json", "expected a model directory"]);
    let msg = Model::load(spec.to_str().unwrap(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert_names(&msg, &["expected a model directory"]);
}

/// Lays out fixture `name` the way `huggingface_hub` does: files in `blobs/`, symlinked from
/// `snapshots/<rev>/`.
fn hub_snapshot(cache: &Path, repo: &str, rev: &str, name: &str) -> PathBuf {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let blobs = root.join("blobs");
    let snap = root.join("snapshots").join(rev);
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for file in ["config.json", "model.safetensors"] {
        let blob = blobs.join(format!("{rev}-{file}"));
        std::fs::copy(fixture_dir(name).join(file), &blob).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(format!("../../blobs/{rev}-{file}"), snap.join(file)).unwrap();
        #[cfg(not(unix))]
        std::fs::copy(&blob, snap.join(file)).unwrap();
    }
    snap
}

#[test]
fn hub_cache_snapshot_resolves() {
    let cache = tempfile::tempdir().unwrap();
    let rev = "0123456789abcdef0123456789abcdef01234567";
    // Two revisions of different models: `refs/main` decides.
    let old = hub_snapshot(
        cache.path(),
        "org/tiny",
        "fedcba9876543210",
        "tl_relu_nonorm",
    );
    let main = hub_snapshot(cache.path(), "org/tiny", rev, "gpt2_hf");
    let refs = cache.path().join("models--org--tiny/refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::write(refs.join("main"), format!("{rev}\n")).unwrap();

    let dir = resolve_model_dir_in("org/tiny", Some(cache.path())).unwrap();
    assert_eq!(dir, main);
    let model = Model::load_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(model.cfg.d_vocab, 96, "loaded the refs/main revision");
    assert!(model.name.contains(rev), "{}", model.name);

    // `refs/main` naming a revision that is not there: the snapshot with a config is used.
    std::fs::write(refs.join("main"), "not-downloaded\n").unwrap();
    std::fs::remove_file(main.join("config.json")).unwrap();
    let dir = resolve_model_dir_in("org/tiny", Some(cache.path())).unwrap();
    assert_eq!(dir, old);
    let model = Model::load_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(model.cfg.d_vocab, 72);

    // A plain directory path wins over the cache.
    let local = fixture_dir("gpt2_hf");
    let dir = resolve_model_dir_in(local.to_str().unwrap(), Some(cache.path())).unwrap();
    assert_eq!(dir, local);
}

// ---- forward inputs ----

fn gpt2() -> Model {
    Model::load_dir(&fixture_dir("gpt2_hf"), &Device::Cpu).unwrap()
}

fn forward_err(model: &Model, tokens: &[Vec<u32>], positions: Vec<usize>) -> String {
    let batch = Batch::new(tokens, &Device::Cpu).unwrap();
    let opts = ForwardOptions {
        logit_positions: positions,
        ..Default::default()
    };
    match catch_unwind(AssertUnwindSafe(|| model.forward(&batch, &opts))) {
        Err(_) => panic!("forward panicked"),
        Ok(Ok(_)) => panic!("forward succeeded but should fail"),
        Ok(Err(e)) => e.to_string(),
    }
}

#[test]
fn token_id_out_of_vocabulary() {
    let model = gpt2();
    let msg = forward_err(&model, &[vec![1, 2, 3], vec![4, 96, 5]], vec![]);
    assert_names(&msg, &["token ids below d_vocab = 96", "token id 96"]);
    let msg = forward_err(&model, &[vec![u32::MAX]], vec![]);
    assert_names(&msg, &[&format!("token id {}", u32::MAX)]);
}

#[test]
fn sequence_longer_than_n_ctx() {
    let model = gpt2();
    let msg = forward_err(&model, &[vec![1; 17]], vec![]);
    assert_names(
        &msg,
        &["at most n_ctx = 16 positions", "found 17 positions"],
    );
    // n_ctx itself is fine.
    let batch = Batch::new(&[vec![1; 16]], &Device::Cpu).unwrap();
    model.forward(&batch, &ForwardOptions::default()).unwrap();
}

#[test]
fn batch_of_unequal_lengths() {
    let err = Batch::new(&[vec![1, 2, 3], vec![1, 2, 3], vec![1, 2]], &Device::Cpu).unwrap_err();
    assert_names(
        &err.to_string(),
        &["3 tokens in every sequence", "2 tokens in sequence 2"],
    );
    let err = Batch::new(&[], &Device::Cpu).unwrap_err();
    assert_names(&err.to_string(), &["empty batch"]);
    let err = Batch::new(&[vec![]], &Device::Cpu).unwrap_err();
    assert_names(&err.to_string(), &["empty"]);
}

#[test]
fn logit_position_out_of_range() {
    let model = gpt2();
    let msg = forward_err(&model, &[vec![1, 2, 3]], vec![0, 3]);
    assert_names(
        &msg,
        &["logit positions", "positions below 3", "position 3"],
    );
}

// ---- score files (issue 13) ----

fn eapig_scores() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eapig_graph.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn read_scores_err(text: &str, missing: eap::graph::MissingEdges) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scores.json");
    std::fs::write(&path, text).unwrap();
    eap::graph::CircuitFile::read_scores(&path, missing)
        .unwrap_err()
        .to_string()
}

#[test]
fn complete_eapig_scores_file_reads_strictly() {
    use eap::graph::{CircuitFile, MissingEdges};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scores.json");
    std::fs::write(&path, eapig_scores().to_string()).unwrap();
    let read = CircuitFile::read_scores(&path, MissingEdges::Refuse).unwrap();
    assert_eq!((read.missing, read.file.graph.n_edges()), (0, 193));
}

#[test]
fn scores_file_missing_edges_is_refused_unless_allowed() {
    use eap::graph::{CircuitFile, MissingEdges};
    let mut v = eapig_scores();
    let edges = v["edges"].as_object_mut().unwrap();
    let names: Vec<String> = edges.keys().cloned().collect();
    // Keep the edges into the logits so the file still names the last layer's heads.
    for name in names.iter().filter(|n| !n.ends_with("->logits")).step_by(2) {
        edges.remove(name);
    }
    let kept = edges.len();
    let text = v.to_string();
    let e = read_scores_err(&text, MissingEdges::Refuse);
    assert_names(
        &e,
        &[
            "scores.json",
            &format!("{kept} of the 193 edges"),
            "--allow-missing",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scores.json");
    std::fs::write(&path, &text).unwrap();
    let read = CircuitFile::read_scores(&path, MissingEdges::Fill).unwrap();
    assert_eq!(read.missing, 193 - kept);

    v["edges"] = serde_json::json!({});
    let e = read_scores_err(&v.to_string(), MissingEdges::Refuse);
    assert_names(&e, &["scores.json", "lists every edge"]);
}

#[test]
fn scores_file_cfg_larger_than_its_contents_is_refused_before_allocating() {
    use eap::graph::MissingEdges;
    let mut v = eapig_scores();
    v["cfg"]["n_layers"] = 200.into();
    v["cfg"]["n_heads"] = 12.into();
    for missing in [MissingEdges::Refuse, MissingEdges::Fill] {
        let started = std::time::Instant::now();
        let e = read_scores_err(&v.to_string(), missing);
        assert_names(
            &e,
            &[
                "scores.json",
                "200 layers of 12 heads",
                "only 3 layers and 4 heads",
            ],
        );
        assert!(
            started.elapsed().as_secs() < 2,
            "took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn scores_file_edge_listed_twice_is_refused() {
    use eap::graph::MissingEdges;
    let text = eapig_scores().to_string();
    let dup = text.replacen(
        "\"edges\":{",
        "\"edges\":{\"a0.h0->logits\":{\"score\":9.0,\"in_graph\":true},",
        1,
    );
    assert_ne!(dup, text);
    for missing in [
        MissingEdges::Refuse,
        MissingEdges::Fill,
        MissingEdges::Circuit,
    ] {
        let e = read_scores_err(&dup, missing);
        assert_names(&e, &["scores.json", "a0.h0->logits", "more than once"]);
    }
}
