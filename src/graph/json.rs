//! Circuit files in EAP-IG's JSON layout, so circuits move between `eap`, EAP-IG and the MIB
//! benchmark (DESIGN §7).
//!
//! [`CircuitFile`] bundles a [`Graph`], its [`Scores`], a [`Circuit`] and free-form metadata.
//! The layout is that of EAP-IG's `Graph.to_json` / `Graph.from_json` (`hannamw/EAP-IG`,
//! `src/eap/graph.py`):
//!
//! ```json
//! {
//!   "cfg":   {"n_layers": 12, "n_heads": 12, "parallel_attn_mlp": false, "d_model": 768},
//!   "nodes": {"input": {"in_graph": true}, "a0.h0": {"in_graph": false}, …, "logits": {"in_graph": true}},
//!   "edges": {"input->a0.h0<q>": {"score": 0.013, "in_graph": false}, …},
//!   "meta":  {"method": "eap", "metric": "logit_diff", …}
//! }
//! ```
//!
//! `meta` is ours: the method, metric, number of examples, score convention and timings that
//! make a score file interpretable later. EAP-IG ignores unknown top-level keys, and its
//! `from_model` merely stores unknown `cfg` keys, so files written here load in EAP-IG.
//!
//! ## Shape
//!
//! The graph comes from `cfg.n_layers` and `cfg.n_heads`. EAP-IG has no attention-only graphs
//! (its `from_model` always adds MLP nodes), so whether the model has MLPs is read from our own
//! `cfg.attn_only` when present, and otherwise from whether any `m{L}` node or edge appears.
//! Attention-only files therefore simply omit MLP names; EAP-IG still loads them (its MLP
//! edges stay at zero). `parallel_attn_mlp: true` (GPT-NeoX, Pythia) is EAP-IG's flag for
//! parallel attention and MLP: the MLP of layer L does not read layer L's heads, so those edges
//! do not exist.
//!
//! ## What is stored and what is derived
//!
//! The circuit is its edge set. Node `in_graph` flags are derived on writing with EAP-IG's rule
//! (a node is in the graph when it has an outgoing edge and an incoming one, `input` needs no
//! incoming edge, `logits` is always in), and on reading they are only type-checked: a
//! node-level circuit cannot be expressed as an edge mask. Neuron-level fields (`neurons`,
//! `neurons_scores`) and node scores are accepted and ignored. Edges missing from a file read
//! as score 0 and not in the circuit, so hand-written circuit files may list only their edges.
//!
//! `cfg.d_model` is not part of [`Graph`]; EAP-IG's `from_json` needs it to size neuron
//! tensors, so it is written from `meta.d_model` (0 when absent, which EAP-IG accepts) and
//! read back into `meta.d_model`.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::select::reader_node;
use super::{Circuit, Graph, Scores};
use crate::{Error, Result};

/// Largest `[n_writers, n_readers]` matrix a file may ask for (about a 100B-parameter model);
/// a corrupt `cfg` must give an error, not an allocation failure.
const MAX_CELLS: usize = 1 << 28;

/// How a reader treats the real edges a file does not list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingEdges {
    /// Every real edge must be listed exactly once (score files: a missing score would read as
    /// 0 and silently move every ranking and AUC computed from the file).
    Refuse,
    /// Unlisted edges read as score 0 (`--allow-missing`); the graph is still bounded by the
    /// names in the file, as under `Refuse`.
    Fill,
    /// A hand-written circuit or ground truth that lists only its edges: unlisted edges are out
    /// of the circuit with score 0, and the graph is the one `cfg` describes.
    Circuit,
}

/// A score file as read by [`CircuitFile::read_scores`]: the file, and how many real edges
/// it did not list (filled with 0; always 0 under [`MissingEdges::Refuse`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ScoresRead {
    pub file: CircuitFile,
    pub missing: usize,
}

/// A graph with scores, a circuit over it and free-form metadata: one EAP-IG JSON file.
#[derive(Debug, Clone, PartialEq)]
pub struct CircuitFile {
    pub graph: Graph,
    pub scores: Scores,
    pub circuit: Circuit,
    /// Free-form: method, metric, number of examples, score convention, timings, `d_model`.
    /// `Value::Null` when there is nothing to say; then no `meta` key is written.
    pub meta: Value,
}

impl CircuitFile {
    /// Bundles scores and a circuit over the same graph.
    pub fn new(scores: Scores, circuit: Circuit, meta: Value) -> Result<Self> {
        let file = CircuitFile {
            graph: scores.graph,
            scores,
            circuit,
            meta,
        };
        file.check()?;
        Ok(file)
    }

    /// Checks that the parts agree: one graph, matrices of its size, circuit edges only on
    /// real edges, finite scores on real edges (JSON has no NaN; Python's `json` would write
    /// an invalid file and ours would write `null`).
    pub fn check(&self) -> Result<()> {
        let g = self.graph;
        if self.scores.graph != g || self.circuit.graph != g {
            crate::bail!(
                "circuit file parts disagree on the graph: {:?}, scores {:?}, circuit {:?}",
                g,
                self.scores.graph,
                self.circuit.graph
            );
        }
        let cells = g.n_writers() * g.n_readers();
        if self.scores.values.len() != cells || self.circuit.edges.len() != cells {
            crate::bail!(
                "circuit file matrices have {} scores and {} mask entries, expected {cells}",
                self.scores.values.len(),
                self.circuit.edges.len()
            );
        }
        let real = g.real_edge_mask();
        if let Some(i) = (0..cells).find(|&i| self.circuit.edges[i] && !real[i]) {
            let (w, r) = (i / g.n_readers(), i % g.n_readers());
            crate::bail!(
                "circuit contains `{}`, which is not an edge of the model",
                g.edge_name(w, r)
            );
        }
        if let Some((w, r)) = g.edges().find(|&(w, r)| !self.scores.get(w, r).is_finite()) {
            crate::bail!(
                "edge `{}` has a non-finite score ({})",
                g.edge_name(w, r),
                self.scores.get(w, r)
            );
        }
        Ok(())
    }

    /// EAP-IG's `cfg` object: the graph's shape.
    pub(crate) fn cfg_json(&self) -> Map<String, Value> {
        let g = self.graph;
        let d_model = self
            .meta
            .get("d_model")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let mut cfg = Map::new();
        cfg.insert("n_layers".into(), g.n_layers.into());
        cfg.insert("n_heads".into(), g.n_heads.into());
        cfg.insert("parallel_attn_mlp".into(), g.parallel_attn_mlp.into());
        cfg.insert("d_model".into(), d_model.into());
        cfg.insert("attn_only".into(), (!g.has_mlp).into());
        cfg
    }

    /// The EAP-IG JSON value.
    ///
    /// # Panics
    ///
    /// When the parts disagree in size; [`CircuitFile::check`] (called by
    /// [`CircuitFile::write`] and [`CircuitFile::new`]) reports that as an error instead.
    pub fn to_json(&self) -> Value {
        let g = self.graph;
        let (nw, nr) = (g.n_writers(), g.n_readers());
        let cfg = self.cfg_json();

        // EAP-IG's node rule (`prune`, `apply_topn`): outgoing and incoming edges.
        let mut has_out = vec![false; nw];
        let mut reader_has_in = vec![false; nr];
        for (w, r) in g.edges().filter(|&(w, r)| self.circuit.contains(w, r)) {
            has_out[w] = true;
            reader_has_in[r] = true;
        }
        let mut writer_has_in = vec![false; nw];
        writer_has_in[0] = true;
        for r in (0..nr).filter(|&r| reader_has_in[r]) {
            if let Some(node) = reader_node(&g, r) {
                writer_has_in[node] = true;
            }
        }
        let mut nodes = Map::new();
        for w in 0..nw {
            let in_graph = has_out[w] && writer_has_in[w];
            nodes.insert(
                g.writer_name(w),
                serde_json::json!({ "in_graph": in_graph }),
            );
        }
        nodes.insert("logits".into(), serde_json::json!({ "in_graph": true }));

        let mut edges = Map::new();
        for (w, r) in g.edges() {
            edges.insert(
                g.edge_name(w, r),
                serde_json::json!({
                    "score": score_to_json(self.scores.get(w, r)),
                    "in_graph": self.circuit.contains(w, r),
                }),
            );
        }

        let mut top = Map::new();
        top.insert("cfg".into(), Value::Object(cfg));
        top.insert("nodes".into(), Value::Object(nodes));
        top.insert("edges".into(), Value::Object(edges));
        if !self.meta.is_null() {
            top.insert("meta".into(), self.meta.clone());
        }
        Value::Object(top)
    }

    /// Reads an EAP-IG JSON value; `source` (usually the file path) prefixes every error.
    ///
    /// Every node and edge name is checked against the graph `cfg` describes, every score must
    /// be a finite number and every `in_graph` a boolean.
    pub fn from_json(value: &Value, source: &str) -> Result<CircuitFile> {
        Ok(Self::from_json_with(value, source, MissingEdges::Circuit)?.file)
    }

    /// [`from_json`](Self::from_json), treating unlisted edges as `missing` says. Except for
    /// [`MissingEdges::Circuit`] the graph must also be no larger than the names in the file
    /// reach (its last layer and head are named), so a `cfg` that claims 200 layers over a few
    /// edges is refused before anything the size of that graph is allocated.
    pub fn from_json_with(
        value: &Value,
        source: &str,
        missing: MissingEdges,
    ) -> Result<ScoresRead> {
        let err = |message: String| Error::Parse {
            path: PathBuf::from(source),
            line: None,
            message,
        };
        let top = value
            .as_object()
            .ok_or_else(|| err("expected a JSON object with `cfg`, `nodes` and `edges`".into()))?;
        let cfg = top
            .get("cfg")
            .and_then(Value::as_object)
            .ok_or_else(|| err("missing `cfg` object".into()))?;
        let edges = top
            .get("edges")
            .and_then(Value::as_object)
            .ok_or_else(|| err("missing `edges` object".into()))?;
        let empty = Map::new();
        let nodes = match top.get("nodes") {
            None => &empty,
            Some(v) => v
                .as_object()
                .ok_or_else(|| err(format!("`nodes` must be an object, found {}", kind(v))))?,
        };

        let (graph, d_model) = parse_cfg(cfg, &err, || {
            nodes.keys().any(|n| is_mlp_name(n))
                || edges.keys().any(|e| e.split("->").any(is_mlp_name))
        })?;
        let (n_layers, n_heads) = (graph.n_layers, graph.n_heads);
        let n_edges = graph.n_edges();
        if missing != MissingEdges::Circuit {
            let names = nodes
                .keys()
                .map(String::as_str)
                .chain(edges.keys().flat_map(|e| e.split("->")));
            let (layers, heads) = extent(names);
            if n_layers > layers || n_heads > heads {
                return Err(err(format!(
                    "`cfg` describes {n_layers} layers of {n_heads} heads ({n_edges} edges), but \
                     the file names nodes of only {layers} layers and {heads} heads ({} edges \
                     listed); a scores file lists every edge of its graph",
                    edges.len()
                )));
            }
            if missing == MissingEdges::Refuse && edges.len() < n_edges {
                return Err(err(format!(
                    "{} of the {n_edges} edges of a graph of {n_layers} layers x {n_heads} \
                     heads are listed{}; a scores file lists every edge (--allow-missing reads \
                     the rest as score 0)",
                    edges.len(),
                    first_missing(&graph, edges)
                        .map(|e| format!(", `{e}` and {} more missing", n_edges - edges.len() - 1))
                        .unwrap_or_default()
                )));
            }
        }

        for (name, node) in nodes {
            if name != "logits" {
                graph
                    .parse_writer(name)
                    .map_err(|e| err(format!("nodes: {e}")))?;
            }
            let node = node.as_object().ok_or_else(|| {
                err(format!(
                    "node `{name}` must be an object, found {}",
                    kind(node)
                ))
            })?;
            match node.get("in_graph") {
                Some(Value::Bool(_)) => {}
                Some(v) => {
                    return Err(err(format!(
                        "node `{name}`: `in_graph` must be true or false, found {v}"
                    )))
                }
                None => return Err(err(format!("node `{name}` has no `in_graph`"))),
            }
            if let Some(v) = node.get("score") {
                if !v.is_null() && !v.as_f64().is_some_and(f64::is_finite) {
                    return Err(err(format!(
                        "node `{name}`: `score` must be a finite number, found {v}"
                    )));
                }
            }
        }

        let mut scores = Scores::zeros(graph);
        let mut circuit = Circuit::empty(graph);
        let nr = graph.n_readers();
        let mut listed = vec![false; graph.n_writers() * nr];
        for (name, edge) in edges {
            let (w, r) = graph
                .parse_edge(name)
                .map_err(|e| err(format!("edges: {e}")))?;
            if std::mem::replace(&mut listed[w * nr + r], true) {
                return Err(err(format!(
                    "edge `{name}` is listed more than once (as `{}`)",
                    graph.edge_name(w, r)
                )));
            }
            let edge = edge.as_object().ok_or_else(|| {
                err(format!(
                    "edge `{name}` must be an object, found {}",
                    kind(edge)
                ))
            })?;
            let score = edge
                .get("score")
                .ok_or_else(|| err(format!("edge `{name}` has no `score`")))?;
            let value = score
                .as_f64()
                .map(|s| s as f32)
                .filter(|s| s.is_finite())
                .ok_or_else(|| {
                    err(format!(
                        "edge `{name}`: `score` must be a finite number, found {score}"
                    ))
                })?;
            let in_graph = match edge.get("in_graph") {
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(err(format!(
                        "edge `{name}`: `in_graph` must be true or false, found {v}"
                    )))
                }
                None => return Err(err(format!("edge `{name}` has no `in_graph`"))),
            };
            scores.values[w * nr + r] = value;
            circuit.set(w, r, in_graph);
        }

        // Names parse to distinct real edges (JSON objects keep one value per key), so this
        // counts the real edges the file did not list.
        let missing = n_edges.saturating_sub(edges.len());
        let mut meta = top.get("meta").cloned().unwrap_or(Value::Null);
        if let Some(d) = d_model.filter(|&d| d > 0) {
            if meta.is_null() {
                meta = Value::Object(Map::new());
            }
            if let Some(m) = meta.as_object_mut() {
                m.entry("d_model").or_insert(d.into());
            }
        }
        Ok(ScoresRead {
            file: CircuitFile {
                graph,
                scores,
                circuit,
                meta,
            },
            missing,
        })
    }

    /// Writes the file atomically: a temporary file in the same directory, then a rename, so
    /// an interrupted run never leaves a truncated circuit behind. Compact JSON, as EAP-IG's
    /// `json.dump` writes it; the dense score matrix when `path` ends in `.safetensors`
    /// ([`super::matrix`]).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        if is_matrix_path(path) {
            return crate::fsutil::write_atomic(path, &self.to_safetensors()?);
        }
        self.check()?;
        let mut text = serde_json::to_string(&self.to_json())
            .map_err(|e| Error::invalid(format!("serialising circuit: {e}")))?;
        text.push('\n');
        crate::fsutil::write_atomic(path, text.as_bytes())
    }

    /// Reads a file written by [`CircuitFile::write`] or by EAP-IG's `Graph.to_json`; edges it
    /// does not list read as score 0 and out of the circuit (for hand-written circuits). Score
    /// files go through [`CircuitFile::read_scores`].
    pub fn read(path: impl AsRef<Path>) -> Result<CircuitFile> {
        Ok(Self::read_with(path.as_ref(), MissingEdges::Circuit)?.file)
    }

    /// Reads a scores file: every real edge of the graph its `cfg` describes listed exactly
    /// once with a finite score, unless `missing` is [`MissingEdges::Fill`]; then
    /// [`ScoresRead::missing`] says how many were filled with 0.
    pub fn read_scores(path: impl AsRef<Path>, missing: MissingEdges) -> Result<ScoresRead> {
        Self::read_with(path.as_ref(), missing)
    }

    fn read_with(path: &Path, missing: MissingEdges) -> Result<ScoresRead> {
        if is_matrix_path(path) {
            // A matrix has a cell for every edge: nothing can be missing.
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            let file = CircuitFile::from_safetensors(&bytes, &path.display().to_string())?;
            return Ok(ScoresRead { file, missing: 0 });
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            // serde_json's message ends in "at line L column C"; the line goes in its field.
            let full = e.to_string();
            let message = full
                .strip_suffix(&format!(" at line {} column {}", e.line(), e.column()))
                .unwrap_or(&full);
            Error::Parse {
                path: path.to_path_buf(),
                line: Some(e.line()),
                message: format!("invalid JSON: {message} (column {})", e.column()),
            }
        })?;
        if let Some(name) = duplicate_edge(&text) {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                line: None,
                message: format!("edge `{name}` is listed more than once"),
            });
        }
        CircuitFile::from_json_with(&value, &path.display().to_string(), missing)
    }
}

/// Score files named `*.safetensors` hold the dense matrix ([`super::matrix`]); every other
/// name is EAP-IG's JSON.
pub fn is_matrix_path(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
}

/// The graph a file's `cfg` object describes (and its `d_model`); `mlp_fallback` says whether
/// the graph has MLPs when `cfg.attn_only` is absent (EAP-IG's files never say).
fn parse_cfg(
    cfg: &Map<String, Value>,
    err: &dyn Fn(String) -> Error,
    mlp_fallback: impl FnOnce() -> bool,
) -> Result<(Graph, Option<u64>)> {
    let count = |key: &str| -> Result<usize> {
        let v = cfg
            .get(key)
            .ok_or_else(|| err(format!("missing `cfg.{key}`")))?;
        match v.as_u64() {
            Some(n) if n > 0 => Ok(n as usize),
            _ => Err(err(format!(
                "`cfg.{key}` must be a positive integer, found {v}"
            ))),
        }
    };
    let optional_bool = |key: &str| -> Result<Option<bool>> {
        match cfg.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(err(format!("`cfg.{key}` must be true or false, found {v}"))),
        }
    };
    let (n_layers, n_heads) = (count("n_layers")?, count("n_heads")?);
    let parallel = optional_bool("parallel_attn_mlp")?.unwrap_or(false);
    let d_model = match cfg.get("d_model") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| err(format!("`cfg.d_model` must be an integer, found {v}")))?,
        ),
    };
    let has_mlp = match optional_bool("attn_only")? {
        Some(attn_only) => !attn_only,
        None => mlp_fallback(),
    };
    let cells = (1 + n_layers.saturating_mul(n_heads + 1))
        .saturating_mul(n_layers.saturating_mul(3 * n_heads + 1) + 1);
    if cells > MAX_CELLS {
        return Err(err(format!(
            "`cfg` describes {n_layers} layers of {n_heads} heads, too large a graph"
        )));
    }
    Ok((
        Graph::new(n_layers, n_heads, has_mlp).with_parallel_attn_mlp(parallel),
        d_model,
    ))
}

/// [`parse_cfg`] for a `cfg` given as a JSON value, for files that always state `attn_only`.
pub(super) fn graph_from_cfg(cfg: &Value, source: &str) -> Result<(Graph, Option<u64>)> {
    let err = |message: String| Error::Parse {
        path: PathBuf::from(source),
        line: None,
        message,
    };
    let cfg = cfg
        .as_object()
        .ok_or_else(|| err("`cfg` must be an object".into()))?;
    let mut stated = true;
    let found = parse_cfg(cfg, &err, || {
        stated = false;
        false
    })?;
    if !stated {
        return Err(err("missing `cfg.attn_only`".into()));
    }
    Ok(found)
}

/// The first edge name listed twice under the top-level `edges` object (serde_json keeps only
/// the last value of a repeated key, so this reads the keys again, in file order).
fn duplicate_edge(text: &str) -> Option<String> {
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> std::result::Result<Keys, A::Error> {
                    let mut keys = Vec::new();
                    while let Some(k) = map.next_key::<String>()? {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        keys.push(k);
                    }
                    Ok(Keys(keys))
                }
            }
            d.deserialize_map(V)
        }
    }
    #[derive(serde::Deserialize)]
    struct Top {
        edges: Keys,
    }
    // A file whose `edges` is not an object fails here and is reported by `from_json`.
    let top: Top = serde_json::from_str(text).ok()?;
    let mut seen = std::collections::HashSet::new();
    top.edges.0.into_iter().find(|k| !seen.insert(k.clone()))
}

/// Layers and heads the node names reach: one more than the largest layer and head index
/// named (`a3.h7`, `a3.h7<q>`, `m3`).
fn extent<'a>(names: impl Iterator<Item = &'a str>) -> (usize, usize) {
    let (mut layers, mut heads) = (0, 0);
    for name in names {
        let name = name.split('<').next().unwrap_or(name);
        if let Some(rest) = name.strip_prefix('a') {
            if let Some((l, h)) = rest.split_once(".h") {
                if let (Ok(l), Ok(h)) = (l.parse::<usize>(), h.parse::<usize>()) {
                    layers = layers.max(l.saturating_add(1));
                    heads = heads.max(h.saturating_add(1));
                }
            }
        } else if let Some(Ok(l)) = name.strip_prefix('m').map(str::parse::<usize>) {
            layers = layers.max(l.saturating_add(1));
        }
    }
    (layers, heads)
}

/// The first real edge of `graph` not among `edges`, for messages (only on graphs small
/// enough to list).
fn first_missing(graph: &Graph, edges: &Map<String, Value>) -> Option<String> {
    if graph.n_edges() > 1 << 20 {
        return None;
    }
    graph
        .edges()
        .map(|(w, r)| graph.edge_name(w, r))
        .find(|name| !edges.contains_key(name))
}

/// A score as the shortest decimal that reads back as the same `f32` (`0.1`, not
/// `0.10000000149011612`), so files stay readable and diffable.
fn score_to_json(x: f32) -> Value {
    format!("{x}")
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// `m{digits}`: an MLP node name.
fn is_mlp_name(name: &str) -> bool {
    name.strip_prefix('m')
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// A JSON value's type, for error messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(graph: Graph) -> CircuitFile {
        let mut scores = Scores::zeros(graph);
        let nr = graph.n_readers();
        for (i, (w, r)) in graph.edges().enumerate() {
            scores.values[w * nr + r] = ((i as f32) * 0.37).sin() * 10f32.powi(i as i32 % 7 - 4);
        }
        let circuit = Circuit::top_n(&scores, 7);
        let meta =
            json!({"method": "eap", "metric": "logit_diff", "n_examples": 16, "d_model": 32});
        CircuitFile::new(scores, circuit, meta).unwrap()
    }

    #[test]
    fn round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let parallel = Graph::new(2, 3, true).with_parallel_attn_mlp(true);
        for graph in [Graph::new(2, 3, true), Graph::new(3, 2, false), parallel] {
            let file = sample(graph);
            let path = dir.path().join("circuit.json");
            file.write(&path).unwrap();
            let back = CircuitFile::read(&path).unwrap();
            assert_eq!(back, file);
            // Only the target file is left behind.
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        }
    }

    #[test]
    fn writes_eapig_layout() {
        let graph = Graph::new(1, 1, true);
        let mut scores = Scores::zeros(graph);
        let (w, r) = graph.parse_edge("a0.h0->logits").unwrap();
        scores.values[w * graph.n_readers() + r] = 0.1;
        let mut circuit = Circuit::empty(graph);
        circuit.set(w, r, true);
        let file = CircuitFile::new(scores, circuit, Value::Null).unwrap();
        let v = file.to_json();
        assert_eq!(
            v["cfg"],
            json!({"n_layers": 1, "n_heads": 1, "parallel_attn_mlp": false, "d_model": 0, "attn_only": false})
        );
        assert_eq!(
            v["edges"]["a0.h0->logits"],
            json!({"score": 0.1, "in_graph": true})
        );
        assert_eq!(v["edges"].as_object().unwrap().len(), 8);
        // a0.h0 writes but has no input: EAP-IG would call it out of the graph.
        assert_eq!(v["nodes"]["a0.h0"], json!({"in_graph": false}));
        assert_eq!(v["nodes"]["logits"], json!({"in_graph": true}));
        assert_eq!(v["nodes"].as_object().unwrap().len(), 4);
        assert!(v.get("meta").is_none());
    }

    /// A file as EAP-IG's `Graph.to_json` writes it for a 1-layer, 1-head model (node and edge
    /// order as `from_model` inserts them; node scores present, as with `node_scores=True`).
    const EAPIG: &str = r#"{"cfg": {"n_layers": 1, "n_heads": 1, "parallel_attn_mlp": false, "d_model": 8},
 "nodes": {"input": {"in_graph": true, "score": 0.5}, "a0.h0": {"in_graph": true, "score": 0.25},
           "m0": {"in_graph": false, "score": 0.0}, "logits": {"in_graph": true, "score": 0.0}},
 "edges": {"input->a0.h0<q>": {"score": 0.75, "in_graph": true},
           "input->a0.h0<k>": {"score": -0.125, "in_graph": false},
           "input->a0.h0<v>": {"score": 1e-05, "in_graph": false},
           "input->m0": {"score": 0.0, "in_graph": false},
           "a0.h0->m0": {"score": -2.5, "in_graph": false},
           "input->logits": {"score": 3.0, "in_graph": true},
           "a0.h0->logits": {"score": -0.0625, "in_graph": true},
           "m0->logits": {"score": 0.001, "in_graph": false}}}"#;

    #[test]
    fn reads_eapig_layout() {
        let v: Value = serde_json::from_str(EAPIG).unwrap();
        let f = CircuitFile::from_json(&v, "eapig.json").unwrap();
        assert_eq!(f.graph, Graph::new(1, 1, true));
        let mut names = f.circuit.edge_names();
        names.sort();
        assert_eq!(names, ["a0.h0->logits", "input->a0.h0<q>", "input->logits"]);
        let (w, r) = f.graph.parse_edge("a0.h0->m0").unwrap();
        assert_eq!(f.scores.get(w, r), -2.5);
        let (w, r) = f.graph.parse_edge("input->a0.h0<v>").unwrap();
        assert_eq!(f.scores.get(w, r), 1e-5);
        assert_eq!(f.meta, json!({"d_model": 8}));
        // Writing it back gives the same edges and scores.
        let again = CircuitFile::from_json(&f.to_json(), "again").unwrap();
        assert_eq!(again, f);
    }

    #[test]
    fn infers_attention_only_from_missing_mlp_names() {
        let v = json!({
            "cfg": {"n_layers": 2, "n_heads": 1, "parallel_attn_mlp": false, "d_model": 4},
            "nodes": {"input": {"in_graph": true}, "a0.h0": {"in_graph": false},
                      "a1.h0": {"in_graph": false}, "logits": {"in_graph": true}},
            "edges": {"input->logits": {"score": 1.0, "in_graph": true}}
        });
        let f = CircuitFile::from_json(&v, "x").unwrap();
        assert_eq!(f.graph, Graph::new(2, 1, false));
        assert_eq!(f.circuit.edge_names(), ["input->logits"]);
        // Our own `attn_only` flag wins over inference.
        let mut v2 = v.clone();
        v2["cfg"]["attn_only"] = json!(false);
        assert!(CircuitFile::from_json(&v2, "x").unwrap().graph.has_mlp);
    }

    fn error_of(v: Value) -> String {
        CircuitFile::from_json(&v, "bad.json")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn rejects_bad_input_with_clear_errors() {
        let base = |edges: Value| {
            json!({"cfg": {"n_layers": 1, "n_heads": 2, "parallel_attn_mlp": false, "d_model": 4},
                   "nodes": {}, "edges": edges})
        };
        let e = error_of(base(
            json!({"a0.h7->logits": {"score": 1.0, "in_graph": true}}),
        ));
        assert!(e.starts_with("bad.json: ") && e.contains("`a0.h7`"), "{e}");
        let e = error_of(base(
            json!({"a0.h1->a0.h0<q>": {"score": 1.0, "in_graph": true}}),
        ));
        assert!(e.contains("a0.h1->a0.h0<q>"), "{e}");
        let e = error_of(base(
            json!({"input->logits": {"score": "NaN", "in_graph": true}}),
        ));
        assert!(
            e.contains("finite number") && e.contains("input->logits"),
            "{e}"
        );
        let e = error_of(base(
            json!({"input->logits": {"score": 1e300, "in_graph": true}}),
        ));
        assert!(e.contains("finite number"), "{e}");
        let e = error_of(base(
            json!({"input->logits": {"score": 1.0, "in_graph": 1}}),
        ));
        assert!(e.contains("in_graph"), "{e}");
        let e = error_of(base(json!({"input->logits": {"in_graph": true}})));
        assert!(e.contains("no `score`"), "{e}");
        // Parallel attention and MLP: the layer's heads do not feed its own MLP.
        let e = error_of(
            json!({"cfg": {"n_layers": 1, "n_heads": 1, "parallel_attn_mlp": true},
            "edges": {"a0.h0->m0": {"score": 1.0, "in_graph": true}}}),
        );
        assert!(e.contains("a0.h0->m0"), "{e}");
        let e = error_of(json!({"cfg": {"n_layers": "12", "n_heads": 1}, "edges": {}}));
        assert!(e.contains("cfg.n_layers"), "{e}");
        let e = error_of(json!({"cfg": {"n_layers": 1000000, "n_heads": 1000000}, "edges": {}}));
        assert!(e.contains("too large"), "{e}");
        let e = error_of(
            json!({"cfg": {"n_layers": 1, "n_heads": 1}, "nodes": {"q9": {"in_graph": true}}, "edges": {}}),
        );
        assert!(e.contains("`q9`"), "{e}");
        let e = error_of(json!([1, 2]));
        assert!(e.contains("expected a JSON object"), "{e}");
        // An MLP edge in a file that says the model is attention-only.
        let e = error_of(
            json!({"cfg": {"n_layers": 1, "n_heads": 1, "attn_only": true},
                                "edges": {"m0->logits": {"score": 0.0, "in_graph": false}}}),
        );
        assert!(e.contains("m0"), "{e}");
    }

    #[test]
    fn read_reports_json_syntax_errors_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nan.json");
        // Python's json.dump writes NaN for non-finite floats, which is not JSON.
        std::fs::write(
            &path,
            "{\"cfg\": {},\n \"edges\": {\"input->logits\": {\"score\": NaN}}}",
        )
        .unwrap();
        match CircuitFile::read(&path).unwrap_err() {
            Error::Parse { line, message, .. } => {
                assert_eq!(line, Some(2));
                assert!(message.starts_with("invalid JSON"), "{message}");
            }
            e => panic!("unexpected error {e}"),
        }
        assert!(matches!(
            CircuitFile::read(dir.path().join("missing.json")),
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn refuses_to_write_inconsistent_parts() {
        let graph = Graph::new(1, 1, true);
        let mut scores = Scores::zeros(graph);
        scores.values[graph.n_readers() - 1] = f32::NAN; // input->logits
        let err = CircuitFile::new(scores, Circuit::empty(graph), Value::Null).unwrap_err();
        assert!(err.to_string().contains("input->logits"), "{err}");
        let err = CircuitFile::new(
            Scores::zeros(graph),
            Circuit::empty(Graph::new(2, 1, true)),
            Value::Null,
        )
        .unwrap_err();
        assert!(err.to_string().contains("disagree"), "{err}");
    }

    #[test]
    fn scores_are_written_as_short_decimals() {
        assert_eq!(score_to_json(0.1).to_string(), "0.1");
        for x in [
            1e-7f32,
            3.4028235e38,
            -1.1754944e-38,
            0.333_333_34,
            123_456.79,
        ] {
            assert_eq!(score_to_json(x).as_f64().unwrap() as f32, x);
        }
    }
}
