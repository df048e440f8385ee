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
//! With [`Products::Bf16`] ([`Block::set_products`]) the big weight products of the forward
//! and the backward go through [`bf16::product`]; every other product stays f32.

use candle_core::{DType, Tensor, D};

use super::bf16::{self, LazyPacked, Products};
use super::config::{Activation, ModelConfig, Norm};
use super::ops::{self, NormCache, RotaryRows};
use crate::graph::Qkv;
use crate::{Error, Result};

/// Gain and bias of a norm (absent for `LNPre` and for models without normalisation; RMSNorm
/// has no bias).
#[derive(Debug, Clone)]
pub struct NormWeights {
    pub w: Tensor,
    pub b: Option<Tensor>,
}

/// `x · w`, through `packed`'s bf16 panels when the layer computes its products in bf16 (and
/// `x` is a CPU matrix), else candle's f32 matmul.
fn times(x: &Tensor, w: &Tensor, packed: Option<&LazyPacked>) -> Result<Tensor> {
    times_plus(x, w, packed, None)
}

/// [`times`] plus a bias `[n]` on every row: the bf16 product adds it as it stores the tiles.
fn times_plus(
    x: &Tensor,
    w: &Tensor,
    packed: Option<&LazyPacked>,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let y = match packed {
        Some(p) if x.device().is_cpu() && x.rank() == 2 => {
            return bf16::product(x, p.get(w)?, bias);
        }
        // An MLP matrix kept in bf16 as stored, multiplied in f32.
        _ if w.dtype() != x.dtype() => x.matmul(&w.to_dtype(x.dtype())?)?,
        _ => x.matmul(w)?,
    };
    match bias {
        Some(b) => ops::add_bias(&y, b),
        None => Ok(y),
    }
}

/// The bf16 packings of one attention sublayer's weights, each made on first use.
#[derive(Debug, Clone, Default)]
struct AttentionPacks {
    qkv: LazyPacked,
    /// `w_qkvᵀ`: the backward's per-head q/k/v input gradients.
    qkv_t: LazyPacked,
    o: LazyPacked,
    o_t: LazyPacked,
}

/// The bf16 packings of one MLP's weights and of their transposes (the backward's).
#[derive(Debug, Clone, Default)]
struct MlpPacks {
    w_in: LazyPacked,
    w_gate: LazyPacked,
    w_out: LazyPacked,
    w_in_t: LazyPacked,
    w_gate_t: LazyPacked,
    w_out_t: LazyPacked,
}

/// One layer's attention weights in eap's layout, whatever the checkpoint's: per-head
/// `[heads, d_model, d_head]` projections (`x · W`), biases `[heads, d_head]` where the
/// architecture has them, `W_O` `[n_heads, d_head, d_model]`.
#[derive(Debug, Clone)]
pub struct AttentionWeights {
    /// The norm before attention (`ln1`, `input_layernorm`).
    pub norm: Option<NormWeights>,
    /// `[n_heads, d, dh]`.
    pub w_q: Tensor,
    /// `[n_kv_heads, d, dh]`.
    pub w_k: Tensor,
    pub w_v: Tensor,
    /// `[n_heads, dh]`.
    pub b_q: Option<Tensor>,
    /// `[n_kv_heads, dh]`.
    pub b_k: Option<Tensor>,
    pub b_v: Option<Tensor>,
    /// `[n_heads, dh, d]`.
    pub w_o: Tensor,
    /// `[d]`.
    pub b_o: Option<Tensor>,
    /// The norm on attention's output (Gemma-2's `post_attention_layernorm`).
    pub post_norm: Option<NormWeights>,
    /// `w_q`, `w_k` and `w_v` as the checkpoint already stores them fused, `[d, (n_heads +
    /// 2·n_kv_heads)·dh]` with every query head's columns, then the keys', then the values'
    /// (GPT-2's `c_attn`), f32: then `w_q`, `w_k` and `w_v` are views of it, and the layer
    /// keeps it as its fused projection instead of copying the heads into one (three copies of
    /// the matrix per streamed GPT-2 layer).
    pub fused_qkv: Option<Tensor>,
}

/// The normalisation applied to a sublayer's input (or output, or before the unembedding).
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
        let w = self.gain();
        match self.kind {
            Norm::None => Ok((x.clone(), None)),
            Norm::LayerNorm | Norm::LayerNormPre => {
                let b = self.weights.as_ref().and_then(|n| n.b.as_ref());
                let (y, c) = ops::layer_norm(x, w, b, self.eps, false)?;
                Ok((y, Some(c)))
            }
            Norm::RmsNorm => {
                let (y, c) = ops::rms_norm(x, w, self.eps, false)?;
                Ok((y, Some(c)))
            }
        }
    }

    /// [`NormLayer::forward`]'s rows alone (the same bits), for a forward with no backward.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.gain();
        match self.kind {
            Norm::None => Ok(x.clone()),
            Norm::LayerNorm | Norm::LayerNormPre => {
                let b = self.weights.as_ref().and_then(|n| n.b.as_ref());
                ops::normalized(x, w, b, self.eps, true)
            }
            Norm::RmsNorm => ops::normalized(x, w, None, self.eps, false),
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

/// Where the rows handed to a projection sit in their sequences, as the positional scheme needs
/// it: shortformer embeddings added to the query and key inputs (`[rows, d]`), or the rotary
/// angles of each row. Built by [`Model::row_positions`](super::Model::row_positions).
#[derive(Debug, Clone, Default)]
pub struct RowPositions {
    pub added: Option<Tensor>,
    pub rotary: Option<RotaryRows>,
}

/// What [`Attention::backward`] needs from the forward.
pub struct AttentionCache {
    norm: Option<NormCache>,
    /// `[batch, heads, positions, d_head]`, keys and values repeated per query head.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Tensor,
    /// `tanh` of the scores over the soft-cap (soft-capped models).
    tanh: Option<Tensor>,
    /// The output norm's statistics (post-norm models).
    post: Option<NormCache>,
    rotary: Option<RotaryRows>,
}

/// The heads of one layer: `W_Q` per query head, `W_K` and `W_V` per key/value head, their
/// biases where the architecture has them, and `W_O` (`[n_heads, d_head, d_model]`).
#[derive(Debug, Clone)]
pub struct Attention {
    pub norm: NormLayer,
    post_norm: Option<NormLayer>,
    /// `[d, (n_heads + 2 · n_kv_heads) · d_head]`: every query head's `W_Q`, then every key
    /// head's `W_K`, then every value head's `W_V`, as column blocks of one matrix, so that the
    /// unpatched forward projects all three in one GEMM (three GEMMs of a third of the width,
    /// and a relayout of each from the per-head layout on every call, cost ~25% more on GPT-2).
    w_qkv: Tensor,
    /// The biases in the same column order (zeros for a letter without one).
    b_qkv: Option<Tensor>,
    w_o: Tensor,
    /// `[n_heads · d_head, d_model]`: `w_o`'s data for the backward's one GEMM.
    w_o_flat: Tensor,
    b_o: Option<Tensor>,
    n_heads: usize,
    n_kv_heads: usize,
    d_head: usize,
    /// Attention scores are divided by this.
    scale: f32,
    softcap: Option<f32>,
    /// Present when the layer computes its weight products in bf16.
    packs: Option<AttentionPacks>,
}

impl Attention {
    /// `b_O`: the bias added once to the sum of the heads. It belongs to no edge.
    pub fn output_bias(&self) -> Option<&Tensor> {
        self.b_o.as_ref()
    }

    /// Whether the heads' outputs pass through a norm before they join the residual stream, so
    /// that the residual stream is not the sum of the writers (Gemma-2).
    pub fn has_post_norm(&self) -> bool {
        self.post_norm.is_some()
    }

    /// How many heads `letter`'s weights have: query heads, or key/value heads.
    fn heads_of(&self, letter: Qkv) -> usize {
        match letter {
            Qkv::Q => self.n_heads,
            Qkv::K | Qkv::V => self.n_kv_heads,
        }
    }

    /// The key/value head that query head `head` reads (grouped-query attention).
    fn weight_head(&self, letter: Qkv, head: usize) -> usize {
        match letter {
            Qkv::Q => head,
            Qkv::K | Qkv::V => head / (self.n_heads / self.n_kv_heads),
        }
    }

    /// The key/value head of every query head.
    fn kv_index(&self) -> Result<Tensor> {
        let idx: Vec<u32> = (0..self.n_heads)
            .map(|h| self.weight_head(Qkv::K, h) as u32)
            .collect();
        Ok(Tensor::from_vec(idx, self.n_heads, self.w_qkv.device())?)
    }

    /// The column of the fused projection where `letter`'s first head starts.
    fn first_column(&self, letter: Qkv) -> usize {
        let dh = self.d_head;
        match letter {
            Qkv::Q => 0,
            Qkv::K => self.n_heads * dh,
            Qkv::V => (self.n_heads + self.n_kv_heads) * dh,
        }
    }

    /// The first column of `letter`'s weights for each *query* head (key and value heads
    /// repeat for each query head that reads them).
    fn head_columns(&self, letter: Qkv) -> Vec<usize> {
        (0..self.n_heads)
            .map(|h| self.first_column(letter) + self.weight_head(letter, h) * self.d_head)
            .collect()
    }

    /// `letter`'s bias, `[heads · d_head]` over its own heads.
    fn letter_bias(&self, letter: Qkv) -> Result<Option<Tensor>> {
        let width = self.heads_of(letter) * self.d_head;
        self.b_qkv
            .as_ref()
            .map(|b| b.narrow(0, self.first_column(letter), width))
            .transpose()
            .map_err(Error::from)
    }

    /// `letter`'s weights per *query* head, `[n_heads, d, dh]` (a copy: the backward's path
    /// for inputs that are not CPU f32).
    fn per_query_head_weights(&self, letter: Qkv) -> Result<Tensor> {
        let heads = self
            .head_columns(letter)
            .into_iter()
            .map(|c| self.w_qkv.narrow(1, c, self.d_head))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&heads, 0)?)
    }

    /// `letter`'s bias per query head, `[n_heads · d_head]`.
    fn per_query_head_bias(&self, letter: Qkv) -> Result<Option<Tensor>> {
        let Some(b) = self.letter_bias(letter)? else {
            return Ok(None);
        };
        if self.heads_of(letter) == self.n_heads {
            return Ok(Some(b));
        }
        let dh = self.d_head;
        let heads = b.reshape((self.n_kv_heads, dh))?;
        Ok(Some(
            heads
                .index_select(&self.kv_index()?, 0)?
                .reshape(self.n_heads * dh)?,
        ))
    }

    /// The rotary embedding of queries and keys (`y`'s rows of `d_head`; row `j` takes the
    /// angles of input row `row_of(j)`); values are not rotated.
    fn rotate(
        &self,
        letter: Qkv,
        y: Tensor,
        positions: &RowPositions,
        row_of: &(dyn Fn(usize) -> usize + Sync),
    ) -> Result<Tensor> {
        match (&positions.rotary, letter) {
            (Some(rot), Qkv::Q | Qkv::K) => rot.apply(&y, row_of, false),
            _ => Ok(y),
        }
    }

    /// Every head's projection for `letter` of the normalised stream `xn` (`[N, d]`, the same for
    /// all heads) in one GEMM over `[d, heads·dh]`, as `[batch, n_heads, positions, d_head]`
    /// (key and value heads repeated per query head).
    pub fn project_all(
        &self,
        letter: Qkv,
        xn: &Tensor,
        positions: &RowPositions,
        batch: usize,
        seq_len: usize,
    ) -> Result<Tensor> {
        let width = self.heads_of(letter) * self.d_head;
        let mut inp = xn.clone();
        if let (Some(pos), true) = (&positions.added, letter != Qkv::V) {
            inp = (inp + pos)?;
        }
        let w = self.w_qkv.narrow(1, self.first_column(letter), width)?;
        let mut y = inp.matmul(&w)?;
        if let Some(b) = self.letter_bias(letter)? {
            y = ops::add_bias(&y, &b)?;
        }
        self.split_heads(letter, &y, 0, positions, (batch, seq_len))
    }

    /// [`project_all`](Attention::project_all) of all three letters, `[q, k, v]`: one GEMM over
    /// the fused weights when the three read the same input (no positional embedding added
    /// to queries and keys only).
    pub fn project_qkv(
        &self,
        xn: &Tensor,
        positions: &RowPositions,
        batch: usize,
        seq_len: usize,
    ) -> Result<[Tensor; 3]> {
        if positions.added.is_some() {
            let [q, k, v] = Qkv::ALL.map(|l| self.project_all(l, xn, positions, batch, seq_len));
            return Ok([q?, k?, v?]);
        }
        let packed = self.packs.as_ref().map(|p| &p.qkv);
        let y = times_plus(xn, &self.w_qkv, packed, self.b_qkv.as_ref())?;
        let [q, k, v] = Qkv::ALL
            .map(|l| self.split_heads(l, &y, self.first_column(l), positions, (batch, seq_len)));
        Ok([q?, k?, v?])
    }

    /// `letter`'s heads from the columns of `y` (`[N, width]`) that start at `first`, rotated
    /// where the model rotates them, as `[batch, n_heads, positions, d_head]` (key and value
    /// heads repeated per query head).
    fn split_heads(
        &self,
        letter: Qkv,
        y: &Tensor,
        first: usize,
        positions: &RowPositions,
        (batch, seq_len): (usize, usize),
    ) -> Result<Tensor> {
        let (h, dh) = (self.n_heads, self.d_head);
        let heads = self.heads_of(letter);
        let mut t = ops::heads_of_columns(y, first, (heads, dh), (batch, seq_len))?;
        if positions.rotary.is_some() && letter != Qkv::V {
            // Row j of [batch, heads, positions] is input row (j / (heads·p))·p + j % p.
            let per_batch = heads * seq_len;
            let rows = t.reshape((batch * per_batch, dh))?;
            let row_of = |j: usize| (j / per_batch) * seq_len + j % seq_len;
            t = self
                .rotate(letter, rows, positions, &row_of)?
                .reshape((batch, heads, seq_len, dh))?;
        }
        if heads != h {
            let g = h / heads;
            t = t
                .unsqueeze(2)?
                .broadcast_as((batch, heads, g, seq_len, dh))?
                .reshape((batch, h, seq_len, dh))?;
        }
        Ok(t)
    }

    /// Each query head's projection for `letter` of its own residual stream (`inputs[h]`,
    /// `[N, d]`, not yet normalised), as `[batch, n_heads, positions, d_head]`.
    pub fn project_per_head(
        &self,
        letter: Qkv,
        inputs: &[Tensor],
        positions: &RowPositions,
        batch: usize,
        seq_len: usize,
    ) -> Result<Tensor> {
        let (h, dh) = (self.n_heads, self.d_head);
        let (n, d) = inputs[0].dims2()?;
        let inp = Tensor::stack(inputs, 0)?; // [h, n, d]
        let mut inp = self.norm.apply(&inp.reshape((h * n, d))?)?;
        if let (Some(pos), true) = (&positions.added, letter != Qkv::V) {
            inp = inp.reshape((h, n, d))?.broadcast_add(pos)?;
        }
        let inp = inp.reshape((h, n, d))?;
        let columns = self.head_columns(letter);
        let mut y = ops::batched_products(&inp, &self.w_qkv, &columns, dh)?; // [h, n, dh]
        if let Some(b) = self.per_query_head_bias(letter)? {
            y = y.broadcast_add(&b.reshape((h, 1, dh))?)?;
        }
        if positions.rotary.is_some() && letter != Qkv::V {
            let rows = y.reshape((h * n, dh))?;
            y = self
                .rotate(letter, rows, positions, &|j| j % n)?
                .reshape((h, n, dh))?;
        }
        ops::swap_middle(&y, (1, h, batch, seq_len * dh))?
            .reshape((batch, h, seq_len, dh))
            .map_err(Error::from)
    }

    /// Query head `head`'s projection for `letter` of `input` (`[rows, d]`, not yet
    /// normalised): `[rows, d_head]`. `positions` describes the same rows.
    pub fn project_head(
        &self,
        letter: Qkv,
        head: usize,
        input: &Tensor,
        positions: &RowPositions,
    ) -> Result<Tensor> {
        let mut xn = self.norm.apply(input)?;
        if let (Some(pos), true) = (&positions.added, letter != Qkv::V) {
            xn = (xn + pos)?;
        }
        let dh = self.d_head;
        let column = self.first_column(letter) + self.weight_head(letter, head) * dh;
        let mut y = xn.matmul(&self.w_qkv.narrow(1, column, dh)?)?;
        if let Some(b) = &self.b_qkv {
            y = y.broadcast_add(&b.narrow(0, column, dh)?)?;
        }
        self.rotate(letter, y, positions, &|j| j)
    }

    /// Softmax of the scaled (soft-capped), masked scores of queries `[…, m, dh]` against keys
    /// `[…, p, dh]`, and the soft-cap's `tanh` for the backward.
    fn pattern(&self, q: &Tensor, k: &Tensor, mask: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let scores = (q.matmul(&k.t()?)? * (1.0 / self.scale as f64))?;
        let (scores, tanh) = match self.softcap {
            Some(cap) => {
                let (s, t) = ops::softcap(&scores, cap)?;
                (s, Some(t))
            }
            None => (scores, None),
        };
        let scores = scores.broadcast_add(mask)?;
        Ok((candle_nn::ops::softmax_last_dim(&scores)?, tanh))
    }

    /// The mixed values `z` (`[N, heads · d_head]`, the output projection's input) from
    /// projections `[batch, heads, positions, d_head]`, and what the backward needs of the
    /// pattern.
    pub fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
    ) -> Result<(Tensor, AttentionPattern)> {
        let (b, h, p, dh) = q.dims4()?;
        let short = match self.softcap {
            None => ops::short_attention(q, k, v, mask, self.scale)?,
            Some(_) => None,
        };
        let (pattern, tanh, z) = match short {
            Some((pattern, z)) => (pattern, None, z),
            None => {
                let (pattern, tanh) = self.pattern(q, k, mask)?;
                let z = pattern.matmul(v)?; // [b, h, p, dh]
                let z = ops::swap_middle(&z, (b, h, p, dh))?.reshape((b * p, h * dh))?;
                (pattern, tanh, z)
            }
        };
        Ok((z, AttentionPattern { pattern, tanh }))
    }

    /// `W_O` per head, `[heads, d_head, d_model]`.
    pub fn w_o(&self) -> &Tensor {
        &self.w_o
    }

    /// Every head's output `z_h · W_O[h]` (without `b_O`) from the mixed values `z` (`[N,
    /// heads · d_head]`) into `out`, head `h`'s `[N, d]` starting at `h · chunk`: in bf16 when
    /// the layer's products are (through `W_O`'s packing, one head per thread), else f32.
    pub fn head_outputs_into(&self, z: &Tensor, out: &mut [f32], chunk: usize) -> Result<()> {
        if let Some(p) = &self.packs {
            let packed = p.o.get(&self.w_o_flat)?;
            if ops::per_head_products_bf16_into(z, packed, self.n_heads, out, chunk)? {
                return Ok(());
            }
        }
        ops::per_head_products_into(z, &self.w_o, out, chunk)
    }

    /// The number of query heads.
    pub fn n_heads(&self) -> usize {
        self.n_heads
    }

    /// Every head's output `z_h · W_O[h]` (`[heads, N, d]`, without `b_O`) from the mixed
    /// values `[N, heads · d_head]`.
    pub fn head_outputs(&self, z: &Tensor) -> Result<Tensor> {
        ops::per_head_products(z, &self.w_o)
    }

    /// Query head `head`'s output for queries `[b, m, dh]` over all keys and values
    /// `[b, p, dh]`, with the mask's rows for those queries (`[m, p]`): `[b·m, d]`. Short
    /// contexts take [`ops::short_attention`] as [`Attention::attend`] does (candle's batched
    /// matmuls of one head cost ACDC ~0.1 ms per recomputed head).
    pub fn attend_head(
        &self,
        head: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask_rows: &Tensor,
    ) -> Result<Tensor> {
        let (b, m, dh) = q.dims3()?;
        let short = match self.softcap {
            None => ops::short_attention(
                &q.unsqueeze(1)?,
                &k.unsqueeze(1)?,
                &v.unsqueeze(1)?,
                mask_rows,
                self.scale,
            )?,
            Some(_) => None,
        };
        let z = match short {
            Some((_, z)) => z,
            None => {
                let (pattern, _) = self.pattern(q, k, mask_rows)?;
                pattern.matmul(v)?.reshape((b * m, dh))?
            }
        };
        Ok(z.matmul(&self.w_o.get(head)?)?)
    }

    /// The attention sublayer's contribution to the residual stream: the heads' sum plus `b_O`,
    /// through the output norm where there is one (with its statistics).
    pub fn output(&self, head_out: &Tensor) -> Result<(Tensor, Option<NormCache>)> {
        let mut sum = ops::sum_leading(head_out)?;
        if let Some(b) = &self.b_o {
            sum = ops::add_bias(&sum, b)?;
        }
        self.finish_output(sum)
    }

    /// [`Attention::output`] from the mixed values (`[N, heads · d_head]`) in one GEMM over
    /// the flat `W_O`, for a forward that needs no head's own output.
    pub fn output_from_mixed(&self, z: &Tensor) -> Result<(Tensor, Option<NormCache>)> {
        let packed = self.packs.as_ref().map(|p| &p.o);
        self.finish_output(times_plus(z, &self.w_o_flat, packed, self.b_o.as_ref())?)
    }

    /// The output norm on the heads' sum plus `b_O`.
    fn finish_output(&self, sum: Tensor) -> Result<(Tensor, Option<NormCache>)> {
        match &self.post_norm {
            Some(n) => n.forward(&sum),
            None => Ok((sum, None)),
        }
    }

    /// Keeps what the backward needs.
    #[allow(clippy::too_many_arguments)]
    pub fn cache(
        &self,
        norm: Option<NormCache>,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pattern: AttentionPattern,
        post: Option<NormCache>,
        positions: &RowPositions,
    ) -> AttentionCache {
        AttentionCache {
            norm,
            q,
            k,
            v,
            pattern: pattern.pattern,
            tanh: pattern.tanh,
            post,
            rotary: positions.rotary.clone(),
        }
    }

    /// The gradients of every head's q, k and v input — one `[h, N, d]` tensor per letter, in
    /// graph order (all queries, all keys, all values) — given the gradient `g` (`[N, d]`) of
    /// the residual stream attention writes to. Each is the derivative with respect to that
    /// reader's own copy of the residual stream — and their sum over letters and heads
    /// (`[N, d]`), the gradient the one shared residual stream receives.
    pub fn backward(&self, cache: &AttentionCache, g: &Tensor) -> Result<([Tensor; 3], Tensor)> {
        let (b, h, p, dh) = cache.q.dims4()?;
        let n = b * p;
        // Without an output norm the residual gradient reaches every head's output unchanged.
        let post;
        let g = match &self.post_norm {
            Some(norm) => {
                post = norm.backward(g, &cache.post)?;
                &post
            }
            None => g,
        };
        let packed = self.packs.as_ref().map(|p| &p.o_t);
        let dz = times(g, &self.w_o_flat.t()?, packed)?; // [n, h·dh]
        let short = match &cache.tanh {
            None => ops::short_attention_backward(
                &dz,
                &cache.q,
                &cache.k,
                &cache.v,
                &cache.pattern,
                self.scale,
            )?,
            Some(_) => None,
        };
        let (mut dq, mut dk, dv) = match short {
            Some([dq, dk, dv]) => (dq, dk, dv),
            None => self.pattern_backward(cache, &dz)?,
        };
        if let Some(rot) = &cache.rotary {
            // Rows of [h, n, dh] are (head, input row) pairs.
            let back = |t: &Tensor| -> Result<Tensor> {
                rot.apply(&t.reshape((h * n, dh))?, &|j| j % n, true)?
                    .reshape((h, n, dh))
                    .map_err(Error::from)
            };
            dq = back(&dq)?;
            dk = back(&dk)?;
        }
        let columns = Qkv::ALL.map(|l| self.head_columns(l));
        let cols = [&columns[0][..], &columns[1][..], &columns[2][..]];
        let norm = cache.norm.as_ref().map(|c| (c, self.norm.gain()));
        let bf16_t = match &self.packs {
            Some(p) if dq.device().is_cpu() => Some(p.qkv_t.get(&self.w_qkv.t()?)?),
            _ => None,
        };
        let d_heads = [&dq, &dk, &dv];
        if let Some(grads) = ops::qkv_input_grads(d_heads, &self.w_qkv, cols, norm, bf16_t)? {
            return Ok(grads);
        }
        let [wq, wk, wv] = Qkv::ALL.map(|l| self.per_query_head_weights(l));
        let ws = [wq?, wk?, wv?];
        // Any device: per-letter batched products, then the norm's backward.
        let dxs = [
            dq.matmul(&ws[0].t()?)?,
            dk.matmul(&ws[1].t()?)?,
            dv.matmul(&ws[2].t()?)?,
        ];
        let letters = match &cache.norm {
            Some(c) => {
                let back = |dx: &Tensor| ops::layer_norm_backward(dx, c, self.norm.gain(), false);
                [back(&dxs[0])?, back(&dxs[1])?, back(&dxs[2])?]
            }
            None => dxs,
        };
        let sums = letters
            .iter()
            .map(ops::sum_leading)
            .collect::<Result<Vec<_>>>()?;
        let sum = ((&sums[0] + &sums[1])? + &sums[2])?;
        Ok((letters, sum))
    }

    /// The gradients of `q`, `k` and `v` (`[h, N, dh]` each) from that of the mixed values
    /// (`[N, h·dh]`) through candle's batched matmuls: long sequences and soft-capped scores.
    fn pattern_backward(
        &self,
        cache: &AttentionCache,
        dz: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, h, p, dh) = cache.q.dims4()?;
        let n = b * p;
        let dz = ops::swap_middle(&dz.reshape((b, p, h, dh))?, (b, p, h, dh))?;
        let d_pattern = dz.matmul(&cache.v.t()?)?;
        let dv = cache.pattern.t()?.matmul(&dz)?;
        // Softmax backward: dS = P ⊙ (dP − Σ_j dP ⊙ P); masked entries have P = 0.
        let inner = (&d_pattern * &cache.pattern)?.sum_keepdim(D::Minus1)?;
        let d_capped = (cache.pattern.clone() * d_pattern.broadcast_sub(&inner)?)?;
        let d_scores = match &cache.tanh {
            None => (d_capped * (1.0 / self.scale as f64))?,
            Some(t) => (ops::softcap_backward(&d_capped, t)? * (1.0 / self.scale as f64))?,
        };
        let dq = d_scores.matmul(&cache.k)?;
        let dk = d_scores.t()?.matmul(&cache.q)?;
        let to_heads = |t: Tensor| -> Result<Tensor> {
            Ok(ops::swap_middle(&t, (1, b, h, p * dh))?.reshape((h, n, dh))?)
        };
        Ok((to_heads(dq)?, to_heads(dk)?, to_heads(dv)?))
    }
}

/// The attention pattern `[batch, heads, queries, keys]` and the soft-cap's `tanh`.
pub struct AttentionPattern {
    pattern: Tensor,
    tanh: Option<Tensor>,
}

/// An MLP's weights: `out = act(x @ w_in + b_in) @ w_out + b_out`, or for gated MLPs
/// `out = (act(x @ w_gate) ⊙ (x @ w_in)) @ w_out` (SwiGLU, GeGLU). `[in, out]` layouts.
#[derive(Debug, Clone)]
pub struct MlpWeights {
    /// The norm before the MLP (`ln2`, `post_attention_layernorm` in Llama,
    /// `pre_feedforward_layernorm` in Gemma-2).
    pub norm: Option<NormWeights>,
    /// `[d, d_mlp]` (`up_proj` in gated MLPs).
    pub w_in: Tensor,
    pub b_in: Option<Tensor>,
    /// `[d, d_mlp]`: gated MLPs only.
    pub w_gate: Option<Tensor>,
    /// `[d_mlp, d]`.
    pub w_out: Tensor,
    pub b_out: Option<Tensor>,
    /// The norm on the MLP's output (Gemma-2's `post_feedforward_layernorm`).
    pub post_norm: Option<NormWeights>,
}

/// What [`Mlp::backward`] needs from the forward.
pub struct MlpCache {
    norm: Option<NormCache>,
    /// The activation's input (the gate's, in gated MLPs).
    pre: Tensor,
    /// Gated MLPs: `x · W_in`, the factor the activation multiplies.
    up: Option<Tensor>,
    post: Option<NormCache>,
}

/// One layer's MLP and the norms around it.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub norm: NormLayer,
    post_norm: Option<NormLayer>,
    weights: MlpWeights,
    act: Activation,
    /// Present when the layer computes its weight products in bf16.
    packs: Option<MlpPacks>,
}

impl Mlp {
    pub fn new(cfg: &ModelConfig, weights: MlpWeights) -> Result<Mlp> {
        if cfg.gated_mlp != weights.w_gate.is_some() {
            return Err(Error::invalid(format!(
                "the configuration says gated_mlp = {} but the MLP weights {} a gate",
                cfg.gated_mlp,
                if weights.w_gate.is_some() {
                    "have"
                } else {
                    "lack"
                }
            )));
        }
        let mut weights = weights;
        weights.w_in = column_major(weights.w_in)?;
        weights.w_gate = weights.w_gate.map(column_major).transpose()?;
        Ok(Mlp {
            norm: NormLayer::new(cfg, weights.norm.clone()),
            post_norm: weights
                .post_norm
                .clone()
                .map(|w| NormLayer::new(cfg, Some(w))),
            weights,
            act: cfg.act,
            packs: None,
        })
    }

    pub fn weights(&self) -> &MlpWeights {
        &self.weights
    }

    /// The output bias: a constant added to the residual stream, belonging to no edge.
    pub fn output_bias(&self) -> Option<&Tensor> {
        self.weights.b_out.as_ref()
    }

    /// The MLP's output (`[rows, d]`, without `b_out`, after the output norm where there is
    /// one) for its input rows (not yet normalised), and what the backward needs.
    pub fn forward(&self, input: &Tensor) -> Result<(Tensor, MlpCache)> {
        self.run(input, true)
    }

    /// [`Mlp::forward`]'s output alone (the same bits), for a forward with no backward.
    pub fn output(&self, input: &Tensor) -> Result<Tensor> {
        Ok(self.run(input, false)?.0)
    }

    /// The MLP's output, with the norm's statistics in the cache when `keep_norm`.
    fn run(&self, input: &Tensor, keep_norm: bool) -> Result<(Tensor, MlpCache)> {
        let w = &self.weights;
        let (xn, norm) = match keep_norm {
            true => self.norm.forward(input)?,
            false => (self.norm.apply(input)?, None),
        };
        let packs = self.packs.as_ref();
        let up = times_plus(&xn, &w.w_in, packs.map(|p| &p.w_in), w.b_in.as_ref())?;
        let out_packed = packs.map(|p| &p.w_out);
        let (out, pre, up) = match &w.w_gate {
            None => {
                let post = ops::activation(&up, self.act, false)?;
                (times(&post, &w.w_out, out_packed)?, up, None)
            }
            Some(w_gate) => {
                let gate = times(&xn, w_gate, packs.map(|p| &p.w_gate))?;
                let hidden = ops::gated_activation(&gate, &up, self.act, false)?;
                (times(&hidden, &w.w_out, out_packed)?, gate, Some(up))
            }
        };
        let (out, post) = match &self.post_norm {
            Some(n) => n.forward(&out)?,
            None => (out, None),
        };
        Ok((
            out,
            MlpCache {
                norm,
                pre,
                up,
                post,
            },
        ))
    }

    /// The gradient of the MLP's input (its reader) from the gradient `g` of its output.
    pub fn backward(&self, cache: &MlpCache, g: &Tensor) -> Result<Tensor> {
        let w = &self.weights;
        let post;
        let g = match &self.post_norm {
            Some(n) => {
                post = n.backward(g, &cache.post)?;
                &post
            }
            None => g,
        };
        let packs = self.packs.as_ref();
        let d_hidden = times(g, &w.w_out.t()?, packs.map(|p| &p.w_out_t))?;
        let in_t = packs.map(|p| &p.w_in_t);
        let d_xn = match (&w.w_gate, &cache.up) {
            (Some(w_gate), Some(up)) => {
                let (d_gate, d_up) =
                    ops::gated_activation_backward(&d_hidden, &cache.pre, up, self.act, false)?;
                let from_gate = times(&d_gate, &w_gate.t()?, packs.map(|p| &p.w_gate_t))?;
                (times(&d_up, &w.w_in.t()?, in_t)? + from_gate)?
            }
            _ => {
                let d_pre = ops::activation_backward(&d_hidden, &cache.pre, self.act, false)?;
                times(&d_pre, &w.w_in.t()?, in_t)?
            }
        };
        self.norm.backward(&d_xn, &cache.norm)
    }
}

/// `w` (`[in, out]`) as the transposed view of its `[out, in]` contiguous data, copying only when
/// it is not stored so already. For the MLP's input projections (`[d, d_mlp]`) this is the layout
/// in which both products are fast: the forward's `x · W` reads `W` along `k = d` rows, and the
/// backward's `g · Wᵀ` is a plain row-major product. Row-major `[d, d_mlp]` made the backward
/// multiply by a column-major `[d_mlp, d]` with `k = d_mlp`, which gemm runs at ~120 GFLOP/s
/// against ~185 for the other layouts (2-core AVX-512 EPYC, measured).
///
/// Matrices kept in bf16 as stored (bf16 products, [`super::bf16::pack`] reads any layout) are
/// left as they are.
fn column_major(w: Tensor) -> Result<Tensor> {
    if w.dtype() == DType::BF16 {
        return Ok(w);
    }
    let wt = w.t()?;
    if wt.is_contiguous() {
        return Ok(w);
    }
    Ok(wt.contiguous()?.t()?)
}

/// One transformer layer.
#[derive(Debug, Clone)]
pub struct Block {
    pub attn: Attention,
    /// `None` for attention-only models.
    pub mlp: Option<Mlp>,
}

impl Block {
    /// Builds a layer from weights in eap's layout, checking them against `cfg`.
    pub fn new(
        cfg: &ModelConfig,
        attn: AttentionWeights,
        mlp: Option<MlpWeights>,
    ) -> Result<Block> {
        let (h, kv, d, dh) = (cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head);
        if kv == 0 || h % kv != 0 {
            return Err(Error::invalid(format!(
                "{h} query heads cannot be grouped over {kv} key/value heads"
            )));
        }
        let check = |what: &str, t: &Tensor, want: &[usize]| -> Result<()> {
            if t.dims() != want {
                return Err(Error::Shape {
                    op: "block weights",
                    expected: format!("{what} of shape {want:?}"),
                    found: format!("{:?}", t.dims()),
                });
            }
            Ok(())
        };
        check("W_Q", &attn.w_q, &[h, d, dh])?;
        check("W_K", &attn.w_k, &[kv, d, dh])?;
        check("W_V", &attn.w_v, &[kv, d, dh])?;
        check("W_O", &attn.w_o, &[h, dh, d])?;
        // The fused projection: each letter's [heads, d, dh] as the column blocks of [d,
        // heads·dh], side by side; biases in the same order, zeros for a letter without one.
        let w_qkv = match attn.fused_qkv {
            Some(w) => {
                check("the fused W_Q, W_K, W_V", &w, &[d, (h + 2 * kv) * dh])?;
                w.to_dtype(DType::F32)?
            }
            None => {
                let [w_q, w_k, w_v] = [attn.w_q, attn.w_k, attn.w_v]
                    .map(|w| w.to_dtype(DType::F32).and_then(|w| w.contiguous()));
                let (w_q, w_k, w_v) = (w_q?, w_k?, w_v?);
                match ops::fused_columns(&[&w_q, &w_k, &w_v])? {
                    Some(w) => w,
                    None => {
                        let columns = |w: &Tensor, heads: usize| -> Result<Tensor> {
                            let w = ops::swap_middle(w, (1, heads, d, dh))?;
                            Ok(w.reshape((d, heads * dh))?)
                        };
                        let parts = [columns(&w_q, h)?, columns(&w_k, kv)?, columns(&w_v, kv)?];
                        Tensor::cat(&parts, 1)?
                    }
                }
            }
        };
        let biases = [(attn.b_q, h), (attn.b_k, kv), (attn.b_v, kv)];
        let b_qkv = if biases.iter().any(|(b, _)| b.is_some()) {
            let parts = biases
                .into_iter()
                .map(|(b, heads)| match b {
                    Some(b) => Ok(b.to_dtype(DType::F32)?.reshape(heads * dh)?),
                    None => Ok(Tensor::zeros(heads * dh, DType::F32, w_qkv.device())?),
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&parts, 0)?)
        } else {
            None
        };
        let mlp = mlp.map(|m| Mlp::new(cfg, m)).transpose()?;
        if cfg.d_mlp.is_some() != mlp.is_some() {
            return Err(Error::invalid(
                "the configuration and the weights disagree on whether the model has MLPs",
            ));
        }
        Ok(Block {
            attn: Attention {
                norm: NormLayer::new(cfg, attn.norm),
                post_norm: attn.post_norm.map(|w| NormLayer::new(cfg, Some(w))),
                w_qkv,
                b_qkv,
                w_o_flat: attn.w_o.reshape((h * dh, d))?,
                w_o: attn.w_o.contiguous()?,
                b_o: attn.b_o,
                n_heads: h,
                n_kv_heads: kv,
                d_head: dh,
                scale: cfg.attn_scale,
                softcap: cfg.attn_softcap,
                packs: None,
            },
            mlp,
        })
    }

    /// Makes now the bf16 packings the forward (or, with `backward`, the backward) will use,
    /// which otherwise are made at first use: a streamed layer fetched ahead of its turn
    /// ([`super::Model::for_each_layer`]) arrives ready. Nothing for f32 products.
    pub(crate) fn prepare(&self, backward: bool) -> Result<()> {
        if let Some(p) = &self.attn.packs {
            let a = &self.attn;
            match backward {
                false => {
                    p.qkv.get(&a.w_qkv)?;
                    p.o.get(&a.w_o_flat)?;
                }
                true => {
                    p.qkv_t.get(&a.w_qkv.t()?)?;
                    p.o_t.get(&a.w_o_flat.t()?)?;
                }
            }
        }
        if let Some(mlp) = &self.mlp {
            if let Some(p) = &mlp.packs {
                let w = &mlp.weights;
                match backward {
                    false => {
                        p.w_in.get(&w.w_in)?;
                        p.w_out.get(&w.w_out)?;
                        if let Some(g) = &w.w_gate {
                            p.w_gate.get(g)?;
                        }
                    }
                    true => {
                        p.w_in_t.get(&w.w_in.t()?)?;
                        p.w_out_t.get(&w.w_out.t()?)?;
                        if let Some(g) = &w.w_gate {
                            p.w_gate_t.get(&g.t()?)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Which precision the layer's weight products take from now on. The bf16 packings are
    /// made on first use (the forward's and the backward's separately) and kept with the
    /// layer; `F32` drops them.
    pub fn set_products(&mut self, products: Products) {
        let bf16 = products == Products::Bf16;
        self.attn.packs = bf16.then(AttentionPacks::default);
        if let Some(mlp) = &mut self.mlp {
            mlp.packs = bf16.then(MlpPacks::default);
        }
    }

    /// Builds a layer from per-head TransformerLens-layout tensors (already f32 on one device):
    /// `W_Q`, `W_K`, `W_V` `[h, d, dh]`, `b_Q`, `b_K`, `b_V` `[h, dh]`, `W_O` `[h, dh, d]`, `b_O`;
    /// `mlp` with its input norm `ln2`.
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
        let attn = AttentionWeights {
            norm: ln1,
            w_q,
            w_k,
            w_v,
            b_q: Some(b_q),
            b_k: Some(b_k),
            b_v: Some(b_v),
            w_o,
            b_o: Some(b_o),
            post_norm: None,
            fused_qkv: None,
        };
        Block::new(cfg, attn, mlp.map(|m| MlpWeights { norm: ln2, ..m }))
    }
}
