//! `eap`: the command-line face of the library. Flags are parsed here and handed to the
//! library; nothing numeric lives in this file.
//!
//! Exit codes: 0 success, 1 an error (printed once, with its causes), 2 bad usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};

use eap::attribution::{attribute, AttributionOptions, Method};
use eap::graph::{to_dot, Circuit, CircuitFile};
use eap::model::{Batch, ForwardOptions, Model};
use eap::patching::faithfulness_of;
use eap::runs::{Ablation, Runner};
use eap::tasks::{generate, write_jsonl, Dataset, Metric, Task, Tokenizer};

#[derive(Parser)]
#[command(
    name = "eap",
    version,
    about = "Edge Attribution Patching: find the circuits inside transformer language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Score every edge of a model's graph on a dataset (EAP, EAP-IG, clean-corrupted).
    Attribute(AttributeArgs),
    /// Select a circuit from a scores file.
    Circuit(CircuitArgs),
    /// Faithfulness of a circuit: the metric with every other edge patched.
    Evaluate(EvaluateArgs),
    /// Write a task's dataset as JSONL.
    Dataset(DatasetArgs),
    /// Time forward, backward and EAP on a GPT-2-small-shaped random model.
    Bench(BenchArgs),
    /// The main job: exact patching, EAP and EAP-IG side by side; circuit, picture, report.
    /// With no options it runs on the embedded planted induction model.
    Discover(DiscoverArgs),
    /// ROC of a scores file against a ground-truth circuit.
    Roc(RocArgs),
    /// ACDC: remove edges one by one with exact patching while the metric moves by less than
    /// τ; `--prune-with eap` first patches the edges EAP scores low (the hybrid).
    Acdc(AcdcArgs),
}

#[derive(Args)]
struct AcdcArgs {
    #[command(flatten)]
    job: JobArgs,
    /// τ: remove an edge when the metric moves by less than this.
    #[arg(long, required_unless_present = "thresholds")]
    threshold: Option<f32>,
    /// Threshold sweep: one ACDC run per τ, each giving one ROC point (comma-separated).
    #[arg(long, value_delimiter = ',', conflicts_with = "threshold")]
    thresholds: Option<Vec<f32>>,
    /// ACDC's metric: kl (default, KL to the clean run; remove when Δ < τ) or a task metric
    /// (logit-diff, prob-diff, nll; remove when |Δ| < τ).
    #[arg(long, default_value = "kl")]
    metric: Metric,
    /// What a removed edge carries: corrupted, zero, mean, mean-positional.
    #[arg(long, default_value = "corrupted")]
    ablation: Ablation,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Pre-prune with attribution scores (the hybrid): only `eap`.
    #[arg(long)]
    prune_with: Option<String>,
    /// Hybrid: keep EAP's top N edges, patch the rest from the start.
    #[arg(long, requires = "prune_with", conflicts_with = "eap_threshold")]
    keep: Option<usize>,
    /// Hybrid: patch every edge with |EAP score| < T from the start.
    #[arg(long, requires = "prune_with")]
    eap_threshold: Option<f32>,
    /// Circuit file to write (with --thresholds: a JSON summary of the sweep). The step log
    /// (`<stem>.acdc-steps.jsonl`) and checkpoint (`<stem>.acdc-checkpoint.json`) go beside it.
    #[arg(long, required_unless_present = "thresholds")]
    out: Option<PathBuf>,
    /// Continue an interrupted run from its checkpoint.
    #[arg(long)]
    resume: bool,
    #[arg(long)]
    no_progress: bool,
}

/// Which model and examples a `discover` or `acdc` run works on.
#[derive(Args)]
struct JobArgs {
    /// A built-in planted-circuit model: induction, greater-than, weighted-vote.
    #[arg(long, conflicts_with = "model")]
    planted: Option<String>,
    /// Model directory or hub id (with --data or --task).
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, conflicts_with = "task")]
    data: Option<PathBuf>,
    #[arg(long)]
    task: Option<Task>,
    /// Ground-truth circuit: a circuit JSON or a text file of edge names (planted models have
    /// their own).
    #[arg(long)]
    truth: Option<PathBuf>,
    /// Examples to generate (planted models and --task).
    #[arg(long, default_value_t = 32)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct DiscoverArgs {
    #[command(flatten)]
    job: JobArgs,
    #[arg(long)]
    metric: Option<Metric>,
    #[arg(long, default_value = "corrupted")]
    ablation: Ablation,
    #[arg(long, default_value_t = 5)]
    ig_steps: usize,
    /// Circuit size (default: the ground truth's size, else 2% of the edges).
    #[arg(long)]
    top_n: Option<usize>,
    /// Skip exact per-edge patching (one forward per edge) on large models.
    #[arg(long)]
    no_exact: bool,
    /// Skip ACDC and the EAP→ACDC hybrid (a threshold sweep of exact patches each).
    #[arg(long)]
    no_acdc: bool,
    /// ACDC's τ for the circuit whose faithfulness is reported, as a fraction of
    /// |M(full) − M(∅)| of the task metric (default 0.1).
    #[arg(long)]
    acdc_threshold: Option<f32>,
    /// ACDC's threshold sweep for the ROC, fractions of |M(full) − M(∅)| (comma-separated).
    #[arg(long, value_delimiter = ',')]
    acdc_thresholds: Option<Vec<f32>>,
    /// Hybrid: EAP's top edges kept for ACDC (default max(3 × top-n, 20% of edges)).
    #[arg(long)]
    hybrid_keep: Option<usize>,
    /// Output folder (default: eap-out/<model>).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
}

#[derive(Args)]
struct RocArgs {
    #[arg(long)]
    scores: PathBuf,
    /// Ground-truth circuit: a circuit JSON or a text file of edge names.
    #[arg(long)]
    truth: PathBuf,
    /// Also write the ROC curve as SVG.
    #[arg(long)]
    svg: Option<PathBuf>,
}

#[derive(Args)]
struct ModelArgs {
    /// Model directory (config.json + model.safetensors) or hub id in the local HF cache.
    #[arg(long)]
    model: String,
    /// tokenizer.json to use for text prompts (default: beside the model, else GPT-2's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

#[derive(Args)]
struct DataArgs {
    /// JSONL file of {"clean", "corrupted", "answer", "wrong"} lines.
    #[arg(long, conflicts_with = "task")]
    data: Option<PathBuf>,
    /// Generate a built-in task instead: ioi, greater-than, docstring, induction.
    #[arg(long)]
    task: Option<Task>,
    /// Examples to generate with --task.
    #[arg(long, default_value_t = 32)]
    n: usize,
    /// Seed for --task.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Metric: logit-diff, prob-diff, kl, nll (default: the task's, else logit-diff).
    #[arg(long)]
    metric: Option<Metric>,
    /// What a removed edge carries: corrupted, zero, mean, mean-positional.
    #[arg(long, default_value = "corrupted")]
    ablation: Ablation,
    /// Examples per chunk (lowered further to fit --memory-budget).
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Memory budget for one chunk's activations, in MiB.
    #[arg(long, default_value_t = 4096)]
    memory_budget: usize,
}

#[derive(Args)]
struct AttributeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// eap, eap-ig or clean-corrupted.
    #[arg(long, default_value = "eap")]
    method: String,
    /// Integration steps of eap-ig.
    #[arg(long, default_value_t = 5)]
    ig_steps: usize,
    /// Scores file to write (EAP-IG's JSON layout plus `meta`).
    #[arg(long)]
    out: PathBuf,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CircuitArgs {
    /// Scores file written by `eap attribute`.
    #[arg(long)]
    scores: PathBuf,
    /// Keep the N edges with the largest |score|.
    #[arg(long, group = "select")]
    top_n: Option<usize>,
    /// Keep edges with |score| ≥ T.
    #[arg(long, group = "select")]
    threshold: Option<f32>,
    /// Grow N edges greedily from the logits (connected).
    #[arg(long, group = "select")]
    greedy: Option<usize>,
    /// Do not remove edges of nodes that lost all their inputs or outputs.
    #[arg(long)]
    no_prune: bool,
    #[arg(long)]
    out: PathBuf,
    /// Also write Graphviz DOT.
    #[arg(long)]
    dot: Option<PathBuf>,
    /// Also write an SVG picture (no graphviz needed).
    #[arg(long)]
    svg: Option<PathBuf>,
}

#[derive(Args)]
struct EvaluateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Circuit file (EAP-IG JSON layout).
    #[arg(long)]
    circuit: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DatasetArgs {
    /// ioi, greater-than, docstring or induction.
    task: Task,
    #[arg(long, default_value_t = 100)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 16)]
    seq: usize,
    /// Timed repetitions (the best is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Skip the EAP timing.
    #[arg(long)]
    no_eap: bool,
    /// Time this many ACDC tentative patches (exact patched forwards) at each point, 0 to skip.
    #[arg(long, default_value_t = 8)]
    acdc_steps: usize,
    /// Points of the visit order, spread evenly over the edges, where ACDC steps are timed
    /// (0: only from the start).
    #[arg(long, default_value_t = 8)]
    acdc_samples: usize,
    /// Edges of the circuit the readers above each point keep (EAP's top edges).
    #[arg(long, default_value_t = 1000)]
    acdc_circuit_edges: usize,
    /// ACDC's τ on the KL divergence in the ACDC timing.
    #[arg(long, default_value_t = 1e-4)]
    acdc_threshold: f32,
    /// Memory budget for one chunk of EAP's activations, in MiB.
    #[arg(long, default_value_t = 4096)]
    memory_budget: usize,
    /// Time only EAP (so the process's peak memory is EAP's).
    #[arg(long, conflicts_with = "no_eap")]
    eap_only: bool,
}

/// glibc hands every allocation above 128 KiB to `mmap` and back to the kernel on free, so each
/// activation buffer of a forward pass (megabytes, freed a few ops later) is faulted in and zeroed
/// afresh: ~12% of a GPT-2-sized backward went to page faults. Raising the thresholds keeps
/// freed buffers in the heap for reuse.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    // No arguments: the main job, with `eap discover`'s defaults.
    let command = match Cli::parse().command {
        Some(command) => command,
        None => Cli::parse_from(["eap", "discover"])
            .command
            .expect("`discover` is a command"),
    };
    match run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Discover(a) => cmd_discover(a),
        Command::Roc(a) => cmd_roc(a),
        Command::Acdc(a) => cmd_acdc(a),
        Command::Attribute(a) => cmd_attribute(a),
        Command::Circuit(a) => cmd_circuit(a),
        Command::Evaluate(a) => cmd_evaluate(a),
        Command::Dataset(a) => cmd_dataset(a),
        Command::Bench(a) => cmd_bench(a),
    }
}

fn device() -> Device {
    Device::Cpu
}

fn load_model(args: &ModelArgs) -> Result<Model> {
    Model::load(&args.model, &device()).with_context(|| format!("loading model `{}`", args.model))
}

/// The tokenizer for text prompts: `--tokenizer`, else `tokenizer.json` beside the model, else
/// GPT-2's when the vocabulary matches; `None` when prompts must be token ids.
fn tokenizer_for(args: &ModelArgs, model: &Model) -> Result<Option<Tokenizer>> {
    if let Some(path) = &args.tokenizer {
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

fn load_data(args: &DataArgs, tok: Option<&Tokenizer>) -> Result<(Dataset, Metric)> {
    match (&args.data, args.task) {
        (Some(path), None) => {
            let data = Dataset::from_jsonl(path, tok)?;
            Ok((data, args.metric.unwrap_or(Metric::LogitDiff)))
        }
        (None, Some(task)) => {
            let tok = match tok {
                Some(t) => t.clone(),
                None => Tokenizer::gpt2()?,
            };
            let records = generate(task, args.n, args.seed, &tok)?;
            let dir = std::env::temp_dir().join(format!("eap-task-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let path = dir.join(format!("{task}.jsonl"));
            write_jsonl(&records, &path)?;
            let data = Dataset::from_jsonl(&path, Some(&tok))?;
            std::fs::remove_dir_all(&dir).ok();
            Ok((data, args.metric.unwrap_or(task.default_metric())))
        }
        (None, None) => bail!("give the examples with --data FILE.jsonl or --task NAME"),
        (Some(_), Some(_)) => unreachable!("clap rejects --data with --task"),
    }
}

fn cmd_attribute(a: AttributeArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let tok = tokenizer_for(&a.model, &model)?;
    let (data, metric) = load_data(&a.data, tok.as_ref())?;
    let opts = AttributionOptions {
        method: Method::parse(&a.method, a.ig_steps)?,
        metric,
        ablation: a.data.ablation,
        batch_size: a.data.batch_size,
        memory_budget: a.data.memory_budget << 20,
        progress: !a.json,
    };
    let att = attribute(&model, &data, &opts)?;
    let mut meta = att.meta();
    meta["model"] = serde_json::json!(model.name);
    meta["d_model"] = serde_json::json!(model.cfg.d_model);
    let graph = model.graph();
    let file = CircuitFile::new(att.scores.clone(), Circuit::full(graph), meta.clone())?;
    file.write(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&meta)?);
    } else {
        println!(
            "{}: {} edges scored on {} examples in {:.2} s ({} metric: clean {:.4}{})",
            att.method.name(),
            graph.n_edges(),
            att.n_examples,
            att.seconds,
            att.metric,
            att.clean_metric,
            att.corrupted_metric
                .map(|c| format!(", corrupted {c:.4}"))
                .unwrap_or_default()
        );
        let mut top: Vec<(usize, usize)> = graph.edges().collect();
        top.sort_by(|x, y| {
            att.scores
                .get(y.0, y.1)
                .abs()
                .total_cmp(&att.scores.get(x.0, x.1).abs())
        });
        println!("top edges by |score|:");
        for &(w, r) in top.iter().take(10) {
            println!(
                "  {:>+10.5}  {}",
                att.scores.get(w, r),
                graph.edge_name(w, r)
            );
        }
        println!("wrote {}", a.out.display());
    }
    Ok(())
}

fn cmd_circuit(a: CircuitArgs) -> Result<()> {
    let file = CircuitFile::read(&a.scores)?;
    let scores = &file.scores;
    let circuit = match (a.top_n, a.threshold, a.greedy) {
        (Some(n), None, None) => Circuit::top_n(scores, n),
        (None, Some(t), None) => Circuit::threshold(scores, t),
        (None, None, Some(n)) => Circuit::greedy(scores, n),
        _ => bail!("choose how to select edges: --top-n N, --threshold T or --greedy N"),
    };
    let circuit = if a.no_prune { circuit } else { circuit.prune() };
    if circuit.n_edges() == 0 {
        bail!("the selection left no edges (after pruning); raise --top-n or lower --threshold");
    }
    let mut meta = file.meta.clone();
    meta["selection"] = serde_json::json!({
        "top_n": a.top_n, "threshold": a.threshold, "greedy": a.greedy, "pruned": !a.no_prune,
    });
    let out = CircuitFile::new(scores.clone(), circuit.clone(), meta)?;
    out.write(&a.out)?;
    if let Some(dot) = &a.dot {
        std::fs::write(dot, to_dot(&circuit, Some(scores)))
            .with_context(|| format!("writing {}", dot.display()))?;
    }
    if let Some(svg) = &a.svg {
        std::fs::write(svg, eap::report::circuit_svg(&circuit, Some(scores)))
            .with_context(|| format!("writing {}", svg.display()))?;
    }
    println!(
        "{} edges, {} nodes: {}",
        circuit.n_edges(),
        circuit.nodes().len(),
        a.out.display()
    );
    Ok(())
}

fn cmd_evaluate(a: EvaluateArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let tok = tokenizer_for(&a.model, &model)?;
    let (data, metric) = load_data(&a.data, tok.as_ref())?;
    let file = CircuitFile::read(&a.circuit)?;
    if file.graph != model.graph() {
        bail!(
            "{} is a circuit of a {}-layer {}-head graph but the model has {} layers and {} heads",
            a.circuit.display(),
            file.graph.n_layers,
            file.graph.n_heads,
            model.cfg.n_layers,
            model.cfg.n_heads
        );
    }
    let runner = Runner::new(
        &model,
        &data,
        a.data.ablation,
        a.data.batch_size,
        a.data.memory_budget << 20,
    )?;
    let f = faithfulness_of(&runner, metric, &file.circuit)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"edges": file.circuit.n_edges(), "metric": metric.to_string(), "m_circuit": f.circuit, "m_empty": f.empty, "m_full": f.full, "faithfulness": f.faithfulness})
        );
    } else {
        println!(
            "circuit of {} edges: {metric} full {:.4}, empty {:.4}, circuit {:.4} -> faithfulness {:.3}",
            file.circuit.n_edges(),
            f.full,
            f.empty,
            f.circuit,
            f.faithfulness
        );
    }
    Ok(())
}

fn cmd_dataset(a: DatasetArgs) -> Result<()> {
    let tok = Tokenizer::gpt2()?;
    let records = generate(a.task, a.n, a.seed, &tok)?;
    write_jsonl(&records, &a.out)?;
    println!(
        "wrote {} {} examples to {}",
        records.len(),
        a.task,
        a.out.display()
    );
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    let dev = device();
    let cfg = eap::model::random::gpt2_small_config();
    let t = Instant::now();
    let model = eap::model::random::random_model(&cfg, 0, &dev)?;
    println!(
        "GPT-2-small-shaped random model built in {:.2} s; batch {} x {} tokens, {} threads",
        t.elapsed().as_secs_f64(),
        a.batch,
        a.seq,
        rayon::current_num_threads()
    );
    let seqs: Vec<Vec<u32>> = (0..a.batch)
        .map(|b| {
            (0..a.seq)
                .map(|p| ((b * 7919 + p * 104729) % cfg.d_vocab) as u32)
                .collect()
        })
        .collect();
    let batch = Batch::new(&seqs, &dev)?;
    let n_tok = a.batch * a.seq;
    let fwd_flops = model.forward_flops(n_tok, a.seq, a.batch);
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?; // warm-up
        let mut best = f64::INFINITY;
        for _ in 0..a.reps {
            let t = Instant::now();
            f()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let gf = |flops: f64, s: f64| flops / s / 1e9;
    if !a.eap_only {
        let fwd = time(&mut || {
            model.forward(&batch, &ForwardOptions::default())?;
            Ok(())
        })?;
        let fwd_bwd = time(&mut || {
            let out = model.forward(
                &batch,
                &ForwardOptions {
                    keep_cache: true,
                    ..Default::default()
                },
            )?;
            let dl = out.logits.ones_like()?;
            model.backward(out.cache.as_ref().unwrap(), &dl, &mut |_| Ok(()))?;
            Ok(())
        })?;
        let gf = |flops: f64, s: f64| flops / s / 1e9;
        println!(
            "forward          {:>8.3} s  {:>6.1} GFLOP  {:>6.1} GFLOP/s",
            fwd,
            fwd_flops / 1e9,
            gf(fwd_flops, fwd)
        );
        // The activation-only backward does the forward's GEMMs once more, transposed.
        let fb_flops = 2.0 * fwd_flops;
        println!(
            "forward+backward {:>8.3} s  {:>6.1} GFLOP  {:>6.1} GFLOP/s",
            fwd_bwd,
            fb_flops / 1e9,
            gf(fb_flops, fwd_bwd)
        );
    }
    if !a.no_eap {
        let data = bench_data(&seqs, cfg.d_vocab);
        let g = model.graph();
        // Contraction: Σ_readers 2 · n_upstream · N · d.
        let contraction: f64 = (0..g.n_readers())
            .map(|r| 2.0 * g.n_upstream(r) as f64 * (n_tok * cfg.d_model) as f64)
            .sum();
        let eap_flops = 3.0 * fwd_flops + contraction;
        let eap_t = time(&mut || {
            attribute(
                &model,
                &data,
                &AttributionOptions {
                    memory_budget: a.memory_budget << 20,
                    ..Default::default()
                },
            )?;
            Ok(())
        })?;
        println!(
            "EAP              {:>8.3} s  {:>6.1} GFLOP  {:>6.1} GFLOP/s  ({} edges)",
            eap_t,
            eap_flops / 1e9,
            gf(eap_flops, eap_t),
            g.n_edges()
        );
    }
    // `--eap-only` measures EAP's peak memory: nothing else may run after it.
    if a.acdc_steps > 0 && !a.eap_only {
        bench_acdc(&model, &seqs, &a)?;
    }
    Ok(())
}

/// The benchmark's examples: each sequence, corrupted by shifting every token by one.
fn bench_data(seqs: &[Vec<u32>], d_vocab: usize) -> Dataset {
    let examples = seqs
        .iter()
        .map(|s| eap::tasks::Example {
            clean: s.clone(),
            corrupted: s.iter().map(|t| (t + 1) % d_vocab as u32).collect(),
            target: eap::tasks::Target {
                answers: vec![1],
                wrongs: vec![2],
            },
        })
        .collect();
    Dataset {
        name: "bench".into(),
        examples,
    }
}

/// ACDC's unit of work, one exact patched forward, timed as ACDC runs it: from the start of
/// the visit order, and at visit positions spread evenly over the edges, where the readers
/// already visited keep a sparse circuit (EAP's top edges, the size of IOI's) as ACDC would
/// leave behind.
fn bench_acdc(model: &Model, seqs: &[Vec<u32>], a: &BenchArgs) -> Result<()> {
    use eap::acdc::{time_steps, AcdcOptions};
    use eap::graph::visit_order;
    let data = bench_data(seqs, model.cfg.d_vocab);
    let runner = Runner::new(
        model,
        &data,
        Ablation::Corrupted,
        a.batch,
        eap::runs::DEFAULT_MEMORY_BUDGET,
    )?;
    let prepared = eap::runs::prepare(&runner)?;
    let g = model.graph();
    let opts = AcdcOptions {
        threshold: a.acdc_threshold,
        metric: Metric::Kl,
        ..Default::default()
    };
    let report = |what: &str, t: &eap::acdc::StepTiming| {
        println!(
            "ACDC {what:<34} {:>7.4} s per pass, {:>6.2} passes/s ({} passes, {} removed; live nodes: {} at all rows, {} at the last position; state built in {:.2} s)",
            t.seconds / t.passes.max(1) as f64,
            t.passes_per_second(),
            t.passes,
            t.removed,
            t.nodes_all_rows,
            t.nodes_last_only,
            t.build_seconds
        );
    };
    let none = vec![false; g.n_writers() * g.n_readers()];
    let top = time_steps(model, &prepared, &opts, none.clone(), 0, a.acdc_steps)?;
    report("from the start (logits first)", &top);
    if a.acdc_samples == 0 {
        return Ok(());
    }
    // The circuit above each sample point: EAP's top edges.
    let scores = attribute(
        model,
        &data,
        &AttributionOptions {
            memory_budget: a.memory_budget << 20,
            ..Default::default()
        },
    )?
    .scores;
    let kept = Circuit::top_n(&scores, a.acdc_circuit_edges);
    let order = visit_order(&g);
    let nr = g.n_readers();
    let total: usize = order.iter().map(|&r| g.n_upstream(r)).sum();
    let (mut seconds, mut passes) = (0f64, 0usize);
    for k in 0..a.acdc_samples {
        // The reader holding the edge at quantile (k + ½) / samples of the visit order.
        let target = (k as f64 + 0.5) / a.acdc_samples as f64 * total as f64;
        let (mut position, mut cum) = (0, 0usize);
        while position + 1 < order.len() && (cum + g.n_upstream(order[position])) as f64 <= target {
            cum += g.n_upstream(order[position]);
            position += 1;
        }
        let mut patched = none.clone();
        for &r in &order[..position] {
            for w in 0..g.n_upstream(r) {
                patched[w * nr + r] = !kept.contains(w, r);
            }
        }
        let t = time_steps(model, &prepared, &opts, patched, position, a.acdc_steps)?;
        report(&format!("at {}", g.reader_name(order[position])), &t);
        seconds += t.seconds;
        passes += t.passes;
    }
    println!(
        "ACDC over the graph ({} samples, {}-edge circuit above) {:.4} s per pass, {:.2} passes/s",
        a.acdc_samples,
        a.acdc_circuit_edges,
        seconds / passes.max(1) as f64,
        passes as f64 / seconds.max(1e-9)
    );
    Ok(())
}

/// Reads a ground truth: a circuit JSON (its in-graph edges) or a text file of edge names.
fn read_truth(path: &Path, graph: eap::graph::Graph) -> Result<Circuit> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let circuit = if text.trim_start().starts_with('{') {
        let file = CircuitFile::read(path)?;
        if file.graph != graph {
            bail!(
                "{}: a circuit of a {}-layer {}-head graph, but the scores/model have {} layers and {} heads",
                path.display(),
                file.graph.n_layers,
                file.graph.n_heads,
                graph.n_layers,
                graph.n_heads
            );
        }
        file.circuit
    } else {
        let edges = eap::tasks::parse_edge_list(&text, &graph, &path.display().to_string())?;
        let mut c = Circuit::empty(graph);
        for (w, r) in edges {
            c.set(w, r, true);
        }
        c
    };
    if circuit.n_edges() == 0 {
        bail!("{}: the ground truth has no edges", path.display());
    }
    Ok(circuit)
}

fn cmd_roc(a: RocArgs) -> Result<()> {
    let file = CircuitFile::read(&a.scores)?;
    let truth = read_truth(&a.truth, file.graph)?;
    let roc = eap::eval::roc_from_graph(&file.scores, &truth)?;
    println!(
        "ROC AUC {:.4} (trapezoid), {:.4} (ACDC pessimistic) over {} edges, {} in the ground truth",
        roc.auc_trapezoid,
        roc.auc_staircase,
        file.graph.n_edges(),
        truth.n_edges()
    );
    if let Some(svg) = &a.svg {
        std::fs::write(svg, eap::report::roc_svg(&[("scores".to_string(), roc)]))?;
        println!("wrote {}", svg.display());
    }
    Ok(())
}

fn cmd_discover(a: DiscoverArgs) -> Result<()> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let start = Instant::now();
    let job = load_job(&a.job)?;
    if let Some(description) = &job.description {
        println!("{description}\n");
    }
    let (model, data, truth, label) = (job.model, job.data, job.truth, job.label);
    let metric = a.metric.unwrap_or(job.metric);
    let opts = eap::discover::DiscoverOptions {
        metric,
        ablation: a.ablation,
        ig_steps: a.ig_steps,
        batch_size: a.batch_size,
        top_n: a.top_n,
        exact: !a.no_exact,
        acdc: !a.no_acdc,
        acdc_threshold: a
            .acdc_threshold
            .unwrap_or(eap::discover::DEFAULT_ACDC_THRESHOLD),
        acdc_thresholds: a
            .acdc_thresholds
            .clone()
            .unwrap_or_else(eap::discover::default_acdc_thresholds),
        hybrid_keep: a.hybrid_keep,
        progress: true,
    };
    let found = eap::discover::discover(&model, &data, truth.as_ref(), &opts)?;
    println!(
        "{} examples, metric {}: clean {:.4}{}; {} edges in the graph",
        found.n_examples,
        found.metric,
        found.clean_metric,
        found
            .corrupted_metric
            .map(|c| format!(", corrupted {c:.4}"))
            .unwrap_or_default(),
        found.n_edges
    );
    println!(
        "\ncircuit ({} top-{} edges by |score|, pruned: {} edges):",
        found.circuit_method,
        found.top_n,
        found.circuit.n_edges()
    );
    for line in found.circuit_lines() {
        println!("  {line}");
    }
    println!("\n{}", found.table());
    let dir = a
        .out_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("eap-out").join(label));
    let files = found.write(&dir, &command)?;
    println!(
        "wrote to {}/: {}",
        dir.display(),
        files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("total {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// What `discover` and `acdc` run on.
struct Job {
    model: Model,
    data: Dataset,
    /// The task's own metric.
    metric: Metric,
    truth: Option<Circuit>,
    /// Names the output folder.
    label: String,
    /// What a planted model computes, to print first.
    description: Option<String>,
}

fn load_job(a: &JobArgs) -> Result<Job> {
    match (&a.model, &a.planted) {
        (Some(spec), _) => {
            let margs = ModelArgs {
                model: spec.clone(),
                tokenizer: a.tokenizer.clone(),
            };
            let model = load_model(&margs)?;
            let tok = tokenizer_for(&margs, &model)?;
            let dargs = DataArgs {
                data: a.data.clone(),
                task: a.task,
                n: a.n,
                seed: a.seed,
                metric: None,
                ablation: Ablation::Corrupted,
                batch_size: 32,
                memory_budget: 4096,
            };
            let (data, metric) = load_data(&dargs, tok.as_ref())?;
            let truth = a
                .truth
                .as_deref()
                .map(|p| read_truth(p, model.graph()))
                .transpose()?;
            let label = Path::new(spec)
                .file_name()
                .map_or(spec.clone(), |f| f.to_string_lossy().into_owned());
            Ok(Job {
                model,
                data,
                metric,
                truth,
                label,
                description: None,
            })
        }
        (None, planted) => {
            if a.data.is_some() || a.task.is_some() {
                bail!("--data and --task need --model; planted models generate their own task");
            }
            let kind: eap::planted::PlantedKind =
                planted.as_deref().unwrap_or("induction").parse()?;
            let built = eap::planted::build(kind, &device())?;
            let (data, metric) = eap::planted::dataset(kind, a.n, a.seed)?;
            let truth = match &a.truth {
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
    }
}

/// `EAP_ACDC_EXIT_AFTER=k`: exit the process (code 75) after k readers of this invocation —
/// lets tests interrupt a run for real and resume it.
const EXIT_AFTER_ENV: &str = "EAP_ACDC_EXIT_AFTER";

fn cmd_acdc(a: AcdcArgs) -> Result<()> {
    use eap::acdc::{hybrid, rates, run_acdc, threshold_sweep, AcdcOptions, Persist};
    let Job {
        model,
        data,
        metric: task_metric,
        truth,
        ..
    } = load_job(&a.job)?;
    let runner = Runner::new(
        &model,
        &data,
        a.ablation,
        a.batch_size,
        eap::runs::DEFAULT_MEMORY_BUDGET,
    )?;
    let prepared = eap::runs::prepare(&runner)?;
    let graph = model.graph();
    let mut base = AcdcOptions {
        threshold: a.threshold.unwrap_or(0.0),
        metric: a.metric,
        initial_patched: None,
        progress: !a.no_progress,
    };
    match a.prune_with.as_deref() {
        None => {}
        Some("eap") => {
            let att = attribute(
                &model,
                &data,
                &AttributionOptions {
                    method: Method::Eap,
                    metric: task_metric,
                    ablation: a.ablation,
                    batch_size: a.batch_size,
                    memory_budget: eap::runs::DEFAULT_MEMORY_BUDGET,
                    progress: false,
                },
            )?;
            base = hybrid(&att.scores, a.keep, a.eap_threshold, base)?;
            println!(
                "EAP ({task_metric}) pre-pruning: {} of {} edges survive for ACDC ({:.2} s)",
                base.start_edges(&graph),
                graph.n_edges(),
                att.seconds
            );
        }
        Some(other) => bail!("--prune-with `{other}`: only `eap` is supported"),
    }
    if let Some(thresholds) = &a.thresholds {
        let sweep = threshold_sweep(&model, &prepared, &base, thresholds, truth.as_ref())?;
        println!(
            "{:>10} {:>7} {:>7} {:>7} {:>12} {:>8} {:>9}",
            "τ", "edges", "FPR", "TPR", "metric", "passes", "time"
        );
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.3}"));
        for p in &sweep.points {
            println!(
                "{:>10} {:>7} {:>7} {:>7} {:>12.5} {:>8} {:>8.2}s",
                p.threshold,
                p.edges,
                opt(p.fpr),
                opt(p.tpr),
                p.metric,
                p.forward_passes,
                p.seconds
            );
        }
        println!(
            "{} forward passes in {:.2} s ({:.0} passes/s)",
            sweep.forward_passes,
            sweep.seconds,
            sweep.forward_passes as f64 / sweep.seconds.max(1e-9)
        );
        if let Some(roc) = &sweep.roc {
            println!(
                "ROC AUC over the sweep: {:.4} (trapezoid), {:.4} (ACDC pessimistic)",
                roc.auc_trapezoid, roc.auc_staircase
            );
        }
        if let Some(out) = &a.out {
            let summary = serde_json::json!({
                "method": "acdc-sweep", "metric": a.metric.to_string(), "points": sweep.points,
                "roc": sweep.roc.as_ref().map(|r| serde_json::json!({"points": r.points, "auc_trapezoid": r.auc_trapezoid, "auc_pessimistic": r.auc_staircase})),
                "forward_passes": sweep.forward_passes, "seconds": sweep.seconds,
            });
            eap::fsutil::write_atomic(out, serde_json::to_string_pretty(&summary)?.as_bytes())?;
            println!("wrote {}", out.display());
        }
        return Ok(());
    }
    let out = a
        .out
        .clone()
        .expect("clap requires --out without --thresholds");
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let persist = Persist::beside(&out, a.resume);
    let exit_after: Option<usize> = std::env::var(EXIT_AFTER_ENV)
        .ok()
        .and_then(|v| v.parse().ok());
    let result = run_acdc(&model, &prepared, &base, Some(&persist), &mut |done| {
        if exit_after == Some(done) {
            std::process::exit(75);
        }
    })?;
    let mut meta = result.meta();
    meta["model"] = serde_json::json!(model.name);
    meta["d_model"] = serde_json::json!(model.cfg.d_model);
    meta["task"] = serde_json::json!(data.name);
    meta["n_examples"] = serde_json::json!(data.examples.len());
    meta["ablation"] = serde_json::json!(a.ablation.to_string());
    if a.prune_with.is_some() {
        meta["prune_with"] =
            serde_json::json!({"method": "eap", "keep": a.keep, "eap_threshold": a.eap_threshold});
    }
    CircuitFile::new(result.scores.clone(), result.circuit.clone(), meta)?.write(&out)?;
    let tried = result.steps.iter().filter(|s| s.tried).count();
    println!(
        "ACDC ({}, τ = {}): kept {} of {} edges; {} tried; metric {:.5} -> {:.5}",
        a.metric,
        result.threshold,
        result.circuit.n_edges(),
        graph.n_edges(),
        tried,
        result.initial_metric,
        result.metric
    );
    println!(
        "{} forward passes in {:.2} s ({:.0} passes/s)",
        result.forward_passes,
        result.seconds,
        result.passes_per_second()
    );
    if let Some(t) = &truth {
        let (fpr, tpr) = rates(&result.circuit, t)?;
        println!(
            "against the ground truth ({} edges): TPR {tpr:.3}, FPR {fpr:.4}",
            t.n_edges()
        );
    }
    println!("wrote {} (steps: {})", out.display(), persist.log.display());
    Ok(())
}
