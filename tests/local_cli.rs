//! `sd`'s in-process commands: `generate --local` (every stage in one process, on loopback
//! ports, torn down after) and `bench split` (the same U-Net in-process and over gRPC, to a
//! denoiser in the same process or a running one).

#![allow(clippy::unwrap_used)]

use sd_e2e::{bin, png_size, start_stage, tiny_model};
use std::process::Command;

#[test]
fn local_generate_writes_a_png() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nested/cat.png");
    let run = Command::new(bin("sd"))
        .args([
            "generate", "--local", "--prompt", "a cat", "--steps", "3", "--seed", "9", "--model",
        ])
        .arg(tiny_model("sd1"))
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("seed 9"), "{stdout}");
    assert_eq!(png_size(&std::fs::read(&out).unwrap()), (64, 64));
}

#[test]
fn local_generate_reports_a_broken_model_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let run = Command::new(bin("sd"))
        .args(["generate", "--local", "--prompt", "x", "--output"])
        .arg(tmp.path().join("x.png"))
        .arg("--model")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("config.json") || stderr.contains("tokenizer"),
        "{stderr}"
    );
}

/// Reads the number after `label` on the line that starts with it.
fn figure(stdout: &str, label: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{stdout}"));
    line[label.len()..]
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no figure after {label:?}: {line}"))
}

/// `sd bench split` with `extra` flags on the tiny model: its output, after checking it ran.
fn bench_split(extra: &[&str]) -> String {
    let run = Command::new(bin("sd"))
        .args([
            "bench", "split", "--size", "64", "--iters", "3", "--warmup", "1", "--run", "2",
        ])
        .args(extra)
        .arg("--model")
        .arg(tiny_model("sd1"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
}

#[test]
fn bench_split_times_both_paths_and_the_difference() {
    let stdout = bench_split(&[]);
    assert!(stdout.contains("latent [1, 4, 8, 8]"), "{stdout}");
    assert!(
        stdout.contains("the steps on one DenoiseSteps stream"),
        "{stdout}"
    );
    // Four steps per path, in two runs of two; the first one is warm-up.
    assert!(
        stdout.contains("3 step pairs after 1 warm-up, in runs of 2 steps per path"),
        "{stdout}"
    );
    let (grpc_step, grpc_unet) = (
        figure(&stdout, "gRPC: step"),
        figure(&stdout, "gRPC: U-Net (denoiser's compute)"),
    );
    assert!(grpc_unet > 0.0 && grpc_step > grpc_unet, "{stdout}");
    assert!(figure(&stdout, "in-process: U-Net") > 0.0, "{stdout}");
    assert!(
        stdout.contains("split cost per step") && stdout.contains("% of a 25 ms GPU step"),
        "{stdout}"
    );
    // Empty calls after the idle time of each GPU step (the defaults, 25 and 7.6 ms).
    assert!(
        stdout.contains("after 25.0 ms idle") && stdout.contains("after 7.6 ms idle"),
        "{stdout}"
    );
    // The same split with each step a unary call, as clients of Denoise send them.
    let unary = bench_split(&["--unary"]);
    assert!(unary.contains("each step a unary Denoise call"), "{unary}");
    assert!(unary.contains("split cost per step"), "{unary}");
}

#[test]
fn bench_split_refuses_a_size_off_the_latent_grid_and_empty_runs() {
    for (flag, value, named) in [
        ("--size", "60", "--size must be a multiple"),
        ("--run", "0", "--run"),
    ] {
        let run = Command::new(bin("sd"))
            .args(["bench", "split", flag, value, "--model"])
            .arg(tiny_model("sd1"))
            .output()
            .unwrap();
        assert!(!run.status.success(), "{flag} {value} was accepted");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(stderr.contains(named), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_split_times_a_running_denoiser_of_the_same_unet_only() {
    let denoiser = start_stage("sd-denoiser", &tiny_model("sd1"), &[]).await;
    let split = |model: std::path::PathBuf| {
        Command::new(bin("sd"))
            .args([
                "bench", "split", "--size", "64", "--iters", "2", "--warmup", "0",
            ])
            .arg("--denoiser")
            .arg(denoiser.url())
            .arg("--model")
            .arg(model)
            .output()
            .unwrap()
    };
    let same = split(tiny_model("sd1"));
    let stdout = String::from_utf8_lossy(&same.stdout);
    assert!(
        same.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&same.stderr)
    );
    assert!(
        stdout.contains(&format!("the denoiser at {}", denoiser.url())),
        "{stdout}"
    );
    assert!(
        figure(&stdout, "gRPC: U-Net (denoiser's compute)") > 0.0,
        "{stdout}"
    );

    let other = split(tiny_model("sd2"));
    assert!(!other.status.success());
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        stderr.contains("serves U-Net revision")
            && stderr.contains("the two paths must run the same U-Net"),
        "{stderr}"
    );
}
