//! The one error type of the library. Each variant carries what a researcher needs to fix the
//! input: the file, the tensor or node name, the expected and the found shape, the line number.
//! Messages are lower-case and short; the CLI prints the whole chain once.

use std::path::PathBuf;

/// Errors returned by every fallible function of `eap`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- files ----
    /// A file could not be opened, read or written. (The I/O error is part of the message, not
    /// a separate cause, so that a printed chain names it once.)
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    /// A safetensors file is malformed (truncated, bad header, bad offsets).
    #[error("{}: malformed safetensors file: {message}", path.display())]
    Safetensors { path: PathBuf, message: String },

    /// A JSON or CSV file does not parse, or holds the wrong values.
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Parse {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },

    // ---- models ----
    /// A model that could not be loaded, and why.
    #[error("loading model `{spec}`")]
    LoadModel {
        spec: String,
        #[source]
        source: Box<Error>,
    },

    /// A model configuration is inconsistent or names an unknown architecture.
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },

    /// A configuration asks for something that changes the computation and `eap` does not
    /// implement. Silently ignoring it would give wrong answers.
    #[error("{}: unsupported {field} = {value}{}", path.display(), if hint.is_empty() { String::new() } else { format!(" ({hint})") })]
    Unsupported {
        path: PathBuf,
        field: String,
        value: String,
        hint: String,
    },

    /// A pickle (`.pkl`, or the `data.pkl` inside a PyTorch `.pth`) that eap will not read:
    /// malformed, truncated, or asking for an opcode or a global outside the data-only subset
    /// eap interprets. Nothing in a pickle is ever executed.
    #[error("{}: pickle byte {offset}: {message}", path.display())]
    Pickle {
        path: PathBuf,
        offset: usize,
        message: String,
    },

    /// A PyTorch `.pth` file whose zip container or tensor records are malformed.
    #[error("{}: malformed PyTorch file: {message}", path.display())]
    Pth { path: PathBuf, message: String },

    /// A tensor the model needs is absent from the weight file.
    #[error("{}: missing tensor `{name}`", path.display())]
    MissingTensor { path: PathBuf, name: String },

    /// A tensor has a shape other than the configuration implies.
    #[error("{}: tensor `{name}` has shape {found:?}, expected {expected:?}", path.display())]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A tensor is stored in a dtype `eap` cannot compute with.
    #[error("{}: tensor `{name}` has dtype {dtype}, expected f32, f16 or bf16", path.display())]
    TensorDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },

    /// Inputs handed to a model or method have inconsistent shapes.
    #[error("shape mismatch in {op}: expected {expected}, found {found}")]
    Shape {
        op: &'static str,
        expected: String,
        found: String,
    },

    // ---- tasks and data ----
    /// A dataset example is unusable (unequal token lengths, unknown token, empty prompt).
    #[error("{source_name}: example {line}: {message}")]
    Example {
        source_name: String,
        line: usize,
        message: String,
    },

    /// A metric produced NaN or infinity; scores computed from it would be meaningless.
    #[error("metric {metric} is not finite ({value}) {context}")]
    NonFinite {
        metric: String,
        value: f32,
        context: String,
    },

    // ---- graphs and circuits ----
    /// A node or edge name that the model's graph does not contain.
    #[error("{kind} `{name}` is not in the graph of this model ({detail})")]
    UnknownName {
        kind: &'static str,
        name: String,
        detail: String,
    },

    /// A circuit, scores or ground truth made for another model's graph.
    #[error("{what} is for a graph of {found}, expected {expected}")]
    GraphMismatch {
        /// What was checked: "the circuit", "the ground truth", "ROC scores"…
        what: String,
        expected: GraphShape,
        found: GraphShape,
    },

    /// A `[n_writers, n_readers]` edge mask of the wrong length.
    #[error("{what} has {found} entries, expected {expected} (n_writers x n_readers)")]
    MaskLength {
        what: &'static str,
        expected: usize,
        found: usize,
    },

    /// A circuit or selection that holds no edge where one is needed.
    #[error("{what} has no edges")]
    NoEdges { what: String },

    /// A selection of a circuit from scores that leaves no edge.
    #[error("the selection left no edges (after pruning)")]
    EmptySelection,

    /// A selection of edges given in none, or in more than one, of its ways.
    #[error("{what}: give exactly one of {choices}")]
    SelectionChoice {
        what: &'static str,
        choices: &'static str,
    },

    /// The memory budget cannot hold the activations of a single example.
    #[error("one example of {tokens} tokens needs {} MiB of activations, over the memory budget of {} MiB", needed.div_ceil(1 << 20), budget >> 20)]
    MemoryBudget {
        tokens: usize,
        needed: usize,
        budget: usize,
    },

    // ---- methods ----
    /// EAP-IG asked for with no integration step.
    #[error("EAP-IG needs at least one integration step, found 0")]
    NoIntegrationSteps,

    /// A method that interpolates between the clean and the corrupted run, asked to run with
    /// another ablation.
    #[error("{method} interpolates between clean and corrupted runs: it needs corrupted ablation, not {ablation}")]
    NeedsCorrupted {
        method: &'static str,
        ablation: String,
    },

    /// ACDC's incremental state used out of order: a step with no reader left to visit, an
    /// accept or reject with no tentative patch.
    #[error("ACDC state: {0}")]
    AcdcState(&'static str),

    /// An ACDC checkpoint or step log that cannot be resumed from.
    #[error("{}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },

    // ---- jobs ----
    /// A job without examples: neither a dataset file nor a task to generate.
    #[error("no examples: give a dataset file or a task to generate")]
    NoExamples,

    /// A dataset or task given for a planted model, which generates its own.
    #[error("planted models generate their own task; a dataset or a task needs a model")]
    PlantedWithData,

    /// Anything else the caller asked for that cannot be done, with the reason.
    #[error("{0}")]
    Invalid(String),

    // ---- wrapped ----
    /// An error from the tensor engine.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The shape of a graph, as [`Error::GraphMismatch`] reports it (mirrors
/// [`crate::graph::Graph`], so that this module stays below every other).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphShape {
    pub layers: usize,
    pub heads: usize,
    pub mlp: bool,
    /// Parallel attention and MLP (no edges from a layer's heads to its MLP).
    pub parallel: bool,
}

impl std::fmt::Display for GraphShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mlp = if self.mlp {
            "with MLPs"
        } else {
            "attention only"
        };
        let parallel = if self.parallel {
            ", parallel attention and MLP"
        } else {
            ""
        };
        write!(
            f,
            "{} layers x {} heads, {mlp}{parallel}",
            self.layers, self.heads
        )
    }
}

/// The result type of the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }

    /// A free-form error about a bad argument or state.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid(message.into())
    }
}

/// Returns early with `Error::Invalid(format!(...))`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::Error::Invalid(format!($($arg)*)))
    };
}
