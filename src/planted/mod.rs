//! Planted-circuit models: small transformers built in code whose weights implement a known
//! algorithm by construction, surrounded by distractor heads and MLPs that do real but
//! task-irrelevant work. Each comes with its task (a seeded clean/corrupted generator and a
//! metric) and its ground-truth edge set, so attribution methods can be scored against a truth
//! that is known rather than found.
//!
//! ```no_run
//! use eap::planted::{build, dataset, PlantedKind};
//! let device = candle_core::Device::Cpu;
//! let planted = build(PlantedKind::Induction, &device)?;
//! let (data, metric) = dataset(PlantedKind::Induction, 32, 0)?;
//! # Ok::<(), eap::Error>(())
//! ```
//!
//! # How they are built
//!
//! No normalisation (`Norm::None`), ReLU MLPs, learned positions in the residual stream, causal
//! attention with scale 1 (a score is `q · k` as written), all biases zero except where stated.
//! The residual stream is cut into orthogonal subspaces: token identity, position, "previous
//! token", the answer, a few flags, and a distractor scratch space. Tokens and positions are
//! Hadamard codes: `code(n, i)`, `i < 2n`, is `±` row `i mod n` of the `n × n` Hadamard matrix
//! over `√n`, so two codes have inner product 1 (equal), −1 (antipodal) or 0 — 32 tokens fit in
//! 16 dimensions and 16 positions in 8 with exact attention. A previous-token pattern is the
//! linear shift `code(i) ↦ code(i − 1)` on the position codes (linear because it commutes with
//! negation, `code(i + 8) = −code(i)`).
//!
//! Distractor heads and MLPs read any subspace — including the circuit's own, so their edges
//! carry large clean-vs-corrupted differences — but write only into the scratch space, which
//! no circuit reader reads. The unembedding reads the scratch space weakly (fixed
//! pseudo-random weights `±LEAK` per dimension and token), so distractors move the metric a
//! little: a few percent of the weakest truth edge per edge, never enough to matter (measured
//! by the tests: faithfulness ≥ 0.99 with every non-circuit edge patched). Without the leak
//! every non-circuit edge would score exactly 0 under any method, and a ranking would only
//! have to give the truth a non-zero score.
//!
//! # Which edges are in the truth
//!
//! The truth holds the edges through which the clean−corrupted difference reaches the metric.
//! Edges that carry only information identical in the clean and the corrupted prompt are not in
//! it, because resampling ablation cannot see them and no patching-based method could: the
//! position inputs of a previous-token head (`input->a0.h1<q>`, `<k>`: positions are the same in
//! both runs) and the query of a head whose query is a constant bias. Corruptions are chosen
//! so that every edge that carries task information is visible: the corrupted prompt is an
//! independent prompt of the same task (other tokens, other positions), not a minimal edit.
//!
//! ## `induction` — 2 layers × 4 heads, attention only, d_model 64, vocab 33, 14 tokens
//!
//! Subspaces: token code (16), previous-token code (16), output code (16), position (8), BOS
//! flag (1), scratch (7). Prompt `BOS A1…A7 A1…A6`, answer A7; the corrupted prompt is
//! `BOS B1…B7 B1…B6` with fresh tokens (no two tokens of a pair equal or antipodal), the wrong
//! answer B7; metric logit difference (clean ≈ +10, corrupted ≈ −10).
//!
//! * `a0.h1` previous-token head: query/key on positions (gain 20, saturated), value = token
//!   code, written into the previous-token subspace.
//! * `a1.h2` induction head: query = token code (gain 20, saturated), key = previous-token code
//!   (K-composition with `a0.h1`), value = token code, written into the output subspace; the
//!   unembedding maps output code `c` to logits `10 · ⟨c, code(t)⟩`.
//! * Distractors: `a0.h0` soft BOS head, `a0.h2` duplicate-token head, `a0.h3` current-token
//!   head; `a1.h0` reads the duplicate flag, `a1.h1` reads the previous-token subspace, `a1.h3`
//!   is a soft "pseudo-induction" head reading the same token and previous-token subspaces as
//!   `a1.h2` with a permuted query — all write into scratch.
//!
//! Truth (5 of 81 edges): `input->a0.h1<v>`, `a0.h1->a1.h2<k>`, `input->a1.h2<q>`,
//! `input->a1.h2<v>`, `a1.h2->logits`. Patching a q/k edge alone leaves the induction head with
//! no match (uniform attention, logit difference ≈ 10/14); patching a v edge or the output
//! makes it predict B7.
//!
//! ## `greater-than` — 2 layers × 4 heads with MLPs (d_mlp 48), d_model 64, vocab 58, 12 tokens
//!
//! A two-token number `N = 4·hi + lo` (tokens `H_hi`, `L_lo`, adjacent, at a random position
//! among 32 filler tokens) followed by the query token; the answers are the 16 tokens `Y_y`,
//! metric probability difference `P(y > N) − P(y ≤ N)` (Greater-Than's). The corrupted prompt
//! has a number smaller by at least 5, a different high and low digit, at another position.
//!
//! * `a0.h0`, `a0.h1` movers (cooperating): constant query; key = the high-digit (low-digit)
//!   flag, score 20, with BOS as sink (score 10); value = digit + 1; written into one dimension
//!   each at the last position.
//! * `m1` comparator: 32 neurons, `ReLU(x − y + 1) − ReLU(x − y) = [N ≥ y]` with
//!   `x = 4·(hi + 1) + (lo + 1) − 5`, writing `6 · [y > N]` into answer dimension `y`; the
//!   unembedding reads the answer dimensions (non-answer tokens have logit bias −10). 16 more
//!   neurons of `m1` compute features of the scratch space.
//! * Distractors: `a0.h2` previous-token head copying fillers, `a0.h3` duplicate-token head,
//!   `m0` 16 ReLU features of fillers, `a1.h0` reads the movers' outputs, `a1.h1` reads fillers
//!   with K-composition on `a0.h2`, `a1.h2`/`a1.h3` read `m0` and the duplicate flag.
//!
//! Truth (7 of 110 edges): `input->a0.h0<k>`, `input->a0.h0<v>`, `input->a0.h1<k>`,
//! `input->a0.h1<v>`, `a0.h0->m1`, `a0.h1->m1`, `m1->logits`. The movers' queries are biases.
//! Digits are stored as digit + 1 so that attending to a filler (value 0) always changes `N`.
//!
//! ## `weighted-vote` — 2 layers × 4 heads, attention only, d_model 48, vocab 31, 14 tokens
//!
//! The soft one. Words have polarity +1 (8 words), −1 (8) or 0 (10); a `!` marks the next word.
//! Prompt: BOS, a shuffle of two marked words of polarity `s`, four plain words of polarity
//! `−s`, two of `s` and two neutral, then the query token; answer `positive`/`negative` by `s`,
//! metric logit difference (≈ ±4.8). Unmarked, the words would vote `−s`: the marks decide.
//! The corrupted prompt is an independent prompt of the opposite sentiment.
//!
//! * `a0.h1` previous-token head (saturated): value = the `!` flag, written into AMP.
//! * `a1.h2` vote head: constant query, key = AMP with gain `ALPHA = 2` (attention weights
//!   `e² : 1`, far from saturated), value = polarity, written into VOTE; the unembedding gives
//!   `positive` `5 · VOTE` and `negative` `−5 · VOTE`.
//! * Distractors: `a0.h0` soft BOS head, `a0.h2` duplicate-word head, `a0.h3` current-token head
//!   copying the polarity, `a1.h0` reads the duplicate flag, `a1.h1` the mirror-image
//!   "anti-vote" head (key −AMP, value polarity), `a1.h3` previous-token head reading AMP.
//!
//! Truth (4 of 81 edges): `input->a0.h1<v>`, `a0.h1->a1.h2<k>`, `input->a1.h2<v>`,
//! `a1.h2->logits`.
//!
//! # What a first-order method sees
//!
//! Measured on 32 examples (seed 7; `first_order_attribution_on_the_planted_models`): plain EAP
//! reaches ROC AUC 0.91 on `induction` (the saturated induction head's q and k edges get
//! scores of ~0, while exact patching gives them −9.3), 0.96 on `greater-than` (the movers'
//! key edges, saturated, get ~0) and 1.0 on `weighted-vote`, whose k edge EAP scores −5.4
//! against −4.1 by exact patching.

mod greater_than;
mod induction;
mod patch;
mod spec;
mod weighted_vote;

#[cfg(test)]
mod tests;

use std::fmt;

use candle_core::Device;

use crate::graph::Circuit;
use crate::model::Model;
use crate::tasks::{Dataset, Metric};
use crate::{Error, Result};

pub use patch::{patched_metric, Patcher};

/// The planted-circuit models, spelled on the command line as [`PlantedKind::name`] gives
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum PlantedKind {
    /// Previous-token head → induction head (K-composition), saturated attention.
    Induction,
    /// Two cooperating mover heads feed a comparator MLP (Greater-Than-like).
    GreaterThan,
    /// A soft-attention vote head keyed by a previous-token head.
    WeightedVote,
}

impl PlantedKind {
    pub const ALL: [PlantedKind; 3] = [
        PlantedKind::Induction,
        PlantedKind::GreaterThan,
        PlantedKind::WeightedVote,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PlantedKind::Induction => "induction",
            PlantedKind::GreaterThan => "greater-than",
            PlantedKind::WeightedVote => "weighted-vote",
        }
    }

    fn truth_names(self) -> &'static [&'static str] {
        match self {
            PlantedKind::Induction => induction::TRUTH,
            PlantedKind::GreaterThan => greater_than::TRUTH,
            PlantedKind::WeightedVote => weighted_vote::TRUTH,
        }
    }

    fn summary(self) -> &'static str {
        match self {
            PlantedKind::Induction => {
                "planted induction: 2 layers x 4 heads, attention only, d_model 64, vocab 33; \
                 a0.h1 previous-token head -> (K-composition) a1.h2 induction head -> logits; \
                 saturated attention; six distractor heads write into a scratch subspace"
            }
            PlantedKind::GreaterThan => {
                "planted greater-than: 2 layers x 4 heads with MLPs (d_mlp 48), d_model 64, \
                 vocab 58; movers a0.h0 (high digit) and a0.h1 (low digit) -> comparator MLP m1 \
                 -> logits; distractor heads, m0 and 16 neurons of m1 write into scratch"
            }
            PlantedKind::WeightedVote => {
                "planted weighted-vote: 2 layers x 4 heads, attention only, d_model 48, vocab 31; \
                 a0.h1 previous-token head marks words after '!' -> (K-composition, soft \
                 attention e^2:1) a1.h2 vote head averages polarities -> logits"
            }
        }
    }
}

impl fmt::Display for PlantedKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A planted model with its ground-truth circuit.
#[derive(Debug)]
pub struct PlantedModel {
    pub model: Model,
    pub truth: Circuit,
    pub description: String,
}

/// Builds the model of `kind` on `device` (deterministic: no randomness in the weights).
pub fn build(kind: PlantedKind, device: &Device) -> Result<PlantedModel> {
    let spec = match kind {
        PlantedKind::Induction => induction::spec(),
        PlantedKind::GreaterThan => greater_than::spec(),
        PlantedKind::WeightedVote => weighted_vote::spec(),
    };
    let model = spec.into_model(&format!("planted:{}", kind.name()), device)?;
    let graph = model.graph();
    let mut truth = Circuit::empty(graph);
    for name in kind.truth_names() {
        let (w, r) = graph.parse_edge(name)?;
        truth.set(w, r, true);
    }
    let description = format!(
        "{}. Ground truth: {} of {} edges: {}",
        kind.summary(),
        truth.n_edges(),
        graph.n_edges(),
        kind.truth_names().join(", ")
    );
    Ok(PlantedModel {
        model,
        truth,
        description,
    })
}

/// `n` clean/corrupted examples of `kind`'s task from `seed`, and the task's metric. Clean and
/// corrupted prompts of an example have equal lengths (all examples of a kind do).
pub fn dataset(kind: PlantedKind, n: usize, seed: u64) -> Result<(Dataset, Metric)> {
    if n == 0 {
        return Err(Error::invalid("planted dataset: n must be at least 1"));
    }
    Ok(match kind {
        PlantedKind::Induction => induction::dataset(n, seed),
        PlantedKind::GreaterThan => greater_than::dataset(n, seed),
        PlantedKind::WeightedVote => weighted_vote::dataset(n, seed),
    })
}
