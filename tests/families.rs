//! The Llama-family fixtures through the `eap` binary: `discover` end to end (exact patching,
//! EAP, EAP-IG, ACDC and the hybrid through the one block implementation), its circuit, picture
//! and report; text prompts through the model directory's `tokenizer.json`, and a clear error
//! when text prompts have no tokenizer.

use std::path::Path;

use crate::util::{eap, fixture_dir, FAMILY_FIXTURES};

/// Six token-id examples of 7 tokens, below the smallest vocabulary involved (`qwen2_bias`'s
/// tokenizer has 28 tokens; token ids are checked against it).
fn token_data(path: &Path) {
    let lines: Vec<String> = (0..6u32)
        .map(|i| {
            let clean: Vec<u32> = (0..7u32).map(|p| (i * 11 + p * 7 + 3) % 28).collect();
            let mut corrupted = clean.clone();
            corrupted[2] = (corrupted[2] + 9) % 28;
            corrupted[4] = (corrupted[4] + 17) % 28;
            format!(
                "{{\"clean\": {clean:?}, \"corrupted\": {corrupted:?}, \"answer\": {}, \"wrong\": {}}}",
                (i * 5 + 1) % 28,
                (i * 5 + 9) % 28
            )
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn discover_runs_end_to_end_on_every_family() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    token_data(&d.join("data.jsonl"));
    for name in FAMILY_FIXTURES {
        let model = fixture_dir(name);
        let out = format!("out-{name}");
        let (ok, stdout, stderr) = eap(
            d,
            &[
                "discover",
                "--model",
                model.to_str().unwrap(),
                "--data",
                "data.jsonl",
                "--out-dir",
                &out,
                // Random models' top edges rarely connect: a larger circuit survives pruning.
                "--top-n",
                "40",
            ],
        );
        assert!(ok, "{name}: {stderr}");
        for method in ["exact patching", "EAP", "EAP-IG", "ACDC", "EAP→ACDC"] {
            assert!(
                stdout.contains(method),
                "{name}: {method} missing:\n{stdout}"
            );
        }
        let circuit = eap::graph::CircuitFile::read(d.join(&out).join("circuit.json")).unwrap();
        assert!(circuit.circuit.n_edges() > 0, "{name}: empty circuit");
        let m = eap::model::Model::load_dir(&model, &candle_core::Device::Cpu).unwrap();
        assert_eq!(
            circuit.graph,
            m.graph(),
            "{name}: circuit of the wrong graph"
        );
        let html = std::fs::read_to_string(d.join(&out).join("report.html")).unwrap();
        assert!(
            html.matches("<svg").count() >= 4,
            "{name}: report lacks pictures"
        );
        assert!(d.join(&out).join("circuit.svg").exists());
    }
}

#[test]
fn text_prompts_use_the_model_directorys_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = fixture_dir("qwen2_bias");
    let data = model.join("data.jsonl");
    let (ok, stdout, stderr) = eap(
        d,
        &[
            "attribute",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            "scores.json",
            "--json",
        ],
    );
    assert!(ok, "{stderr}");
    let meta: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(meta["n_examples"], 3);
    // The same prompts as the reference's token ids give the reference's clean metric.
    let refs = crate::util::reference("qwen2_bias");
    let want = refs["metric"].to_vec1::<f32>().unwrap()[0] as f64;
    let got = meta["clean_metric"].as_f64().unwrap();
    assert!(
        (got - want).abs() < 1e-4 * want.abs().max(1.0),
        "{got} vs {want}"
    );

    // Text prompts for a model directory without a tokenizer: a clear error.
    let (ok, _, stderr) = eap(
        d,
        &[
            "attribute",
            "--model",
            fixture_dir("llama_gqa").to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            "s2.json",
        ],
    );
    assert!(!ok && stderr.contains("tokenizer"), "{stderr}");
    assert!(!d.join("s2.json").exists());
}
