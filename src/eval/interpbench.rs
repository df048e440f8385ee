//! InterpBench's ground truth (Gupta et al. 2024, "InterpBench: Semi-Synthetic Transformers for
//! Evaluating Mechanistic Interpretability Techniques"; FlyingPumba/InterpBench). A case folder
//! as published on the hub (`cybershiptrooper/InterpBench/<case>/`) holds `ll_model.pth` (a
//! TransformerLens state dict), `ll_model_cfg.pkl` (its config), `meta.json` (training
//! arguments) and `edges.pkl`: the circuit the model was trained to implement, as a pickled
//! list of edges between ACDC hook names. [`crate::model::Model::load_dir`] opens the model;
//! [`read_edges_pkl`] turns `edges.pkl` into a [`Circuit`] of eap's graph.
//!
//! The edge list is what InterpBench's `circuit_to_edges_list` writes: pairs of strings
//! `"name"` or `"name[head]"`, e.g. `("blocks.0.attn.hook_result[1]", "blocks.1.hook_q_input[1]")`.
//! Pairs of `(name, index)` tuples (an ACDC `TorchIndex`'s tuple such as `(None, None, 1)`, or
//! an int) and ACDC's own `(child, child_index, parent, parent_index)` keys are read too.
//!
//! Mapping to eap's names (DESIGN §2):
//!
//! | ACDC hook                                              | eap            |
//! | ------------------------------------------------------ | -------------- |
//! | `hook_embed`, `hook_pos_embed`, `blocks.0.hook_resid_pre` (writer) | `input` |
//! | `blocks.L.attn.hook_result[H]` (writer)                | `aL.hH`        |
//! | `blocks.L.hook_mlp_out` (writer)                       | `mL`           |
//! | `blocks.L.hook_{q,k,v}_input[H]` (reader)              | `aL.hH<q/k/v>` |
//! | `blocks.L.hook_mlp_in` (reader)                        | `mL`           |
//! | `blocks.{last}.hook_resid_post` (reader)               | `logits`       |
//!
//! Edges inside a node — `hook_q_input → attn.hook_q → attn.hook_result`, `hook_mlp_in →
//! hook_mlp_out` — have no counterpart in eap's graph (ACDC adds one per head and letter;
//! DESIGN §2) and are dropped. An edge into a head as a whole (`… → attn.hook_result[H]`, as
//! the IOI case lists them) means all three of its inputs, as does an edge into its
//! `attn.hook_q/k/v`, which name the letter; an edge into `hook_mlp_out` means the MLP's input.
//!
//! **Head-level promotion.** InterpBench's model card says its circuits are head-level: SIIT
//! trains each circuit head as a whole, so the letters tracr happened to use (say, only the
//! value input) say little about which inputs the trained model reads. With `promote_qkv` an
//! edge into any of a head's q/k/v inputs is taken as an edge into all three; `eap discover`
//! does this for case folders.

use std::path::Path;

use crate::graph::{Circuit, Graph};
use crate::model::pickle::{Obj, Pickle};
use crate::{Error, Result};

/// The ground-truth edge list of an InterpBench case folder.
pub const INTERPBENCH_EDGES: &str = "edges.pkl";

/// One end of an ACDC edge, in eap's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    Input,
    /// `attn.hook_result[H]`: the head's output as a writer, the whole head as a reader.
    Head {
        layer: usize,
        head: usize,
    },
    /// `hook_{q,k,v}_input[H]` (`inner`: false) or `attn.hook_{q,k,v}[H]` (`inner`: true).
    Letter {
        layer: usize,
        head: usize,
        letter: char,
        inner: bool,
    },
    MlpIn(usize),
    MlpOut(usize),
    ResidPost(usize),
}

/// Parses an ACDC hook name and head index.
fn parse_hook(name: &str, index: Option<usize>) -> std::result::Result<Hook, String> {
    let need_head = || index.ok_or_else(|| format!("`{name}` needs a head index"));
    if matches!(
        name,
        "hook_embed" | "hook_pos_embed" | "blocks.0.hook_resid_pre"
    ) {
        return Ok(Hook::Input);
    }
    let rest = name
        .strip_prefix("blocks.")
        .ok_or_else(|| format!("unknown hook `{name}`"))?;
    let (layer, hook) = rest
        .split_once('.')
        .ok_or_else(|| format!("unknown hook `{name}`"))?;
    let layer: usize = layer
        .parse()
        .map_err(|_| format!("`{name}` has no layer number"))?;
    Ok(match hook {
        "attn.hook_result" => Hook::Head {
            layer,
            head: need_head()?,
        },
        "hook_q_input" | "hook_k_input" | "hook_v_input" | "attn.hook_q" | "attn.hook_k"
        | "attn.hook_v" => {
            let inner = hook.starts_with("attn.");
            let letter = hook.trim_start_matches("attn.").as_bytes()[5] as char;
            Hook::Letter {
                layer,
                head: need_head()?,
                letter,
                inner,
            }
        }
        "hook_mlp_in" => Hook::MlpIn(layer),
        "hook_mlp_out" => Hook::MlpOut(layer),
        "hook_resid_post" => Hook::ResidPost(layer),
        _ => return Err(format!("unknown hook `{name}`")),
    })
}

/// `"blocks.0.attn.hook_result[1]"` → (name, Some(1)).
fn split_index(s: &str) -> std::result::Result<(&str, Option<usize>), String> {
    match s.split_once('[') {
        None => Ok((s, None)),
        Some((name, rest)) => {
            let idx = rest
                .strip_suffix(']')
                .ok_or_else(|| format!("`{s}`: unclosed index"))?;
            // `[:, :, 3]` (a printed TorchIndex) names the head last.
            let last = idx.rsplit(',').next().unwrap_or(idx).trim();
            let head = last
                .parse()
                .map_err(|_| format!("`{s}`: the index is not a head number"))?;
            Ok((name, Some(head)))
        }
    }
}

/// The head index of a pickled index: an int, `None`, or a tuple/list whose last non-`None`
/// entry is the head (ACDC's `TorchIndex([None, None, 3])`).
fn pickled_index(p: &Pickle, id: usize) -> std::result::Result<Option<usize>, String> {
    match p.get(id) {
        Obj::None => Ok(None),
        Obj::Int(i) => usize::try_from(*i)
            .map(Some)
            .map_err(|_| format!("negative head index {i}")),
        Obj::List(v) | Obj::Tuple(v) => match v.iter().rev().find(|&&i| p.get(i) != &Obj::None) {
            None => Ok(None),
            Some(&i) => pickled_index(p, i),
        },
        _ => Err(format!("a head index is {}", p.kind(id))),
    }
}

/// One end of a pickled edge: `"name[head]"` or `(name, index)`.
fn pickled_hook(p: &Pickle, id: usize) -> std::result::Result<Hook, String> {
    if let Some(s) = p.str(id) {
        let (name, index) = split_index(s)?;
        return parse_hook(name, index);
    }
    match p.items(id) {
        Some(&[name, index]) => {
            let name = p
                .str(name)
                .ok_or_else(|| format!("a node name is {}", p.kind(name)))?;
            parse_hook(name, pickled_index(p, index)?)
        }
        _ => Err(format!(
            "an edge end is {}, expected \"name[head]\" or (name, index)",
            p.kind(id)
        )),
    }
}

/// Reads `edges.pkl` into a circuit of `graph`; see the module docs for the mapping.
pub fn read_edges_pkl(path: &Path, graph: Graph, promote_qkv: bool) -> Result<Circuit> {
    let pickle = Pickle::read(path)?;
    let bad = |message: String| Error::Parse {
        path: path.to_path_buf(),
        line: None,
        message,
    };
    let edges = pickle.items(pickle.root()).ok_or_else(|| {
        bad(format!(
            "expected a list of edges, found {}",
            pickle.kind(pickle.root())
        ))
    })?;
    let mut circuit = Circuit::empty(graph);
    for (i, &edge) in edges.iter().enumerate() {
        let at = |why: String| bad(format!("edge {i}: {why}"));
        let (from, to) = match pickle.items(edge) {
            Some(&[a, b]) => (
                pickled_hook(&pickle, a).map_err(at)?,
                pickled_hook(&pickle, b).map_err(at)?,
            ),
            // ACDC's edge keys: (child, child_index, parent, parent_index).
            Some(&[child, ci, parent, pi]) if pickle.str(child).is_some() => {
                let end = |name: usize, index: usize| -> std::result::Result<Hook, String> {
                    parse_hook(
                        pickle.str(name).ok_or("a node name is not a string")?,
                        pickled_index(&pickle, index)?,
                    )
                };
                (end(parent, pi).map_err(at)?, end(child, ci).map_err(at)?)
            }
            _ => {
                return Err(at(format!(
                    "{}, expected a pair (from, to)",
                    pickle.kind(edge)
                )))
            }
        };
        for (w, r) in map_edge(from, to, &graph, promote_qkv).map_err(at)? {
            let (wi, ri) = (
                graph.parse_writer(&w).map_err(|e| at(e.to_string()))?,
                graph.parse_reader(&r).map_err(|e| at(e.to_string()))?,
            );
            if !graph.is_edge(wi, ri) {
                return Err(at(format!(
                    "`{w}->{r}` is not an edge of this model's graph (the writer is computed \
                     after the reader reads)"
                )));
            }
            circuit.set(wi, ri, true);
        }
    }
    if circuit.n_edges() == 0 {
        return Err(Error::NoEdges {
            what: format!("{}: the ground truth", path.display()),
        });
    }
    Ok(circuit)
}

/// The eap edges `(writer, reader)` one ACDC edge stands for; none for an edge inside a node.
fn map_edge(
    from: Hook,
    to: Hook,
    graph: &Graph,
    promote_qkv: bool,
) -> std::result::Result<Vec<(String, String)>, String> {
    let writer = match from {
        Hook::Input => "input".to_string(),
        Hook::Head { layer, head } => format!("a{layer}.h{head}"),
        Hook::MlpOut(layer) => format!("m{layer}"),
        // Edges that start inside a node (q/k/v inputs, the MLP's input) end inside it too.
        Hook::Letter { .. } | Hook::MlpIn(_) => return Ok(Vec::new()),
        Hook::ResidPost(_) => return Err("an edge leaves hook_resid_post".into()),
    };
    let letters = |layer: usize, head: usize, only: Option<char>| -> Vec<String> {
        let all = ['q', 'k', 'v'];
        let chosen: Vec<char> = match only {
            Some(c) if !promote_qkv => vec![c],
            _ => all.to_vec(),
        };
        chosen
            .into_iter()
            .map(|c| format!("a{layer}.h{head}<{c}>"))
            .collect()
    };
    let readers = match to {
        Hook::Letter {
            layer,
            head,
            letter,
            ..
        } => letters(layer, head, Some(letter)),
        Hook::Head { layer, head } => letters(layer, head, None),
        Hook::MlpIn(layer) | Hook::MlpOut(layer) => vec![format!("m{layer}")],
        Hook::ResidPost(layer) if layer + 1 == graph.n_layers => vec!["logits".to_string()],
        Hook::ResidPost(layer) => {
            return Err(format!(
                "blocks.{layer}.hook_resid_post is not the last layer's (the model has {} \
                 layers), so it is no reader of eap's graph",
                graph.n_layers
            ))
        }
        Hook::Input => return Err("an edge ends at the embedding".into()),
    };
    Ok(readers.into_iter().map(|r| (writer.clone(), r)).collect())
}

/// The ground truth of a model directory that is an InterpBench case (it holds `edges.pkl`),
/// promoted to the head level; `None` for any other directory.
pub fn case_truth(dir: &Path, graph: Graph) -> Result<Option<Circuit>> {
    let path = dir.join(INTERPBENCH_EDGES);
    if !path.is_file() {
        return Ok(None);
    }
    read_edges_pkl(&path, graph, true).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_names_map_to_eap_names() {
        let g = Graph::new(2, 2, true);
        let h = |s: &str| {
            let (n, i) = split_index(s).unwrap();
            parse_hook(n, i).unwrap()
        };
        let edges = |a: &str, b: &str, promote: bool| map_edge(h(a), h(b), &g, promote).unwrap();
        assert_eq!(
            edges(
                "blocks.0.attn.hook_result[1]",
                "blocks.1.hook_k_input[0]",
                false
            ),
            vec![("a0.h1".to_string(), "a1.h0<k>".to_string())]
        );
        assert_eq!(
            edges(
                "blocks.0.attn.hook_result[1]",
                "blocks.1.hook_k_input[0]",
                true
            )
            .len(),
            3
        );
        assert_eq!(
            edges("hook_embed", "blocks.0.hook_mlp_in", false),
            vec![("input".to_string(), "m0".to_string())]
        );
        assert_eq!(
            edges("blocks.1.hook_mlp_out", "blocks.1.hook_resid_post", false),
            vec![("m1".to_string(), "logits".to_string())]
        );
        assert!(edges("blocks.0.hook_q_input[0]", "blocks.0.attn.hook_q[0]", false).is_empty());
        assert!(edges("blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out", false).is_empty());
        // A printed TorchIndex.
        assert_eq!(
            split_index("blocks.0.attn.hook_result[:, :, 3]").unwrap(),
            ("blocks.0.attn.hook_result", Some(3))
        );
        let e = map_edge(h("hook_embed"), h("blocks.0.hook_resid_post"), &g, true).unwrap_err();
        assert!(e.contains("not the last layer"), "{e}");
        assert!(parse_hook("blocks.0.attn.hook_result", None).is_err());
        assert!(parse_hook("blocks.x.hook_mlp_in", None).is_err());
    }
}
