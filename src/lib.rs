//! # eap — Edge Attribution Patching and automated circuit discovery
//!
//! Finds the circuits inside transformer language models (Syed, Rager & Conmy 2023,
//! "Attribution Patching Outperforms Automated Circuit Discovery", arXiv:2310.10348).
//!
//! Data flows one way, one module per stage:
//!
//! * [`model`] — configurations, weight formats (Hugging Face GPT-2, TransformerLens), the forward
//!   pass with per-writer caches and per-reader interventions, and the activation-only backward.
//! * [`graph`] — writers, readers and edges (DESIGN §2), scores, circuits, selection, file formats.
//! * [`attribution`] — EAP, EAP-IG and the clean-corrupted variant: model + task → scores.
//! * [`patching`] — exact edge patching, ACDC, the EAP→ACDC hybrid, faithfulness.
//! * [`tasks`] — the GPT-2 tokenizer, dataset generators, importers and metrics.
//! * [`eval`] — ROC/AUC against ground truths, faithfulness curves, correlation with patching.
//! * [`report`] — SVG pictures and the HTML report.
//! * [`planted`] — models whose circuits are known by construction, with their tasks.
//! * [`discover`] — the main job: methods side by side against a ground truth.

pub mod acdc;
pub mod attribution;
pub mod bench;
pub mod discover;
pub mod error;
pub mod eval;
pub mod fsutil;
pub mod graph;
pub mod job;
pub mod model;
pub mod patching;
pub mod planted;
pub mod report;
pub mod runs;
pub mod tasks;

pub use error::{Error, Result};
