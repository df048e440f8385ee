//! InterpBench case folders (issue 15): the case `scripts/make_interpbench_fixture.py` builds
//! loads straight from its `ll_model.pth` + `ll_model_cfg.pkl`, matches the PyTorch
//! reference's logits and EAP scores, and brings its ground truth (`edges.pkl`) to `eap
//! discover`; hostile or broken pickles and zips are clear errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use eap::attribution::{attribute, AttributionOptions};
use eap::eval::interpbench::{case_truth, read_edges_pkl};
use eap::graph::Circuit;
use eap::model::{Batch, ForwardOptions, Model, ModelConfig};
use eap::runs::Ablation;
use eap::tasks::{Dataset, Example, Target};

use crate::util::{eap, flat, ids, rel_err, tokens};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interpbench")
}

fn case() -> PathBuf {
    root().join("case_gelu_causal")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(case().join("reference.safetensors"), &Device::Cpu).unwrap()
}

/// The reference's examples as token-id JSONL, as `eap --data` reads them.
fn write_reference_jsonl(path: &Path) {
    let refs = reference();
    let clean = tokens(&refs["tokens"]);
    let corrupted = tokens(&refs["corrupted_tokens"]);
    let (answers, wrongs) = (ids(&refs["answer"]), ids(&refs["wrong"]));
    let jsonl: String = (0..clean.len())
        .map(|i| {
            format!(
                "{{\"clean\": {:?}, \"corrupted\": {:?}, \"answer\": {}, \"wrong\": {}}}\n",
                clean[i], corrupted[i], answers[i], wrongs[i]
            )
        })
        .collect();
    std::fs::write(path, jsonl).unwrap();
}

fn load(dir: &Path) -> eap::Result<Model> {
    Model::load_dir(dir, &Device::Cpu)
}

/// A copy of the case folder in which `file` holds `bytes`.
fn with_file(file: &str, bytes: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(case()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    std::fs::write(dir.path().join(file), bytes).unwrap();
    dir
}

fn edge_names(c: &Circuit) -> Vec<String> {
    let mut names: Vec<String> = c
        .graph
        .edges()
        .filter(|&(w, r)| c.contains(w, r))
        .map(|(w, r)| c.graph.edge_name(w, r))
        .collect();
    names.sort();
    names
}

fn lines(file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(case().join(file)).unwrap();
    let mut v: Vec<String> = text.lines().map(str::to_string).collect();
    v.sort();
    v
}

#[test]
fn case_folder_loads_and_matches_pytorch_logits_and_eap_scores() {
    let model = load(&case()).unwrap();
    assert_eq!(model.cfg.n_layers, 2);
    assert_eq!((model.cfg.d_vocab, model.cfg.d_vocab_out), (7, 5));
    let refs = reference();
    let mut worst_logits = 0f32;
    for (tok_key, logit_key) in [
        ("tokens", "logits"),
        ("corrupted_tokens", "corrupted_logits"),
    ] {
        let batch = Batch::new(&tokens(&refs[tok_key]), &Device::Cpu).unwrap();
        let opts = ForwardOptions {
            logit_positions: (0..batch.seq_len).collect(),
            ..Default::default()
        };
        let out = model.forward(&batch, &opts).unwrap();
        let err = rel_err(&flat(&out.logits), &flat(&refs[logit_key]));
        assert!(err <= 1e-4, "{logit_key}: relative error {err:e}");
        worst_logits = worst_logits.max(err);
    }
    let clean = tokens(&refs["tokens"]);
    let corrupted = tokens(&refs["corrupted_tokens"]);
    let (answers, wrongs) = (ids(&refs["answer"]), ids(&refs["wrong"]));
    let data = Dataset {
        name: "interpbench".into(),
        examples: (0..clean.len())
            .map(|i| Example {
                clean: clean[i].clone(),
                corrupted: corrupted[i].clone(),
                target: Target {
                    answers: vec![answers[i]],
                    wrongs: vec![wrongs[i]],
                },
            })
            .collect(),
    };
    for (ablation, key) in [
        (Ablation::Corrupted, "eap_scores"),
        (Ablation::Zero, "eap_scores_zero"),
    ] {
        let opts = AttributionOptions {
            ablation,
            batch_size: 2,
            ..Default::default()
        };
        let att = attribute(&model, &data, &opts).unwrap();
        let err = rel_err(&att.scores.values, &flat(&refs[key]));
        assert!(err <= 1e-4, "{key}: error {err:e} of the largest |score|");
        eprintln!("interpbench: logits rel err {worst_logits:e}, {key} rel err {err:e}");
    }
}

#[test]
fn config_object_and_config_dict_give_the_same_model() {
    let (dict, _) = ModelConfig::read_pickle(&case().join("ll_model_cfg.pkl")).unwrap();
    let (object, _) = ModelConfig::read_pickle(&root().join("cfg_object.pkl")).unwrap();
    assert_eq!(format!("{dict:?}"), format!("{object:?}"));
    assert_eq!(dict.d_mlp, Some(32));
    // A `.pth` state dict also loads beside a TransformerLens config.json.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(case().join("ll_model.pth"), dir.path().join("weights.pth")).unwrap();
    let value = eap::model::pickle::Pickle::read(&case().join("ll_model_cfg.pkl")).unwrap();
    let json = value.to_json(value.root()).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string(&json).unwrap(),
    )
    .unwrap();
    let model = load(dir.path()).unwrap();
    assert_eq!(format!("{:?}", model.cfg), format!("{dict:?}"));
}

#[test]
fn ground_truth_is_read_and_mapped_to_eap_edges() {
    let graph = load(&case()).unwrap().graph();
    let truth = case_truth(&case(), graph).unwrap().expect("a case folder");
    assert_eq!(edge_names(&truth), lines("truth_edges.txt"));
    let letters = read_edges_pkl(&case().join("edges.pkl"), graph, false).unwrap();
    assert_eq!(edge_names(&letters), lines("truth_edges_letters.txt"));
    assert!(letters.n_edges() < truth.n_edges());
    // Other directories have no truth of their own.
    assert!(case_truth(&root(), graph).unwrap().is_none());
    // --truth accepts the pickle itself.
    let given = eap::job::read_truth(&case().join("edges.pkl"), graph).unwrap();
    assert_eq!(edge_names(&given), lines("truth_edges.txt"));
}

#[test]
fn discover_on_a_case_folder_uses_its_truth() {
    let dir = tempfile::tempdir().unwrap();
    write_reference_jsonl(&dir.path().join("data.jsonl"));
    let run = |extra: &[&str], out: &str| {
        let model = case();
        let args = [
            "discover",
            "--model",
            model.to_str().unwrap(),
            "--data",
            "data.jsonl",
        ];
        let args = [&args[..], &["--no-acdc", "--out-dir", out], extra].concat();
        let (ok, stdout, stderr) = eap(dir.path(), &args);
        assert!(ok, "{stderr}\n{stdout}");
        stdout
    };
    let own = run(&[], "own");
    let truth = case().join("truth_edges.txt");
    let given = run(&["--truth", truth.to_str().unwrap()], "given");
    let auc = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| l.contains("AUC"))
            .map(str::to_string)
            .collect()
    };
    assert!(!auc(&own).is_empty(), "no ROC without --truth:\n{own}");
    assert_eq!(auc(&own), auc(&given));
}

/// The error of loading the case with `file` replaced by `bytes`.
fn load_error(file: &str, bytes: &[u8]) -> String {
    let dir = with_file(file, bytes);
    match load(dir.path()) {
        Ok(_) => panic!("{file}: loaded"),
        Err(e) => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(inner) = src {
                s += &format!(": {inner}");
                src = inner.source();
            }
            s
        }
    }
}

#[test]
fn hostile_pickles_are_clear_errors() {
    let cfg = "ll_model_cfg.pkl";
    // os.system through GLOBAL (protocol 2, as `pickle.dumps` of a __reduce__ exploit).
    let e = load_error(
        cfg,
        b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00echoq\x01\x85q\x02Rq\x03.",
    );
    assert!(
        e.contains("pickle byte 2") && e.contains("GLOBAL `posix.system`"),
        "{e}"
    );
    // builtins.eval through STACK_GLOBAL (protocol 4).
    let e = load_error(
        cfg,
        b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x011\x85R.",
    );
    assert!(e.contains("STACK_GLOBAL `builtins.eval`"), "{e}");
    // REDUCE of an allowed name that is not a callable eap applies.
    let e = load_error(cfg, b"\x80\x02ctorch\nfloat32\n)R.");
    assert!(e.contains("never calls"), "{e}");
    let e = load_error(cfg, b"\x80\x02K\x01)R.");
    assert!(e.contains("not callable"), "{e}");
    // Unknown and unsupported opcodes, named with their offset.
    let e = load_error(cfg, b"\x80\x04\xff.");
    assert!(
        e.contains("pickle byte 2") && e.contains("unknown opcode 0xff"),
        "{e}"
    );
    let e = load_error(cfg, b"\x80\x02(i__main__\nX\n.");
    assert!(e.contains("INST"), "{e}");
    // Truncated, and lying length fields.
    let good = std::fs::read(case().join(cfg)).unwrap();
    let e = load_error(cfg, &good[..good.len() / 2]);
    assert!(e.contains("truncated"), "{e}");
    let e = load_error(cfg, b"\x80\x04X\xff\xff\xff\x7fabc.");
    assert!(e.contains("claims 2147483647 bytes"), "{e}");
    let e = load_error(cfg, b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\xff.");
    assert!(e.contains("claims"), "{e}");
    // Not a config at all.
    let e = load_error(cfg, b"\x80\x04]\x94.");
    assert!(e.contains("expected a dict"), "{e}");
    // A config field eap cannot honour is refused, not ignored.
    let e = load_error(
        cfg,
        &patch(
            &good,
            b"post_embedding_ln\x94\x89",
            b"post_embedding_ln\x94\x88",
        ),
    );
    assert!(e.contains("unsupported post_embedding_ln = true"), "{e}");
    let edges = "edges.pkl";
    let dir = with_file(edges, b"\x80\x04\x8c\x02os\x8c\x06system\x93.");
    let graph = load(dir.path()).unwrap().graph();
    let e = case_truth(dir.path(), graph).unwrap_err().to_string();
    assert!(e.contains("os.system"), "{e}");
    // A hook eap's graph has no place for.
    let dir = with_file(
        edges,
        b"\x80\x04]\x94(\x8c\nhook_embed\x8c\x18blocks.5.hook_q_input[0]\x86e.",
    );
    let e = case_truth(dir.path(), graph).unwrap_err().to_string();
    assert!(e.contains("edge 0") && e.contains("a5.h0<q>"), "{e}");
}

/// Replaces the first occurrence of `from` in `bytes` by `to` (same length: the zip stays
/// valid, the records are stored uncompressed).
fn patch(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    let mut out = bytes.to_vec();
    out[at..at + to.len()].copy_from_slice(to);
    out
}

#[test]
fn broken_zips_and_tensor_records_are_clear_errors() {
    let pth = "ll_model.pth";
    let good = std::fs::read(case().join(pth)).unwrap();
    for cut in [10, good.len() / 3, good.len() - 30, good.len() - 1] {
        let e = load_error(pth, &good[..cut]);
        assert!(
            e.contains("malformed PyTorch file") && (e.contains("truncated") || e.contains("zip")),
            "cut at {cut}: {e}"
        );
    }
    // embed.W_E: storage of 112 floats, offset 0, size (7, 16), stride (16, 1).
    let (size, stride) = (&b"K\x00K\x07K\x10\x86"[..], &b"K\x10K\x01\x86"[..]);
    let huge = patch(&good, size, b"K\x00K\xffK\x10\x86");
    let e = load_error(pth, &huge);
    assert!(
        e.contains("embed.W_E") && e.contains("4080 elements but its storage holds 112"),
        "{e}"
    );
    let stride_at = good.windows(size.len()).position(|w| w == size).unwrap() + size.len() + 2;
    let mut strided = good.clone();
    assert_eq!(&strided[stride_at..stride_at + 5], stride);
    strided[stride_at + 1] = 0x20;
    let e = load_error(pth, &strided);
    assert!(e.contains("past the end of its storage"), "{e}");
    let lying = patch(&good, b"FloatStorage", b"DoublStorage");
    let e = load_error(pth, &lying);
    assert!(e.contains("torch.DoublStorage"), "{e}");
    let bigger = patch(
        &good,
        b"X\x03\x00\x00\x00cpuq\x07K\x70",
        b"X\x03\x00\x00\x00cpuq\x07K\xff",
    );
    let e = load_error(pth, &bigger);
    assert!(
        e.contains("claims 255 elements") && e.contains("truncated"),
        "{e}"
    );
    // A record compressed by a zip tool is refused, not misread.
    let at = good.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
    let mut deflated = good.clone();
    deflated[at + 10] = 8;
    let e = load_error(pth, &deflated);
    assert!(e.contains("compressed (method 8)"), "{e}");
}

/// `eap mib --method M` is `eap attribute --method M` followed by `eap mib --scores`; on a
/// case folder it also reports the ROC AUC against the case's truth.
#[test]
fn mib_with_a_method_equals_attribute_then_mib() {
    let dir = tempfile::tempdir().unwrap();
    write_reference_jsonl(&dir.path().join("data.jsonl"));
    let model = case();
    let run = |args: &[&str]| eap(dir.path(), args);
    let m = model.to_str().unwrap();
    let common = ["--model", m, "--data", "data.jsonl"];
    for method in ["eap", "eap-ig"] {
        let (ok, _, err) = run(&[
            &["attribute"],
            &common[..],
            &["--method", method, "--out", "s.json"],
        ]
        .concat());
        assert!(ok, "{err}");
        let (ok, from_file, err) =
            run(&[&["mib"], &common[..], &["--scores", "s.json", "--json"]].concat());
        assert!(ok, "{err}");
        let (ok, from_method, err) = run(&[
            &["mib"],
            &common[..],
            &["--method", method, "--json", "--scores-out", "t.json"],
        ]
        .concat());
        assert!(ok, "{err}");
        let a: serde_json::Value = serde_json::from_str(&from_file).unwrap();
        let b: serde_json::Value = serde_json::from_str(&from_method).unwrap();
        assert_eq!(a, b, "{method}");
        let auc = b["roc_auc"].as_f64().expect("a case folder has a truth");
        assert!((0.0..=1.0).contains(&auc));
        // The same number `eap roc` gives against the pickle as --truth.
        let edges = model.join("edges.pkl");
        let (ok, roc, err) = run(&[
            "roc",
            "--scores",
            "s.json",
            "--truth",
            edges.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        assert!(
            roc.contains(&format!("ROC AUC {auc:.4} (trapezoid)")),
            "{auc}: {roc}"
        );
        let scores = |f: &str| {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.path().join(f)).unwrap())
                    .unwrap();
            v["edges"].clone()
        };
        assert_eq!(scores("s.json"), scores("t.json"), "{method}: --scores-out");
    }
    let (ok, _, err) = run(&[
        &["mib"],
        &common[..],
        &["--method", "eap", "--scores", "s.json"],
    ]
    .concat());
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    let (ok, _, err) = run(&[&["mib"], &common[..]].concat());
    assert!(!ok && err.contains("--scores"), "{err}");
}

#[test]
fn several_state_dicts_are_refused_and_hf_bins_keep_their_hint() {
    let pth = std::fs::read(case().join("ll_model.pth")).unwrap();
    let dir = with_file("rng_state.pth", &pth);
    let e = load(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("several PyTorch state dicts (ll_model.pth, rng_state.pth)"),
        "{e}"
    );
    std::fs::write(dir.path().join("pytorch_model.bin"), b"").unwrap();
    let e = load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("only pytorch_model.bin is present"), "{e}");
}

/// torch.save writes a zip64 end-of-directory record beside the classic one; with the classic
/// fields saturated (as in files past 4 GiB) the directory is found through the zip64 record.
#[test]
fn zip64_directory_is_read() {
    let good = std::fs::read(case().join("ll_model.pth")).unwrap();
    let eocd = good.windows(4).rposition(|w| w == b"PK\x05\x06").unwrap();
    let mut z = good.clone();
    z[eocd + 10..eocd + 12].copy_from_slice(&[0xff; 2]);
    z[eocd + 12..eocd + 20].copy_from_slice(&[0xff; 8]);
    let dir = with_file("ll_model.pth", &z);
    let model = load(dir.path()).unwrap();
    let reference = load(&case()).unwrap();
    let refs = reference_tensors_of(&reference);
    assert_eq!(refs, reference_tensors_of(&model));
    // Without the zip64 locator the saturated fields are an error, not a guess.
    let loc = z.windows(4).rposition(|w| w == b"PK\x06\x07").unwrap();
    z[loc] = b'X';
    let e = load_error("ll_model.pth", &z);
    assert!(e.contains("zip64"), "{e}");
}

/// The logits of the case's clean tokens, as a fingerprint of a loaded model.
fn reference_tensors_of(model: &Model) -> Vec<f32> {
    let refs = reference();
    let batch = Batch::new(&tokens(&refs["tokens"]), &Device::Cpu).unwrap();
    let opts = ForwardOptions {
        logit_positions: (0..batch.seq_len).collect(),
        ..Default::default()
    };
    flat(&model.forward(&batch, &opts).unwrap().logits)
}
