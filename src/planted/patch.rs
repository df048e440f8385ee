//! Exact edge patching against the corrupted run for the planted models' checks: a thin handle
//! over [`crate::patching`] that keeps the prepared chunks (baselines, clean logits) for many
//! patched forwards.

use crate::graph::{Graph, Scores};
use crate::model::Model;
use crate::patching::{exact_edge_scores_prepared, metric_with_patch};
use crate::runs::{prepare, Ablation, PreparedChunk, Runner, DEFAULT_MEMORY_BUDGET};
use crate::tasks::{Dataset, Metric};
use crate::Result;

/// A model and a dataset prepared for many patched forwards: the corrupted run is computed
/// once. The metric of a patched run is the mean over all examples.
pub struct Patcher<'a> {
    model: &'a Model,
    metric: Metric,
    prepared: Vec<PreparedChunk>,
}

impl<'a> Patcher<'a> {
    pub fn new(model: &'a Model, dataset: &Dataset, metric: Metric) -> Result<Patcher<'a>> {
        let runner = Runner::new(
            model,
            dataset,
            Ablation::Corrupted,
            dataset.examples.len().max(1),
            DEFAULT_MEMORY_BUDGET,
        )?;
        Ok(Patcher {
            model,
            metric,
            prepared: prepare(&runner)?,
        })
    }

    pub fn graph(&self) -> Graph {
        self.model.graph()
    }

    /// The metric with the edges set in `patched` (row-major `[n_writers, n_readers]`)
    /// carrying the corrupted run's writer outputs.
    pub fn metric(&self, patched: &[bool]) -> Result<f32> {
        metric_with_patch(self.model, &self.prepared, self.metric, patched)
    }

    /// `M(only that edge patched) − M(clean)` for every real edge.
    pub fn per_edge_scores(&self) -> Result<Scores> {
        exact_edge_scores_prepared(self.model, &self.prepared, self.metric, false)
    }
}

/// The mean metric over `dataset` when the edges set in `patched_edges_mask` (row-major
/// `[n_writers, n_readers]`, as [`crate::graph::Circuit::edges`]) carry the corrupted run's
/// writer outputs. All false: the clean model; every real edge: the corrupted run.
pub fn patched_metric(
    model: &Model,
    dataset: &Dataset,
    metric: Metric,
    patched_edges_mask: &[bool],
) -> Result<f32> {
    Patcher::new(model, dataset, metric)?.metric(patched_edges_mask)
}
