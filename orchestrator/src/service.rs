//! `sd.v1.ImageGenerationService`: admission, validation, deadlines, and the [`Pipeline`].

use crate::{
    pipeline::Pipeline,
    request::{self, Limits},
};
use sd_proto::v1::{
    GenerateRequest, GenerateResponse, GenerateStreamRequest, GenerateStreamResponse,
    generate_stream_response::Event, image_generation_service_server::ImageGenerationService,
};
use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, metadata::MetadataMap};

/// The public service.
pub struct ImageGeneration {
    pipeline: Arc<Pipeline>,
    limits: Limits,
    /// One permit per generation allowed to run at once; none left means RESOURCE_EXHAUSTED.
    admission: Arc<Semaphore>,
    max_concurrent: usize,
    metrics: sd_server::telemetry::metrics::Orchestrator,
}

impl ImageGeneration {
    pub fn new(pipeline: Arc<Pipeline>, limits: Limits, max_concurrent: usize) -> Self {
        let max_concurrent = max_concurrent.max(1);
        Self {
            pipeline,
            limits,
            admission: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
            metrics: sd_server::telemetry::metrics::Orchestrator::new(),
        }
    }

    fn validate(&self, request: GenerateRequest) -> Result<request::Params, Status> {
        // Seeds stay below 2^63 so that Python's torch.manual_seed reproduces them as well.
        request::validate(request, &self.limits, || rand::random::<u64>() >> 1)
    }

    /// Admits one generation or refuses at once with a retry hint: overload must not turn
    /// into unbounded queues.
    fn admit(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.admission.clone().try_acquire_owned().map_err(|_| {
            let mut status = Status::resource_exhausted(format!(
                "orchestrator: {} generations already running (limit); retry later",
                self.max_concurrent
            ));
            status.metadata_mut().insert(
                "retry-after-ms",
                tonic::metadata::MetadataValue::from(1000u32),
            );
            status
        })
    }
}

/// How much earlier than the client's deadline the orchestrator stops a generation. tonic
/// enforces `grpc-timeout` around a unary handler too, and answers CANCELLED ("Timeout
/// expired") when its timer wins; stopping first lets the generation end with
/// DEADLINE_EXCEEDED naming the stage it was waiting for, as gRPC specifies.
const DEADLINE_MARGIN: Duration = Duration::from_millis(50);

/// The deadline a client set with `grpc-timeout`, as an instant, less [`DEADLINE_MARGIN`].
fn deadline(metadata: &MetadataMap) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Instant::now().checked_add(timeout.saturating_sub(DEADLINE_MARGIN))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ImageGenerationService for ImageGeneration {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let deadline = deadline(request.metadata());
        let params = self.validate(request.into_inner())?;
        let _permit = self.admit()?;
        let generation = self.metrics.generation_started();
        let outcome = self.pipeline.generate(&params, deadline, |_| true).await;
        generation.finished(
            outcome
                .as_ref()
                .map_or_else(|s| s.code(), |_| tonic::Code::Ok),
        );
        Ok(Response::new(outcome?))
    }

    type GenerateStreamStream = EventStream;

    async fn generate_stream(
        &self,
        request: Request<GenerateStreamRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let deadline = deadline(request.metadata());
        let GenerateStreamRequest { request } = request.into_inner();
        let request = request.ok_or_else(|| Status::invalid_argument("request: missing"))?;
        let params = self.validate(request)?;
        let permit = self.admit()?;
        let (tx, rx) = mpsc::channel(16);
        let pipeline = self.pipeline.clone();
        let span = tracing::Span::current();
        let generation = self.metrics.generation_started();
        let work = async move {
            let _permit = permit;
            let events = tx.clone();
            let outcome = pipeline
                .generate(&params, deadline, move |progress| {
                    // A full channel (slow reader) drops a progress event; a closed one means
                    // the client went away, which cancels the generation at this step.
                    let event = GenerateStreamResponse {
                        event: Some(Event::Progress(progress)),
                    };
                    !matches!(
                        events.try_send(Ok(event)),
                        Err(mpsc::error::TrySendError::Closed(_))
                    )
                })
                .await;
            generation.finished(
                outcome
                    .as_ref()
                    .map_or_else(|s| s.code(), |_| tonic::Code::Ok),
            );
            let last = outcome.map(|r| GenerateStreamResponse {
                event: Some(Event::Result(r)),
            });
            if let Err(status) = &last {
                tracing::info!(code = ?status.code(), "generation ended: {}", status.message());
            }
            let _ = tx.send(last).await;
        };
        tokio::spawn(tracing::Instrument::instrument(work, span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_becomes_a_deadline() {
        let mut m = MetadataMap::new();
        assert!(deadline(&m).is_none());
        m.insert("grpc-timeout", "1500m".parse().unwrap());
        let d = deadline(&m).unwrap().duration_since(Instant::now());
        assert!(
            d <= Duration::from_millis(1500) - DEADLINE_MARGIN && d > Duration::from_millis(1400),
            "{d:?}"
        );
        m.insert("grpc-timeout", "bogus".parse().unwrap());
        assert!(deadline(&m).is_none());
    }
}
