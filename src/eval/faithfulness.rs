//! Faithfulness of circuits on one model, dataset and metric: `M(full)` and `M(∅)` are run
//! once ([`FaithfulnessBaseline::new`]), then each circuit costs one patched run
//! ([`FaithfulnessBaseline::of`]).
//!
//! Neighbours: the patched runs are [`crate::patching::metric_with_patch`] over
//! [`crate::runs::PreparedChunk`]s; the ratio is [`super::faithfulness`].

use crate::graph::{Circuit, Scores};
use crate::model::Model;
use crate::patching::{complement, metric_with_patch};
use crate::progress::Progress;
use crate::runs::PreparedChunk;
use crate::tasks::Metric;
use crate::Result;

/// The three metric values faithfulness needs, and the ratio.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faithfulness {
    /// M(C): only the circuit's edges carry clean activations.
    pub circuit: f32,
    /// M(∅): every edge ablated.
    pub empty: f32,
    /// M(full): nothing ablated.
    pub full: f32,
    /// `(M(C) − M(∅)) / (M(full) − M(∅))`.
    pub faithfulness: f64,
}

impl Faithfulness {
    /// The values of a circuit of `edges` edges under `metric`, as `eap evaluate --json`
    /// prints them.
    pub fn to_json(&self, edges: usize, metric: Metric) -> serde_json::Value {
        serde_json::json!({"edges": edges, "metric": metric.to_string(), "m_circuit": self.circuit, "m_empty": self.empty, "m_full": self.full, "faithfulness": self.faithfulness})
    }

    /// The same as one line of text.
    pub fn summary(&self, edges: usize, metric: Metric) -> String {
        format!(
            "circuit of {edges} edges: {metric} full {:.4}, empty {:.4}, circuit {:.4} -> faithfulness {:.3}",
            self.full, self.empty, self.circuit, self.faithfulness
        )
    }
}

/// Faithfulness of one circuit, as `eap evaluate` measures it: `M(full)`, `M(∅)`, then the
/// circuit's, one patched run over the data each, with progress on stderr.
pub fn evaluate_circuit(
    model: &Model,
    prepared: &[PreparedChunk],
    metric: Metric,
    circuit: &Circuit,
) -> Result<Faithfulness> {
    let mut bar = Progress::new(true, "faithfulness", 3, "patched runs");
    let baseline = FaithfulnessBaseline::new(model, prepared, metric)?;
    bar.inc(2);
    let f = baseline.of(circuit)?;
    bar.inc(1);
    bar.finish();
    Ok(f)
}

/// The two ends faithfulness is measured between, for one model, dataset and metric.
pub struct FaithfulnessBaseline<'a> {
    model: &'a Model,
    prepared: &'a [PreparedChunk],
    metric: Metric,
    /// M(full): nothing ablated.
    pub full: f32,
    /// M(∅): every real edge ablated.
    pub empty: f32,
}

impl<'a> FaithfulnessBaseline<'a> {
    /// Runs the full model and the empty circuit (two forwards per chunk).
    pub fn new(
        model: &'a Model,
        prepared: &'a [PreparedChunk],
        metric: Metric,
    ) -> Result<FaithfulnessBaseline<'a>> {
        let graph = model.graph();
        let full = metric_with_patch(
            model,
            prepared,
            metric,
            &vec![false; graph.n_writers() * graph.n_readers()],
        )?;
        let empty = metric_with_patch(model, prepared, metric, &graph.real_edge_mask())?;
        Ok(FaithfulnessBaseline {
            model,
            prepared,
            metric,
            full,
            empty,
        })
    }

    /// `|M(full) − M(∅)|`: the scale a task metric's ACDC threshold is given in.
    pub fn scale(&self) -> f32 {
        (self.full - self.empty).abs()
    }

    /// Faithfulness of `circuit`: every edge outside it patched (one forward per chunk).
    pub fn of(&self, circuit: &Circuit) -> Result<Faithfulness> {
        self.model.graph().expect(&circuit.graph, "the circuit")?;
        let value =
            metric_with_patch(self.model, self.prepared, self.metric, &complement(circuit))?;
        Ok(Faithfulness {
            circuit: value,
            empty: self.empty,
            full: self.full,
            faithfulness: super::faithfulness(value as f64, self.empty as f64, self.full as f64)?,
        })
    }

    /// Faithfulness of the top `k` edges by |score| (unpruned).
    pub fn of_top(&self, scores: &Scores, k: usize) -> Result<Faithfulness> {
        self.of(&Circuit::top_n(scores, k))
    }
}
