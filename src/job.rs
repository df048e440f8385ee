//! What a command runs on, loaded by the library: a model (a directory, a hub id in the local
//! cache, or a planted model), its examples (a JSONL file or a generated task), the task's
//! metric and the ground truth.
//!
//! * [`JobSpec`] → [`load_job`] → [`Job`]: the inputs of `eap discover`, `acdc`, `attribute`
//!   and `evaluate`.
//! * [`read_truth`] and [`read_circuit`]: circuit files, checked against the model's graph.
//! * [`tokenizer_for`] and [`load_data`]: the tokenizer for text prompts, and the examples.
//!
//! Neighbours: models from [`crate::model`] and [`crate::planted`], datasets and tokenizers
//! from [`crate::tasks`], circuit files from [`crate::graph`].

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::graph::{Circuit, CircuitFile, Graph};
use crate::model::{Model, Residency};
use crate::planted::PlantedKind;
use crate::tasks::{generate, parse_edge_list, Dataset, Metric, Task, Tokenizer};
use crate::{Error, Result};

/// Where a job's examples come from: a dataset file or a task to generate.
#[derive(Debug, Clone, Default)]
pub struct Examples {
    /// A JSONL file of `{"clean", "corrupted", "answer", "wrong"}` lines.
    pub data: Option<PathBuf>,
    /// A built-in task to generate instead.
    pub task: Option<Task>,
    /// Examples to generate (tasks and planted models).
    pub n: usize,
    pub seed: u64,
    /// `data` holds a MIB task's rows (JSON lines) rather than eap's JSONL.
    pub mib_task: Option<crate::tasks::MibTask>,
    /// The MIB counterfactual column (default: the task's, as MIB).
    pub counterfactual: Option<String>,
}

/// Which model and examples a job runs on.
#[derive(Debug, Clone, Default)]
pub struct JobSpec {
    /// A model directory or hub id; without one, a planted model.
    pub model: Option<String>,
    /// The planted model when there is no `model` (default: induction).
    pub planted: Option<PlantedKind>,
    /// `tokenizer.json` for text prompts (default: beside the model, else GPT-2's).
    pub tokenizer: Option<PathBuf>,
    pub examples: Examples,
    /// Ground-truth circuit: a circuit JSON or a text file of edge names (planted models and
    /// InterpBench case folders have their own).
    pub truth: Option<PathBuf>,
    /// Where the model's weights live (`--stream-weights`).
    pub residency: Residency,
}

/// What a job runs on.
pub struct Job {
    pub model: Model,
    pub data: Dataset,
    /// The task's own metric.
    pub metric: Metric,
    pub truth: Option<Circuit>,
    /// Names the output folder: the model directory's name, or `planted-<kind>`.
    pub label: String,
    /// What a planted model computes, to print first.
    pub description: Option<String>,
}

/// Loads a model from a directory or a hub id; the error names the model.
pub fn load_model(spec: &str, device: &Device, residency: Residency) -> Result<Model> {
    Model::load_with(spec, device, residency).map_err(|e| Error::LoadModel {
        spec: spec.to_string(),
        source: Box::new(e),
    })
}

/// The tokenizer for text prompts: `path`, else `tokenizer.json` beside the model, else GPT-2's
/// when the vocabulary matches; `None` when prompts must be token ids.
pub fn tokenizer_for(model: &Model, path: Option<&Path>) -> Result<Option<Tokenizer>> {
    if let Some(path) = path {
        return Ok(Some(Tokenizer::from_file(path)?));
    }
    let beside = Path::new(&model.name).join("tokenizer.json");
    if beside.exists() {
        return Ok(Some(Tokenizer::from_file(&beside)?));
    }
    if model.cfg.d_vocab == 50257 {
        return Ok(Some(Tokenizer::gpt2()?));
    }
    Ok(None)
}

/// The examples and the metric: `metric`, else the task's (logit difference for a file). A
/// generated task is named after the task. `tok` gives the tokenizer for text, called only
/// when something is text: a JSONL file of token ids builds none (GPT-2's takes ~50 ms).
pub fn load_data(
    examples: &Examples,
    metric: Option<Metric>,
    tok: impl FnOnce() -> Result<Option<Tokenizer>>,
) -> Result<(Dataset, Metric)> {
    match (&examples.data, examples.task) {
        (Some(path), None) => {
            let data = match examples.mib_task {
                None => Dataset::from_jsonl_lazy(path, tok)?,
                Some(task) => {
                    let Some(tok) = tok()? else {
                        return Err(Error::invalid(format!(
                            "{}: MIB rows are text and need the model's tokenizer.json",
                            path.display()
                        )));
                    };
                    let cf = examples.counterfactual.as_deref();
                    crate::tasks::read_mib_jsonl(path, task, &tok, cf)?.dataset
                }
            };
            Ok((data, metric.unwrap_or(Metric::LogitDiff)))
        }
        (None, Some(task)) => {
            let tok = match tok()? {
                Some(t) => t,
                None => Tokenizer::gpt2()?,
            };
            let records = generate(task, examples.n, examples.seed, &tok)?;
            let data = Dataset::from_records(task.name(), &records, Some(&tok))?;
            Ok((data, metric.unwrap_or(task.default_metric())))
        }
        (None, None) => Err(Error::NoExamples),
        (Some(_), Some(_)) => Err(Error::SelectionChoice {
            what: "the examples",
            choices: "a dataset file or a task",
        }),
    }
}

/// Reads a circuit file made for `graph`.
pub fn read_circuit(path: &Path, graph: Graph) -> Result<CircuitFile> {
    let file = CircuitFile::read(path)?;
    graph.expect(&file.graph, path.display().to_string())?;
    Ok(file)
}

/// Reads a ground truth for `graph`: a circuit JSON (its in-graph edges), a text file of edge
/// names, or an InterpBench `edges.pkl` (promoted to the head level, as for a case folder). It
/// must hold an edge.
pub fn read_truth(path: &Path, graph: Graph) -> Result<Circuit> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("pkl"))
    {
        return crate::eval::interpbench::read_edges_pkl(path, graph, true);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let circuit = if text.trim_start().starts_with('{') {
        read_circuit(path, graph)?.circuit
    } else {
        let edges = parse_edge_list(&text, &graph, &path.display().to_string())?;
        let mut c = Circuit::empty(graph);
        for (w, r) in edges {
            c.set(w, r, true);
        }
        c
    };
    if circuit.n_edges() == 0 {
        return Err(Error::NoEdges {
            what: format!("{}: the ground truth", path.display()),
        });
    }
    Ok(circuit)
}

/// Loads what `spec` names: a model with its examples and optional ground truth, or a planted
/// model with its own task and truth.
pub fn load_job(spec: &JobSpec, device: &Device) -> Result<Job> {
    if let Some(name) = &spec.model {
        let model = load_model(name, device, spec.residency)?;
        let tok = || tokenizer_for(&model, spec.tokenizer.as_deref());
        let (data, metric) = load_data(&spec.examples, None, tok)?;
        // Without --truth, an InterpBench case folder brings its own (`edges.pkl`).
        let truth = match spec.truth.as_deref() {
            Some(p) => Some(read_truth(p, model.graph())?),
            None => crate::eval::interpbench::case_truth(Path::new(&model.name), model.graph())?,
        };
        let label = Path::new(name)
            .file_name()
            .map_or(name.clone(), |f| f.to_string_lossy().into_owned());
        return Ok(Job {
            model,
            data,
            metric,
            truth,
            label,
            description: None,
        });
    }
    if spec.examples.data.is_some() || spec.examples.task.is_some() {
        return Err(Error::PlantedWithData);
    }
    let kind = spec.planted.unwrap_or(PlantedKind::Induction);
    let built = crate::planted::build(kind, device)?;
    let (data, metric) = crate::planted::dataset(kind, spec.examples.n, spec.examples.seed)?;
    let truth = match &spec.truth {
        Some(p) => read_truth(p, built.model.graph())?,
        None => built.truth,
    };
    Ok(Job {
        model: built.model,
        data,
        metric,
        truth: Some(truth),
        label: format!("planted-{kind}"),
        description: Some(built.description),
    })
}
