//! The model's thread and its queue, shared by the three model stages.
//!
//! A model is created on, and never leaves, one OS thread: tch tensors are `Send` but not
//! `Sync`, and a blocking libtorch forward must not stall the async runtime. Async handlers
//! [`Batcher::submit`] calls and await the answer.
//!
//! Calls queue here; the model thread takes the oldest, then gathers more calls of the same
//! bucket ([`Batchable::key`]: shapes and options that can share one forward) until the batch
//! holds `max_rows` rows or `max_wait` has passed, and runs them as one forward. Calls of
//! another bucket wait for the next round without delaying this one; a call that cannot share
//! (key `None`) runs alone. A call whose client went away (its reply receiver dropped) is
//! skipped before it takes a batch slot. Admission is bounded: beyond `max_pending` queued
//! calls, [`Batcher::submit`] refuses at once, so memory stays bounded whatever the request
//! rate. A panic in the forward fails that batch's calls, and the thread keeps serving.
//!
//! Batched forwards are not bit-identical to lone ones (libtorch picks other kernels and
//! summation orders for other batch sizes); `max_rows = 1` turns batching off where exact
//! reproducibility across load patterns matters more than throughput.

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

/// A call that may share a forward with others.
pub trait Batchable: Send + 'static {
    /// Calls with equal keys can run as one forward.
    type Key: PartialEq;
    /// This call's bucket, or `None` when it must run alone.
    fn key(&self) -> Option<Self::Key>;
    /// Rows this call adds to the forward.
    fn rows(&self) -> usize;
}

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most rows in one forward; a single call larger than this still runs (alone). 1 turns
    /// batching off.
    pub max_rows: usize,
    /// How long the first call of a batch waits for company.
    pub max_wait: Duration,
    /// Most calls queued (not yet in a forward) before new ones are refused.
    pub max_pending: usize,
}

/// What one call gets back.
#[derive(Debug)]
pub struct Batched<R> {
    pub value: R,
    /// Rows in the forward this call joined.
    pub batch_rows: usize,
    /// Calls in that forward.
    pub batch_calls: usize,
    /// Time spent queued before the forward started.
    pub queue_wait: Duration,
    /// Time of the forward.
    pub compute: Duration,
}

/// Why a call was not served; `E` is the forward's own error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError<E> {
    #[error("{stage}: {pending} calls already queued (limit {limit}); retry later")]
    Overloaded {
        stage: &'static str,
        pending: usize,
        limit: usize,
    },
    #[error("{0}: the model thread has stopped")]
    Stopped(&'static str),
    #[error("{stage}: the model code panicked: {message}")]
    Panicked {
        stage: &'static str,
        message: String,
    },
    /// The forward failed; every call of the batch gets the same error.
    #[error("{0}")]
    Failed(E),
}

struct Pending<J, R, E> {
    job: J,
    reply: oneshot::Sender<Result<Batched<R>, BatchError<E>>>,
    enqueued: Instant,
    span: tracing::Span,
}

/// Handle to the model thread's queue; cheap to clone.
pub struct Batcher<J, R, E> {
    stage: &'static str,
    tx: Sender<Pending<J, R, E>>,
    pending: Arc<AtomicUsize>,
    config: BatchConfig,
    metrics: Metrics,
}

impl<J, R, E> Clone for Batcher<J, R, E> {
    fn clone(&self) -> Self {
        Self {
            stage: self.stage,
            tx: self.tx.clone(),
            pending: self.pending.clone(),
            config: self.config,
            metrics: self.metrics.clone(),
        }
    }
}

impl<J, R, E> Batcher<J, R, E>
where
    J: Batchable,
    R: Send + 'static,
    E: Clone + Send + 'static,
{
    /// Starts the model thread: it runs `load` (weights and warm-up), reports the outcome on
    /// the returned receiver, then serves batches with `forward`, which must return one
    /// result per job, in order.
    pub fn spawn<M, L>(
        stage: &'static str,
        config: BatchConfig,
        metrics: Metrics,
        load: impl FnOnce() -> Result<M, L> + Send + 'static,
        forward: impl Fn(&M, Vec<J>) -> Result<Vec<R>, E> + Send + 'static,
    ) -> (Self, oneshot::Receiver<Result<(), L>>)
    where
        M: 'static,
        L: Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Pending<J, R, E>>();
        let (loaded_tx, loaded_rx) = oneshot::channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let thread = Thread {
            stage,
            rx,
            pending: pending.clone(),
            config,
            metrics: metrics.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name(format!("{stage}-model"))
            .spawn(move || match load() {
                Ok(model) => {
                    let _ = loaded_tx.send(Ok(()));
                    thread.serve(|jobs| forward(&model, jobs));
                }
                Err(e) => {
                    let _ = loaded_tx.send(Err(e));
                }
            });
        if let Err(e) = spawned {
            tracing::error!(stage, "cannot start the model thread: {e}");
        }
        let batcher = Self {
            stage,
            tx,
            pending,
            config,
            metrics,
        };
        (batcher, loaded_rx)
    }

    /// Calls queued and not yet in a forward.
    pub fn queue_depth(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Queues one call and waits for its result. Dropping the future (client cancelled)
    /// releases the call's place: the model thread skips it.
    pub async fn submit(&self, job: J) -> Result<Batched<R>, BatchError<E>> {
        let limit = self.config.max_pending;
        let admitted = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            });
        if let Err(pending) = admitted {
            return Err(BatchError::Overloaded {
                stage: self.stage,
                pending,
                limit,
            });
        }
        let (reply, answer) = oneshot::channel();
        let item = Pending {
            job,
            reply,
            enqueued: Instant::now(),
            span: tracing::Span::current(),
        };
        self.metrics.enqueued();
        if self.tx.send(item).is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.metrics.dequeued();
            return Err(BatchError::Stopped(self.stage));
        }
        answer.await.map_err(|_| BatchError::Stopped(self.stage))?
    }
}

/// The model thread's side of the queue.
struct Thread<J, R, E> {
    stage: &'static str,
    rx: Receiver<Pending<J, R, E>>,
    pending: Arc<AtomicUsize>,
    config: BatchConfig,
    metrics: Metrics,
}

impl<J: Batchable, R, E: Clone> Thread<J, R, E> {
    fn serve(&self, forward: impl Fn(Vec<J>) -> Result<Vec<R>, E>) {
        let mut held: VecDeque<Pending<J, R, E>> = VecDeque::new();
        loop {
            let first = match held.pop_front() {
                Some(p) => p,
                None => match self.rx.recv() {
                    Ok(p) => p,
                    Err(_) => return, // every sender dropped: the service is gone
                },
            };
            let mut batch = Vec::new();
            let mut rows = 0;
            let key = first.job.key();
            self.admit(first, &mut batch, &mut rows);
            if let Some(key) = key {
                let fits = |p: &Pending<J, R, E>, rows: usize| {
                    rows + p.job.rows() <= self.config.max_rows
                        && p.job.key().is_some_and(|k| k == key)
                };
                // Compatible calls held back from earlier rounds join first, in arrival order.
                let mut kept = VecDeque::with_capacity(held.len());
                while let Some(p) = held.pop_front() {
                    if fits(&p, rows) {
                        self.admit(p, &mut batch, &mut rows);
                    } else {
                        kept.push_back(p);
                    }
                }
                held = kept;
                let deadline = Instant::now() + self.config.max_wait;
                while rows < self.config.max_rows {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    let next = if wait.is_zero() {
                        self.rx.try_recv().map_err(|_| RecvTimeoutError::Timeout)
                    } else {
                        self.rx.recv_timeout(wait)
                    };
                    match next {
                        Ok(p) if fits(&p, rows) => self.admit(p, &mut batch, &mut rows),
                        Ok(p) => held.push_back(p),
                        Err(_) => break,
                    }
                }
            }
            if !batch.is_empty() {
                self.run(&forward, batch, rows);
            }
        }
    }

    /// Takes a call off the queue count and into the batch, unless its client went away.
    fn admit(&self, p: Pending<J, R, E>, batch: &mut Vec<Pending<J, R, E>>, rows: &mut usize) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
        self.metrics.dequeued();
        if p.reply.is_closed() {
            return; // the client went away: free its slot without computing it
        }
        *rows += p.job.rows();
        batch.push(p);
    }

    /// Runs one batch and answers every call in it.
    fn run(
        &self,
        forward: &impl Fn(Vec<J>) -> Result<Vec<R>, E>,
        batch: Vec<Pending<J, R, E>>,
        rows: usize,
    ) {
        let started = Instant::now();
        self.metrics.record_batch_size(rows);
        let calls = batch.len();
        let span = tracing::info_span!("model_batch", stage = self.stage, rows, calls);
        for p in &batch {
            self.metrics
                .record_queue_wait(started.saturating_duration_since(p.enqueued));
            span.follows_from(&p.span);
        }
        let _entered = span.enter();
        let (jobs, replies): (Vec<J>, Vec<_>) = batch
            .into_iter()
            .map(|p| (p.job, (p.reply, p.enqueued)))
            .unzip();
        let outcome = match std::panic::catch_unwind(AssertUnwindSafe(|| forward(jobs))) {
            Ok(Ok(values)) if values.len() == calls => Ok(values),
            Ok(Ok(values)) => Err(BatchError::Panicked {
                stage: self.stage,
                message: format!(
                    "the forward returned {} results for {calls} calls",
                    values.len()
                ),
            }),
            Ok(Err(e)) => Err(BatchError::Failed(e)),
            Err(panic) => Err(BatchError::Panicked {
                stage: self.stage,
                message: panic_message(&*panic),
            }),
        };
        let compute = started.elapsed();
        self.metrics.record_compute(compute);
        match outcome {
            Ok(values) => {
                for ((reply, enqueued), value) in replies.into_iter().zip(values) {
                    let _ = reply.send(Ok(Batched {
                        value,
                        batch_rows: rows,
                        batch_calls: calls,
                        queue_wait: started.saturating_duration_since(enqueued),
                        compute,
                    }));
                }
            }
            Err(e) => {
                tracing::warn!(stage = self.stage, "batch of {calls} calls failed");
                for (reply, _) in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The text of a caught panic's payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A call of `rows` rows in bucket `key`; the "model" doubles every value, and records
    /// the batches it ran.
    #[derive(Debug)]
    struct Job {
        key: Option<u32>,
        values: Vec<i64>,
    }

    impl Batchable for Job {
        type Key = u32;
        fn key(&self) -> Option<u32> {
            self.key
        }
        fn rows(&self) -> usize {
            self.values.len()
        }
    }

    type Log = Arc<std::sync::Mutex<Vec<usize>>>;

    fn start(config: BatchConfig) -> (Batcher<Job, Vec<i64>, String>, Log) {
        let log = Log::default();
        let seen = log.clone();
        let (batcher, loaded) = Batcher::spawn(
            "test",
            config,
            Metrics::new("test"),
            || Ok::<_, String>(2i64),
            move |factor: &i64, jobs: Vec<Job>| {
                seen.lock().unwrap().push(jobs.len());
                if jobs.iter().any(|j| j.values.contains(&-1)) {
                    return Err("negative one".to_string());
                }
                if jobs.iter().any(|j| j.values.contains(&-2)) {
                    panic!("boom");
                }
                Ok(jobs
                    .into_iter()
                    .map(|j| j.values.iter().map(|v| v * factor).collect())
                    .collect())
            },
        );
        drop(loaded);
        (batcher, log)
    }

    fn config(max_rows: usize, wait_ms: u64) -> BatchConfig {
        BatchConfig {
            max_rows,
            max_wait: Duration::from_millis(wait_ms),
            max_pending: 64,
        }
    }

    async fn submit_all(
        batcher: &Batcher<Job, Vec<i64>, String>,
        jobs: Vec<Job>,
    ) -> Vec<Result<Batched<Vec<i64>>, BatchError<String>>> {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|j| {
                let b = batcher.clone();
                tokio::spawn(async move { b.submit(j).await })
            })
            .collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn concurrent_calls_of_one_bucket_share_a_forward_and_get_their_own_rows() {
        let (batcher, log) = start(config(16, 200));
        let jobs = (0..4)
            .map(|i| Job {
                key: Some(7),
                values: vec![i, 10 * i],
            })
            .collect();
        let out = submit_all(&batcher, jobs).await;
        for (i, r) in out.into_iter().enumerate() {
            let r = r.unwrap();
            assert_eq!(r.value, vec![2 * i as i64, 20 * i as i64]);
            assert_eq!((r.batch_calls, r.batch_rows), (4, 8));
        }
        assert_eq!(*log.lock().unwrap(), vec![4]);
    }

    #[tokio::test]
    async fn buckets_max_rows_and_unshareable_calls_split_batches() {
        let (batcher, log) = start(config(4, 200));
        let job = |key, rows| Job {
            key,
            values: vec![1; rows],
        };
        let jobs = vec![
            job(Some(1), 3),
            job(Some(2), 1),
            job(Some(1), 2),
            job(None, 1),
            job(Some(1), 9),
        ];
        let out = submit_all(&batcher, jobs).await;
        assert!(out.iter().all(|r| r.is_ok()));
        let rows: Vec<usize> = out.iter().map(|r| r.as_ref().unwrap().batch_rows).collect();
        assert_eq!(rows[4], 9, "a call above max_rows runs alone");
        assert_eq!(rows[3], 1);
        // 3 + 2 rows exceed max_rows, bucket 2 may not join bucket 1 (3 + 1 would fit), the
        // unshareable and the oversized call run alone: five forwards of one call each.
        assert_eq!(*log.lock().unwrap(), vec![1; 5]);
    }

    #[tokio::test]
    async fn errors_and_panics_fail_their_batch_and_the_thread_goes_on() {
        let (batcher, _) = start(config(1, 0));
        let failed = batcher
            .submit(Job {
                key: Some(1),
                values: vec![-1],
            })
            .await
            .unwrap_err();
        assert!(matches!(failed, BatchError::Failed(ref m) if m == "negative one"));
        let panicked = batcher
            .submit(Job {
                key: Some(1),
                values: vec![-2],
            })
            .await
            .unwrap_err();
        assert!(
            matches!(panicked, BatchError::Panicked { ref message, .. } if message == "boom"),
            "{panicked:?}"
        );
        let ok = batcher
            .submit(Job {
                key: Some(1),
                values: vec![5],
            })
            .await
            .unwrap();
        assert_eq!(ok.value, vec![10]);
    }

    #[tokio::test]
    async fn beyond_max_pending_calls_are_refused_at_once() {
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let gate = std::sync::Mutex::new(gate_rx);
        let (batcher, loaded) = Batcher::spawn(
            "test",
            BatchConfig {
                max_rows: 1,
                max_wait: Duration::ZERO,
                max_pending: 1,
            },
            Metrics::new("test"),
            move || Ok::<_, String>(gate),
            |gate: &std::sync::Mutex<std::sync::mpsc::Receiver<()>>, jobs: Vec<Job>| {
                let _ = gate.lock().unwrap().recv();
                Ok::<_, String>(jobs.into_iter().map(|j| j.values).collect())
            },
        );
        loaded.await.unwrap().unwrap();
        let job = || Job {
            key: Some(1),
            values: vec![1],
        };
        // The first call blocks the thread, the second fills the queue, the third is refused.
        let b = batcher.clone();
        let first = tokio::spawn(async move { b.submit(job()).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let b = batcher.clone();
        let second = tokio::spawn(async move { b.submit(job()).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = batcher.submit(job()).await.unwrap_err();
        assert!(
            matches!(
                refused,
                BatchError::Overloaded {
                    pending: 1,
                    limit: 1,
                    ..
                }
            ),
            "{refused:?}"
        );
        gate_tx.send(()).unwrap();
        gate_tx.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap().value, vec![1]);
        assert_eq!(second.await.unwrap().unwrap().value, vec![1]);
    }
}
