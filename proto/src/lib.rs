//! The system's gRPC contracts, compiled from `proto/`, and helpers for the tensors that cross
//! them.
//!
//! - [`v1`]: the public, versioned API (`sd.v1`) that clients in any language call.
//! - [`stage`]: the internal API (`sd.stage.v1`) between the orchestrator and the model stages.
//! - [`tensor`]: validation and conversion of [`stage::Tensor`] without libtorch, so bad bytes
//!   are rejected before any model code sees them.

pub mod tensor;

/// Public API: `sd.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("sd.v1");
}

/// Stage API: `sd.stage.v1`.
pub mod stage {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("sd.stage.v1");
}

/// Encoded `FileDescriptorSet` of every proto file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sd_descriptor");

/// Fully qualified names of the services, as gRPC health and reflection know them.
pub mod service_names {
    /// Public image generation service.
    pub const IMAGE_GENERATION: &str = "sd.v1.ImageGenerationService";
    /// Text encoder stage.
    pub const TEXT_ENCODER: &str = "sd.stage.v1.TextEncoderService";
    /// Denoiser (U-Net) stage.
    pub const DENOISER: &str = "sd.stage.v1.DenoiserService";
    /// VAE stage.
    pub const VAE: &str = "sd.stage.v1.VaeService";
}

/// Largest gRPC message the services and clients accept, in bytes. A batch of 8 latents at
/// 1024x1024 (8x4x128x128 f32) is 2 MiB and 8 decoded 1024x1024 RGB images are 24 MiB, so
/// 64 MiB leaves room; tonic's default of 4 MiB does not. Set explicitly on both ends.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
