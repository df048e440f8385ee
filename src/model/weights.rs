//! Weights: memory-mapped safetensors files and PyTorch `.pth` state dicts, read in their stored
//! dtype (f32, f16, bf16; f64 from `.pth`) and converted to f32 one tensor at a time, laid out
//! the way the forward pass wants them.
//!
//! * [`SafetensorsFile`] — one memory-mapped file with a checked header.
//! * [`Checkpoint`] — the files of one model: `model.safetensors`, the shards that
//!   `model.safetensors.index.json` names, or a PyTorch `.pth` state dict ([`super::pth`]),
//!   each mapped once; tensors are looked up across them.
//! * [`WeightLoader`] — knows a format's tensor names and layouts and builds [`Block`]s:
//!   Hugging Face GPT-2 (`Conv1D` layout: `c_attn.weight [d, 3d]`, keys with or without the
//!   `transformer.` prefix, tied unembedding), TransformerLens state dicts
//!   (`blocks.0.attn.W_Q [n_heads, d_model, d_head]`, …), Hugging Face Llama-family checkpoints
//!   (`model.layers.{i}.self_attn.q_proj.weight [n_heads·d_head, d]`, `[out, in]` Linear
//!   layout) and GPT-NeoX (`gpt_neox.layers.{i}.attention.query_key_value`, interleaved per
//!   head). It also checks that every tensor of the files is one the configuration explains,
//!   so a config that does not match its weights (an extra layer, a norm or bias it does not
//!   announce) fails at load time instead of computing a different model.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Metadata, SafeTensors};

use super::block::{AttentionWeights, Block, MlpWeights, NormWeights};
use super::config::{CheckpointLayout, ModelConfig, Norm, WeightFormat};
use super::pth::PthFile;
use crate::{Error, Result};

/// Embedding, final norm and unembedding.
#[derive(Debug, Clone)]
pub struct EmbedWeights {
    /// `[d_vocab, d_model]`.
    pub w_e: Tensor,
    /// `[n_ctx, d_model]`; `None` where positions enter through rotary embeddings.
    pub w_pos: Option<Tensor>,
    pub ln_final: Option<NormWeights>,
    /// `[d_model, d_vocab_out]`.
    pub w_u: Tensor,
    pub b_u: Option<Tensor>,
}

/// A memory-mapped safetensors file whose header has been parsed and checked.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    metadata: Metadata,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only; as with every mmap-based loader (candle,
        // safetensors), modifying it while eap runs is undefined and documented as such.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| Error::Safetensors {
                path: path.to_path_buf(),
                message: describe_header_error(&mmap, e),
            })?;
        let data_start = 8 + header_len;
        let data_len = mmap.len().saturating_sub(data_start);
        for (name, info) in metadata.tensors() {
            if info.data_offsets.1 > data_len {
                return Err(Error::Safetensors {
                    path: path.to_path_buf(),
                    message: format!(
                        "tensor `{name}` ends at byte {} but the file holds only {data_len} data bytes (truncated?)",
                        info.data_offsets.1
                    ),
                });
            }
        }
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            data_start,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains(&self, name: &str) -> bool {
        self.metadata.info(name).is_some()
    }

    pub fn names(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    /// Loads tensor `name`, checks its shape and converts it to f32 on `device`.
    pub fn load(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        self.load_as(name, shape, Transpose::No, device)
    }

    /// Checks that tensor `name` exists with `shape` in a supported dtype; returns its dtype
    /// and bytes.
    fn checked(&self, name: &str, shape: &[usize]) -> Result<(safetensors::Dtype, &[u8], usize)> {
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        if info.shape != shape {
            return Err(Error::TensorShape {
                path: self.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        match info.dtype {
            safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16 => {}
            other => {
                return Err(Error::TensorDtype {
                    path: self.path.clone(),
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        }
        let start = self.data_start + info.data_offsets.0;
        let bytes = &self.mmap[start..self.data_start + info.data_offsets.1];
        let expected = shape.iter().product::<usize>() * (info.dtype.bitsize() / 8);
        if bytes.len() != expected {
            return Err(Error::Safetensors {
                path: self.path.clone(),
                message: format!(
                    "tensor `{name}` holds {} bytes; {:?} {shape:?} needs {expected}",
                    bytes.len(),
                    info.dtype
                ),
            });
        }
        Ok((info.dtype, bytes, start))
    }

    /// Loads tensor `name` of `shape` as f32, transposed as `transpose` says, in one pass over
    /// the stored bytes; then tells the kernel the file's pages are no longer needed, so the
    /// mapped file does not stay in the resident set beside its converted copy (the page cache
    /// keeps them for the next read).
    pub fn load_as(
        &self,
        name: &str,
        shape: &[usize],
        transpose: Transpose,
        device: &Device,
    ) -> Result<Tensor> {
        let (dtype, bytes, start) = self.checked(name, shape)?;
        let (values, out_shape) = match transpose {
            Transpose::No => (decode_f32(dtype, bytes), shape.to_vec()),
            Transpose::Rows { batch } => {
                let (rows, cols, out_shape) = transposed_shape(name, shape, batch)?;
                (transpose_f32(dtype, bytes, batch, rows, cols), out_shape)
            }
        };
        self.release(start, bytes.len());
        Ok(Tensor::from_vec(values, out_shape, device)?)
    }

    /// Drops this process's mapping of `len` bytes from `start` once they have been copied, so
    /// that a streamed model's resident set does not keep the file's pages.
    fn release(&self, start: usize, len: usize) {
        // SAFETY: DONTNEED on a read-only private file mapping only drops this process's page
        // table entries; a later read faults the same file contents back in.
        let _ = unsafe {
            self.mmap
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
        };
    }

    /// `name` as a bf16 tensor of its stored layout when it is stored in bf16 (`None` for
    /// another dtype): a copy of its bytes, without conversion, for bf16 products.
    pub fn load_bf16(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<Option<Tensor>> {
        let (dtype, bytes, start) = self.checked(name, shape)?;
        if dtype != safetensors::Dtype::BF16 {
            return Ok(None);
        }
        let t = Tensor::from_raw_buffer(bytes, candle_core::DType::BF16, shape, device)?;
        self.release(start, bytes.len());
        Ok(Some(t))
    }

    /// Rows `ids` of the matrix `name` (`shape` `[rows, cols]`) as f32 `[ids.len(), cols]`,
    /// reading only those rows (an embedding lookup, or a block of the unembedding).
    pub fn load_rows(
        &self,
        name: &str,
        shape: &[usize],
        ids: &mut dyn Iterator<Item = usize>,
        device: &Device,
    ) -> Result<Tensor> {
        let (dtype, bytes, start) = self.checked(name, shape)?;
        let (rows, cols) = match shape {
            &[r, c] => (r, c),
            _ => return Err(Error::invalid(format!("tensor `{name}` is not a matrix"))),
        };
        let size = dtype.bitsize() / 8;
        let ids: Vec<usize> = ids.collect();
        if let Some(&id) = ids.iter().find(|&&id| id >= rows) {
            return Err(Error::invalid(format!(
                "row {id} of tensor `{name}`, which has {rows} rows"
            )));
        }
        let row_bytes = |lo: usize, hi: usize| &bytes[lo * cols * size..hi * cols * size];
        let (lo, hi) = match (ids.iter().min(), ids.iter().max()) {
            (Some(&lo), Some(&hi)) => (lo, hi + 1),
            _ => (0, 0),
        };
        let out = if ids.windows(2).all(|w| w[1] == w[0] + 1) {
            // A block of the unembedding (or one row): one parallel conversion of its bytes.
            decode_f32(dtype, row_bytes(lo, hi))
        } else {
            ids.iter()
                .flat_map(|&id| {
                    let row = row_bytes(id, id + 1);
                    (0..cols).map(move |j| decode_at(dtype, row, j))
                })
                .collect()
        };
        if hi > lo {
            // The rows are copied; their pages may go.
            self.release(start + lo * cols * size, (hi - lo) * cols * size);
        }
        Ok(Tensor::from_vec(out, (ids.len(), cols), device)?)
    }

    /// [`load_as`](Self::load_as) without reading the data: checks name, shape and dtype and
    /// returns zeros of the shape the load would give, as one zero broadcast (no memory: eap's
    /// allocator settings serve allocations under 1 GiB from the heap, where `calloc` clears
    /// them, so real zeros of GPT-2's vocabulary were 154 MB written for nothing).
    pub fn check_as(
        &self,
        name: &str,
        shape: &[usize],
        transpose: Transpose,
        device: &Device,
    ) -> Result<Tensor> {
        self.checked(name, shape)?;
        let out_shape = match transpose {
            Transpose::No => shape.to_vec(),
            Transpose::Rows { batch } => transposed_shape(name, shape, batch)?.2,
        };
        Ok(Tensor::zeros((), DType::F32, device)?.broadcast_as(out_shape)?)
    }
}

/// A stored `[batch·rows, cols]` matrix's rows, cols and transposed shape (`[cols, rows]`, or
/// `[batch, cols, rows]` for `batch > 1`).
fn transposed_shape(
    name: &str,
    shape: &[usize],
    batch: usize,
) -> Result<(usize, usize, Vec<usize>)> {
    match shape {
        &[r, cols] if batch > 0 && r % batch == 0 => {
            let rows = r / batch;
            let out = match batch {
                1 => vec![cols, rows],
                _ => vec![batch, cols, rows],
            };
            Ok((rows, cols, out))
        }
        _ => Err(Error::invalid(format!(
            "tensor `{name}` of shape {shape:?} is not {batch} blocks of rows"
        ))),
    }
}

/// How a stored tensor is laid out in eap's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transpose {
    /// As stored.
    No,
    /// A stored matrix `[batch·rows, cols]` read as `batch` blocks of `[rows, cols]`, each
    /// transposed: a Hugging Face `Linear` weight `[out, in]` as `[in, out]` (`batch` 1), a
    /// projection onto heads `[heads·d_head, d]` as `[heads, d, d_head]`.
    Rows { batch: usize },
}

/// The value of element `i` of stored bytes in `dtype` (one of F32, F16, BF16).
#[inline(always)]
fn decode_at(dtype: safetensors::Dtype, bytes: &[u8], i: usize) -> f32 {
    match dtype {
        safetensors::Dtype::BF16 => {
            f32::from_bits((u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]) as u32) << 16)
        }
        safetensors::Dtype::F16 => {
            half::f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32()
        }
        _ => f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes")),
    }
}

/// Stored bytes as f32, converted in parallel blocks.
fn decode_f32(dtype: safetensors::Dtype, bytes: &[u8]) -> Vec<f32> {
    // One loop per stored dtype, so the inner loop has no branch and vectorises.
    match dtype {
        safetensors::Dtype::BF16 => {
            decode_with(bytes, 2, |b, i| decode_at(safetensors::Dtype::BF16, b, i))
        }
        safetensors::Dtype::F16 => {
            decode_with(bytes, 2, |b, i| decode_at(safetensors::Dtype::F16, b, i))
        }
        _ => decode_with(bytes, 4, |b, i| decode_at(safetensors::Dtype::F32, b, i)),
    }
}

fn decode_with(bytes: &[u8], size: usize, decode: impl Fn(&[u8], usize) -> f32 + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    let n = bytes.len() / size;
    // Written into uninitialised memory: zeroing it first cost a memset of every layer's
    // weights in every streamed pass (~2% of a GPT-2 `eap attribute`, profiled).
    let mut out: Vec<f32> = Vec::with_capacity(n);
    const BLOCK: usize = 1 << 16;
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(k, o)| {
            let block = &bytes[k * BLOCK * size..(k * BLOCK + o.len()) * size];
            for (j, x) in o.iter_mut().enumerate() {
                x.write(decode(block, j));
            }
        });
    // SAFETY: the chunks cover the first `n` slots and every one was written above.
    unsafe { out.set_len(n) };
    out
}

/// `[batch, rows, cols]` stored bytes as f32 `[batch, cols, rows]`. Written by hand because
/// candle's strided copy moves one element at a time through index arithmetic, on one thread
/// (43% of loading Llama-3.1-8B's shape, measured). Cache-blocked: each task owns 64 output
/// rows (64 source columns); for each block of 64 source rows it writes 64 contiguous values
/// into each output row, reading the block's 64 source lines from L1 (4 ns per element for a
/// row-at-a-time walk, 1.2 ns blocked, on a 2-core EPYC).
fn transpose_f32(
    dtype: safetensors::Dtype,
    bytes: &[u8],
    batch: usize,
    rows: usize,
    cols: usize,
) -> Vec<f32> {
    // One copy of the loop per stored dtype, so the inner loop has no branch.
    match dtype {
        safetensors::Dtype::BF16 => transpose_with(batch, rows, cols, |i| {
            decode_at(safetensors::Dtype::BF16, bytes, i)
        }),
        safetensors::Dtype::F16 => transpose_with(batch, rows, cols, |i| {
            decode_at(safetensors::Dtype::F16, bytes, i)
        }),
        _ => transpose_with(batch, rows, cols, |i| {
            decode_at(safetensors::Dtype::F32, bytes, i)
        }),
    }
}

/// A row-major `[rows, cols]` f32 matrix transposed to `[cols, rows]`, with [`transpose_f32`]'s
/// blocking.
pub(super) fn transpose_values(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    transpose_with(1, rows, cols, |i| values[i])
}

/// `[batch, rows, cols]` values (element `i` is `value(i)`) as `[batch, cols, rows]`.
fn transpose_with(
    batch: usize,
    rows: usize,
    cols: usize,
    value: impl Fn(usize) -> f32 + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    const TILE: usize = 64;
    const ROW_BLOCK: usize = 64;
    let len = batch * rows * cols;
    // Uninitialised, as in `decode_with`: every element is written below.
    let mut out: Vec<f32> = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(rows * cols)
        .enumerate()
        .for_each(|(b, ob)| {
            let src = b * rows * cols;
            ob.par_chunks_mut(rows * TILE)
                .enumerate()
                .for_each(|(k, tile)| {
                    let c0 = k * TILE;
                    let width = tile.len() / rows;
                    for r0 in (0..rows).step_by(ROW_BLOCK) {
                        let n = ROW_BLOCK.min(rows - r0);
                        for j in 0..width {
                            let first = src + r0 * cols + c0 + j;
                            let o = &mut tile[j * rows + r0..j * rows + r0 + n];
                            for (i, x) in o.iter_mut().enumerate() {
                                x.write(value(first + i * cols));
                            }
                        }
                    }
                });
        });
    // SAFETY: the tiles cover all `len` slots, each written once above.
    unsafe { out.set_len(len) };
    out
}

/// Turns the safetensors crate's terse header errors ("header too small", "incomplete metadata")
/// into messages that say what is wrong with the file: its size, the declared header length,
/// the number of data bytes the header promises.
fn describe_header_error(bytes: &[u8], e: safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    let len = bytes.len();
    let declared = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    match (e, declared) {
        (E::HeaderTooSmall, _) => format!(
            "the file is {len} bytes, too short for the 8-byte header length (empty or truncated?)"
        ),
        (E::HeaderTooLarge, Some(n)) => format!(
            "the header length field reads {n} bytes, over the 100 MB limit (not a safetensors \
             file?)"
        ),
        (E::InvalidHeaderLength, Some(n)) => format!(
            "the header length field reads {n} bytes but the file holds only {} bytes after it \
             (truncated, or not a safetensors file?)",
            len.saturating_sub(8)
        ),
        (E::MetadataIncompleteBuffer, Some(n)) => {
            // The header parsed; its tensors end elsewhere than the file does.
            let n = n as usize;
            let data_len = len.saturating_sub(8 + n);
            let end = bytes
                .get(8..8 + n)
                .and_then(|h| serde_json::from_slice::<serde_json::Value>(h).ok())
                .and_then(|v| {
                    v.as_object().map(|o| {
                        o.iter()
                            .filter(|(k, _)| *k != "__metadata__")
                            .filter_map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64())
                            .max()
                            .unwrap_or(0)
                    })
                });
            match end {
                Some(end) if (end as usize) > data_len => format!(
                    "the header describes {end} data bytes but the file holds only {data_len} \
                     (truncated?)"
                ),
                Some(end) => format!(
                    "the header describes {end} data bytes but the file holds {data_len} \
                     (trailing bytes?)"
                ),
                None => "the tensors do not cover the file".to_string(),
            }
        }
        (e, _) => e.to_string(),
    }
}

/// One weight file: safetensors, or a PyTorch state dict ([`PthFile`]).
pub enum TensorFile {
    Safetensors(SafetensorsFile),
    Pth(PthFile),
}

impl TensorFile {
    pub fn path(&self) -> &Path {
        match self {
            TensorFile::Safetensors(f) => f.path(),
            TensorFile::Pth(f) => f.path(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            TensorFile::Safetensors(f) => f.contains(name),
            TensorFile::Pth(f) => f.contains(name),
        }
    }

    pub fn names(&self) -> Vec<String> {
        match self {
            TensorFile::Safetensors(f) => f.names(),
            TensorFile::Pth(f) => f.names(),
        }
    }

    pub fn load(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        match self {
            TensorFile::Safetensors(f) => f.load(name, shape, device),
            TensorFile::Pth(f) => f.load(name, shape, device),
        }
    }

    /// [`SafetensorsFile::load_as`]; a `.pth` state dict (small TransformerLens models) is
    /// loaded whole and rearranged with tensor operations.
    pub fn load_as(
        &self,
        name: &str,
        shape: &[usize],
        transpose: Transpose,
        device: &Device,
    ) -> Result<Tensor> {
        match (self, transpose) {
            (TensorFile::Safetensors(f), _) => f.load_as(name, shape, transpose, device),
            (TensorFile::Pth(f), Transpose::No) => f.load(name, shape, device),
            (TensorFile::Pth(f), Transpose::Rows { batch }) => {
                let (rows, cols, out) = transposed_shape(name, shape, batch)?;
                let t = f.load(name, shape, device)?;
                Ok(t.reshape((batch, rows, cols))?
                    .transpose(1, 2)?
                    .contiguous()?
                    .reshape(out)?)
            }
        }
    }

    /// [`SafetensorsFile::check_as`] (a `.pth` tensor is loaded: such files are small).
    pub fn check_as(
        &self,
        name: &str,
        shape: &[usize],
        transpose: Transpose,
        device: &Device,
    ) -> Result<Tensor> {
        match self {
            TensorFile::Safetensors(f) => f.check_as(name, shape, transpose, device),
            TensorFile::Pth(_) => self.load_as(name, shape, transpose, device),
        }
    }

    /// [`SafetensorsFile::load_rows`].
    pub fn load_rows(
        &self,
        name: &str,
        shape: &[usize],
        ids: &mut dyn Iterator<Item = usize>,
        device: &Device,
    ) -> Result<Tensor> {
        match self {
            TensorFile::Safetensors(f) => f.load_rows(name, shape, ids, device),
            TensorFile::Pth(f) => {
                let ids: Vec<u32> = ids.map(|i| i as u32).collect();
                let all = f.load(name, shape, device)?;
                let n = ids.len();
                Ok(all.index_select(&Tensor::from_vec(ids, n, device)?, 0)?)
            }
        }
    }
}

/// The weight files of one checkpoint — a single `model.safetensors`, the shards a
/// `model.safetensors.index.json` names, or one PyTorch `.pth` state dict — each
/// memory-mapped once, and the file each tensor lives in.
pub struct Checkpoint {
    files: Vec<TensorFile>,
    /// Tensor name → index into `files`.
    location: HashMap<String, usize>,
    /// Named in errors about a tensor no file holds: the single file, or the index.
    path: PathBuf,
}

impl Checkpoint {
    /// The weight files of a model directory: `model.safetensors`, else the shards that
    /// `model.safetensors.index.json` names, else the one `*.pth` / `*.pt` state dict
    /// (TransformerLens names, as InterpBench's `ll_model.pth`).
    pub fn discover(dir: &Path) -> Result<Checkpoint> {
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Checkpoint::open(&single);
        }
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            return Checkpoint::sharded(&index);
        }
        // A Hugging Face PyTorch checkpoint (pytorch_model.bin, often beside the trainer's
        // optimizer.pt and rng_state.pth) gets the conversion hint below, not a .pth search.
        let hf_bin = dir.join("pytorch_model.bin").exists()
            || dir.join("pytorch_model.bin.index.json").exists();
        if let Some(pth) = (!hf_bin).then(|| find_pth(dir)).transpose()?.flatten() {
            let file = PthFile::open(&pth)?;
            let location = file.names().into_iter().map(|n| (n, 0)).collect();
            return Ok(Checkpoint {
                path: pth,
                files: vec![TensorFile::Pth(file)],
                location,
            });
        }
        let hint = if dir.join("pytorch_model.bin").exists() {
            "only pytorch_model.bin is present; convert it with `python -c \"import torch; \
             from safetensors.torch import save_file; sd = torch.load('pytorch_model.bin'); \
             save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')\"`"
        } else if dir.join("pytorch_model.bin.index.json").exists() {
            "only PyTorch shards (pytorch_model.bin.index.json) are present; convert them with \
             transformers: `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, \
             safe_serialization=True)`"
        } else {
            "expected model.safetensors beside config.json (or a sharded checkpoint: \
             model.safetensors.index.json and the shards it names, or a TransformerLens \
             state dict saved with torch.save as *.pth)"
        };
        Err(Error::Config {
            path: single,
            message: hint.into(),
        })
    }

    /// One file.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let file = SafetensorsFile::open(path)?;
        let location = file.names().into_iter().map(|n| (n, 0)).collect();
        Ok(Checkpoint {
            path: path.to_path_buf(),
            files: vec![TensorFile::Safetensors(file)],
            location,
        })
    }

    /// The shards a `model.safetensors.index.json` names (its `weight_map`: tensor name →
    /// shard file, relative to the index's directory). Each shard is opened once; a tensor a
    /// shard holds but the index does not list is still found (transformers reads whole
    /// shards too).
    pub fn sharded(index: &Path) -> Result<Checkpoint> {
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let value = super::config::parse_json_unique(&text).map_err(|e| Error::Parse {
            path: index.to_path_buf(),
            line: Some(e.line()),
            message: e.to_string(),
        })?;
        let bad = |message: String| Error::Parse {
            path: index.to_path_buf(),
            line: None,
            message,
        };
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                bad(
                    "expected an object with a `weight_map` object (tensor name → shard file)"
                        .into(),
                )
            })?;
        if map.is_empty() {
            return Err(bad("`weight_map` names no tensors".into()));
        }
        let dir = index.parent().unwrap_or(Path::new("."));
        // Shard file names in sorted order, so that lookups do not depend on the JSON's order.
        let mut shards: Vec<&str> = Vec::new();
        for (tensor, shard) in map {
            let shard = shard.as_str().ok_or_else(|| {
                bad(format!(
                    "`weight_map` entry `{tensor}` must be a shard file name, found {shard}"
                ))
            })?;
            let plain = Path::new(shard)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if shard.is_empty() || !plain {
                return Err(bad(format!(
                    "`weight_map` entry `{tensor}` names shard {shard:?}, which is not a file \
                     name inside the model directory"
                )));
            }
            shards.push(shard);
        }
        shards.sort_unstable();
        shards.dedup();
        let index_name = index.file_name().map_or_else(
            || index.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        let mut files = Vec::with_capacity(shards.len());
        for shard in &shards {
            let path = dir.join(shard);
            if !path.is_file() {
                let placed: Vec<&String> = map
                    .iter()
                    .filter(|(_, s)| s.as_str() == Some(shard))
                    .map(|(t, _)| t)
                    .collect();
                return Err(Error::Config {
                    path,
                    message: format!(
                        "no such shard, but {index_name} places {} tensor(s) in it (e.g. `{}`)",
                        placed.len(),
                        placed[0]
                    ),
                });
            }
            files.push(TensorFile::Safetensors(SafetensorsFile::open(&path)?));
        }
        let mut location = HashMap::new();
        for (i, file) in files.iter().enumerate() {
            for name in file.names() {
                location.entry(name).or_insert(i);
            }
        }
        for (tensor, shard) in map {
            let i = shards
                .binary_search(&shard.as_str().expect("checked above"))
                .expect("every shard is listed");
            if !files[i].contains(tensor) {
                return Err(Error::Config {
                    path: files[i].path().to_path_buf(),
                    message: format!(
                        "tensor `{tensor}` is missing, although {index_name} places it in this \
                         shard"
                    ),
                });
            }
            location.insert(tensor.clone(), i);
        }
        Ok(Checkpoint {
            files,
            location,
            path: index.to_path_buf(),
        })
    }

    /// The single file, or the index of a sharded checkpoint.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// Every tensor name in the checkpoint's files.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    /// The file holding tensor `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.location.get(name).map(|&i| self.files[i].path())
    }

    /// Loads tensor `name` from the file holding it, checks its shape and converts it to f32
    /// on `device`.
    pub fn load(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        self.load_as(name, shape, Transpose::No, false, device)
    }

    /// [`SafetensorsFile::load_rows`] from the file holding `name`.
    pub fn load_rows(
        &self,
        name: &str,
        shape: &[usize],
        ids: &mut dyn Iterator<Item = usize>,
        device: &Device,
    ) -> Result<Tensor> {
        self.holding(name)?.load_rows(name, shape, ids, device)
    }

    /// The file holding `name`.
    fn holding(&self, name: &str) -> Result<&TensorFile> {
        match self.location.get(name) {
            Some(&i) => Ok(&self.files[i]),
            None => Err(Error::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            }),
        }
    }

    /// [`SafetensorsFile::load_bf16`] from the file holding `name`; `None` for a `.pth` file.
    pub fn load_bf16(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<Option<Tensor>> {
        match self.holding(name)? {
            TensorFile::Safetensors(f) => f.load_bf16(name, shape, device),
            TensorFile::Pth(_) => Ok(None),
        }
    }

    /// [`SafetensorsFile::load_as`] from the file holding `name`, or only its checks
    /// ([`SafetensorsFile::check_as`]) when `check_only`.
    pub fn load_as(
        &self,
        name: &str,
        shape: &[usize],
        transpose: Transpose,
        check_only: bool,
        device: &Device,
    ) -> Result<Tensor> {
        let file = self.holding(name)?;
        match check_only {
            true => file.check_as(name, shape, transpose, device),
            false => file.load_as(name, shape, transpose, device),
        }
    }
}

/// The one PyTorch state dict (`*.pth`, `*.pt`) in `dir`, if any; several are an error, since
/// which one is the model cannot be guessed.
fn find_pth(dir: &Path) -> Result<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|x| x.eq_ignore_ascii_case("pth") || x.eq_ignore_ascii_case("pt"))
        })
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(Error::Config {
            path: dir.to_path_buf(),
            message: format!(
                "several PyTorch state dicts ({}); keep the model's one in the directory",
                found
                    .iter()
                    .filter_map(|p| p.file_name())
                    .map(|n| n.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// Buffers that checkpoints saved by older transformers or TransformerLens carry beside the
/// parameters (causal masks, rotary frequency tables): derived from the configuration, never
/// read.
const BUFFERS: [&str; 7] = [
    "rotary_emb.inv_freq",
    "attention.bias",
    "attention.masked_bias",
    "attn.bias",
    "attn.masked_bias",
    "attn.IGNORE",
    "attn.mask",
];

fn is_buffer(name: &str) -> bool {
    BUFFERS.iter().any(|b| {
        name.strip_suffix(b)
            .is_some_and(|rest| rest.is_empty() || rest.ends_with('.'))
    })
}

/// The layer index in a tensor name such as `model.layers.5.mlp.up_proj.weight`,
/// `transformer.h.5.ln_1.weight` or `blocks.5.attn.W_Q`.
fn layer_of(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts
        .windows(2)
        .find(|w| matches!(w[0], "layers" | "h" | "blocks"))
        .and_then(|w| w[1].parse().ok())
}

/// The two ways an MLP matrix is read ([`WeightLoader::mlp_matrix`]).
const NO: Transpose = Transpose::No;
const ROWS: Transpose = Transpose::Rows { batch: 1 };

/// Knows the tensor names and layouts of one checkpoint format and loads layers from it.
pub struct WeightLoader {
    ckpt: Checkpoint,
    format: WeightFormat,
    /// `transformer.` when a HF checkpoint was saved from `GPT2LMHeadModel`.
    prefix: String,
    cfg: ModelConfig,
    layout: CheckpointLayout,
    device: Device,
    /// The tensor names read so far, until [`check_all_used`](Self::check_all_used) ends the
    /// bookkeeping (streamed models re-read layers afterwards).
    used: Mutex<Option<HashSet<String>>>,
    /// Reads check names, shapes and dtypes and return zeros instead of the data
    /// ([`check_layer`](Self::check_layer)).
    check_only: std::sync::atomic::AtomicBool,
}

impl WeightLoader {
    pub fn new(
        ckpt: Checkpoint,
        cfg: &ModelConfig,
        layout: CheckpointLayout,
        device: &Device,
    ) -> Result<WeightLoader> {
        // Decided from every name, not from `transformer.wte.weight` alone, so a file missing
        // that tensor is reported as missing `transformer.wte.weight`, not `wte.weight`.
        let prefix = match cfg.format {
            WeightFormat::HfGpt2 if ckpt.names().any(|n| n.starts_with("transformer.")) => {
                "transformer.".to_string()
            }
            _ => String::new(),
        };
        Ok(WeightLoader {
            ckpt,
            format: cfg.format,
            prefix,
            cfg: cfg.clone(),
            layout,
            device: device.clone(),
            used: Mutex::new(Some(HashSet::new())),
            check_only: false.into(),
        })
    }

    pub fn path(&self) -> &Path {
        self.ckpt.path()
    }

    /// Counts tensor `full_name` (without the prefix) as explained by the configuration
    /// without reading it (a tied `lm_head.weight`, which transformers ignores too).
    fn mark(&self, full_name: &str) {
        if let Some(used) = self.used.lock().expect("not poisoned").as_mut() {
            used.insert(full_name.to_string());
        }
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, Transpose::No)
    }

    fn get_as(&self, name: &str, shape: &[usize], transpose: Transpose) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        self.mark(&full);
        let check_only = self.check_only.load(std::sync::atomic::Ordering::Relaxed);
        let t = self
            .ckpt
            .load_as(&full, shape, transpose, check_only, &self.device)?;
        match check_only {
            // A layer's check builds the layer from zeros: contiguous ones, on which its
            // reshapes and transposes are views, where copying the check's broadcast zeros into
            // every layout took 90 ms of GPT-2's twelve checks (25-40 ms this way: the allocator
            // clears a layer's worth of memory, reused layer after layer).
            true => Ok(Tensor::zeros(t.dims(), DType::F32, &self.device)?),
            false => Ok(t),
        }
    }

    /// An MLP matrix as [`get_as`](Self::get_as) decodes it to f32 (`Transpose::Rows` transposes
    /// while decoding; callers take GPT-2's `Conv1D` and TransformerLens' `W_in` as a transposed
    /// view of that, Hugging Face `Linear` weights as a view of their stored layout: the layouts
    /// `block::Mlp::new` keeps). With `stored_bf16` and a bf16 checkpoint it is instead a bf16
    /// copy of the stored data, `Transpose::Rows` becoming a transposed view: bf16 products pack
    /// it as it is, and it is never converted to f32.
    fn mlp_matrix(
        &self,
        stored_bf16: bool,
        name: &str,
        shape: &[usize],
        transpose: Transpose,
    ) -> Result<Tensor> {
        let check_only = self.check_only.load(std::sync::atomic::Ordering::Relaxed);
        if stored_bf16
            && !check_only
            && matches!(transpose, Transpose::No | Transpose::Rows { batch: 1 })
        {
            let full = format!("{}{name}", self.prefix);
            if let Some(t) = self.ckpt.load_bf16(&full, shape, &self.device)? {
                self.mark(&full);
                return match transpose {
                    Transpose::No => Ok(t),
                    Transpose::Rows { .. } => Ok(t.t()?),
                };
            }
        }
        self.get_as(name, shape, transpose)
    }

    fn get_opt(&self, on: bool, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        on.then(|| self.get(name, shape)).transpose()
    }

    /// A Hugging Face `Linear` weight (`[out, in]`) as `[in, out]`, for `x · W`.
    fn linear_t(&self, name: &str, out: usize, inp: usize) -> Result<Tensor> {
        self.get_as(name, &[out, inp], Transpose::Rows { batch: 1 })
    }

    /// A Hugging Face projection onto `heads` heads (`[heads·d_head, d]`) as eap's per-head
    /// `[heads, d, d_head]`.
    fn heads_in(&self, name: &str, heads: usize) -> Result<Tensor> {
        let (d, dh) = (self.cfg.d_model, self.cfg.d_head);
        let w = self.get_as(name, &[heads * dh, d], Transpose::Rows { batch: heads })?;
        // One head: [d, d_head] already.
        Ok(w.reshape((heads, d, dh))?)
    }

    /// A Hugging Face output projection (`[d, n_heads·d_head]`) as eap's `[n_heads, d_head, d]`.
    fn heads_out(&self, name: &str) -> Result<Tensor> {
        let (d, h, dh) = (self.cfg.d_model, self.cfg.n_heads, self.cfg.d_head);
        Ok(self
            .get_as(name, &[d, h * dh], Transpose::Rows { batch: 1 })?
            .reshape((h, dh, d))?)
    }

    /// A per-head bias (`[heads·d_head]`) as `[heads, d_head]`, when the layout has one.
    fn head_bias(&self, on: bool, name: &str, heads: usize) -> Result<Option<Tensor>> {
        let dh = self.cfg.d_head;
        self.get_opt(on, name, &[heads * dh])?
            .map(|b| b.reshape((heads, dh)))
            .transpose()
            .map_err(Error::from)
    }

    fn norm(&self, w: &str, b: &str) -> Result<Option<NormWeights>> {
        let d = self.cfg.d_model;
        // Gemma's RMSNorm multiplies by (1 + w): the offset is added once, here.
        let gain = |name: &str| -> Result<Tensor> {
            let w = self.get(name, &[d])?;
            let offset = self.layout.norm_gain_offset;
            if offset == 0.0 {
                Ok(w)
            } else {
                Ok((w + offset as f64)?)
            }
        };
        match self.cfg.norm {
            Norm::LayerNorm => Ok(Some(NormWeights {
                w: gain(w)?,
                b: Some(self.get(b, &[d])?),
            })),
            Norm::RmsNorm => Ok(Some(NormWeights {
                w: gain(w)?,
                b: None,
            })),
            Norm::LayerNormPre | Norm::None => Ok(None),
        }
    }

    /// A Hugging Face norm module `stem` (`{stem}.weight`, and `{stem}.bias` for LayerNorm).
    fn hf_norm(&self, stem: &str) -> Result<Option<NormWeights>> {
        self.norm(&format!("{stem}.weight"), &format!("{stem}.bias"))
    }

    /// The unembedding `[d, d_vocab]` from a Hugging Face head stored as `[d_vocab, d]`
    /// (`names`: the head's names, the first one present wins), or the embedding's transposed
    /// view when tied (a view, not a copy: the unembedding reads it as `[d_vocab, d]` rows).
    fn hf_unembed(&self, w_e: &Tensor, names: &[&str]) -> Result<Tensor> {
        if self.layout.tied_embeddings {
            for name in names {
                self.mark(name);
            }
            return Ok(w_e.t()?);
        }
        let name = names
            .iter()
            .find(|n| self.ckpt.contains(n))
            .unwrap_or(&names[0]);
        self.linear_t(name, self.cfg.d_vocab_out, self.cfg.d_model)
    }
    /// The stored names of the embedding and unembedding matrices, both `[d_vocab, d]` rows per
    /// token, when the format stores them so (Hugging Face Llama and NeoX layouts; the same
    /// name twice when tied): then a streamed model reads only the rows it needs.
    fn vocab_names(&self) -> Option<(String, String)> {
        let (embed, heads): (&str, &[&str]) = match self.format {
            // GPT-2 always ties its unembedding to `wte`.
            WeightFormat::HfGpt2 => ("wte.weight", &["wte.weight"]),
            WeightFormat::HfLlama => ("model.embed_tokens.weight", &["lm_head.weight"]),
            WeightFormat::HfNeox => (
                "gpt_neox.embed_in.weight",
                &["embed_out.weight", "lm_head.weight"],
            ),
            _ => return None,
        };
        if self.cfg.d_vocab_out != self.cfg.d_vocab {
            return None;
        }
        let unembed = match self.layout.tied_embeddings || self.format == WeightFormat::HfGpt2 {
            true => embed,
            false => heads
                .iter()
                .find(|n| self.ckpt.contains(n))
                .unwrap_or(&heads[0]),
        };
        // GPT-2's `wte` sits under the loader's prefix (`transformer.`, in `GPT2LMHeadModel`).
        let full = |n: &str| match self.format {
            WeightFormat::HfGpt2 => format!("{}{n}", self.prefix),
            _ => n.to_string(),
        };
        Some((full(embed), full(unembed)))
    }

    /// Whether [`embed_mapped`](Self::embed_mapped) applies to this checkpoint.
    pub fn can_map_vocab(&self) -> bool {
        self.vocab_names().is_some()
    }

    /// The embedding weights without the two vocabulary matrices (empty placeholders), whose
    /// rows [`vocab_rows`](Self::vocab_rows) reads on demand; checks the matrices' shapes.
    pub fn embed_mapped(&self) -> Result<EmbedWeights> {
        let (embed, unembed) = self
            .vocab_names()
            .ok_or_else(|| Error::invalid("this checkpoint's vocabulary cannot be mapped"))?;
        let (d, v) = (self.cfg.d_model, self.cfg.d_vocab);
        for name in [&embed, &unembed] {
            self.mark(name);
            self.ckpt
                .load_as(name, &[v, d], Transpose::No, true, &self.device)?;
        }
        if self.layout.tied_embeddings || self.format == WeightFormat::HfGpt2 {
            for name in ["lm_head.weight", "embed_out.weight"] {
                self.mark(name);
            }
        }
        let empty = Tensor::zeros((0, d), DType::F32, &self.device)?;
        let (ln_final, w_pos) = match self.format {
            WeightFormat::HfNeox => (self.hf_norm("gpt_neox.final_layer_norm")?, None),
            WeightFormat::HfGpt2 => (
                self.norm("ln_f.weight", "ln_f.bias")?,
                Some(self.get("wpe.weight", &[self.cfg.n_ctx, d])?),
            ),
            _ => (self.hf_norm("model.norm")?, None),
        };
        Ok(EmbedWeights {
            w_e: empty.clone(),
            w_pos,
            ln_final,
            w_u: empty.t()?,
            b_u: None,
        })
    }

    /// Rows `ids` of the embedding (`unembed` false) or the unembedding as f32 `[n, d]`.
    pub fn vocab_rows(
        &self,
        unembed: bool,
        ids: &mut dyn Iterator<Item = usize>,
    ) -> Result<Tensor> {
        let (embed, head) = self
            .vocab_names()
            .ok_or_else(|| Error::invalid("this checkpoint's vocabulary cannot be mapped"))?;
        let (d, v) = (self.cfg.d_model, self.cfg.d_vocab);
        let name = if unembed { head } else { embed };
        self.ckpt.load_rows(&name, &[v, d], ids, &self.device)
    }

    pub fn embed(&self) -> Result<EmbedWeights> {
        let c = &self.cfg;
        let (d, v) = (c.d_model, c.d_vocab);
        match self.format {
            WeightFormat::HfGpt2 => {
                let w_e = self.get("wte.weight", &[v, d])?;
                // GPT-2 ties the unembedding to the embedding; a separate lm_head, if saved, is
                // the same matrix.
                self.mark("lm_head.weight");
                let w_u = w_e.t()?;
                Ok(EmbedWeights {
                    w_e,
                    w_pos: Some(self.get("wpe.weight", &[c.n_ctx, d])?),
                    ln_final: self.norm("ln_f.weight", "ln_f.bias")?,
                    w_u,
                    b_u: None,
                })
            }
            WeightFormat::TransformerLens => Ok(EmbedWeights {
                w_e: self.get("embed.W_E", &[v, d])?,
                w_pos: Some(self.get("pos_embed.W_pos", &[c.n_ctx, d])?),
                ln_final: self.norm("ln_final.w", "ln_final.b")?,
                w_u: self.get("unembed.W_U", &[d, c.d_vocab_out])?,
                b_u: if self.ckpt.contains("unembed.b_U") {
                    Some(self.get("unembed.b_U", &[c.d_vocab_out])?)
                } else {
                    None
                },
            }),
            WeightFormat::HfLlama => {
                let w_e = self.get("model.embed_tokens.weight", &[v, d])?;
                Ok(EmbedWeights {
                    w_u: self.hf_unembed(&w_e, &["lm_head.weight"])?,
                    w_e,
                    w_pos: None,
                    ln_final: self.hf_norm("model.norm")?,
                    b_u: None,
                })
            }
            WeightFormat::HfNeox => {
                let w_e = self.get("gpt_neox.embed_in.weight", &[v, d])?;
                Ok(EmbedWeights {
                    // The hub's name; checkpoints written under the name transformers 5 uses
                    // internally are read too.
                    w_u: self.hf_unembed(&w_e, &["embed_out.weight", "lm_head.weight"])?,
                    w_e,
                    w_pos: None,
                    ln_final: self.hf_norm("gpt_neox.final_layer_norm")?,
                    b_u: None,
                })
            }
            WeightFormat::InMemory => unreachable!("in-memory models are not loaded from files"),
        }
    }

    /// Checks layer `i`'s tensors (names, shapes, dtypes, and that the layer can be built)
    /// without reading their data, counting them as used.
    pub fn check_layer(&self, i: usize) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        self.check_only.store(true, Relaxed);
        let checked = self.layer(i).map(drop);
        self.check_only.store(false, Relaxed);
        checked
    }

    pub fn layer(&self, i: usize) -> Result<Block> {
        self.layer_with(i, false)
    }

    /// Layer `i`; with `stored_bf16` its MLP matrices stay in bf16 as a bf16 checkpoint stores
    /// them ([`Self::mlp_matrix`]), for a layer whose products are bf16.
    pub fn layer_with(&self, i: usize, stored_bf16: bool) -> Result<Block> {
        let bf = stored_bf16;
        let c = &self.cfg;
        let (d, h, dh) = (c.d_model, c.n_heads, c.d_head);
        match self.format {
            WeightFormat::HfGpt2 => {
                let p = |s: &str| format!("h.{i}.{s}");
                let c_attn = self.get(&p("attn.c_attn.weight"), &[d, 3 * d])?;
                let c_attn_b = self.get(&p("attn.c_attn.bias"), &[3 * d])?;
                // Conv1D computes x @ W: columns [0, d) are the queries of all heads, head h in
                // columns [h*dh, (h+1)*dh); then keys, then values: eap's fused layout, which
                // the layer keeps as it is. The letters are views of it.
                let by_letter = c_attn.reshape((d, 3, h, dh))?;
                let letter = |k: usize| -> Result<Tensor> {
                    Ok(by_letter.narrow(1, k, 1)?.squeeze(1)?.permute((1, 0, 2))?)
                };
                let wo = self.get(&p("attn.c_proj.weight"), &[d, d])?;
                let d_mlp = c.d_mlp.expect("GPT-2 has MLPs");
                let bias = |k: usize| c_attn_b.narrow(0, k * d, d)?.reshape((h, dh));
                let attn = AttentionWeights {
                    norm: self.norm(&p("ln_1.weight"), &p("ln_1.bias"))?,
                    w_q: letter(0)?,
                    w_k: letter(1)?,
                    w_v: letter(2)?,
                    b_q: Some(bias(0)?),
                    b_k: Some(bias(1)?),
                    b_v: Some(bias(2)?),
                    w_o: wo.reshape((h, dh, d))?,
                    b_o: Some(self.get(&p("attn.c_proj.bias"), &[d])?),
                    post_norm: None,
                    fused_qkv: Some(c_attn),
                };
                let mlp = MlpWeights {
                    norm: self.norm(&p("ln_2.weight"), &p("ln_2.bias"))?,
                    w_gate: None,
                    post_norm: None,
                    w_in: self
                        .mlp_matrix(bf, &p("mlp.c_fc.weight"), &[d, d_mlp], ROWS)?
                        .t()?,
                    b_in: Some(self.get(&p("mlp.c_fc.bias"), &[d_mlp])?),
                    w_out: self.mlp_matrix(bf, &p("mlp.c_proj.weight"), &[d_mlp, d], NO)?,
                    b_out: Some(self.get(&p("mlp.c_proj.bias"), &[d])?),
                };
                Block::new(c, attn, Some(mlp))
            }
            WeightFormat::TransformerLens => {
                let p = |s: &str| format!("blocks.{i}.{s}");
                let mlp = match c.d_mlp {
                    Some(m) => Some(MlpWeights {
                        norm: None,
                        w_gate: None,
                        post_norm: None,
                        w_in: self.mlp_matrix(bf, &p("mlp.W_in"), &[d, m], ROWS)?.t()?,
                        b_in: Some(self.get(&p("mlp.b_in"), &[m])?),
                        w_out: self.mlp_matrix(bf, &p("mlp.W_out"), &[m, d], NO)?,
                        b_out: Some(self.get(&p("mlp.b_out"), &[d])?),
                    }),
                    None => None,
                };
                let ln2 = if mlp.is_some() {
                    self.norm(&p("ln2.w"), &p("ln2.b"))?
                } else {
                    None
                };
                Block::from_heads(
                    c,
                    self.norm(&p("ln1.w"), &p("ln1.b"))?,
                    self.get(&p("attn.W_Q"), &[h, d, dh])?,
                    self.get(&p("attn.W_K"), &[h, d, dh])?,
                    self.get(&p("attn.W_V"), &[h, d, dh])?,
                    self.get(&p("attn.b_Q"), &[h, dh])?,
                    self.get(&p("attn.b_K"), &[h, dh])?,
                    self.get(&p("attn.b_V"), &[h, dh])?,
                    self.get(&p("attn.W_O"), &[h, dh, d])?,
                    self.get(&p("attn.b_O"), &[d])?,
                    ln2,
                    mlp,
                )
            }
            WeightFormat::HfLlama => {
                let p = |s: &str| format!("model.layers.{i}.self_attn.{s}");
                let n = |s: &str| format!("model.layers.{i}.{s}");
                let (kv, l) = (c.n_kv_heads, &self.layout);
                let m = c.d_mlp.expect("Llama-family models have MLPs");
                // Gemma-2 normalises each sublayer's output too: `post_attention_layernorm` is
                // then attention's output norm and `pre_feedforward_layernorm` the MLP's input
                // norm; elsewhere `post_attention_layernorm` is the MLP's input norm.
                let post = c.post_norms;
                let attn = AttentionWeights {
                    norm: self.hf_norm(&n("input_layernorm"))?,
                    w_q: self.heads_in(&p("q_proj.weight"), h)?,
                    w_k: self.heads_in(&p("k_proj.weight"), kv)?,
                    w_v: self.heads_in(&p("v_proj.weight"), kv)?,
                    b_q: self.head_bias(l.qkv_bias, &p("q_proj.bias"), h)?,
                    b_k: self.head_bias(l.qkv_bias, &p("k_proj.bias"), kv)?,
                    b_v: self.head_bias(l.qkv_bias, &p("v_proj.bias"), kv)?,
                    w_o: self.heads_out(&p("o_proj.weight"))?,
                    b_o: self.get_opt(l.o_bias, &p("o_proj.bias"), &[d])?,
                    post_norm: match post {
                        true => self.hf_norm(&n("post_attention_layernorm"))?,
                        false => None,
                    },
                    fused_qkv: None,
                };
                let mlp = MlpWeights {
                    norm: self.hf_norm(&n(match post {
                        true => "pre_feedforward_layernorm",
                        false => "post_attention_layernorm",
                    }))?,
                    w_in: self
                        .mlp_matrix(bf, &n("mlp.up_proj.weight"), &[m, d], NO)?
                        .t()?,
                    b_in: None,
                    w_gate: Some(
                        self.mlp_matrix(bf, &n("mlp.gate_proj.weight"), &[m, d], NO)?
                            .t()?,
                    ),
                    w_out: self.mlp_matrix(bf, &n("mlp.down_proj.weight"), &[d, m], ROWS)?,
                    b_out: None,
                    post_norm: match post {
                        true => self.hf_norm(&n("post_feedforward_layernorm"))?,
                        false => None,
                    },
                };
                Block::new(c, attn, Some(mlp))
            }
            WeightFormat::HfNeox => {
                let p = |s: &str| format!("gpt_neox.layers.{i}.{s}");
                let l = &self.layout;
                let m = c.d_mlp.expect("GPT-NeoX has MLPs");
                // modeling_gpt_neox.py views the fused output as [.., h, 3·dh] and chunks the
                // last axis: head H's query, key and value are rows H·3·dh + j·dh + e (j = 0,
                // 1, 2) of the [3d, d] weight.
                let qkv = self
                    .get(&p("attention.query_key_value.weight"), &[3 * d, d])?
                    .reshape((h, 3, dh, d))?;
                let w = |j: usize| -> Result<Tensor> {
                    Ok(qkv
                        .narrow(1, j, 1)?
                        .squeeze(1)?
                        .transpose(1, 2)?
                        .contiguous()?)
                };
                let qkv_b = self
                    .get_opt(l.qkv_bias, &p("attention.query_key_value.bias"), &[3 * d])?
                    .map(|b| b.reshape((h, 3, dh)))
                    .transpose()?;
                let b = |j: usize| -> Result<Option<Tensor>> {
                    qkv_b
                        .as_ref()
                        .map(|b| b.narrow(1, j, 1)?.squeeze(1)?.contiguous())
                        .transpose()
                        .map_err(Error::from)
                };
                let attn = AttentionWeights {
                    norm: self.hf_norm(&p("input_layernorm"))?,
                    w_q: w(0)?,
                    w_k: w(1)?,
                    w_v: w(2)?,
                    b_q: b(0)?,
                    b_k: b(1)?,
                    b_v: b(2)?,
                    w_o: self.heads_out(&p("attention.dense.weight"))?,
                    b_o: self.get_opt(l.o_bias, &p("attention.dense.bias"), &[d])?,
                    post_norm: None,
                    fused_qkv: None,
                };
                let mlp = MlpWeights {
                    // With the parallel residual the MLP applies this norm to the stream
                    // entering the layer; sequentially, to the stream after attention.
                    norm: self.hf_norm(&p("post_attention_layernorm"))?,
                    w_in: self
                        .mlp_matrix(bf, &p("mlp.dense_h_to_4h.weight"), &[m, d], NO)?
                        .t()?,
                    b_in: self.get_opt(l.mlp_bias, &p("mlp.dense_h_to_4h.bias"), &[m])?,
                    w_gate: None,
                    w_out: self.mlp_matrix(bf, &p("mlp.dense_4h_to_h.weight"), &[d, m], ROWS)?,
                    b_out: self.get_opt(l.mlp_bias, &p("mlp.dense_4h_to_h.bias"), &[d])?,
                    post_norm: None,
                };
                Block::new(c, attn, Some(mlp))
            }
            WeightFormat::InMemory => unreachable!("in-memory models are not loaded from files"),
        }
    }

    /// Checks that every tensor in the checkpoint is one the configuration explains (read by
    /// [`embed`](Self::embed) or [`layer`](Self::layer), a tied head, or a known buffer), and
    /// ends the bookkeeping. Call it once every layer has been loaded.
    pub fn check_all_used(&self) -> Result<()> {
        let Some(used) = self.used.lock().expect("not poisoned").take() else {
            return Ok(());
        };
        let mut unused: Vec<&str> = self
            .ckpt
            .names()
            .filter(|n| !used.contains(*n) && !is_buffer(n))
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        unused.sort_unstable();
        let first = unused[0];
        let layers = self.cfg.n_layers;
        let why = match layer_of(first) {
            Some(l) if l >= layers => format!(
                "it belongs to layer {l}, but the configuration has {layers} layer{}",
                if layers == 1 { "" } else { "s" }
            ),
            _ => "the configuration has no place for it (a norm, bias or projection it does \
                  not announce, or another architecture's weights)"
                .into(),
        };
        let more = match unused.len() {
            1 => String::new(),
            n => {
                let shown: Vec<String> = unused[1..n.min(4)]
                    .iter()
                    .map(|t| format!("`{t}`"))
                    .collect();
                format!(
                    "; {} more unused: {}{}",
                    n - 1,
                    shown.join(", "),
                    if n > 4 { ", …" } else { "" }
                )
            }
        };
        Err(Error::Config {
            path: self
                .ckpt
                .file_of(first)
                .unwrap_or(self.ckpt.path())
                .to_path_buf(),
            message: format!(
                "tensor `{first}` is not used by the model config.json describes: {why}{more}; \
                 the configuration does not match the weights"
            ),
        })
    }
}
