//! A deterministic, seeded mutation suite (issue 13): every input class eap reads — safetensors
//! files (header length, header JSON, offsets, truncation), `config.json`, JSONL datasets,
//! circuit/score files, ACDC checkpoints, and an InterpBench case's PyTorch zip, the pickle
//! inside it, its pickled config and its pickled edge list — is mutated from a valid seed file
//! and handed to the library's reader. Each case must end in `Ok` or a clean `Err`: a panic fails the suite,
//! and so does a case that runs past [`CASE_LIMIT`] (a hang).
//!
//! 3,000 cases (`CASES` below; 1,000 of them InterpBench files); measured at 1.4 s for all
//! 3,000 in release on 2 shared cores (1.3–1.5 s for the first 2,000 before), well
//! inside the two-minute budget of `.ci/run`. The seed is fixed, so a failure reproduces; the
//! failing case's class, index and mutation are in the message.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use candle_core::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use eap::acdc::Checkpoint;
use eap::graph::CircuitFile;
use eap::model::Model;
use eap::tasks::Dataset;

/// A case slower than this counts as a hang.
const CASE_LIMIT: Duration = Duration::from_secs(5);

/// Cases per input class.
const CASES: [(Class, usize); 10] = [
    (Class::Safetensors, 500),
    (Class::SafetensorsHeader, 300),
    (Class::Config, 300),
    (Class::Jsonl, 300),
    (Class::Circuit, 300),
    (Class::Checkpoint, 300),
    (Class::Pth, 300),
    (Class::PthPickle, 300),
    (Class::CfgPickle, 200),
    (Class::EdgesPickle, 200),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Random bytes of `model.safetensors`: the 8-byte header length, the header, the data.
    Safetensors,
    /// Digits and structure of the safetensors header JSON (offsets, shapes, dtypes).
    SafetensorsHeader,
    Config,
    Jsonl,
    Circuit,
    Checkpoint,
    /// Random bytes of an InterpBench case's `ll_model.pth`: zip directory, headers, records.
    Pth,
    /// The pickle inside that `.pth` (`data.pkl`, stored uncompressed): opcodes, lengths,
    /// persistent ids, shapes, strides and offsets.
    PthPickle,
    /// The case's pickled config, `ll_model_cfg.pkl`.
    CfgPickle,
    /// The case's pickled ground truth, `edges.pkl`.
    EdgesPickle,
}

/// One mutation of `bytes`, described for the failure message.
fn mutate(rng: &mut ChaCha8Rng, bytes: &mut Vec<u8>, range: std::ops::Range<usize>) -> String {
    let range = if range.is_empty() {
        0..bytes.len().max(1)
    } else {
        range
    };
    let pick = |rng: &mut ChaCha8Rng| {
        rng.random_range(range.clone())
            .min(bytes.len().saturating_sub(1))
    };
    match rng.random_range(0..7) {
        0 if !bytes.is_empty() => {
            let i = pick(rng);
            let b = rng.random::<u8>();
            bytes[i] = b;
            format!("byte {i} = {b}")
        }
        1 if !bytes.is_empty() => {
            let i = pick(rng);
            bytes.truncate(i);
            format!("truncated to {i}")
        }
        2 if !bytes.is_empty() => {
            // A digit replaced by another, or a long run of digits (offsets, sizes, indices).
            let digits: Vec<usize> = (range.start..range.end.min(bytes.len()))
                .filter(|&i| bytes[i].is_ascii_digit())
                .collect();
            if digits.is_empty() {
                return "no digit".into();
            }
            let i = digits[rng.random_range(0..digits.len())];
            if rng.random_bool(0.5) {
                bytes[i] = b'0' + rng.random_range(0..10u8);
                format!("digit {i} = {}", bytes[i] as char)
            } else {
                let long = [
                    "99999999999999999999",
                    "4294967296",
                    "18446744073709551615",
                    "-1",
                    "1e9",
                ][rng.random_range(0..5)];
                bytes.splice(i..i + 1, long.bytes());
                format!("digit {i} -> {long}")
            }
        }
        3 if !bytes.is_empty() => {
            let i = pick(rng);
            let len = rng.random_range(1..64).min(bytes.len() - i);
            let copy = bytes[i..i + len].to_vec();
            let j = pick(rng);
            bytes.splice(j..j, copy);
            format!("copied {len} bytes from {i} to {j}")
        }
        4 if !bytes.is_empty() => {
            let i = pick(rng);
            let len = rng.random_range(1..32).min(bytes.len() - i);
            bytes.drain(i..i + len);
            format!("deleted {len} bytes at {i}")
        }
        5 if !bytes.is_empty() => {
            let i = pick(rng);
            let tok = [
                "null", "[]", "{}", "\"\"", "-0", "true", "NaN", ",", "\u{e9}",
            ][rng.random_range(0..9)];
            bytes.splice(i..i, tok.bytes());
            format!("inserted {tok:?} at {i}")
        }
        _ => {
            if bytes.len() >= 8 {
                let v: u64 = match rng.random_range(0..4) {
                    0 => rng.random(),
                    1 => rng.random_range(0..64),
                    2 => u64::MAX,
                    _ => bytes.len() as u64,
                };
                bytes[..8].copy_from_slice(&v.to_le_bytes());
                format!("header length = {v}")
            } else {
                "none".into()
            }
        }
    }
}

/// Runs `case` on a thread: `Ok(())` when it returned (success or error), else why not.
/// `Ok(true)` when the reader accepted the input, `Ok(false)` for a clean error.
fn guarded(case: impl FnOnce() -> bool + Send + 'static) -> std::result::Result<bool, String> {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(case));
        let _ = tx.send(r.ok());
    });
    match rx.recv_timeout(CASE_LIMIT) {
        Ok(Some(accepted)) => {
            let _ = handle.join();
            Ok(accepted)
        }
        Ok(None) => Err("panicked".into()),
        Err(_) => Err(format!("ran past {CASE_LIMIT:?} (a hang)")),
    }
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A finished planted ACDC run's circuit file and checkpoint, as seed inputs.
fn acdc_outputs(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let out = dir.join("seed/circuit.json");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_eap"))
        .env_remove("EAP_ACDC_EXIT_AFTER")
        .args([
            "acdc",
            "--planted",
            "greater-than",
            "--n",
            "8",
            "--threshold",
            "0.02",
        ])
        .args(["--no-progress", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let ck = eap::acdc::Persist::beside(&out, true).checkpoint;
    (std::fs::read(&out).unwrap(), std::fs::read(ck).unwrap())
}

#[test]
fn mutated_inputs_never_panic_or_hang() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = fixture("tests/fixtures/models/gpt2_hf");
    let weights = std::fs::read(model_dir.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let config = std::fs::read(model_dir.join("config.json")).unwrap();
    let jsonl =
        b"{\"clean\": [1,2,3,4,5], \"corrupted\": [6,7,8,9,10], \"answer\": 11, \"wrong\": 12}\n\
{\"clean\": \"a b c\", \"corrupted\": \"d e f\", \"answer\": 3, \"wrong\": [4]}\n"
            .to_vec();
    let (circuit, checkpoint) = acdc_outputs(dir.path());
    let eapig = std::fs::read(fixture("tests/fixtures/eapig_graph.json")).unwrap();
    let case = fixture("tests/fixtures/interpbench/case_gelu_causal");
    let case_files = ["ll_model.pth", "ll_model_cfg.pkl", "edges.pkl"]
        .map(|f| (f, std::fs::read(case.join(f)).unwrap()));
    let pth = case_files[0].1.clone();
    // torch.save writes `data.pkl` first, stored: its bytes follow the first local header.
    let le16 = |at: usize| u16::from_le_bytes([pth[at], pth[at + 1]]) as usize;
    let pkl_start = 30 + le16(26) + le16(28);
    let pkl_len = u32::from_le_bytes(pth[18..22].try_into().unwrap()) as usize;
    assert_eq!(pth[pkl_start], 0x80, "data.pkl starts with PROTO");

    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let start = Instant::now();
    let mut failures = Vec::new();
    let mut n = 0;
    let mut accepted = 0;
    let mut per_class = Vec::new();
    for (class, count) in CASES {
        for k in 0..count {
            let case_dir = dir.path().join(format!("case-{n}"));
            std::fs::create_dir(&case_dir).unwrap();
            n += 1;
            let (seed, range, file) = match class {
                Class::Safetensors => (&weights, 0..weights.len(), "model.safetensors"),
                Class::SafetensorsHeader => (&weights, 8..8 + header_len, "model.safetensors"),
                Class::Config => (&config, 0..config.len(), "config.json"),
                Class::Jsonl => (&jsonl, 0..jsonl.len(), "data.jsonl"),
                Class::Circuit if k % 4 == 0 => (&eapig, 0..eapig.len(), "circuit.json"),
                Class::Circuit => (&circuit, 0..circuit.len(), "circuit.json"),
                Class::Checkpoint => (&checkpoint, 0..checkpoint.len(), "ck.json"),
                Class::Pth => (&case_files[0].1, 0..pth.len(), "ll_model.pth"),
                Class::PthPickle => (
                    &case_files[0].1,
                    pkl_start..pkl_start + pkl_len,
                    "ll_model.pth",
                ),
                Class::CfgPickle => (
                    &case_files[1].1,
                    0..case_files[1].1.len(),
                    "ll_model_cfg.pkl",
                ),
                Class::EdgesPickle => (&case_files[2].1, 0..case_files[2].1.len(), "edges.pkl"),
            };
            let interpbench = matches!(
                class,
                Class::Pth | Class::PthPickle | Class::CfgPickle | Class::EdgesPickle
            );
            if interpbench {
                for (f, b) in &case_files {
                    std::fs::write(case_dir.join(f), b).unwrap();
                }
            }
            let mut bytes = seed.clone();
            let mut what = Vec::new();
            for _ in 0..rng.random_range(1..4) {
                what.push(mutate(&mut rng, &mut bytes, range.clone()));
            }
            std::fs::write(case_dir.join(file), &bytes).unwrap();
            if matches!(class, Class::Safetensors | Class::SafetensorsHeader) {
                std::fs::write(case_dir.join("config.json"), &config).unwrap();
            }
            if class == Class::Config {
                std::fs::write(case_dir.join("model.safetensors"), &weights).unwrap();
            }
            let path = case_dir.join(file);
            let result = guarded(move || match class {
                Class::Safetensors | Class::SafetensorsHeader | Class::Config => {
                    Model::load_dir(&case_dir, &Device::Cpu).is_ok()
                }
                Class::Jsonl => Dataset::from_jsonl(&path, None).is_ok(),
                Class::Circuit => CircuitFile::read(&path).is_ok(),
                Class::Checkpoint => Checkpoint::read(&path).is_ok(),
                Class::Pth | Class::PthPickle | Class::CfgPickle | Class::EdgesPickle => {
                    Model::load_dir(&case_dir, &Device::Cpu).is_ok_and(|m| {
                        eap::eval::interpbench::case_truth(&case_dir, m.graph()).is_ok()
                    })
                }
            });
            match result {
                Ok(true) => {
                    accepted += 1;
                    match per_class.last_mut() {
                        Some((c, n)) if *c == class => *n += 1,
                        _ => per_class.push((class, 1)),
                    }
                }
                Ok(false) => {}
                Err(why) => {
                    failures.push(format!("{class:?} case {k} ({}): {why}", what.join("; ")))
                }
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    eprintln!("fuzz: {n} cases ({accepted} accepted, the rest clean errors) in {seconds:.1} s");
    eprintln!("fuzz: accepted per class {per_class:?}");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
