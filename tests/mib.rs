//! MIB's circuit-track scores against MIB's formulas (written out again here), its budgets and
//! selections, and its submission folders.

use candle_core::Device;
use eap::attribution::{attribute, AttributionOptions};
use eap::eval::mib::{budget_circuit, read_submission, write_submission, MIB_PERCENTAGES};
use eap::eval::{mib_score, FaithfulnessBaseline};
use eap::graph::{Circuit, CircuitFile};
use eap::model::Model;
use eap::patching::{complement, metric_with_patch};
use eap::runs::{prepare, Ablation, Runner, DEFAULT_MEMORY_BUDGET};
use eap::tasks::{Dataset, Example, Metric, Target};

use crate::util::*;

fn fixture_data(name: &str) -> Dataset {
    let refs = reference(name);
    let (clean, corrupted) = (tokens(&refs["tokens"]), tokens(&refs["corrupted_tokens"]));
    let (answer, wrong) = (ids(&refs["answer"]), ids(&refs["wrong"]));
    Dataset {
        name: name.into(),
        examples: (0..clean.len())
            .map(|i| Example {
                clean: clean[i].clone(),
                corrupted: corrupted[i].clone(),
                target: Target {
                    answers: vec![answer[i]],
                    wrongs: vec![wrong[i]],
                },
            })
            .collect(),
    }
}

/// MIB's `evaluate_area_under_curve` loop, written independently of eap's curve type.
fn mib_areas(xs: &[f64], fs: &[f64]) -> (f64, f64, f64) {
    let (mut under, mut from_1) = (0.0, 0.0);
    for i in 0..fs.len() - 1 {
        let dx = xs[i + 1] - xs[i];
        from_1 += dx * ((1.0 - fs[i]).abs() + (1.0 - fs[i + 1]).abs()) / 2.0;
        under += dx * (fs[i] + fs[i + 1]) / 2.0;
    }
    (under, from_1, fs.iter().sum::<f64>() / fs.len() as f64)
}

#[test]
fn cpr_and_cmd_follow_mib_evaluation() {
    for name in ["gpt2_hf", "qwen2_bias"] {
        let model = Model::load_dir(&fixture_dir(name), &Device::Cpu).unwrap();
        let data = fixture_data(name);
        let scores = attribute(&model, &data, &AttributionOptions::default())
            .unwrap()
            .scores;
        let values = scores.edge_values();
        assert!(
            values.iter().any(|&v| v > 0.0) && values.iter().any(|&v| v < 0.0),
            "{name}: the test needs scores of both signs"
        );
        let runner = Runner::new(
            &model,
            &data,
            Ablation::Corrupted,
            32,
            DEFAULT_MEMORY_BUDGET,
        )
        .unwrap();
        let prepared = prepare(&runner).unwrap();
        let baseline = FaithfulnessBaseline::new(&model, &prepared, Metric::LogitDiff).unwrap();
        let score = mib_score(&baseline, &scores).unwrap();
        let n = model.graph().n_edges();
        assert_eq!(score.n_edges, n);
        let mut differ = false;
        for curve in [&score.signed, &score.absolute] {
            let fs: Vec<f64> = curve.budgets.iter().map(|b| b.faithfulness).collect();
            let (under, from_1, average) = mib_areas(&MIB_PERCENTAGES, &fs);
            assert!(
                (curve.curve.cpr - under).abs() < 1e-12,
                "{name}: area_under"
            );
            assert!(
                (curve.curve.cmd - from_1).abs() < 1e-12,
                "{name}: area_from_1"
            );
            assert!((curve.average - average).abs() < 1e-12, "{name}: average");
            for (b, &pct) in curve.budgets.iter().zip(&MIB_PERCENTAGES) {
                // int(pct · N) edges are selected before pruning…
                assert_eq!(b.selected, (pct * n as f64) as usize, "{name} {pct}");
                let chosen = match curve.absolute {
                    true => Circuit::top_n(&scores, b.selected),
                    false => Circuit::top_n_signed(&scores, b.selected),
                };
                assert_eq!(chosen.n_edges(), b.selected);
                // …and the circuit evaluated is that selection pruned, every other edge patched.
                let circuit = budget_circuit(&scores, b.selected, curve.absolute);
                assert_eq!(circuit, chosen.prune());
                assert_eq!(b.edges, circuit.n_edges());
                let m =
                    metric_with_patch(&model, &prepared, Metric::LogitDiff, &complement(&circuit))
                        .unwrap() as f64;
                let (full, empty) = (baseline.full as f64, baseline.empty as f64);
                assert!(((m - empty) / (full - empty) - b.faithfulness).abs() < 1e-9);
            }
            assert!(
                (curve.budgets[9].faithfulness - 1.0).abs() < 1e-5,
                "{name}: all edges"
            );
        }
        for (s, a) in score.signed.budgets.iter().zip(&score.absolute.budgets) {
            let sc = budget_circuit(&scores, s.selected, false);
            let ac = budget_circuit(&scores, a.selected, true);
            differ |= sc != ac;
        }
        assert!(
            differ,
            "{name}: signed and |score| selections must differ somewhere"
        );
        assert_eq!(score.cpr(), score.signed.curve.cpr);
        assert_eq!(score.cmd(), score.absolute.curve.cmd);
        let json = score.to_json();
        assert_eq!(json["signed"]["budgets"].as_array().unwrap().len(), 10);
    }
}

#[test]
fn submission_folders_round_trip_and_read_eapig_files() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load_dir(&fixture_dir("gpt2_hf"), &Device::Cpu).unwrap();
    let scores = attribute(
        &model,
        &fixture_data("gpt2_hf"),
        &AttributionOptions::default(),
    )
    .unwrap()
    .scores;
    let file = CircuitFile::new(
        scores.clone(),
        Circuit::full(scores.graph),
        serde_json::json!({"method": "eap"}),
    )
    .unwrap();
    let path = write_submission(dir.path(), "arithmetic_addition", "gpt2", &file).unwrap();
    assert!(path.ends_with("arithmetic-addition_gpt2/importances.json"));
    // A file EAP-IG's Python wrote, as a second task.
    let eapig =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eapig_graph.json");
    let other = dir.path().join("ioi_attn-only");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(&eapig, other.join("importances.json")).unwrap();
    let entries = read_submission(dir.path()).unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(
        (entries[0].task.as_str(), entries[0].model.as_str()),
        ("arithmetic-addition", "gpt2")
    );
    assert_eq!(entries[0].file.scores, file.scores);
    assert_eq!(entries[0].file.circuit, file.circuit);
    assert_eq!(entries[1].file, CircuitFile::read(&eapig).unwrap());
    // A folder that breaks the layout is named in the error.
    std::fs::create_dir_all(dir.path().join("nounderscore")).unwrap();
    let e = read_submission(dir.path()).unwrap_err().to_string();
    assert!(e.contains("nounderscore"), "{e}");
}

/// MIB's task rows through the command line: `--mib-task` maps the columns as MIB does, with
/// the model directory's tokenizer.
#[test]
fn mib_task_rows_run_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let row = |cf: &str| {
        serde_json::json!({
            "prompt": "after Mary and John ate John thanked",
            "metadata": {"indirect_object": "Mary", "subject": "John", "random_c": "Paris"},
            "s2_io_flip_counterfactual": {"prompt": cf},
        })
        .to_string()
    };
    let rows = [
        row("after Mary and John ate Mary thanked"),
        row("after Mary and John ate Mary"), // another length: skipped
    ];
    std::fs::write(d.join("ioi.jsonl"), rows.join("\n")).unwrap();
    let model = fixture_dir("qwen2_bias");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_eap"))
        .args([
            "attribute",
            "--model",
            model.to_str().unwrap(),
            "--data",
            "ioi.jsonl",
        ])
        .args(["--mib-task", "ioi", "--out", "s.json", "--json"])
        .current_dir(d)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(meta["n_examples"], 1);
    // The same example as the reference's second one: its clean metric is that example's.
    let refs = reference("qwen2_bias");
    let logits = flat(&refs["logits"]);
    let (p, v) = (7, 96);
    let (answer, wrong) = (
        ids(&refs["answer"])[1] as usize,
        ids(&refs["wrong"])[1] as usize,
    );
    let row1 = &logits[(p + p - 1) * v..(p + p) * v];
    let want = (row1[answer] - row1[wrong]) as f64;
    let got = meta["clean_metric"].as_f64().unwrap();
    assert!(
        (got - want).abs() < 1e-4 * want.abs().max(1.0),
        "{got} vs {want}"
    );
}
