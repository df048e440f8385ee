//! A plain-`Vec` description of a transformer's weights that the constructions fill in entry by
//! entry, then turn into a [`Model`]; and the near-orthogonal codes the constructions use.

use candle_core::{Device, Tensor};

use crate::model::{
    Activation, Block, EmbedWeights, MlpWeights, Model, ModelConfig, Norm, WeightFormat,
};
use crate::Result;

/// One head: `W_Q`, `W_K`, `W_V` `[d_model, d_head]`, their biases `[d_head]`, `W_O`
/// `[d_head, d_model]`, all row-major.
pub(crate) struct HeadSpec {
    d: usize,
    dh: usize,
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    bq: Vec<f32>,
    bk: Vec<f32>,
    bv: Vec<f32>,
    wo: Vec<f32>,
}

impl HeadSpec {
    fn new(d: usize, dh: usize) -> Self {
        HeadSpec {
            d,
            dh,
            wq: vec![0.0; d * dh],
            wk: vec![0.0; d * dh],
            wv: vec![0.0; d * dh],
            bq: vec![0.0; dh],
            bk: vec![0.0; dh],
            bv: vec![0.0; dh],
            wo: vec![0.0; dh * d],
        }
    }
    /// Query: residual dimension `from` → head dimension `to`.
    pub fn q(&mut self, from: usize, to: usize, v: f32) -> &mut Self {
        self.wq[from * self.dh + to] += v;
        self
    }
    pub fn k(&mut self, from: usize, to: usize, v: f32) -> &mut Self {
        self.wk[from * self.dh + to] += v;
        self
    }
    pub fn v(&mut self, from: usize, to: usize, v: f32) -> &mut Self {
        self.wv[from * self.dh + to] += v;
        self
    }
    pub fn bq(&mut self, to: usize, v: f32) -> &mut Self {
        self.bq[to] += v;
        self
    }
    /// Output: head dimension `from` → residual dimension `to`.
    pub fn o(&mut self, from: usize, to: usize, v: f32) -> &mut Self {
        debug_assert!(to < self.d);
        self.wo[from * self.d + to] += v;
        self
    }
    /// `V` copies residual dims `src..src+n` into head dims `0..n`; `O` writes them to
    /// `dst..dst+n`.
    pub fn copy(&mut self, src: usize, dst: usize, n: usize) -> &mut Self {
        for i in 0..n {
            self.v(src + i, i, 1.0).o(i, dst + i, 1.0);
        }
        self
    }
}

/// An MLP: `W_in [d, m]`, `b_in [m]`, `W_out [m, d]`, `b_out [d]`.
pub(crate) struct MlpSpec {
    d: usize,
    m: usize,
    w_in: Vec<f32>,
    b_in: Vec<f32>,
    w_out: Vec<f32>,
    b_out: Vec<f32>,
}

impl MlpSpec {
    pub fn w_in(&mut self, from: usize, neuron: usize, v: f32) -> &mut Self {
        self.w_in[from * self.m + neuron] += v;
        self
    }
    pub fn b_in(&mut self, neuron: usize, v: f32) -> &mut Self {
        self.b_in[neuron] += v;
        self
    }
    pub fn w_out(&mut self, neuron: usize, to: usize, v: f32) -> &mut Self {
        self.w_out[neuron * self.d + to] += v;
        self
    }
    pub fn b_out(&mut self, to: usize, v: f32) -> &mut Self {
        self.b_out[to] += v;
        self
    }
}

pub(crate) struct LayerSpec {
    pub heads: Vec<HeadSpec>,
    pub mlp: Option<MlpSpec>,
}

/// The whole model. No normalisation, ReLU MLPs, learned positions in the residual stream,
/// causal attention, attention scale 1 (scores are `q · k` exactly as written).
pub(crate) struct Spec {
    pub d: usize,
    pub n_heads: usize,
    pub dh: usize,
    pub d_mlp: Option<usize>,
    pub vocab: usize,
    pub n_ctx: usize,
    w_e: Vec<f32>,
    w_pos: Vec<f32>,
    w_u: Vec<f32>,
    b_u: Vec<f32>,
    pub layers: Vec<LayerSpec>,
}

impl Spec {
    pub fn new(
        n_layers: usize,
        n_heads: usize,
        d: usize,
        dh: usize,
        d_mlp: Option<usize>,
        vocab: usize,
        n_ctx: usize,
    ) -> Spec {
        let layers = (0..n_layers)
            .map(|_| LayerSpec {
                heads: (0..n_heads).map(|_| HeadSpec::new(d, dh)).collect(),
                mlp: d_mlp.map(|m| MlpSpec {
                    d,
                    m,
                    w_in: vec![0.0; d * m],
                    b_in: vec![0.0; m],
                    w_out: vec![0.0; m * d],
                    b_out: vec![0.0; d],
                }),
            })
            .collect();
        Spec {
            d,
            n_heads,
            dh,
            d_mlp,
            vocab,
            n_ctx,
            w_e: vec![0.0; vocab * d],
            w_pos: vec![0.0; n_ctx * d],
            w_u: vec![0.0; d * vocab],
            b_u: vec![0.0; vocab],
            layers,
        }
    }

    /// Token embedding: token `tok` writes `v` into residual dimension `dim`.
    pub fn emb(&mut self, tok: usize, dim: usize, v: f32) {
        self.w_e[tok * self.d + dim] += v;
    }
    pub fn pos(&mut self, p: usize, dim: usize, v: f32) {
        self.w_pos[p * self.d + dim] += v;
    }
    /// Unembedding: residual dimension `dim` adds `v` per unit to the logit of `tok`.
    pub fn unembed(&mut self, dim: usize, tok: usize, v: f32) {
        self.w_u[dim * self.vocab + tok] += v;
    }
    pub fn logit_bias(&mut self, tok: usize, v: f32) {
        self.b_u[tok] += v;
    }
    pub fn head(&mut self, layer: usize, head: usize) -> &mut HeadSpec {
        &mut self.layers[layer].heads[head]
    }
    pub fn mlp(&mut self, layer: usize) -> &mut MlpSpec {
        self.layers[layer].mlp.as_mut().expect("model has MLPs")
    }

    pub fn config(&self) -> ModelConfig {
        // No norms, ReLU MLPs, unscaled attention: the constructions set every weight by hand.
        ModelConfig {
            norm: Norm::None,
            act: Activation::Relu,
            attn_scale: 1.0,
            ..ModelConfig::classic(
                self.layers.len(),
                self.d,
                self.n_heads,
                self.dh,
                self.d_mlp,
                self.vocab,
                self.n_ctx,
                WeightFormat::InMemory,
            )
        }
    }

    pub fn into_model(self, name: &str, device: &Device) -> Result<Model> {
        let cfg = self.config();
        let (d, h, dh) = (self.d, self.n_heads, self.dh);
        let t = |v: &[f32], shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor::from_slice(v, shape, device)?)
        };
        let has_bias = self.b_u.iter().any(|&b| b != 0.0);
        let embed = EmbedWeights {
            w_e: t(&self.w_e, &[self.vocab, d])?,
            w_pos: Some(t(&self.w_pos, &[self.n_ctx, d])?),
            ln_final: None,
            w_u: t(&self.w_u, &[d, self.vocab])?,
            b_u: if has_bias {
                Some(t(&self.b_u, &[self.vocab])?)
            } else {
                None
            },
        };
        let mut layers = Vec::new();
        for l in &self.layers {
            let cat = |f: &dyn Fn(&HeadSpec) -> &Vec<f32>| -> Vec<f32> {
                l.heads
                    .iter()
                    .flat_map(|hs| f(hs).iter().copied())
                    .collect()
            };
            let mlp = match &l.mlp {
                None => None,
                Some(m) => Some(MlpWeights {
                    norm: None,
                    w_gate: None,
                    post_norm: None,
                    w_in: t(&m.w_in, &[d, m.m])?,
                    b_in: Some(t(&m.b_in, &[m.m])?),
                    w_out: t(&m.w_out, &[m.m, d])?,
                    b_out: Some(t(&m.b_out, &[d])?),
                }),
            };
            layers.push(Block::from_heads(
                &cfg,
                None,
                t(&cat(&|x| &x.wq), &[h, d, dh])?,
                t(&cat(&|x| &x.wk), &[h, d, dh])?,
                t(&cat(&|x| &x.wv), &[h, d, dh])?,
                t(&cat(&|x| &x.bq), &[h, dh])?,
                t(&cat(&|x| &x.bk), &[h, dh])?,
                t(&cat(&|x| &x.bv), &[h, dh])?,
                t(&cat(&|x| &x.wo), &[h, dh, d])?,
                t(&vec![0.0; d], &[d])?,
                None,
                mlp,
            )?);
        }
        Model::from_weights(name, cfg, embed, layers)
    }
}

/// Sylvester Hadamard matrix of order `n` (a power of two), entries ±1.
fn hadamard(n: usize) -> Vec<Vec<f32>> {
    let mut h = vec![vec![1.0f32]];
    while h.len() < n {
        let m = h.len();
        let mut next = vec![vec![0.0; 2 * m]; 2 * m];
        for i in 0..m {
            for j in 0..m {
                next[i][j] = h[i][j];
                next[i][j + m] = h[i][j];
                next[i + m][j] = h[i][j];
                next[i + m][j + m] = -h[i][j];
            }
        }
        h = next;
    }
    h
}

/// Code `i` of `2n` unit vectors in `n` dimensions: `±` row `i mod n` of the Hadamard matrix,
/// negated for `i ≥ n`. Two codes have inner product 1 (the same code), −1 (antipodal: `i` and
/// `i ± n`) or 0 (everything else).
pub(crate) fn code(n: usize, i: usize) -> Vec<f32> {
    assert!(i < 2 * n);
    let h = hadamard(n);
    let sign = if i < n { 1.0 } else { -1.0 };
    let scale = sign / (n as f32).sqrt();
    h[i % n].iter().map(|&x| x * scale).collect()
}

/// Positions as 16 codes in 8 dimensions (`code(8, p)`): position `p` and `p ± 8` are antipodal,
/// every other pair orthogonal.
pub(crate) const POS_DIMS: usize = 8;
pub(crate) const MAX_POS: usize = 2 * POS_DIMS;

/// Writes the position codes into residual dims `base..base+8` for positions `0..n_ctx`.
pub(crate) fn write_positions(spec: &mut Spec, base: usize) {
    assert!(spec.n_ctx <= MAX_POS);
    for p in 0..spec.n_ctx {
        for (j, x) in code(POS_DIMS, p).into_iter().enumerate() {
            spec.pos(p, base + j, x);
        }
    }
}

/// A previous-token attention pattern on the position codes at `base`: the query at position
/// `i` is `gain · code(i − 1)` (the shift `S` maps `code(i) ↦ code(i − 1)`; it is linear because
/// it commutes with negation, `code(i + 8) = −code(i)`), the key at `j` is `code(j)`. Scores:
/// `gain` on `j = i − 1`, `−gain` on `j = i − 9`, 0 elsewhere. Uses head dims `0..8`.
pub(crate) fn previous_token_qk(head: &mut HeadSpec, base: usize, gain: f32) {
    // S = Σ_{i<8} code(i − 1 mod 16) code(i)ᵀ; the codes 0..8 are an orthonormal basis.
    let codes: Vec<Vec<f32>> = (0..MAX_POS).map(|p| code(POS_DIMS, p)).collect();
    for a in 0..POS_DIMS {
        for j in 0..POS_DIMS {
            let s: f32 = (0..POS_DIMS)
                .map(|i| codes[(i + MAX_POS - 1) % MAX_POS][j] * codes[i][a])
                .sum();
            head.q(base + a, j, gain * s);
        }
        head.k(base + a, a, 1.0);
    }
}

/// A current-token attention pattern: query `gain · code(i)`, key `code(j)`.
pub(crate) fn self_qk(head: &mut HeadSpec, base: usize, gain: f32) {
    for a in 0..POS_DIMS {
        head.q(base + a, a, gain).k(base + a, a, 1.0);
    }
}

/// Lets the distractors touch the metric a little: the unembedding reads the scratch dims
/// `dis..dis+n` with weights `±eps` (a fixed pseudo-random sign per dimension and token), so
/// non-circuit edges have small but non-zero effects and gradients.
pub(crate) fn leak(spec: &mut Spec, dis: usize, n: usize, eps: f32) {
    for i in 0..n {
        for t in 0..spec.vocab {
            // A fixed sign pattern (splitmix-style hash of (i, t)), deterministic.
            let mut x = (i as u64) << 32 | t as u64;
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^= x >> 31;
            let sign = if x & 1 == 0 { 1.0 } else { -1.0 };
            spec.unembed(dis + i, t, sign * eps);
        }
    }
}
