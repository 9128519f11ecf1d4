//! From prompts to the rows of token ids the CLIP text model runs on, with a weight per id.
//!
//! Without `long_prompt` each prompt is one row, `[bos, first 75 tokens, eos, pad..]`, and the
//! rest is counted as truncated. With it, a prompt's tokens are cut into chunks of 75, each
//! framed as its own row; the rows' hidden states are later concatenated along the sequence,
//! as the widely used web UIs do (AUTOMATIC1111's `FrozenCLIPEmbedderWithCustomWords`, without
//! its comma-seeking chunk boundaries). Every prompt of a call gets the same number of chunks,
//! the missing ones being empty rows (`[bos, eos, pad..]`), so a negative prompt lines up with
//! its prompt in the denoiser's batch.
//!
//! With `prompt_weighting` the emphasis syntax is parsed first
//! ([`sd_models::prompt_weighting`]); each fragment is tokenized on its own and its tokens carry
//! its weight. Start, end and padding positions weigh 1.

use sd_models::{ModelError, prompt_weighting, tokenizer::ClipTokenizer};

/// Most chunks (rows of `max_length`) one prompt may take with `long_prompt`: 8 x 75 = 600
/// content tokens, a context of 616 positions.
pub const MAX_CHUNKS: usize = 8;

/// The per-request switches of `EncodeRequest`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    pub long_prompt: bool,
    pub prompt_weighting: bool,
}

/// What planning needs from a tokenizer; [`ClipTokenizer`] in the service, a stub in tests.
pub trait Tokenize {
    /// Content ids of `text`, untruncated.
    fn tokenize(&self, text: &str) -> Result<Vec<i64>, ModelError>;
    /// `[bos, content.., eos, pad..]`, exactly `chunk_length() + 2` ids.
    fn frame(&self, content: &[i64]) -> Vec<i64>;
    /// Content ids per row.
    fn chunk_length(&self) -> usize;
}

impl Tokenize for ClipTokenizer {
    fn tokenize(&self, text: &str) -> Result<Vec<i64>, ModelError> {
        ClipTokenizer::tokenize(self, text)
    }
    fn frame(&self, content: &[i64]) -> Vec<i64> {
        ClipTokenizer::frame(self, content)
    }
    fn chunk_length(&self) -> usize {
        ClipTokenizer::chunk_length(self)
    }
}

/// The rows of one Encode call, prompt-major: prompt `p`'s chunks are rows
/// `p * chunks .. (p + 1) * chunks`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `prompts * chunks * row_length` ids.
    pub ids: Vec<i64>,
    /// One weight per id; all 1 without `prompt_weighting`.
    pub weights: Vec<f32>,
    /// Rows per prompt (1 without `long_prompt`).
    pub chunks: usize,
    /// Ids per row (`max_length`).
    pub row_length: usize,
    /// Per prompt, content tokens dropped (always 0 with `long_prompt`).
    pub truncated: Vec<u32>,
}

/// Tokenizes, weighs and chunks `prompts`. Bad emphasis syntax or a prompt over
/// [`MAX_CHUNKS`] is [`ModelError::Input`] naming `prompts[i]`.
pub fn plan(
    tokenizer: &impl Tokenize,
    prompts: &[String],
    options: Options,
) -> Result<Batch, ModelError> {
    let room = tokenizer.chunk_length();
    let row_length = room + 2;
    let mut per_prompt = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.iter().enumerate() {
        let (ids, weights) = if options.prompt_weighting {
            let fragments = prompt_weighting::parse(prompt)
                .map_err(|e| ModelError::Input(format!("prompts[{i}]: {e}")))?;
            let (mut ids, mut weights) = (Vec::new(), Vec::new());
            for f in fragments {
                let part = tokenizer.tokenize(&f.text)?;
                weights.extend(std::iter::repeat_n(f.weight, part.len()));
                ids.extend(part);
            }
            (ids, weights)
        } else {
            let ids = tokenizer.tokenize(prompt)?;
            let weights = vec![1.0; ids.len()];
            (ids, weights)
        };
        if options.long_prompt {
            let chunks = ids.len().div_ceil(room).max(1);
            if chunks > MAX_CHUNKS {
                return Err(ModelError::Input(format!(
                    "prompts[{i}]: {} tokens make {chunks} chunks of {room}, at most \
                     {MAX_CHUNKS} ({} tokens) with long_prompt",
                    ids.len(),
                    MAX_CHUNKS * room
                )));
            }
        }
        per_prompt.push((ids, weights));
    }
    let chunks = if options.long_prompt {
        per_prompt
            .iter()
            .map(|(ids, _)| ids.len().div_ceil(room).max(1))
            .max()
            .unwrap_or(1)
    } else {
        1
    };
    let mut batch = Batch {
        ids: Vec::with_capacity(prompts.len() * chunks * row_length),
        weights: Vec::with_capacity(prompts.len() * chunks * row_length),
        chunks,
        row_length,
        truncated: Vec::with_capacity(prompts.len()),
    };
    for (ids, weights) in per_prompt {
        let kept = ids.len().min(chunks * room);
        batch.truncated.push((ids.len() - kept) as u32);
        for c in 0..chunks {
            let span = (c * room).min(kept)..((c + 1) * room).min(kept);
            batch.ids.extend(tokenizer.frame(&ids[span.clone()]));
            batch.weights.push(1.0);
            batch.weights.extend_from_slice(&weights[span.clone()]);
            batch
                .weights
                .resize(batch.weights.len() + row_length - 1 - span.len(), 1.0);
        }
    }
    Ok(batch)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const BOS: i64 = 100;
    const EOS: i64 = 101;
    const PAD: i64 = 102;

    /// Words are their length as ids; rows of 4 content ids (max_length 6).
    struct Words;

    impl Tokenize for Words {
        fn tokenize(&self, text: &str) -> Result<Vec<i64>, ModelError> {
            Ok(text.split_whitespace().map(|w| w.len() as i64).collect())
        }
        fn frame(&self, content: &[i64]) -> Vec<i64> {
            let mut row = vec![BOS];
            row.extend_from_slice(&content[..content.len().min(4)]);
            row.push(EOS);
            row.resize(6, PAD);
            row
        }
        fn chunk_length(&self) -> usize {
            4
        }
    }

    fn prompts(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn default_truncates_to_one_row() {
        let b = plan(
            &Words,
            &prompts(&["a bb ccc dddd eeeee ffffff"]),
            Options::default(),
        )
        .unwrap();
        assert_eq!(b.ids, vec![BOS, 1, 2, 3, 4, EOS]);
        assert_eq!(b.weights, vec![1.0; 6]);
        assert_eq!(
            (b.chunks, b.row_length, b.truncated.clone()),
            (1, 6, vec![2])
        );
    }

    #[test]
    fn long_prompts_chunk_and_pad_to_the_same_count() {
        let long = Options {
            long_prompt: true,
            ..Options::default()
        };
        let b = plan(
            &Words,
            &prompts(&["a", "a bb ccc dddd eeeee ffffff", ""]),
            long,
        )
        .unwrap();
        assert_eq!(b.chunks, 2);
        assert_eq!(b.truncated, vec![0, 0, 0]);
        #[rustfmt::skip]
        assert_eq!(b.ids, vec![
            BOS, 1, EOS, PAD, PAD, PAD,  BOS, EOS, PAD, PAD, PAD, PAD,
            BOS, 1, 2, 3, 4, EOS,        BOS, 5, 6, EOS, PAD, PAD,
            BOS, EOS, PAD, PAD, PAD, PAD, BOS, EOS, PAD, PAD, PAD, PAD,
        ]);
        // Exactly 4 tokens is one chunk, 33 tokens is 9 > MAX_CHUNKS.
        assert_eq!(
            plan(&Words, &prompts(&["a a a a"]), long).unwrap().chunks,
            1
        );
        let err = plan(&Words, &prompts(&["", &"a ".repeat(33)]), long).unwrap_err();
        assert!(
            err.to_string()
                .contains("prompts[1]: 33 tokens make 9 chunks"),
            "{err}"
        );
    }

    #[test]
    fn weights_follow_their_tokens_across_chunks() {
        let both = Options {
            long_prompt: true,
            prompt_weighting: true,
        };
        let b = plan(&Words, &prompts(&["a bb (ccc dddd:2) [eeeee]"]), both).unwrap();
        let w = 1.0 / 1.1;
        assert_eq!(
            b.ids,
            vec![BOS, 1, 2, 3, 4, EOS, BOS, 5, EOS, PAD, PAD, PAD]
        );
        assert_eq!(
            b.weights,
            vec![1.0, 1.0, 1.0, 2.0, 2.0, 1.0, 1.0, w, 1.0, 1.0, 1.0, 1.0]
        );
        // Without long_prompt the weights are truncated with their tokens.
        let b = plan(
            &Words,
            &prompts(&["a bb (ccc dddd:2) [eeeee]"]),
            Options {
                prompt_weighting: true,
                ..Options::default()
            },
        )
        .unwrap();
        assert_eq!(b.weights, vec![1.0, 1.0, 1.0, 2.0, 2.0, 1.0]);
        assert_eq!(b.truncated, vec![1]);
    }

    #[test]
    fn malformed_emphasis_names_the_prompt_and_byte() {
        let weighting = Options {
            prompt_weighting: true,
            ..Options::default()
        };
        let err = plan(&Words, &prompts(&["ok", "a (b:1.2.3)"]), weighting).unwrap_err();
        assert!(matches!(err, ModelError::Input(_)));
        assert_eq!(
            err.to_string().rsplit("prompts[1]").next().unwrap(),
            ": weight \"1.2.3\" is not a number at byte 5"
        );
        // Without prompt_weighting brackets are plain text.
        assert!(plan(&Words, &prompts(&["a (b"]), Options::default()).is_ok());
    }
}
