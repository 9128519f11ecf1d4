//! Strict safetensors loading of a diffusers component folder into a [`tch::nn::VarStore`].
//!
//! Models build their variables under paths equal to the checkpoint's tensor names, so loading
//! is a lookup by name. Loading is strict: every missing tensor, every unexpected tensor and
//! every shape mismatch is collected and reported together, so a wrong config or a wrong
//! checkpoint is diagnosed in one run. Pickle formats are refused (see [`ModelError::Pickle`]).

use crate::ModelError;
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};
use tch::{Tensor, nn::VarStore};

/// How many lines of each kind a mismatch report lists before summarising the rest.
const REPORT_LIMIT: usize = 40;

/// Finds the safetensors file(s) of a component: `{stem}.safetensors`,
/// `{stem}.{variant}.safetensors` when a variant (such as `fp16`) is asked for, or the shards
/// named by `{stem}[.{variant}].safetensors.index.json`. Without a variant, an `fp16` variant
/// file is used when it is the only one present (its tensors are converted on load).
pub fn find_weights(
    dir: &Path,
    stem: &str,
    variant: Option<&str>,
) -> Result<Vec<PathBuf>, ModelError> {
    let mut candidates = Vec::new();
    match variant {
        Some(v) => candidates.push(format!("{stem}.{v}")),
        None => {
            candidates.push(stem.to_string());
            candidates.push(format!("{stem}.fp16"));
        }
    }
    for base in &candidates {
        let single = dir.join(format!("{base}.safetensors"));
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{base}.safetensors.index.json"));
        if index.is_file() {
            return shards_from_index(dir, &index);
        }
    }
    for ext in ["bin", "ckpt", "pt", "pth"] {
        for base in &candidates {
            let pickle = dir.join(format!("{base}.{ext}"));
            if pickle.is_file() {
                return Err(ModelError::Pickle {
                    file: pickle.display().to_string(),
                    stem: stem.to_string(),
                    path: pickle,
                });
            }
        }
    }
    Err(ModelError::Missing {
        path: dir.join(format!("{}.safetensors", candidates[0])),
    })
}

fn shards_from_index(dir: &Path, index: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: index.to_path_buf(),
        message: e.to_string(),
    })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Config {
            path: index.to_path_buf(),
            message: "no `weight_map` object".into(),
        })?;
    let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    files
        .into_iter()
        .map(|f| {
            let p = dir.join(f);
            if p.is_file() {
                Ok(p)
            } else {
                Err(ModelError::Missing { path: p })
            }
        })
        .collect()
}

/// Reads every tensor of the given files (on CPU, in the file's dtype).
pub fn read_tensors(files: &[PathBuf]) -> Result<BTreeMap<String, Tensor>, ModelError> {
    let mut all = BTreeMap::new();
    for file in files {
        let tensors = Tensor::read_safetensors(file).map_err(|e| ModelError::Weights {
            path: file.clone(),
            message: e.to_string(),
        })?;
        all.extend(tensors);
    }
    Ok(all)
}

/// Copies `tensors` into the variables of `vs`, converting dtype and device. Names in
/// `ignored` (exact names, or prefixes ending in `.`) may appear in the file without a
/// variable: buffers that older exports saved, such as CLIP's `position_ids`.
pub fn load_into(
    vs: &VarStore,
    mut tensors: BTreeMap<String, Tensor>,
    ignored: &[&str],
    origin: &Path,
) -> Result<(), ModelError> {
    let variables: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let mut missing = Vec::new();
    let mut shapes = Vec::new();
    for (name, var) in &variables {
        match tensors.get(name) {
            None => missing.push(name.clone()),
            Some(t) if t.size() != var.size() => shapes.push(format!(
                "{name}: checkpoint {:?}, model {:?}",
                t.size(),
                var.size()
            )),
            Some(_) => {}
        }
    }
    let unexpected: Vec<String> = tensors
        .keys()
        .filter(|k| !variables.contains_key(*k))
        .filter(|k| {
            !ignored
                .iter()
                .any(|i| *k == i || (i.ends_with('.') && k.starts_with(i)))
        })
        .cloned()
        .collect();
    if !(missing.is_empty() && unexpected.is_empty() && shapes.is_empty()) {
        let mut report = String::new();
        section(&mut report, "missing from the checkpoint", &missing);
        section(&mut report, "unexpected in the checkpoint", &unexpected);
        section(&mut report, "shape mismatches", &shapes);
        return Err(ModelError::WeightMismatch {
            path: origin.to_path_buf(),
            report,
        });
    }
    tch::no_grad(|| -> Result<(), ModelError> {
        for (name, mut var) in variables {
            let src = tensors.remove(&name).expect("checked above");
            var.f_copy_(&src)?;
        }
        Ok(())
    })
}

fn section(report: &mut String, title: &str, names: &[String]) {
    if names.is_empty() {
        return;
    }
    report.push_str(&format!("  {} {title}:\n", names.len()));
    for n in names.iter().take(REPORT_LIMIT) {
        report.push_str(&format!("    {n}\n"));
    }
    if names.len() > REPORT_LIMIT {
        report.push_str(&format!(
            "    ... and {} more\n",
            names.len() - REPORT_LIMIT
        ));
    }
}

/// Finds, reads and strictly loads a component's weights into `vs`; the usual entry point.
pub fn load_component(
    vs: &VarStore,
    dir: &Path,
    stem: &str,
    variant: Option<&str>,
    ignored: &[&str],
) -> Result<(), ModelError> {
    let files = find_weights(dir, stem, variant)?;
    let tensors = read_tensors(&files)?;
    load_into(vs, tensors, ignored, &files[0])
}

/// Reads and parses a component's `config.json` (or another JSON file).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            ModelError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, nn};

    fn store() -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let _ = root
            .sub("layer")
            .var("weight", &[2, 3], nn::Init::Const(0.));
        let _ = root.sub("layer").var("bias", &[2], nn::Init::Const(0.));
        vs
    }

    fn save(dir: &Path, name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
        let path = dir.join(name);
        Tensor::write_safetensors(tensors, &path).unwrap();
        path
    }

    #[test]
    fn loads_matching_weights_and_converts_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::arange(6, (Kind::Half, Device::Cpu)).reshape([2, 3]);
        save(
            dir.path(),
            "model.fp16.safetensors",
            &[
                ("layer.weight", w),
                ("layer.bias", Tensor::ones([2], (Kind::Half, Device::Cpu))),
            ],
        );
        let vs = store();
        load_component(&vs, dir.path(), "model", None, &[]).unwrap();
        let v = vs.variables();
        assert_eq!(v["layer.weight"].kind(), Kind::Float);
        assert_eq!(v["layer.weight"].double_value(&[1, 2]), 5.0);
        assert_eq!(v["layer.bias"].double_value(&[0]), 1.0);
    }

    #[test]
    fn mismatch_report_lists_every_problem() {
        let dir = tempfile::tempdir().unwrap();
        save(
            dir.path(),
            "model.safetensors",
            &[
                (
                    "layer.weight",
                    Tensor::zeros([3, 2], (Kind::Float, Device::Cpu)),
                ),
                (
                    "extra.weight",
                    Tensor::zeros([1], (Kind::Float, Device::Cpu)),
                ),
                (
                    "embeddings.position_ids",
                    Tensor::zeros([1], (Kind::Int64, Device::Cpu)),
                ),
            ],
        );
        let err = load_component(
            &store(),
            dir.path(),
            "model",
            None,
            &["embeddings.position_ids"],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("1 missing from the checkpoint:\n    layer.bias"),
            "{err}"
        );
        assert!(
            err.contains("1 unexpected in the checkpoint:\n    extra.weight"),
            "{err}"
        );
        assert!(
            err.contains("layer.weight: checkpoint [3, 2], model [2, 3]"),
            "{err}"
        );
        assert!(!err.contains("position_ids"), "{err}");
    }

    #[test]
    fn pickles_are_refused_and_missing_files_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = find_weights(dir.path(), "diffusion_pytorch_model", None).unwrap_err();
        assert!(
            err.to_string()
                .contains("diffusion_pytorch_model.safetensors: missing"),
            "{err}"
        );
        std::fs::write(dir.path().join("diffusion_pytorch_model.bin"), b"pickle").unwrap();
        let err = find_weights(dir.path(), "diffusion_pytorch_model", None).unwrap_err();
        assert!(matches!(err, ModelError::Pickle { .. }), "{err}");
        assert!(err.to_string().contains("safetensors"), "{err}");
    }

    #[test]
    fn variant_is_required_when_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        save(
            dir.path(),
            "model.safetensors",
            &[("a", Tensor::zeros([1], (Kind::Float, Device::Cpu)))],
        );
        assert!(find_weights(dir.path(), "model", Some("fp16")).is_err());
        assert_eq!(find_weights(dir.path(), "model", None).unwrap().len(), 1);
    }
}
