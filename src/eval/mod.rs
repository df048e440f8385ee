//! Evaluation of scores and circuits (DESIGN §6): ROC/AUC against a ground-truth edge set,
//! MIB faithfulness curves with their CPR and CMD areas, and the correlation between two
//! score lists (attribution against exact patching).
//!
//! Apart from [`FaithfulnessBaseline`], everything here is plain arithmetic on slices, so it
//! applies to any scores file and any ground truth; [`roc_from_graph`] is the one bridge from
//! [`Scores`] and [`Circuit`]. The pictures of these values live in [`crate::report`].
//!
//! * [`roc`] → [`Roc`]: points `(FPR, TPR)` and two areas (trapezoid, ACDC's pessimistic one);
//!   [`roc_from_points`]: the same from one `(FPR, TPR)` point per circuit (ACDC's sweep).
//! * [`faithfulness`], [`FaithfulnessCurve`], [`default_fractions`]: MIB's normalised metric
//!   and the CPR/CMD areas over the fraction of edges kept.
//! * [`FaithfulnessBaseline`] → [`Faithfulness`]: the faithfulness of circuits on a model, with
//!   `M(full)` and `M(∅)` run once for all of them (the one part of this module that runs the
//!   model, through [`crate::patching`]).
//! * [`correlation`] → [`Correlation`]: Pearson, R², Spearman.
//! * [`interpbench`]: InterpBench's ground-truth `edges.pkl` in eap's edge names.
//! * [`mib`]: the MIB circuit track's CPR and CMD exactly as its evaluation code computes them
//!   ([`mib_score`] → [`MibScore`]), and its submission folders.

mod faithfulness;
pub mod interpbench;
pub mod mib;

pub use faithfulness::{evaluate_circuit, Faithfulness, FaithfulnessBaseline};
pub use mib::{mib_score, MibScore};

use crate::graph::{Circuit, Scores};
use crate::{bail, Result};

// ---------------------------------------------------------------------------------------------
// ROC
// ---------------------------------------------------------------------------------------------

/// A ROC curve of a ranking of edges against a ground-truth circuit.
#[derive(Debug, Clone, PartialEq)]
pub struct Roc {
    /// `(FPR, TPR)` points from `(0, 0)` to `(1, 1)`, both coordinates non-decreasing: one
    /// point for the empty selection and one per distinct `|score|`, taking the top edges by
    /// `|score|` (edges whose `|score|` ties enter together).
    pub points: Vec<(f64, f64)>,
    /// Area under the piecewise-linear curve through `points` (trapezoid rule). A tie that
    /// mixes true and false edges is a diagonal segment, which counts as chance within the tie
    /// (the Mann–Whitney convention: ties count half).
    pub auc_trapezoid: f64,
    /// ACDC's pessimistic area (Conmy et al. 2023, `pessimistic_auc` in
    /// `acdc/acdc_utils.py`): `Σ_i (1 − FPR_i) · (TPR_i − TPR_{i−1})` over the points sorted
    /// by `(FPR, TPR)`. Each rise in TPR is paid for at the FPR of the point it reaches, so a
    /// tie counts as if all its false edges came first. Without ties it equals the trapezoid.
    pub auc_staircase: f64,
}

impl Roc {
    /// The curve through `points` (already ordered from (0, 0) to (1, 1)) and both its areas.
    fn from_points(points: Vec<(f64, f64)>) -> Roc {
        Roc {
            auc_trapezoid: trapezoid_area(&points),
            auc_staircase: pessimistic_area(&points),
            points,
        }
    }
}

/// ROC of a ranking by `|score|` against `truth`, over the same list of edges.
///
/// Edges are ranked by `|score|` descending and the number of top edges is swept from none to
/// all; edges with equal `|score|` enter together, so each distinct `|score|` gives one point.
/// TPR = true edges selected / true edges; FPR = false edges selected / false edges.
///
/// Errors when the lengths differ, when `truth` has no positive or no negative edge (either
/// rate would be 0/0), and when a score is NaN or infinite.
pub fn roc(scores: &[f32], truth: &[bool]) -> Result<Roc> {
    if scores.len() != truth.len() {
        bail!(
            "roc: {} scores but {} ground-truth labels",
            scores.len(),
            truth.len()
        );
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        bail!("roc: score {i} is not finite ({})", scores[i]);
    }
    let n_pos = truth.iter().filter(|&&t| t).count();
    let n_neg = truth.len() - n_pos;
    if n_pos == 0 {
        bail!("roc: the ground truth has no true edges, so the true-positive rate is undefined");
    }
    if n_neg == 0 {
        bail!("roc: the ground truth contains every edge, so the false-positive rate is undefined");
    }

    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].abs().total_cmp(&scores[a].abs()));

    let (p, n) = (n_pos as f64, n_neg as f64);
    let mut points = vec![(0.0, 0.0)];
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut i = 0;
    while i < order.len() {
        let value = scores[order[i]].abs();
        while i < order.len() && scores[order[i]].abs() == value {
            if truth[order[i]] {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        points.push((fp as f64 / n, tp as f64 / p));
    }
    Ok(Roc::from_points(points))
}

/// [`roc`] over the real edges of a graph ([`crate::graph::Graph::edges`] order): scores of
/// the method against the edges of a ground-truth circuit. Errors when the two graphs differ.
pub fn roc_from_graph(scores: &Scores, truth: &Circuit) -> Result<Roc> {
    truth.graph.expect(&scores.graph, "roc: the scores")?;
    let size = scores.graph.n_writers() * scores.graph.n_readers();
    if scores.values.len() != size || truth.edges.len() != size {
        bail!(
            "roc: expected {size} matrix entries, found {} scores and {} mask entries",
            scores.values.len(),
            truth.edges.len()
        );
    }
    let labels: Vec<bool> = scores
        .graph
        .edges()
        .map(|(w, r)| truth.contains(w, r))
        .collect();
    roc(&scores.edge_values(), &labels)
}

/// A ROC curve through separate `(FPR, TPR)` points, one per circuit — the way the ACDC paper
/// draws ACDC's curve from a threshold sweep (each τ gives one circuit). `(0, 0)` and `(1, 1)`
/// are added; the points are sorted by `(FPR, TPR)` and a point that another point dominates
/// (higher FPR, lower TPR) is lifted to the best TPR reached at a lower FPR, so the curve is
/// monotone (the Pareto frontier, as ACDC's plots use).
pub fn roc_from_points(mut points: Vec<(f64, f64)>) -> Result<Roc> {
    if let Some(p) = points.iter().find(|p| {
        !(p.0.is_finite() && p.1.is_finite()) || p.0 < 0.0 || p.0 > 1.0 || p.1 < 0.0 || p.1 > 1.0
    }) {
        bail!(
            "roc: point ({}, {}) is not a pair of rates in [0, 1]",
            p.0,
            p.1
        );
    }
    points.push((0.0, 0.0));
    points.push((1.0, 1.0));
    points.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let mut best = 0f64;
    for p in points.iter_mut() {
        best = best.max(p.1);
        p.1 = best;
    }
    points.dedup();
    Ok(Roc::from_points(points))
}

/// Trapezoid rule over `(x, y)` points in the given order.
fn trapezoid_area(points: &[(f64, f64)]) -> f64 {
    points
        .windows(2)
        .map(|w| (w[1].0 - w[0].0) * (w[0].1 + w[1].1) / 2.0)
        .sum()
}

/// ACDC's `pessimistic_auc`: sort by `(x, y)`, then `Σ_{i≥1} (1 − x_i)(y_i − y_{i−1})`.
fn pessimistic_area(points: &[(f64, f64)]) -> f64 {
    let mut sorted = points.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    sorted
        .windows(2)
        .map(|w| (1.0 - w[1].0) * (w[1].1 - w[0].1))
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Faithfulness (MIB)
// ---------------------------------------------------------------------------------------------

/// MIB's normalised faithfulness `(m(C) − m(∅)) / (m(full) − m(∅))`: 0 when the circuit does no
/// better than the empty circuit, 1 when it recovers the full model.
///
/// Errors when a value is not finite or when `m(full)` and `m(∅)` are (relatively) equal, as the
/// ratio would then be noise.
pub fn faithfulness(m_circuit: f64, m_empty: f64, m_full: f64) -> Result<f64> {
    if !(m_circuit.is_finite() && m_empty.is_finite() && m_full.is_finite()) {
        bail!(
            "faithfulness: metrics must be finite (circuit {m_circuit}, empty {m_empty}, full {m_full})"
        );
    }
    let denominator = m_full - m_empty;
    let scale = m_full.abs().max(m_empty.abs()).max(1.0);
    if denominator.abs() <= 1e-9 * scale {
        bail!(
            "faithfulness: the full model ({m_full}) and the empty circuit ({m_empty}) score the \
             same, so faithfulness is undefined"
        );
    }
    Ok((m_circuit - m_empty) / denominator)
}

/// The fractions of edges MIB keeps when it draws a faithfulness curve
/// (`percentages` of `evaluate_area_under_curve` in `MIB_circuit_track/evaluation.py`):
/// 0.1 %, 0.2 %, 0.5 %, 1 %, 2 %, 5 %, 10 %, 20 %, 50 % and 100 %. MIB starts at 0.1 %, not 0.
pub fn default_fractions() -> Vec<f64> {
    vec![0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
}

/// Faithfulness measured at increasing fractions of edges kept, with MIB's two areas.
#[derive(Debug, Clone, PartialEq)]
pub struct FaithfulnessCurve {
    /// Fraction of edges kept, strictly increasing, in `[0, 1]`.
    pub fractions: Vec<f64>,
    /// Normalised faithfulness at each fraction (see [`faithfulness`]).
    pub faithfulness: Vec<f64>,
    /// CPR (circuit performance ratio, higher is better): `Σ (x₂ − x₁)(f₁ + f₂)/2`, the trapezoid
    /// area under `f` over the fractions as given, linear in x and not divided by the x range,
    /// as MIB's `area_under`.
    pub cpr: f64,
    /// CMD (circuit–model difference, lower is better): `Σ (x₂ − x₁)(|1 − f₁| + |1 − f₂|)/2`,
    /// MIB's `area_from_1`.
    pub cmd: f64,
}

impl FaithfulnessCurve {
    /// Builds the curve and its areas. Errors when the lengths differ, when there are fewer
    /// than two points, when a fraction is outside `[0, 1]` or the fractions do not increase
    /// strictly, or when a value is not finite.
    pub fn new(fractions: Vec<f64>, faithfulness: Vec<f64>) -> Result<Self> {
        if fractions.len() != faithfulness.len() {
            bail!(
                "faithfulness curve: {} fractions but {} faithfulness values",
                fractions.len(),
                faithfulness.len()
            );
        }
        if fractions.len() < 2 {
            bail!(
                "faithfulness curve: need at least two points to integrate, found {}",
                fractions.len()
            );
        }
        if let Some(x) = fractions
            .iter()
            .find(|x| !x.is_finite() || **x < 0.0 || **x > 1.0)
        {
            bail!("faithfulness curve: fraction {x} is outside [0, 1]");
        }
        if let Some(w) = fractions.windows(2).find(|w| w[1] <= w[0]) {
            bail!(
                "faithfulness curve: fractions must increase strictly, found {} then {}",
                w[0],
                w[1]
            );
        }
        if let Some(f) = faithfulness.iter().find(|f| !f.is_finite()) {
            bail!("faithfulness curve: faithfulness {f} is not finite");
        }
        let mut cpr = 0.0;
        let mut cmd = 0.0;
        for i in 0..fractions.len() - 1 {
            let dx = fractions[i + 1] - fractions[i];
            let (f1, f2) = (faithfulness[i], faithfulness[i + 1]);
            cpr += dx * (f1 + f2) / 2.0;
            cmd += dx * ((1.0 - f1).abs() + (1.0 - f2).abs()) / 2.0;
        }
        Ok(FaithfulnessCurve {
            fractions,
            faithfulness,
            cpr,
            cmd,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Correlation
// ---------------------------------------------------------------------------------------------

/// Agreement of two score lists, e.g. attribution scores (x) against exact patching (y).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Correlation {
    /// Number of pairs.
    pub n: usize,
    /// Pearson's r.
    pub pearson: f64,
    /// `pearson²`, the R² of the least-squares line of y on x.
    pub r2: f64,
    /// Spearman's ρ: Pearson's r of the ranks, tied values sharing their average rank.
    pub spearman: f64,
}

/// Pearson, R² and Spearman of paired values. Errors when the lengths differ, when there are
/// fewer than two pairs, when a value is not finite, or when either list is constant (the
/// correlation is then 0/0).
pub fn correlation(x: &[f64], y: &[f64]) -> Result<Correlation> {
    if x.len() != y.len() {
        bail!("correlation: {} x values but {} y values", x.len(), y.len());
    }
    if x.len() < 2 {
        bail!("correlation: need at least two pairs, found {}", x.len());
    }
    if let Some(v) = x.iter().chain(y).find(|v| !v.is_finite()) {
        bail!("correlation: value {v} is not finite");
    }
    let r = pearson(x, y)?;
    let spearman = pearson(&average_ranks(x), &average_ranks(y))?;
    Ok(Correlation {
        n: x.len(),
        pearson: r,
        r2: r * r,
        spearman,
    })
}

fn pearson(x: &[f64], y: &[f64]) -> Result<f64> {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx == 0.0 || syy == 0.0 {
        bail!("correlation: one of the lists is constant, so the correlation is undefined");
    }
    // Rounding can push |r| a hair above 1.
    Ok((sxy / (sxx.sqrt() * syy.sqrt())).clamp(-1.0, 1.0))
}

/// 1-based ranks, ties sharing the mean of the ranks they span.
fn average_ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut ranks = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        // Positions i..=j hold ranks i+1 ..= j+1, whose mean is (i + j)/2 + 1.
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = rank;
        }
        i = j + 1;
    }
    ranks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Graph;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn perfect_ranking_has_auc_one() {
        // |scores| 4 3 2 1 → labels T T F F. P = 2, N = 2.
        // Points: (0,0) (0,.5) (0,1) (.5,1) (1,1).
        // Trapezoid: 0 + 0 + .5·(1+1)/2 + .5·(1+1)/2 = 1.
        // Staircase: rises at FPR 0: (1−0)·.5 + (1−0)·.5 = 1.
        let r = roc(&[4.0, -3.0, 2.0, 1.0], &[true, true, false, false]).unwrap();
        assert_eq!(
            r.points,
            vec![(0.0, 0.0), (0.0, 0.5), (0.0, 1.0), (0.5, 1.0), (1.0, 1.0)]
        );
        assert!(close(r.auc_trapezoid, 1.0));
        assert!(close(r.auc_staircase, 1.0));
    }

    #[test]
    fn reversed_ranking_has_auc_zero() {
        // Labels by rank: F F T T. Points (0,0) (.5,0) (1,0) (1,.5) (1,1).
        // Trapezoid: every segment with dx > 0 has y = 0 → 0.
        // Staircase: the rises happen at FPR 1 → (1−1)·.5 + (1−1)·.5 = 0.
        let r = roc(&[1.0, 2.0, 3.0, 4.0], &[true, true, false, false]).unwrap();
        assert!(close(r.auc_trapezoid, 0.0));
        assert!(close(r.auc_staircase, 0.0));
    }

    #[test]
    fn interleaved_ranking_without_ties() {
        // Labels by rank: T F T F. Points (0,0) (0,.5) (.5,.5) (.5,1) (1,1).
        // Trapezoid: .5·(.5+.5)/2 + .5·(1+1)/2 = .25 + .5 = .75.
        // Staircase: (1−0)·.5 + (1−.5)·.5 = .5 + .25 = .75 (no ties: the two agree).
        let r = roc(&[4.0, 3.0, 2.0, 1.0], &[true, false, true, false]).unwrap();
        assert!(close(r.auc_trapezoid, 0.75));
        assert!(close(r.auc_staircase, 0.75));
    }

    #[test]
    fn a_mixed_tie_separates_trapezoid_and_staircase() {
        // |scores| 3 | 2 2 | 1 with labels T | T F | F. P = 2, N = 2.
        // Points: (0,0) (0,.5) then the tie enters together → (.5,1), then (1,1).
        // Trapezoid: 0 + .5·(.5+1)/2 + .5·(1+1)/2 = .375 + .5 = .875.
        // Staircase: (1−0)·.5 + (1−.5)·.5 + (1−1)·0 = .5 + .25 = .75.
        let r = roc(&[3.0, 2.0, -2.0, 1.0], &[true, true, false, false]).unwrap();
        assert_eq!(
            r.points,
            vec![(0.0, 0.0), (0.0, 0.5), (0.5, 1.0), (1.0, 1.0)]
        );
        assert!(close(r.auc_trapezoid, 0.875));
        assert!(close(r.auc_staircase, 0.75));
    }

    #[test]
    fn all_tied_is_one_diagonal_step() {
        // Everything enters at once: points (0,0) (1,1).
        // Trapezoid: 1·(0+1)/2 = .5 (chance). Staircase: (1−1)·1 = 0.
        let r = roc(&[0.0; 5], &[true, false, true, false, false]).unwrap();
        assert_eq!(r.points, vec![(0.0, 0.0), (1.0, 1.0)]);
        assert!(close(r.auc_trapezoid, 0.5));
        assert!(close(r.auc_staircase, 0.0));
    }

    #[test]
    fn staircase_matches_acdc_reference_values() {
        // The asserts under ACDC's `pessimistic_auc`.
        let area = |xs: &[f64], ys: &[f64]| {
            let p: Vec<_> = xs.iter().copied().zip(ys.iter().copied()).collect();
            pessimistic_area(&p)
        };
        assert!(close(area(&[0.0, 1.0], &[0.0, 1.0]), 0.0));
        assert!(close(area(&[0.0, 0.5, 1.0], &[0.0, 0.5, 1.0]), 0.25));
        assert!(close(
            area(&[0.0, 0.25, 1.0], &[0.0, 0.25, 1.0]),
            0.25 * 0.75
        ));
        assert!(close(
            area(&[0.0, 0.25, 0.5, 1.0], &[0.0, 0.25, 0.5, 1.0]),
            5.0 / 16.0
        ));
        assert!(close(
            area(&[0.0, 0.25, 0.75, 1.0], &[0.0, 0.25, 0.5, 1.0]),
            4.0 / 16.0
        ));
    }

    #[test]
    fn roc_rejects_bad_input() {
        assert!(roc(&[1.0, 2.0], &[true]).is_err());
        assert!(roc(&[1.0, 2.0], &[false, false]).is_err());
        assert!(roc(&[1.0, 2.0], &[true, true]).is_err());
        assert!(roc(&[f32::NAN, 2.0], &[true, false]).is_err());
        assert!(roc(&[f32::INFINITY, 2.0], &[true, false]).is_err());
        assert!(roc(&[], &[]).is_err());
    }

    #[test]
    fn roc_from_graph_uses_real_edges_only() {
        let g = Graph::new(1, 1, false);
        // Edges: input->a0.h0<q>, <k>, <v>, input->logits, a0.h0->logits.
        let mut scores = Scores::zeros(g);
        let mut truth = Circuit::empty(g);
        let nr = g.n_readers();
        let logits = nr - 1;
        scores.values[logits] = 5.0; // input->logits
        scores.values[nr + logits] = -4.0; // a0.h0->logits
        scores.values[0] = 1.0; // input->a0.h0<q>
                                // A non-edge cell with a huge score must be ignored (a0.h0 -> a0.h0<q>).
        scores.values[nr] = 100.0;
        truth.set(0, logits, true);
        truth.set(1, logits, true);
        let r = roc_from_graph(&scores, &truth).unwrap();
        assert!(close(r.auc_trapezoid, 1.0));
        let other = Circuit::empty(Graph::new(2, 1, false));
        assert!(roc_from_graph(&scores, &other).is_err());
    }

    #[test]
    fn faithfulness_normalises_and_rejects_flat_baselines() {
        // (3 − 1) / (5 − 1) = .5
        assert!(close(faithfulness(3.0, 1.0, 5.0).unwrap(), 0.5));
        assert!(close(faithfulness(5.0, 1.0, 5.0).unwrap(), 1.0));
        assert!(faithfulness(3.0, 2.0, 2.0).is_err());
        assert!(faithfulness(f64::NAN, 1.0, 2.0).is_err());
    }

    #[test]
    fn cpr_and_cmd_on_a_hand_made_curve() {
        // x: 0, .1, .5, 1; f: 0, .5, 1.5, 1.
        // CPR: .1·(0+.5)/2 + .4·(.5+1.5)/2 + .5·(1.5+1)/2 = .025 + .4 + .625 = 1.05.
        // |1−f|: 1, .5, .5, 0.
        // CMD: .1·(1+.5)/2 + .4·(.5+.5)/2 + .5·(.5+0)/2 = .075 + .2 + .125 = .4.
        let c = FaithfulnessCurve::new(vec![0.0, 0.1, 0.5, 1.0], vec![0.0, 0.5, 1.5, 1.0]).unwrap();
        assert!(close(c.cpr, 1.05));
        assert!(close(c.cmd, 0.4));
    }

    #[test]
    fn a_perfect_curve_over_mib_fractions() {
        // f ≡ 1 over MIB's fractions: CPR = 1 − 0.001 = .999 (not normalised by the range), CMD = 0.
        let x = default_fractions();
        assert_eq!(x.len(), 10);
        let c = FaithfulnessCurve::new(x.clone(), vec![1.0; x.len()]).unwrap();
        assert!((c.cpr - 0.999).abs() < 1e-12);
        assert!(close(c.cmd, 0.0));
    }

    #[test]
    fn faithfulness_curve_rejects_bad_input() {
        assert!(FaithfulnessCurve::new(vec![0.1], vec![1.0]).is_err());
        assert!(FaithfulnessCurve::new(vec![0.1, 0.2], vec![1.0]).is_err());
        assert!(FaithfulnessCurve::new(vec![0.2, 0.1], vec![1.0, 1.0]).is_err());
        assert!(FaithfulnessCurve::new(vec![0.1, 1.5], vec![1.0, 1.0]).is_err());
        assert!(FaithfulnessCurve::new(vec![0.1, 0.2], vec![1.0, f64::NAN]).is_err());
    }

    #[test]
    fn correlation_of_small_vectors() {
        // x = 1 2 3 4, y = 2 4 6 8: a perfect line → r = 1, R² = 1, ρ = 1.
        let c = correlation(&[1.0, 2.0, 3.0, 4.0], &[2.0, 4.0, 6.0, 8.0]).unwrap();
        assert!(close(c.pearson, 1.0) && close(c.r2, 1.0) && close(c.spearman, 1.0));
        assert_eq!(c.n, 4);

        // x = 1 2 3, y = 1 3 2. Means 2, 2. dx = −1 0 1, dy = −1 1 0.
        // Sxy = 1 + 0 + 0 = 1, Sxx = 2, Syy = 2 → r = 1/2, R² = 1/4.
        // Ranks equal the values, so ρ = 1/2 too.
        let c = correlation(&[1.0, 2.0, 3.0], &[1.0, 3.0, 2.0]).unwrap();
        assert!(close(c.pearson, 0.5) && close(c.r2, 0.25) && close(c.spearman, 0.5));

        // Monotone but not linear: x = 1 2 3, y = 1 10 100 → ρ = 1 while r < 1.
        // Means 2 and 37. dy = −36 −27 63. Sxy = 36 + 0 + 63 = 99, Sxx = 2,
        // Syy = 1296 + 729 + 3969 = 5994 → r = 99 / √11988.
        let c = correlation(&[1.0, 2.0, 3.0], &[1.0, 10.0, 100.0]).unwrap();
        assert!(close(c.spearman, 1.0));
        assert!(close(c.pearson, 99.0 / 11988f64.sqrt()));
    }

    #[test]
    fn spearman_averages_tied_ranks() {
        // x = 1 2 2 3 → ranks 1 2.5 2.5 4; y = 1 2 3 4 → ranks 1 2 3 4.
        // Rank means 2.5, 2.5. dx = −1.5 0 0 1.5, dy = −1.5 −.5 .5 1.5.
        // Sxy = 2.25 + 0 + 0 + 2.25 = 4.5, Sxx = 4.5, Syy = 2.25+.25+.25+2.25 = 5
        // → ρ = 4.5 / √(4.5·5) = √(4.5/5) = √.9.
        assert_eq!(
            average_ranks(&[1.0, 2.0, 2.0, 3.0]),
            vec![1.0, 2.5, 2.5, 4.0]
        );
        let c = correlation(&[1.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!(close(c.spearman, 0.9f64.sqrt()));
    }

    #[test]
    fn correlation_rejects_bad_input() {
        assert!(correlation(&[1.0], &[1.0]).is_err());
        assert!(correlation(&[1.0, 2.0], &[1.0]).is_err());
        assert!(correlation(&[1.0, 1.0], &[1.0, 2.0]).is_err());
        assert!(correlation(&[1.0, f64::NAN], &[1.0, 2.0]).is_err());
    }
}
