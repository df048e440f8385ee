//! ACDC's patched forwards, computed incrementally and still exactly (DESIGN §3).
//!
//! A tentative ACDC patch changes the input of one reader `r*`. Every node whose inputs do not
//! change keeps its output from the current circuit's run, so a pass recomputes only
//! * the node of `r*` (one head, or one MLP);
//! * the nodes reachable from it through *unpatched* edges — the current circuit's descendants,
//!   a handful in a sparse circuit; a node with no unpatched outgoing edge left is read by
//!   nobody and is skipped;
//! * the logits at the metric's rows, when the change reaches them (otherwise the metric is the
//!   current one).
//!
//! # Reader inputs without a running residual stream
//!
//! A reader's input under a patched set `P` is `bias + Σ_{u∉P} a_u + Σ_{u∈P} b_u` (`a` the
//! run's writer outputs, `b` the baseline's). Two equal ways to compute it:
//! * **form A**, `x_site + Σ_{u∈P(r)} (b_u − a_u)`, with `x_site` the run's residual stream at
//!   the reader's site — cheap when few of its edges are patched;
//! * **form B**, `B_site + Σ_{u∉P(r)} (a_u − b_u)`, with `B_site` the *baseline* residual stream
//!   (bias plus every baseline writer), fixed for the whole run — cheap when few edges are left,
//!   which is what ACDC leaves behind.
//!
//! ACDC visits readers from the logits down, and only edges into the visited reader change.
//! So every node below the visit frontier keeps the outputs of the last full build, and the
//! residual stream at the sites of the readers not yet decided never changes: those readers use
//! form A (the visited reader's patched sum is kept and extended by one term per try), and the
//! decided readers use form B with their few surviving edges.
//!
//! # Rows
//!
//! The metric reads the last position of each sequence. A node whose output reaches the logits
//! only through queries, MLPs and the logits is needed there alone and is computed on those rows
//! (32 of 512 for GPT-2 at 32 × 16); keys and values need every position (`Need`). Nodes below
//! the visit frontier, which undecided readers read through the residual stream, are kept at
//! every row. A node's need only falls as edges are patched, and every node computes its
//! last-position rows in a pass of their own, so those rows have the same bits whichever rows
//! the node is needed at.
//!
//! # Models whose residual stream is not a sum of writers
//!
//! All of the above rests on the residual stream being the biases plus the sum of the writers'
//! outputs. Gemma-2 normalises the sum of a layer's heads before adding it (its head writers are
//! taken before that norm, as EAP-IG and MIB take them), so neither form holds there; for such
//! models every pass is a patched forward from the clean run's cached prefix at the visited
//! reader's layer (`replay`), exact by construction and slower.
//!
//! # Determinism across resumes
//!
//! A resumed run rebuilds this state from the checkpoint's patched set with one full pass.
//! For it to continue exactly as an uninterrupted run, the state at every reader boundary is
//! *canonical*: every node's output is the same f32 function of the patched set and the
//! visiting position, whatever history led there. Undecided readers use form A with their
//! patched writers summed from the highest index down; decided readers use form B summed the same
//! way; and when a reader's visit ends ([`AcdcState::finish_reader`]) its node and the nodes it
//! reaches are recomputed in form B — about one tentative pass per reader.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::graph::{visit_order, Graph, Qkv, Reader, Writer};
use crate::model::{ops, Block, Model, RowPositions};
use crate::patching::metric_with_patch;
use crate::runs::PreparedChunk;
use crate::tasks::{metric_value, KlReference, Metric};
use crate::{Error, Result};

/// Floats per rayon task in the input sums.
const FOLD_CHUNK: usize = 16 * 1024;

/// `init + (p_1 − m_1) + (p_2 − m_2) + …`, added left to right element by element, over the
/// `rows` of `[N, d]` terms (all rows when `None`; `init` is already in that row space).
/// `None` when there is neither an `init` nor a term. The order of the additions is fixed, so
/// extending a sum by one term gives the same bits as summing all terms at once.
fn fold(
    init: Option<&Tensor>,
    terms: &[(&Tensor, &Tensor)],
    rows: Option<&[usize]>,
) -> Result<Option<Tensor>> {
    if terms.is_empty() {
        return Ok(init.cloned());
    }
    fold_into(init, terms, rows, None).map(Some)
}

/// `base[rows] + fold(None, terms, rows)` with the same bits, in one pass over the terms and
/// one output buffer instead of a sum, a gathered copy of `base` and their sum.
fn onto_base(
    base: &Tensor,
    terms: &[(&Tensor, &Tensor)],
    rows: Option<&[usize]>,
) -> Result<Tensor> {
    if terms.is_empty() {
        return add_base(base, rows, None);
    }
    fold_into(None, terms, rows, Some(base))
}

/// [`fold`]'s sum of at least one term, with `base[rows]` added last when given.
fn fold_into(
    init: Option<&Tensor>,
    terms: &[(&Tensor, &Tensor)],
    rows: Option<&[usize]>,
    base: Option<&Tensor>,
) -> Result<Tensor> {
    let d = terms[0].0.dim(1)?;
    let out_rows = rows.map_or(terms[0].0.dim(0)?, <[usize]>::len);
    let mut all: Vec<&Tensor> = Vec::with_capacity(2 * terms.len() + 2);
    for (p, m) in terms {
        all.push(p);
        all.push(m);
    }
    all.extend(init);
    all.extend(base);
    let fast = ops::cpu_slices(&all, |s| {
        let k = terms.len();
        let base = base.map(|_| s[s.len() - 1]);
        // Every element is written by the first term (or `init`) before any is read, so the
        // buffer is not cleared first (a write of every byte that no one reads).
        let mut out: Vec<f32> = Vec::with_capacity(out_rows * d);
        // Output elements `out_off..` read the terms' elements `src..`, one contiguous run.
        let body = |o: &mut [std::mem::MaybeUninit<f32>], out_off: usize, src: usize| {
            let n = o.len();
            let first = match init {
                Some(_) => {
                    for (o, i) in o.iter_mut().zip(&s[2 * k][out_off..out_off + n]) {
                        o.write(*i);
                    }
                    0
                }
                None => {
                    let (p, m) = (&s[0][src..src + n], &s[1][src..src + n]);
                    for ((o, p), m) in o.iter_mut().zip(p).zip(m) {
                        o.write(p - m);
                    }
                    1
                }
            };
            // SAFETY: every element of `o` was written just above, and `MaybeUninit<f32>` has
            // the layout of `f32`.
            let o = unsafe { &mut *(o as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
            for t in first..k {
                let (p, m) = (&s[2 * t][src..src + n], &s[2 * t + 1][src..src + n]);
                for ((o, p), m) in o.iter_mut().zip(p).zip(m) {
                    *o += p - m;
                }
            }
            if let Some(b) = base {
                for (o, b) in o.iter_mut().zip(&b[src..src + n]) {
                    *o += b;
                }
            }
        };
        let slots = &mut out.spare_capacity_mut()[..out_rows * d];
        match rows {
            None => slots
                .par_chunks_mut(FOLD_CHUNK)
                .enumerate()
                .for_each(|(c, o)| body(o, c * FOLD_CHUNK, c * FOLD_CHUNK)),
            // Whole rows per task, about FOLD_CHUNK floats of them.
            Some(rows) => {
                let per_task = (FOLD_CHUNK / d.max(1)).max(1);
                slots
                    .par_chunks_mut(per_task * d)
                    .enumerate()
                    .for_each(|(t, o)| {
                        for (j, o) in o.chunks_mut(d).enumerate() {
                            let i = t * per_task + j;
                            body(o, i * d, rows[i] * d);
                        }
                    })
            }
        }
        // SAFETY: the chunks above cover all `out_rows · d` elements and `body` writes each.
        unsafe { out.set_len(out_rows * d) };
        out
    });
    if let Some(v) = fast {
        return Ok(Tensor::from_vec(v, (out_rows, d), terms[0].0.device())?);
    }
    // Any device: the same additions through candle.
    let pick = |t: &Tensor| -> Result<Tensor> {
        match rows {
            Some(r) => Ok(t
                .contiguous()?
                .index_select(&row_index(r, t.device())?, 0)?),
            None => Ok(t.clone()),
        }
    };
    let mut acc = init.cloned();
    for (p, m) in terms {
        let t = (pick(p)? - pick(m)?)?;
        acc = Some(match acc {
            None => t,
            Some(a) => (a + t)?,
        });
    }
    let sum = acc.expect("at least one term");
    match base {
        Some(b) => add_base(b, rows, Some(sum)),
        None => Ok(sum),
    }
}

fn row_index(rows: &[usize], device: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    Ok(Tensor::from_vec(v, rows.len(), device)?)
}

/// `base[rows] + sum` (just `base[rows]` without a sum).
fn add_base(base: &Tensor, rows: Option<&[usize]>, sum: Option<Tensor>) -> Result<Tensor> {
    let base = match rows {
        Some(r) => base
            .contiguous()?
            .index_select(&row_index(r, base.device())?, 0)?,
        None => base.clone(),
    };
    Ok(match sum {
        Some(s) => (base + s)?,
        None => base,
    })
}

/// One chunk's current run.
struct ChunkState {
    /// Every writer's output in the current circuit, `[N, d]`: meaningful at the rows the
    /// writer is needed at (last-position rows only, or none for dead nodes, which keep
    /// placeholders).
    writers: Vec<Tensor>,
    /// Each head's current q, k and v projections, `[N, d_head]`, indexed `layer · H + head`.
    proj: Vec<[Tensor; 3]>,
    /// The residual stream at every site of the last build (`2·layer` entering the layer,
    /// `2·layer + 1` entering its MLP, `2·n_layers` before the final norm). Valid at the sites
    /// of undecided readers, the only ones that use it.
    sites: Vec<Tensor>,
    /// The baseline's residual stream at every site: biases plus every baseline writer.
    base_sites: Vec<Tensor>,
    /// Rows whose logits the metric reads.
    logit_rows: Vec<usize>,
    /// The other rows, in the order of [`split_rows`]'s first part.
    rest_rows: Vec<usize>,
    /// Where the rows sit in their sequences (shortformer embeddings, rotary angles): every
    /// row, the rows before the last position, the last position's rows.
    positions: (RowPositions, Option<RowPositions>, RowPositions),
    batch: usize,
    seq_len: usize,
    /// Each layer's attention mask.
    masks: Vec<Tensor>,
    /// The chunk's current mean metric.
    metric: f32,
    /// The clean side of a KL metric.
    kl: Option<KlReference>,
}

/// What one pass over a chunk changed.
#[derive(Default)]
struct ChunkUpdate {
    writers: Vec<(usize, Tensor)>,
    proj: Vec<(usize, usize, Tensor)>,
    metric: Option<f32>,
}

/// The tentative pass waiting for ACDC's decision.
struct Pending {
    index: usize,
    updates: Vec<ChunkUpdate>,
    visit_sums: Vec<Option<Tensor>>,
    metric: f32,
}

/// The visited reader and, per chunk, `Σ_{u∈P(r)} (b_u − a_u)` over its patched edges, at the
/// rows of `need`.
struct VisitSums {
    reader: usize,
    need: Need,
    sums: Vec<Option<Tensor>>,
}

/// ACDC's patched set and the run of the model under it, one state per chunk.
pub struct AcdcState<'a> {
    model: &'a Model,
    prepared: &'a [PreparedChunk],
    metric_kind: Metric,
    graph: Graph,
    order: Vec<usize>,
    /// Position of each reader in `order`.
    position_of: Vec<usize>,
    /// Readers `order[..position]` are decided; `order[position]` is being visited.
    position: usize,
    patched: Vec<bool>,
    chunks: Vec<ChunkState>,
    metric: f32,
    /// The visited reader's patched sums.
    visit: Option<VisitSums>,
    pending: Option<Pending>,
    /// Metric evaluations so far, one per chunk per evaluation (the build counts one).
    pub passes: usize,
    /// The residual stream is not the sum of the writers (norms on the heads' sum: Gemma-2), so
    /// reader inputs cannot be assembled from writer outputs: every pass is a patched forward
    /// from the cached clean prefix ([`metric_with_patch`]), exact by construction.
    replay: bool,
}

fn layer_of(graph: &Graph, reader: usize) -> usize {
    match graph.reader(reader) {
        Reader::Head { layer, .. } | Reader::Mlp { layer } => layer,
        Reader::Logits => graph.n_layers,
    }
}

fn site_of(graph: &Graph, reader: usize) -> usize {
    match graph.reader(reader) {
        Reader::Head { layer, .. } => 2 * layer,
        // Parallel blocks: the MLP reads the stream entering its layer.
        Reader::Mlp { layer } if graph.parallel_attn_mlp => 2 * layer,
        Reader::Mlp { layer } => 2 * layer + 1,
        Reader::Logits => 2 * graph.n_layers,
    }
}

/// The reader indices of head `head` of layer `layer`: its query, key and value inputs.
fn head_readers(g: &Graph, layer: usize, head: usize) -> [usize; 3] {
    Qkv::ALL.map(|qkv| g.reader_index(Reader::Head { layer, head, qkv }))
}

/// The residual stream at every site given every writer's output (`writers` of the run, or
/// the baseline's): left-to-right sums, the same in every build.
fn residual_sites(model: &Model, writers: &[Tensor]) -> Result<Vec<Tensor>> {
    let g = model.graph();
    let mut sites = vec![writers[0].clone()];
    for l in 0..g.n_layers {
        let lw = model.layer(l)?;
        sites.push(after_heads(&g, &lw, l, &sites[2 * l], writers)?);
        sites.push(after_mlp(&g, &lw, l, &sites[2 * l + 1], writers)?);
    }
    Ok(sites)
}

/// The residual stream after layer `l`'s heads (and `b_O`), from the one entering the layer.
fn after_heads(g: &Graph, lw: &Block, l: usize, x: &Tensor, writers: &[Tensor]) -> Result<Tensor> {
    let mut x = x.clone();
    for h in 0..g.n_heads {
        x = (x + &writers[g.writer_index(Writer::Head { layer: l, head: h })])?;
    }
    match lw.attn.output_bias() {
        Some(b) => Ok(x.broadcast_add(b)?),
        None => Ok(x),
    }
}

/// The residual stream after layer `l`'s MLP (and `b_out`); attention-only layers pass it on.
fn after_mlp(g: &Graph, lw: &Block, l: usize, x: &Tensor, writers: &[Tensor]) -> Result<Tensor> {
    match &lw.mlp {
        Some(mlp) => {
            let x = (x + &writers[g.writer_index(Writer::Mlp { layer: l })])?;
            match mlp.output_bias() {
                Some(b) => Ok(x.broadcast_add(b)?),
                None => Ok(x),
            }
        }
        None => Ok(x.clone()),
    }
}

/// Which rows of a node's output anything reads: none (the node is dead), only the rows the
/// metric reads (the last position of each sequence), or all.
///
/// A node whose output only reaches the logits through queries, MLPs and the logits themselves
/// is needed at the last position only, and is computed there alone: 32 rows instead of 512 for
/// GPT-2 at 32 × 16. Keys and values need every position. Every node computes its last-position
/// rows in a separate pass of their own, so those rows have the same bits in either mode, and a
/// node's need only falls as edges are patched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Need {
    None,
    Last,
    All,
}

/// `[b·p, c]` as the rows before the last position `[b·(p−1), c]` (none when `p = 1`) and the
/// last position's rows `[b, c]`.
fn split_rows(t: &Tensor, b: usize, p: usize) -> Result<(Option<Tensor>, Tensor)> {
    let c = t.dim(1)?;
    let t3 = t.reshape((b, p, c))?;
    let last = t3.narrow(1, p - 1, 1)?.contiguous()?.reshape((b, c))?;
    let rest = match p {
        1 => None,
        _ => Some(
            t3.narrow(1, 0, p - 1)?
                .contiguous()?
                .reshape((b * (p - 1), c))?,
        ),
    };
    Ok((rest, last))
}

/// The inverse of [`split_rows`]; zeros for the earlier rows when there are none.
fn join_rows(rest: Option<&Tensor>, last: &Tensor, b: usize, p: usize) -> Result<Tensor> {
    let c = last.dim(1)?;
    if p == 1 {
        return Ok(last.clone());
    }
    let rest = match rest {
        Some(r) => r.reshape((b, p - 1, c))?,
        None => Tensor::zeros((b, p - 1, c), DType::F32, last.device())?,
    };
    Ok(Tensor::cat(&[&rest, &last.reshape((b, 1, c))?], 1)?.reshape((b * p, c))?)
}

/// The rows of an input: `input` holds the last position's rows only (`Need::Last`) or all.
fn parts(input: &Tensor, need: Need, b: usize, p: usize) -> Result<(Option<Tensor>, Tensor)> {
    match need {
        Need::All => split_rows(input, b, p),
        _ => Ok((None, input.clone())),
    }
}

/// A reader's input at the rows its node is computed on.
enum NodeInput {
    /// At the rows of the node's [`Need`]: every row in order, or the last position's rows.
    Rows(Tensor),
    /// The rows before the last position (`None` under `Need::Last` or for one position) and
    /// the last position's rows, as [`split_rows`] lays them out.
    Split(Option<Tensor>, Tensor),
}

impl NodeInput {
    /// The rows before the last position and the last position's rows of a query's or an
    /// MLP's input.
    fn parts(self, need: Need, b: usize, p: usize) -> Result<(Option<Tensor>, Tensor)> {
        match self {
            NodeInput::Rows(t) => parts(&t, need, b, p),
            NodeInput::Split(rest, last) => Ok((rest, last)),
        }
    }

    /// A key's or value's input (every row), or the logits' (the last position's rows).
    fn rows(self) -> Result<Tensor> {
        match self {
            NodeInput::Rows(t) | NodeInput::Split(None, t) => Ok(t),
            NodeInput::Split(Some(_), _) => Err(Error::invalid(
                "incremental ACDC: a key, value or logits input split by position",
            )),
        }
    }
}

/// The node computations of one chunk, row-restricted by [`Need`].
struct NodeCtx<'c> {
    model: &'c Model,
    batch: usize,
    seq_len: usize,
    masks: &'c [Tensor],
    pos: &'c (RowPositions, Option<RowPositions>, RowPositions),
}

impl NodeCtx<'_> {
    /// Head `head`'s output `[N, d]` (earlier rows zero under `Need::Last`) and its new
    /// projections. `inputs` holds the new input of each changed letter: the query's at the
    /// rows of `need`, the key's and value's at every row; the others come from `cached`.
    fn head(
        &self,
        lw: &Block,
        layer: usize,
        head: usize,
        need: Need,
        inputs: [Option<NodeInput>; 3],
        cached: &[Tensor; 3],
    ) -> Result<([Option<Tensor>; 3], Tensor)> {
        let (b, p, dh) = (self.batch, self.seq_len, self.model.cfg.d_head);
        let mut new: [Option<Tensor>; 3] = [None, None, None];
        let [q_in, k_in, v_in] = inputs;
        if let Some(input) = q_in {
            let (rest, last) = input.parts(need, b, p)?;
            let q_last = lw.attn.project_head(Qkv::Q, head, &last, &self.pos.2)?;
            let q_rest = match &rest {
                Some(r) => Some(lw.attn.project_head(
                    Qkv::Q,
                    head,
                    r,
                    self.pos.1.as_ref().expect("rows before the last position"),
                )?),
                None => None,
            };
            new[0] = Some(join_rows(q_rest.as_ref(), &q_last, b, p)?);
        }
        for (letter, input) in [(Qkv::K, k_in), (Qkv::V, v_in)] {
            if let Some(input) = input {
                let pos = &self.pos.0;
                let input = input.rows()?;
                new[letter as usize] = Some(lw.attn.project_head(letter, head, &input, pos)?);
            }
        }
        let pick = |l: usize| new[l].as_ref().unwrap_or(&cached[l]);
        let k = pick(1).reshape((b, p, dh))?;
        let v = pick(2).reshape((b, p, dh))?;
        let (q_rest, q_last) = split_rows(pick(0), b, p)?;
        let out_last = lw.attn.attend_head(
            head,
            &q_last.reshape((b, 1, dh))?,
            &k,
            &v,
            &self.masks[layer].narrow(0, p - 1, 1)?,
        )?;
        let out_rest = match (need, q_rest) {
            (Need::All, Some(q)) => Some(lw.attn.attend_head(
                head,
                &q.reshape((b, p - 1, dh))?,
                &k,
                &v,
                &self.masks[layer].narrow(0, 0, p - 1)?,
            )?),
            _ => None,
        };
        Ok((new, join_rows(out_rest.as_ref(), &out_last, b, p)?))
    }

    /// The MLP's output `[N, d]` from its input at the rows of `need`.
    fn mlp(&self, lw: &Block, need: Need, input: NodeInput) -> Result<Tensor> {
        let (b, p) = (self.batch, self.seq_len);
        let mlp = lw.mlp.as_ref().expect("MLP reader of a layer with an MLP");
        let (rest, last) = input.parts(need, b, p)?;
        let out_last = mlp.output(&last)?;
        let out_rest = match &rest {
            Some(r) => Some(mlp.output(r)?),
            None => None,
        };
        join_rows(out_rest.as_ref(), &out_last, b, p)
    }
}

impl<'a> AcdcState<'a> {
    /// Builds the state for `patched` with the readers before `position` of ACDC's
    /// [`visit_order`] decided: one full pass per chunk, every node in its canonical form.
    /// (The state relies on that order: every reader below the visited one is undecided.)
    pub fn build(
        model: &'a Model,
        prepared: &'a [PreparedChunk],
        metric_kind: Metric,
        patched: Vec<bool>,
        position: usize,
    ) -> Result<AcdcState<'a>> {
        let graph = model.graph();
        let (nw, nr) = (graph.n_writers(), graph.n_readers());
        if patched.len() != nw * nr {
            return Err(Error::invalid(format!(
                "patch mask has {} entries, expected {}",
                patched.len(),
                nw * nr
            )));
        }
        let order = visit_order(&graph);
        let mut position_of = vec![0; nr];
        for (i, &r) in order.iter().enumerate() {
            position_of[r] = i;
        }
        let replay = (0..model.cfg.n_layers)
            .map(|l| model.layer(l).map(|b| b.attn.has_post_norm()))
            .collect::<Result<Vec<_>>>()?
            .contains(&true);
        let mut chunks = Vec::with_capacity(prepared.len());
        for p in prepared.iter().filter(|_| !replay) {
            let (b, len) = (p.chunk.clean.batch, p.chunk.clean.seq_len);
            // Row sets in the layouts of `split_rows`: all rows, the earlier rows, the last.
            let all = Model::batch_positions(b, len);
            let rest: Vec<usize> = (0..b * (len - 1)).map(|r| r % (len - 1).max(1)).collect();
            let positions = (
                model.row_positions(&all)?,
                (len > 1).then(|| model.row_positions(&rest)).transpose()?,
                model.row_positions(&vec![len - 1; b])?,
            );
            chunks.push(ChunkState {
                writers: p.clean_writers.clone(),
                proj: Vec::new(),
                sites: Vec::new(),
                base_sites: residual_sites(model, &p.baseline)?,
                logit_rows: (0..b).map(|i| i * len + len - 1).collect(),
                rest_rows: (0..b * len).filter(|r| r % len != len - 1).collect(),
                positions,
                batch: b,
                seq_len: len,
                masks: (0..model.cfg.n_layers)
                    .map(|l| model.attention_mask(l, len))
                    .collect::<Result<_>>()?,
                metric: 0.0,
                kl: match metric_kind {
                    Metric::Kl => Some(KlReference::new(&p.clean_logits, model.cfg.d_vocab_out)?),
                    _ => None,
                },
            });
        }
        let mut state = AcdcState {
            model,
            prepared,
            metric_kind,
            graph,
            order,
            position_of,
            position,
            patched,
            chunks,
            metric: 0.0,
            visit: None,
            pending: None,
            passes: 0,
            replay,
        };
        state.passes += prepared.len();
        if replay {
            state.metric = metric_with_patch(model, prepared, metric_kind, &state.patched)?;
            return Ok(state);
        }
        let needs = state.needs(&state.patched);
        for c in 0..prepared.len() {
            state.build_chunk(c, &needs)?;
        }
        state.metric = state.combined(&vec![None; prepared.len()])?;
        Ok(state)
    }

    pub fn metric(&self) -> f32 {
        self.metric
    }

    /// Whether every pass is a patched forward from the cached prefix (models whose residual
    /// stream is not the sum of the writers) rather than an incremental one.
    pub fn replays(&self) -> bool {
        self.replay
    }

    pub fn patched(&self) -> &[bool] {
        &self.patched
    }

    pub fn position(&self) -> usize {
        self.position
    }

    /// The reader being visited, `None` once every reader is decided.
    pub fn visiting(&self) -> Option<usize> {
        self.order.get(self.position).copied()
    }

    /// How many nodes the current circuit needs at the metric's rows only (computed on those
    /// rows alone), and how many it needs at every row.
    pub fn row_restricted_nodes(&self) -> (usize, usize) {
        if self.replay {
            return (0, self.graph.n_writers() - 1);
        }
        let needs = self.needs(&self.patched);
        let count = |n: Need| needs[1..].iter().filter(|&&x| x == n).count();
        (count(Need::Last), count(Need::All))
    }

    fn decided(&self, reader: usize) -> bool {
        self.position_of[reader] < self.position
    }

    fn ctx(&self, c: usize) -> NodeCtx<'_> {
        let st = &self.chunks[c];
        NodeCtx {
            model: self.model,
            batch: st.batch,
            seq_len: st.seq_len,
            masks: &st.masks,
            pos: &st.positions,
        }
    }

    /// Each writer's [`Need`] under `patched`. Writers that an undecided reader reads (those
    /// below the visit frontier) are needed at every row: undecided readers take their input
    /// from the residual stream.
    fn needs(&self, patched: &[bool]) -> Vec<Need> {
        let g = self.graph;
        let (nw, nr) = (g.n_writers(), g.n_readers());
        // The visit order goes down the layers, so the visited reader has the most writers
        // upstream of any undecided one.
        let below_frontier = self.visiting().map_or(0, |r| g.n_upstream(r));
        let mut need = vec![Need::None; nw];
        for x in (0..nw).rev() {
            if x < below_frontier {
                need[x] = Need::All;
                continue;
            }
            let mut n = Need::None;
            for r in 0..nr {
                if g.is_edge(x, r) && !patched[x * nr + r] {
                    n = n.max(self.reader_need(r, &need));
                    if n == Need::All {
                        break;
                    }
                }
            }
            need[x] = n;
        }
        need
    }

    /// The rows of reader `r`'s input that its node needs, given the writers' needs.
    fn reader_need(&self, r: usize, need: &[Need]) -> Need {
        let g = self.graph;
        match g.reader(r) {
            Reader::Logits => Need::Last,
            Reader::Mlp { layer } => need[g.writer_index(Writer::Mlp { layer })],
            Reader::Head { layer, head, qkv } => {
                match (need[g.writer_index(Writer::Head { layer, head })], qkv) {
                    (n, Qkv::Q) => n,
                    (Need::None, _) => Need::None,
                    _ => Need::All,
                }
            }
        }
    }

    /// The rows argument of the input sums for a reader needed at `need`.
    fn rows_for(&self, c: usize, need: Need) -> Option<&[usize]> {
        (need != Need::All).then_some(&self.chunks[c].logit_rows[..])
    }

    /// Every live node of chunk `c` in layer order, each reader's input in its canonical form.
    fn build_chunk(&mut self, c: usize, needs: &[Need]) -> Result<()> {
        let g = self.graph;
        let model = self.model;
        let (n, dh) = (
            self.chunks[c].batch * self.chunks[c].seq_len,
            model.cfg.d_head,
        );
        // Dead nodes are read by nobody; they keep the clean run's outputs as placeholders.
        let mut writers = self.chunks[c].writers.clone();
        let zero = Tensor::zeros((n, dh), DType::F32, &model.device)?;
        let mut proj = vec![[zero.clone(), zero.clone(), zero]; g.n_layers * g.n_heads];
        let mut sites = vec![writers[0].clone()];
        for l in 0..g.n_layers {
            let lw = model.layer(l)?;
            // A layer's heads read the site entering it, so all of them come before its sum.
            for h in 0..g.n_heads {
                let u = g.writer_index(Writer::Head { layer: l, head: h });
                if needs[u] != Need::None {
                    let mut inputs: [Option<NodeInput>; 3] = [None, None, None];
                    for (letter, &qkv) in Qkv::ALL.iter().enumerate() {
                        let r = g.reader_index(Reader::Head {
                            layer: l,
                            head: h,
                            qkv,
                        });
                        let need = self.reader_need(r, needs);
                        inputs[letter] = Some(self.canonical_input(c, r, &writers, &sites, need)?);
                    }
                    let hn = l * g.n_heads + h;
                    let (new, out) = self.ctx(c).head(&lw, l, h, needs[u], inputs, &proj[hn])?;
                    for (letter, t) in new.into_iter().enumerate() {
                        proj[hn][letter] = t.expect("every letter computed");
                    }
                    writers[u] = out;
                }
            }
            sites.push(after_heads(&g, &lw, l, &sites[2 * l], &writers)?);
            if lw.mlp.is_some() {
                let u = g.writer_index(Writer::Mlp { layer: l });
                if needs[u] != Need::None {
                    let r = g.reader_index(Reader::Mlp { layer: l });
                    let input = self.canonical_input(c, r, &writers, &sites, needs[u])?;
                    writers[u] = self.ctx(c).mlp(&lw, needs[u], input)?;
                }
            }
            sites.push(after_mlp(&g, &lw, l, &sites[2 * l + 1], &writers)?);
        }
        let r = g.reader_index(Reader::Logits);
        let input = self.canonical_input(c, r, &writers, &sites, Need::Last)?;
        let metric = self.chunk_metric(c, &input.rows()?)?;
        let st = &mut self.chunks[c];
        st.writers = writers;
        st.proj = proj;
        st.sites = sites;
        st.metric = metric;
        Ok(())
    }

    /// Reader `r`'s input in its canonical form at the rows of `need` (a query's or an MLP's
    /// needed at every row split by position, [`NodeInput::Split`]): form A (the site's
    /// residual plus its patched edges' `b − a`) while it is undecided, form B (the baseline's
    /// residual plus its unpatched edges' `a − b`) once decided; writers from the highest
    /// index down.
    fn canonical_input(
        &self,
        c: usize,
        r: usize,
        writers: &[Tensor],
        sites: &[Tensor],
        need: Need,
    ) -> Result<NodeInput> {
        let g = self.graph;
        let nr = g.n_readers();
        let st = &self.chunks[c];
        let baseline = &self.prepared[c].baseline;
        let site = site_of(&g, r);
        let decided = self.decided(r);
        let terms: Vec<(&Tensor, &Tensor)> = (0..g.n_upstream(r))
            .rev()
            .filter(|&u| self.patched[u * nr + r] != decided)
            .map(|u| {
                if decided {
                    (&writers[u], &baseline[u])
                } else {
                    (&baseline[u], &writers[u])
                }
            })
            .collect();
        let base = if decided {
            &st.base_sites[site]
        } else {
            &sites[site]
        };
        let split = matches!(
            g.reader(r),
            Reader::Mlp { .. } | Reader::Head { qkv: Qkv::Q, .. }
        );
        if need != Need::All {
            return Ok(NodeInput::Split(
                None,
                onto_base(base, &terms, Some(&st.logit_rows))?,
            ));
        }
        if !split {
            return Ok(NodeInput::Rows(onto_base(base, &terms, None)?));
        }
        // Each part summed at its own rows: no full-row sum to copy apart.
        let rest = match st.seq_len {
            1 => None,
            _ => Some(onto_base(base, &terms, Some(&st.rest_rows))?),
        };
        Ok(NodeInput::Split(
            rest,
            onto_base(base, &terms, Some(&st.logit_rows))?,
        ))
    }

    fn chunk_metric(&self, c: usize, logits_input: &Tensor) -> Result<f32> {
        let model = self.model;
        let (logits, _) = model.unembed(logits_input, None)?;
        if let Some(kl) = &self.chunks[c].kl {
            return kl.mean(&ops::to_vec(&logits)?);
        }
        let p = &self.prepared[c];
        Ok(metric_value(
            self.metric_kind,
            &ops::to_vec(&logits)?,
            model.cfg.d_vocab_out,
            &p.chunk.targets,
            Some(&p.clean_logits),
        )?
        .mean)
    }

    /// The dataset's mean metric with some chunks' metrics replaced.
    fn combined(&self, replaced: &[Option<f32>]) -> Result<f32> {
        let (mut total, mut count) = (0f64, 0usize);
        for (c, p) in self.prepared.iter().enumerate() {
            let m = replaced[c].unwrap_or(self.chunks[c].metric);
            total += m as f64 * p.chunk.indices.len() as f64;
            count += p.chunk.indices.len();
        }
        let mean = (total / count.max(1) as f64) as f32;
        if !mean.is_finite() {
            return Err(Error::NonFinite {
                metric: self.metric_kind.to_string(),
                value: mean,
                context: "under patching".into(),
            });
        }
        Ok(mean)
    }

    fn check_visiting(&self, reader: usize) -> Result<()> {
        if self.visiting() != Some(reader) {
            return Err(Error::invalid(format!(
                "ACDC visits {} now, not {}",
                self.visiting()
                    .map_or("no reader".to_string(), |r| self.graph.reader_name(r)),
                self.graph.reader_name(reader)
            )));
        }
        Ok(())
    }

    fn check_edge(&self, writer: usize, reader: usize) -> Result<usize> {
        self.check_visiting(reader)?;
        if self.pending.is_some() {
            return Err(Error::invalid(
                "a tentative patch is waiting for accept or reject",
            ));
        }
        let i = writer * self.graph.n_readers() + reader;
        if !self.graph.is_edge(writer, reader) || self.patched[i] {
            return Err(Error::invalid(format!(
                "{} is not an unpatched edge",
                self.graph.edge_name(writer, reader)
            )));
        }
        Ok(i)
    }

    /// The visited reader's patched sum per chunk at the rows its node needs (which patching
    /// the reader's own edges does not change), started on its first try.
    fn visit_sums(&mut self, reader: usize, need: Need) -> Result<()> {
        if self
            .visit
            .as_ref()
            .is_some_and(|v| v.reader == reader && v.need == need)
        {
            return Ok(());
        }
        let g = self.graph;
        let nr = g.n_readers();
        let mut sums = Vec::with_capacity(self.chunks.len());
        for (c, st) in self.chunks.iter().enumerate() {
            let baseline = &self.prepared[c].baseline;
            let terms: Vec<(&Tensor, &Tensor)> = (0..g.n_upstream(reader))
                .rev()
                .filter(|&u| self.patched[u * nr + reader])
                .map(|u| (&baseline[u], &st.writers[u]))
                .collect();
            sums.push(fold(None, &terms, self.rows_for(c, need))?);
        }
        self.visit = Some(VisitSums { reader, need, sums });
        Ok(())
    }

    /// The metric with `writer → reader` patched on top of the current circuit; `reader` must
    /// be the one being visited. Follow with [`accept`](Self::accept) or
    /// [`reject`](Self::reject).
    pub fn try_edge(&mut self, writer: usize, reader: usize) -> Result<f32> {
        let i = self.check_edge(writer, reader)?;
        if self.replay {
            self.patched[i] = true;
            return match metric_with_patch(
                self.model,
                self.prepared,
                self.metric_kind,
                &self.patched,
            ) {
                Ok(metric) => {
                    self.pending = Some(Pending {
                        index: i,
                        updates: Vec::new(),
                        visit_sums: Vec::new(),
                        metric,
                    });
                    self.passes += self.prepared.len();
                    Ok(metric)
                }
                Err(e) => {
                    self.patched[i] = false;
                    Err(e)
                }
            };
        }
        // The rows the visited reader's node needs do not depend on the reader's own edges.
        let need = self.reader_need(reader, &self.needs(&self.patched));
        self.visit_sums(reader, need)?;
        self.patched[i] = true;
        let result = (|| -> Result<Pending> {
            let needs = self.needs(&self.patched);
            let g = self.graph;
            let mut updates = Vec::with_capacity(self.chunks.len());
            let mut visit_sums = Vec::with_capacity(self.chunks.len());
            for c in 0..self.chunks.len() {
                let st = &self.chunks[c];
                let rows = self.rows_for(c, need);
                let prev = self.visit.as_ref().expect("visit sums started").sums[c].as_ref();
                let term = (&self.prepared[c].baseline[writer], &st.writers[writer]);
                let sum = fold(prev, &[term], rows)?;
                let input = add_base(&st.sites[site_of(&g, reader)], rows, sum.clone())?;
                updates.push(self.pass(c, reader, Some(input), &needs)?);
                visit_sums.push(sum);
            }
            let metrics: Vec<Option<f32>> = updates.iter().map(|u| u.metric).collect();
            Ok(Pending {
                index: i,
                metric: self.combined(&metrics)?,
                updates,
                visit_sums,
            })
        })();
        match result {
            Ok(p) => {
                let m = p.metric;
                self.pending = Some(p);
                self.passes += self.chunks.len();
                Ok(m)
            }
            Err(e) => {
                self.patched[i] = false;
                Err(e)
            }
        }
    }

    /// Keeps the tentative patch: the edge stays patched and its run becomes the current one.
    pub fn accept(&mut self) -> Result<()> {
        let p = self
            .pending
            .take()
            .ok_or_else(|| Error::invalid("no tentative patch to accept"))?;
        for (c, u) in p.updates.into_iter().enumerate() {
            self.apply(c, u);
        }
        if let Some(v) = self.visit.as_mut() {
            v.sums = p.visit_sums;
        }
        self.metric = p.metric;
        Ok(())
    }

    /// Drops the tentative patch: the edge is restored.
    pub fn reject(&mut self) -> Result<()> {
        let p = self
            .pending
            .take()
            .ok_or_else(|| Error::invalid("no tentative patch to reject"))?;
        self.patched[p.index] = false;
        Ok(())
    }

    /// Patches an edge of the visited reader without a pass: its node no longer reaches the
    /// logits (ACDC's disconnected nodes), so nothing reads what changes.
    pub fn remove_untried(&mut self, writer: usize, reader: usize) -> Result<()> {
        let i = self.check_edge(writer, reader)?;
        self.patched[i] = true;
        self.visit = None;
        Ok(())
    }

    /// Ends the visited reader's visit: it becomes decided, and its node and everything it
    /// reaches are recomputed in the canonical form. Returns the current metric.
    pub fn finish_reader(&mut self) -> Result<f32> {
        let reader = self
            .visiting()
            .ok_or_else(|| Error::invalid("every reader is decided"))?;
        if self.pending.is_some() {
            return Err(Error::invalid(
                "a tentative patch is waiting for accept or reject",
            ));
        }
        self.position += 1;
        self.visit = None;
        if self.replay {
            self.metric =
                metric_with_patch(self.model, self.prepared, self.metric_kind, &self.patched)?;
            return Ok(self.metric);
        }
        let needs = self.needs(&self.patched);
        for c in 0..self.chunks.len() {
            let u = self.pass(c, reader, None, &needs)?;
            self.apply(c, u);
        }
        self.metric = self.combined(&vec![None; self.chunks.len()])?;
        Ok(self.metric)
    }

    fn apply(&mut self, c: usize, u: ChunkUpdate) {
        let st = &mut self.chunks[c];
        for (w, t) in u.writers {
            st.writers[w] = t;
        }
        for (node, letter, t) in u.proj {
            st.proj[node][letter] = t;
        }
        if let Some(m) = u.metric {
            st.metric = m;
        }
    }

    /// One chunk's pass: `forced`'s input changed (to `forced_input`, or to its canonical form
    /// when `None`); recomputes its node and every live node reached through unpatched edges,
    /// each at the rows it is needed at.
    fn pass(
        &self,
        c: usize,
        forced: usize,
        forced_input: Option<Tensor>,
        needs: &[Need],
    ) -> Result<ChunkUpdate> {
        let g = self.graph;
        let model = self.model;
        let nr = g.n_readers();
        let st = &self.chunks[c];
        let ctx = self.ctx(c);
        let mut writers: Vec<Tensor> = st.writers.clone();
        let mut changed: Vec<usize> = Vec::new();
        let mut update = ChunkUpdate::default();
        let reads_changed = |r: usize, changed: &[usize]| -> bool {
            let up = g.n_upstream(r);
            changed.iter().any(|&u| u < up && !self.patched[u * nr + r])
        };
        // A reader's new input: the forced one, else its canonical sum.
        let canonical = |r: usize, changed: &[usize], writers: &[Tensor]| -> Result<NodeInput> {
            if !self.decided(r) && changed.iter().any(|&u| u < g.n_upstream(r)) {
                return Err(Error::invalid(format!(
                    "incremental ACDC: undecided reader {} depends on a changed writer",
                    g.reader_name(r)
                )));
            }
            self.canonical_input(c, r, writers, &st.sites, self.reader_need(r, needs))
        };
        let mut forced_input = forced_input.map(NodeInput::Rows);
        for l in layer_of(&g, forced)..g.n_layers {
            let mut lw: Option<std::sync::Arc<Block>> = None;
            // The layer's dirty heads, with the forced reader's input where it is one of theirs.
            // Heads of one layer read only writers below it: they are independent of each other.
            let mut dirty_heads: Vec<(usize, [bool; 3], Option<NodeInput>)> = Vec::new();
            for h in 0..g.n_heads {
                let node = g.writer_index(Writer::Head { layer: l, head: h });
                let readers = head_readers(&g, l, h);
                let dirty = readers.map(|r| r == forced || reads_changed(r, &changed));
                if !dirty.iter().any(|&d| d) || needs[node] == Need::None {
                    continue;
                }
                let given = forced_input.take_if(|_| readers.contains(&forced));
                dirty_heads.push((h, dirty, given));
            }
            if !dirty_heads.is_empty() {
                let w = model.layer(l)?;
                lw = Some(w.clone());
                // One head per thread, its input sums included: a head's products ([512, 768]
                // × [768, 64] on GPT-2) are too small to split over threads without much of
                // the time going to waking and joining them.
                let (changed_now, writers_now) = (&changed, &writers);
                let outs = dirty_heads
                    .into_par_iter()
                    .map(|(h, dirty, mut given)| {
                        let mut inputs: [Option<NodeInput>; 3] = [None, None, None];
                        for (letter, r) in head_readers(&g, l, h).into_iter().enumerate() {
                            if dirty[letter] {
                                inputs[letter] = Some(match given.take_if(|_| r == forced) {
                                    Some(t) => t,
                                    None => canonical(r, changed_now, writers_now)?,
                                });
                            }
                        }
                        let node = g.writer_index(Writer::Head { layer: l, head: h });
                        let hn = l * g.n_heads + h;
                        ctx.head(&w, l, h, needs[node], inputs, &st.proj[hn])
                            .map(|r| (h, r))
                    })
                    .collect::<Result<Vec<_>>>()?;
                for (h, (new, out)) in outs {
                    let node = g.writer_index(Writer::Head { layer: l, head: h });
                    let hn = l * g.n_heads + h;
                    for (letter, t) in new.into_iter().enumerate() {
                        if let Some(t) = t {
                            update.proj.push((hn, letter, t));
                        }
                    }
                    writers[node] = out.clone();
                    update.writers.push((node, out));
                    changed.push(node);
                }
            }
            if g.has_mlp {
                let r = g.reader_index(Reader::Mlp { layer: l });
                let node = g.writer_index(Writer::Mlp { layer: l });
                if (r == forced || reads_changed(r, &changed)) && needs[node] != Need::None {
                    let lw = match &lw {
                        Some(w) => w.clone(),
                        None => model.layer(l)?,
                    };
                    let input = match forced_input.take_if(|_| r == forced) {
                        Some(t) => t,
                        None => canonical(r, &changed, &writers)?,
                    };
                    let out = ctx.mlp(&lw, needs[node], input)?;
                    writers[node] = out.clone();
                    update.writers.push((node, out));
                    changed.push(node);
                }
            }
        }
        let r = g.reader_index(Reader::Logits);
        if r == forced || reads_changed(r, &changed) {
            let input = match forced_input.take_if(|_| r == forced) {
                Some(t) => t,
                None => canonical(r, &changed, &writers)?,
            };
            update.metric = Some(self.chunk_metric(c, &input.rows()?)?);
        }
        Ok(update)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused CPU sum and the candle composition (any other device or layout) add in the
    /// same order, so they agree bit for bit; and extending a sum by a term equals summing all.
    #[test]
    fn input_sums_agree_across_paths_and_extend_exactly() {
        let dev = Device::Cpu;
        let t = |seed: u64| {
            let v: Vec<f32> = (0..6 * 4)
                .map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 37.0 - 13.0)
                .collect();
            Tensor::from_vec(v, (6, 4), &dev).unwrap()
        };
        let ts: Vec<Tensor> = (0..6).map(t).collect();
        // Same values, non-contiguous layout: takes the composite path.
        let strided = |x: &Tensor| x.t().unwrap().contiguous().unwrap().t().unwrap();
        let st: Vec<Tensor> = ts.iter().map(strided).collect();
        let bits = |x: &Tensor| -> Vec<u32> {
            ops::to_vec(x)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        for rows in [None, Some(&[5usize, 1, 3][..])] {
            let terms: Vec<(&Tensor, &Tensor)> =
                vec![(&ts[0], &ts[1]), (&ts[2], &ts[3]), (&ts[4], &ts[5])];
            let sterms: Vec<(&Tensor, &Tensor)> =
                vec![(&st[0], &st[1]), (&st[2], &st[3]), (&st[4], &st[5])];
            let fast = fold(None, &terms, rows).unwrap().unwrap();
            let slow = fold(None, &sterms, rows).unwrap().unwrap();
            assert_eq!(bits(&fast), bits(&slow));
            let head = fold(None, &terms[..2], rows).unwrap();
            let extended = fold(head.as_ref(), &terms[2..], rows).unwrap().unwrap();
            assert_eq!(bits(&fast), bits(&extended));
            // The values themselves, by hand for one element.
            let r0 = rows.map_or(0, |r| r[0]);
            let e = |k: usize| ops::to_vec(&ts[k]).unwrap()[r0 * 4 + 2];
            let want = ((e(0) - e(1)) + (e(2) - e(3))) + (e(4) - e(5));
            assert_eq!(ops::to_vec(&fast).unwrap()[2].to_bits(), want.to_bits());
        }
        assert!(fold(None, &[], None).unwrap().is_none());
    }

    #[test]
    fn rows_split_and_join_round_trip() {
        let dev = Device::Cpu;
        let (b, p, c) = (3, 4, 2);
        let x = Tensor::arange(0f32, (b * p * c) as f32, &dev)
            .unwrap()
            .reshape((b * p, c))
            .unwrap();
        let (rest, last) = split_rows(&x, b, p).unwrap();
        // The last position of sequence 1 is row 1·p + p − 1 = 7.
        assert_eq!(
            last.get(1).unwrap().to_vec1::<f32>().unwrap(),
            vec![14.0, 15.0]
        );
        let back = join_rows(rest.as_ref(), &last, b, p).unwrap();
        assert_eq!(ops::to_vec(&back).unwrap(), ops::to_vec(&x).unwrap());
        let zeros = join_rows(None, &last, b, p).unwrap();
        assert_eq!(
            zeros.get(7).unwrap().to_vec1::<f32>().unwrap(),
            vec![14.0, 15.0]
        );
        assert_eq!(
            zeros.get(6).unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0, 0.0]
        );
    }
}
