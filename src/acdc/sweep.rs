//! ACDC's threshold sweep.
//!
//! [`threshold_sweep`] runs ACDC once per τ; each run's circuit is one `(FPR, TPR)` point
//! against a ground truth, and [`crate::eval::roc_from_points`] turns the points into a curve
//! and its areas, the way the ACDC paper draws its ROC curves.

use std::time::Instant;

use serde::Serialize;

use super::{run_acdc, AcdcOptions, AcdcResult};
use crate::eval::{roc_from_points, FaithfulnessBaseline, Roc};
use crate::graph::Circuit;
use crate::model::Model;
use crate::progress::Progress;
use crate::runs::PreparedChunk;
use crate::tasks::Metric;
use crate::{Error, Result};

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

impl Sweep {
    /// One line per threshold, the passes, and the sweep's ROC areas, as `eap acdc` prints
    /// them.
    pub fn report(&self) -> String {
        let mut out = format!(
            "{:>10} {:>7} {:>7} {:>7} {:>12} {:>8} {:>9}\n",
            "τ", "edges", "FPR", "TPR", "metric", "passes", "time"
        );
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.3}"));
        for p in &self.points {
            out += &format!(
                "{:>10} {:>7} {:>7} {:>7} {:>12.5} {:>8} {:>8.2}s\n",
                p.threshold,
                p.edges,
                opt(p.fpr),
                opt(p.tpr),
                p.metric,
                p.forward_passes,
                p.seconds
            );
        }
        out += &format!(
            "{} forward passes in {:.2} s ({:.0} passes/s)\n",
            self.forward_passes,
            self.seconds,
            self.forward_passes as f64 / self.seconds.max(1e-9)
        );
        if let Some(roc) = &self.roc {
            out += &format!(
                "ROC AUC over the sweep: {:.4} (trapezoid), {:.4} (ACDC pessimistic)\n",
                roc.auc_trapezoid, roc.auc_staircase
            );
        }
        out
    }

    /// The sweep's summary file: its points, ROC and cost.
    pub fn summary(&self, metric: Metric) -> serde_json::Value {
        serde_json::json!({
            "method": "acdc-sweep", "metric": metric.to_string(), "points": self.points,
            "roc": self.roc.as_ref().map(|r| serde_json::json!({"points": r.points, "auc_trapezoid": r.auc_trapezoid, "auc_pessimistic": r.auc_staircase})),
            "forward_passes": self.forward_passes, "seconds": self.seconds,
        })
    }
}

/// `(FPR, TPR)` of a circuit against a ground truth over the real edges.
pub fn rates(circuit: &Circuit, truth: &Circuit) -> Result<(f64, f64)> {
    circuit.graph.expect(&truth.graph, "the ground truth")?;
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
    // One progress over the thresholds: a bar per run would be a screenful of bars.
    let label = match base.initial_patched {
        Some(_) => "EAP→ACDC sweep",
        None => "ACDC sweep",
    };
    let mut bar = Progress::new(base.progress, label, thresholds.len(), "thresholds");
    for &threshold in thresholds {
        let opts = AcdcOptions {
            threshold,
            progress: false,
            ..base.clone()
        };
        let run = run_acdc(model, prepared, &opts, None, &mut |_| {})?;
        bar.set_message(format!("τ={threshold}: {} edges", run.circuit.n_edges()));
        bar.inc(1);
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
    bar.finish();
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
    Ok(FaithfulnessBaseline::new(model, prepared, metric)?.scale())
}
