//! `eap`: the command-line face of the library, flag definitions and glue. Every command is a
//! few library calls ([`eap::job`] loads what it runs on); nothing numeric lives here.
//!
//! Exit codes: 0 success, 1 an error (printed once, with its causes, then a hint naming the
//! flag that helps when there is one), 2 bad usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Device;
use clap::Parser;

use eap::acdc::{hybrid, run_acdc, threshold_sweep, AcdcOptions, Persist, PruneWith, RunIdentity};
use eap::attribution::{attribute, AttributionOptions, Method};
use eap::bench::BenchOptions;
use eap::discover::{discover, DiscoverOptions};
use eap::eval::{roc_from_graph, FaithfulnessBaseline};
use eap::fsutil::write_atomic;
use eap::graph::{to_dot, Circuit, CircuitFile, Selection};
use eap::job::{load_job, read_circuit, read_truth, Examples, Job, JobSpec};
use eap::runs::{prepare, Runner, DEFAULT_MEMORY_BUDGET};
use eap::tasks::{generate, write_jsonl, Metric, Tokenizer};

use flags::*;

mod flags;

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
    let Err(err) = run(command) else {
        return ExitCode::SUCCESS;
    };
    eprintln!("error: {err:#}");
    if let Some(hint) = err.chain().find_map(|e| e.downcast_ref().and_then(hint)) {
        eprintln!("\nhint: {hint}");
    }
    ExitCode::from(1)
}

/// The flag that fixes a library error, for the errors a flag can fix.
fn hint(err: &eap::Error) -> Option<&'static str> {
    use eap::Error as E;
    Some(match err {
        E::NoIntegrationSteps => "set --ig-steps to 1 or more",
        E::NeedsCorrupted { .. } => "use --ablation corrupted, or --method eap",
        E::NoExamples => "give --data FILE.jsonl or --task NAME",
        E::PlantedWithData => "--data and --task need --model; drop them for a planted model",
        E::EmptySelection => "raise --top-n or --greedy, or lower --threshold",
        E::SelectionChoice { .. } => "--prune-with eap needs --keep N or --eap-threshold T",
        E::GraphMismatch { .. } => "check that --circuit or --truth come from --model's graph",
        E::Checkpoint { .. } => "delete the checkpoint, or run without --resume",
        _ => return None,
    })
}

impl SourceArgs {
    fn examples(&self) -> Examples {
        Examples {
            data: self.data.clone(),
            task: self.task,
            n: self.n,
            seed: self.seed,
        }
    }
}

impl JobArgs {
    fn spec(&self) -> JobSpec {
        JobSpec {
            model: self.model.clone(),
            planted: self.planted,
            tokenizer: self.source.tokenizer.clone(),
            examples: self.source.examples(),
            truth: self.truth.clone(),
        }
    }
}

impl DataArgs {
    /// The model, its examples and the metric (`--metric`, else the task's).
    fn load(&self) -> Result<(Job, Metric)> {
        let spec = JobSpec {
            model: Some(self.model.clone()),
            tokenizer: self.source.tokenizer.clone(),
            examples: self.source.examples(),
            ..Default::default()
        };
        let job = load_job(&spec, &Device::Cpu)?;
        let metric = self.metric.unwrap_or(job.metric);
        Ok((job, metric))
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

fn cmd_attribute(a: AttributeArgs) -> Result<()> {
    let (job, metric) = a.data.load()?;
    let opts = AttributionOptions {
        method: Method::new(a.method, a.ig_steps)?,
        metric,
        ablation: a.data.ablation,
        batch_size: a.data.batch_size,
        memory_budget: a.data.memory_budget << 20,
        progress: !a.json,
    };
    let att = attribute(&job.model, &job.data, &opts)?;
    let meta = att.write(&job.model, &a.out)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&meta)?);
    } else {
        print!("{}", att.summary());
        println!("wrote {}", a.out.display());
    }
    Ok(())
}

fn cmd_circuit(a: CircuitArgs) -> Result<()> {
    let mut file = CircuitFile::read(&a.scores)?;
    let selection = match (a.top_n, a.threshold, a.greedy) {
        (Some(n), None, None) => Selection::TopN(n),
        (None, Some(t), None) => Selection::Threshold(t),
        (None, None, Some(n)) => Selection::Greedy(n),
        _ => bail!("choose how to select edges: --top-n N, --threshold T or --greedy N"),
    };
    file.circuit = Circuit::select(&file.scores, selection, !a.no_prune)?;
    file.meta["selection"] = serde_json::json!({
        "top_n": a.top_n, "threshold": a.threshold, "greedy": a.greedy, "pruned": !a.no_prune,
    });
    file.write(&a.out)?;
    let (circuit, scores) = (&file.circuit, Some(&file.scores));
    if let Some(dot) = &a.dot {
        write_atomic(dot, to_dot(circuit, scores).as_bytes())?;
    }
    if let Some(svg) = &a.svg {
        write_atomic(svg, eap::report::circuit_svg(circuit, scores).as_bytes())?;
    }
    let (edges, nodes) = (circuit.n_edges(), circuit.nodes().len());
    println!("{edges} edges, {nodes} nodes: {}", a.out.display());
    Ok(())
}

fn cmd_evaluate(a: EvaluateArgs) -> Result<()> {
    let (job, metric) = a.data.load()?;
    let file = read_circuit(&a.circuit, job.model.graph())?;
    let d = &a.data;
    let runner = Runner::new(
        &job.model,
        &job.data,
        d.ablation,
        d.batch_size,
        d.memory_budget << 20,
    )?;
    let prepared = prepare(&runner)?;
    let baseline = FaithfulnessBaseline::new(&job.model, &prepared, metric)?;
    let f = baseline.of(&file.circuit)?;
    let edges = file.circuit.n_edges();
    if a.json {
        println!("{}", f.to_json(edges, metric));
    } else {
        println!("{}", f.summary(edges, metric));
    }
    Ok(())
}

fn cmd_dataset(a: DatasetArgs) -> Result<()> {
    let records = generate(a.task, a.n, a.seed, &Tokenizer::gpt2()?)?;
    write_jsonl(&records, &a.out)?;
    let (n, task, out) = (records.len(), a.task, a.out.display());
    println!("wrote {n} {task} examples to {out}");
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    let opts = BenchOptions {
        like: a.like,
        batch: a.batch,
        seq: a.seq,
        reps: a.reps,
        no_eap: a.no_eap,
        acdc_steps: a.acdc_steps,
        acdc_samples: a.acdc_samples,
        acdc_circuit_edges: a.acdc_circuit_edges,
        acdc_threshold: a.acdc_threshold,
        memory_budget: a.memory_budget << 20,
        eap_only: a.eap_only,
    };
    eap::bench::run(&opts, &Device::Cpu, &mut std::io::stdout().lock())?;
    Ok(())
}

fn cmd_roc(a: RocArgs) -> Result<()> {
    let file = CircuitFile::read(&a.scores)?;
    let truth = read_truth(&a.truth, file.graph)?;
    let roc = roc_from_graph(&file.scores, &truth)?;
    println!(
        "ROC AUC {:.4} (trapezoid), {:.4} (ACDC pessimistic) over {} edges, {} in the ground truth",
        roc.auc_trapezoid,
        roc.auc_staircase,
        file.graph.n_edges(),
        truth.n_edges()
    );
    if let Some(svg) = &a.svg {
        let picture = eap::report::roc_svg(&[("scores".to_string(), roc)]);
        write_atomic(svg, picture.as_bytes())?;
        println!("wrote {}", svg.display());
    }
    Ok(())
}

fn cmd_discover(a: DiscoverArgs) -> Result<()> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let start = Instant::now();
    let job = load_job(&a.job.spec(), &Device::Cpu)?;
    if let Some(description) = &job.description {
        println!("{description}\n");
    }
    let defaults = DiscoverOptions::default();
    let opts = DiscoverOptions {
        metric: a.metric.unwrap_or(job.metric),
        ablation: a.ablation,
        ig_steps: a.ig_steps,
        batch_size: a.batch_size,
        top_n: a.top_n,
        exact: !a.no_exact,
        acdc: !a.no_acdc,
        acdc_threshold: a.acdc_threshold.unwrap_or(defaults.acdc_threshold),
        acdc_thresholds: a.acdc_thresholds.unwrap_or(defaults.acdc_thresholds),
        hybrid_keep: a.hybrid_keep,
        progress: true,
    };
    let found = discover(&job.model, &job.data, job.truth.as_ref(), &opts)?;
    println!("{}", found.summary());
    let dir = a
        .out_dir
        .unwrap_or_else(|| PathBuf::from("eap-out").join(&job.label));
    let files = found.write(&dir, &command)?;
    let names: Vec<_> = files.iter().filter_map(|f| f.file_name()).collect();
    let names: Vec<_> = names.iter().map(|n| n.to_string_lossy()).collect();
    println!("wrote to {}/: {}", dir.display(), names.join(", "));
    println!("total {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// `EAP_ACDC_EXIT_AFTER=k`: exit the process (code 75) after k readers of this invocation —
/// lets tests interrupt a run for real and resume it.
const EXIT_AFTER_ENV: &str = "EAP_ACDC_EXIT_AFTER";

fn cmd_acdc(a: AcdcArgs) -> Result<()> {
    let spec = a.job.spec();
    let job = load_job(&spec, &Device::Cpu)?;
    let (model, data, truth) = (&job.model, &job.data, job.truth.as_ref());
    let runner = Runner::new(model, data, a.ablation, a.batch_size, DEFAULT_MEMORY_BUDGET)?;
    let prepared = prepare(&runner)?;
    let mut base = AcdcOptions {
        threshold: a.threshold.unwrap_or(0.0),
        metric: a.metric,
        initial_patched: None,
        identity: RunIdentity::of_job(&spec)?
            .with("metric", a.metric)
            .with("ablation", a.ablation)
            .with("threshold", a.threshold.unwrap_or(0.0))
            .with("batch size", a.batch_size)
            .with("prune-with", a.prune_with.map_or("none", |_| "eap"))
            .with("keep", format!("{:?}", a.keep))
            .with("eap-threshold", format!("{:?}", a.eap_threshold)),
        progress: !a.no_progress,
    };
    if let Some(PruneWith::Eap) = a.prune_with {
        // The hybrid: EAP with the task's metric prunes the graph before ACDC starts.
        let opts = AttributionOptions {
            metric: job.metric,
            ablation: a.ablation,
            batch_size: a.batch_size,
            ..Default::default()
        };
        let att = attribute(model, data, &opts)?;
        base = hybrid(&att.scores, a.keep, a.eap_threshold, base)?;
        println!(
            "EAP ({}) pre-pruning: {} of {} edges survive for ACDC ({:.2} s)",
            job.metric,
            base.start_edges(&model.graph()),
            model.graph().n_edges(),
            att.seconds
        );
    }
    if let Some(thresholds) = &a.thresholds {
        let sweep = threshold_sweep(model, &prepared, &base, thresholds, truth)?;
        print!("{}", sweep.report());
        if let Some(out) = &a.out {
            let summary = serde_json::to_string_pretty(&sweep.summary(a.metric))?;
            write_atomic(out, summary.as_bytes())?;
            println!("wrote {}", out.display());
        }
        return Ok(());
    }
    let out = a.out.expect("clap requires --out without --thresholds");
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| eap::Error::io(dir, e))?;
    }
    let persist = Persist::beside(&out, a.resume);
    let exit_after: Option<usize> = std::env::var(EXIT_AFTER_ENV)
        .ok()
        .and_then(|v| v.parse().ok());
    let result = run_acdc(model, &prepared, &base, Some(&persist), &mut |done| {
        if exit_after == Some(done) {
            std::process::exit(75);
        }
    })?;
    let mut file = result.file(model, data, a.ablation)?;
    if a.prune_with.is_some() {
        file.meta["prune_with"] =
            serde_json::json!({"method": "eap", "keep": a.keep, "eap_threshold": a.eap_threshold});
    }
    file.write(&out)?;
    print!("{}", result.report(truth)?);
    println!("wrote {} (steps: {})", out.display(), persist.log.display());
    Ok(())
}
