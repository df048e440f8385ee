//! Task metrics and their gradients with respect to the logits.
//!
//! Every metric reads one row of logits per example (the position that predicts the answer) and
//! is averaged over examples. Log-softmax is computed in f64 so that near-one probabilities and
//! large logit ranges stay exact; only the results are rounded to f32.
//!
//! Sign convention: each metric is reported as it is defined (larger logit difference = the model
//! does the task better; larger KL and NLL = worse). Attribution code that wants a loss negates.

use std::fmt;

use crate::{Error, Result};

/// The metrics of DESIGN §5. On the command line (clap's [`ValueEnum`](clap::ValueEnum)) they
/// are spelled as [`Metric::name`] gives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Metric {
    /// `mean_{a∈answers} logit[a] − max_{w∈wrongs} logit[w]`: IOI's IO − S, docstring's right
    /// minus the largest wrong.
    LogitDiff,
    /// `Σ_{a∈answers} p[a] − Σ_{w∈wrongs} p[w]` with `p = softmax(logits)`: Greater-Than.
    ProbDiff,
    /// `KL(clean ‖ this) = Σ_i p_clean[i] (log p_clean[i] − log p[i])`.
    Kl,
    /// `−log Σ_{a∈answers} p[a]`.
    Nll,
}

impl Metric {
    pub const ALL: [Metric; 4] = [Metric::LogitDiff, Metric::ProbDiff, Metric::Kl, Metric::Nll];

    /// The name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            Metric::LogitDiff => "logit-diff",
            Metric::ProbDiff => "prob-diff",
            Metric::Kl => "kl",
            Metric::Nll => "nll",
        }
    }

    /// Whether the metric reads only the logits of each example's answers and wrongs (no
    /// softmax over the vocabulary): then a forward need compute only those columns.
    pub fn reads_only_targets(self) -> bool {
        self == Metric::LogitDiff
    }

    /// Whether the metric needs the clean run's logits.
    pub fn needs_clean_logits(self) -> bool {
        self == Metric::Kl
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The tokens a metric reads for one example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Right continuations (IOI: the indirect object; Greater-Than: every later year).
    pub answers: Vec<u32>,
    /// Wrong continuations (IOI: the subject; Greater-Than: every year at or before).
    pub wrongs: Vec<u32>,
}

/// The vocabulary ids `targets` read, ascending and distinct, and the targets rewritten to index
/// that list: a [`Metric::reads_only_targets`] metric on logits of those columns alone equals
/// the metric on the whole vocabulary.
pub fn target_columns(targets: &[Target]) -> (Vec<u32>, Vec<Target>) {
    let mut ids: Vec<u32> = targets
        .iter()
        .flat_map(|t| t.answers.iter().chain(&t.wrongs).copied())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let column = |id: &u32| ids.binary_search(id).expect("collected above") as u32;
    let remapped = targets
        .iter()
        .map(|t| Target {
            answers: t.answers.iter().map(column).collect(),
            wrongs: t.wrongs.iter().map(column).collect(),
        })
        .collect();
    (ids, remapped)
}

/// A metric averaged over examples, and its value per example.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricValue {
    pub mean: f32,
    pub per_example: Vec<f32>,
}

/// Value of the metric, averaged over examples.
///
/// `logits`: row-major `[n, vocab]`, one row per example. `clean_logits`: the same shape, needed
/// by [`Metric::Kl`] (`KL(clean ‖ this)`), ignored otherwise. `targets` has one entry per row;
/// [`Metric::Kl`] ignores it (it may be empty). Errors number the rows from 1.
pub fn metric_value(
    metric: Metric,
    logits: &[f32],
    vocab: usize,
    targets: &[Target],
    clean_logits: Option<&[f32]>,
) -> Result<MetricValue> {
    let n = check(metric, logits, vocab, targets, clean_logits)?;
    // Rows in parallel (a KL row passes over the vocabulary several times), summed in order so
    // the mean does not depend on the threads.
    use rayon::prelude::*;
    let values = (0..n)
        .into_par_iter()
        .map(|i| row(metric, logits, vocab, targets, clean_logits, i, None))
        .collect::<Result<Vec<f64>>>()?;
    let mut per_example = Vec::with_capacity(n);
    let mut sum = 0.0f64;
    for v in values {
        sum += v;
        per_example.push(v as f32);
    }
    let mean = sum / n as f64;
    finite(metric, mean, "(mean over examples)".to_string())?;
    Ok(MetricValue {
        mean: mean as f32,
        per_example,
    })
}

/// `d(mean)/d logits`, row-major `[n, vocab]` like `logits`. Arguments as for
/// [`metric_value`]. [`Metric::LogitDiff`] sends the wrong-side gradient to the largest wrong
/// logit only (the first one on ties).
pub fn metric_gradient(
    metric: Metric,
    logits: &[f32],
    vocab: usize,
    targets: &[Target],
    clean_logits: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let n = check(metric, logits, vocab, targets, clean_logits)?;
    let mut grad = vec![0.0f32; n * vocab];
    let mut g = vec![0.0f64; vocab];
    for i in 0..n {
        g.iter_mut().for_each(|x| *x = 0.0);
        row(
            metric,
            logits,
            vocab,
            targets,
            clean_logits,
            i,
            Some(&mut g),
        )?;
        for (out, &x) in grad[i * vocab..(i + 1) * vocab].iter_mut().zip(&g) {
            *out = (x / n as f64) as f32;
        }
    }
    Ok(grad)
}

fn finite(metric: Metric, value: f64, context: String) -> Result<()> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(Error::NonFinite {
            metric: metric.name().to_string(),
            value: value as f32,
            context,
        })
    }
}

/// One clean row's side of `KL(clean ‖ this)`: its probabilities, their sum and its
/// log-sum-exp, so that a patched row costs one exponential per logit ([`KlRow::against`]).
#[derive(Debug, Clone)]
struct KlRow {
    p: Vec<f64>,
    mass: f64,
    lse: f64,
}

impl KlRow {
    fn new(clean: &[f32]) -> KlRow {
        let lse = log_sum_exp(clean);
        let p: Vec<f64> = clean.iter().map(|&c| (c as f64 - lse).exp()).collect();
        let mass = p.iter().sum();
        KlRow { p, mass, lse }
    }

    /// `KL(clean ‖ softmax(l)) = Σ_j p_j (log p_j − log q_j) = Σ_j p_j (c_j − l_j) + (Σ_j p_j) ·
    /// (lse(l) − lse(c))`: no log-probabilities of either side are materialised, and a row
    /// equal to the clean one gives exactly 0 (every `c_j − l_j` and the lse difference are 0).
    /// `clean` is the row `self` was built from.
    fn against(&self, clean: &[f32], l: &[f32]) -> f64 {
        let shift = dot_of_differences(&self.p, clean, l);
        let kl = shift + self.mass * (log_sum_exp(l) - self.lse);
        // Rounding can leave a tiny negative; `max` would also turn a NaN into 0.
        if kl < 0.0 {
            0.0
        } else {
            kl
        }
    }
}

/// `max + ln Σ_j e^{x_j − max}` in f64, with the exponentials in [`exp_f64`] so that the loop
/// vectorises (libm's `exp` is a call per element: 1.6 M of them were a third of an ACDC pass
/// for 32 rows of GPT-2's vocabulary).
fn log_sum_exp(x: &[f32]) -> f64 {
    let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    m + sum_exp_below(x, m).ln()
}

/// `Σ_j e^{x_j − m}` for `m ≥ max x`.
fn sum_exp_below(x: &[f32], m: f64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { exp_avx512::sum_exp_below(x, m) };
    }
    sum_exp_lanes(x, m)
}

/// [`sum_exp_below`] in eight running sums, added pairwise at the end: a loop the compiler
/// vectorises (two lanes on baseline x86-64).
fn sum_exp_lanes(x: &[f32], m: f64) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += exp_nonpositive(v as f64 - m);
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a += exp_nonpositive(v as f64 - m);
    }
    lanes_sum(acc)
}

/// `Σ_j p_j (c_j − l_j)` in f64 (the differences of f32 values are exact), in eight running
/// sums as [`sum_exp_lanes`].
fn dot_of_differences(p: &[f64], c: &[f32], l: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let n = p.len().min(c.len()).min(l.len());
    let full = n / 8 * 8;
    for ((p, c), l) in p[..full]
        .chunks_exact(8)
        .zip(c[..full].chunks_exact(8))
        .zip(l[..full].chunks_exact(8))
    {
        for (a, ((&p, &c), &l)) in acc.iter_mut().zip(p.iter().zip(c).zip(l)) {
            *a += p * (c as f64 - l as f64);
        }
    }
    let rest = p[full..n].iter().zip(&c[full..n]).zip(&l[full..n]);
    for (a, ((&p, &c), &l)) in acc.iter_mut().zip(rest) {
        *a += p * (c as f64 - l as f64);
    }
    lanes_sum(acc)
}

#[inline(always)]
fn lanes_sum(a: [f64; 8]) -> f64 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

// `e^x = 2^n · e^r` with `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`: 1.5·2⁵² added to `x·log₂e`
// rounds it to the integer `n` held in the low mantissa bits; ln 2 in two parts (fdlibm's) keeps
// `r` exact to an ulp; `e^r` by its Taylor series to degree 13 (truncation < 1e-17 relative);
// `2^n` written into the exponent bits. Inputs are clamped to [−708, 0]: below, `e^−708` ≈
// 3e-308 adds nothing to a sum that holds `e^0`; a NaN may come out as either bound's value,
// so callers check finiteness on the result of what they compute from the same inputs.
const EXP_ROUND: f64 = 6_755_399_441_055_744.0;
const LN2_HI: f64 = 6.931_471_803_691_238e-1;
const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
/// 1/k! for k = 13 down to 2.
const EXP_TAYLOR: [f64; 12] = [
    1.605_904_383_682_161_3e-10,
    2.087_675_698_786_81e-9,
    2.505_210_838_544_172e-8,
    2.755_731_922_398_589e-7,
    2.755_731_922_398_589_3e-6,
    2.480_158_730_158_73e-5,
    1.984_126_984_126_984e-4,
    1.388_888_888_888_889e-3,
    8.333_333_333_333_333e-3,
    4.166_666_666_666_666_4e-2,
    1.666_666_666_666_666_6e-1,
    0.5,
];

/// `e^x` for `x ≤ 0` as described above, in plain arithmetic (libm's `exp` is a call per
/// element and does not vectorise): within a few ulps of libm's.
#[inline(always)]
fn exp_nonpositive(x: f64) -> f64 {
    let x = x.clamp(-708.0, 0.0);
    let t = x * std::f64::consts::LOG2_E + EXP_ROUND;
    let n = t - EXP_ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut q = EXP_TAYLOR[0];
    for &c in &EXP_TAYLOR[1..] {
        q = q * r + c;
    }
    let er = q * r * r + r + 1.0;
    let n_bits = t.to_bits().wrapping_sub(EXP_ROUND.to_bits());
    er * f64::from_bits(n_bits.wrapping_add(1023) << 52)
}

/// [`exp_nonpositive`] eight lanes at a time with fused multiply-adds, written with intrinsics:
/// the compiler's vectoriser splits the fused version into scalar and 128-bit pieces.
#[cfg(target_arch = "x86_64")]
mod exp_avx512 {
    use std::arch::x86_64::*;

    use super::{EXP_ROUND, EXP_TAYLOR, LN2_HI, LN2_LO};

    #[target_feature(enable = "avx512f")]
    pub(super) fn exp8(x: __m512d) -> __m512d {
        let x = _mm512_min_pd(
            _mm512_max_pd(x, _mm512_set1_pd(-708.0)),
            _mm512_setzero_pd(),
        );
        let round = _mm512_set1_pd(EXP_ROUND);
        let t = _mm512_fmadd_pd(x, _mm512_set1_pd(std::f64::consts::LOG2_E), round);
        let n = _mm512_sub_pd(t, round);
        let r = _mm512_fnmadd_pd(n, _mm512_set1_pd(LN2_HI), x);
        let r = _mm512_fnmadd_pd(n, _mm512_set1_pd(LN2_LO), r);
        let mut q = _mm512_set1_pd(EXP_TAYLOR[0]);
        for &c in &EXP_TAYLOR[1..] {
            q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(c));
        }
        let er = _mm512_add_pd(
            _mm512_fmadd_pd(_mm512_mul_pd(q, r), r, r),
            _mm512_set1_pd(1.0),
        );
        let n_bits = _mm512_sub_epi64(
            _mm512_castpd_si512(t),
            _mm512_set1_epi64(EXP_ROUND.to_bits() as i64),
        );
        let scale = _mm512_slli_epi64::<52>(_mm512_add_epi64(n_bits, _mm512_set1_epi64(1023)));
        _mm512_mul_pd(er, _mm512_castsi512_pd(scale))
    }

    /// `Σ_j e^{x_j − m}`: two running sums of eight lanes (two exponentials in flight).
    #[target_feature(enable = "avx512f")]
    pub(super) fn sum_exp_below(x: &[f32], m: f64) -> f64 {
        let vm = _mm512_set1_pd(m);
        let (mut a0, mut a1) = (_mm512_setzero_pd(), _mm512_setzero_pd());
        let mut pairs = x.chunks_exact(16);
        for c in &mut pairs {
            // SAFETY: `c` holds 16 floats; unaligned loads of 8 at offsets 0 and 8.
            let (v0, v1) = unsafe {
                (
                    _mm512_cvtps_pd(_mm256_loadu_ps(c.as_ptr())),
                    _mm512_cvtps_pd(_mm256_loadu_ps(c.as_ptr().add(8))),
                )
            };
            a0 = _mm512_add_pd(a0, exp8(_mm512_sub_pd(v0, vm)));
            a1 = _mm512_add_pd(a1, exp8(_mm512_sub_pd(v1, vm)));
        }
        // The rest (under 16) with its missing lanes at −∞, whose exponentials are 3e-308.
        let rest = pairs.remainder();
        let mut lanes = [f64::NEG_INFINITY; 16];
        for (l, &v) in lanes.iter_mut().zip(rest) {
            *l = v as f64;
        }
        // SAFETY: `lanes` holds 16 doubles.
        let (v0, v1) = unsafe {
            (
                _mm512_loadu_pd(lanes.as_ptr()),
                _mm512_loadu_pd(lanes.as_ptr().add(8)),
            )
        };
        if !rest.is_empty() {
            a0 = _mm512_add_pd(a0, exp8(_mm512_sub_pd(v0, vm)));
            a1 = _mm512_add_pd(a1, exp8(_mm512_sub_pd(v1, vm)));
        }
        _mm512_reduce_add_pd(_mm512_add_pd(a0, a1))
    }
}

/// The clean run's distributions, computed once for many [`Metric::Kl`] evaluations against
/// them (ACDC compares thousands of patched runs with one clean run).
#[derive(Debug, Clone)]
pub struct KlReference {
    vocab: usize,
    clean: Vec<f32>,
    rows: Vec<KlRow>,
}

impl KlReference {
    /// From the clean logits, row-major `[n, vocab]`.
    pub fn new(clean_logits: &[f32], vocab: usize) -> Result<KlReference> {
        check(Metric::Kl, clean_logits, vocab, &[], Some(clean_logits))?;
        use rayon::prelude::*;
        let rows = clean_logits.par_chunks(vocab).map(KlRow::new).collect();
        Ok(KlReference {
            vocab,
            clean: clean_logits.to_vec(),
            rows,
        })
    }

    /// `metric_value(Metric::Kl, logits, …).mean` against these clean logits, to the bit.
    pub fn mean(&self, logits: &[f32]) -> Result<f32> {
        let v = self.vocab;
        if logits.len() != self.clean.len() {
            return Err(Error::Shape {
                op: "metric kl",
                expected: format!("[{}, {v}] logits", self.clean.len() / v),
                found: format!("{} values", logits.len()),
            });
        }
        use rayon::prelude::*;
        let n = logits.len() / v;
        let values = (0..n)
            .into_par_iter()
            .map(|i| {
                let rows = i * v..(i + 1) * v;
                let kl = self.rows[i].against(&self.clean[rows.clone()], &logits[rows]);
                // A logit that is not finite makes the KL so (NaN, or ±∞ through the max or
                // the difference), so only a row whose KL is not finite is searched for it.
                if !kl.is_finite() {
                    check_finite(Metric::Kl, logits, v, "logit")?;
                }
                finite(Metric::Kl, kl, format!("(example {})", i + 1))?;
                Ok(kl)
            })
            .collect::<Result<Vec<f64>>>()?;
        let mean = values.iter().sum::<f64>() / n as f64;
        finite(Metric::Kl, mean, "(mean over examples)".to_string())?;
        Ok(mean as f32)
    }
}

/// Checks shapes, token ids and finiteness; returns the number of examples.
fn check(
    metric: Metric,
    logits: &[f32],
    vocab: usize,
    targets: &[Target],
    clean_logits: Option<&[f32]>,
) -> Result<usize> {
    if vocab == 0 {
        return Err(Error::invalid("metric: vocabulary size is 0"));
    }
    let n = if metric == Metric::Kl {
        if !logits.len().is_multiple_of(vocab) {
            return Err(Error::Shape {
                op: "metric",
                expected: format!("[n, {vocab}] logits"),
                found: format!("{} values", logits.len()),
            });
        }
        logits.len() / vocab
    } else {
        targets.len()
    };
    if n == 0 {
        return Err(Error::invalid(format!("metric {metric}: no examples")));
    }
    if logits.len() != n * vocab {
        return Err(Error::Shape {
            op: "metric",
            expected: format!("[{n}, {vocab}] logits (one row per target)"),
            found: format!("{} values", logits.len()),
        });
    }
    if metric == Metric::Kl {
        let clean = clean_logits.ok_or_else(|| {
            Error::invalid("metric kl needs the clean run's logits; none were given")
        })?;
        if clean.len() != logits.len() {
            return Err(Error::Shape {
                op: "metric kl",
                expected: format!("[{n}, {vocab}] clean logits"),
                found: format!("{} values", clean.len()),
            });
        }
        check_finite(metric, clean, vocab, "clean logit")?;
    } else {
        for (i, t) in targets.iter().enumerate() {
            if let Some(&bad) = t
                .answers
                .iter()
                .chain(&t.wrongs)
                .find(|&&id| id as usize >= vocab)
            {
                return Err(Error::invalid(format!(
                    "metric {metric}: example {} names token {bad}, outside the vocabulary of {vocab}",
                    i + 1
                )));
            }
            let missing = match metric {
                Metric::LogitDiff if t.answers.is_empty() => Some("answer"),
                Metric::LogitDiff if t.wrongs.is_empty() => Some("wrong answer"),
                Metric::Nll if t.answers.is_empty() => Some("answer"),
                _ => None,
            };
            if let Some(what) = missing {
                return Err(Error::invalid(format!(
                    "metric {metric}: example {} has no {what}",
                    i + 1
                )));
            }
        }
    }
    check_finite(metric, logits, vocab, "logit")?;
    Ok(n)
}

fn check_finite(metric: Metric, values: &[f32], vocab: usize, what: &str) -> Result<()> {
    match values.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(k) => Err(Error::NonFinite {
            metric: metric.name().to_string(),
            value: values[k],
            context: format!(
                "({what} of token {} in example {})",
                k % vocab,
                k / vocab + 1
            ),
        }),
    }
}

/// `log softmax(x)` in f64.
fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    x.iter().map(|&v| v as f64 - lse).collect()
}

/// The metric of example `i`; adds its gradient (not divided by n) to `grad` when given.
fn row(
    metric: Metric,
    logits: &[f32],
    vocab: usize,
    targets: &[Target],
    clean_logits: Option<&[f32]>,
    i: usize,
    grad: Option<&mut [f64]>,
) -> Result<f64> {
    let l = &logits[i * vocab..(i + 1) * vocab];
    let value = match metric {
        Metric::LogitDiff => {
            let t = &targets[i];
            let k = t.answers.len() as f64;
            let right = t.answers.iter().map(|&a| l[a as usize] as f64).sum::<f64>() / k;
            // first maximum on ties, so the gradient is deterministic
            let mut worst = t.wrongs[0];
            for &w in &t.wrongs[1..] {
                if l[w as usize] > l[worst as usize] {
                    worst = w;
                }
            }
            if let Some(g) = grad {
                for &a in &t.answers {
                    g[a as usize] += 1.0 / k;
                }
                g[worst as usize] -= 1.0;
            }
            right - l[worst as usize] as f64
        }
        Metric::ProbDiff => {
            let t = &targets[i];
            let lp = log_softmax(l);
            // m = Σ_j c_j p_j with c_j = #answers equal to j − #wrongs equal to j
            let m: f64 = t.answers.iter().map(|&a| lp[a as usize].exp()).sum::<f64>()
                - t.wrongs.iter().map(|&w| lp[w as usize].exp()).sum::<f64>();
            if let Some(g) = grad {
                // dm/dl_j = Σ_i c_i p_i (δ_ij − p_j) = p_j (c_j − m)
                for (gj, &lpj) in g.iter_mut().zip(&lp) {
                    *gj -= lpj.exp() * m;
                }
                for &a in &t.answers {
                    g[a as usize] += lp[a as usize].exp();
                }
                for &w in &t.wrongs {
                    g[w as usize] -= lp[w as usize].exp();
                }
            }
            m
        }
        Metric::Nll => {
            let t = &targets[i];
            let lp = log_softmax(l);
            // −log Σ_a p_a = −logsumexp_a(lp_a)
            let mx = t
                .answers
                .iter()
                .fold(f64::NEG_INFINITY, |m, &a| m.max(lp[a as usize]));
            let s: f64 = t.answers.iter().map(|&a| (lp[a as usize] - mx).exp()).sum();
            let log_s = mx + s.ln();
            if let Some(g) = grad {
                // d/dl_j = p_j − Σ_{a = j} p_a / S
                for (gj, &lpj) in g.iter_mut().zip(&lp) {
                    *gj += lpj.exp();
                }
                for &a in &t.answers {
                    g[a as usize] -= (lp[a as usize] - log_s).exp();
                }
            }
            -log_s
        }
        Metric::Kl => {
            let c = &clean_logits.expect("checked")[i * vocab..(i + 1) * vocab];
            let kl = KlRow::new(c).against(c, l);
            if let Some(g) = grad {
                let (lp, lpc) = (log_softmax(l), log_softmax(c));
                // d/dl_j = p_j − p_clean_j
                for ((gj, &a), &b) in g.iter_mut().zip(&lpc).zip(&lp) {
                    *gj += b.exp() - a.exp();
                }
            }
            kl
        }
    };
    finite(metric, value, format!("(example {})", i + 1))?;
    Ok(value)
}

#[cfg(test)]
mod kl_reference_tests {
    use super::*;

    #[test]
    fn cached_clean_side_gives_the_same_bits() {
        let vocab = 37;
        let gen = |seed: usize| -> Vec<f32> {
            (0..3 * vocab)
                .map(|i| ((i * 7919 + seed * 104729) % 1000) as f32 / 97.0 - 5.0)
                .collect()
        };
        let (clean, other) = (gen(1), gen(2));
        let reference = KlReference::new(&clean, vocab).unwrap();
        let want = metric_value(Metric::Kl, &other, vocab, &[], Some(&clean))
            .unwrap()
            .mean;
        assert!(want > 0.0);
        assert_eq!(reference.mean(&other).unwrap().to_bits(), want.to_bits());
        assert_eq!(reference.mean(&clean).unwrap(), 0.0);
        let mut bad = other.clone();
        bad[5] = f32::NAN;
        assert!(reference.mean(&bad).is_err());
        assert!(reference.mean(&other[..vocab]).is_err());
    }

    #[test]
    fn exponentials_are_within_ulps_of_libm() {
        let xs: Vec<f64> = (0..99_000)
            .map(|i| -(i as f64) * 7.1e-3 - (i % 7) as f64 * 1e-9)
            .collect();
        for &x in &xs {
            let (got, want) = (exp_nonpositive(x), x.exp());
            assert!(
                (got - want).abs() <= 4e-16 * want,
                "exp({x}) = {got}, libm {want}"
            );
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1e6) > 0.0 && exp_nonpositive(-1e6) < 1e-300);
        // The vector path, one exponential per call (the other lanes are −∞), and as sums of
        // ragged lengths against libm's sum.
        for &x in xs.iter().step_by(97) {
            let want = (x as f32 as f64).exp();
            let got = sum_exp_below(&[x as f32], 0.0);
            assert!(
                (got - want).abs() <= 4e-16 * want + 1e-300,
                "exp({x}): {got} vs {want}"
            );
        }
        for len in [1, 7, 8, 15, 16, 17, 1000, 50_257] {
            let x: Vec<f32> = (0..len).map(|i| -((i * 37) % 101) as f32 / 7.0).collect();
            let want: f64 = x.iter().map(|&v| (v as f64 - 0.5).exp()).sum();
            for got in [sum_exp_below(&x, 0.5), sum_exp_lanes(&x, 0.5)] {
                assert!(
                    (got - want).abs() <= 1e-12 * want,
                    "len {len}: {got} vs {want}"
                );
            }
        }
    }

    /// The one-exponential KL equals the textbook `Σ p_c (log p_c − log p)` over
    /// log-softmaxes to f64 rounding, on rows far from and close to the clean one.
    #[test]
    fn kl_against_a_cached_clean_row_equals_the_log_softmax_form() {
        let vocab = 50_257;
        let clean: Vec<f32> = (0..vocab)
            .map(|i| ((i * 7919) % 10_007) as f32 / 500.0 - 10.0)
            .collect();
        let row = KlRow::new(&clean);
        for scale in [1.0f32, 1e-2, 1e-4] {
            let l: Vec<f32> = clean
                .iter()
                .enumerate()
                .map(|(i, &c)| c + scale * (((i * 104_729) % 997) as f32 / 997.0 - 0.5))
                .collect();
            let (lp, lpc) = (log_softmax(&l), log_softmax(&clean));
            let textbook: f64 = lpc.iter().zip(&lp).map(|(&a, &b)| a.exp() * (a - b)).sum();
            let got = row.against(&clean, &l);
            assert!(
                (got - textbook).abs() <= 1e-9 * textbook + 1e-14,
                "scale {scale}: {got} vs {textbook}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(answers: &[u32], wrongs: &[u32]) -> Target {
        Target {
            answers: answers.to_vec(),
            wrongs: wrongs.to_vec(),
        }
    }

    /// The logit difference on the target columns alone equals it on the whole vocabulary,
    /// and so does its gradient, column for column.
    #[test]
    fn logit_difference_on_target_columns_equals_it_on_the_vocabulary() {
        let targets = vec![t(&[7, 2], &[5]), t(&[5], &[9, 2])];
        let (ids, remapped) = target_columns(&targets);
        assert_eq!(ids, vec![2, 5, 7, 9]);
        assert_eq!(remapped, vec![t(&[2, 0], &[1]), t(&[1], &[3, 0])]);
        let v = 11;
        let full: Vec<f32> = (0..2 * v)
            .map(|i| ((i * 37) % 23) as f32 * 0.3 - 2.0)
            .collect();
        let cols: Vec<f32> = (0..2)
            .flat_map(|r| ids.iter().map(move |&c| (r, c)))
            .map(|(r, c)| full[r * v + c as usize])
            .collect();
        let m = Metric::LogitDiff;
        assert!(m.reads_only_targets() && !Metric::ProbDiff.reads_only_targets());
        let a = metric_value(m, &full, v, &targets, None).unwrap();
        let b = metric_value(m, &cols, ids.len(), &remapped, None).unwrap();
        assert_eq!(a, b);
        let ga = metric_gradient(m, &full, v, &targets, None).unwrap();
        let gb = metric_gradient(m, &cols, ids.len(), &remapped, None).unwrap();
        for r in 0..2 {
            for (j, &c) in ids.iter().enumerate() {
                assert_eq!(ga[r * v + c as usize], gb[r * ids.len() + j]);
            }
        }
        let outside: f32 = (0..2 * v)
            .filter(|i| !ids.contains(&((i % v) as u32)))
            .map(|i| ga[i].abs())
            .sum();
        assert_eq!(outside, 0.0, "no gradient outside the target columns");
    }

    // Two examples over a vocabulary of 3 tokens, chosen so the softmax is exact by hand:
    //   row 0 = [ln 1, ln 2, ln 5] → p = [1/8, 2/8, 5/8]; answers {2}, wrongs {0, 1}
    //   row 1 = [1, 1, 1]          → p = [1/3, 1/3, 1/3]; answers {0, 1}, wrongs {2}
    fn fixture() -> (Vec<f32>, Vec<Target>) {
        let logits = vec![0.0, 2f32.ln(), 5f32.ln(), 1.0, 1.0, 1.0];
        (logits, vec![t(&[2], &[0, 1]), t(&[0, 1], &[2])])
    }

    fn close(a: f32, b: f64) {
        assert!((a as f64 - b).abs() < 1e-6, "{a} vs {b}");
    }

    /// Issue 13: errors number examples from 1, as dataset errors number lines.
    #[test]
    fn errors_number_examples_from_one() {
        let (mut l, mut tg) = fixture();
        tg[1] = t(&[7], &[2]);
        let e = metric_value(Metric::LogitDiff, &l, 3, &tg, None).unwrap_err();
        assert!(e.to_string().contains("example 2 names token 7"), "{e}");
        tg[1] = t(&[], &[2]);
        let e = metric_value(Metric::LogitDiff, &l, 3, &tg, None).unwrap_err();
        assert!(e.to_string().contains("example 2 has no answer"), "{e}");
        let (_, tg) = fixture();
        l[4] = f32::NAN;
        let e = metric_value(Metric::LogitDiff, &l, 3, &tg, None).unwrap_err();
        assert!(e.to_string().contains("token 1 in example 2"), "{e}");
    }

    #[test]
    fn logit_diff_by_hand() {
        // row 0: ln 5 − max(ln 1, ln 2) = ln 2.5 = 0.916291; row 1: (1 + 1)/2 − 1 = 0
        let (l, tg) = fixture();
        let v = metric_value(Metric::LogitDiff, &l, 3, &tg, None).unwrap();
        close(v.per_example[0], 2.5f64.ln());
        close(v.per_example[1], 0.0);
        close(v.mean, 2.5f64.ln() / 2.0);
        // gradient of the mean: row 0 → [0, −1, +1]/2 (token 1 is the larger wrong);
        // row 1 → [+1/2, +1/2, −1]/2
        let g = metric_gradient(Metric::LogitDiff, &l, 3, &tg, None).unwrap();
        assert_eq!(g, vec![0.0, -0.5, 0.5, 0.25, 0.25, -0.5]);
    }

    #[test]
    fn prob_diff_by_hand() {
        // row 0: 5/8 − (1/8 + 2/8) = 1/4; row 1: (1/3 + 1/3) − 1/3 = 1/3; mean 7/24
        let (l, tg) = fixture();
        let v = metric_value(Metric::ProbDiff, &l, 3, &tg, None).unwrap();
        close(v.per_example[0], 0.25);
        close(v.per_example[1], 1.0 / 3.0);
        close(v.mean, 7.0 / 24.0);
        // row 0: p_j (c_j − m) with c = [−1, −1, 1], m = 1/4:
        //   [1/8·(−5/4), 2/8·(−5/4), 5/8·(3/4)] = [−5/32, −10/32, 15/32], halved for the mean
        let g = metric_gradient(Metric::ProbDiff, &l, 3, &tg, None).unwrap();
        for (a, b) in g[..3].iter().zip([-5.0 / 64.0, -10.0 / 64.0, 15.0 / 64.0]) {
            close(*a, b);
        }
    }

    #[test]
    fn nll_by_hand() {
        // row 0: −ln(5/8) = ln 1.6 = 0.470004; row 1: −ln(2/3) = ln 1.5 = 0.405465
        let (l, tg) = fixture();
        let v = metric_value(Metric::Nll, &l, 3, &tg, None).unwrap();
        close(v.per_example[0], 1.6f64.ln());
        close(v.per_example[1], 1.5f64.ln());
        close(v.mean, 2.4f64.ln() / 2.0);
        // row 1: p − [1/2, 1/2, 0] = [−1/6, −1/6, 1/3], halved for the mean
        let g = metric_gradient(Metric::Nll, &l, 3, &tg, None).unwrap();
        for (a, b) in g[3..].iter().zip([-1.0 / 12.0, -1.0 / 12.0, 1.0 / 6.0]) {
            close(*a, b);
        }
    }

    #[test]
    fn kl_by_hand() {
        // clean rows are both [ln 1, ln 2, ln 5] (p = [1/8, 2/8, 5/8]); this run's rows are
        // [1, 1, 1] (q = 1/3 each) and the clean row itself.
        // row 0: 1/8 ln(3/8) + 2/8 ln(6/8) + 5/8 ln(15/8)
        //      = −0.1226037 − 0.0719205 + 0.3928806 = 0.1983564; row 1: 0
        let clean = vec![0.0, 2f32.ln(), 5f32.ln(), 0.0, 2f32.ln(), 5f32.ln()];
        let l = vec![1.0, 1.0, 1.0, 0.0, 2f32.ln(), 5f32.ln()];
        let kl0 = 0.125 * (3.0f64 / 8.0).ln() + 0.25 * 0.75f64.ln() + 0.625 * 1.875f64.ln();
        let v = metric_value(Metric::Kl, &l, 3, &[], Some(&clean)).unwrap();
        close(v.per_example[0], kl0);
        assert!((kl0 - 0.1983564).abs() < 1e-6);
        close(v.per_example[1], 0.0);
        close(v.mean, kl0 / 2.0);
        // row 0: q − p = [1/3 − 1/8, 1/3 − 2/8, 1/3 − 5/8], halved; row 1: zero
        let g = metric_gradient(Metric::Kl, &l, 3, &[], Some(&clean)).unwrap();
        for (a, b) in g
            .iter()
            .zip([5.0 / 48.0, 1.0 / 24.0, -7.0 / 48.0, 0.0, 0.0, 0.0])
        {
            close(*a, b);
        }
        assert!(metric_value(Metric::Kl, &l, 3, &[], None).is_err());
    }

    /// Central differences of the f32 mean against the analytic gradient.
    #[test]
    fn gradients_match_finite_differences() {
        let vocab = 7;
        // a fixed pseudo-random pattern of logits with a spread of about ±3
        let logits: Vec<f32> = (0..3 * vocab)
            .map(|k| ((k * 37 + 11) % 23) as f32 / 4.0 - 2.7)
            .collect();
        let clean: Vec<f32> = (0..3 * vocab)
            .map(|k| ((k * 13 + 5) % 19) as f32 / 5.0 - 1.5)
            .collect();
        let targets = vec![t(&[1, 4], &[0, 2, 6]), t(&[3], &[5]), t(&[0, 6, 2], &[1])];
        for metric in Metric::ALL {
            let f = |x: &[f32]| {
                metric_value(metric, x, vocab, &targets, Some(&clean))
                    .unwrap()
                    .mean as f64
            };
            let g = metric_gradient(metric, &logits, vocab, &targets, Some(&clean)).unwrap();
            let eps = 1e-2f32;
            for k in 0..logits.len() {
                let mut hi = logits.clone();
                hi[k] += eps;
                let mut lo = logits.clone();
                lo[k] -= eps;
                let fd = (f(&hi) - f(&lo)) / (2.0 * eps as f64);
                assert!(
                    (fd - g[k] as f64).abs() < 2e-4,
                    "{metric}: d/dlogit[{k}] analytic {} vs numeric {fd}",
                    g[k]
                );
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (l, tg) = fixture();
        let mut nan = l.clone();
        nan[4] = f32::NAN;
        let e = metric_value(Metric::LogitDiff, &nan, 3, &tg, None).unwrap_err();
        assert!(matches!(e, Error::NonFinite { .. }), "{e}");
        let mut inf = l.clone();
        inf[0] = f32::INFINITY;
        assert!(matches!(
            metric_gradient(Metric::ProbDiff, &inf, 3, &tg, None),
            Err(Error::NonFinite { .. })
        ));
        assert!(metric_value(Metric::LogitDiff, &l[..5], 3, &tg, None).is_err());
        assert!(metric_value(
            Metric::LogitDiff,
            &l,
            3,
            &[t(&[1], &[]), t(&[0], &[1])],
            None
        )
        .is_err());
        assert!(metric_value(Metric::Nll, &l, 3, &[t(&[], &[1]), t(&[0], &[1])], None).is_err());
        assert!(metric_value(
            Metric::ProbDiff,
            &l,
            3,
            &[t(&[9], &[1]), t(&[0], &[1])],
            None
        )
        .is_err());
        assert!(metric_value(Metric::Nll, &[], 3, &[], None).is_err());
        assert!(metric_value(Metric::Nll, &l, 0, &tg, None).is_err());
    }

    #[test]
    fn large_logits_are_stable() {
        // p(answer) ≈ 1 − e^{-1000}: NLL must be ≈ 0, not NaN or inf
        let l = vec![1000.0, 0.0, 0.0];
        let v = metric_value(Metric::Nll, &l, 3, &[t(&[0], &[1])], None).unwrap();
        assert!(v.mean.abs() < 1e-6);
        let v = metric_value(Metric::Nll, &l, 3, &[t(&[1], &[0])], None).unwrap();
        close(v.mean, 1000.0);
    }

    #[test]
    fn names_parse() {
        use clap::ValueEnum;
        for m in Metric::ALL {
            assert_eq!(Metric::from_str(m.name(), false).unwrap(), m);
        }
        assert!(Metric::from_str("logit_diff", false).is_err());
    }
}
