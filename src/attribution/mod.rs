//! Edge attribution: model + dataset + metric → [`Scores`] for every edge (DESIGN §1–3).
//!
//! `score(u → v) = Σ_examples,positions (a_u(baseline) − a_u(clean)) · ∂M/∂in_v`, where `M` is
//! the metric averaged over all examples, so a score estimates `M(edge patched) − M(clean)`:
//! EAP-IG's sign convention (Syed et al. 2023, arXiv:2310.10348; Hanna et al. 2024).
//!
//! The contraction runs layer by layer inside the backward: each layer's reader gradients
//! (`[3H+1, N·d]`) meet the stored `Δ` of all earlier writers in one matrix product and are
//! dropped. Examples are processed in chunks whose scores add up.
//!
//! * [`Method::Eap`] — gradients on the clean run.
//! * [`Method::EapIg`] — integrated gradients on the input embedding: gradients averaged over
//!   `steps` runs whose embedding is `corrupted + k/steps · (clean − corrupted)`, k = 0..steps
//!   (EAP-IG's `EAP-IG-inputs`).
//! * [`Method::CleanCorrupted`] — gradients averaged over the clean and the corrupted run.
//! * [`Method::EapIgActivations`] — integrated gradients on each sublayer's output (EAP-IG's
//!   `get_scores_ig_activations`, hannamw/EAP-IG `src/eap/attribute.py`): for the input, then
//!   each layer's attention (all its heads at once) and MLP, `steps` clean runs in which that
//!   sublayer's output is set to `baseline + k/steps · (clean − baseline)`, k = 1..steps, as a
//!   constant (no gradient reaches that sublayer's readers); every run's reader gradients are
//!   averaged. Attention-only models run EAP-IG's MLP passes as plain clean runs (its hooks on
//!   the absent MLPs never fire).
//!
//! Both integrated-gradient methods start their path at the ablation's baseline: the corrupted
//! run, zero, or the dataset mean (EAP-IG's own mean path for IG-activations ends at zero
//! instead, which eap does not copy).
//!
//! [`attribute`] with [`AttributionOptions`] → [`Attribution`] (scores and what produced them);
//! [`MethodKind`] names a method on the command line. Neighbours: the chunks and baselines come
//! from [`crate::runs`] (not from [`crate::patching`], its sibling); the model's forward and
//! backward from [`crate::model`].

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;

use crate::graph::{Circuit, CircuitFile, Scores};
use crate::model::ops::to_vec;
use std::cell::{Cell, RefCell};

use crate::graph::Writer;
use crate::model::bf16::{PairRows, Products};
use crate::model::ops::{cpu_slice, cpu_slices};
use crate::model::{Attention, ForwardOptions, ForwardOutput, Model, SublayerOverride, WriterSink};
use crate::runs::{logits_rows, Ablation, Chunk, Runner, DEFAULT_MEMORY_BUDGET};
use crate::tasks::{metric_gradient, metric_value, target_columns, Dataset, Metric};
use crate::{Error, Result};

/// How reader gradients are obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Eap,
    EapIg { steps: usize },
    CleanCorrupted,
    EapIgActivations { steps: usize },
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Eap => "eap",
            Method::EapIg { .. } => "eap-ig",
            Method::CleanCorrupted => "clean-corrupted",
            Method::EapIgActivations { .. } => "eap-ig-activations",
        }
    }

    /// The method of `kind`, with `ig_steps` integration steps for EAP-IG.
    pub fn new(kind: MethodKind, ig_steps: usize) -> Result<Method> {
        match kind {
            MethodKind::Eap => Ok(Method::Eap),
            MethodKind::EapIg if ig_steps == 0 => Err(Error::NoIntegrationSteps),
            MethodKind::EapIg => Ok(Method::EapIg { steps: ig_steps }),
            MethodKind::CleanCorrupted => Ok(Method::CleanCorrupted),
            MethodKind::EapIgActivations if ig_steps == 0 => Err(Error::NoIntegrationSteps),
            MethodKind::EapIgActivations => Ok(Method::EapIgActivations { steps: ig_steps }),
        }
    }
}

/// A [`Method`] without its settings, as the command line names it ([`Method::name`];
/// `eap-ig-inputs`, EAP-IG's own name, is accepted for `eap-ig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MethodKind {
    Eap,
    #[value(alias = "eap-ig-inputs")]
    EapIg,
    CleanCorrupted,
    EapIgActivations,
}

/// Settings of one attribution run.
#[derive(Debug, Clone)]
pub struct AttributionOptions {
    pub method: Method,
    pub metric: Metric,
    pub ablation: Ablation,
    /// Examples per chunk at most (the memory budget may lower it).
    pub batch_size: usize,
    /// Bytes of activations one chunk may hold.
    pub memory_budget: usize,
    pub progress: bool,
}

impl Default for AttributionOptions {
    fn default() -> Self {
        AttributionOptions {
            method: Method::Eap,
            metric: Metric::LogitDiff,
            ablation: Ablation::Corrupted,
            batch_size: 32,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            progress: false,
        }
    }
}

/// Scores plus what a report needs to interpret them.
#[derive(Debug, Clone)]
pub struct Attribution {
    pub scores: Scores,
    pub method: Method,
    pub metric: Metric,
    pub ablation: Ablation,
    pub n_examples: usize,
    /// M on the clean run, averaged over examples.
    pub clean_metric: f32,
    /// M on the corrupted run (corrupted ablation only).
    pub corrupted_metric: Option<f32>,
    pub seconds: f64,
    /// Forward and backward passes over chunks.
    pub forward_passes: usize,
    pub backward_passes: usize,
    /// EAP-IG-activations only: for the input, then each layer's attention and MLP, the
    /// Riemann sum of `Σ_{u in the sublayer, v} Δ_u · ∂M/∂in_v` over that sublayer's own
    /// passes — its integrated gradient, which approaches `M(sublayer at its baseline) −
    /// M(clean)` as the steps grow (completeness). Empty for the other methods.
    pub sublayer_integrals: Vec<f64>,
    /// Where the time went.
    pub phases: Phases,
}

/// Seconds spent in each part of a run, summed over chunks: the forward passes, the backward
/// passes without the contraction, and the contraction `Σ Δ·g` into the scores.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Phases {
    pub forward: f64,
    pub backward: f64,
    pub contraction: f64,
}

impl Phases {
    fn add(&mut self, other: &Phases) {
        self.forward += other.forward;
        self.backward += other.backward;
        self.contraction += other.contraction;
    }
}

impl Attribution {
    /// The `meta` object written beside the scores.
    pub fn meta(&self) -> serde_json::Value {
        serde_json::json!({
            "method": self.method.name(),
            "ig_steps": match self.method { Method::EapIg { steps } | Method::EapIgActivations { steps } => Some(steps), _ => None },
            "metric": self.metric.to_string(),
            "ablation": self.ablation.to_string(),
            "n_examples": self.n_examples,
            "clean_metric": self.clean_metric,
            "corrupted_metric": self.corrupted_metric,
            "score_convention": "score(u->v) = sum over examples and positions of (a_u(ablated) - a_u(clean)) . dM/d in_v, M = metric averaged over examples; estimates M(edge patched) - M(clean) (EAP-IG sign)",
            "seconds": self.seconds,
            "forward_passes": self.forward_passes,
            "backward_passes": self.backward_passes,
            "phase_seconds": {
                "forward": self.phases.forward,
                "backward": self.phases.backward,
                "contraction": self.phases.contraction,
            },
        })
    }
}

impl Attribution {
    /// Writes the scores file (EAP-IG's JSON layout, the full circuit, and [`Attribution::meta`]
    /// naming `model`) and returns the `meta` written.
    pub fn write(&self, model: &Model, path: &Path) -> Result<serde_json::Value> {
        let file = self.to_file(model)?;
        file.write(path)?;
        Ok(file.meta)
    }

    /// The scores file [`write`](Self::write) writes, in memory: the scores, the full
    /// circuit and [`Attribution::meta`] naming `model`.
    pub fn to_file(&self, model: &Model) -> Result<CircuitFile> {
        let mut meta = self.meta();
        meta["model"] = serde_json::json!(model.name);
        meta["d_model"] = serde_json::json!(model.cfg.d_model);
        // Which way the layers ran explains the phase times (each pass converts streamed ones).
        meta["layers"] = serde_json::json!(match model.layers_streamed() {
            true => "streamed",
            false => "resident",
        });
        meta["products"] = serde_json::json!(model.products().name());
        let circuit = Circuit::full(self.scores.graph);
        CircuitFile::new(self.scores.clone(), circuit, meta)
    }

    /// What ran, and the ten edges of largest |score|, as `eap attribute` prints them.
    pub fn summary(&self) -> String {
        let graph = self.scores.graph;
        let mut out = format!(
            "{}: {} edges scored on {} examples in {:.2} s ({} metric: clean {:.4}{})\n",
            self.method.name(),
            graph.n_edges(),
            self.n_examples,
            self.seconds,
            self.metric,
            self.clean_metric,
            self.corrupted_metric
                .map(|c| format!(", corrupted {c:.4}"))
                .unwrap_or_default()
        );
        let mut top: Vec<(usize, usize)> = graph.edges().collect();
        top.sort_by(|x, y| {
            self.scores
                .get(y.0, y.1)
                .abs()
                .total_cmp(&self.scores.get(x.0, x.1).abs())
        });
        out += "top edges by |score|:\n";
        for &(w, r) in top.iter().take(10) {
            out += &format!(
                "  {:>+10.5}  {}\n",
                self.scores.get(w, r),
                graph.edge_name(w, r)
            );
        }
        out
    }
}

/// Scores every edge of `model`'s graph on `data`.
pub fn attribute(model: &Model, data: &Dataset, opts: &AttributionOptions) -> Result<Attribution> {
    let start = Instant::now();
    if matches!(opts.method, Method::CleanCorrupted) && opts.ablation != Ablation::Corrupted {
        return Err(Error::NeedsCorrupted {
            method: opts.method.name(),
            ablation: opts.ablation.to_string(),
        });
    }
    let runner = Runner::new(
        model,
        data,
        opts.ablation,
        opts.batch_size,
        opts.memory_budget,
    )?;
    let graph = model.graph();
    let mut scores = Scores::zeros(graph);
    let total = data.examples.len();
    let chunks = runner.chunks()?;
    let label = format!("{} scores", opts.method.name());
    let mut bar = crate::progress::Progress::new(opts.progress, label, total, "examples");
    let (mut clean_sum, mut corrupted_sum) = (0f64, 0f64);
    let (mut fwd, mut bwd) = (0usize, 0usize);
    let mut sublayer_integrals: Vec<f64> = Vec::new();
    let mut phases = Phases::default();
    for chunk in &chunks {
        let stats = attribute_chunk(model, &runner, chunk, opts, total, &mut scores)?;
        phases.add(&stats.phases);
        sublayer_integrals.resize(stats.sublayer_integrals.len(), 0.0);
        for (total, v) in sublayer_integrals.iter_mut().zip(&stats.sublayer_integrals) {
            *total += v;
        }
        clean_sum += stats.clean_metric * chunk.indices.len() as f64;
        if let Some(c) = stats.corrupted_metric {
            corrupted_sum += c * chunk.indices.len() as f64;
        }
        fwd += stats.forward_passes;
        bwd += stats.backward_passes;
        bar.inc(chunk.indices.len());
    }
    bar.finish();
    if let Some(bad) = scores.values.iter().find(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            metric: opts.metric.to_string(),
            value: *bad,
            context: "in the edge scores (a gradient overflowed)".into(),
        });
    }
    Ok(Attribution {
        scores,
        method: opts.method,
        metric: opts.metric,
        ablation: opts.ablation,
        n_examples: total,
        clean_metric: (clean_sum / total as f64) as f32,
        corrupted_metric: (opts.ablation == Ablation::Corrupted)
            .then_some((corrupted_sum / total as f64) as f32),
        seconds: start.elapsed().as_secs_f64(),
        forward_passes: fwd,
        backward_passes: bwd,
        sublayer_integrals,
        phases,
    })
}

struct ChunkStats {
    clean_metric: f64,
    corrupted_metric: Option<f64>,
    forward_passes: usize,
    backward_passes: usize,
    /// EAP-IG-activations: each sublayer's path integral, weighted by the chunk's share.
    sublayer_integrals: Vec<f64>,
    phases: Phases,
}

fn attribute_chunk(
    model: &Model,
    runner: &Runner,
    chunk: &Chunk,
    opts: &AttributionOptions,
    total: usize,
    scores: &mut Scores,
) -> Result<ChunkStats> {
    let graph = model.graph();
    let metric = opts.metric;
    let (forward_s, backward_s, contraction_s) = (Cell::new(0.0), Cell::new(0.0), Cell::new(0.0));
    // A metric of a few logits (logit difference) unembeds only their columns in every pass.
    let (columns, targets) = match metric.reads_only_targets() {
        true => {
            let (ids, remapped) = target_columns(&chunk.targets);
            (Some(ids), remapped)
        }
        false => (None, chunk.targets.clone()),
    };
    let vocab = columns.as_ref().map_or(model.cfg.d_vocab_out, Vec::len);
    let (n, d) = (chunk.clean.n_rows(), model.cfg.d_model);
    // Each chunk's gradient is of its own mean; weighting by its share makes the scores of all
    // chunks add up to those of the metric averaged over the whole dataset.
    let share = chunk.indices.len() as f64 / total as f64;

    // Δ = baseline − clean, accumulated straight into one [n_writers, N·d] buffer as the two
    // forwards produce each writer's output: no copy of either run's activations is kept.
    // IG on activations keeps the clean run's writers (so its heads are sent, not taken from
    // z) and reads Δ's values for its paths (so Δ stays f32 whatever the products).
    let ig_activations = matches!(opts.method, Method::EapIgActivations { .. });
    let heads_from_mixed = !ig_activations;
    // bf16 products take Δ and the reader gradients in bf16 too.
    let bf16 = model.products() == Products::Bf16 && !ig_activations;
    let pairs = bf16 && crate::model::bf16::hardware_bf16();
    let zero_baseline = opts.ablation == Ablation::Zero;
    let delta_buf = DeltaBuffer::new(
        graph.n_writers(),
        n * d,
        heads_from_mixed,
        pairs,
        zero_baseline,
    );
    let (baseline_side, clean_side) = (delta_buf.side(false), delta_buf.side(true));
    let clean_opts = ForwardOptions {
        logit_columns: columns.clone(),
        writer_sink: Some(&clean_side),
        keep_cache: matches!(opts.method, Method::Eap | Method::CleanCorrupted),
        keep_writers: ig_activations,
        ..Default::default()
    };
    // The corrupted and the clean run go through the layers together: one fetch of each layer
    // (one conversion when streamed) serves both, and Δ's rows are complete layer by layer.
    let (corrupted_logits, clean) = match opts.ablation {
        Ablation::Corrupted => {
            let corrupted_opts = ForwardOptions {
                logit_columns: columns.clone(),
                writer_sink: Some(&baseline_side),
                ..Default::default()
            };
            let (corrupted, clean) = timed(&forward_s, || {
                model.forward_pair(
                    (&chunk.corrupted, &corrupted_opts),
                    (&chunk.clean, &clean_opts),
                )
            })?;
            (Some(corrupted.logits), clean)
        }
        Ablation::Zero | Ablation::Mean | Ablation::MeanPositional => {
            if opts.ablation != Ablation::Zero {
                let baseline = runner.baseline(chunk)?;
                for (u, t) in baseline.iter().enumerate() {
                    delta_buf.write(u, t, false)?;
                }
            }
            let clean = timed(&forward_s, || model.forward(&chunk.clean, &clean_opts))?;
            (None, clean)
        }
    };
    let mut forward_passes = 1 + usize::from(opts.ablation == Ablation::Corrupted);
    let clean_rows = logits_rows(&clean.logits)?;
    let check = |v: f32, what: &str| -> Result<f64> {
        if v.is_finite() {
            Ok(v as f64)
        } else {
            Err(Error::NonFinite {
                metric: metric.to_string(),
                value: v,
                context: format!(
                    "on the {what} run of examples {:?}",
                    &chunk.indices[..chunk.indices.len().min(8)]
                ),
            })
        }
    };
    let clean_metric = check(
        metric_value(metric, &clean_rows, vocab, &targets, Some(&clean_rows))?.mean,
        "clean",
    )?;
    let corrupted_metric = match &corrupted_logits {
        Some(l) => Some(check(
            metric_value(metric, &logits_rows(l)?, vocab, &targets, Some(&clean_rows))?.mean,
            "corrupted",
        )?),
        None => None,
    };
    // Δ = baseline − clean for every writer, one row per writer: [n_writers, N·d].
    let ForwardOutput {
        logits: clean_logits_t,
        cache: clean_cache,
        writers: clean_writers,
        ..
    } = clean;
    let delta = delta_buf.into_rows(bf16, &model.device)?;

    // Runs one backward from `logits` (whose forward kept `cache`) and adds weight · Δ·g.
    let mut backward_passes = 0;
    let mut sublayer_integrals = Vec::new();
    // Also returns Σ weight · Δ_u·g_v over the writers `u` in `track` (EAP-IG-activations'
    // completeness of one sublayer).
    let mut accumulate = |cache: &crate::model::ForwardCache,
                          logits: &Tensor,
                          weight: f64,
                          track: std::ops::Range<usize>|
     -> Result<f64> {
        let mut tracked = 0f64;
        let rows = logits_rows(logits)?;
        let grad = metric_gradient(metric, &rows, vocab, &targets, Some(&clean_rows))?;
        // The backward runs on the gradient of the chunk's sum rather than its mean, and
        // `weight` takes the mean back: every example's gradients then have one scale whatever
        // `--batch-size` makes of the chunks, so bf16 products round them alike in every
        // chunking (a third of a gradient rounds to other bf16 numbers than the gradient).
        let examples = chunk.indices.len() as f32;
        let grad: Vec<f32> = grad.into_iter().map(|g| g * examples).collect();
        let weight = weight / examples as f64;
        let dlogits = Tensor::from_vec(grad, logits.shape().clone(), &model.device)?;
        let nr = graph.n_readers();
        // Reader gradients wait here until they hold half of Δ's values (at least one layer),
        // then are contracted together: each pass over Δ then serves several layers.
        let mut pending: Vec<(std::ops::Range<usize>, Grads)> = Vec::new();
        let pending_limit = delta.values() / 2;
        let mut contract = |pending: &mut Vec<(std::ops::Range<usize>, Grads)>| -> Result<()> {
            let start = Instant::now();
            let refs: Vec<(&Grads, usize)> = pending
                .iter()
                .map(|(readers, g)| {
                    let f_max = readers.clone().map(|r| graph.n_upstream(r)).max();
                    (g, f_max.unwrap_or(0))
                })
                .collect();
            let blocks = delta.contract(n * d, &refs)?;
            for ((readers, _), block) in pending.iter().zip(blocks) {
                let block = to_vec(&block)?; // [f_max, count]
                let count = readers.len();
                for (i, r) in readers.clone().enumerate() {
                    for u in 0..graph.n_upstream(r) {
                        let add = weight * block[u * count + i] as f64;
                        scores.values[u * nr + r] += add as f32;
                        if track.contains(&u) {
                            tracked += add;
                        }
                    }
                }
            }
            pending.clear();
            contraction_s.set(contraction_s.get() + start.elapsed().as_secs_f64());
            Ok(())
        };
        let backward_start = Instant::now();
        model.backward(cache, &dlogits, &mut |rg| {
            let start = Instant::now();
            let g = rg.grads.reshape((rg.readers.len(), n * d))?;
            pending.push((rg.readers, delta.grads(g)?));
            contraction_s.set(contraction_s.get() + start.elapsed().as_secs_f64());
            if pending.iter().map(|(_, g)| g.values()).sum::<usize>() >= pending_limit {
                contract(&mut pending)?;
            }
            Ok(())
        })?;
        contract(&mut pending)?;
        backward_s.set(backward_s.get() + backward_start.elapsed().as_secs_f64());
        backward_passes += 1;
        Ok(tracked)
    };

    match opts.method {
        Method::Eap => {
            let cache = clean_cache.as_ref().expect("kept");
            accumulate(cache, &clean_logits_t, share, 0..0)?;
        }
        Method::CleanCorrupted => {
            let cache = clean_cache.as_ref().expect("kept");
            accumulate(cache, &clean_logits_t, share / 2.0, 0..0)?;
            let corrupted = timed(&forward_s, || {
                model.forward(
                    &chunk.corrupted,
                    &ForwardOptions {
                        logit_columns: columns.clone(),
                        keep_cache: true,
                        ..Default::default()
                    },
                )
            })?;
            forward_passes += 1;
            accumulate(
                corrupted.cache.as_ref().expect("kept"),
                &corrupted.logits,
                share / 2.0,
                0..0,
            )?;
        }
        Method::EapIg { steps } => {
            let input_clean = model.embed(&chunk.clean)?;
            let input_baseline = match opts.ablation {
                Ablation::Corrupted => model.embed(&chunk.corrupted)?,
                Ablation::Zero => input_clean.zeros_like()?,
                Ablation::Mean | Ablation::MeanPositional => runner.baseline(chunk)?.swap_remove(0),
            };
            let diff = (&input_clean - &input_baseline)?;
            for k in 0..steps {
                let alpha = k as f64 / steps as f64;
                let input = (&input_baseline + (&diff * alpha)?)?;
                let out = timed(&forward_s, || {
                    model.forward(
                        &chunk.clean,
                        &ForwardOptions {
                            logit_columns: columns.clone(),
                            keep_cache: true,
                            input_override: Some(input),
                            ..Default::default()
                        },
                    )
                })?;
                forward_passes += 1;
                accumulate(
                    out.cache.as_ref().expect("kept"),
                    &out.logits,
                    share / steps as f64,
                    0..0,
                )?;
            }
        }
        Method::EapIgActivations { steps } => {
            // Each writer on the path from its baseline (k = 0) to its clean value (k = steps):
            // clean + (1 − k/steps)·Δ, Δ = baseline − clean.
            let point = |u: usize, alpha: f64| -> Result<Tensor> {
                let du = delta.f32()?.get(u)?.narrow(0, 0, n * d)?.reshape((n, d))?;
                Ok((&clean_writers[u] + (du * (1.0 - alpha))?)?)
            };
            // The input, then per layer its attention (`Some(true)`) and MLP (`Some(false)`).
            let mut sublayers = vec![None];
            for _ in 0..graph.n_layers {
                sublayers.push(Some(true));
                sublayers.push(Some(false));
            }
            let passes = sublayers.len() * steps;
            for (i, sub) in sublayers.iter().enumerate() {
                let layer = i.saturating_sub(1) / 2;
                // The sublayer's own writers, whose Δ·g over its passes is its path integral.
                let own = match sub {
                    None => 0..1,
                    Some(true) => {
                        let first = graph.writer_index(Writer::Head { layer, head: 0 });
                        first..first + graph.n_heads
                    }
                    Some(false) if !graph.has_mlp => 0..0,
                    Some(false) => {
                        let m = graph.writer_index(Writer::Mlp { layer });
                        m..m + 1
                    }
                };
                let mut integral = 0f64;
                for k in 1..=steps {
                    let alpha = k as f64 / steps as f64;
                    let mut fo = ForwardOptions {
                        logit_columns: columns.clone(),
                        keep_cache: true,
                        ..Default::default()
                    };
                    match sub {
                        None => fo.input_override = Some(point(0, alpha)?),
                        Some(true) => {
                            let heads = (0..graph.n_heads)
                                .map(|h| {
                                    point(
                                        graph.writer_index(Writer::Head { layer, head: h }),
                                        alpha,
                                    )
                                })
                                .collect::<Result<Vec<_>>>()?;
                            fo.sublayer_override =
                                Some(SublayerOverride::Attention { layer, heads });
                        }
                        // Attention-only models: EAP-IG's hook on the absent MLP never fires.
                        Some(false) if !graph.has_mlp => {}
                        Some(false) => {
                            let output = point(graph.writer_index(Writer::Mlp { layer }), alpha)?;
                            fo.sublayer_override = Some(SublayerOverride::Mlp { layer, output });
                        }
                    }
                    let out = timed(&forward_s, || model.forward(&chunk.clean, &fo))?;
                    forward_passes += 1;
                    integral += accumulate(
                        out.cache.as_ref().expect("kept"),
                        &out.logits,
                        share / passes as f64,
                        own.clone(),
                    )?;
                }
                if !own.is_empty() {
                    // Undo the 1/passes average: the right Riemann sum over α = k/steps, k = 1..steps.
                    sublayer_integrals.push(integral * passes as f64 / steps as f64);
                }
            }
        }
    }
    Ok(ChunkStats {
        clean_metric,
        corrupted_metric,
        forward_passes,
        backward_passes,
        sublayer_integrals,
        phases: Phases {
            forward: forward_s.get(),
            backward: backward_s.get() - contraction_s.get(),
            contraction: contraction_s.get(),
        },
    })
}

/// Runs `f`, adding its wall time to `seconds`.
fn timed<T>(seconds: &Cell<f64>, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    seconds.set(seconds.get() + start.elapsed().as_secs_f64());
    out
}

/// The `[n_writers, N·d]` activation difference, filled by two runs' [`WriterSink`]s
/// ([`DeltaSide`]): the baseline run's outputs set each row, the clean run's are subtracted.
///
/// In f32, the rows are [`padded_row_len`](crate::model::ops::padded_row_len) floats apart, so
/// that the contraction's blocks of every row do not share cache sets. In bf16 pairs (bf16
/// products on a CPU with AVX512-BF16) a baseline output waits until the clean run's arrives
/// and their f32 difference is rounded into its row: with the two runs stepped through the
/// layers together ([`Model::forward_pair`]) one layer of baseline outputs waits at a time, and
/// Δ takes half the memory of f32 rows.
///
/// With `heads_from_mixed`, the heads' rows are not built from their outputs: the baseline run
/// leaves its mixed values `z` per layer (`[N, h·d_head]`, 1.5 MB per GPT-2 layer at 32 × 16
/// tokens) and the clean run writes `Δ_h = (z_baseline − z_clean)_h · W_O[h]` straight into the
/// rows. Neither run then computes, sums or copies the `[h, N, d]` head outputs (19 MB per
/// layer and run); this costs one more per-head product per layer than the two runs' own.
struct DeltaBuffer {
    store: RefCell<DeltaStore>,
    /// Values per row: N·d.
    row: usize,
    heads_from_mixed: bool,
    /// The baseline is zero (zero ablation): nothing is set, Δ = −clean.
    zero_baseline: bool,
    /// The baseline run's mixed values, by the layer's first head writer.
    baseline_mixed: RefCell<HashMap<usize, Tensor>>,
}

enum DeltaStore {
    F32 {
        data: Vec<f32>,
        row_len: usize,
    },
    Pairs {
        rows: PairRows,
        /// Baseline outputs waiting for the clean run's, by writer.
        staged: HashMap<usize, Tensor>,
        /// f32 rows of one layer's heads (or one writer) before rounding, reused so that each
        /// layer does not touch fresh pages.
        scratch: Vec<f32>,
    },
}

/// One run's side of a [`DeltaBuffer`]: the baseline run sets, the clean run subtracts.
struct DeltaSide<'a> {
    buf: &'a DeltaBuffer,
    subtract: bool,
}

impl DeltaBuffer {
    /// `heads_from_mixed` only where the clean run takes the heads from `z` as well (keeps no
    /// writer outputs): a head row taken in one run and sent in the other would be wrong.
    /// `pairs`: bf16 pairs rather than f32 rows; `zero_baseline`: no baseline run sets them.
    fn new(
        n_writers: usize,
        row: usize,
        heads_from_mixed: bool,
        pairs: bool,
        zero_baseline: bool,
    ) -> Self {
        let store = match pairs {
            true => {
                let stride = crate::model::ops::padded_row_len(row.div_ceil(2));
                let mut rows = PairRows::zeros(n_writers, row, stride);
                crate::model::ops::prefault(rows.words_mut());
                DeltaStore::Pairs {
                    rows,
                    staged: HashMap::new(),
                    scratch: Vec::new(),
                }
            }
            false => {
                let row_len = crate::model::ops::padded_row_len(row);
                let mut data = vec![0f32; n_writers * row_len];
                crate::model::ops::prefault(&mut data);
                DeltaStore::F32 { data, row_len }
            }
        };
        DeltaBuffer {
            store: RefCell::new(store),
            row,
            heads_from_mixed,
            zero_baseline,
            baseline_mixed: RefCell::new(HashMap::new()),
        }
    }

    /// The side a run writes through.
    fn side(&self, subtract: bool) -> DeltaSide<'_> {
        DeltaSide {
            buf: self,
            subtract,
        }
    }

    /// Δ's rows for the contraction (each f32 row's first `row` values are Δ, the rest zero);
    /// f32 rows with `bf16` are rounded to bf16 values (CPUs without AVX512-BF16).
    fn into_rows(self, bf16: bool, device: &candle_core::Device) -> Result<DeltaRows> {
        if let Some(first) = self.baseline_mixed.borrow().keys().min() {
            return Err(Error::invalid(format!(
                "EAP's Δ: the clean run never took the heads from writer {first} on, whose \
                 baseline values were kept for it"
            )));
        }
        Ok(match self.store.into_inner() {
            DeltaStore::F32 { mut data, row_len } => {
                let shape = (data.len() / row_len, row_len);
                match bf16 {
                    false => DeltaRows::F32(Tensor::from_vec(data, shape, device)?),
                    true => {
                        crate::model::bf16::round_in_place(&mut data);
                        DeltaRows::Rounded(Tensor::from_vec(data, shape, device)?)
                    }
                }
            }
            DeltaStore::Pairs { rows, staged, .. } => {
                if let Some(first) = staged.keys().min() {
                    return Err(Error::invalid(format!(
                        "EAP's Δ: the clean run never wrote writer {first}, whose baseline \
                         output was kept for it"
                    )));
                }
                DeltaRows::Pairs(rows)
            }
        })
    }

    /// Sets (or with `subtract`, subtracts from) writer `writer`'s row.
    fn write(&self, writer: usize, output: &Tensor, subtract: bool) -> Result<()> {
        let output = output.contiguous()?;
        let mut store = self.store.borrow_mut();
        match &mut *store {
            DeltaStore::F32 { data, row_len } => {
                let start = writer * *row_len;
                let dst = &mut data[start..start + self.row];
                let apply = |src: &[f32], dst: &mut [f32]| {
                    if subtract {
                        dst.iter_mut().zip(src).for_each(|(o, x)| *o -= x);
                    } else {
                        dst.copy_from_slice(src);
                    }
                };
                if cpu_slice(&output, |src| apply(src, &mut *dst)).is_none() {
                    apply(&to_vec(&output)?, dst);
                }
            }
            DeltaStore::Pairs {
                rows,
                staged,
                scratch,
            } => {
                if !subtract {
                    staged.insert(writer, output);
                    return Ok(());
                }
                scratch.clear();
                let Some(baseline) = staged.remove(&writer) else {
                    if !self.zero_baseline {
                        return Err(Error::invalid(format!(
                            "EAP's Δ: the clean run wrote writer {writer} before the baseline run"
                        )));
                    }
                    let mut negate = |c: &[f32]| scratch.extend(c.iter().map(|c| -c));
                    if cpu_slice(&output, &mut negate).is_none() {
                        negate(&to_vec(&output)?);
                    }
                    return rows.set_row(writer, scratch);
                };
                let baseline = baseline.contiguous()?;
                let mut difference = |s: &[&[f32]]| {
                    scratch.extend(s[0].iter().zip(s[1]).map(|(b, c)| b - c));
                };
                if cpu_slices(&[&baseline, &output], &mut difference).is_none() {
                    difference(&[&to_vec(&baseline)?, &to_vec(&output)?]);
                }
                rows.set_row(writer, scratch)?;
            }
        }
        Ok(())
    }

    fn take_heads(
        &self,
        first_writer: usize,
        z: &Tensor,
        attn: &Attention,
        subtract: bool,
    ) -> Result<bool> {
        if !self.heads_from_mixed {
            return Ok(false);
        }
        if !subtract {
            self.baseline_mixed
                .borrow_mut()
                .insert(first_writer, z.clone());
            return Ok(true);
        }
        let Some(baseline) = self.baseline_mixed.borrow_mut().remove(&first_writer) else {
            // A baseline set row by row (mean or zero ablation): subtract the heads' outputs.
            return Ok(false);
        };
        let dz = (baseline - z)?;
        let heads = attn.n_heads();
        let mut store = self.store.borrow_mut();
        match &mut *store {
            DeltaStore::F32 { data, row_len } => {
                let (start, end) = (first_writer * *row_len, (first_writer + heads) * *row_len);
                attn.head_outputs_into(&dz, &mut data[start..end], *row_len)?;
            }
            DeltaStore::Pairs { rows, scratch, .. } => {
                scratch.resize(heads * self.row, 0.0);
                attn.head_outputs_into(&dz, scratch, self.row)?;
                for (hh, values) in scratch.chunks(self.row).enumerate() {
                    rows.set_row(first_writer + hh, values)?;
                }
            }
        }
        Ok(true)
    }
}

impl WriterSink for DeltaSide<'_> {
    fn write(&self, writer: usize, output: &Tensor) -> Result<()> {
        self.buf.write(writer, output, self.subtract)
    }

    fn take_heads(&self, first_writer: usize, z: &Tensor, attn: &Attention) -> Result<bool> {
        self.buf.take_heads(first_writer, z, attn, self.subtract)
    }
}

/// Δ as the contraction reads it.
enum DeltaRows {
    F32(Tensor),
    /// bf16 products: Δ's values rounded to bf16 as f32, on CPUs without AVX512-BF16; the
    /// gradients are rounded alike and the f32 contraction multiplies them.
    Rounded(Tensor),
    /// bf16 products on CPUs with AVX512-BF16: bf16 pairs, half the bytes of f32 rows.
    Pairs(PairRows),
}

impl DeltaRows {
    /// The values Δ holds (with the f32 rows' padding).
    fn values(&self) -> usize {
        match self {
            DeltaRows::F32(t) | DeltaRows::Rounded(t) => t.elem_count(),
            DeltaRows::Pairs(rows) => rows.rows() * rows.k(),
        }
    }

    /// Δ's f32 values (IG on activations, which builds its paths from them).
    fn f32(&self) -> Result<&Tensor> {
        match self {
            DeltaRows::F32(t) => Ok(t),
            _ => Err(Error::invalid(
                "EAP's Δ was rounded to bf16 for the contraction",
            )),
        }
    }

    /// Reader gradients `[readers, k]` as [`contract`](Self::contract) multiplies them with
    /// this Δ: rounded alike, and as bf16 pairs (half the bytes while they wait) with Δ's.
    fn grads(&self, g: Tensor) -> Result<Grads> {
        Ok(match self {
            DeltaRows::F32(_) => Grads::F32(g),
            DeltaRows::Rounded(_) => {
                let mut v = to_vec(&g.flatten_all()?)?;
                crate::model::bf16::round_in_place(&mut v);
                Grads::F32(Tensor::from_vec(v, g.shape().clone(), g.device())?)
            }
            DeltaRows::Pairs(_) => Grads::Pairs(PairRows::from_tensor(&g)?),
        })
    }

    /// `Δ[..rows] · gᵀ` over the first `k` columns for each `(g, rows)`: `[rows, n_g]` each.
    fn contract(&self, k: usize, grads: &[(&Grads, usize)]) -> Result<Vec<Tensor>> {
        let f32s = || -> Result<Vec<(&Tensor, usize)>> {
            grads
                .iter()
                .map(|(g, rows)| match g {
                    Grads::F32(t) => Ok((t, *rows)),
                    Grads::Pairs(_) => Err(Error::invalid("bf16 gradients against f32 Δ")),
                })
                .collect()
        };
        match self {
            DeltaRows::F32(t) | DeltaRows::Rounded(t) => {
                crate::model::ops::matmul_nt_many(t, k, &f32s()?)
            }
            DeltaRows::Pairs(rows) => {
                let pairs = grads
                    .iter()
                    .map(|(g, r)| match g {
                        Grads::Pairs(p) if p.k() == k => Ok((p, *r)),
                        _ => Err(Error::invalid(format!(
                            "the bf16 contraction needs bf16 gradients of {k} values a row"
                        ))),
                    })
                    .collect::<Result<Vec<_>>>()?;
                crate::model::bf16::contract_many(rows, &pairs)
            }
        }
    }
}

/// One layer's reader gradients waiting for the contraction, `[readers, k]`.
enum Grads {
    F32(Tensor),
    Pairs(PairRows),
}

impl Grads {
    /// The f32 values they stand for (what the wait is bounded by).
    fn values(&self) -> usize {
        match self {
            Grads::F32(t) => t.elem_count(),
            Grads::Pairs(p) => p.rows() * p.k(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    /// Δ with the heads' rows taken from the mixed values (the baseline's `z` kept, the clean
    /// run writing `(z_baseline − z_clean)·W_O` per head) equals Δ built from every head's
    /// output, on a classic, a grouped-query Llama-like and a post-norm soft-capped block;
    /// a clean run that never takes the kept heads is an error, not a wrong Δ.
    #[test]
    fn heads_from_mixed_values_give_the_delta_of_their_outputs() {
        use crate::model::{random::random_model, Activation, Batch, ModelConfig, Norm};
        let dev = candle_core::Device::Cpu;
        let base = ModelConfig::classic(
            2,
            16,
            4,
            8,
            Some(24),
            40,
            16,
            crate::model::WeightFormat::InMemory,
        );
        let llama = ModelConfig {
            n_kv_heads: 2,
            norm: Norm::RmsNorm,
            act: Activation::Silu,
            gated_mlp: true,
            ..base.clone()
        };
        let gemma = ModelConfig {
            post_norms: true,
            attn_softcap: Some(5.0),
            ..llama.clone()
        };
        let seqs = |shift: usize| -> Vec<Vec<u32>> {
            (0..3)
                .map(|b| {
                    (0..6)
                        .map(|p| ((b * 7 + p * 3 + shift) % 40) as u32)
                        .collect()
                })
                .collect()
        };
        let (clean, corrupted) = (
            Batch::new(&seqs(1), &dev).unwrap(),
            Batch::new(&seqs(2), &dev).unwrap(),
        );
        for cfg in [base, llama, gemma] {
            let model = random_model(&cfg, 5, &dev).unwrap();
            let graph = model.graph();
            let row = 18 * cfg.d_model;
            // Δ's values, row by row: the runs one after the other, or (`paired`) stepped
            // through the layers together; `pairs` stores bf16 pairs.
            let delta = |from_mixed: bool, paired: bool, pairs: bool| -> Vec<f32> {
                let buf = DeltaBuffer::new(graph.n_writers(), row, from_mixed, pairs, false);
                let (base, sub) = (buf.side(false), buf.side(true));
                let base_opts = ForwardOptions {
                    writer_sink: Some(&base),
                    ..Default::default()
                };
                let clean_opts = ForwardOptions {
                    writer_sink: Some(&sub),
                    keep_cache: true,
                    ..Default::default()
                };
                if paired {
                    model
                        .forward_pair((&corrupted, &base_opts), (&clean, &clean_opts))
                        .unwrap();
                } else {
                    model.forward(&corrupted, &base_opts).unwrap();
                    model.forward(&clean, &clean_opts).unwrap();
                }
                match buf.into_rows(false, &dev).unwrap() {
                    DeltaRows::F32(t) => {
                        let v = t.to_vec2::<f32>().unwrap();
                        v.iter().flat_map(|r| r[..row].to_vec()).collect()
                    }
                    DeltaRows::Pairs(rows) => {
                        (0..rows.rows()).flat_map(|i| rows.row_values(i)).collect()
                    }
                    DeltaRows::Rounded(_) => unreachable!("only with bf16"),
                }
            };
            let sent = delta(false, false, false);
            let scale = sent.iter().fold(0f32, |m, x| m.max(x.abs()));
            let worst = |got: &[f32]| {
                assert_eq!(got.len(), sent.len());
                got.iter()
                    .zip(&sent)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            };
            for paired in [false, true] {
                let taken = delta(true, paired, false);
                assert!(
                    scale > 0.0 && worst(&taken) <= 1e-5 * scale,
                    "{} of {scale}",
                    worst(&taken)
                );
                // bf16 pairs hold the f32 Δ rounded: within half a bf16 step of each value.
                let rounded = delta(true, paired, true);
                for (r, s) in rounded.iter().zip(&sent) {
                    assert!(
                        (r - s).abs() <= s.abs() / 256.0 + 1e-5 * scale,
                        "{r} vs {s}"
                    );
                }
            }

            for pairs in [false, true] {
                let buf = DeltaBuffer::new(graph.n_writers(), row, true, pairs, false);
                let side = buf.side(false);
                let opts = ForwardOptions {
                    writer_sink: Some(&side),
                    ..Default::default()
                };
                model.forward(&corrupted, &opts).unwrap();
                assert!(buf.into_rows(false, &dev).is_err());
            }
            // A clean output with no baseline is an error, unless the baseline is zero.
            let buf = DeltaBuffer::new(graph.n_writers(), row, false, true, false);
            let out = Tensor::ones(row, candle_core::DType::F32, &dev).unwrap();
            assert!(buf.write(0, &out, true).is_err());
            let buf = DeltaBuffer::new(graph.n_writers(), row, false, true, true);
            buf.write(0, &out, true).unwrap();
            let DeltaRows::Pairs(rows) = buf.into_rows(true, &dev).unwrap() else {
                panic!("pairs")
            };
            assert_eq!(rows.row_values(0), vec![-1.0; row]);
        }
    }

    #[test]
    fn method_names() {
        for (name, kind) in [
            ("eap", MethodKind::Eap),
            ("eap-ig", MethodKind::EapIg),
            ("eap-ig-inputs", MethodKind::EapIg),
            ("clean-corrupted", MethodKind::CleanCorrupted),
        ] {
            assert_eq!(MethodKind::from_str(name, false).unwrap(), kind);
            assert!(Method::new(kind, 3)
                .unwrap()
                .name()
                .starts_with(name.trim_end_matches("-inputs")));
        }
        assert!(matches!(
            Method::new(MethodKind::EapIg, 0),
            Err(Error::NoIntegrationSteps)
        ));
    }
}
