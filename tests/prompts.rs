//! Long prompts, emphasis weights and `sd tokenize`, through the real binaries: the public API
//! on a four-process cluster, the text-encoder's Encode called directly, and the `sd` binary
//! checked against transformers' CLIPTokenizer.

#![allow(clippy::unwrap_used)]

use sd_e2e::{Cluster, Service, bin, png_size, python, tiny_model};
use sd_proto::stage::{EncodeRequest, text_encoder_service_client::TextEncoderServiceClient};
use sd_proto::v1::GenerateRequest;
use std::time::Duration;
use tonic::{Code, transport::Channel};

/// A prompt of exactly 200 content tokens: each of these words is one token in CLIP's
/// vocabulary (checked below through `sd tokenize`).
fn long_prompt() -> String {
    const WORDS: [&str; 8] = [
        "red", "circle", "blue", "square", "green", "light", "over", "water",
    ];
    (0..200)
        .map(|i| WORDS[i % WORDS.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

/// `sd tokenize --model DIR --json PROMPT`'s stdout.
fn sd_tokenize_json(model: &std::path::Path, prompt: &str) -> String {
    let out = std::process::Command::new(bin("sd"))
        .args(["tokenize", "--json", "--model"])
        .arg(model)
        .arg(prompt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sd tokenize failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The `"truncated": N` of `sd tokenize --json` (the JSON is flat, no parser needed).
fn truncated_of(json: &str) -> u32 {
    let rest = json.split("\"truncated\":").nth(1).unwrap();
    rest.trim_start()
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap()
}

async fn text_encoder() -> (Service, TextEncoderServiceClient<Channel>) {
    let model = tiny_model("sd1");
    let mut te = Service::start(
        "sd-text-encoder",
        &[
            "--listen",
            "127.0.0.1:0",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
        ],
    );
    te.wait_serving(Duration::from_secs(120)).await;
    let channel = Channel::from_shared(te.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = TextEncoderServiceClient::new(channel)
        .max_decoding_message_size(sd_proto::MAX_MESSAGE_BYTES);
    (te, client)
}

/// Encodes and returns (shape, values, truncated_tokens).
async fn encode(
    client: &mut TextEncoderServiceClient<Channel>,
    request: EncodeRequest,
) -> Result<(Vec<i64>, Vec<f32>, Vec<u32>), tonic::Status> {
    let r = client.encode(request).await?.into_inner();
    let h = r.hidden_states.unwrap();
    Ok((
        h.shape.clone(),
        h.to_f32_vec("hidden_states").unwrap(),
        r.truncated_tokens,
    ))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread")]
async fn long_prompt_through_the_public_api() {
    let model = tiny_model("sd1");
    let dropped = truncated_of(&sd_tokenize_json(&model, &long_prompt()));
    assert_eq!(dropped, 200 - 75, "the test prompt should be 200 tokens");

    let cluster = Cluster::start(&model).await;
    let mut client = cluster.client().await;
    let request = |long: bool| GenerateRequest {
        prompt: long_prompt(),
        negative_prompt: "blurry".into(),
        width: Some(64),
        height: Some(64),
        steps: Some(2),
        seed: Some(1),
        long_prompt: long,
        ..Default::default()
    };

    let long = client.generate(request(true)).await.unwrap().into_inner();
    assert_eq!(png_size(&long.images[0].data), (64, 64));
    assert!(long.warnings.is_empty(), "{:?}", long.warnings);

    let short = client.generate(request(false)).await.unwrap().into_inner();
    assert_eq!(png_size(&short.images[0].data), (64, 64));
    assert!(
        short
            .warnings
            .iter()
            .any(|w| w.starts_with(&format!("prompt: {dropped} token(s)"))),
        "{:?}",
        short.warnings
    );
    // The 125 tokens past the first chunk change the conditioning, hence the image.
    assert_ne!(long.images[0].data, short.images[0].data);

    // Malformed emphasis is the caller's fault, and says where.
    let err = client
        .generate(GenerateRequest {
            prompt: "a (red circle".into(),
            prompt_weighting: true,
            ..request(false)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("unclosed '(' at byte 2"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn encode_long_prompt_in_aligned_chunks() {
    let (_te, mut client) = text_encoder().await;
    let prompts = vec![long_prompt(), "blurry".to_string()];
    let request = |long: bool, clip_skip: Vec<u32>| EncodeRequest {
        prompts: prompts.clone(),
        clip_skip,
        long_prompt: long,
        prompt_weighting: false,
    };
    let (shape, long, truncated) = encode(&mut client, request(true, vec![])).await.unwrap();
    let d = shape[2] as usize;
    assert_eq!(&shape[..2], &[2, 3 * 77]);
    assert_eq!(truncated, vec![0, 0]);

    let (shape, short, truncated) = encode(&mut client, request(false, vec![])).await.unwrap();
    assert_eq!(&shape[..2], &[2, 77]);
    assert_eq!(truncated, vec![125, 0]);
    // Each prompt's first chunk is its ordinary (truncated) encoding. Other batch shapes may
    // take other CPU kernels: equal up to f32 rounding of the 2-layer tiny model.
    let row = |t: &[f32], p: usize, positions: usize, chunk: usize| {
        let start = (p * positions + chunk * 77) * d;
        t[start..start + 77 * d].to_vec()
    };
    for p in 0..2 {
        let diff = max_abs_diff(&row(&long, p, 231, 0), &row(&short, p, 77, 0));
        assert!(diff < 1e-5, "prompt {p}: first chunk differs by {diff}");
    }
    // The negative prompt's padding chunks are encodings of an empty chunk, and the prompt's
    // later chunks are not.
    let (_, empty, _) = encode(
        &mut client,
        EncodeRequest {
            prompts: vec![String::new()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for chunk in 1..3 {
        assert!(max_abs_diff(&row(&long, 1, 231, chunk), &empty) < 1e-5);
        assert!(max_abs_diff(&row(&long, 0, 231, chunk), &empty) > 1e-3);
    }

    // clip_skip applies to every chunk of its prompt, and only to that prompt.
    let (_, skipped, _) = encode(&mut client, request(true, vec![1, 0]))
        .await
        .unwrap();
    for chunk in 0..3 {
        assert!(max_abs_diff(&row(&skipped, 0, 231, chunk), &row(&long, 0, 231, chunk)) > 1e-3);
        assert!(max_abs_diff(&row(&skipped, 1, 231, chunk), &row(&long, 1, 231, chunk)) < 1e-5);
    }

    // Past 8 chunks (600 tokens) is refused, naming the prompt.
    let err = encode(
        &mut client,
        EncodeRequest {
            prompts: vec!["blurry".into(), "red ".repeat(601)],
            long_prompt: true,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("prompts[1]: 601 tokens"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn encode_with_prompt_weighting() {
    let (_te, mut client) = text_encoder().await;
    let request = |prompts: &[&str], weighting: bool| EncodeRequest {
        prompts: prompts.iter().map(|p| p.to_string()).collect(),
        prompt_weighting: weighting,
        ..Default::default()
    };
    let (_, plain, _) = encode(&mut client, request(&["red circle", "red circle"], false))
        .await
        .unwrap();
    let (shape, weighted, _) = encode(
        &mut client,
        request(&["(red:1.5) circle", "(red:1.0) circle"], true),
    )
    .await
    .unwrap();
    let n = (shape[1] * shape[2]) as usize;
    assert!(max_abs_diff(&weighted[..n], &plain[..n]) > 1e-3);
    // Weight 1 everywhere: bit for bit the unweighted encoding.
    assert_eq!(weighted[n..], plain[n..]);
    // The emphasised row keeps its mean (f32 sums over 77 x 32 values: 1e-4 relative).
    let mean = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
    let (a, b) = (mean(&weighted[..n]), mean(&plain[..n]));
    assert!((a - b).abs() <= 1e-4 * b.abs().max(1e-3), "{a} vs {b}");

    // Works with long prompts too: weights reach tokens past the first chunk.
    let long = long_prompt();
    let emphasised = format!("{long} (water:2)");
    let both = |p: &str| EncodeRequest {
        prompts: vec![p.to_string()],
        long_prompt: true,
        prompt_weighting: true,
        ..Default::default()
    };
    let (s1, a, _) = encode(&mut client, both(&format!("{long} water")))
        .await
        .unwrap();
    let (s2, b, _) = encode(&mut client, both(&emphasised)).await.unwrap();
    assert_eq!((s1[1], s2[1]), (231, 231));
    assert!(max_abs_diff(&a, &b) > 1e-3);

    // Malformed emphasis: INVALID_ARGUMENT naming the prompt and the byte.
    for (prompt, message) in [
        (
            "ok (a:1.2.3)",
            "prompts[1]: weight \"1.2.3\" is not a number at byte 6",
        ),
        ("a [b", "prompts[1]: unclosed '[' at byte 2"),
        ("(a:) b", "prompts[1]: empty weight after ':' at byte 3"),
        ("a)", "prompts[1]: unmatched ')' at byte 1"),
    ] {
        let err = encode(&mut client, request(&["fine", prompt], true))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{prompt}");
        assert_eq!(err.message(), message);
    }
    // The same text without prompt_weighting is just text.
    encode(&mut client, request(&["a [b"], false))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sd_tokenize_json_matches_transformers() {
    let model = tiny_model("sd1");
    let prompts = [
        "a photo of an astronaut riding a horse on mars".to_string(),
        "Café crème brûlée,  東京の夜景 🌅!! don't\nSTOP 1920s art-deco (sharp:1.2)".to_string(),
        String::new(),
        long_prompt(),
    ];
    let ours: Vec<String> = prompts
        .iter()
        .map(|p| sd_tokenize_json(&model, p).trim().to_string())
        .collect();
    let script = r#"
import json, sys
from transformers import CLIPTokenizer
tok = CLIPTokenizer.from_pretrained(sys.argv[1])
prompts = json.loads(sys.argv[2])
ours = [json.loads(o) for o in json.loads(sys.argv[3])]
for p, o in zip(prompts, ours):
    assert list(o) == ["ids", "tokens", "truncated"], o.keys()
    full = tok(p).input_ids
    ids = tok(p, truncation=True, max_length=tok.model_max_length).input_ids
    want = {"ids": ids, "tokens": tok.convert_ids_to_tokens(ids),
            "truncated": len(full) - len(ids)}
    assert o == want, (p, o, want)
print("ok", len(prompts))
"#;
    let quote = |items: &[String]| {
        // JSON string array by hand: escape backslash, quote and control characters.
        let esc: Vec<String> = items
            .iter()
            .map(|s| {
                let mut out = String::from("\"");
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                        c => out.push(c),
                    }
                }
                out.push('"');
                out
            })
            .collect();
        format!("[{}]", esc.join(","))
    };
    let out = std::process::Command::new(python())
        .args(["-c", script])
        .arg(model.join("tokenizer"))
        .arg(quote(&prompts))
        .arg(quote(&ours))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok 4");
}
