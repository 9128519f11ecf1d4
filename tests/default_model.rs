//! The project's own trained model: `sd train` learns (its losses fall), resumes exactly,
//! and writes a folder the services load; the shipped default model keeps its scores on the
//! held-out prompts (a regression test: a change that breaks generation fails here) and is
//! what `sd generate --local` uses when no model is named.

#![allow(clippy::unwrap_used)]

use sd_e2e::{bin, png_size, workspace_root};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The shipped model, trained by `make default-model`.
fn default_model() -> PathBuf {
    workspace_root().join("services/training/default-model")
}

/// CLIP's vocabulary, fetched once into the shared cache by the fixture script.
fn clip_vocab() -> PathBuf {
    let dir = workspace_root().join(".cache/clip-vocab");
    if !dir.join("merges.txt").exists() {
        let status = Command::new(sd_e2e::python())
            .arg(workspace_root().join("tests/python/clip_vocab.py"))
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success(), "clip_vocab.py failed");
    }
    dir
}

/// A short run: 32x32 images would not fit the VAE's attention maps' defaults, so the real
/// 64x64 architecture with a handful of small batches.
fn train(out: &Path, checkpoints: &Path, extra: &[&str]) -> String {
    let run = Command::new(bin("sd"))
        .arg("train")
        .arg("--out")
        .arg(out)
        .arg("--checkpoints")
        .arg(checkpoints)
        .arg("--tokenizer")
        .arg(clip_vocab())
        .args([
            "--vae-steps",
            "40",
            "--vae-batch",
            "4",
            "--diffusion-steps",
            "60",
            "--diffusion-batch",
            "8",
            "--pool-size",
            "64",
            "--seed",
            "7",
        ])
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "sd train failed:\n{stderr}");
    stderr + &String::from_utf8_lossy(&run.stdout)
}

fn losses(checkpoints: &Path, stage: &str) -> Vec<f64> {
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoints.join("state.json")).unwrap())
            .unwrap();
    state["report"][format!("{stage}_losses")]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

#[test]
fn short_training_reduces_the_loss_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, ckpt) = (tmp.path().join("model"), tmp.path().join("ckpt"));
    train(&out, &ckpt, &[]);
    for (stage, steps) in [("vae", 40), ("diffusion", 60)] {
        let l = losses(&ckpt, stage);
        assert_eq!(l.len(), steps, "{stage}");
        let (first, last) = (mean(&l[..10]), mean(&l[l.len() - 10..]));
        eprintln!("{stage}: first 10 steps {first:.5}, last 10 {last:.5}");
        assert!(
            last < first * 0.9,
            "{stage} loss did not fall: {first} -> {last}"
        );
    }
    for file in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "loss.png",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }

    // Interrupted at the stage boundary, then resumed: the same weights, byte for byte.
    let (out2, ckpt2) = (tmp.path().join("model2"), tmp.path().join("ckpt2"));
    let first = train(&out2, &ckpt2, &["--stop-after", "40"]);
    assert!(first.contains("stopped after"), "{first}");
    assert!(
        !out2.join("unet").exists(),
        "no model written by an interrupted run"
    );
    let resumed = train(&out2, &ckpt2, &["--resume"]);
    assert!(resumed.contains("resuming"), "{resumed}");
    for file in [
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ] {
        assert!(
            std::fs::read(out.join(file)).unwrap() == std::fs::read(out2.join(file)).unwrap(),
            "{file} differs after resuming"
        );
    }

    // The folder serves through the four services.
    let png = tmp.path().join("x.png");
    let run = Command::new(bin("sd"))
        .args([
            "generate",
            "--local",
            "--prompt",
            "a red circle",
            "--steps",
            "4",
        ])
        .arg("--model")
        .arg(&out)
        .arg("--output")
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(png_size(&std::fs::read(&png).unwrap()), (64, 64));
}

#[test]
fn resuming_with_other_settings_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, ckpt) = (tmp.path().join("model"), tmp.path().join("ckpt"));
    train(&out, &ckpt, &["--stop-after", "5"]);
    let run = Command::new(bin("sd"))
        .args(["train", "--resume", "--seed", "8", "--out"])
        .arg(&out)
        .arg("--checkpoints")
        .arg(&ckpt)
        .arg("--tokenizer")
        .arg(clip_vocab())
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("other settings"), "{stderr}");
}

/// The shipped model's scores on the held-out prompts (colour/shape/background combinations
/// never seen in training), five images per prompt, 20 steps, seeds fixed, must stay above the
/// model's targets: background and foreground colour 90%, shape 75% at guidance 7.5
/// (MODEL_CARD.md measured 100%, 95.5% and 90.5%), and guidance 7.5 must get more images
/// wholly right than guidance 1 (89.5% against 85.0%).
#[test]
fn shipped_model_keeps_its_scores_on_held_out_prompts() {
    let run = Command::new(bin("sd"))
        .args(["eval", "--json", "--steps", "20", "--guidance", "1,7.5"])
        .args(["--images-per-prompt", "5"])
        .arg("--model")
        .arg(default_model())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let scores: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    eprintln!("{scores}");
    let at = |g: &str, k: &str| scores[g][k].as_f64().unwrap();
    assert_eq!(at("7.5", "prompts"), 220.0, "{scores}");
    assert!(at("7.5", "background") >= 0.9, "{scores}");
    assert!(at("7.5", "colour") >= 0.9, "{scores}");
    assert!(at("7.5", "shape") >= 0.75, "{scores}");
    assert!(
        at("7.5", "all") > at("1", "all"),
        "guidance 7.5 must beat guidance 1: {scores}"
    );
}

#[test]
fn generate_local_defaults_to_the_shipped_model() {
    let tmp = tempfile::tempdir().unwrap();
    let generate = |png: &Path, model: Option<&Path>| {
        let mut command = Command::new(bin("sd"));
        command
            .args([
                "generate",
                "--local",
                "--prompt",
                "a red circle on a blue background",
            ])
            .args(["--seed", "1", "--steps", "10", "--output"])
            .arg(png)
            .env_remove("SD_MODEL");
        if let Some(model) = model {
            command.arg("--model").arg(model);
        }
        let run = command.output().unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        std::fs::read(png).unwrap()
    };
    let by_default = generate(&tmp.path().join("default.png"), None);
    let named = generate(&tmp.path().join("named.png"), Some(&default_model()));
    assert_eq!(png_size(&by_default), (64, 64));
    assert!(
        by_default == named,
        "the default differs from the shipped model"
    );
}
