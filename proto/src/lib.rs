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

/// Largest HTTP/2 frame each end of a stage connection asks its peer to send, in bytes
/// (SETTINGS_MAX_FRAME_SIZE). The protocol's default, 16 KiB, cuts one SD 1.5 latent (64 KiB)
/// into five DATA frames, each parsed and flow-controlled on its own; one frame per tensor
/// saves 0.1-0.15 ms per denoising step on loopback (`sd bench split`, docs/benchmarks.md).
/// 1 MiB keeps frames small enough that concurrent calls on one connection still interleave.
pub const MAX_FRAME_BYTES: u32 = 1024 * 1024;

/// The denoiser's conditioning cache as the stage API describes it (`DenoiseRequest.context_id`):
/// the id rules and the machine-readable miss status, shared by the denoiser and its callers.
pub mod context_cache {
    use tonic::{Code, Status};

    /// Metadata key of the FAILED_PRECONDITION status a call gets when it sends only a
    /// `context_id` the replica does not hold; the value is the id.
    pub const MISS_METADATA: &str = "sd-context-miss";

    /// Longest `context_id`, in bytes.
    pub const MAX_ID_BYTES: usize = 128;

    /// Checks a non-empty `context_id`: 1 to [`MAX_ID_BYTES`] printable ASCII characters (so
    /// it can travel as a metadata value). The error is the INVALID_ARGUMENT message.
    pub fn validate_id(id: &str) -> Result<(), String> {
        if id.is_empty() {
            return Err("context_id: empty".into());
        }
        if id.len() > MAX_ID_BYTES {
            return Err(format!(
                "context_id: {} bytes, more than the {MAX_ID_BYTES} allowed",
                id.len()
            ));
        }
        if !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "context_id: only printable ASCII characters (no spaces) are allowed".into(),
            );
        }
        Ok(())
    }

    /// The status for a call that sent only `id` and the replica does not hold it.
    pub fn miss(id: &str) -> Status {
        let mut status = Status::failed_precondition(format!(
            "context_id {id:?} is not in this replica's context cache (expired, evicted or never \
             stored here); send encoder_hidden_states with it"
        ));
        if let Ok(value) = id.parse() {
            status.metadata_mut().insert(MISS_METADATA, value);
        }
        status
    }

    /// Whether `status` is a context-cache miss ([`miss`]): the caller should re-send the call
    /// with its context.
    pub fn is_miss(status: &Status) -> bool {
        status.code() == Code::FailedPrecondition && status.metadata().contains_key(MISS_METADATA)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn ids_are_checked_and_misses_recognised() {
            assert!(validate_id("0123456789abcdef0123456789abcdef").is_ok());
            assert!(validate_id("").is_err());
            assert!(validate_id(&"a".repeat(MAX_ID_BYTES + 1)).is_err());
            assert!(validate_id("has space").is_err());
            assert!(validate_id("é").is_err());
            let status = miss("abc");
            assert!(is_miss(&status));
            assert_eq!(status.metadata().get(MISS_METADATA).unwrap(), "abc");
            assert!(status.message().contains("\"abc\""));
            assert!(!is_miss(&Status::failed_precondition("other")));
            assert!(!is_miss(&Status::not_found("abc")));
        }
    }
}
