//! `sd.v1.ImageGenerationService`: validates requests and runs them through the [`Pipeline`].

use crate::{
    pipeline::Pipeline,
    request::{self, Limits},
};
use sd_proto::v1::{
    GenerateRequest, GenerateResponse, GenerateStreamRequest, GenerateStreamResponse,
    generate_stream_response::Event, image_generation_service_server::ImageGenerationService,
};
use std::{pin::Pin, sync::Arc};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

/// The public service.
pub struct ImageGeneration {
    pipeline: Arc<Pipeline>,
    limits: Limits,
}

impl ImageGeneration {
    pub fn new(pipeline: Arc<Pipeline>, limits: Limits) -> Self {
        Self { pipeline, limits }
    }

    fn validate(&self, request: GenerateRequest) -> Result<request::Params, Status> {
        // Seeds stay below 2^63 so that Python's torch.manual_seed reproduces them as well.
        request::validate(request, &self.limits, || rand::random::<u64>() >> 1)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ImageGenerationService for ImageGeneration {
    #[tracing::instrument(skip_all, fields(seed))]
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let params = self.validate(request.into_inner())?;
        tracing::Span::current().record("seed", params.seed);
        let response = self.pipeline.generate(&params, |_| true).await?;
        Ok(Response::new(response))
    }

    type GenerateStreamStream = EventStream;

    #[tracing::instrument(skip_all, fields(seed))]
    async fn generate_stream(
        &self,
        request: Request<GenerateStreamRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let GenerateStreamRequest { request } = request.into_inner();
        let request = request.ok_or_else(|| Status::invalid_argument("request: missing"))?;
        let params = self.validate(request)?;
        tracing::Span::current().record("seed", params.seed);
        let (tx, rx) = mpsc::channel(16);
        let pipeline = self.pipeline.clone();
        let span = tracing::Span::current();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let events = tx.clone();
                let outcome = pipeline
                    .generate(&params, move |progress| {
                        // A full channel (slow reader) drops a progress event; a closed one
                        // means the client went away, which cancels the generation.
                        let event = GenerateStreamResponse {
                            event: Some(Event::Progress(progress)),
                        };
                        !matches!(
                            events.try_send(Ok(event)),
                            Err(mpsc::error::TrySendError::Closed(_))
                        )
                    })
                    .await;
                let last = outcome.map(|r| GenerateStreamResponse {
                    event: Some(Event::Result(r)),
                });
                if let Err(status) = &last {
                    tracing::info!(code = ?status.code(), "generation ended: {}", status.message());
                }
                let _ = tx.send(last).await;
            },
            span,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
