//! The same image as diffusers for the same seed: the four services as separate processes
//! against `StableDiffusionPipeline` on the same tiny model folder (random weights, real
//! layout), for several schedulers and both SD1 (epsilon) and SD2 (v-prediction, linear
//! projections, `!` padding) flavours.
//!
//! Tolerance: on fp32 CPU both sides run the same math in the same order up to kernel choice,
//! which moves latents by ~1e-6 and can flip the 8-bit rounding of a few pixels. So: at most
//! 2 levels of 255 anywhere, and fewer than 1% of channel values off by any amount.

#![allow(clippy::unwrap_used)]

use sd_e2e::{Cluster, python, tiny_model, workspace_root};
use sd_proto::v1::GenerateRequest;
use std::process::Command;

struct Case {
    scheduler: &'static str,
    steps: u32,
    guidance: f32,
    num_images: u32,
}

fn rgb(png: &[u8]) -> image::RgbImage {
    image::load_from_memory_with_format(png, image::ImageFormat::Png)
        .unwrap()
        .to_rgb8()
}

async fn check(flavor: &str, cases: &[Case]) {
    let model = tiny_model(flavor);
    let cluster = Cluster::start(&model).await;
    let mut client = cluster.client().await;
    let tmp = tempfile::tempdir().unwrap();
    for (n, case) in cases.iter().enumerate() {
        let (prompt, negative, seed) = (
            "a red circle on a blue background",
            "blurry, dark",
            1234 + n as u64,
        );
        let ours = client
            .generate(GenerateRequest {
                prompt: prompt.into(),
                negative_prompt: negative.into(),
                width: Some(64),
                height: Some(64),
                steps: Some(case.steps),
                guidance_scale: Some(case.guidance),
                seed: Some(seed),
                scheduler: case.scheduler.into(),
                num_images: Some(case.num_images),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{flavor}/{}: {e}", case.scheduler))
            .into_inner();
        let prefix = tmp.path().join(format!("{flavor}-{}", case.scheduler));
        let out = Command::new(python())
            .arg(workspace_root().join("tests/python/reference_pipeline.py"))
            .arg(&model)
            .arg(&prefix)
            .args(["--prompt", prompt, "--negative-prompt", negative])
            .args([
                "--seed",
                &seed.to_string(),
                "--steps",
                &case.steps.to_string(),
            ])
            .args([
                "--guidance",
                &case.guidance.to_string(),
                "--scheduler",
                case.scheduler,
            ])
            .args([
                "--width",
                "64",
                "--height",
                "64",
                "--num-images",
                &case.num_images.to_string(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "reference failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(ours.images.len(), case.num_images as usize);
        for (i, image) in ours.images.iter().enumerate() {
            let ours = rgb(&image.data);
            let reference = rgb(&std::fs::read(format!("{}-{i}.png", prefix.display())).unwrap());
            assert_eq!(ours.dimensions(), reference.dimensions());
            let diffs: Vec<u8> = ours
                .as_raw()
                .iter()
                .zip(reference.as_raw())
                .map(|(a, b)| a.abs_diff(*b))
                .collect();
            let max = diffs.iter().copied().max().unwrap();
            let off = diffs.iter().filter(|d| **d > 0).count() as f64 / diffs.len() as f64;
            eprintln!(
                "{flavor}/{} image {i}: max diff {max}, {:.3}% values differ",
                case.scheduler,
                off * 100.0
            );
            assert!(
                max <= 2 && off < 0.01,
                "{flavor}/{} image {i}: max diff {max}, {off:.4} differ",
                case.scheduler
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sd1_matches_diffusers() {
    check(
        "sd1",
        &[
            Case {
                scheduler: "ddim",
                steps: 8,
                guidance: 7.5,
                num_images: 2,
            },
            Case {
                scheduler: "euler",
                steps: 8,
                guidance: 7.5,
                num_images: 1,
            },
            Case {
                scheduler: "euler_ancestral",
                steps: 6,
                guidance: 5.0,
                num_images: 1,
            },
            Case {
                scheduler: "dpmpp_2m",
                steps: 6,
                guidance: 1.0,
                num_images: 1,
            },
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sd2_v_prediction_matches_diffusers() {
    check(
        "sd2",
        &[
            Case {
                scheduler: "ddim",
                steps: 6,
                guidance: 7.5,
                num_images: 1,
            },
            Case {
                scheduler: "euler",
                steps: 6,
                guidance: 7.5,
                num_images: 1,
            },
            Case {
                scheduler: "heun",
                steps: 4,
                guidance: 3.0,
                num_images: 1,
            },
        ],
    )
    .await;
}
