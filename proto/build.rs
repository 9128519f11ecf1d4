//! Compiles the `.proto` files into `OUT_DIR` with a vendored `protoc`, so no system protoc
//! is needed, and writes one file descriptor set for gRPC reflection.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "sd/v1/image_generation.proto",
    "sd/stage/v1/tensor.proto",
    "sd/stage/v1/text_encoder.proto",
    "sd/stage/v1/denoiser.proto",
    "sd/stage/v1/vae.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    #[allow(unsafe_code)]
    unsafe {
        env::set_var("PROTOC", protoc);
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        // `bytes` fields as `bytes::Bytes`: tensor payloads are shared, not copied, when a
        // message is cloned (the sampling loop re-sends the same text context every step).
        .bytes(".")
        .file_descriptor_set_path(out_dir.join("sd_descriptor.bin"))
        .compile_protos(PROTOS, &["."])?;
    Ok(())
}
