//! `sd tokenize`: shows how the text-encoder stage tokenizes a prompt, with the same code
//! (`sd_models::tokenizer::ClipTokenizer`) and no gRPC; `--bench` times that tokenizer over a
//! generated corpus of varied prompts.

use anyhow::{Context, bail};
use sd_models::tokenizer::ClipTokenizer;
use sd_text_encoder::prompts::{self, Options};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct TokenizeArgs {
    /// Model folder (diffusers layout, its `tokenizer/` is used) or a tokenizer folder.
    #[arg(long, env = "SD_MODEL")]
    model: PathBuf,
    /// Print `{"ids": [...], "tokens": [...], "truncated": N}`.
    #[arg(long)]
    json: bool,
    /// Pad the ids to the tokenizer's max_length, as the text encoder receives them.
    #[arg(long)]
    pad: bool,
    /// Time the tokenizer over a generated corpus instead of tokenizing PROMPT.
    #[arg(long, conflicts_with_all = ["json", "pad", "prompt"])]
    bench: bool,
    /// With --bench: prompts in the corpus.
    #[arg(long, default_value_t = 2000, requires = "bench")]
    corpus: usize,
    /// With --bench: passes over the corpus, timed after one untimed pass.
    #[arg(long, default_value_t = 5, requires = "bench")]
    iters: u32,
    /// The prompt.
    #[arg(required_unless_present = "bench")]
    prompt: Option<String>,
}

pub fn run(args: TokenizeArgs) -> anyhow::Result<()> {
    let tokenizer = load(&args.model)?;
    if args.bench {
        return bench(&tokenizer, args.corpus, args.iters);
    }
    let prompt = args.prompt.unwrap_or_default();
    let encoded = tokenizer.encode(&prompt)?;
    let ids = if args.pad {
        encoded.ids
    } else {
        // Up to and including the end token: the first eos after the start token.
        let end = encoded
            .ids
            .iter()
            .skip(1)
            .position(|&i| i == tokenizer.eos_id())
            .map_or(encoded.ids.len(), |p| p + 2);
        encoded.ids[..end].to_vec()
    };
    let tokens = ids
        .iter()
        .map(|&id| {
            tokenizer
                .id_to_token(id)
                .with_context(|| format!("id {id} is not in the vocabulary"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.json {
        let out = serde_json::json!({
            "ids": ids,
            "tokens": tokens,
            "truncated": encoded.truncated,
        });
        println!("{out}");
    } else {
        for (id, token) in ids.iter().zip(&tokens) {
            println!("{id:>6}  {token}");
        }
        println!(
            "{} ids, {} content tokens truncated (max_length {})",
            ids.len(),
            encoded.truncated,
            tokenizer.max_length()
        );
    }
    Ok(())
}

/// `DIR/tokenizer` when it exists, else `DIR` itself.
fn load(model: &Path) -> anyhow::Result<ClipTokenizer> {
    let sub = model.join("tokenizer");
    let dir = if sub.is_dir() {
        sub
    } else {
        model.to_path_buf()
    };
    ClipTokenizer::from_dir(&dir).with_context(|| format!("loading {}", dir.display()))
}

fn bench(tokenizer: &ClipTokenizer, corpus_size: usize, iters: u32) -> anyhow::Result<()> {
    if corpus_size == 0 || iters == 0 {
        bail!("--corpus and --iters must be positive");
    }
    let corpus = corpus(corpus_size);
    let bytes: usize = corpus.iter().map(String::len).sum();
    let content: usize = corpus
        .iter()
        .map(|p| tokenizer.tokenize(p).map(|t| t.len()))
        .sum::<Result<_, _>>()?;
    println!(
        "corpus: {} prompts, {bytes} bytes, {content} content tokens ({:.1} per prompt, longest {} bytes)",
        corpus.len(),
        content as f64 / corpus.len() as f64,
        corpus.iter().map(String::len).max().unwrap_or(0)
    );
    println!("{iters} timed passes after 1 untimed, one thread");

    let row = time(iters, || {
        for p in &corpus {
            std::hint::black_box(tokenizer.encode(p)?);
        }
        Ok(())
    })?;
    report("encode (one padded row, truncating)", row, &corpus, content);

    let options = Options {
        long_prompt: true,
        prompt_weighting: true,
    };
    let planned = time(iters, || {
        for p in &corpus {
            std::hint::black_box(prompts::plan(tokenizer, std::slice::from_ref(p), options)?);
        }
        Ok(())
    })?;
    report(
        "plan (long_prompt + prompt_weighting)",
        planned,
        &corpus,
        content,
    );
    Ok(())
}

/// Best of `iters` timed passes (after one warm-up): the least disturbed by the machine.
fn time(iters: u32, mut pass: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    pass()?;
    let mut best = Duration::MAX;
    for _ in 0..iters {
        let start = Instant::now();
        pass()?;
        best = best.min(start.elapsed());
    }
    Ok(best)
}

fn report(name: &str, pass: Duration, corpus: &[String], content: usize) {
    let s = pass.as_secs_f64();
    println!(
        "{name}: {:.1} ms per pass, {:.0} prompts/s, {:.0} tokens/s",
        s * 1e3,
        corpus.len() as f64 / s,
        content as f64 / s
    );
}

/// `n` varied prompts from a fixed generator: short and long (3 to ~120 words), subjects,
/// styles, numbers, punctuation, accented and non-Latin text, emoji and emphasis syntax, so
/// every BPE path (merges, byte fallback, digits, punctuation runs) is exercised. Deterministic,
/// so runs compare.
fn corpus(n: usize) -> Vec<String> {
    const WORDS: &[&str] = &[
        "a",
        "the",
        "photo",
        "of",
        "an",
        "astronaut",
        "riding",
        "horse",
        "on",
        "mars",
        "lighthouse",
        "at",
        "dusk",
        "portrait",
        "woman",
        "with",
        "red",
        "hair",
        "cinematic",
        "lighting",
        "highly",
        "detailed",
        "intricate",
        "8k",
        "uhd",
        "octane",
        "render",
        "trending",
        "artstation",
        "oil",
        "painting",
        "by",
        "greg",
        "rutkowski",
        "watercolor",
        "isometric",
        "city",
        "cyberpunk",
        "neon",
        "rain",
        "reflections",
        "bokeh",
        "35mm",
        "f/1.8",
        "golden",
        "hour",
        "masterpiece",
        "best",
        "quality",
        "ultra-realistic",
        "café",
        "naïve",
        "crème brûlée",
        "東京",
        "夜景",
        "🌅",
        "🐱",
        "don't",
        "it's",
        "1920s",
        "art-deco",
        "(masterpiece:1.2)",
        "[blurry]",
        "((sharp focus))",
        "3:2",
        "steampunk",
        "airship",
        "over",
        "snowy",
        "mountains",
        "misty",
        "forest",
        "elf",
        "knight",
        "armor",
        "dragon",
        "castle",
        "sunset",
        "volumetric",
        "fog",
        "hdr",
    ];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |bound: usize| {
        // SplitMix64: fixed, dependency-free, good enough to vary a corpus.
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % bound as u64) as usize
    };
    (0..n)
        .map(|_| {
            // Mostly short prompts, some far past one 75-token chunk.
            let words = if next(5) == 0 {
                40 + next(80)
            } else {
                3 + next(25)
            };
            let mut p = String::new();
            for w in 0..words {
                if w > 0 {
                    p.push_str(if next(6) == 0 { ", " } else { " " });
                }
                p.push_str(WORDS[next(WORDS.len())]);
            }
            p
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_is_deterministic_and_varied() {
        let (a, b) = (corpus(200), corpus(200));
        assert_eq!(a, b);
        assert!(a.iter().any(|p| p.split(' ').count() > 60));
        assert!(a.iter().any(|p| p.split(' ').count() < 10));
        assert!(a.iter().any(|p| p.contains('🌅')));
    }
}
