use super::*;
use crate::eval::{correlation, default_fractions, roc_from_graph, FaithfulnessCurve};
use crate::graph::{Circuit, Graph, Scores};

/// A deterministic stream of numbers in [0, 1) (no RNG crate needed for made-up data).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Made-up scores on a 4-layer, 4-head model with MLPs and a ground-truth circuit of the
/// strongest ~40 edges plus noise, so every picture has something to show.
fn demo_data() -> (Scores, Circuit, Circuit) {
    let g = Graph::new(4, 4, true);
    let mut rng = Lcg(7);
    let mut scores = Scores::zeros(g);
    let mut truth = Circuit::empty(g);
    let nr = g.n_readers();
    for (i, (w, r)) in g.edges().enumerate() {
        let important = i % 9 == 0;
        let magnitude = if important {
            0.5 + rng.next()
        } else {
            0.3 * rng.next()
        };
        let sign = if rng.next() < 0.25 { -1.0 } else { 1.0 };
        scores.values[w * nr + r] = (sign * magnitude) as f32;
        if important {
            truth.set(w, r, true);
        }
    }
    // The circuit: the 45 edges of largest |score|.
    let mut edges: Vec<(usize, usize)> = g.edges().collect();
    edges.sort_by(|a, b| {
        scores
            .get(b.0, b.1)
            .abs()
            .total_cmp(&scores.get(a.0, a.1).abs())
    });
    let mut circuit = Circuit::empty(g);
    for &(w, r) in edges.iter().take(45) {
        circuit.set(w, r, true);
    }
    (scores, truth, circuit)
}

/// 50 made-up edges on a 12-layer, 12-head graph with MLPs: the size of real circuits.
fn gpt2_shaped_circuit() -> (Circuit, Scores) {
    let g = Graph::new(12, 12, true);
    let all: Vec<(usize, usize)> = g.edges().collect();
    let mut rng = Lcg(5);
    let mut c = Circuit::empty(g);
    let mut s = Scores::zeros(g);
    let nr = g.n_readers();
    while c.n_edges() < 50 {
        let (w, r) = all[(rng.next() * all.len() as f64) as usize];
        c.set(w, r, true);
        s.values[w * nr + r] = (rng.next() - 0.3) as f32;
    }
    (c, s)
}

fn demo_report() -> Report {
    let (scores, truth, circuit) = demo_data();
    let roc_eap = roc_from_graph(&scores, &truth).unwrap();
    let mut noisy = scores.clone();
    let mut rng = Lcg(11);
    for v in noisy.values.iter_mut() {
        *v += (rng.next() as f32 - 0.5) * 0.9;
    }
    let roc_noisy = roc_from_graph(&noisy, &truth).unwrap();
    let x = default_fractions();
    let f_eap: Vec<f64> = x
        .iter()
        .map(|p| 1.0 - (-p * 40.0).exp() + 0.05 * (p * 9.0).sin())
        .collect();
    let f_noisy: Vec<f64> = x
        .iter()
        .map(|p| (p * 3.0).min(1.0) - 0.1 * (1.0 - p))
        .collect();
    let curves = vec![
        (
            "EAP-IG".to_string(),
            FaithfulnessCurve::new(x.clone(), f_eap).unwrap(),
        ),
        (
            "noisy EAP".to_string(),
            FaithfulnessCurve::new(x, f_noisy).unwrap(),
        ),
    ];
    let mut rng = Lcg(3);
    let points: Vec<(f64, f64)> = scores
        .edge_values()
        .iter()
        .map(|&s| (s as f64, s as f64 * 0.8 + (rng.next() - 0.5) * 0.2))
        .collect();
    let (xs, ys): (Vec<f64>, Vec<f64>) = points.iter().copied().unzip();
    let corr = correlation(&xs, &ys).unwrap();
    Report {
        title: "Demo <script>alert(1)</script> report".to_string(),
        command: "eap report --task ioi --model gpt2 --out 'a&b.html' \"<x>\"".to_string(),
        sections: vec![
            Section::Text {
                title: "About".to_string(),
                body:
                    "Made-up data for checking the pictures.\n\nSecond paragraph & <b>not bold</b>."
                        .to_string(),
            },
            Section::Table {
                title: "Areas".to_string(),
                header: vec![
                    "method".into(),
                    "AUC".into(),
                    "pessimistic AUC".into(),
                    "CPR".into(),
                    "CMD".into(),
                ],
                rows: vec![
                    vec![
                        "EAP-IG".into(),
                        format!("{:.3}", roc_eap.auc_trapezoid),
                        format!("{:.3}", roc_eap.auc_staircase),
                        format!("{:.3}", curves[0].1.cpr),
                        format!("{:.3}", curves[0].1.cmd),
                    ],
                    vec![
                        "noisy EAP".into(),
                        format!("{:.3}", roc_noisy.auc_trapezoid),
                        format!("{:.3}", roc_noisy.auc_staircase),
                        format!("{:.3}", curves[1].1.cpr),
                        format!("{:.3}", curves[1].1.cmd),
                    ],
                ],
            },
            Section::Figure {
                title: "Circuit".to_string(),
                svg: circuit_svg(&circuit, Some(&scores)),
                caption: format!("The top {} edges by |score|.", circuit.n_edges()),
            },
            Section::Figure {
                title: "Circuit on a GPT-2-small-shaped graph".to_string(),
                svg: {
                    let (c, s) = gpt2_shaped_circuit();
                    circuit_svg(&c, Some(&s))
                },
                caption: "50 edges among 32,491.".to_string(),
            },
            Section::Figure {
                title: "ROC".to_string(),
                svg: roc_svg(&[
                    ("EAP-IG".to_string(), roc_eap),
                    ("noisy EAP".to_string(), roc_noisy),
                ]),
                caption: "Against the made-up ground truth.".to_string(),
            },
            Section::Figure {
                title: "Faithfulness".to_string(),
                svg: faithfulness_svg(&curves),
                caption: "MIB's fractions of edges.".to_string(),
            },
            Section::Figure {
                title: "Attribution vs patching".to_string(),
                svg: scatter_svg(
                    "Attribution vs exact patching",
                    "attribution score",
                    "patching effect",
                    &points,
                    Some(&corr),
                ),
                caption: "One dot per edge.".to_string(),
            },
        ],
    }
}

/// Parses `svg` as XML and checks the basics every picture promises.
fn check_svg(svg: &str) -> roxmltree::Document<'_> {
    assert!(!svg.contains("NaN"), "NaN in SVG");
    assert!(!svg.contains("inf"), "inf in SVG");
    let doc =
        roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("not well-formed: {e}\n{svg}"));
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    for attr in ["width", "height", "viewBox"] {
        assert!(root.attribute(attr).is_some(), "svg lacks {attr}");
    }
    doc
}

fn count(doc: &roxmltree::Document, tag: &str, class: &str) -> usize {
    doc.descendants()
        .filter(|n| n.has_tag_name(tag) && n.attribute("class") == Some(class))
        .count()
}

#[test]
fn circuit_svg_draws_one_path_per_edge() {
    let (scores, _, circuit) = demo_data();
    for s in [Some(&scores), None] {
        let svg = circuit_svg(&circuit, s);
        let doc = check_svg(&svg);
        assert_eq!(count(&doc, "path", "edge"), circuit.n_edges());
    }
    let svg = circuit_svg(&circuit, Some(&scores));
    assert!(
        svg.contains("stroke-dasharray"),
        "negative scores are dashed"
    );
    for letter in ["query", "key", "value"] {
        assert!(svg.contains(letter), "legend names {letter}");
    }
}

#[test]
fn circuit_svg_of_a_gpt2_sized_circuit() {
    let (c, s) = gpt2_shaped_circuit();
    let svg = circuit_svg(&c, Some(&s));
    assert_eq!(count(&check_svg(&svg), "path", "edge"), 50);
}

#[test]
fn circuit_svg_handles_empty_full_and_large_graphs() {
    let g = Graph::new(2, 2, false);
    let doc_svg = circuit_svg(&Circuit::empty(g), None);
    let doc = check_svg(&doc_svg);
    assert_eq!(count(&doc, "path", "edge"), 0);

    let full = Circuit::full(g);
    let svg = circuit_svg(&full, Some(&Scores::zeros(g)));
    assert_eq!(count(&check_svg(&svg), "path", "edge"), g.n_edges());

    // Scores for another graph are ignored rather than misread.
    let svg = circuit_svg(&full, Some(&Scores::zeros(Graph::new(3, 2, false))));
    assert_eq!(count(&check_svg(&svg), "path", "edge"), g.n_edges());

    // A wide model is compacted to the touched heads and layers.
    let big = Graph::new(32, 32, true);
    let mut c = Circuit::empty(big);
    let logits = big.n_readers() - 1;
    c.set(big.parse_writer("a20.h31").unwrap(), logits, true);
    c.set(0, big.parse_reader("a20.h31<k>").unwrap(), true);
    let mut s = Scores::zeros(big);
    s.values[logits] = f32::NAN;
    let svg = circuit_svg(&c, Some(&s));
    let doc = check_svg(&svg);
    assert_eq!(count(&doc, "path", "edge"), 2);
    let width: f64 = doc
        .root_element()
        .attribute("width")
        .unwrap()
        .parse()
        .unwrap();
    assert!(width < 1000.0, "compacted width {width}");
}

#[test]
fn charts_are_well_formed_for_degenerate_input() {
    check_svg(&roc_svg(&[]));
    check_svg(&faithfulness_svg(&[]));
    check_svg(&scatter_svg("t", "x", "y", &[], None));
    check_svg(&scatter_svg("t", "x", "y", &[(1.0, 1.0)], None));
    check_svg(&scatter_svg("t", "x", "y", &[(0.0, 0.0); 4], None));
    check_svg(&scatter_svg(
        "<t>",
        "x&",
        "y\"",
        &[(f64::NAN, 1.0), (f64::INFINITY, 2.0), (1e30, -1e30)],
        None,
    ));
    let flat = FaithfulnessCurve::new(vec![0.0, 0.5, 1.0], vec![1.0; 3]).unwrap();
    let svg = faithfulness_svg(&[("flat".to_string(), flat)]);
    check_svg(&svg);
    assert!(svg.contains("CPR"), "legend gives CPR");
    let tie = crate::eval::roc(&[0.0; 3], &[true, false, false]).unwrap();
    let svg = roc_svg(&[("all tied".to_string(), tie)]);
    assert_eq!(count(&check_svg(&svg), "polyline", "curve"), 1);
}

#[test]
fn charts_of_demo_data_are_well_formed() {
    let report = demo_report();
    for section in &report.sections {
        if let Section::Figure { svg, .. } = section {
            check_svg(svg);
        }
    }
}

#[test]
fn html_escapes_text_and_shows_the_command() {
    let html = demo_report().to_html();
    assert!(!html.contains("<script>"), "title must be escaped");
    assert!(html.contains("Demo &lt;script&gt;alert(1)&lt;/script&gt; report"));
    assert!(html.contains("<pre><code>eap report --task ioi --model gpt2 --out &#39;a&amp;b.html&#39; &quot;&lt;x&gt;&quot;</code></pre>"));
    assert!(html.contains("&lt;b&gt;not bold&lt;/b&gt;"));
    assert_eq!(html.matches("<svg ").count(), 5);
    assert!(!html.contains("NaN"));
    for external in ["http://", "https://"] {
        // The only URL allowed is the SVG namespace, which loads nothing.
        let n = html.matches(external).count();
        let ns = html.matches("http://www.w3.org/2000/svg").count();
        assert_eq!(n, if external == "http://" { ns } else { 0 });
    }
}

#[test]
fn write_is_atomic_and_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.html");
    let report = Report::new("t", "eap report");
    report.write(&path).unwrap();
    report.write(&path).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), report.to_html());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(report
        .write(dir.path().join("missing/report.html"))
        .is_err());
}

/// Writes the demo report to `$EAP_DEMO_REPORT` (default `/tmp/eap_demo_report.html`) for
/// `scripts/screenshot_report.sh`: `cargo test --release --lib report::tests::write_demo_report -- --ignored`.
#[test]
#[ignore]
fn write_demo_report() {
    let path = std::env::var("EAP_DEMO_REPORT")
        .unwrap_or_else(|_| "/tmp/eap_demo_report.html".to_string());
    demo_report().write(&path).unwrap();
    eprintln!("wrote {path}");
}
