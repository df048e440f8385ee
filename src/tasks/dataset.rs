//! Datasets of clean/corrupted prompt pairs: the JSONL format `eap` reads and writes, and
//! importers for EAP-IG's CSV and auto-circuit's prompt JSON.
//!
//! JSONL: one example per line,
//! `{"clean": P, "corrupted": P, "answer": A, "wrong": A}` where a prompt `P` is text or an array
//! of token ids, and an answer `A` is a token's text (exactly one token, e.g. `" Mary"`), a token
//! id, or a list of them. `wrong` may be left out (no wrong answers: fine for nll, kl and
//! prob-diff). Blank lines are skipped. Within an example the clean and corrupted prompts must have
//! the same number of tokens; across examples lengths may differ.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::metric::Target;
use super::tokenizer::Tokenizer;
use crate::{Error, Result};

/// One clean/corrupted pair, tokenized.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub clean: Vec<u32>,
    pub corrupted: Vec<u32>,
    pub target: Target,
}

/// A named list of examples.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub name: String,
    pub examples: Vec<Example>,
}

/// A prompt as written in a JSONL line: text, or token ids.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PromptSpec {
    Text(String),
    Ids(Vec<u32>),
}

/// One answer token as written in a JSONL line: its id or its text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenSpec {
    Id(u32),
    Text(String),
}

/// The `answer` or `wrong` field: one token or a list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AnswerSpec {
    One(TokenSpec),
    Many(Vec<TokenSpec>),
}

/// One line of a JSONL dataset, as generators write it. Serialises with the fields in the order
/// `clean`, `corrupted`, `answer`, `wrong`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub clean: PromptSpec,
    pub corrupted: PromptSpec,
    pub answer: AnswerSpec,
    pub wrong: AnswerSpec,
}

impl Record {
    /// Whether a prompt or an answer is text (needs a tokenizer).
    pub fn has_text(&self) -> bool {
        let text = |a: &AnswerSpec| match a {
            AnswerSpec::One(t) => matches!(t, TokenSpec::Text(_)),
            AnswerSpec::Many(ts) => ts.iter().any(|t| matches!(t, TokenSpec::Text(_))),
        };
        matches!(self.clean, PromptSpec::Text(_))
            || matches!(self.corrupted, PromptSpec::Text(_))
            || text(&self.answer)
            || text(&self.wrong)
    }
}

const JSONL_EMPTY: &str = "no examples (the file is empty)";

/// The records of a JSONL file, each with the line it came from.
fn jsonl_records(path: &Path) -> Result<Vec<(Origin<'_>, Record)>> {
    let text = read_text(path)?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let origin = Origin { path, line: i + 1 };
        let v: Value =
            serde_json::from_str(line).map_err(|e| origin.parse(format!("malformed JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| origin.parse("expected a JSON object"))?;
        let record = origin.record(obj)?;
        records.push((origin, record));
    }
    Ok(records)
}

fn name_of(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Where an example came from, for error messages: the file and the line (JSONL, CSV) or the
/// position in the file's list (auto-circuit JSON).
struct Origin<'a> {
    path: &'a Path,
    line: usize,
}

impl Origin<'_> {
    fn parse(&self, message: impl Into<String>) -> Error {
        Error::Parse {
            path: self.path.to_path_buf(),
            line: Some(self.line),
            message: message.into(),
        }
    }
    fn example(&self, message: impl Into<String>) -> Error {
        Error::Example {
            source_name: self.path.display().to_string(),
            line: self.line,
            message: message.into(),
        }
    }

    /// A prompt as JSON: text or an array of token ids.
    fn prompt_spec(&self, field: &str, v: &Value) -> Result<PromptSpec> {
        match v {
            Value::String(text) => Ok(PromptSpec::Text(text.clone())),
            Value::Array(items) => Ok(PromptSpec::Ids(
                items
                    .iter()
                    .map(|x| self.token_id_value(field, x))
                    .collect::<Result<Vec<u32>>>()?,
            )),
            _ => Err(self.parse(format!("`{field}` must be text or an array of token ids"))),
        }
    }

    fn token_id_value(&self, field: &str, v: &Value) -> Result<u32> {
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| self.parse(format!("`{field}` holds {v}, not a token id")))
    }

    /// An answer as JSON: a token's text or id, or a list of them.
    fn answer_spec(&self, field: &str, v: &Value) -> Result<AnswerSpec> {
        let one = |x: &Value| -> Result<TokenSpec> {
            match x {
                Value::String(s) => Ok(TokenSpec::Text(s.clone())),
                Value::Number(_) => Ok(TokenSpec::Id(self.token_id_value(field, x)?)),
                _ => Err(self.parse(format!(
                    "`{field}` holds {x}: expected a token's text or id"
                ))),
            }
        };
        match v {
            Value::Array(items) => Ok(AnswerSpec::Many(
                items.iter().map(one).collect::<Result<_>>()?,
            )),
            x => Ok(AnswerSpec::One(one(x)?)),
        }
    }

    fn prompt(&self, field: &str, spec: &PromptSpec, tok: Option<&Tokenizer>) -> Result<Vec<u32>> {
        let ids = match spec {
            PromptSpec::Text(text) => {
                let tok = tok.ok_or_else(|| {
                    self.example(format!(
                        "`{field}` is text, but no tokenizer was given (give one, or write token ids)"
                    ))
                })?;
                tok.encode(text)
                    .map_err(|e| self.example(format!("`{field}`: {e}")))?
            }
            PromptSpec::Ids(ids) => ids
                .iter()
                .map(|&id| self.check_id(field, id, tok))
                .collect::<Result<Vec<u32>>>()?,
        };
        if ids.is_empty() {
            return Err(self.example(format!("`{field}` is empty")));
        }
        Ok(ids)
    }

    fn check_id(&self, field: &str, id: u32, tok: Option<&Tokenizer>) -> Result<u32> {
        if let Some(tok) = tok {
            if id as usize >= tok.vocab_size() {
                return Err(self.example(format!(
                    "`{field}`: token id {id} is outside the vocabulary ({} tokens)",
                    tok.vocab_size()
                )));
            }
        }
        Ok(id)
    }

    fn token_text(&self, field: &str, text: &str, tok: Option<&Tokenizer>) -> Result<u32> {
        let tok = tok.ok_or_else(|| {
            self.example(format!(
                "`{field}` is text ({text:?}), but no tokenizer was given (give one, or write token ids)"
            ))
        })?;
        tok.token_id(text)
            .map_err(|e| self.example(format!("`{field}`: {e}")))
    }

    fn answers(&self, field: &str, spec: &AnswerSpec, tok: Option<&Tokenizer>) -> Result<Vec<u32>> {
        let one = |t: &TokenSpec| match t {
            TokenSpec::Text(text) => self.token_text(field, text, tok),
            TokenSpec::Id(id) => self.check_id(field, *id, tok),
        };
        match spec {
            AnswerSpec::One(t) => Ok(vec![one(t)?]),
            AnswerSpec::Many(ts) => ts.iter().map(one).collect(),
        }
    }

    /// One record, tokenized and checked.
    fn to_example(&self, record: &Record, tok: Option<&Tokenizer>) -> Result<Example> {
        let clean = self.prompt("clean", &record.clean, tok)?;
        let corrupted = self.prompt("corrupted", &record.corrupted, tok)?;
        let answers = self.answers("answer", &record.answer, tok)?;
        if answers.is_empty() {
            return Err(self.example("`answer` is an empty list"));
        }
        let wrongs = self.answers("wrong", &record.wrong, tok)?;
        self.pair(clean, corrupted, Target { answers, wrongs })
    }

    /// One JSONL line's object as a record (a missing `wrong` is no wrong answer).
    fn record(&self, obj: &serde_json::Map<String, Value>) -> Result<Record> {
        Ok(Record {
            clean: self.prompt_spec("clean", get(self, obj, "clean")?)?,
            corrupted: self.prompt_spec("corrupted", get(self, obj, "corrupted")?)?,
            answer: self.answer_spec("answer", get(self, obj, "answer")?)?,
            wrong: match obj.get("wrong") {
                Some(w) => self.answer_spec("wrong", w)?,
                None => AnswerSpec::Many(Vec::new()),
            },
        })
    }

    fn pair(&self, clean: Vec<u32>, corrupted: Vec<u32>, target: Target) -> Result<Example> {
        if clean.len() != corrupted.len() {
            return Err(self.example(format!(
                "clean has {} tokens, corrupted {}; a pair must have equal token lengths",
                clean.len(),
                corrupted.len()
            )));
        }
        Ok(Example {
            clean,
            corrupted,
            target,
        })
    }
}

fn get<'v>(
    origin: &Origin<'_>,
    obj: &'v serde_json::Map<String, Value>,
    key: &str,
) -> Result<&'v Value> {
    obj.get(key)
        .ok_or_else(|| origin.parse(format!("missing field `{key}`")))
}

impl Dataset {
    /// Tokenizes `records` (the lines of a JSONL dataset, as [`crate::tasks::generate`]
    /// writes them) into the dataset `name`. `tok` tokenizes text prompts and answers; with
    /// `None` every prompt and answer must be token ids. Errors name example `i + 1`.
    pub fn from_records(
        name: &str,
        records: &[Record],
        tok: Option<&Tokenizer>,
    ) -> Result<Dataset> {
        let source = Path::new(name);
        let at = records.iter().enumerate().map(|(i, r)| {
            let origin = Origin {
                path: source,
                line: i + 1,
            };
            (origin, r.clone())
        });
        Dataset::from_origins(name, source, at, tok, "no examples")
    }

    /// The one path from records to a dataset: each record tokenized and checked where it
    /// came from.
    fn from_origins<'p>(
        name: &str,
        source: &Path,
        records: impl IntoIterator<Item = (Origin<'p>, Record)>,
        tok: Option<&Tokenizer>,
        if_empty: &str,
    ) -> Result<Dataset> {
        let examples = records
            .into_iter()
            .map(|(origin, record)| origin.to_example(&record, tok))
            .collect::<Result<Vec<_>>>()?;
        if examples.is_empty() {
            return Err(Error::Parse {
                path: source.to_path_buf(),
                line: None,
                message: if_empty.to_string(),
            });
        }
        Ok(Dataset {
            name: name.to_string(),
            examples,
        })
    }

    /// Reads `eap`'s JSONL format (module docs) through [`Dataset::from_records`]'s path. `tok`
    /// tokenizes text prompts and answers; with `None` every prompt and answer must be token
    /// ids. The dataset is named after the file's stem.
    pub fn from_jsonl(path: &Path, tok: Option<&Tokenizer>) -> Result<Dataset> {
        let records = jsonl_records(path)?;
        Dataset::from_origins(&name_of(path), path, records, tok, JSONL_EMPTY)
    }

    /// [`from_jsonl`](Self::from_jsonl) calling `tok` for the tokenizer only if some prompt or
    /// answer is text: a file of token ids never builds one (GPT-2's takes ~50 ms). Without a
    /// tokenizer, ids are checked against the model's vocabulary when it runs them.
    pub fn from_jsonl_lazy(
        path: &Path,
        tok: impl FnOnce() -> Result<Option<Tokenizer>>,
    ) -> Result<Dataset> {
        let records = jsonl_records(path)?;
        let tok = match records.iter().any(|(_, r)| r.has_text()) {
            true => tok()?,
            false => None,
        };
        Dataset::from_origins(&name_of(path), path, records, tok.as_ref(), JSONL_EMPTY)
    }

    /// Reads a CSV of EAP-IG (hannamw/EAP-IG). Two layouts, told apart by the header:
    ///
    /// * `clean,corrupted,correct_idx,incorrect_idx` (its IOI files; other columns are ignored):
    ///   the answer and the wrong answer are token ids.
    /// * `clean,corrupted,label` (its Greater-Than file): as in EAP-IG's `prob_diff`, `label` is
    ///   the two-digit year YY of the clean prompt; the answers are the tokens `"YY+1"`…`"99"`,
    ///   the wrongs `"00"`…`"YY"`.
    pub fn from_eapig_csv(path: &Path, tok: &Tokenizer) -> Result<Dataset> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_path(path)
            .map_err(|e| csv_error(path, e))?;
        let headers = reader.headers().map_err(|e| csv_error(path, e))?.clone();
        let col = |name: &str| headers.iter().position(|h| h.trim() == name);
        let missing = |what: &str| {
            Error::Parse {
            path: path.to_path_buf(),
            line: Some(1),
            message: format!(
                "no `{what}` column; expected the header clean,corrupted,correct_idx,incorrect_idx or clean,corrupted,label"
            ),
        }
        };
        let clean_col = col("clean").ok_or_else(|| missing("clean"))?;
        let corrupted_col = col("corrupted").ok_or_else(|| missing("corrupted"))?;
        enum Layout {
            Idx(usize, usize),
            Year(usize, Vec<u32>),
        }
        let layout = match (col("correct_idx"), col("incorrect_idx"), col("label")) {
            (Some(a), Some(b), _) => Layout::Idx(a, b),
            (_, _, Some(l)) => Layout::Year(l, year_tokens(tok)?),
            _ => return Err(missing("correct_idx/incorrect_idx or label")),
        };
        let mut examples = Vec::new();
        for record in reader.records() {
            let record = record.map_err(|e| csv_error(path, e))?;
            let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
            let origin = Origin { path, line };
            let field = |c: usize| record.get(c).unwrap_or("");
            let clean = origin.prompt(
                "clean",
                &PromptSpec::Text(field(clean_col).to_string()),
                Some(tok),
            )?;
            let corrupted = origin.prompt(
                "corrupted",
                &PromptSpec::Text(field(corrupted_col).to_string()),
                Some(tok),
            )?;
            let int = |c: usize, name: &str| -> Result<u32> {
                field(c).trim().parse::<u32>().map_err(|_| {
                    origin.parse(format!("`{name}` is {:?}, not a whole number", field(c)))
                })
            };
            let target = match &layout {
                Layout::Idx(a, b) => Target {
                    answers: vec![origin.check_id(
                        "correct_idx",
                        int(*a, "correct_idx")?,
                        Some(tok),
                    )?],
                    wrongs: vec![origin.check_id(
                        "incorrect_idx",
                        int(*b, "incorrect_idx")?,
                        Some(tok),
                    )?],
                },
                Layout::Year(l, years) => {
                    let yy = int(*l, "label")? as usize;
                    if yy > 99 {
                        return Err(origin.example(format!(
                            "`label` is {yy}; EAP-IG's label is a two-digit year (0-99)"
                        )));
                    }
                    Target {
                        answers: years[yy + 1..].to_vec(),
                        wrongs: years[..=yy].to_vec(),
                    }
                }
            };
            examples.push(origin.pair(clean, corrupted, target)?);
        }
        if examples.is_empty() {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                line: None,
                message: "no examples".to_string(),
            });
        }
        Ok(Dataset {
            name: name_of(path),
            examples,
        })
    }

    /// Reads auto-circuit's prompt JSON (UFO-101/auto-circuit, `datasets/*.json`):
    /// `{"prompts": [{"clean", "corrupt", "answers", "wrong_answers"}, …]}` with prompts as text
    /// or token ids and answers as lists of token texts or ids. Other keys (`seq_labels`,
    /// `word_idxs`) are ignored. Errors give the example's position in `prompts` (from 1).
    pub fn from_autocircuit_json(path: &Path, tok: &Tokenizer) -> Result<Dataset> {
        let text = read_text(path)?;
        let whole = |message: String| Error::Parse {
            path: path.to_path_buf(),
            line: None,
            message,
        };
        let v: Value =
            serde_json::from_str(&text).map_err(|e| whole(format!("malformed JSON: {e}")))?;
        let prompts = v.get("prompts").and_then(Value::as_array).ok_or_else(|| {
            whole("no `prompts` list (auto-circuit's dataset layout)".to_string())
        })?;
        let mut examples = Vec::with_capacity(prompts.len());
        for (i, p) in prompts.iter().enumerate() {
            let origin = Origin { path, line: i + 1 };
            let obj = p
                .as_object()
                .ok_or_else(|| origin.example("expected an object"))?;
            let field = |key: &str| {
                obj.get(key)
                    .ok_or_else(|| origin.example(format!("missing field `{key}`")))
            };
            let spec = |key: &str| origin.prompt_spec(key, field(key)?);
            let clean = origin.prompt("clean", &spec("clean")?, Some(tok))?;
            let corrupted = origin.prompt("corrupt", &spec("corrupt")?, Some(tok))?;
            let answer = |key: &str| origin.answer_spec(key, field(key)?);
            let answers = origin.answers("answers", &answer("answers")?, Some(tok))?;
            let wrongs = origin.answers("wrong_answers", &answer("wrong_answers")?, Some(tok))?;
            examples.push(origin.pair(clean, corrupted, Target { answers, wrongs })?);
        }
        if examples.is_empty() {
            return Err(whole("`prompts` is empty".to_string()));
        }
        Ok(Dataset {
            name: name_of(path),
            examples,
        })
    }
}

fn csv_error(path: &Path, e: csv::Error) -> Error {
    let line = e.position().map(|p| p.line() as usize);
    match e.into_kind() {
        csv::ErrorKind::Io(source) => Error::io(path, source),
        kind => Error::Parse {
            path: path.to_path_buf(),
            line,
            message: format!("malformed CSV: {kind:?}"),
        },
    }
}

/// Token ids of the two-digit years `"00"` … `"99"` (no leading space), as Greater-Than reads them.
pub fn year_tokens(tok: &Tokenizer) -> Result<Vec<u32>> {
    (0..100)
        .map(|y| {
            tok.token_id(&format!("{y:02}")).map_err(|e| {
                Error::invalid(format!(
                    "greater-than needs one token per two-digit year: {e}"
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::tokenizer::tests::gpt2;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn jsonl_text_ids_and_lists() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "mixed.jsonl",
            concat!(
                r#"{"clean": "When Mary and John went", "corrupted": "When Alice and Bob went", "answer": " Mary", "wrong": " John"}"#,
                "\n\n",
                r#"{"clean": [1, 2, 3], "corrupted": [4, 5, 6], "answer": 7, "wrong": [8, " John"]}"#,
                "\n",
                r#"{"clean": [1, 2], "corrupted": [4, 5], "answer": ["45", 9]}"#,
                "\n"
            ),
        );
        let d = Dataset::from_jsonl(&p, Some(gpt2())).unwrap();
        assert_eq!(d.name, "mixed");
        assert_eq!(d.examples.len(), 3);
        let e = &d.examples[0];
        assert_eq!(e.clean.len(), e.corrupted.len());
        assert_eq!(
            e.target,
            Target {
                answers: vec![5335],
                wrongs: vec![1757]
            }
        );
        assert_eq!(d.examples[1].clean, vec![1, 2, 3]);
        assert_eq!(
            d.examples[1].target,
            Target {
                answers: vec![7],
                wrongs: vec![8, 1757]
            }
        );
        assert_eq!(d.examples[2].target.answers, vec![2231, 9]);
        assert!(d.examples[2].target.wrongs.is_empty());
    }

    /// Generated records become the same dataset, name included, whether they go through a
    /// JSONL file named after the task (as `eap` once did) or straight to `from_records`.
    #[test]
    fn records_in_memory_equal_records_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        for task in crate::tasks::Task::ALL {
            let records = crate::tasks::generate(task, 6, 3, gpt2()).unwrap();
            let path = dir.path().join(format!("{task}.jsonl"));
            crate::tasks::write_jsonl(&records, &path).unwrap();
            let through_file = Dataset::from_jsonl(&path, Some(gpt2())).unwrap();
            let direct = Dataset::from_records(task.name(), &records, Some(gpt2())).unwrap();
            assert_eq!(direct, through_file, "{task}");
        }
        let e = Dataset::from_records("none", &[], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no examples"), "{e}");
    }

    #[test]
    fn jsonl_ids_need_no_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "ids.jsonl",
            "{\"clean\": [1, 2], \"corrupted\": [3, 4], \"answer\": 5, \"wrong\": 6}\n",
        );
        let d = Dataset::from_jsonl(&p, None).unwrap();
        assert_eq!(d.examples[0].target.wrongs, vec![6]);
        // The lazy reader makes no tokenizer for ids, and one as soon as any field is text.
        let lazy = |p: &Path| {
            let made = std::cell::Cell::new(false);
            let d = Dataset::from_jsonl_lazy(p, || {
                made.set(true);
                Ok(Some(gpt2().clone()))
            });
            (d.unwrap(), made.get())
        };
        let (d, made) = lazy(&p);
        assert!(!made);
        assert_eq!(d.examples[0].clean, vec![1, 2]);
        let mixed = write(
            &dir,
            "mixed.jsonl",
            "{\"clean\": [1, 2], \"corrupted\": [3, 4], \"answer\": 5, \"wrong\": 6}\n\
             {\"clean\": [1, 2], \"corrupted\": [3, 4], \"answer\": \" Mary\", \"wrong\": 6}\n",
        );
        let (d, made) = lazy(&mixed);
        assert!(made);
        assert_eq!(
            d.examples[1].target.answers,
            vec![gpt2().token_id(" Mary").unwrap()]
        );
    }

    fn jsonl_err(text: &str, tok: Option<&Tokenizer>) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "bad.jsonl", text);
        let e = Dataset::from_jsonl(&p, tok).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl"), "error does not name the file: {e}");
        e
    }

    #[test]
    fn jsonl_errors_name_file_and_line() {
        let ok = r#"{"clean": [1], "corrupted": [2], "answer": 3, "wrong": 4}"#;
        let e = jsonl_err(&format!("{ok}\n{{\"clean\": [1, \n"), None);
        assert!(e.contains(":2") && e.contains("malformed JSON"), "{e}");
        let e = jsonl_err(
            &format!("{ok}\n{ok}\n{{\"clean\": [1], \"answer\": 3}}\n"),
            None,
        );
        assert!(
            e.contains(":3") && e.contains("missing field `corrupted`"),
            "{e}"
        );
        let e = jsonl_err(r#"{"clean": "a b", "corrupted": "c d", "answer": 3}"#, None);
        assert!(e.contains("example 1") && e.contains("no tokenizer"), "{e}");
        let e = jsonl_err(
            r#"{"clean": [1], "corrupted": [2], "answer": " Maryanne"}"#,
            Some(gpt2()),
        );
        assert!(e.contains("2 tokens"), "{e}");
        let e = jsonl_err(
            r#"{"clean": [1], "corrupted": [2], "answer": 99999}"#,
            Some(gpt2()),
        );
        assert!(e.contains("outside the vocabulary"), "{e}");
        let e = jsonl_err(
            "\n\n{\"clean\": \"When Mary and John went to the store\", \"corrupted\": \"When Mary and Johnathan went to the store\", \"answer\": \" Mary\"}\n",
            Some(gpt2()),
        );
        assert!(
            e.contains("example 3") && e.contains("clean has 8 tokens, corrupted 9"),
            "{e}"
        );
        let e = jsonl_err("\n  \n", None);
        assert!(e.contains("empty"), "{e}");
        let e = jsonl_err(r#"{"clean": [], "corrupted": [], "answer": 1}"#, None);
        assert!(e.contains("empty"), "{e}");
        let e = jsonl_err(r#"{"clean": [1], "corrupted": [2], "answer": []}"#, None);
        assert!(e.contains("empty list"), "{e}");
        let e = jsonl_err(r#"{"clean": [1.5], "corrupted": [2], "answer": 1}"#, None);
        assert!(e.contains("not a token id"), "{e}");
        let missing = Dataset::from_jsonl(Path::new("/nonexistent/x.jsonl"), None).unwrap_err();
        assert!(matches!(missing, Error::Io { .. }));
    }

    #[test]
    fn eapig_csv_idx_layout() {
        let dir = tempfile::tempdir().unwrap();
        // the layout of EAP-IG's ioi_llama.csv: an unnamed index column and an extra column
        let p = write(
            &dir,
            "ioi.csv",
            ",clean,corrupted,corrupted_hard,correct_idx,incorrect_idx\n\
             470,\"Then, Mary and John went to the store. John gave a drink to\",\"Then, Alice and Bob went to the store. Tom gave a drink to\",\"x\",5335,1757\n",
        );
        let d = Dataset::from_eapig_csv(&p, gpt2()).unwrap();
        assert_eq!(d.examples.len(), 1);
        assert_eq!(
            d.examples[0].target,
            Target {
                answers: vec![5335],
                wrongs: vec![1757]
            }
        );
        assert_eq!(d.examples[0].clean.len(), d.examples[0].corrupted.len());
    }

    #[test]
    fn eapig_csv_label_is_a_year() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "gt.csv",
            "clean,corrupted,label\n\
             The contract lasted from the year 1352 to the year 13,The contract lasted from the year 1301 to the year 13,52\n",
        );
        let d = Dataset::from_eapig_csv(&p, gpt2()).unwrap();
        let t = &d.examples[0].target;
        let years = year_tokens(gpt2()).unwrap();
        assert_eq!(t.answers.len(), 47); // 53..=99
        assert_eq!(t.wrongs.len(), 53); // 00..=52
        assert_eq!(t.answers[0], years[53]);
        assert_eq!(*t.wrongs.last().unwrap(), gpt2().token_id("52").unwrap());

        let bad = write(&dir, "bad.csv", "clean,corrupted,label\na b,c d e,5\n");
        let e = Dataset::from_eapig_csv(&bad, gpt2())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("example 2") && e.contains("clean has 2 tokens, corrupted 3"),
            "{e}"
        );
        let bad = write(&dir, "bad2.csv", "clean,corrupted,label\na,b,x\n");
        let e = Dataset::from_eapig_csv(&bad, gpt2())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bad2.csv:2") && e.contains("not a whole number"),
            "{e}"
        );
        let bad = write(&dir, "bad3.csv", "clean,corrupted,answer\na,b,1\n");
        assert!(Dataset::from_eapig_csv(&bad, gpt2()).is_err());
    }

    #[test]
    fn autocircuit_json() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "ioi_prompts.json",
            r#"{"word_idxs": {"IO": 2},
                "prompts": [
                  {"clean": "Then, Scott and Jeremy went to the hospital. Jeremy gave a snack to",
                   "corrupt": "Then, Michael and Anderson went to the hospital. Rachel gave a snack to",
                   "answers": [" Scott"], "wrong_answers": [" Jeremy"]},
                  {"clean": [1, 2, 3], "corrupt": [4, 5, 6], "answers": [7, 8], "wrong_answers": []}
                ]}"#,
        );
        let d = Dataset::from_autocircuit_json(&p, gpt2()).unwrap();
        assert_eq!(d.examples.len(), 2);
        let scott = gpt2().token_id(" Scott").unwrap();
        let jeremy = gpt2().token_id(" Jeremy").unwrap();
        assert_eq!(
            d.examples[0].target,
            Target {
                answers: vec![scott],
                wrongs: vec![jeremy]
            }
        );
        assert_eq!(d.examples[1].target.answers, vec![7, 8]);

        let bad = write(
            &dir,
            "bad.json",
            r#"{"prompts": [{"clean": "a", "corrupt": "b", "answers": [" a"]}]}"#,
        );
        let e = Dataset::from_autocircuit_json(&bad, gpt2())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("example 1") && e.contains("wrong_answers"),
            "{e}"
        );
        let bad = write(&dir, "bad2.json", r#"{"data": []}"#);
        assert!(Dataset::from_autocircuit_json(&bad, gpt2()).is_err());
    }
}
