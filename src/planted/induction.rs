//! `induction`: previous-token head `a0.h1` → (K-composition) → induction head `a1.h2`.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::spec::{code, leak, previous_token_qk, self_qk, write_positions, Spec};
use crate::tasks::{Dataset, Example, Metric, Target};

pub(crate) const D: usize = 64;
const TOK: usize = 0; // 16 dims: token code
const PREV: usize = 16; // 16 dims: previous token's code (a0.h1)
const OUT: usize = 32; // 16 dims: predicted next token (a1.h2), read by the unembedding
const POS: usize = 48; // 8 dims: position code
const BOS_DIM: usize = 56;
const DIS: usize = 57; // 7 dims: distractor scratch space
pub(crate) const VOCAB: usize = 33;
pub(crate) const N_CTX: usize = 16;
/// Distinct tokens in the repeated half; sequences are `BOS, A1..A7, A1..A6` (14 tokens).
pub(crate) const K: usize = 7;
/// Weight of the scratch space in the unembedding ([`leak`]): distractors move the metric a
/// little.
const LEAK: f32 = 1.0;
const BETA: f32 = 10.0;

pub(crate) const TRUTH: &[&str] = &[
    "input->a0.h1<v>",
    "a0.h1->a1.h2<k>",
    "input->a1.h2<q>",
    "input->a1.h2<v>",
    "a1.h2->logits",
];

pub(crate) fn spec() -> Spec {
    let mut s = Spec::new(2, 4, D, 16, None, VOCAB, N_CTX);
    // Embedding: BOS = token 0 sets its flag; token t ≥ 1 is code(16, t − 1).
    s.emb(0, BOS_DIM, 1.0);
    for t in 1..VOCAB {
        for (j, x) in code(16, t - 1).into_iter().enumerate() {
            s.emb(t, TOK + j, x);
            s.unembed(OUT + j, t, BETA * x);
        }
    }
    write_positions(&mut s, POS);
    leak(&mut s, DIS, 7, LEAK);

    // ---- layer 0 ----
    // a0.h0 (distractor): soft attention towards BOS, copies token dims 0..4 into DIS 0..4.
    s.head(0, 0).bq(0, 1.0).k(BOS_DIM, 0, 2.0).copy(TOK, DIS, 4);
    // a0.h1 (circuit): previous-token head on positions; copies the token code into PREV.
    previous_token_qk(s.head(0, 1), POS, 20.0);
    s.head(0, 1).copy(TOK, PREV, 16);
    // a0.h2 (distractor): duplicate-token head (query and key are the token code, BOS is the
    // sink); writes minus its attention on BOS into DIS 4 ("seen before").
    for j in 0..16 {
        s.head(0, 2).q(TOK + j, j, 8.0).k(TOK + j, j, 1.0);
    }
    s.head(0, 2).bq(0, 4.0).k(BOS_DIM, 0, 1.0);
    s.head(0, 2).v(BOS_DIM, 0, 1.0).o(0, DIS + 4, -1.0);
    // a0.h3 (distractor): current-token head on positions; writes two projections of the token
    // code into DIS 5..7.
    self_qk(s.head(0, 3), POS, 10.0);
    for j in 0..8 {
        s.head(0, 3).v(TOK + j, 0, 0.5).v(TOK + 8 + j, 1, 0.5);
    }
    s.head(0, 3).o(0, DIS + 5, 1.0).o(1, DIS + 6, 1.0);

    // ---- layer 1 ----
    // a1.h0 (distractor): query from the duplicate flag, keys from BOS; reads DIS 0..4.
    s.head(1, 0)
        .q(DIS + 4, 0, 3.0)
        .k(BOS_DIM, 0, 1.0)
        .bq(1, 1.0);
    for j in 0..4 {
        s.head(1, 0).v(DIS + j, j, 1.0).o(j, DIS + j, 0.5);
    }
    // a1.h1 (distractor): current-token head reading the previous-token subspace (a0.h1's
    // output) and DIS 5..7, writing into DIS 5..7.
    self_qk(s.head(1, 1), POS, 6.0);
    for j in 0..8 {
        s.head(1, 1).v(PREV + j, 0, 0.3).v(PREV + 8 + j, 1, -0.3);
    }
    s.head(1, 1).o(0, DIS + 5, 1.0).o(1, DIS + 6, 1.0);
    // a1.h2 (circuit): induction head. Query = current token, key = previous token (K-composition
    // with a0.h1), value = token; writes the attended token's code into OUT.
    for j in 0..16 {
        s.head(1, 2).q(TOK + j, j, 20.0).k(PREV + j, j, 1.0);
    }
    s.head(1, 2).copy(TOK, OUT, 16);
    // a1.h3 (distractor): a soft "pseudo-induction" head with a permuted key, so it reads the
    // same subspaces as the induction head, attends elsewhere, and writes into DIS 0..4.
    for j in 0..16 {
        s.head(1, 3)
            .q(TOK + j, (j + 5) % 16, 4.0)
            .k(PREV + j, j, 1.0);
    }
    for j in 0..4 {
        s.head(1, 3).v(TOK + 4 * j, j, 1.0).o(j, DIS + j, 1.0);
    }
    s
}

/// A token with Hadamard row `row` and sign `neg`.
fn token(row: usize, neg: bool) -> u32 {
    1 + row as u32 + if neg { 16 } else { 0 }
}

pub(crate) fn dataset(n: usize, seed: u64) -> (Dataset, Metric) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut examples = Vec::with_capacity(n);
    for _ in 0..n {
        // 2K distinct Hadamard rows: no two tokens of an example are equal or antipodal.
        let mut rows: Vec<usize> = (0..16).collect();
        rows.shuffle(&mut rng);
        let toks: Vec<u32> = rows[..2 * K]
            .iter()
            .map(|&r| token(r, rng.random_bool(0.5)))
            .collect();
        let (a, b) = toks.split_at(K);
        let seq = |x: &[u32]| -> Vec<u32> {
            std::iter::once(0)
                .chain(x.iter().copied())
                .chain(x[..K - 1].iter().copied())
                .collect()
        };
        examples.push(Example {
            clean: seq(a),
            corrupted: seq(b),
            target: Target {
                answers: vec![a[K - 1]],
                wrongs: vec![b[K - 1]],
            },
        });
    }
    (
        Dataset {
            name: "planted-induction".into(),
            examples,
        },
        Metric::LogitDiff,
    )
}
