//! One transformer block: the only code in eap that computes a head's query, key and value, its
//! attention pattern and output, and an MLP (STYLE point 4: one type per sublayer, as candle's
//! model files have them).
//!
//! * [`NormLayer`] — the normalisation a sublayer applies to the residual stream it reads, with
//!   its backward.
//! * [`Attention`] — the heads of one layer. Entry points for every pass:
//!   [`project_all`](Attention::project_all) (every head in one GEMM, the unpatched forward),
//!   [`project_per_head`](Attention::project_per_head) (each head reads its own residual stream:
//!   patched forwards), [`project_head`](Attention::project_head) and
//!   [`attend_head`](Attention::attend_head) (one head at some rows: incremental ACDC),
//!   [`attend`](Attention::attend) (all heads' outputs) and [`backward`](Attention::backward)
//!   (the q/k/v readers' gradients, without weight gradients).
//! * [`Mlp`] — [`forward`](Mlp::forward) on any rows and [`backward`](Mlp::backward).
//! * [`Block`] — one layer: attention, then (unless attention-only) an MLP.
//!
//! The drivers in `forward.rs` (full forward, cached-prefix restarts, the activation-only
//! backward) and ACDC's incremental state call these; none of them multiplies a weight itself.

use candle_core::{Tensor, D};

use super::config::{Activation, ModelConfig, Norm};
use super::ops::{self, NormCache};
use crate::graph::Qkv;
use crate::Result;

/// Gain and bias of a LayerNorm (absent for `LNPre` and for models without normalisation).
#[derive(Debug, Clone)]
pub struct NormWeights {
    pub w: Tensor,
    pub b: Tensor,
}

/// The normalisation applied to a sublayer's input (or before the unembedding).
#[derive(Debug, Clone)]
pub struct NormLayer {
    kind: Norm,
    eps: f32,
    weights: Option<NormWeights>,
}

impl NormLayer {
    pub fn new(cfg: &ModelConfig, weights: Option<NormWeights>) -> NormLayer {
        NormLayer {
            kind: cfg.norm,
            eps: cfg.eps,
            weights,
        }
    }

    pub fn weights(&self) -> Option<&NormWeights> {
        self.weights.as_ref()
    }

    /// The normalised rows and the statistics the backward needs (`None` without a norm).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Option<NormCache>)> {
        match self.kind {
            Norm::None => Ok((x.clone(), None)),
            Norm::LayerNorm | Norm::LayerNormPre => {
                let (w, b) = match &self.weights {
                    Some(n) => (Some(&n.w), Some(&n.b)),
                    None => (None, None),
                };
                let (y, c) = ops::layer_norm(x, w, b, self.eps, false)?;
                Ok((y, Some(c)))
            }
        }
    }

    /// The gain applied after normalising (for the fused backward kernels).
    fn gain(&self) -> Option<&Tensor> {
        self.weights.as_ref().map(|n| &n.w)
    }

    /// `dL/dx` from `dL/dy` through the norm of a forward whose statistics are `cache`.
    pub fn backward(&self, g: &Tensor, cache: &Option<NormCache>) -> Result<Tensor> {
        match cache {
            None => Ok(g.clone()),
            Some(c) => ops::layer_norm_backward(g, c, self.gain(), false),
        }
    }
}

/// What [`Attention::backward`] needs from the forward.
pub struct AttentionCache {
    norm: Option<NormCache>,
    /// `[batch, heads, positions, d_head]`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Tensor,
}

/// The heads of one layer: `W_Q`, `W_K`, `W_V` per head (`[n_heads, d_model, d_head]`,
/// TransformerLens's layout), their biases, and `W_O` (`[n_heads, d_head, d_model]`).
#[derive(Debug, Clone)]
pub struct Attention {
    pub norm: NormLayer,
    w: [Tensor; 3],
    /// `[n_heads · d_head]` each.
    b: [Tensor; 3],
    w_o: Tensor,
    /// `[n_heads · d_head, d_model]`: `w_o`'s data for the backward's one GEMM.
    w_o_flat: Tensor,
    b_o: Tensor,
    n_heads: usize,
    d_head: usize,
    /// Attention scores are divided by this.
    scale: f32,
}

impl Attention {
    /// `b_O`: the bias added once to the sum of the heads. It belongs to no edge.
    pub fn output_bias(&self) -> &Tensor {
        &self.b_o
    }

    /// Every head's projection for `letter` of the normalised stream `xn` (`[N, d]`, the same for
    /// all heads) in one GEMM over `[d, h·dh]`, as `[batch, heads, positions, d_head]`.
    /// `positions` is added to the query and key inputs (shortformer models).
    pub fn project_all(
        &self,
        letter: Qkv,
        xn: &Tensor,
        positions: Option<&Tensor>,
        batch: usize,
        seq_len: usize,
    ) -> Result<Tensor> {
        let (h, dh) = (self.n_heads, self.d_head);
        let d = xn.dim(1)?;
        let mut inp = xn.clone();
        if let (Some(pos), true) = (positions, letter != Qkv::V) {
            inp = (inp + pos)?;
        }
        // All heads in one GEMM: [d, h·dh] built from the per-head layout (a 2.4 MB copy on
        // GPT-2, cheaper than keeping both layouts resident).
        let w = self.w[letter as usize]
            .permute((1, 0, 2))?
            .reshape((d, h * dh))?;
        let y = inp.matmul(&w)?.broadcast_add(&self.b[letter as usize])?;
        Ok(y.reshape((batch, seq_len, h, dh))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// Each head's projection for `letter` of its own residual stream (`inputs[h]`, `[N, d]`,
    /// not yet normalised), as `[batch, heads, positions, d_head]`.
    pub fn project_per_head(
        &self,
        letter: Qkv,
        inputs: &[Tensor],
        positions: Option<&Tensor>,
        batch: usize,
        seq_len: usize,
    ) -> Result<Tensor> {
        let (h, dh) = (self.n_heads, self.d_head);
        let (n, d) = inputs[0].dims2()?;
        let inp = Tensor::stack(inputs, 0)?; // [h, n, d]
        let (mut inp, _) = self.norm.forward(&inp.reshape((h * n, d))?)?;
        if let (Some(pos), true) = (positions, letter != Qkv::V) {
            inp = inp.reshape((h, n, d))?.broadcast_add(pos)?;
        }
        let y = inp.reshape((h, n, d))?.matmul(&self.w[letter as usize])?; // [h, n, dh]
        let y = y.broadcast_add(&self.b[letter as usize].reshape((h, 1, dh))?)?;
        Ok(y.reshape((h, batch, seq_len, dh))?
            .transpose(0, 1)?
            .contiguous()?)
    }

    /// Head `head`'s projection for `letter` of `input` (`[rows, d]`, not yet normalised):
    /// `[rows, d_head]`. `positions` holds the same rows' positional embeddings.
    pub fn project_head(
        &self,
        letter: Qkv,
        head: usize,
        input: &Tensor,
        positions: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (mut xn, _) = self.norm.forward(input)?;
        if let (Some(pos), true) = (positions, letter != Qkv::V) {
            xn = (xn + pos)?;
        }
        let dh = self.d_head;
        let w = self.w[letter as usize].get(head)?;
        let b = self.b[letter as usize].narrow(0, head * dh, dh)?;
        Ok(xn.matmul(&w)?.broadcast_add(&b)?)
    }

    /// Softmax of the scaled, masked scores of queries `[…, m, dh]` against keys `[…, p, dh]`.
    fn pattern(&self, q: &Tensor, k: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let scores = (q.matmul(&k.t()?)? * (1.0 / self.scale as f64))?.broadcast_add(mask)?;
        Ok(candle_nn::ops::softmax_last_dim(&scores)?)
    }

    /// Every head's output `z_h · W_O[h]` (`[heads, N, d]`, without `b_O`) from projections
    /// `[batch, heads, positions, d_head]`, and the pattern.
    pub fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (b, h, p, dh) = q.dims4()?;
        let pattern = self.pattern(q, k, mask)?;
        let z = pattern.matmul(v)?; // [b, h, p, dh]
        let z_heads = z.transpose(0, 1)?.contiguous()?.reshape((h, b * p, dh))?;
        Ok((z_heads.matmul(&self.w_o)?, pattern))
    }

    /// Head `head`'s output for queries `[b, m, dh]` over all keys and values `[b, p, dh]`,
    /// with the mask's rows for those queries (`[m, p]`): `[b·m, d]`.
    pub fn attend_head(
        &self,
        head: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask_rows: &Tensor,
    ) -> Result<Tensor> {
        let (b, m, dh) = q.dims3()?;
        let pattern = self.pattern(q, k, mask_rows)?;
        let z = pattern.matmul(v)?.reshape((b * m, dh))?;
        Ok(z.matmul(&self.w_o.get(head)?)?)
    }

    /// The attention sublayer's contribution to the residual stream: the heads' sum plus `b_O`.
    pub fn output(&self, head_out: &Tensor) -> Result<Tensor> {
        Ok(ops::sum_leading(head_out)?.broadcast_add(&self.b_o)?)
    }

    /// Keeps what the backward needs.
    pub fn cache(
        &self,
        norm: Option<NormCache>,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pattern: Tensor,
    ) -> AttentionCache {
        AttentionCache {
            norm,
            q,
            k,
            v,
            pattern,
        }
    }

    /// The gradients of every head's q, k and v input (`[3h (+1), N, d]`, graph order: all
    /// queries, all keys, all values) given the gradient `g` (`[N, d]`) that reaches every
    /// head's output; `append` (the MLP reader's gradient) fills one more slot. Each is the
    /// derivative with respect to that reader's own copy of the residual stream.
    pub fn backward(
        &self,
        cache: &AttentionCache,
        g: &Tensor,
        append: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, h, p, dh) = cache.q.dims4()?;
        let n = b * p;
        // The residual gradient reaches every head's output unchanged.
        let dz = g
            .matmul(&self.w_o_flat.t()?)?
            .reshape((b, p, h, dh))?
            .transpose(1, 2)?
            .contiguous()?;
        let d_pattern = dz.matmul(&cache.v.t()?)?;
        let dv = cache.pattern.t()?.matmul(&dz)?;
        // Softmax backward: dS = P ⊙ (dP − Σ_j dP ⊙ P); masked entries have P = 0.
        let inner = (&d_pattern * &cache.pattern)?.sum_keepdim(D::Minus1)?;
        let d_scores = ((cache.pattern.clone() * d_pattern.broadcast_sub(&inner)?)?
            * (1.0 / self.scale as f64))?;
        let dq = d_scores.matmul(&cache.k)?;
        let dk = d_scores.t()?.matmul(&cache.q)?;
        let to_heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.transpose(0, 1)?.contiguous()?.reshape((h, n, dh))?)
        };
        let (dq, dk, dv) = (to_heads(dq)?, to_heads(dk)?, to_heads(dv)?);
        let ws = [&self.w[0], &self.w[1], &self.w[2]];
        let norm = cache.norm.as_ref().map(|c| (c, self.norm.gain()));
        if let Some(grads) = ops::qkv_input_grads([&dq, &dk, &dv], ws, norm, append)? {
            return Ok(grads);
        }
        // Any device: per-letter batched products, then the norm's backward.
        let dxs = [
            dq.matmul(&ws[0].t()?)?,
            dk.matmul(&ws[1].t()?)?,
            dv.matmul(&ws[2].t()?)?,
        ];
        match &cache.norm {
            Some(c) => ops::layer_norm_backward_many(&dxs, c, self.norm.gain(), append),
            None => {
                let mut parts = dxs.to_vec();
                if let Some(gm) = append {
                    parts.push(gm.unsqueeze(0)?);
                }
                Ok(Tensor::cat(&parts, 0)?)
            }
        }
    }
}

/// An MLP's weights: `out = act(x @ w_in + b_in) @ w_out + b_out`.
#[derive(Debug, Clone)]
pub struct MlpWeights {
    pub w_in: Tensor,
    pub b_in: Tensor,
    pub w_out: Tensor,
    pub b_out: Tensor,
}

/// What [`Mlp::backward`] needs from the forward.
pub struct MlpCache {
    norm: Option<NormCache>,
    pre: Tensor,
}

/// One layer's MLP and the norm before it.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub norm: NormLayer,
    weights: MlpWeights,
    act: Activation,
}

impl Mlp {
    pub fn new(cfg: &ModelConfig, norm: Option<NormWeights>, weights: MlpWeights) -> Mlp {
        Mlp {
            norm: NormLayer::new(cfg, norm),
            weights,
            act: cfg.act,
        }
    }

    pub fn weights(&self) -> &MlpWeights {
        &self.weights
    }

    /// The output bias: a constant added to the residual stream, belonging to no edge.
    pub fn output_bias(&self) -> &Tensor {
        &self.weights.b_out
    }

    /// The MLP's output (`[rows, d]`, without `b_out`) for its input rows (not yet normalised),
    /// and what the backward needs.
    pub fn forward(&self, input: &Tensor) -> Result<(Tensor, MlpCache)> {
        let w = &self.weights;
        let (xn, norm) = self.norm.forward(input)?;
        let pre = xn.matmul(&w.w_in)?.broadcast_add(&w.b_in)?;
        let post = ops::activation(&pre, self.act, false)?;
        Ok((post.matmul(&w.w_out)?, MlpCache { norm, pre }))
    }

    /// The gradient of the MLP's input (its reader) from the gradient `g` of its output.
    pub fn backward(&self, cache: &MlpCache, g: &Tensor) -> Result<Tensor> {
        let w = &self.weights;
        let d_post = g.matmul(&w.w_out.t()?)?;
        let d_pre = ops::activation_backward(&d_post, &cache.pre, self.act, false)?;
        let d_xn = d_pre.matmul(&w.w_in.t()?)?;
        self.norm.backward(&d_xn, &cache.norm)
    }
}

/// One transformer layer.
#[derive(Debug, Clone)]
pub struct Block {
    pub attn: Attention,
    /// `None` for attention-only models.
    pub mlp: Option<Mlp>,
}

impl Block {
    /// Builds a layer from per-head TransformerLens-layout tensors (already f32 on one device):
    /// `W_Q`, `W_K`, `W_V` `[h, d, dh]`, `b_Q`, `b_K`, `b_V` `[h, dh]`, `W_O` `[h, dh, d]`, `b_O`.
    #[allow(clippy::too_many_arguments)]
    pub fn from_heads(
        cfg: &ModelConfig,
        ln1: Option<NormWeights>,
        w_q: Tensor,
        w_k: Tensor,
        w_v: Tensor,
        b_q: Tensor,
        b_k: Tensor,
        b_v: Tensor,
        w_o: Tensor,
        b_o: Tensor,
        ln2: Option<NormWeights>,
        mlp: Option<MlpWeights>,
    ) -> Result<Block> {
        let (h, d, dh) = (cfg.n_heads, cfg.d_model, cfg.d_head);
        Ok(Block {
            attn: Attention {
                norm: NormLayer::new(cfg, ln1),
                w: [w_q.contiguous()?, w_k.contiguous()?, w_v.contiguous()?],
                b: [
                    b_q.reshape(h * dh)?,
                    b_k.reshape(h * dh)?,
                    b_v.reshape(h * dh)?,
                ],
                w_o_flat: w_o.reshape((h * dh, d))?,
                w_o: w_o.contiguous()?,
                b_o,
                n_heads: h,
                d_head: dh,
                scale: cfg.attn_scale,
            },
            mlp: mlp.map(|m| Mlp::new(cfg, ln2, m)),
        })
    }
}
