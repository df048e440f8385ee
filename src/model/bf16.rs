//! Weight products with bf16 inputs and f32 accumulation: `x · W` for a layer's weight matrix
//! `W`, packed once into bf16 column panels, and activations `x` rounded to bf16 (round to
//! nearest even) as they are packed; and the EAP contraction `Δ · gᵀ` of bf16 rows
//! (`PairRows`, `contract_many`). Every product of two bf16 numbers is exact in f32, so
//! the only error is the rounding of the two inputs: a relative 2⁻⁹ per element.
//!
//! Why by hand: AVX512-BF16's `vdpbf16ps` does 32 multiply-adds per instruction against an f32
//! FMA's 16 (on a 2-core Zen 4 guest: 232 against 116 GFLOP/s per core in cache), and neither
//! candle nor the `gemm` crate uses it (both convert bf16 to f32 and run their f32 kernels).
//! Where the CPU lacks it, the same rounded operands are multiplied by candle's f32 matmul, so
//! a run gives the same numbers, up to the order of the f32 sums, on every machine.

use std::sync::OnceLock;

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::{Error, Result};

/// Rows of a register tile.
const MR: usize = 12;
/// Columns of a register tile and of a packed panel: two 16-lane registers.
const NR: usize = 32;
/// k pairs per block: a panel block of 32 KiB, an activation block of 1 KiB per row.
const KC: usize = 256;

/// Which products of the layers' weight matrices take bf16 inputs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Products {
    /// Every product in f32: the reference precision.
    #[default]
    F32,
    /// The forward's and backward's weight products (the fused q/k/v projection, the output
    /// projection and each head's share of it in Δ, the MLP's, the per-head q/k/v input
    /// gradients) and the EAP contraction (Δ and the reader gradients rounded,
    /// `contract_many`) take bf16 inputs with f32 accumulation; attention's own products and
    /// the norms stay f32.
    Bf16,
}

impl Products {
    /// The name the command line and the scores' `meta` use.
    pub fn name(self) -> &'static str {
        match self {
            Products::F32 => "f32",
            Products::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Products {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Products, String> {
        match s {
            "f32" => Ok(Products::F32),
            "bf16" => Ok(Products::Bf16),
            _ => Err(format!("`{s}` is not a product precision: f32 or bf16")),
        }
    }
}

/// Whether this CPU multiplies bf16 pairs in hardware (AVX512-BF16, with AVX512-BW for packing),
/// unless `EAP_PORTABLE_BF16` is set: then the portable path runs (the same numbers up to the
/// order of f32 sums), to test it or to compare the two on one machine.
pub fn hardware_bf16() -> bool {
    static HARDWARE: OnceLock<bool> = OnceLock::new();
    *HARDWARE.get_or_init(|| {
        if std::env::var_os("EAP_PORTABLE_BF16").is_some() {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// A `[k, n]` weight matrix ready for [`product`].
#[derive(Debug, Clone)]
pub struct PackedWeight {
    k: usize,
    n: usize,
    repr: Repr,
}

#[derive(Debug, Clone)]
enum Repr {
    /// Panels of [`NR`] columns, each `⌈k/2⌉` pairs deep: pair `p`, column `j` of a panel is
    /// one `u32` holding `bf16(W[2p, j])` in its low half and `bf16(W[2p+1, j])` in its high
    /// half (the operand layout of `vdpbf16ps`); zero past `k` and past `n`.
    Panels(Vec<u32>),
    /// The rounded values as an f32 `[k, n]` tensor, for CPUs without AVX512-BF16.
    Rounded(Tensor),
}

impl PackedWeight {
    /// Rows of the packed `[k, n]` matrix.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of the packed matrix.
    pub fn n(&self) -> usize {
        self.n
    }
}

/// A weight's packing, made on first use and kept with the layer.
#[derive(Debug, Clone, Default)]
pub struct LazyPacked(OnceLock<PackedWeight>);

impl LazyPacked {
    /// The packing of `w`, made now if this is its first use.
    pub fn get(&self, w: &Tensor) -> Result<&PackedWeight> {
        if let Some(p) = self.0.get() {
            return Ok(p);
        }
        let packed = pack(w)?;
        Ok(self.0.get_or_init(|| packed))
    }
}

/// bf16 bits of `x`, rounded to nearest even (NaN stays a quiet NaN).
fn bf16_bits(x: f32) -> u32 {
    half::bf16::from_f32(x).to_bits() as u32
}

/// Calls `f` with `t`'s CPU data (`T`: f32, or bf16 for matrices kept as stored), its start
/// offset and its two strides.
fn with_strided<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T], usize, [usize; 2]) -> R,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let strides = layout.stride();
    match (&*storage, strides) {
        (Storage::Cpu(cpu), &[s0, s1]) if t.dtype() == T::DTYPE => {
            let data = cpu.as_slice::<T>()?;
            Ok(f(data, layout.start_offset(), [s0, s1]))
        }
        _ => Err(Error::invalid(format!(
            "bf16 products need a two-dimensional {:?} CPU tensor, got {:?} {:?} on {:?}",
            T::DTYPE,
            t.dtype(),
            t.dims(),
            t.device().location()
        ))),
    }
}

/// Packs `w` (`[k, n]`, any strides) for [`product`].
pub fn pack(w: &Tensor) -> Result<PackedWeight> {
    pack_for(w, hardware_bf16())
}

/// [`pack`] into panels for the AVX512-BF16 kernel when `panels`, else as rounded f32 (what
/// `pack` makes on CPUs without the instruction; tests use it on any CPU).
pub(crate) fn pack_for(w: &Tensor, panels: bool) -> Result<PackedWeight> {
    let (k, n) = w.dims2()?;
    if !panels {
        let rounded = w
            .to_dtype(DType::BF16)?
            .to_dtype(DType::F32)?
            .contiguous()?;
        return Ok(PackedWeight {
            k,
            n,
            repr: Repr::Rounded(rounded),
        });
    }
    let pairs = k.div_ceil(2);
    let panels = n.div_ceil(NR);
    let mut data = vec![0u32; panels * pairs * NR];
    if w.dtype() == DType::BF16 {
        // Stored bf16: the panels take its bits as they are.
        with_strided(w, |src: &[half::bf16], start, [sk, sn]| {
            let at = |i: usize, j: usize| src[start + i * sk + j * sn].to_bits() as u32;
            data.par_chunks_mut(pairs * NR)
                .enumerate()
                .for_each(|(panel, out)| {
                    let j0 = panel * NR;
                    let cols = NR.min(n - j0);
                    if sk == 1 && k % 2 == 0 {
                        // Columns contiguous along k: each pair of a column is one word.
                        for c in 0..cols {
                            let col = &src[start + (j0 + c) * sn..][..k];
                            for (p, pair) in col.chunks_exact(2).enumerate() {
                                out[p * NR + c] =
                                    pair[0].to_bits() as u32 | (pair[1].to_bits() as u32) << 16;
                            }
                        }
                    } else if sn == 1 {
                        // Row-major: two rows' columns interleaved (vectorises).
                        for p in 0..k / 2 {
                            let r0 = &src[start + 2 * p * sk + j0..][..cols];
                            let r1 = &src[start + (2 * p + 1) * sk + j0..][..cols];
                            let row = &mut out[p * NR..p * NR + cols];
                            for ((o, a), b) in row.iter_mut().zip(r0).zip(r1) {
                                *o = a.to_bits() as u32 | (b.to_bits() as u32) << 16;
                            }
                        }
                        fill_pairs(out, j0, cols, k, k / 2..pairs, at);
                    } else {
                        fill_pairs(out, j0, cols, k, 0..pairs, at);
                    }
                });
        })?;
        return Ok(PackedWeight {
            k,
            n,
            repr: Repr::Panels(data),
        });
    }
    with_strided(w, |src: &[f32], start, [sk, sn]| {
        let at = |i: usize, j: usize| bf16_bits(src[start + i * sk + j * sn]);
        data.par_chunks_mut(pairs * NR)
            .enumerate()
            .for_each(|(panel, out)| {
                let j0 = panel * NR;
                let cols = NR.min(n - j0);
                if sk == 1 || k == 1 {
                    // Columns contiguous along k (a transposed view): each column rounds as
                    // one row would, its pairs already the panel's words.
                    let mut words = vec![0u32; pairs];
                    for c in 0..cols {
                        let col = start + (j0 + c) * sn;
                        round_pairs(&src[col..col + k], &mut words);
                        for (p, &w) in words.iter().enumerate() {
                            out[p * NR + c] = w;
                        }
                    }
                    return;
                }
                #[cfg(target_arch = "x86_64")]
                if sn == 1 && cols == NR {
                    // Row-major: two rows of 32 columns at a time, rounded and interleaved.
                    for p in 0..k / 2 {
                        let r0 = &src[start + 2 * p * sk + j0..][..NR];
                        let r1 = &src[start + (2 * p + 1) * sk + j0..][..NR];
                        // SAFETY: panels are made only where the CPU has AVX512-BF16 and
                        // AVX512-BW; both rows and the output hold NR elements.
                        unsafe { interleave_rows(r0, r1, &mut out[p * NR..(p + 1) * NR]) };
                    }
                    fill_pairs(out, j0, cols, k, k / 2..pairs, at);
                    return;
                }
                fill_pairs(out, j0, cols, k, 0..pairs, at);
            });
    })?;
    Ok(PackedWeight {
        k,
        n,
        repr: Repr::Panels(data),
    })
}

/// Pairs `ps` of one panel (its columns `j0..j0 + cols`) from `at(i, j)`, the bf16 bits of
/// `W[i, j]`, zero past `k`: any layout, and the last pair of an odd `k` in the fast ones.
fn fill_pairs(
    out: &mut [u32],
    j0: usize,
    cols: usize,
    k: usize,
    ps: std::ops::Range<usize>,
    at: impl Fn(usize, usize) -> u32,
) {
    for p in ps {
        for c in 0..cols {
            let hi = if 2 * p + 1 < k {
                at(2 * p + 1, j0 + c)
            } else {
                0
            };
            out[p * NR + c] = at(2 * p, j0 + c) | (hi << 16);
        }
    }
}

/// `x · W + bias` (`x`: `[m, k]`, any layout; `bias`: `[n]`) as a new `[m, n]` f32 tensor,
/// with `x` and `W` rounded to bf16 and the sums in f32. The bias is added as each tile is
/// first stored: a separate pass would read and write the whole output once more, into a
/// second fresh buffer (on GPT-2, 14 MB per layer and forward).
pub fn product(x: &Tensor, w: &PackedWeight, bias: Option<&Tensor>) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    if k != w.k {
        return Err(Error::Shape {
            op: "bf16 product",
            expected: format!("an input of {} columns", w.k),
            found: format!("{:?}", x.dims()),
        });
    }
    if let Some(b) = bias {
        if b.dims() != [w.n] {
            return Err(Error::Shape {
                op: "bf16 product's bias",
                expected: format!("[{}]", w.n),
                found: format!("{:?}", b.dims()),
            });
        }
    }
    let panels = match &w.repr {
        Repr::Rounded(rounded) => {
            let xr = x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            let y = xr.matmul(rounded)?;
            return Ok(match bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            });
        }
        Repr::Panels(p) => p,
    };
    let x = x.contiguous()?;
    let a = with_strided(&x, |src: &[f32], start, _| {
        pack_rows(&src[start..start + m * k], m, k)
    })?;
    let bias = bias
        .map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
        .transpose()?;
    let mut out = vec![0f32; m * w.n];
    #[cfg(target_arch = "x86_64")]
    multiply(
        &a,
        panels,
        (m, k.div_ceil(2), w.n),
        bias.as_deref(),
        &mut out,
    );
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (a, panels, bias);
    Ok(Tensor::from_vec(out, (m, w.n), &Device::Cpu)?)
}

/// `x`'s rows (`[m, k]` row-major) rounded to bf16, in tiles of [`MR`] rows: tile `t`, pair
/// `p`, row `r` is the `u32` of `(x[t·MR + r, 2p], x[t·MR + r, 2p + 1])`; zero past `m`, `k`.
fn pack_rows(x: &[f32], m: usize, k: usize) -> Vec<u32> {
    let pairs = k.div_ceil(2);
    let mut out = vec![0u32; m.div_ceil(MR) * pairs * MR];
    out.par_chunks_mut(pairs * MR)
        .enumerate()
        .for_each(|(t, tile)| pack_tile(x, m, k, t, tile));
    out
}

/// Row tile `t` of [`pack_rows`].
fn pack_tile(x: &[f32], m: usize, k: usize, t: usize, tile: &mut [u32]) {
    let mut words = vec![0u32; k.div_ceil(2)];
    for r in 0..MR.min(m - t * MR) {
        let row = &x[(t * MR + r) * k..(t * MR + r + 1) * k];
        round_pairs(row, &mut words);
        for (p, &w) in words.iter().enumerate() {
            tile[p * MR + r] = w;
        }
    }
}

/// `out = x · W[k0..k0 + kr, :]` on the calling thread, for `x` `[m, kr]` row-major and `out`
/// `[m, n]` row-major, every element of which is written: one head's share of a product whose
/// inner dimension runs over heads (the q/k/v input gradients, per head). `false`, with
/// nothing written, unless `w` holds hardware panels and `k0`, `kr` are even (pair-aligned).
pub(crate) fn product_rows_serial(
    x: &[f32],
    m: usize,
    k0: usize,
    kr: usize,
    w: &PackedWeight,
    out: &mut [std::mem::MaybeUninit<f32>],
) -> bool {
    let Repr::Panels(panels) = &w.repr else {
        return false;
    };
    if cfg!(not(target_arch = "x86_64")) {
        return false;
    }
    if k0 % 2 == 1 || kr % 2 == 1 || k0 + kr > w.k || x.len() < m * kr || out.len() < m * w.n {
        return false;
    }
    let pairs = kr / 2;
    let mut a = vec![0u32; m.div_ceil(MR) * pairs * MR];
    for (t, tile) in a.chunks_mut(pairs * MR).enumerate() {
        pack_tile(x, m, kr, t, tile);
    }
    #[cfg(target_arch = "x86_64")]
    {
        let c = OutPtr(out.as_mut_ptr() as *mut f32);
        let all = 0..w.n.div_ceil(NR);
        let b = (panels.as_slice(), w.k.div_ceil(2), k0 / 2);
        multiply_panels(&a, pairs, b, (m, w.n), all, None, c);
    }
    true
}

/// The rounded `[k, n]` f32 values of a packing made for a CPU without AVX512-BF16.
pub(crate) fn rounded_values(w: &PackedWeight) -> Option<&Tensor> {
    match &w.repr {
        Repr::Rounded(t) => Some(t),
        Repr::Panels(_) => None,
    }
}

/// `row` rounded to bf16 as pairs: `words[p]` holds `row[2p]` low and `row[2p + 1]` high.
fn round_pairs(row: &[f32], words: &mut [u32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if hardware_bf16() {
        // SAFETY: the CPU has AVX512-BF16 (checked above); the kernel stays inside both slices.
        done = unsafe { round_pairs_avx512(row, words) };
    }
    for p in done..words.len() {
        let lo = bf16_bits(row[2 * p]);
        let hi = row.get(2 * p + 1).map_or(0, |&x| bf16_bits(x));
        words[p] = lo | (hi << 16);
    }
}

/// The whole 32-float blocks of [`round_pairs`]; returns how many pairs it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_pairs_avx512(row: &[f32], words: &mut [u32]) -> usize {
    use std::arch::x86_64::*;
    let blocks = row.len() / 32;
    for b in 0..blocks {
        let lo = _mm512_loadu_ps(row.as_ptr().add(32 * b));
        let hi = _mm512_loadu_ps(row.as_ptr().add(32 * b + 16));
        // The second operand fills the low 16 bf16 lanes: elements stay in order.
        let bf = _mm512_cvtne2ps_pbh(hi, lo);
        _mm512_storeu_si512(
            words.as_mut_ptr().add(16 * b) as *mut _,
            std::mem::transmute::<__m512bh, __m512i>(bf),
        );
    }
    blocks * 16
}

/// `out[c]` = `(bf16(r0[c]), bf16(r1[c]))` for the [`NR`] columns of two weight rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn interleave_rows(r0: &[f32], r1: &[f32], out: &mut [u32]) {
    use std::arch::x86_64::*;
    let round = |r: &[f32]| -> __m512i {
        let lo = _mm512_loadu_ps(r.as_ptr());
        let hi = _mm512_loadu_ps(r.as_ptr().add(16));
        std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo))
    };
    let (a, b) = (round(r0), round(r1));
    // 16-bit lane e of the result: a[e/2] for even e, b[e/2] for odd (indices ≥ 32 pick b).
    let index = |first: i16| -> __m512i {
        let mut ix = [0i16; 32];
        for (e, v) in ix.iter_mut().enumerate() {
            *v = first + (e / 2) as i16 + if e % 2 == 1 { 32 } else { 0 };
        }
        _mm512_loadu_si512(ix.as_ptr() as *const _)
    };
    let low = _mm512_permutex2var_epi16(a, index(0), b);
    let high = _mm512_permutex2var_epi16(a, index(16), b);
    _mm512_storeu_si512(out.as_mut_ptr() as *mut _, low);
    _mm512_storeu_si512(out.as_mut_ptr().add(16) as *mut _, high);
}

/// A raw output pointer shared by tasks that write disjoint column ranges.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each task writes only the columns of its own panels.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The element at `offset` (a method, so that closures capture the whole `Send` wrapper
    /// rather than its raw pointer field).
    ///
    /// # Safety
    /// `offset` must lie inside the output.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

/// `out = A · B` from packed rows and panels, the panels split over rayon's threads.
#[cfg(target_arch = "x86_64")]
fn multiply(
    a: &[u32],
    b: &[u32],
    (m, pairs, n): (usize, usize, usize),
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let panels = n.div_ceil(NR);
    let tasks = (rayon::current_num_threads() * 2).min(panels).max(1);
    let per_task = panels.div_ceil(tasks);
    let c = OutPtr(out.as_mut_ptr());
    (0..panels.div_ceil(per_task))
        .into_par_iter()
        .for_each(|task| {
            let js = task * per_task..((task + 1) * per_task).min(panels);
            multiply_panels(a, pairs, (b, pairs, 0), (m, n), js, bias, c);
        });
}

/// Panels `js` of `out = A · B[first..first + pairs] + bias` (in pairs of k): `a` holds `pairs`
/// per row tile, each panel of `b` (`(b, b_pairs, first)`) `b_pairs`; `out` (`m × n`,
/// row-major) is written in full over those panels' columns.
#[cfg(target_arch = "x86_64")]
fn multiply_panels(
    a: &[u32],
    pairs: usize,
    (b, b_pairs, first): (&[u32], usize, usize),
    (m, n): (usize, usize),
    js: std::ops::Range<usize>,
    bias: Option<&[f32]>,
    c: OutPtr,
) {
    let tiles = m.div_ceil(MR);
    for p0 in (0..pairs).step_by(KC) {
        let len = KC.min(pairs - p0);
        for j in js.clone() {
            let cols = NR.min(n - j * NR);
            let panel = &b[j * b_pairs * NR + (first + p0) * NR..];
            for t in 0..tiles {
                let rows = MR.min(m - t * MR);
                let tile = &a[t * pairs * MR + p0 * MR..];
                assert!(tile.len() >= len * MR && panel.len() >= len * NR);
                // The bias joins the first store of each tile, never an accumulation.
                let bias = match bias {
                    Some(b) if p0 == 0 => b[j * NR..j * NR + cols].as_ptr(),
                    _ => std::ptr::null(),
                };
                // SAFETY: packed panels exist only on CPUs with AVX512-BF16 (`pack`); the
                // assertion keeps the `len` pairs read inside both packings, the tile writes
                // `rows × cols` of the `m × n` output at (t·MR, j·NR), and `bias` (when not
                // null) holds those `cols`.
                unsafe {
                    tile_bf16(
                        len,
                        tile.as_ptr(),
                        panel.as_ptr(),
                        c.at(t * MR * n + j * NR),
                        n,
                        (rows, cols),
                        p0 > 0,
                        bias,
                    )
                }
            }
        }
    }
}

/// One `MR × NR` tile: `len` pairs of a row tile (`MR` words per pair) against a panel (`NR`
/// words per pair), written (or with `accumulate`, added) to `rows × cols` of `c`; a non-null
/// `bias` (`cols` values) is added to every row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_bf16(
    len: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    (rows, cols): (usize, usize),
    accumulate: bool,
    bias: *const f32,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..len {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const _));
        for (r, acc) in acc.iter_mut().enumerate() {
            let ar: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(p * MR + r) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], ar, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], ar, b1);
        }
    }
    let mask = |c: usize| -> u16 {
        match c {
            0 => 0,
            c if c >= 16 => u16::MAX,
            c => (1u16 << c) - 1,
        }
    };
    let masks = [mask(cols), mask(cols.saturating_sub(16))];
    let biases = match bias.is_null() {
        true => [_mm512_setzero_ps(); 2],
        false => [
            _mm512_maskz_loadu_ps(masks[0], bias),
            _mm512_maskz_loadu_ps(masks[1], bias.wrapping_add(16)),
        ],
    };
    for (r, acc) in acc.iter().enumerate().take(rows) {
        for (half, (&v, &mk)) in acc.iter().zip(&masks).enumerate() {
            let at = c.add(r * ldc + 16 * half);
            let v = if accumulate {
                _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, at))
            } else if bias.is_null() {
                v
            } else {
                _mm512_add_ps(v, biases[half])
            };
            _mm512_mask_storeu_ps(at, mk, v);
        }
    }
}

/// Words (bf16 pairs) of `k` per block of the contraction: 8 KiB of each row, so a block of the
/// rows of Δ and of the gradients stays in L2 while the tiles pass over it.
const CONTRACT_BLOCK: usize = 2048;
/// Rows of Δ and of the gradients in a contraction tile: 24 accumulators, 10 loads per 24
/// `vdpbf16ps` (the f32 contraction's 6 × 4 tile, at twice the multiply-adds per instruction).
const CM: usize = 6;
const CN: usize = 4;

/// Rows of bf16 pairs for the EAP contraction (`Σ Δ·g` over examples, positions and `d`): pair
/// `p` of row `i` is word `i·stride + p`, low half the value at `2p`, high half `2p + 1`.
#[derive(Debug)]
pub(crate) struct PairRows {
    words: Vec<u32>,
    rows: usize,
    stride: usize,
    k: usize,
}

impl PairRows {
    /// `rows` rows of `k` zeros, `stride` words apart (at least `⌈k/2⌉`; more keeps the
    /// contraction's blocks of different rows off the same cache sets).
    pub(crate) fn zeros(rows: usize, k: usize, stride: usize) -> PairRows {
        let stride = stride.max(k.div_ceil(2));
        PairRows {
            words: vec![0u32; rows * stride],
            rows,
            stride,
            k,
        }
    }

    /// All rows' words (to prefault them, [`crate::model::ops::prefault`]).
    pub(crate) fn words_mut(&mut self) -> &mut [u32] {
        &mut self.words
    }

    /// Sets row `i` to `values` (`k` of them) rounded to bf16.
    pub(crate) fn set_row(&mut self, i: usize, values: &[f32]) -> Result<()> {
        if i >= self.rows || values.len() != self.k {
            return Err(Error::Shape {
                op: "bf16 row",
                expected: format!("one of {} rows of {} values", self.rows, self.k),
                found: format!("row {i} of {} values", values.len()),
            });
        }
        let pairs = self.k.div_ceil(2);
        round_pairs(
            values,
            &mut self.words[i * self.stride..i * self.stride + pairs],
        );
        Ok(())
    }

    /// Row `i`'s values (as f32), for tests.
    #[cfg(test)]
    pub(crate) fn row_values(&self, i: usize) -> Vec<f32> {
        let words = &self.words[i * self.stride..];
        (0..self.k)
            .map(|e| {
                let half = (words[e / 2] >> (16 * (e % 2))) as u16;
                half::bf16::from_bits(half).to_f32()
            })
            .collect()
    }

    /// `t`'s rows (`[n, k]` f32, or any shape whose last dimension is `k`) rounded to bf16
    /// pairs, `⌈k/2⌉` words per row.
    pub(crate) fn from_tensor(t: &Tensor) -> Result<PairRows> {
        let k = t.dims().last().copied().unwrap_or(1).max(1);
        let rows = t.elem_count() / k;
        let t = t.reshape((rows, k))?.contiguous()?;
        let pairs = k.div_ceil(2);
        let words = with_strided(&t, |src: &[f32], start, _| {
            let mut words = vec![0u32; rows * pairs];
            words
                .par_chunks_mut(pairs)
                .zip(src[start..start + rows * k].par_chunks(k))
                .for_each(|(w, row)| round_pairs(row, w));
            words
        })?;
        Ok(PairRows {
            words,
            rows,
            stride: pairs,
            k,
        })
    }

    /// Rows of `k` values.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row.
    pub(crate) fn k(&self) -> usize {
        self.k
    }
}

/// Rounds every value of `data` to the nearest bf16 (even on ties), keeping it f32: the
/// operands [`contract_many`] multiplies, on CPUs without AVX512-BF16.
pub(crate) fn round_in_place(data: &mut [f32]) {
    data.par_chunks_mut(1 << 16).for_each(|c| {
        c.iter_mut()
            .for_each(|x| *x = half::bf16::from_f32(*x).to_f32())
    });
}

/// The EAP contraction with bf16 inputs and f32 sums: for each `(b, rows)`, `a[..rows] · bᵀ`
/// as a `[rows, b.rows()]` f32 tensor. Each block of `a`'s words is read once for all the `b`s.
pub(crate) fn contract_many(a: &PairRows, bs: &[(&PairRows, usize)]) -> Result<Vec<Tensor>> {
    for &(b, rows) in bs {
        if b.k != a.k || rows > a.rows {
            return Err(Error::Shape {
                op: "bf16 contraction",
                expected: format!("rows of {} values and at most {} rows", a.k, a.rows),
                found: format!("rows of {} values against {rows} rows", b.k),
            });
        }
    }
    if !hardware_bf16() {
        return Err(Error::invalid(
            "the bf16 contraction needs AVX512-BF16; elsewhere Δ and the gradients are \
             rounded in place (round_in_place) and the f32 contraction runs",
        ));
    }
    #[cfg(target_arch = "x86_64")]
    {
        let outs = contract_pairs(a, bs);
        outs.into_iter()
            .zip(bs)
            .map(|(c, (b, rows))| Ok(Tensor::from_vec(c, (*rows, b.rows), &Device::Cpu)?))
            .collect()
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("hardware_bf16 is false off x86-64")
}

/// [`contract_many`]'s sums: blocks of [`CONTRACT_BLOCK`] words in parallel, each thread's
/// partial sums added at the end.
#[cfg(target_arch = "x86_64")]
fn contract_pairs(a: &PairRows, groups: &[(&PairRows, usize)]) -> Vec<Vec<f32>> {
    let pairs = a.k.div_ceil(2);
    let zeros = || -> Vec<Vec<f32>> {
        groups
            .iter()
            .map(|&(b, rows)| vec![0f32; rows * b.rows])
            .collect()
    };
    (0..pairs.div_ceil(CONTRACT_BLOCK))
        .into_par_iter()
        .fold(zeros, |mut cs, blk| {
            let w0 = blk * CONTRACT_BLOCK;
            let len = CONTRACT_BLOCK.min(pairs - w0);
            for (&(b, rows), c) in groups.iter().zip(cs.iter_mut()) {
                let n = b.rows;
                assert!(b.words.len() >= n * b.stride && a.words.len() >= rows * a.stride);
                for i in (0..rows).step_by(CM) {
                    for j in (0..n).step_by(CN) {
                        let tile = Tile {
                            a: a.words.as_ptr(),
                            lda: a.stride,
                            b: b.words.as_ptr(),
                            ldb: b.stride,
                            rows: (i, CM.min(rows - i)),
                            cols: (j, CN.min(n - j)),
                            words: (w0, len),
                        };
                        // SAFETY: `contract_many` runs this only with AVX512-BF16; the tile
                        // reads words w0..w0 + len ≤ pairs, within both strides, of rows
                        // below `rows` of `a` and below `n` of `b` (asserted above) and adds
                        // to its own elements of the [rows, n] `c`.
                        unsafe {
                            match tile.rows.1 == CM && tile.cols.1 == CN {
                                true => contract_tile::<true>(&tile, c, n),
                                false => contract_tile::<false>(&tile, c, n),
                            }
                        }
                    }
                }
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

/// One tile of the contraction: rows `rows.0..` of `a` (`rows.1` of them) against rows
/// `cols.0..` of `b`, over words `words.0..words.0 + words.1`.
#[cfg(target_arch = "x86_64")]
struct Tile {
    a: *const u32,
    lda: usize,
    b: *const u32,
    ldb: usize,
    rows: (usize, usize),
    cols: (usize, usize),
    words: (usize, usize),
}

/// Adds [`Tile`]'s sums into `c` (`[_, n]`); a `FULL` tile has constant bounds and unrolls.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::needless_range_loop)] // tiles indexed by (r, s)
unsafe fn contract_tile<const FULL: bool>(t: &Tile, c: &mut [f32], n: usize) {
    use std::arch::x86_64::*;
    let (i, j, (w0, len)) = (t.rows.0, t.cols.0, t.words);
    let (mi, nj) = if FULL { (CM, CN) } else { (t.rows.1, t.cols.1) };
    let zero: __m512bh = std::mem::transmute(_mm512_setzero_si512());
    let mut acc = [[_mm512_setzero_ps(); CN]; CM];
    let mut w = 0;
    while w < len {
        // The last block's words past `len` read as zero.
        let mask: u16 = match len - w {
            r if r >= 16 => u16::MAX,
            r => (1u16 << r) - 1,
        };
        let load = |p: *const u32| -> __m512bh {
            std::mem::transmute(_mm512_maskz_loadu_epi32(mask, p as *const i32))
        };
        let mut bv = [zero; CN];
        for s in 0..nj {
            bv[s] = load(t.b.add((j + s) * t.ldb + w0 + w));
        }
        for r in 0..mi {
            let av = load(t.a.add((i + r) * t.lda + w0 + w));
            for s in 0..nj {
                acc[r][s] = _mm512_dpbf16_ps(acc[r][s], av, bv[s]);
            }
        }
        w += 16;
    }
    for r in 0..mi {
        for s in 0..nj {
            c[(i + r) * n + j + s] += _mm512_reduce_add_ps(acc[r][s]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rounded(x: f32) -> f64 {
        half::bf16::from_f32(x).to_f64()
    }

    /// Deterministic values of both signs and a spread of magnitudes.
    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8;
                (h % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Every shape edge: rows past a tile, columns past a panel, odd k, k past one block, and
    /// weights stored transposed; the product must equal the f64 product of the rounded inputs
    /// to f32 summation error, on either path (hardware panels or rounded f32), and a bias
    /// must be added exactly once.
    #[test]
    fn products_equal_those_of_the_rounded_inputs() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (13, 7, 33),
            (25, 515, 70),
            (12, 64, 32),
            (40, 600, 96),
        ] {
            let x = values(m * k, 1);
            let wv = values(k * n, 7);
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
            for transposed in [false, true] {
                // The same [k, n] matrix, stored row-major or as the transpose of [n, k].
                let w = if transposed {
                    let t: Vec<f32> = (0..n * k).map(|i| wv[(i % k) * n + i / k]).collect();
                    Tensor::from_vec(t, (n, k), &Device::Cpu)
                        .unwrap()
                        .t()
                        .unwrap()
                } else {
                    Tensor::from_vec(wv.clone(), (k, n), &Device::Cpu).unwrap()
                };
                // Both paths where the CPU has the instruction; the portable one everywhere.
                let paths = if hardware_bf16() {
                    vec![true, false]
                } else {
                    vec![false]
                };
                for panels in paths {
                    let packed = pack_for(&w, panels).unwrap();
                    // With a bias (added once, even when k runs over several blocks) and without.
                    let bias: Vec<f32> = (0..n).map(|j| (j as f32 * 0.37).sin()).collect();
                    let bt = Tensor::from_vec(bias.clone(), n, &Device::Cpu).unwrap();
                    let got = product(&xt, &packed, None)
                        .unwrap()
                        .to_vec2::<f32>()
                        .unwrap();
                    let biased = product(&xt, &packed, Some(&bt)).unwrap();
                    let biased = biased.to_vec2::<f32>().unwrap();
                    for i in 0..m {
                        for j in 0..n {
                            let diff = biased[i][j] - got[i][j] - bias[j];
                            assert!(
                                diff.abs() <= 1e-5 * (1.0 + got[i][j].abs()),
                                "bias at ({i}, {j})"
                            );
                            let (mut want, mut scale) = (0f64, 0f64);
                            for l in 0..k {
                                let t = rounded(x[i * k + l]) * rounded(wv[l * n + j]);
                                want += t;
                                scale += t.abs();
                            }
                            let err = (got[i][j] as f64 - want).abs();
                            assert!(
                            err <= 1e-6 * scale + 1e-30,
                            "{m}x{k}x{n} transposed={transposed} panels={panels} at ({i}, {j}): {} vs {want}",
                            got[i][j]
                        );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even_and_differs_from_truncation() {
        // 1 + 2⁻⁸ + 2⁻⁹ lies between two bf16 numbers, nearer the upper: truncation would drop
        // it. 33 copies, so that the hardware path rounds it in its vector loop and its tail.
        let x = 1.0f32 + 1.0 / 256.0 + 1.0 / 512.0;
        let xt = Tensor::from_vec(vec![x; 33], (1, 33), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(vec![1.0f32; 33], (33, 1), &Device::Cpu).unwrap();
        for panels in [hardware_bf16(), false] {
            let y = product(&xt, &pack_for(&w, panels).unwrap(), None).unwrap();
            assert_eq!(
                y.to_vec2::<f32>().unwrap()[0][0],
                33.0 * (1.0 + 2.0 / 256.0)
            );
        }
    }

    /// The contraction of Δ-like rows (padded) against several groups of gradient rows equals
    /// the f64 sums of the rounded values: odd k, k past two blocks, tiles cut at both edges,
    /// fewer rows of Δ than it holds; rows read back as their rounded values, and a row out of
    /// range, a row of another length and a group of another k are errors.
    #[test]
    fn the_contraction_equals_the_sums_of_the_rounded_values() {
        if !hardware_bf16() {
            // The portable path is the f32 contraction of values rounded by round_in_place.
            let mut v = vec![1.0f32 + 1.0 / 256.0 + 1.0 / 512.0, 0.1];
            round_in_place(&mut v);
            assert_eq!(v, [1.0 + 2.0 / 256.0, half::bf16::from_f32(0.1).to_f32()]);
            return;
        }
        for &(m, k) in &[(7, 5), (13, 2 * CONTRACT_BLOCK * 2 + 37), (6, 64)] {
            let stride = k + 3;
            let delta = values(m * stride, 3);
            let mut rows = PairRows::zeros(m, k, k.div_ceil(2) + 5);
            for i in 0..m {
                let row = &delta[i * stride..i * stride + k];
                rows.set_row(i, row).unwrap();
                let want: Vec<f32> = row.iter().map(|&x| rounded(x) as f32).collect();
                assert_eq!(rows.row_values(i), want);
            }
            assert!(rows.set_row(m, &delta[..k]).is_err());
            assert!(rows.set_row(0, &delta[..k + 1]).is_err());
            let groups: Vec<(PairRows, usize)> = [(5, m), (1, m - 1), (9, 2)]
                .iter()
                .enumerate()
                .map(|(g, &(n, r))| {
                    let t = Tensor::from_vec(values(n * k, 11 + g as u32), (n, k), &Device::Cpu);
                    (PairRows::from_tensor(&t.unwrap()).unwrap(), r)
                })
                .collect();
            let refs: Vec<(&PairRows, usize)> = groups.iter().map(|(p, r)| (p, *r)).collect();
            let got = contract_many(&rows, &refs).unwrap();
            for (g, ((b, r), out)) in groups.iter().zip(&got).enumerate() {
                let bv = values(b.rows * k, 11 + g as u32);
                let out = out.to_vec2::<f32>().unwrap();
                assert_eq!((out.len(), out[0].len()), (*r, b.rows));
                for (i, row) in out.iter().enumerate() {
                    for (j, &v) in row.iter().enumerate() {
                        let (mut want, mut scale) = (0f64, 0f64);
                        for l in 0..k {
                            let t = rounded(delta[i * stride + l]) * rounded(bv[j * k + l]);
                            want += t;
                            scale += t.abs();
                        }
                        let err = (v as f64 - want).abs();
                        assert!(
                            err <= 1e-6 * scale,
                            "k={k} group {g} ({i}, {j}): {v} vs {want}"
                        );
                    }
                }
            }
            let other = PairRows::from_tensor(
                &Tensor::zeros((2, k + 1), DType::F32, &Device::Cpu).unwrap(),
            );
            let e = contract_many(&rows, &[(&other.unwrap(), 1)])
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("rows of {} values", k + 1)), "{e}");
        }
    }

    #[test]
    fn a_wrong_inner_size_is_an_error() {
        let x = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap();
        let e = product(&x, &pack(&w).unwrap(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("4 columns"), "{e}");
    }
}
