//! `weighted-vote`: a saturated previous-token head `a0.h1` marks the words that follow a `!`;
//! the vote head `a1.h2` averages word polarities with *soft* attention that favours the marked
//! words (K-composition); the unembedding reads the vote.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::spec::{code, leak, previous_token_qk, self_qk, write_positions, Spec};
use crate::tasks::{Dataset, Example, Metric, Target};

pub(crate) const D: usize = 48;
const TOK: usize = 0; // 16 dims: word code
const BOS_DIM: usize = 16;
const MOD: usize = 17; // flag: the token is `!`
const POL: usize = 18; // word polarity: +1, −1 or 0
const AMP: usize = 19; // the previous token is `!` (a0.h1)
const VOTE: usize = 20; // the weighted mean polarity (a1.h2), read by the unembedding
const POS: usize = 21; // 8 dims
const DIS: usize = 29; // 19 dims: distractor scratch space

const BOS: u32 = 0;
const BANG: u32 = 1;
const POS0: u32 = 2; // 8 positive words
const NEG0: u32 = 10; // 8 negative words
const NEU0: u32 = 18; // 10 neutral words
const QUERY: u32 = 28;
const YES: u32 = 29; // "positive"
const NO: u32 = 30; // "negative"
pub(crate) const VOCAB: usize = 31;
pub(crate) const N_CTX: usize = 16;
/// Attention gain of the vote head on marked words: weights `e^ALPHA : 1`, soft.
pub(crate) const ALPHA: f32 = 2.0;
/// Weight of the scratch space in the unembedding ([`leak`]): distractors move the metric a
/// little.
const LEAK: f32 = 3.0;
const BETA: f32 = 5.0;

pub(crate) const TRUTH: &[&str] = &[
    "input->a0.h1<v>",
    "a0.h1->a1.h2<k>",
    "input->a1.h2<v>",
    "a1.h2->logits",
];

pub(crate) fn spec() -> Spec {
    let mut s = Spec::new(2, 4, D, 16, None, VOCAB, N_CTX);
    s.emb(BOS as usize, BOS_DIM, 1.0);
    s.emb(BANG as usize, MOD, 1.0);
    for w in 0..26u32 {
        let tok = (POS0 + w) as usize;
        for (j, x) in code(16, w as usize).into_iter().enumerate() {
            s.emb(tok, TOK + j, x);
        }
        let pol = if w < 8 {
            1.0
        } else if w < 16 {
            -1.0
        } else {
            0.0
        };
        s.emb(tok, POL, pol);
    }
    write_positions(&mut s, POS);
    leak(&mut s, DIS, 19, LEAK);
    s.unembed(VOTE, YES as usize, BETA);
    s.unembed(VOTE, NO as usize, -BETA);

    // ---- layer 0 ----
    // a0.h0 (distractor): soft BOS head copying word-code dims 0..4 into DIS 0..4.
    s.head(0, 0).bq(0, 1.0).k(BOS_DIM, 0, 2.0).copy(TOK, DIS, 4);
    // a0.h1 (circuit): previous-token head; AMP = [previous token is `!`].
    previous_token_qk(s.head(0, 1), POS, 20.0);
    s.head(0, 1).v(MOD, 0, 1.0).o(0, AMP, 1.0);
    // a0.h2 (distractor): duplicate-word head, "seen before" into DIS 4.
    for j in 0..16 {
        s.head(0, 2).q(TOK + j, j, 8.0).k(TOK + j, j, 1.0);
    }
    s.head(0, 2).bq(0, 4.0).k(BOS_DIM, 0, 1.0);
    s.head(0, 2).v(BOS_DIM, 0, 1.0).o(0, DIS + 4, -1.0);
    // a0.h3 (distractor): current-token head; copies the polarity (a circuit subspace) and a
    // projection of the word code into DIS 5..8.
    self_qk(s.head(0, 3), POS, 10.0);
    s.head(0, 3).v(POL, 0, 1.0).o(0, DIS + 5, 1.0);
    for j in 0..8 {
        s.head(0, 3).v(TOK + 2 * j, 1, 0.5);
    }
    s.head(0, 3).o(1, DIS + 6, 1.0).o(1, DIS + 7, -0.5);

    // ---- layer 1 ----
    // a1.h0 (distractor): query from the duplicate flag, keys from BOS; DIS 0..4 into DIS 8..12.
    s.head(1, 0).q(DIS + 4, 0, 3.0).k(BOS_DIM, 0, 1.0);
    for j in 0..4 {
        s.head(1, 0).v(DIS + j, j, 1.0).o(j, DIS + 8 + j, 1.0);
    }
    // a1.h1 (distractor): an "anti-vote" head, the mirror image of a1.h2: it avoids marked words
    // and averages polarities into DIS 12.
    s.head(1, 1)
        .bq(0, 1.0)
        .k(AMP, 0, -ALPHA)
        .v(POL, 0, 1.0)
        .o(0, DIS + 12, 1.0);
    // a1.h2 (circuit): the vote head. Constant query, key = AMP with gain ALPHA (soft), value =
    // polarity; writes the weighted mean polarity into VOTE.
    s.head(1, 2)
        .bq(0, 1.0)
        .k(AMP, 0, ALPHA)
        .v(POL, 0, 1.0)
        .o(0, VOTE, 1.0);
    // a1.h3 (distractor): previous-token head reading AMP, MOD and DIS 5 into DIS 13..16.
    previous_token_qk(s.head(1, 3), POS, 20.0);
    s.head(1, 3)
        .v(AMP, 0, 1.0)
        .v(MOD, 1, 1.0)
        .v(DIS + 5, 2, 1.0)
        .o(0, DIS + 13, 1.0)
        .o(1, DIS + 14, 1.0)
        .o(2, DIS + 15, 1.0);
    s
}

/// BOS, a shuffle of two marked units `! w` with polarity `sign` and eight plain words (four of
/// polarity −sign, two of +sign, two neutral), then the query token: 14 tokens. Unmarked, the
/// words would vote −sign; the marks decide.
fn prompt(rng: &mut ChaCha8Rng, sign: bool) -> Vec<u32> {
    let word = |rng: &mut ChaCha8Rng, positive: bool| {
        if positive {
            POS0 + rng.random_range(0..8)
        } else {
            NEG0 + rng.random_range(0..8)
        }
    };
    let mut units: Vec<Vec<u32>> = Vec::new();
    for _ in 0..2 {
        units.push(vec![BANG, word(rng, sign)]);
    }
    for _ in 0..4 {
        units.push(vec![word(rng, !sign)]);
    }
    for _ in 0..2 {
        units.push(vec![word(rng, sign)]);
    }
    for _ in 0..2 {
        units.push(vec![NEU0 + rng.random_range(0..10)]);
    }
    units.shuffle(rng);
    std::iter::once(BOS)
        .chain(units.into_iter().flatten())
        .chain(std::iter::once(QUERY))
        .collect()
}

pub(crate) fn dataset(n: usize, seed: u64) -> (Dataset, Metric) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut examples = Vec::with_capacity(n);
    for _ in 0..n {
        let sign = rng.random_bool(0.5);
        let (answer, wrong) = if sign { (YES, NO) } else { (NO, YES) };
        examples.push(Example {
            clean: prompt(&mut rng, sign),
            corrupted: prompt(&mut rng, !sign),
            target: Target {
                answers: vec![answer],
                wrongs: vec![wrong],
            },
        });
    }
    (
        Dataset {
            name: "planted-weighted-vote".into(),
            examples,
        },
        Metric::LogitDiff,
    )
}
