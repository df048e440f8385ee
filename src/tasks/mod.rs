//! Tasks: the GPT-2 tokenizer, dataset generators, importers of other tools' datasets, metrics
//! and the canonical circuits.
//!
//! * [`Tokenizer`] — GPT-2's byte-level BPE, vendored and offline, or any `tokenizer.json`.
//! * [`Dataset`] of [`Example`]s (clean and corrupted token ids plus a [`Target`]) read from
//!   `eap`'s JSONL ([`Dataset::from_jsonl`]), EAP-IG's CSV or auto-circuit's JSON.
//! * [`generate`] writes [`Record`]s (JSONL lines) for the built-in [`Task`]s (IOI,
//!   Greater-Than, Docstring, Induction), seeded and reproducible; [`write_jsonl`] saves them.
//! * [`metric_value`] and [`metric_gradient`] evaluate a [`Metric`] on one row of logits per
//!   example; attribution feeds the gradient into the backward pass.
//! * [`read_mib_jsonl`] reads the MIB benchmark's task rows (IOI, MCQA, ARC, arithmetic) with
//!   MIB's column mapping and filters.
//! * [`canonical_circuit`] gives the human-found circuits that ROC curves are scored against.
//!
//! Data flows tokenizer → dataset → (model) → logits → metric; the model groups examples of
//! equal length into batches.

mod circuits;
mod dataset;
mod generate;
mod lists;
mod metric;
mod mib;
mod tokenizer;

pub use circuits::{
    canonical_circuit, canonical_circuit_mask, canonical_graph, parse_edge_list, CANONICAL_CIRCUITS,
};
pub use dataset::{year_tokens, AnswerSpec, Dataset, Example, PromptSpec, Record, TokenSpec};
pub use generate::{
    generate, generate_induction, greater_than_years, write_jsonl, Task, INDUCTION_LEN,
    PROGRESS_MIN_EXAMPLES,
};
pub use metric::{
    metric_gradient, metric_value, target_columns, KlReference, Metric, MetricValue, Target,
};
pub use mib::{read_mib_jsonl, MibImport, MibTask};
pub use tokenizer::Tokenizer;
