//! A generation's denoising steps, sent over a `DenoiseSteps` stream to the replica that
//! serves them.
//!
//! Why a stream: a step on an open stream is one request message and one response message.
//! A unary Denoise call also costs, on both sides and on every step, a new HTTP/2 stream
//! (headers, HPACK, routing, a server task and span, trailers). On the 2-core VM of
//! `docs/benchmarks.md` that is about 0.3 ms per step of the 0.9 ms the split cost.
//!
//! Not a session: every message is a self-contained `DenoiseRequest`, and which replica
//! serves a step is still the balancer's choice at every step ([`Stage::call_on`]). The
//! stream follows that choice: a step sent to another replica (failover, a busier replica)
//! drops the open stream and opens one there. A stream that fails is dropped and the step is
//! retried like any call, within the generation's deadline and the retry budget. Dropping a
//! [`StepStream`] (a cancelled generation) resets its stream, so the denoiser drops the step it
//! had queued.
//!
//! A generation holds its stream while it runs, so a replica has at most one open stream per
//! running generation (the stage servers set no HTTP/2 stream limit; the orchestrator's
//! `--max-concurrent-generations` bounds them).
//!
//! [`Stage::call_on`]: crate::stages::Stage::call_on

use crate::stages::{self, Traced, request};
use sd_proto::stage::{DenoiseRequest, DenoiseResponse, DenoiseStepsRequest, DenoiseStepsResponse};
use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Status, Streaming};

/// Denoise traffic of this process since start, for benchmarks: every step sent (context-miss
/// re-sends included) and its encoded request size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DenoiseTraffic {
    /// Steps sent.
    pub calls: u64,
    /// Bytes of their encoded `DenoiseRequest` messages.
    pub request_bytes: u64,
    /// Steps that sent only a context id and got a context miss (each was re-sent).
    pub context_misses: u64,
}

static DENOISE_CALLS: AtomicU64 = AtomicU64::new(0);
static DENOISE_REQUEST_BYTES: AtomicU64 = AtomicU64::new(0);
static CONTEXT_MISSES: AtomicU64 = AtomicU64::new(0);

/// The process's [`DenoiseTraffic`] so far.
pub fn denoise_traffic() -> DenoiseTraffic {
    DenoiseTraffic {
        calls: DENOISE_CALLS.load(Ordering::Relaxed),
        request_bytes: DENOISE_REQUEST_BYTES.load(Ordering::Relaxed),
        context_misses: CONTEXT_MISSES.load(Ordering::Relaxed),
    }
}

/// Whether a step that sent only a context id must be re-sent with the context: a context
/// miss, or a replica from before the cache, which reads the step as having no context.
fn needs_context(status: &Status) -> bool {
    sd_proto::context_cache::is_miss(status)
        || (status.code() == tonic::Code::InvalidArgument
            && status
                .message()
                .starts_with("encoder_hidden_states: missing"))
}

/// One generation's step stream: at most one open, to the replica of its last step.
pub struct StepStream {
    open: Mutex<Option<Open>>,
    /// The generation's deadline, which the stream carries to the denoiser.
    deadline: Option<Instant>,
}

/// An open `DenoiseSteps` stream.
struct Open {
    replica: String,
    requests: mpsc::Sender<DenoiseStepsRequest>,
    responses: Streaming<DenoiseStepsResponse>,
}

impl StepStream {
    /// No stream is opened until the first step.
    pub fn new(deadline: Option<Instant>) -> Self {
        Self {
            open: Mutex::new(None),
            deadline,
        }
    }

    /// One step on `replica` (reached through `channel`) within `timeout`: `bare` (the
    /// context id alone) when the context is believed cached there, else `full`. A context
    /// miss re-sends `full` to the same replica.
    pub async fn step(
        &self,
        replica: String,
        channel: Traced,
        full: &DenoiseRequest,
        bare: Option<&DenoiseRequest>,
        timeout: Duration,
    ) -> Result<Response<DenoiseResponse>, Status> {
        let Some(bare) = bare else {
            return self.send(&replica, channel, full, timeout).await;
        };
        let started = Instant::now();
        match self.send(&replica, channel.clone(), bare, timeout).await {
            Err(status) if needs_context(&status) => {
                CONTEXT_MISSES.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    context_id = full.context_id.as_str(),
                    "context cache miss on the denoiser ({}): re-sending the step with its context",
                    status.message()
                );
                let left = timeout.saturating_sub(started.elapsed());
                self.send(&replica, channel, full, left).await
            }
            outcome => outcome,
        }
    }

    /// Sends `step` on the stream to `replica`, opening one if none is open there, and waits
    /// for its response. Any failure leaves no stream open (the denoiser ends a stream after
    /// a failed step, and a step that timed out must not be answered later on it).
    async fn send(
        &self,
        replica: &str,
        channel: Traced,
        step: &DenoiseRequest,
        timeout: Duration,
    ) -> Result<Response<DenoiseResponse>, Status> {
        let started = Instant::now();
        let open = self.take_open(replica);
        let mut open = match open {
            Some(open) => open,
            None => tokio::time::timeout(timeout, self.open_on(replica, channel))
                .await
                .map_err(|_| late(timeout))??,
        };
        DENOISE_CALLS.fetch_add(1, Ordering::Relaxed);
        DENOISE_REQUEST_BYTES
            .fetch_add(prost::Message::encoded_len(step) as u64, Ordering::Relaxed);
        let mut message = DenoiseStepsRequest {
            step: Some(step.clone()),
            trace_context: Default::default(),
        };
        sd_server::telemetry::inject_into(&mut message.trace_context);
        if open.requests.send(message).await.is_err() {
            return Err(closed());
        }
        let left = timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, open.responses.message()).await {
            Err(_) => Err(late(timeout)),
            Ok(Err(status)) => Err(status),
            Ok(Ok(None)) => Err(closed()),
            Ok(Ok(Some(DenoiseStepsResponse { step: None }))) => Err(Status::internal(
                "the denoiser answered a step with an empty message",
            )),
            Ok(Ok(Some(DenoiseStepsResponse {
                step: Some(response),
            }))) => {
                *self.open.lock().unwrap_or_else(|e| e.into_inner()) = Some(open);
                Ok(Response::new(response))
            }
        }
    }

    /// The open stream, if it goes to `replica`; one to another replica is dropped (reset).
    fn take_open(&self, replica: &str) -> Option<Open> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .filter(|open| open.replica == replica)
    }

    /// Opens a stream on `channel`, carrying the generation's deadline.
    async fn open_on(&self, replica: &str, channel: Traced) -> Result<Open, Status> {
        let (requests, outgoing) = mpsc::channel(1);
        let outgoing = ReceiverStream::new(outgoing);
        let call = match self.deadline {
            Some(deadline) => request(outgoing, deadline.saturating_duration_since(Instant::now())),
            None => tonic::Request::new(outgoing),
        };
        let responses = stages::denoiser(channel)
            .denoise_steps(call)
            .await?
            .into_inner();
        Ok(Open {
            replica: replica.to_string(),
            requests,
            responses,
        })
    }
}

/// The step did not get its answer within its time.
fn late(timeout: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "no answer to the step within {:.3} s",
        timeout.as_secs_f64()
    ))
}

/// The stream ended without answering: the replica went away or shut down.
fn closed() -> Status {
    Status::unavailable("the step stream closed without an answer")
}
