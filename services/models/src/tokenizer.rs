//! CLIP's BPE tokenizer for a diffusers `tokenizer/` folder, built on the `tokenizers` crate.
//!
//! The pipeline is the one transformers' `CLIPTokenizer` builds (`models/clip/
//! tokenization_clip.py`): NFC, runs of whitespace to one space, lower-case; CLIP's
//! pre-tokenization regex, then GPT-2's byte-to-unicode mapping; BPE with `</w>` marking the end
//! of each word. Around the content go `<|startoftext|>` and `<|endoftext|>`, and the result is
//! truncated (keeping the end token) and padded to `model_max_length`, as Stable Diffusion
//! pipelines call it (`padding="max_length", truncation=True`).
//!
//! Released SD 1.x/2.x folders ship `vocab.json` + `merges.txt` + `tokenizer_config.json` +
//! `special_tokens_map.json`; folders written by transformers 5 ship `tokenizer.json` instead.
//! `tokenizer.json` is preferred when present, as transformers does, and the parity tests check
//! that both routes give the ids transformers gives.
//!
//! Special tokens come from the folder, not from constants: SD 2.x pads with `!` (id 0), not
//! `<|endoftext|>`, and that changes the text embeddings of every padded position. Special
//! tokens are registered as added tokens, so, as in transformers, their literal text in a
//! prompt maps to their id (with SD 2.x, every `!` in a prompt becomes id 0).

use crate::{ModelError, weights::read_json};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::{
    AddedToken, NormalizerWrapper, PreTokenizerWrapper, Tokenizer,
    models::bpe::BPE,
    normalizers::replace::ReplacePattern,
    normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence},
    pre_tokenizers::{
        byte_level::ByteLevel,
        sequence::Sequence as PreTokenizerSequence,
        split::{Split, SplitPattern},
    },
    tokenizer::SplitDelimiterBehavior,
};

/// CLIP's pre-tokenization pattern (OpenAI's `SimpleTokenizer`): special tokens, English
/// contractions, letter runs, single digits, runs of other non-space characters.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Upper bound on `model_max_length`: configs without a real limit carry transformers'
/// "very large integer" (1e30); padding to that would be a bug, not a choice.
const MAX_MODEL_LENGTH: usize = 4096;

/// One prompt's token ids, ready for the text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// `<|startoftext|>`, content, `<|endoftext|>`, then padding: exactly `max_length` ids.
    pub ids: Vec<i64>,
    /// Content tokens dropped because the prompt was too long (0 when it fit). Services
    /// report this so a client learns its prompt was cut, as diffusers logs a warning.
    pub truncated: usize,
}

/// The special tokens and length limit of a tokenizer folder.
#[derive(Debug, Clone)]
struct SpecialTokens {
    bos: String,
    eos: String,
    pad: String,
    unk: String,
    max_length: usize,
}

/// A CLIP tokenizer loaded from a diffusers `tokenizer/` folder.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    dir: PathBuf,
    bos_id: i64,
    eos_id: i64,
    pad_id: i64,
    max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("dir", &self.dir)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}

impl ClipTokenizer {
    /// Loads `dir` (a diffusers `tokenizer/` folder): `tokenizer.json` if present, otherwise
    /// `vocab.json` + `merges.txt`; special tokens and `model_max_length` from
    /// `tokenizer_config.json`, overridden by `special_tokens_map.json` (transformers' legacy
    /// precedence, which is what gives SD 2.x its `!` padding).
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let special = read_special_tokens(dir)?;
        let json = dir.join("tokenizer.json");
        let (mut tokenizer, source) = if json.is_file() {
            let t = Tokenizer::from_file(&json).map_err(|e| tok_err(&json, e))?;
            (t, json)
        } else {
            let vocab = dir.join("vocab.json");
            (build_from_vocab(dir, &special)?, vocab)
        };
        // Truncation, padding and special tokens are applied in `encode`, identically for both
        // sources; a tokenizer.json's own settings would otherwise apply twice.
        tokenizer
            .with_truncation(None)
            .map_err(|e| tok_err(&source, e))?;
        tokenizer.with_padding(None);
        tokenizer.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        let id = |token: &str, field: &str| -> Result<i64, ModelError> {
            tokenizer
                .token_to_id(token)
                .map(i64::from)
                .ok_or_else(|| ModelError::Tokenizer {
                    path: source.clone(),
                    message: format!("{field} {token:?} is not in the vocabulary"),
                })
        };
        // Looked up before registering them as added tokens: registering an unknown token
        // would give it a fresh id past the text encoder's embedding table.
        let (bos_id, eos_id, pad_id) = (
            id(&special.bos, "bos_token")?,
            id(&special.eos, "eos_token")?,
            id(&special.pad, "pad_token")?,
        );
        id(&special.unk, "unk_token")?;
        tokenizer.add_special_tokens(
            &[&special.bos, &special.eos, &special.unk, &special.pad]
                .map(|t| AddedToken::from(t.as_str(), true)),
        );
        Ok(Self {
            bos_id,
            eos_id,
            pad_id,
            max_length: special.max_length,
            dir: dir.to_path_buf(),
            tokenizer,
        })
    }

    /// Ids per prompt after padding (`model_max_length`, 77 for every SD CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Id of the padding token (`<|endoftext|>` for SD 1.x, `!` for SD 2.x).
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// Id of the start token (`<|startoftext|>`).
    pub fn bos_id(&self) -> i64 {
        self.bos_id
    }

    /// Id of the end token (`<|endoftext|>`).
    pub fn eos_id(&self) -> i64 {
        self.eos_id
    }

    /// Content tokens one row has room for: `max_length - 2` (75 for SD), the length of a
    /// long prompt's chunk.
    pub fn chunk_length(&self) -> usize {
        self.max_length - 2
    }

    /// Tokenizes one prompt into exactly [`Self::max_length`] ids: start token, the first
    /// `max_length - 2` content tokens, end token, padding. Same as transformers'
    /// `tokenizer(prompt, padding="max_length", max_length=..., truncation=True)`.
    pub fn encode(&self, prompt: &str) -> Result<TokenizedPrompt, ModelError> {
        let content = self.tokenize(prompt)?;
        let kept = content.len().min(self.chunk_length());
        Ok(TokenizedPrompt {
            ids: self.frame(&content[..kept]),
            truncated: content.len() - kept,
        })
    }

    /// The content token ids of `text`: no start/end token, no truncation, no padding.
    pub fn tokenize(&self, text: &str) -> Result<Vec<i64>, ModelError> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer {
                path: self.dir.clone(),
                message: format!("cannot tokenize prompt: {e}"),
            })?;
        Ok(encoding.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// One row of exactly [`Self::max_length`] ids around `content`: `[bos, content.., eos,
    /// pad..]`. Content beyond [`Self::chunk_length`] is cut (callers chunk or count it first).
    pub fn frame(&self, content: &[i64]) -> Vec<i64> {
        let kept = content.len().min(self.chunk_length());
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&content[..kept]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        ids
    }

    /// The vocabulary string of `id` (`a</w>`, `<|startoftext|>`), or `None` outside it.
    pub fn id_to_token(&self, id: i64) -> Option<String> {
        u32::try_from(id)
            .ok()
            .and_then(|id| self.tokenizer.id_to_token(id))
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// transformers' CLIPTokenizer pipeline over `vocab.json` + `merges.txt`.
fn build_from_vocab(dir: &Path, special: &SpecialTokens) -> Result<Tokenizer, ModelError> {
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    for file in [&vocab, &merges] {
        if !file.is_file() {
            return Err(ModelError::Missing { path: file.clone() });
        }
    }
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".to_string())
        .unk_token(special.unk.clone())
        .fuse_unk(false)
        .build()
        .map_err(|e| tok_err(&vocab, format!("{e} (with {})", merges.display())))?;
    let whitespace =
        Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(|e| tok_err(dir, e))?;
    let normalizer = NormalizerSequence::new(vec![
        NormalizerWrapper::from(NFC),
        NormalizerWrapper::from(whitespace),
        NormalizerWrapper::from(Lowercase),
    ]);
    // `invert = true` with `Removed`: the regex matches are the pieces, everything between them
    // (whitespace) is dropped. ByteLevel keeps GPT-2's own regex on, as transformers does.
    let split = Split::new(
        SplitPattern::Regex(CLIP_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| tok_err(dir, e))?;
    let pre_tokenizer = PreTokenizerSequence::new(vec![
        PreTokenizerWrapper::from(split),
        PreTokenizerWrapper::from(ByteLevel::new(false, true, true)),
    ]);
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_normalizer(Some(normalizer));
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    Ok(tokenizer)
}

/// Reads special tokens and `model_max_length`. A token is written either as a string or as
/// an object with `content` (transformers' serialised `AddedToken`).
fn read_special_tokens(dir: &Path) -> Result<SpecialTokens, ModelError> {
    let config_path = dir.join("tokenizer_config.json");
    let config: Value = read_json(&config_path)?;
    let map_path = dir.join("special_tokens_map.json");
    let map: Value = if map_path.is_file() {
        read_json(&map_path)?
    } else {
        Value::Null
    };

    let token = |field: &str, default: &str| -> Result<String, ModelError> {
        for (path, json) in [(&map_path, &map), (&config_path, &config)] {
            match json.get(field) {
                None | Some(Value::Null) => continue,
                Some(Value::String(s)) => return Ok(s.clone()),
                Some(v) => {
                    return v
                        .get("content")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .ok_or_else(|| ModelError::Config {
                            path: path.clone(),
                            message: format!("{field} must be a string or have a string `content`"),
                        });
                }
            }
        }
        // transformers' CLIPTokenizer defaults.
        Ok(default.to_string())
    };

    let max_length = match config.get("model_max_length") {
        Some(Value::Number(n)) => n.as_u64().map(|n| n as usize),
        _ => None,
    }
    .filter(|n| (2..=MAX_MODEL_LENGTH).contains(n))
    .ok_or_else(|| ModelError::Config {
        path: config_path.clone(),
        message: format!(
            "model_max_length must be an integer in 2..={MAX_MODEL_LENGTH} (77 for CLIP), got {}",
            config
                .get("model_max_length")
                .map_or("nothing".to_string(), Value::to_string)
        ),
    })?;

    Ok(SpecialTokens {
        bos: token("bos_token", "<|startoftext|>")?,
        eos: token("eos_token", "<|endoftext|>")?,
        pad: token("pad_token", "<|endoftext|>")?,
        unk: token("unk_token", "<|endoftext|>")?,
        max_length,
    })
}

// Tests unwrap: a failure should stop the test where it happens, with its message.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A toy vocabulary in CLIP's layout: the 256 byte symbols alone, then with `</w>`, then
    /// merged symbols, then the two special tokens. Enough to exercise the whole pipeline.
    fn toy_folder(dir: &Path, pad: &str, max_length: usize) {
        let mut symbols: Vec<char> = ('!'..='~').chain('¡'..='¬').chain('®'..='ÿ').collect();
        let mut n = 0;
        for b in 0u32..256 {
            let c = char::from_u32(b).unwrap();
            if !symbols.contains(&c) {
                symbols.push(char::from_u32(256 + n).unwrap());
                n += 1;
            }
        }
        let mut vocab: Vec<String> = symbols.iter().map(|c| c.to_string()).collect();
        vocab.extend(symbols.iter().map(|c| format!("{c}</w>")));
        let merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")];
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.extend(["<|startoftext|>".to_string(), "<|endoftext|>".to_string()]);
        let map: serde_json::Map<String, Value> = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), Value::from(i)))
            .collect();
        std::fs::write(dir.join("vocab.json"), Value::Object(map).to_string()).unwrap();
        let merges_txt: String = std::iter::once("#version: 0.2\n".to_string())
            .chain(merges.iter().map(|(a, b)| format!("{a} {b}\n")))
            .collect();
        std::fs::write(dir.join("merges.txt"), merges_txt).unwrap();
        let config = serde_json::json!({
            "model_max_length": max_length,
            "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>"},
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
        });
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        std::fs::write(
            dir.join("special_tokens_map.json"),
            serde_json::json!({ "pad_token": pad }).to_string(),
        )
        .unwrap();
    }

    // Toy ids: bytes 0..256, `x</w>` at 256 + same index, merges 512.., specials after.
    const CAT: i64 = 513;
    const DOG: i64 = 515;
    const BOS: i64 = 516;
    const EOS: i64 = 517;

    #[test]
    fn encodes_pads_and_truncates_like_clip() {
        let dir = tempfile::tempdir().unwrap();
        toy_folder(dir.path(), "<|endoftext|>", 8);
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.max_length(), 8);
        // Lower-casing, whitespace collapsing, `</w>` at word ends.
        let out = tok.encode("  CAT\n\t dog ").unwrap();
        assert_eq!(
            out,
            TokenizedPrompt {
                ids: vec![BOS, CAT, DOG, EOS, EOS, EOS, EOS, EOS],
                truncated: 0
            }
        );
        // Punctuation runs are one piece; "!" alone is byte 0 + 256.
        let out = tok.encode("cat!").unwrap();
        assert_eq!(&out.ids[..4], &[BOS, CAT, 256, EOS]);
        // Eight words, room for six: the end token is kept.
        let out = tok.encode("cat dog cat dog cat dog cat dog").unwrap();
        assert_eq!(out.ids, vec![BOS, CAT, DOG, CAT, DOG, CAT, DOG, EOS]);
        assert_eq!(out.truncated, 2);
        let out = tok.encode("").unwrap();
        assert_eq!(out.ids, vec![BOS, EOS, EOS, EOS, EOS, EOS, EOS, EOS]);
    }

    #[test]
    fn tokenize_frame_and_vocabulary_strings() {
        let dir = tempfile::tempdir().unwrap();
        toy_folder(dir.path(), "<|endoftext|>", 8);
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.chunk_length()),
            (BOS, EOS, 6)
        );
        // No truncation in `tokenize`; `frame` cuts to the chunk length.
        let content = tok.tokenize("cat dog cat dog cat dog cat dog").unwrap();
        assert_eq!(content.len(), 8);
        assert_eq!(
            tok.frame(&content[6..]),
            vec![BOS, CAT, DOG, EOS, EOS, EOS, EOS, EOS]
        );
        assert_eq!(tok.frame(&[]), tok.encode("").unwrap().ids);
        assert_eq!(
            tok.frame(&content),
            tok.encode("cat dog cat dog cat dog cat dog").unwrap().ids
        );
        assert_eq!(tok.id_to_token(CAT).as_deref(), Some("cat</w>"));
        assert_eq!(tok.id_to_token(BOS).as_deref(), Some("<|startoftext|>"));
        assert_eq!(tok.id_to_token(-1), None);
        assert_eq!(tok.id_to_token(1 << 40), None);
    }

    #[test]
    fn special_tokens_map_overrides_config_pad() {
        let dir = tempfile::tempdir().unwrap();
        toy_folder(dir.path(), "!", 6);
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.pad_id(), 0);
        // As in transformers, a special token's text maps to its id: "!" is now id 0.
        assert_eq!(
            tok.encode("dog!").unwrap().ids,
            vec![BOS, DOG, 0, EOS, 0, 0]
        );
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json"), "{err}");
        toy_folder(dir.path(), "<|endoftext|>", 77);
        std::fs::remove_file(dir.path().join("merges.txt")).unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("merges.txt: missing"), "{err}");
        toy_folder(dir.path(), "<|pad|>", 77);
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("vocab.json") && err.contains("pad_token \"<|pad|>\""),
            "{err}"
        );
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"model_max_length": 1e30}"#,
        )
        .unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("model_max_length"),
            "{err}"
        );
    }
}
