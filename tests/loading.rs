//! Loading the Llama-family fixtures (`scripts/make_family_fixtures.py`) from their Hugging Face
//! directories: logits against the float64 references, the hub configs of the models MIB scores
//! (edge counts from the config alone), settings eap refuses (each error names its field),
//! sharded checkpoints, and tensors the configuration does not explain.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::Device;
use eap::model::config::{RopeScaling, Rotary};
use eap::model::{Activation, Batch, ForwardOptions, Model, ModelConfig, Norm, Positions};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Map, Value};
use tempfile::TempDir;

use crate::util::*;

fn load(name: &str) -> Model {
    Model::load_dir(&fixture_dir(name), &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn hub_config(name: &str) -> ModelConfig {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/configs")
        .join(format!("{name}.json"));
    ModelConfig::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A temporary copy of every file of fixture `name`.
fn copy_fixture(name: &str) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture_dir(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

/// Loads `dir`, asserting that loading neither panics nor succeeds; returns the message.
fn load_err(dir: &Path) -> String {
    match catch_unwind(AssertUnwindSafe(|| Model::load_dir(dir, &Device::Cpu))) {
        Err(_) => panic!("loading {} panicked", dir.display()),
        Ok(Ok(_)) => panic!("loading {} succeeded but should fail", dir.display()),
        Ok(Err(e)) => e.to_string(),
    }
}

fn assert_names(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "error message lacks {part:?}: {message}"
        );
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut value: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(value.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

/// Parses the config of fixture (or hub config) `json` after `edit`, without weights.
fn parse_edited(
    base: &Value,
    edit: impl FnOnce(&mut Map<String, Value>),
) -> eap::Result<ModelConfig> {
    let mut v = base.clone();
    edit(v.as_object_mut().unwrap());
    ModelConfig::from_json(&v, Path::new("config.json"))
}

fn fixture_config_json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_dir(name).join("config.json")).unwrap())
        .unwrap()
}

/// The error of parsing `base` with `field` set to `value`.
fn config_err(base: &Value, field: &str, value: Value) -> String {
    match parse_edited(base, |c| {
        c.insert(field.into(), value);
    }) {
        Ok(_) => panic!("setting {field} should be refused"),
        Err(e) => e.to_string(),
    }
}

/// Every tensor of a safetensors file: name, dtype, shape, bytes.
type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn rewrite(path: &Path, edit: impl FnOnce(&mut Tensors)) {
    let bytes = std::fs::read(path).unwrap();
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
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Adds a copy of tensor `from` named `to`.
fn duplicate(t: &mut Tensors, from: &str, to: &str) {
    let mut copy = t
        .iter()
        .find(|t| t.0 == from)
        .unwrap_or_else(|| panic!("no tensor {from}"))
        .clone();
    copy.0 = to.into();
    t.push(copy);
}

// ---- every family loads and computes what transformers computes ----

#[test]
fn every_family_fixture_matches_its_reference_logits() {
    for name in FAMILY_FIXTURES {
        let model = load(name);
        let refs = reference(name);
        for (tok_key, logit_key) in [
            ("tokens", "logits"),
            ("corrupted_tokens", "corrupted_logits"),
        ] {
            let batch = Batch::new(&tokens(&refs[tok_key]), &Device::Cpu).unwrap();
            let opts = ForwardOptions {
                logit_positions: (0..batch.seq_len).collect(),
                ..Default::default()
            };
            let out = model.forward(&batch, &opts).unwrap();
            let err = rel_err(&flat(&out.logits), &flat(&refs[logit_key]));
            eprintln!("{name} {logit_key}: relative error {err:e}");
            assert!(err <= 1e-4, "{name} {logit_key}: relative error {err:e}");
        }
    }
}

/// What each fixture's config.json says, as eap reads it (fixture README).
#[test]
fn family_fixture_configs() {
    let rotary = |m: &Model| match m.cfg.positions {
        Positions::Rotary(r) => r,
        other => panic!("{}: positions {other:?}", m.name),
    };

    let m = load("llama_gqa");
    let c = &m.cfg;
    assert_eq!(
        (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_head),
        (2, 32, 4, 2, 8)
    );
    assert_eq!((c.d_mlp, c.d_vocab, c.n_ctx), (Some(48), 96, 256));
    assert_eq!(
        (c.norm, c.act, c.gated_mlp, c.eps),
        (Norm::RmsNorm, Activation::Silu, true, 1e-5)
    );
    assert_eq!(
        rotary(&m),
        Rotary {
            dim: 8,
            theta: 10000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 128,
            },
        }
    );
    // The README's frequencies: one kept, one smoothed, two divided by the factor.
    let f = rotary(&m).inv_freq();
    for (got, want) in f.iter().zip([1.0, 0.042751, 0.00125, 0.000125]) {
        assert!((got - want).abs() <= 1e-5 * want, "{f:?}");
    }
    assert_eq!(c.sliding_window, None);

    let m = load("mistral_sharded");
    let c = &m.cfg;
    assert_eq!(
        (c.n_heads, c.n_kv_heads, c.d_head, c.d_mlp),
        (4, 1, 12, Some(40))
    );
    assert_eq!(rotary(&m).scaling, RopeScaling::None);
    assert_eq!(c.sliding_window, None, "sliding_window: null");

    let m = load("qwen2_bias");
    let c = &m.cfg;
    assert_eq!((c.n_kv_heads, c.eps), (2, 1e-6));
    // sliding_window 4 with use_sliding_window false: ignored, as transformers does.
    assert_eq!(c.sliding_window, None);
    let attn = &m.layer(0).unwrap().attn;
    assert!(attn.output_bias().is_none(), "qwen2 has no o_proj bias");

    let m = load("neox_parallel");
    let c = &m.cfg;
    assert_eq!(
        (c.norm, c.act, c.parallel_attn_mlp),
        (Norm::LayerNorm, Activation::Gelu, true)
    );
    assert_eq!(rotary(&m).dim, 2, "rotary_pct 0.25 of 8");
    assert_eq!(m.graph().n_edges(), 102);

    let m = load("gemma2_full");
    let c = &m.cfg;
    assert_eq!(
        (c.n_layers, c.n_heads, c.n_kv_heads, c.d_head),
        (3, 4, 2, 16)
    );
    assert_eq!((c.act, c.post_norms), (Activation::GeluNew, true));
    assert_eq!(c.embed_scale, 32f32.sqrt());
    assert_eq!(c.attn_scale, 24f32.sqrt());
    assert_eq!((c.attn_softcap, c.final_softcap), (Some(5.0), Some(3.0)));
    let sw = c.sliding_window.as_ref().unwrap();
    assert_eq!((sw.window, sw.layers.clone()), (4, vec![true, false, true]));
    assert_eq!(m.graph().n_edges(), 262);
    // (1 + w): the stored gains are w = 0.3·randn, the loaded ones 1 + w.
    let gain = flat(&m.layer(1).unwrap().attn.norm.weights().unwrap().w);
    let mean = gain.iter().sum::<f32>() / gain.len() as f32;
    assert!((0.7..1.3).contains(&mean), "mean gain {mean}");
}

// ---- the hub configs of the models MIB scores: edge counts from the config alone ----

#[test]
fn hub_config_edge_counts() {
    for (name, edges) in [
        ("qwen2.5-0.5b", 179_749),
        ("gemma-2-2b", 74_218),
        ("llama-3.1-8b", 1_592_881),
        ("pythia-160m", 32_347),
    ] {
        assert_eq!(hub_config(name).graph().n_edges(), edges, "{name}");
    }
}

#[test]
fn hub_configs_read_as_transformers_reads_them() {
    let c = hub_config("qwen2.5-0.5b");
    assert_eq!(
        (
            c.n_layers,
            c.d_model,
            c.n_heads,
            c.n_kv_heads,
            c.d_head,
            c.d_mlp,
            c.d_vocab
        ),
        (24, 896, 14, 2, 64, Some(4864), 151_936)
    );
    assert_eq!(c.sliding_window, None, "use_sliding_window: false");
    assert_eq!(
        c.positions,
        Positions::Rotary(Rotary {
            dim: 64,
            theta: 1e6,
            scaling: RopeScaling::None
        })
    );

    let c = hub_config("gemma-2-2b");
    assert_eq!(
        (
            c.n_layers,
            c.d_model,
            c.n_heads,
            c.n_kv_heads,
            c.d_head,
            c.d_mlp,
            c.d_vocab
        ),
        (26, 2304, 8, 4, 256, Some(9216), 256_000)
    );
    assert_eq!((c.attn_softcap, c.final_softcap), (Some(50.0), Some(30.0)));
    assert_eq!((c.attn_scale, c.embed_scale), (16.0, 48.0));
    // No layer_types in a 4.42 config: transformers' default, layer i slides when i is even.
    let sw = c.sliding_window.unwrap();
    assert_eq!(sw.window, 4096);
    assert_eq!(sw.layers, (0..26).map(|i| i % 2 == 0).collect::<Vec<_>>());

    let c = hub_config("llama-3.1-8b");
    assert_eq!(
        (
            c.n_layers,
            c.d_model,
            c.n_heads,
            c.n_kv_heads,
            c.d_mlp,
            c.d_vocab,
            c.n_ctx
        ),
        (32, 4096, 32, 8, Some(14_336), 128_256, 131_072)
    );
    assert_eq!(
        c.positions,
        Positions::Rotary(Rotary {
            dim: 128,
            theta: 500_000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }
        })
    );

    let c = hub_config("pythia-160m");
    assert_eq!(
        (c.n_layers, c.d_model, c.n_heads, c.d_head),
        (12, 768, 12, 64)
    );
    assert!(c.parallel_attn_mlp);
    assert_eq!(
        c.positions,
        Positions::Rotary(Rotary {
            dim: 16,
            theta: 10_000.0,
            scaling: RopeScaling::None
        })
    );
}

// ---- settings eap does not implement: refused, naming the field ----

#[test]
fn unsupported_settings_name_their_field() {
    let llama = fixture_config_json("llama_gqa");
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "rope_scaling",
            json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
            "unsupported rope_scaling.rope_type = yarn (supported: default, llama3)",
        ),
        (
            "rope_scaling",
            json!({"type": "linear", "factor": 2.0}),
            "unsupported rope_scaling.rope_type = linear",
        ),
        (
            "rope_scaling",
            json!({"type": "dynamic", "factor": 2.0}),
            "unsupported rope_scaling.rope_type = dynamic",
        ),
        (
            "num_local_experts",
            json!(8),
            "unsupported num_local_experts = 8 (mixture-of-experts",
        ),
        ("num_experts", json!(60), "unsupported num_experts = 60"),
        (
            "num_experts_per_tok",
            json!(2),
            "unsupported num_experts_per_tok = 2",
        ),
        (
            "hidden_act",
            json!("quick_gelu"),
            "unsupported hidden_act = quick_gelu",
        ),
        (
            "use_bidirectional_attention",
            json!(true),
            "unsupported use_bidirectional_attention = true",
        ),
        ("mlp_bias", json!(true), "unsupported mlp_bias = true"),
        (
            "partial_rotary_factor",
            json!(0.5),
            "unsupported partial_rotary_factor = 0.5",
        ),
        (
            "quantization_config",
            json!({"quant_method": "gptq", "bits": 4}),
            "unsupported quantization_config = \"gptq\"",
        ),
        ("clip_qkv", json!(8.0), "unsupported clip_qkv = 8.0"),
        ("use_mrope", json!(true), "unsupported use_mrope = true"),
    ];
    for (field, value, expected) in cases {
        let msg = config_err(&llama, field, value);
        assert_names(&msg, &["config.json", expected]);
    }

    // The newer spelling names its own field.
    let mistral = fixture_config_json("mistral_sharded");
    let msg = config_err(
        &mistral,
        "rope_parameters",
        json!({"rope_type": "longrope", "rope_theta": 10000.0}),
    );
    assert_names(&msg, &["unsupported rope_parameters.rope_type = longrope"]);
    let msg = config_err(
        &mistral,
        "rope_parameters",
        json!({"full_attention": {"rope_type": "default"}}),
    );
    assert_names(&msg, &["unsupported rope_parameters.full_attention"]);

    // Gemma-2 reads `hidden_activation`; NeoX `hidden_act`.
    let gemma2 = fixture_config_json("gemma2_full");
    let msg = config_err(&gemma2, "hidden_activation", json!("xielu"));
    assert_names(&msg, &["unsupported hidden_activation = xielu"]);
    let msg = config_err(&gemma2, "use_bidirectional_attention", json!(true));
    assert_names(&msg, &["unsupported use_bidirectional_attention = true"]);
    let msg = config_err(
        &gemma2,
        "layer_types",
        json!(["sliding_attention", "chunked_attention", "full_attention"]),
    );
    assert_names(&msg, &["unsupported layer_types = \"chunked_attention\""]);
    let neox = fixture_config_json("neox_parallel");
    let msg = config_err(&neox, "hidden_act", json!("gelu_10"));
    assert_names(&msg, &["unsupported hidden_act = gelu_10"]);
    let msg = config_err(
        &neox,
        "rope_scaling",
        json!({"type": "linear", "factor": 2.0}),
    );
    assert_names(&msg, &["unsupported rope_scaling.rope_type = linear"]);

    // Model types whose blocks eap lacks.
    for (model_type, hint) in [
        ("qwen3", "q_norm, k_norm"),
        ("olmo2", "q_norm, k_norm"),
        ("gemma3_text", "Gemma-3"),
        ("mixtral", "mixture-of-experts"),
        ("bert", "supported: \"gpt2\", \"llama\""),
    ] {
        let msg = config_err(&llama, "model_type", json!(model_type));
        assert_names(
            &msg,
            &[&format!("unsupported model_type = \"{model_type}\""), hint],
        );
    }

    // Values equal to what is implemented are accepted: MoE fields at 0, a null rope_scaling,
    // rope_type default, fields that do not change the computation.
    for (field, value) in [
        ("num_experts", json!(0)),
        ("use_bidirectional_attention", json!(false)),
        ("use_mrope", json!(false)),
        ("pretraining_tp", json!(4)),
        ("attention_dropout", json!(0.1)),
        ("_name_or_path", json!("meta-llama/Llama-3.1-8B")),
        ("pruned_heads", json!({})),
    ] {
        parse_edited(&llama, |c| {
            c.insert(field.into(), value.clone());
        })
        .unwrap_or_else(|e| panic!("{field} = {value}: {e}"));
    }
}

#[test]
fn malformed_rotary_and_window_settings() {
    let llama = fixture_config_json("llama_gqa");
    let msg = config_err(
        &llama,
        "rope_scaling",
        json!({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}),
    );
    assert_names(&msg, &["rope_scaling", "lacks `low_freq_factor`"]);
    let msg = config_err(&llama, "rope_scaling", json!("llama3"));
    assert_names(&msg, &["`rope_scaling` must be an object"]);
    let msg = config_err(&llama, "num_key_value_heads", json!(3));
    assert_names(
        &msg,
        &["num_attention_heads = 4 is not a multiple of num_key_value_heads = 3"],
    );

    let gemma2 = fixture_config_json("gemma2_full");
    let msg = config_err(&gemma2, "layer_types", json!(["full_attention"]));
    assert_names(
        &msg,
        &["`layer_types` lists 1 layers but num_hidden_layers = 3"],
    );
    let msg = config_err(&gemma2, "sliding_window", Value::Null);
    assert_names(
        &msg,
        &["marks sliding_attention layers but there is no sliding window"],
    );
    let msg = config_err(&gemma2, "final_logit_softcapping", json!(0.0));
    assert_names(
        &msg,
        &["`final_logit_softcapping` must be positive or null"],
    );

    let neox = fixture_config_json("neox_parallel");
    // 8 · 0.3 = 2.4 → int 2 is fine; 8 · 0.125 = 1 is odd.
    let msg = config_err(&neox, "rotary_pct", json!(0.125));
    assert_names(&msg, &["rotary dimension", "= 1 must be even"]);
}

/// Defaults and spellings, as transformers' configuration classes define them.
#[test]
fn config_defaults_and_spellings() {
    // Hub spelling and new spelling of the same rotary settings agree.
    let llama = fixture_config_json("llama_gqa");
    let hub = parse_edited(&llama, |_| {}).unwrap();
    let new = parse_edited(&llama, |c| {
        let mut p = c.remove("rope_scaling").unwrap();
        p["rope_theta"] = c.remove("rope_theta").unwrap();
        c.insert("rope_parameters".into(), p);
    })
    .unwrap();
    assert_eq!(hub, new);
    // rope_scaling wins over rope_parameters; `type` is the old name of `rope_type`.
    let both = parse_edited(&llama, |c| {
        c.insert("rope_parameters".into(), json!({"rope_type": "yarn"}));
    })
    .unwrap();
    assert_eq!(hub, both);
    let old = parse_edited(&llama, |c| {
        let s = c.get_mut("rope_scaling").unwrap().as_object_mut().unwrap();
        let t = s.remove("rope_type").unwrap();
        s.insert("type".into(), t);
    })
    .unwrap();
    assert_eq!(hub, old);
    // llama3's original_max_position_embeddings defaults to max_position_embeddings.
    let c = parse_edited(&llama, |c| {
        c["rope_scaling"]
            .as_object_mut()
            .unwrap()
            .remove("original_max_position_embeddings");
    })
    .unwrap();
    match c.positions {
        Positions::Rotary(Rotary {
            scaling:
                RopeScaling::Llama3 {
                    original_max_position_embeddings,
                    ..
                },
            ..
        }) => assert_eq!(original_max_position_embeddings, 256),
        other => panic!("{other:?}"),
    }
    // head_dim and num_key_value_heads absent: d / heads and (Llama) as many as query heads.
    let c = parse_edited(&llama, |c| {
        c.remove("head_dim");
        c.remove("num_key_value_heads");
        c.remove("rms_norm_eps");
    })
    .unwrap();
    assert_eq!((c.d_head, c.n_kv_heads, c.eps), (8, 4, 1e-6));

    // Mistral: sliding_window absent is 4096 on every layer; null is none.
    let mistral = fixture_config_json("mistral_sharded");
    let c = parse_edited(&mistral, |c| {
        c.remove("sliding_window");
    })
    .unwrap();
    let sw = c.sliding_window.unwrap();
    assert_eq!((sw.window, sw.layers), (4096, vec![true, true]));
    let c = parse_edited(&mistral, |c| {
        c.insert("sliding_window".into(), json!(3));
    })
    .unwrap();
    assert_eq!(c.sliding_window.unwrap().layers, vec![true, true]);

    // Qwen2 slides only with use_sliding_window, on layers ≥ max_window_layers.
    let qwen = fixture_config_json("qwen2_bias");
    let c = parse_edited(&qwen, |c| {
        c.insert("use_sliding_window".into(), json!(true));
        c.insert("max_window_layers".into(), json!(1));
    })
    .unwrap();
    let sw = c.sliding_window.unwrap();
    assert_eq!((sw.window, sw.layers), (4, vec![false, true]));
    let c = parse_edited(&qwen, |c| {
        c.insert("use_sliding_window".into(), json!(true));
    })
    .unwrap();
    assert_eq!(c.sliding_window, None, "max_window_layers 28 > 2 layers");

    // Gemma-2 without layer_types: layer i slides when i is even; without
    // query_pre_attn_scalar and soft-caps: 256, 50, 30; null soft-caps: none.
    let gemma2 = fixture_config_json("gemma2_full");
    let c = parse_edited(&gemma2, |c| {
        c.remove("layer_types");
        c.remove("query_pre_attn_scalar");
        c.remove("attn_logit_softcapping");
        c.insert("final_logit_softcapping".into(), Value::Null);
    })
    .unwrap();
    assert_eq!(c.sliding_window.unwrap().layers, vec![true, false, true]);
    assert_eq!(
        (c.attn_scale, c.attn_softcap, c.final_softcap),
        (16.0, Some(50.0), None)
    );

    // NeoX: rotary_pct / rotary_emb_base, or rope_parameters with partial_rotary_factor.
    let neox = fixture_config_json("neox_parallel");
    let hub = parse_edited(&neox, |_| {}).unwrap();
    let new = parse_edited(&neox, |c| {
        c.remove("rotary_pct");
        c.remove("rotary_emb_base");
        c.insert(
            "rope_parameters".into(),
            json!({"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 0.25}),
        );
    })
    .unwrap();
    assert_eq!(hub, new);
    let c = parse_edited(&neox, |c| {
        c.insert("use_parallel_residual".into(), json!(false));
        c.insert("hidden_act".into(), json!("gelu_new"));
    })
    .unwrap();
    assert_eq!((c.parallel_attn_mlp, c.act), (false, Activation::GeluNew));
    assert_eq!(c.graph().n_edges(), 110);
}

/// OLMo (1): the Llama layout with a parameter-free LayerNorm (OLMo-2's q/k norms are refused
/// above); its `clip_qkv` is refused when set.
#[test]
fn olmo_config() {
    let llama = fixture_config_json("llama_gqa");
    let olmo = parse_edited(&llama, |c| {
        c.insert("model_type".into(), json!("olmo"));
        c.insert("clip_qkv".into(), Value::Null);
    })
    .unwrap();
    assert_eq!(
        (olmo.norm, olmo.eps, olmo.act),
        (Norm::LayerNormPre, 1e-5, Activation::Silu)
    );
    let mut v = llama.clone();
    v["model_type"] = json!("olmo");
    let msg = config_err(&v, "clip_qkv", json!(8.0));
    assert_names(&msg, &["unsupported clip_qkv = 8.0"]);
}

/// Gemma (1): Gemma-2's conventions without post-norms, soft-caps or sliding windows; the
/// official releases' `hidden_act: "gelu"` means the tanh form.
#[test]
fn gemma_config() {
    let gemma2 = fixture_config_json("gemma2_full");
    let c = parse_edited(&gemma2, |c| {
        c.insert("model_type".into(), json!("gemma"));
        for f in [
            "attn_logit_softcapping",
            "final_logit_softcapping",
            "layer_types",
            "sliding_window",
            "query_pre_attn_scalar",
            "hidden_activation",
        ] {
            c.remove(f);
        }
        c.insert("hidden_act".into(), json!("gelu"));
    })
    .unwrap();
    assert_eq!(
        (c.act, c.post_norms, c.gated_mlp),
        (Activation::GeluNew, false, true)
    );
    assert_eq!(
        (c.attn_softcap, c.final_softcap, c.sliding_window),
        (None, None, None)
    );
    assert_eq!((c.attn_scale, c.embed_scale), (4.0, 32f32.sqrt()));
}

// ---- sharded checkpoints ----

#[test]
fn sharded_checkpoint_errors() {
    let index = "model.safetensors.index.json";
    let edit_index = |dir: &Path, edit: &dyn Fn(&mut Value)| {
        let path = dir.join(index);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    };

    // A shard the index names is missing.
    let dir = copy_fixture("mistral_sharded");
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &[
            "model-00002-of-00003.safetensors: no such shard",
            "model.safetensors.index.json places 9 tensor(s) in it",
        ],
    );

    // The index places a tensor in a shard that lacks it.
    let dir = copy_fixture("mistral_sharded");
    edit_index(dir.path(), &|v| {
        v["weight_map"]["model.norm.weight"] = json!("model-00001-of-00003.safetensors");
    });
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &[
            "model-00001-of-00003.safetensors",
            "tensor `model.norm.weight` is missing, although model.safetensors.index.json places \
             it in this shard",
        ],
    );

    // A tensor the index does not list is still found in its shard; one no shard holds is
    // missing, named with the index.
    let dir = copy_fixture("mistral_sharded");
    edit_index(dir.path(), &|v| {
        v["weight_map"]
            .as_object_mut()
            .unwrap()
            .remove("model.norm.weight");
    });
    Model::load_dir(dir.path(), &Device::Cpu).unwrap();
    rewrite(&dir.path().join("model-00003-of-00003.safetensors"), |t| {
        t.retain(|t| t.0 != "model.norm.weight")
    });
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &["model.safetensors.index.json: missing tensor `model.norm.weight`"],
    );

    // Malformed index JSON: the line is named.
    let dir = copy_fixture("mistral_sharded");
    std::fs::write(
        dir.path().join(index),
        "{\n  \"weight_map\": {\n    \"a\": \"b\",,\n  }\n}\n",
    )
    .unwrap();
    let msg = load_err(dir.path());
    assert_names(&msg, &["model.safetensors.index.json:3:"]);

    for (bad, expected) in [
        (
            json!({"metadata": {}}),
            "expected an object with a `weight_map` object",
        ),
        (json!({"weight_map": {}}), "`weight_map` names no tensors"),
        (
            json!({"weight_map": {"model.norm.weight": 3}}),
            "`weight_map` entry `model.norm.weight` must be a shard file name, found 3",
        ),
        (
            json!({"weight_map": {"model.norm.weight": "../model.safetensors"}}),
            "not a file name inside the model directory",
        ),
    ] {
        let dir = copy_fixture("mistral_sharded");
        std::fs::write(dir.path().join(index), bad.to_string()).unwrap();
        let msg = load_err(dir.path());
        assert_names(&msg, &["model.safetensors.index.json", expected]);
    }

    // A truncated shard is reported as that shard's malformation.
    let dir = copy_fixture("mistral_sharded");
    let shard = dir.path().join("model-00003-of-00003.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 10]).unwrap();
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &["model-00003-of-00003.safetensors: malformed safetensors"],
    );

    // Neither model.safetensors nor an index: the message names both.
    let dir = copy_fixture("mistral_sharded");
    std::fs::remove_file(dir.path().join(index)).unwrap();
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &[
            "expected model.safetensors beside config.json",
            "model.safetensors.index.json",
        ],
    );
}

// ---- every tensor accounted for ----

#[test]
fn tensors_the_config_does_not_explain_are_errors() {
    let weights = |dir: &TempDir| dir.path().join("model.safetensors");

    // An extra layer over a 2-layer config.
    let dir = copy_fixture("llama_gqa");
    rewrite(&weights(&dir), |t| {
        duplicate(
            t,
            "model.layers.1.mlp.up_proj.weight",
            "model.layers.5.mlp.up_proj.weight",
        )
    });
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &[
            "model.safetensors",
            "tensor `model.layers.5.mlp.up_proj.weight` is not used",
            "it belongs to layer 5, but the configuration has 2 layers",
        ],
    );

    // A config with fewer layers than the weights.
    let dir = copy_fixture("neox_parallel");
    edit_config(dir.path(), |c| {
        c.insert("num_hidden_layers".into(), json!(1));
    });
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &[
            "tensor `gpt_neox.layers.1.attention.dense.bias` is not used",
            "layer 1, but the configuration has 1 layer;",
            "more unused",
        ],
    );

    // An extra norm (Qwen3's q_norm on a qwen2 config).
    let dir = copy_fixture("qwen2_bias");
    rewrite(&weights(&dir), |t| {
        duplicate(
            t,
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.q_norm.weight",
        )
    });
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &[
            "tensor `model.layers.0.self_attn.q_norm.weight` is not used",
            "no place for it",
        ],
    );

    // Biases the config does not announce (attention_bias false): transformers would ignore
    // them, so eap refuses rather than guess.
    let dir = copy_fixture("llama_gqa");
    rewrite(&weights(&dir), |t| {
        duplicate(
            t,
            "model.norm.weight",
            "model.layers.0.self_attn.o_proj.bias",
        )
    });
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &["tensor `model.layers.0.self_attn.o_proj.bias` is not used"],
    );
    // With attention_bias true the same biases are needed and read.
    let dir = copy_fixture("llama_gqa");
    edit_config(dir.path(), |c| {
        c.insert("attention_bias".into(), json!(true));
    });
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &["missing tensor `model.layers.0.self_attn.q_proj.bias`"],
    );

    // The extra tensor in a sharded checkpoint is named with its shard.
    let dir = copy_fixture("mistral_sharded");
    rewrite(&dir.path().join("model-00002-of-00003.safetensors"), |t| {
        duplicate(
            t,
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.extra_norm.weight",
        )
    });
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &[
            "model-00002-of-00003.safetensors",
            "`model.layers.0.extra_norm.weight` is not used",
        ],
    );

    // GPT-2 and TransformerLens too.
    let dir = copy_fixture("gpt2_hf");
    rewrite(&weights(&dir), |t| {
        duplicate(
            t,
            "transformer.h.1.ln_1.weight",
            "transformer.h.2.ln_1.weight",
        )
    });
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &["`transformer.h.2.ln_1.weight` is not used", "layer 2"],
    );
    let dir = copy_fixture("tl_relu_nonorm");
    rewrite(&weights(&dir), |t| {
        duplicate(t, "blocks.0.attn.b_O", "blocks.0.ln1.b")
    });
    let msg = load_err(dir.path());
    assert_names(&msg, &["`blocks.0.ln1.b` is not used"]);
}

#[test]
fn buffers_and_tied_heads_are_accepted() {
    let weights = |dir: &TempDir| dir.path().join("model.safetensors");
    let dir = copy_fixture("llama_gqa");
    rewrite(&weights(&dir), |t| {
        duplicate(
            t,
            "model.norm.weight",
            "model.layers.0.self_attn.rotary_emb.inv_freq",
        )
    });
    Model::load_dir(dir.path(), &Device::Cpu).unwrap();

    let dir = copy_fixture("neox_parallel");
    rewrite(&weights(&dir), |t| {
        duplicate(
            t,
            "gpt_neox.final_layer_norm.bias",
            "gpt_neox.layers.0.attention.bias",
        );
        duplicate(
            t,
            "gpt_neox.final_layer_norm.bias",
            "gpt_neox.layers.0.attention.masked_bias",
        );
    });
    Model::load_dir(dir.path(), &Device::Cpu).unwrap();

    let dir = copy_fixture("gpt2_hf");
    rewrite(&weights(&dir), |t| {
        duplicate(t, "transformer.ln_f.bias", "transformer.h.0.attn.bias");
        duplicate(
            t,
            "transformer.ln_f.bias",
            "transformer.h.0.attn.masked_bias",
        );
        duplicate(t, "transformer.wte.weight", "lm_head.weight");
    });
    Model::load_dir(dir.path(), &Device::Cpu).unwrap();

    // A tied model that stores lm_head anyway: transformers ties it to the embedding, and so
    // does eap (the logits stay those of the reference).
    let dir = copy_fixture("qwen2_bias");
    rewrite(&weights(&dir), |t| {
        duplicate(t, "model.norm.weight", "lm_head.weight")
    });
    let model = Model::load_dir(dir.path(), &Device::Cpu).unwrap();
    let refs = reference("qwen2_bias");
    let batch = Batch::new(&tokens(&refs["tokens"]), &Device::Cpu).unwrap();
    let out = model
        .forward(
            &batch,
            &ForwardOptions {
                logit_positions: (0..batch.seq_len).collect(),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(rel_err(&flat(&out.logits), &flat(&refs["logits"])) <= 1e-4);

    // Untied NeoX checkpoints written under transformers 5's internal name load too.
    let dir = copy_fixture("neox_parallel");
    rewrite(&weights(&dir), |t| {
        t.iter_mut().find(|t| t.0 == "embed_out.weight").unwrap().0 = "lm_head.weight".into()
    });
    Model::load_dir(dir.path(), &Device::Cpu).unwrap();
    // Without either, the hub's name is reported missing.
    rewrite(&weights(&dir), |t| t.retain(|t| t.0 != "lm_head.weight"));
    let msg = load_err(dir.path());
    assert_names(&msg, &["missing tensor `embed_out.weight`"]);
}

/// Config variants the committed fixtures do not cover (Gemma, OLMo, active sliding windows,
/// sequential NeoX, attention biases, Gemma-2 without `layer_types`), made with transformers by
/// `scripts/check_hf_variants.py`, which runs this test with `EAP_HF_VARIANTS` set.
#[test]
#[ignore = "needs the models scripts/check_hf_variants.py writes"]
fn transformers_variants() {
    let root = PathBuf::from(std::env::var("EAP_HF_VARIANTS").expect("EAP_HF_VARIANTS"));
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").exists())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no models in {}", root.display());
    for dir in dirs {
        let model = Model::load_dir(&dir, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let refs = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
            .unwrap();
        let batch = Batch::new(&tokens(&refs["tokens"]), &Device::Cpu).unwrap();
        let opts = ForwardOptions {
            logit_positions: (0..batch.seq_len).collect(),
            ..Default::default()
        };
        let out = model.forward(&batch, &opts).unwrap();
        let err = rel_err(&flat(&out.logits), &flat(&refs["logits"]));
        eprintln!("{}: relative error {err:e}", dir.display());
        assert!(err <= 1e-4, "{}: relative error {err:e}", dir.display());
    }
}

/// Issue 13, item 1: configs that disagree with their weights, and duplicated JSON keys, are
/// errors naming the problem (each of these loaded silently wrong before).
#[test]
fn issue_13_configs_that_disagree_with_their_weights() {
    // GPT-2 `n_layer` below the weights' layer count.
    let dir = copy_fixture("gpt2_hf");
    edit_config(dir.path(), |c| {
        c.insert("n_layer".into(), json!(1));
    });
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &["is not used", "layer 1, but the configuration has 1 layer"],
    );

    // A duplicated key: refused, naming the key, the file and the line.
    let dir = copy_fixture("gpt2_hf");
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let end = text.rfind('}').unwrap();
    std::fs::write(
        &path,
        format!("{},\n  \"n_layer\": 1\n}}", text[..end].trim_end()),
    )
    .unwrap();
    let msg = load_err(dir.path());
    let lines = text.lines().count();
    assert_names(&msg, &["config.json:", "duplicate key `n_layer`"]);
    assert!(
        msg.contains(&format!(":{lines}")),
        "names line {lines}: {msg}"
    );
    // Nested objects too.
    let err = eap::model::config::parse_json_unique(r#"{"a": {"b": 1, "b": 2}}"#).unwrap_err();
    assert!(err.to_string().contains("duplicate key `b`"), "{err}");
    assert_eq!(
        eap::model::config::parse_json_unique(r#"{"a": [1, {"b": null}], "c": 1.5}"#).unwrap(),
        json!({"a": [1, {"b": null}], "c": 1.5})
    );

    // A duplicated key in the shard index.
    let dir = copy_fixture("mistral_sharded");
    let index = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    let text = text.replacen(
        "\"weight_map\": {",
        "\"weight_map\": {\n    \"lm_head.weight\": \"model-00001-of-00003.safetensors\",",
        1,
    );
    std::fs::write(&index, text).unwrap();
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &[
            "model.safetensors.index.json:",
            "duplicate key `lm_head.weight`",
        ],
    );

    // TransformerLens `n_layers` below the weights' layer count.
    let dir = copy_fixture("tl_attn_only_shortformer");
    edit_config(dir.path(), |c| {
        c.insert("n_layers".into(), json!(2));
    });
    let msg = load_err(dir.path());
    assert_names(
        &msg,
        &["is not used", "layer 2, but the configuration has 2 layers"],
    );

    // `normalization_type: null` over LayerNorm weights.
    let dir = copy_fixture("tl_attn_only_shortformer");
    edit_config(dir.path(), |c| {
        c.insert("normalization_type".into(), Value::Null);
    });
    let msg = load_err(dir.path());
    assert_names(&msg, &["is not used"]);
    assert!(msg.contains("ln"), "names a LayerNorm tensor: {msg}");

    // GPT-2 `tie_word_embeddings: false` without `lm_head.weight`.
    let dir = copy_fixture("gpt2_hf");
    edit_config(dir.path(), |c| {
        c.insert("tie_word_embeddings".into(), json!(false));
    });
    let msg = load_err(dir.path());
    assert_names(&msg, &["tie_word_embeddings", "false", "lm_head.weight"]);
}
