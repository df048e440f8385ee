//! Seeded dataset generators for the four tasks of DESIGN §5. Each returns [`Record`]s, the
//! lines of a JSONL dataset; [`write_jsonl`] writes them. The random stream is ChaCha8 seeded
//! with the given seed and only draws `u32` ranges, so a seed gives byte-identical files on every
//! platform.
//!
//! Every generator tokenizes what it produces and resamples an example whose clean and corrupted
//! prompts differ in token length, so the output always loads with [`Dataset::from_jsonl`]
//! (`super::Dataset`).

use std::fmt;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::dataset::{year_tokens, AnswerSpec, PromptSpec, Record, TokenSpec};
use super::lists::*;
use super::metric::Metric;
use super::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The built-in tasks, spelled on the command line as [`Task::name`] gives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Task {
    /// Indirect object identification (Wang et al. 2022), GPT-2 small.
    Ioi,
    /// Greater-Than (Hanna et al. 2023), GPT-2 small.
    GreaterThan,
    /// Docstring argument completion (Heimersheim & Janiak 2023), a 4-layer attention-only model.
    Docstring,
    /// Induction on repeated random token sequences, any model.
    Induction,
}

impl Task {
    pub const ALL: [Task; 4] = [
        Task::Ioi,
        Task::GreaterThan,
        Task::Docstring,
        Task::Induction,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Task::Ioi => "ioi",
            Task::GreaterThan => "greater-than",
            Task::Docstring => "docstring",
            Task::Induction => "induction",
        }
    }

    /// The metric the task's paper uses: logit difference for IOI (IO − S) and docstring (right
    /// − largest wrong), probability difference for Greater-Than, and negative log-probability
    /// for induction (its wrong token is an arbitrary random one, so a difference against it
    /// adds nothing).
    pub fn default_metric(self) -> Metric {
        match self {
            Task::Ioi | Task::Docstring => Metric::LogitDiff,
            Task::GreaterThan => Metric::ProbDiff,
            Task::Induction => Metric::Nll,
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `n` examples of `task` from `seed`. `tok` is the model's tokenizer: word lists are cut to
/// single tokens of it, equal token lengths are checked with it, and induction draws token ids
/// below its vocabulary size (special tokens excluded).
pub fn generate(task: Task, n: usize, seed: u64, tok: &Tokenizer) -> Result<Vec<Record>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    match task {
        Task::Ioi => ioi(n, &mut rng, tok),
        Task::GreaterThan => greater_than(n, &mut rng, tok),
        Task::Docstring => docstring(n, &mut rng, tok),
        Task::Induction => induction(
            n,
            &mut rng,
            tok.vocab_size(),
            INDUCTION_LEN,
            tok.special_ids(),
        ),
    }
}

/// Length of the random sequence that induction repeats.
pub const INDUCTION_LEN: usize = 10;

/// Induction without a text tokenizer, for small models: token ids drawn from `0..vocab_size`,
/// each sequence `seq_len` distinct tokens long. Prompts and answers are written as ids.
pub fn generate_induction(
    n: usize,
    seed: u64,
    vocab_size: usize,
    seq_len: usize,
) -> Result<Vec<Record>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    induction(n, &mut rng, vocab_size, seq_len, &[])
}

/// Writes one JSON object per line, atomically: to a temporary file beside `path`, then renamed.
pub fn write_jsonl(records: &[Record], path: &Path) -> Result<()> {
    let mut text = String::new();
    for r in records {
        let line = serde_json::to_string(r)
            .map_err(|e| Error::invalid(format!("cannot serialise a record: {e}")))?;
        text.push_str(&line);
        text.push('\n');
    }
    crate::fsutil::write_atomic(path, text.as_bytes())
}

// ---------------------------------------------------------------- helpers

fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    rng.random_range(0..n as u32) as usize
}

fn pick<'a>(rng: &mut ChaCha8Rng, xs: &[&'a str]) -> &'a str {
    xs[below(rng, xs.len())]
}

/// `k` distinct items of `xs`, in random order (partial Fisher–Yates).
fn sample<'a>(rng: &mut ChaCha8Rng, xs: &[&'a str], k: usize) -> Vec<&'a str> {
    let mut pool = xs.to_vec();
    for i in 0..k {
        let j = i + below(rng, pool.len() - i);
        pool.swap(i, j);
    }
    pool.truncate(k);
    pool
}

/// Words `w` of `list` whose `prefix + w` is one token.
fn single_tokens<'a>(tok: &Tokenizer, list: &[&'a str], prefix: &str) -> Vec<&'a str> {
    list.iter()
        .copied()
        .filter(|w| tok.token_id(&format!("{prefix}{w}")).is_ok())
        .collect()
}

fn need(task: &str, what: &str, have: usize, want: usize) -> Result<()> {
    if have < want {
        return Err(Error::invalid(format!(
            "{task}: only {have} {what} are single tokens for this tokenizer; at least {want} are needed"
        )));
    }
    Ok(())
}

fn text(s: String) -> PromptSpec {
    PromptSpec::Text(s)
}

fn token_texts(xs: impl IntoIterator<Item = String>) -> AnswerSpec {
    AnswerSpec::Many(xs.into_iter().map(TokenSpec::Text).collect())
}

/// Runs `make` until it yields `n` examples whose prompts tokenize to equal lengths; gives up
/// after 100 failures per example wanted.
fn collect_equal_lengths(
    task: &str,
    n: usize,
    tok: &Tokenizer,
    mut make: impl FnMut() -> Result<Record>,
) -> Result<Vec<Record>> {
    let mut out = Vec::with_capacity(n);
    let mut failures = 0usize;
    let mut bar = generation_progress(task, n);
    while out.len() < n {
        let r = make()?;
        let len = |p: &PromptSpec| -> Result<usize> {
            Ok(match p {
                PromptSpec::Text(s) => tok.encode(s)?.len(),
                PromptSpec::Ids(ids) => ids.len(),
            })
        };
        if len(&r.clean)? == len(&r.corrupted)? {
            out.push(r);
            bar.inc(1);
        } else {
            failures += 1;
            if failures > 100 * n.max(1) {
                return Err(Error::invalid(format!(
                    "{task}: gave up after {failures} pairs of unequal token length"
                )));
            }
        }
    }
    bar.finish();
    Ok(out)
}

/// Below this many examples generation takes well under a second (IOI's tokenizing costs
/// ~0.1 ms an example): no progress is shown.
pub const PROGRESS_MIN_EXAMPLES: usize = 10_000;

fn generation_progress(task: &str, n: usize) -> crate::progress::Progress {
    let enabled = n >= PROGRESS_MIN_EXAMPLES;
    crate::progress::Progress::new(enabled, format!("generating {task}"), n, "examples")
}

// ---------------------------------------------------------------- IOI

/// The ABBA form of a BABA template: the first `[B]` and the first `[A]` trade places, so the
/// indirect object is named first ("Then, [A] and [B] went to the [PLACE]. [B] gave …").
fn abba(template: &str) -> String {
    match (template.find("[B]"), template.find("[A]")) {
        (Some(b), Some(a)) if b < a => format!(
            "{}[A]{}[B]{}",
            &template[..b],
            &template[b + 3..a],
            &template[a + 3..]
        ),
        _ => template.to_string(),
    }
}

/// Fills a template: the k-th `[A]` gets `a[k]`, the k-th `[B]` gets `b[k]` (the last one when
/// there are fewer), `[PLACE]` and `[OBJECT]` the same word everywhere.
fn fill(template: &str, a: &[&str], b: &[&str], place: &str, object: &str) -> String {
    let template = template
        .replace("[PLACE]", place)
        .replace("[OBJECT]", object);
    let mut out = String::new();
    let (mut na, mut nb) = (0, 0);
    let mut rest = template.as_str();
    while let Some(i) = rest.find('[') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("[A]") {
            out.push_str(a[na.min(a.len() - 1)]);
            na += 1;
            rest = after;
        } else if let Some(after) = tail.strip_prefix("[B]") {
            out.push_str(b[nb.min(b.len() - 1)]);
            nb += 1;
            rest = after;
        } else {
            out.push('[');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// IOI (Wang et al.): one of the 15 templates in BABA or ABBA order, the prompt cut before the
/// final name. The corruption (ABC) replaces the indirect object and both subject mentions by
/// three other names. Answer: the indirect object; wrong: the subject.
fn ioi(n: usize, rng: &mut ChaCha8Rng, tok: &Tokenizer) -> Result<Vec<Record>> {
    let names = single_tokens(tok, &IOI_NAMES, " ");
    let places = single_tokens(tok, &IOI_PLACES, " ");
    let objects = single_tokens(tok, &IOI_OBJECTS, " ");
    need("ioi", "names", names.len(), 5)?;
    need("ioi", "places", places.len(), 1)?;
    need("ioi", "objects", objects.len(), 1)?;
    let mut templates: Vec<String> = Vec::with_capacity(30);
    for t in IOI_BABA_TEMPLATES {
        // every template ends with " [A]", the name to predict
        let stem = t.strip_suffix(" [A]").unwrap_or(t);
        templates.push(stem.to_string());
        templates.push(abba(stem));
    }
    collect_equal_lengths("ioi", n, tok, || {
        let template = &templates[below(rng, templates.len())];
        let place = pick(rng, &places);
        let object = pick(rng, &objects);
        let who = sample(rng, &names, 5);
        let (io, s) = (who[0], who[1]);
        let clean = fill(template, &[io], &[s], place, object);
        let corrupted = fill(template, &[who[2]], &[who[3], who[4]], place, object);
        Ok(Record {
            clean: text(clean),
            corrupted: text(corrupted),
            answer: AnswerSpec::One(TokenSpec::Text(format!(" {io}"))),
            wrong: AnswerSpec::One(TokenSpec::Text(format!(" {s}"))),
        })
    })
}

// ---------------------------------------------------------------- Greater-Than

/// Years of the centuries 11–17 as ACDC picks them: YYYY in CC02…CC98 whose `" YYYY"` is the
/// two tokens `" CC"` + `"YY"`, without the first and the last such year of each century.
pub fn greater_than_years(tok: &Tokenizer) -> Result<Vec<u32>> {
    let mut years = Vec::new();
    for century in 11u32..=17 {
        let Ok(cc) = tok.token_id(&format!(" {century}")) else {
            continue;
        };
        let mut ok = Vec::new();
        for yy in 2u32..=98 {
            let Ok(tail) = tok.token_id(&format!("{yy:02}")) else {
                continue;
            };
            if tok.encode(&format!(" {century}{yy:02}"))? == [cc, tail] {
                ok.push(century * 100 + yy);
            }
        }
        if ok.len() > 2 {
            years.extend_from_slice(&ok[1..ok.len() - 1]);
        }
    }
    Ok(years)
}

/// Greater-Than (Hanna et al.): "The {noun} lasted from the year {YYYY} to the year {CC}";
/// the corruption sets the first year's last two digits to "01". Answers: the two-digit tokens
/// above YY; wrongs: those at or below.
fn greater_than(n: usize, rng: &mut ChaCha8Rng, tok: &Tokenizer) -> Result<Vec<Record>> {
    year_tokens(tok)?;
    let years = greater_than_years(tok)?;
    need("greater-than", "years (\" CC\" + \"YY\")", years.len(), 1)?;
    collect_equal_lengths("greater-than", n, tok, || {
        let noun = pick(rng, &GREATER_THAN_NOUNS);
        let year = years[below(rng, years.len())];
        let (cc, yy) = (year / 100, year % 100);
        let clean = format!("The {noun} lasted from the year {year} to the year {cc}");
        let corrupted = format!("The {noun} lasted from the year {cc}01 to the year {cc}");
        Ok(Record {
            clean: text(clean),
            corrupted: text(corrupted),
            answer: token_texts((yy + 1..=99).map(|y| format!("{y:02}"))),
            wrong: token_texts((0..=yy).map(|y| format!("{y:02}"))),
        })
    })
}

// ---------------------------------------------------------------- Docstring

/// A reST docstring prompt as ACDC's `docstring_prompt_templ("rest", …)` writes it.
fn docstring_prompt(
    met: &str,
    def_args: &[&str],
    desc: &[&str],
    doc_args: &[&str],
    doc_desc: &[Vec<&str>],
) -> String {
    let mut s = format!(
        "\ndef {met}(self, {}):\n    \"\"\"{}\n\n",
        def_args.join(", "),
        desc.join(" ")
    );
    for (arg, words) in doc_args.iter().zip(doc_desc) {
        s.push_str(&format!("    :param {arg}: {}\n", words.join(" ")));
    }
    s.push_str("    :param");
    s
}

/// Docstring (Heimersheim & Janiak), with ACDC's settings: `def m(self, p1, p2, a1, a2, a3,
/// s1)` and a docstring listing `:param a1`, `:param a2`, then `:param` to be completed with
/// ` a3`. The corruption ("random_random" in ACDC) renames a1–a3 in the definition and the
/// documented names, keeping p1, p2, s1. Wrong answers: ACDC's, the 13 other sampled names.
fn docstring(n: usize, rng: &mut ChaCha8Rng, tok: &Tokenizer) -> Result<Vec<Record>> {
    let names = single_tokens(tok, &DOCSTRING_NAMES, " ");
    let nouns = single_tokens(tok, &DOCSTRING_NOUNS, " ");
    need("docstring", "names", names.len(), 15)?;
    need("docstring", "nouns", nouns.len(), 3)?;
    collect_equal_lengths("docstring", n, tok, || {
        let picked = sample(rng, &names, 15);
        let (met, args) = (picked[0], &picked[1..]);
        // ACDC's split of the 14 argument names
        let random_mid_def = &args[1..4];
        let random_mid_doc = &args[4..6];
        let matching = &args[8..11];
        let def_prefix = &args[11..13];
        let def_suffix = &args[13..14];
        let desc = sample(rng, &nouns, 3);
        let doc_desc: Vec<Vec<&str>> = (0..2).map(|_| sample(rng, &nouns, 2)).collect();
        let clean_def = [def_prefix, matching, def_suffix].concat();
        let corrupted_def = [def_prefix, random_mid_def, def_suffix].concat();
        let clean = docstring_prompt(met, &clean_def, &desc, &matching[..2], &doc_desc);
        let corrupted = docstring_prompt(met, &corrupted_def, &desc, random_mid_doc, &doc_desc);
        let answer = matching[2];
        Ok(Record {
            clean: text(clean),
            corrupted: text(corrupted),
            answer: AnswerSpec::One(TokenSpec::Text(format!(" {answer}"))),
            wrong: token_texts(
                args.iter()
                    .filter(|a| **a != answer)
                    .map(|a| format!(" {a}")),
            ),
        })
    })
}

// ---------------------------------------------------------------- Induction

/// Induction: `k` distinct random tokens, then the first `k − 1` of them again; the answer is
/// the k-th token, which the repeat predicts. The corruption replaces the repeat by `k − 1`
/// fresh tokens; the wrong answer is one more fresh token, the corrupted sequence's own
/// continuation. No token appears twice in an example except the repeat.
fn induction(
    n: usize,
    rng: &mut ChaCha8Rng,
    vocab: usize,
    k: usize,
    excluded: &[u32],
) -> Result<Vec<Record>> {
    if k < 2 {
        return Err(Error::invalid(
            "induction: the sequence needs at least 2 tokens",
        ));
    }
    let usable = vocab.saturating_sub(excluded.len());
    if usable < 2 * k || vocab > u32::MAX as usize {
        return Err(Error::invalid(format!(
            "induction: a vocabulary of {vocab} tokens is too small for sequences of {k} (need {})",
            2 * k
        )));
    }
    let mut out = Vec::with_capacity(n);
    let mut bar = generation_progress("induction", n);
    for _ in 0..n {
        let mut seq: Vec<u32> = Vec::with_capacity(2 * k);
        while seq.len() < 2 * k {
            let t = rng.random_range(0..vocab as u32);
            if !seq.contains(&t) && !excluded.contains(&t) {
                seq.push(t);
            }
        }
        let (first, fresh) = seq.split_at(k);
        let clean: Vec<u32> = first.iter().chain(&first[..k - 1]).copied().collect();
        let corrupted: Vec<u32> = first.iter().chain(&fresh[..k - 1]).copied().collect();
        out.push(Record {
            clean: PromptSpec::Ids(clean),
            corrupted: PromptSpec::Ids(corrupted),
            answer: AnswerSpec::One(TokenSpec::Id(first[k - 1])),
            wrong: AnswerSpec::One(TokenSpec::Id(fresh[k - 1])),
        });
        bar.inc(1);
    }
    bar.finish();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::dataset::Dataset;
    use crate::tasks::tokenizer::tests::gpt2;

    fn roundtrip(task: Task, n: usize, seed: u64) -> (Vec<Record>, String, Dataset) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let recs = generate(task, n, seed, gpt2()).unwrap();
        assert_eq!(recs.len(), n);
        write_jsonl(&recs, &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        // from_jsonl checks every line's clean and corrupted token lengths
        let d = Dataset::from_jsonl(&path, Some(gpt2())).unwrap();
        assert_eq!(d.examples.len(), n);
        for e in &d.examples {
            assert_eq!(e.clean.len(), e.corrupted.len());
        }
        (recs, text, d)
    }

    #[test]
    fn same_seed_same_bytes() {
        for task in Task::ALL {
            let (_, a, _) = roundtrip(task, 20, 7);
            let (_, b, _) = roundtrip(task, 20, 7);
            let (_, c, _) = roundtrip(task, 20, 8);
            assert_eq!(a, b, "{task}");
            assert_ne!(a, c, "{task}");
            assert_eq!(a.lines().count(), 20);
        }
    }

    #[test]
    fn pinned_first_lines() {
        // The random stream is part of the format: a changed line here means seeds no longer
        // reproduce published datasets.
        let first = |task| {
            let recs = generate(task, 1, 0, gpt2()).unwrap();
            serde_json::to_string(&recs[0]).unwrap()
        };
        assert_eq!(
            first(Task::Ioi),
            r#"{"clean":"While Kimberly and Michelle were commuting to the office, Michelle gave a necklace to","corrupted":"While Dustin and Aaron were commuting to the office, David gave a necklace to","answer":" Kimberly","wrong":" Michelle"}"#
        );
        assert!(first(Task::GreaterThan).starts_with(
            r#"{"clean":"The patrols lasted from the year 1617 to the year 16","corrupted":"The patrols lasted from the year 1601 to the year 16","answer":["18","19","#
        ));
        assert!(first(Task::Docstring).starts_with(
            r#"{"clean":"\ndef results(self, value, description, info, group, update, date):\n    \"\"\"tube path string\n\n    :param info: chemical son\n    :param group: track fight\n    :param","#
        ));
        assert!(first(Task::Induction).ends_with(r#""answer":44181,"wrong":7754}"#));
    }

    fn words(text: &str) -> impl Iterator<Item = &str> {
        text.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
    }

    #[test]
    fn ioi_examples() {
        let (recs, _, d) = roundtrip(Task::Ioi, 200, 1);
        let t = gpt2();
        for w in IOI_NAMES.iter().chain(&IOI_PLACES).chain(&IOI_OBJECTS) {
            // the word lists happen to be single GPT-2 tokens; the generator would drop others
            assert!(t.token_id(&format!(" {w}")).is_ok(), "{w}");
        }
        for (r, e) in recs.iter().zip(&d.examples) {
            let (PromptSpec::Text(clean), PromptSpec::Text(corrupted)) = (&r.clean, &r.corrupted)
            else {
                panic!("IOI prompts are text")
            };
            let (AnswerSpec::One(TokenSpec::Text(io)), AnswerSpec::One(TokenSpec::Text(s))) =
                (&r.answer, &r.wrong)
            else {
                panic!("one answer, one wrong")
            };
            // the prompt ends before the final name, mentions IO once and S twice
            assert!(clean.ends_with(" to"), "{clean}");
            let count =
                |text: &str, name: &str| words(text).filter(|w| *w == name.trim_start()).count();
            assert_eq!(count(clean, io), 1, "{clean}");
            assert_eq!(count(clean, s), 2, "{clean}");
            // ABC: none of the clean names survives in the corrupted prompt
            assert_eq!(count(corrupted, io) + count(corrupted, s), 0, "{corrupted}");
            assert_eq!(e.target.answers, vec![t.token_id(io).unwrap()]);
            assert_eq!(e.target.wrongs, vec![t.token_id(s).unwrap()]);
        }
        // both orders occur
        let abba = recs
            .iter()
            .filter(|r| {
                let (
                    PromptSpec::Text(c),
                    AnswerSpec::One(TokenSpec::Text(io)),
                    AnswerSpec::One(TokenSpec::Text(s)),
                ) = (&r.clean, &r.answer, &r.wrong)
                else {
                    unreachable!()
                };
                let ws: Vec<&str> = words(c).collect();
                ws.iter().position(|w| *w == io.trim_start())
                    < ws.iter().position(|w| *w == s.trim_start())
            })
            .count();
        assert!(abba > 50 && abba < 150, "{abba} ABBA of 200");
    }

    #[test]
    fn abba_swaps_the_first_clause() {
        assert_eq!(
            abba("Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to"),
            "Then, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to"
        );
        assert_eq!(
            fill(
                "[B] and [A] at [PLACE]. [B] gave [OBJECT] to",
                &["X"],
                &["Y", "Z"],
                "store",
                "ring"
            ),
            "Y and X at store. Z gave ring to"
        );
    }

    #[test]
    fn greater_than_years_split_in_two() {
        let t = gpt2();
        let years = greater_than_years(t).unwrap();
        assert!(years.len() > 300, "{}", years.len());
        for &y in &years {
            let ids = t.encode(&format!(" {y}")).unwrap();
            assert_eq!(ids.len(), 2, "{y}");
            assert_eq!(ids[0], t.token_id(&format!(" {}", y / 100)).unwrap());
            assert_eq!(ids[1], t.token_id(&format!("{:02}", y % 100)).unwrap());
            assert!((1100..1800).contains(&y));
        }
        let (recs, _, d) = roundtrip(Task::GreaterThan, 100, 3);
        for (r, e) in recs.iter().zip(&d.examples) {
            let PromptSpec::Text(clean) = &r.clean else {
                panic!()
            };
            let PromptSpec::Text(corrupted) = &r.corrupted else {
                panic!()
            };
            let cc = &clean[clean.len() - 2..];
            assert!(clean.ends_with(&format!("to the year {cc}")), "{clean}");
            assert!(
                corrupted.contains(&format!("year {cc}01 to")),
                "{corrupted}"
            );
            assert_eq!(e.target.answers.len() + e.target.wrongs.len(), 100);
            let AnswerSpec::Many(answers) = &r.answer else {
                panic!("answers are lists")
            };
            let yy: usize = clean[clean.len() - 17..clean.len() - 15].parse().unwrap();
            assert_eq!(answers.len(), 99 - yy, "{clean}");
        }
    }

    #[test]
    fn docstring_examples() {
        let (recs, _, d) = roundtrip(Task::Docstring, 50, 4);
        for (r, e) in recs.iter().zip(&d.examples) {
            let PromptSpec::Text(clean) = &r.clean else {
                panic!()
            };
            assert!(
                clean.starts_with("\ndef ") && clean.ends_with("\n    :param"),
                "{clean:?}"
            );
            assert_eq!(clean.matches(":param").count(), 3);
            assert_eq!(e.target.wrongs.len(), 13);
            assert!(!e.target.wrongs.contains(&e.target.answers[0]));
            let AnswerSpec::One(TokenSpec::Text(a)) = &r.answer else {
                panic!()
            };
            assert!(
                clean.contains(&format!("{a}, ")) || clean.contains(&format!("{a})")),
                "{clean}"
            );
            let PromptSpec::Text(corrupted) = &r.corrupted else {
                panic!()
            };
            assert!(!corrupted.contains(&format!("{a},")), "{corrupted}");
        }
    }

    #[test]
    fn induction_without_a_tokenizer() {
        let recs = generate_induction(30, 5, 100, 6).unwrap();
        assert_eq!(recs, generate_induction(30, 5, 100, 6).unwrap());
        for r in &recs {
            let (PromptSpec::Ids(c), PromptSpec::Ids(x)) = (&r.clean, &r.corrupted) else {
                panic!()
            };
            assert_eq!(c.len(), 11);
            assert_eq!(x.len(), 11);
            assert_eq!(c[..6], x[..6]);
            assert_eq!(c[6..], c[..5]);
            let AnswerSpec::One(TokenSpec::Id(a)) = r.answer else {
                panic!()
            };
            let AnswerSpec::One(TokenSpec::Id(w)) = r.wrong else {
                panic!()
            };
            assert_eq!(a, c[5]);
            assert!(!c.contains(&w) && !x[..].contains(&w) && a != w);
            assert!(c.iter().chain(x).all(|&t| t < 100));
        }
        assert!(generate_induction(1, 0, 5, 6).is_err());
        // with GPT-2: never the special <|endoftext|>
        let (_, _, d) = roundtrip(Task::Induction, 50, 2);
        assert!(d
            .examples
            .iter()
            .all(|e| !e.clean.contains(&50256) && !e.corrupted.contains(&50256)));
    }

    #[test]
    fn task_names() {
        use clap::ValueEnum;
        for t in Task::ALL {
            assert_eq!(Task::from_str(t.name(), false).unwrap(), t);
        }
        assert!(Task::from_str("greater_than", false).is_err());
        assert_eq!(Task::GreaterThan.default_metric(), Metric::ProbDiff);
        assert_eq!(Task::Ioi.default_metric(), Metric::LogitDiff);
    }

    #[test]
    fn write_jsonl_is_atomic_and_reports_errors() {
        let dir = tempfile::tempdir().unwrap();
        let recs = generate_induction(2, 0, 50, 3).unwrap();
        let p = dir.path().join("x.jsonl");
        std::fs::write(&p, "old").unwrap();
        write_jsonl(&recs, &p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("{\"clean\":["), "{text}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
        let e = write_jsonl(&recs, &dir.path().join("missing/x.jsonl")).unwrap_err();
        assert!(matches!(e, Error::Io { .. }));
    }
}
