//! ACDC and the EAP→ACDC hybrid: recovery of the planted circuits, exactness of every
//! tentative patch, and interrupted runs that resume to the same circuit.

use std::path::Path;
use std::process::Command;

use candle_core::Device;

use eap::acdc::{
    log_thresholds, metric_scale, prune_mask, rates, run_acdc, threshold_sweep, AcdcOptions,
    Checkpoint, Persist,
};
use eap::attribution::{attribute, AttributionOptions, Method};
use eap::graph::visit_order;
use eap::graph::CircuitFile;
use eap::patching::patched_metric;
use eap::planted::{build, dataset, PlantedKind};
use eap::runs::{prepare, Ablation, Runner, DEFAULT_MEMORY_BUDGET};
use eap::tasks::Metric;

/// The sweep used by the tests: τ from 10⁻³ to 1 times the metric's scale
/// `|M(full) − M(∅)|`, log-spaced.
fn sweep_thresholds(scale: f32) -> Vec<f32> {
    log_thresholds(1e-3, 1.0, 10)
        .into_iter()
        .map(|t| t * scale)
        .collect()
}

#[test]
fn visit_order_matches_acdc() {
    let g = eap::graph::Graph::new(2, 2, true);
    let names: Vec<String> = visit_order(&g).iter().map(|&r| g.reader_name(r)).collect();
    assert_eq!(
        names,
        [
            "logits", "m1", "a1.h1<q>", "a1.h0<q>", "a1.h1<k>", "a1.h0<k>", "a1.h1<v>", "a1.h0<v>",
            "m0", "a0.h1<q>", "a0.h0<q>", "a0.h1<k>", "a0.h0<k>", "a0.h1<v>", "a0.h0<v>"
        ]
    );
    assert_eq!(visit_order(&g).len(), g.n_readers());
}

#[test]
fn roc_from_points_adds_ends_and_is_monotone() {
    let roc = eap::eval::roc_from_points(vec![(0.5, 1.0), (0.1, 0.5), (0.2, 0.4)]).unwrap();
    assert_eq!(
        roc.points,
        vec![(0.0, 0.0), (0.1, 0.5), (0.2, 0.5), (0.5, 1.0), (1.0, 1.0)]
    );
    let perfect = eap::eval::roc_from_points(vec![(0.0, 1.0)]).unwrap();
    assert!((perfect.auc_trapezoid - 1.0).abs() < 1e-12);
    assert!(eap::eval::roc_from_points(vec![(1.5, 0.0)]).is_err());
}

/// Acceptance 1: on every planted model, with the task's metric (the ground truths are the
/// edges that carry the task's clean−corrupted difference; KL also sees the distractors, which
/// move the whole output distribution), the sweep's ROC AUC is ≥ 0.95, and at τ = 0.1 ×
/// |M(full) − M(∅)| ACDC finds exactly the truth, or nearly.
#[test]
fn acdc_recovers_every_planted_circuit() {
    for kind in PlantedKind::ALL {
        let planted = build(kind, &Device::Cpu).unwrap();
        let (data, metric) = dataset(kind, 16, 3).unwrap();
        let runner = Runner::new(
            &planted.model,
            &data,
            Ablation::Corrupted,
            32,
            DEFAULT_MEMORY_BUDGET,
        )
        .unwrap();
        let prepared = prepare(&runner).unwrap();
        let scale = metric_scale(&planted.model, &prepared, metric).unwrap();
        let base = AcdcOptions {
            metric,
            ..Default::default()
        };
        let sweep = threshold_sweep(
            &planted.model,
            &prepared,
            &base,
            &sweep_thresholds(scale),
            Some(&planted.truth),
        )
        .unwrap();
        let roc = sweep.roc.as_ref().unwrap();
        for p in &sweep.points {
            eprintln!(
                "{kind}: τ {:.5} edges {} FPR {:.3} TPR {:.3} {metric} {:.5}",
                p.threshold,
                p.edges,
                p.fpr.unwrap(),
                p.tpr.unwrap(),
                p.metric
            );
        }
        eprintln!(
            "{kind}: AUC {:.4} (pessimistic {:.4})",
            roc.auc_trapezoid, roc.auc_staircase
        );
        assert!(
            roc.auc_trapezoid >= 0.95,
            "{kind}: ACDC sweep AUC {}",
            roc.auc_trapezoid
        );
        let run = run_acdc(
            &planted.model,
            &prepared,
            &AcdcOptions {
                threshold: 0.1 * scale,
                ..base.clone()
            },
            None,
            &mut |_| {},
        )
        .unwrap();
        let (fpr, tpr) = rates(&run.circuit, &planted.truth).unwrap();
        eprintln!(
            "{kind}: τ {}: {} edges, TPR {tpr}, FPR {fpr}",
            0.1 * scale,
            run.circuit.n_edges()
        );
        assert_eq!(
            tpr, 1.0,
            "{kind}: ACDC at τ = 0.1 × scale missed truth edges"
        );
        assert!(
            fpr <= 0.05,
            "{kind}: ACDC at τ = 0.1 × scale kept too many other edges (FPR {fpr})"
        );
    }
}

/// Acceptance 3: every tentative patch's metric equals a from-scratch forward (fresh baselines,
/// fresh clean run) with the same patched edge set.
#[test]
fn every_tentative_patch_is_a_full_forward() {
    for (kind, metric, threshold) in [
        (PlantedKind::Induction, Metric::Kl, 0.05),
        (PlantedKind::GreaterThan, Metric::ProbDiff, 0.02),
    ] {
        let planted = build(kind, &Device::Cpu).unwrap();
        let (data, _) = dataset(kind, 8, 11).unwrap();
        let runner = Runner::new(
            &planted.model,
            &data,
            Ablation::Corrupted,
            32,
            DEFAULT_MEMORY_BUDGET,
        )
        .unwrap();
        let prepared = prepare(&runner).unwrap();
        let opts = AcdcOptions {
            threshold,
            metric,
            ..Default::default()
        };
        let run = run_acdc(&planted.model, &prepared, &opts, None, &mut |_| {}).unwrap();
        let g = planted.model.graph();
        let nr = g.n_readers();
        let mut mask = vec![false; g.n_writers() * nr];
        let mut checked = 0;
        for step in &run.steps {
            let i = step.writer * nr + step.reader;
            mask[i] = true;
            if step.tried {
                let fresh = patched_metric(&runner, metric, &mask).unwrap();
                let got = step.metric_after.unwrap();
                assert!(
                    (fresh - got).abs() <= 1e-5 * (1.0 + fresh.abs()),
                    "{kind} {}: ACDC saw {got}, a fresh forward gives {fresh}",
                    step.edge
                );
                checked += 1;
            }
            if !step.removed {
                mask[i] = false;
            }
        }
        assert!(checked > 20, "{kind}: only {checked} tried edges");
        let final_mask: Vec<bool> = eap::patching::complement(&run.circuit);
        assert_eq!(
            mask, final_mask,
            "{kind}: replaying the log gives the final circuit"
        );
        let tried = run.steps.iter().filter(|s| s.tried).count();
        assert_eq!(run.forward_passes, (tried + 1) * prepared.len());
    }
}

/// The hybrid keeps EAP's top edges, tries only those, and still finds the truth.
#[test]
fn eap_then_acdc_hybrid_tries_only_survivors() {
    let kind = PlantedKind::WeightedVote;
    let planted = build(kind, &Device::Cpu).unwrap();
    let (data, task_metric) = dataset(kind, 16, 5).unwrap();
    let att = attribute(
        &planted.model,
        &data,
        &AttributionOptions {
            method: Method::Eap,
            metric: task_metric,
            ..Default::default()
        },
    )
    .unwrap();
    let keep = 20;
    let mask = prune_mask(&att.scores, Some(keep), None).unwrap();
    let runner = Runner::new(
        &planted.model,
        &data,
        Ablation::Corrupted,
        32,
        DEFAULT_MEMORY_BUDGET,
    )
    .unwrap();
    let prepared = prepare(&runner).unwrap();
    let scale = metric_scale(&planted.model, &prepared, task_metric).unwrap();
    let opts = AcdcOptions {
        threshold: 0.1 * scale,
        metric: task_metric,
        initial_patched: Some(mask.clone()),
        ..Default::default()
    };
    let run = run_acdc(&planted.model, &prepared, &opts, None, &mut |_| {}).unwrap();
    let tried = run.steps.iter().filter(|s| s.tried).count();
    assert!(
        tried <= keep,
        "{tried} edges tried, only {keep} survived EAP"
    );
    for s in &run.steps {
        assert!(
            !mask[s.writer * planted.model.graph().n_readers() + s.reader],
            "pre-pruned edge {} was visited",
            s.edge
        );
    }
    let (_, tpr) = rates(&run.circuit, &planted.truth).unwrap();
    assert_eq!(tpr, 1.0);
    assert!(prune_mask(&att.scores, None, None).is_err());
}

fn eap_bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_eap"));
    c.env_remove("EAP_ACDC_EXIT_AFTER");
    c
}

fn acdc_args(out: &Path) -> Vec<String> {
    [
        "acdc",
        "--planted",
        "greater-than",
        "--n",
        "8",
        "--threshold",
        "0.02",
        "--no-progress",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([out.display().to_string()])
    .collect()
}

/// Acceptance 2: a run whose process exits after every 3 readers, resumed again and again,
/// ends with the same circuit and scores as an uninterrupted run, and the checkpoint parses
/// after every interruption; and a run killed at arbitrary moments never leaves a half-written
/// checkpoint.
#[test]
fn interrupted_acdc_resumes_to_the_same_circuit() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole/circuit.json");
    let st = eap_bin().args(acdc_args(&whole)).output().unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let stdout = String::from_utf8_lossy(&st.stdout);
    assert!(
        stdout.contains("forward passes in") && stdout.contains("passes/s"),
        "{stdout}"
    );

    let parts = dir.path().join("parts/circuit.json");
    let persist = Persist::beside(&parts, true);
    let mut interruptions = 0;
    loop {
        let mut args = acdc_args(&parts);
        args.push("--resume".into());
        let st = eap_bin()
            .args(&args)
            .env("EAP_ACDC_EXIT_AFTER", "3")
            .output()
            .unwrap();
        match st.status.code() {
            Some(75) => {
                interruptions += 1;
                let ck = Checkpoint::read(&persist.checkpoint).unwrap();
                assert_eq!(ck.next_position, 3 * interruptions);
                assert!(!parts.exists(), "no circuit before the run finishes");
            }
            Some(0) => break,
            other => panic!(
                "eap exited with {other:?}: {}",
                String::from_utf8_lossy(&st.stderr)
            ),
        }
        assert!(interruptions < 100);
    }
    assert!(interruptions >= 3, "only {interruptions} interruptions");
    let a = CircuitFile::read(&whole).unwrap();
    let b = CircuitFile::read(&parts).unwrap();
    assert_eq!(a.circuit, b.circuit);
    assert_eq!(a.scores, b.scores);
    assert_eq!(a.meta["forward_passes"], b.meta["forward_passes"]);
    let log_a = std::fs::read_to_string(Persist::beside(&whole, false).log).unwrap();
    let log_b = std::fs::read_to_string(&persist.log).unwrap();
    assert_eq!(log_a, log_b, "the step logs agree line for line");

    // SIGKILL at arbitrary moments: the checkpoint always parses; the run still converges.
    let killed = dir.path().join("killed/circuit.json");
    let persist = Persist::beside(&killed, true);
    let mut delay_ms = 5u64;
    for round in 0.. {
        let mut args = acdc_args(&killed);
        args.push("--resume".into());
        let mut child = eap_bin()
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let status = child.wait().unwrap();
        if persist.checkpoint.exists() {
            Checkpoint::read(&persist.checkpoint).expect("checkpoint parses after a kill");
        }
        if status.success() {
            break;
        }
        delay_ms += 15;
        assert!(round < 200);
    }
    let c = CircuitFile::read(&killed).unwrap();
    assert_eq!(a.circuit, c.circuit);
    assert_eq!(a.scores, c.scores);
}

/// `discover` runs ACDC and the hybrid beside the other methods, with ACDC's sweep ROC in
/// the report.
#[test]
fn discover_compares_acdc_and_the_hybrid() {
    let planted = build(PlantedKind::GreaterThan, &Device::Cpu).unwrap();
    let (data, metric) = dataset(PlantedKind::GreaterThan, 16, 1).unwrap();
    let opts = eap::discover::DiscoverOptions {
        metric,
        exact: false,
        ..Default::default()
    };
    let found =
        eap::discover::discover(&planted.model, &data, Some(&planted.truth), &opts).unwrap();
    let names: Vec<&str> = found.methods.iter().map(|m| m.name.as_str()).collect();
    assert!(names.contains(&"ACDC"), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("EAP→ACDC")), "{names:?}");
    let acdc = found.methods.iter().find(|m| m.name == "ACDC").unwrap();
    assert!(acdc.roc.as_ref().unwrap().auc_trapezoid >= 0.95);
    assert!(
        acdc.faithfulness > 0.9,
        "faithfulness {}",
        acdc.faithfulness
    );
    assert!(acdc.forward_passes > 50);
    let html = found.report("test").to_html();
    assert!(html.contains("EAP→ACDC"));
}

/// `eap acdc --thresholds` prints each point and the sweep's AUC; `--prune-with eap` runs.
#[test]
fn cli_sweep_and_hybrid() {
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("sweep.json");
    let st = eap_bin()
        .args([
            "acdc",
            "--planted",
            "weighted-vote",
            "--n",
            "8",
            "--metric",
            "logit-diff",
            "--thresholds",
            "0.05,0.5,2,8",
            "--no-progress",
            "--out",
        ])
        .arg(&summary)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&st.stdout);
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert!(stdout.contains("ROC AUC over the sweep"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(v["points"].as_array().unwrap().len(), 4);
    assert!(v["roc"]["auc_trapezoid"].as_f64().unwrap() >= 0.95);

    let out = dir.path().join("hybrid.json");
    let st = eap_bin()
        .args([
            "acdc",
            "--planted",
            "induction",
            "--n",
            "8",
            "--metric",
            "logit-diff",
            "--threshold",
            "1",
            "--prune-with",
            "eap",
            "--keep",
            "30",
            "--no-progress",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&st.stdout);
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert!(stdout.contains("30 of 81 edges survive"), "{stdout}");
    let file = CircuitFile::read(&out).unwrap();
    assert_eq!(file.meta["method"], "acdc");
    assert!(file.meta["prune_with"]["keep"] == 30);
    let steps = std::fs::read_to_string(Persist::beside(&out, false).log).unwrap();
    assert!(steps.lines().count() <= 30);
}

/// The incremental state on every fixture architecture (GPT-2, attention-only shortformer,
/// no-norm ReLU, LNPre/GELU/bidirectional, and the Llama family), from a hybrid-style start with a third of the edges
/// patched and over two chunks: every tentative patch equals a from-scratch patched forward,
/// and the state at every reader boundary is bit for bit the one a resume rebuilds.
#[test]
fn incremental_state_matches_full_forwards_on_every_fixture() {
    use eap::acdc::AcdcState;
    for name in crate::util::MODEL_FIXTURES {
        let model = eap::model::Model::load_dir(&crate::util::fixture_dir(name), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let cfg = &model.cfg;
        let examples = (0..4u32)
            .map(|b| {
                let clean: Vec<u32> = (0..6u32)
                    .map(|p| (b * 7 + p * 13 + 1) % cfg.d_vocab as u32)
                    .collect();
                eap::tasks::Example {
                    corrupted: clean
                        .iter()
                        .map(|t| (t * 5 + 3) % cfg.d_vocab as u32)
                        .collect(),
                    clean,
                    target: eap::tasks::Target {
                        answers: vec![1],
                        wrongs: vec![2],
                    },
                }
            })
            .collect();
        let data = eap::tasks::Dataset {
            name: name.into(),
            examples,
        };
        let runner =
            Runner::new(&model, &data, Ablation::Corrupted, 2, DEFAULT_MEMORY_BUDGET).unwrap();
        let prepared = prepare(&runner).unwrap();
        assert_eq!(prepared.len(), 2);
        let g = model.graph();
        let nr = g.n_readers();
        let initial: Vec<bool> = g
            .real_edge_mask()
            .iter()
            .enumerate()
            .map(|(i, &real)| real && (i * 2654435761) % 3 == 0)
            .collect();
        for metric in [Metric::Kl, Metric::LogitDiff] {
            let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
            let mut state =
                AcdcState::build(&model, &prepared, metric, initial.clone(), 0).unwrap();
            let full = patched_metric(&runner, metric, &initial).unwrap();
            assert!(
                close(state.metric(), full),
                "{name}: build {} vs {full}",
                state.metric()
            );
            let (mut tried, mut last_only) = (0, 0);
            while let Some(r) = state.visiting() {
                last_only = last_only.max(state.row_restricted_nodes().0);
                for w in (0..g.n_upstream(r)).rev() {
                    if state.patched()[w * nr + r] {
                        continue;
                    }
                    let value = state.try_edge(w, r).unwrap();
                    let mut mask = state.patched().to_vec();
                    mask[w * nr + r] = true;
                    let fresh = patched_metric(&runner, metric, &mask).unwrap();
                    assert!(
                        close(value, fresh),
                        "{name} {metric} {}: {value} vs {fresh}",
                        g.edge_name(w, r)
                    );
                    tried += 1;
                    // Every edge into the logits stays, so MLP chains reach them and are
                    // needed at the last position only; elsewhere two thirds go.
                    if r != nr - 1 && (w + r + tried) % 3 != 0 {
                        state.accept().unwrap();
                    } else {
                        state.reject().unwrap();
                    }
                }
                let m = state.finish_reader().unwrap();
                let rebuilt = AcdcState::build(
                    &model,
                    &prepared,
                    metric,
                    state.patched().to_vec(),
                    state.position(),
                )
                .unwrap();
                assert_eq!(
                    m.to_bits(),
                    rebuilt.metric().to_bits(),
                    "{name} {metric}: after {}",
                    g.reader_name(r)
                );
            }
            assert!(tried > 20, "{name}: {tried} tries");
            // Models whose residual stream is not a sum of writers replay whole passes.
            assert!(
                last_only > 0 || state.replays(),
                "{name}: no node was computed at the last position only"
            );
        }
    }
}
