use std::time::Instant;

use candle_core::Device;

use super::*;
use crate::eval::{faithfulness, roc_from_graph};

const N: usize = 32;

fn setup(kind: PlantedKind) -> (PlantedModel, Dataset, Metric) {
    let planted = build(kind, &Device::Cpu).unwrap();
    let (data, metric) = dataset(kind, N, 7).unwrap();
    (planted, data, metric)
}

#[test]
fn names_round_trip() {
    use clap::ValueEnum;
    for k in PlantedKind::ALL {
        assert_eq!(PlantedKind::from_str(&k.to_string(), false).unwrap(), k);
    }
    assert!(PlantedKind::from_str("nope", false).is_err());
    assert_eq!(PlantedKind::GreaterThan.to_string(), "greater-than");
}

#[test]
fn datasets_are_seeded_and_well_formed() {
    for k in PlantedKind::ALL {
        let (a, _) = dataset(k, 20, 3).unwrap();
        let (b, _) = dataset(k, 20, 3).unwrap();
        let (c, _) = dataset(k, 20, 4).unwrap();
        assert_eq!(a, b, "{k}");
        assert_ne!(a, c, "{k}");
        let p = build(k, &Device::Cpu).unwrap();
        let len = a.examples[0].clean.len();
        assert!((12..=16).contains(&len), "{k}: length {len}");
        for e in &a.examples {
            assert_eq!(e.clean.len(), len);
            assert_eq!(e.corrupted.len(), len);
            assert_ne!(e.clean, e.corrupted);
            for &t in e.clean.iter().chain(&e.corrupted) {
                assert!((t as usize) < p.model.cfg.d_vocab);
            }
        }
    }
    assert!(dataset(PlantedKind::Induction, 0, 0).is_err());
}

#[test]
fn graphs_and_truths_have_the_documented_sizes() {
    let expect = [
        (PlantedKind::Induction, 81, 5),
        (PlantedKind::GreaterThan, 110, 7),
        (PlantedKind::WeightedVote, 81, 4),
    ];
    for (k, edges, truth) in expect {
        let p = build(k, &Device::Cpu).unwrap();
        assert_eq!(p.model.graph().n_edges(), edges, "{k}");
        assert_eq!(p.truth.n_edges(), truth, "{k}");
        assert!(p.model.cfg.d_model <= 64);
        assert!(p.description.contains(&format!("{truth} of {edges} edges")));
    }
}

/// Faithfulness of the circuit (all non-circuit edges patched) and of its complement (the
/// circuit's edges patched), against the clean model and the fully corrupted run.
fn faithfulness_of(kind: PlantedKind) -> (f64, f64, f32, f32) {
    let (p, data, metric) = setup(kind);
    let patcher = Patcher::new(&p.model, &data, metric).unwrap();
    let g = p.model.graph();
    let real = g.real_edge_mask();
    let full = patcher.metric(&vec![false; real.len()]).unwrap();
    let empty = patcher.metric(&real).unwrap();
    let outside: Vec<bool> = real
        .iter()
        .zip(&p.truth.edges)
        .map(|(&r, &t)| r && !t)
        .collect();
    let m_circuit = patcher.metric(&outside).unwrap();
    let m_ablated = patcher.metric(&p.truth.edges).unwrap();
    let f = faithfulness(m_circuit as f64, empty as f64, full as f64).unwrap();
    let f_ablated = faithfulness(m_ablated as f64, empty as f64, full as f64).unwrap();
    eprintln!(
        "{kind}: M(full) {full:.4}, M(empty) {empty:.4}, M(circuit) {m_circuit:.4} -> \
         faithfulness {f:.4}; circuit patched {m_ablated:.4} -> {f_ablated:.4}"
    );
    (f, f_ablated, full, empty)
}

fn check_faithfulness(kind: PlantedKind) {
    let (f, f_ablated, full, empty) = faithfulness_of(kind);
    assert!(
        (full - empty).abs() > 1.0 || (kind == PlantedKind::GreaterThan && full - empty > 0.5),
        "{kind}: clean {full} vs corrupted {empty}: the task does not separate them"
    );
    assert!(f >= 0.9, "{kind}: faithfulness of the truth {f}");
    assert!(
        f_ablated <= 0.1,
        "{kind}: circuit patched still gives {f_ablated}"
    );
}

#[test]
fn induction_truth_is_faithful() {
    check_faithfulness(PlantedKind::Induction);
}

#[test]
fn greater_than_truth_is_faithful() {
    check_faithfulness(PlantedKind::GreaterThan);
}

#[test]
fn weighted_vote_truth_is_faithful() {
    check_faithfulness(PlantedKind::WeightedVote);
}

/// Exact per-edge patching scores rank the truth first: AUC ≥ 0.95, and every truth edge is
/// visible (its effect is a sizeable part of the clean−corrupted gap).
fn check_per_edge(kind: PlantedKind) {
    let (p, data, metric) = setup(kind);
    let t = Instant::now();
    let patcher = Patcher::new(&p.model, &data, metric).unwrap();
    let scores = patcher.per_edge_scores().unwrap();
    let elapsed = t.elapsed();
    let roc = roc_from_graph(&scores, &p.truth).unwrap();
    let g = p.model.graph();
    let gap = (patcher
        .metric(&vec![false; g.n_writers() * g.n_readers()])
        .unwrap()
        - patcher.metric(&g.real_edge_mask()).unwrap())
    .abs();
    let n_nonzero = g
        .edges()
        .filter(|&(w, r)| !p.truth.contains(w, r) && scores.get(w, r) != 0.0)
        .count();
    eprintln!("{kind}: {n_nonzero} non-truth edges change the metric");
    let mut min_truth = f32::INFINITY;
    let mut max_other = 0.0f32;
    for (w, r) in g.edges() {
        let s = scores.get(w, r).abs();
        if p.truth.contains(w, r) {
            min_truth = min_truth.min(s);
        } else {
            max_other = max_other.max(s);
        }
    }
    eprintln!(
        "{kind}: {} edges patched one at a time over {N} examples in {:.3} s; AUC {:.4} \
         (staircase {:.4}); min |truth score| {min_truth:.4}, max |other score| {max_other:.2e}, \
         gap {gap:.4}",
        g.n_edges(),
        elapsed.as_secs_f64(),
        roc.auc_trapezoid,
        roc.auc_staircase
    );
    for (w, r) in g.edges() {
        if p.truth.contains(w, r) {
            eprintln!("  {:<20} {:+.4}", g.edge_name(w, r), scores.get(w, r));
        }
    }
    assert!(
        roc.auc_trapezoid >= 0.95,
        "{kind}: AUC {}",
        roc.auc_trapezoid
    );
    assert!(
        min_truth >= 0.05 * gap,
        "{kind}: a truth edge is nearly invisible: {min_truth} of a gap of {gap}"
    );
    assert!(
        max_other < 0.5 * min_truth,
        "{kind}: a non-truth edge ({max_other}) rivals the weakest truth edge ({min_truth})"
    );
}

#[test]
fn induction_per_edge_patching_finds_the_truth() {
    check_per_edge(PlantedKind::Induction);
}

#[test]
fn greater_than_per_edge_patching_finds_the_truth() {
    check_per_edge(PlantedKind::GreaterThan);
}

#[test]
fn weighted_vote_per_edge_patching_finds_the_truth() {
    check_per_edge(PlantedKind::WeightedVote);
}

/// Patching nothing is the clean model and patching every edge the corrupted run, each checked
/// against a plain forward on that run's tokens.
#[test]
fn patched_metric_end_points_are_the_clean_and_corrupted_runs() {
    use crate::model::{Batch, ForwardOptions};
    use crate::tasks::metric_value;
    for kind in PlantedKind::ALL {
        let (p, data, metric) = setup(kind);
        let targets: Vec<_> = data.examples.iter().map(|e| e.target.clone()).collect();
        let plain = |tokens: Vec<Vec<u32>>| {
            let batch = Batch::new(&tokens, &Device::Cpu).unwrap();
            let out = p.model.forward(&batch, &ForwardOptions::default()).unwrap();
            let rows = out.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            metric_value(metric, &rows, p.model.cfg.d_vocab_out, &targets, None)
                .unwrap()
                .mean
        };
        let clean = plain(data.examples.iter().map(|e| e.clean.clone()).collect());
        let corrupted = plain(data.examples.iter().map(|e| e.corrupted.clone()).collect());
        let none = vec![false; p.truth.edges.len()];
        let all = p.model.graph().real_edge_mask();
        let (m_none, m_all) = (
            patched_metric(&p.model, &data, metric, &none).unwrap(),
            patched_metric(&p.model, &data, metric, &all).unwrap(),
        );
        assert!(
            (m_none - clean).abs() < 1e-4,
            "{kind}: {m_none} vs clean {clean}"
        );
        assert!(
            (m_all - corrupted).abs() < 1e-4,
            "{kind}: {m_all} vs corrupted {corrupted}"
        );
        assert!(patched_metric(&p.model, &data, metric, &none[1..]).is_err());
    }
}

/// EAP from the library, against the corrupted run, with the task's metric.
fn eap_scores(p: &PlantedModel, data: &Dataset, metric: Metric) -> crate::graph::Scores {
    let opts = crate::attribution::AttributionOptions {
        metric,
        ..Default::default()
    };
    crate::attribution::attribute(&p.model, data, &opts)
        .unwrap()
        .scores
}

#[test]
fn first_order_attribution_on_the_planted_models() {
    // Saturated attention hides the induction head's q/k edges from a first-order method; the
    // soft vote head does not hide its k edge.
    let mut aucs = Vec::new();
    for k in PlantedKind::ALL {
        let (p, data, metric) = setup(k);
        let scores = eap_scores(&p, &data, metric);
        let roc = roc_from_graph(&scores, &p.truth).unwrap();
        let g = p.model.graph();
        eprintln!("{k}: EAP AUC {:.4}", roc.auc_trapezoid);
        for (w, r) in g.edges() {
            if p.truth.contains(w, r) {
                eprintln!("  {:<20} {:+.4}", g.edge_name(w, r), scores.get(w, r));
            }
        }
        aucs.push(roc.auc_trapezoid);
    }
    assert!(aucs[2] >= 0.95, "weighted-vote: EAP AUC {}", aucs[2]);
}
