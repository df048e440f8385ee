//! The `eap` binary end to end: the main job with no arguments, and clear errors (exit code 1,
//! a message naming the problem) on bad input.

use std::path::Path;
use std::process::Command;

fn eap(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_eap"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn main_job_with_no_arguments_writes_circuit_picture_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = eap(dir.path(), &[]);
    assert!(ok, "{stderr}");
    for method in ["exact patching", "EAP", "EAP-IG", "ACDC"] {
        assert!(stdout.contains(method), "{method} missing from:\n{stdout}");
    }
    assert!(
        stdout.contains("a0.h1->a1.h2<k>") || stdout.contains("a1.h2->logits"),
        "{stdout}"
    );
    let out = dir.path().join("eap-out/planted-induction");
    for file in ["circuit.json", "circuit.svg", "report.html"] {
        let meta =
            std::fs::metadata(out.join(file)).unwrap_or_else(|_| panic!("{file} not written"));
        assert!(meta.len() > 500, "{file} is nearly empty");
    }
    let circuit = eap::graph::CircuitFile::read(out.join("circuit.json")).unwrap();
    assert!(circuit.circuit.n_edges() > 0);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.matches("<svg").count() >= 4,
        "report lacks its pictures"
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ok, _, stderr) = eap(d, &["discover", "--out-dir", "run"]);
    assert!(ok, "{stderr}");
    let scores = "run/circuit.json";

    // A truth naming an edge the model lacks.
    std::fs::write(d.join("truth.txt"), "a0.h1->a1.h2<k>\na7.h0->logits\n").unwrap();
    let (ok, _, stderr) = eap(d, &["roc", "--scores", scores, "--truth", "truth.txt"]);
    assert!(!ok && stderr.contains("a7.h0"), "{stderr}");

    // A truth from another model's graph.
    let other = eap::graph::Circuit::full(eap::graph::Graph::new(3, 2, true));
    let file = eap::graph::CircuitFile::new(
        eap::graph::Scores::zeros(other.graph),
        other,
        serde_json::Value::Null,
    )
    .unwrap();
    file.write(d.join("other.json")).unwrap();
    let (ok, _, stderr) = eap(d, &["roc", "--scores", scores, "--truth", "other.json"]);
    assert!(!ok && stderr.contains("graph"), "{stderr}");

    // A selection that leaves nothing.
    let (ok, _, stderr) = eap(
        d,
        &[
            "circuit",
            "--scores",
            scores,
            "--threshold",
            "1e9",
            "--out",
            "c.json",
        ],
    );
    assert!(!ok && stderr.contains("no edges"), "{stderr}");
    assert!(!d.join("c.json").exists(), "nothing is written on error");

    // A data file whose line breaks the equal-length rule.
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/gpt2_hf");
    std::fs::write(d.join("bad.jsonl"), "{\"clean\": [1,2,3], \"corrupted\": [4,5,6], \"answer\": 1, \"wrong\": 2}\n{\"clean\": [1,2,3], \"corrupted\": [4,5], \"answer\": 1, \"wrong\": 2}\n").unwrap();
    let (ok, _, stderr) = eap(
        d,
        &[
            "attribute",
            "--model",
            model.to_str().unwrap(),
            "--data",
            "bad.jsonl",
            "--out",
            "s.json",
        ],
    );
    assert!(
        !ok && stderr.contains("bad.jsonl") && stderr.contains('2') && stderr.contains("equal"),
        "{stderr}"
    );
    assert!(!d.join("s.json").exists());

    // A circuit from another model.
    let (ok, _, stderr) = eap(
        d,
        &[
            "evaluate",
            "--model",
            model.to_str().unwrap(),
            "--data",
            "bad.jsonl",
            "--circuit",
            "other.json",
        ],
    );
    assert!(!ok, "{stderr}");
}

/// A library error a flag can fix is printed once, then a hint naming the flag; the library's
/// own message names no flag. Accepted aliases of enumerated flags still parse.
#[test]
fn errors_end_with_a_hint_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/gpt2_hf");
    std::fs::write(
        d.join("ok.jsonl"),
        "{\"clean\": [1,2,3], \"corrupted\": [4,5,6], \"answer\": 1, \"wrong\": 2}\n",
    )
    .unwrap();
    let model = model.to_str().unwrap();
    let base = ["attribute", "--model", model, "--data", "ok.jsonl"];
    let run = |extra: &[&str]| eap(d, &[&base[..], extra].concat());
    let (ok, _, stderr) = run(&["--method", "eap-ig", "--ig-steps", "0", "--out", "s.json"]);
    assert!(!ok, "{stderr}");
    let (message, hint) = stderr
        .split_once("\n\nhint: ")
        .expect("a hint after a blank line");
    assert!(
        message.starts_with("error: ") && !message.contains("--"),
        "{stderr}"
    );
    assert!(hint.contains("--ig-steps"), "{stderr}");

    // EAP-IG starts its path at any ablation's baseline; clean-corrupted needs the corrupted run.
    let (ok, _, stderr) = run(&[
        "--method",
        "clean-corrupted",
        "--ablation",
        "zero",
        "--out",
        "s.json",
    ]);
    assert!(
        !ok && stderr.contains("hint: use --ablation corrupted"),
        "{stderr}"
    );

    for extra in [
        &["--method", "eap-ig-inputs", "--ig-steps", "2"][..],
        &["--ablation", "patching"][..],
    ] {
        let (ok, _, stderr) = run(&[extra, &["--out", "s.json", "--json"]].concat());
        assert!(ok, "{extra:?}: {stderr}");
    }
    let (ok, _, stderr) = eap(
        d,
        &[
            "acdc",
            "--planted",
            "induction",
            "--threshold",
            "0.5",
            "--prune-with",
            "eap",
            "--out",
            "h.json",
            "--no-progress",
        ],
    );
    assert!(!ok && stderr.contains("--keep"), "{stderr}");
}
