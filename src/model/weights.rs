//! Weights: memory-mapped safetensors files read in their stored dtype (f32, f16, bf16) and
//! converted to f32 one tensor at a time, laid out the way the forward pass wants them.
//!
//! Both Hugging Face GPT-2 checkpoints (`Conv1D` layout: `c_attn.weight [d, 3d]`, keys with or
//! without the `transformer.` prefix, tied unembedding) and TransformerLens state dicts
//! (`blocks.0.attn.W_Q [n_heads, d_model, d_head]`, …) map onto the same [`Block`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Metadata, SafeTensors};

use super::block::{Block, MlpWeights, NormWeights};
use super::config::{ModelConfig, Norm, WeightFormat};
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
        let bytes = &self.mmap
            [self.data_start + info.data_offsets.0..self.data_start + info.data_offsets.1];
        let t = candle_core::safetensors::Load::load(
            &safetensors::tensor::TensorView::new(info.dtype, info.shape.clone(), bytes).map_err(
                |e| Error::Safetensors {
                    path: self.path.clone(),
                    message: format!("tensor `{name}`: {e}"),
                },
            )?,
            device,
        )?;
        Ok(t.to_dtype(DType::F32)?)
    }
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

/// Knows the tensor names and layouts of one checkpoint format and loads layers from it.
pub struct WeightLoader {
    file: SafetensorsFile,
    format: WeightFormat,
    /// `transformer.` when a HF checkpoint was saved from `GPT2LMHeadModel`.
    prefix: String,
    cfg: ModelConfig,
    device: Device,
}

impl WeightLoader {
    pub fn new(file: SafetensorsFile, cfg: &ModelConfig, device: &Device) -> Result<WeightLoader> {
        // Decided from every name, not from `transformer.wte.weight` alone, so a file missing
        // that tensor is reported as missing `transformer.wte.weight`, not `wte.weight`.
        let prefix = match cfg.format {
            WeightFormat::HfGpt2 if file.names().iter().any(|n| n.starts_with("transformer.")) => {
                "transformer.".to_string()
            }
            _ => String::new(),
        };
        Ok(WeightLoader {
            file,
            format: cfg.format,
            prefix,
            cfg: cfg.clone(),
            device: device.clone(),
        })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.file
            .load(&format!("{}{name}", self.prefix), shape, &self.device)
    }

    fn norm(&self, w: &str, b: &str) -> Result<Option<NormWeights>> {
        let d = self.cfg.d_model;
        match self.cfg.norm {
            Norm::LayerNorm => Ok(Some(NormWeights {
                w: self.get(w, &[d])?,
                b: Some(self.get(b, &[d])?),
            })),
            Norm::RmsNorm => Ok(Some(NormWeights {
                w: self.get(w, &[d])?,
                b: None,
            })),
            Norm::LayerNormPre | Norm::None => Ok(None),
        }
    }

    pub fn embed(&self) -> Result<EmbedWeights> {
        let c = &self.cfg;
        let (d, v) = (c.d_model, c.d_vocab);
        match self.format {
            WeightFormat::HfGpt2 => {
                let w_e = self.get("wte.weight", &[v, d])?;
                // GPT-2 ties the unembedding to the embedding; a separate lm_head, if saved, is
                // the same matrix.
                let w_u = w_e.t()?.contiguous()?;
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
                b_u: if self.file.contains("unembed.b_U") {
                    Some(self.get("unembed.b_U", &[c.d_vocab_out])?)
                } else {
                    None
                },
            }),
            WeightFormat::HfLlama | WeightFormat::HfNeox => Err(Error::invalid(
                "Llama-family and GPT-NeoX checkpoints are not loaded yet",
            )),
            WeightFormat::InMemory => unreachable!("in-memory models are not loaded from files"),
        }
    }

    pub fn layer(&self, i: usize) -> Result<Block> {
        let c = &self.cfg;
        let (d, h, dh) = (c.d_model, c.n_heads, c.d_head);
        match self.format {
            WeightFormat::HfGpt2 => {
                let p = |s: &str| format!("h.{i}.{s}");
                let c_attn = self.get(&p("attn.c_attn.weight"), &[d, 3 * d])?;
                let c_attn_b = self.get(&p("attn.c_attn.bias"), &[3 * d])?;
                // Conv1D computes x @ W: columns [0, d) are the queries of all heads, head h in
                // columns [h*dh, (h+1)*dh); then keys, then values.
                let split = |k: usize| -> Result<Tensor> {
                    let w = c_attn.narrow(1, k * d, d)?.contiguous()?;
                    let heads = w.reshape((d, h, dh))?.permute((1, 0, 2))?.contiguous()?;
                    Ok(heads)
                };
                let wo = self.get(&p("attn.c_proj.weight"), &[d, d])?;
                let d_mlp = c.d_mlp.expect("GPT-2 has MLPs");
                let bias = |k: usize| c_attn_b.narrow(0, k * d, d)?.reshape((h, dh));
                Block::from_heads(
                    c,
                    self.norm(&p("ln_1.weight"), &p("ln_1.bias"))?,
                    split(0)?,
                    split(1)?,
                    split(2)?,
                    bias(0)?,
                    bias(1)?,
                    bias(2)?,
                    wo.reshape((h, dh, d))?,
                    self.get(&p("attn.c_proj.bias"), &[d])?,
                    self.norm(&p("ln_2.weight"), &p("ln_2.bias"))?,
                    Some(MlpWeights {
                        norm: None,
                        w_gate: None,
                        post_norm: None,
                        w_in: self.get(&p("mlp.c_fc.weight"), &[d, d_mlp])?,
                        b_in: Some(self.get(&p("mlp.c_fc.bias"), &[d_mlp])?),
                        w_out: self.get(&p("mlp.c_proj.weight"), &[d_mlp, d])?,
                        b_out: Some(self.get(&p("mlp.c_proj.bias"), &[d])?),
                    }),
                )
            }
            WeightFormat::TransformerLens => {
                let p = |s: &str| format!("blocks.{i}.{s}");
                let mlp = match c.d_mlp {
                    Some(m) => Some(MlpWeights {
                        norm: None,
                        w_gate: None,
                        post_norm: None,
                        w_in: self.get(&p("mlp.W_in"), &[d, m])?,
                        b_in: Some(self.get(&p("mlp.b_in"), &[m])?),
                        w_out: self.get(&p("mlp.W_out"), &[m, d])?,
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
            WeightFormat::HfLlama | WeightFormat::HfNeox => Err(Error::invalid(
                "Llama-family and GPT-NeoX checkpoints are not loaded yet",
            )),
            WeightFormat::InMemory => unreachable!("in-memory models are not loaded from files"),
        }
    }

    /// Unused tensor names are harmless (buffers such as `attn.bias` or `IGNORE`); this lists
    /// them for `--verbose` diagnostics.
    pub fn tensor_names(&self) -> HashMap<String, ()> {
        self.file.names().into_iter().map(|n| (n, ())).collect()
    }
}
