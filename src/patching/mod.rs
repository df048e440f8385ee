//! Exact edge patching (DESIGN §3): the metric with a set of edges carrying their baseline
//! activations, and the per-edge scores that EAP approximates.
//!
//! * [`metric_with_patch`] — the metric over [`PreparedChunk`]s with a mask of edges patched:
//!   one forward per chunk, restarted from the clean run's cached prefix below the lowest
//!   patched reader; [`patched_metric`] prepares the chunks of a [`Runner`] first.
//! * [`complement`] — the mask that leaves only a circuit's edges clean.
//! * [`exact_edge_scores`] — `M(edge patched) − M(clean)` for every real edge.
//!
//! Neighbours: the runs come from [`crate::runs`]; ACDC ([`crate::acdc`]) and faithfulness
//! ([`crate::eval`]) are built on these patched runs.

use crate::graph::{Circuit, Graph};
use crate::model::{ForwardOptions, Model, PatchPlan};
use crate::runs::{logits_rows, prepare, PreparedChunk, Runner};
use crate::tasks::{metric_value, Metric};
use crate::{Error, Result};

/// The metric averaged over the whole dataset with the edges marked in `patched`
/// (`[n_writers, n_readers]` row-major) carrying their baseline activations.
pub fn patched_metric(runner: &Runner, metric: Metric, patched: &[bool]) -> Result<f32> {
    check_mask(&runner.model.graph(), patched)?;
    metric_with_patch(runner.model, &prepare(runner)?, metric, patched)
}

fn check_mask(graph: &Graph, mask: &[bool]) -> Result<()> {
    let expected = graph.n_writers() * graph.n_readers();
    if mask.len() != expected {
        return Err(Error::MaskLength {
            what: "the patch mask",
            expected,
            found: mask.len(),
        });
    }
    Ok(())
}

/// Mask of edges to patch so that only `circuit`'s edges stay clean.
pub fn complement(circuit: &Circuit) -> Vec<bool> {
    let real = circuit.graph.real_edge_mask();
    real.iter()
        .zip(&circuit.edges)
        .map(|(&r, &c)| r && !c)
        .collect()
}

/// The metric over prepared chunks with the edges in `patched` ablated: one forward per chunk.
pub fn metric_with_patch(
    model: &Model,
    prepared: &[PreparedChunk],
    metric: Metric,
    patched: &[bool],
) -> Result<f32> {
    let graph = model.graph();
    check_mask(&graph, patched)?;
    let vocab = model.cfg.d_vocab_out;
    // Layers below the lowest reader with a patched input compute exactly the clean run:
    // start from its cached prefix there.
    let nr = graph.n_readers();
    let start_layer = (0..nr)
        .filter(|&r| (0..graph.n_upstream(r)).any(|u| patched[u * nr + r]))
        .map(|r| (r / graph.readers_per_layer()).min(graph.n_layers))
        .min()
        .unwrap_or(graph.n_layers);
    let (mut total, mut count) = (0f64, 0usize);
    for p in prepared {
        let prefix = (start_layer > 0).then(|| crate::model::Prefix {
            layer: start_layer,
            x: p.clean_residuals[start_layer].clone(),
            writers: p.clean_writers
                [..graph.n_upstream((start_layer * graph.readers_per_layer()).min(nr - 1))]
                .to_vec(),
        });
        let plan = PatchPlan {
            graph,
            patched: patched.to_vec(),
            baseline: p.baseline.clone(),
        };
        let out = model.forward(
            &p.chunk.clean,
            &ForwardOptions {
                intervention: Some(&plan),
                start: prefix.as_ref(),
                ..Default::default()
            },
        )?;
        let value = metric_value(
            metric,
            &logits_rows(&out.logits)?,
            vocab,
            &p.chunk.targets,
            Some(&p.clean_logits),
        )?;
        total += value.mean as f64 * p.chunk.indices.len() as f64;
        count += p.chunk.indices.len();
    }
    let mean = (total / count.max(1) as f64) as f32;
    if !mean.is_finite() {
        return Err(Error::NonFinite {
            metric: metric.to_string(),
            value: mean,
            context: "under patching".into(),
        });
    }
    Ok(mean)
}

/// Exact per-edge patching: for every real edge, `M(that edge patched) − M(clean)` — the
/// quantity EAP approximates, one forward per edge and chunk.
pub fn exact_edge_scores(
    runner: &Runner,
    metric: Metric,
    progress: bool,
) -> Result<crate::graph::Scores> {
    exact_edge_scores_prepared(runner.model, &prepare(runner)?, metric, progress)
}

/// [`exact_edge_scores`] over chunks already prepared.
pub fn exact_edge_scores_prepared(
    model: &Model,
    prepared: &[PreparedChunk],
    metric: Metric,
    progress: bool,
) -> Result<crate::graph::Scores> {
    let graph = model.graph();
    let none = vec![false; graph.n_writers() * graph.n_readers()];
    let clean = metric_with_patch(model, prepared, metric, &none)?;
    let edges: Vec<(usize, usize)> = graph.edges().collect();
    let mut bar = crate::progress::Progress::new(progress, "exact patching", edges.len(), "edges");
    let mut scores = crate::graph::Scores::zeros(graph);
    let nr = graph.n_readers();
    let mut mask = none;
    for (w, r) in edges {
        mask[w * nr + r] = true;
        let value = metric_with_patch(model, prepared, metric, &mask)?;
        mask[w * nr + r] = false;
        scores.values[w * nr + r] = value - clean;
        bar.inc(1);
    }
    bar.finish();
    Ok(scores)
}
