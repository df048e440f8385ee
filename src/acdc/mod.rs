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
//! the previous layers' MLP, then their heads from H−1 down to 0, …, `input` last. The graph's
//! [`visit_order`] and [`run_acdc`] follow exactly that: logits; per layer from the last: `m{L}`,
//! `a{L}.h{H−1..0}<q>`, `<k>`, `<v>`; senders from the highest writer index down to 0 (our writer
//! order per layer is heads then MLP, so reversed it is MLP, then heads H−1..0).
//!
//! # Files
//!
//! * this file — [`run_acdc`], [`visit_reader`] and the types of a run ([`AcdcOptions`],
//!   [`AcdcStep`], [`AcdcResult`]);
//! * [`incremental`] — [`AcdcState`], the exact patched forwards computed incrementally;
//! * [`persist`] — [`Persist`] and [`Checkpoint`]: the step log and resumable checkpoints;
//! * [`sweep`] — [`threshold_sweep`], one ACDC run per τ and the ROC through their circuits;
//! * [`hybrid`](mod@hybrid) — the EAP→ACDC hybrid: ACDC started from EAP's pruned graph;
//! * [`timing`] — [`time_steps`], ACDC's unit of work timed for `eap bench`.
//!
//! Neighbours: the prepared runs come from [`crate::runs`], the visit order from
//! [`crate::graph`], the exact patching the tests hold it to from [`crate::patching`], ROC
//! curves from [`crate::eval`], EAP's scores for the hybrid from [`crate::attribution`].

pub mod hybrid;
pub mod incremental;
pub mod persist;
pub mod sweep;
pub mod timing;

use std::io::Write;
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use hybrid::{hybrid, prune_mask, PruneWith};
pub use incremental::AcdcState;
pub use persist::{Checkpoint, Persist, RunIdentity};
pub use sweep::{log_thresholds, metric_scale, rates, threshold_sweep, Sweep, SweepPoint};
pub use timing::{time_steps, StepTiming};

use crate::graph::{visit_order, Circuit, CircuitFile, Graph, Reader, Scores, Writer};
use crate::model::Model;
use crate::runs::{Ablation, PreparedChunk};
use crate::tasks::{Dataset, Metric};
use crate::{Error, Result};
use persist::{
    fingerprint, mask_string, remove_stale_temporaries, restore_log, validate, validate_steps,
    CHECKPOINT_VERSION,
};

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
    /// The model, examples and options behind the prepared runs, recorded in checkpoints so a
    /// resume continues only the same run ([`RunIdentity`]).
    pub identity: RunIdentity,
    /// Progress on stderr: over the readers of one run; over the thresholds of a sweep
    /// ([`threshold_sweep`], whose runs then show none).
    pub progress: bool,
}

impl AcdcOptions {
    /// Real edges of `graph` left for ACDC to decide: those not patched from the start.
    pub fn start_edges(&self, graph: &Graph) -> usize {
        let patched = self.initial_patched.as_ref().map_or(0, |m| {
            m.iter()
                .zip(graph.real_edge_mask())
                .filter(|&(&p, r)| p && r)
                .count()
        });
        graph.n_edges() - patched
    }
}

impl Default for AcdcOptions {
    fn default() -> Self {
        AcdcOptions {
            threshold: 0.01,
            metric: Metric::Kl,
            initial_patched: None,
            identity: RunIdentity::default(),
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

impl AcdcResult {
    /// The circuit file of the run: its circuit and scores, [`AcdcResult::meta`] plus the
    /// model, the task and the ablation.
    pub fn file(&self, model: &Model, data: &Dataset, ablation: Ablation) -> Result<CircuitFile> {
        let mut meta = self.meta();
        meta["model"] = serde_json::json!(model.name);
        meta["d_model"] = serde_json::json!(model.cfg.d_model);
        meta["task"] = serde_json::json!(data.name);
        meta["n_examples"] = serde_json::json!(data.examples.len());
        meta["ablation"] = serde_json::json!(ablation.to_string());
        CircuitFile::new(self.scores.clone(), self.circuit.clone(), meta)
    }

    /// What the run kept and what it cost, and its rates against `truth`, as `eap acdc`
    /// prints them.
    pub fn report(&self, truth: Option<&Circuit>) -> Result<String> {
        let tried = self.steps.iter().filter(|s| s.tried).count();
        let mut out = format!(
            "ACDC ({}, τ = {}): kept {} of {} edges; {} tried; metric {:.5} -> {:.5}\n",
            self.metric_kind,
            self.threshold,
            self.circuit.n_edges(),
            self.circuit.graph.n_edges(),
            tried,
            self.initial_metric,
            self.metric
        );
        out += &format!(
            "{} forward passes in {:.2} s ({:.0} passes/s)\n",
            self.forward_passes,
            self.seconds,
            self.passes_per_second()
        );
        if let Some(t) = truth {
            let (fpr, tpr) = rates(&self.circuit, t)?;
            out += &format!(
                "against the ground truth ({} edges): TPR {tpr:.3}, FPR {fpr:.4}\n",
                t.n_edges()
            );
        }
        Ok(out)
    }
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
                return Err(Error::MaskLength {
                    what: "the initial patch mask",
                    expected: nw * nr,
                    found: m.len(),
                });
            }
            m.iter().zip(&real).map(|(&a, &b)| a && b).collect()
        }
        None => vec![false; nw * nr],
    };
    let order = visit_order(&graph);
    let fp = fingerprint(
        &graph,
        opts.threshold,
        opts.metric,
        opts.initial_patched.as_ref(),
        prepared,
        &opts.identity,
    );
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
        Some(p) if p.resume => {
            remove_stale_temporaries(&p.checkpoint);
            if !p.checkpoint.exists() {
                return Err(Error::Checkpoint {
                    path: p.checkpoint.clone(),
                    message: "no checkpoint to resume from (run without --resume to start afresh)"
                        .into(),
                });
            }
            Some(Checkpoint::read(&p.checkpoint)?)
        }
        _ => None,
    };
    if let (Some(ck), Some(p)) = (resumed, persist) {
        let ok = validate(&p.checkpoint, &ck, &fp, &graph, &initial)?;
        patched = ok.patched;
        for &(i, v) in &ck.scores {
            scores.values[i] = v;
        }
        position = ok.position;
        checkpoint_metric = Some(ck.metric);
        initial_metric = Some(ck.initial_metric);
        passes_before = ck.forward_passes;
        seconds_before = ck.seconds;
        steps = restore_log(&p.log, ck.steps_logged)?;
        let logged: Vec<_> = steps
            .iter()
            .map(|s| (s.writer, s.reader, s.removed, s.edge.as_str()))
            .collect();
        validate_steps(&p.log, &logged, &graph, &patched, &initial)?;
    } else if let Some(p) = persist {
        remove_stale_temporaries(&p.checkpoint);
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

    let label = format!("ACDC τ={}", opts.threshold);
    let mut bar = crate::progress::Progress::new(opts.progress, label, order.len(), "readers");
    bar.set_position(position);
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
                version: CHECKPOINT_VERSION,
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
            "{} edges kept, {:.0} passes/s",
            real.iter()
                .zip(state.patched())
                .filter(|(&r, &p)| r && !p)
                .count(),
            (state.passes - build_passes) as f64 / start.elapsed().as_secs_f64().max(1e-9)
        ));
        bar.inc(1);
        on_reader(done_here);
    }
    bar.finish();
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
        .ok_or(Error::AcdcState("every reader is decided"))?;
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
