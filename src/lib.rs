//! # eap — Edge Attribution Patching and automated circuit discovery
//!
//! Finds the circuits inside transformer language models (Syed, Rager & Conmy 2023,
//! "Attribution Patching Outperforms Automated Circuit Discovery", arXiv:2310.10348).
//!
//! Data flows one way, one module per stage: model + task → runs → scores → circuit →
//! evaluation → report.
//!
//! * [`model`] — configurations, weight formats, the blocks every pass runs through, the
//!   forward pass with per-writer caches and per-reader interventions, and the activation-only
//!   backward.
//! * [`graph`] — writers, readers and edges (DESIGN §2), [`graph::Scores`],
//!   [`graph::Circuit`]s, selection, ACDC's [`graph::visit_order`], file formats.
//! * [`tasks`] — the GPT-2 tokenizer, datasets, generators, importers and metrics.
//! * [`runs`] — a dataset in chunks under a memory budget ([`runs::Runner`]), the baselines
//!   ablated edges carry ([`runs::Ablation`]), chunks prepared for many patched runs.
//! * [`attribution`] — EAP, EAP-IG and the clean-corrupted variant: runs → scores.
//! * [`patching`] — exact edge patching: the metric with a mask of edges patched, per-edge
//!   scores.
//! * [`acdc`] — ACDC on exact patching (incremental, resumable), threshold sweeps, and the
//!   EAP→ACDC hybrid.
//! * [`eval`] — ROC/AUC against ground truths, faithfulness (with `M(full)` and `M(∅)` run once,
//!   [`eval::FaithfulnessBaseline`]), curves, correlation with patching.
//! * [`report`] — SVG pictures and the HTML report.
//! * [`planted`] — models whose circuits are known by construction, with their tasks.
//! * [`discover`] — the main job: the methods side by side against a ground truth.
//! * [`job`] — what a command runs on: model, examples, metric, ground truth.
//! * [`bench`](mod@bench) — the timing harness behind `eap bench`.
//! * [`progress`] — progress of long loops on standard error (a bar, a plain log, or nothing).
//! * [`error`] — [`Error`], one enum whose variants carry the shapes, paths and names involved.
//!
//! `runs` sits below both `attribution` and `patching`, which do not use each other; no module
//! uses one that uses it back (checked by `tests/layout.rs`). The `eap` binary (`src/main.rs`,
//! `src/flags.rs`) parses flags and calls these modules.

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
pub mod progress;
pub mod report;
pub mod runs;
pub mod tasks;

pub use error::{Error, Result};
