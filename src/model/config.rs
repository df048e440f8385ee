//! Model configuration: one internal [`ModelConfig`] read from either a Hugging Face GPT-2
//! `config.json` or a TransformerLens `HookedTransformerConfig` export.
//!
//! Every field that changes the computation is either implemented or rejected with
//! [`Error::Unsupported`]; nothing is silently ignored, because a silently wrong model gives
//! wrong circuits.

use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

/// Normalisation applied before attention, before the MLP and before the unembedding (and, with
/// [`ModelConfig::post_norms`], after attention and after the MLP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// LayerNorm with gain and bias (biased variance, eps inside the square root).
    LayerNorm,
    /// LayerNorm without gain and bias (TransformerLens `LNPre`: weights folded downstream).
    LayerNormPre,
    /// RMSNorm, `x / sqrt(mean(x²) + eps) · w` (Llama, Mistral, Qwen2). Gemma's `(1 + w)` form is
    /// this norm with the stored gain plus one, added once when the weights are loaded.
    RmsNorm,
    /// Identity.
    None,
}

/// MLP activation function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Tanh-form GELU (`gelu_new`, GPT-2).
    GeluNew,
    /// Erf-form GELU (`gelu`).
    Gelu,
    /// ReLU with ReLU'(0) = 0, as PyTorch.
    Relu,
    /// SiLU, `x · sigmoid(x)` (SwiGLU's gate).
    Silu,
}

/// How positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Positions {
    /// Learned positional embedding added to the residual stream.
    Standard,
    /// Learned positional embedding added to the query and key inputs only (TransformerLens
    /// `shortformer`); the residual stream carries token embeddings alone.
    Shortformer,
    /// Rotary embeddings applied to queries and keys after their projection; the residual
    /// stream carries token embeddings alone.
    Rotary(Rotary),
}

/// Rotary position embeddings in Hugging Face's half-split layout (`rotate_half`): dimension
/// `i < dim/2` of a head pairs with `i + dim/2`; dimensions `dim..d_head` are left alone
/// (partial rotary, GPT-NeoX's `rotary_pct`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rotary {
    /// Rotated dimensions of each head (even, at most `d_head`).
    pub dim: usize,
    /// The frequency base (`rope_theta`, NeoX's `rotary_emb_base`).
    pub theta: f64,
    pub scaling: RopeScaling,
}

impl Rotary {
    /// The `dim/2` angular frequencies, `theta^(−2i/dim)`, with the scaling applied (Hugging
    /// Face's `_compute_default_rope_parameters` and `_compute_llama3_parameters`, in f64).
    pub fn inv_freq(&self) -> Vec<f64> {
        let base: Vec<f64> = (0..self.dim / 2)
            .map(|i| 1.0 / self.theta.powf((2 * i) as f64 / self.dim as f64))
            .collect();
        match self.scaling {
            RopeScaling::None => base,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Rotary frequency scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama 3's `rope_type: llama3`: long wavelengths divided by `factor`, short ones kept,
    /// a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Attention restricted to the most recent keys on some layers (Mistral, Gemma-2).
#[derive(Debug, Clone, PartialEq)]
pub struct SlidingWindow {
    /// A query at position `i` sees keys `j` with `i − window < j ≤ i`.
    pub window: usize,
    /// Per layer: whether that layer slides.
    pub layers: Vec<bool>,
}

/// Where the weights came from, which decides tensor names and layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// Hugging Face GPT-2 (`Conv1D` layout, tied unembedding).
    HfGpt2,
    /// A TransformerLens state dict.
    TransformerLens,
    /// A Hugging Face Llama-family checkpoint (`llama`, `mistral`, `qwen2`, `gemma2`): separate
    /// `q_proj`/`k_proj`/`v_proj`/`o_proj` and `gate_proj`/`up_proj`/`down_proj` in `[out, in]`
    /// layout under `model.layers.{i}`.
    HfLlama,
    /// A Hugging Face GPT-NeoX checkpoint (Pythia): fused, per-head interleaved
    /// `query_key_value` under `gpt_neox.layers.{i}`.
    HfNeox,
    /// Built in memory (planted-circuit models).
    InMemory,
}

/// The shape and conventions of a transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub n_layers: usize,
    pub d_model: usize,
    /// Query heads: the graph has one node per query head.
    pub n_heads: usize,
    /// Key/value heads: `n_heads` without grouped-query attention; with it, each group of
    /// `n_heads / n_kv_heads` consecutive query heads shares one.
    pub n_kv_heads: usize,
    pub d_head: usize,
    /// `None` for attention-only models.
    pub d_mlp: Option<usize>,
    pub d_vocab: usize,
    pub d_vocab_out: usize,
    pub n_ctx: usize,
    pub norm: Norm,
    pub act: Activation,
    pub positions: Positions,
    /// Causal (decoder) attention; false for bidirectional models such as tracr's.
    pub causal: bool,
    /// Attention scores are divided by this (sqrt(d_head) unless configured otherwise).
    pub attn_scale: f32,
    pub eps: f32,
    pub format: WeightFormat,
    /// Gated MLP (SwiGLU, GeGLU): `act(x · W_gate) ⊙ (x · W_in)`, then `W_out`.
    pub gated_mlp: bool,
    /// Attention and MLP read the same residual stream (GPT-NeoX `use_parallel_residual`):
    /// the MLP of layer L does not read layer L's heads.
    pub parallel_attn_mlp: bool,
    /// Norms on the attention and MLP outputs before they join the residual stream (Gemma-2's
    /// `post_attention_layernorm`, `post_feedforward_layernorm`).
    pub post_norms: bool,
    /// Multiplies the token embedding (Gemma: `√d_model`, rounded to the weights' dtype as
    /// Hugging Face does).
    pub embed_scale: f32,
    /// `cap · tanh(score / cap)` on the scaled attention scores (Gemma-2).
    pub attn_softcap: Option<f32>,
    /// `cap · tanh(logit / cap)` on the logits (Gemma-2).
    pub final_softcap: Option<f32>,
    pub sliding_window: Option<SlidingWindow>,
}

impl ModelConfig {
    /// The edge graph of this model.
    pub fn graph(&self) -> crate::graph::Graph {
        crate::graph::Graph::new(self.n_layers, self.n_heads, self.d_mlp.is_some())
            .with_parallel_attn_mlp(self.parallel_attn_mlp && self.d_mlp.is_some())
    }

    /// A GPT-2-style configuration: every variant off (`n_kv_heads = n_heads`, plain MLP,
    /// sequential blocks, no post-norms, soft-caps or sliding windows). Formats fill in the
    /// shape and conventions, then switch on what their architecture has.
    #[allow(clippy::too_many_arguments)]
    pub fn classic(
        n_layers: usize,
        d_model: usize,
        n_heads: usize,
        d_head: usize,
        d_mlp: Option<usize>,
        d_vocab: usize,
        n_ctx: usize,
        format: WeightFormat,
    ) -> ModelConfig {
        ModelConfig {
            n_layers,
            d_model,
            n_heads,
            n_kv_heads: n_heads,
            d_head,
            d_mlp,
            d_vocab,
            d_vocab_out: d_vocab,
            n_ctx,
            norm: Norm::LayerNorm,
            act: Activation::GeluNew,
            positions: Positions::Standard,
            causal: true,
            attn_scale: (d_head as f32).sqrt(),
            eps: 1e-5,
            format,
            gated_mlp: false,
            parallel_attn_mlp: false,
            post_norms: false,
            embed_scale: 1.0,
            attn_softcap: None,
            final_softcap: None,
            sliding_window: None,
        }
    }

    /// Parameters of the model (for FLOP counts and memory planning).
    pub fn n_params(&self) -> usize {
        let d = self.d_model;
        let hd = self.n_heads * self.d_head;
        let attn = 4 * d * hd + 3 * hd + d;
        let mlp = self.d_mlp.map_or(0, |m| 2 * d * m + m + d);
        self.d_vocab * d
            + self.n_ctx * d
            + self.n_layers * (attn + mlp + 4 * d)
            + d * self.d_vocab_out
    }

    /// Reads `config.json`, deciding between a Hugging Face and a TransformerLens config.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            line: Some(e.line()),
            message: e.to_string(),
        })?;
        Self::from_json(&value, path)
    }

    pub fn from_json(value: &Value, path: &Path) -> Result<ModelConfig> {
        let obj = value.as_object().ok_or_else(|| Error::Config {
            path: path.to_path_buf(),
            message: "expected a JSON object".into(),
        })?;
        if let Some(model_type) = obj.get("model_type").and_then(Value::as_str) {
            return match model_type {
                "gpt2" => Self::from_hf_gpt2(value, path),
                other => Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    field: "model_type".into(),
                    value: format!("{other:?}"),
                    hint: "supported: \"gpt2\", or a TransformerLens config export \
                           (scripts/export_transformerlens.py)"
                        .into(),
                }),
            };
        }
        if obj.contains_key("n_layers") && obj.contains_key("d_head") {
            return Self::from_transformer_lens(value, path);
        }
        Err(Error::Config {
            path: path.to_path_buf(),
            message: "unknown model architecture: neither a Hugging Face config with \
                      `model_type` nor a TransformerLens config with `n_layers` and `d_head`"
                .into(),
        })
    }

    fn from_hf_gpt2(v: &Value, path: &Path) -> Result<ModelConfig> {
        let f = Fields { v, path };
        let d_model = f.usize("n_embd")?;
        let n_heads = f.usize("n_head")?;
        if n_heads == 0 || d_model % n_heads != 0 {
            return Err(f.bad(format!(
                "n_embd = {d_model} is not divisible by n_head = {n_heads}"
            )));
        }
        let d_head = d_model / n_heads;
        let act = match f.opt_str("activation_function")?.unwrap_or("gelu_new") {
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluNew,
            "gelu" => Activation::Gelu,
            "relu" => Activation::Relu,
            other => {
                return Err(f.unsupported(
                    "activation_function",
                    other,
                    "supported: gelu_new, gelu, relu",
                ))
            }
        };
        for flag in ["scale_attn_by_inverse_layer_idx", "add_cross_attention"] {
            if f.opt_bool(flag)?.unwrap_or(false) {
                return Err(f.unsupported(flag, "true", ""));
            }
        }
        let scale = f.opt_bool("scale_attn_weights")?.unwrap_or(true);
        let n_ctx = match f.opt_usize("n_positions")? {
            Some(n) => n,
            None => f.usize("n_ctx")?,
        };
        let d_vocab = f.usize("vocab_size")?;
        let d_mlp = f.opt_usize("n_inner")?.unwrap_or(4 * d_model);
        Ok(ModelConfig {
            n_layers: f.usize("n_layer")?,
            d_model,
            n_heads,
            n_kv_heads: n_heads,
            d_head,
            d_mlp: Some(d_mlp),
            d_vocab,
            d_vocab_out: d_vocab,
            n_ctx,
            norm: Norm::LayerNorm,
            act,
            positions: Positions::Standard,
            causal: true,
            attn_scale: if scale { (d_head as f32).sqrt() } else { 1.0 },
            eps: f.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5) as f32,
            format: WeightFormat::HfGpt2,
            gated_mlp: false,
            parallel_attn_mlp: false,
            post_norms: false,
            embed_scale: 1.0,
            attn_softcap: None,
            final_softcap: None,
            sliding_window: None,
        })
    }

    fn from_transformer_lens(v: &Value, path: &Path) -> Result<ModelConfig> {
        let f = Fields { v, path };
        let d_model = f.usize("d_model")?;
        let d_head = f.usize("d_head")?;
        let n_heads = f.usize("n_heads")?;
        let attn_only = f.opt_bool("attn_only")?.unwrap_or(false);
        let norm = match f.opt_str("normalization_type")? {
            Some("LN") => Norm::LayerNorm,
            Some("LNPre") => Norm::LayerNormPre,
            None => Norm::None,
            Some(other) => {
                return Err(f.unsupported(
                    "normalization_type",
                    other,
                    "supported: LN, LNPre, null",
                ))
            }
        };
        let act = match f.opt_str("act_fn")? {
            Some("gelu_new") | Some("gelu_pytorch_tanh") => Activation::GeluNew,
            Some("gelu") => Activation::Gelu,
            Some("relu") => Activation::Relu,
            None if attn_only => Activation::Relu,
            None => return Err(f.bad("`act_fn` is required for models with MLPs".into())),
            Some(other) => {
                return Err(f.unsupported("act_fn", other, "supported: gelu_new, gelu, relu"))
            }
        };
        let positions = match f
            .opt_str("positional_embedding_type")?
            .unwrap_or("standard")
        {
            "standard" => Positions::Standard,
            "shortformer" => Positions::Shortformer,
            other => {
                return Err(f.unsupported(
                    "positional_embedding_type",
                    other,
                    "supported: standard, shortformer",
                ))
            }
        };
        let causal = match f.opt_str("attention_dir")?.unwrap_or("causal") {
            "causal" => true,
            "bidirectional" => false,
            other => {
                return Err(f.unsupported(
                    "attention_dir",
                    other,
                    "supported: causal, bidirectional",
                ))
            }
        };
        // Fields whose non-default values change the computation in ways eap does not model.
        let must_be_false = [
            "gated_mlp",
            "parallel_attn_mlp",
            "use_local_attn",
            "final_rms",
            "use_qk_norm",
            "use_normalization_before_and_after",
            "scale_attn_by_inverse_layer_idx",
            "use_NTK_by_parts_rope",
        ];
        for flag in must_be_false {
            if f.opt_bool(flag)?.unwrap_or(false) {
                return Err(f.unsupported(flag, "true", ""));
            }
        }
        if let Some(kv) = f.opt_usize("n_key_value_heads")? {
            if kv != n_heads {
                return Err(f.unsupported(
                    "n_key_value_heads",
                    &kv.to_string(),
                    "grouped-query attention is not supported yet",
                ));
            }
        }
        for field in ["output_logits_soft_cap", "attn_scores_soft_cap"] {
            if let Some(cap) = f.opt_f64(field)? {
                if cap > 0.0 {
                    return Err(f.unsupported(field, &cap.to_string(), ""));
                }
            }
        }
        let use_attn_scale = f.opt_bool("use_attn_scale")?.unwrap_or(true);
        let attn_scale = match f.opt_f64("attn_scale")? {
            _ if !use_attn_scale => 1.0,
            Some(s) if s > 0.0 => s as f32,
            Some(s) => return Err(f.bad(format!("attn_scale must be positive, found {s}"))),
            None => (d_head as f32).sqrt(),
        };
        let d_vocab = f.usize("d_vocab")?;
        let d_vocab_out = match f.opt_i64("d_vocab_out")? {
            Some(n) if n > 0 => n as usize,
            _ => d_vocab,
        };
        let d_mlp = if attn_only {
            None
        } else {
            Some(f.usize("d_mlp")?)
        };
        Ok(ModelConfig {
            n_layers: f.usize("n_layers")?,
            d_model,
            n_heads,
            n_kv_heads: n_heads,
            d_head,
            d_mlp,
            d_vocab,
            d_vocab_out,
            n_ctx: f.usize("n_ctx")?,
            norm,
            act,
            positions,
            causal,
            attn_scale,
            eps: f.opt_f64("eps")?.unwrap_or(1e-5) as f32,
            format: WeightFormat::TransformerLens,
            gated_mlp: false,
            parallel_attn_mlp: false,
            post_norms: false,
            embed_scale: 1.0,
            attn_softcap: None,
            final_softcap: None,
            sliding_window: None,
        })
    }
}

/// Typed access to config fields with errors naming the file and the field.
struct Fields<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn bad(&self, message: String) -> Error {
        Error::Config {
            path: self.path.to_path_buf(),
            message,
        }
    }

    fn unsupported(&self, field: &str, value: &str, hint: &str) -> Error {
        Error::Unsupported {
            path: self.path.to_path_buf(),
            field: field.into(),
            value: value.into(),
            hint: hint.into(),
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                self.bad(format!("`{key}` must be a non-negative integer, found {v}"))
            }),
        }
    }

    fn opt_i64(&self, key: &str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.bad(format!("`{key}` must be an integer, found {v}"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let n = self
            .opt_usize(key)?
            .ok_or_else(|| self.bad(format!("missing field `{key}`")))?;
        if n == 0 {
            return Err(self.bad(format!("`{key}` must be positive")));
        }
        Ok(n)
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(format!("`{key}` must be a number, found {v}"))),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(format!("`{key}` must be true or false, found {v}"))),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.bad(format!("`{key}` must be a string, found {v}"))),
        }
    }
}
