//! The main job: run exact patching, EAP, EAP-IG, ACDC and the EAP→ACDC hybrid on one model and
//! task, compare them with a ground truth when there is one, select a circuit, and write
//! `circuit.json`, `circuit.svg` and `report.html`.
//!
//! Stages: [`discover`] → [`Discovery`] (a [`MethodResult`] per [`DiscoverMethod`]: scores,
//! ROC, faithfulness, correlation with exact patching) → [`Discovery::summary`] /
//! [`Discovery::report`] / [`Discovery::write`].
//!
//! Neighbours: everything upstream — [`crate::runs`], [`crate::patching`],
//! [`crate::attribution`], [`crate::acdc`] (including its hybrid), [`crate::eval`] (one
//! [`FaithfulnessBaseline`] for every circuit scored) — and [`crate::report`] downstream.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::acdc::{hybrid, threshold_sweep, AcdcOptions};
use crate::attribution::{attribute, AttributionOptions, Method};
use crate::eval::{
    correlation, default_fractions, roc_from_graph, Correlation, FaithfulnessBaseline,
    FaithfulnessCurve, Roc,
};
use crate::graph::{Circuit, CircuitFile, Scores};
use crate::model::Model;
use crate::patching::exact_edge_scores;
use crate::report::{circuit_svg, faithfulness_svg, roc_svg, scatter_svg, Report, Section};
use crate::runs::{prepare, Ablation, Runner, DEFAULT_MEMORY_BUDGET};
use crate::tasks::{Dataset, Metric};
use crate::{Error, Result};

/// Settings of a discovery run.
#[derive(Debug, Clone)]
pub struct DiscoverOptions {
    pub metric: Metric,
    pub ablation: Ablation,
    pub ig_steps: usize,
    pub batch_size: usize,
    /// Bytes one chunk's activations may take (`DEFAULT_MEMORY_BUDGET`).
    pub memory_budget: usize,
    /// Circuit size; default: the ground truth's size, else 2% of the edges (at least 10).
    pub top_n: Option<usize>,
    /// Also run exact per-edge patching (one forward per edge).
    pub exact: bool,
    /// Also run ACDC and the EAP→ACDC hybrid with the task's metric (remove an edge when
    /// |Δ metric| < τ) and a threshold sweep for the ROC.
    pub acdc: bool,
    /// ACDC's τ for the circuit whose faithfulness is reported (added to the sweep), as a
    /// fraction of `|M(full) − M(∅)|`.
    pub acdc_threshold: f32,
    /// The sweep's thresholds (one ROC point each), as fractions of `|M(full) − M(∅)|`.
    pub acdc_thresholds: Vec<f32>,
    /// Hybrid: EAP's top edges kept for ACDC; default max(3 × top-n, 20% of the edges).
    pub hybrid_keep: Option<usize>,
    pub progress: bool,
}

impl Default for DiscoverOptions {
    fn default() -> Self {
        DiscoverOptions {
            metric: Metric::LogitDiff,
            ablation: Ablation::Corrupted,
            ig_steps: 5,
            batch_size: 32,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            top_n: None,
            exact: true,
            acdc: true,
            acdc_threshold: DEFAULT_ACDC_THRESHOLD,
            acdc_thresholds: default_acdc_thresholds(),
            hybrid_keep: None,
            progress: false,
        }
    }
}

/// ACDC's τ in `discover`, as a fraction of the task metric's scale `|M(full) − M(∅)|`: on
/// the planted models every truth edge moves the metric by more, every distractor by less.
pub const DEFAULT_ACDC_THRESHOLD: f32 = 0.1;

/// The sweep `discover` draws ACDC's ROC from, as fractions of `|M(full) − M(∅)|`.
pub fn default_acdc_thresholds() -> Vec<f32> {
    vec![0.003, 0.01, 0.03, 0.1, 0.3, 0.6]
}

/// The methods `discover` compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoverMethod {
    /// One patched forward per edge: the quantity the others estimate.
    ExactPatching,
    Eap,
    EapIg {
        steps: usize,
    },
    /// ACDC with the task's metric, a threshold sweep for the ROC.
    Acdc,
    /// ACDC started from EAP's top `keep` edges.
    Hybrid {
        keep: usize,
    },
}

impl DiscoverMethod {
    /// ACDC and the hybrid: a ROC of one point per threshold, and faithfulness of the circuit
    /// found at τ, rather than of a ranking of their scores.
    pub fn is_acdc(self) -> bool {
        matches!(self, DiscoverMethod::Acdc | DiscoverMethod::Hybrid { .. })
    }
}

impl std::fmt::Display for DiscoverMethod {
    /// The name in tables, reports and pictures.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiscoverMethod::ExactPatching => f.write_str("exact patching"),
            DiscoverMethod::Eap => f.write_str("EAP"),
            DiscoverMethod::EapIg { steps } => write!(f, "EAP-IG ({steps} steps)"),
            DiscoverMethod::Acdc => f.write_str("ACDC"),
            DiscoverMethod::Hybrid { keep } => write!(f, "EAP→ACDC (top {keep})"),
        }
    }
}

/// One method's scores and how well they do.
#[derive(Debug, Clone)]
pub struct MethodResult {
    pub method: DiscoverMethod,
    /// `method`'s name, as tables show it.
    pub name: String,
    pub scores: Scores,
    pub seconds: f64,
    /// Forward passes over the dataset's chunks.
    pub forward_passes: usize,
    pub roc: Option<Roc>,
    /// Faithfulness of the method's top-n circuit (ACDC's: of its circuit at τ).
    pub faithfulness: f64,
    pub curve: FaithfulnessCurve,
    /// Per-edge agreement with exact patching.
    pub vs_exact: Option<Correlation>,
}

/// Everything a discovery run found.
pub struct Discovery {
    pub model_name: String,
    /// The model's width, written to `circuit.json`'s `cfg.d_model` (EAP-IG sizes neuron
    /// tensors by it; 0 would say "unknown").
    pub d_model: usize,
    pub task_name: String,
    pub metric: Metric,
    pub n_examples: usize,
    pub n_edges: usize,
    pub top_n: usize,
    pub methods: Vec<MethodResult>,
    /// The circuit: EAP's top-n edges, pruned.
    pub circuit: Circuit,
    pub circuit_method: DiscoverMethod,
    pub truth: Option<Circuit>,
    pub clean_metric: f32,
    pub corrupted_metric: Option<f32>,
}

/// A method's output before it is evaluated.
struct Run {
    method: DiscoverMethod,
    scores: Scores,
    seconds: f64,
    forward_passes: usize,
    /// ACDC's own ROC (one point per threshold of its sweep) and its circuit at τ.
    acdc: Option<(Option<Roc>, Circuit)>,
}

/// Runs the comparison on `data` with `model`.
pub fn discover(
    model: &Model,
    data: &Dataset,
    truth: Option<&Circuit>,
    opts: &DiscoverOptions,
) -> Result<Discovery> {
    let graph = model.graph();
    if let Some(t) = truth {
        graph.expect(&t.graph, "the ground truth")?;
        if t.n_edges() == 0 {
            return Err(Error::NoEdges {
                what: "the ground truth".into(),
            });
        }
    }
    let n_edges = graph.n_edges();
    let top_n = opts
        .top_n
        .or(truth.map(Circuit::n_edges))
        .unwrap_or((n_edges / 50).max(10))
        .clamp(1, n_edges);
    let runner = Runner::new(
        model,
        data,
        opts.ablation,
        opts.batch_size,
        opts.memory_budget,
    )?;
    let prepared = prepare(&runner)?;
    let n_chunks = prepared.len();

    let mut runs: Vec<Run> = Vec::new();
    if opts.exact {
        let t = Instant::now();
        let scores = exact_edge_scores(&runner, opts.metric, opts.progress)?;
        runs.push(Run {
            method: DiscoverMethod::ExactPatching,
            scores,
            seconds: t.elapsed().as_secs_f64(),
            forward_passes: (n_edges + 1) * n_chunks,
            acdc: None,
        });
    }
    let mut clean_metric = 0.0;
    let mut corrupted_metric = None;
    for method in [
        Method::Eap,
        Method::EapIg {
            steps: opts.ig_steps,
        },
    ] {
        // EAP-IG integrates from the ablation's baseline, whichever ablation it is.
        let att = attribute(
            model,
            data,
            &AttributionOptions {
                method,
                metric: opts.metric,
                ablation: opts.ablation,
                batch_size: opts.batch_size,
                memory_budget: opts.memory_budget,
                progress: opts.progress,
            },
        )?;
        clean_metric = att.clean_metric;
        corrupted_metric = att.corrupted_metric;
        runs.push(Run {
            method: match method {
                Method::EapIg { steps } => DiscoverMethod::EapIg { steps },
                _ => DiscoverMethod::Eap,
            },
            scores: att.scores,
            seconds: att.seconds,
            forward_passes: att.forward_passes,
            acdc: None,
        });
    }
    // M(full) and M(∅), once for every faithfulness below and ACDC's scale.
    let baseline = FaithfulnessBaseline::new(model, &prepared, opts.metric)?;
    if opts.acdc {
        let eap_scores = runs
            .iter()
            .find(|r| r.method == DiscoverMethod::Eap)
            .map(|r| r.scores.clone())
            .expect("EAP ran");
        let keep = opts
            .hybrid_keep
            .unwrap_or((3 * top_n).max(n_edges / 5))
            .clamp(1, n_edges);
        let scale = baseline.scale();
        let tau = opts.acdc_threshold * scale;
        let acdc = AcdcOptions {
            threshold: tau,
            metric: opts.metric,
            initial_patched: None,
            // Each sweep shows one progress over its thresholds.
            progress: opts.progress,
            ..Default::default()
        };
        let hybrid = hybrid(&eap_scores, Some(keep), None, acdc.clone())?;
        for (method, base) in [
            (DiscoverMethod::Acdc, acdc),
            (DiscoverMethod::Hybrid { keep }, hybrid),
        ] {
            let mut thresholds: Vec<f32> = opts.acdc_thresholds.iter().map(|f| f * scale).collect();
            if !thresholds.contains(&tau) {
                thresholds.push(tau);
            }
            let t = Instant::now();
            let sweep = threshold_sweep(model, &prepared, &base, &thresholds, truth)?;
            // The scale's two forwards per chunk are charged to each ACDC method.
            let seconds = t.elapsed().as_secs_f64();
            let passes = sweep.forward_passes + 2 * n_chunks;
            let chosen = sweep
                .runs
                .iter()
                .find(|r| r.threshold == tau)
                .expect("τ is in the sweep");
            runs.push(Run {
                method,
                scores: chosen.scores.clone(),
                seconds,
                forward_passes: passes,
                acdc: Some((sweep.roc.clone(), chosen.circuit.clone())),
            });
        }
    }

    let fractions = default_fractions();
    let exact_values: Option<Vec<f64>> = opts.exact.then(|| {
        runs[0]
            .scores
            .edge_values()
            .iter()
            .map(|&v| v as f64)
            .collect()
    });
    let mut methods = Vec::new();
    // One patched run per fraction of the curve and one for the circuit, per method.
    let mut bar = crate::progress::Progress::new(
        opts.progress,
        "faithfulness",
        runs.len() * (fractions.len() + 1),
        "patched runs",
    );
    for run in runs {
        let roc = match &run.acdc {
            Some((roc, _)) => roc.clone(),
            None => truth.map(|t| roc_from_graph(&run.scores, t)).transpose()?,
        };
        let curve_values = fractions
            .iter()
            .map(|f| {
                let k = ((f * n_edges as f64).ceil() as usize).clamp(1, n_edges);
                let f = baseline.of_top(&run.scores, k)?.faithfulness;
                bar.inc(1);
                Ok(f)
            })
            .collect::<Result<Vec<_>>>()?;
        let curve = FaithfulnessCurve::new(fractions.clone(), curve_values)?;
        let faithfulness = match &run.acdc {
            Some((_, circuit)) => baseline.of(circuit)?,
            None => baseline.of_top(&run.scores, top_n)?,
        }
        .faithfulness;
        bar.inc(1);
        let vs_exact = match &exact_values {
            Some(ex) if run.method != DiscoverMethod::ExactPatching => {
                let ys: Vec<f64> = run.scores.edge_values().iter().map(|&v| v as f64).collect();
                Some(correlation(ex, &ys)?)
            }
            _ => None,
        };
        methods.push(MethodResult {
            method: run.method,
            name: run.method.to_string(),
            scores: run.scores,
            seconds: run.seconds,
            forward_passes: run.forward_passes,
            roc,
            faithfulness,
            curve,
            vs_exact,
        });
    }
    bar.finish();
    let eap = methods
        .iter()
        .find(|m| m.method == DiscoverMethod::Eap)
        .expect("EAP always runs");
    let circuit = Circuit::top_n(&eap.scores, top_n).prune();
    Ok(Discovery {
        model_name: model.name.clone(),
        d_model: model.cfg.d_model,
        task_name: data.name.clone(),
        metric: opts.metric,
        n_examples: data.examples.len(),
        n_edges,
        top_n,
        circuit,
        circuit_method: DiscoverMethod::Eap,
        methods,
        truth: truth.cloned(),
        clean_metric,
        corrupted_metric,
    })
}

impl Discovery {
    /// The per-method comparison as text.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<20} {:>9} {:>9} {:>13} {:>11} {:>9} {:>10}\n",
            "method", "AUC", "AUC(ACDC)", "faithfulness", "R² vs exact", "passes", "time"
        );
        for m in &self.methods {
            let auc = m
                .roc
                .as_ref()
                .map_or("-".into(), |r| format!("{:.3}", r.auc_trapezoid));
            let pess = m
                .roc
                .as_ref()
                .map_or("-".into(), |r| format!("{:.3}", r.auc_staircase));
            let r2 = m
                .vs_exact
                .as_ref()
                .map_or("-".into(), |c| format!("{:.3}", c.r2));
            out += &format!(
                "{:<20} {:>9} {:>9} {:>13.3} {:>11} {:>9} {:>9.2}s\n",
                m.name, auc, pess, m.faithfulness, r2, m.forward_passes, m.seconds
            );
        }
        out
    }

    /// The task, the circuit and the per-method table, as `eap discover` prints them.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} examples, metric {}: clean {:.4}{}; {} edges in the graph\n",
            self.n_examples,
            self.metric,
            self.clean_metric,
            self.corrupted_metric
                .map(|c| format!(", corrupted {c:.4}"))
                .unwrap_or_default(),
            self.n_edges
        );
        out += &format!(
            "\ncircuit ({} top-{} edges by |score|, pruned: {} edges):\n",
            self.circuit_method,
            self.top_n,
            self.circuit.n_edges()
        );
        for line in self.circuit_lines() {
            out += &format!("  {line}\n");
        }
        out + "\n" + &self.table()
    }

    /// The circuit's edges, largest |score| first.
    pub fn circuit_lines(&self) -> Vec<String> {
        let eap = self
            .methods
            .iter()
            .find(|m| m.method == self.circuit_method)
            .expect("circuit method ran");
        let g = self.circuit.graph;
        let mut edges: Vec<(usize, usize)> = g
            .edges()
            .filter(|&(w, r)| self.circuit.contains(w, r))
            .collect();
        edges.sort_by(|a, b| {
            eap.scores
                .get(b.0, b.1)
                .abs()
                .total_cmp(&eap.scores.get(a.0, a.1).abs())
        });
        edges
            .iter()
            .map(|&(w, r)| {
                let mark = match &self.truth {
                    Some(t) if t.contains(w, r) => "  (in ground truth)",
                    Some(_) => "  (not in ground truth)",
                    None => "",
                };
                format!(
                    "{:>+10.4}  {}{}",
                    eap.scores.get(w, r),
                    g.edge_name(w, r),
                    mark
                )
            })
            .collect()
    }

    pub fn report(&self, command: &str) -> Report {
        let mut report = Report::new(
            format!("eap: circuit discovery on {}", self.model_name),
            command,
        );
        let header = [
            "method",
            "ROC AUC (trapezoid)",
            "ROC AUC (ACDC pessimistic)",
            &format!(
                "faithfulness at {} edges (ACDC: its circuit at τ)",
                self.top_n
            ),
            "CPR",
            "CMD",
            "R² vs exact",
            "Spearman vs exact",
            "forward passes",
            "wall time (s)",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let rows = self
            .methods
            .iter()
            .map(|m| {
                vec![
                    m.name.clone(),
                    m.roc
                        .as_ref()
                        .map_or("-".into(), |r| format!("{:.3}", r.auc_trapezoid)),
                    m.roc
                        .as_ref()
                        .map_or("-".into(), |r| format!("{:.3}", r.auc_staircase)),
                    format!("{:.3}", m.faithfulness),
                    format!("{:.3}", m.curve.cpr),
                    format!("{:.3}", m.curve.cmd),
                    m.vs_exact
                        .as_ref()
                        .map_or("-".into(), |c| format!("{:.3}", c.r2)),
                    m.vs_exact
                        .as_ref()
                        .map_or("-".into(), |c| format!("{:.3}", c.spearman)),
                    m.forward_passes.to_string(),
                    format!("{:.3}", m.seconds),
                ]
            })
            .collect();
        report.sections.push(Section::Text {
            title: "Task".into(),
            body: format!(
                "{} examples of `{}`; metric {} — clean {:.4}{}. The graph has {} edges{}. Scores estimate M(edge patched) − M(clean).",
                self.n_examples,
                self.task_name,
                self.metric,
                self.clean_metric,
                self.corrupted_metric.map(|c| format!(", corrupted {c:.4}")).unwrap_or_default(),
                self.n_edges,
                self.truth.as_ref().map(|t| format!("; the ground truth has {}", t.n_edges())).unwrap_or_default()
            ),
        });
        report.sections.push(Section::Table {
            title: "Methods".into(),
            header,
            rows,
        });
        let eap = self
            .methods
            .iter()
            .find(|m| m.method == self.circuit_method)
            .expect("ran");
        report.sections.push(Section::Figure {
            title: format!("Circuit: {}'s top {} edges, pruned ({} edges)", self.circuit_method, self.top_n, self.circuit.n_edges()),
            svg: circuit_svg(&self.circuit, Some(&eap.scores)),
            caption: "Readers coloured by q/k/v; edge width by |score|; dashed edges have negative scores.".into(),
        });
        if let Some(truth) = &self.truth {
            let exact = self
                .methods
                .iter()
                .find(|m| m.method == DiscoverMethod::ExactPatching);
            report.sections.push(Section::Figure {
                title: format!("Ground truth ({} edges)", truth.n_edges()),
                svg: circuit_svg(truth, exact.map(|m| &m.scores)),
                caption: "The construction's circuit, widths from exact patching.".into(),
            });
            let curves: Vec<(String, Roc)> = self
                .methods
                .iter()
                .filter_map(|m| m.roc.clone().map(|r| (m.name.clone(), r)))
                .collect();
            report.sections.push(Section::Figure {
                title: "ROC against the ground truth".into(),
                svg: roc_svg(&curves),
                caption: "Edges ranked by |score|; TPR and FPR over all real edges. ACDC and EAP→ACDC: one point per threshold of a sweep (|Δ task metric| < τ), one circuit each, joined through (0, 0) and (1, 1).".into(),
            });
        }
        let curves: Vec<(String, FaithfulnessCurve)> = self
            .methods
            .iter()
            .map(|m| (m.name.clone(), m.curve.clone()))
            .collect();
        report.sections.push(Section::Figure {
            title: "Faithfulness over circuit size".into(),
            svg: faithfulness_svg(&curves),
            caption: "Top k% of edges by |score| kept, every other edge patched; f = (M(C) − M(∅)) / (M(full) − M(∅)).".into(),
        });
        if let Some(exact) = self
            .methods
            .iter()
            .find(|m| m.method == DiscoverMethod::ExactPatching)
        {
            let ex = exact.scores.edge_values();
            for m in self.methods.iter().filter(|m| m.vs_exact.is_some()) {
                let points: Vec<(f64, f64)> = ex
                    .iter()
                    .zip(m.scores.edge_values())
                    .map(|(&x, y)| (x as f64, y as f64))
                    .collect();
                report.sections.push(Section::Figure {
                    title: format!("{} against exact patching, per edge", m.name),
                    svg: scatter_svg(&format!("{} vs exact patching", m.name), "exact patching: M(edge patched) − M(clean)", &format!("{} score", m.name), &points, m.vs_exact.as_ref()),
                    caption: "Points off the diagonal are edges where the linear approximation misjudges the effect of patching (saturated attention starves gradients).".into(),
                });
            }
        }
        report.sections.push(Section::Text {
            title: "Circuit edges".into(),
            body: self.circuit_lines().join("\n"),
        });
        report
    }

    /// Writes `circuit.json`, `circuit.svg` and `report.html` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path, command: &str) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let eap = self
            .methods
            .iter()
            .find(|m| m.method == self.circuit_method)
            .expect("ran");
        let meta = serde_json::json!({
            "method": "eap", "metric": self.metric.to_string(), "n_examples": self.n_examples,
            "top_n": self.top_n, "task": self.task_name, "model": self.model_name,
            "d_model": self.d_model,
            "score_convention": "score estimates M(edge patched) - M(clean) (EAP-IG sign)",
        });
        let json = dir.join("circuit.json");
        CircuitFile::new(eap.scores.clone(), self.circuit.clone(), meta)?.write(&json)?;
        let svg = dir.join("circuit.svg");
        write_atomic(
            &svg,
            circuit_svg(&self.circuit, Some(&eap.scores)).as_bytes(),
        )?;
        let html = dir.join("report.html");
        self.report(command).write(&html)?;
        Ok(vec![json, svg, html])
    }
}

use crate::fsutil::write_atomic;
