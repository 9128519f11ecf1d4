//! The one place where stage errors become gRPC statuses: bad input is INVALID_ARGUMENT naming
//! the field, overload and GPU out-of-memory are RESOURCE_EXHAUSTED, a stage still loading or
//! stopped is UNAVAILABLE naming the stage, anything else is INTERNAL.

use crate::batcher::BatchError;
use sd_models::ModelError;
use sd_proto::tensor::TensorError;
use tonic::Status;

/// Converts a tensor validation error (always the caller's fault).
pub fn tensor(e: TensorError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// How long an overloaded stage asks callers to wait before retrying (`retry-after-ms`).
pub const RETRY_AFTER_MS: u32 = 100;

/// Converts a batching failure whose forward error is already a status. Overload carries a
/// `retry-after-ms` hint.
pub fn batch(e: BatchError<Status>) -> Status {
    match e {
        BatchError::Overloaded { .. } => {
            let mut status = Status::resource_exhausted(e.to_string());
            status.metadata_mut().insert(
                "retry-after-ms",
                tonic::metadata::MetadataValue::from(RETRY_AFTER_MS),
            );
            status
        }
        BatchError::Stopped(_) => Status::unavailable(e.to_string()),
        BatchError::Panicked { .. } => Status::internal(e.to_string()),
        BatchError::Failed(status) => status,
    }
}

/// Converts a model error raised while serving a request.
pub fn model(stage: &str, e: ModelError) -> Status {
    match e {
        ModelError::Input(m) => Status::invalid_argument(m),
        ModelError::Torch(t) if is_out_of_memory(&t.to_string()) => {
            Status::resource_exhausted(format!("{stage}: out of device memory: {t}"))
        }
        other => Status::internal(format!("{stage}: {other}")),
    }
}

/// The stage has not finished loading its weights and warming up.
pub fn warming_up(stage: &str) -> Status {
    Status::unavailable(format!(
        "{stage}: warming up (loading weights), not serving yet"
    ))
}

fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("out of memory") || m.contains("cudaerrormemoryallocation")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn codes() {
        assert_eq!(batch(BatchError::Stopped("vae")).code(), Code::Unavailable);
        assert_eq!(
            model("vae", ModelError::Input("latents: bad".into())).code(),
            Code::InvalidArgument
        );
        let oom = ModelError::Torch(tch::TchError::Torch("CUDA out of memory. Tried".into()));
        assert_eq!(model("denoiser", oom).code(), Code::ResourceExhausted);
        let overloaded = batch(BatchError::Overloaded {
            stage: "vae",
            pending: 64,
            limit: 64,
        });
        assert_eq!(overloaded.code(), Code::ResourceExhausted);
        assert_eq!(overloaded.metadata().get("retry-after-ms").unwrap(), "100");
        let failed = batch(BatchError::Failed(Status::invalid_argument(
            "prompts[0]: x",
        )));
        assert_eq!(failed.code(), Code::InvalidArgument);
        let s = warming_up("text-encoder");
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("text-encoder"));
    }
}
