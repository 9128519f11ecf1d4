//! Link settings every binary (and test binary) that links libtorch needs, emitted from the
//! build script of the crate that owns the binary. `cargo:rustc-link-arg` only reaches the
//! emitting package's own targets, which is why each such crate calls [`emit`] itself.
//!
//! Two things are done:
//! - `libtorch_cuda` is force-linked. Nothing references its symbols directly, so with
//!   `--as-needed` the linker would drop it and CUDA would be silently missing at run time on
//!   GPU machines (`tch::Cuda::is_available()` false).
//! - An rpath to libtorch's `lib` folder, so binaries run without `LD_LIBRARY_PATH`. The folder
//!   comes from `LIBTORCH`, which `.cargo/config.toml` points at the PyPI wheel in `.venv`.
//!   Deployments that move binaries elsewhere set `LD_LIBRARY_PATH` instead.

use std::path::PathBuf;

/// Emits the link arguments; call from `build.rs`.
pub fn emit() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Some(libtorch) = std::env::var_os("LIBTORCH") {
        let lib = PathBuf::from(libtorch).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        if lib.join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        } else {
            println!(
                "cargo:warning=no libtorch_cuda.so in {}: this build runs on CPU only",
                lib.display()
            );
        }
    }
}
