//! Model configuration: one internal [`ModelConfig`] read from a Hugging Face `config.json`
//! (`model_type` `gpt2`, `llama`, `mistral`, `qwen2`, `gemma`, `gemma2`, `olmo`, `gpt_neox`) or a
//! TransformerLens `HookedTransformerConfig` export, plus the [`CheckpointLayout`] that tells the
//! weight loader which tensors a Hugging Face checkpoint of that configuration holds.
//!
//! Field names and defaults follow transformers' `configuration_<model_type>.py` (v5.23), and
//! the conventions its modelling code derives from them (which layers slide, which projections
//! have biases, how `rope_scaling` and `rope_parameters` combine).
//!
//! Every field that changes the computation is either implemented or rejected with
//! [`Error::Unsupported`]; nothing is silently ignored, because a silently wrong model gives
//! wrong circuits.

use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

/// Parses JSON like `serde_json::from_str::<Value>`, but a key repeated within one object is
/// an error (``duplicate key `n_layer` ``, with its line and column) rather than silently
/// taking the last value: a config whose two `n_layer`s disagree must not load either one.
pub fn parse_json_unique(text: &str) -> serde_json::Result<Value> {
    use serde::Deserialize;
    let mut de = serde_json::Deserializer::from_str(text);
    let value = UniqueValue::deserialize(&mut de)?.0;
    de.end()?;
    Ok(value)
}

/// A [`Value`] whose objects were checked for repeated keys while parsing.
struct UniqueValue(Value);

impl<'de> serde::Deserialize<'de> for UniqueValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor).map(UniqueValue)
    }
}

struct UniqueVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        d.deserialize_any(UniqueVisitor)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(UniqueValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate key `{key}`")));
            }
            let UniqueValue(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

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

/// What a Hugging Face checkpoint holds beyond the shape a [`ModelConfig`] gives: which
/// projections carry biases, whether the unembedding is the embedding's transpose, and how norm
/// gains are stored. The weight loader reads exactly these tensors, so a bias the configuration
/// does not announce is reported rather than silently added (transformers would ignore it).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CheckpointLayout {
    /// `q_proj`/`k_proj`/`v_proj` (NeoX: `query_key_value`) have biases.
    pub qkv_bias: bool,
    /// `o_proj` (NeoX: `attention.dense`) has a bias.
    pub o_bias: bool,
    /// The MLP's projections have biases (GPT-NeoX; a gated MLP has none in eap).
    pub mlp_bias: bool,
    /// The unembedding is the embedding's transpose (`tie_word_embeddings`); a stored
    /// `lm_head.weight` is then ignored, as transformers ignores it.
    pub tied_embeddings: bool,
    /// Added to every stored norm gain when it is loaded: 1 for Gemma, whose RMSNorm multiplies
    /// by `(1 + w)`.
    pub norm_gain_offset: f32,
}

/// The Llama-family `model_type`s, which share tensor names ([`WeightFormat::HfLlama`]) and
/// differ in their config fields' defaults and in a few conventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LlamaFamily {
    Llama,
    Mistral,
    Qwen2,
    Gemma,
    Gemma2,
    /// OLMo (1): parameter-free LayerNorm (eps 1e-5) instead of RMSNorm.
    Olmo,
}

impl LlamaFamily {
    /// transformers' defaults (`configuration_<family>.py`, v5.23) for the fields the families
    /// disagree on.
    fn defaults(self) -> FamilyDefaults {
        use LlamaFamily::*;
        match self {
            Llama => FamilyDefaults {
                n_kv_heads: None,
                head_dim: None,
                n_ctx: 2048,
                tied: false,
                sliding_window: None,
            },
            Mistral => FamilyDefaults {
                n_kv_heads: Some(8),
                head_dim: None,
                n_ctx: 4096 * 32,
                tied: false,
                sliding_window: Some(4096),
            },
            Qwen2 => FamilyDefaults {
                n_kv_heads: Some(32),
                head_dim: None,
                n_ctx: 32768,
                tied: false,
                sliding_window: Some(4096),
            },
            Gemma => FamilyDefaults {
                n_kv_heads: Some(16),
                head_dim: Some(256),
                n_ctx: 8192,
                tied: true,
                sliding_window: None,
            },
            Gemma2 => FamilyDefaults {
                n_kv_heads: Some(4),
                head_dim: Some(256),
                n_ctx: 8192,
                tied: true,
                sliding_window: Some(4096),
            },
            Olmo => FamilyDefaults {
                n_kv_heads: None,
                head_dim: None,
                n_ctx: 2048,
                tied: false,
                sliding_window: None,
            },
        }
    }
}

struct FamilyDefaults {
    /// `None`: as many as query heads.
    n_kv_heads: Option<usize>,
    /// `None`: `hidden_size / num_attention_heads`.
    head_dim: Option<usize>,
    n_ctx: usize,
    tied: bool,
    /// `sliding_window` when the field is absent (not when it is `null`).
    sliding_window: Option<usize>,
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
    /// Multiplies the token embedding (Gemma: `√d_model` in f32, what transformers uses when it
    /// computes in float32; in bf16 it rounds the factor to bf16, e.g. 5.65625 for d = 32).
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

    /// Parameters of the model as eap holds them (for FLOP counts and memory planning): the
    /// unembedding counts even when tied, because it is kept as its own f32 copy.
    pub fn n_params(&self) -> usize {
        let d = self.d_model;
        let pos = match self.positions {
            Positions::Standard | Positions::Shortformer => self.n_ctx * d,
            Positions::Rotary(_) => 0,
        };
        self.d_vocab * d + pos + self.n_layers * self.layer_params() + d * self.d_vocab_out
    }

    /// Parameters of one layer: attention, MLP, norms.
    pub fn layer_params(&self) -> usize {
        let d = self.d_model;
        let q = self.n_heads * self.d_head;
        let kv = self.n_kv_heads * self.d_head;
        let attn = 2 * d * q + 2 * d * kv + q + 2 * kv + d;
        let mats = if self.gated_mlp { 3 } else { 2 };
        let mlp = self.d_mlp.map_or(0, |m| mats * d * m + m + d);
        attn + mlp + 4 * d
    }

    /// Reads `config.json`, deciding between a Hugging Face and a TransformerLens config.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        Ok(Self::read(path)?.0)
    }

    /// [`from_file`](Self::from_file) and the layout of the checkpoint the file describes.
    pub fn read(path: &Path) -> Result<(ModelConfig, CheckpointLayout)> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value = parse_json_unique(&text).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            line: Some(e.line()),
            message: e.to_string(),
        })?;
        Self::parse(&value, path)
    }

    /// Reads a pickled TransformerLens config (InterpBench's `ll_model_cfg.pkl`): the dict
    /// `HookedTransformerConfig.to_dict()` returns, or the `HookedTransformerConfig` object
    /// itself. Its fields are `config.json`'s TransformerLens fields, so after the data-only
    /// unpickling ([`super::pickle`]) this is [`parse`](Self::parse).
    pub fn read_pickle(path: &Path) -> Result<(ModelConfig, CheckpointLayout)> {
        let pickle = super::pickle::Pickle::read(path)?;
        let value = pickle.to_json(pickle.root()).map_err(|why| Error::Config {
            path: path.to_path_buf(),
            message: format!("not a TransformerLens config: {why}"),
        })?;
        if !value.is_object() {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: format!(
                    "expected a dict or a HookedTransformerConfig, found {}",
                    pickle.kind(pickle.root())
                ),
            });
        }
        if value.get("model_type").is_some() || value.get("d_head").is_none() {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: "not a TransformerLens config (no `n_layers` and `d_head`)".into(),
            });
        }
        Self::parse(&value, path)
    }

    pub fn from_json(value: &Value, path: &Path) -> Result<ModelConfig> {
        Ok(Self::parse(value, path)?.0)
    }

    /// [`from_json`](Self::from_json) and the checkpoint layout (GPT-2 and TransformerLens
    /// checkpoints have loaders of their own that do not consult it).
    pub fn parse(value: &Value, path: &Path) -> Result<(ModelConfig, CheckpointLayout)> {
        let obj = value.as_object().ok_or_else(|| Error::Config {
            path: path.to_path_buf(),
            message: "expected a JSON object".into(),
        })?;
        if let Some(model_type) = obj.get("model_type").and_then(Value::as_str) {
            let unsupported = |hint: &str| Error::Unsupported {
                path: path.to_path_buf(),
                field: "model_type".into(),
                value: format!("{model_type:?}"),
                hint: hint.into(),
            };
            return match model_type {
                "gpt2" => Ok((
                    Self::from_hf_gpt2(value, path)?,
                    CheckpointLayout::default(),
                )),
                "llama" => Self::from_hf_llama(value, path, LlamaFamily::Llama),
                "mistral" => Self::from_hf_llama(value, path, LlamaFamily::Mistral),
                "qwen2" => Self::from_hf_llama(value, path, LlamaFamily::Qwen2),
                "gemma" => Self::from_hf_llama(value, path, LlamaFamily::Gemma),
                "gemma2" => Self::from_hf_llama(value, path, LlamaFamily::Gemma2),
                "gpt_neox" => Self::from_hf_neox(value, path),
                "qwen3" | "olmo2" | "olmo3" => Err(unsupported(
                    "this architecture RMS-normalises queries and keys (q_norm, k_norm), which \
                     eap's attention does not implement",
                )),
                "olmo" => Self::from_hf_llama(value, path, LlamaFamily::Olmo),
                "gemma3" | "gemma3_text" => Err(unsupported(
                    "Gemma-3 RMS-normalises queries and keys and uses per-layer-type rotary \
                     settings, which eap does not implement",
                )),
                "mixtral" | "qwen2_moe" | "qwen3_moe" | "olmoe" | "deepseek_v2" | "deepseek_v3" => {
                    Err(unsupported("mixture-of-experts MLPs are not implemented"))
                }
                _ => Err(unsupported(
                    "supported: \"gpt2\", \"llama\", \"mistral\", \"qwen2\", \"gemma\", \
                     \"gemma2\", \"olmo\", \"gpt_neox\", or a TransformerLens config export \
                     (scripts/export_transformerlens.py)",
                )),
            };
        }
        if obj.contains_key("n_layers") && obj.contains_key("d_head") {
            return Ok((
                Self::from_transformer_lens(value, path)?,
                CheckpointLayout::default(),
            ));
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
        // eap's GPT-2 loader ties the unembedding to `wte`: an untied head would be read as the
        // embedding (or, with no `lm_head.weight`, be random in transformers), so refuse it.
        if f.opt_bool("tie_word_embeddings")? == Some(false) {
            return Err(f.unsupported(
                "tie_word_embeddings",
                "false",
                "eap reads GPT-2 with its unembedding tied to wte; a separate lm_head.weight is not read",
            ));
        }
        let scale = f.opt_bool("scale_attn_weights")?.unwrap_or(true);
        // transformers writes `n_positions`; `n_ctx` is its older alias, read only when
        // `n_positions` is absent, so a config with neither is missing `n_positions`.
        let old_name = f.opt_usize("n_positions")?.is_none() && f.opt_usize("n_ctx")?.is_some();
        let n_ctx = f.usize(if old_name { "n_ctx" } else { "n_positions" })?;
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
            // A LayerNorm right after the embedding (TransformerLens' `ln_embed`).
            "post_embedding_ln",
        ];
        for flag in must_be_false {
            if f.opt_bool(flag)?.unwrap_or(false) {
                return Err(f.unsupported(flag, "true", ""));
            }
        }
        if let Some(n) = f.opt_usize("num_experts")? {
            return Err(f.unsupported(
                "num_experts",
                &n.to_string(),
                "mixture-of-experts MLPs are not implemented",
            ));
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
    /// `llama`, `mistral`, `qwen2`, `gemma`, `gemma2`, `olmo`: RMSNorm (OLMo: parameter-free
    /// LayerNorm), rotary, gated MLP, separate q/k/v/o projections (transformers'
    /// `modeling_<family>.py`).
    fn from_hf_llama(
        v: &Value,
        path: &Path,
        family: LlamaFamily,
    ) -> Result<(ModelConfig, CheckpointLayout)> {
        use LlamaFamily::*;
        let f = Fields { v, path };
        refuse_hf_extensions(&f)?;
        let defaults = family.defaults();
        let d_model = f.usize("hidden_size")?;
        let n_heads = f.usize("num_attention_heads")?;
        let n_kv_heads = match f.opt_usize("num_key_value_heads")? {
            Some(0) => return Err(f.bad("`num_key_value_heads` must be positive".into())),
            Some(n) => n,
            // `null` means "as many as query heads" in every family's __post_init__.
            None if f.v.get("num_key_value_heads").is_some() => n_heads,
            None => defaults.n_kv_heads.unwrap_or(n_heads),
        };
        if n_heads % n_kv_heads != 0 {
            return Err(f.bad(format!(
                "num_attention_heads = {n_heads} is not a multiple of num_key_value_heads = \
                 {n_kv_heads}"
            )));
        }
        let d_head = match (f.opt_usize("head_dim")?, defaults.head_dim) {
            (Some(0), _) => return Err(f.bad("`head_dim` must be positive".into())),
            (Some(n), _) | (None, Some(n)) => n,
            (None, None) => {
                if d_model % n_heads != 0 {
                    return Err(f.bad(format!(
                        "hidden_size = {d_model} is not divisible by num_attention_heads = \
                         {n_heads} (and there is no head_dim)"
                    )));
                }
                d_model / n_heads
            }
        };
        let act = match family {
            Gemma2 => hf_activation(&f, "hidden_activation", "gelu_pytorch_tanh")?,
            Gemma => {
                // transformers reads `hidden_act`, and takes the legacy "gelu" of the official
                // releases for the tanh form it always meant (configuration_gemma.py);
                // versions before 4.46 read `hidden_activation` instead. Both agree on every
                // released config; refuse a config on which they would not.
                let act = match f.opt_str("hidden_act")? {
                    Some("gelu") => Activation::GeluNew,
                    _ => hf_activation(&f, "hidden_act", "gelu_pytorch_tanh")?,
                };
                if let Some(other) = f.opt_str("hidden_activation")? {
                    if hf_activation(&f, "hidden_activation", other)? != act {
                        return Err(f.unsupported(
                            "hidden_activation",
                            other,
                            "disagrees with hidden_act; transformers versions differ in which \
                             one they use",
                        ));
                    }
                }
                act
            }
            Llama | Mistral | Qwen2 | Olmo => hf_activation(&f, "hidden_act", "silu")?,
        };
        let n_ctx = f
            .opt_usize("max_position_embeddings")?
            .unwrap_or(defaults.n_ctx);
        let rotary = parse_rotary(&f, d_head, n_ctx, RopeSpelling::Hf)?;
        if rotary.dim != d_head {
            return Err(f.unsupported(
                "partial_rotary_factor",
                &format!(
                    "{} (rotary dimension {} of {d_head})",
                    rotary.dim as f64 / d_head as f64,
                    rotary.dim
                ),
                "transformers' Llama-family attention rotates whole heads",
            ));
        }
        let (qkv_bias, o_bias) = match family {
            Llama | Gemma | Gemma2 | Olmo => {
                let b = f.opt_bool("attention_bias")?.unwrap_or(false);
                (b, b)
            }
            // MistralAttention has no biases, whatever the config says.
            Mistral => (false, false),
            // Qwen2Attention: biases on q, k and v, none on o (no config field).
            Qwen2 => (true, false),
        };
        if family == Llama && f.opt_bool("mlp_bias")?.unwrap_or(false) {
            return Err(f.unsupported(
                "mlp_bias",
                "true",
                "eap's gated MLP has no gate_proj / down_proj biases",
            ));
        }
        let (attn_scale, attn_softcap, final_softcap) = match family {
            Gemma2 => {
                let s = f.opt_f64("query_pre_attn_scalar")?.unwrap_or(256.0);
                if s.is_nan() || s <= 0.0 {
                    return Err(f.bad(format!(
                        "`query_pre_attn_scalar` must be positive, found {s}"
                    )));
                }
                (
                    s.sqrt() as f32,
                    softcap(&f, "attn_logit_softcapping", 50.0)?,
                    softcap(&f, "final_logit_softcapping", 30.0)?,
                )
            }
            _ => ((d_head as f32).sqrt(), None, None),
        };
        let gemma = matches!(family, Gemma | Gemma2);
        // OlmoLayerNorm: F.layer_norm without weight or bias, eps fixed at 1e-5.
        let (norm, eps) = match family {
            Olmo => (Norm::LayerNormPre, 1e-5),
            _ => (
                Norm::RmsNorm,
                f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            ),
        };
        let cfg = ModelConfig {
            n_kv_heads,
            norm,
            act,
            positions: Positions::Rotary(rotary),
            attn_scale,
            eps,
            gated_mlp: true,
            post_norms: family == Gemma2,
            // Gemma multiplies the embedding by √d (as float32 when the model runs in float32;
            // transformers rounds it to the weights' dtype, bf16 5.65625 for d = 32).
            embed_scale: if gemma {
                (d_model as f64).sqrt() as f32
            } else {
                1.0
            },
            attn_softcap,
            final_softcap,
            sliding_window: hf_sliding_window(&f, family, f.usize("num_hidden_layers")?)?,
            ..ModelConfig::classic(
                f.usize("num_hidden_layers")?,
                d_model,
                n_heads,
                d_head,
                Some(f.usize("intermediate_size")?),
                f.usize("vocab_size")?,
                n_ctx,
                WeightFormat::HfLlama,
            )
        };
        let layout = CheckpointLayout {
            qkv_bias,
            o_bias,
            mlp_bias: false,
            tied_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(defaults.tied),
            norm_gain_offset: if gemma { 1.0 } else { 0.0 },
        };
        Ok((cfg, layout))
    }

    /// `gpt_neox` (Pythia): LayerNorm, partial rotary, fused per-head `query_key_value`,
    /// parallel attention and MLP unless `use_parallel_residual` is false.
    fn from_hf_neox(v: &Value, path: &Path) -> Result<(ModelConfig, CheckpointLayout)> {
        let f = Fields { v, path };
        refuse_hf_extensions(&f)?;
        let d_model = f.usize("hidden_size")?;
        let n_heads = f.usize("num_attention_heads")?;
        if d_model % n_heads != 0 {
            return Err(f.bad(format!(
                "hidden_size = {d_model} is not divisible by num_attention_heads = {n_heads}"
            )));
        }
        let d_head = d_model / n_heads;
        let n_ctx = f.opt_usize("max_position_embeddings")?.unwrap_or(2048);
        let rotary = parse_rotary(&f, d_head, n_ctx, RopeSpelling::Neox)?;
        let bias = f.opt_bool("attention_bias")?.unwrap_or(true);
        let cfg = ModelConfig {
            norm: Norm::LayerNorm,
            act: hf_activation(&f, "hidden_act", "gelu")?,
            positions: Positions::Rotary(rotary),
            eps: f.opt_f64("layer_norm_eps")?.unwrap_or(1e-5) as f32,
            parallel_attn_mlp: f.opt_bool("use_parallel_residual")?.unwrap_or(true),
            ..ModelConfig::classic(
                f.usize("num_hidden_layers")?,
                d_model,
                n_heads,
                d_head,
                Some(f.usize("intermediate_size")?),
                f.usize("vocab_size")?,
                n_ctx,
                WeightFormat::HfNeox,
            )
        };
        let layout = CheckpointLayout {
            qkv_bias: bias,
            o_bias: bias,
            mlp_bias: true,
            tied_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            norm_gain_offset: 0.0,
        };
        Ok((cfg, layout))
    }
}

/// Fields of relatives of the supported families (mixture-of-experts variants, multimodal
/// rotary, quantised or pruned exports, encoder models) that change the computation in ways
/// eap does not implement.
fn refuse_hf_extensions(f: &Fields) -> Result<()> {
    for field in [
        "num_experts",
        "num_local_experts",
        "num_experts_per_tok",
        "n_routed_experts",
        "n_shared_experts",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
    ] {
        match f.get(field) {
            None => {}
            Some(v) if v.as_u64() == Some(0) => {}
            Some(v) => {
                return Err(f.unsupported(
                    field,
                    &v.to_string(),
                    "mixture-of-experts MLPs are not implemented",
                ))
            }
        }
    }
    for flag in [
        "use_bidirectional_attention",
        "is_encoder_decoder",
        "add_cross_attention",
        "use_mrope",
        "use_qk_norm",
        "qk_layernorm",
    ] {
        if f.opt_bool(flag)?.unwrap_or(false) {
            return Err(f.unsupported(flag, "true", ""));
        }
    }
    if let Some(q) = f.get("quantization_config") {
        let method = q
            .get("quant_method")
            .map_or(q.to_string(), |m| m.to_string());
        return Err(f.unsupported(
            "quantization_config",
            &method,
            "quantised checkpoints are not supported; use the unquantised weights",
        ));
    }
    if let Some(c) = f.get("clip_qkv") {
        return Err(f.unsupported("clip_qkv", &c.to_string(), ""));
    }
    if let Some(p) = f.get("pruned_heads") {
        if p.as_object().is_none_or(|o| !o.is_empty()) {
            return Err(f.unsupported("pruned_heads", &p.to_string(), ""));
        }
    }
    Ok(())
}

/// A Hugging Face activation name (transformers' `ACT2FN`) as one eap implements.
fn hf_activation(f: &Fields, field: &str, default: &str) -> Result<Activation> {
    Ok(match f.opt_str(field)?.unwrap_or(default) {
        "silu" | "swish" => Activation::Silu,
        "gelu" | "gelu_python" => Activation::Gelu,
        // The tanh form under its several names (`gelu_fast` and `gelu_accurate` round the
        // constant √(2/π) differently, by less than 1e-10).
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_python_tanh" | "gelu_fast" | "gelu_accurate" => {
            Activation::GeluNew
        }
        "relu" => Activation::Relu,
        other => {
            return Err(f.unsupported(
                field,
                other,
                "supported: silu, gelu, gelu_new, gelu_pytorch_tanh, relu",
            ))
        }
    })
}

/// A soft-cap: `default` when the field is absent, none when it is `null`.
fn softcap(f: &Fields, field: &str, default: f64) -> Result<Option<f32>> {
    let cap = match f.v.get(field) {
        None => default,
        Some(Value::Null) => return Ok(None),
        Some(_) => f.opt_f64(field)?.expect("present and not null"),
    };
    if cap.is_nan() || cap <= 0.0 {
        return Err(f.bad(format!("`{field}` must be positive or null, found {cap}")));
    }
    Ok(Some(cap as f32))
}

/// Which top-level fields a family reads its rotary base and fraction from when
/// `rope_parameters` / `rope_scaling` does not give them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RopeSpelling {
    /// `rope_theta`, `partial_rotary_factor` (default 1).
    Hf,
    /// GPT-NeoX: `rotary_emb_base`, `rotary_pct` (default 0.25).
    Neox,
}

/// The rotary settings in either spelling, combined as transformers'
/// `convert_rope_params_to_dict` and `standardize_rope_params` combine them: a non-null
/// `rope_scaling` (the hub's older spelling) replaces `rope_parameters`; values inside that
/// object win over the top-level fields; `type` is the old name of `rope_type`; llama3's
/// `original_max_position_embeddings` defaults to `max_position_embeddings` (`n_ctx`), and a
/// top-level one wins over the object's.
fn parse_rotary(f: &Fields, d_head: usize, n_ctx: usize, spelling: RopeSpelling) -> Result<Rotary> {
    let (field, params) = match (f.get("rope_scaling"), f.get("rope_parameters")) {
        (Some(p), _) => ("rope_scaling", Some(p)),
        (None, p) => ("rope_parameters", p),
    };
    let params = match params {
        None => None,
        Some(p) => Some(
            p.as_object()
                .ok_or_else(|| f.bad(format!("`{field}` must be an object, found {p}")))?,
        ),
    };
    if let Some(p) = params {
        if let Some((key, _)) = p.iter().find(|(_, v)| v.is_object()) {
            return Err(f.unsupported(
                &format!("{field}.{key}"),
                "an object",
                "rotary settings per layer type are not implemented",
            ));
        }
        if p.get("mrope_section").is_some_and(|v| !v.is_null()) {
            return Err(f.unsupported(
                &format!("{field}.mrope_section"),
                &p["mrope_section"].to_string(),
                "multimodal rotary embeddings are not implemented",
            ));
        }
    }
    let get = |key: &str| params.and_then(|p| p.get(key)).filter(|v| !v.is_null());
    let num = |key: &str| -> Result<Option<f64>> {
        match get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| f.bad(format!("`{field}.{key}` must be a number, found {v}"))),
        }
    };
    let rope_type = match get("rope_type").or_else(|| get("type")) {
        None => "default",
        Some(v) => v
            .as_str()
            .ok_or_else(|| f.bad(format!("`{field}.rope_type` must be a string, found {v}")))?,
    };
    let (theta_field, fraction_field, fraction_default) = match spelling {
        RopeSpelling::Hf => ("rope_theta", "partial_rotary_factor", 1.0),
        RopeSpelling::Neox => ("rotary_emb_base", "rotary_pct", 0.25),
    };
    let theta = match num("rope_theta")? {
        Some(t) => t,
        None => f.opt_f64(theta_field)?.unwrap_or(10_000.0),
    };
    let fraction = match num("partial_rotary_factor")? {
        Some(p) => p,
        None => f.opt_f64(fraction_field)?.unwrap_or(fraction_default),
    };
    if theta.is_nan() || theta <= 0.0 {
        return Err(f.bad(format!("the rotary base must be positive, found {theta}")));
    }
    if fraction == 0.0 || !(0.0..=1.0).contains(&fraction) {
        return Err(f.bad(format!(
            "the rotary fraction ({fraction_field} / partial_rotary_factor) must be in (0, 1], \
             found {fraction}"
        )));
    }
    // transformers: int(head_dim * partial_rotary_factor).
    let dim = (d_head as f64 * fraction) as usize;
    if dim == 0 || !dim.is_multiple_of(2) {
        return Err(f.bad(format!(
            "the rotary dimension int(head_dim · {fraction}) = {dim} must be even and positive"
        )));
    }
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "llama3" => {
            let required = |key: &str| -> Result<f64> {
                num(key)?
                    .ok_or_else(|| f.bad(format!("`{field}` with rope_type llama3 lacks `{key}`")))
            };
            let original = match f.opt_usize("original_max_position_embeddings")? {
                Some(n) => n,
                None => match get("original_max_position_embeddings") {
                    None => n_ctx,
                    Some(v) => v.as_u64().ok_or_else(|| {
                        f.bad(format!(
                            "`{field}.original_max_position_embeddings` must be a positive \
                             integer, found {v}"
                        ))
                    })? as usize,
                },
            };
            let (factor, low, high) = (
                required("factor")?,
                required("low_freq_factor")?,
                required("high_freq_factor")?,
            );
            let valid = factor > 0.0 && low > 0.0 && high > low && original > 0;
            if !valid {
                return Err(f.bad(format!(
                    "`{field}`: llama3 scaling needs factor > 0, 0 < low_freq_factor < \
                     high_freq_factor and original_max_position_embeddings > 0, found factor \
                     {factor}, low_freq_factor {low}, high_freq_factor {high}, \
                     original_max_position_embeddings {original}"
                )));
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original,
            }
        }
        other => {
            return Err(f.unsupported(
                &format!("{field}.rope_type"),
                other,
                "supported: default, llama3",
            ))
        }
    };
    Ok(Rotary {
        dim,
        theta,
        scaling,
    })
}

/// Which layers attend to a sliding window, as transformers decides it per family: Mistral
/// slides on every layer unless `sliding_window` is null; Qwen2 only with
/// `use_sliding_window`, on the layers `layer_types` marks (by default those at index ≥
/// `max_window_layers`); Gemma-2 on the layers `layer_types` marks (by default the even ones,
/// 0, 2, …); Llama and Gemma never. `sliding_window` absent takes the family's default (4096),
/// `null` means no window.
fn hf_sliding_window(
    f: &Fields,
    family: LlamaFamily,
    n_layers: usize,
) -> Result<Option<SlidingWindow>> {
    let window = || -> Result<Option<usize>> {
        match f.v.get("sliding_window") {
            None => Ok(family.defaults().sliding_window),
            Some(Value::Null) => Ok(None),
            Some(_) => match f.opt_usize("sliding_window")? {
                Some(0) => Err(f.bad("`sliding_window` must be positive or null".into())),
                w => Ok(w),
            },
        }
    };
    let (window, layers) = match family {
        LlamaFamily::Llama | LlamaFamily::Gemma | LlamaFamily::Olmo => return Ok(None),
        // MistralModel ignores `layer_types` (with a warning).
        LlamaFamily::Mistral => (window()?, vec![true; n_layers]),
        LlamaFamily::Qwen2 => {
            let window = if f.opt_bool("use_sliding_window")?.unwrap_or(false) {
                window()?
            } else {
                None
            };
            let layers = match layer_types(f, n_layers)? {
                Some(l) => l,
                None => {
                    let first = f.opt_usize("max_window_layers")?.unwrap_or(28);
                    (0..n_layers)
                        .map(|i| window.is_some() && i >= first)
                        .collect()
                }
            };
            (window, layers)
        }
        LlamaFamily::Gemma2 => {
            let layers = match layer_types(f, n_layers)? {
                Some(l) => l,
                None => (0..n_layers).map(|i| (i + 1) % 2 == 1).collect(),
            };
            (window()?, layers)
        }
    };
    if !layers.contains(&true) {
        return Ok(None);
    }
    match window {
        Some(window) => Ok(Some(SlidingWindow { window, layers })),
        None if family == LlamaFamily::Mistral => Ok(None),
        // transformers' create_sliding_window_causal_mask raises here too.
        None => Err(f.bad(
            "`layer_types` marks sliding_attention layers but there is no sliding window \
             (`sliding_window` is null, or Qwen2's `use_sliding_window` is false)"
                .into(),
        )),
    }
}

/// `layer_types`: per layer `full_attention` or `sliding_attention`.
fn layer_types(f: &Fields, n_layers: usize) -> Result<Option<Vec<bool>>> {
    let Some(v) = f.get("layer_types") else {
        return Ok(None);
    };
    let list = v
        .as_array()
        .ok_or_else(|| f.bad(format!("`layer_types` must be a list, found {v}")))?;
    if list.len() != n_layers {
        return Err(f.bad(format!(
            "`layer_types` lists {} layers but num_hidden_layers = {n_layers}",
            list.len()
        )));
    }
    list.iter()
        .map(|t| match t.as_str() {
            Some("full_attention") => Ok(false),
            Some("sliding_attention") => Ok(true),
            _ => Err(f.unsupported(
                "layer_types",
                &t.to_string(),
                "supported: full_attention, sliding_attention",
            )),
        })
        .collect::<Result<Vec<bool>>>()
        .map(Some)
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<(ModelConfig, CheckpointLayout)> {
        ModelConfig::parse(&v, Path::new("config.json"))
    }

    /// A minimal config of `model_type` with the shape fields every family requires.
    fn minimal(model_type: &str) -> Value {
        json!({
            "model_type": model_type,
            "hidden_size": 64,
            "num_attention_heads": 8,
            "num_hidden_layers": 4,
            "intermediate_size": 128,
            "vocab_size": 100,
        })
    }

    #[test]
    fn family_defaults_follow_transformers() {
        // (model_type, kv heads, head_dim, n_ctx, tied, eps, act, sliding layers)
        let (c, l) = parse(minimal("llama")).unwrap();
        assert_eq!((c.n_kv_heads, c.d_head, c.n_ctx, c.eps), (8, 8, 2048, 1e-6));
        assert_eq!(
            (c.act, l.tied_embeddings, l.qkv_bias, l.o_bias),
            (Activation::Silu, false, false, false)
        );
        assert_eq!(c.sliding_window, None);

        // Mistral: 8 kv heads and a 4096 window on every layer unless told otherwise.
        let (c, _) = parse(minimal("mistral")).unwrap();
        assert_eq!((c.n_kv_heads, c.n_ctx), (8, 131_072));
        let sw = c.sliding_window.unwrap();
        assert_eq!((sw.window, sw.layers), (4096, vec![true; 4]));

        // Qwen2: num_key_value_heads absent is 32 (here not a divisor of 8 heads), null is
        // as many as query heads; q/k/v biases, no o bias; no sliding window by default.
        let e = parse(minimal("qwen2")).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads = 32"), "{e}");
        let mut v = minimal("qwen2");
        v["num_key_value_heads"] = Value::Null;
        let (c, l) = parse(v).unwrap();
        assert_eq!(
            (c.n_kv_heads, l.qkv_bias, l.o_bias, c.n_ctx),
            (8, true, false, 32768)
        );
        assert_eq!(c.sliding_window, None);

        // Gemma-2: head_dim 256, 4 kv heads, tied, (1 + w) gains, soft-caps 50 / 30,
        // query_pre_attn_scalar 256, even layers slide over 4096.
        let (c, l) = parse(minimal("gemma2")).unwrap();
        assert_eq!((c.d_head, c.n_kv_heads, c.n_ctx), (256, 4, 8192));
        assert_eq!((l.tied_embeddings, l.norm_gain_offset), (true, 1.0));
        assert_eq!(
            (c.attn_scale, c.attn_softcap, c.final_softcap),
            (16.0, Some(50.0), Some(30.0))
        );
        assert_eq!(
            (c.act, c.post_norms, c.embed_scale),
            (Activation::GeluNew, true, 8.0)
        );
        let sw = c.sliding_window.unwrap();
        assert_eq!(
            (sw.window, sw.layers),
            (4096, vec![true, false, true, false])
        );

        // Gemma: 16 kv heads (here more than 8 query heads: an error), tanh GELU.
        let e = parse(minimal("gemma")).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads = 16"), "{e}");

        // GPT-NeoX: LayerNorm eps 1e-5, erf GELU, parallel, rotary_pct 0.25, biases.
        let (c, l) = parse(minimal("gpt_neox")).unwrap();
        assert_eq!(
            (c.norm, c.eps, c.act, c.parallel_attn_mlp),
            (Norm::LayerNorm, 1e-5, Activation::Gelu, true)
        );
        assert_eq!(
            (l.qkv_bias, l.o_bias, l.mlp_bias, l.tied_embeddings),
            (true, true, true, false)
        );
        assert_eq!(
            c.positions,
            Positions::Rotary(Rotary {
                dim: 2,
                theta: 10_000.0,
                scaling: RopeScaling::None
            })
        );
    }

    #[test]
    fn gemma_activation_fields() {
        // The released configs' "gelu" is the tanh form; hidden_activation must not disagree.
        let mut v = minimal("gemma");
        v["num_key_value_heads"] = json!(1);
        v["hidden_act"] = json!("gelu");
        v["hidden_activation"] = json!("gelu_pytorch_tanh");
        assert_eq!(parse(v.clone()).unwrap().0.act, Activation::GeluNew);
        v["hidden_activation"] = json!("relu");
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("unsupported hidden_activation = relu"), "{e}");
        // Gemma-2 reads hidden_activation only (the hub's gemma-2-2b also has hidden_act).
        let mut v = minimal("gemma2");
        v["hidden_act"] = json!("silu");
        assert_eq!(parse(v).unwrap().0.act, Activation::GeluNew);
    }

    #[test]
    fn n_params_counts_grouped_heads_gated_mlps_and_no_rotary_table() {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/configs/llama-3.1-8b.json");
        let n = ModelConfig::from_file(&path).unwrap().n_params();
        // 8.03 B parameters (plus the few biases eap's count allows for).
        assert!((8.02e9..8.04e9).contains(&(n as f64)), "{n}");
    }
}
