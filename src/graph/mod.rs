//! The computational graph of DESIGN §2: writers (upstream nodes), readers (downstream nodes)
//! and the edges between them, named as EAP-IG, auto-circuit and the MIB benchmark name them.
//!
//! [`Graph`] is small and closed-form: every index follows from `n_layers`, `n_heads` and whether
//! the model has MLPs. Scores live in a separate dense `[n_writers, n_readers]` matrix
//! ([`Scores`]) and a circuit is a mask over the same matrix.
//!
//! Writer order: `input`, then per layer `a{L}.h0 … a{L}.h{H-1}`, then `m{L}`.
//! Reader order: per layer `a{L}.h{h}<q>` for all heads, then `<k>`, then `<v>`, then `m{L}`;
//! finally `logits`. These are EAP-IG's forward and backward indices.
//!
//! Because writers are ordered by when they are written and readers by when they read, the
//! writers feeding a reader are always a prefix of the writer list: [`Graph::n_upstream`].
//!
//! Also here: [`visit_order`], the order ACDC visits readers in (a property of the graph);
//! [`Graph::expect`], the one check that a circuit, scores or ground truth belongs to a model;
//! [`Selection`] of circuits from scores (`select`), and the file formats (`json`, `dot`).

use crate::error::GraphShape;
use crate::{Error, Result};

pub mod dot;
pub mod json;
mod matrix;
pub mod select;

pub use dot::{parse_dot, parse_dot_edges, to_dot};
pub use json::{CircuitFile, MissingEdges, ScoresRead};
pub use select::Selection;

/// Which of a head's three inputs a reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qkv {
    Q = 0,
    K = 1,
    V = 2,
}

impl Qkv {
    pub const ALL: [Qkv; 3] = [Qkv::Q, Qkv::K, Qkv::V];

    pub fn letter(self) -> char {
        match self {
            Qkv::Q => 'q',
            Qkv::K => 'k',
            Qkv::V => 'v',
        }
    }
}

/// An upstream node: something that writes into the residual stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Writer {
    /// The embedding (token, plus learned positions when they enter the residual stream).
    Input,
    /// Head `head` of layer `layer`: `z_h @ W_O[h]`, without `b_O`.
    Head { layer: usize, head: usize },
    /// The MLP of layer `layer`, without its output bias.
    Mlp { layer: usize },
}

/// A downstream node: something that reads the residual stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reader {
    /// The query, key or value input of one head (before that head's LayerNorm).
    Head { layer: usize, head: usize, qkv: Qkv },
    /// The MLP input of layer `layer` (before its LayerNorm).
    Mlp { layer: usize },
    /// The residual stream before the final norm.
    Logits,
}

/// The edge graph of one model shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Graph {
    pub n_layers: usize,
    pub n_heads: usize,
    /// False for attention-only models, which have no MLP nodes.
    pub has_mlp: bool,
    /// Attention and MLP read the same residual stream (GPT-NeoX, EAP-IG's
    /// `cfg.parallel_attn_mlp`): the MLP of layer L does not read layer L's heads. Left out of
    /// serialised graphs when false, so sequential graphs serialise as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub parallel_attn_mlp: bool,
}

impl Graph {
    pub fn new(n_layers: usize, n_heads: usize, has_mlp: bool) -> Self {
        Graph {
            n_layers,
            n_heads,
            has_mlp,
            parallel_attn_mlp: false,
        }
    }

    /// The same graph with parallel attention and MLP (no edge from a layer's heads to its own
    /// MLP); meaningless, and ignored, without MLPs.
    pub fn with_parallel_attn_mlp(mut self, parallel: bool) -> Self {
        self.parallel_attn_mlp = parallel && self.has_mlp;
        self
    }

    /// Layers, heads and MLPs, as errors report them.
    pub fn shape(&self) -> GraphShape {
        GraphShape {
            layers: self.n_layers,
            heads: self.n_heads,
            mlp: self.has_mlp,
            parallel: self.parallel_attn_mlp,
        }
    }

    /// Checks that `found`, the graph of `what` (a circuit, scores, a ground truth), is this
    /// graph: the one check every consumer of a circuit file runs.
    pub fn expect(&self, found: &Graph, what: impl Into<String>) -> Result<()> {
        if found == self {
            return Ok(());
        }
        Err(Error::GraphMismatch {
            what: what.into(),
            expected: self.shape(),
            found: found.shape(),
        })
    }

    /// Writers per layer: the heads, plus the MLP when there is one.
    fn writers_per_layer(&self) -> usize {
        self.n_heads + self.has_mlp as usize
    }

    /// Readers per layer: q, k and v of every head, plus the MLP when there is one.
    pub fn readers_per_layer(&self) -> usize {
        3 * self.n_heads + self.has_mlp as usize
    }

    pub fn n_writers(&self) -> usize {
        1 + self.n_layers * self.writers_per_layer()
    }

    pub fn n_readers(&self) -> usize {
        self.n_layers * self.readers_per_layer() + 1
    }

    /// Index of a writer in `0..n_writers()`.
    pub fn writer_index(&self, w: Writer) -> usize {
        match w {
            Writer::Input => 0,
            Writer::Head { layer, head } => 1 + layer * self.writers_per_layer() + head,
            Writer::Mlp { layer } => 1 + layer * self.writers_per_layer() + self.n_heads,
        }
    }

    /// Index of a reader in `0..n_readers()`.
    pub fn reader_index(&self, r: Reader) -> usize {
        match r {
            Reader::Head { layer, head, qkv } => {
                layer * self.readers_per_layer() + qkv as usize * self.n_heads + head
            }
            Reader::Mlp { layer } => layer * self.readers_per_layer() + 3 * self.n_heads,
            Reader::Logits => self.n_layers * self.readers_per_layer(),
        }
    }

    pub fn writer(&self, index: usize) -> Writer {
        assert!(
            index < self.n_writers(),
            "writer index {index} out of range"
        );
        if index == 0 {
            return Writer::Input;
        }
        let (layer, k) = (
            (index - 1) / self.writers_per_layer(),
            (index - 1) % self.writers_per_layer(),
        );
        if k < self.n_heads {
            Writer::Head { layer, head: k }
        } else {
            Writer::Mlp { layer }
        }
    }

    pub fn reader(&self, index: usize) -> Reader {
        assert!(
            index < self.n_readers(),
            "reader index {index} out of range"
        );
        if index == self.n_readers() - 1 {
            return Reader::Logits;
        }
        let (layer, k) = (
            index / self.readers_per_layer(),
            index % self.readers_per_layer(),
        );
        if k == 3 * self.n_heads {
            Reader::Mlp { layer }
        } else {
            Reader::Head {
                layer,
                head: k % self.n_heads,
                qkv: Qkv::ALL[k / self.n_heads],
            }
        }
    }

    /// How many writers (a prefix of the writer order) feed reader `r`.
    pub fn n_upstream(&self, reader_index: usize) -> usize {
        match self.reader(reader_index) {
            Reader::Head { layer, .. } => 1 + layer * self.writers_per_layer(),
            // In parallel blocks the MLP reads what the layer's heads read.
            Reader::Mlp { layer } if self.parallel_attn_mlp => 1 + layer * self.writers_per_layer(),
            Reader::Mlp { layer } => 1 + layer * self.writers_per_layer() + self.n_heads,
            Reader::Logits => self.n_writers(),
        }
    }

    /// Whether `writer -> reader` is an edge of the model.
    pub fn is_edge(&self, writer_index: usize, reader_index: usize) -> bool {
        writer_index < self.n_upstream(reader_index)
    }

    /// The number of real edges.
    pub fn n_edges(&self) -> usize {
        (0..self.n_readers()).map(|r| self.n_upstream(r)).sum()
    }

    /// Row-major `[n_writers, n_readers]` mask of real edges, as EAP-IG's `real_edge_mask`.
    pub fn real_edge_mask(&self) -> Vec<bool> {
        let (nw, nr) = (self.n_writers(), self.n_readers());
        let mut mask = vec![false; nw * nr];
        for r in 0..nr {
            for w in 0..self.n_upstream(r) {
                mask[w * nr + r] = true;
            }
        }
        mask
    }

    /// Iterates over all real edges as `(writer_index, reader_index)`, reader-major.
    pub fn edges(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.n_readers()).flat_map(move |r| (0..self.n_upstream(r)).map(move |w| (w, r)))
    }

    pub fn writer_name(&self, index: usize) -> String {
        match self.writer(index) {
            Writer::Input => "input".to_string(),
            Writer::Head { layer, head } => format!("a{layer}.h{head}"),
            Writer::Mlp { layer } => format!("m{layer}"),
        }
    }

    pub fn reader_name(&self, index: usize) -> String {
        match self.reader(index) {
            Reader::Head { layer, head, qkv } => format!("a{layer}.h{head}<{}>", qkv.letter()),
            Reader::Mlp { layer } => format!("m{layer}"),
            Reader::Logits => "logits".to_string(),
        }
    }

    /// `input->a0.h1<q>`, `a0.h1->m0`, `m3->logits`.
    pub fn edge_name(&self, writer_index: usize, reader_index: usize) -> String {
        format!(
            "{}->{}",
            self.writer_name(writer_index),
            self.reader_name(reader_index)
        )
    }

    fn describe(&self) -> String {
        format!(
            "{} layers, {} heads{}",
            self.n_layers,
            self.n_heads,
            if self.has_mlp { "" } else { ", attention only" }
        )
    }

    /// Parses a writer name such as `input`, `a3.h7` or `m2`.
    pub fn parse_writer(&self, name: &str) -> Result<usize> {
        let unknown = || Error::UnknownName {
            kind: "writer",
            name: name.to_string(),
            detail: self.describe(),
        };
        let w = if name == "input" {
            Writer::Input
        } else if let Some((layer, head)) = parse_head(name) {
            if layer >= self.n_layers || head >= self.n_heads {
                return Err(unknown());
            }
            Writer::Head { layer, head }
        } else if let Some(layer) = name.strip_prefix('m').and_then(|l| l.parse().ok()) {
            if layer >= self.n_layers || !self.has_mlp {
                return Err(unknown());
            }
            Writer::Mlp { layer }
        } else {
            return Err(unknown());
        };
        Ok(self.writer_index(w))
    }

    /// Parses a reader name such as `a3.h7<k>`, `m2` or `logits`.
    pub fn parse_reader(&self, name: &str) -> Result<usize> {
        let unknown = || Error::UnknownName {
            kind: "reader",
            name: name.to_string(),
            detail: self.describe(),
        };
        let r = if name == "logits" {
            Reader::Logits
        } else if let Some(head_part) = name.strip_suffix('>') {
            let (head_name, letter) = head_part.split_once('<').ok_or_else(unknown)?;
            let qkv = match letter {
                "q" => Qkv::Q,
                "k" => Qkv::K,
                "v" => Qkv::V,
                _ => return Err(unknown()),
            };
            let (layer, head) = parse_head(head_name).ok_or_else(unknown)?;
            if layer >= self.n_layers || head >= self.n_heads {
                return Err(unknown());
            }
            Reader::Head { layer, head, qkv }
        } else if let Some(layer) = name.strip_prefix('m').and_then(|l| l.parse().ok()) {
            if layer >= self.n_layers || !self.has_mlp {
                return Err(unknown());
            }
            Reader::Mlp { layer }
        } else {
            return Err(unknown());
        };
        Ok(self.reader_index(r))
    }

    /// Parses `writer->reader` and checks that the edge exists.
    pub fn parse_edge(&self, name: &str) -> Result<(usize, usize)> {
        let (w, r) = name.split_once("->").ok_or_else(|| Error::UnknownName {
            kind: "edge",
            name: name.to_string(),
            detail: "edge names look like `a0.h1->a2.h3<q>`".to_string(),
        })?;
        let (w, r) = (self.parse_writer(w)?, self.parse_reader(r)?);
        if !self.is_edge(w, r) {
            return Err(Error::UnknownName {
                kind: "edge",
                name: name.to_string(),
                detail: "the writer is computed after the reader reads".to_string(),
            });
        }
        Ok((w, r))
    }
}

/// `a{L}.h{H}` → `(L, H)`.
fn parse_head(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix('a')?;
    let (layer, head) = rest.split_once(".h")?;
    Some((layer.parse().ok()?, head.parse().ok()?))
}

/// Readers in ACDC's visiting order ([`crate::acdc`]): the logits, then per layer from the last
/// the MLP and the q, k and v inputs of the heads from the last head down; the order
/// ArthurConmy/Automatic-Circuit-Discovery's `setup_from_model` fills its graph in.
pub fn visit_order(graph: &Graph) -> Vec<usize> {
    let mut order = vec![graph.reader_index(Reader::Logits)];
    for layer in (0..graph.n_layers).rev() {
        if graph.has_mlp {
            order.push(graph.reader_index(Reader::Mlp { layer }));
        }
        for qkv in Qkv::ALL {
            for head in (0..graph.n_heads).rev() {
                order.push(graph.reader_index(Reader::Head { layer, head, qkv }));
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_small_has_32491_edges() {
        let g = Graph::new(12, 12, true);
        assert_eq!(g.n_writers(), 157);
        assert_eq!(g.n_readers(), 445);
        assert_eq!(g.n_edges(), 32_491);
        assert_eq!(g.real_edge_mask().iter().filter(|&&m| m).count(), 32_491);
    }

    #[test]
    fn attention_only_4x8_has_1281_edges() {
        let g = Graph::new(4, 8, false);
        assert_eq!(g.n_edges(), 1_281);
    }

    #[test]
    fn names_round_trip() {
        for g in [Graph::new(3, 4, true), Graph::new(2, 3, false)] {
            for w in 0..g.n_writers() {
                assert_eq!(g.parse_writer(&g.writer_name(w)).unwrap(), w);
            }
            for r in 0..g.n_readers() {
                assert_eq!(g.parse_reader(&g.reader_name(r)).unwrap(), r);
            }
            for (w, r) in g.edges() {
                assert_eq!(g.parse_edge(&g.edge_name(w, r)).unwrap(), (w, r));
            }
        }
    }

    #[test]
    fn edge_rules_follow_forward_order() {
        let g = Graph::new(2, 2, true);
        let e = |s: &str| g.parse_edge(s);
        assert!(e("a0.h1->m0").is_ok());
        assert!(e("a0.h0->a1.h1<k>").is_ok());
        assert!(e("m1->logits").is_ok());
        assert!(
            e("a1.h0->a1.h1<q>").is_err(),
            "same-layer heads do not compose"
        );
        assert!(e("m0->a0.h0<v>").is_err());
        assert!(e("m2->logits").is_err(), "no layer 2");
        assert!(Graph::new(2, 2, false).parse_writer("m0").is_err());
        assert_eq!(
            g.edge_name(
                0,
                g.reader_index(Reader::Head {
                    layer: 0,
                    head: 1,
                    qkv: Qkv::Q
                })
            ),
            "input->a0.h1<q>"
        );
    }
}

/// Edge scores: a dense row-major `[n_writers, n_readers]` matrix, zero where there is no edge.
///
/// Convention (EAP-IG's): `values[w * n_readers + r]` estimates `M(edge patched) − M(clean)`, the
/// change of the metric itself (not a loss) when the edge carries the corrupted (ablated) writer
/// output, averaged over examples.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    pub graph: Graph,
    pub values: Vec<f32>,
}

impl Scores {
    pub fn zeros(graph: Graph) -> Self {
        Scores {
            graph,
            values: vec![0.0; graph.n_writers() * graph.n_readers()],
        }
    }

    pub fn get(&self, writer: usize, reader: usize) -> f32 {
        self.values[writer * self.graph.n_readers() + reader]
    }

    /// The scores of the real edges, in [`Graph::edges`] order.
    pub fn edge_values(&self) -> Vec<f32> {
        self.graph.edges().map(|(w, r)| self.get(w, r)).collect()
    }
}

/// A circuit: a mask over the same `[n_writers, n_readers]` layout as [`Scores`]. Only real
/// edges may be set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Circuit {
    pub graph: Graph,
    pub edges: Vec<bool>,
}

impl Circuit {
    pub fn empty(graph: Graph) -> Self {
        Circuit {
            graph,
            edges: vec![false; graph.n_writers() * graph.n_readers()],
        }
    }

    pub fn full(graph: Graph) -> Self {
        Circuit {
            graph,
            edges: graph.real_edge_mask(),
        }
    }

    pub fn contains(&self, writer: usize, reader: usize) -> bool {
        self.edges[writer * self.graph.n_readers() + reader]
    }

    pub fn set(&mut self, writer: usize, reader: usize, on: bool) {
        debug_assert!(self.graph.is_edge(writer, reader));
        let nr = self.graph.n_readers();
        self.edges[writer * nr + reader] = on;
    }

    pub fn n_edges(&self) -> usize {
        self.edges.iter().filter(|&&e| e).count()
    }
}
