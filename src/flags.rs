//! The flags of the `eap` binary, one struct per command (clap derive): their names, defaults,
//! conflicts and help. A module of `src/main.rs`, not of the library; `main.rs` holds the glue
//! that hands them to the library.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use eap::acdc::PruneWith;
use eap::attribution::{attribute, AttributionOptions, Method, MethodKind};
use eap::graph::CircuitFile;
use eap::job::{load_job, Examples, Job, JobSpec};
use eap::planted::PlantedKind;
use eap::runs::Ablation;
use eap::tasks::{Metric, Task};

#[derive(Parser)]
#[command(
    name = "eap",
    version,
    about = "Edge Attribution Patching: find the circuits inside transformer language models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Show no progress on stderr (a bar on a terminal, else a line every few seconds).
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Score every edge of a model's graph on a dataset (EAP, EAP-IG, clean-corrupted).
    Attribute(AttributeArgs),
    /// Select a circuit from a scores file.
    Circuit(CircuitArgs),
    /// Faithfulness of a circuit: the metric with every other edge patched.
    Evaluate(EvaluateArgs),
    /// MIB's circuit-track scores of a scores file: CPR and CMD over MIB's edge budgets; writes
    /// MIB's submission folder with --submit.
    Mib(MibArgs),
    /// Write a task's dataset as JSONL.
    Dataset(DatasetArgs),
    /// Time forward, backward, EAP and ACDC passes on a random model of a named shape (--like).
    Bench(BenchArgs),
    /// Write a random-weight model of a named shape as a Hugging Face checkpoint (config.json,
    /// model.safetensors), for benchmarks and tests at real sizes without downloads.
    RandomModel(RandomModelArgs),
    /// The main job: exact patching, EAP and EAP-IG side by side; circuit, picture, report.
    /// With no options it runs on the embedded planted induction model.
    Discover(DiscoverArgs),
    /// ROC of a scores file against a ground-truth circuit.
    Roc(RocArgs),
    /// ACDC: remove edges one by one with exact patching while the metric moves by less than
    /// τ; `--prune-with eap` first patches the edges EAP scores low (the hybrid).
    Acdc(AcdcArgs),
}

/// Where a model's examples come from.
#[derive(Args)]
pub struct SourceArgs {
    /// tokenizer.json to use for text prompts (default: beside the model, else GPT-2's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// JSONL file of {"clean", "corrupted", "answer", "wrong"} lines.
    #[arg(long, conflicts_with = "task")]
    pub data: Option<PathBuf>,
    /// Generate a built-in task instead: ioi, greater-than, docstring, induction.
    #[arg(long)]
    pub task: Option<Task>,
    /// Examples to generate (planted models and --task).
    #[arg(long, default_value_t = 32, value_parser = examples)]
    pub n: usize,
    /// Seed of the generated examples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Read --data as a MIB task's rows (JSON lines, as `datasets` exports them): ioi, mcqa,
    /// arc-easy, arc-challenge, arithmetic-addition, arithmetic-subtraction.
    #[arg(long, requires = "data")]
    pub mib_task: Option<eap::tasks::MibTask>,
    /// MIB's counterfactual column (default: the task's, as MIB uses).
    #[arg(long, requires = "mib_task")]
    pub counterfactual: Option<String>,
}

/// Which model and examples a `discover` or `acdc` run works on.
#[derive(Args)]
pub struct JobArgs {
    /// A built-in planted-circuit model: induction, greater-than, weighted-vote.
    #[arg(long, conflicts_with = "model")]
    pub planted: Option<PlantedKind>,
    /// Model directory, InterpBench case folder or hub id (with --data or --task).
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub source: SourceArgs,
    /// Ground-truth circuit: a circuit JSON, a text file of edge names or an InterpBench
    /// edges.pkl (planted models and InterpBench case folders have their own).
    #[arg(long)]
    pub truth: Option<PathBuf>,
    /// Memory budget for one chunk's activations, in MiB (chunks shrink to fit; a budget
    /// below one example is an error).
    // Parsed into bytes.
    #[arg(long, default_value_t = 4096, value_parser = mebibytes)]
    pub memory_budget: usize,
}

#[derive(Args)]
pub struct AcdcArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// τ: remove an edge when the metric moves by less than this.
    #[arg(long, required_unless_present = "thresholds", value_parser = finite, allow_negative_numbers = true)]
    pub threshold: Option<f32>,
    /// Threshold sweep: one ACDC run per τ, each giving one ROC point (comma-separated).
    #[arg(long, value_delimiter = ',', conflicts_with = "threshold", value_parser = finite, allow_negative_numbers = true)]
    pub thresholds: Option<Vec<f32>>,
    /// ACDC's metric: kl (default, KL to the clean run; remove when Δ < τ) or a task metric
    /// (logit-diff, prob-diff, nll; remove when |Δ| < τ).
    #[arg(long, default_value = "kl")]
    pub metric: Metric,
    /// What a removed edge carries: corrupted, zero, mean, mean-positional.
    #[arg(long, default_value = "corrupted")]
    pub ablation: Ablation,
    /// Examples per chunk.
    #[arg(long, default_value_t = 32, value_parser = positive)]
    pub batch_size: usize,
    /// Pre-prune with attribution scores (the hybrid): only `eap`.
    #[arg(long)]
    pub prune_with: Option<PruneWith>,
    /// Hybrid: keep EAP's top N edges, patch the rest from the start.
    #[arg(long, requires = "prune_with", conflicts_with = "eap_threshold", value_parser = positive)]
    pub keep: Option<usize>,
    /// Hybrid: patch every edge with |EAP score| < T from the start.
    #[arg(long, requires = "prune_with", value_parser = non_negative)]
    pub eap_threshold: Option<f32>,
    /// Circuit file to write (with --thresholds: a JSON summary of the sweep). The step log
    /// (`<stem>.acdc-steps.jsonl`) and checkpoint (`<stem>.acdc-checkpoint.json`) go beside it.
    #[arg(long, required_unless_present = "thresholds")]
    pub out: Option<PathBuf>,
    /// Continue an interrupted run from its checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Show no progress (as --quiet).
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args)]
pub struct DiscoverArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// The task metric every method is scored with (default: the task's own).
    #[arg(long)]
    pub metric: Option<Metric>,
    /// What a removed edge carries: corrupted, zero, mean, mean-positional.
    #[arg(long, default_value = "corrupted")]
    pub ablation: Ablation,
    /// Integration steps of EAP-IG.
    #[arg(long, default_value_t = 5, value_parser = positive)]
    pub ig_steps: usize,
    /// Circuit size (default: the ground truth's size, else 2% of the edges).
    #[arg(long, value_parser = positive)]
    pub top_n: Option<usize>,
    /// Skip exact per-edge patching (one forward per edge) on large models.
    #[arg(long)]
    pub no_exact: bool,
    /// Skip ACDC and the EAP→ACDC hybrid (a threshold sweep of exact patches each).
    #[arg(long)]
    pub no_acdc: bool,
    /// ACDC's τ for the circuit whose faithfulness is reported, as a fraction of
    /// |M(full) − M(∅)| of the task metric (default 0.1).
    #[arg(long, value_parser = finite, allow_negative_numbers = true)]
    pub acdc_threshold: Option<f32>,
    /// ACDC's threshold sweep for the ROC, fractions of |M(full) − M(∅)| (comma-separated).
    #[arg(long, value_delimiter = ',', value_parser = finite, allow_negative_numbers = true)]
    pub acdc_thresholds: Option<Vec<f32>>,
    /// Hybrid: EAP's top edges kept for ACDC (default max(3 × top-n, 20% of edges)).
    #[arg(long, value_parser = positive)]
    pub hybrid_keep: Option<usize>,
    /// Output folder (default: eap-out/<model>).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Examples per chunk.
    #[arg(long, default_value_t = 32, value_parser = positive)]
    pub batch_size: usize,
}

#[derive(Args)]
pub struct RocArgs {
    /// Scores file (EAP-IG JSON layout, e.g. from `eap attribute`).
    #[arg(long)]
    pub scores: PathBuf,
    /// Ground-truth circuit: a circuit JSON, a text file of edge names, or an InterpBench
    /// edges.pkl.
    #[arg(long)]
    pub truth: PathBuf,
    /// Also write the ROC curve as SVG.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Accept a file that lists only some edges: the others read as score 0 and out of the
    /// circuit (how many is said on stderr). Without it such a file is an error.
    #[arg(long)]
    pub allow_missing: bool,
}

/// A model and its examples, for `attribute` and `evaluate`.
#[derive(Args)]
pub struct DataArgs {
    /// Model directory (config.json + model.safetensors or a TransformerLens *.pth), an
    /// InterpBench case folder (ll_model.pth + ll_model_cfg.pkl), or a hub id in the local HF
    /// cache.
    #[arg(long)]
    pub model: String,
    #[command(flatten)]
    pub source: SourceArgs,
    /// Keep the weights memory-mapped in their stored dtype and convert one layer at a time in
    /// each pass: the peak memory stays near one layer, not the whole model in f32. Each pass
    /// pays the conversion: right for attribution's passes (EAP's corrupted and clean runs share
    /// one, the backward another), slow for evaluate's many patched runs. `attribute` streams without it when EAP (or clean-corrupted) runs in one
    /// chunk; models over 8 GB in f32 always stream.
    #[arg(long)]
    pub stream_weights: bool,
    /// Metric: logit-diff, prob-diff, kl, nll (default: the task's, else logit-diff).
    #[arg(long)]
    pub metric: Option<Metric>,
    /// What a removed edge carries: corrupted, zero, mean, mean-positional.
    #[arg(long, default_value = "corrupted")]
    pub ablation: Ablation,
    /// Examples per chunk (lowered further to fit --memory-budget).
    #[arg(long, default_value_t = 32, value_parser = positive)]
    pub batch_size: usize,
    /// Memory budget for one chunk's activations, in MiB.
    // Parsed into bytes.
    #[arg(long, default_value_t = 4096, value_parser = mebibytes)]
    pub memory_budget: usize,
}

#[derive(Args)]
pub struct AttributeArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// eap, eap-ig or clean-corrupted.
    #[arg(long, default_value = "eap")]
    pub method: MethodKind,
    /// Integration steps of eap-ig.
    #[arg(long, default_value_t = 5, value_parser = positive)]
    pub ig_steps: usize,
    /// Scores file to write (EAP-IG's JSON layout plus `meta`).
    #[arg(long)]
    pub out: PathBuf,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub products: ProductsArg,
}

/// `--products`, for the commands that time or run attribution.
#[derive(Args)]
pub struct ProductsArg {
    /// Precision of the layers' weight products and of the contraction: f32, or bf16 (inputs
    /// rounded to bf16, sums in f32; the norms and the attention pattern stay f32). bf16 runs those products at twice the f32 rate on CPUs with AVX512-BF16, keeps Δ
    /// in half the memory there, and gives the same numbers, slower, elsewhere; scores then
    /// differ from f32 by ~1% of the largest.
    #[arg(long, default_value = "f32")]
    pub products: eap::model::bf16::Products,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("select").required(true)))]
pub struct CircuitArgs {
    /// Scores file written by `eap attribute`.
    #[arg(long)]
    pub scores: PathBuf,
    /// Keep the N edges with the largest |score|.
    #[arg(long, group = "select", value_parser = positive)]
    pub top_n: Option<usize>,
    /// Keep edges with |score| ≥ T.
    #[arg(long, group = "select", value_parser = finite, allow_negative_numbers = true)]
    pub threshold: Option<f32>,
    /// Grow N edges greedily from the logits (connected).
    #[arg(long, group = "select", value_parser = positive)]
    pub greedy: Option<usize>,
    /// Do not remove edges of nodes that lost all their inputs or outputs.
    #[arg(long)]
    pub no_prune: bool,
    /// Circuit file to write (the scores with `in_graph` marking the circuit; `-`: stdout).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write Graphviz DOT.
    #[arg(long)]
    pub dot: Option<PathBuf>,
    /// Also write an SVG picture (no graphviz needed).
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Accept a file that lists only some edges: the others read as score 0 and out of the
    /// circuit (how many is said on stderr). Without it such a file is an error.
    #[arg(long)]
    pub allow_missing: bool,
}

#[derive(Args)]
pub struct EvaluateArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Circuit file (EAP-IG JSON layout).
    #[arg(long)]
    pub circuit: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Accept a file that lists only some edges: the others read as score 0 and out of the
    /// circuit (how many is said on stderr). Without it such a file is an error.
    #[arg(long)]
    pub allow_missing: bool,
}

#[derive(Args)]
pub struct MibArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Scores file (EAP-IG JSON layout, e.g. from `eap attribute`); or give --method.
    #[arg(long, required_unless_present = "method", conflicts_with = "method")]
    pub scores: Option<PathBuf>,
    /// Run this method on --model and --data instead of reading --scores: eap, eap-ig,
    /// eap-ig-activations or clean-corrupted (with --ablation as the run's ablation).
    #[arg(long)]
    pub method: Option<MethodKind>,
    /// Integration steps of eap-ig and eap-ig-activations (with --method).
    #[arg(long, default_value_t = 5, value_parser = positive, requires = "method")]
    pub ig_steps: usize,
    /// Also write the method's scores file here (with --method).
    #[arg(long, requires = "method")]
    pub scores_out: Option<PathBuf>,
    /// Write the scores, CPR, CMD and every budget's values as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also draw both faithfulness curves as SVG.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Write MIB's submission layout under this folder: <task>_<model>/importances.json.
    #[arg(long, requires_all = ["task_name", "model_name"])]
    pub submit: Option<PathBuf>,
    /// The task's name in the submission (ioi, mcqa, arithmetic_addition, …).
    #[arg(long)]
    pub task_name: Option<String>,
    /// The model's name in the submission (gpt2, qwen2.5, gemma2, llama3, interpbench).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Print the JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct DatasetArgs {
    /// ioi, greater-than, docstring or induction.
    pub task: Task,
    /// Examples to generate.
    #[arg(long, default_value_t = 100, value_parser = examples)]
    pub n: usize,
    /// Seed of the generator (the same seed gives the same file).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The JSONL file to write (`-`: standard output).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct BenchArgs {
    /// The random model's shape: gpt2 (GPT-2 small), qwen2.5-0.5b, llama-3.1-8b, gemma-2-2b,
    /// pythia-160m.
    #[arg(long, default_value = "gpt2", value_parser = clap::builder::PossibleValuesParser::new(eap::model::random::PRESETS))]
    pub like: String,
    /// Sequences in the timed batch.
    #[arg(long, default_value_t = 32, value_parser = positive)]
    pub batch: usize,
    /// Tokens per sequence (at most the shape's context length).
    #[arg(long, default_value_t = 16, value_parser = positive)]
    pub seq: usize,
    /// Timed repetitions (the best is reported).
    #[arg(long, default_value_t = 3, value_parser = positive)]
    pub reps: usize,
    /// Skip the EAP timing.
    #[arg(long)]
    pub no_eap: bool,
    /// Time this many ACDC tentative patches (exact patched forwards) at each point, 0 to skip.
    #[arg(long, default_value_t = 8)]
    pub acdc_steps: usize,
    /// Points of the visit order, spread evenly over the edges, where ACDC steps are timed
    /// (0: only from the start).
    #[arg(long, default_value_t = 8)]
    pub acdc_samples: usize,
    /// Edges of the circuit the readers above each point keep (EAP's top edges).
    #[arg(long, default_value_t = 1000)]
    pub acdc_circuit_edges: usize,
    /// ACDC's τ on the KL divergence in the ACDC timing.
    #[arg(long, default_value_t = 1e-4, value_parser = finite, allow_negative_numbers = true)]
    pub acdc_threshold: f32,
    /// Memory budget for one chunk of EAP's activations and for the timed batch, in MiB.
    // Parsed into bytes.
    #[arg(long, default_value_t = 4096, value_parser = mebibytes)]
    pub memory_budget: usize,
    /// Time only EAP (so the process's peak memory is EAP's).
    #[arg(long, conflicts_with = "no_eap")]
    pub eap_only: bool,
    #[command(flatten)]
    pub products: ProductsArg,
}

#[derive(Args)]
pub struct RandomModelArgs {
    /// The shape: its published config.json is written with random weights.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(eap::model::random::PRESETS))]
    pub like: String,
    /// Keep only the first N layers (the same weights as the full model's first N).
    #[arg(long, value_parser = positive)]
    pub layers: Option<usize>,
    /// Storage type of the weights.
    #[arg(long, value_enum, default_value_t = StoredDtypeArg::Bf16)]
    pub dtype: StoredDtypeArg,
    /// Seed of the weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The directory to write (created if missing; config.json and model.safetensors in it
    /// are replaced).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum StoredDtypeArg {
    F32,
    F16,
    Bf16,
}

impl RandomModelArgs {
    /// Writes the checkpoint, reporting progress on stderr.
    pub fn run(self) -> anyhow::Result<()> {
        use eap::model::random::{write_random_checkpoint, StoredDtype};
        let dtype = match self.dtype {
            StoredDtypeArg::F32 => StoredDtype::F32,
            StoredDtypeArg::F16 => StoredDtype::F16,
            StoredDtypeArg::Bf16 => StoredDtype::Bf16,
        };
        // The total is known once the header is laid out, at the first tensor.
        let mut progress: Option<eap::progress::Progress> = None;
        let mut shown = 0;
        let written = write_random_checkpoint(
            &self.like,
            self.layers,
            dtype,
            self.seed,
            &self.out,
            &mut |done, total| {
                let mb = |b: u64| (b / 1_000_000) as usize;
                progress
                    .get_or_insert_with(|| {
                        eap::progress::Progress::new(true, "writing weights", mb(total), "MB")
                    })
                    .inc(mb(done) - shown);
                shown = mb(done);
            },
        )?;
        if let Some(p) = progress {
            p.finish();
        }
        out!(
            "{}: {} tensors, {:.3} B parameters, {:.2} GB",
            written.weights.display(),
            written.n_tensors,
            written.n_params as f64 / 1e9,
            written.bytes as f64 / 1e9
        );
        out!("wrote {}", written.config.display());
        Ok(())
    }
}

// From flags to the library's descriptions of a job (ripgrep's low-to-high step).

impl SourceArgs {
    pub fn examples(&self) -> Examples {
        Examples {
            data: self.data.clone(),
            task: self.task,
            n: self.n,
            seed: self.seed,
            mib_task: self.mib_task,
            counterfactual: self.counterfactual.clone(),
        }
    }
}

impl JobArgs {
    pub fn spec(&self) -> JobSpec {
        JobSpec {
            model: self.model.clone(),
            planted: self.planted,
            tokenizer: self.source.tokenizer.clone(),
            examples: self.source.examples(),
            truth: self.truth.clone(),
            // ACDC and discover run many patched passes: weights resident unless too large.
            residency: eap::model::Residency::Auto,
        }
    }
}

impl AttributeArgs {
    /// The job, its metric and the method, with the layers where the run is fastest: loaded
    /// streamed, and made resident unless EAP (or clean-corrupted) runs in one chunk. Its
    /// passes convert each layer twice (the two forwards in lockstep, then the backward; the
    /// next layer on a helper thread), which costs less than converting it once
    /// into fresh f32 memory that stays resident: first touches of new pages dominate on the
    /// VMs measured (docs/performance.md, 2026-12-04). More chunks, or EAP-IG's passes per
    /// step, repay one conversion.
    pub fn load(&self) -> anyhow::Result<(Job, Metric, Method)> {
        let (mut job, metric) = self.data.load(true)?;
        let method = Method::new(self.method, self.ig_steps)?;
        let d = &self.data;
        let chunks = eap::runs::chunk_count(&job.model, &job.data, d.batch_size, d.memory_budget)?;
        let few_passes = chunks == 1 && matches!(method, Method::Eap | Method::CleanCorrupted);
        if !d.stream_weights && !few_passes {
            job.model.make_layers_resident()?;
        }
        job.model.set_products(self.products.products);
        Ok((job, metric, method))
    }
}

impl DataArgs {
    /// The model, its examples and the metric (`--metric`, else the task's). `few_passes`
    /// (attribution) loads the weights streamed, leaving the caller to make the layers
    /// resident once it knows the passes are many ([`eap::model::Model::make_layers_resident`]);
    /// evaluations, with a pass per point of their curves, convert them once.
    pub fn load(&self, few_passes: bool) -> anyhow::Result<(Job, Metric)> {
        let spec = JobSpec {
            model: Some(self.model.clone()),
            tokenizer: self.source.tokenizer.clone(),
            examples: self.source.examples(),
            residency: match (self.stream_weights, few_passes) {
                (true, _) => eap::model::Residency::Streamed,
                (false, true) => eap::model::Residency::Streamed,
                (false, false) => eap::model::Residency::Auto,
            },
            ..Default::default()
        };
        let job = load_job(&spec, &candle_core::Device::Cpu)?;
        let metric = self.metric.unwrap_or(job.metric);
        Ok((job, metric))
    }
}

impl MibArgs {
    /// The scores' name in errors: the file, or the method run.
    pub fn scores_name(&self) -> String {
        match (&self.scores, self.method) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(m)) => match clap::ValueEnum::to_possible_value(&m) {
                Some(v) => format!("the scores of --method {}", v.get_name()),
                None => "the method's scores".into(),
            },
            (None, None) => "the scores".into(),
        }
    }

    /// ROC AUC (eap's sweep over every |score|, trapezoid) of the scores against the job's
    /// ground truth, when it has one (an InterpBench case folder's `edges.pkl`). Not MIB's
    /// InterpBench AUROC, which takes greedy circuits at its ten budgets.
    pub fn truth_auc(job: &Job, file: &CircuitFile) -> anyhow::Result<Option<f64>> {
        let Some(truth) = &job.truth else {
            return Ok(None);
        };
        Ok(Some(
            eap::eval::roc_from_graph(&file.scores, truth)?.auc_trapezoid,
        ))
    }

    /// The scores to evaluate: --scores read (missing edges refused, as MIB needs every edge),
    /// or --method run on the job, its file written to --scores-out.
    pub fn scores_file(&self, job: &Job, metric: Metric) -> anyhow::Result<CircuitFile> {
        let (Some(kind), None) = (self.method, &self.scores) else {
            let path = self.scores.as_deref().expect("clap: --scores or --method");
            return crate::output::read_scores(path, false);
        };
        let opts = AttributionOptions {
            method: Method::new(kind, self.ig_steps)?,
            metric,
            ablation: self.data.ablation,
            batch_size: self.data.batch_size,
            memory_budget: self.data.memory_budget,
            progress: !self.json,
        };
        let att = attribute(&job.model, &job.data, &opts)?;
        eprintln!("{}", att.summary().trim_end());
        let file = att.to_file(&job.model)?;
        if let Some(out) = &self.scores_out {
            file.write(out)?;
            eprintln!("wrote {}", out.display());
        }
        Ok(file)
    }
}

impl BenchArgs {
    pub fn options(&self) -> eap::bench::BenchOptions {
        eap::bench::BenchOptions {
            like: self.like.clone(),
            batch: self.batch,
            seq: self.seq,
            reps: self.reps,
            no_eap: self.no_eap,
            acdc_steps: self.acdc_steps,
            acdc_samples: self.acdc_samples,
            acdc_circuit_edges: self.acdc_circuit_edges,
            acdc_threshold: self.acdc_threshold,
            memory_budget: self.memory_budget,
            eap_only: self.eap_only,
            products: self.products.products,
        }
    }
}

/// Most examples `--n` may generate: ten million prompts are already gigabytes of tokens and
/// activations; more is a typo (an `--n 18446744073709551615` would overflow an allocation).
pub const MAX_EXAMPLES: usize = 10_000_000;

/// A count that must be at least 1 (`--batch-size 0` would loop forever or do nothing).
fn positive(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|e| format!("`{s}` is not a whole number: {e}"))?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

/// A number of examples: at least 1 and at most [`MAX_EXAMPLES`].
fn examples(s: &str) -> Result<usize, String> {
    let n = positive(s)?;
    if n > MAX_EXAMPLES {
        return Err(format!("at most {MAX_EXAMPLES} examples, found {n}"));
    }
    Ok(n)
}

/// A size in MiB, returned in bytes; one whose bytes do not fit a `usize` is refused (a
/// shift by 20 would silently wrap it to a tiny budget).
fn mebibytes(s: &str) -> Result<usize, String> {
    let mib = positive(s)?;
    mib.checked_mul(1 << 20)
        .ok_or_else(|| format!("at most {} MiB, found {mib}", usize::MAX >> 20))
}

/// A finite number (NaN and infinities make every comparison with it meaningless).
fn finite(s: &str) -> Result<f32, String> {
    let x: f32 = s
        .parse()
        .map_err(|e| format!("`{s}` is not a number: {e}"))?;
    if !x.is_finite() {
        return Err(format!("must be a finite number, found {s}"));
    }
    Ok(x)
}

/// A finite number that is zero or more.
fn non_negative(s: &str) -> Result<f32, String> {
    let x = finite(s)?;
    if x < 0.0 {
        return Err(format!("must be zero or more, found {s}"));
    }
    Ok(x)
}
