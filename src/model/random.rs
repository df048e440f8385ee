//! Random-weight models of any shape, seeded: for benchmarks at real sizes (a GPT-2-small-shaped
//! model without downloading GPT-2) and for tests.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::block::{Block, MlpWeights, NormWeights};
use super::config::{Activation, ModelConfig, Norm, Positions, WeightFormat};
use super::weights::EmbedWeights;
use super::Model;
use crate::Result;

/// GPT-2 small's shape: 12 layers, d_model 768, 12 heads, d_mlp 3072, vocabulary 50257.
pub fn gpt2_small_config() -> ModelConfig {
    ModelConfig {
        n_layers: 12,
        d_model: 768,
        n_heads: 12,
        n_kv_heads: 12,
        d_head: 64,
        d_mlp: Some(3072),
        d_vocab: 50257,
        d_vocab_out: 50257,
        n_ctx: 1024,
        norm: Norm::LayerNorm,
        act: Activation::GeluNew,
        positions: Positions::Standard,
        causal: true,
        attn_scale: 8.0,
        eps: 1e-5,
        format: WeightFormat::InMemory,
        gated_mlp: false,
        parallel_attn_mlp: false,
        post_norms: false,
        embed_scale: 1.0,
        attn_softcap: None,
        final_softcap: None,
        sliding_window: None,
    }
}

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

/// A model of shape `cfg` with random weights (GPT-2-like initialisation scales, LayerNorm
/// gains near 1), reproducible for a seed.
pub fn random_model(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<Model> {
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
