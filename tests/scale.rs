//! Models at scale without downloads: random checkpoints eap writes itself (`eap random-model`),
//! streamed loading (weights memory-mapped, one layer converted at a time, vocabulary read by
//! rows) giving the resident model's numbers, and score files as a dense safetensors matrix.

use std::path::Path;

use candle_core::{Device, Tensor};
use eap::attribution::{attribute, AttributionOptions};
use eap::graph::{Circuit, CircuitFile, Graph, MissingEdges, Scores};
use eap::model::random::{hub_config, write_random_checkpoint_of, StoredDtype, PRESETS};
use eap::model::{Batch, ForwardOptions, Model, Residency};
use eap::tasks::{Dataset, Example, Metric, Target};
use serde_json::{json, Value};

use crate::util::*;

/// A preset's published config shrunk to a few layers of a small width, with every
/// architectural setting (rotary scaling, grouping, biases, tying, post-norms, soft-caps,
/// partial rotary, parallel blocks) kept.
fn tiny_config(preset: &str) -> Value {
    let mut c: Value = serde_json::from_str(hub_config(preset).unwrap()).unwrap();
    let set = |c: &mut Value, k: &str, v: Value| c[k] = v;
    match c["model_type"].as_str().unwrap() {
        "gpt2" => {
            for (k, v) in [
                ("n_embd", 64),
                ("n_head", 4),
                ("n_layer", 2),
                ("vocab_size", 300),
            ] {
                set(&mut c, k, json!(v));
            }
            set(&mut c, "n_positions", json!(32));
            set(&mut c, "n_ctx", json!(32));
        }
        _ => {
            let kv = c["num_key_value_heads"].as_u64().map(|_| 2);
            set(&mut c, "hidden_size", json!(64));
            set(&mut c, "intermediate_size", json!(96));
            set(&mut c, "num_attention_heads", json!(4));
            if let Some(kv) = kv {
                set(&mut c, "num_key_value_heads", json!(kv));
            }
            set(&mut c, "num_hidden_layers", json!(2));
            set(&mut c, "vocab_size", json!(300));
            if c.get("head_dim").is_some() {
                set(&mut c, "head_dim", json!(16));
                set(&mut c, "query_pre_attn_scalar", json!(16));
            }
            if let Some(w) = c.get("sliding_window").and_then(Value::as_u64) {
                // Gemma-2 alternates windowed layers: a window shorter than the prompts
                // exercises it.
                if c["model_type"] == "gemma2" && w > 0 {
                    set(&mut c, "sliding_window", json!(4));
                }
            }
        }
    }
    c
}

fn write(config: Value, dtype: StoredDtype, dir: &Path) {
    write_random_checkpoint_of(config, dtype, 7, dir, &mut |_, _| {}).unwrap();
}

fn dataset(vocab: u32) -> Dataset {
    let examples = (0..3u32)
        .map(|b| {
            let clean: Vec<u32> = (0..7).map(|p| (b * 37 + p * 101 + 5) % vocab).collect();
            Example {
                corrupted: clean.iter().map(|t| (t + 1) % vocab).collect(),
                clean,
                target: Target {
                    answers: vec![(b * 13 + 2) % vocab],
                    wrongs: vec![(b * 13 + 3) % vocab],
                },
            }
        })
        .collect();
    Dataset {
        name: "scale".into(),
        examples,
    }
}

/// `data` as token-id JSONL lines, as `eap --data` reads them.
fn write_jsonl(data: &Dataset, path: &Path) {
    let lines: Vec<String> = data
        .examples
        .iter()
        .map(|e| {
            json!({"clean": e.clean, "corrupted": e.corrupted,
                   "answer": e.target.answers[0], "wrong": e.target.wrongs[0]})
            .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

/// The largest |a − b| and the largest |a|.
fn max_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    (err, scale)
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Every preset's checkpoint, as eap writes it, loads with every tensor accounted for and
/// the configuration the preset names.
#[test]
fn random_checkpoints_of_every_preset_load_as_written() {
    for preset in PRESETS {
        let dir = tempfile::tempdir().unwrap();
        write(tiny_config(preset), StoredDtype::Bf16, dir.path());
        let model =
            Model::load_dir(dir.path(), &Device::Cpu).unwrap_or_else(|e| panic!("{preset}: {e}"));
        let want = eap::model::random::preset(preset).unwrap().cfg;
        let cfg = &model.cfg;
        assert_eq!(cfg.n_layers, 2, "{preset}");
        assert_eq!(cfg.d_model, 64, "{preset}");
        assert_eq!(cfg.d_vocab, 300, "{preset}");
        assert_eq!(cfg.norm, want.norm, "{preset}");
        assert_eq!(cfg.act, want.act, "{preset}");
        assert_eq!(cfg.gated_mlp, want.gated_mlp, "{preset}");
        assert_eq!(cfg.post_norms, want.post_norms, "{preset}");
        assert_eq!(cfg.parallel_attn_mlp, want.parallel_attn_mlp, "{preset}");
        assert_eq!(
            cfg.n_kv_heads < cfg.n_heads,
            want.n_kv_heads < want.n_heads,
            "{preset}: grouped-query attention"
        );
        // Seeded: the same seed writes the same bytes; another seed, others.
        let again = tempfile::tempdir().unwrap();
        write(tiny_config(preset), StoredDtype::Bf16, again.path());
        let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
        assert_eq!(bytes(dir.path()), bytes(again.path()), "{preset}");
        write_random_checkpoint_of(
            tiny_config(preset),
            StoredDtype::Bf16,
            8,
            again.path(),
            &mut |_, _| {},
        )
        .unwrap();
        assert_ne!(bytes(dir.path()), bytes(again.path()), "{preset}");
    }
}

/// A streamed model (layers converted on use, vocabulary read by rows), and a resident one whose
/// vocabulary stays mapped (what `attribute` loads), compute the resident model's logits and
/// EAP scores: with the logit difference (a few unembedding columns) and with the NLL (the whole
/// vocabulary, read in blocks).
#[test]
fn streamed_models_match_resident_ones() {
    for preset in [
        "llama-3.1-8b",
        "qwen2.5-0.5b",
        "gemma-2-2b",
        "pythia-160m",
        "gpt2",
    ] {
        let dir = tempfile::tempdir().unwrap();
        write(tiny_config(preset), StoredDtype::Bf16, dir.path());
        let resident = Model::load_dir_with(dir.path(), &Device::Cpu, usize::MAX).unwrap();
        let streamed = Model::load_dir_with(dir.path(), &Device::Cpu, 0).unwrap();
        let path = dir.path().to_str().unwrap();
        let mapped = Model::load_with(path, &Device::Cpu, Residency::MappedVocabulary).unwrap();
        // Streamed at load, then made resident (what `attribute` does for many passes).
        let mut converted = Model::load_with(path, &Device::Cpu, Residency::Streamed).unwrap();
        assert!(converted.layers_streamed());
        assert!(converted.make_layers_resident().unwrap());
        assert!(!converted.layers_streamed());
        let data = dataset(300);
        let tokens: Vec<Vec<u32>> = data.examples.iter().map(|e| e.clean.clone()).collect();
        let batch = Batch::new(&tokens, &Device::Cpu).unwrap();
        let logits = |m: &Model| {
            m.forward(&batch, &ForwardOptions::default())
                .unwrap()
                .logits
        };
        // A streamed model's layers arrive in the order asked (each fetched ahead of its turn
        // on a helper thread); an error in the caller's work stops the walk there.
        let n = streamed.cfg.n_layers;
        for backward in [false, true] {
            let mut seen = Vec::new();
            streamed
                .for_each_layer((0..n).rev(), backward, |l, _| {
                    seen.push(l);
                    Ok(())
                })
                .unwrap();
            assert_eq!(seen, (0..n).rev().collect::<Vec<_>>());
            let mut calls = 0;
            let e = streamed
                .for_each_layer(0..n, backward, |l, _| {
                    calls += 1;
                    match l {
                        1 => Err(eap::Error::invalid("stop at layer 1")),
                        _ => Ok(()),
                    }
                })
                .unwrap_err();
            assert!(e.to_string().contains("stop at layer 1"), "{e}");
            assert_eq!(calls, 2);
        }
        let a = logits(&resident);
        let others = [
            ("streamed", &streamed),
            ("mapped", &mapped),
            ("converted", &converted),
        ];
        for (what, other) in others {
            let err = max_abs(&(&a - &logits(other)).unwrap());
            assert!(
                err <= 1e-5 * max_abs(&a),
                "{preset} {what}: logits differ by {err}"
            );
        }

        for metric in [Metric::LogitDiff, Metric::Nll] {
            let opts = AttributionOptions {
                metric,
                ..Default::default()
            };
            let sa = attribute(&resident, &data, &opts).unwrap().scores;
            for (what, other) in others {
                let sb = attribute(other, &data, &opts).unwrap().scores;
                let (err, scale) = max_diff(&sa.values, &sb.values);
                assert!(scale > 0.0, "{preset}: the test needs nonzero scores");
                assert!(
                    err <= 1e-5 * scale,
                    "{preset} {what} {metric:?}: scores differ by {err} (max {scale})"
                );
            }
        }
    }
}

/// Stored dtypes are read exactly: a bf16 checkpoint and the f32 checkpoint of the same seed
/// give the same model up to bf16 rounding.
#[test]
fn bf16_and_f32_checkpoints_of_one_seed_agree() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write(tiny_config("llama-3.1-8b"), StoredDtype::Bf16, a.path());
    write(tiny_config("llama-3.1-8b"), StoredDtype::F32, b.path());
    let size = |d: &Path| {
        std::fs::metadata(d.join("model.safetensors"))
            .unwrap()
            .len()
    };
    assert!(size(b.path()) > 2 * size(a.path()) - 4096);
    let tokens = vec![vec![1u32, 5, 9, 200]];
    let batch = Batch::new(&tokens, &Device::Cpu).unwrap();
    let logits = |d: &Path| {
        Model::load_dir(d, &Device::Cpu)
            .unwrap()
            .forward(&batch, &ForwardOptions::default())
            .unwrap()
            .logits
    };
    let (la, lb) = (logits(a.path()), logits(b.path()));
    let err = max_abs(&(&la - &lb).unwrap());
    assert!(
        err > 0.0 && err <= 0.02 * max_abs(&lb),
        "bf16 vs f32 logits: {err}"
    );
}

/// Changes a score matrix's values, circuit mask or metadata before it is written back.
type Edit<'a> =
    dyn Fn(&mut Vec<f32>, &mut Vec<u8>, &mut std::collections::HashMap<String, String>) + 'a;

fn sample_file() -> CircuitFile {
    let graph = Graph::new(2, 3, true);
    let mut scores = Scores::zeros(graph);
    let mut circuit = Circuit::empty(graph);
    for (i, (w, r)) in graph.edges().enumerate() {
        scores.values[w * graph.n_readers() + r] = (i as f32 * 0.37).sin();
        if i % 3 == 0 {
            circuit.set(w, r, true);
        }
    }
    CircuitFile::new(scores, circuit, json!({"method": "eap", "d_model": 16})).unwrap()
}

#[test]
fn score_matrices_round_trip_and_bad_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scores.safetensors");
    let file = sample_file();
    file.write(&path).unwrap();
    let back = CircuitFile::read_scores(&path, MissingEdges::Refuse).unwrap();
    assert_eq!(back.missing, 0);
    assert_eq!(back.file, file);

    // What Python's `safetensors.numpy.load_file` sees: one matrix, writers x readers.
    let raw = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    let g = file.graph;
    assert_eq!(
        st.tensor("scores").unwrap().shape(),
        [g.n_writers(), g.n_readers()]
    );

    let rewrite = |edit: &Edit<'_>| {
        let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&raw).unwrap();
        let mut meta = header.metadata().clone().unwrap();
        let mut values: Vec<f32> = st
            .tensor("scores")
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let mut mask = st.tensor("in_graph").unwrap().data().to_vec();
        edit(&mut values, &mut mask, &mut meta);
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let n = mask.len();
        let rows = g.n_writers();
        let shape = |len: usize| vec![rows, len / rows];
        let out = safetensors::serialize(
            [
                (
                    "scores",
                    safetensors::tensor::TensorView::new(
                        safetensors::Dtype::F32,
                        shape(bytes.len() / 4),
                        &bytes,
                    )
                    .unwrap(),
                ),
                (
                    "in_graph",
                    safetensors::tensor::TensorView::new(safetensors::Dtype::U8, shape(n), &mask)
                        .unwrap(),
                ),
            ],
            Some(meta),
        )
        .unwrap();
        let bad = dir.path().join("bad.safetensors");
        std::fs::write(&bad, out).unwrap();
        CircuitFile::read_scores(&bad, MissingEdges::Refuse)
            .unwrap_err()
            .to_string()
    };
    let (w, r) = g.edges().next().unwrap();
    let nr = g.n_readers();
    let e = rewrite(&|v, _, _| v[w * nr + r] = f32::NAN);
    assert!(e.contains("has score NaN"), "{e}");
    // Writer 0 (`input`) → the last reader exists; a head cannot feed its own layer's reader.
    let non_edge = (0..g.n_writers() * nr)
        .find(|&i| !g.is_edge(i / nr, i % nr))
        .unwrap();
    let e = rewrite(&|v, _, _| v[non_edge] = 1.0);
    assert!(e.contains("is not an edge"), "{e}");
    let e = rewrite(&|_, m, _| m[non_edge] = 1);
    assert!(e.contains("is not an edge"), "{e}");
    let e = rewrite(&|_, _, meta| {
        meta.insert(
            "cfg".into(),
            json!({"n_layers": 3, "n_heads": 3, "attn_only": false}).to_string(),
        );
    });
    assert!(e.contains("[") && e.contains("needs F32"), "{e}");
    let e = rewrite(&|_, _, meta| {
        meta.insert("format".into(), "pt".into());
    });
    assert!(e.contains("not an eap score matrix"), "{e}");
    let e = rewrite(&|_, _, meta| {
        meta.remove("cfg");
    });
    assert!(e.contains("no `cfg`"), "{e}");
    std::fs::write(dir.path().join("trunc.safetensors"), &raw[..raw.len() / 2]).unwrap();
    let e = CircuitFile::read_scores(dir.path().join("trunc.safetensors"), MissingEdges::Refuse)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("trunc.safetensors") && e.contains("not a safetensors file"),
        "{e}"
    );
}

/// `eap attribute --out x.safetensors` writes the matrix; `circuit` reads it and selects what
/// it selects from the JSON scores of the same run.
#[test]
fn cli_writes_and_reads_score_matrices() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let (ok, _, stderr) = eap(dir.path(), args);
        assert!(ok, "{args:?}: {stderr}");
    };
    let model = fixture_dir("llama_gqa");
    let model = model.to_str().unwrap();
    let data = dir.path().join("d.jsonl");
    write_jsonl(&dataset(100), &data);
    let data = data.to_str().unwrap();
    run(&[
        "attribute",
        "--model",
        model,
        "--data",
        data,
        "--out",
        "s.json",
    ]);
    run(&[
        "attribute",
        "--model",
        model,
        "--data",
        data,
        "--out",
        "s.safetensors",
    ]);
    let json = CircuitFile::read(dir.path().join("s.json")).unwrap();
    let matrix = CircuitFile::read(dir.path().join("s.safetensors")).unwrap();
    assert_eq!(json.scores, matrix.scores);
    for scores in ["s.json", "s.safetensors"] {
        run(&[
            "circuit",
            "--scores",
            scores,
            "--top-n",
            "12",
            "--out",
            &format!("{scores}.circuit.json"),
        ]);
    }
    let a = CircuitFile::read(dir.path().join("s.json.circuit.json")).unwrap();
    let b = CircuitFile::read(dir.path().join("s.safetensors.circuit.json")).unwrap();
    assert_eq!(a.circuit, b.circuit);
    assert!(a.circuit.n_edges() > 0);
}

/// A budget that cannot hold one example is refused before any work, naming the flag and the
/// size one example needs.
#[test]
fn a_budget_below_one_example_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config("gpt2");
    config["n_positions"] = json!(128);
    config["n_ctx"] = json!(128);
    write(config, StoredDtype::F32, dir.path());
    let prompt: Vec<u32> = (0..128).map(|t| t % 200).collect();
    let line = json!({"clean": prompt, "corrupted": prompt.iter().map(|t| t + 1).collect::<Vec<_>>(),
                      "answer": 3, "wrong": 4});
    std::fs::write(dir.path().join("d.jsonl"), line.to_string()).unwrap();
    let args = ["--model", ".", "--data", "d.jsonl", "--memory-budget", "1"];
    let (code, _, err) = eap_code(
        dir.path(),
        &[&["attribute", "--out", "s.json"][..], &args].concat(),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("one example of 128 tokens needs 4 MiB"),
        "{err}"
    );
    assert!(err.contains("over the memory budget of 1 MiB"), "{err}");
    assert!(err.contains("--memory-budget"), "{err}");
    assert!(!dir.path().join("s.json").exists());
    // ACDC and discover take the same flag, and refuse the same way.
    for command in [
        &["acdc", "--threshold", "0.1", "--out", "a.json"][..],
        &["discover", "--out-dir", "out"][..],
    ] {
        let (code, _, err) = eap_code(dir.path(), &[command, &args].concat());
        assert_eq!(code, 1, "{command:?}: {err}");
        assert!(
            err.contains("needs 4 MiB") && err.contains("--memory-budget"),
            "{err}"
        );
    }
}

/// `attribute` streams the layers for EAP over one chunk (or with `--stream-weights`) and keeps
/// them resident for more chunks, and each way scores what the others score, on a checkpoint
/// of every Llama-family layout the fixtures have.
#[test]
fn stream_weights_flag_gives_the_resident_scores() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    write_jsonl(&dataset(24), &data);
    // (flags, the layers the run should report): the 3 examples fit one chunk by default.
    // The EAP runs agree with the first, the EAP-IG runs with each other.
    const IG: [&str; 4] = ["--method", "eap-ig", "--ig-steps", "2"];
    let runs: [(&[&str], &str); 5] = [
        (&[], "streamed"),
        (&["--batch-size", "1"], "resident"),
        (&["--batch-size", "1", "--stream-weights"], "streamed"),
        (&IG, "resident"),
        (
            &[IG[0], IG[1], IG[2], IG[3], "--stream-weights"],
            "streamed",
        ),
    ];
    for name in FAMILY_FIXTURES {
        let model = fixture_dir(name);
        let mut files = Vec::new();
        for (i, (extra, layers)) in runs.iter().enumerate() {
            let out = format!("{name}.{i}.safetensors");
            let model = model.to_str().unwrap();
            let args = [
                "-q",
                "attribute",
                "--model",
                model,
                "--data",
                "d.jsonl",
                "--out",
                &out,
            ];
            let (ok, _, stderr) = eap(dir.path(), &[&args[..], extra].concat());
            assert!(ok, "{name}: {stderr}");
            let file = CircuitFile::read(dir.path().join(&out)).unwrap();
            assert_eq!(file.meta["layers"], *layers, "{name} {extra:?}");
            files.push(file);
        }
        for (i, j) in [(0, 1), (0, 2), (3, 4)] {
            let extra = runs[j].0;
            let (err, scale) = max_diff(&files[i].scores.values, &files[j].scores.values);
            assert!(
                scale > 0.0 && err <= 1e-5 * scale,
                "{name} {extra:?}: {err} of {scale}"
            );
        }
    }
}

/// `--products bf16` on `model`: scores to bf16's precision of the f32 scores (the inputs of
/// the weight products rounded to 2⁻⁹), not the f32 run under another name, recorded in the
/// scores' `meta`. The streamed run (one chunk) keeps a bf16 checkpoint's MLP matrices as
/// stored, the resident one (`--batch-size 1`: a chunk per example) rounds their f32 copies:
/// both give the same numbers, since the backward's gradients have the same scale in every
/// chunking.
fn check_bf16_products(dir: &Path, name: &str, model: &Path) {
    let runs: [&[&str]; 3] = [
        &[],
        &["--products", "bf16"],
        &["--products", "bf16", "--batch-size", "1"],
    ];
    let mut files = Vec::new();
    for (i, extra) in runs.iter().enumerate() {
        let out = format!("{name}.{i}.safetensors");
        let args = [
            "-q",
            "attribute",
            "--model",
            model.to_str().unwrap(),
            "--data",
            "d.jsonl",
            "--out",
            &out,
        ];
        let (ok, _, stderr) = eap(dir, &[&args[..], extra].concat());
        assert!(ok, "{name}: {stderr}");
        files.push(CircuitFile::read(dir.join(&out)).unwrap());
    }
    assert_eq!(files[0].meta["products"], "f32", "{name}");
    for file in &files[1..] {
        assert_eq!(file.meta["products"], "bf16", "{name}");
        let (err, scale) = max_diff(&files[0].scores.values, &file.scores.values);
        assert!(
            scale > 0.0 && err > 0.0 && err <= 3e-2 * scale,
            "{name}: bf16 scores off by {err} of {scale}"
        );
    }
    assert_eq!(files[1].meta["layers"], "streamed", "{name}");
    assert_eq!(files[2].meta["layers"], "resident", "{name}");
    // f32 runs differ by ~3e-7 between chunkings (sums in another order); bf16 rounds such
    // differences on rarely, and scaling the gradients by 1/chunk moved them by 4e-3.
    let (err, scale) = max_diff(&files[1].scores.values, &files[2].scores.values);
    assert!(
        err <= 1e-4 * scale,
        "{name}: one chunk and three differ by {err} of {scale}"
    );
}

/// [`check_bf16_products`] on every family fixture (f32, f16 and bf16 checkpoints) and on a
/// tiny bf16 checkpoint of every preset's layout (GPT-2's `Conv1D`, Llama, Gemma-2, NeoX); a
/// precision that does not exist is refused by name.
#[test]
fn bf16_products_flag_scores_near_the_f32_scores() {
    let dir = tempfile::tempdir().unwrap();
    write_jsonl(&dataset(24), &dir.path().join("d.jsonl"));
    for name in FAMILY_FIXTURES {
        check_bf16_products(dir.path(), name, &fixture_dir(name));
    }
    for preset in PRESETS {
        let model = dir.path().join(preset);
        std::fs::create_dir(&model).unwrap();
        write(tiny_config(preset), StoredDtype::Bf16, &model);
        check_bf16_products(dir.path(), preset, &model);
    }
    let (ok, _, stderr) = eap(
        dir.path(),
        &[
            "attribute",
            "--model",
            "m",
            "--data",
            "d.jsonl",
            "--products",
            "f16",
            "--out",
            "x",
        ],
    );
    assert!(!ok && stderr.contains("f32 or bf16"), "{stderr}");
}
