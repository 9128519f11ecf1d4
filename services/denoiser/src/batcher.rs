//! Step-level dynamic batching.
//!
//! Denoise calls from different generations, each at its own timestep, queue here; the model
//! thread takes the oldest, then gathers more calls of the same bucket (latent size, context
//! length) until the batch holds `max_batch` U-Net rows or `max_wait` has passed, and runs
//! them as one forward. Calls of another bucket wait for the next round without delaying
//! this one. A call whose client went away (its reply receiver dropped) is skipped before it
//! takes a batch slot. Admission is bounded: beyond `max_pending` queued calls, `submit`
//! refuses at once, so memory stays bounded whatever the request rate.

use crate::model::{Model, Step};
use sd_models::ModelError;
use sd_server::telemetry::metrics::Stage as Metrics;
use std::{
    collections::VecDeque,
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
    },
    time::{Duration, Instant},
};
use tokio::sync::oneshot;

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most U-Net rows in one forward (a guided sample is two rows). 1 turns batching off.
    pub max_batch: usize,
    /// How long the first call of a batch waits for company.
    pub max_wait: Duration,
    /// Most calls queued (not yet in a forward) before new ones are refused.
    pub max_pending: usize,
}

/// What one call gets back.
#[derive(Debug)]
pub struct StepOutput {
    /// The (guided) model output, CPU f32.
    pub output: tch::Tensor,
    /// U-Net rows in the forward this call joined.
    pub batch_rows: usize,
    /// Calls in that forward.
    pub batch_calls: usize,
    /// Time spent queued before the forward started.
    pub queue_wait: Duration,
    /// Time of the forward.
    pub compute: Duration,
}

/// Why a call was not served.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("denoiser: {pending} steps already queued (limit {limit}); retry later")]
    Overloaded { pending: usize, limit: usize },
    #[error("denoiser: the model thread has stopped")]
    Stopped,
    /// The forward failed; every call of the batch gets the same error.
    #[error("denoiser: {message}")]
    Failed { kind: FailureKind, message: String },
}

/// What kind of failure a batch had, for the status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The inputs do not fit the model (all calls of a batch share their shapes).
    Input,
    /// The device ran out of memory.
    OutOfMemory,
    /// Anything else, panics included.
    Internal,
}

impl FailureKind {
    fn of(e: &ModelError) -> Self {
        match e {
            ModelError::Input(_) => Self::Input,
            ModelError::Torch(t)
                if t.to_string().to_ascii_lowercase().contains("out of memory") =>
            {
                Self::OutOfMemory
            }
            _ => Self::Internal,
        }
    }
}

struct Pending {
    step: Step,
    reply: oneshot::Sender<Result<StepOutput, BatchError>>,
    enqueued: Instant,
    span: tracing::Span,
}

/// Handle to the model thread's queue.
#[derive(Clone)]
pub struct Batcher {
    tx: Sender<Pending>,
    pending: Arc<AtomicUsize>,
    config: BatchConfig,
    metrics: Metrics,
}

impl Batcher {
    /// Starts the model thread: it runs `load` (weights and warm-up), reports the outcome on
    /// the returned receiver, then serves batches.
    pub fn spawn(
        config: BatchConfig,
        metrics: Metrics,
        load: impl FnOnce() -> Result<Model, ModelError> + Send + 'static,
    ) -> (Self, oneshot::Receiver<Result<(), ModelError>>) {
        let (tx, rx) = mpsc::channel::<Pending>();
        let (loaded_tx, loaded_rx) = oneshot::channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let counter = pending.clone();
        let thread_metrics = metrics.clone();
        let spawned = std::thread::Builder::new()
            .name("denoiser-model".into())
            .spawn(move || match load() {
                Ok(model) => {
                    let _ = loaded_tx.send(Ok(()));
                    serve(&model, &rx, &counter, config, &thread_metrics);
                }
                Err(e) => {
                    let _ = loaded_tx.send(Err(e));
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the denoiser model thread: {e}");
        }
        (
            Self {
                tx,
                pending,
                config,
                metrics,
            },
            loaded_rx,
        )
    }

    /// Calls queued and not yet in a forward.
    pub fn queue_depth(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Queues one step and waits for its output. Dropping the future (client cancelled)
    /// releases the call's place: the model thread skips it.
    pub async fn submit(&self, step: Step) -> Result<StepOutput, BatchError> {
        let limit = self.config.max_pending;
        let admitted = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            });
        if let Err(pending) = admitted {
            return Err(BatchError::Overloaded { pending, limit });
        }
        let (reply, answer) = oneshot::channel();
        let item = Pending {
            step,
            reply,
            enqueued: Instant::now(),
            span: tracing::Span::current(),
        };
        self.metrics.enqueued();
        if self.tx.send(item).is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.metrics.dequeued();
            return Err(BatchError::Stopped);
        }
        answer.await.map_err(|_| BatchError::Stopped)?
    }
}

/// The model thread's loop.
fn serve(
    model: &Model,
    rx: &Receiver<Pending>,
    pending: &AtomicUsize,
    config: BatchConfig,
    metrics: &Metrics,
) {
    let mut held: VecDeque<Pending> = VecDeque::new();
    loop {
        let first = match held.pop_front() {
            Some(p) => p,
            None => match rx.recv() {
                Ok(p) => p,
                Err(_) => return, // every sender dropped: the service is gone
            },
        };
        let mut batch = Vec::new();
        let mut rows = 0;
        let admit = |p: Pending, batch: &mut Vec<Pending>, rows: &mut usize| {
            pending.fetch_sub(1, Ordering::AcqRel);
            metrics.dequeued();
            if p.reply.is_closed() {
                return; // the client went away: free its slot without computing it
            }
            *rows += p.step.rows();
            batch.push(p);
        };
        let key = first.step.key();
        admit(first, &mut batch, &mut rows);
        // Compatible calls held back from earlier rounds join first, in arrival order.
        let mut kept = VecDeque::with_capacity(held.len());
        while let Some(p) = held.pop_front() {
            if p.step.key() == key && rows + p.step.rows() <= config.max_batch {
                admit(p, &mut batch, &mut rows);
            } else {
                kept.push_back(p);
            }
        }
        held = kept;
        let deadline = Instant::now() + config.max_wait;
        while rows < config.max_batch {
            let wait = deadline.saturating_duration_since(Instant::now());
            let next = if wait.is_zero() {
                rx.try_recv().map_err(|_| RecvTimeoutError::Timeout)
            } else {
                rx.recv_timeout(wait)
            };
            match next {
                Ok(p) if p.step.key() == key && rows + p.step.rows() <= config.max_batch => {
                    admit(p, &mut batch, &mut rows)
                }
                Ok(p) => held.push_back(p),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            run(model, batch, rows, metrics);
        }
    }
}

/// Runs one batch and answers every call in it.
fn run(model: &Model, batch: Vec<Pending>, rows: usize, metrics: &Metrics) {
    let started = Instant::now();
    metrics.record_batch_size(rows);
    for p in &batch {
        metrics.record_queue_wait(started.saturating_duration_since(p.enqueued));
    }
    let calls = batch.len();
    let span = tracing::info_span!("denoise_batch", rows, calls);
    for p in &batch {
        span.follows_from(&p.span);
    }
    let _entered = span.enter();
    let (steps, replies): (Vec<Step>, Vec<_>) = batch
        .into_iter()
        .map(|p| (p.step, (p.reply, p.enqueued)))
        .unzip();
    let outcome = match std::panic::catch_unwind(AssertUnwindSafe(|| model.denoise(&steps))) {
        Ok(Ok(outputs)) => Ok(outputs),
        Ok(Err(e)) => Err((FailureKind::of(&e), e.to_string())),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err((
                FailureKind::Internal,
                format!("the U-Net panicked: {message}"),
            ))
        }
    };
    let compute = started.elapsed();
    metrics.record_compute(compute);
    match outcome {
        Ok(outputs) => {
            for ((reply, enqueued), output) in replies.into_iter().zip(outputs) {
                let _ = reply.send(Ok(StepOutput {
                    output,
                    batch_rows: rows,
                    batch_calls: calls,
                    queue_wait: started.saturating_duration_since(enqueued),
                    compute,
                }));
            }
        }
        Err((kind, message)) => {
            tracing::warn!("batch of {calls} calls failed: {message}");
            for (reply, _) in replies {
                let _ = reply.send(Err(BatchError::Failed {
                    kind,
                    message: message.clone(),
                }));
            }
        }
    }
}
