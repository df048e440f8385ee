//! Random-weight models of any shape, seeded: for benchmarks at real sizes (a GPT-2-small-shaped
//! model without downloading GPT-2) and for tests.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::block::{AttentionWeights, Block, MlpWeights, NormWeights};
use super::config::{
    Activation, ModelConfig, Norm, Positions, RopeScaling, Rotary, SlidingWindow, WeightFormat,
};
use super::weights::EmbedWeights;
use super::Model;
use crate::Result;

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
        w_u: u(&[d, cfg.d_vocab_out], w)?,
        b_u: None,
        w_e,
    };
    Model::from_weights(format!("random (seed {seed})"), cfg.clone(), embed, layers)
}
