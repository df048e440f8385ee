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
        if persist.checkpoint.exists() {
            args.push("--resume".into());
        }
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
        if persist.checkpoint.exists() {
            args.push("--resume".into());
        }
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

/// Runs `eap` with `args`; returns the exit code and stderr.
fn eap_run(args: &[String], exit_after: Option<usize>) -> (Option<i32>, String) {
    let mut c = eap_bin();
    c.args(args);
    if let Some(k) = exit_after {
        c.env("EAP_ACDC_EXIT_AFTER", k.to_string());
    }
    let out = c.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Starts `base` (interrupted after one reader), then resumes it with each of `changes`
/// applied, asserting a refusal that names the field; finally the unchanged resume finishes.
fn assert_resume_refuses(
    base: &[String],
    changes: &[(&str, Vec<String>)],
    mutate: &mut dyn FnMut(usize),
) {
    let (code, err) = eap_run(base, Some(1));
    assert_eq!(code, Some(75), "{err}");
    for (k, (field, extra)) in changes.iter().enumerate() {
        let mut args = base.to_vec();
        // Later flags of the same name override earlier ones in clap only for single values:
        // replace the flag's value where it is present.
        let mut i = 0;
        while i < extra.len() {
            let flag = &extra[i];
            let value = extra.get(i + 1).filter(|v| !v.starts_with("--"));
            match args.iter().position(|a| a == flag) {
                Some(p) => {
                    if let Some(v) = value {
                        args[p + 1] = v.clone();
                    }
                }
                None => {
                    args.push(flag.clone());
                    if let Some(v) = value {
                        args.push(v.clone());
                    }
                }
            }
            i += if value.is_some() { 2 } else { 1 };
        }
        mutate(k);
        args.push("--resume".into());
        let (code, err) = eap_run(&args, None);
        assert_eq!(code, Some(1), "resume with {extra:?} must fail: {err}");
        assert!(
            err.contains("different ACDC run") && err.contains(&format!("{field}: ")),
            "the refusal names `{field}`: {err}"
        );
        mutate(usize::MAX);
    }
    let mut args = base.to_vec();
    args.push("--resume".into());
    let (code, err) = eap_run(&args, None);
    assert_eq!(code, Some(0), "the unchanged resume finishes: {err}");
}

/// Issue 13, acceptance 2: a resume with any recorded option, the data file or one weight
/// byte changed is refused, naming what differs (old and new value).
#[test]
fn resume_refuses_a_different_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/gpt2_hf");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), model.join(f)).unwrap();
    }
    let data = dir.path().join("data.jsonl");
    let lines = "{\"clean\": [1,2,3,4,5], \"corrupted\": [6,7,8,9,10], \"answer\": 11, \"wrong\": 12}\n\
                 {\"clean\": [5,4,3,2,1], \"corrupted\": [10,9,8,7,6], \"answer\": 13, \"wrong\": 14}\n";
    std::fs::write(&data, lines).unwrap();
    let out = dir.path().join("out/circuit.json");
    let base = strings(&[
        "acdc",
        "--model",
        &model.display().to_string(),
        "--data",
        &data.display().to_string(),
        "--metric",
        "logit-diff",
        "--threshold",
        "0.01",
        "--no-progress",
        "--out",
        &out.display().to_string(),
    ]);
    let weights = model.join("model.safetensors");
    let original = std::fs::read(&weights).unwrap();
    let changes: Vec<(&str, Vec<String>)> = vec![
        ("metric", strings(&["--metric", "prob-diff"])),
        ("ablation", strings(&["--ablation", "zero"])),
        ("threshold", strings(&["--threshold", "0.02"])),
        ("batch size", strings(&["--batch-size", "1"])),
        (
            "prune-with",
            strings(&["--prune-with", "eap", "--keep", "40"]),
        ),
        ("data", vec![]),
        ("model file model.safetensors", vec![]),
    ];
    assert_resume_refuses(&base, &changes, &mut |k| match k {
        5 => std::fs::write(&data, lines.replace("[1,2,3,4,5]", "[1,2,3,4,6]")).unwrap(),
        6 => {
            let mut bytes = original.clone();
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
            std::fs::write(&weights, bytes).unwrap();
        }
        _ => {
            std::fs::write(&data, lines).unwrap();
            std::fs::write(&weights, &original).unwrap();
        }
    });

    // The hybrid's settings.
    let out = dir.path().join("hybrid/circuit.json");
    let mut hybrid = base.clone();
    let n = hybrid.len();
    hybrid[n - 1] = out.display().to_string();
    hybrid.extend(strings(&["--prune-with", "eap", "--keep", "60"]));
    let changes = vec![("keep", strings(&["--keep", "50"]))];
    assert_resume_refuses(&hybrid, &changes, &mut |_| {});
    let mut by_threshold = hybrid.clone();
    let p = by_threshold.iter().position(|a| a == "--keep").unwrap();
    by_threshold.drain(p..p + 2);
    let out = dir.path().join("hybrid-t/circuit.json");
    by_threshold[n - 1] = out.display().to_string();
    by_threshold.extend(strings(&["--eap-threshold", "0.001"]));
    let changes = vec![("eap-threshold", strings(&["--eap-threshold", "0.002"]))];
    assert_resume_refuses(&by_threshold, &changes, &mut |_| {});

    // Generated examples: the generator's seed and size.
    let out = dir.path().join("planted/circuit.json");
    let mut planted = acdc_args(&out);
    planted.extend(strings(&["--seed", "3"]));
    let changes = vec![
        ("seed", strings(&["--seed", "7"])),
        ("n", strings(&["--n", "6"])),
    ];
    assert_resume_refuses(&planted, &changes, &mut |_| {});
}

/// A checkpoint is held to what a run could have written; `--resume` without one is an
/// error; temporaries a killed write left are removed.
#[test]
fn resume_refuses_corrupt_or_missing_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("circuit.json");
    let mut resume = acdc_args(&out);
    resume.push("--resume".into());
    let (code, err) = eap_run(&resume, None);
    assert_eq!(code, Some(1));
    assert!(err.contains("no checkpoint to resume"), "{err}");

    let (code, err) = eap_run(&acdc_args(&out), Some(2));
    assert_eq!(code, Some(75), "{err}");
    let persist = Persist::beside(&out, true);
    let good = std::fs::read_to_string(&persist.checkpoint).unwrap();
    let good_log = std::fs::read_to_string(&persist.log).unwrap();
    let ck: serde_json::Value = serde_json::from_str(&good).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = ck.clone();
        f(&mut v);
        std::fs::write(&persist.checkpoint, v.to_string()).unwrap();
        std::fs::write(&persist.log, &good_log).unwrap();
    };
    let n_steps = ck["steps_logged"].as_u64().unwrap();
    let patched = ck["patched"].as_str().unwrap().to_string();
    type Edit<'a> = Box<dyn Fn(&mut serde_json::Value) + 'a>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "next_position 1000000000 is beyond",
            Box::new(|v| v["next_position"] = 1_000_000_000u64.into()),
        ),
        (
            "not an ACDC checkpoint",
            Box::new(|v| v["next_position"] = 1e9.into()),
        ),
        (
            "the mask has",
            Box::new(|v| v["patched"] = format!("{patched}0").into()),
        ),
        (
            "which is not an edge",
            Box::new(|v| {
                // The first entry of the mask that is not an edge.
                let g: eap::graph::Graph =
                    serde_json::from_value(v["fingerprint"]["graph"].clone()).unwrap();
                let real = g.real_edge_mask();
                let i = real.iter().position(|r| !r).unwrap();
                let mut m: Vec<char> = v["patched"].as_str().unwrap().chars().collect();
                m[i] = '1';
                v["patched"] = m.into_iter().collect::<String>().into();
            }),
        ),
        (
            "whose reader is not visited yet",
            Box::new(|v| {
                let g: eap::graph::Graph =
                    serde_json::from_value(v["fingerprint"]["graph"].clone()).unwrap();
                let order = visit_order(&g);
                let r = *order.last().unwrap();
                let i = (0..g.n_writers())
                    .map(|w| w * g.n_readers() + r)
                    .find(|&i| g.real_edge_mask()[i])
                    .unwrap();
                let mut m: Vec<char> = v["patched"].as_str().unwrap().chars().collect();
                m[i] = '1';
                v["patched"] = m.into_iter().collect::<String>().into();
            }),
        ),
        (
            "steps_logged is",
            Box::new(move |v| v["steps_logged"] = (n_steps + 1).into()),
        ),
        ("format version", Box::new(|v| v["version"] = 1.into())),
        (
            "is not an edge ACDC has tried",
            Box::new(|v| v["scores"] = serde_json::json!([[0, 0.5]])),
        ),
    ];
    for (message, f) in &cases {
        edit(f.as_ref());
        let (code, err) = eap_run(&resume, None);
        assert_eq!(code, Some(1), "{message}: {err}");
        assert!(
            err.contains(message) && err.contains("acdc-checkpoint.json"),
            "expected `{message}`: {err}"
        );
    }
    // A log that disagrees with the mask.
    std::fs::write(&persist.checkpoint, &good).unwrap();
    let flipped = good_log.replacen("\"removed\":true", "\"removed\":false", 1);
    let flipped = if flipped == good_log {
        good_log.replacen("\"removed\":false", "\"removed\":true", 1)
    } else {
        flipped
    };
    std::fs::write(&persist.log, flipped).unwrap();
    let (code, err) = eap_run(&resume, None);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("mask disagrees"), "{err}");

    // Stale temporaries from a killed write go; the intact checkpoint resumes to the end.
    std::fs::write(&persist.log, &good_log).unwrap();
    let stale = dir.path().join(".circuit.acdc-checkpoint.json.99999.tmp");
    std::fs::write(&stale, "{").unwrap();
    let (code, err) = eap_run(&resume, None);
    assert_eq!(code, Some(0), "{err}");
    assert!(!stale.exists(), "the stale temporary is removed");
}
