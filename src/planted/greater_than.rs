//! `greater-than`: two mover heads `a0.h0` (high digit) and `a0.h1` (low digit) bring a
//! two-token number to the last position; the MLP `m1` compares it with every answer.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::spec::{code, leak, previous_token_qk, write_positions, Spec};
use crate::tasks::{Dataset, Example, Metric, Target};

pub(crate) const D: usize = 64;
const TOK: usize = 0; // 16 dims: filler code
const BOS_DIM: usize = 16;
const HI: usize = 17; // flag: a high-digit token
const LO: usize = 18; // flag: a low-digit token
const HV: usize = 19; // high digit + 1
const LV: usize = 20; // low digit + 1
const NVH: usize = 21; // high digit + 1, moved by a0.h0
const NVL: usize = 22; // low digit + 1, moved by a0.h1
const ANS: usize = 23; // 16 dims: one per answer Y0..Y15, read by the unembedding
const POS: usize = 39; // 8 dims
const DIS: usize = 47; // 17 dims: distractor scratch space
pub(crate) const D_MLP: usize = 48;

pub(crate) const BOS: u32 = 0;
const FILLER0: u32 = 1; // 32 fillers, code(16, i)
const H0: u32 = 33; // H0..H3
const L0: u32 = 37; // L0..L3
const END: u32 = 41;
const Y0: u32 = 42; // answers Y0..Y15
pub(crate) const VOCAB: usize = 58;
pub(crate) const N_CTX: usize = 16;
pub(crate) const LEN: usize = 12;
/// Weight of the scratch space in the unembedding ([`leak`]): distractors move the metric a
/// little.
const LEAK: f32 = 1.0;
const BETA: f32 = 6.0;

pub(crate) const TRUTH: &[&str] = &[
    "input->a0.h0<k>",
    "input->a0.h0<v>",
    "input->a0.h1<k>",
    "input->a0.h1<v>",
    "a0.h0->m1",
    "a0.h1->m1",
    "m1->logits",
];

pub(crate) fn spec() -> Spec {
    let mut s = Spec::new(2, 4, D, 16, Some(D_MLP), VOCAB, N_CTX);
    s.emb(BOS as usize, BOS_DIM, 1.0);
    for i in 0..32 {
        for (j, x) in code(16, i).into_iter().enumerate() {
            s.emb(FILLER0 as usize + i, TOK + j, x);
        }
    }
    for k in 0..4 {
        s.emb((H0 + k) as usize, HI, 1.0);
        s.emb((H0 + k) as usize, HV, (k + 1) as f32);
        s.emb((L0 + k) as usize, LO, 1.0);
        s.emb((L0 + k) as usize, LV, (k + 1) as f32);
    }
    write_positions(&mut s, POS);
    leak(&mut s, DIS, 17, LEAK);
    // Only the answers Y0..Y15 are ever predicted: every other token has logit bias −10.
    for t in 0..VOCAB as u32 {
        if !(Y0..Y0 + 16).contains(&t) {
            s.logit_bias(t as usize, -10.0);
        }
    }
    for y in 0..16 {
        s.unembed(ANS + y, Y0 as usize + y, 1.0);
    }

    // ---- layer 0 ----
    // a0.h0, a0.h1 (circuit): movers. Constant query; keys: the digit flag (score 20) and BOS
    // (score 10, the sink before the number appears); values: the digit.
    for (h, flag, val, dst) in [(0, HI, HV, NVH), (1, LO, LV, NVL)] {
        s.head(0, h)
            .bq(0, 1.0)
            .k(flag, 0, 20.0)
            .k(BOS_DIM, 0, 10.0)
            .v(val, 0, 1.0)
            .o(0, dst, 1.0);
    }
    // a0.h2 (distractor): previous-token head copying the filler code's first 8 dims to DIS 0..8.
    previous_token_qk(s.head(0, 2), POS, 20.0);
    s.head(0, 2).copy(TOK, DIS, 8);
    // a0.h3 (distractor): duplicate-token head on fillers; writes "seen before" into DIS 8.
    for j in 0..16 {
        s.head(0, 3).q(TOK + j, j, 8.0).k(TOK + j, j, 1.0);
    }
    s.head(0, 3).bq(0, 4.0).k(BOS_DIM, 0, 1.0);
    s.head(0, 3).v(BOS_DIM, 0, 1.0).o(0, DIS + 8, -1.0);
    // m0 (distractor): 16 ReLU features of the filler code and of a0.h2's copy, into DIS 9..13.
    for n in 0..16 {
        for (j, x) in code(16, n).into_iter().enumerate() {
            s.mlp(0).w_in(TOK + j, n, x);
        }
        s.mlp(0).w_in(DIS + n % 8, n, 0.5).b_in(n, -0.25);
        s.mlp(0).w_out(n, DIS + 9 + n % 4, 0.5);
    }

    // ---- layer 1 ----
    // a1.h0 (distractor): attends to BOS softly and reads the movers' outputs (the circuit's
    // subspace) into DIS 13.
    s.head(1, 0)
        .bq(0, 1.0)
        .k(BOS_DIM, 0, 1.5)
        .v(NVH, 0, 1.0)
        .v(NVL, 0, -1.0)
        .o(0, DIS + 13, 1.0);
    // a1.h1 (distractor): query = filler code, key = a0.h2's previous-filler copy; reads the
    // filler code into DIS 14.
    for j in 0..8 {
        s.head(1, 1).q(TOK + j, j, 4.0).k(DIS + j, j, 1.0);
        s.head(1, 1).v(TOK + j, 0, 0.25);
    }
    s.head(1, 1).o(0, DIS + 14, 1.0);
    // a1.h2, a1.h3 (distractors): BOS-leaning heads reading m0's features and the duplicate
    // flag into DIS 15 and 16.
    s.head(1, 2)
        .bq(0, 1.0)
        .k(BOS_DIM, 0, 3.0)
        .k(DIS + 8, 0, -2.0);
    for j in 0..4 {
        s.head(1, 2).v(DIS + 9 + j, 0, 1.0);
    }
    s.head(1, 2).o(0, DIS + 15, 1.0);
    s.head(1, 3)
        .q(DIS + 8, 0, 2.0)
        .k(BOS_DIM, 0, 2.0)
        .v(DIS + 8, 0, 1.0)
        .v(DIS + 9, 1, 1.0)
        .o(0, DIS + 16, 1.0)
        .o(1, DIS + 16, 0.5);
    // m1 (circuit): the comparator. x = 4·(hi+1) + (lo+1) − 5 = the number N. Neurons 2y and
    // 2y+1 compute ReLU(x − y + 1) − ReLU(x − y) = [N ≥ y]; ANS_y = 1 − [N ≥ y] = [y > N]
    // (the 1 is the constant b_out), times BETA.
    for y in 0..16 {
        let (a, b) = (2 * y, 2 * y + 1);
        let m = s.mlp(1);
        m.w_in(NVH, a, 4.0)
            .w_in(NVL, a, 1.0)
            .b_in(a, -5.0 - y as f32 + 1.0);
        m.w_in(NVH, b, 4.0)
            .w_in(NVL, b, 1.0)
            .b_in(b, -5.0 - y as f32);
        m.w_out(a, ANS + y, -BETA).w_out(b, ANS + y, BETA);
        m.b_out(ANS + y, BETA);
    }
    // m1 (distractor neurons 32..48): features of the distractor subspace into DIS 0..8.
    for n in 32..D_MLP {
        let m = s.mlp(1);
        m.w_in(DIS + (n % 17), n, 1.0)
            .w_in(DIS + ((n * 7) % 17), n, -0.5)
            .w_in(TOK + n % 16, n, 0.5)
            .b_in(n, 0.1);
        m.w_out(n, DIS + n % 8, 0.25);
    }
    s
}

/// A prompt of `LEN` tokens: BOS, fillers, the number's two tokens at `p, p + 1`, fillers, END.
fn prompt(rng: &mut ChaCha8Rng, n: u32, p: usize) -> Vec<u32> {
    let mut seq: Vec<u32> = (0..LEN)
        .map(|_| FILLER0 + rng.random_range(0..32))
        .collect();
    seq[0] = BOS;
    seq[LEN - 1] = END;
    seq[p] = H0 + n / 4;
    seq[p + 1] = L0 + n % 4;
    seq
}

pub(crate) fn dataset(n: usize, seed: u64) -> (Dataset, Metric) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut examples = Vec::with_capacity(n);
    for _ in 0..n {
        // Clean number N in 8..=14; the corrupted number N' is smaller by at least 5, with a
        // different high and a different low digit, at a different position — every edge of
        // the circuit carries part of the difference.
        let num = rng.random_range(8..=14u32);
        let (num_c, p, p_c) = loop {
            let num_c = rng.random_range(0..=num - 5);
            let p = rng.random_range(1..=LEN - 3);
            let p_c = rng.random_range(1..=LEN - 3);
            if num_c / 4 != num / 4 && num_c % 4 != num % 4 && p != p_c {
                break (num_c, p, p_c);
            }
        };
        examples.push(Example {
            clean: prompt(&mut rng, num, p),
            corrupted: prompt(&mut rng, num_c, p_c),
            target: Target {
                answers: (num + 1..16).map(|y| Y0 + y).collect(),
                wrongs: (0..=num).map(|y| Y0 + y).collect(),
            },
        });
    }
    (
        Dataset {
            name: "planted-greater-than".into(),
            examples,
        },
        Metric::ProbDiff,
    )
}
