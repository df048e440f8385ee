//! The forward pass with writer caches and reader interventions, and the activation-only
//! backward (DESIGN §2–3).
//!
//! Activations are `[N, d_model]` with `N = batch · positions` rows; attention works on
//! `[batch, heads, positions, d_head]`.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{DType, Device, Tensor, D};

use super::config::{Norm, Positions};
use super::ops::{self, NormCache};
use super::weights::{LayerWeights, NormWeights};
use super::Model;
use crate::graph::Graph;
use crate::{Error, Result};

/// A batch of equal-length token sequences.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, positions]`, u32.
    pub tokens: Tensor,
    pub batch: usize,
    pub seq_len: usize,
}

impl Batch {
    /// Builds a batch; every sequence must have the same length.
    pub fn new(sequences: &[Vec<u32>], device: &Device) -> Result<Batch> {
        let seq_len = sequences.first().map_or(0, Vec::len);
        if seq_len == 0 {
            return Err(Error::invalid("empty batch or empty prompt"));
        }
        if let Some((i, s)) = sequences
            .iter()
            .enumerate()
            .find(|(_, s)| s.len() != seq_len)
        {
            return Err(Error::Shape {
                op: "batch",
                expected: format!("{seq_len} tokens in every sequence"),
                found: format!("{} tokens in sequence {i}", s.len()),
            });
        }
        let flat: Vec<u32> = sequences.iter().flatten().copied().collect();
        Ok(Batch {
            tokens: Tensor::from_vec(flat, (sequences.len(), seq_len), device)?,
            batch: sequences.len(),
            seq_len,
        })
    }

    pub fn n_rows(&self) -> usize {
        self.batch * self.seq_len
    }
}

/// Changes the inputs of readers during a forward pass.
///
/// `deltas` is called once per group of readers that read the same residual stream (the q/k/v
/// readers of a layer, its MLP, the logits) with the writer outputs computed so far in this run
/// (`[N, d]` each, in writer order). It returns one optional `[N, d]` delta per reader of the
/// range; the reader's input becomes `residual + delta`.
pub trait ReaderIntervention {
    fn deltas(&self, readers: Range<usize>, writers: &[Tensor]) -> Result<Vec<Option<Tensor>>>;
}

/// Fixed additive deltas, keyed by reader index (finite differences, steering).
#[derive(Debug, Default, Clone)]
pub struct AdditiveDeltas(pub HashMap<usize, Tensor>);

impl ReaderIntervention for AdditiveDeltas {
    fn deltas(&self, readers: Range<usize>, _writers: &[Tensor]) -> Result<Vec<Option<Tensor>>> {
        Ok(readers.map(|r| self.0.get(&r).cloned()).collect())
    }
}

/// Exact edge patching: reader `v` receives `in_v + Σ_{u: patched[u,v]} (baseline_u − a_u)`,
/// where `a_u` is writer `u`'s output in this very run (DESIGN §3). Patched edges carry the
/// baseline (corrupted, zero or mean) activation; all others the current run's.
#[derive(Debug, Clone)]
pub struct PatchPlan {
    pub graph: Graph,
    /// Row-major `[n_writers, n_readers]`: true where the edge carries the baseline.
    pub patched: Vec<bool>,
    /// Baseline output of every writer, `[N, d]` each.
    pub baseline: Vec<Tensor>,
}

impl ReaderIntervention for PatchPlan {
    fn deltas(&self, readers: Range<usize>, writers: &[Tensor]) -> Result<Vec<Option<Tensor>>> {
        let nr = self.graph.n_readers();
        let mut cache: HashMap<usize, Tensor> = HashMap::new();
        let mut out = Vec::with_capacity(readers.len());
        for r in readers {
            let mut acc: Option<Tensor> = None;
            for (u, writer) in writers.iter().enumerate().take(self.graph.n_upstream(r)) {
                if !self.patched[u * nr + r] {
                    continue;
                }
                let d = match cache.get(&u) {
                    Some(d) => d.clone(),
                    None => {
                        let d = (&self.baseline[u] - writer)?;
                        cache.insert(u, d.clone());
                        d
                    }
                };
                acc = Some(match acc {
                    None => d,
                    Some(a) => (a + d)?,
                });
            }
            out.push(acc);
        }
        Ok(out)
    }
}

/// Receives every writer's output (`[N, d]`) as the forward computes it, in graph order — so a
/// caller can fold activations into its own buffer (EAP's `Δ`) instead of keeping them all.
pub trait WriterSink {
    fn write(&self, writer: usize, output: &Tensor) -> Result<()>;
}

/// What a forward pass should compute and keep.
#[derive(Default)]
pub struct ForwardOptions<'a> {
    /// Positions whose logits are computed (the same for every sequence). Empty: the last.
    pub logit_positions: Vec<usize>,
    /// Keep every writer's output (`input`, each head, each MLP).
    pub keep_writers: bool,
    /// Keep what [`Model::backward`] needs. Not allowed together with an intervention.
    pub keep_cache: bool,
    /// Replaces the embedding (`[N, d]`) — integrated gradients on the input.
    pub input_override: Option<Tensor>,
    pub intervention: Option<&'a dyn ReaderIntervention>,
    /// Called with each writer's output as soon as it exists.
    pub writer_sink: Option<&'a dyn WriterSink>,
    /// Keep the residual stream entering each layer and the final one (`n_layers + 1`
    /// tensors), from which later runs can start ([`Prefix`]).
    pub keep_residuals: bool,
    /// Start at a layer from a cached prefix instead of the embedding.
    pub start: Option<&'a Prefix>,
}

/// The state of a run at the start of `layer`: the residual stream and every writer output
/// computed before it. A run whose interventions touch no reader below `layer` can resume from
/// an unpatched run's prefix and skip the layers before (ACDC, exact per-edge patching).
#[derive(Debug, Clone)]
pub struct Prefix {
    pub layer: usize,
    /// `[N, d]`.
    pub x: Tensor,
    /// The writers before `layer` in graph order, `[N, d]` each.
    pub writers: Vec<Tensor>,
}

/// What a forward pass returns.
pub struct ForwardOutput {
    /// `[batch, n_positions, d_vocab_out]`.
    pub logits: Tensor,
    /// Writer outputs in graph order, `[N, d]` each (empty unless `keep_writers`).
    pub writers: Vec<Tensor>,
    pub cache: Option<ForwardCache>,
    /// The residual stream entering each layer, then the final one (with `keep_residuals`).
    pub residuals: Vec<Tensor>,
}

struct LayerCache {
    ln1: Option<NormCache>,
    /// `[batch, heads, positions, d_head]`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Tensor,
    ln2: Option<NormCache>,
    pre: Option<Tensor>,
}

/// Activations the backward needs, from an unpatched forward.
pub struct ForwardCache {
    layers: Vec<LayerCache>,
    ln_final: Option<NormCache>,
    /// Row indices (into `N`) whose logits were computed.
    logit_rows: Tensor,
    batch: usize,
    seq_len: usize,
}

/// Gradients of the metric with respect to the inputs of a contiguous range of readers.
pub struct ReaderGrads {
    /// Reader indices covered, in graph order.
    pub readers: Range<usize>,
    /// `[readers.len(), N, d]`.
    pub grads: Tensor,
}

fn norm_parts(ln: &Option<NormWeights>) -> (Option<&Tensor>, Option<&Tensor>) {
    match ln {
        Some(n) => (Some(&n.w), Some(&n.b)),
        None => (None, None),
    }
}

impl Model {
    pub(crate) fn apply_norm(
        &self,
        x: &Tensor,
        ln: &Option<NormWeights>,
    ) -> Result<(Tensor, Option<NormCache>)> {
        match self.cfg.norm {
            Norm::None => Ok((x.clone(), None)),
            Norm::LayerNorm | Norm::LayerNormPre => {
                let (w, b) = norm_parts(ln);
                let (y, c) = ops::layer_norm(x, w, b, self.cfg.eps, false)?;
                Ok((y, Some(c)))
            }
        }
    }

    fn norm_backward(
        &self,
        g: &Tensor,
        cache: &Option<NormCache>,
        ln: &Option<NormWeights>,
    ) -> Result<Tensor> {
        match cache {
            None => Ok(g.clone()),
            Some(c) => ops::layer_norm_backward(g, c, ln.as_ref().map(|n| &n.w), false),
        }
    }

    /// Final norm and unembedding of residual-stream rows `[R, d]`: logits `[R, d_vocab_out]`
    /// and the norm's statistics for the backward.
    pub(crate) fn unembed(&self, x: &Tensor) -> Result<(Tensor, Option<NormCache>)> {
        let (xn, ln_final) = self.apply_norm(x, &self.embed.ln_final)?;
        let mut logits = xn.matmul(&self.embed.w_u)?;
        if let Some(bu) = &self.embed.b_u {
            logits = logits.broadcast_add(bu)?;
        }
        Ok((logits, ln_final))
    }

    /// Checks token ids and length against the model.
    fn check_batch(&self, batch: &Batch) -> Result<()> {
        if batch.seq_len > self.cfg.n_ctx {
            return Err(Error::Shape {
                op: "forward",
                expected: format!("at most n_ctx = {} positions", self.cfg.n_ctx),
                found: format!("{} positions", batch.seq_len),
            });
        }
        let max = batch.tokens.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if max >= self.cfg.d_vocab {
            return Err(Error::Shape {
                op: "forward",
                expected: format!("token ids below d_vocab = {}", self.cfg.d_vocab),
                found: format!("token id {max}"),
            });
        }
        Ok(())
    }

    /// Token (and, for standard positions, positional) embedding: the `input` writer, `[N, d]`.
    pub fn embed(&self, batch: &Batch) -> Result<Tensor> {
        let tok = self.embed.w_e.embedding(&batch.tokens.flatten_all()?)?;
        match self.cfg.positions {
            Positions::Standard => Ok(tok.add(&self.positions(batch)?)?),
            Positions::Shortformer => Ok(tok),
        }
    }

    /// `W_pos[0..P]` repeated for each sequence, `[N, d]`.
    pub(crate) fn positions(&self, batch: &Batch) -> Result<Tensor> {
        let pos = self.embed.w_pos.narrow(0, 0, batch.seq_len)?;
        Ok(pos
            .unsqueeze(0)?
            .broadcast_as((batch.batch, batch.seq_len, self.cfg.d_model))?
            .reshape((batch.n_rows(), self.cfg.d_model))?)
    }

    /// Runs the model on one batch (DESIGN §3).
    pub fn forward(&self, batch: &Batch, opts: &ForwardOptions) -> Result<ForwardOutput> {
        self.check_batch(batch)?;
        if opts.keep_cache && opts.intervention.is_some() {
            return Err(Error::invalid(
                "the backward needs an unpatched forward: keep_cache with an intervention",
            ));
        }
        let cfg = &self.cfg;
        let graph = self.graph();
        let (b, p, d, h, dh) = (
            batch.batch,
            batch.seq_len,
            cfg.d_model,
            cfg.n_heads,
            cfg.d_head,
        );
        let n = b * p;
        let (mut x, mut writers, first_layer) = match opts.start {
            Some(prefix) => {
                if prefix.layer > cfg.n_layers
                    || prefix.writers.len()
                        != graph.n_upstream(prefix.layer * graph.readers_per_layer())
                {
                    return Err(Error::invalid(format!(
                        "forward prefix for layer {} holds {} writer outputs",
                        prefix.layer,
                        prefix.writers.len()
                    )));
                }
                if opts.keep_cache || opts.input_override.is_some() {
                    return Err(Error::invalid("a forward that starts from a cached prefix keeps no backward cache and takes no input override"));
                }
                (prefix.x.clone(), prefix.writers.clone(), prefix.layer)
            }
            None => {
                let x = match &opts.input_override {
                    Some(t) => {
                        if t.dims() != [n, d] {
                            return Err(Error::Shape {
                                op: "forward input override",
                                expected: format!("[{n}, {d}]"),
                                found: format!("{:?}", t.dims()),
                            });
                        }
                        t.clone()
                    }
                    None => self.embed(batch)?,
                };
                (x.clone(), vec![x], 0)
            }
        };
        let track_writers = opts.keep_writers || opts.intervention.is_some();
        if !track_writers {
            writers.clear();
        }
        let mut residuals = Vec::new();
        let mut next_writer = 0usize;
        let mut sink = |t: &Tensor| -> Result<()> {
            if let Some(s) = opts.writer_sink {
                s.write(next_writer, t)?;
            }
            next_writer += 1;
            Ok(())
        };
        if first_layer == 0 {
            sink(&x)?;
        }
        let shortformer_pos = match cfg.positions {
            Positions::Shortformer => Some(self.positions(batch)?),
            Positions::Standard => None,
        };
        let mask = ops::attention_mask(p, cfg.causal, &self.device)?;
        let mut layer_caches = Vec::new();
        for l in first_layer..cfg.n_layers {
            if opts.keep_residuals {
                residuals.push(x.clone());
            }
            let lw = self.layer(l)?;
            let first_reader = l * graph.readers_per_layer();
            let deltas = match opts.intervention {
                Some(iv) => iv.deltas(first_reader..first_reader + 3 * h, &writers)?,
                None => vec![None; 3 * h],
            };
            let (xn, ln1) = self.apply_norm(&x, &lw.ln1)?;
            let project = |letter: usize, w_heads: &Tensor, bias: &Tensor| -> Result<Tensor> {
                let ds = &deltas[letter * h..(letter + 1) * h];
                let with_pos = letter < 2 && shortformer_pos.is_some();
                if ds.iter().all(Option::is_none) {
                    let mut inp = xn.clone();
                    if with_pos {
                        inp = (inp + shortformer_pos.as_ref().unwrap())?;
                    }
                    // All heads in one GEMM: [d, h·dh] built from the per-head layout (a
                    // 2.4 MB copy on GPT-2, cheaper than keeping both layouts resident).
                    let w = w_heads.permute((1, 0, 2))?.reshape((d, h * dh))?;
                    let y = inp.matmul(&w)?.broadcast_add(bias)?;
                    return Ok(y.reshape((b, p, h, dh))?.transpose(1, 2)?.contiguous()?);
                }
                // Each head reads its own residual stream: normalise and project per head.
                let per_head = ds
                    .iter()
                    .map(|delta| match delta {
                        Some(delta) => Ok((&x + delta)?),
                        None => Ok(x.clone()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let inp = Tensor::stack(&per_head, 0)?; // [h, n, d]
                let (mut inp, _) = self.apply_norm(&inp.reshape((h * n, d))?, &lw.ln1)?;
                if with_pos {
                    inp = inp
                        .reshape((h, n, d))?
                        .broadcast_add(shortformer_pos.as_ref().unwrap())?;
                }
                let y = inp.reshape((h, n, d))?.matmul(w_heads)?; // [h, n, dh]
                let y = y.broadcast_add(&bias.reshape((h, 1, dh))?)?;
                Ok(y.reshape((h, b, p, dh))?.transpose(0, 1)?.contiguous()?)
            };
            let q = project(0, &lw.wq_heads, &lw.bq)?;
            let k = project(1, &lw.wk_heads, &lw.bk)?;
            let v = project(2, &lw.wv_heads, &lw.bv)?;
            let scores =
                (q.matmul(&k.t()?)? * (1.0 / cfg.attn_scale as f64))?.broadcast_add(&mask)?;
            let pattern = candle_nn::ops::softmax_last_dim(&scores)?;
            let z = pattern.matmul(&v)?; // [b, h, p, dh]
            let z_heads = z.transpose(0, 1)?.contiguous()?.reshape((h, n, dh))?;
            let head_out = z_heads.matmul(&lw.wo_heads)?; // [h, n, d]
            let attn_out = ops::sum_leading(&head_out)?.broadcast_add(&lw.bo)?;
            for hh in 0..h {
                let out = head_out.get(hh)?;
                sink(&out)?;
                if track_writers {
                    writers.push(out);
                }
            }
            let x_mid = (&x + attn_out)?;
            let (ln2, pre, x_next) = match &lw.mlp {
                None => (None, None, x_mid),
                Some(mlp) => {
                    let mlp_reader = first_reader + 3 * h;
                    let delta = match opts.intervention {
                        Some(iv) => iv
                            .deltas(mlp_reader..mlp_reader + 1, &writers)?
                            .pop()
                            .flatten(),
                        None => None,
                    };
                    let inp = match &delta {
                        Some(dlt) => (&x_mid + dlt)?,
                        None => x_mid.clone(),
                    };
                    let (xn2, ln2) = self.apply_norm(&inp, &lw.ln2)?;
                    let pre = xn2.matmul(&mlp.w_in)?.broadcast_add(&mlp.b_in)?;
                    let post = ops::activation(&pre, cfg.act, false)?;
                    let out = post.matmul(&mlp.w_out)?;
                    let x_next = (&x_mid + &out)?.broadcast_add(&mlp.b_out)?;
                    sink(&out)?;
                    if track_writers {
                        writers.push(out);
                    }
                    (ln2, Some(pre), x_next)
                }
            };
            if opts.keep_cache {
                layer_caches.push(LayerCache {
                    ln1,
                    q,
                    k,
                    v,
                    pattern,
                    ln2,
                    pre,
                });
            }
            x = x_next;
        }
        if opts.keep_residuals {
            residuals.push(x.clone());
        }
        if let Some(iv) = opts.intervention {
            let logits_reader = graph.n_readers() - 1;
            if let Some(delta) = iv
                .deltas(logits_reader..logits_reader + 1, &writers)?
                .pop()
                .flatten()
            {
                x = (x + delta)?;
            }
        }
        // Unembed only the rows the metric reads.
        let positions = if opts.logit_positions.is_empty() {
            vec![p - 1]
        } else {
            opts.logit_positions.clone()
        };
        if let Some(&bad) = positions.iter().find(|&&q| q >= p) {
            return Err(Error::Shape {
                op: "forward logit positions",
                expected: format!("positions below {p}"),
                found: format!("position {bad}"),
            });
        }
        let rows: Vec<u32> = (0..b)
            .flat_map(|bi| positions.iter().map(move |&q| (bi * p + q) as u32))
            .collect();
        let logit_rows = Tensor::from_vec(rows, b * positions.len(), &self.device)?;
        let xf = x.index_select(&logit_rows, 0)?;
        let (logits, ln_final) = self.unembed(&xf)?;
        let logits = logits.reshape((b, positions.len(), cfg.d_vocab_out))?;
        let cache = opts.keep_cache.then(|| ForwardCache {
            layers: layer_caches,
            ln_final,
            logit_rows,
            batch: b,
            seq_len: p,
        });
        if !opts.keep_writers {
            writers.clear();
        }
        Ok(ForwardOutput {
            residuals,
            logits,
            writers,
            cache,
        })
    }

    /// The activation-only backward: given `dM/dlogits` (`[batch, n_positions, d_vocab_out]`,
    /// the positions of the forward), hands `visit` the gradient of `M` with respect to every
    /// reader's input — first `logits`, then each layer's q/k/v (and MLP) readers from the last
    /// layer down. Each reader's gradient is the derivative with respect to that reader's input
    /// alone, as if it were a separate copy of the residual stream. No weight gradients.
    pub fn backward(
        &self,
        cache: &ForwardCache,
        dlogits: &Tensor,
        visit: &mut dyn FnMut(ReaderGrads) -> Result<()>,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let graph = self.graph();
        let (b, p, d, h, dh) = (
            cache.batch,
            cache.seq_len,
            cfg.d_model,
            cfg.n_heads,
            cfg.d_head,
        );
        let n = b * p;
        let n_pos = cache.logit_rows.elem_count() / b;
        if dlogits.dims() != [b, n_pos, cfg.d_vocab_out] {
            return Err(Error::Shape {
                op: "backward",
                expected: format!("dlogits of shape [{b}, {n_pos}, {}]", cfg.d_vocab_out),
                found: format!("{:?}", dlogits.dims()),
            });
        }
        let dxf = ops::matmul_nt(
            &dlogits
                .reshape((b * n_pos, cfg.d_vocab_out))?
                .contiguous()?,
            &self.embed.w_u.contiguous()?,
        )?;
        let dxf = self.norm_backward(&dxf, &cache.ln_final, &self.embed.ln_final)?;
        let mut g = Tensor::zeros((n, d), DType::F32, &self.device)?.index_add(
            &cache.logit_rows,
            &dxf,
            0,
        )?;
        let logits_reader = graph.n_readers() - 1;
        visit(ReaderGrads {
            readers: logits_reader..logits_reader + 1,
            grads: g.unsqueeze(0)?,
        })?;
        for l in (0..cfg.n_layers).rev() {
            let lw: std::sync::Arc<LayerWeights> = self.layer(l)?;
            let lc = &cache.layers[l];
            let first_reader = l * graph.readers_per_layer();
            let mut mlp_grad = None;
            if let (Some(mlp), Some(pre)) = (&lw.mlp, &lc.pre) {
                let d_post = g.matmul(&mlp.w_out.t()?)?;
                let d_pre = ops::activation_backward(&d_post, pre, cfg.act, false)?;
                let d_xn2 = d_pre.matmul(&mlp.w_in.t()?)?;
                let gm = self.norm_backward(&d_xn2, &lc.ln2, &lw.ln2)?;
                g = (&g + &gm)?;
                mlp_grad = Some(gm);
            }
            // Attention: the residual gradient reaches every head's output unchanged.
            let dz = g
                .matmul(&lw.wo.t()?)?
                .reshape((b, p, h, dh))?
                .transpose(1, 2)?
                .contiguous()?;
            let d_pattern = dz.matmul(&lc.v.t()?)?;
            let dv = lc.pattern.t()?.matmul(&dz)?;
            // Softmax backward: dS = P ⊙ (dP − Σ_j dP ⊙ P); masked entries have P = 0.
            let inner = (&d_pattern * &lc.pattern)?.sum_keepdim(D::Minus1)?;
            let d_scores = ((lc.pattern.clone() * d_pattern.broadcast_sub(&inner)?)?
                * (1.0 / cfg.attn_scale as f64))?;
            let dq = d_scores.matmul(&lc.k)?;
            let dk = d_scores.t()?.matmul(&lc.q)?;
            let to_heads = |t: Tensor| -> Result<Tensor> {
                Ok(t.transpose(0, 1)?.contiguous()?.reshape((h, n, dh))?)
            };
            let (dq, dk, dv) = (to_heads(dq)?, to_heads(dk)?, to_heads(dv)?);
            let mlp_count = mlp_grad.is_some() as usize;
            let ws = [&lw.wq_heads, &lw.wk_heads, &lw.wv_heads];
            // The layer's reader gradients in graph order, [3h (+1), n, d]: q, k, v of every
            // head through LN1's backward, then the MLP's gradient appended.
            let norm = lc.ln1.as_ref().map(|c| (c, lw.ln1.as_ref().map(|n| &n.w)));
            let fused = ops::qkv_input_grads([&dq, &dk, &dv], ws, norm, mlp_grad.as_ref())?;
            let grads = match fused {
                Some(g) => g,
                None => {
                    // Any device: per-letter batched products, then LN1's backward.
                    let dxs = [
                        dq.matmul(&ws[0].t()?)?,
                        dk.matmul(&ws[1].t()?)?,
                        dv.matmul(&ws[2].t()?)?,
                    ];
                    match &lc.ln1 {
                        Some(c) => ops::layer_norm_backward_many(
                            &dxs,
                            c,
                            lw.ln1.as_ref().map(|n| &n.w),
                            mlp_grad.as_ref(),
                        )?,
                        None => {
                            let mut parts = dxs.to_vec();
                            if let Some(gm) = &mlp_grad {
                                parts.push(gm.unsqueeze(0)?);
                            }
                            Tensor::cat(&parts, 0)?
                        }
                    }
                }
            };
            let g_qkv_sum = ops::sum_leading(&grads.narrow(0, 0, 3 * h)?)?;
            visit(ReaderGrads {
                readers: first_reader..first_reader + 3 * h + mlp_count,
                grads,
            })?;
            g = (g + g_qkv_sum)?;
        }
        Ok(())
    }

    /// Gradient of the metric with respect to every reader input, `[N, d]` each, in graph order.
    /// Convenient for tests and small models; EAP consumes [`Model::backward`] layer by layer.
    pub fn reader_gradients(&self, cache: &ForwardCache, dlogits: &Tensor) -> Result<Vec<Tensor>> {
        let mut out: Vec<Option<Tensor>> = vec![None; self.graph().n_readers()];
        self.backward(cache, dlogits, &mut |rg| {
            for (i, r) in rg.readers.clone().enumerate() {
                out[r] = Some(rg.grads.get(i)?);
            }
            Ok(())
        })?;
        Ok(out
            .into_iter()
            .map(|g| g.expect("backward visits every reader"))
            .collect())
    }
}
