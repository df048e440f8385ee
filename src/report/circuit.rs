//! A circuit drawn without graphviz: the model's nodes on a fixed grid, the circuit's edges as
//! curves between them.
//!
//! Layout: `input` at the bottom, `logits` at the top, one band per layer in between. In a band
//! the heads sit on one row and the MLP to their right, half a band higher, because the MLP
//! reads the heads of its own layer. An edge leaves the top of its writer and enters the
//! bottom of its reader; a head has three entry points, left to right q, k and v, and the edge
//! is coloured by which one it reads. Width follows |score| relative to the largest in the
//! circuit; negative scores are dashed.

use std::collections::HashSet;

use super::svg::{num, Svg};
use crate::graph::{Circuit, Qkv, Reader, Scores, Writer};

const NODE_W: f64 = 54.0;
const NODE_H: f64 = 22.0;
/// Column spacing: at least this, more when there are few heads (up to `COL_MAX`).
const COL_MIN: f64 = 66.0;
const COL_MAX: f64 = 130.0;
/// The width a small circuit spreads out to.
const TARGET_WIDTH: f64 = 900.0;
const BAND: f64 = 100.0;
const LEFT: f64 = 60.0;
const TOP: f64 = 96.0;
const BOTTOM: f64 = 40.0;
/// Above this many heads per layer (or layers), only the touched ones get a column (row).
const COMPACT_ABOVE: usize = 16;

const Q_COLOUR: &str = "#7b3fb8";
const K_COLOUR: &str = "#1f9e4a";
const V_COLOUR: &str = "#e07b00";
const MLP_COLOUR: &str = "#3a6ea5";
const LOGITS_COLOUR: &str = "#222222";

fn reader_colour(r: Reader) -> &'static str {
    match r {
        Reader::Head { qkv: Qkv::Q, .. } => Q_COLOUR,
        Reader::Head { qkv: Qkv::K, .. } => K_COLOUR,
        Reader::Head { qkv: Qkv::V, .. } => V_COLOUR,
        Reader::Mlp { .. } => MLP_COLOUR,
        Reader::Logits => LOGITS_COLOUR,
    }
}

/// A node of the picture: a writer and, for heads and MLPs, the readers of the same component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Node {
    Input,
    Head(usize, usize),
    Mlp(usize),
    Logits,
}

fn writer_node(w: Writer) -> Node {
    match w {
        Writer::Input => Node::Input,
        Writer::Head { layer, head } => Node::Head(layer, head),
        Writer::Mlp { layer } => Node::Mlp(layer),
    }
}

fn reader_node(r: Reader) -> Node {
    match r {
        Reader::Head { layer, head, .. } => Node::Head(layer, head),
        Reader::Mlp { layer } => Node::Mlp(layer),
        Reader::Logits => Node::Logits,
    }
}

/// Where every drawn node sits.
struct Layout {
    width: f64,
    height: f64,
    /// Shown layers, bottom to top.
    layers: Vec<usize>,
    /// Per shown layer, the shown heads in column order.
    heads: Vec<Vec<usize>>,
    n_cols: usize,
    col: f64,
}

impl Layout {
    fn new(circuit: &Circuit, touched: &HashSet<Node>) -> Self {
        let g = circuit.graph;
        let layer_touched = |l: usize| {
            touched
                .iter()
                .any(|n| matches!(n, Node::Head(a, _) | Node::Mlp(a) if *a == l))
        };
        let layers: Vec<usize> = if g.n_layers <= COMPACT_ABOVE {
            (0..g.n_layers).collect()
        } else {
            (0..g.n_layers).filter(|&l| layer_touched(l)).collect()
        };
        let heads: Vec<Vec<usize>> = layers
            .iter()
            .map(|&l| {
                if g.n_heads <= COMPACT_ABOVE {
                    (0..g.n_heads).collect()
                } else {
                    (0..g.n_heads)
                        .filter(|&h| touched.contains(&Node::Head(l, h)))
                        .collect()
                }
            })
            .collect();
        let n_cols = heads.iter().map(Vec::len).max().unwrap_or(0);
        let mlp_cols = if g.has_mlp { 1.4 } else { 0.0 };
        let span = (n_cols as f64 + mlp_cols).max(1.0);
        let col = ((TARGET_WIDTH - 2.0 * LEFT) / span).clamp(COL_MIN, COL_MAX);
        let width = (2.0 * LEFT + span * col).max(640.0);
        let height = TOP + (layers.len() as f64 + 1.0) * BAND + NODE_H + BOTTOM;
        Layout {
            width,
            height,
            layers,
            heads,
            n_cols,
            col,
        }
    }

    fn centre_x(&self) -> f64 {
        LEFT + (self.n_cols.max(1) as f64 * self.col) / 2.0
    }

    fn input_y(&self) -> f64 {
        self.height - BOTTOM - NODE_H / 2.0
    }

    fn heads_y(&self, row: usize) -> f64 {
        self.input_y() - BAND * (row as f64 + 1.0)
    }

    /// Centre of a node, or `None` when it is not drawn (compacted away).
    fn position(&self, node: Node) -> Option<(f64, f64)> {
        match node {
            Node::Input => Some((self.centre_x(), self.input_y())),
            Node::Logits => Some((self.centre_x(), self.heads_y(self.layers.len()))),
            Node::Head(l, h) => {
                let row = self.layers.iter().position(|&x| x == l)?;
                let col = self.heads[row].iter().position(|&x| x == h)?;
                Some((LEFT + (col as f64 + 0.5) * self.col, self.heads_y(row)))
            }
            Node::Mlp(l) => {
                let row = self.layers.iter().position(|&x| x == l)?;
                Some((
                    LEFT + (self.n_cols as f64 + 0.9) * self.col,
                    self.heads_y(row) - BAND / 2.0,
                ))
            }
        }
    }
}

/// The circuit as a standalone SVG, one `<path class="edge">` per circuit edge.
///
/// `scores`, when given for the same graph, set each edge's width (|score| relative to the
/// largest |score| in the circuit) and dash (negative scores); scores for another graph are
/// ignored. Nodes that no circuit edge touches are drawn faint; `input` and `logits` always
/// stand out. Readable up to a few hundred edges; every edge carries a hover tooltip with its
/// name and score.
pub fn circuit_svg(circuit: &Circuit, scores: Option<&Scores>) -> String {
    let g = circuit.graph;
    let size = g.n_writers() * g.n_readers();
    let scores = scores.filter(|s| s.graph == g && s.values.len() == size);
    let edges: Vec<(usize, usize)> = if circuit.edges.len() == size {
        g.edges().filter(|&(w, r)| circuit.contains(w, r)).collect()
    } else {
        Vec::new()
    };
    let mut touched: HashSet<Node> = HashSet::new();
    for &(w, r) in &edges {
        touched.insert(writer_node(g.writer(w)));
        touched.insert(reader_node(g.reader(r)));
    }
    let layout = Layout::new(circuit, &touched);
    let mut svg = Svg::new(layout.width, layout.height);

    // Title and legend.
    let n_nodes = touched.len();
    svg.text(
        LEFT - 40.0,
        24.0,
        &format!("Circuit: {} edges, {} nodes", edges.len(), n_nodes),
        r#"font-size="15" font-weight="bold""#,
    );
    let legend: [(&str, &str); 5] = [
        (Q_COLOUR, "→ query"),
        (K_COLOUR, "→ key"),
        (V_COLOUR, "→ value"),
        (MLP_COLOUR, "→ MLP"),
        (LOGITS_COLOUR, "→ logits"),
    ];
    let mut x = LEFT - 40.0;
    for (colour, label) in legend {
        svg.line(
            x,
            46.0,
            x + 22.0,
            46.0,
            &format!(r#"stroke="{colour}" stroke-width="3""#),
        );
        svg.text(x + 27.0, 50.0, label, "");
        x += 92.0;
    }
    let note = if scores.is_some() {
        "width ∝ |score| (relative to the largest in the circuit); dashed: negative score"
    } else {
        "no scores given: uniform width"
    };
    svg.text(LEFT - 40.0, 72.0, note, r##"fill="#555""##);

    // Layer labels.
    for (row, &l) in layout.layers.iter().enumerate() {
        svg.text(
            12.0,
            layout.heads_y(row) + 4.0,
            &format!("L{l}"),
            r##"fill="#888" font-weight="bold""##,
        );
    }

    // Edges, weakest first so the strongest are drawn on top.
    let score = |w: usize, r: usize| scores.map(|s| s.get(w, r) as f64);
    let max_abs = edges
        .iter()
        .filter_map(|&(w, r)| score(w, r))
        .filter(|s| s.is_finite())
        .fold(0.0f64, |m, s| m.max(s.abs()));
    let mut ordered = edges.clone();
    ordered.sort_by(|a, b| {
        let (sa, sb) = (
            score(a.0, a.1).unwrap_or(0.0).abs(),
            score(b.0, b.1).unwrap_or(0.0).abs(),
        );
        sa.total_cmp(&sb)
    });
    svg.raw(r#"<g fill="none" stroke-opacity="0.8" stroke-linecap="round">"#);
    for (w, r) in ordered {
        let (writer, reader) = (g.writer(w), g.reader(r));
        // Nodes of circuit edges are never compacted away; `unwrap_or` only guards the picture.
        let (x1, y1) = layout.position(writer_node(writer)).unwrap_or((0.0, 0.0));
        let (x2, y2) = layout.position(reader_node(reader)).unwrap_or((0.0, 0.0));
        let port = match reader {
            Reader::Head { qkv, .. } => (qkv as usize as f64 - 1.0) * 15.0,
            _ => 0.0,
        };
        let (sx, sy) = (x1, y1 - NODE_H / 2.0);
        let (ex, ey) = (x2 + port, y2 + NODE_H / 2.0);
        let k = ((sy - ey).abs() * 0.45).max(24.0);
        let d = format!(
            "M{} {} C{} {} {} {} {} {}",
            num(sx),
            num(sy),
            num(sx),
            num(sy - k),
            num(ex),
            num(ey + k),
            num(ex),
            num(ey)
        );
        let s = score(w, r).filter(|s| s.is_finite());
        let width = match s {
            Some(s) if max_abs > 0.0 => 0.8 + 4.2 * s.abs() / max_abs,
            _ => 1.6,
        };
        let dash = if s.is_some_and(|s| s < 0.0) {
            r#" stroke-dasharray="6 3""#
        } else {
            ""
        };
        let tip = match s {
            Some(s) => format!("{}  score {:.4e}", g.edge_name(w, r), s),
            None => g.edge_name(w, r),
        };
        svg.path(
            &d,
            &format!(
                r#"class="edge" stroke="{}" stroke-width="{}"{dash}"#,
                reader_colour(reader),
                num(width)
            ),
            Some(&tip),
        );
    }
    svg.raw("</g>");

    // Nodes on top of the edges.
    let mut nodes = vec![Node::Input, Node::Logits];
    for (row, &l) in layout.layers.iter().enumerate() {
        nodes.extend(layout.heads[row].iter().map(|&h| Node::Head(l, h)));
        if g.has_mlp {
            nodes.push(Node::Mlp(l));
        }
    }
    for node in nodes {
        let Some((x, y)) = layout.position(node) else {
            continue;
        };
        let (label, fill, stroke, text) = match node {
            Node::Input => ("input".to_string(), "#333", "#111", "white"),
            Node::Logits => ("logits".to_string(), "#333", "#111", "white"),
            Node::Head(l, h) => (format!("a{l}.h{h}"), "#e3eefa", "#2c5d8a", "#111"),
            Node::Mlp(l) => (format!("m{l}"), "#fdebd3", "#a0622d", "#111"),
        };
        let prominent = matches!(node, Node::Input | Node::Logits) || touched.contains(&node);
        let (fill, stroke, text, weight) = if prominent {
            (fill, stroke, text, "bold")
        } else {
            ("#f6f6f6", "#dddddd", "#bbbbbb", "normal")
        };
        let wide = if matches!(node, Node::Input | Node::Logits) {
            16.0
        } else {
            0.0
        };
        svg.rect(
            x - (NODE_W + wide) / 2.0,
            y - NODE_H / 2.0,
            NODE_W + wide,
            NODE_H,
            &format!(r#"rx="5" fill="{fill}" stroke="{stroke}" class="node""#),
        );
        svg.text(
            x,
            y + 4.0,
            &label,
            &format!(r#"text-anchor="middle" font-size="11" fill="{text}" font-weight="{weight}""#),
        );
    }
    svg.finish()
}
