//! The one error type of the library. Each variant carries what a researcher needs to fix the
//! input: the file, the tensor or node name, the expected and the found shape, the line number.
//! Messages are lower-case and short; the CLI prints the whole chain once.

use std::path::PathBuf;

/// Errors returned by every fallible function of `eap`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- files ----
    /// A file could not be opened, read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
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

    /// Anything else the caller asked for that cannot be done, with the reason.
    #[error("{0}")]
    Invalid(String),

    // ---- wrapped ----
    /// An error from the tensor engine.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The result type of the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
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
