//! MIB's task files (Mueller et al. 2025; `MIB_circuit_track/dataset.py`, `HFEAPDataset`, of
//! hannamw/MIB-circuit-track) as eap datasets: the rows of the `mib-bench` datasets exported as
//! JSON lines (`datasets.Dataset.to_json` writes one row per line, nested fields as objects).
//!
//! Column mapping and filters, per task, as MIB's `filter_dataset` and `__getitem__` have them:
//!
//! | task | clean | corrupted (default counterfactual) | answer | wrong | rows kept when |
//! |---|---|---|---|---|---|
//! | `ioi` | `prompt` | `s2_io_flip_counterfactual.prompt` | `" " + metadata.indirect_object` | `" " + metadata.subject` | `" IO"`, `" S"`, `" random_c"` encode to equally many tokens |
//! | `mcqa`, `arc-*` | `prompt` | `symbol_counterfactual.prompt` | `choices.label[answerKey]` | the counterfactual's `choices.label[answerKey]` | both labels encode to equally many tokens |
//! | `arithmetic-addition` / `-subtraction` | `prompt` | `random_counterfactual.prompt` | `str(label)` | `str(random_counterfactual.label)` | both labels are one token, the counterfactual exists, `operator` is `+` / `-` |
//!
//! As in MIB the answer and the wrong answer are the *first* token of their text. Prompts are
//! tokenized without special tokens. eap needs clean and corrupted prompts of equal token length
//! (MIB pads instead), so rows where they differ are skipped and counted in [`MibImport`].

use std::path::Path;

use serde_json::Value;

use super::dataset::{AnswerSpec, PromptSpec, Record, TokenSpec};
use super::{Dataset, Tokenizer};
use crate::{Error, Result};

/// The MIB circuit-track tasks whose rows eap reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MibTask {
    Ioi,
    Mcqa,
    ArcEasy,
    ArcChallenge,
    ArithmeticAddition,
    ArithmeticSubtraction,
}

impl MibTask {
    /// The counterfactual column MIB uses by default.
    pub fn default_counterfactual(self) -> &'static str {
        match self {
            MibTask::Ioi => "s2_io_flip_counterfactual",
            MibTask::Mcqa | MibTask::ArcEasy | MibTask::ArcChallenge => "symbol_counterfactual",
            MibTask::ArithmeticAddition | MibTask::ArithmeticSubtraction => "random_counterfactual",
        }
    }
}

/// A MIB file read into a dataset, with what was left out.
#[derive(Debug, Clone)]
pub struct MibImport {
    pub dataset: Dataset,
    /// Rows in the file.
    pub rows: usize,
    /// Rows MIB's own filter drops.
    pub filtered: usize,
    /// Rows whose clean and corrupted prompts tokenize to different lengths.
    pub unequal_length: usize,
}

/// Reads the JSON-lines export of a MIB task's rows. `counterfactual` names the counterfactual
/// column (MIB's `counterfactual_type`; default [`MibTask::default_counterfactual`]).
pub fn read_mib_jsonl(
    path: &Path,
    task: MibTask,
    tok: &Tokenizer,
    counterfactual: Option<&str>,
) -> Result<MibImport> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let cf = counterfactual.unwrap_or(task.default_counterfactual());
    let (mut rows, mut filtered, mut unequal) = (0, 0, 0);
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        rows += 1;
        let at = |message: String| Error::Parse {
            path: path.to_path_buf(),
            line: Some(i + 1),
            message,
        };
        let row: Value =
            serde_json::from_str(line).map_err(|e| at(format!("malformed JSON: {e}")))?;
        let Some((clean, corrupted, answer, wrong)) =
            mib_record(&row, task, cf, tok).map_err(at)?
        else {
            filtered += 1;
            continue;
        };
        if clean.len() != corrupted.len() {
            unequal += 1;
            continue;
        }
        records.push(Record {
            clean: PromptSpec::Ids(clean),
            corrupted: PromptSpec::Ids(corrupted),
            answer: AnswerSpec::One(TokenSpec::Id(answer)),
            wrong: AnswerSpec::One(TokenSpec::Id(wrong)),
        });
    }
    let name = path
        .file_stem()
        .map_or("mib".to_string(), |s| s.to_string_lossy().into_owned());
    if records.is_empty() {
        return Err(Error::Parse {
            path: path.to_path_buf(),
            line: None,
            message: format!(
                "no usable {task:?} rows: {rows} rows, {filtered} dropped by MIB's filter, \
                 {unequal} with clean and corrupted prompts of different token lengths"
            ),
        });
    }
    Ok(MibImport {
        dataset: Dataset::from_records(&name, &records, Some(tok))?,
        rows,
        filtered,
        unequal_length: unequal,
    })
}

/// A field of a row, with an error naming its path when it is missing.
fn field<'v>(row: &'v Value, path: &[&str]) -> std::result::Result<&'v Value, String> {
    let mut v = row;
    for (i, key) in path.iter().enumerate() {
        v = v
            .get(key)
            .filter(|x| !x.is_null())
            .ok_or_else(|| format!("no field `{}`", path[..=i].join(".")))?;
    }
    Ok(v)
}

fn string(row: &Value, path: &[&str]) -> std::result::Result<String, String> {
    match field(row, path)? {
        Value::String(s) => Ok(s.clone()),
        // Labels may be numbers (`str(x["label"])` in MIB).
        Value::Number(n) => Ok(n.to_string()),
        other => Err(format!("`{}` must be text, found {other}", path.join("."))),
    }
}

/// `choices.label[answerKey]` of `obj`.
fn choice(obj: &Value) -> std::result::Result<String, String> {
    let key = field(obj, &["answerKey"])?
        .as_u64()
        .ok_or("`answerKey` must be an index")? as usize;
    let labels = field(obj, &["choices", "label"])?
        .as_array()
        .ok_or("`choices.label` must be a list")?;
    match labels.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Err(format!(
            "`answerKey` {key} has no label among {} choices",
            labels.len()
        )),
    }
}

/// One row's clean and corrupted token ids, answer token and wrong token.
type Row = (Vec<u32>, Vec<u32>, u32, u32);

/// Maps one row as MIB does; `None` when MIB's filter drops it.
fn mib_record(
    row: &Value,
    task: MibTask,
    cf: &str,
    tok: &Tokenizer,
) -> std::result::Result<Option<Row>, String> {
    let enc = |t: &str| tok.encode(t).map_err(|e| e.to_string());
    let first = |ids: &[u32], what: &str| {
        ids.first()
            .copied()
            .ok_or_else(|| format!("{what} encodes to no token"))
    };
    let (clean, corrupted, answer, wrong) = match task {
        MibTask::Ioi => {
            let io = enc(&format!(
                " {}",
                string(row, &["metadata", "indirect_object"])?
            ))?;
            let s = enc(&format!(" {}", string(row, &["metadata", "subject"])?))?;
            let c = enc(&format!(" {}", string(row, &["metadata", "random_c"])?))?;
            if io.len() != s.len() || io.len() != c.len() {
                return Ok(None);
            }
            let corrupted = string(row, &[cf, "prompt"])?;
            (
                string(row, &["prompt"])?,
                corrupted,
                first(&io, "the IO")?,
                first(&s, "the S")?,
            )
        }
        MibTask::Mcqa | MibTask::ArcEasy | MibTask::ArcChallenge => {
            let right = enc(&choice(row)?)?;
            let counter = field(row, &[cf])?;
            let wrong = enc(&choice(counter)?)?;
            if right.len() != wrong.len() {
                return Ok(None);
            }
            let corrupted = string(counter, &["prompt"])?;
            (
                string(row, &["prompt"])?,
                corrupted,
                first(&right, "the answer")?,
                first(&wrong, "the counterfactual answer")?,
            )
        }
        MibTask::ArithmeticAddition | MibTask::ArithmeticSubtraction => {
            let op = if task == MibTask::ArithmeticAddition {
                "+"
            } else {
                "-"
            };
            if string(row, &["operator"])? != op {
                return Ok(None);
            }
            let Ok(counter) = field(row, &[cf]) else {
                return Ok(None);
            };
            let (Ok(corrupted), Ok(wrong_label)) =
                (string(counter, &["prompt"]), string(counter, &["label"]))
            else {
                return Ok(None);
            };
            let (right, wrong) = (enc(&string(row, &["label"])?)?, enc(&wrong_label)?);
            if right.len() != 1 || wrong.len() != 1 {
                return Ok(None);
            }
            (string(row, &["prompt"])?, corrupted, right[0], wrong[0])
        }
    };
    Ok(Some((enc(&clean)?, enc(&corrupted)?, answer, wrong)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(lines: &[Value]) -> tempfile::NamedTempFile {
        let f = tempfile::Builder::new()
            .suffix(".jsonl")
            .tempfile()
            .unwrap();
        let text: Vec<String> = lines.iter().map(|v| v.to_string()).collect();
        std::fs::write(f.path(), text.join("\n") + "\n").unwrap();
        f
    }

    #[test]
    fn ioi_rows_map_like_mib_and_filters_are_counted() {
        let tok = Tokenizer::gpt2().unwrap();
        let row = |io: &str, s: &str, c: &str, cf_prompt: &str| {
            serde_json::json!({
                "prompt": format!("When {io} and {s} went to the store, {s} gave a drink to"),
                "metadata": {"indirect_object": io, "subject": s, "random_c": c},
                "s2_io_flip_counterfactual": {"prompt": cf_prompt},
            })
        };
        let f = write(&[
            row(
                "Mary",
                "John",
                "Anna",
                "When Mary and John went to the store, Mary gave a drink to",
            ),
            // " Tallulah" is several tokens: MIB's filter drops the row.
            row(
                "Tallulah",
                "John",
                "Anna",
                "When Tallulah and John went to the store, Tallulah gave a drink to",
            ),
            // Counterfactual of another length: skipped by eap.
            row(
                "Mary",
                "John",
                "Anna",
                "When Mary and John went to the big store, Mary gave a drink to",
            ),
        ]);
        let got = read_mib_jsonl(f.path(), MibTask::Ioi, &tok, None).unwrap();
        assert_eq!((got.rows, got.filtered, got.unequal_length), (3, 1, 1));
        let ex = &got.dataset.examples[0];
        assert_eq!(ex.target.answers, vec![tok.token_id(" Mary").unwrap()]);
        assert_eq!(ex.target.wrongs, vec![tok.token_id(" John").unwrap()]);
        assert_eq!(
            ex.clean,
            tok.encode("When Mary and John went to the store, John gave a drink to")
                .unwrap()
        );
    }

    #[test]
    fn arithmetic_and_mcqa_rows_map_like_mib() {
        let tok = Tokenizer::gpt2().unwrap();
        let f = write(&[
            serde_json::json!({"prompt": "Q: How much is 12 plus 7? A:", "label": 19, "operator": "+",
                "random_counterfactual": {"prompt": "Q: How much is 31 plus 5? A:", "label": 36}}),
            serde_json::json!({"prompt": "Q: How much is 12 minus 7? A:", "label": 5, "operator": "-",
                "random_counterfactual": {"prompt": "Q: How much is 31 minus 5? A:", "label": 26}}),
            serde_json::json!({"prompt": "Q: How much is 1 plus 7? A:", "label": 8, "operator": "+",
                "random_counterfactual": null}),
        ]);
        let got = read_mib_jsonl(f.path(), MibTask::ArithmeticAddition, &tok, None).unwrap();
        assert_eq!((got.rows, got.filtered, got.unequal_length), (3, 2, 0));
        let t = &got.dataset.examples[0].target;
        assert_eq!(
            (t.answers[0], t.wrongs[0]),
            (tok.token_id("19").unwrap(), tok.token_id("36").unwrap())
        );

        let f = write(&[serde_json::json!({
            "prompt": "The sky is blue. What color is the sky?\nA. red\nB. blue\nAnswer:",
            "choices": {"label": ["A", "B"], "text": ["red", "blue"]}, "answerKey": 1,
            "symbol_counterfactual": {"prompt": "The sky is blue. What color is the sky?\nB. red\nA. blue\nAnswer:",
                "choices": {"label": ["B", "A"]}, "answerKey": 1},
        })]);
        let got = read_mib_jsonl(f.path(), MibTask::Mcqa, &tok, None).unwrap();
        let t = &got.dataset.examples[0].target;
        assert_eq!(
            (t.answers[0], t.wrongs[0]),
            (tok.token_id("B").unwrap(), tok.token_id("A").unwrap())
        );
    }

    #[test]
    fn missing_fields_are_named_with_their_line() {
        let tok = Tokenizer::gpt2().unwrap();
        let f =
            write(&[serde_json::json!({"prompt": "x", "metadata": {"indirect_object": "Mary"}})]);
        let e = read_mib_jsonl(f.path(), MibTask::Ioi, &tok, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(":1") && e.contains("metadata.subject"), "{e}");
        let f = write(&[
            serde_json::json!({"prompt": "Q: 1 plus 2? A:", "label": 3, "operator": "+",
            "random_counterfactual": {"prompt": "Q: 1 plus 2 plus 2? A:", "label": 5}}),
        ]);
        let e = read_mib_jsonl(f.path(), MibTask::ArithmeticAddition, &tok, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("different token lengths"), "{e}");
    }
}
