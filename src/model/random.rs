//! Random-weight models of any shape, seeded: for benchmarks at real sizes (a GPT-2-small-shaped
//! model without downloading GPT-2) and for tests.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::block::{AttentionWeights, Block, MlpWeights, NormWeights};
use std::path::{Path, PathBuf};

use super::config::{
    Activation, CheckpointLayout, ModelConfig, Norm, Positions, RopeScaling, Rotary, SlidingWindow,
    WeightFormat,
};
use super::weights::{transpose_values, EmbedWeights};
use super::Model;
use crate::{Error, Result};

/// GPT-2 small's shape: 12 layers, d_model 768, 12 heads, d_mlp 3072, vocabulary 50257.
pub fn gpt2_small_config() -> ModelConfig {
    ModelConfig::classic(
        12,
        768,
        12,
        64,
        Some(3072),
        50257,
        1024,
        WeightFormat::InMemory,
    )
}

/// A named model shape the benchmarks and `eap random-model` build without downloading
/// anything, with the biases and tying of the real model.
#[derive(Debug, Clone)]
pub struct Preset {
    pub name: &'static str,
    pub cfg: ModelConfig,
    /// q/k/v projections have biases (Qwen2).
    pub qkv_bias: bool,
    /// The unembedding is the embedding's transpose.
    pub tied: bool,
}

/// The shapes eap knows by name: `gpt2` (GPT-2 small), `qwen2.5-0.5b`, `llama-3.1-8b`,
/// `gemma-2-2b`, `pythia-160m` (shapes from their hub configs; DESIGN §4).
pub fn preset(name: &str) -> Option<Preset> {
    let rope = |dim, theta, scaling| {
        Positions::Rotary(Rotary {
            dim,
            theta,
            scaling,
        })
    };
    let llama_like = |n_layers, d, h, kv, dh, m, vocab, n_ctx| ModelConfig {
        n_kv_heads: kv,
        norm: Norm::RmsNorm,
        act: Activation::Silu,
        gated_mlp: true,
        eps: 1e-5,
        format: WeightFormat::InMemory,
        positions: rope(dh, 10_000.0, RopeScaling::None),
        ..ModelConfig::classic(
            n_layers,
            d,
            h,
            dh,
            Some(m),
            vocab,
            n_ctx,
            WeightFormat::InMemory,
        )
    };
    Some(match name {
        "gpt2" => Preset {
            name: "gpt2",
            cfg: gpt2_small_config(),
            qkv_bias: true,
            tied: false,
        },
        "qwen2.5-0.5b" => Preset {
            name: "qwen2.5-0.5b",
            cfg: ModelConfig {
                eps: 1e-6,
                positions: rope(64, 1_000_000.0, RopeScaling::None),
                ..llama_like(24, 896, 14, 2, 64, 4864, 151_936, 32_768)
            },
            qkv_bias: true,
            tied: true,
        },
        "llama-3.1-8b" => Preset {
            name: "llama-3.1-8b",
            cfg: ModelConfig {
                positions: rope(
                    128,
                    500_000.0,
                    RopeScaling::Llama3 {
                        factor: 8.0,
                        low_freq_factor: 1.0,
                        high_freq_factor: 4.0,
                        original_max_position_embeddings: 8192,
                    },
                ),
                ..llama_like(32, 4096, 32, 8, 128, 14_336, 128_256, 131_072)
            },
            qkv_bias: false,
            tied: false,
        },
        "gemma-2-2b" => Preset {
            name: "gemma-2-2b",
            cfg: ModelConfig {
                act: Activation::GeluNew,
                eps: 1e-6,
                attn_scale: 16.0,
                post_norms: true,
                embed_scale: (2304f32).sqrt(),
                attn_softcap: Some(50.0),
                final_softcap: Some(30.0),
                sliding_window: Some(SlidingWindow {
                    window: 4096,
                    layers: (0..26).map(|l| l % 2 == 0).collect(),
                }),
                ..llama_like(26, 2304, 8, 4, 256, 9216, 256_000, 8192)
            },
            qkv_bias: false,
            tied: true,
        },
        "pythia-160m" => Preset {
            name: "pythia-160m",
            cfg: ModelConfig {
                act: Activation::Gelu,
                positions: rope(16, 10_000.0, RopeScaling::None),
                parallel_attn_mlp: true,
                ..ModelConfig::classic(
                    12,
                    768,
                    12,
                    64,
                    Some(3072),
                    50_304,
                    2048,
                    WeightFormat::InMemory,
                )
            },
            qkv_bias: true,
            tied: false,
        },
        _ => return None,
    })
}

/// The names [`preset`] knows.
pub const PRESETS: [&str; 5] = [
    "gpt2",
    "qwen2.5-0.5b",
    "llama-3.1-8b",
    "gemma-2-2b",
    "pythia-160m",
];

/// Uniform values in `[-scale, scale]`, generated in parallel blocks each seeded from `seed`.
fn uniform(shape: &[usize], scale: f32, seed: u64, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut v = vec![0f32; n];
    v.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(i, block)| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ ((i as u64 + 1) << 20));
            for x in block {
                *x = rng.random_range(-scale..scale);
            }
        });
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// A random model of a preset's shape (its biases and tying included).
pub fn random_preset(preset: &Preset, seed: u64, device: &Device) -> Result<Model> {
    if is_classic(&preset.cfg) && !preset.tied {
        return random_model(&preset.cfg, seed, device);
    }
    random_general(&preset.cfg, preset.qkv_bias, preset.tied, seed, device)
}

/// GPT-2-style configurations keep the original generator (and so the same weights per seed).
fn is_classic(cfg: &ModelConfig) -> bool {
    !cfg.gated_mlp
        && cfg.n_kv_heads == cfg.n_heads
        && matches!(cfg.positions, Positions::Standard | Positions::Shortformer)
        && !matches!(cfg.norm, Norm::RmsNorm)
        && !cfg.post_norms
}

/// Any architecture: norms (gains near 1, biases for LayerNorm), grouped q/k/v, optional q/k/v
/// biases, gated or plain MLPs with biases only for LayerNorm models, post-norms, tying.
fn random_general(
    cfg: &ModelConfig,
    qkv_bias: bool,
    tied: bool,
    seed: u64,
    device: &Device,
) -> Result<Model> {
    let (d, h, kv, dh) = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head);
    let mut next = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5151;
    let mut u = |shape: &[usize], scale: f32| {
        next = next.wrapping_add(0x9E37_79B9);
        uniform(shape, scale, next, device)
    };
    let w = 0.035;
    let biased = matches!(cfg.norm, Norm::LayerNorm);
    let norm = |u: &mut dyn FnMut(&[usize], f32) -> Result<Tensor>| -> Result<Option<NormWeights>> {
        Ok(match cfg.norm {
            Norm::LayerNorm => Some(NormWeights {
                w: (u(&[d], 0.2)? + 1.0)?,
                b: Some(u(&[d], 0.05)?),
            }),
            Norm::RmsNorm => Some(NormWeights {
                w: (u(&[d], 0.2)? + 1.0)?,
                b: None,
            }),
            _ => None,
        })
    };
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for _ in 0..cfg.n_layers {
        let attn = AttentionWeights {
            norm: norm(&mut u)?,
            w_q: u(&[h, d, dh], w)?,
            w_k: u(&[kv, d, dh], w)?,
            w_v: u(&[kv, d, dh], w)?,
            b_q: qkv_bias.then(|| u(&[h, dh], 0.02)).transpose()?,
            b_k: qkv_bias.then(|| u(&[kv, dh], 0.02)).transpose()?,
            b_v: qkv_bias.then(|| u(&[kv, dh], 0.02)).transpose()?,
            w_o: u(&[h, dh, d], w)?,
            b_o: biased.then(|| u(&[d], 0.02)).transpose()?,
            post_norm: if cfg.post_norms { norm(&mut u)? } else { None },
            fused_qkv: None,
        };
        let mlp = match cfg.d_mlp {
            Some(m) => Some(MlpWeights {
                norm: norm(&mut u)?,
                w_in: u(&[d, m], w)?,
                b_in: biased.then(|| u(&[m], 0.02)).transpose()?,
                w_gate: cfg.gated_mlp.then(|| u(&[d, m], w)).transpose()?,
                w_out: u(&[m, d], w)?,
                b_out: biased.then(|| u(&[d], 0.02)).transpose()?,
                post_norm: if cfg.post_norms { norm(&mut u)? } else { None },
            }),
            None => None,
        };
        layers.push(Block::new(cfg, attn, mlp)?);
    }
    let w_e = u(&[cfg.d_vocab, d], w)?;
    let w_u = match tied {
        true => w_e.t()?,
        false => u(&[d, cfg.d_vocab_out], w)?,
    };
    let embed = EmbedWeights {
        w_pos: match cfg.positions {
            Positions::Standard | Positions::Shortformer => Some(u(&[cfg.n_ctx, d], 0.01)?),
            Positions::Rotary(_) => None,
        },
        ln_final: norm(&mut u)?,
        w_u,
        b_u: None,
        w_e,
    };
    Model::from_weights(format!("random (seed {seed})"), cfg.clone(), embed, layers)
}

/// A model of shape `cfg` with random weights (GPT-2-like initialisation scales, LayerNorm
/// gains near 1), reproducible for a seed. Architectures other than GPT-2's (RMSNorm, rotary,
/// grouped or gated) get no q/k/v biases and an untied unembedding; see [`random_preset`].
pub fn random_model(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<Model> {
    if !is_classic(cfg) {
        return random_general(cfg, false, false, seed, device);
    }
    let (d, h, dh) = (cfg.d_model, cfg.n_heads, cfg.d_head);
    let mut next = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut u = |shape: &[usize], scale: f32| {
        next = next.wrapping_add(0x9E37_79B9);
        uniform(shape, scale, next, device)
    };
    let w = 0.035; // uniform(±0.035) has GPT-2's init std of 0.02
    let norm = |u: &mut dyn FnMut(&[usize], f32) -> Result<Tensor>| -> Result<Option<NormWeights>> {
        Ok(match cfg.norm {
            Norm::LayerNorm => Some(NormWeights {
                w: (u(&[d], 0.2)? + 1.0)?,
                b: Some(u(&[d], 0.05)?),
            }),
            _ => None,
        })
    };
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for _ in 0..cfg.n_layers {
        let ln1 = norm(&mut u)?;
        let mlp = match cfg.d_mlp {
            Some(m) => Some(MlpWeights {
                norm: None,
                w_gate: None,
                post_norm: None,
                w_in: u(&[d, m], w)?,
                b_in: Some(u(&[m], 0.02)?),
                w_out: u(&[m, d], w)?,
                b_out: Some(u(&[d], 0.02)?),
            }),
            None => None,
        };
        let ln2 = if mlp.is_some() { norm(&mut u)? } else { None };
        layers.push(Block::from_heads(
            cfg,
            ln1,
            u(&[h, d, dh], w)?,
            u(&[h, d, dh], w)?,
            u(&[h, d, dh], w)?,
            u(&[h, dh], 0.02)?,
            u(&[h, dh], 0.02)?,
            u(&[h, dh], 0.02)?,
            u(&[h, dh, d], w)?,
            u(&[d], 0.02)?,
            ln2,
            mlp,
        )?);
    }
    let w_e = u(&[cfg.d_vocab, d], w)?;
    let embed = EmbedWeights {
        w_pos: Some(u(&[cfg.n_ctx, d], 0.01)?),
        ln_final: norm(&mut u)?,
        w_u: vocabulary_rows(&u(&[d, cfg.d_vocab_out], w)?)?,
        b_u: None,
        w_e,
    };
    Model::from_weights(format!("random (seed {seed})"), cfg.clone(), embed, layers)
}

/// `w_u` (`[d, V]`) with the same values, stored as the transpose of its `[V, d]` rows, the
/// layout Hugging Face checkpoints and tied embeddings have: the unembedding of a few rows then
/// reads each vocabulary row contiguously ([`ops::matmul_nt_wide`](super::ops::matmul_nt_wide)).
fn vocabulary_rows(w_u: &Tensor) -> Result<Tensor> {
    let (d, v) = w_u.dims2()?;
    let rows = transpose_values(&super::ops::to_vec(w_u)?, d, v);
    Ok(Tensor::from_vec(rows, (v, d), w_u.device())?.t()?)
}

/// The storage types [`write_random_checkpoint`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    F16,
    Bf16,
}

impl StoredDtype {
    fn size(self) -> usize {
        match self {
            StoredDtype::F32 => 4,
            StoredDtype::F16 | StoredDtype::Bf16 => 2,
        }
    }

    /// The name in a safetensors header.
    fn safetensors_name(self) -> &'static str {
        match self {
            StoredDtype::F32 => "F32",
            StoredDtype::F16 => "F16",
            StoredDtype::Bf16 => "BF16",
        }
    }

    /// The name in a Hugging Face `config.json` (`torch_dtype`).
    fn torch_name(self) -> &'static str {
        match self {
            StoredDtype::F32 => "float32",
            StoredDtype::F16 => "float16",
            StoredDtype::Bf16 => "bfloat16",
        }
    }

    fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        out.clear();
        out.reserve(values.len() * self.size());
        match self {
            StoredDtype::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            StoredDtype::F16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
            StoredDtype::Bf16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        }
    }
}

/// The published `config.json` of each preset, as its hub repository has it (GPT-2: `gpt2`).
pub fn hub_config(preset: &str) -> Option<&'static str> {
    Some(match preset {
        "gpt2" => include_str!("../../tests/fixtures/configs/gpt2.json"),
        "qwen2.5-0.5b" => include_str!("../../tests/fixtures/configs/qwen2.5-0.5b.json"),
        "llama-3.1-8b" => include_str!("../../tests/fixtures/configs/llama-3.1-8b.json"),
        "gemma-2-2b" => include_str!("../../tests/fixtures/configs/gemma-2-2b.json"),
        "pythia-160m" => include_str!("../../tests/fixtures/configs/pythia-160m.json"),
        _ => return None,
    })
}

/// How a stored tensor is initialised: uniform in `±scale` around `center`.
#[derive(Debug, Clone, Copy)]
struct Init {
    center: f32,
    scale: f32,
}

/// One tensor of a Hugging Face checkpoint: its name, stored shape and initialisation.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    pub name: String,
    pub shape: Vec<usize>,
    init: Init,
}

/// Every tensor a Hugging Face checkpoint of `cfg` stores, under the names and in the layouts
/// `transformers` saves (the loader in [`super::weights`] reads exactly these: the tests write
/// a checkpoint of every preset and load it with every tensor accounted for).
pub fn hf_tensors(cfg: &ModelConfig, layout: &CheckpointLayout) -> Result<Vec<StoredTensor>> {
    let (d, h, kv, dh, v) = (
        cfg.d_model,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.d_head,
        cfg.d_vocab,
    );
    let mut out = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, center: f32, scale: f32| {
        out.push(StoredTensor {
            name,
            shape,
            init: Init { center, scale },
        })
    };
    // Gains near 1 (stored near 0 where the model adds 1 itself), small biases, GPT-2's std.
    let gain = 1.0 - layout.norm_gain_offset;
    let w = 0.035;
    let norm = |add: &mut dyn FnMut(String, Vec<usize>, f32, f32), stem: &str| {
        add(format!("{stem}.weight"), vec![d], gain, 0.2);
        if cfg.norm == Norm::LayerNorm {
            add(format!("{stem}.bias"), vec![d], 0.0, 0.05);
        }
    };
    let m = cfg.d_mlp;
    match cfg.format {
        WeightFormat::HfGpt2 => {
            let m = m.ok_or_else(|| Error::invalid("GPT-2 checkpoints have MLPs"))?;
            add("wte.weight".into(), vec![v, d], 0.0, w);
            add("wpe.weight".into(), vec![cfg.n_ctx, d], 0.0, 0.01);
            for i in 0..cfg.n_layers {
                let p = |s: &str| format!("h.{i}.{s}");
                norm(&mut add, &p("ln_1"));
                add(p("attn.c_attn.weight"), vec![d, 3 * d], 0.0, w);
                add(p("attn.c_attn.bias"), vec![3 * d], 0.0, 0.02);
                add(p("attn.c_proj.weight"), vec![d, d], 0.0, w);
                add(p("attn.c_proj.bias"), vec![d], 0.0, 0.02);
                norm(&mut add, &p("ln_2"));
                add(p("mlp.c_fc.weight"), vec![d, m], 0.0, w);
                add(p("mlp.c_fc.bias"), vec![m], 0.0, 0.02);
                add(p("mlp.c_proj.weight"), vec![m, d], 0.0, w);
                add(p("mlp.c_proj.bias"), vec![d], 0.0, 0.02);
            }
            norm(&mut add, "ln_f");
        }
        WeightFormat::HfLlama => {
            let m = m.ok_or_else(|| Error::invalid("Llama-family checkpoints have MLPs"))?;
            add("model.embed_tokens.weight".into(), vec![v, d], 0.0, w);
            for i in 0..cfg.n_layers {
                let p = |s: &str| format!("model.layers.{i}.{s}");
                norm(&mut add, &p("input_layernorm"));
                for (proj, heads) in [("q_proj", h), ("k_proj", kv), ("v_proj", kv)] {
                    add(
                        p(&format!("self_attn.{proj}.weight")),
                        vec![heads * dh, d],
                        0.0,
                        w,
                    );
                    if layout.qkv_bias {
                        add(
                            p(&format!("self_attn.{proj}.bias")),
                            vec![heads * dh],
                            0.0,
                            0.02,
                        );
                    }
                }
                add(p("self_attn.o_proj.weight"), vec![d, h * dh], 0.0, w);
                if layout.o_bias {
                    add(p("self_attn.o_proj.bias"), vec![d], 0.0, 0.02);
                }
                norm(&mut add, &p("post_attention_layernorm"));
                if cfg.post_norms {
                    norm(&mut add, &p("pre_feedforward_layernorm"));
                    norm(&mut add, &p("post_feedforward_layernorm"));
                }
                add(p("mlp.gate_proj.weight"), vec![m, d], 0.0, w);
                add(p("mlp.up_proj.weight"), vec![m, d], 0.0, w);
                add(p("mlp.down_proj.weight"), vec![d, m], 0.0, w);
            }
            norm(&mut add, "model.norm");
            if !layout.tied_embeddings {
                add("lm_head.weight".into(), vec![cfg.d_vocab_out, d], 0.0, w);
            }
        }
        WeightFormat::HfNeox => {
            let m = m.ok_or_else(|| Error::invalid("GPT-NeoX checkpoints have MLPs"))?;
            add("gpt_neox.embed_in.weight".into(), vec![v, d], 0.0, w);
            for i in 0..cfg.n_layers {
                let p = |s: &str| format!("gpt_neox.layers.{i}.{s}");
                norm(&mut add, &p("input_layernorm"));
                norm(&mut add, &p("post_attention_layernorm"));
                add(
                    p("attention.query_key_value.weight"),
                    vec![3 * d, d],
                    0.0,
                    w,
                );
                if layout.qkv_bias {
                    add(p("attention.query_key_value.bias"), vec![3 * d], 0.0, 0.02);
                }
                add(p("attention.dense.weight"), vec![d, d], 0.0, w);
                if layout.o_bias {
                    add(p("attention.dense.bias"), vec![d], 0.0, 0.02);
                }
                add(p("mlp.dense_h_to_4h.weight"), vec![m, d], 0.0, w);
                if layout.mlp_bias {
                    add(p("mlp.dense_h_to_4h.bias"), vec![m], 0.0, 0.02);
                }
                add(p("mlp.dense_4h_to_h.weight"), vec![d, m], 0.0, w);
                if layout.mlp_bias {
                    add(p("mlp.dense_4h_to_h.bias"), vec![d], 0.0, 0.02);
                }
            }
            norm(&mut add, "gpt_neox.final_layer_norm");
            if !layout.tied_embeddings {
                add("embed_out.weight".into(), vec![cfg.d_vocab_out, d], 0.0, w);
            }
        }
        WeightFormat::TransformerLens | WeightFormat::InMemory => {
            return Err(Error::invalid(
                "random checkpoints are written in Hugging Face layouts only",
            ))
        }
    }
    Ok(out)
}

/// What [`write_random_checkpoint`] wrote.
#[derive(Debug, Clone)]
pub struct WrittenCheckpoint {
    pub config: PathBuf,
    pub weights: PathBuf,
    pub n_tensors: usize,
    pub n_params: u64,
    pub bytes: u64,
}

/// Writes a random-weight model of preset `name` into `dir` as a Hugging Face checkpoint
/// (`config.json`, the preset's published config with `num_hidden_layers` set to `n_layers` if
/// given; `model.safetensors` in `dtype`), so benchmarks and tests at real sizes need no
/// download. Tensors are generated and written one at a time (the largest, Llama-3.1-8B's
/// embedding, is 1 GB in bf16), each seeded from `seed` and its name: a model with fewer layers
/// has the same first layers. `progress(bytes_written, total)` is called after each tensor.
pub fn write_random_checkpoint(
    name: &str,
    n_layers: Option<usize>,
    dtype: StoredDtype,
    seed: u64,
    dir: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<WrittenCheckpoint> {
    let text = hub_config(name).ok_or_else(|| {
        Error::invalid(format!(
            "unknown preset `{name}` (known: {})",
            PRESETS.join(", ")
        ))
    })?;
    let mut config: serde_json::Value =
        serde_json::from_str(text).expect("the embedded hub configs are valid JSON");
    let layers_key = match config["model_type"].as_str() {
        Some("gpt2") => "n_layer",
        _ => "num_hidden_layers",
    };
    if let Some(n) = n_layers {
        if n == 0 {
            return Err(Error::invalid("a model needs at least one layer"));
        }
        config[layers_key] = serde_json::json!(n);
    }
    write_random_checkpoint_of(config, dtype, seed, dir, progress)
}

/// [`write_random_checkpoint`] for any Hugging Face `config.json` eap reads (GPT-2, Llama
/// family, GPT-NeoX layouts), written into `dir` beside the weights.
pub fn write_random_checkpoint_of(
    mut config: serde_json::Value,
    dtype: StoredDtype,
    seed: u64,
    dir: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<WrittenCheckpoint> {
    config["torch_dtype"] = serde_json::json!(dtype.torch_name());
    let config_path = dir.join("config.json");
    let (cfg, layout) = ModelConfig::parse(&config, &config_path)?;
    let tensors = hf_tensors(&cfg, &layout)?;

    // The safetensors header: names, dtypes, shapes and byte ranges, padded with spaces to a
    // multiple of 8 as the format asks. Written by hand because the tensors are generated while
    // writing and the file goes through eap's atomic temporary file; the loader's own parser
    // (the safetensors crate) reads it back in the tests.
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({"format": "pt", "eap_seed": seed.to_string()}),
    );
    let mut offset = 0u64;
    for t in &tensors {
        let len = t.shape.iter().product::<usize>() as u64 * dtype.size() as u64;
        header.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": dtype.safetensors_name(),
                "shape": t.shape,
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    let mut header =
        serde_json::to_vec(&serde_json::Value::Object(header)).expect("a JSON map serialises");
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let total = 8 + header.len() as u64 + offset;

    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let weights_path = dir.join("model.safetensors");
    crate::fsutil::write_atomic_with(&weights_path, |f| {
        use std::io::Write;
        let mut f = std::io::BufWriter::with_capacity(1 << 22, f);
        f.write_all(&(header.len() as u64).to_le_bytes())?;
        f.write_all(&header)?;
        let mut written = 8 + header.len() as u64;
        let mut bytes = Vec::new();
        // Generated in pieces of 16 M values so the buffers stay at 64 MB whatever the tensor.
        const PIECE: usize = 1 << 24;
        for t in &tensors {
            let n: usize = t.shape.iter().product();
            let tensor_seed = seed ^ fnv1a(t.name.as_bytes());
            let mut values = vec![0f32; n.min(PIECE)];
            for (k, start) in (0..n).step_by(PIECE).enumerate() {
                let len = PIECE.min(n - start);
                let piece = &mut values[..len];
                piece
                    .par_chunks_mut(1 << 16)
                    .enumerate()
                    .for_each(|(i, block)| {
                        let block_seed = tensor_seed
                            ^ (((k << 8) + i + 1) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(block_seed);
                        for x in block {
                            *x = t.init.center + rng.random_range(-t.init.scale..t.init.scale);
                        }
                    });
                dtype.encode(piece, &mut bytes);
                f.write_all(&bytes)?;
                written += bytes.len() as u64;
            }
            progress(written, total);
        }
        f.flush()
    })?;
    let mut text = serde_json::to_string_pretty(&config).expect("a JSON value serialises");
    text.push('\n');
    crate::fsutil::write_atomic(&config_path, text.as_bytes())?;
    Ok(WrittenCheckpoint {
        config: config_path,
        weights: weights_path,
        n_tensors: tensors.len(),
        n_params: tensors
            .iter()
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum(),
        bytes: total,
    })
}

/// FNV-1a, to derive a tensor's seed from its name (stable across versions and platforms,
/// unlike `std`'s hasher).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
