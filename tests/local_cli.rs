//! `sd generate --local`: every stage in one process, on loopback ports, torn down after.

#![allow(clippy::unwrap_used)]

use sd_e2e::{bin, png_size, tiny_model};
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
