//! The `eap` binary end to end: the main job with no arguments, and clear errors (exit code 1,
//! a message naming the problem) on bad input.

use std::path::Path;
use std::process::Command;

use crate::util::{eap, eap_code};

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
    // Zero integration steps are refused while parsing, naming the flag.
    let (ok, _, stderr) = run(&["--method", "eap-ig", "--ig-steps", "0", "--out", "s.json"]);
    assert!(!ok && stderr.contains("--ig-steps"), "{stderr}");

    // A library error: the message names no flag, the hint after a blank line does.
    // EAP-IG starts its path at any ablation's baseline; clean-corrupted needs the corrupted run.
    let (ok, _, stderr) = run(&[
        "--method",
        "clean-corrupted",
        "--ablation",
        "zero",
        "--out",
        "s.json",
    ]);
    assert!(!ok, "{stderr}");
    let (message, hint) = stderr
        .split_once("\n\nhint: ")
        .expect("a hint after a blank line");
    assert!(
        message.starts_with("error: ") && !message.contains("--"),
        "{stderr}"
    );
    assert!(hint.contains("use --ablation corrupted"), "{stderr}");

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

/// Issue 13: a symlinked `--out` is written through and stays a symlink; the temporaries of a
/// killed run beside the target are removed by the next write.
#[cfg(unix)]
#[test]
fn outputs_write_through_symlinks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("real")).unwrap();
    std::fs::write(d.join("real/ioi.jsonl"), "old\n").unwrap();
    std::fs::write(d.join("real/.ioi.jsonl.4294967295.tmp"), "partial").unwrap();
    std::os::unix::fs::symlink("real/ioi.jsonl", d.join("link.jsonl")).unwrap();
    let (code, _, stderr) = eap_code(d, &["dataset", "ioi", "--n", "3", "--out", "link.jsonl"]);
    assert_eq!(code, 0, "{stderr}");
    let meta = std::fs::symlink_metadata(d.join("link.jsonl")).unwrap();
    assert!(meta.file_type().is_symlink(), "the link was replaced");
    let text = std::fs::read_to_string(d.join("real/ioi.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    let left: Vec<_> = std::fs::read_dir(d.join("real")).unwrap().collect();
    assert_eq!(left.len(), 1, "temporaries left: {left:?}");
}

/// Issue 13: a FIFO, a device or a directory as `--out` is refused before any work, naming the
/// path; nothing is replaced.
#[cfg(unix)]
#[test]
fn outputs_that_are_not_regular_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fifo = d.join("fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    std::fs::create_dir(d.join("adir")).unwrap();
    let cases: [(&[&str], &str, &str); 5] = [
        (&["dataset", "ioi", "--out", "fifo"], "fifo", "FIFO"),
        (
            &["dataset", "ioi", "--out", "/dev/null"],
            "/dev/null",
            "device",
        ),
        (&["dataset", "ioi", "--out", "adir"], "adir", "directory"),
        (
            &[
                "roc",
                "--scores",
                "nothing.json",
                "--truth",
                "t",
                "--svg",
                "nodir/r.svg",
            ],
            "nodir/r.svg",
            "does not exist",
        ),
        (
            &[
                "acdc",
                "--planted",
                "induction",
                "--threshold",
                "0.1",
                "--out",
                "fifo",
            ],
            "fifo",
            "FIFO",
        ),
    ];
    for (args, path, problem) in cases {
        let started = std::time::Instant::now();
        let (code, _, stderr) = eap_code(d, args);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains(path) && stderr.contains(problem),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains(".tmp"), "{stderr}");
        assert!(
            started.elapsed().as_secs() < 5,
            "{args:?} worked before refusing"
        );
    }
    let meta = std::fs::symlink_metadata(&fifo).unwrap();
    assert!(!meta.file_type().is_file(), "the FIFO was replaced");
    assert!(std::fs::read_dir(d.join("adir")).unwrap().next().is_none());
}

/// Issue 13: `--out -` writes a single-file result to stdout (status lines go to stderr) and
/// is a usage error (exit 2) where the output is more than one file or shares stdout.
#[test]
fn out_dash_is_stdout_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (code, stdout, stderr) = eap_code(d, &["dataset", "ioi", "--n", "4", "--out", "-"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.lines().count(), 4, "{stdout}");
    assert!(
        stdout.lines().all(|l| l.starts_with("{\"clean\"")),
        "{stdout}"
    );
    assert!(!d.join("-").exists(), "a file named - was created");
    let cases: [&[&str]; 3] = [
        &[
            "acdc",
            "--planted",
            "induction",
            "--threshold",
            "0.1",
            "--out",
            "-",
        ],
        &["discover", "--out-dir", "-"],
        &[
            "circuit", "--scores", "s.json", "--top-n", "3", "--out", "c.json", "--svg", "-",
        ],
    ];
    for args in cases {
        let (code, _, stderr) = eap_code(d, args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(" -:"), "{args:?}: {stderr}");
    }
    assert!(!d.join("-").exists());
}

/// Issue 13: `eap discover | head -1` ends quietly with exit 0 (a closed stdout is success, as
/// in ripgrep), not a panic.
#[cfg(unix)]
#[test]
fn broken_pipe_exits_zero_quietly() {
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_eap"))
        .args(["discover", "--out-dir", "run", "--no-acdc"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end at once: every write of the child fails with EPIPE.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("error"),
        "{stderr}"
    );
}

/// Issue 13: `circuit` without a selection flag is a usage error, exit 2.
#[test]
fn circuit_without_selection_is_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = eap_code(
        dir.path(),
        &["circuit", "--scores", "s.json", "--out", "c.json"],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--top-n"), "{stderr}");
}

/// Issue 13: `roc`, `circuit` and `evaluate` refuse a scores file that lists only some edges;
/// `--allow-missing` accepts it and says on stderr how many edges were filled with 0.
#[test]
fn partial_scores_files_need_allow_missing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (code, _, stderr) = eap_code(
        d,
        &["discover", "--out-dir", "run", "--no-acdc", "--no-exact"],
    );
    assert_eq!(code, 0, "{stderr}");
    let text = std::fs::read_to_string(d.join("run/circuit.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let edges = v["edges"].as_object_mut().unwrap();
    let total = edges.len();
    let drop: Vec<String> = edges
        .keys()
        .filter(|n| n.starts_with("input->"))
        .cloned()
        .collect();
    for name in &drop {
        edges.remove(name);
    }
    std::fs::write(d.join("partial.json"), v.to_string()).unwrap();
    std::fs::write(d.join("truth.txt"), "a1.h2->logits\n").unwrap();
    let roc = ["roc", "--scores", "partial.json", "--truth", "truth.txt"];
    let circuit = [
        "circuit",
        "--scores",
        "partial.json",
        "--top-n",
        "3",
        "--out",
        "c.json",
        "--no-prune",
    ];
    for args in [&roc[..], &circuit[..]] {
        let (code, _, stderr) = eap_code(d, args);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains("partial.json") && stderr.contains("--allow-missing"),
            "{stderr}"
        );
        let (code, _, stderr) = eap_code(d, &[args, &["--allow-missing"]].concat());
        assert_eq!(code, 0, "{args:?}: {stderr}");
        let said = format!("{} of {total} edges not listed", drop.len());
        assert!(stderr.contains(&said), "{args:?}: {stderr}");
    }
}

/// Issue 13: `--help` of every subcommand documents every flag.
#[test]
fn every_flag_has_help() {
    let dir = tempfile::tempdir().unwrap();
    let commands = [
        "attribute",
        "circuit",
        "evaluate",
        "mib",
        "dataset",
        "bench",
        "discover",
        "roc",
        "acdc",
    ];
    let mut undocumented = Vec::new();
    for command in commands {
        let (code, help, stderr) = eap_code(dir.path(), &[command, "--help"]);
        assert_eq!(code, 0, "{stderr}");
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let trimmed = line.trim_start();
            // Flags start with `-x` or `--x`; `- name: doc` lines list a flag's values.
            if !trimmed.starts_with('-') || trimmed.starts_with("- ") {
                continue;
            }
            let indent = line.len() - trimmed.len();
            // `--flag <X>  Help`, and (long help) the deeper-indented lines that follow.
            let mut text = trimmed.split_once("  ").map_or("", |(_, h)| h).to_string();
            for next in &lines[i + 1..] {
                let t = next.trim_start();
                if t.is_empty() || next.len() - t.len() <= indent {
                    break;
                }
                if !t.starts_with("- ") && !t.starts_with("Possible values:") {
                    text.push(' ');
                    text.push_str(t);
                }
            }
            if !has_help_text(&text) {
                undocumented.push(format!("{command} {trimmed}"));
            }
        }
    }
    assert!(
        undocumented.is_empty(),
        "flags without help: {undocumented:#?}"
    );
}

/// Whether a flag's help says something: clap's own `[default: …]`, `[possible values: …]`
/// and similar notes do not count, nor does padding.
fn has_help_text(text: &str) -> bool {
    let mut rest = text.to_string();
    for note in [
        "[default:",
        "[possible values:",
        "[aliases:",
        "[env:",
        "[short aliases:",
    ] {
        while let Some(start) = rest.find(note) {
            let end = rest[start..]
                .find(']')
                .map_or(rest.len(), |e| start + e + 1);
            rest.replace_range(start..end, "");
        }
    }
    rest.chars().any(char::is_alphanumeric)
}

/// The check above is only as good as its idea of "documented".
#[test]
fn help_text_is_not_defaults_or_values() {
    assert!(!has_help_text(""));
    assert!(!has_help_text("  "));
    assert!(!has_help_text("[default: 32]"));
    assert!(!has_help_text("[default: kl] [possible values: kl, nll]"));
    assert!(has_help_text("Examples per chunk [default: 32]"));
    assert!(has_help_text("Keep edges in [a, b]"));
}

/// Issue 13: zero, non-finite and oversized values are usage errors (exit 2) naming the flag,
/// and negative thresholds parse without `=`.
#[test]
fn nonsensical_flag_values_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 10] = [
        (&["discover", "--batch-size", "0"], "--batch-size"),
        (&["discover", "--top-n", "0"], "--top-n"),
        (&["discover", "--ig-steps", "0"], "--ig-steps"),
        (&["discover", "--hybrid-keep", "0"], "--hybrid-keep"),
        (
            &[
                "attribute",
                "--model",
                "m",
                "--data",
                "d",
                "--out",
                "o",
                "--memory-budget",
                "0",
            ],
            "--memory-budget",
        ),
        (
            &[
                "acdc",
                "--planted",
                "induction",
                "--out",
                "o",
                "--prune-with",
                "eap",
                "--eap-threshold",
                "NaN",
            ],
            "--eap-threshold",
        ),
        (
            &[
                "circuit",
                "--scores",
                "s",
                "--out",
                "o",
                "--threshold",
                "NaN",
            ],
            "--threshold",
        ),
        (
            &[
                "dataset",
                "ioi",
                "--out",
                "o",
                "--n",
                "18446744073709551615",
            ],
            "--n",
        ),
        (
            &["dataset", "ioi", "--out", "o", "--n", "1000000000000"],
            "--n",
        ),
        // Its bytes overflow a usize: once silently shifted to a budget of 0.
        (
            &["bench", "--memory-budget", "17592186044416"],
            "--memory-budget",
        ),
    ];
    for (args, flag) in cases {
        let (code, _, stderr) = eap_code(dir.path(), args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag) && !stderr.contains("panicked"),
            "{args:?}: {stderr}"
        );
    }
    // A negative threshold is a value, not a flag.
    let (code, _, stderr) = eap_code(
        dir.path(),
        &[
            "circuit",
            "--scores",
            "none.json",
            "--threshold",
            "-1",
            "--out",
            "c.json",
        ],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("none.json"), "{stderr}");
}
