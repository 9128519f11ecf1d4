//! Parity of the Rust `UNet2DConditionModel` with diffusers on tiny random-weight U-Nets.
//!
//! `tests/python/reference_unet.py` builds, saves and runs three configurations (SD 1.x-like,
//! SD 2.x-like with a 154-token context, and a three-block one); this side loads each saved
//! folder with its own code and runs the same inputs, with a different timestep per sample.
//! Tolerance: f32 on CPU, same libtorch kernels in a slightly different order, so the
//! differences can only be rounding noise: measured 0.0 (bit-identical) on a 2-core x86 CPU;
//! another CPU, thread count or libtorch build may pick other kernels, which stay below
//! 1e-6 of the output scale. 1e-4 relative to the reference's largest magnitude leaves room
//! for that and still catches a real mistake (a wrong eps, a missing residual, a swapped
//! sin/cos), which moves the output by 1e-2 or more.

use sd_models::ModelError;
use sd_models::unet_2d_condition::UNet2DConditionModel;
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
            .arg(ws.join("tests/python/reference_unet.py"))
            .arg(dir.path())
            .status()
            .expect("run .venv/bin/python (make setup creates it)");
        assert!(status.success(), "reference_unet.py failed: {status}");
        dir
    })
    .path()
}

fn load(case: &str) -> UNet2DConditionModel {
    UNet2DConditionModel::load(
        &reference().join(case).join("unet"),
        Device::Cpu,
        Kind::Float,
    )
    .expect("load unet")
}

/// Loads a case, runs the reference inputs, checks the output; returns the max abs diff.
fn check_case(case: &str) -> f64 {
    let io: HashMap<String, Tensor> =
        Tensor::read_safetensors(reference().join(case).join("io.safetensors"))
            .expect("io")
            .into_iter()
            .collect();
    let unet = load(case);
    let out = unet
        .forward(
            &io["sample"],
            &io["timesteps"],
            &io["encoder_hidden_states"],
        )
        .expect("forward");
    let want = &io["out"];
    assert_eq!(out.size(), want.size(), "{case}: shape");
    let diff = (&out - want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]);
    println!("{case}: max abs diff {diff:.3e} (reference max |x| {scale:.3e})");
    assert!(
        diff <= REL_TOL * scale,
        "{case}: max abs diff {diff} > {REL_TOL} * {scale}"
    );
    // Per-sample timesteps matter: the same input at one shared timestep gives another result.
    let same_t = io["timesteps"]
        .get(0)
        .expand_as(&io["timesteps"])
        .contiguous();
    let other = unet
        .forward(&io["sample"], &same_t, &io["encoder_hidden_states"])
        .expect("forward");
    assert!(
        (&other - want).abs().max().double_value(&[]) > 100.0 * REL_TOL * scale,
        "{case}: timesteps ignored"
    );
    diff
}

#[test]
fn sd1_like_matches_diffusers() {
    let unet = load("sd1");
    assert_eq!(unet.config().cross_attention_dim, 32);
    assert_eq!(unet.config().heads().expect("heads"), vec![8, 8]);
    check_case("sd1");
}

#[test]
fn sd2_like_with_154_tokens_matches_diffusers() {
    let unet = load("sd2");
    assert!(unet.config().use_linear_projection && unet.config().upcast_attention);
    check_case("sd2");
}

#[test]
fn three_blocks_two_cross_attention_matches_diffusers() {
    check_case("three");
}

#[test]
fn bad_inputs_are_refused_with_a_reason() {
    let unet = load("sd1");
    let f = (Kind::Float, Device::Cpu);
    let x = Tensor::zeros([2, 4, 8, 8], f);
    let t = Tensor::zeros([2], f);
    let ctx = Tensor::zeros([2, 5, 32], f);
    let cases = [
        (
            unet.forward(&Tensor::zeros([2, 3, 8, 8], f), &t, &ctx),
            "3 channels",
        ),
        (
            unet.forward(&Tensor::zeros([2, 4, 8, 7], f), &t, &ctx),
            "multiples of 2",
        ),
        (
            unet.forward(&Tensor::zeros([4, 8, 8], f), &t, &ctx),
            "[B, C, H, W]",
        ),
        (unet.forward(&x, &Tensor::zeros([3], f), &ctx), "timesteps"),
        (
            unet.forward(&x, &t, &Tensor::zeros([1, 5, 32], f)),
            "batch 1",
        ),
        (
            unet.forward(&x, &t, &Tensor::zeros([2, 5, 16], f)),
            "cross_attention_dim 32",
        ),
        (
            unet.forward(&x, &t, &Tensor::zeros([2, 0, 32], f)),
            "no tokens",
        ),
    ];
    for (result, needle) in cases {
        let err = result.expect_err(needle);
        assert!(matches!(err, ModelError::Input(_)), "{err}");
        assert!(
            err.to_string().contains(needle),
            "{err} should mention {needle}"
        );
    }
    // One timestep for the whole batch is broadcast.
    assert_eq!(
        unet.forward(&x, &Tensor::zeros([1], f), &ctx)
            .expect("broadcast")
            .size(),
        vec![2, 4, 8, 8]
    );
}

/// Copies a case's folder, rewriting its config and/or checkpoint.
fn edited(
    case: &str,
    config: impl FnOnce(&mut serde_json::Value),
    weights: impl FnOnce(&mut Vec<(String, Tensor)>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = reference().join(case).join("unet");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("read"))
            .expect("json");
    config(&mut json);
    std::fs::write(dir.path().join("config.json"), json.to_string()).expect("write");
    let mut tensors =
        Tensor::read_safetensors(src.join("diffusion_pytorch_model.safetensors")).expect("read");
    weights(&mut tensors);
    Tensor::write_safetensors(
        &tensors,
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .expect("write");
    dir
}

#[test]
fn missing_or_misshapen_tensors_are_named() {
    let name = "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight";
    let dir = edited("sd1", |_| {}, |t| t.retain(|(n, _)| n != name));
    let err = UNet2DConditionModel::load(dir.path(), Device::Cpu, Kind::Float)
        .expect_err("must not load");
    assert!(matches!(err, ModelError::WeightMismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("missing from the checkpoint:\n    {name}")),
        "{err}"
    );

    let name = "mid_block.attentions.0.proj_in.weight";
    let dir = edited(
        "sd2",
        |_| {},
        |t| {
            for (n, v) in t.iter_mut() {
                if n == name {
                    *v = Tensor::zeros([64, 64, 1, 1], (Kind::Float, Device::Cpu));
                }
            }
        },
    );
    let err = UNet2DConditionModel::load(dir.path(), Device::Cpu, Kind::Float)
        .expect_err("must not load");
    assert!(matches!(err, ModelError::WeightMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!(
            "{name}: checkpoint [64, 64, 1, 1], model [64, 64]"
        )),
        "{err}"
    );
}

#[test]
fn unsupported_config_values_are_named() {
    type Edit = fn(&mut serde_json::Value);
    let cases: [(Edit, &str); 4] = [
        (
            |j| j["down_block_types"][0] = "SimpleCrossAttnDownBlock2D".into(),
            "SimpleCrossAttnDownBlock2D",
        ),
        (
            |j| j["mid_block_type"] = "UNetMidBlock2DSimpleCrossAttn".into(),
            "UNetMidBlock2DSimpleCrossAttn",
        ),
        (
            |j| j["dual_cross_attention"] = true.into(),
            "dual_cross_attention",
        ),
        (
            |j| j["attention_head_dim"] = serde_json::json!([8, 8, 8]),
            "attention_head_dim",
        ),
    ];
    for (edit, needle) in cases {
        let dir = edited("sd1", edit, |_| {});
        let err =
            UNet2DConditionModel::load(dir.path(), Device::Cpu, Kind::Float).expect_err(needle);
        assert!(matches!(err, ModelError::Config { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("config.json") && msg.contains(needle), "{msg}");
    }
    // mid_block_type null builds a U-Net without a mid block (and so refuses the weights).
    let dir = edited(
        "sd1",
        |j| j["mid_block_type"] = serde_json::Value::Null,
        |_| {},
    );
    let err = UNet2DConditionModel::load(dir.path(), Device::Cpu, Kind::Float)
        .expect_err("unexpected mid");
    assert!(
        err.to_string().contains("unexpected in the checkpoint"),
        "{err}"
    );
}

/// An `fp16` variant checkpoint (how SD weights are usually published) loads by name and is
/// converted to the requested kind. Tolerance: rounding every weight to f16 moves each by up
/// to 2^-11 relative, which through this tiny net moves the output by about 1e-3 of its
/// scale; 2e-2 catches a wrong conversion (garbage weights move it by order 1).
#[test]
fn fp16_variant_loads_and_is_converted() {
    let dir = edited(
        "sd1",
        |_| {},
        |t| {
            for (_, v) in t.iter_mut() {
                *v = v.to_kind(Kind::Half);
            }
        },
    );
    let plain = dir.path().join("diffusion_pytorch_model.safetensors");
    std::fs::rename(
        &plain,
        dir.path().join("diffusion_pytorch_model.fp16.safetensors"),
    )
    .expect("rename");
    let unet =
        UNet2DConditionModel::load_variant(dir.path(), Device::Cpu, Kind::Float, Some("fp16"))
            .expect("load fp16 variant");
    let io: HashMap<String, Tensor> =
        Tensor::read_safetensors(reference().join("sd1").join("io.safetensors"))
            .expect("io")
            .into_iter()
            .collect();
    let out = unet
        .forward(
            &io["sample"],
            &io["timesteps"],
            &io["encoder_hidden_states"],
        )
        .expect("forward");
    assert_eq!(out.kind(), Kind::Float);
    let want = &io["out"];
    let diff = (&out - want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]);
    println!("sd1 from fp16 weights: max abs diff {diff:.3e} (reference max |x| {scale:.3e})");
    assert!(
        diff <= 2e-2 * scale,
        "fp16 variant: max abs diff {diff} > 2e-2 * {scale}"
    );
    // Plain `load` falls back to the fp16 file when it is the only one.
    assert!(UNet2DConditionModel::load(dir.path(), Device::Cpu, Kind::Float).is_ok());
}
