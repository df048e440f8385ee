//! The benchmark harness behind `eap bench`: forward, forward + activation-only backward, EAP
//! and ACDC's exact patched forwards on a random model of a named shape (GPT-2 small by default;
//! [`crate::model::random::preset`]), with FLOP counts.
//!
//! [`BenchOptions`] → [`run`], which prints one line per measurement. The PyTorch reference
//! for ACDC's patched forward is `scripts/bench_pytorch_patch.py`.
//!
//! Neighbours: [`crate::model::random`] builds the model; [`crate::attribution`] and
//! [`crate::acdc::time_steps`] are what is timed.

use std::io::Write;
use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::acdc::{time_steps, AcdcOptions, StepTiming};
use crate::attribution::{attribute, AttributionOptions, Phases};
use crate::graph::{visit_order, Circuit};
use crate::model::bf16::Products;
use crate::model::{Batch, ForwardOptions, Model};
use crate::runs::{prepare, Ablation, Runner, DEFAULT_MEMORY_BUDGET};
use crate::tasks::{Dataset, Example, Metric, Target};
use crate::{Error, Result};

/// What `eap bench` times.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The model's shape: a [`crate::model::random::PRESETS`] name.
    pub like: String,
    pub batch: usize,
    pub seq: usize,
    /// Timed repetitions (the best is reported).
    pub reps: usize,
    /// Skip the EAP timing.
    pub no_eap: bool,
    /// ACDC tentative patches timed at each point, 0 to skip ACDC.
    pub acdc_steps: usize,
    /// Points of the visit order, spread evenly over the edges, where ACDC steps are timed
    /// (0: only from the start).
    pub acdc_samples: usize,
    /// Edges of the circuit the readers above each point keep (EAP's top edges).
    pub acdc_circuit_edges: usize,
    /// ACDC's τ on the KL divergence.
    pub acdc_threshold: f32,
    /// Bytes of EAP's activations one chunk may hold.
    pub memory_budget: usize,
    /// Time only EAP, so that the process's peak memory is EAP's.
    pub eap_only: bool,
    /// The precision of the layers' weight products.
    pub products: Products,
}

macro_rules! say {
    ($out:expr, $($arg:tt)*) => {
        writeln!($out, $($arg)*).map_err(|e| Error::io("<output>", e))?
    };
}

/// Runs the benchmark on `device`, writing its lines to `out`.
pub fn run(opts: &BenchOptions, device: &Device, out: &mut dyn Write) -> Result<()> {
    let preset = crate::model::random::preset(&opts.like).ok_or_else(|| {
        Error::invalid(format!(
            "no model shape named `{}`: known shapes are {}",
            opts.like,
            crate::model::random::PRESETS.join(", ")
        ))
    })?;
    let cfg = preset.cfg.clone();
    check_size(&cfg, opts)?;
    let t = Instant::now();
    let mut model = crate::model::random::random_preset(&preset, 0, device)?;
    model.set_products(opts.products);
    say!(
        out,
        "{}-shaped random model built in {:.2} s; batch {} x {} tokens, {} threads, {} weight products",
        preset.name,
        t.elapsed().as_secs_f64(),
        opts.batch,
        opts.seq,
        rayon::current_num_threads(),
        opts.products.name()
    );
    let seqs: Vec<Vec<u32>> = (0..opts.batch)
        .map(|b| {
            (0..opts.seq)
                .map(|p| ((b * 7919 + p * 104729) % cfg.d_vocab) as u32)
                .collect()
        })
        .collect();
    let batch = Batch::new(&seqs, device)?;
    let n_tok = opts.batch * opts.seq;
    let fwd_flops = model.forward_flops(n_tok, opts.seq, (opts.batch, cfg.d_vocab_out));
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?; // warm-up
        let mut best = f64::INFINITY;
        for _ in 0..opts.reps {
            let t = Instant::now();
            f()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let gf = |flops: f64, s: f64| flops / s / 1e9;
    // One step per timed stage: forward, forward+backward, EAP, ACDC from the start, EAP's
    // circuit for the sample points, and each point.
    let acdc = opts.acdc_steps > 0 && !opts.eap_only;
    let acdc_stages = match opts.acdc_samples {
        0 => 1,
        k => 2 + k,
    };
    let stages = 2 * usize::from(!opts.eap_only)
        + usize::from(!opts.no_eap)
        + usize::from(acdc) * acdc_stages;
    let mut bar = crate::progress::Progress::new(true, "bench", stages, "stages");
    if !opts.eap_only {
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
        bar.inc(2);
        say!(
            out,
            "forward          {:>8.3} s  {:>6.1} GFLOP  {:>6.1} GFLOP/s",
            fwd,
            fwd_flops / 1e9,
            gf(fwd_flops, fwd)
        );
        let fb_flops =
            fwd_flops + model.backward_flops(n_tok, opts.seq, (opts.batch, cfg.d_vocab_out));
        say!(
            out,
            "forward+backward {:>8.3} s  {:>6.1} GFLOP  {:>6.1} GFLOP/s",
            fwd_bwd,
            fb_flops / 1e9,
            gf(fb_flops, fwd_bwd)
        );
    }
    if !opts.no_eap {
        let data = bench_data(&seqs, cfg.d_vocab);
        let g = model.graph();
        // Contraction: Σ_readers 2 · n_upstream · N · d.
        let contraction: f64 = (0..g.n_readers())
            .map(|r| 2.0 * g.n_upstream(r) as f64 * (n_tok * cfg.d_model) as f64)
            .sum();
        // EAP's passes unembed only the logit difference's two target columns.
        let logits = (opts.batch, 2);
        let (eap_fwd, eap_bwd) = (
            model.forward_flops(n_tok, opts.seq, logits),
            model.backward_flops(n_tok, opts.seq, logits),
        );
        let eap_flops = 2.0 * eap_fwd + eap_bwd + contraction;
        let mut best: Option<(f64, Phases)> = None;
        let eap_t = time(&mut || {
            let t = Instant::now();
            let run = attribute(
                &model,
                &data,
                &AttributionOptions {
                    memory_budget: opts.memory_budget,
                    ..Default::default()
                },
            )?;
            let s = t.elapsed().as_secs_f64();
            if best.is_none_or(|(b, _)| s < b) {
                best = Some((s, run.phases));
            }
            Ok(())
        })?;
        bar.inc(1);
        say!(
            out,
            "EAP              {:>8.3} s  {:>6.1} GFLOP  {:>6.1} GFLOP/s  ({} edges)",
            eap_t,
            eap_flops / 1e9,
            gf(eap_flops, eap_t),
            g.n_edges()
        );
        // Each phase against its floor: its FLOPs at the GEMM rate measured here and now.
        let rate = gemm_rate(n_tok, &cfg, device, opts.products)?;
        let phases = best.map(|(_, p)| p).unwrap_or_default();
        let how = match opts.products {
            Products::F32 => "candle matmul",
            Products::Bf16 => "bf16::product, the contraction's floor too",
        };
        say!(
            out,
            "  GEMM rate {:.1} GFLOP/s ({how} [{n_tok}, {}] x [{}, {}], best of 20); per phase, floor = FLOPs at that rate:",
            rate / 1e9,
            cfg.d_model,
            cfg.d_model,
            cfg.d_mlp.unwrap_or(4 * cfg.d_model)
        );
        let floor = eap_flops / rate;
        for (name, s, flops) in [
            ("forward x2", phases.forward, 2.0 * eap_fwd),
            ("backward", phases.backward, eap_bwd),
            ("contraction", phases.contraction, contraction),
        ] {
            say!(
                out,
                "  {name:<12} {s:>8.3} s  floor {:>6.3} s  ({:.2}x)",
                flops / rate,
                s / (flops / rate)
            );
        }
        let other = eap_t - phases.forward - phases.backward - phases.contraction;
        say!(
            out,
            "  other        {other:>8.3} s\n  EAP total    {eap_t:>8.3} s  floor {floor:>6.3} s  ({:.2}x)",
            eap_t / floor
        );
    }
    // `eap_only` measures EAP's peak memory: nothing else may run after it.
    if acdc {
        bench_acdc(&model, &seqs, opts, out, &mut bar)?;
    }
    bar.finish();
    Ok(())
}

/// The machine's GEMM rate in FLOP/s for the MLP's shape, `[n_tok, d] × [d, d_mlp]`, as
/// candle multiplies it in f32 or as [`crate::model::bf16::product`] does with bf16 products
/// (best of twenty after a warm-up: the rate of a 10 ms product on a shared machine varies by
/// a third from one call to the next): the rate the floors are quoted at.
fn gemm_rate(
    n_tok: usize,
    cfg: &crate::model::ModelConfig,
    device: &Device,
    products: Products,
) -> Result<f64> {
    let (d, m) = (cfg.d_model, cfg.d_mlp.unwrap_or(4 * cfg.d_model));
    let a = Tensor::randn(0f32, 1.0, (n_tok, d), device)?;
    let b = Tensor::randn(0f32, 1.0, (d, m), device)?;
    let packed = match products {
        Products::Bf16 if device.is_cpu() => Some(crate::model::bf16::pack(&b)?),
        _ => None,
    };
    let product = || -> Result<Tensor> {
        match &packed {
            Some(p) => crate::model::bf16::product(&a, p, None),
            None => Ok(a.matmul(&b)?),
        }
    };
    product()?;
    let mut best = f64::INFINITY;
    for _ in 0..20 {
        let t = Instant::now();
        product()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n_tok * d * m) as f64 / best)
}

/// Refuses a batch the model cannot take or whose forward would not fit the memory budget,
/// before anything is allocated: a typo such as `--batch 100000` would otherwise end in an
/// allocation failure (an abort, not an error) minutes into building the model.
fn check_size(cfg: &crate::model::ModelConfig, opts: &BenchOptions) -> Result<()> {
    if opts.seq > cfg.n_ctx {
        return Err(Error::invalid(format!(
            "bench: --seq {} is longer than the {}-shaped model's {} positions (n_ctx)",
            opts.seq, opts.like, cfg.n_ctx
        )));
    }
    // One forward with the backward's caches: per token and layer the residual stream, the
    // attention inputs and outputs, the MLP's hidden layer and the attention pattern; then the
    // logits. Saturating, so an absurd size reads as "too big" rather than wrapping.
    let per_layer = 6usize
        .saturating_mul(cfg.d_model)
        .saturating_add(cfg.d_mlp.unwrap_or(0))
        .saturating_add(4usize.saturating_mul(cfg.n_heads).saturating_mul(opts.seq));
    let per_token = cfg
        .n_layers
        .saturating_mul(per_layer)
        .saturating_add(cfg.d_vocab_out);
    let bytes = 4usize
        .saturating_mul(opts.batch)
        .saturating_mul(opts.seq)
        .saturating_mul(per_token);
    if bytes > opts.memory_budget {
        return Err(Error::invalid(format!(
            "bench: a batch of {} × {} tokens needs about {} MiB for one forward's activations, \
             more than the memory budget of {} MiB; lower --batch or --seq, or raise --memory-budget",
            opts.batch,
            opts.seq,
            bytes >> 20,
            opts.memory_budget >> 20
        )));
    }
    Ok(())
}

/// The benchmark's examples: each sequence, corrupted by shifting every token by one.
fn bench_data(seqs: &[Vec<u32>], d_vocab: usize) -> Dataset {
    let examples = seqs
        .iter()
        .map(|s| Example {
            clean: s.clone(),
            corrupted: s.iter().map(|t| (t + 1) % d_vocab as u32).collect(),
            target: Target {
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
fn bench_acdc(
    model: &Model,
    seqs: &[Vec<u32>],
    a: &BenchOptions,
    out: &mut dyn Write,
    bar: &mut crate::progress::Progress,
) -> Result<()> {
    let data = bench_data(seqs, model.cfg.d_vocab);
    let runner = Runner::new(
        model,
        &data,
        Ablation::Corrupted,
        a.batch,
        DEFAULT_MEMORY_BUDGET,
    )?;
    let prepared = prepare(&runner)?;
    let g = model.graph();
    let opts = AcdcOptions {
        threshold: a.acdc_threshold,
        metric: Metric::Kl,
        ..Default::default()
    };
    let mut report = |what: &str, t: &StepTiming| -> Result<()> {
        say!(
            out,
            "ACDC {what:<34} {:>7.4} s per pass, {:>6.2} passes/s ({} passes, {} removed; live nodes: {} at all rows, {} at the last position; state built in {:.2} s)",
            t.seconds / t.passes.max(1) as f64,
            t.passes_per_second(),
            t.passes,
            t.removed,
            t.nodes_all_rows,
            t.nodes_last_only,
            t.build_seconds
        );
        Ok(())
    };
    let none = vec![false; g.n_writers() * g.n_readers()];
    let top = time_steps(model, &prepared, &opts, none.clone(), 0, a.acdc_steps)?;
    report("from the start (logits first)", &top)?;
    bar.inc(1);
    if a.acdc_samples == 0 {
        return Ok(());
    }
    // The circuit above each sample point: EAP's top edges.
    let scores = attribute(
        model,
        &data,
        &AttributionOptions {
            memory_budget: a.memory_budget,
            ..Default::default()
        },
    )?
    .scores;
    bar.inc(1);
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
        report(&format!("at {}", g.reader_name(order[position])), &t)?;
        bar.inc(1);
        seconds += t.seconds;
        passes += t.passes;
    }
    say!(
        out,
        "ACDC over the graph ({} samples, {}-edge circuit above) {:.4} s per pass, {:.2} passes/s",
        a.acdc_samples,
        a.acdc_circuit_edges,
        seconds / passes.max(1) as f64,
        passes as f64 / seconds.max(1e-9)
    );
    Ok(())
}
