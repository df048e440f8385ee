//! ACDC (Conmy et al. 2023, "Towards Automated Circuit Discovery for Mechanistic
//! Interpretability"; `acdc/TLACDCExperiment.py` of ArthurConmy/Automatic-Circuit-Discovery) on
//! the exact edge patching of DESIGN §3, and the EAP→ACDC hybrid (Syed et al. §5.2).
//!
//! # The algorithm, as ACDC runs it
//!
//! Start from the full model (every edge clean) — or, for the hybrid, with every edge whose
//! |EAP score| is small already patched. Visit the readers in reverse topological order. For
//! each incoming edge of the reader, from the latest writer back to `input`, patch it to the
//! baseline (corrupted) activation and run the model: an exact patched forward, never a linear
//! estimate, computed incrementally by [`AcdcState`] (only the nodes the patched edge reaches
//! are recomputed; the tests hold it to a from-scratch [`PatchPlan`](crate::model::PatchPlan)
//! forward). With `Δ = M(with the edge
//! patched) − M(current circuit)`:
//!
//! * KL divergence to the clean run (the default, as in ACDC): remove the edge when `Δ < τ`
//!   (ACDC's `abs_value_threshold = False`: an edge whose removal lowers the KL goes too);
//! * a task metric (logit-diff, prob-diff, nll): remove the edge when `|Δ| < τ`.
//!
//! A removed edge stays patched and the current metric becomes the patched one; otherwise the
//! edge is restored. So each decision is taken against the *current* circuit, not the full
//! model. The edge's score is its signed `Δ` when it was tried (ACDC's `effect_size`); edges
//! never tried score 0.
//!
//! **Disconnected nodes.** ACDC's `increment_current_node` skips a node none of whose outgoing
//! edges is still present (`current_node_connected`), and removes all of its incoming edges
//! without trying them: its output no longer reaches the logits, so patching its inputs cannot
//! change the metric. We do the same: a head's q/k/v readers, or an MLP's reader, are skipped
//! when the head's (MLP's) writer has no unpatched outgoing edge left; their incoming edges are
//! patched and logged as `tried: false`. (Every consumer of a writer sits in a later layer or is
//! the logits, so all of them have been decided by the time its readers are visited.)
//!
//! **Order.** ACDC walks its correspondence graph's `OrderedDict`, which `setup_from_model`
//! fills from the output down: `hook_resid_post` (logits), then for each layer from the last,
//! `hook_mlp_in`, then the q inputs of all heads (head H−1 first), then all k inputs, then all v
//! inputs. Senders of a receiver come in the order their edges were added, latest writer first:
//! the previous layers' MLP, then their heads from H−1 down to 0, …, `input` last. [`visit_order`]
//! and [`run_acdc`] follow exactly that: logits; per layer from the last: `m{L}`,
//! `a{L}.h{H−1..0}<q>`, `<k>`, `<v>`; senders from the highest writer index down to 0 (our writer
//! order per layer is heads then MLP, so reversed it is MLP, then heads H−1..0).
//!
//! # Persistence
//!
//! [`Persist`] writes a JSONL log line per step (edge, metric change, kept/removed) and an
//! atomic checkpoint ([`Checkpoint`], written to a temporary file in the same folder, synced,
//! then renamed) after every reader. With `resume`, a run restarts after the last finished
//! reader and, since every decision depends only on the patched set and the deterministic
//! forward, reaches the same circuit as an uninterrupted run. The log is cut back to the
//! checkpoint's step count on resume.
//!
//! # Threshold sweep
//!
//! [`threshold_sweep`] runs ACDC once per τ; each run's circuit is one `(FPR, TPR)` point
//! against a ground truth, and [`crate::eval::roc_from_points`] turns the points into a curve
//! and its areas, the way the ACDC paper draws its ROC curves.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::incremental::AcdcState;
use super::{complement, metric_with_patch, PreparedChunk};
use crate::eval::{roc_from_points, Roc};
use crate::graph::{Circuit, Graph, Reader, Scores, Writer};
use crate::model::Model;
use crate::tasks::Metric;
use crate::{Error, Result};

/// Settings of one ACDC run.
#[derive(Debug, Clone)]
pub struct AcdcOptions {
    /// τ: an edge is removed when the metric moves by less than this.
    pub threshold: f32,
    /// KL to the clean run (ACDC's default), or a task metric (then `|Δ|` is compared).
    pub metric: Metric,
    /// Edges patched from the start and never tried (the hybrid's pre-pruning), as a
    /// `[n_writers, n_readers]` mask; `None`: start from the full model.
    pub initial_patched: Option<Vec<bool>>,
    pub progress: bool,
}

impl Default for AcdcOptions {
    fn default() -> Self {
        AcdcOptions {
            threshold: 0.01,
            metric: Metric::Kl,
            initial_patched: None,
            progress: false,
        }
    }
}

/// One decision of ACDC, as logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcdcStep {
    pub writer: usize,
    pub reader: usize,
    pub edge: String,
    /// False when the edge was removed without a forward pass (its reader's node was
    /// disconnected from the logits).
    pub tried: bool,
    /// The current circuit's metric before the edge was tried.
    pub metric_before: f32,
    /// The metric with the edge (and every edge removed so far) patched; `None` when untried.
    pub metric_after: Option<f32>,
    /// `metric_after − metric_before`.
    pub delta: Option<f32>,
    pub removed: bool,
}

/// What an ACDC run found.
#[derive(Debug, Clone)]
pub struct AcdcResult {
    /// The edges left clean.
    pub circuit: Circuit,
    /// Signed `Δ` of every tried edge, 0 elsewhere.
    pub scores: Scores,
    /// The metric of the final circuit.
    pub metric: f32,
    /// The metric of the starting point (the full model, or the hybrid's pre-pruned one).
    pub initial_metric: f32,
    /// Forward passes (one per chunk and evaluation), including those before a resume.
    pub forward_passes: usize,
    /// Wall time, including the time before a resume.
    pub seconds: f64,
    /// Every step, including those before a resume (read back from the log).
    pub steps: Vec<AcdcStep>,
    pub threshold: f32,
    pub metric_kind: Metric,
}

impl AcdcResult {
    pub fn passes_per_second(&self) -> f64 {
        self.forward_passes as f64 / self.seconds.max(1e-9)
    }

    /// The circuit file's `meta`.
    pub fn meta(&self) -> serde_json::Value {
        serde_json::json!({
            "method": "acdc",
            "metric": self.metric_kind.to_string(),
            "threshold": self.threshold,
            "edges": self.circuit.n_edges(),
            "metric_initial": self.initial_metric,
            "metric_final": self.metric,
            "forward_passes": self.forward_passes,
            "seconds": self.seconds,
            "passes_per_second": self.passes_per_second(),
            "score_convention": "ACDC effect size: M(edge patched) - M(current circuit) when the edge was tried; 0 for untried edges",
        })
    }
}

/// Readers in ACDC's visiting order (see the module docs).
pub fn visit_order(graph: &Graph) -> Vec<usize> {
    let mut order = vec![graph.reader_index(Reader::Logits)];
    for layer in (0..graph.n_layers).rev() {
        if graph.has_mlp {
            order.push(graph.reader_index(Reader::Mlp { layer }));
        }
        for qkv in crate::graph::Qkv::ALL {
            for head in (0..graph.n_heads).rev() {
                order.push(graph.reader_index(Reader::Head { layer, head, qkv }));
            }
        }
    }
    order
}

/// The writer whose node a reader feeds; `None` for the logits.
fn node_writer(graph: &Graph, reader: usize) -> Option<usize> {
    match graph.reader(reader) {
        Reader::Head { layer, head, .. } => Some(graph.writer_index(Writer::Head { layer, head })),
        Reader::Mlp { layer } => Some(graph.writer_index(Writer::Mlp { layer })),
        Reader::Logits => None,
    }
}

/// Whether `writer` still has an unpatched outgoing edge.
fn connected(graph: &Graph, patched: &[bool], writer: usize) -> bool {
    let nr = graph.n_readers();
    (0..nr).any(|r| graph.is_edge(writer, r) && !patched[writer * nr + r])
}

/// Where a run keeps its log and checkpoints.
#[derive(Debug, Clone)]
pub struct Persist {
    pub checkpoint: PathBuf,
    pub log: PathBuf,
    /// Continue from `checkpoint` when it exists.
    pub resume: bool,
}

impl Persist {
    /// `circuit.json` → `circuit.acdc-checkpoint.json` and `circuit.acdc-steps.jsonl`.
    pub fn beside(out: &Path, resume: bool) -> Persist {
        let stem = out
            .file_stem()
            .map_or("circuit".to_string(), |s| s.to_string_lossy().into_owned());
        let dir = out.parent().unwrap_or(Path::new(""));
        Persist {
            checkpoint: dir.join(format!("{stem}.acdc-checkpoint.json")),
            log: dir.join(format!("{stem}.acdc-steps.jsonl")),
            resume,
        }
    }
}

/// The state after a finished reader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// What the run was started with; a resume must match it.
    pub fingerprint: serde_json::Value,
    /// Position in [`visit_order`] of the next reader to visit.
    pub next_position: usize,
    /// `[n_writers, n_readers]` patched mask as a string of `0`/`1`.
    pub patched: String,
    /// `(matrix index, Δ)` of every tried edge.
    pub scores: Vec<(usize, f32)>,
    pub metric: f32,
    pub initial_metric: f32,
    pub forward_passes: usize,
    pub steps_logged: usize,
    pub seconds: f64,
}

impl Checkpoint {
    pub fn read(path: &Path) -> Result<Checkpoint> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| {
            Error::invalid(format!("{}: not an ACDC checkpoint ({e})", path.display()))
        })
    }

    fn write_atomic(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec(self).map_err(|e| Error::invalid(e.to_string()))?;
        write_atomic(path, &bytes)
    }
}

pub use crate::fsutil::write_atomic;

fn mask_string(mask: &[bool]) -> String {
    mask.iter().map(|&b| if b { '1' } else { '0' }).collect()
}

fn parse_mask(s: &str, len: usize) -> Result<Vec<bool>> {
    if s.len() != len {
        return Err(Error::invalid(format!(
            "checkpoint mask has {} entries, expected {len}",
            s.len()
        )));
    }
    s.chars()
        .map(|c| match c {
            '0' => Ok(false),
            '1' => Ok(true),
            other => Err(Error::invalid(format!("checkpoint mask holds `{other}`"))),
        })
        .collect()
}

fn fingerprint(graph: &Graph, opts: &AcdcOptions, prepared: &[PreparedChunk]) -> serde_json::Value {
    // FNV-1a over the indices of the initially patched edges.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    if let Some(mask) = &opts.initial_patched {
        for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
            for b in (i as u64).to_le_bytes() {
                hash ^= b as u64;
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    let n_examples: usize = prepared.iter().map(|p| p.chunk.indices.len()).sum();
    serde_json::json!({
        "graph": graph,
        "threshold": opts.threshold,
        "metric": opts.metric.to_string(),
        "n_examples": n_examples,
        "initial_patched": opts.initial_patched.as_ref().map(|m| m.iter().filter(|&&b| b).count()),
        "initial_patched_hash": format!("{hash:016x}"),
    })
}

/// Reads the first `n` complete lines of the step log and cuts the file back to them.
fn restore_log(path: &Path, n: usize) -> Result<Vec<AcdcStep>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut steps = Vec::with_capacity(n);
    let mut bytes = 0u64;
    let mut reader = std::io::BufReader::new(file);
    let mut line = String::new();
    while steps.len() < n {
        line.clear();
        let read = reader
            .read_line(&mut line)
            .map_err(|e| Error::io(path, e))?;
        if read == 0 || !line.ends_with('\n') {
            return Err(Error::invalid(format!(
                "{}: the step log has fewer than the checkpoint's {n} steps",
                path.display()
            )));
        }
        bytes += read as u64;
        steps.push(
            serde_json::from_str(line.trim_end())
                .map_err(|e| Error::invalid(format!("{}: bad step line ({e})", path.display())))?,
        );
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.set_len(bytes).map_err(|e| Error::io(path, e))?;
    Ok(steps)
}

/// Runs ACDC. `on_reader(done)` is called after each reader's checkpoint with the number of
/// readers finished in this call (a test hook: the CLI can exit the process there).
pub fn run_acdc(
    model: &Model,
    prepared: &[PreparedChunk],
    opts: &AcdcOptions,
    persist: Option<&Persist>,
    on_reader: &mut dyn FnMut(usize),
) -> Result<AcdcResult> {
    let graph = model.graph();
    let (nw, nr) = (graph.n_writers(), graph.n_readers());
    if !opts.threshold.is_finite() {
        return Err(Error::invalid(format!(
            "ACDC threshold must be finite, got {}",
            opts.threshold
        )));
    }
    let real = graph.real_edge_mask();
    let initial: Vec<bool> = match &opts.initial_patched {
        Some(m) => {
            if m.len() != nw * nr {
                return Err(Error::invalid(format!(
                    "initial patch mask has {} entries, expected {}",
                    m.len(),
                    nw * nr
                )));
            }
            m.iter().zip(&real).map(|(&a, &b)| a && b).collect()
        }
        None => vec![false; nw * nr],
    };
    let order = visit_order(&graph);
    let fp = fingerprint(&graph, opts, prepared);
    let start = Instant::now();

    // State: fresh or from a checkpoint.
    let mut patched = initial.clone();
    let mut scores = Scores::zeros(graph);
    let mut steps: Vec<AcdcStep> = Vec::new();
    let mut position = 0usize;
    let mut seconds_before = 0f64;
    let mut passes_before = 0usize;
    let mut checkpoint_metric = None;
    let mut initial_metric = None;
    let resumed = match persist {
        Some(p) if p.resume && p.checkpoint.exists() => Some(Checkpoint::read(&p.checkpoint)?),
        _ => None,
    };
    if let (Some(ck), Some(p)) = (resumed, persist) {
        if ck.fingerprint != fp {
            return Err(Error::invalid(format!(
                "{} was written by a different ACDC run ({}); this run is {}",
                p.checkpoint.display(),
                ck.fingerprint,
                fp
            )));
        }
        patched = parse_mask(&ck.patched, nw * nr)?;
        for &(i, v) in &ck.scores {
            if i >= nw * nr {
                return Err(Error::invalid("checkpoint score index out of range"));
            }
            scores.values[i] = v;
        }
        position = ck.next_position.min(order.len());
        checkpoint_metric = Some(ck.metric);
        initial_metric = Some(ck.initial_metric);
        passes_before = ck.forward_passes;
        seconds_before = ck.seconds;
        steps = restore_log(&p.log, ck.steps_logged)?;
    } else if let Some(p) = persist {
        std::fs::File::create(&p.log).map_err(|e| Error::io(&p.log, e))?;
    }
    // The run under the current circuit; a resume rebuilds it from the checkpoint's mask.
    let mut state = AcdcState::build(model, prepared, opts.metric, patched, position)?;
    let build_passes = if checkpoint_metric.is_some() {
        state.passes
    } else {
        0
    };
    let mut current = state.metric();
    if let Some(m) = checkpoint_metric {
        if m.to_bits() != current.to_bits() {
            eprintln!(
                "warning: the resumed ACDC state gives metric {current}, the checkpoint {m}; \
                 continuing from the recomputed state"
            );
        }
    }
    let initial_metric = initial_metric.unwrap_or(current);
    let mut log = match persist {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&p.log)
                .map_err(|e| Error::io(&p.log, e))?,
        ),
        None => None,
    };

    let bar = if opts.progress {
        let bar = indicatif::ProgressBar::new(order.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "ACDC τ={msg} [{bar:30}] {pos}/{len} readers, {elapsed}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_position(position as u64);
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut done_here = 0usize;
    while position < order.len() {
        let first_new_step = steps.len();
        let tries = visit_reader(
            &mut state,
            opts,
            &mut current,
            &mut scores,
            &mut steps,
            None,
        )?;
        debug_assert!(tries.finished);
        position += 1;
        done_here += 1;
        let passes = passes_before + state.passes - build_passes;
        if let (Some(p), Some(log)) = (persist, log.as_mut()) {
            let mut text = String::new();
            for s in &steps[first_new_step..] {
                text += &serde_json::to_string(s).map_err(|e| Error::invalid(e.to_string()))?;
                text.push('\n');
            }
            log.write_all(text.as_bytes())
                .map_err(|e| Error::io(&p.log, e))?;
            log.sync_data().map_err(|e| Error::io(&p.log, e))?;
            Checkpoint {
                version: 1,
                fingerprint: fp.clone(),
                next_position: position,
                patched: mask_string(state.patched()),
                scores: scores
                    .values
                    .iter()
                    .enumerate()
                    .filter(|(_, &v)| v != 0.0)
                    .map(|(i, &v)| (i, v))
                    .collect(),
                metric: current,
                initial_metric,
                forward_passes: passes,
                steps_logged: steps.len(),
                seconds: seconds_before + start.elapsed().as_secs_f64(),
            }
            .write_atomic(&p.checkpoint)?;
        }
        bar.set_message(format!(
            "{} {} edges kept, {:.0} passes/s",
            opts.threshold,
            real.iter()
                .zip(state.patched())
                .filter(|(&r, &p)| r && !p)
                .count(),
            (state.passes - build_passes) as f64 / start.elapsed().as_secs_f64().max(1e-9)
        ));
        bar.inc(1);
        on_reader(done_here);
    }
    bar.finish_and_clear();
    let circuit = Circuit {
        graph,
        edges: real
            .iter()
            .zip(state.patched())
            .map(|(&r, &p)| r && !p)
            .collect(),
    };
    Ok(AcdcResult {
        circuit,
        scores,
        metric: current,
        initial_metric,
        forward_passes: passes_before + state.passes - build_passes,
        seconds: seconds_before + start.elapsed().as_secs_f64(),
        steps,
        threshold: opts.threshold,
        metric_kind: opts.metric,
    })
}

/// How a call of [`visit_reader`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Visit {
    /// Tentative patches run (one pass per chunk each).
    pub tries: usize,
    /// The reader was decided (false only when `max_tries` stopped the visit).
    pub finished: bool,
}

/// ACDC on the reader `state` is visiting: each incoming edge from the latest writer down is
/// patched tentatively and kept removed when the metric moves by less than τ (module docs);
/// edges of a node that no longer reaches the logits are removed untried. Updates `current`
/// (the current circuit's metric), the scores and the step log, then decides the reader.
/// `max_tries` stops after that many tentative patches without deciding it (benchmarks).
pub fn visit_reader(
    state: &mut AcdcState,
    opts: &AcdcOptions,
    current: &mut f32,
    scores: &mut Scores,
    steps: &mut Vec<AcdcStep>,
    max_tries: Option<usize>,
) -> Result<Visit> {
    let graph = scores.graph;
    let nr = graph.n_readers();
    let r = state
        .visiting()
        .ok_or_else(|| Error::invalid("every reader is decided"))?;
    let remove_when = |delta: f32| -> bool {
        if opts.metric == Metric::Kl {
            delta < opts.threshold
        } else {
            delta.abs() < opts.threshold
        }
    };
    let live = node_writer(&graph, r).is_none_or(|w| connected(&graph, state.patched(), w));
    let mut tries = 0;
    for w in (0..graph.n_upstream(r)).rev() {
        let i = w * nr + r;
        if state.patched()[i] {
            continue;
        }
        if !live {
            state.remove_untried(w, r)?;
            steps.push(AcdcStep {
                writer: w,
                reader: r,
                edge: graph.edge_name(w, r),
                tried: false,
                metric_before: *current,
                metric_after: None,
                delta: None,
                removed: true,
            });
            continue;
        }
        if max_tries.is_some_and(|m| tries >= m) {
            return Ok(Visit {
                tries,
                finished: false,
            });
        }
        let value = state.try_edge(w, r)?;
        tries += 1;
        let delta = value - *current;
        scores.values[i] = delta;
        let removed = remove_when(delta);
        if removed {
            state.accept()?;
            *current = value;
        } else {
            state.reject()?;
        }
        steps.push(AcdcStep {
            writer: w,
            reader: r,
            edge: graph.edge_name(w, r),
            tried: true,
            metric_before: value - delta,
            metric_after: Some(value),
            delta: Some(delta),
            removed,
        });
    }
    // The reader is decided: the state is brought to the form a resume rebuilds.
    *current = state.finish_reader()?;
    Ok(Visit {
        tries,
        finished: true,
    })
}

/// What [`time_steps`] measured.
#[derive(Debug, Clone, Copy)]
pub struct StepTiming {
    /// Forward passes (tentative patches × chunks) in the timed part.
    pub passes: usize,
    /// Tentative patches whose edge stayed removed.
    pub removed: usize,
    /// Wall time of the steps, reader boundaries included; the state's build excluded.
    pub seconds: f64,
    /// The one full pass that builds the state.
    pub build_seconds: f64,
    /// Nodes of the starting circuit needed at the metric's rows only, and at every row.
    pub nodes_last_only: usize,
    pub nodes_all_rows: usize,
}

impl StepTiming {
    pub fn passes_per_second(&self) -> f64 {
        self.passes as f64 / self.seconds.max(1e-9)
    }
}

/// Runs ACDC for `steps` tentative patches from visit position `position`, with `patched` as
/// the circuit so far (readers before `position` decided), and times them: the benchmark of
/// ACDC's unit of work at any depth of the graph.
pub fn time_steps(
    model: &Model,
    prepared: &[PreparedChunk],
    opts: &AcdcOptions,
    patched: Vec<bool>,
    position: usize,
    steps: usize,
) -> Result<StepTiming> {
    let graph = model.graph();
    let t = Instant::now();
    let mut state = AcdcState::build(model, prepared, opts.metric, patched, position)?;
    let build_seconds = t.elapsed().as_secs_f64();
    let (build_passes, mut current) = (state.passes, state.metric());
    let (nodes_last_only, nodes_all_rows) = state.row_restricted_nodes();
    let mut scores = Scores::zeros(graph);
    let mut log = Vec::new();
    let t = Instant::now();
    let mut tries = 0;
    while tries < steps && state.visiting().is_some() {
        tries += visit_reader(
            &mut state,
            opts,
            &mut current,
            &mut scores,
            &mut log,
            Some(steps - tries),
        )?
        .tries;
    }
    Ok(StepTiming {
        passes: state.passes - build_passes,
        removed: log.iter().filter(|s| s.tried && s.removed).count(),
        seconds: t.elapsed().as_secs_f64(),
        build_seconds,
        nodes_last_only,
        nodes_all_rows,
    })
}

/// The hybrid's starting mask: every real edge outside EAP's top `keep` by |score| (or with
/// |score| below `threshold`) is patched from the start.
pub fn prune_mask(
    scores: &Scores,
    keep: Option<usize>,
    threshold: Option<f32>,
) -> Result<Vec<bool>> {
    let kept =
        match (keep, threshold) {
            (Some(n), None) => Circuit::top_n(scores, n),
            (None, Some(t)) => Circuit::threshold(scores, t),
            _ => return Err(Error::invalid(
                "EAP pruning needs exactly one of a number of edges to keep or a score threshold",
            )),
        };
    Ok(complement(&kept))
}

/// One threshold's point of a sweep.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    pub threshold: f32,
    pub edges: usize,
    /// `(FPR, TPR)` against the ground truth, when there is one.
    pub fpr: Option<f64>,
    pub tpr: Option<f64>,
    pub metric: f32,
    pub forward_passes: usize,
    pub seconds: f64,
}

/// A threshold sweep: one ACDC run per τ.
#[derive(Debug, Clone)]
pub struct Sweep {
    pub points: Vec<SweepPoint>,
    pub runs: Vec<AcdcResult>,
    /// The ROC through the sweep's points (with `(0, 0)` and `(1, 1)`), when there is a truth.
    pub roc: Option<Roc>,
    pub forward_passes: usize,
    pub seconds: f64,
}

/// `(FPR, TPR)` of a circuit against a ground truth over the real edges.
pub fn rates(circuit: &Circuit, truth: &Circuit) -> Result<(f64, f64)> {
    if circuit.graph != truth.graph {
        return Err(Error::invalid(
            "circuit and ground truth are for different graphs",
        ));
    }
    let g = circuit.graph;
    let (mut tp, mut fp, mut p, mut n) = (0usize, 0usize, 0usize, 0usize);
    for (w, r) in g.edges() {
        let (c, t) = (circuit.contains(w, r), truth.contains(w, r));
        if t {
            p += 1;
            tp += c as usize;
        } else {
            n += 1;
            fp += c as usize;
        }
    }
    if p == 0 || n == 0 {
        return Err(Error::invalid(
            "the ground truth must contain some edges but not all of them",
        ));
    }
    Ok((fp as f64 / n as f64, tp as f64 / p as f64))
}

/// Runs ACDC at every threshold of `thresholds` (each from the same start) and, with a
/// ground truth, builds the ROC through the resulting `(FPR, TPR)` points.
pub fn threshold_sweep(
    model: &Model,
    prepared: &[PreparedChunk],
    base: &AcdcOptions,
    thresholds: &[f32],
    truth: Option<&Circuit>,
) -> Result<Sweep> {
    if thresholds.is_empty() {
        return Err(Error::invalid(
            "a threshold sweep needs at least one threshold",
        ));
    }
    let start = Instant::now();
    let mut points = Vec::new();
    let mut runs = Vec::new();
    for &threshold in thresholds {
        let opts = AcdcOptions {
            threshold,
            ..base.clone()
        };
        let run = run_acdc(model, prepared, &opts, None, &mut |_| {})?;
        let (fpr, tpr) = match truth {
            Some(t) => {
                let (f, p) = rates(&run.circuit, t)?;
                (Some(f), Some(p))
            }
            None => (None, None),
        };
        points.push(SweepPoint {
            threshold,
            edges: run.circuit.n_edges(),
            fpr,
            tpr,
            metric: run.metric,
            forward_passes: run.forward_passes,
            seconds: run.seconds,
        });
        runs.push(run);
    }
    let roc = match truth {
        Some(_) => Some(roc_from_points(
            points
                .iter()
                .map(|p| (p.fpr.unwrap(), p.tpr.unwrap()))
                .collect(),
        )?),
        None => None,
    };
    Ok(Sweep {
        forward_passes: runs.iter().map(|r| r.forward_passes).sum(),
        points,
        runs,
        roc,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Thresholds spaced evenly in log scale from `lo` to `hi`, `n ≥ 2` of them.
pub fn log_thresholds(lo: f32, hi: f32, n: usize) -> Vec<f32> {
    let (a, b) = ((lo as f64).ln(), (hi as f64).ln());
    (0..n)
        .map(|i| (a + (b - a) * i as f64 / (n.max(2) - 1) as f64).exp() as f32)
        .collect()
}

/// `|M(full model) − M(every edge patched)|`: the scale a task metric's τ is naturally given
/// in (two forward passes per chunk). ACDC's τ is absolute; `discover` and the tests pick
/// τ as a fraction of this so one setting suits logit differences and probabilities alike.
pub fn metric_scale(model: &Model, prepared: &[PreparedChunk], metric: Metric) -> Result<f32> {
    let g = model.graph();
    let full = metric_with_patch(
        model,
        prepared,
        metric,
        &vec![false; g.n_writers() * g.n_readers()],
    )?;
    let empty = metric_with_patch(model, prepared, metric, &g.real_edge_mask())?;
    Ok((full - empty).abs())
}
