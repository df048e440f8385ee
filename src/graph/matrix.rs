//! Score files as safetensors: the dense `[n_writers, n_readers]` score matrix, for graphs
//! whose JSON is large (Llama-3.1-8B: 1,592,881 edges, ≈ 100 MB of JSON, 13 MB here) and for
//! Python, where `safetensors.torch.load_file(path)["scores"]` is the whole matrix.
//!
//! Layout (chosen by the `.safetensors` extension wherever eap writes or reads a score file):
//!
//! * `scores` — F32 `[n_writers, n_readers]`, row `w` the writer, column `r` the reader, in
//!   eap's graph order (`__metadata__.writers` / `.readers` name them); 0 where `w → r` is no
//!   edge;
//! * `in_graph` — U8 of the same shape, 1 for the circuit's edges;
//! * `__metadata__` — `format: "eap-scores"`, `cfg` (the JSON file's `cfg` object, as a JSON
//!   string), `meta` (JSON string), `writers`, `readers` (JSON lists of node names).
//!
//! Reading checks what the JSON reader checks: the graph `cfg` describes matches the matrix
//! shape, every real edge's score is finite, the circuit holds only real edges, and non-edges
//! carry no score (a matrix from another graph ordering would otherwise be read silently).

use std::path::PathBuf;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::Value;

use super::json::{graph_from_cfg, CircuitFile};
use super::{Circuit, Scores};
use crate::{Error, Result};

/// `__metadata__.format` of an eap score matrix.
const FORMAT: &str = "eap-scores";

impl CircuitFile {
    /// The file as safetensors bytes (see the module documentation).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        self.check()?;
        let g = self.graph;
        let (nw, nr) = (g.n_writers(), g.n_readers());
        let scores: Vec<u8> = self
            .scores
            .values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mask: Vec<u8> = self.circuit.edges.iter().map(|&on| on as u8).collect();
        fn view(dtype: Dtype, shape: [usize; 2], data: &[u8]) -> Result<TensorView<'_>> {
            TensorView::new(dtype, shape.to_vec(), data)
                .map_err(|e| Error::invalid(format!("score matrix: {e}")))
        }
        let names = |n: usize, name: &dyn Fn(usize) -> String| {
            Value::from((0..n).map(name).collect::<Vec<_>>()).to_string()
        };
        let metadata = std::collections::HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            (
                "cfg".to_string(),
                Value::Object(self.cfg_json()).to_string(),
            ),
            ("meta".to_string(), self.meta.to_string()),
            ("writers".to_string(), names(nw, &|w| g.writer_name(w))),
            ("readers".to_string(), names(nr, &|r| g.reader_name(r))),
        ]);
        safetensors::serialize(
            [
                ("scores", view(Dtype::F32, [nw, nr], &scores)?),
                ("in_graph", view(Dtype::U8, [nw, nr], &mask)?),
            ],
            Some(metadata),
        )
        .map_err(|e| Error::invalid(format!("score matrix: {e}")))
    }

    /// Reads a score matrix written by [`to_safetensors`](Self::to_safetensors); `source`
    /// (the path) prefixes every error.
    pub fn from_safetensors(bytes: &[u8], source: &str) -> Result<CircuitFile> {
        let err = |message: String| Error::Parse {
            path: PathBuf::from(source),
            line: None,
            message,
        };
        let file = SafeTensors::deserialize(bytes)
            .map_err(|e| err(format!("not a safetensors file: {e}")))?;
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| err(format!("not a safetensors file: {e}")))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let field = |key: &str| -> Result<Value> {
            let text = metadata
                .get(key)
                .ok_or_else(|| err(format!("no `{key}` in the safetensors metadata")))?;
            serde_json::from_str(text)
                .map_err(|e| err(format!("metadata `{key}` is not valid JSON: {e}")))
        };
        match metadata.get("format").map(String::as_str) {
            Some(FORMAT) => {}
            other => {
                return Err(err(format!(
                    "metadata `format` is {other:?}, not \"{FORMAT}\": not an eap score matrix"
                )))
            }
        }
        let cfg = field("cfg")?;
        let meta = field("meta")?;
        let (graph, d_model) = graph_from_cfg(&cfg, source)?;
        let (nw, nr) = (graph.n_writers(), graph.n_readers());
        let tensor = |name: &str, dtype: Dtype| -> Result<TensorView<'_>> {
            let t = file
                .tensor(name)
                .map_err(|_| err(format!("no tensor `{name}`")))?;
            if t.dtype() != dtype || t.shape() != [nw, nr] {
                return Err(err(format!(
                    "tensor `{name}` is {:?} {:?}; the graph `cfg` describes needs {dtype:?} \
                     [{nw}, {nr}]",
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(t)
        };
        let values: Vec<f32> = tensor("scores", Dtype::F32)?
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        let edges: Vec<bool> = tensor("in_graph", Dtype::U8)?
            .data()
            .iter()
            .map(|&b| b != 0)
            .collect();
        let real = graph.real_edge_mask();
        for (i, &is_edge) in real.iter().enumerate() {
            let (w, r) = (i / nr, i % nr);
            let name = || format!("{} -> {}", graph.writer_name(w), graph.reader_name(r));
            if is_edge && !values[i].is_finite() {
                return Err(err(format!("edge `{}` has score {}", name(), values[i])));
            }
            if !is_edge && (values[i] != 0.0 || edges[i]) {
                return Err(err(format!(
                    "`{}` is not an edge of the graph `cfg` describes, but the matrix gives it \
                     a score or puts it in the circuit (another graph's ordering?)",
                    name()
                )));
            }
        }
        let mut meta = meta;
        if let Some(d) = d_model.filter(|&d| d > 0) {
            if meta.is_null() {
                meta = Value::Object(serde_json::Map::new());
            }
            if let Some(m) = meta.as_object_mut() {
                m.entry("d_model").or_insert(d.into());
            }
        }
        CircuitFile::new(Scores { graph, values }, Circuit { graph, edges }, meta)
    }
}
