//! The MIB circuit track's scores (Mueller et al. 2025, "MIB: A Mechanistic Interpretability
//! Benchmark"), computed as `MIB_circuit_track/evaluation.py::evaluate_area_under_curve` of
//! hannamw/MIB-circuit-track computes them, and its submission folders.
//!
//! For each budget `pct` in [`MIB_PERCENTAGES`], the `int(pct · N)` best-scored of the `N` real
//! edges are selected, the circuit is pruned (nodes without inputs or outputs go, to a fixed
//! point), every other edge is patched, and `f = (m(C) − m(∅)) / (m(M) − m(∅))`. The areas are
//! trapezoids over the budgets on a linear axis: `area_under` = Σ Δx (f₁ + f₂)/2 and
//! `area_from_1` = Σ Δx (|1 − f₁| + |1 − f₂|)/2 ([`FaithfulnessCurve`]). MIB's leaderboard
//! (`print_results.py`) takes **CPR** = `area_under` of the selection by *signed* score
//! (`absolute=False`) and **CMD** = `area_from_1` of the selection by |score|
//! (`absolute=True`), so [`mib_score`] runs both selections. The weighted edge count MIB stores
//! is the number of edges left after pruning (edge-level circuits).
//!
//! Submissions ([`write_submission`], [`read_submission`]): one folder per task and model named
//! `<task>_<model>` (underscores in the task become hyphens, as MIB's scripts write them), each
//! holding `importances.json` in EAP-IG's layout.

use std::path::{Path, PathBuf};

use super::{FaithfulnessBaseline, FaithfulnessCurve};
use crate::graph::{Circuit, CircuitFile, Scores};
use crate::progress::Progress;
use crate::{Error, Result};

/// MIB's edge budgets, as fractions of the real edges.
pub const MIB_PERCENTAGES: [f64; 10] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0];

/// The circuit at one budget.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MibBudget {
    /// The fraction of edges asked for.
    pub fraction: f64,
    /// `int(fraction · N)`: the edges selected before pruning.
    pub selected: usize,
    /// The edges left after pruning (MIB's `weighted_edge_count` for edge-level circuits).
    pub edges: usize,
    /// m(C).
    pub metric: f32,
    /// `(m(C) − m(∅)) / (m(M) − m(∅))`.
    pub faithfulness: f64,
}

/// One selection rule's curve over the budgets.
#[derive(Debug, Clone, PartialEq)]
pub struct MibCurve {
    /// Selection by |score| (`true`) or by signed score.
    pub absolute: bool,
    pub budgets: Vec<MibBudget>,
    /// The faithfulness values over [`MIB_PERCENTAGES`] with both areas.
    pub curve: FaithfulnessCurve,
    /// The mean faithfulness over the budgets (MIB's `average`).
    pub average: f64,
}

/// A scores file's MIB numbers on one model, dataset, metric and ablation.
#[derive(Debug, Clone, PartialEq)]
pub struct MibScore {
    /// Real edges `N`.
    pub n_edges: usize,
    /// m(M): nothing patched.
    pub m_full: f32,
    /// m(∅): every edge patched.
    pub m_empty: f32,
    /// Selection by signed score: its `area_under` is the CPR.
    pub signed: MibCurve,
    /// Selection by |score|: its `area_from_1` is the CMD.
    pub absolute: MibCurve,
}

impl MibScore {
    /// Circuit performance ratio (higher is better): the area under the signed selection's
    /// faithfulness.
    pub fn cpr(&self) -> f64 {
        self.signed.curve.cpr
    }

    /// Circuit–model difference (lower is better): the area between the |score| selection's
    /// faithfulness and 1.
    pub fn cmd(&self) -> f64 {
        self.absolute.curve.cmd
    }

    /// The scores and one line per budget, as `eap mib` prints them.
    pub fn table(&self, metric: crate::tasks::Metric, ablation: crate::runs::Ablation) -> String {
        let mut out = format!(
            "MIB ({metric}, {ablation} ablation, {} edges): CPR {:.4}, CMD {:.4}\n",
            self.n_edges,
            self.cpr(),
            self.cmd()
        );
        out += &format!(
            "{:>8} {:>9} {:>14} {:>9} {:>14} {:>9}\n",
            "budget", "selected", "signed: edges", "f", "|score|: edges", "f"
        );
        for (s, a) in self.signed.budgets.iter().zip(&self.absolute.budgets) {
            out += &format!(
                "{:>7.1}% {:>9} {:>14} {:>9.4} {:>14} {:>9.4}\n",
                100.0 * s.fraction,
                s.selected,
                s.edges,
                s.faithfulness + 0.0, // no "-0.0000" for empty circuits
                a.edges,
                a.faithfulness + 0.0
            );
        }
        out
    }

    /// Everything as JSON, per-budget values included.
    pub fn to_json(&self) -> serde_json::Value {
        let curve = |c: &MibCurve| {
            serde_json::json!({
                "absolute": c.absolute,
                "budgets": c.budgets,
                "area_under": c.curve.cpr,
                "area_from_1": c.curve.cmd,
                "average": c.average,
                "weighted_edge_counts": c.budgets.iter().map(|b| b.edges).collect::<Vec<_>>(),
                "faithfulnesses": c.curve.faithfulness,
            })
        };
        serde_json::json!({
            "cpr": self.cpr(),
            "cmd": self.cmd(),
            "n_edges": self.n_edges,
            "m_full": self.m_full,
            "m_empty": self.m_empty,
            "percentages": MIB_PERCENTAGES,
            "signed": curve(&self.signed),
            "absolute": curve(&self.absolute),
            "convention": "MIB circuit track: int(pct * N) top edges per budget, pruned; f = (m(C) - m(empty)) / (m(full) - m(empty)); trapezoids on the linear fraction axis; CPR = area_under of the signed selection, CMD = area_from_1 of the |score| selection",
        })
    }
}

/// `int(fraction · n)` as Python computes it (the product in f64, truncated).
pub fn budget_edges(fraction: f64, n: usize) -> usize {
    (fraction * n as f64).floor() as usize
}

/// The circuit MIB evaluates at one budget: the `k` best edges by |score| or by signed score,
/// pruned.
pub fn budget_circuit(scores: &Scores, k: usize, absolute: bool) -> Circuit {
    let chosen = match absolute {
        true => Circuit::top_n(scores, k),
        false => Circuit::top_n_signed(scores, k),
    };
    chosen.prune()
}

/// One selection rule's faithfulness curve over [`MIB_PERCENTAGES`].
pub fn mib_curve(
    baseline: &FaithfulnessBaseline,
    scores: &Scores,
    absolute: bool,
) -> Result<MibCurve> {
    curve_with(baseline, scores, absolute, &mut Progress::hidden())
}

/// [`mib_curve`], one step of `bar` per budget.
fn curve_with(
    baseline: &FaithfulnessBaseline,
    scores: &Scores,
    absolute: bool,
    bar: &mut Progress,
) -> Result<MibCurve> {
    let n = scores.graph.n_edges();
    let mut budgets = Vec::with_capacity(MIB_PERCENTAGES.len());
    for &fraction in &MIB_PERCENTAGES {
        let selected = budget_edges(fraction, n);
        let circuit = budget_circuit(scores, selected, absolute);
        let f = baseline.of(&circuit)?;
        budgets.push(MibBudget {
            fraction,
            selected,
            edges: circuit.n_edges(),
            metric: f.circuit,
            faithfulness: f.faithfulness,
        });
        bar.inc(1);
    }
    let values: Vec<f64> = budgets.iter().map(|b| b.faithfulness).collect();
    let average = values.iter().sum::<f64>() / values.len() as f64;
    Ok(MibCurve {
        absolute,
        budgets,
        curve: FaithfulnessCurve::new(MIB_PERCENTAGES.to_vec(), values)?,
        average,
    })
}

/// MIB's CPR and CMD of `scores`: both selections over every budget (20 patched runs per chunk
/// beside the baseline's two), with progress on stderr.
pub fn mib_score(baseline: &FaithfulnessBaseline, scores: &Scores) -> Result<MibScore> {
    let mut bar = Progress::new(true, "MIB", 2 * MIB_PERCENTAGES.len(), "budgets");
    let score = MibScore {
        n_edges: scores.graph.n_edges(),
        m_full: baseline.full,
        m_empty: baseline.empty,
        signed: curve_with(baseline, scores, false, &mut bar)?,
        absolute: curve_with(baseline, scores, true, &mut bar)?,
    };
    bar.finish();
    Ok(score)
}

/// The folder MIB expects for one task and model: `<task>_<model>`, the task's underscores as
/// hyphens (`arithmetic_addition` → `arithmetic-addition_gpt2`).
pub fn submission_folder(task: &str, model: &str) -> Result<String> {
    let bad = |v: &str| v.is_empty() || v.contains(['/', '\\']) || v == "." || v == "..";
    if bad(task) || bad(model) || model.contains('_') {
        return Err(Error::invalid(format!(
            "submission names must be non-empty, without path separators, and the model name \
             without underscores (MIB splits `<task>_<model>` at the underscore): task `{task}`, \
             model `{model}`"
        )));
    }
    Ok(format!("{}_{model}", task.replace('_', "-")))
}

/// Writes `file` as `dir/<task>_<model>/importances.json`, MIB's importance-score submission
/// layout; returns the file's path.
pub fn write_submission(
    dir: &Path,
    task: &str,
    model: &str,
    file: &CircuitFile,
) -> Result<PathBuf> {
    let folder = dir.join(submission_folder(task, model)?);
    std::fs::create_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
    let path = folder.join("importances.json");
    file.write(&path)?;
    Ok(path)
}

/// One task and model of a submission folder.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmissionEntry {
    /// As the folder names it (hyphens).
    pub task: String,
    pub model: String,
    pub file: CircuitFile,
}

/// Reads every `<task>_<model>/importances.json` below `dir`, sorted by folder name. A folder
/// whose name has no underscore, or that lacks `importances.json`, is an error naming it.
pub fn read_submission(dir: &Path) -> Result<Vec<SubmissionEntry>> {
    let mut folders: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    folders.sort();
    if folders.is_empty() {
        return Err(Error::invalid(format!(
            "{}: no `<task>_<model>` folders in the submission",
            dir.display()
        )));
    }
    folders
        .into_iter()
        .map(|folder| {
            let name = folder
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let (task, model) = name.rsplit_once('_').ok_or_else(|| {
                Error::invalid(format!(
                    "{}: a submission folder is named `<task>_<model>`",
                    folder.display()
                ))
            })?;
            let path = folder.join("importances.json");
            if !path.is_file() {
                return Err(Error::invalid(format!(
                    "{}: no importances.json in the submission folder",
                    folder.display()
                )));
            }
            Ok(SubmissionEntry {
                task: task.to_string(),
                model: model.to_string(),
                file: CircuitFile::read(&path)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_truncate_like_python() {
        // Python: int(0.001 * 32491) == 32, int(0.1 * 1281) == 128, int(0.002 * 81) == 0.
        assert_eq!(budget_edges(0.001, 32491), 32);
        assert_eq!(budget_edges(0.1, 1281), 128);
        assert_eq!(budget_edges(0.002, 81), 0);
        assert_eq!(budget_edges(1.0, 179_749), 179_749);
        // 0.29 * 100 is 28.999999999999996 in f64: Python's int() gives 28, and so do we.
        assert_eq!(budget_edges(0.29, 100), 28);
    }

    #[test]
    fn submission_folders_follow_mib_naming() {
        assert_eq!(
            submission_folder("arithmetic_addition", "gpt2").unwrap(),
            "arithmetic-addition_gpt2"
        );
        assert_eq!(submission_folder("ioi", "qwen2.5").unwrap(), "ioi_qwen2.5");
        for (t, m) in [
            ("", "gpt2"),
            ("ioi", "a/b"),
            ("ioi", "my_model"),
            ("..", "gpt2"),
        ] {
            assert!(submission_folder(t, m).is_err(), "{t} {m}");
        }
    }
}
