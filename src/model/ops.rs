//! The element-wise and normalisation kernels of the forward and the activation-only backward.
//!
//! On the CPU each kernel is one fused pass over contiguous rows, split across threads with
//! rayon: built from separate candle ops, GPT-2's GELU alone cost ~150 ms per forward (DESIGN §3).
//! On other devices the same maths is composed from candle ops; a unit test checks that both
//! paths agree so the composite one is exercised even without a GPU.
//!
//! Conventions that decide parity with PyTorch: LayerNorm uses the biased variance with eps inside
//! the square root; `gelu_new` is the tanh form, `gelu` the erf form; ReLU'(0) = 0.

use candle_core::{DType, Device, Storage, Tensor, D};
use rayon::prelude::*;

use super::config::Activation;
use crate::Result;

/// Rows per rayon task: big enough to amortise scheduling, small enough to balance 2–16 cores.
const ROWS_PER_TASK: usize = 16;

/// Runs `f` on the f32 data of a contiguous CPU tensor; `None` for other devices or layouts.
pub fn cpu_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    cpu_slices(&[t], |s| f(s[0]))
}

/// Maps in the pages of a large fresh buffer in one call (`MADV_POPULATE_WRITE`, Linux 5.14+)
/// instead of one page fault per 4 KiB as it is first written: EAP's Δ (123 MB for GPT-2 at
/// 32 × 16 tokens in bf16) took 31-38 ms this way against ~3 µs per page faulted in on a
/// 2-core KVM guest. Elsewhere, or when the kernel refuses, the pages fault in as before.
pub(crate) fn prefault<T: Copy>(buf: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = (buf.as_mut_ptr() as usize).next_multiple_of(PAGE);
        let end = (buf.as_mut_ptr() as usize + std::mem::size_of_val(buf)) & !(PAGE - 1);
        if end > start + PAGE {
            // SAFETY: the range lies inside `buf`, which is ours to write; populating only maps
            // pages in (their contents stay what they were) and its result is advisory.
            unsafe {
                libc::madvise(
                    start as *mut libc::c_void,
                    end - start,
                    libc::MADV_POPULATE_WRITE,
                )
            };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// Copies a tensor's f32 data to a vector (any device, any layout).
pub fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    if let Some(v) = cpu_slice(t, |s| s.to_vec()) {
        return Ok(v);
    }
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// Statistics a LayerNorm or RMSNorm keeps for its backward: the normalised input and 1/σ per
/// row.
#[derive(Debug, Clone)]
pub struct NormCache {
    /// `(x − mean) / σ` (LayerNorm) or `x / rms` (RMSNorm), same shape as the input.
    pub xhat: Tensor,
    /// `[rows, 1]`.
    pub inv_std: Tensor,
    /// LayerNorm subtracts the mean (and its backward the mean gradient); RMSNorm does not.
    pub centered: bool,
}

/// LayerNorm over the last dimension, returning the output and the statistics for the
/// backward. `w`/`b` are `None` for `LNPre`.
pub fn layer_norm(
    x: &Tensor,
    w: Option<&Tensor>,
    b: Option<&Tensor>,
    eps: f32,
    force_composite: bool,
) -> Result<(Tensor, NormCache)> {
    normalize(x, w, b, eps, true, force_composite)
}

/// RMSNorm over the last dimension as Hugging Face computes it, `x / sqrt(mean(x²) + eps) · w`,
/// with the statistics for the backward.
pub fn rms_norm(
    x: &Tensor,
    w: Option<&Tensor>,
    eps: f32,
    force_composite: bool,
) -> Result<(Tensor, NormCache)> {
    normalize(x, w, None, eps, false, force_composite)
}

/// `(x − mean) / σ · w + b` with `centered` (LayerNorm), `x / rms · w` without (RMSNorm); the
/// statistics in f64, one fused pass per row on the CPU. Without the mean, `x − 0` and `(x − 0)²`
/// are `x` and `x²` exactly, so one kernel serves both.
fn normalize(
    x: &Tensor,
    w: Option<&Tensor>,
    b: Option<&Tensor>,
    eps: f32,
    centered: bool,
    force_composite: bool,
) -> Result<(Tensor, NormCache)> {
    let d = x.dim(D::Minus1)?;
    let rows = x.elem_count() / d;
    if !force_composite {
        let wv = w.map(to_vec).transpose()?;
        let bv = b.map(to_vec).transpose()?;
        let fast = cpu_slice(x, |xs| {
            let mut y = vec![0f32; xs.len()];
            let mut xhat = vec![0f32; xs.len()];
            let mut inv = vec![0f32; rows];
            y.par_chunks_mut(d * ROWS_PER_TASK)
                .zip(xhat.par_chunks_mut(d * ROWS_PER_TASK))
                .zip(inv.par_chunks_mut(ROWS_PER_TASK))
                .zip(xs.par_chunks(d * ROWS_PER_TASK))
                .for_each(|(((y, xh), inv), xs)| {
                    normalize_rows(
                        xs,
                        d,
                        centered,
                        eps,
                        wv.as_deref(),
                        bv.as_deref(),
                        y,
                        Some(xh),
                        Some(inv),
                    )
                });
            (y, xhat, inv)
        });
        if let Some((y, xhat, inv)) = fast {
            let shape = x.shape().clone();
            let dev = x.device();
            return Ok((
                Tensor::from_vec(y, shape.clone(), dev)?,
                NormCache {
                    xhat: Tensor::from_vec(xhat, shape, dev)?,
                    inv_std: Tensor::from_vec(inv, (rows, 1), dev)?,
                    centered,
                },
            ));
        }
    }
    let x2 = x.reshape((rows, d))?;
    let xc = match centered {
        true => x2.broadcast_sub(&x2.mean_keepdim(1)?)?,
        false => x2,
    };
    let var = xc.sqr()?.mean_keepdim(1)?;
    let inv_std = (var + eps as f64)?.sqrt()?.recip()?;
    let xhat = xc.broadcast_mul(&inv_std)?;
    let y = match (w, b) {
        (Some(w), Some(b)) => xhat.broadcast_mul(w)?.broadcast_add(b)?,
        (Some(w), None) => xhat.broadcast_mul(w)?,
        _ => xhat.clone(),
    };
    Ok((
        y.reshape(x.shape())?,
        NormCache {
            xhat: xhat.reshape(x.shape())?,
            inv_std,
            centered,
        },
    ))
}

/// [`layer_norm`] (`centered`) or [`rms_norm`]'s output alone, with the same bits, for a
/// forward that keeps no statistics: one output buffer instead of three (ACDC's per-head
/// projections and MLP inputs, the corrupted run's norms).
pub fn normalized(
    x: &Tensor,
    w: Option<&Tensor>,
    b: Option<&Tensor>,
    eps: f32,
    centered: bool,
) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let wv = w.map(to_vec).transpose()?;
    let bv = b.map(to_vec).transpose()?;
    let fast = cpu_slice(x, |xs| {
        let mut y = vec![0f32; xs.len()];
        y.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(xs.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(y, xs)| {
                normalize_rows(
                    xs,
                    d,
                    centered,
                    eps,
                    wv.as_deref(),
                    bv.as_deref(),
                    y,
                    None,
                    None,
                )
            });
        y
    });
    match fast {
        Some(y) => Ok(Tensor::from_vec(y, x.shape().clone(), x.device())?),
        None => Ok(normalize(x, w, b, eps, centered, false)?.0),
    }
}

/// Backward of [`layer_norm`] for upstream gradients `g` of shape `[k, rows, d]` or `[rows, d]`:
/// the same LayerNorm (same statistics) applied to `k` different gradients at once — the k
/// heads and letters that read one residual stream.
///
/// `dx = (1/σ) · (g·w − mean(g·w) − x̂ · mean(g·w·x̂))`.
pub fn layer_norm_backward(
    g: &Tensor,
    cache: &NormCache,
    w: Option<&Tensor>,
    force_composite: bool,
) -> Result<Tensor> {
    let d = g.dim(D::Minus1)?;
    let rows = cache.inv_std.elem_count();
    if !force_composite {
        let wv = w.map(to_vec).transpose()?;
        let fast = cpu_slice(&cache.xhat, |xhat| {
            cpu_slice(&cache.inv_std, |inv| {
                cpu_slice(g, |gs| {
                    let mut out = vec![0f32; gs.len()];
                    out.par_chunks_mut(d * ROWS_PER_TASK)
                        .zip(gs.par_chunks(d * ROWS_PER_TASK))
                        .enumerate()
                        .for_each(|(task, (o, gs))| {
                            let first_row = task * ROWS_PER_TASK;
                            ln_backward_rows(
                                gs,
                                d,
                                first_row,
                                rows,
                                xhat,
                                inv,
                                wv.as_deref(),
                                cache.centered,
                                o,
                            )
                        });
                    out
                })
            })
        });
        // rows must tile: ROWS_PER_TASK chunks of a [k, rows, d] tensor start at multiples of
        // ROWS_PER_TASK rows, so `(first_row + r) % rows` is the row within the residual stream.
        if let Some(Some(Some(out))) = fast {
            return Ok(Tensor::from_vec(out, g.shape().clone(), g.device())?);
        }
    }
    let gw = match w {
        Some(w) => g.broadcast_mul(w)?,
        None => g.clone(),
    };
    let xhat = cache.xhat.reshape((rows, d))?;
    let m2 = gw.broadcast_mul(&xhat)?.mean_keepdim(D::Minus1)?;
    let centered = match cache.centered {
        true => gw.broadcast_sub(&gw.mean_keepdim(D::Minus1)?)?,
        false => gw,
    };
    let dx = centered
        .sub(&xhat.broadcast_mul(&m2)?.broadcast_as(centered.shape())?)?
        .broadcast_mul(&cache.inv_std)?;
    Ok(dx)
}

/// One row of the LayerNorm backward: `out = (1/σ) · (g·w − mean(g·w) − x̂ · mean(g·w·x̂))`;
/// without `centered` (RMSNorm) the `mean(g·w)` term is absent. `out` may alias nothing; `gw`
/// is scratch of the row's length.
#[inline(always)]
fn ln_backward_row(
    g: &[f32],
    xhat: &[f32],
    w: Option<&[f32]>,
    inv_std: f32,
    centered: bool,
    gw: &mut [f32],
    out: &mut [f32],
) {
    let d = g.len() as f32;
    match w {
        Some(w) => gw
            .iter_mut()
            .zip(g)
            .zip(w)
            .for_each(|((o, g), w)| *o = g * w),
        None => gw.copy_from_slice(g),
    }
    let m1 = if centered { lane_sum(gw) / d } else { 0.0 };
    let m2 = lane_dot(gw, xhat) / d;
    for ((o, g), x) in out.iter_mut().zip(gw.iter()).zip(xhat) {
        *o = inv_std * (g - m1 - x * m2);
    }
}

/// `Σ x`, or with `square` `Σ (x − shift)²`, in f64 with 8 independent accumulators (see
/// [`lane_sum`]): a norm's mean and variance.
#[inline(always)]
fn lane_sum_f64(x: &[f32], shift: f64, square: bool) -> f64 {
    let term = |v: f32| match square {
        false => v as f64,
        true => (v as f64 - shift) * (v as f64 - shift),
    };
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| term(v)).sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += term(c[i]);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Sum with 16 independent accumulators: a plain `iter().sum()` is one serial chain of
/// dependent additions (floating point is not reassociated), 4 cycles each.
#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Dot product with 16 independent accumulators (see [`lane_sum`]).
#[inline(always)]
fn lane_dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (cx, cy) = (x.chunks_exact(16), y.chunks_exact(16));
    let tail: f32 = cx
        .remainder()
        .iter()
        .zip(cy.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in cx.zip(cy) {
        for i in 0..16 {
            acc[i] += a[i] * b[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The q, k and v reader gradients of one layer, one `[h, rows, d]` tensor per letter, and their
/// sum over letters and heads (`[rows, d]`, the gradient the residual stream receives from the
/// layer's attention): for each letter and head, `d_in = LN1_backward(d_letter[h] ·
/// W_letter[h]ᵀ)`, the GEMM written straight into its slot, the LayerNorm backward applied in
/// place and the slot added into its thread's sum while it is in cache (summing afterwards
/// re-read 57 MB per GPT-2 layer). One tensor per letter so that each is a reader group of its
/// own. The weights are the layer's fused `[d, columns]` projection: query head `h`'s
/// `W_letter[h]` is the `dh` columns from `columns[letter][h]` (key and value heads repeat for
/// the query heads that read them). `None` when the inputs are not contiguous CPU f32, and the
/// caller composes the same maths from candle ops. With `bf16_t`, the bf16 packing of
/// `w_qkvᵀ` (bf16 products), each head's product takes bf16 inputs: through its panels, or
/// on a CPU without AVX512-BF16 as the f32 product of the rounded values.
pub fn qkv_input_grads(
    d_heads: [&Tensor; 3],
    w_qkv: &Tensor,
    columns: [&[usize]; 3],
    norm: Option<(&NormCache, Option<&Tensor>)>,
    bf16_t: Option<&super::bf16::PackedWeight>,
) -> Result<Option<([Tensor; 3], Tensor)>> {
    let (h, rows, dh) = d_heads[0].dims3()?;
    let (d, width) = w_qkv.dims2()?;
    if columns
        .iter()
        .any(|c| c.len() != h || c.iter().any(|&c| c + dh > width))
    {
        return Err(crate::Error::Shape {
            op: "qkv_input_grads",
            expected: format!("{h} heads' columns of {dh} within {width}"),
            found: format!("{columns:?}"),
        });
    }
    let usable = |t: &Tensor| t.device().is_cpu() && t.is_contiguous() && t.dtype() == DType::F32;
    if !d_heads.iter().all(|t| usable(t)) || !usable(w_qkv) {
        return Ok(None);
    }
    let (xhat, inv, wv) = match norm {
        Some((c, w)) => (
            Some(to_vec(&c.xhat)?),
            Some(to_vec(&c.inv_std)?),
            w.map(to_vec).transpose()?,
        ),
        None => (None, None, None),
    };
    let centered = norm.is_none_or(|(c, _)| c.centered);
    let slot = rows * d;
    let rounded_t = bf16_t.and_then(super::bf16::rounded_values);
    let mut operands = vec![d_heads[0], d_heads[1], d_heads[2], w_qkv];
    operands.extend(rounded_t);
    let outs = cpu_slices(&operands, |data| {
        let (d_data, w_data) = (&data[..3], data[3]);
        let fill = |letter: usize, head: usize, dst: &mut [std::mem::MaybeUninit<f32>]| {
            let dsrc = &d_data[letter][head * rows * dh..(head + 1) * rows * dh];
            // dst [rows, d] = dsrc [rows, dh] · W[h]ᵀ: W[h]ᵀ's element (j, i) is the fused
            // matrix's (i, column + j), and the transposed packing's (column + j, i).
            let column = columns[letter][head];
            let panels = bf16_t
                .is_some_and(|p| super::bf16::product_rows_serial(dsrc, rows, column, dh, p, dst));
            match data.get(4) {
                _ if panels => {}
                Some(rounded) => {
                    let xr: Vec<f32> = dsrc
                        .iter()
                        .map(|&x| half::bf16::from_f32(x).to_f32())
                        .collect();
                    gemm_serial(rows, d, dh, &xr, dh, (&rounded[column * d..], d, 1), dst);
                }
                None => {
                    let wsrc = &w_data[column..];
                    gemm_serial(rows, d, dh, dsrc, dh, (wsrc, 1, width), dst);
                }
            }
            // SAFETY: the GEMM has just written all of `dst`.
            let dst = unsafe { &mut *(dst as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
            if let (Some(xhat), Some(inv)) = (&xhat, &inv) {
                ln_backward_in_place(dst, d, xhat, inv, wv.as_deref(), centered);
            }
            &*dst
        };
        let mut letters: [Vec<f32>; 3] = std::array::from_fn(|_| Vec::with_capacity(h * slot));
        let slots: Vec<(usize, &mut [std::mem::MaybeUninit<f32>])> = letters
            .iter_mut()
            .flat_map(|v| v.spare_capacity_mut()[..h * slot].chunks_mut(slot))
            .enumerate()
            .collect();
        // Two sums per thread at most: each is a [rows, d] buffer to clear and add in.
        let per_sum = slots
            .len()
            .div_ceil(2 * rayon::current_num_threads())
            .max(1);
        let sum = slots
            .into_par_iter()
            .with_min_len(per_sum)
            .fold(
                || vec![0f32; slot],
                |mut acc, (i, dst)| {
                    let slot = fill(i / h, i % h, dst);
                    add_strided(slot, 1, slot.len(), 0, &mut acc); // acc += slot
                    acc
                },
            )
            .reduce_with(|mut a, b| {
                add_strided(&b, 1, b.len(), 0, &mut a); // a += b
                a
            })
            .unwrap_or_else(|| vec![0f32; slot]);
        for v in &mut letters {
            // SAFETY: every slot of every letter was written by `fill` above.
            unsafe { v.set_len(h * slot) };
        }
        (letters, sum)
    });
    let Some(([oq, ok, ov], sum)) = outs else {
        return Ok(None);
    };
    let dev = d_heads[0].device();
    Ok(Some((
        [
            Tensor::from_vec(oq, (h, rows, d), dev)?,
            Tensor::from_vec(ok, (h, rows, d), dev)?,
            Tensor::from_vec(ov, (h, rows, d), dev)?,
        ],
        Tensor::from_vec(sum, (rows, d), dev)?,
    )))
}

/// `C = A · Bᵀ` on one thread: `A` is `m × k` with rows `lda` apart, `B` is `n × k` with rows
/// `ldb` apart, `C` is `m × n` row-major and overwritten.
#[allow(clippy::too_many_arguments)]
fn gemm_nt_serial(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
) {
    // SAFETY: a `MaybeUninit<f32>` has the layout of an `f32`, and gemm writes only floats.
    let c = unsafe { &mut *(c as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) };
    gemm_serial(m, n, k, a, lda, (b, 1, ldb), c);
}

/// `C = A · B` on one thread, with gemm's kernels: `A` is `m × k` with rows `lda` apart, `B`'s
/// element `(kk, j)` is `b.0[kk · b.1 + j · b.2]`, and `C` (`m × n`, row-major) is written in
/// full without being read, so it may start uninitialised. The one place eap calls gemm
/// directly; bounds are checked here so callers stay safe.
fn gemm_serial(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: (&[f32], usize, usize),
    c: &mut [std::mem::MaybeUninit<f32>],
) {
    let (b, b_k, b_n) = b;
    let empty = m == 0 || n == 0 || k == 0;
    let a_last = if empty { 0 } else { (m - 1) * lda + k };
    let b_last = if empty {
        0
    } else {
        (k - 1) * b_k + (n - 1) * b_n + 1
    };
    assert!(
        a.len() >= a_last && b.len() >= b_last && c.len() >= m * n,
        "gemm_serial: operands too short"
    );
    if k == 0 {
        c[..m * n].fill(std::mem::MaybeUninit::new(0.0));
        return;
    }
    // SAFETY: the assertion keeps every element the strides address inside `a`, `b` and `c`;
    // with `read_dst` false gemm only writes `c`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr() as *mut f32,
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            lda as isize,
            b.as_ptr(),
            b_n as isize,
            b_k as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// A vector of `len` floats, `fill` given it in `chunk`-sized pieces (with their index) on
/// rayon's threads, without zeroing it first: the outputs of GEMMs that overwrite them (a
/// per-letter reader gradient is 19 MB per GPT-2 layer; zeroing it cost ~30 ms per backward).
///
/// # Safety
/// `fill` must write every element of the chunk it is handed.
unsafe fn filled_in_chunks(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    if chunk > 0 {
        v.spare_capacity_mut()[..len]
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| fill(i, c));
    }
    // SAFETY: the caller's `fill` initialised every chunk, and the chunks cover `len`.
    unsafe { v.set_len(len) };
    v
}

/// Every head's output projection `z_h · W_O[h]` from mixed values `z` laid out `[rows, h·k]`
/// (head `h`'s are columns `h·k..(h+1)·k`) and `w` `[h, k, n]`: `[h, rows, n]`. For CPU f32
/// contiguous inputs one single-threaded GEMM per head on rayon's threads: candle's batched
/// matmul splits each of these small products (`k = d_head`) over both threads in turn and ran
/// at ~105 GFLOP/s where this runs at ~180 (GPT-2 shape, 2-core AVX-512 EPYC); candle's for
/// other inputs.
pub fn per_head_products(z: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (rows, h, k, n) = interleaved_heads(z, w, "per_head_products")?;
    let blocks = HeadBlocks {
        stride: k,
        lda: h * k,
    };
    let weights = HeadWeights::stacked(h, k, n);
    if let Some(t) = per_head_gemms(z, w, blocks, &weights, (h, rows, k, n))? {
        return Ok(t);
    }
    let z_heads = swap_middle(z, (1, rows, h, k))?.reshape((h, rows, k))?;
    Ok(z_heads.matmul(w)?)
}

/// [`per_head_products`] written into `out`: head `h`'s `[rows, n]` product fills the first
/// `rows · n` floats of `out`'s `h`-th chunk of `chunk` floats (Δ's padded rows).
/// [`per_head_products_into`] with bf16 inputs through `w_o`, the packing of `W_O` as one
/// `[heads · d_head, d]` matrix: head `h` multiplies its columns of `z` by rows `h·d_head..` of
/// the panels, on one thread per head. `false`, with nothing written, where the packing is not
/// in hardware panels (or `d_head` is odd, or `z` is not contiguous CPU f32).
pub fn per_head_products_bf16_into(
    z: &Tensor,
    w_o: &crate::model::bf16::PackedWeight,
    heads: usize,
    out: &mut [f32],
    chunk: usize,
) -> Result<bool> {
    let (rows, width) = z.dims2()?;
    let n = w_o.n();
    if heads == 0 || width % heads != 0 || width != w_o.k() || chunk < rows * n {
        return Err(crate::Error::Shape {
            op: "per_head_products_bf16_into",
            expected: format!("[rows, {}] mixed values of {heads} heads", w_o.k()),
            found: format!("{:?}, chunks of {chunk}", z.dims()),
        });
    }
    let dh = width / heads;
    if out.len() < heads * chunk {
        return Err(crate::Error::Shape {
            op: "per_head_products_bf16_into",
            expected: format!("{heads} output chunks of {chunk} floats"),
            found: format!("{} floats", out.len()),
        });
    }
    let done = cpu_slice(z, |zs| {
        out.par_chunks_mut(chunk)
            .take(heads)
            .enumerate()
            .map(|(head, dst)| {
                let x: Vec<f32> = zs
                    .chunks(width)
                    .flat_map(|row| &row[head * dh..(head + 1) * dh])
                    .copied()
                    .collect();
                // SAFETY: a `MaybeUninit<f32>` has the layout of an `f32`; the product only
                // writes (every element of the first `rows · n`).
                let dst = unsafe {
                    &mut *(&mut dst[..rows * n] as *mut [f32]
                        as *mut [std::mem::MaybeUninit<f32>])
                };
                crate::model::bf16::product_rows_serial(&x, rows, head * dh, dh, w_o, dst)
            })
            .collect::<Vec<bool>>()
    });
    match done {
        Some(heads_done) if heads_done.iter().all(|&d| d) => Ok(true),
        // Some heads may have been written: the caller's f32 products overwrite them all.
        _ => Ok(false),
    }
}

pub fn per_head_products_into(z: &Tensor, w: &Tensor, out: &mut [f32], chunk: usize) -> Result<()> {
    let (rows, h, k, n) = interleaved_heads(z, w, "per_head_products_into")?;
    if chunk < rows * n || out.len() < h * chunk {
        return Err(crate::Error::Shape {
            op: "per_head_products_into",
            expected: format!("{h} output chunks of at least {rows} · {n} floats"),
            found: format!("{} floats in chunks of {chunk}", out.len()),
        });
    }
    let blocks = HeadBlocks {
        stride: k,
        lda: h * k,
    };
    let weights = HeadWeights::stacked(h, k, n);
    let done = cpu_slices(&[z, w], |data| {
        out.par_chunks_mut(chunk)
            .take(h)
            .enumerate()
            .for_each(|(head, dst)| {
                // SAFETY: a `MaybeUninit<f32>` has the layout of an `f32`; gemm only writes.
                let dst = unsafe {
                    &mut *(&mut dst[..rows * n] as *mut [f32]
                        as *mut [std::mem::MaybeUninit<f32>])
                };
                head_product(data[0], data[1], blocks, &weights, head, (rows, k, n), dst);
            });
    });
    if done.is_none() {
        let heads = per_head_products(z, w)?;
        for (head, dst) in out.chunks_mut(chunk).take(h).enumerate() {
            dst[..rows * n].copy_from_slice(&to_vec(&heads.get(head)?)?);
        }
    }
    Ok(())
}

/// `x[h] · W[h]` for every `h` (`[h, rows, k]` → `[h, rows, n]`), `W[h]` being the `n`
/// columns of `w` (`[k, width]`) from `columns[h]`: ACDC's per-head q/k/v projections of each
/// head's own residual stream, read from the fused projection. One single-threaded GEMM per
/// head, as [`per_head_products`], for CPU f32 contiguous inputs; candle's batched matmul for
/// others.
pub fn batched_products(x: &Tensor, w: &Tensor, columns: &[usize], n: usize) -> Result<Tensor> {
    let (h, rows, k) = x.dims3()?;
    let (k2, width) = w.dims2()?;
    if h != columns.len() || k != k2 || columns.iter().any(|&c| c + n > width) {
        return Err(crate::Error::Shape {
            op: "batched_products",
            expected: format!("{h} blocks of {n} columns within [{k}, width]"),
            found: format!("columns {columns:?} of {:?}", w.dims()),
        });
    }
    let blocks = HeadBlocks {
        stride: rows * k,
        lda: k,
    };
    let weights = HeadWeights {
        offsets: std::borrow::Cow::Borrowed(columns),
        row: width,
    };
    match per_head_gemms(x, w, blocks, &weights, (h, rows, k, n))? {
        Some(t) => Ok(t),
        None => {
            let heads = columns
                .iter()
                .map(|&c| w.narrow(1, c, n))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(x.matmul(&Tensor::stack(&heads, 0)?)?)
        }
    }
}

/// `(rows, h, k, n)` of mixed values `z` (`[rows, h·k]`) against per-head `w` (`[h, k, n]`).
fn interleaved_heads(
    z: &Tensor,
    w: &Tensor,
    op: &'static str,
) -> Result<(usize, usize, usize, usize)> {
    let (rows, hk) = z.dims2()?;
    let (h, k, n) = w.dims3()?;
    if h * k != hk {
        return Err(candle_core::Error::ShapeMismatchBinaryOp {
            lhs: z.shape().clone(),
            rhs: w.shape().clone(),
            op,
        }
        .into());
    }
    Ok((rows, h, k, n))
}

/// Where head `h`'s `[rows, k]` block of a per-head left operand starts (`h · stride`) and how
/// far apart its rows are (`lda`): `(k, h·k)` in mixed values `[rows, h·k]`, `(rows·k, k)` in a
/// head-major `[h, rows, k]` tensor.
#[derive(Clone, Copy)]
struct HeadBlocks {
    stride: usize,
    lda: usize,
}

/// Where each head's `[k, n]` right operand sits in a weight slice: head `h`'s element
/// `(kk, j)` is at `offsets[h] + kk · row + j`. `[h, k, n]` stacked heads have offsets
/// `h · k · n` and rows `n` apart; heads as column blocks of one `[k, width]` matrix have their
/// first columns as offsets and rows `width` apart.
struct HeadWeights<'a> {
    offsets: std::borrow::Cow<'a, [usize]>,
    row: usize,
}

impl HeadWeights<'_> {
    fn stacked(h: usize, k: usize, n: usize) -> HeadWeights<'static> {
        HeadWeights {
            offsets: (0..h).map(|i| i * k * n).collect(),
            row: n,
        }
    }
}

/// Head `head`'s product `a[head] · w[head]` into `dst` (`[rows, n]`).
fn head_product(
    a: &[f32],
    w: &[f32],
    blocks: HeadBlocks,
    weights: &HeadWeights,
    head: usize,
    (rows, k, n): (usize, usize, usize),
    dst: &mut [std::mem::MaybeUninit<f32>],
) {
    gemm_serial(
        rows,
        n,
        k,
        &a[head * blocks.stride..],
        blocks.lda,
        (&w[weights.offsets[head]..], weights.row, 1),
        dst,
    );
}

/// Every head's product as `[h, rows, n]`, one single-threaded GEMM per head on rayon's
/// threads; `None` unless both operands are contiguous f32 on the CPU.
fn per_head_gemms(
    a: &Tensor,
    w: &Tensor,
    blocks: HeadBlocks,
    weights: &HeadWeights,
    (h, rows, k, n): (usize, usize, usize, usize),
) -> Result<Option<Tensor>> {
    let out = cpu_slices(&[a, w], |data| {
        // SAFETY: each head's GEMM writes its whole `[rows, n]` chunk.
        unsafe {
            filled_in_chunks(h * rows * n, rows * n, |head, dst| {
                head_product(data[0], data[1], blocks, weights, head, (rows, k, n), dst);
            })
        }
    });
    match out {
        Some(v) => Ok(Some(Tensor::from_vec(v, (h, rows, n), a.device())?)),
        None => Ok(None),
    }
}

/// Every head's `[batch, heads, seq, dh]` block of a projection `y` (`[batch · seq, width]`)
/// whose head `i` is the `dh` columns from `first + i · dh`: the fused q/k/v GEMM's output
/// split into what attention reads, one pass over the rows.
pub fn heads_of_columns(
    y: &Tensor,
    first: usize,
    (heads, dh): (usize, usize),
    (batch, seq): (usize, usize),
) -> Result<Tensor> {
    let (n, width) = y.dims2()?;
    if n != batch * seq || first + heads * dh > width {
        return Err(crate::Error::Shape {
            op: "heads_of_columns",
            expected: format!("[{}, at least {}]", batch * seq, first + heads * dh),
            found: format!("{:?}", y.dims()),
        });
    }
    let done = cpu_slice(y, |src| {
        // SAFETY: each chunk is one (batch, head) pair's [seq, dh] block, every row copied.
        unsafe {
            filled_in_chunks(n * heads * dh, seq * dh, |bh, dst| {
                let (bi, hi) = (bh / heads, bh % heads);
                for (pi, row) in dst.chunks_mut(dh).enumerate() {
                    let from = (bi * seq + pi) * width + first + hi * dh;
                    for (d, s) in row.iter_mut().zip(&src[from..from + dh]) {
                        d.write(*s);
                    }
                }
            })
        }
    });
    match done {
        Some(v) => Ok(Tensor::from_vec(v, (batch, heads, seq, dh), y.device())?),
        None => Ok(y
            .narrow(1, first, heads * dh)?
            .reshape((batch, seq, heads, dh))?
            .transpose(1, 2)?
            .contiguous()?),
    }
}

/// The longest key sequence [`short_attention`] takes; longer ones go through GEMMs.
pub const SHORT_ATTENTION_MAX_KEYS: usize = 64;

/// Attention over short sequences, per (batch, head) in plain loops: the pattern
/// `softmax(q·kᵀ / scale + mask)` (`[b, h, m, p]`) and the mixed values `pattern · v` as
/// `[b·m, h·d_head]` (what the output projection reads, flat or per head). candle ran these as
/// batched matmuls of `[16, 64] × [64, 16]` with a softmax and a head reshuffle in between: ~3 ms
/// per GPT-2 layer at 32 × 16 tokens for 2 MFLOP. `q` is `[b, h, m, dh]`, `k` and `v`
/// `[b, h, p, dh]`, `mask` `[m, p]` (0 or −∞); `None` for more than
/// [`SHORT_ATTENTION_MAX_KEYS`] keys or inputs that are not contiguous f32 on the CPU.
pub fn short_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f32,
) -> Result<Option<(Tensor, Tensor)>> {
    let (b, h, m, dh) = q.dims4()?;
    let p = k.dim(2)?;
    let shapes_agree = k.dims() == [b, h, p, dh] && v.dims() == [b, h, p, dh];
    if !shapes_agree || mask.dims() != [m, p] {
        return Err(crate::Error::Shape {
            op: "attention",
            expected: format!("keys and values [{b}, {h}, p, {dh}] and a mask [{m}, p]"),
            found: format!("{:?}, {:?}, mask {:?}", k.dims(), v.dims(), mask.dims()),
        });
    }
    if p > SHORT_ATTENTION_MAX_KEYS || m == 0 || p == 0 || dh == 0 {
        return Ok(None);
    }
    let out = cpu_slices(&[q, k, v, mask], |s| {
        let (qs, ks, vs, mask) = (s[0], s[1], s[2], s[3]);
        // Several (batch, head) pairs per task: one pair is a few microseconds of work.
        let group = (16_384 / (m * p.max(dh))).clamp(1, b * h);
        // SAFETY: each chunk is whole [m, p] patterns of consecutive (batch, head) pairs, each
        // written in full (the last chunk may hold fewer pairs).
        let pattern = unsafe {
            filled_in_chunks(b * h * m * p, group * m * p, |c, dst| {
                let mut rows = vec![0f32; m * p];
                for (i, dst) in dst.chunks_mut(m * p).enumerate() {
                    let bh = c * group + i;
                    let q = &qs[bh * m * dh..(bh + 1) * m * dh];
                    let k = &ks[bh * p * dh..(bh + 1) * p * dh];
                    attention_pattern(q, k, mask, 1.0 / scale, dh, &mut rows);
                    for (d, r) in dst.iter_mut().zip(&rows) {
                        d.write(*r);
                    }
                }
            })
        };
        // SAFETY: each chunk is one batch element's [m, h, dh] block; every head writes its
        // dh columns of every row.
        let z = unsafe {
            filled_in_chunks(b * m * h * dh, m * h * dh, |batch, dst| {
                let mut rows = vec![0f32; m * dh];
                for head in 0..h {
                    let bh = batch * h + head;
                    let pat = &pattern[bh * m * p..(bh + 1) * m * p];
                    mix_values(pat, &vs[bh * p * dh..(bh + 1) * p * dh], p, dh, &mut rows);
                    for (i, row) in rows.chunks_exact(dh).enumerate() {
                        let at = (i * h + head) * dh;
                        for (d, r) in dst[at..at + dh].iter_mut().zip(row) {
                            d.write(*r);
                        }
                    }
                }
            })
        };
        (pattern, z)
    });
    let Some((pattern, z)) = out else {
        return Ok(None);
    };
    Ok(Some((
        Tensor::from_vec(pattern, (b, h, m, p), q.device())?,
        Tensor::from_vec(z, (b * m, h * dh), q.device())?,
    )))
}

/// The backward of [`short_attention`] per (batch, head) in plain loops: from the gradient of
/// the mixed values `dz` (`[b·m, h·d_head]`, as the output projection's backward gives it) and
/// the forward's `q` (`[b, h, m, dh]`), `k`, `v` (`[b, h, p, dh]`) and `pattern`
/// (`[b, h, m, p]`), the gradients of `q`, `k` and `v` laid out per head, `[h, b·m, dh]` each
/// (`[h, b·p, dh]` for `k` and `v`). candle ran this as six batched matmuls, a softmax backward
/// of broadcasts and three head reshuffles. `None` as for [`short_attention`].
pub fn short_attention_backward(
    dz: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pattern: &Tensor,
    scale: f32,
) -> Result<Option<[Tensor; 3]>> {
    let (b, h, m, dh) = q.dims4()?;
    let p = k.dim(2)?;
    let agree = k.dims() == [b, h, p, dh]
        && v.dims() == [b, h, p, dh]
        && pattern.dims() == [b, h, m, p]
        && dz.dims() == [b * m, h * dh];
    if !agree {
        return Err(crate::Error::Shape {
            op: "attention backward",
            expected: format!("q [{b}, {h}, {m}, {dh}], k and v [{b}, {h}, p, {dh}], a pattern [{b}, {h}, {m}, p], dz [{}, {}]", b * m, h * dh),
            found: format!("k {:?}, v {:?}, pattern {:?}, dz {:?}", k.dims(), v.dims(), pattern.dims(), dz.dims()),
        });
    }
    if p > SHORT_ATTENTION_MAX_KEYS || m == 0 || p == 0 || dh == 0 {
        return Ok(None);
    }
    let out = cpu_slices(&[dz, q, k, v, pattern], |s| {
        let (dzs, qs, ks, vs, ps) = (s[0], s[1], s[2], s[3], s[4]);
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; h * b * m * dh],
            vec![0f32; h * b * p * dh],
            vec![0f32; h * b * p * dh],
        );
        dq.par_chunks_mut(m * dh)
            .zip(dk.par_chunks_mut(p * dh))
            .zip(dv.par_chunks_mut(p * dh))
            .enumerate()
            .for_each(|(hb, ((dq, dk), dv))| {
                let (head, batch) = (hb / b, hb % b);
                let bh = batch * h + head;
                // This head's rows of dz, gathered: [m, dh].
                let mut dzl = vec![0f32; m * dh];
                for (i, row) in dzl.chunks_exact_mut(dh).enumerate() {
                    let at = (batch * m + i) * h * dh + head * dh;
                    row.copy_from_slice(&dzs[at..at + dh]);
                }
                attention_pattern_backward(
                    &dzl,
                    &qs[bh * m * dh..(bh + 1) * m * dh],
                    &ks[bh * p * dh..(bh + 1) * p * dh],
                    &vs[bh * p * dh..(bh + 1) * p * dh],
                    &ps[bh * m * p..(bh + 1) * m * p],
                    1.0 / scale,
                    dh,
                    dq,
                    dk,
                    dv,
                );
            });
        (dq, dk, dv)
    });
    let Some((dq, dk, dv)) = out else {
        return Ok(None);
    };
    let dev = q.device();
    Ok(Some([
        Tensor::from_vec(dq, (h, b * m, dh), dev)?,
        Tensor::from_vec(dk, (h, b * p, dh), dev)?,
        Tensor::from_vec(dv, (h, b * p, dh), dev)?,
    ]))
}

/// A contiguous `[a, b, c, inner]` tensor as the contiguous `[a, c, b, inner]` one — the head
/// reshuffles of attention (`[batch, pos, head, d_head] ↔ [batch, head, pos, d_head]`, per-head
/// weights `[head, d, d_head] → [d, head, d_head]`). Written by hand because candle's strided copy
/// walks one element at a time through index arithmetic (1.2–2.4 ms for GPT-2's 2.4 MB q/k/v
/// weight, ~70 such copies per forward); here each `inner` run is one `memcpy`. Other inputs
/// (non-CPU, non-f32, strided) fall back to candle's `transpose` + `contiguous`.
pub fn swap_middle(t: &Tensor, dims: (usize, usize, usize, usize)) -> Result<Tensor> {
    let (a, b, c, inner) = dims;
    let t = t.reshape((a, b, c, inner))?;
    let done = cpu_slice(&t, |src| {
        // Each chunk is one output row `[ai, ci]`: `b` runs of `inner` values.
        let row = b * inner;
        if row == 0 {
            return vec![0f32; src.len()];
        }
        // SAFETY: each output row is `b` runs of `inner` values, every one written.
        unsafe {
            filled_in_chunks(src.len(), row, |r, dst| {
                let (ai, ci) = (r / c, r % c);
                for bi in 0..b {
                    let from = ((ai * b + bi) * c + ci) * inner;
                    let runs = dst[bi * inner..(bi + 1) * inner].iter_mut();
                    for (d, &s) in runs.zip(&src[from..from + inner]) {
                        d.write(s);
                    }
                }
            })
        }
    });
    match done {
        Some(v) => Ok(Tensor::from_vec(v, (a, c, b, inner), t.device())?),
        None => Ok(t.transpose(1, 2)?.contiguous()?),
    }
}

/// Per-head matrices `[heads_i, d, dh]` (contiguous CPU f32) side by side as the column blocks
/// of one `[d, Σ heads_i · dh]` matrix: block `i`'s head `hh` is columns `hh·dh..(hh+1)·dh`
/// of block `i`. One pass over the output, where a relayout per block and a concatenation
/// made four (the fused q/k/v projection of every layer, in every streamed pass). `None` for
/// other inputs.
pub fn fused_columns(blocks: &[&Tensor]) -> Result<Option<Tensor>> {
    let mut shapes = Vec::with_capacity(blocks.len());
    for b in blocks {
        shapes.push(b.dims3()?);
    }
    let Some(&(_, d, dh)) = shapes.first() else {
        return Ok(None);
    };
    if shapes.iter().any(|&(_, di, dhi)| (di, dhi) != (d, dh)) {
        return Err(crate::Error::Shape {
            op: "fused_columns",
            expected: format!("blocks of [heads, {d}, {dh}]"),
            found: format!("{shapes:?}"),
        });
    }
    let width: usize = shapes.iter().map(|s| s.0 * dh).sum();
    let device = blocks[0].device().clone();
    let done = cpu_slices(blocks, |srcs| {
        if width == 0 {
            return Vec::new();
        }
        // SAFETY: each output row is every block's heads in turn, `dh` values each: `width`.
        unsafe {
            filled_in_chunks(d * width, width, |i, row| {
                let mut at = 0;
                for (src, &(heads, _, _)) in srcs.iter().zip(&shapes) {
                    for hh in 0..heads {
                        let from = (hh * d + i) * dh;
                        for (o, &x) in row[at..at + dh].iter_mut().zip(&src[from..from + dh]) {
                            o.write(x);
                        }
                        at += dh;
                    }
                }
            })
        }
    });
    match done {
        Some(v) => Ok(Some(Tensor::from_vec(v, (d, width), &device)?)),
        None => Ok(None),
    }
}

/// `A · Bᵀ` for row-major `a: [m, k]` and `b: [n, k]` with `k ≫ m, n` — the EAP contraction
/// (`k = N · d_model`) and the unembedding's backward (`k = d_vocab`). A single GEMM
/// parallelises over `m` and `n`, which are too small here; this splits `k` into blocks, one
/// single-threaded product per block, and adds the partial products.
pub fn matmul_nt(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k) = a.dims2()?;
    Ok(matmul_nt_many(a, k, &[(b, m)])?.swap_remove(0))
}

/// A row length of at least `k` floats whose byte length is an odd number of 64-byte cache
/// lines. Rows of `k = N · d_model` floats are a multiple of 4 KiB apart (1.5 MiB on GPT-2 at
/// 32 × 16 tokens), so the same column of every row falls into one set of each cache level and
/// the contraction's blocks evict each other; an odd line count spreads the rows over all sets.
/// With Δ's rows padded so, the contraction ran at 130–150 GFLOP/s against 90–110.
pub fn padded_row_len(k: usize) -> usize {
    let lines = k.div_ceil(16);
    16 * (lines | 1)
}

/// [`matmul_nt`] of the first `rows` rows of one `a` against each of several `b` (`[n_i, k]`):
/// `[rows_i, n_i]` each. `a` is `[m, ≥ k]`: its rows are read up to column `k`, so a row longer
/// than `k` is padding ([`padded_row_len`]). The EAP contraction of several layers' reader
/// gradients against Δ: each block of `a`'s columns is read from memory once for all the
/// `b`s, while it sits in cache, instead of once per layer.
pub fn matmul_nt_many(a: &Tensor, k: usize, bs: &[(&Tensor, usize)]) -> Result<Vec<Tensor>> {
    let (m, lda) = a.dims2()?;
    let mut ns = Vec::with_capacity(bs.len());
    for (b, rows) in bs {
        let (n, k2) = b.dims2()?;
        if k != k2 || k > lda || *rows > m {
            return Err(crate::Error::Shape {
                op: "matmul_nt",
                expected: format!("inner dimension {k} (rows of {lda}) and at most {m} rows"),
                found: format!("inner dimension {k2}, {rows} rows"),
            });
        }
        ns.push(n);
    }
    let tensors: Vec<&Tensor> = std::iter::once(a)
        .chain(bs.iter().map(|(b, _)| *b))
        .collect();
    let fast = cpu_slices(&tensors, |slices| {
        let lhs = Strided {
            data: slices[0],
            row_len: lda,
        };
        let groups: Vec<(&[f32], usize, usize)> = bs
            .iter()
            .zip(&ns)
            .zip(&slices[1..])
            .map(|(((_, rows), &n), bv)| (*bv, n, *rows))
            .collect();
        #[cfg(target_arch = "x86_64")]
        match nt_simd() {
            NtSimd::Avx512 => return nt_avx512::matmul_nt_many(lhs, k, &groups),
            NtSimd::Avx2 => return nt_avx2::matmul_nt_many(lhs, k, &groups),
            NtSimd::None => {}
        }
        groups
            .iter()
            .map(|&(bv, n, rows)| matmul_nt_split_k(lhs, bv, rows, n, k))
            .collect::<Vec<_>>()
    });
    match fast {
        Some(outs) => outs
            .into_iter()
            .zip(bs.iter().zip(&ns))
            .map(|(out, ((_, rows), &n))| Ok(Tensor::from_vec(out, (*rows, n), a.device())?))
            .collect(),
        None => bs
            .iter()
            .map(|(b, rows)| Ok(a.narrow(0, 0, *rows)?.narrow(1, 0, k)?.matmul(&b.t()?)?))
            .collect(),
    }
}

/// `A · Bᵀ` for row-major `a: [m, k]` with few rows and `b: [n, k]` with many (`m` ≤ 256,
/// `k` ≤ 16,384): the unembedding of the metric's rows against a tied embedding's rows, 32 × 768
/// against 50,257 × 768 for GPT-2. gemm packs the transposed `b` first and ran it at ~60 GFLOP/s
/// (40 ms per KL evaluation, most of an ACDC pass from the logits); this reads each row of `b`
/// once from memory, in blocks of 64 rows, with an AVX-512 (or AVX2) register tile: 26–33 ms
/// on the Xeon. Other shapes, devices and CPUs take candle's matmul.
pub fn matmul_nt_wide(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k) = a.dims2()?;
    let (n, k2) = b.dims2()?;
    if k != k2 {
        return Err(crate::Error::Shape {
            op: "matmul_nt_wide",
            expected: format!("[n, {k}] right-hand rows"),
            found: format!("[{n}, {k2}]"),
        });
    }
    #[cfg(target_arch = "x86_64")]
    if m <= 256 && k <= 16_384 && nt_simd() != NtSimd::None {
        let fast = cpu_slices(&[a, b], |s| {
            let a = Strided {
                data: s[0],
                row_len: k,
            };
            match nt_simd() {
                NtSimd::Avx512 => nt_avx512::wide(a, s[1], m, n, k),
                _ => nt_avx2::wide(a, s[1], m, n, k),
            }
        });
        if let Some(out) = fast {
            return Ok(Tensor::from_vec(out, (m, n), a.device())?);
        }
    }
    Ok(a.matmul(&b.t()?)?)
}

/// Which of the register-tiled `A · Bᵀ` kernels the CPU runs.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum NtSimd {
    Avx512,
    Avx2,
    None,
}

#[cfg(target_arch = "x86_64")]
fn nt_simd() -> NtSimd {
    if std::arch::is_x86_feature_detected!("avx512f") {
        NtSimd::Avx512
    } else if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        NtSimd::Avx2
    } else {
        NtSimd::None
    }
}

/// A row-major matrix whose rows are `row_len` floats apart (at least as many as are read).
#[derive(Clone, Copy)]
struct Strided<'a> {
    data: &'a [f32],
    row_len: usize,
}

/// [`cpu_slice`] of several tensors at once: `None` unless every one is contiguous f32 on the CPU.
pub fn cpu_slices<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Option<R> {
    if ts
        .iter()
        .any(|t| !t.device().is_cpu() || t.dtype() != DType::F32 || !t.is_contiguous())
    {
        return None;
    }
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for ((storage, layout), t) in guards.iter().zip(ts) {
        match &**storage {
            Storage::Cpu(cpu) => {
                let data = cpu.as_slice::<f32>().ok()?;
                let start = layout.start_offset();
                slices.push(&data[start..start + t.elem_count()]);
            }
            _ => return None,
        }
    }
    Some(f(&slices))
}

/// The portable split-K `A · Bᵀ` of `a`'s first `m` rows: one single-threaded gemm per block
/// of `k`, partial products added. Used where neither AVX-512 nor AVX2 with FMA is there.
fn matmul_nt_split_k(a: Strided, bv: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let block = k.div_ceil(4 * rayon::current_num_threads()).max(4096);
    (0..k.div_ceil(block))
        .into_par_iter()
        .map(|blk| {
            let k0 = blk * block;
            let mut c = vec![0f32; m * n];
            let kb = block.min(k - k0);
            gemm_nt_serial(m, n, kb, &a.data[k0..], a.row_len, &bv[k0..], k, &mut c);
            c
        })
        .reduce(
            || vec![0f32; m * n],
            |mut x, y| {
                x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
                x
            },
        )
}

/// The register-tiled `A · Bᵀ` kernels — the split-K contraction ([`matmul_nt_many`]) and the
/// unembedding of few rows ([`matmul_nt_wide`]) — written once and compiled for each vector
/// width: `$lanes` floats per register, `$tm × $tn` accumulators in the contraction's tile and
/// `$wm × $wn` in the unembedding's, sized to the register file (32 registers for AVX-512, 16
/// for AVX2: accumulators, one vector per row of `b` and one of `a` must fit without spills).
/// gemm packs both operands first, which for the contraction's shapes (m ≤ 157, n ≤ 37,
/// k = 393,216) ran at ~3 GB/s against the machine's ~21 GB/s; these read each operand once
/// from memory.
macro_rules! nt_kernels {
    (
        $(#[$meta:meta])*
        mod $name:ident: $features:literal, $vec:ty, $lanes:literal,
        zero $zero:ident, load $load:ident, fma $fma:ident, sum $sum:path,
        contraction $tm:literal x $tn:literal, wide $wm:literal x $wn:literal $(,)?
    ) => {
        $(#[$meta])*
        #[cfg(target_arch = "x86_64")]
        mod $name {
            use crate::model::ops::Strided;
            use rayon::prelude::*;
            use std::arch::x86_64::*;

            /// Columns of `k` per block of the contraction: its rows of `a` and `b` stay in L2
            /// while the tiles pass over them (512 ran at ~90 GFLOP/s against 130–150 on the
            /// AVX-512 EPYC).
            const KB: usize = 4096;
            const TM: usize = $tm;
            const TN: usize = $tn;
            /// Rows of `a` and of `b` in [`wide`]'s register tile; the rows of `b` come from
            /// L1 (on AVX-512 the 4 × 6 tile with `b`'s rows outside ran its GPT-2 shape in
            /// 26–33 ms against 31–37 for the contraction's 6 × 4 with `a`'s outside, and 40–45
            /// for gemm).
            const WM: usize = $wm;
            const WN: usize = $wn;
            /// Rows of `b` per task in [`wide`]: 192 KiB of GPT-2's embedding, well inside L2
            /// while every tile of `a` passes over it.
            const WIDE_BLOCK: usize = 64;

            /// `a[..rows] · bᵀ` for each `(b, n, rows)` of `groups` (`b` is `[n, k]`). The
            /// caller checks the CPU's features.
            pub(in crate::model::ops) fn matmul_nt_many(
                a: Strided,
                k: usize,
                groups: &[(&[f32], usize, usize)],
            ) -> Vec<Vec<f32>> {
                let zeros = || -> Vec<Vec<f32>> {
                    groups
                        .iter()
                        .map(|&(_, n, rows)| vec![0f32; rows * n])
                        .collect()
                };
                let blocks = k.div_ceil(KB);
                (0..blocks)
                    .into_par_iter()
                    .fold(zeros, |mut cs, blk| {
                        let k0 = blk * KB;
                        let kb = KB.min(k - k0);
                        for (&(b, n, rows), c) in groups.iter().zip(cs.iter_mut()) {
                            // SAFETY: the caller checked the features at run time; all offsets
                            // are in bounds of a's first `rows` rows (columns below k ≤
                            // row_len) and of the [n, k] b.
                            unsafe { block(a, b, rows, n, k, k0, kb, c) };
                        }
                        cs
                    })
                    .reduce(zeros, |mut x, y| {
                        for (x, y) in x.iter_mut().zip(y) {
                            x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
                        }
                        x
                    })
            }

            /// `a · bᵀ` (`[m, n]`) for `b: [n, k]` with many rows: blocks of rows of `b` in
            /// parallel, each tile of `WN` rows of `b` against every tile of `a`, so each row of
            /// `b` is read from memory once and stays in L1 while `a` (in L2) passes over it.
            /// The caller checks the CPU's features.
            pub(in crate::model::ops) fn wide(
                a: Strided,
                b: &[f32],
                m: usize,
                n: usize,
                k: usize,
            ) -> Vec<f32> {
                let nb = WIDE_BLOCK;
                let parts: Vec<Vec<f32>> = (0..n.div_ceil(nb))
                    .into_par_iter()
                    .map(|t| {
                        let (j0, len) = (t * nb, nb.min(n - t * nb));
                        let bb = &b[j0 * k..(j0 + len) * k];
                        let mut c = vec![0f32; m * len];
                        for j in (0..len).step_by(WN) {
                            let nj = WN.min(len - j);
                            for i in (0..m).step_by(WM) {
                                let mi = WM.min(m - i);
                                // SAFETY: the caller checked the features at run time; rows
                                // i..i+mi of a and j..j+nj of the block hold k floats each; c
                                // is [m, len].
                                unsafe {
                                    any_tile::<WM, WN>(
                                        a,
                                        bb,
                                        (i, mi),
                                        (j, nj),
                                        len,
                                        k,
                                        (0, k),
                                        &mut c,
                                    )
                                };
                            }
                        }
                        c
                    })
                    .collect();
                let mut out = vec![0f32; m * n];
                for (t, part) in parts.iter().enumerate() {
                    let (j0, len) = (t * nb, nb.min(n - t * nb));
                    for i in 0..m {
                        out[i * n + j0..i * n + j0 + len]
                            .copy_from_slice(&part[i * len..(i + 1) * len]);
                    }
                }
                out
            }

            /// Adds `a[i..i+mi] · b[j..j+nj]ᵀ` over columns `k0..k0+kb` into `c` (`[m, n]`); a
            /// `FULL` tile (`mi = TM`, `nj = TN`) has constant bounds and unrolls completely.
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments, clippy::needless_range_loop)] // tiles indexed by (r, s)
            unsafe fn tile<const TM: usize, const TN: usize, const FULL: bool>(
                a: Strided,
                b: &[f32],
                (i, mi): (usize, usize),
                (j, nj): (usize, usize),
                n: usize,
                k: usize,
                (k0, kb): (usize, usize),
                c: &mut [f32],
            ) {
                let (mi, nj) = if FULL { (TM, TN) } else { (mi, nj) };
                let kv = kb / $lanes * $lanes;
                let (ap, bp, lda) = (a.data.as_ptr(), b.as_ptr(), a.row_len);
                let mut acc: [[$vec; TN]; TM] = [[$zero(); TN]; TM];
                let mut kk = 0;
                while kk < kv {
                    let off = k0 + kk;
                    let mut bv: [$vec; TN] = [$zero(); TN];
                    for s in 0..nj {
                        bv[s] = $load(bp.add((j + s) * k + off));
                    }
                    for r in 0..mi {
                        let av = $load(ap.add((i + r) * lda + off));
                        for s in 0..nj {
                            acc[r][s] = $fma(av, bv[s], acc[r][s]);
                        }
                    }
                    kk += $lanes;
                }
                for r in 0..mi {
                    for s in 0..nj {
                        let mut v = $sum(acc[r][s]);
                        for t in kv..kb {
                            v += a.data[(i + r) * lda + k0 + t] * b[(j + s) * k + k0 + t];
                        }
                        c[(i + r) * n + j + s] += v;
                    }
                }
            }

            /// [`tile`] with its bounds unrolled when the tile is whole.
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn any_tile<const TM: usize, const TN: usize>(
                a: Strided,
                b: &[f32],
                (i, mi): (usize, usize),
                (j, nj): (usize, usize),
                n: usize,
                k: usize,
                kk: (usize, usize),
                c: &mut [f32],
            ) {
                if mi == TM && nj == TN {
                    tile::<TM, TN, true>(a, b, (i, mi), (j, nj), n, k, kk, c);
                } else {
                    tile::<TM, TN, false>(a, b, (i, mi), (j, nj), n, k, kk, c);
                }
            }

            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn block(
                a: Strided,
                b: &[f32],
                m: usize,
                n: usize,
                k: usize,
                k0: usize,
                kb: usize,
                c: &mut [f32],
            ) {
                for i in (0..m).step_by(TM) {
                    for j in (0..n).step_by(TN) {
                        let (mi, nj) = (TM.min(m - i), TN.min(n - j));
                        any_tile::<TM, TN>(a, b, (i, mi), (j, nj), n, k, (k0, kb), c);
                    }
                }
            }
        }
    };
}

nt_kernels! {
    /// 6 × 4 tiles: 24 accumulators and 10 loads per 24 multiply-adds (the 4 × 4 one loaded 8
    /// per 16): 130–150 GFLOP/s against 110–120 on the AVX-512 EPYC.
    mod nt_avx512: "avx512f", __m512, 16,
    zero _mm512_setzero_ps, load _mm512_loadu_ps, fma _mm512_fmadd_ps, sum _mm512_reduce_add_ps,
    contraction 6 x 4, wide 4 x 6,
}

nt_kernels! {
    /// 12 accumulators (12 independent sums cover the FMA's latency on two pipes), with the
    /// vectors of `b` and the one of `a` within the 16 registers (a 6 × 4 tile spills). Zen 3
    /// (EPYC family 25 model 1), best of 10: one layer's contraction on GPT-2 (157 × 37 ×
    /// 393,216) 6 × 2 at 87–108 GFLOP/s, 4 × 3 at 73–90, 5 × 2 at 82, 3 × 4 and 3 × 3 at 72–73,
    /// 2 × 6 at 59–62, gemm's split-K at 92; the whole contraction, which reads each block of Δ
    /// once for all twelve layers where gemm's reads Δ once per layer, 0.27–0.29 s against
    /// 0.33–0.50 alternating. The unembedding (32 × 768 against 50,257 × 768) 4 × 3 in 21–26 ms against
    /// candle's 24–32 in the same process, 5 × 2 in 28–30, 3 × 4 in 38, 2 × 6 in 40.
    mod nt_avx2: "avx2,fma", __m256, 8,
    zero _mm256_setzero_ps, load _mm256_loadu_ps, fma _mm256_fmadd_ps, sum crate::model::ops::hsum_avx2,
    contraction 6 x 2, wide 4 x 3,
}

/// The sum of a register's eight lanes (AVX2 has no reduce-add): halves, then pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn hsum_avx2(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// tanh through one `exp`: libm's `tanhf` cost ~25 ns per element, a third of a GPT-2 forward.
/// Absolute error ≤ 1e-7, which is all GELU needs (it multiplies by x/2 after adding 1).
#[inline(always)]
fn fast_tanh(u: f32) -> f32 {
    let u = u.clamp(-15.0, 15.0);
    1.0 - 2.0 / (exp_f32(2.0 * u) + 1.0)
}

/// `e^x` in plain arithmetic, so that loops over it vectorise (libm's `expf` is a call per
/// element): `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2` (ln 2 in two parts, so `r` is exact),
/// Cephes' degree-5 minimax polynomial for `e^r`, and `2^n` written into the exponent bits.
/// Relative error ≤ 3e-7 over `[-87, 88]`, the range it clamps to (no overflow, no denormals).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    er * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// Defines `fn $name` three times over — for AVX-512, for AVX2 with FMA, and for baseline
/// x86-64 — and dispatches at run time. The crate is built for baseline x86-64, whose loops
/// vectorise 4 lanes wide (SSE2); the body pasted into a function with wider features, with
/// everything it calls inlined (`#[inline(always)]`), vectorises 16 or 8 lanes wide. The GEMMs
/// dispatch the same way inside `gemm`.
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $body
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has every feature `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above, for AVX2 and FMA.
                    return unsafe { avx2($($arg),*) };
                }
            }
            #[allow(clippy::too_many_arguments)]
            fn baseline($($arg: $ty),*) $body
            baseline($($arg),*)
        }
    };
}

/// Runs `$body` with `$a` a constant equal to `$act`: one loop per activation, so each
/// vectorises without a branch per element.
macro_rules! with_activation {
    ($act:expr, $a:ident => $body:expr) => {
        match $act {
            Activation::GeluNew => {
                const $a: Activation = Activation::GeluNew;
                $body
            }
            Activation::Gelu => {
                const $a: Activation = Activation::Gelu;
                $body
            }
            Activation::Relu => {
                const $a: Activation = Activation::Relu;
                $body
            }
            Activation::Silu => {
                const $a: Activation = Activation::Silu;
                $body
            }
        }
    };
}

multiversion! {
    /// One (batch, head)'s pattern: `out[i] = softmax(q[i]·kᵀ · inv_scale + mask[i])`, masked
    /// (−∞) entries exactly 0. Each dot product keeps 16 partial sums ([`lane_dot`]: a float
    /// sum over one accumulator does not vectorise).
    fn attention_pattern(
        q: &[f32],
        k: &[f32],
        mask: &[f32],
        inv_scale: f32,
        dh: usize,
        out: &mut [f32],
    ) {
        let p = k.len() / dh;
        for ((qi, row), mrow) in q.chunks_exact(dh).zip(out.chunks_exact_mut(p)).zip(mask.chunks_exact(p)) {
            let mut max = f32::NEG_INFINITY;
            for ((s, kj), &mk) in row.iter_mut().zip(k.chunks_exact(dh)).zip(mrow) {
                *s = lane_dot(qi, kj) * inv_scale + mk;
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in row.iter_mut() {
                *s = if *s == f32::NEG_INFINITY { 0.0 } else { exp_f32(*s - max) };
                sum += *s;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|s| *s *= inv);
        }
    }
}

multiversion! {
    /// One (batch, head)'s attention backward, every slice contiguous: `dz`, `q`, `dq` `[m,
    /// dh]`, `k`, `v`, `dk`, `dv` `[p, dh]`, `pattern` `[m, p]`. With `dP = dz·vᵀ`, the softmax
    /// backward `dS = P ⊙ (dP − rowsum(P ⊙ dP)) · inv_scale`, then `dq = dS·k`, `dk = dSᵀ·q`,
    /// `dv = Pᵀ·dz` (added into the zeroed outputs).
    fn attention_pattern_backward(
        dz: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        pattern: &[f32],
        inv_scale: f32,
        dh: usize,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let p = k.len() / dh;
        let mut ds = vec![0f32; p];
        for (((dzi, prow), qi), dqi) in dz
            .chunks_exact(dh)
            .zip(pattern.chunks_exact(p))
            .zip(q.chunks_exact(dh))
            .zip(dq.chunks_exact_mut(dh))
        {
            let mut inner = 0f32;
            for ((d, vj), &pij) in ds.iter_mut().zip(v.chunks_exact(dh)).zip(prow) {
                let dot = lane_dot(dzi, vj);
                *d = dot;
                inner += pij * dot;
            }
            for (d, &pij) in ds.iter_mut().zip(prow) {
                *d = pij * (*d - inner) * inv_scale;
            }
            for ((((&dsij, &pij), kj), dkj), dvj) in ds
                .iter()
                .zip(prow)
                .zip(k.chunks_exact(dh))
                .zip(dk.chunks_exact_mut(dh))
                .zip(dv.chunks_exact_mut(dh))
            {
                for t in 0..dh {
                    dqi[t] += dsij * kj[t];
                    dkj[t] += dsij * qi[t];
                    dvj[t] += pij * dzi[t];
                }
            }
        }
    }
}

multiversion! {
    /// `out = pattern · v` for one (batch, head): `[m, p] × [p, dh]`, accumulated row by row.
    fn mix_values(pattern: &[f32], v: &[f32], p: usize, dh: usize, out: &mut [f32]) {
        for (prow, orow) in pattern.chunks_exact(p).zip(out.chunks_exact_mut(dh)) {
            orow.fill(0.0);
            for (&w, vrow) in prow.iter().zip(v.chunks_exact(dh)) {
                for (o, &x) in orow.iter_mut().zip(vrow) {
                    *o += w * x;
                }
            }
        }
    }
}

multiversion! {
    /// `out = act(x)`.
    fn act_map(act: Activation, x: &[f32], out: &mut [f32]) {
        with_activation!(act, A => {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = act_scalar(A, v);
            }
        })
    }
}

multiversion! {
    /// `out = g ⊙ act'(pre)`.
    fn act_grad_map(act: Activation, g: &[f32], pre: &[f32], out: &mut [f32]) {
        with_activation!(act, A => {
            for ((o, &g), &p) in out.iter_mut().zip(g).zip(pre) {
                *o = g * act_grad_scalar(A, p);
            }
        })
    }
}

multiversion! {
    /// `out = act(gate) ⊙ up`.
    fn gated_map(act: Activation, gate: &[f32], up: &[f32], out: &mut [f32]) {
        with_activation!(act, A => {
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o = act_scalar(A, g) * u;
            }
        })
    }
}

multiversion! {
    /// `du = g ⊙ act(gate)`, `dg = g ⊙ up ⊙ act'(gate)`.
    fn gated_grad_map(
        act: Activation,
        g: &[f32],
        gate: &[f32],
        up: &[f32],
        dg: &mut [f32],
        du: &mut [f32],
    ) {
        with_activation!(act, A => {
            for i in 0..dg.len().min(du.len()).min(g.len()).min(gate.len()).min(up.len()) {
                let (g, p, u) = (g[i], gate[i], up[i]);
                du[i] = g * act_scalar(A, p);
                dg[i] = g * u * act_grad_scalar(A, p);
            }
        })
    }
}

multiversion! {
    /// Rows of `d` of a norm's forward: `y = x̂ · w + b` with `x̂ = (x − mean) / σ` (`centered`)
    /// or `x / rms`; `x̂` and `1/σ` kept for the backward. Statistics in f64.
    fn normalize_rows(
        xs: &[f32],
        d: usize,
        centered: bool,
        eps: f32,
        w: Option<&[f32]>,
        b: Option<&[f32]>,
        y: &mut [f32],
        xh: Option<&mut [f32]>,
        inv: Option<&mut [f32]>,
    ) {
        let (mut xh, mut inv) = (xh, inv);
        for (r, xr) in xs.chunks(d).enumerate() {
            let mean = match centered {
                true => lane_sum_f64(xr, 0.0, false) / d as f64,
                false => 0.0,
            };
            let var = lane_sum_f64(xr, mean, true) / d as f64;
            let is = (1.0 / (var + eps as f64).sqrt()) as f32;
            if let Some(inv) = inv.as_deref_mut() {
                inv[r] = is;
            }
            let yr = &mut y[r * d..(r + 1) * d];
            let m = mean as f32;
            // Without the statistics the normalised row is built in `y` itself: the same
            // operations on the same values, so the same bits as with them.
            let xhr: &mut [f32] = match xh.as_deref_mut() {
                Some(xh) => &mut xh[r * d..(r + 1) * d],
                None => yr,
            };
            for (xh, &x) in xhr.iter_mut().zip(xr) {
                *xh = (x - m) * is;
            }
            let Some(xh) = xh.as_deref() else {
                match (w, b) {
                    (Some(w), Some(b)) => {
                        for ((y, &w), &b) in yr.iter_mut().zip(w).zip(b) {
                            *y = *y * w + b;
                        }
                    }
                    (Some(w), None) => {
                        for (y, &w) in yr.iter_mut().zip(w) {
                            *y *= w;
                        }
                    }
                    _ => {}
                }
                continue;
            };
            let xhr = &xh[r * d..(r + 1) * d];
            match (w, b) {
                (Some(w), Some(b)) => {
                    for (((y, &n), &w), &b) in yr.iter_mut().zip(xhr.iter()).zip(w).zip(b) {
                        *y = n * w + b;
                    }
                }
                (Some(w), None) => {
                    for ((y, &n), &w) in yr.iter_mut().zip(xhr.iter()).zip(w) {
                        *y = n * w;
                    }
                }
                _ => yr.copy_from_slice(xhr),
            }
        }
    }
}

multiversion! {
    /// [`ln_backward_row`] over consecutive rows of `gs` (`[·, d]`), the first being row
    /// `first_row` (mod `rows`) of the normalised stream.
    fn ln_backward_rows(
        gs: &[f32],
        d: usize,
        first_row: usize,
        rows: usize,
        xhat: &[f32],
        inv: &[f32],
        w: Option<&[f32]>,
        centered: bool,
        out: &mut [f32],
    ) {
        let mut gw = vec![0f32; d];
        for (r, gr) in gs.chunks(d).enumerate() {
            let row = (first_row + r) % rows;
            let xr = &xhat[row * d..(row + 1) * d];
            let or = &mut out[r * d..(r + 1) * d];
            ln_backward_row(gr, xr, w, inv[row], centered, &mut gw, or);
        }
    }
}

multiversion! {
    /// [`ln_backward_row`] in place over the rows of `dst` (`[rows, d]`).
    fn ln_backward_in_place(
        dst: &mut [f32],
        d: usize,
        xhat: &[f32],
        inv: &[f32],
        w: Option<&[f32]>,
        centered: bool,
    ) {
        let (mut gw, mut g) = (vec![0f32; d], vec![0f32; d]);
        for (r, row) in dst.chunks_mut(d).enumerate() {
            g.copy_from_slice(row);
            ln_backward_row(&g, &xhat[r * d..(r + 1) * d], w, inv[r], centered, &mut gw, row);
        }
    }
}

multiversion! {
    /// `out += Σ_j xs[j·m + start ..][..out.len()]` over `j < k`.
    fn add_strided(xs: &[f32], k: usize, m: usize, start: usize, out: &mut [f32]) {
        for j in 0..k {
            let src = &xs[j * m + start..j * m + start + out.len()];
            for (o, s) in out.iter_mut().zip(src) {
                *o += s;
            }
        }
    }
}

#[inline(always)]
fn act_scalar(act: Activation, x: f32) -> f32 {
    match act {
        Activation::GeluNew => {
            0.5 * x * (1.0 + fast_tanh(SQRT_2_OVER_PI * (x + GELU_C * x * x * x)))
        }
        Activation::Gelu => 0.5 * x * (1.0 + libm::erf(x as f64 / std::f64::consts::SQRT_2) as f32),
        Activation::Relu => x.max(0.0),
        Activation::Silu => x / (1.0 + exp_f32(-x)),
    }
}

#[inline(always)]
fn act_grad_scalar(act: Activation, x: f32) -> f32 {
    match act {
        Activation::GeluNew => {
            let t = fast_tanh(SQRT_2_OVER_PI * (x + GELU_C * x * x * x));
            0.5 * (1.0 + t)
                + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x)
        }
        Activation::Gelu => {
            let xd = x as f64;
            let cdf = 0.5 * (1.0 + libm::erf(xd / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * xd * xd).exp() / (2.0 * std::f64::consts::PI).sqrt();
            (cdf + xd * pdf) as f32
        }
        // ReLU'(0) = 0, as PyTorch: compiled models put many pre-activations exactly at 0.
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Silu => {
            let s = 1.0 / (1.0 + exp_f32(-x));
            s * (1.0 + x * (1.0 - s))
        }
    }
}

multiversion! {
    /// `out[r] = x[r] + bias` for each row `r` of `bias.len()` elements.
    fn add_bias_rows(x: &[f32], bias: &[f32], out: &mut [f32]) {
        for (o, xr) in out.chunks_mut(bias.len()).zip(x.chunks(bias.len())) {
            for ((o, &x), &b) in o.iter_mut().zip(xr).zip(bias) {
                *o = x + b;
            }
        }
    }
}

/// `x + bias` broadcast over `x`'s rows (`bias` is `[n]`, `x` is `[…, n]`) in one vectorised
/// pass; candle's broadcasting add indexes each element (1.6 ms for GPT-2's MLP bias at
/// 32 × 16 tokens, 0.3 ms this way).
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let n = bias.elem_count();
    if x.dim(D::Minus1)? == n && bias.rank() == 1 {
        let fast = cpu_slice(x, |xs| {
            cpu_slice(bias, |bs| {
                let mut out = vec![0f32; xs.len()];
                let rows = (16_384 / n.max(1)).max(1) * n;
                out.par_chunks_mut(rows)
                    .zip(xs.par_chunks(rows))
                    .for_each(|(o, x)| add_bias_rows(x, bs, o));
                out
            })
        });
        if let Some(Some(out)) = fast {
            return Ok(Tensor::from_vec(out, x.shape().clone(), x.device())?);
        }
    }
    Ok(x.broadcast_add(bias)?)
}

/// The MLP activation.
pub fn activation(x: &Tensor, act: Activation, force_composite: bool) -> Result<Tensor> {
    if !force_composite {
        let fast = cpu_slice(x, |xs| {
            let mut out = vec![0f32; xs.len()];
            out.par_chunks_mut(4096)
                .zip(xs.par_chunks(4096))
                .for_each(|(o, x)| act_map(act, x, o));
            out
        });
        if let Some(y) = fast {
            return Ok(Tensor::from_vec(y, x.shape().clone(), x.device())?);
        }
    }
    Ok(match act {
        Activation::GeluNew => x.gelu()?,
        Activation::Gelu => x.gelu_erf()?,
        Activation::Relu => x.relu()?,
        Activation::Silu => x.silu()?,
    })
}

/// A gated MLP's hidden layer, `act(gate) ⊙ up` (SwiGLU, GeGLU), in one pass.
pub fn gated_activation(
    gate: &Tensor,
    up: &Tensor,
    act: Activation,
    force_composite: bool,
) -> Result<Tensor> {
    if !force_composite {
        let fast = cpu_slice(gate, |gs| {
            cpu_slice(up, |us| {
                let mut out = vec![0f32; gs.len()];
                out.par_chunks_mut(4096)
                    .zip(gs.par_chunks(4096).zip(us.par_chunks(4096)))
                    .for_each(|(o, (g, u))| gated_map(act, g, u, o));
                out
            })
        });
        if let Some(Some(out)) = fast {
            return Ok(Tensor::from_vec(out, gate.shape().clone(), gate.device())?);
        }
    }
    Ok((activation(gate, act, true)? * up)?)
}

/// Backward of [`gated_activation`] for the hidden gradient `g`: `(d_gate, d_up)` with
/// `d_up = g ⊙ act(gate)` and `d_gate = g ⊙ up ⊙ act'(gate)`.
pub fn gated_activation_backward(
    g: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    act: Activation,
    force_composite: bool,
) -> Result<(Tensor, Tensor)> {
    if !force_composite {
        let fast = cpu_slice(g, |gs| {
            cpu_slice(gate, |ps| {
                cpu_slice(up, |us| {
                    let mut dg = vec![0f32; gs.len()];
                    let mut du = vec![0f32; gs.len()];
                    dg.par_chunks_mut(4096)
                        .zip(du.par_chunks_mut(4096))
                        .enumerate()
                        .for_each(|(c, (dg, du))| {
                            let off = c * 4096;
                            let (gs, ps, us) = (
                                &gs[off..off + dg.len()],
                                &ps[off..off + dg.len()],
                                &us[off..off + dg.len()],
                            );
                            gated_grad_map(act, gs, ps, us, dg, du)
                        });
                    (dg, du)
                })
            })
        });
        if let Some(Some(Some((dg, du)))) = fast {
            let (shape, dev) = (g.shape().clone(), g.device());
            return Ok((
                Tensor::from_vec(dg, shape.clone(), dev)?,
                Tensor::from_vec(du, shape, dev)?,
            ));
        }
    }
    let d_up = (g * activation(gate, act, true)?)?;
    let d_gate = activation_backward(&(g * up)?, gate, act, true)?;
    Ok((d_gate, d_up))
}

/// `cap · tanh(x / cap)` (Gemma-2's soft-capping), and the `tanh` values its backward needs.
pub fn softcap(x: &Tensor, cap: f32) -> Result<(Tensor, Tensor)> {
    let t = (x / cap as f64)?.tanh()?;
    Ok(((&t * cap as f64)?, t))
}

/// Backward of [`softcap`]: `g ⊙ (1 − tanh²)`.
pub fn softcap_backward(g: &Tensor, tanh: &Tensor) -> Result<Tensor> {
    Ok((g * (1.0 - tanh.sqr()?)?)?)
}

/// The cosines and sines of rotary embeddings for a set of rows: `[rows, dim/2]` each.
#[derive(Debug, Clone)]
pub struct RotaryRows {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl RotaryRows {
    /// The angles `position · inv_freq[i]` (computed in f64) of each row's position.
    pub fn new(inv_freq: &[f64], positions: &[usize]) -> RotaryRows {
        let half = inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(positions.len() * half), Vec::new());
        sin.reserve(positions.len() * half);
        for &p in positions {
            for &f in inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        RotaryRows { cos, sin, half }
    }

    pub fn n_rows(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// Rotates the first `2·half` dimensions of every `[…, dh]` row of `x` in Hugging Face's
    /// half-split layout: `y = x ⊙ cos + rotate_half(x) ⊙ sin`, row `j` of `x` taking the angles
    /// of row `row_of(j)`. With `inverse`, the transpose (the backward): `x ⊙ cos −
    /// rotate_half(x ⊙ sin)`.
    pub fn apply(
        &self,
        x: &Tensor,
        row_of: &(dyn Fn(usize) -> usize + Sync),
        inverse: bool,
    ) -> Result<Tensor> {
        let dh = x.dim(D::Minus1)?;
        let half = self.half;
        let rot = |xs: &[f32], out: &mut [f32], j: usize| {
            let r = row_of(j);
            let (c, s) = (
                &self.cos[r * half..(r + 1) * half],
                &self.sin[r * half..(r + 1) * half],
            );
            out.copy_from_slice(xs);
            for i in 0..half {
                let (a, b) = (xs[i], xs[i + half]);
                let sn = if inverse { -s[i] } else { s[i] };
                out[i] = a * c[i] - b * sn;
                out[i + half] = b * c[i] + a * sn;
            }
        };
        let contiguous = x.contiguous()?;
        let fast = cpu_slice(&contiguous, |xs| {
            let mut out = vec![0f32; xs.len()];
            out.par_chunks_mut(dh * ROWS_PER_TASK)
                .zip(xs.par_chunks(dh * ROWS_PER_TASK))
                .enumerate()
                .for_each(|(task, (o, xs))| {
                    for (k, (or, xr)) in o.chunks_mut(dh).zip(xs.chunks(dh)).enumerate() {
                        rot(xr, or, task * ROWS_PER_TASK + k);
                    }
                });
            out
        });
        let out = match fast {
            Some(v) => v,
            // Any device: the same per-row arithmetic on a host copy.
            None => {
                let xs = to_vec(&contiguous)?;
                let mut out = vec![0f32; xs.len()];
                for (j, (or, xr)) in out.chunks_mut(dh).zip(xs.chunks(dh)).enumerate() {
                    rot(xr, or, j);
                }
                out
            }
        };
        Ok(Tensor::from_vec(out, x.shape().clone(), x.device())?)
    }
}

/// `g ⊙ act'(pre)`.
pub fn activation_backward(
    g: &Tensor,
    pre: &Tensor,
    act: Activation,
    force_composite: bool,
) -> Result<Tensor> {
    if !force_composite {
        let fast = cpu_slice(g, |gs| {
            cpu_slice(pre, |ps| {
                let mut out = vec![0f32; gs.len()];
                out.par_chunks_mut(4096)
                    .zip(gs.par_chunks(4096).zip(ps.par_chunks(4096)))
                    .for_each(|(o, (g, p))| act_grad_map(act, g, p, o));
                out
            })
        });
        if let Some(Some(out)) = fast {
            return Ok(Tensor::from_vec(out, g.shape().clone(), g.device())?);
        }
    }
    let d = match act {
        Activation::Relu => pre.gt(0f64)?.to_dtype(DType::F32)?,
        Activation::GeluNew => {
            let inner = ((pre + pre.powf(3.0)? * GELU_C as f64)? * SQRT_2_OVER_PI as f64)?;
            let t = inner.tanh()?;
            let one_minus_t2 = (1.0 - t.sqr()?)?;
            let dinner = ((pre.sqr()? * (3.0 * GELU_C as f64))? + 1.0)?;
            (((t + 1.0)? * 0.5)?
                + (pre * 0.5)?
                    .mul(&one_minus_t2)?
                    .mul(&(dinner * SQRT_2_OVER_PI as f64)?)?)?
        }
        Activation::Gelu => {
            let cdf = (((pre / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5)?;
            let pdf = ((pre.sqr()? * -0.5)?.exp()? / (2.0 * std::f64::consts::PI).sqrt())?;
            (cdf + pre.mul(&pdf)?)?
        }
        Activation::Silu => {
            let s = candle_nn::ops::sigmoid(pre)?;
            let one_minus = (1.0 - &s)?;
            (&s * ((pre * one_minus)? + 1.0)?)?
        }
    };
    Ok(g.mul(&d)?)
}

/// Sum over the leading dimension of `[k, rest...]`: candle's strided reduction over a leading
/// axis cost ~20 ms for GPT-2's 12 heads × 512 × 768; this is one parallel pass.
pub fn sum_leading(t: &Tensor) -> Result<Tensor> {
    let k = t.dim(0)?;
    let rest: Vec<usize> = t.dims()[1..].to_vec();
    let m = t.elem_count() / k.max(1);
    let fast = cpu_slice(t, |xs| {
        let mut out = vec![0f32; m];
        out.par_chunks_mut(8192)
            .enumerate()
            .for_each(|(c, o)| add_strided(xs, k, m, c * 8192, o));
        out
    });
    match fast {
        Some(v) => Ok(Tensor::from_vec(v, rest, t.device())?),
        None => Ok(t.sum(0)?),
    }
}

/// Additive attention mask `[p, p]`: 0 where key ≤ query (or everywhere when bidirectional),
/// −∞ elsewhere; with a sliding `window`, also −∞ where key ≤ query − window.
pub fn attention_mask(
    p: usize,
    causal: bool,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let mask: Vec<f32> = (0..p * p)
        .map(|i| {
            let (query, key) = (i / p, i % p);
            let future = causal && key > query;
            let too_old = window.is_some_and(|w| key + w <= query);
            if future || too_old {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(mask, (p, p), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (to_vec(a).unwrap(), to_vec(b).unwrap());
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The q/k/v input gradients with bf16 products follow the f32 ones to bf16's precision
    /// and are not them; the hardware panels (where the CPU has AVX512-BF16) and the portable
    /// rounded values give the same numbers, with and without a norm, grouped key/value
    /// heads included.
    /// Each head's output through `W_O`'s bf16 panels equals the f64 product of the rounded
    /// mixed values and weights; a portable packing declines (nothing written) and a mismatched
    /// width is an error.
    #[test]
    fn per_head_products_in_bf16_equal_the_rounded_products() {
        use crate::model::bf16::{hardware_bf16, pack_for};
        let (h, rows, dh, d) = (3, 14, 8, 40);
        let z = randn(&[rows, h * dh], 7);
        let w = randn(&[h * dh, d], 8);
        let chunk = rows * d + 5;
        let mut out = vec![f32::NAN; h * chunk];
        assert!(!per_head_products_bf16_into(
            &z,
            &pack_for(&w, false).unwrap(),
            h,
            &mut out,
            chunk
        )
        .unwrap());
        assert!(out.iter().all(|x| x.is_nan()));
        assert!(
            per_head_products_bf16_into(&z, &pack_for(&w, false).unwrap(), 5, &mut out, chunk)
                .is_err()
        );
        if !hardware_bf16() {
            return;
        }
        assert!(
            per_head_products_bf16_into(&z, &pack_for(&w, true).unwrap(), h, &mut out, chunk)
                .unwrap()
        );
        let r = |x: f32| half::bf16::from_f32(x).to_f64();
        let (zv, wv) = (to_vec(&z).unwrap(), to_vec(&w).unwrap());
        for head in 0..h {
            for i in 0..rows {
                for j in 0..d {
                    let (mut want, mut scale) = (0f64, 0f64);
                    for e in 0..dh {
                        let t = r(zv[i * h * dh + head * dh + e]) * r(wv[(head * dh + e) * d + j]);
                        want += t;
                        scale += t.abs();
                    }
                    let got = out[head * chunk + i * d + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-6 * scale + 1e-30,
                        "head {head} ({i}, {j}): {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn qkv_input_grads_in_bf16_follow_f32_on_either_path() {
        use crate::model::bf16::{hardware_bf16, pack_for};
        let (h, rows, d, dh) = (4, 13, 24, 6);
        let d_heads = [
            randn(&[h, rows, dh], 1),
            randn(&[h, rows, dh], 2),
            randn(&[h, rows, dh], 3),
        ];
        let width = (h + 2 + 2) * dh;
        let w = randn(&[d, width], 4);
        let q: Vec<usize> = (0..h).map(|i| i * dh).collect();
        let kv = |first: usize| -> Vec<usize> { (0..h).map(|i| (first + i / 2) * dh).collect() };
        let (k, v) = (kv(h), kv(h + 2));
        let cols = [&q[..], &k[..], &v[..]];
        let x = randn(&[rows, d], 5);
        let gain = randn(&[d], 6);
        let (_, cache) = layer_norm(&x, Some(&gain), None, 1e-5, false).unwrap();
        for norm in [None, Some((&cache, Some(&gain)))] {
            let dq = [&d_heads[0], &d_heads[1], &d_heads[2]];
            let reference = qkv_input_grads(dq, &w, cols, norm, None).unwrap().unwrap();
            let wt = w.t().unwrap();
            let mut paths = vec![pack_for(&wt, false).unwrap()];
            if hardware_bf16() {
                paths.push(pack_for(&wt, true).unwrap());
            }
            let runs: Vec<_> = paths
                .iter()
                .map(|p| {
                    qkv_input_grads(dq, &w, cols, norm, Some(p))
                        .unwrap()
                        .unwrap()
                })
                .collect();
            for run in &runs {
                for (a, b) in reference
                    .0
                    .iter()
                    .zip(&run.0)
                    .chain([(&reference.1, &run.1)])
                {
                    let scale = to_vec(a).unwrap().iter().fold(0f32, |m, x| m.max(x.abs()));
                    let err = max_diff(a, b);
                    assert!(err > 0.0 && err <= 2e-2 * scale, "{err} of {scale}");
                }
            }
            if let [rounded, panels] = &runs[..] {
                for (a, b) in rounded
                    .0
                    .iter()
                    .zip(&panels.0)
                    .chain([(&rounded.1, &panels.1)])
                {
                    let scale = to_vec(a).unwrap().iter().fold(0f32, |m, x| m.max(x.abs()));
                    assert!(max_diff(a, b) <= 1e-5 * scale);
                }
            }
        }
    }

    /// The one-pass fused columns equal each block's heads laid side by side (candle's
    /// transpose and concatenation), with blocks of different head counts (grouped keys and
    /// values), and shapes that disagree are an error.
    #[test]
    fn fused_columns_lay_every_head_side_by_side() {
        let (d, dh) = (10, 3);
        let blocks = [
            randn(&[4, d, dh], 1),
            randn(&[2, d, dh], 2),
            randn(&[2, d, dh], 3),
        ];
        let refs: Vec<&Tensor> = blocks.iter().collect();
        let fused = fused_columns(&refs).unwrap().unwrap();
        let parts: Vec<Tensor> = blocks
            .iter()
            .map(|b| {
                let heads = b.dims3().unwrap().0;
                b.transpose(0, 1).unwrap().reshape((d, heads * dh)).unwrap()
            })
            .collect();
        let want = Tensor::cat(&parts, 1).unwrap();
        assert_eq!(fused.dims(), &[d, 8 * dh]);
        assert_eq!(max_diff(&fused, &want), 0.0);
        let odd = randn(&[2, d, dh + 1], 4);
        assert!(fused_columns(&[&blocks[0], &odd]).is_err());
    }

    #[test]
    fn fused_and_composite_kernels_agree() {
        let x = randn(&[37, 24], 1);
        let w = randn(&[24], 2);
        let b = randn(&[24], 3);
        let (y1, c1) = layer_norm(&x, Some(&w), Some(&b), 1e-5, false).unwrap();
        let (y2, c2) = layer_norm(&x, Some(&w), Some(&b), 1e-5, true).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-5);
        assert!(max_diff(&c1.inv_std, &c2.inv_std) < 1e-5);
        let g = randn(&[3, 37, 24], 4);
        let d1 = layer_norm_backward(&g, &c1, Some(&w), false).unwrap();
        let d2 = layer_norm_backward(&g, &c2, Some(&w), true).unwrap();
        assert!(max_diff(&d1, &d2) < 1e-4, "{}", max_diff(&d1, &d2));
        // RMSNorm through the same kernels, uncentred.
        let (r1, rc1) = rms_norm(&x, Some(&w), 1e-6, false).unwrap();
        let (r2, rc2) = rms_norm(&x, Some(&w), 1e-6, true).unwrap();
        assert!(max_diff(&r1, &r2) < 1e-5 && !rc1.centered);
        let rb1 = layer_norm_backward(&g, &rc1, Some(&w), false).unwrap();
        let rb2 = layer_norm_backward(&g, &rc2, Some(&w), true).unwrap();
        assert!(max_diff(&rb1, &rb2) < 1e-4, "{}", max_diff(&rb1, &rb2));
        // By hand for one element: x / sqrt(mean(x²) + eps) · w.
        let (xs, ws) = (to_vec(&x).unwrap(), to_vec(&w).unwrap());
        let ms = xs[..24].iter().map(|v| v * v).sum::<f32>() / 24.0;
        let want = xs[5] / (ms + 1e-6).sqrt() * ws[5];
        assert!((to_vec(&r1).unwrap()[5] - want).abs() < 1e-5);
        // All-zero rows stay zero (eps keeps the scale finite).
        let zeros = Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap();
        let (r, _) = rms_norm(&zeros, None, 1.0, false).unwrap();
        assert!(to_vec(&r).unwrap().iter().all(|v| *v == 0.0));
        let a = randn(&[6, 9000], 11);
        let b = randn(&[5, 9000], 12);
        let nt = matmul_nt(&a, &b).unwrap();
        let reference = a.matmul(&b.t().unwrap()).unwrap();
        assert!(
            max_diff(&nt, &reference) < 1e-3,
            "{}",
            max_diff(&nt, &reference)
        );
        for act in [Activation::GeluNew, Activation::Gelu, Activation::Relu] {
            let a1 = activation(&x, act, false).unwrap();
            let a2 = activation(&x, act, true).unwrap();
            assert!(max_diff(&a1, &a2) < 1e-5, "{act:?}");
            let g = randn(&[37, 24], 5);
            let b1 = activation_backward(&g, &x, act, false).unwrap();
            let b2 = activation_backward(&g, &x, act, true).unwrap();
            assert!(max_diff(&b1, &b2) < 1e-4, "{act:?}");
        }
    }

    /// The statistics-free norm gives the bits of the norm with statistics, with and without
    /// a gain and a bias, centred or not, over row counts that split into ragged tasks.
    #[test]
    fn norms_without_statistics_give_the_same_bits() {
        let x = randn(&[37, 24], 3);
        let (w, b) = (randn(&[24], 4), randn(&[24], 5));
        let bits = |t: &Tensor| {
            to_vec(t)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        for (w, b) in [(Some(&w), Some(&b)), (Some(&w), None), (None, None)] {
            let (y, _) = layer_norm(&x, w, b, 1e-5, false).unwrap();
            assert_eq!(bits(&normalized(&x, w, b, 1e-5, true).unwrap()), bits(&y));
            if b.is_none() {
                let (y, _) = rms_norm(&x, w, 1e-6, false).unwrap();
                assert_eq!(
                    bits(&normalized(&x, w, None, 1e-6, false).unwrap()),
                    bits(&y)
                );
            }
        }
    }

    #[test]
    fn layer_norm_backward_matches_finite_differences() {
        let x = randn(&[5, 8], 7);
        let w = randn(&[8], 8);
        let g = randn(&[5, 8], 9);
        let (_, cache) = layer_norm(&x, Some(&w), None, 1e-5, true).unwrap();
        let analytic = to_vec(&layer_norm_backward(&g, &cache, Some(&w), false).unwrap()).unwrap();
        let xs = to_vec(&x).unwrap();
        let gs = to_vec(&g).unwrap();
        let f = |xs: &[f64]| -> f64 {
            // Σ g · LN(x) · w in f64.
            let mut total = 0.0;
            for r in 0..5 {
                let row = &xs[r * 8..r * 8 + 8];
                let mean = row.iter().sum::<f64>() / 8.0;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 8.0;
                let ws = to_vec(&w).unwrap();
                for i in 0..8 {
                    total +=
                        gs[r * 8 + i] as f64 * (row[i] - mean) / (var + 1e-5).sqrt() * ws[i] as f64;
                }
            }
            total
        };
        let base: Vec<f64> = xs.iter().map(|&v| v as f64).collect();
        for i in 0..base.len() {
            let eps = 1e-6;
            let (mut p, mut m) = (base.clone(), base.clone());
            p[i] += eps;
            m[i] -= eps;
            let fd = (f(&p) - f(&m)) / (2.0 * eps);
            assert!(
                (fd - analytic[i] as f64).abs() < 1e-3,
                "{i}: {fd} vs {}",
                analytic[i]
            );
        }
    }

    /// `matmul_nt` dispatches to the AVX-512 kernel where the CPU has it, so the portable
    /// split-K path is called here directly: every host runs both kernels (where it can) against
    /// a plain f64 product, at shapes with several k-blocks, a ragged last block and odd m, n;
    /// and the unembedding's `matmul_nt_wide` at shapes with ragged tiles everywhere (rows of
    /// `a` not a multiple of 4, blocks of `b` with a partial tile, a last partial block, `k`
    /// with a remainder of 16 and of 8). Each SIMD kernel the CPU can run is checked directly
    /// (an AVX-512 machine runs the AVX2 ones too).
    #[test]
    fn every_contraction_kernel_matches_a_plain_product() {
        let shapes = [(6, 5, 9000), (17, 3, 4096), (1, 1, 1), (33, 19, 12_345)];
        let wide = [(32, 200, 768), (7, 131, 37), (1, 6, 16), (5, 64, 5)];
        for (m, n, k) in shapes.into_iter().chain(wide) {
            let a = randn(&[m, k], 21 + k as u64);
            let b = randn(&[n, k], 22 + k as u64);
            let (av, bv) = (to_vec(&a).unwrap(), to_vec(&b).unwrap());
            let want: Vec<f64> = (0..m * n)
                .map(|ij| {
                    let (i, j) = (ij / n, ij % n);
                    (0..k)
                        .map(|t| av[i * k + t] as f64 * bv[j * k + t] as f64)
                        .sum()
                })
                .collect();
            let check = |got: &[f32], kernel: &str| {
                assert_eq!(got.len(), m * n);
                for (g, w) in got.iter().zip(&want) {
                    // f32 accumulation over k terms of magnitude ≤ 4.
                    let tol = 1e-5 * (k as f64).sqrt() * 4.0 + 1e-4;
                    assert!(
                        (*g as f64 - w).abs() < tol,
                        "{kernel} {m}x{n}x{k}: {g} vs {w}"
                    );
                }
            };
            let lhs = Strided {
                data: &av,
                row_len: k,
            };
            check(&matmul_nt_split_k(lhs, &bv, m, n, k), "portable split-K");
            #[cfg(target_arch = "x86_64")]
            {
                if nt_simd() == NtSimd::Avx512 {
                    check(
                        &nt_avx512::matmul_nt_many(lhs, k, &[(&bv, n, m)]).swap_remove(0),
                        "avx512",
                    );
                    check(&nt_avx512::wide(lhs, &bv, m, n, k), "avx512 wide");
                }
                if nt_simd() != NtSimd::None {
                    check(
                        &nt_avx2::matmul_nt_many(lhs, k, &[(&bv, n, m)]).swap_remove(0),
                        "avx2",
                    );
                    check(&nt_avx2::wide(lhs, &bv, m, n, k), "avx2 wide");
                }
            }
            check(&to_vec(&matmul_nt(&a, &b).unwrap()).unwrap(), "dispatch");
            check(&to_vec(&matmul_nt_wide(&a, &b).unwrap()).unwrap(), "wide");
        }
        let (a, b) = (randn(&[2, 8], 1), randn(&[3, 9], 2));
        assert!(matmul_nt_wide(&a, &b).is_err());
    }

    /// The short-sequence attention gives candle's pattern (softmax of the scaled, masked
    /// scores) and mixed values, laid out per head, under causal and sliding-window masks, for
    /// head sizes with and without a remainder of 16 and for a single position; masked entries
    /// are exactly zero; longer sequences are declined and a mask of the wrong shape is an error.
    #[test]
    fn short_attention_equals_candles_batched_matmuls() {
        for (b, h, p, dh, window) in [
            (3, 4, 16, 64, None),
            (2, 3, 7, 20, Some(3)),
            (1, 2, 1, 8, None),
        ] {
            let q = randn(&[b, h, p, dh], 40 + p as u64);
            let k = randn(&[b, h, p, dh], 41 + p as u64);
            let v = randn(&[b, h, p, dh], 42 + p as u64);
            let mask = attention_mask(p, true, window, &Device::Cpu).unwrap();
            let scale = (dh as f32).sqrt();
            let (pattern, z) = short_attention(&q, &k, &v, &mask, scale).unwrap().unwrap();
            let scores = (q.matmul(&k.t().unwrap()).unwrap() * (1.0 / scale as f64)).unwrap();
            let want =
                candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
            assert!(max_diff(&pattern, &want) < 1e-6, "pattern {b}x{h}x{p}x{dh}");
            let masked = to_vec(&mask).unwrap();
            for (i, x) in to_vec(&pattern).unwrap().iter().enumerate() {
                if masked[i % (p * p)] == f32::NEG_INFINITY {
                    assert_eq!(*x, 0.0);
                }
            }
            let z_want = want.matmul(&v).unwrap().transpose(1, 2).unwrap();
            let z_want = z_want
                .contiguous()
                .unwrap()
                .reshape((b * p, h * dh))
                .unwrap();
            assert!(max_diff(&z, &z_want) < 1e-5, "values {b}x{h}x{p}x{dh}");
        }
        let long = SHORT_ATTENTION_MAX_KEYS + 1;
        let q = randn(&[1, long, 4], 1);
        let dz = randn(&[long, 4], 2);
        let pattern = randn(&[1, 1, long, long], 3);
        let q4 = q.unsqueeze(0).unwrap();
        assert!(short_attention_backward(&dz, &q4, &q4, &q4, &pattern, 2.0)
            .unwrap()
            .is_none());
        let q = randn(&[1, 1, long, 4], 1);
        let mask = attention_mask(long, true, None, &Device::Cpu).unwrap();
        assert!(short_attention(&q, &q, &q, &mask, 2.0).unwrap().is_none());
        let q = randn(&[1, 1, 4, 4], 1);
        let wrong = attention_mask(3, true, None, &Device::Cpu).unwrap();
        assert!(short_attention(&q, &q, &q, &wrong, 2.0).is_err());
    }

    /// The short-sequence attention backward gives the gradients of q, k and v that candle's
    /// batched matmuls and softmax backward give (per head, `[h, b·p, dh]`), and finite
    /// differences of `Σ z ⊙ dz` agree with its q gradient.
    #[test]
    fn short_attention_backward_equals_candles_and_finite_differences() {
        for (b, h, p, dh, window) in [(2, 3, 16, 64, None), (3, 2, 5, 20, Some(2))] {
            let q = randn(&[b, h, p, dh], 60 + p as u64);
            let k = randn(&[b, h, p, dh], 61 + p as u64);
            let v = randn(&[b, h, p, dh], 62 + p as u64);
            let dz = randn(&[b * p, h * dh], 63 + p as u64);
            let mask = attention_mask(p, true, window, &Device::Cpu).unwrap();
            let scale = (dh as f32).sqrt();
            let (pattern, _) = short_attention(&q, &k, &v, &mask, scale).unwrap().unwrap();
            let [dq, dk, dv] = short_attention_backward(&dz, &q, &k, &v, &pattern, scale)
                .unwrap()
                .unwrap();
            // candle: dz as [b, h, p, dh], then the formulas the fallback path runs.
            let dz4 = dz.reshape((b, p, h, dh)).unwrap().transpose(1, 2).unwrap();
            let dz4 = dz4.contiguous().unwrap();
            let d_pattern = dz4.matmul(&v.t().unwrap()).unwrap();
            let dv_want = pattern.t().unwrap().matmul(&dz4).unwrap();
            let inner = (&d_pattern * &pattern).unwrap().sum_keepdim(3).unwrap();
            let ds = (pattern.clone() * d_pattern.broadcast_sub(&inner).unwrap()).unwrap();
            let ds = (ds * (1.0 / scale as f64)).unwrap();
            let dq_want = ds.matmul(&k).unwrap();
            let dk_want = ds.t().unwrap().matmul(&q).unwrap();
            let heads = |t: Tensor| {
                let t = t.transpose(0, 1).unwrap().contiguous().unwrap();
                t.reshape((h, b * p, dh)).unwrap()
            };
            for (got, want, name) in [
                (&dq, heads(dq_want), "q"),
                (&dk, heads(dk_want), "k"),
                (&dv, heads(dv_want), "v"),
            ] {
                assert!(max_diff(got, &want) < 1e-4, "d{name} {b}x{h}x{p}x{dh}");
            }
            // One coordinate of q by central differences of Σ z ⊙ dz (f64 sums).
            let objective = |q: &Tensor| -> f64 {
                let (_, z) = short_attention(q, &k, &v, &mask, scale).unwrap().unwrap();
                let (z, g) = (to_vec(&z).unwrap(), to_vec(&dz).unwrap());
                z.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum()
            };
            let mut qv = to_vec(&q).unwrap();
            let at = ((b - 1) * h + 1) * p * dh + (p - 1) * dh + 3; // batch b-1, head 1, last row
            let eps = 1e-2f32;
            qv[at] += eps;
            let up = objective(&Tensor::from_vec(qv.clone(), (b, h, p, dh), &Device::Cpu).unwrap());
            qv[at] -= 2.0 * eps;
            let down = objective(&Tensor::from_vec(qv, (b, h, p, dh), &Device::Cpu).unwrap());
            let numeric = (up - down) / (2.0 * eps as f64);
            let analytic = to_vec(&dq).unwrap()[(b * p + (b - 1) * p + p - 1) * dh + 3] as f64;
            assert!(
                (numeric - analytic).abs() < 2e-2 * analytic.abs().max(1.0),
                "{numeric} vs {analytic}"
            );
        }
    }

    /// A left-hand side with padded rows (longer than the inner dimension) gives the product of
    /// its first `k` columns, on every kernel; an inner dimension longer than its rows is refused.
    #[test]
    fn padded_rows_are_not_read() {
        let (m, n, k) = (13, 6, 9000);
        let row_len = padded_row_len(k);
        assert!(row_len >= k && row_len.is_multiple_of(16) && (row_len / 16) % 2 == 1);
        assert_eq!(padded_row_len(16 * 7), 16 * 7);
        let a = randn(&[m, row_len], 51);
        let b = randn(&[n, k], 52);
        let want = matmul_nt(&a.narrow(1, 0, k).unwrap().contiguous().unwrap(), &b).unwrap();
        let got = matmul_nt_many(&a, k, &[(&b, 9)]).unwrap().swap_remove(0);
        assert!(max_diff(&got, &want.narrow(0, 0, 9).unwrap()) < 1e-3);
        let av = to_vec(&a).unwrap();
        let lhs = Strided { data: &av, row_len };
        let portable = matmul_nt_split_k(lhs, &to_vec(&b).unwrap(), m, n, k);
        let portable = Tensor::from_vec(portable, (m, n), &Device::Cpu).unwrap();
        assert!(max_diff(&portable, &want) < 1e-3);
        let too_long = randn(&[n, row_len + 1], 53);
        assert!(matmul_nt_many(&a, row_len + 1, &[(&too_long, 2)]).is_err());
    }

    /// Several right-hand sides against different leading row counts of one left-hand side
    /// give what each gives alone.
    #[test]
    fn many_contractions_equal_each_alone() {
        let k = 5000;
        let a = randn(&[9, k], 31);
        let bs = [randn(&[3, k], 32), randn(&[1, k], 33), randn(&[5, k], 34)];
        let rows = [9, 4, 1];
        let groups: Vec<(&Tensor, usize)> = bs.iter().zip(rows).collect();
        let many = matmul_nt_many(&a, k, &groups).unwrap();
        for ((b, r), got) in groups.iter().zip(&many) {
            let alone = matmul_nt(&a.narrow(0, 0, *r).unwrap().contiguous().unwrap(), b).unwrap();
            assert_eq!(got.dims(), alone.dims());
            let (g, w) = (to_vec(got).unwrap(), to_vec(&alone).unwrap());
            for (g, w) in g.iter().zip(&w) {
                assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{g} vs {w}");
            }
        }
        assert!(
            matmul_nt_many(&a, k, &[(&bs[0], 10)]).is_err(),
            "more rows than a has"
        );
    }

    /// The polynomial `exp` is within 3e-7 of f64's over its range, and the vectorised
    /// activations (and their gradients) equal the scalar ones element for element.
    #[test]
    fn fast_exp_is_accurate_and_wide_loops_compute_the_scalar_values() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f64 / 200_000.0;
            let got = exp_f32(x as f32) as f64;
            let want = (x as f32 as f64).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst <= 3e-7, "relative error {worst}");
        assert_eq!(exp_f32(-1000.0), exp_f32(-87.0));
        assert!(exp_f32(1000.0).is_finite());
        let x = randn(&[3, 4099], 5);
        let xs = to_vec(&x).unwrap();
        for act in [Activation::GeluNew, Activation::Silu, Activation::Relu] {
            let y = to_vec(&activation(&x, act, false).unwrap()).unwrap();
            let g = to_vec(&activation_backward(&x.ones_like().unwrap(), &x, act, false).unwrap())
                .unwrap();
            for ((v, y), g) in xs.iter().zip(&y).zip(&g) {
                assert_eq!(*y, act_scalar(act, *v), "{act:?}({v})");
                assert_eq!(*g, act_grad_scalar(act, *v), "{act:?}'({v})");
            }
        }
    }

    #[test]
    fn head_reshuffles_and_per_head_products_equal_candles() {
        for dims in [(2, 3, 5, 4), (1, 12, 7, 64), (3, 1, 2, 1), (2, 4, 1, 3)] {
            let (a, b, c, inner) = dims;
            let x = randn(&[a, b, c, inner], 3);
            let got = swap_middle(&x, dims).unwrap();
            let want = x.transpose(1, 2).unwrap().contiguous().unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(to_vec(&got).unwrap(), to_vec(&want).unwrap());
        }
        // A strided input takes candle's path and gives the same values.
        let x = randn(&[3, 2, 4, 5], 4).transpose(0, 1).unwrap();
        let got = swap_middle(&x, (2, 3, 4, 5)).unwrap();
        let want = x
            .contiguous()
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        assert_eq!(to_vec(&got).unwrap(), to_vec(&want).unwrap());

        // Per-head output projections from [rows, h·k], alone and into padded chunks.
        let (z, w) = (randn(&[17, 3 * 8], 5), randn(&[3, 8, 33], 6));
        let z_heads = z.reshape((17, 3, 8)).unwrap().transpose(0, 1).unwrap();
        let want = z_heads.contiguous().unwrap().matmul(&w).unwrap();
        let got = per_head_products(&z, &w).unwrap();
        assert_eq!(got.dims(), &[3, 17, 33]);
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
        let chunk = 17 * 33 + 5;
        let mut out = vec![f32::NAN; 3 * chunk];
        per_head_products_into(&z, &w, &mut out, chunk).unwrap();
        for (head, c) in out.chunks(chunk).enumerate() {
            let want = to_vec(&want.get(head).unwrap()).unwrap();
            assert!(c[..17 * 33]
                .iter()
                .zip(&want)
                .all(|(g, w)| (g - w).abs() < 1e-5));
            assert!(
                c[17 * 33..].iter().all(|x| x.is_nan()),
                "padding left alone"
            );
        }
        assert!(per_head_products(&z, &randn(&[3, 9, 33], 7)).is_err());
        // Head-major inputs against column blocks of one matrix: [h, rows, k] × [k, width].
        let x = randn(&[3, 17, 8], 8);
        let fused = randn(&[8, 100], 10);
        let columns = [40, 0, 67];
        let got = batched_products(&x, &fused, &columns, 33).unwrap();
        let heads: Vec<Tensor> = columns
            .iter()
            .map(|&c| fused.narrow(1, c, 33).unwrap())
            .collect();
        let want_heads = x.matmul(&Tensor::stack(&heads, 0).unwrap()).unwrap();
        assert!(max_diff(&got, &want_heads) < 1e-5);
        let slow = batched_products(
            &x.t().unwrap().contiguous().unwrap().t().unwrap(),
            &fused,
            &columns,
            33,
        );
        assert!(max_diff(&slow.unwrap(), &want_heads) < 1e-5);
        assert!(batched_products(&x, &fused, &[40, 0, 68], 33).is_err());
        // Heads split from column blocks of a projection.
        let y = randn(&[2 * 5, 30], 11);
        let got = heads_of_columns(&y, 6, (3, 4), (2, 5)).unwrap();
        let want_split = y
            .narrow(1, 6, 12)
            .unwrap()
            .reshape((2, 5, 3, 4))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        assert_eq!(to_vec(&got).unwrap(), to_vec(&want_split).unwrap());
        assert!(heads_of_columns(&y, 19, (3, 4), (2, 5)).is_err());
        // Strided mixed values take candle's path, alone and into chunks, with the same values.
        let z_strided = z.t().unwrap().contiguous().unwrap().t().unwrap();
        assert!(!z_strided.is_contiguous());
        let slow = per_head_products(&z_strided, &w).unwrap();
        assert!(max_diff(&slow, &want) < 1e-5, "{}", max_diff(&slow, &want));
        let mut slow_out = vec![f32::NAN; 3 * chunk];
        per_head_products_into(&z_strided, &w, &mut slow_out, chunk).unwrap();
        for (fast, slow) in out.chunks(chunk).zip(slow_out.chunks(chunk)) {
            assert!(fast[..17 * 33]
                .iter()
                .zip(slow)
                .all(|(a, b)| (a - b).abs() < 1e-5));
            assert!(
                slow[17 * 33..].iter().all(|x| x.is_nan()),
                "padding left alone"
            );
        }
        assert!(per_head_products_into(&z, &w, &mut out, 17 * 33 - 1).is_err());
    }

    #[test]
    fn bias_add_equals_candles_broadcast() {
        for shape in [vec![5, 7], vec![2, 3, 4099], vec![1, 1]] {
            let x = randn(&shape, 8);
            let b = randn(&[*shape.last().unwrap()], 9);
            let (got, want) = (add_bias(&x, &b).unwrap(), x.broadcast_add(&b).unwrap());
            assert_eq!(got.dims(), want.dims());
            assert_eq!(to_vec(&got).unwrap(), to_vec(&want).unwrap());
        }
    }

    #[test]
    fn relu_gradient_at_zero_is_zero() {
        assert_eq!(act_grad_scalar(Activation::Relu, 0.0), 0.0);
        assert_eq!(act_grad_scalar(Activation::Relu, 1e-9), 1.0);
    }
}
