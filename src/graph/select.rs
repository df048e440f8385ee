//! Turning [`Scores`] into a [`Circuit`]: top-n, threshold and greedy selection, then pruning.
//!
//! Each selector reads the scores and returns a new circuit; nothing is mutated, so one score
//! matrix can feed a whole sweep of circuit sizes (ROC, faithfulness curves, DESIGN §6).
//!
//! The rules follow EAP-IG (`hannamw/EAP-IG`, `src/eap/graph.py`: `apply_topn`,
//! `apply_threshold`, `apply_greedy`, `prune`), ranking edges by |score|. EAP-IG prunes after
//! selecting by default; here pruning is a separate step, so `Circuit::top_n(&s, n).prune()` is
//! EAP-IG's `apply_topn(n)` and `Circuit::top_n(&s, n)` its `apply_topn(n, prune=False)`.
//!
//! ## Nodes
//!
//! Edges join writers to readers, but a circuit is a graph of *nodes*: the writer `a1.h2` and the
//! readers `a1.h2<q>`, `a1.h2<k>`, `a1.h2<v>` are one node (the head reads through q/k/v and
//! writes its output), and the writer `m1` and the reader `m1` are one node (EAP-IG's
//! `forward_to_backward`). `input` is only a writer and `logits` only a reader. Pruning and
//! greedy selection reason about these nodes, not about writers and readers separately.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::{Circuit, Graph, Reader, Scores, Writer};
use crate::{Error, Result};

/// The node a reader belongs to, as the writer index of the same component; `None` for
/// `logits`, which writes nothing.
pub(super) fn reader_node(graph: &Graph, reader: usize) -> Option<usize> {
    match graph.reader(reader) {
        Reader::Head { layer, head, .. } => Some(graph.writer_index(Writer::Head { layer, head })),
        Reader::Mlp { layer } => Some(graph.writer_index(Writer::Mlp { layer })),
        Reader::Logits => None,
    }
}

/// The readers of the node that writer `writer` belongs to: three for a head, one for an MLP,
/// none for `input`.
fn node_readers(graph: &Graph, writer: usize) -> Vec<usize> {
    match graph.writer(writer) {
        Writer::Input => Vec::new(),
        Writer::Head { layer, head } => super::Qkv::ALL
            .iter()
            .map(|&qkv| graph.reader_index(Reader::Head { layer, head, qkv }))
            .collect(),
        Writer::Mlp { layer } => vec![graph.reader_index(Reader::Mlp { layer })],
    }
}

/// Ranking key of one score: |score|, with NaN below every real number so that a broken score
/// is chosen last rather than first. (Scores are checked for finiteness when files are read;
/// this only keeps selection total and panic-free.)
fn magnitude(score: f32) -> f32 {
    if score.is_nan() {
        f32::NEG_INFINITY
    } else {
        score.abs()
    }
}

/// Orders flat indices best first: larger key, then the smaller row-major index, so that ties
/// (common with zero scores) are broken the same way on every run and platform. `key` is |score| ([`magnitude`]) or the signed score ([`signed`]: MIB's CPR selection).
fn rank_by(key: fn(f32) -> f32, values: &[f32], a: usize, b: usize) -> Ordering {
    key(values[b]).total_cmp(&key(values[a])).then(a.cmp(&b))
}

/// The signed score, NaN last: MIB's CPR selects by it (`apply_topn(n, absolute=False)`).
fn signed(score: f32) -> f32 {
    if score.is_nan() {
        f32::NEG_INFINITY
    } else {
        score
    }
}

/// One candidate in the greedy frontier; `BinaryHeap` is a max-heap, so the "greatest"
/// candidate is the one [`rank`] puts first.
struct Candidate {
    magnitude: f32,
    flat: usize,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.magnitude
            .total_cmp(&other.magnitude)
            .then(other.flat.cmp(&self.flat))
    }
}

/// How a circuit is chosen from scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Selection {
    /// The `n` edges of largest |score| ([`Circuit::top_n`]).
    TopN(usize),
    /// The edges with |score| ≥ the threshold ([`Circuit::threshold`]).
    Threshold(f32),
    /// `n` edges grown greedily from the logits ([`Circuit::greedy`]).
    Greedy(usize),
}

impl Circuit {
    /// The circuit `selection` chooses from `scores`, pruned ([`Circuit::prune`]) when `prune`;
    /// an error when it holds no edge.
    pub fn select(scores: &Scores, selection: Selection, prune: bool) -> Result<Circuit> {
        Ok(Self::select_counting(scores, selection, prune)?.0)
    }

    /// [`Circuit::select`], and how many of the selected edges pruning removed (so `eap
    /// circuit --top-n 20` can say why it kept fewer than 20).
    pub fn select_counting(
        scores: &Scores,
        selection: Selection,
        prune: bool,
    ) -> Result<(Circuit, usize)> {
        let circuit = match selection {
            Selection::TopN(n) => Circuit::top_n(scores, n),
            Selection::Threshold(t) => Circuit::threshold(scores, t),
            Selection::Greedy(n) => Circuit::greedy(scores, n),
        };
        let selected = circuit.n_edges();
        let circuit = if prune { circuit.prune() } else { circuit };
        if circuit.n_edges() == 0 {
            return Err(Error::EmptySelection);
        }
        let removed = selected - circuit.n_edges();
        Ok((circuit, removed))
    }

    /// The `n` real edges with the largest |score| (EAP-IG's `apply_topn(n, prune=False)`).
    ///
    /// Ties are broken by the smaller row-major index `writer * n_readers + reader`. When `n`
    /// exceeds the number of edges every edge is taken (EAP-IG asserts instead; a sweep up to
    /// "all edges" is a common request and not an error).
    pub fn top_n(scores: &Scores, n: usize) -> Circuit {
        Self::top_n_by(scores, n, magnitude)
    }

    /// The `n` real edges with the largest *signed* score (EAP-IG's `apply_topn(n,
    /// absolute=False, prune=False)`; MIB's CPR), ties as in [`Circuit::top_n`].
    pub fn top_n_signed(scores: &Scores, n: usize) -> Circuit {
        Self::top_n_by(scores, n, signed)
    }

    fn top_n_by(scores: &Scores, n: usize, key: fn(f32) -> f32) -> Circuit {
        let graph = scores.graph;
        let nr = graph.n_readers();
        let mut circuit = Circuit::empty(graph);
        let mut flat: Vec<usize> = graph.edges().map(|(w, r)| w * nr + r).collect();
        if n < flat.len() {
            if n == 0 {
                return circuit;
            }
            // Partitioning is O(edges); only the chosen `n` matter, not their order.
            flat.select_nth_unstable_by(n - 1, |&a, &b| rank_by(key, &scores.values, a, b));
            flat.truncate(n);
        }
        for i in flat {
            circuit.edges[i] = true;
        }
        circuit
    }

    /// The real edges with |score| ≥ `t` (EAP-IG's `apply_threshold(t, prune=False)`).
    /// NaN scores never pass.
    pub fn threshold(scores: &Scores, t: f32) -> Circuit {
        let graph = scores.graph;
        let mut circuit = Circuit::empty(graph);
        for (w, r) in graph.edges() {
            if scores.get(w, r).abs() >= t {
                circuit.set(w, r, true);
            }
        }
        circuit
    }

    /// EAP-IG's greedy selection (`apply_greedy(n, prune=False)`): grow the circuit from
    /// `logits` upwards, each step adding the highest-|score| edge whose reader's node is
    /// already in the circuit, and bringing that edge's writer node in.
    ///
    /// Unlike [`Circuit::top_n`], every chosen edge leads to `logits`, so no edge is wasted on
    /// a component whose output is never read (the "dangling nodes" peers complain about).
    /// Writers may still lack inputs; [`Circuit::prune`] removes those. Ties are broken as in
    /// `top_n`; `n` larger than the number of edges takes every edge.
    pub fn greedy(scores: &Scores, n: usize) -> Circuit {
        let graph = scores.graph;
        let nr = graph.n_readers();
        let mut circuit = Circuit::empty(graph);
        let mut node_in = vec![false; graph.n_writers()];
        let mut frontier = BinaryHeap::new();
        let push_into = |frontier: &mut BinaryHeap<Candidate>, reader: usize| {
            for w in 0..graph.n_upstream(reader) {
                let flat = w * nr + reader;
                frontier.push(Candidate {
                    magnitude: magnitude(scores.values[flat]),
                    flat,
                });
            }
        };
        push_into(&mut frontier, nr - 1);
        // Each node's readers enter the frontier once (when the node joins), so every edge is
        // pushed at most once and the loop ends when the frontier is empty.
        for _ in 0..n {
            let Some(Candidate { flat, .. }) = frontier.pop() else {
                break;
            };
            circuit.edges[flat] = true;
            let w = flat / nr;
            if !node_in[w] {
                node_in[w] = true;
                for r in node_readers(&graph, w) {
                    push_into(&mut frontier, r);
                }
            }
        }
        circuit
    }

    /// Removes edges that cannot carry signal from `input` to `logits`, to a fixed point, as
    /// EAP-IG's `prune`.
    ///
    /// A node stays when it has an outgoing edge and an incoming edge (`input` needs no
    /// incoming edge; `logits` needs no outgoing one); an edge stays when both its writer's
    /// and its reader's nodes stay (see the module docs for node identity: `a1.h2<q>` belongs
    /// to node `a1.h2`). Removing edges can strand further nodes, so this repeats until
    /// nothing changes, at most about twice the number of layers.
    ///
    /// The result is connected: every remaining edge lies on a path from `input` to `logits`
    /// within the circuit, because each writer node has an incoming edge and each reader's
    /// node has an outgoing one, and indices strictly increase along edges.
    pub fn prune(&self) -> Circuit {
        let graph = self.graph;
        let (nw, nr) = (graph.n_writers(), graph.n_readers());
        let reader_nodes: Vec<Option<usize>> = (0..nr).map(|r| reader_node(&graph, r)).collect();
        let writer_readers: Vec<Vec<usize>> = (0..nw).map(|w| node_readers(&graph, w)).collect();
        let mut out = self.clone();
        loop {
            let mut has_out = vec![false; nw];
            let mut reader_has_in = vec![false; nr];
            for (w, row) in out.edges.chunks(nr).enumerate() {
                for (r, &on) in row.iter().enumerate() {
                    if on {
                        has_out[w] = true;
                        reader_has_in[r] = true;
                    }
                }
            }
            let node_in: Vec<bool> = (0..nw)
                .map(|w| {
                    has_out[w] && (w == 0 || writer_readers[w].iter().any(|&r| reader_has_in[r]))
                })
                .collect();
            let mut changed = false;
            for (w, row) in out.edges.chunks_mut(nr).enumerate() {
                for (r, on) in row.iter_mut().enumerate() {
                    if *on && !(node_in[w] && reader_nodes[r].is_none_or(|node| node_in[node])) {
                        *on = false;
                        changed = true;
                    }
                }
            }
            if !changed {
                return out;
            }
        }
    }

    /// Names of the nodes the circuit touches, in forward order (`input`, then per layer the
    /// heads and the MLP, then `logits`): a node is present when some circuit edge starts or
    /// ends at it. After [`Circuit::prune`] these are exactly EAP-IG's in-graph nodes.
    pub fn nodes(&self) -> Vec<String> {
        let graph = self.graph;
        let (nw, nr) = (graph.n_writers(), graph.n_readers());
        let mut present = vec![false; nw];
        let mut logits = false;
        for (w, row) in self.edges.chunks(nr).enumerate() {
            for (r, _) in row.iter().enumerate().filter(|(_, &on)| on) {
                present[w] = true;
                match reader_node(&graph, r) {
                    Some(node) => present[node] = true,
                    None => logits = true,
                }
            }
        }
        let mut names: Vec<String> = (0..nw)
            .filter(|&w| present[w])
            .map(|w| graph.writer_name(w))
            .collect();
        if logits {
            names.push("logits".to_string());
        }
        names
    }

    /// Names of the circuit's edges, in [`Graph::edges`] order.
    pub fn edge_names(&self) -> Vec<String> {
        self.graph
            .edges()
            .filter(|&(w, r)| self.contains(w, r))
            .map(|(w, r)| self.graph.edge_name(w, r))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Qkv;

    /// One layer, one head, with an MLP: writers `input, a0.h0, m0`; readers
    /// `a0.h0<q>, a0.h0<k>, a0.h0<v>, m0, logits`; 8 edges.
    fn tiny() -> Graph {
        Graph::new(1, 1, true)
    }

    fn scores_from(graph: Graph, named: &[(&str, f32)]) -> Scores {
        let mut s = Scores::zeros(graph);
        let nr = graph.n_readers();
        for &(name, v) in named {
            let (w, r) = graph.parse_edge(name).unwrap();
            s.values[w * nr + r] = v;
        }
        s
    }

    fn circuit_from(graph: Graph, names: &[&str]) -> Circuit {
        let mut c = Circuit::empty(graph);
        for name in names {
            let (w, r) = graph.parse_edge(name).unwrap();
            c.set(w, r, true);
        }
        c
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    fn names(v: &[&str]) -> Vec<String> {
        sorted(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn tiny_graph_shape() {
        assert_eq!(tiny().n_edges(), 8);
    }

    #[test]
    fn top_n_takes_largest_magnitudes() {
        let g = tiny();
        let s = scores_from(
            g,
            &[
                ("input->a0.h0<q>", 0.1),
                ("input->a0.h0<v>", -3.0),
                ("a0.h0->m0", 2.0),
                ("m0->logits", 0.5),
                ("input->logits", -0.4),
            ],
        );
        assert_eq!(
            sorted(Circuit::top_n(&s, 2).edge_names()),
            names(&["input->a0.h0<v>", "a0.h0->m0"])
        );
        assert_eq!(
            sorted(Circuit::top_n(&s, 3).edge_names()),
            names(&["input->a0.h0<v>", "a0.h0->m0", "m0->logits"])
        );
        assert_eq!(Circuit::top_n(&s, 0).n_edges(), 0);
        assert_eq!(Circuit::top_n(&s, 100), Circuit::full(g));
    }

    #[test]
    fn top_n_breaks_ties_by_row_major_index() {
        let g = tiny();
        // All zero: the first edges in row-major order win. Row 0 (`input`) has its readers in
        // order q, k, v, m0, logits.
        let s = Scores::zeros(g);
        assert_eq!(
            Circuit::top_n(&s, 2).edge_names(),
            vec!["input->a0.h0<q>".to_string(), "input->a0.h0<k>".to_string()]
        );
        let s = scores_from(
            g,
            &[("m0->logits", 1.0), ("input->m0", -1.0), ("a0.h0->m0", 1.0)],
        );
        // `input->m0` (index 3) beats `a0.h0->m0` (index 8), which beats `m0->logits` (14).
        assert_eq!(
            sorted(Circuit::top_n(&s, 2).edge_names()),
            names(&["input->m0", "a0.h0->m0"])
        );
    }

    #[test]
    fn top_n_puts_nan_last() {
        let g = tiny();
        let s = scores_from(g, &[("input->logits", f32::NAN), ("m0->logits", 0.1)]);
        assert_eq!(
            Circuit::top_n(&s, 1).edge_names(),
            vec!["m0->logits".to_string()]
        );
    }

    #[test]
    fn threshold_is_inclusive_on_magnitude() {
        let g = tiny();
        let s = scores_from(
            g,
            &[
                ("input->a0.h0<k>", -0.5),
                ("a0.h0->logits", 0.5),
                ("m0->logits", 0.49),
            ],
        );
        assert_eq!(
            sorted(Circuit::threshold(&s, 0.5).edge_names()),
            names(&["input->a0.h0<k>", "a0.h0->logits"])
        );
        assert_eq!(Circuit::threshold(&s, 0.0), Circuit::full(g));
    }

    #[test]
    fn greedy_grows_from_logits() {
        let g = tiny();
        // `input->a0.h0<q>` is the largest score but a0.h0 is not reachable until an edge out
        // of it is chosen; greedy must first take `a0.h0->logits`.
        let s = scores_from(
            g,
            &[
                ("input->a0.h0<q>", 10.0),
                ("a0.h0->logits", 1.0),
                ("input->logits", 0.5),
                ("m0->logits", 0.2),
                ("input->m0", 5.0),
            ],
        );
        assert_eq!(
            Circuit::greedy(&s, 1).edge_names(),
            vec!["a0.h0->logits".to_string()]
        );
        assert_eq!(
            sorted(Circuit::greedy(&s, 2).edge_names()),
            names(&["a0.h0->logits", "input->a0.h0<q>"])
        );
        // Next: `input->logits` (0.5) beats `m0->logits` (0.2); `input->m0` (5.0) only becomes
        // a candidate once m0 is in.
        assert_eq!(
            sorted(Circuit::greedy(&s, 3).edge_names()),
            names(&["a0.h0->logits", "input->a0.h0<q>", "input->logits"])
        );
        assert_eq!(
            sorted(Circuit::greedy(&s, 5).edge_names()),
            names(&[
                "a0.h0->logits",
                "input->a0.h0<q>",
                "input->logits",
                "m0->logits",
                "input->m0"
            ])
        );
        assert_eq!(Circuit::greedy(&s, 1000), Circuit::full(g));
        assert_eq!(Circuit::greedy(&s, 0).n_edges(), 0);
    }

    #[test]
    fn greedy_circuit_reaches_logits() {
        let g = Graph::new(3, 2, true);
        let mut s = Scores::zeros(g);
        // Deterministic pseudo-random scores.
        let mut x = 12345u32;
        for v in s.values.iter_mut() {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *v = (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
        }
        for n in [1, 5, 20, 60] {
            let c = Circuit::greedy(&s, n);
            assert_eq!(c.n_edges(), n);
            // Every edge's reader node has an outgoing edge (or is logits).
            let nr = g.n_readers();
            for (_, r) in g.edges().filter(|&(w, r)| c.contains(w, r)) {
                if let Some(node) = reader_node(&g, r) {
                    assert!(
                        (0..nr).any(|r2| c.contains(node, r2)),
                        "dangling reader in greedy circuit"
                    );
                }
            }
        }
    }

    #[test]
    fn prune_drops_writers_without_inputs_and_readers_without_outputs() {
        let g = tiny();
        // a0.h0 has no incoming edge, so `a0.h0->logits` goes; `input->m0` reaches m0, which
        // writes nowhere, so it goes; `input->logits` stays.
        let c = circuit_from(g, &["a0.h0->logits", "input->m0", "input->logits"]);
        assert_eq!(c.prune().edge_names(), vec!["input->logits".to_string()]);
        // Head fed through its value input and read by the MLP, which feeds logits: all stay.
        let c = circuit_from(g, &["input->a0.h0<v>", "a0.h0->m0", "m0->logits"]);
        assert_eq!(c.prune(), c);
    }

    #[test]
    fn prune_cascades_to_a_fixed_point() {
        // Two layers, one head, attention only: input, a0.h0, a1.h0 → logits.
        let g = Graph::new(2, 1, false);
        // a1.h0 reads from a0.h0 which has no input: removing a0.h0 strands a1.h0 next round.
        let c = circuit_from(g, &["a0.h0->a1.h0<k>", "a1.h0->logits", "input->logits"]);
        let p = c.prune();
        assert_eq!(p.edge_names(), vec!["input->logits".to_string()]);
        assert_eq!(p.prune(), p, "pruning is idempotent");
        // The other direction: a0.h0 feeds only a1.h0, which writes nowhere.
        let c = circuit_from(g, &["input->a0.h0<q>", "a0.h0->a1.h0<q>"]);
        assert_eq!(c.prune().n_edges(), 0);
    }

    #[test]
    fn prune_leaves_a_connected_circuit() {
        let g = Graph::new(3, 2, true);
        let mut s = Scores::zeros(g);
        let mut x = 99u32;
        for v in s.values.iter_mut() {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *v = (x >> 8) as f32 / (1u32 << 24) as f32;
        }
        let nr = g.n_readers();
        for n in [3, 10, 40, 100] {
            let p = Circuit::top_n(&s, n).prune();
            assert_eq!(p.prune(), p);
            for (w, r) in g.edges().filter(|&(w, r)| p.contains(w, r)) {
                // The writer has an input (or is `input`).
                if w != 0 {
                    let has_in = node_readers(&g, w)
                        .iter()
                        .any(|&r2| (0..g.n_writers()).any(|w2| p.contains(w2, r2)));
                    assert!(has_in, "writer {} has no input", g.writer_name(w));
                }
                // The reader's node writes somewhere (or is `logits`).
                if let Some(node) = reader_node(&g, r) {
                    assert!(
                        (0..nr).any(|r2| p.contains(node, r2)),
                        "reader {} leads nowhere",
                        g.reader_name(r)
                    );
                }
            }
        }
    }

    #[test]
    fn nodes_identify_heads_across_qkv() {
        let g = tiny();
        let c = circuit_from(g, &["input->a0.h0<k>", "a0.h0->logits"]);
        assert_eq!(c.nodes(), vec!["input", "a0.h0", "logits"]);
        let c = circuit_from(g, &["input->m0"]);
        assert_eq!(c.nodes(), vec!["input", "m0"]);
        assert!(Circuit::empty(g).nodes().is_empty());
        let reader = g.reader_index(Reader::Head {
            layer: 0,
            head: 0,
            qkv: Qkv::V,
        });
        assert_eq!(reader_node(&g, reader), Some(1));
    }
}
