//! Graphviz DOT pictures of a [`Circuit`], and a reader for the edge list of our own output.
//!
//! One DOT node per component: the readers `a1.h2<q>`, `<k>`, `<v>` and the writer `a1.h2` are
//! drawn as one box `a1.h2`, and the head input an edge enters is shown by its colour, as in
//! ACDC's pictures: **q green, k blue, v red**; edges into MLPs and `logits` are black. Edges
//! with a negative score are dashed; with scores, pen width grows with |score| (0.5 to 5 points,
//! relative to the largest |score| in the circuit), so the strong paths stand out.
//!
//! Nodes are ranked by depth (`rank=same` groups, `rankdir=BT`: `input` at the bottom,
//! `logits` at the top, like a residual-stream diagram). A layer's heads share a rank and its
//! MLP gets the next one, because with sequential blocks the heads of a layer feed its MLP and
//! an edge inside a rank would be drawn sideways.
//!
//! Each edge carries its full name in `tooltip` (shown on hover in SVG output), which is how
//! [`parse_dot_edges`] recovers the q/k/v letter that the shared head node hides. Rendering
//! needs a Graphviz install; the HTML report draws its own SVG and does not.

use std::fmt::Write;
use std::path::PathBuf;

use super::select::reader_node;
use super::{Circuit, Graph, Qkv, Reader, Scores, Writer};
use crate::{Error, Result};

/// The colour of an edge into reader `r`: the ACDC convention for q/k/v, black otherwise.
fn edge_colour(graph: &Graph, r: usize) -> &'static str {
    match graph.reader(r) {
        Reader::Head { qkv: Qkv::Q, .. } => "#2ca02c",
        Reader::Head { qkv: Qkv::K, .. } => "#1f77b4",
        Reader::Head { qkv: Qkv::V, .. } => "#d62728",
        Reader::Mlp { .. } | Reader::Logits => "#000000",
    }
}

/// The DOT node an edge into reader `r` points at: the head or MLP, or `logits`.
fn target_name(graph: &Graph, r: usize) -> String {
    match reader_node(graph, r) {
        Some(node) => graph.writer_name(node),
        None => "logits".to_string(),
    }
}

/// A Graphviz DOT picture of `circuit`. With `scores`, pen widths follow |score| and negative
/// edges are dashed; without, every edge is drawn alike.
pub fn to_dot(circuit: &Circuit, scores: Option<&Scores>) -> String {
    let graph = circuit.graph;
    let edges: Vec<(usize, usize)> = graph
        .edges()
        .filter(|&(w, r)| circuit.contains(w, r))
        .collect();
    let score = |w: usize, r: usize| scores.map(|s| s.get(w, r)).unwrap_or(0.0);
    let max = edges
        .iter()
        .map(|&(w, r)| score(w, r).abs())
        .filter(|s| s.is_finite())
        .fold(0.0f32, f32::max);

    let nodes = circuit.nodes();
    let present = |name: &str| nodes.iter().any(|n| n == name);
    let mut out = String::new();
    out.push_str("digraph circuit {\n");
    out.push_str("  // written by eap; edge colours: q green, k blue, v red\n");
    out.push_str("  rankdir=BT;\n");
    out.push_str("  node [shape=box, style=\"filled,rounded\", fontname=\"Helvetica\"];\n");

    // Rank groups in forward order: input, per layer the heads then the MLP, logits.
    let mut groups: Vec<(Vec<String>, &str)> = vec![(vec!["input".to_string()], "#dddddd")];
    for layer in 0..graph.n_layers {
        let heads = (0..graph.n_heads)
            .map(|head| graph.writer_name(graph.writer_index(Writer::Head { layer, head })))
            .collect();
        groups.push((heads, "#cfe2f3"));
        if graph.has_mlp {
            groups.push((vec![format!("m{layer}")], "#fce5cd"));
        }
    }
    groups.push((vec!["logits".to_string()], "#dddddd"));
    for (names, fill) in groups {
        let here: Vec<&String> = names.iter().filter(|n| present(n)).collect();
        if here.is_empty() {
            continue;
        }
        out.push_str("  { rank=same;");
        for name in here {
            let _ = write!(out, " \"{name}\" [fillcolor=\"{fill}\"];");
        }
        out.push_str(" }\n");
    }

    for &(w, r) in &edges {
        let s = score(w, r);
        let penwidth = match scores {
            Some(_) if max > 0.0 && s.is_finite() => 0.5 + 4.5 * s.abs() / max,
            _ => 1.0,
        };
        let _ = write!(
            out,
            "  \"{}\" -> \"{}\" [tooltip=\"{}\", color=\"{}\", penwidth={penwidth:.2}",
            graph.writer_name(w),
            target_name(&graph, r),
            graph.edge_name(w, r),
            edge_colour(&graph, r),
        );
        if s < 0.0 {
            out.push_str(", style=dashed");
        }
        out.push_str("];\n");
    }
    out.push_str("}\n");
    out
}

/// The edge names (`input->a0.h1<q>`) of a DOT file written by [`to_dot`], in file order.
///
/// Reads one edge statement per line, `"W" -> "N" [attributes];`. The name comes from the
/// `tooltip` attribute and must agree with the endpoints; without a tooltip it is `W->N`.
/// Other lines (graph attributes, node statements, rank groups, comments) are skipped. Names
/// are not checked against a model; [`parse_dot`] does that.
pub fn parse_dot_edges(text: &str) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let err = |message: String| Error::Parse {
            path: PathBuf::from("<dot>"),
            line: Some(i + 1),
            message,
        };
        let line = line.trim();
        if !line.starts_with('"') {
            continue;
        }
        let (from, rest) = quoted(line).ok_or_else(|| err("unterminated string".into()))?;
        let rest = rest.trim_start();
        let Some(rest) = rest.strip_prefix("->") else {
            continue; // a node statement
        };
        let (to, rest) = quoted(rest.trim_start())
            .ok_or_else(|| err(format!("edge from `{from}` has no quoted target")))?;
        let attrs = attributes(rest.trim_start()).map_err(err)?;
        let name = match attrs.iter().find(|(k, _)| k == "tooltip") {
            None => format!("{from}->{to}"),
            Some((_, name)) => {
                let reader = name
                    .strip_prefix(&format!("{from}->"))
                    .ok_or_else(|| err(format!("tooltip `{name}` does not start at `{from}`")))?;
                let ends_at_target = reader == to
                    || reader
                        .strip_prefix(to.as_str())
                        .is_some_and(|s| matches!(s, "<q>" | "<k>" | "<v>"));
                if !ends_at_target {
                    return Err(err(format!("tooltip `{name}` does not end at `{to}`")));
                }
                name.clone()
            }
        };
        names.push(name);
    }
    Ok(names)
}

/// Reads a DOT file written by [`to_dot`] back into a circuit over `graph`, checking every
/// edge name.
pub fn parse_dot(graph: &Graph, text: &str) -> Result<Circuit> {
    let mut circuit = Circuit::empty(*graph);
    for name in parse_dot_edges(text)? {
        let (w, r) = graph.parse_edge(&name)?;
        circuit.set(w, r, true);
    }
    Ok(circuit)
}

/// Splits `"text" rest` into the unescaped text and the rest; `None` when unterminated.
fn quoted(s: &str) -> Option<(String, &str)> {
    let body = s.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &body[i + 1..])),
            '\\' => out.push(chars.next()?.1),
            c => out.push(c),
        }
    }
    None
}

/// Parses an optional `[k=v, k="v", …]` list followed by an optional `;`.
fn attributes(s: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let s = s.trim_end().trim_end_matches(';').trim_end();
    if s.is_empty() {
        return Ok(out);
    }
    let mut rest = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or_else(|| format!("expected an attribute list, found `{s}`"))?
        .trim();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once('=')
            .ok_or_else(|| format!("attribute without `=` in `{rest}`"))?;
        let after = after.trim_start();
        let (value, after) = if after.starts_with('"') {
            quoted(after).ok_or_else(|| "unterminated attribute value".to_string())?
        } else {
            let end = after.find([',', ';', ' ']).unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        out.push((key.trim().to_string(), value));
        rest = after
            .trim_start()
            .trim_start_matches([',', ';'])
            .trim_start();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn circuit_from(graph: Graph, names: &[&str]) -> Circuit {
        let mut c = Circuit::empty(graph);
        for name in names {
            let (w, r) = graph.parse_edge(name).unwrap();
            c.set(w, r, true);
        }
        c
    }

    #[test]
    fn round_trips_edge_sets() {
        let graph = Graph::new(3, 2, true);
        let mut scores = Scores::zeros(graph);
        for (i, v) in scores.values.iter_mut().enumerate() {
            *v = ((i as f32) * 0.7).sin();
        }
        for n in [0, 1, 12, 60, graph.n_edges()] {
            let c = Circuit::top_n(&scores, n);
            for s in [Some(&scores), None] {
                let text = to_dot(&c, s);
                assert_eq!(parse_dot_edges(&text).unwrap(), c.edge_names());
                assert_eq!(parse_dot(&graph, &text).unwrap(), c);
            }
        }
    }

    #[test]
    fn draws_heads_once_and_colours_qkv() {
        let g = Graph::new(2, 1, true);
        let c = circuit_from(
            g,
            &[
                "input->a0.h0<q>",
                "input->a0.h0<v>",
                "a0.h0->a1.h0<k>",
                "a1.h0->m1",
                "m1->logits",
            ],
        );
        let mut s = Scores::zeros(g);
        let nr = g.n_readers();
        let (w, r) = g.parse_edge("a1.h0->m1").unwrap();
        s.values[w * nr + r] = -2.0;
        let (w, r) = g.parse_edge("m1->logits").unwrap();
        s.values[w * nr + r] = 1.0;
        let dot = to_dot(&c, Some(&s));
        assert!(dot.starts_with("digraph circuit {\n"));
        assert!(
            dot.contains("\"input\" -> \"a0.h0\" [tooltip=\"input->a0.h0<q>\", color=\"#2ca02c\"")
        );
        assert!(
            dot.contains("\"input\" -> \"a0.h0\" [tooltip=\"input->a0.h0<v>\", color=\"#d62728\"")
        );
        assert!(
            dot.contains("\"a0.h0\" -> \"a1.h0\" [tooltip=\"a0.h0->a1.h0<k>\", color=\"#1f77b4\"")
        );
        assert!(dot.contains("\"a1.h0\" -> \"m1\" [tooltip=\"a1.h0->m1\", color=\"#000000\", penwidth=5.00, style=dashed];"));
        assert!(dot.contains(
            "\"m1\" -> \"logits\" [tooltip=\"m1->logits\", color=\"#000000\", penwidth=2.75];"
        ));
        // One rank group per present component; m0 is absent.
        assert_eq!(dot.matches("rank=same").count(), 5);
        assert!(!dot.contains("\"m0\""));
    }

    #[test]
    fn parser_reports_bad_lines() {
        let e = parse_dot_edges("digraph {\n  \"a0.h0\" -> ;\n}").unwrap_err();
        assert!(matches!(e, Error::Parse { line: Some(2), .. }), "{e}");
        let e = parse_dot_edges("\"input\" -> \"a0.h0\" [tooltip=\"m0->a0.h0<q>\"];").unwrap_err();
        assert!(e.to_string().contains("does not start"), "{e}");
        let e =
            parse_dot_edges("\"input\" -> \"a0.h0\" [tooltip=\"input->a1.h0<q>\"];").unwrap_err();
        assert!(e.to_string().contains("does not end"), "{e}");
        // Without tooltips the endpoints name the edge; node statements are skipped.
        let text = "digraph {\n \"m0\" [shape=box];\n \"input\" -> \"m0\";\n \"m0\" -> \"logits\" [color=red]\n}";
        assert_eq!(parse_dot_edges(text).unwrap(), ["input->m0", "m0->logits"]);
        // parse_dot checks names against the model.
        let e = parse_dot(&Graph::new(1, 1, false), text).unwrap_err();
        assert!(e.to_string().contains("m0"), "{e}");
    }
}
