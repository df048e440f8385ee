//! Circuit files move between tools: EAP-IG's JSON layout written by the fixture script
//! (Python) loads here with the same scores, and our own files round-trip.

use eap::graph::{Circuit, CircuitFile};

use crate::util::*;

#[test]
fn reads_a_circuit_written_in_eapig_layout_by_python() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eapig_graph.json");
    let file = CircuitFile::read(&path).unwrap();
    let g = file.graph;
    assert_eq!((g.n_layers, g.n_heads, g.has_mlp), (3, 4, false));
    assert_eq!(g.n_edges(), 193);
    // The script marked the top 20 edges by |score| and stored the PyTorch EAP scores.
    assert_eq!(file.circuit.n_edges(), 20);
    let expected = flat(&reference("tl_attn_only_shortformer")["eap_scores"]);
    assert!(rel_err(&file.scores.values, &expected) < 1e-6);
    let top = Circuit::top_n(&file.scores, 20);
    assert_eq!(top, file.circuit, "our top-20 selection equals the file's");
}

#[test]
fn our_scores_files_round_trip() {
    let file = CircuitFile::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eapig_graph.json"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.json");
    let mut meta = serde_json::json!({"method": "eap", "d_model": 32});
    meta["n_examples"] = 3.into();
    let ours = CircuitFile::new(file.scores.clone(), file.circuit.prune(), meta).unwrap();
    ours.write(&path).unwrap();
    let back = CircuitFile::read(&path).unwrap();
    assert_eq!(back.scores, ours.scores);
    assert_eq!(back.circuit, ours.circuit);
    assert_eq!(back.meta["method"], "eap");
}
