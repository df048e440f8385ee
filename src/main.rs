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
use eap::attribution::{attribute, AttributionOptions};
use eap::discover::{discover, DiscoverOptions};
use eap::eval::{roc_from_graph, FaithfulnessBaseline};
use eap::fsutil::write_atomic;
use eap::graph::{to_dot, Circuit, CircuitFile, Selection};
use eap::job::{load_job, read_truth, Job};
use eap::runs::{prepare, PreparedChunk, Runner};
use eap::tasks::{generate, write_jsonl, Metric, Tokenizer};

use flags::*;
use output::{check_outputs, is_broken_pipe, pruning_note, read_scores, Usage};

#[macro_use]
mod output;
mod flags;

/// glibc maps every allocation over 128 KiB afresh, so each activation buffer (freed a few ops
/// later) is faulted in and zeroed again: ~12% of a GPT-2 backward. Higher thresholds reuse them.
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
    // A closed stdout (`eap discover | head -1`) ends the run quietly with exit 0, as ripgrep
    // does. Rust ignores SIGPIPE, so a write to a closed pipe fails with `BrokenPipe`; every
    // line of output goes through `out!`, which returns that error instead of panicking as
    // `println!` would, and `main` counts it as success. (Restoring the default SIGPIPE
    // action instead would kill the process by signal: exit status 141, not 0, and no chance
    // to remove a temporary file.)
    // No arguments: the main job, with `eap discover`'s defaults.
    let cli = Cli::parse();
    eap::progress::set_quiet(cli.quiet);
    let command = match cli.command {
        Some(command) => command,
        None => Cli::parse_from(["eap", "discover"])
            .command
            .expect("`discover` is a command"),
    };
    let Err(err) = run(command) else {
        return ExitCode::SUCCESS;
    };
    if is_broken_pipe(&err) {
        return ExitCode::SUCCESS;
    }
    if let Some(usage) = err.downcast_ref::<Usage>() {
        eprintln!("error: {usage}\n\nFor more information, try '--help'.");
        return ExitCode::from(2);
    }
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
        E::MemoryBudget { .. } => "raise --memory-budget (MiB), or shorten the prompts",
        _ => return None,
    })
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Discover(a) => cmd_discover(a),
        Command::Roc(a) => cmd_roc(a),
        Command::Acdc(a) => cmd_acdc(a),
        Command::Attribute(a) => cmd_attribute(a),
        Command::Circuit(a) => cmd_circuit(a),
        Command::Evaluate(a) => cmd_evaluate(a),
        Command::Mib(a) => cmd_mib(a),
        Command::Dataset(a) => cmd_dataset(a),
        Command::Bench(a) => cmd_bench(a),
        Command::RandomModel(a) => a.run(),
    }
}

fn cmd_attribute(a: AttributeArgs) -> Result<()> {
    check_outputs(&[("--out", Some(&a.out), true)])?;
    let to_stdout = eap::fsutil::is_stdout(&a.out);
    let (job, metric, method) = a.load()?;
    let opts = AttributionOptions {
        method,
        metric,
        ablation: a.data.ablation,
        batch_size: a.data.batch_size,
        memory_budget: a.data.memory_budget,
        progress: true,
    };
    let att = attribute(&job.model, &job.data, &opts)?;
    let meta = att.write(&job.model, &a.out)?;
    if a.json {
        status!(to_stdout, "{}", serde_json::to_string_pretty(&meta)?);
    } else {
        status!(to_stdout, "{}", att.summary().trim_end());
        status!(to_stdout, "wrote {}", a.out.display());
    }
    Ok(())
}

fn cmd_circuit(a: CircuitArgs) -> Result<()> {
    check_outputs(&[
        ("--out", Some(&a.out), true),
        ("--dot", a.dot.as_deref(), false),
        ("--svg", a.svg.as_deref(), false),
    ])?;
    let to_stdout = eap::fsutil::is_stdout(&a.out);
    let mut file = read_scores(&a.scores, a.allow_missing)?;
    let selection = match (a.top_n, a.threshold, a.greedy) {
        (Some(n), None, None) => Selection::TopN(n),
        (None, Some(t), None) => Selection::Threshold(t),
        (None, None, Some(n)) => Selection::Greedy(n),
        _ => bail!(Usage(
            "choose how to select edges: --top-n N, --threshold T or --greedy N".into()
        )),
    };
    let (circuit, pruned) = Circuit::select_counting(&file.scores, selection, !a.no_prune)?;
    file.circuit = circuit;
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
    let (edges, nodes, out) = (circuit.n_edges(), circuit.nodes().len(), a.out.display());
    let note = pruning_note(pruned, edges);
    status!(to_stdout, "{edges} edges, {nodes} nodes: {out}{note}");
    Ok(())
}

/// What a faithfulness evaluation of the scores or circuit file at `path` runs on: the model
/// and examples, the metric, the file (checked against the model's graph) and the prepared runs.
fn prepared_for(
    d: &DataArgs,
    what: String,
    file: impl FnOnce(&Job, Metric) -> Result<CircuitFile>,
) -> Result<(Job, Metric, CircuitFile, Vec<PreparedChunk>)> {
    let (job, metric) = d.load(false)?;
    let file = file(&job, metric)?;
    job.model.graph().expect(&file.graph, what)?;
    let runner = Runner::new(
        &job.model,
        &job.data,
        d.ablation,
        d.batch_size,
        d.memory_budget,
    )?;
    let prepared = prepare(&runner)?;
    Ok((job, metric, file, prepared))
}

fn cmd_evaluate(a: EvaluateArgs) -> Result<()> {
    let read = |_: &Job, _| read_scores(&a.circuit, a.allow_missing);
    let (job, metric, file, prepared) =
        prepared_for(&a.data, a.circuit.display().to_string(), read)?;
    let f = eap::eval::evaluate_circuit(&job.model, &prepared, metric, &file.circuit)?;
    let edges = file.circuit.n_edges();
    if a.json {
        out!("{}", f.to_json(edges, metric));
    } else {
        out!("{}", f.summary(edges, metric));
    }
    Ok(())
}

fn cmd_mib(a: MibArgs) -> Result<()> {
    check_outputs(&[
        ("--out", a.out.as_deref(), false),
        ("--svg", a.svg.as_deref(), false),
    ])?;
    let read = |j: &Job, m| a.scores_file(j, m);
    let (job, metric, file, prepared) = prepared_for(&a.data, a.scores_name(), read)?;
    let baseline = FaithfulnessBaseline::new(&job.model, &prepared, metric)?;
    let score = eap::eval::mib_score(&baseline, &file.scores)?;
    let auc = MibArgs::truth_auc(&job, &file)?;
    let mut value = score.to_json();
    value["roc_auc"] = serde_json::json!(auc);
    let json = serde_json::to_string_pretty(&value)?;
    if let Some(out) = &a.out {
        write_atomic(out, json.as_bytes())?;
    }
    if let Some(svg) = &a.svg {
        write_atomic(svg, eap::report::mib_svg(&score).as_bytes())?;
    }
    if let (Some(dir), Some(task), Some(model)) = (&a.submit, &a.task_name, &a.model_name) {
        let path = eap::eval::mib::write_submission(dir, task, model, &file)?;
        eprintln!("wrote {}", path.display());
    }
    match a.json {
        true => out!("{json}"),
        false => out!("{}", score.table(metric, a.data.ablation).trim_end()),
    }
    if let (Some(auc), false) = (auc, a.json) {
        out!("ROC AUC against the model's ground truth: {auc:.4}");
    }
    Ok(())
}

fn cmd_dataset(a: DatasetArgs) -> Result<()> {
    check_outputs(&[("--out", Some(&a.out), true)])?;
    let records = generate(a.task, a.n, a.seed, &Tokenizer::gpt2()?)?;
    write_jsonl(&records, &a.out)?;
    let (n, task, out) = (records.len(), a.task, a.out.display());
    status!(
        eap::fsutil::is_stdout(&a.out),
        "wrote {n} {task} examples to {out}"
    );
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    eap::bench::run(&a.options(), &Device::Cpu, &mut std::io::stdout().lock())?;
    Ok(())
}

fn cmd_roc(a: RocArgs) -> Result<()> {
    check_outputs(&[("--svg", a.svg.as_deref(), false)])?;
    let file = read_scores(&a.scores, a.allow_missing)?;
    let truth = read_truth(&a.truth, file.graph)?;
    let roc = roc_from_graph(&file.scores, &truth)?;
    out!(
        "ROC AUC {:.4} (trapezoid), {:.4} (ACDC pessimistic) over {} edges, {} in the ground truth",
        roc.auc_trapezoid,
        roc.auc_staircase,
        file.graph.n_edges(),
        truth.n_edges()
    );
    if let Some(svg) = &a.svg {
        let picture = eap::report::roc_svg(&[("scores".to_string(), roc)]);
        write_atomic(svg, picture.as_bytes())?;
        out!("wrote {}", svg.display());
    }
    Ok(())
}

fn cmd_discover(a: DiscoverArgs) -> Result<()> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let start = Instant::now();
    if let Some(dir) = &a.out_dir {
        if eap::fsutil::is_stdout(dir) {
            bail!(Usage(
                "--out-dir -: discover writes several files; give a folder".into()
            ));
        }
        if dir.exists() && !dir.is_dir() {
            bail!("{}: --out-dir is not a folder", dir.display());
        }
    }
    let job = load_job(&a.job.spec(), &Device::Cpu)?;
    if let Some(description) = &job.description {
        out!("{description}\n");
    }
    let defaults = DiscoverOptions::default();
    let opts = DiscoverOptions {
        metric: a.metric.unwrap_or(job.metric),
        ablation: a.ablation,
        ig_steps: a.ig_steps,
        batch_size: a.batch_size,
        memory_budget: a.job.memory_budget,
        top_n: a.top_n,
        exact: !a.no_exact,
        acdc: !a.no_acdc,
        acdc_threshold: a.acdc_threshold.unwrap_or(defaults.acdc_threshold),
        acdc_thresholds: a.acdc_thresholds.unwrap_or(defaults.acdc_thresholds),
        hybrid_keep: a.hybrid_keep,
        progress: true,
    };
    let found = discover(&job.model, &job.data, job.truth.as_ref(), &opts)?;
    out!("{}", found.summary());
    let dir = a
        .out_dir
        .unwrap_or_else(|| PathBuf::from("eap-out").join(&job.label));
    let files = found.write(&dir, &command)?;
    let names: Vec<_> = files.iter().filter_map(|f| f.file_name()).collect();
    let names: Vec<_> = names.iter().map(|n| n.to_string_lossy()).collect();
    out!("wrote to {}/: {}", dir.display(), names.join(", "));
    out!("total {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// `EAP_ACDC_EXIT_AFTER=k`: exit the process (code 75) after k readers of this invocation —
/// lets tests interrupt a run for real and resume it.
const EXIT_AFTER_ENV: &str = "EAP_ACDC_EXIT_AFTER";

fn cmd_acdc(a: AcdcArgs) -> Result<()> {
    // --out's folder is created when missing (and a new folder holds nothing to refuse).
    let new_dir = a
        .out
        .as_deref()
        .and_then(|o| o.parent())
        .is_some_and(|d| !d.as_os_str().is_empty() && !d.exists());
    if !new_dir || a.out.as_deref().is_some_and(eap::fsutil::is_stdout) {
        check_outputs(&[("--out", a.out.as_deref(), false)])?;
    }
    let spec = a.job.spec();
    let job = load_job(&spec, &Device::Cpu)?;
    let (model, data, truth) = (&job.model, &job.data, job.truth.as_ref());
    let runner = Runner::new(model, data, a.ablation, a.batch_size, a.job.memory_budget)?;
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
        out!(
            "EAP ({}) pre-pruning: {} of {} edges survive for ACDC ({:.2} s)",
            job.metric,
            base.start_edges(&model.graph()),
            model.graph().n_edges(),
            att.seconds
        );
    }
    if let Some(thresholds) = &a.thresholds {
        let sweep = threshold_sweep(model, &prepared, &base, thresholds, truth)?;
        out!("{}", sweep.report().trim_end());
        if let Some(out) = &a.out {
            let summary = serde_json::to_string_pretty(&sweep.summary(a.metric))?;
            write_atomic(out, summary.as_bytes())?;
            out!("wrote {}", out.display());
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
    out!("{}", result.report(truth)?.trim_end());
    out!("wrote {} (steps: {})", out.display(), persist.log.display());
    Ok(())
}
