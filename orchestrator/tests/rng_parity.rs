//! Bit-for-bit parity of `TorchGenerator::randn` with torch's CPU generator, checked against
//! torch itself: `tests/python/reference_rng.py` runs in the workspace's `.venv` and the draws
//! are compared as IEEE-754 bit patterns (tolerance: none; both kernels are reproduced exactly).

use std::path::{Path, PathBuf};
use std::process::Command;

use sd_orchestrator::rng::{NormalFill, TorchGenerator};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    capability: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    seed: u64,
    shapes: Vec<Vec<usize>>,
    draws: Vec<Vec<u32>>,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs the reference script with the given `ATEN_CPU_CAPABILITY` (None: torch's own choice).
fn reference(capability: Option<&str>) -> Reference {
    let root = workspace_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("rng.json");
    let mut cmd = Command::new(root.join(".venv/bin/python"));
    cmd.arg(root.join("tests/python/reference_rng.py"))
        .arg(&out);
    match capability {
        Some(c) => cmd.env("ATEN_CPU_CAPABILITY", c),
        None => cmd.env_remove("ATEN_CPU_CAPABILITY"),
    };
    let status = cmd
        .status()
        .expect("run .venv/bin/python (create the workspace venv first)");
    assert!(status.success(), "reference_rng.py failed: {status}");
    let text = std::fs::read_to_string(&out).expect("read reference output");
    serde_json::from_str(&text).expect("parse reference output")
}

/// The kernel torch used: `normal_fill_AVX2` only at the AVX2 dispatch level; AVX-512 and
/// default builds compile the scalar `normal_fill`.
fn fill_for(capability: &str) -> NormalFill {
    if capability == "AVX2" {
        NormalFill::Avx2
    } else {
        NormalFill::Scalar
    }
}

fn check(reference: &Reference) {
    let fill = fill_for(&reference.capability);
    let mut compared = 0usize;
    for case in &reference.cases {
        let mut g = TorchGenerator::with_fill(case.seed, fill);
        for (shape, want) in case.shapes.iter().zip(&case.draws) {
            let numel = shape.iter().product();
            let got: Vec<u32> = g.randn(numel).iter().map(|v| v.to_bits()).collect();
            assert_eq!(got.len(), want.len());
            if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
                panic!(
                    "seed {} shapes {:?} ({} kernel {fill:?}): element {i} of {shape:?} is {} \
                     (bits {:#x}), torch gives {} (bits {:#x})",
                    case.seed,
                    case.shapes,
                    reference.capability,
                    f32::from_bits(got[i]),
                    got[i],
                    f32::from_bits(want[i]),
                    want[i],
                );
            }
            compared += got.len();
        }
    }
    eprintln!("{}: {compared} values bit-identical", reference.capability);
}

#[test]
fn randn_matches_torch_native_kernel() {
    check(&reference(None));
}

#[test]
fn randn_matches_torch_scalar_kernel() {
    let reference = reference(Some("default"));
    assert_eq!(fill_for(&reference.capability), NormalFill::Scalar);
    check(&reference);
}
