//! What the `eap` binary says besides its results (issue 13): progress on stderr when it is not
//! a terminal and `--quiet`, the note on what pruning removed, size checks before allocating,
//! the width recorded in circuit files, and no leftovers after a failed run.

use std::path::Path;
use std::process::Command;

use crate::util::{eap_code, fixture_dir};

/// stdout without the lines that carry timings.
fn untimed(stdout: &str) -> Vec<&str> {
    stdout.lines().filter(|l| !l.contains("passes/s")).collect()
}

/// `label: i/n unit (p%), …`: the step and the total of a plain progress line.
fn step(line: &str, label: &str) -> (usize, usize) {
    let rest = line
        .strip_prefix(label)
        .expect("the label")
        .trim_start_matches(": ");
    let counts = rest.split(' ').next().unwrap();
    let (i, n) = counts.split_once('/').expect("i/n");
    (i.parse().unwrap(), n.parse().unwrap())
}

#[test]
fn progress_is_logged_on_piped_stderr_and_quiet_silences_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let acdc = [
        "acdc",
        "--planted",
        "induction",
        "--threshold",
        "0.5",
        "--out",
        "a.json",
    ];
    let (code, stdout, stderr) = eap_code(d, &acdc);
    assert_eq!(code, 0, "{stderr}");
    let label = "ACDC τ=0.5";
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with(label)).collect();
    assert!(lines.len() >= 2, "first and last step: {stderr}");
    let (first, last) = (lines[0], lines[lines.len() - 1]);
    let (i, n) = step(first, label);
    assert!(i == 1 && n > 1, "{first}");
    assert!(
        first.contains("readers") && first.contains("ETA"),
        "{first}"
    );
    assert_eq!(step(last, label), (n, n), "{last}");
    assert!(last.contains("(100%), done in"), "{last}");
    // Rate-limited: a sub-second run gets its first and last line only.
    assert!(lines.len() <= 12, "{stderr}");

    // `--quiet` before or after the subcommand, `-q`, and acdc's own `--no-progress`.
    let quiet: [Vec<&str>; 4] = [
        [&["--quiet"][..], &acdc[..]].concat(),
        [&acdc[..], &["--quiet"][..]].concat(),
        [&["-q"][..], &acdc[..]].concat(),
        [&acdc[..], &["--no-progress"][..]].concat(),
    ];
    for args in &quiet {
        let (code, quiet_stdout, quiet_stderr) = eap_code(d, args);
        assert_eq!(code, 0, "{args:?}: {quiet_stderr}");
        assert_eq!(quiet_stderr, "", "{args:?}");
        assert_eq!(untimed(&quiet_stdout), untimed(&stdout), "{args:?}");
    }
}

#[test]
fn long_dataset_generation_shows_progress_short_stays_silent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let n = eap::tasks::PROGRESS_MIN_EXAMPLES.to_string();
    let args = ["dataset", "ioi", "--n", &n, "--out", "a.jsonl"];
    let (code, stdout, stderr) = eap_code(d, &args);
    assert_eq!(code, 0, "{stderr}");
    let label = "generating ioi";
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with(label)).collect();
    assert!(lines.len() >= 2, "{stderr}");
    assert_eq!(step(lines[0], label).0, 1, "{stderr}");
    let total: usize = n.parse().unwrap();
    assert_eq!(step(lines[lines.len() - 1], label), (total, total));
    assert!(
        !stdout.contains(label),
        "progress stays off stdout: {stdout}"
    );

    let (code, quiet_stdout, quiet_stderr) =
        eap_code(d, &["-q", "dataset", "ioi", "--n", &n, "--out", "b.jsonl"]);
    assert_eq!(code, 0, "{quiet_stderr}");
    assert_eq!(quiet_stderr, "");
    assert_eq!(quiet_stdout.replace("b.jsonl", "a.jsonl"), stdout);
    let (a, b) = (d.join("a.jsonl"), d.join("b.jsonl"));
    assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());

    let (code, _, stderr) = eap_code(d, &["dataset", "ioi", "--n", "20", "--out", "c.jsonl"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stderr, "", "a fast run says nothing");
}

/// A scores file of the GPT-2 fixture, from `eap attribute` (which shows its progress).
fn fixture_scores(d: &Path) {
    let data = r#"{"clean": [1, 2, 3], "corrupted": [1, 2, 4], "answer": 5, "wrong": 6}"#;
    std::fs::write(d.join("d.jsonl"), format!("{data}\n")).unwrap();
    let model = fixture_dir("gpt2_hf");
    let model = model.to_str().unwrap();
    let args = ["attribute", "--model", model, "--data", "d.jsonl"];
    let (code, stdout, stderr) = eap_code(d, &[&args[..], &["--out", "s.json", "--json"]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("eap scores: 1/1 examples (100%)"),
        "{stderr}"
    );
    serde_json::from_str::<serde_json::Value>(&stdout).expect("stdout is only the JSON");
}

#[test]
fn circuit_says_how_many_edges_pruning_removed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fixture_scores(d);
    let circuit = [
        "circuit", "--scores", "s.json", "--top-n", "5", "--out", "c.json",
    ];
    let (code, stdout, stderr) = eap_code(d, &circuit);
    assert_eq!(code, 0, "{stderr}");
    let kept: usize = stdout.split(' ').next().unwrap().parse().unwrap();
    let said = format!("pruning removed {} of the 5 selected edges", 5 - kept);
    assert!(kept < 5 && stdout.contains(&said), "{stdout}");
    assert!(stdout.contains("--no-prune"), "{stdout}");
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("c.json")).unwrap()).unwrap();
    let in_graph = file["edges"]
        .as_object()
        .unwrap()
        .values()
        .filter(|e| e["in_graph"] == true)
        .count();
    assert_eq!(in_graph, kept);

    let (code, stdout, stderr) = eap_code(d, &[&circuit[..], &["--no-prune"]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("5 edges") && !stdout.contains("pruning"),
        "{stdout}"
    );
}

/// The planted model's circuit files record its width, as EAP-IG's `cfg.d_model` expects.
#[test]
fn circuit_files_of_planted_models_record_d_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let runs: [&[&str]; 2] = [
        &["discover", "--out-dir", "run", "--no-acdc", "--no-exact"],
        &[
            "acdc",
            "--planted",
            "induction",
            "--threshold",
            "0.5",
            "--out",
            "run/acdc.json",
        ],
    ];
    for args in runs {
        let (code, _, stderr) = eap_code(d, args);
        assert_eq!(code, 0, "{args:?}: {stderr}");
    }
    let d_model = |name: &str| {
        let text = std::fs::read_to_string(d.join("run").join(name)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["cfg"]["d_model"].as_u64().unwrap()
    };
    let kind = eap::planted::PlantedKind::Induction;
    let width = eap::planted::build(kind, &candle_core::Device::Cpu)
        .unwrap()
        .model
        .cfg
        .d_model;
    assert!(width > 0);
    assert_eq!(d_model("circuit.json"), width as u64);
    assert_eq!(d_model("acdc.json"), width as u64);
}

/// `eap bench` checks the batch against the model and the memory budget before allocating
/// anything (a typo used to end in an allocation abort).
#[test]
fn bench_refuses_sizes_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &[&str]); 2] = [
        (
            &["bench", "--batch", "100000", "--seq", "1000"],
            &["--batch", "--seq", "--memory-budget", "MiB"],
        ),
        (&["bench", "--seq", "5000"], &["--seq 5000", "n_ctx"]),
    ];
    for (args, names) in cases {
        let started = std::time::Instant::now();
        let (code, _, stderr) = eap_code(dir.path(), args);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        for name in names {
            assert!(stderr.contains(name), "{args:?}: {stderr}");
        }
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            started.elapsed().as_secs() < 10,
            "{args:?} built the model first"
        );
    }
}

/// A `--task` run that fails leaves nothing behind: no temporary folder (issue 13 found
/// `/tmp/eap-task-<pid>/`), no output.
#[test]
fn a_failed_task_run_leaves_nothing_behind() {
    let (dir, tmp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let model = fixture_dir("gpt2_hf");
    let out = Command::new(env!("CARGO_BIN_EXE_eap"))
        .args(["attribute", "--model", model.to_str().unwrap()])
        .args(["--task", "ioi", "--out", "s.json"])
        .env("TMPDIR", tmp.path())
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ioi: example 1"), "{stderr}");
    for d in [dir.path(), tmp.path()] {
        let left: Vec<_> = std::fs::read_dir(d).unwrap().collect();
        assert!(left.is_empty(), "{}: {left:?}", d.display());
    }
}

/// `mib` checks its output paths before loading anything, as the other commands do; its
/// table owns standard output, so `-` is refused.
#[test]
fn mib_checks_its_outputs_first() {
    let dir = tempfile::tempdir().unwrap();
    let base = ["mib", "--model", "none", "--data", "none.jsonl"];
    let cases: [(&[&str], i32, &str); 2] = [
        (
            &["--scores", "s.json", "--out", "nodir/m.json"],
            1,
            "nodir/m.json",
        ),
        (&["--scores", "s.json", "--svg", "-"], 2, "--svg -"),
    ];
    for (args, want, names) in cases {
        let (code, stdout, stderr) = eap_code(dir.path(), &[&base[..], args].concat());
        assert_eq!(code, want, "{args:?}: {stderr}");
        assert!(stderr.contains(names), "{args:?}: {stderr}");
        assert!(!stderr.contains("none"), "checked before loading: {stderr}");
        assert_eq!(stdout, "");
    }
}
