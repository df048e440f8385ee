//! Transformer models: configuration, weights, one block implementation ([`Block`]: the only
//! code that computes attention heads and MLPs), and the drivers over blocks — the forward pass
//! with per-writer caches and per-reader interventions, and the activation-only backward.
//!
//! * [`ModelConfig`] — shape and conventions, read from a Hugging Face (`gpt2`, `llama`,
//!   `mistral`, `qwen2`, `gemma`, `gemma2`, `olmo`, `gpt_neox`) or a TransformerLens
//!   `config.json` ([`config`]).
//! * [`Model`] — embedding, blocks and unembedding; [`Model::load`] opens a directory or a hub id
//!   from the local Hugging Face cache ([`weights`] reads the safetensors, single or sharded,
//!   or a PyTorch `.pth` state dict through [`pth`] and the data-only [`pickle`] reader, and
//!   checks that every stored tensor is one the configuration explains).
//! * [`Model::forward`] — one batch of equal-length prompts; returns logits at the requested
//!   positions only, optionally every writer's output and the cache the backward needs, and
//!   applies a [`ReaderIntervention`] (exact edge patching, additive deltas) to reader inputs.
//! * [`Model::backward`] — from `dM/dlogits` to `dM/d in_v` for every reader `v` of DESIGN §2,
//!   layer by layer, without weight gradients.

pub mod bf16;
mod block;
pub mod config;
mod forward;
pub mod ops;
pub mod pickle;
pub mod pth;
pub mod random;
pub mod weights;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;

pub use block::{
    Attention, AttentionCache, AttentionWeights, Block, Mlp, MlpCache, MlpWeights, NormLayer,
    NormWeights, RowPositions,
};
pub use config::{Activation, CheckpointLayout, ModelConfig, Norm, Positions, WeightFormat};
pub use forward::{
    AdditiveDeltas, Batch, ForwardCache, ForwardOptions, ForwardOutput, PatchPlan, Prefix,
    ReaderGrads, ReaderIntervention, SublayerOverride, WriterSink,
};
pub use weights::EmbedWeights;

use crate::graph::Graph;
use crate::{Error, Result};
use bf16::Products;
use weights::{Checkpoint, WeightLoader};

/// The pickled TransformerLens config of an InterpBench case folder.
pub const INTERPBENCH_CONFIG: &str = "ll_model_cfg.pkl";

/// Layers are kept resident as f32 when they fit in this many bytes; larger models are read
/// from the memory-mapped file and converted one layer at a time (`EAP_RESIDENT_BYTES`).
const DEFAULT_RESIDENT_BYTES: usize = 8 << 30;

/// The largest f32 size of a model whose layers are kept resident: `EAP_RESIDENT_BYTES`, else
/// [`DEFAULT_RESIDENT_BYTES`].
fn resident_bytes_limit() -> usize {
    std::env::var("EAP_RESIDENT_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_RESIDENT_BYTES)
}

/// The largest layer (in f32 bytes) that [`Model::for_each_layer`] fetches ahead of its turn.
pub const PREFETCH_LAYER_BYTES: usize = 256 << 20;

/// Where a loaded model's weights live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Residency {
    /// Converted to f32 once and kept, when they take at most 8 GB (`EAP_RESIDENT_BYTES`);
    /// streamed otherwise. Right for many passes (ACDC, exact patching).
    #[default]
    Auto,
    /// Memory-mapped in their stored dtype; each pass converts one layer at a time and reads
    /// the vocabulary by rows. The resident set stays near one layer; each pass pays the
    /// conversion, so this suits few passes (EAP's three).
    Streamed,
    /// The layers as [`Auto`](Self::Auto) does, but the embedding and unembedding stay mapped
    /// where the checkpoint stores them by token rows, each pass reading the rows of its
    /// tokens and of the logit columns its metric reads: for few passes of a metric that reads
    /// few columns (EAP with a logit difference). No f32 copy of the vocabulary (154 MB for
    /// GPT-2, 545 MB for Qwen2.5-0.5B) is made or kept; a metric over the whole vocabulary
    /// converts it again in each pass.
    MappedVocabulary,
}

enum LayerStore {
    Resident(Vec<Arc<Block>>),
    /// Weights stay memory-mapped in their stored dtype; each use converts one layer.
    Streamed(Arc<WeightLoader>),
}

/// A transformer whose graph eap analyses.
pub struct Model {
    pub cfg: ModelConfig,
    pub device: Device,
    /// Where the model came from, for reports.
    pub name: String,
    pub(crate) embed: EmbedWeights,
    /// The norm before the unembedding.
    final_norm: NormLayer,
    layers: LayerStore,
    /// Where the embedding and unembedding stay mapped, read by rows
    /// ([`WeightLoader::vocab_rows`]): `embed` then holds empty placeholders for them.
    vocab: Option<Arc<WeightLoader>>,
    /// The precision of the layers' weight products ([`Model::set_products`]).
    products: Products,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl Model {
    /// Builds a model from weights held in memory (planted-circuit models, tests).
    pub fn from_weights(
        name: impl Into<String>,
        cfg: ModelConfig,
        embed: EmbedWeights,
        layers: Vec<Block>,
    ) -> Result<Model> {
        if layers.len() != cfg.n_layers {
            return Err(Error::invalid(format!(
                "model has {} layers in its config but {} were given",
                cfg.n_layers,
                layers.len()
            )));
        }
        let device = embed.w_e.device().clone();
        Ok(Model {
            final_norm: NormLayer::new(&cfg, embed.ln_final.clone()),
            cfg,
            device,
            name: name.into(),
            embed,
            layers: LayerStore::Resident(layers.into_iter().map(Arc::new).collect()),
            vocab: None,
            products: Products::F32,
        })
    }

    /// Opens a model directory (`config.json` + `model.safetensors`) or a hub id such as `gpt2`
    /// found in the local Hugging Face cache.
    pub fn load(spec: &str, device: &Device) -> Result<Model> {
        Self::load_with(spec, device, Residency::Auto)
    }

    /// [`load`](Self::load) with a choice of where the weights live.
    pub fn load_with(spec: &str, device: &Device, residency: Residency) -> Result<Model> {
        let dir = resolve_model_dir(spec)?;
        match residency {
            Residency::Auto => Self::load_dir(&dir, device),
            Residency::Streamed => Self::load_dir_with(&dir, device, 0),
            Residency::MappedVocabulary => {
                Self::load_dir_mapping(&dir, device, resident_bytes_limit(), true)
            }
        }
    }

    /// Opens a model directory: `config.json` beside safetensors weights (single or sharded)
    /// or beside a TransformerLens `.pth` state dict, or an InterpBench case folder
    /// (`ll_model_cfg.pkl` + `ll_model.pth`, see [`crate::eval::interpbench`]).
    pub fn load_dir(dir: &Path, device: &Device) -> Result<Model> {
        Self::load_dir_with(dir, device, resident_bytes_limit())
    }

    /// [`load_dir`](Self::load_dir), keeping the weights resident as f32 only when they take at
    /// most `resident_bytes`; otherwise they stay memory-mapped and each pass converts one layer
    /// at a time, and reads only the embedding rows of its tokens and the unembedding in blocks
    /// of rows (Hugging Face GPT-2, Llama and NeoX layouts).
    pub fn load_dir_with(dir: &Path, device: &Device, resident_bytes: usize) -> Result<Model> {
        Self::load_dir_mapping(dir, device, resident_bytes, false)
    }

    /// [`load_dir_with`](Self::load_dir_with), with the vocabulary matrices mapped (read by
    /// rows) when `map_vocab` even if the layers are resident, where the checkpoint allows.
    fn load_dir_mapping(
        dir: &Path,
        device: &Device,
        resident_bytes: usize,
        map_vocab: bool,
    ) -> Result<Model> {
        let config_path = dir.join("config.json");
        let pickled = dir.join(INTERPBENCH_CONFIG);
        let (cfg, layout) = if config_path.exists() {
            ModelConfig::read(&config_path)?
        } else if pickled.exists() {
            ModelConfig::read_pickle(&pickled)?
        } else {
            return Err(Error::Config {
                path: config_path,
                message: format!(
                    "no config.json in the model directory (nor an InterpBench \
                     {INTERPBENCH_CONFIG})"
                ),
            });
        };
        let loader = Arc::new(WeightLoader::new(
            Checkpoint::discover(dir)?,
            &cfg,
            layout,
            device,
        )?);
        let resident = cfg.n_params().saturating_mul(4) <= resident_bytes;
        let vocab_mapped = (map_vocab || !resident) && loader.can_map_vocab();
        let embed = match vocab_mapped {
            false => loader.embed()?,
            true => loader.embed_mapped()?,
        };
        let layers = if resident {
            let layers = (0..cfg.n_layers)
                .map(|i| loader.layer(i).map(Arc::new))
                .collect::<Result<Vec<_>>>()?;
            loader.check_all_used()?;
            LayerStore::Resident(layers)
        } else {
            // Check every layer's tensors up front so a malformed file fails at load time.
            for i in 0..cfg.n_layers {
                loader.check_layer(i)?;
            }
            loader.check_all_used()?;
            LayerStore::Streamed(loader.clone())
        };
        Ok(Model {
            final_norm: NormLayer::new(&cfg, embed.ln_final.clone()),
            cfg,
            device: device.clone(),
            name: dir.display().to_string(),
            embed,
            layers,
            vocab: vocab_mapped.then_some(loader),
            products: Products::F32,
        })
    }

    /// Whether each pass converts the layers from the mapped checkpoint.
    pub fn layers_streamed(&self) -> bool {
        matches!(self.layers, LayerStore::Streamed(_))
    }

    /// Converts streamed layers to f32 once and keeps them, when they take at most the
    /// resident limit (8 GB, `EAP_RESIDENT_BYTES`): for a run whose passes turn out to be
    /// many. The vocabulary stays mapped. Returns whether the layers are now resident.
    pub fn make_layers_resident(&mut self) -> Result<bool> {
        let LayerStore::Streamed(loader) = &self.layers else {
            return Ok(true);
        };
        if self.cfg.n_params().saturating_mul(4) > resident_bytes_limit() {
            return Ok(false);
        }
        let layers = (0..self.cfg.n_layers)
            .map(|i| self.load_layer(loader, i).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        self.layers = LayerStore::Resident(layers);
        Ok(true)
    }

    /// Makes the layers' weight products f32 (the default) or bf16 ([`Products`]). Resident
    /// layers keep their bf16 packings from their first use on; streamed layers pack theirs in
    /// each pass, and from a bf16 checkpoint take their MLP matrices as stored, without the
    /// f32 conversion ([`WeightLoader::layer_with`]).
    pub fn set_products(&mut self, products: Products) {
        self.products = products;
        if let LayerStore::Resident(layers) = &mut self.layers {
            for layer in layers {
                Arc::make_mut(layer).set_products(products);
            }
        }
    }

    /// The precision of the layers' weight products.
    pub fn products(&self) -> Products {
        self.products
    }

    /// Layer `i` converted from the mapped checkpoint, set to this model's products.
    fn load_layer(&self, loader: &WeightLoader, i: usize) -> Result<Block> {
        let mut layer = loader.layer_with(i, self.products == Products::Bf16)?;
        layer.set_products(self.products);
        Ok(layer)
    }

    /// Layer `i` (a shared handle when resident), its weights converted to f32 but for the MLP
    /// matrices a bf16 checkpoint keeps as stored when streamed with bf16 products.
    pub fn layer(&self, i: usize) -> Result<Arc<Block>> {
        match &self.layers {
            LayerStore::Resident(layers) => Ok(layers[i].clone()),
            LayerStore::Streamed(loader) => Ok(Arc::new(self.load_layer(loader, i)?)),
        }
    }

    /// Calls `f` with each layer of `order` in turn. A streamed model fetches the next layer
    /// on a helper thread, converted and packed for the forward (or with `backward`, the
    /// backward), while `f` works on the current one: the conversion (5 ms per GPT-2 layer in
    /// bf16, and as much again for its packing) fills the moments the computation leaves a
    /// core idle instead of adding to them. One layer is fetched ahead at most, and only for
    /// layers of at most [`PREFETCH_LAYER_BYTES`] in f32; larger ones (Llama-3.1-8B's 0.87 GB)
    /// are fetched in turn, so that the peak memory stays near one layer.
    pub fn for_each_layer(
        &self,
        order: impl Iterator<Item = usize>,
        backward: bool,
        mut f: impl FnMut(usize, &Block) -> Result<()>,
    ) -> Result<()> {
        let order: Vec<usize> = order.collect();
        let prefetch = matches!(self.layers, LayerStore::Streamed(_))
            && order.len() > 1
            && self.cfg.layer_params().saturating_mul(4) <= PREFETCH_LAYER_BYTES;
        if !prefetch {
            for &l in &order {
                let block = self.layer(l)?;
                f(l, &block)?;
            }
            return Ok(());
        }
        std::thread::scope(|scope| {
            // A rendezvous: the helper hands a layer over only when `f` asks for the next one,
            // so at most one layer waits while another is in use.
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(usize, Arc<Block>)>>(0);
            let order = &order;
            scope.spawn(move || {
                for &l in order {
                    let fetched = self.layer(l).and_then(|b| {
                        b.prepare(backward)?;
                        Ok((l, b))
                    });
                    let failed = fetched.is_err();
                    // The receiver is gone once `f` failed: stop fetching.
                    if tx.send(fetched).is_err() || failed {
                        break;
                    }
                }
            });
            for _ in 0..order.len() {
                let (l, block) = match rx.recv() {
                    Ok(fetched) => fetched?,
                    Err(_) => return Err(Error::invalid("the layer-fetching thread stopped")),
                };
                f(l, &block)?;
            }
            Ok(())
        })
    }

    /// The embedding weights; in a streamed model whose vocabulary stays mapped, `w_e` and
    /// `w_u` are empty placeholders (the rows are read on demand).
    pub fn embed_weights(&self) -> &EmbedWeights {
        &self.embed
    }

    /// The loader of a model whose vocabulary matrices stay mapped (read by rows).
    pub(crate) fn mapped_vocab(&self) -> Option<&WeightLoader> {
        self.vocab.as_deref()
    }

    /// The edge graph of this model (DESIGN §2).
    pub fn graph(&self) -> Graph {
        self.cfg.graph()
    }

    /// Matmul FLOPs of one forward over `n_tokens` tokens (sequences of `seq_len`) that unembeds
    /// `logits.0` rows at `logits.1` vocabulary columns.
    pub fn forward_flops(&self, n_tokens: usize, seq_len: usize, logits: (usize, usize)) -> f64 {
        let c = &self.cfg;
        let (d, hd) = (c.d_model as f64, (c.n_heads * c.d_head) as f64);
        let kvd = (c.n_kv_heads * c.d_head) as f64;
        let n = n_tokens as f64;
        // Q and O over every query head, K and V over the key/value heads; scores and mixing.
        let attn = 2.0 * n * d * (2.0 * hd + 2.0 * kvd) + 2.0 * 2.0 * n * seq_len as f64 * hd;
        c.n_layers as f64 * attn + self.all_mlp_flops(n, logits.0) + Self::unembed_flops(d, logits)
    }

    /// Matmul FLOPs of the activation-only backward EAP runs after such a forward: each GEMM
    /// of the forward once more, transposed, except that every query head's key and value
    /// inputs get their own gradient (each head reads its own copy of the stream: `[N, d_head]
    /// × [d_head, d]` per query head and letter, more than the forward's grouped keys and
    /// values), and the attention's four small products (`dP`, `dV`, `dQ`, `dK`) against the
    /// forward's two.
    pub fn backward_flops(&self, n_tokens: usize, seq_len: usize, logits: (usize, usize)) -> f64 {
        let c = &self.cfg;
        let (d, hd) = (c.d_model as f64, (c.n_heads * c.d_head) as f64);
        let n = n_tokens as f64;
        let attn = 2.0 * n * d * 4.0 * hd + 4.0 * 2.0 * n * seq_len as f64 * hd;
        c.n_layers as f64 * attn + self.all_mlp_flops(n, logits.0) + Self::unembed_flops(d, logits)
    }

    /// Every layer's MLP over `n` rows, but the last one's over the `logit_rows` the metric
    /// reads when they are fewer: nothing else reads its output (the forward's `last_mlp_rows`).
    fn all_mlp_flops(&self, n: f64, logit_rows: usize) -> f64 {
        let last = (logit_rows as f64).min(n);
        match self.cfg.n_layers {
            0 => 0.0,
            l => (l - 1) as f64 * self.mlp_flops(n) + self.mlp_flops(last),
        }
    }

    fn mlp_flops(&self, n: f64) -> f64 {
        let c = &self.cfg;
        let matrices = if c.gated_mlp { 3.0 } else { 2.0 };
        c.d_mlp
            .map_or(0.0, |m| matrices * 2.0 * n * c.d_model as f64 * m as f64)
    }

    fn unembed_flops(d: f64, (rows, cols): (usize, usize)) -> f64 {
        2.0 * rows as f64 * d * cols as f64
    }
}

/// Finds the directory of a model: a path, or a hub id in the local Hugging Face cache
/// (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
pub fn resolve_model_dir(spec: &str) -> Result<PathBuf> {
    resolve_model_dir_in(spec, hub_cache_dir().as_deref())
}

/// The local Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`; `None` when none of these variables is set.
pub fn hub_cache_dir() -> Option<PathBuf> {
    std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
        })
}

/// [`resolve_model_dir`] with an explicit hub cache (`None`: no cache), independent of the
/// environment.
pub fn resolve_model_dir_in(spec: &str, cache: Option<&Path>) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        return Err(Error::Config {
            path: path.to_path_buf(),
            message: "expected a model directory holding config.json and model.safetensors".into(),
        });
    }
    if spec.starts_with(['/', '.', '~']) || spec.matches('/').count() > 1 {
        return Err(Error::Config {
            path: path.to_path_buf(),
            message: "no such model directory".into(),
        });
    }
    let not_found = |searched: String| Error::Config {
        path: path.to_path_buf(),
        message: format!(
            "no such directory, and no hub snapshot {searched}; eap does not download \
             (HF_HUB_OFFLINE semantics): fetch it once with `huggingface-cli download {spec}`"
        ),
    };
    let Some(cache) = cache else {
        return Err(not_found(
            "(no cache directory: HF_HUB_CACHE, HF_HOME and HOME are unset)".into(),
        ));
    };
    let repo = cache.join(format!("models--{}", spec.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    // Prefer the revision `refs/main` points at; otherwise the newest snapshot.
    if let Ok(main) = std::fs::read_to_string(repo.join("refs/main")) {
        let dir = snapshots.join(main.trim());
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<_> = std::fs::read_dir(&snapshots)
        .map_err(|_| not_found(format!("in {}", snapshots.display())))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("config.json").exists())
        .collect();
    candidates.sort_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
    candidates
        .pop()
        .map(|e| e.path())
        .ok_or_else(|| not_found(format!("with a config.json in {}", snapshots.display())))
}
