//! The human-found circuits that ROC curves are scored against, as edge lists in
//! `data/circuits/*.txt` (compiled in). They are ACDC's encodings of the papers' circuits,
//! translated to `eap`'s edge names by `data/circuits/translate_acdc.py`; `docs/tasks.md`
//! explains the translation.

use crate::graph::{Circuit, Graph};
use crate::{Error, Result};

const IOI: &str = include_str!("../../data/circuits/ioi.txt");
const GREATER_THAN: &str = include_str!("../../data/circuits/greater_than.txt");
const DOCSTRING: &str = include_str!("../../data/circuits/docstring.txt");

/// Names accepted by [`canonical_circuit`].
pub const CANONICAL_CIRCUITS: [&str; 3] = ["ioi", "greater-than", "docstring"];

fn lookup(name: &str) -> Result<(&'static str, Graph)> {
    match name {
        "ioi" => Ok((IOI, Graph::new(12, 12, true))),
        "greater-than" | "greater_than" => Ok((GREATER_THAN, Graph::new(12, 12, true))),
        "docstring" => Ok((DOCSTRING, Graph::new(4, 8, false))),
        _ => Err(Error::invalid(format!(
            "no canonical circuit `{name}` (known: ioi, greater-than, docstring)"
        ))),
    }
}

/// The graph a canonical circuit lives in: GPT-2 small (`Graph::new(12, 12, true)`) for ioi and
/// greater-than, the 4-layer 8-head attention-only model for docstring.
pub fn canonical_graph(name: &str) -> Result<Graph> {
    Ok(lookup(name)?.1)
}

/// The edges `(writer index, reader index)` of a canonical circuit (`ioi`, `greater-than`,
/// `docstring`), in file order, checked against [`canonical_graph`].
pub fn canonical_circuit(name: &str) -> Result<Vec<(usize, usize)>> {
    let (text, graph) = lookup(name)?;
    parse_edge_list(text, &graph, name)
}

/// A canonical circuit as a mask over its graph.
pub fn canonical_circuit_mask(name: &str) -> Result<Circuit> {
    let graph = canonical_graph(name)?;
    let mut c = Circuit::empty(graph);
    for (w, r) in canonical_circuit(name)? {
        c.set(w, r, true);
    }
    Ok(c)
}

/// Parses an edge list: one edge name (`a0.h1->a2.h3<q>`) per line, `#` starts a comment,
/// blank lines are skipped. A repeated edge is an error (it hides a mistake in the list).
pub fn parse_edge_list(
    text: &str,
    graph: &Graph,
    source_name: &str,
) -> Result<Vec<(usize, usize)>> {
    let mut edges = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = |message: String| Error::Example {
            source_name: source_name.to_string(),
            line: i + 1,
            message,
        };
        let e = graph.parse_edge(line).map_err(|e| at(e.to_string()))?;
        if !seen.insert(e) {
            return Err(at(format!("edge `{line}` is listed twice")));
        }
        edges.push(e);
    }
    Ok(edges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_circuits_parse_with_pinned_counts() {
        // counts documented in docs/tasks.md; a change means the translation changed
        for (name, count) in [("ioi", 963), ("greater-than", 235), ("docstring", 24)] {
            let edges = canonical_circuit(name).unwrap();
            assert_eq!(edges.len(), count, "{name}");
            let g = canonical_graph(name).unwrap();
            assert!(edges.iter().all(|&(w, r)| g.is_edge(w, r)));
            assert_eq!(canonical_circuit_mask(name).unwrap().n_edges(), count);
        }
        assert_eq!(canonical_circuit("greater_than").unwrap().len(), 235);
        assert!(canonical_circuit("induction").is_err());
    }

    #[test]
    fn canonical_circuits_contain_the_papers_key_edges() {
        let has = |name: &str, edge: &str| {
            let g = canonical_graph(name).unwrap();
            canonical_circuit(name)
                .unwrap()
                .contains(&g.parse_edge(edge).unwrap())
        };
        // IOI: S-inhibition heads write into the name movers' queries; name movers to logits
        assert!(has("ioi", "a8.h6->a9.h9<q>"));
        assert!(has("ioi", "a9.h9->logits"));
        assert!(has("ioi", "a5.h5->a7.h3<k>"));
        assert!(
            !has("ioi", "a5.h5->a7.h3<q>"),
            "induction feeds S-inhibition keys and values only"
        );
        assert!(!has("ioi", "a9.h9->a10.h0<q>"));
        // Greater-Than: the AMID heads and late MLPs produce the output
        assert!(has("greater-than", "a9.h1->logits"));
        assert!(has("greater-than", "m3->a9.h1<v>"));
        assert!(has("greater-than", "a8.h11->m8"));
        assert!(!has("greater-than", "a5.h5->m5"));
        // Docstring: 3.0 and 3.6 write to the logits
        assert!(has("docstring", "a3.h0->logits"));
        assert!(has("docstring", "a3.h6->logits"));
        assert!(has("docstring", "a1.h2->a3.h6<k>"));
    }

    #[test]
    fn edge_list_errors_name_the_line() {
        let g = Graph::new(2, 2, true);
        let e = parse_edge_list("# c\ninput->m0\nm1->a0.h0<q>\n", &g, "x.txt")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.txt") && e.contains("3"), "{e}");
        let e = parse_edge_list("input->m0\ninput->m0 # again\n", &g, "x.txt")
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
        assert_eq!(
            parse_edge_list("input->m0 # c\n\nm1->logits", &g, "x")
                .unwrap()
                .len(),
            2
        );
    }
}
