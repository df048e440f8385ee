//! The drivers over the blocks: the forward pass with writer caches and reader interventions, and
//! the activation-only backward (DESIGN §2–3). Every head and MLP is computed by the block types
//! of `block.rs`; this file decides which residual stream each reader reads and what is kept.
//!
//! Activations are `[N, d_model]` with `N = batch · positions` rows; attention works on
//! `[batch, heads, positions, d_head]`.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use super::block::{Attention, AttentionCache, Block, MlpCache, RowPositions};
use super::config::Positions;
use super::ops::{self, NormCache};
use super::Model;
use crate::graph::{Graph, Qkv, Writer};
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

    /// Offered a layer's mixed values `z` (`[N, heads · d_head]`) and its attention (`W_O`,
    /// [`Attention::head_outputs_into`]) before its heads' outputs (writers `first_writer..
    /// first_writer + heads`) exist: `true` when the sink takes what it needs of them from these
    /// and will not be sent them, so the forward adds the attention output in one GEMM without
    /// computing each head's. By default it takes nothing.
    fn take_heads(&self, first_writer: usize, z: &Tensor, attn: &Attention) -> Result<bool> {
        let _ = (first_writer, z, attn);
        Ok(false)
    }
}

/// What a forward pass should compute and keep.
#[derive(Default)]
pub struct ForwardOptions<'a> {
    /// Positions whose logits are computed (the same for every sequence). Empty: the last.
    pub logit_positions: Vec<usize>,
    /// Vocabulary ids whose logits are computed, in this order (the same for every row); `None`:
    /// the whole vocabulary. A metric that reads a few logits (logit difference) then costs a
    /// few dot products instead of a `[d_model, d_vocab]` product in each pass.
    pub logit_columns: Option<Vec<u32>>,
    /// Keep every writer's output (`input`, each head, each MLP).
    pub keep_writers: bool,
    /// Keep what [`Model::backward`] needs. Not allowed together with an intervention.
    pub keep_cache: bool,
    /// Replaces the embedding (`[N, d]`) — integrated gradients on the input.
    pub input_override: Option<Tensor>,
    /// Replaces one layer's sublayer output by constants (EAP-IG-activations): the backward
    /// then sends no gradient into that sublayer's readers, as if the values were set by a hook.
    pub sublayer_override: Option<SublayerOverride>,
    pub intervention: Option<&'a dyn ReaderIntervention>,
    /// Called with each writer's output as soon as it exists.
    pub writer_sink: Option<&'a dyn WriterSink>,
    /// Keep the residual stream entering each layer and the final one (`n_layers + 1`
    /// tensors), from which later runs can start ([`Prefix`]).
    pub keep_residuals: bool,
    /// Start at a layer from a cached prefix instead of the embedding.
    pub start: Option<&'a Prefix>,
}

/// A sublayer whose output a forward replaces by constants.
#[derive(Debug, Clone)]
pub enum SublayerOverride {
    /// Layer `layer`'s heads: one `[N, d]` output per head (before `b_O` and any output norm).
    Attention { layer: usize, heads: Vec<Tensor> },
    /// Layer `layer`'s MLP output `[N, d]` (without `b_out`; after its output norm, if any).
    Mlp { layer: usize, output: Tensor },
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
    attn: AttentionCache,
    mlp: Option<MlpCache>,
    /// The attention output was replaced by constants: no gradient reaches its readers.
    attn_frozen: bool,
    /// The same for the MLP.
    mlp_frozen: bool,
    /// The rows the MLP was run on, when not all (the last layer's, at the metric's rows).
    mlp_rows: Option<Tensor>,
}

/// What the unembedding's backward needs: the final norm's statistics and, with a final
/// soft-cap, its `tanh`.
pub(crate) struct UnembedCache {
    norm: Option<NormCache>,
    tanh: Option<Tensor>,
    /// The unembedding rows `[n_columns, d]` of a forward restricted to some columns.
    columns: Option<Tensor>,
}

/// The blocks of vocabulary rows a mapped unembedding converts at a time: 2,048 rows (32 MB of
/// f32 at Llama-3.1-8B's d_model) keeps the converted block small beside the model.
fn vocab_blocks(d_vocab: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    const BLOCK: usize = 2048;
    (0..d_vocab)
        .step_by(BLOCK)
        .map(move |s| s..(s + BLOCK).min(d_vocab))
}

/// Activations the backward needs, from an unpatched forward.
pub struct ForwardCache {
    layers: Vec<LayerCache>,
    unembed: UnembedCache,
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

impl Model {
    /// Final norm and unembedding of residual-stream rows `[R, d]` (and the final soft-cap):
    /// logits `[R, d_vocab_out]`, or `[R, columns.len()]` for the vocabulary ids `columns`, and
    /// what the backward needs.
    pub(crate) fn unembed(
        &self,
        x: &Tensor,
        columns: Option<&[u32]>,
    ) -> Result<(Tensor, UnembedCache)> {
        let (xn, norm) = self.final_norm.forward(x)?;
        let rows = columns.map(|c| self.unembed_rows(c)).transpose()?;
        let mut logits = match (&rows, self.mapped_vocab()) {
            (Some(rows), _) => xn.matmul(&rows.t()?)?,
            // A tied (or transposed-stored) unembedding: its rows are the vocabulary's.
            (None, None) if self.embed.w_u.t()?.is_contiguous() => {
                ops::matmul_nt_wide(&xn.contiguous()?, &self.embed.w_u.t()?)?
            }
            (None, None) => xn.matmul(&self.embed.w_u)?,
            (None, Some(loader)) => {
                // Blocks of vocabulary rows [len, d], converted one at a time: x · rowsᵀ.
                let xn = xn.contiguous()?;
                let blocks = vocab_blocks(self.cfg.d_vocab_out)
                    .map(|r| -> Result<Tensor> {
                        let rows = loader.vocab_rows(true, &mut r.clone())?;
                        Ok(xn.matmul(&rows.t()?)?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&blocks, 1)?
            }
        };
        if let Some(bu) = &self.embed.b_u {
            let bu = match columns {
                Some(c) => bu.index_select(&Tensor::new(c, &self.device)?, 0)?,
                None => bu.clone(),
            };
            logits = ops::add_bias(&logits, &bu)?;
        }
        let tanh = match self.cfg.final_softcap {
            Some(cap) => {
                let (capped, t) = ops::softcap(&logits, cap)?;
                logits = capped;
                Some(t)
            }
            None => None,
        };
        Ok((
            logits,
            UnembedCache {
                norm,
                tanh,
                columns: rows,
            },
        ))
    }

    /// The unembedding's rows (one `[d]` vector per vocabulary id) for `ids`: `[ids.len(), d]`.
    fn unembed_rows(&self, ids: &[u32]) -> Result<Tensor> {
        let v = self.cfg.d_vocab_out;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v) {
            return Err(Error::invalid(format!(
                "logit column {bad} outside the vocabulary of {v} tokens"
            )));
        }
        if let Some(loader) = self.mapped_vocab() {
            return loader.vocab_rows(true, &mut ids.iter().map(|&i| i as usize));
        }
        let idx = Tensor::new(ids, &self.device)?;
        // `w_u` is `[d, V]`: a transposed view of a tied embedding, or stored so.
        let w = &self.embed.w_u;
        Ok(match w.t()?.is_contiguous() {
            true => w.t()?.index_select(&idx, 0)?,
            false => w.index_select(&idx, 1)?.t()?.contiguous()?,
        })
    }

    /// Each row's position within its sequence for `batch` sequences of `seq_len` tokens.
    pub fn batch_positions(batch: usize, seq_len: usize) -> Vec<usize> {
        (0..batch * seq_len).map(|r| r % seq_len).collect()
    }

    /// What the attention of rows at `positions` needs to know of where they are: shortformer
    /// embeddings for the query and key inputs, or rotary angles (DESIGN §4).
    pub fn row_positions(&self, positions: &[usize]) -> Result<RowPositions> {
        match self.cfg.positions {
            Positions::Standard => Ok(RowPositions::default()),
            Positions::Shortformer => {
                let w_pos = self.embed.w_pos.as_ref().ok_or_else(|| {
                    Error::invalid("a shortformer model needs positional embeddings")
                })?;
                let idx: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
                let idx = Tensor::from_vec(idx, positions.len(), &self.device)?;
                Ok(RowPositions {
                    added: Some(w_pos.index_select(&idx, 0)?),
                    rotary: None,
                })
            }
            Positions::Rotary(r) => Ok(RowPositions {
                added: None,
                rotary: Some(ops::RotaryRows::new(&r.inv_freq(), positions)),
            }),
        }
    }

    /// The additive attention mask of layer `layer` for `p` positions: causal (unless the model
    /// is bidirectional) and, on sliding layers, limited to the window.
    pub fn attention_mask(&self, layer: usize, p: usize) -> Result<Tensor> {
        let window = self
            .cfg
            .sliding_window
            .as_ref()
            .filter(|s| s.layers.get(layer).copied().unwrap_or(false))
            .map(|s| s.window);
        ops::attention_mask(p, self.cfg.causal, window, &self.device)
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
        let mut tok = match self.mapped_vocab() {
            None => self.embed.w_e.embedding(&batch.tokens.flatten_all()?)?,
            Some(loader) => {
                let ids = batch.tokens.flatten_all()?.to_vec1::<u32>()?;
                loader.vocab_rows(false, &mut ids.iter().map(|&t| t as usize))?
            }
        };
        if self.cfg.embed_scale != 1.0 {
            tok = (tok * self.cfg.embed_scale as f64)?;
        }
        match (self.cfg.positions, &self.embed.w_pos) {
            (Positions::Standard, Some(w_pos)) => {
                let pos = w_pos.narrow(0, 0, batch.seq_len)?;
                let pos = pos
                    .unsqueeze(0)?
                    .broadcast_as((batch.batch, batch.seq_len, self.cfg.d_model))?
                    .reshape((batch.n_rows(), self.cfg.d_model))?;
                Ok(tok.add(&pos)?)
            }
            (Positions::Standard, None) => Err(Error::invalid(
                "a model with learned positions has no positional embedding",
            )),
            (Positions::Shortformer | Positions::Rotary(_), _) => Ok(tok),
        }
    }

    /// Runs the model on one batch (DESIGN §3).
    pub fn forward(&self, batch: &Batch, opts: &ForwardOptions) -> Result<ForwardOutput> {
        let mut pass = Pass::new(self, batch, opts)?;
        let first = pass.first_layer;
        self.for_each_layer(first..self.cfg.n_layers, false, |l, block| {
            pass.layer(l, block)
        })?;
        pass.finish()
    }

    /// Two forwards stepped through the layers together, each layer fetched once for both: a
    /// streamed model converts its weights once for the two runs instead of twice. At each
    /// layer the first run's writer outputs reach its sink before the second run's, so a sink
    /// shared by both (EAP's Δ of a corrupted and a clean run) holds one layer of the first
    /// run's outputs at a time.
    pub fn forward_pair(
        &self,
        first: (&Batch, &ForwardOptions),
        second: (&Batch, &ForwardOptions),
    ) -> Result<(ForwardOutput, ForwardOutput)> {
        let mut a = Pass::new(self, first.0, first.1)?;
        let mut b = Pass::new(self, second.0, second.1)?;
        let first = a.first_layer.min(b.first_layer);
        self.for_each_layer(first..self.cfg.n_layers, false, |l, block| {
            for pass in [&mut a, &mut b] {
                if l >= pass.first_layer {
                    pass.layer(l, block)?;
                }
            }
            Ok(())
        })?;
        Ok((a.finish()?, b.finish()?))
    }

    /// The activation-only backward: given `dM/dlogits` (`[batch, n_positions, width]`, the
    /// positions and vocabulary columns of the forward), hands `visit` the gradient of `M` with
    /// respect to every reader's input — first `logits`, then from the last layer down each
    /// layer's queries, keys, values (one visit per letter) and MLP. Each reader's gradient is
    /// the derivative with respect to that reader's input alone, as if it were a separate copy
    /// of the residual stream. No weight gradients.
    pub fn backward(
        &self,
        cache: &ForwardCache,
        dlogits: &Tensor,
        visit: &mut dyn FnMut(ReaderGrads) -> Result<()>,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let graph = self.graph();
        let (b, p, d, h) = (cache.batch, cache.seq_len, cfg.d_model, cfg.n_heads);
        let n = b * p;
        let n_pos = cache.logit_rows.elem_count() / b;
        let width = match &cache.unembed.columns {
            Some(rows) => rows.dim(0)?,
            None => cfg.d_vocab_out,
        };
        if dlogits.dims() != [b, n_pos, width] {
            return Err(Error::Shape {
                op: "backward",
                expected: format!("dlogits of shape [{b}, {n_pos}, {width}]"),
                found: format!("{:?}", dlogits.dims()),
            });
        }
        let mut dlogits = dlogits.reshape((b * n_pos, width))?.contiguous()?;
        if let Some(t) = &cache.unembed.tanh {
            dlogits = ops::softcap_backward(&dlogits, t)?;
        }
        let dxf = match (&cache.unembed.columns, self.mapped_vocab()) {
            (Some(rows), _) => dlogits.matmul(rows)?,
            // A tied unembedding is the embedding's transposed view: dlogits · W_E directly.
            (None, None) if self.embed.w_u.t()?.is_contiguous() => {
                dlogits.matmul(&self.embed.w_u.t()?)?
            }
            (None, None) => ops::matmul_nt(&dlogits, &self.embed.w_u.contiguous()?)?,
            (None, Some(loader)) => {
                let mut dxf: Option<Tensor> = None;
                for r in vocab_blocks(cfg.d_vocab_out) {
                    let rows = loader.vocab_rows(true, &mut r.clone())?;
                    let part = dlogits.narrow(1, r.start, r.len())?.matmul(&rows)?;
                    dxf = Some(match dxf {
                        None => part,
                        Some(acc) => (acc + part)?,
                    });
                }
                dxf.ok_or_else(|| Error::invalid("a model with an empty vocabulary"))?
            }
        };
        let dxf = self.final_norm.backward(&dxf, &cache.unembed.norm)?;
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
        self.for_each_layer((0..cfg.n_layers).rev(), true, |l, block| {
            let lc = &cache.layers[l];
            let first_reader = l * graph.readers_per_layer();
            // Sequential blocks: attention's output reaches the MLP too, so the gradient at
            // attention's output adds the MLP reader's. Parallel blocks: both read the stream
            // entering the layer, and both see the gradient leaving it.
            let (mlp_grad, g_attn) = match (&block.mlp, &lc.mlp) {
                (Some(_), Some(_)) if lc.mlp_frozen => (Some(g.zeros_like()?), g.clone()),
                (Some(mlp), Some(mc)) => {
                    // An MLP run on some rows only (the last layer's): the gradient reaching
                    // it is zero elsewhere, and so is that of its input.
                    let gm = match &lc.mlp_rows {
                        Some(r) => {
                            let part = mlp.backward(mc, &g.index_select(r, 0)?)?;
                            g.zeros_like()?.index_add(r, &part.contiguous()?, 0)?
                        }
                        None => mlp.backward(mc, &g)?,
                    };
                    if cfg.parallel_attn_mlp {
                        let g_attn = g.clone();
                        g = (&g + &gm)?;
                        (Some(gm), g_attn)
                    } else {
                        g = (&g + &gm)?;
                        (Some(gm), g.clone())
                    }
                }
                _ => (None, g.clone()),
            };
            // The layer's reader gradients in graph order: q, k and v of every head, one
            // `[h, n, d]` tensor per letter, then the MLP's.
            let (letters, g_qkv_sum) = if lc.attn_frozen {
                let zeros = Tensor::zeros((h, n, d), DType::F32, &self.device)?;
                let sum = Tensor::zeros((n, d), DType::F32, &self.device)?;
                ([zeros.clone(), zeros.clone(), zeros], sum)
            } else {
                block.attn.backward(&lc.attn, &g_attn)?
            };
            for (i, grads) in letters.into_iter().enumerate() {
                let start = first_reader + i * h;
                visit(ReaderGrads {
                    readers: start..start + h,
                    grads,
                })?;
            }
            if let Some(gm) = mlp_grad {
                let mlp_reader = first_reader + 3 * h;
                visit(ReaderGrads {
                    readers: mlp_reader..mlp_reader + 1,
                    grads: gm.unsqueeze(0)?,
                })?;
            }
            g = (&g + g_qkv_sum)?;
            Ok(())
        })
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

/// One forward's state between layers: [`Model::forward`] steps it through every layer,
/// [`Model::forward_pair`] steps two of them through each layer it fetches once.
struct Pass<'a, 'o> {
    model: &'a Model,
    opts: &'a ForwardOptions<'o>,
    b: usize,
    p: usize,
    /// The residual stream `[N, d]` entering the next layer.
    x: Tensor,
    writers: Vec<Tensor>,
    residuals: Vec<Tensor>,
    track_writers: bool,
    first_layer: usize,
    logit_positions: Vec<usize>,
    logit_rows: Tensor,
    last_mlp_rows: Option<Tensor>,
    positions: RowPositions,
    /// The global and the sliding attention mask, made on first use.
    masks: Vec<Option<Tensor>>,
    layer_caches: Vec<LayerCache>,
}

impl<'a, 'o> Pass<'a, 'o> {
    fn new(model: &'a Model, batch: &Batch, opts: &'a ForwardOptions<'o>) -> Result<Self> {
        model.check_batch(batch)?;
        if opts.keep_cache && opts.intervention.is_some() {
            return Err(Error::invalid(
                "the backward needs an unpatched forward: keep_cache with an intervention",
            ));
        }
        let cfg = &model.cfg;
        let graph = model.graph();
        let (b, p, d) = (batch.batch, batch.seq_len, cfg.d_model);
        let n = b * p;
        let (x, mut writers, first_layer) = match opts.start {
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
                    None => model.embed(batch)?,
                };
                (x.clone(), vec![x], 0)
            }
        };
        let track_writers = opts.keep_writers || opts.intervention.is_some();
        if !track_writers {
            writers.clear();
        }
        let residuals = Vec::new();
        let sink = |writer: Writer, t: &Tensor| -> Result<()> {
            if let Some(s) = opts.writer_sink {
                s.write(graph.writer_index(writer), t)?;
            }
            Ok(())
        };
        if first_layer == 0 {
            sink(Writer::Input, &x)?;
        }
        // Unembed only the rows the metric reads.
        let logit_positions = if opts.logit_positions.is_empty() {
            vec![p - 1]
        } else {
            opts.logit_positions.clone()
        };
        if let Some(&bad) = logit_positions.iter().find(|&&q| q >= p) {
            return Err(Error::Shape {
                op: "forward logit positions",
                expected: format!("positions below {p}"),
                found: format!("position {bad}"),
            });
        }
        let rows: Vec<u32> = (0..b)
            .flat_map(|bi| logit_positions.iter().map(move |&q| (bi * p + q) as u32))
            .collect();
        let n_logit_rows = rows.len();
        let logit_rows = Tensor::from_vec(rows, n_logit_rows, &model.device)?;
        // The last layer's MLP output reaches nothing but the logits, so only its rows at
        // the metric's positions matter: it runs on those alone (32 of 512 rows on GPT-2 at
        // 32 × 16, ~5% of EAP's FLOPs), its other rows zero. Not where a caller sees the
        // stream or the writers (residuals, kept writers, interventions, overrides).
        let distinct = {
            let mut sorted = logit_positions.clone();
            sorted.sort_unstable();
            sorted.windows(2).all(|w| w[0] != w[1])
        };
        let last_mlp_rows = (!opts.keep_residuals
            && !track_writers
            && opts.sublayer_override.is_none()
            && distinct
            && n_logit_rows < n)
            .then(|| logit_rows.clone());
        let positions = model.row_positions(&Model::batch_positions(b, p))?;
        Ok(Pass {
            model,
            opts,
            b,
            p,
            x,
            writers,
            residuals,
            track_writers,
            first_layer,
            logit_positions,
            logit_rows,
            last_mlp_rows,
            positions,
            masks: vec![None; 2],
            layer_caches: Vec::new(),
        })
    }

    /// Runs layer `l` (`block`) on the stream.
    fn layer(&mut self, l: usize, block: &Block) -> Result<()> {
        let (model, opts) = (self.model, self.opts);
        let (cfg, graph) = (&model.cfg, model.graph());
        let (b, p) = (self.b, self.p);
        let (n, d, h) = (b * p, cfg.d_model, cfg.n_heads);
        let track_writers = self.track_writers;
        let sink = |writer: Writer, t: &Tensor| -> Result<()> {
            if let Some(s) = opts.writer_sink {
                s.write(graph.writer_index(writer), t)?;
            }
            Ok(())
        };
        let Pass {
            x: x_slot,
            writers,
            residuals,
            masks,
            layer_caches,
            positions,
            last_mlp_rows,
            ..
        } = self;
        let x = x_slot.clone();
        if opts.keep_residuals {
            residuals.push(x.clone());
        }
        let attn = &block.attn;
        let first_reader = l * graph.readers_per_layer();
        let deltas = match opts.intervention {
            Some(iv) => iv.deltas(first_reader..first_reader + 3 * h, writers)?,
            None => vec![None; 3 * h],
        };
        // Two masks at most: the global one and the sliding one.
        let sliding = cfg
            .sliding_window
            .as_ref()
            .is_some_and(|s| s.layers.get(l).copied().unwrap_or(false));
        let mask = match &masks[sliding as usize] {
            Some(m) => m.clone(),
            None => {
                let m = model.attention_mask(l, p)?;
                masks[sliding as usize] = Some(m.clone());
                m
            }
        };
        let (xn, ln1) = match opts.keep_cache {
            true => attn.norm.forward(&x)?,
            false => (attn.norm.apply(&x)?, None),
        };
        let project = |letter: Qkv| -> Result<Tensor> {
            let ds = &deltas[letter as usize * h..(letter as usize + 1) * h];
            let pos = &positions;
            if ds.iter().all(Option::is_none) {
                return attn.project_all(letter, &xn, pos, b, p);
            }
            // Each head reads its own residual stream.
            let per_head = ds
                .iter()
                .map(|delta| match delta {
                    Some(delta) => Ok((&x + delta)?),
                    None => Ok(x.clone()),
                })
                .collect::<Result<Vec<_>>>()?;
            attn.project_per_head(letter, &per_head, pos, b, p)
        };
        let [q, k, v] = if deltas.iter().all(Option::is_none) {
            attn.project_qkv(&xn, positions, b, p)?
        } else {
            [project(Qkv::Q)?, project(Qkv::K)?, project(Qkv::V)?]
        };
        let (z, pattern) = attn.attend(&q, &k, &v, &mask)?; // [n, h·dh]
        let frozen_heads = match &opts.sublayer_override {
            Some(SublayerOverride::Attention { layer, heads }) if *layer == l => {
                if heads.len() != h || heads.iter().any(|t| t.dims() != [n, d]) {
                    return Err(Error::Shape {
                        op: "attention override",
                        expected: format!("{h} head outputs of shape [{n}, {d}]"),
                        found: format!("{} tensors", heads.len()),
                    });
                }
                Some(heads)
            }
            _ => None,
        };
        let attn_frozen = frozen_heads.is_some();
        // Each head's own output ([h, n, d], 19 MB per GPT-2 layer at 32 × 16 tokens) is
        // computed only to keep it, to replace it, or for a sink that does not take the
        // heads from z; otherwise the attention output is one GEMM over the flat W_O.
        let first_head = Writer::Head { layer: l, head: 0 };
        let heads_taken = !track_writers
            && !attn_frozen
            && match opts.writer_sink {
                Some(s) => s.take_heads(graph.writer_index(first_head), &z, attn)?,
                None => true,
            };
        let (attn_out, post) = if heads_taken {
            attn.output_from_mixed(&z)?
        } else {
            let head_out = match frozen_heads {
                Some(heads) => Tensor::stack(heads, 0)?,
                None => attn.head_outputs(&z)?,
            };
            for hh in 0..h {
                let out = head_out.get(hh)?;
                sink(Writer::Head { layer: l, head: hh }, &out)?;
                if track_writers {
                    writers.push(out);
                }
            }
            attn.output(&head_out)?
        };
        let x_mid = (&x + attn_out)?;
        // Parallel blocks: the MLP reads the stream entering the layer.
        let mlp_site = if cfg.parallel_attn_mlp { &x } else { &x_mid };
        let (mlp_cache, x_next) = match &block.mlp {
            None => (None, x_mid),
            Some(mlp) => {
                let mlp_reader = first_reader + 3 * h;
                let delta = match opts.intervention {
                    Some(iv) => iv
                        .deltas(mlp_reader..mlp_reader + 1, writers)?
                        .pop()
                        .flatten(),
                    None => None,
                };
                let inp = match &delta {
                    Some(dlt) => (mlp_site + dlt)?,
                    None => mlp_site.clone(),
                };
                let rows = last_mlp_rows.as_ref().filter(|_| l + 1 == cfg.n_layers);
                let inp = match rows {
                    Some(r) => inp.index_select(r, 0)?,
                    None => inp,
                };
                let (mut out, cache) = match opts.keep_cache {
                    true => {
                        let (out, cache) = mlp.forward(&inp)?;
                        (out, Some(cache))
                    }
                    false => (mlp.output(&inp)?, None),
                };
                if let Some(r) = rows {
                    out = Tensor::zeros((n, d), out.dtype(), out.device())?.index_add(
                        r,
                        &out.contiguous()?,
                        0,
                    )?;
                }
                if let Some(SublayerOverride::Mlp { layer, output }) = &opts.sublayer_override {
                    if *layer == l {
                        if output.dims() != [n, d] {
                            return Err(Error::Shape {
                                op: "MLP override",
                                expected: format!("[{n}, {d}]"),
                                found: format!("{:?}", output.dims()),
                            });
                        }
                        out = output.clone();
                    }
                }
                let mut x_next = (&x_mid + &out)?;
                if let Some(bias) = mlp.output_bias() {
                    x_next = ops::add_bias(&x_next, bias)?;
                }
                sink(Writer::Mlp { layer: l }, &out)?;
                if track_writers {
                    writers.push(out);
                }
                (cache, x_next)
            }
        };
        if opts.keep_cache {
            let mlp_frozen = matches!(
                &opts.sublayer_override,
                Some(SublayerOverride::Mlp { layer, .. }) if *layer == l
            );
            layer_caches.push(LayerCache {
                attn: attn.cache(ln1, q, k, v, pattern, post, positions),
                mlp_rows: last_mlp_rows
                    .clone()
                    .filter(|_| l + 1 == cfg.n_layers && mlp_cache.is_some()),
                mlp: mlp_cache,
                attn_frozen,
                mlp_frozen,
            });
        }
        *x_slot = x_next;
        Ok(())
    }

    /// The logits (and whatever the options keep) after the last layer.
    fn finish(self) -> Result<ForwardOutput> {
        let (model, opts) = (self.model, self.opts);
        let (b, mut x, mut residuals, mut writers) = (self.b, self.x, self.residuals, self.writers);
        let (logit_rows, logit_positions) = (self.logit_rows, self.logit_positions);
        let layer_caches = self.layer_caches;
        let p = self.p;
        let graph = model.graph();
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
        let xf = x.index_select(&logit_rows, 0)?;
        let (logits, unembed) = model.unembed(&xf, opts.logit_columns.as_deref())?;
        let width = logits.dim(1)?;
        let logits = logits.reshape((b, logit_positions.len(), width))?;
        let cache = opts.keep_cache.then(|| ForwardCache {
            layers: layer_caches,
            unembed,
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
}

#[cfg(test)]
mod tests {
    use super::super::config::{
        Activation, ModelConfig, Norm, RopeScaling, Rotary, SlidingWindow, WeightFormat,
    };
    use super::super::random::random_model;
    use super::*;
    use crate::tasks::{metric_gradient, metric_value, Metric, Target};

    /// Small random models of each architecture variant the blocks implement.
    fn variants() -> Vec<(&'static str, ModelConfig)> {
        let base = ModelConfig::classic(2, 16, 4, 8, Some(24), 40, 16, WeightFormat::InMemory);
        let rope = |dim| {
            Positions::Rotary(Rotary {
                dim,
                theta: 10_000.0,
                scaling: RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8,
                },
            })
        };
        let llama = ModelConfig {
            n_kv_heads: 2,
            norm: Norm::RmsNorm,
            act: Activation::Silu,
            gated_mlp: true,
            positions: rope(8),
            ..base.clone()
        };
        vec![
            ("llama-like", llama.clone()),
            (
                "neox-like",
                ModelConfig {
                    act: Activation::Gelu,
                    positions: rope(4),
                    parallel_attn_mlp: true,
                    ..base.clone()
                },
            ),
            (
                "gemma-like",
                ModelConfig {
                    act: Activation::GeluNew,
                    attn_scale: 3.0,
                    post_norms: true,
                    embed_scale: 4.0,
                    attn_softcap: Some(2.0),
                    final_softcap: Some(3.0),
                    sliding_window: Some(SlidingWindow {
                        window: 3,
                        layers: vec![true, false],
                    }),
                    ..llama
                },
            ),
        ]
    }

    /// The largest |a − b| over the first's largest |value| (tensors of the same size).
    fn relative_error(a: &Tensor, b: &Tensor, what: &str) -> f32 {
        let (a, b) = (ops::to_vec(a).unwrap(), ops::to_vec(b).unwrap());
        assert_eq!(a.len(), b.len(), "{what}");
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        let err = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        err / scale
    }

    /// Asserts two tensors of the same size agree to 1e-5 of the first's largest |value|.
    fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
        let err = relative_error(a, b, what);
        assert!(err <= 1e-5, "{what}: {err} of the largest value");
    }

    fn targets() -> Vec<Target> {
        (0..3)
            .map(|i| Target {
                answers: vec![3 + i],
                wrongs: vec![11 + 2 * i],
            })
            .collect()
    }

    /// With bf16 weight products, logits and every reader's gradient follow the f32 model's
    /// to bf16's precision (a relative 2⁻⁹ per rounded input), on every architecture variant
    /// and the classic one; they are not equal to them, so the bf16 path did run.
    #[test]
    fn bf16_products_follow_the_f32_model_to_bf16_precision() {
        let dev = Device::Cpu;
        let seqs: Vec<Vec<u32>> = (0..3)
            .map(|b| (0..6).map(|p| ((b * 13 + p * 7 + 1) % 40) as u32).collect())
            .collect();
        let batch = Batch::new(&seqs, &dev).unwrap();
        let classic = ModelConfig::classic(2, 16, 4, 8, Some(24), 40, 16, WeightFormat::InMemory);
        for (name, cfg) in variants().into_iter().chain([("classic", classic)]) {
            let reference = random_model(&cfg, 5, &dev).unwrap();
            let mut bf16 = random_model(&cfg, 5, &dev).unwrap();
            bf16.set_products(crate::model::bf16::Products::Bf16);
            let run = |model: &Model| {
                let opts = ForwardOptions {
                    keep_cache: true,
                    ..Default::default()
                };
                let out = model.forward(&batch, &opts).unwrap();
                let n = out.logits.elem_count();
                let dl: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 * 0.2 - 1.0).collect();
                let dl = Tensor::from_vec(dl, out.logits.shape().clone(), &dev).unwrap();
                let grads = model.reader_gradients(out.cache.as_ref().unwrap(), &dl);
                (out.logits, grads.unwrap())
            };
            let ((logits, grads), (logits16, grads16)) = (run(&reference), run(&bf16));
            let mut errs = vec![relative_error(&logits, &logits16, name)];
            errs.extend(
                grads
                    .iter()
                    .zip(&grads16)
                    .map(|(a, b)| relative_error(a, b, name)),
            );
            let max = errs.iter().fold(0f32, |m, &e| m.max(e));
            assert!(
                max <= 2e-2,
                "{name}: bf16 products off by {max} of the largest value"
            );
            assert!(
                errs[0] > 0.0,
                "{name}: bf16 logits equal the f32 ones: no bf16 product ran"
            );
        }
    }

    /// The last layer's MLP runs on the metric's rows alone unless the caller keeps the
    /// residual stream: both give the same logits and every reader the same gradient, with
    /// one logit position or several, on every architecture variant.
    #[test]
    fn last_mlp_on_the_metric_rows_changes_no_logit_or_gradient() {
        let dev = Device::Cpu;
        let seqs: Vec<Vec<u32>> = (0..3)
            .map(|b| (0..6).map(|p| ((b * 13 + p * 7 + 1) % 40) as u32).collect())
            .collect();
        let batch = Batch::new(&seqs, &dev).unwrap();
        for (name, cfg) in variants() {
            let model = random_model(&cfg, 5, &dev).unwrap();
            for positions in [vec![], vec![1, 4, 5]] {
                let run = |keep_residuals: bool| {
                    model
                        .forward(
                            &batch,
                            &ForwardOptions {
                                keep_cache: true,
                                keep_residuals,
                                logit_positions: positions.clone(),
                                ..Default::default()
                            },
                        )
                        .unwrap()
                };
                let (all_rows, metric_rows) = (run(true), run(false));
                let what = format!("{name} {positions:?}");
                assert_close(
                    &all_rows.logits,
                    &metric_rows.logits,
                    &format!("{what} logits"),
                );
                let n = all_rows.logits.elem_count();
                let dl: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 * 0.2 - 1.0).collect();
                let grads = |out: &ForwardOutput| {
                    let dl =
                        Tensor::from_vec(dl.clone(), out.logits.shape().clone(), &dev).unwrap();
                    model
                        .reader_gradients(out.cache.as_ref().unwrap(), &dl)
                        .unwrap()
                };
                for (a, b) in grads(&all_rows).iter().zip(&grads(&metric_rows)) {
                    assert_close(a, b, &format!("{what} reader gradient"));
                }
            }
        }
    }

    /// A forward restricted to some vocabulary columns gives those columns of the full
    /// logits, and its backward the reader gradients of the full backward whose dlogits are
    /// zero elsewhere — on every variant, the soft-capped and the tied ones included.
    #[test]
    fn logit_columns_give_the_full_logits_and_gradients_of_those_columns() {
        let dev = Device::Cpu;
        let seqs: Vec<Vec<u32>> = (0..2)
            .map(|b| (0..5).map(|p| ((b * 11 + p * 5 + 2) % 40) as u32).collect())
            .collect();
        let batch = Batch::new(&seqs, &dev).unwrap();
        let cols = vec![31u32, 3, 17];
        for (name, cfg) in variants() {
            let model = random_model(&cfg, 3, &dev).unwrap();
            let v = cfg.d_vocab_out;
            let run = |columns: Option<Vec<u32>>| {
                model
                    .forward(
                        &batch,
                        &ForwardOptions {
                            keep_cache: true,
                            logit_columns: columns,
                            ..Default::default()
                        },
                    )
                    .unwrap()
            };
            let (full, part) = (run(None), run(Some(cols.clone())));
            assert_eq!(part.logits.dims(), [2, 1, cols.len()], "{name}");
            let (lf, lp) = (
                ops::to_vec(&full.logits).unwrap(),
                ops::to_vec(&part.logits).unwrap(),
            );
            let dl_part: Vec<f32> = (0..2 * cols.len()).map(|i| i as f32 * 0.5 - 1.0).collect();
            let mut dl_full = vec![0f32; 2 * v];
            for r in 0..2 {
                for (j, &c) in cols.iter().enumerate() {
                    let (a, b) = (lp[r * cols.len() + j], lf[r * v + c as usize]);
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                        "{name}: {a} vs {b}"
                    );
                    dl_full[r * v + c as usize] = dl_part[r * cols.len() + j];
                }
            }
            let grads = |out: &ForwardOutput, dl: Vec<f32>| {
                let dl = Tensor::from_vec(dl, out.logits.shape().clone(), &dev).unwrap();
                model
                    .reader_gradients(out.cache.as_ref().unwrap(), &dl)
                    .unwrap()
            };
            let (gf, gp) = (grads(&full, dl_full), grads(&part, dl_part));
            for (a, b) in gf.iter().zip(&gp) {
                assert_close(a, b, name);
            }
        }
        let model = random_model(&variants()[0].1, 3, &dev).unwrap();
        let bad = model.forward(
            &batch,
            &ForwardOptions {
                logit_columns: Some(vec![40]),
                ..Default::default()
            },
        );
        assert!(bad.is_err(), "a column outside the vocabulary");
    }

    /// Every reader's gradient from the activation-only backward equals the central finite
    /// difference of the metric along a random direction added to that reader's input alone.
    #[test]
    fn reader_gradients_match_finite_differences_on_every_variant() {
        let dev = Device::Cpu;
        let seqs: Vec<Vec<u32>> = (0..3)
            .map(|b| (0..6).map(|p| ((b * 13 + p * 7 + 1) % 40) as u32).collect())
            .collect();
        let batch = Batch::new(&seqs, &dev).unwrap();
        let targets = targets();
        for (name, cfg) in variants() {
            let model = random_model(&cfg, 7, &dev).unwrap();
            let v = cfg.d_vocab_out;
            let out = model
                .forward(
                    &batch,
                    &ForwardOptions {
                        keep_cache: true,
                        ..Default::default()
                    },
                )
                .unwrap();
            let logits = ops::to_vec(&out.logits).unwrap();
            let dl = metric_gradient(Metric::LogitDiff, &logits, v, &targets, None).unwrap();
            let dl = Tensor::from_vec(dl, out.logits.shape().clone(), &dev).unwrap();
            let grads = model
                .reader_gradients(out.cache.as_ref().unwrap(), &dl)
                .unwrap();
            let metric = |reader: usize, delta: Tensor| -> f64 {
                let iv = AdditiveDeltas(HashMap::from([(reader, delta)]));
                let out = model
                    .forward(
                        &batch,
                        &ForwardOptions {
                            intervention: Some(&iv),
                            ..Default::default()
                        },
                    )
                    .unwrap();
                let l = ops::to_vec(&out.logits).unwrap();
                metric_value(Metric::LogitDiff, &l, v, &targets, None)
                    .unwrap()
                    .mean as f64
            };
            let graph = model.graph();
            let n = batch.n_rows() * cfg.d_model;
            for (r, g) in grads.iter().enumerate() {
                let dir: Vec<f32> = (0..n)
                    .map(|i| (((i * 2654435761 + r * 97) % 1000) as f32 / 500.0) - 1.0)
                    .collect();
                let dir = Tensor::from_vec(dir, (batch.n_rows(), cfg.d_model), &dev).unwrap();
                // Random models' residual streams are small (|x| ≈ 0.02 per element): a step of
                // 1e-3 along a unit-scale direction stays in the linear regime.
                let eps = 1e-3;
                let fd = (metric(r, (&dir * eps).unwrap()) - metric(r, (&dir * -eps).unwrap()))
                    / (2.0 * eps);
                let analytic: f64 = ops::to_vec(&(g * &dir).unwrap())
                    .unwrap()
                    .iter()
                    .map(|&x| x as f64)
                    .sum();
                let scale = analytic.abs().max(fd.abs()).max(1e-3);
                assert!(
                    (fd - analytic).abs() <= 2e-3 * scale + 5e-5,
                    "{name} {}: finite difference {fd:.6} vs gradient {analytic:.6}",
                    graph.reader_name(r)
                );
            }
        }
    }
}
