//! The model's worker thread.
//!
//! A model is created on, and never leaves, one OS thread: tch tensors are `Send` but not
//! `Sync`, and a blocking libtorch forward must not stall the async runtime. Async handlers
//! submit closures with [`Worker::run`] and await the result on a oneshot channel. The queue is
//! bounded: when it is full, work is refused at once ([`WorkerError::Overloaded`]) instead of
//! piling up in memory. A panic inside a job is caught, logged and reported to that caller;
//! the worker keeps serving.

use std::{
    panic::AssertUnwindSafe,
    sync::mpsc::{self, SyncSender, TrySendError},
};
use tokio::sync::oneshot;

type Job<M> = Box<dyn FnOnce(&M) + Send>;

/// Why a job did not run to completion.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkerError {
    #[error("{0}: queue full, try again later")]
    Overloaded(&'static str),
    #[error("{0}: model worker has stopped")]
    Stopped(&'static str),
    #[error("{0}: model code panicked: {1}")]
    Panicked(&'static str, String),
}

/// Handle to a model's worker thread; cheap to clone.
pub struct Worker<M> {
    name: &'static str,
    tx: SyncSender<Job<M>>,
}

impl<M> Clone for Worker<M> {
    fn clone(&self) -> Self {
        Self {
            name: self.name,
            tx: self.tx.clone(),
        }
    }
}

impl<M: 'static> Worker<M> {
    /// Starts the thread, which runs `load` and then serves jobs. The returned receiver yields
    /// the outcome of `load` (a failed load stops the thread).
    pub fn spawn<E: Send + 'static>(
        name: &'static str,
        queue: usize,
        load: impl FnOnce() -> Result<M, E> + Send + 'static,
    ) -> (Self, oneshot::Receiver<Result<(), E>>) {
        let (tx, rx) = mpsc::sync_channel::<Job<M>>(queue.max(1));
        let (loaded_tx, loaded_rx) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-model"))
            .spawn(move || {
                let model = match load() {
                    Ok(model) => {
                        let _ = loaded_tx.send(Ok(()));
                        model
                    }
                    Err(e) => {
                        let _ = loaded_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = rx.recv() {
                    // The job reports its own result; a panic drops its reply sender, which the
                    // caller sees as `Panicked`. Catching keeps the thread (and the model) alive.
                    if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| job(&model))) {
                        tracing::error!(worker = name, "job panicked: {}", panic_message(&*panic));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(worker = name, "cannot start worker thread: {e}");
        }
        (Self { name, tx }, loaded_rx)
    }

    /// Runs `f` on the model and returns its result. The caller's tracing span is entered on
    /// the worker, so model time is attributed to the request.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&M) -> R + Send + 'static,
    ) -> Result<R, WorkerError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let span = tracing::Span::current();
        let panic_note = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let note = panic_note.clone();
        let job: Job<M> = Box::new(move |model: &M| {
            let _entered = span.enter();
            match std::panic::catch_unwind(AssertUnwindSafe(|| f(model))) {
                Ok(r) => {
                    let _ = reply_tx.send(r);
                }
                Err(panic) => {
                    if let Ok(mut n) = note.lock() {
                        *n = Some(panic_message(&*panic));
                    }
                    std::panic::resume_unwind(panic);
                }
            }
        });
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(WorkerError::Overloaded(self.name)),
            Err(TrySendError::Disconnected(_)) => return Err(WorkerError::Stopped(self.name)),
        }
        reply_rx.await.map_err(|_| {
            let msg = panic_note.lock().ok().and_then(|mut n| n.take());
            match msg {
                Some(m) => WorkerError::Panicked(self.name, m),
                None => WorkerError::Stopped(self.name),
            }
        })
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_and_survives_panics() {
        let (worker, loaded) = Worker::spawn("test", 4, || Ok::<_, String>(41));
        loaded.await.unwrap().unwrap();
        assert_eq!(worker.run(|m| m + 1).await, Ok(42));
        let err = worker.run(|_| -> i32 { panic!("boom") }).await.unwrap_err();
        assert_eq!(err, WorkerError::Panicked("test", "boom".into()));
        assert_eq!(worker.run(|m| *m).await, Ok(41));
    }

    #[tokio::test]
    async fn failed_load_is_reported_and_stops_the_worker() {
        let (worker, loaded) = Worker::<i32>::spawn("test", 4, || Err("no weights".to_string()));
        assert_eq!(loaded.await.unwrap(), Err("no weights".into()));
        assert_eq!(worker.run(|m| *m).await, Err(WorkerError::Stopped("test")));
    }

    #[tokio::test]
    async fn full_queue_is_refused_at_once() {
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let gate = std::sync::Mutex::new(gate_rx);
        let (worker, loaded) = Worker::spawn("test", 1, move || Ok::<_, String>(gate));
        loaded.await.unwrap().unwrap();
        // The first job blocks the thread; the second fills the queue; the third is refused.
        let w = worker.clone();
        let first = tokio::spawn(async move { w.run(|g| g.lock().unwrap().recv().ok()).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let w = worker.clone();
        let second = tokio::spawn(async move { w.run(|_| 2).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(
            worker.run(|_| 3).await,
            Err(WorkerError::Overloaded("test"))
        );
        gate_tx.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Ok(Some(())));
        assert_eq!(second.await.unwrap(), Ok(2));
    }
}
