//! Exact edge patching on a dataset, against the corrupted run (DESIGN §3): enough for the
//! planted models' tests and their per-edge sweeps. (`src/patching` may replace it.)

use std::collections::BTreeMap;

use crate::graph::{Graph, Scores};
use crate::model::{Batch, ForwardOptions, Model, PatchPlan};
use crate::tasks::{metric_value, Dataset, Metric, Target};
use crate::{Error, Result};

/// Examples of one length, with the corrupted run's writer outputs cached.
struct Group {
    clean: Batch,
    targets: Vec<Target>,
    baseline: Vec<candle_core::Tensor>,
    clean_logits: Option<Vec<f32>>,
}

/// A model and a dataset prepared for many patched forwards: the corrupted run is computed
/// once. The metric of a patched run is the mean over all examples.
pub struct Patcher<'a> {
    model: &'a Model,
    metric: Metric,
    graph: Graph,
    groups: Vec<Group>,
    n: usize,
}

fn last_logits(model: &Model, batch: &Batch, opts: &ForwardOptions) -> Result<Vec<f32>> {
    let out = model.forward(batch, opts)?;
    Ok(out.logits.flatten_all()?.to_vec1::<f32>()?)
}

impl<'a> Patcher<'a> {
    pub fn new(model: &'a Model, dataset: &Dataset, metric: Metric) -> Result<Patcher<'a>> {
        if dataset.examples.is_empty() {
            return Err(Error::invalid("patching: the dataset has no examples"));
        }
        let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, e) in dataset.examples.iter().enumerate() {
            if e.clean.len() != e.corrupted.len() {
                return Err(Error::invalid(format!(
                    "patching: example {i} has {} clean and {} corrupted tokens",
                    e.clean.len(),
                    e.corrupted.len()
                )));
            }
            by_len.entry(e.clean.len()).or_default().push(i);
        }
        let mut groups = Vec::new();
        for idx in by_len.values() {
            let ex = |i: &usize| &dataset.examples[*i];
            let clean = Batch::new(
                &idx.iter().map(|i| ex(i).clean.clone()).collect::<Vec<_>>(),
                &model.device,
            )?;
            let corrupted = Batch::new(
                &idx.iter()
                    .map(|i| ex(i).corrupted.clone())
                    .collect::<Vec<_>>(),
                &model.device,
            )?;
            let baseline = model
                .forward(
                    &corrupted,
                    &ForwardOptions {
                        keep_writers: true,
                        ..Default::default()
                    },
                )?
                .writers;
            let clean_logits = if metric.needs_clean_logits() {
                Some(last_logits(model, &clean, &ForwardOptions::default())?)
            } else {
                None
            };
            groups.push(Group {
                clean,
                targets: idx.iter().map(|i| ex(i).target.clone()).collect(),
                baseline,
                clean_logits,
            });
        }
        Ok(Patcher {
            model,
            metric,
            graph: model.graph(),
            groups,
            n: dataset.examples.len(),
        })
    }

    pub fn graph(&self) -> Graph {
        self.graph
    }

    /// The mean metric when the edges set in `patched` (row-major `[n_writers, n_readers]`)
    /// carry the corrupted run's activations and all others the clean run's.
    pub fn metric(&self, patched: &[bool]) -> Result<f32> {
        let size = self.graph.n_writers() * self.graph.n_readers();
        if patched.len() != size {
            return Err(Error::Shape {
                op: "patched edge mask",
                expected: format!("{size} entries ([n_writers, n_readers])"),
                found: format!("{}", patched.len()),
            });
        }
        let vocab = self.model.cfg.d_vocab_out;
        let mut sum = 0.0f64;
        for g in &self.groups {
            let plan = PatchPlan {
                graph: self.graph,
                patched: patched.to_vec(),
                baseline: g.baseline.clone(),
            };
            let any = patched.iter().any(|&p| p);
            let opts = ForwardOptions {
                intervention: if any { Some(&plan) } else { None },
                ..Default::default()
            };
            let logits = last_logits(self.model, &g.clean, &opts)?;
            let v = metric_value(
                self.metric,
                &logits,
                vocab,
                &g.targets,
                g.clean_logits.as_deref(),
            )?;
            sum += v.mean as f64 * g.targets.len() as f64;
        }
        Ok((sum / self.n as f64) as f32)
    }

    /// Exact per-edge patching: `M(only this edge patched) − M(clean)` for every real edge, in
    /// the [`Scores`] layout (EAP-IG's sign convention).
    pub fn per_edge_scores(&self) -> Result<Scores> {
        let g = self.graph;
        let nr = g.n_readers();
        let base = self.metric(&vec![false; g.n_writers() * nr])?;
        let mut scores = Scores::zeros(g);
        let mut mask = vec![false; g.n_writers() * nr];
        for (w, r) in g.edges() {
            mask[w * nr + r] = true;
            scores.values[w * nr + r] = self.metric(&mask)? - base;
            mask[w * nr + r] = false;
        }
        Ok(scores)
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
