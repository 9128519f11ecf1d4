//! Parity of the Rust `AutoencoderKL` with diffusers on a tiny random-weight VAE.
//!
//! `tests/python/reference_vae.py` builds and saves the VAE and its reference outputs; this
//! side loads the saved folder with its own code. Tolerance: f32 on CPU, both sides run the
//! same libtorch kernels in a slightly different order of operations, so differences can
//! only be rounding noise: measured 0.0 (bit-identical) on a 2-core x86 CPU; another CPU,
//! thread count or libtorch build may pick other kernels, which stay below 1e-6 of the
//! output scale. 1e-4 relative to the reference's largest magnitude leaves room for that and
//! still catches a real mistake (a wrong eps, a missing residual), which moves the output by
//! 1e-2 or more.

use sd_models::ModelError;
use sd_models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig, latents_to_rgb8};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

/// Relative tolerance (see the module docs).
const REL_TOL: f64 = 1e-4;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs the reference script once per test binary; returns the folder it wrote.
fn reference() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let ws = workspace();
        let status = Command::new(ws.join(".venv/bin/python"))
            .arg(ws.join("tests/python/reference_vae.py"))
            .arg(dir.path())
            .status()
            .expect("run .venv/bin/python (make setup creates it)");
        assert!(status.success(), "reference_vae.py failed: {status}");
        dir
    })
    .path()
}

fn io() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(reference().join("io.safetensors"))
        .expect("io.safetensors")
        .into_iter()
        .collect()
}

/// Max abs difference, and the reference's max magnitude.
fn compare(name: &str, got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.size(), want.size(), "{name}: shape");
    let diff = (got.to_kind(Kind::Float) - want)
        .abs()
        .max()
        .double_value(&[]);
    let scale = want.abs().max().double_value(&[]).max(1e-6);
    println!("{name}: max abs diff {diff:.3e} (reference max |x| {scale:.3e})");
    assert!(
        diff <= REL_TOL * scale,
        "{name}: max abs diff {diff} > {REL_TOL} * {scale}"
    );
    diff
}

fn load() -> AutoencoderKL {
    AutoencoderKL::load(&reference().join("vae"), Device::Cpu, Kind::Float).expect("load vae")
}

#[test]
fn decode_matches_diffusers() {
    let io = io();
    let vae = load();
    assert_eq!(vae.downsample_factor(), 8);
    let decoded = vae.decode(&io["latents"]).expect("decode");
    assert_eq!(decoded.size(), vec![2, 3, 32, 48]);
    compare("decode", &decoded, &io["decoded"]);
}

#[test]
fn encode_matches_diffusers() {
    let io = io();
    let vae = load();
    let dist = vae.encode(&io["images"]).expect("encode");
    compare("encode mean", &dist.mode(), &io["mean"]);
    compare("encode logvar", &dist.logvar, &io["logvar"]);
    // sample = mean + std * noise
    let noise = Tensor::ones(dist.mean.size(), (Kind::Float, Device::Cpu));
    let s = dist.sample(&noise).expect("sample");
    compare(
        "sample with unit noise",
        &s,
        &(&io["mean"] + (&io["logvar"] * 0.5).exp()),
    );
    assert!(
        dist.sample(&Tensor::ones([1, 4, 4, 3], (Kind::Float, Device::Cpu)))
            .is_err()
    );
}

#[test]
fn rgb8_matches_vae_image_processor() {
    let io = io();
    let rgb = latents_to_rgb8(&io["rgb_input"]);
    assert_eq!(rgb.kind(), Kind::Uint8);
    let want = &io["rgb8"];
    assert_eq!(rgb.size(), want.size());
    let mismatches = rgb.ne_tensor(want).sum(Kind::Int64).int64_value(&[]);
    assert_eq!(
        mismatches, 0,
        "8-bit RGB differs from diffusers' postprocess in {mismatches} values"
    );
}

#[test]
fn bad_inputs_are_refused_with_a_reason() {
    let vae = load();
    let f = (Kind::Float, Device::Cpu);
    let cases = [
        (
            vae.decode(&Tensor::zeros([1, 3, 4, 4], f)).map(|_| ()),
            "3 channels",
        ),
        (
            vae.decode(&Tensor::zeros([4, 4, 4], f)).map(|_| ()),
            "[B, C, H, W]",
        ),
        (
            vae.encode(&Tensor::zeros([1, 3, 12, 16], f)).map(|_| ()),
            "multiples of 8",
        ),
        (
            vae.decode(&Tensor::zeros([1, 4, 4, 4], (Kind::Int64, Device::Cpu)))
                .map(|_| ()),
            "float",
        ),
    ];
    for (result, needle) in cases {
        let err = result.expect_err(needle).to_string();
        assert!(err.contains(needle), "{err} should mention {needle}");
    }
}

#[test]
fn scaling_and_shift_factors_come_from_the_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = reference().join("vae");
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).expect("copy");
    }
    let path = dir.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    assert!(
        json["shift_factor"].is_null(),
        "diffusers writes shift_factor: null by default"
    );
    assert_eq!(load().config().shift_factor, None);
    json["scaling_factor"] = 1.5035.into();
    json["shift_factor"] = 0.0609.into();
    std::fs::write(&path, json.to_string()).expect("write");
    let vae = AutoencoderKL::load(dir.path(), Device::Cpu, Kind::Float).expect("load");
    assert_eq!(vae.config().scaling_factor, 1.5035);
    assert_eq!(vae.config().shift_factor, Some(0.0609));
    let parsed: AutoencoderKLConfig = sd_models::weights::read_json(&path).expect("parse");
    assert_eq!(parsed.shift_factor, Some(0.0609));
}

/// Rewrites the reference checkpoint with `edit` applied and returns the load error.
fn load_edited(edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> ModelError {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = reference().join("vae");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).expect("copy");
    let mut tensors =
        Tensor::read_safetensors(src.join("diffusion_pytorch_model.safetensors")).expect("read");
    edit(&mut tensors);
    Tensor::write_safetensors(
        &tensors,
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .expect("write");
    AutoencoderKL::load(dir.path(), Device::Cpu, Kind::Float).expect_err("must not load")
}

#[test]
fn missing_or_misshapen_tensors_are_named() {
    let name = "decoder.mid_block.attentions.0.to_q.weight";
    let err = load_edited(|t| t.retain(|(n, _)| n != name));
    assert!(matches!(err, ModelError::WeightMismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("missing from the checkpoint:\n    {name}")),
        "{err}"
    );

    let name = "encoder.conv_in.weight";
    let err = load_edited(|t| {
        for (n, v) in t.iter_mut() {
            if n == name {
                *v = Tensor::zeros([32, 3, 1, 1], (Kind::Float, Device::Cpu));
            }
        }
    });
    assert!(matches!(err, ModelError::WeightMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!(
            "{name}: checkpoint [32, 3, 1, 1], model [32, 3, 3, 3]"
        )),
        "{err}"
    );
}

#[test]
fn unsupported_block_types_are_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = reference().join("vae/config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src).expect("read")).expect("json");
    json["up_block_types"][1] = "AttnUpDecoderBlock2D".into();
    std::fs::write(dir.path().join("config.json"), json.to_string()).expect("write");
    let err = AutoencoderKL::load(dir.path(), Device::Cpu, Kind::Float).expect_err("must refuse");
    assert!(matches!(err, ModelError::Config { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("config.json") && msg.contains("AttnUpDecoderBlock2D"),
        "{msg}"
    );
}
