//! Runs of a model over a dataset: the clean, corrupted and ablated runs every method is built
//! from, in chunks under a memory budget.
//!
//! * [`Ablation`] — what a removed edge carries: the corrupted run's activation (default), zero,
//!   the dataset mean, or the per-position mean.
//! * [`Runner`] — checks a [`Dataset`] against the model, groups it into equal-length
//!   [`Chunk`]s whose activations fit [`DEFAULT_MEMORY_BUDGET`] (or the budget given) and
//!   produces each chunk's baseline writer outputs.
//! * [`PreparedChunk`] / [`prepare`] — a chunk with its baseline and clean run kept, for the many
//!   patched forwards of exact patching ([`crate::patching`]) and ACDC ([`crate::acdc`]).
//!
//! Neighbours: [`crate::model`] runs the forwards; [`crate::attribution`] and
//! [`crate::patching`] use these runs side by side, neither through the other.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use crate::model::{Batch, ForwardOptions, Model};
use crate::tasks::{Dataset, Target};
use crate::{Error, Result};

/// What an ablated edge carries instead of the clean activation. On the command line
/// (clap's [`ValueEnum`](clap::ValueEnum)) as its [`Display`](std::fmt::Display) spells it;
/// `patching` is accepted for `corrupted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Ablation {
    /// The writer's output on the corrupted prompt (resample ablation, the default).
    #[default]
    #[value(alias = "patching")]
    Corrupted,
    /// Zero. Compiled models' circuits are often visible only to zero ablation.
    Zero,
    /// The writer's output averaged over every example and position of the dataset.
    Mean,
    /// The writer's output averaged over examples, per position (needs equal lengths).
    MeanPositional,
}

impl std::fmt::Display for Ablation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ablation::Corrupted => "corrupted",
            Ablation::Zero => "zero",
            Ablation::Mean => "mean",
            Ablation::MeanPositional => "mean-positional",
        })
    }
}

/// A chunk of examples of equal length, ready to run.
pub struct Chunk {
    pub indices: Vec<usize>,
    pub clean: Batch,
    pub corrupted: Batch,
    pub targets: Vec<Target>,
}

/// Splits a dataset into chunks and supplies ablation baselines.
pub struct Runner<'a> {
    pub model: &'a Model,
    pub data: &'a Dataset,
    pub ablation: Ablation,
    /// Examples per chunk.
    pub chunk_size: usize,
    /// Per-writer means: `[d]` (mean) or `[P, d]` (mean-positional).
    means: Option<Vec<Tensor>>,
}

/// Default memory budget for one chunk's activations (`--memory-budget`).
pub const DEFAULT_MEMORY_BUDGET: usize = 4 << 30;

impl<'a> Runner<'a> {
    /// Checks the dataset against the model and plans chunks of at most `batch_size` examples
    /// whose activations (EAP's `Δ` of every writer, the backward's caches and one layer's
    /// temporaries) fit in `memory_budget` bytes.
    pub fn new(
        model: &'a Model,
        data: &'a Dataset,
        ablation: Ablation,
        batch_size: usize,
        memory_budget: usize,
    ) -> Result<Runner<'a>> {
        if data.examples.is_empty() {
            return Err(Error::invalid(format!(
                "dataset `{}` has no examples",
                data.name
            )));
        }
        for (i, ex) in data.examples.iter().enumerate() {
            check_example(ex, &model.cfg).map_err(|message| Error::Example {
                source_name: data.name.clone(),
                line: i + 1,
                message,
            })?;
        }
        let chunk_size = chunk_size(model, data, batch_size, memory_budget)?;
        let mut runner = Runner {
            model,
            data,
            ablation,
            chunk_size,
            means: None,
        };
        if matches!(ablation, Ablation::Mean | Ablation::MeanPositional) {
            runner.means = Some(runner.compute_means()?);
        }
        Ok(runner)
    }

    /// Chunks of equal-length examples, in order of first appearance of each length.
    pub fn chunks(&self) -> Result<Vec<Chunk>> {
        let mut chunks = Vec::new();
        for indices in by_length(self.data).values() {
            // Equal-sized chunks (32 examples under a cap of 20 run as 16 + 16, not 20 + 12).
            let size = indices
                .len()
                .div_ceil(indices.len().div_ceil(self.chunk_size));
            for part in indices.chunks(size) {
                let ex = |i: &usize| &self.data.examples[*i];
                let clean: Vec<Vec<u32>> = part.iter().map(|i| ex(i).clean.clone()).collect();
                let corrupted: Vec<Vec<u32>> =
                    part.iter().map(|i| ex(i).corrupted.clone()).collect();
                chunks.push(Chunk {
                    indices: part.to_vec(),
                    clean: Batch::new(&clean, &self.model.device)?,
                    corrupted: Batch::new(&corrupted, &self.model.device)?,
                    targets: part.iter().map(|i| ex(i).target.clone()).collect(),
                });
            }
        }
        Ok(chunks)
    }

    fn compute_means(&self) -> Result<Vec<Tensor>> {
        let positional = self.ablation == Ablation::MeanPositional;
        let len = self.data.examples[0].clean.len();
        if positional && self.data.examples.iter().any(|e| e.clean.len() != len) {
            return Err(Error::invalid(
                "mean-positional ablation needs every example to have the same token length",
            ));
        }
        let d = self.model.cfg.d_model;
        let mut sums: Option<Vec<Tensor>> = None;
        let mut count = 0usize;
        for chunk in self.chunks()? {
            let out = self.model.forward(
                &chunk.clean,
                &ForwardOptions {
                    keep_writers: true,
                    ..Default::default()
                },
            )?;
            let (b, p) = (chunk.clean.batch, chunk.clean.seq_len);
            let reduced = out
                .writers
                .iter()
                .map(|w| {
                    if positional {
                        Ok(w.reshape((b, p, d))?.sum(0)?)
                    } else {
                        Ok(w.sum(0)?)
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            count += if positional { b } else { b * p };
            sums = Some(match sums {
                None => reduced,
                Some(s) => s
                    .iter()
                    .zip(&reduced)
                    .map(|(a, b)| Ok((a + b)?))
                    .collect::<Result<Vec<_>>>()?,
            });
        }
        let sums = sums.expect("dataset is not empty");
        sums.into_iter().map(|s| Ok((s / count as f64)?)).collect()
    }

    /// Each writer's baseline output for `chunk`, `[N, d]` each.
    pub fn baseline(&self, chunk: &Chunk) -> Result<Vec<Tensor>> {
        let model = self.model;
        let g = model.graph();
        let (b, p, d) = (chunk.clean.batch, chunk.clean.seq_len, model.cfg.d_model);
        let n = b * p;
        match self.ablation {
            Ablation::Corrupted => {
                let out = model.forward(
                    &chunk.corrupted,
                    &ForwardOptions {
                        keep_writers: true,
                        ..Default::default()
                    },
                )?;
                Ok(out.writers)
            }
            Ablation::Zero => {
                let z = Tensor::zeros((n, d), DType::F32, &model.device)?;
                Ok(vec![z; g.n_writers()])
            }
            Ablation::Mean | Ablation::MeanPositional => {
                let means = self.means.as_ref().expect("means computed in Runner::new");
                let w = means
                    .iter()
                    .map(|m| {
                        if self.ablation == Ablation::Mean {
                            Ok(m.unsqueeze(0)?.broadcast_as((n, d))?.contiguous()?)
                        } else {
                            Ok(m.unsqueeze(0)?.broadcast_as((b, p, d))?.reshape((n, d))?)
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(w)
            }
        }
    }
}

/// Why an example cannot run on a model of `cfg`, if it cannot.
fn check_example(
    ex: &crate::tasks::Example,
    cfg: &crate::model::ModelConfig,
) -> std::result::Result<(), String> {
    if ex.clean.len() != ex.corrupted.len() {
        return Err(format!(
            "clean has {} tokens, corrupted {}: prompts must have equal token length",
            ex.clean.len(),
            ex.corrupted.len()
        ));
    }
    if ex.clean.is_empty() {
        return Err("empty prompt".to_string());
    }
    if ex.clean.len() > cfg.n_ctx {
        return Err(format!(
            "{} tokens exceed the model's context of {}",
            ex.clean.len(),
            cfg.n_ctx
        ));
    }
    if let Some(t) = ex
        .clean
        .iter()
        .chain(&ex.corrupted)
        .find(|&&t| t as usize >= cfg.d_vocab)
    {
        return Err(format!(
            "token id {t} is outside the model's vocabulary of {}",
            cfg.d_vocab
        ));
    }
    let targets = ex.target.answers.iter().chain(&ex.target.wrongs);
    if let Some(t) = targets
        .into_iter()
        .find(|&&t| t as usize >= cfg.d_vocab_out)
    {
        return Err(format!(
            "answer token id {t} is outside the model's output vocabulary of {}",
            cfg.d_vocab_out
        ));
    }
    Ok(())
}

/// Example indices grouped by token length: a chunk holds examples of one length.
fn by_length(data: &Dataset) -> BTreeMap<usize, Vec<usize>> {
    let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, ex) in data.examples.iter().enumerate() {
        by_len.entry(ex.clean.len()).or_default().push(i);
    }
    by_len
}

/// Examples per chunk: at most `batch_size`, fewer where their activations would not fit in
/// `memory_budget` bytes; an error when not even one example fits.
fn chunk_size(
    model: &Model,
    data: &Dataset,
    batch_size: usize,
    memory_budget: usize,
) -> Result<usize> {
    let max_len = data
        .examples
        .iter()
        .map(|e| e.clean.len())
        .max()
        .unwrap_or(1);
    let per_example = bytes_per_example(model, max_len);
    if per_example > memory_budget {
        // Refused before anything is allocated: running over the budget is how a large
        // model ends with the OOM killer instead of a message.
        return Err(Error::MemoryBudget {
            tokens: max_len,
            needed: per_example,
            budget: memory_budget,
        });
    }
    Ok(batch_size
        .max(1)
        .min((memory_budget / per_example.max(1)).max(1)))
}

/// How many chunks a [`Runner`] with these settings runs `data` in (what
/// [`Runner::chunks`] returns, without building them): each chunk is a set of passes over
/// every layer, which decides whether converting the weights once pays.
pub fn chunk_count(
    model: &Model,
    data: &Dataset,
    batch_size: usize,
    memory_budget: usize,
) -> Result<usize> {
    let size = chunk_size(model, data, batch_size, memory_budget)?;
    Ok(by_length(data)
        .values()
        .map(|indices| indices.len().div_ceil(size))
        .sum())
}

/// Bytes of activations one example of `len` tokens needs during attribution.
fn bytes_per_example(model: &Model, len: usize) -> usize {
    let c = &model.cfg;
    let graph = model.graph();
    let n_w = graph.n_writers();
    // Δ, the reader gradients waiting for the contraction (up to half of Δ, at least one
    // layer's), each layer's backward cache and the baseline run's mixed values per layer
    // (the heads' Δ is taken from them).
    let pending = (n_w / 2).max(graph.readers_per_layer() + 1);
    let per_layer = 6 * c.d_model + c.n_heads * c.d_head + c.d_mlp.unwrap_or(0);
    let per_token = (n_w + pending) * c.d_model + c.n_layers * (per_layer + 4 * c.n_heads * len);
    4 * len * per_token
}

/// Rows `[n, vocab]` of logits at the metric's position as a host vector.
pub(crate) fn logits_rows(logits: &Tensor) -> Result<Vec<f32>> {
    crate::model::ops::to_vec(logits)
}

/// A chunk with everything exact patching reuses across many patched runs: its baseline
/// writer outputs and, for KL, the clean logits.
pub struct PreparedChunk {
    pub chunk: Chunk,
    pub baseline: Vec<Tensor>,
    pub clean_logits: Vec<f32>,
    /// The clean run's residual stream entering each layer (and the final one) and its writer
    /// outputs: a patched run whose lowest patched reader is in layer L starts there.
    pub(crate) clean_residuals: Vec<Tensor>,
    pub(crate) clean_writers: Vec<Tensor>,
}

/// Runs the baseline and clean forwards of every chunk once.
pub fn prepare(runner: &Runner) -> Result<Vec<PreparedChunk>> {
    runner
        .chunks()?
        .into_iter()
        .map(|chunk| {
            let baseline = runner.baseline(&chunk)?;
            let clean = runner.model.forward(
                &chunk.clean,
                &ForwardOptions {
                    keep_writers: true,
                    keep_residuals: true,
                    ..Default::default()
                },
            )?;
            Ok(PreparedChunk {
                clean_logits: logits_rows(&clean.logits)?,
                chunk,
                baseline,
                clean_residuals: clean.residuals,
                clean_writers: clean.writers,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    /// `chunk_count` counts what `Runner::chunks` builds: per token length, under a batch
    /// size and under a memory budget that holds only a few examples.
    #[test]
    fn chunk_count_matches_the_chunks_run() {
        use crate::model::{random::random_model, ModelConfig, WeightFormat};
        let cfg = ModelConfig::classic(2, 16, 4, 8, Some(24), 20, 16, WeightFormat::InMemory);
        let model = random_model(&cfg, 3, &candle_core::Device::Cpu).unwrap();
        let examples = [3usize, 3, 5, 3, 5, 3, 3]
            .iter()
            .enumerate()
            .map(|(i, &len)| crate::tasks::Example {
                clean: (0..len as u32).map(|t| (t + i as u32) % 20).collect(),
                corrupted: vec![1; len],
                target: Target {
                    answers: vec![2],
                    wrongs: vec![3],
                },
            })
            .collect();
        let data = Dataset {
            name: "lengths".into(),
            examples,
        };
        let per_example = bytes_per_example(&model, 5);
        for (batch, budget) in [(32, usize::MAX), (2, usize::MAX), (32, 2 * per_example)] {
            let runner = Runner::new(&model, &data, Ablation::Corrupted, batch, budget).unwrap();
            let built = runner.chunks().unwrap().len();
            assert_eq!(chunk_count(&model, &data, batch, budget).unwrap(), built);
            assert!(
                built >= 2,
                "{batch} {budget}: the lengths alone make two chunks"
            );
        }
        // Five examples of 3 tokens in chunks of 2, two of 5 tokens in one.
        assert_eq!(chunk_count(&model, &data, 2, usize::MAX).unwrap(), 3 + 1);
    }

    #[test]
    fn ablation_names() {
        for a in Ablation::value_variants() {
            assert_eq!(Ablation::from_str(&a.to_string(), false).unwrap(), *a);
        }
        assert_eq!(
            Ablation::from_str("patching", false).unwrap(),
            Ablation::Corrupted
        );
        assert_eq!(Ablation::MeanPositional.to_string(), "mean-positional");
        assert!(Ablation::from_str("mean_positional", false).is_err());
    }
}
