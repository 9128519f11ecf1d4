//! Request options that change the math, against diffusers: `clip_skip` (applied to the
//! prompt only, as diffusers' `encode_prompt` does) and `guidance_rescale`
//! (`rescale_noise_cfg`). Same tolerance as `pipeline_parity`: at most 2/255 anywhere and
//! fewer than 1% of channel values off.

#![allow(clippy::unwrap_used)]

use sd_e2e::{Cluster, python, tiny_model, workspace_root};
use sd_proto::v1::GenerateRequest;
use std::process::Command;

fn rgb(png: &[u8]) -> image::RgbImage {
    image::load_from_memory_with_format(png, image::ImageFormat::Png)
        .unwrap()
        .to_rgb8()
}

#[tokio::test(flavor = "multi_thread")]
async fn clip_skip_and_guidance_rescale_match_diffusers() {
    let model = tiny_model("sd2");
    let cluster = Cluster::start(&model).await;
    let mut client = cluster.client().await;
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(Option<u32>, f32); 2] = [(Some(1), 0.0), (None, 0.7)];
    let mut images = Vec::new();
    for (n, (clip_skip, rescale)) in cases.into_iter().enumerate() {
        let seed = 77u64;
        let ours = client
            .generate(GenerateRequest {
                prompt: "a green triangle".into(),
                negative_prompt: "red".into(),
                width: Some(64),
                height: Some(64),
                steps: Some(6),
                guidance_scale: Some(7.5),
                seed: Some(seed),
                scheduler: "ddim".into(),
                clip_skip,
                guidance_rescale: Some(rescale),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let prefix = tmp.path().join(format!("case{n}"));
        let mut cmd = Command::new(python());
        cmd.arg(workspace_root().join("tests/python/reference_pipeline.py"))
            .arg(&model)
            .arg(&prefix)
            .args(["--prompt", "a green triangle", "--negative-prompt", "red"])
            .args([
                "--seed",
                &seed.to_string(),
                "--steps",
                "6",
                "--guidance",
                "7.5",
            ])
            .args(["--scheduler", "ddim", "--width", "64", "--height", "64"])
            .args(["--guidance-rescale", &rescale.to_string()]);
        if let Some(c) = clip_skip {
            cmd.args(["--clip-skip", &c.to_string()]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let reference = rgb(&std::fs::read(format!("{}-0.png", prefix.display())).unwrap());
        let ours = rgb(&ours.images[0].data);
        let diffs: Vec<u8> = ours
            .as_raw()
            .iter()
            .zip(reference.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        let max = diffs.iter().copied().max().unwrap();
        let off = diffs.iter().filter(|d| **d > 0).count() as f64 / diffs.len() as f64;
        eprintln!(
            "clip_skip {clip_skip:?}, rescale {rescale}: max diff {max}, {:.3}% differ",
            off * 100.0
        );
        assert!(
            max <= 2 && off < 0.01,
            "case {n}: max {max}, {off:.4} differ"
        );
        images.push(ours);
    }
    // The options must actually change the image relative to the plain request.
    let plain = client
        .generate(GenerateRequest {
            prompt: "a green triangle".into(),
            negative_prompt: "red".into(),
            width: Some(64),
            height: Some(64),
            steps: Some(6),
            guidance_scale: Some(7.5),
            seed: Some(77),
            scheduler: "ddim".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let plain = rgb(&plain.images[0].data);
    for img in &images {
        assert_ne!(img.as_raw(), plain.as_raw());
    }
}
