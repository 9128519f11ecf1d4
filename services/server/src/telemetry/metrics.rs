//! The system's metrics, typed: services call these instead of naming instruments, so names,
//! units and attributes stay the same everywhere. Names follow OpenTelemetry conventions
//! (dots, unit in `with_unit`); Prometheus sees them with dots as underscores and the unit as
//! a suffix (`sd.stage.queue_wait.duration` in `s` = `sd_stage_queue_wait_duration_seconds`).
//!
//! Instruments come from the global meter provider, so create these after
//! [`super::init`] (before it, or in a process that never calls it, they record nothing).

use opentelemetry::{
    KeyValue,
    metrics::{Counter, Histogram, UpDownCounter},
};
use std::{sync::Arc, time::Duration};

/// Histogram buckets for durations in seconds: 0.5 ms (a loopback round trip) to 2 min (a
/// long generation on a CPU).
pub const SECONDS_BUCKETS: [f64; 18] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0, 60.0, 120.0,
];

/// Buckets for batch sizes (samples per U-Net forward, CFG halves counted once).
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0];

fn meter() -> opentelemetry::metrics::Meter {
    opentelemetry::global::meter("sd")
}

fn seconds(name: &'static str, description: &'static str) -> Histogram<f64> {
    meter()
        .f64_histogram(name)
        .with_unit("s")
        .with_description(description)
        .with_boundaries(SECONDS_BUCKETS.to_vec())
        .build()
}

/// Metrics of one model stage (`text-encoder`, `denoiser`, `vae`), all with `stage=NAME`.
/// Cheap to clone; clone it into the worker thread.
#[derive(Clone)]
pub struct Stage {
    attrs: [KeyValue; 1],
    queue_wait: Histogram<f64>,
    compute: Histogram<f64>,
    batch_size: Histogram<u64>,
    queue_depth: UpDownCounter<i64>,
    inflight: UpDownCounter<i64>,
    errors: Counter<u64>,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("stage", &self.attrs[0].value)
            .finish()
    }
}

impl Stage {
    /// The instruments for `stage`.
    pub fn new(stage: &'static str) -> Self {
        let m = meter();
        Self {
            attrs: [KeyValue::new("stage", stage)],
            queue_wait: seconds(
                "sd.stage.queue_wait.duration",
                "Time a request waited for the model worker",
            ),
            compute: seconds(
                "sd.stage.compute.duration",
                "Time of one model forward (one batch) on the worker",
            ),
            batch_size: m
                .u64_histogram("sd.stage.batch.size")
                .with_unit("{sample}")
                .with_description("Samples per model forward")
                .with_boundaries(BATCH_BUCKETS.to_vec())
                .build(),
            queue_depth: m
                .i64_up_down_counter("sd.stage.queue.depth")
                .with_unit("{request}")
                .with_description("Requests waiting for the model worker")
                .build(),
            inflight: m
                .i64_up_down_counter("sd.stage.inflight")
                .with_unit("{request}")
                .with_description("Requests accepted and not yet answered")
                .build(),
            errors: m
                .u64_counter("sd.stage.errors")
                .with_unit("{request}")
                .with_description("Requests that failed, by gRPC status code")
                .build(),
        }
    }

    /// Time from accepting a request to the worker picking it up.
    pub fn record_queue_wait(&self, d: Duration) {
        self.queue_wait.record(d.as_secs_f64(), &self.attrs);
    }

    /// Time of one forward on the worker.
    pub fn record_compute(&self, d: Duration) {
        self.compute.record(d.as_secs_f64(), &self.attrs);
    }

    /// Samples in one forward.
    pub fn record_batch_size(&self, n: usize) {
        self.batch_size.record(n as u64, &self.attrs);
    }

    /// One more request waiting (pair with [`Stage::dequeued`]), or use [`Stage::queued`].
    pub fn enqueued(&self) {
        self.queue_depth.add(1, &self.attrs);
    }

    /// One request left the queue.
    pub fn dequeued(&self) {
        self.queue_depth.add(-1, &self.attrs);
    }

    /// Counts a request in `sd.stage.queue.depth` until the guard is dropped.
    pub fn queued(&self) -> Gauged {
        Gauged::new(self.queue_depth.clone(), self.attrs.clone())
    }

    /// Counts a request in `sd.stage.inflight` until the guard is dropped.
    pub fn inflight(&self) -> Gauged {
        Gauged::new(self.inflight.clone(), self.attrs.clone())
    }

    /// A request failed with `code`.
    pub fn error(&self, code: tonic::Code) {
        let [stage] = self.attrs.clone();
        self.errors.add(
            1,
            &[stage, KeyValue::new("rpc.grpc.status_code", code as i64)],
        );
    }
}

/// Holds +1 on an up-down counter; gives it back when dropped.
#[must_use = "the count drops back when this guard is dropped"]
pub struct Gauged {
    counter: UpDownCounter<i64>,
    attrs: [KeyValue; 1],
}

impl std::fmt::Debug for Gauged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gauged").finish_non_exhaustive()
    }
}

impl Gauged {
    fn new(counter: UpDownCounter<i64>, attrs: [KeyValue; 1]) -> Self {
        counter.add(1, &attrs);
        Self { counter, attrs }
    }
}

impl Drop for Gauged {
    fn drop(&mut self) {
        self.counter.add(-1, &self.attrs);
    }
}

/// One reading of the denoiser's conditioning cache: counters since start, and its size now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContextCacheReading {
    pub hits: u64,
    pub misses: u64,
    pub inserts: u64,
    /// Entries dropped to stay within the byte budget.
    pub evictions: u64,
    /// Entries dropped after going unused for the time-to-live.
    pub expirations: u64,
    /// Contexts not cached because they alone exceed the budget.
    pub oversize: u64,
    pub entries: u64,
    pub bytes: u64,
}

/// The samples one counter reports from a reading: each value with its attribute, if any.
type Samples = fn(&ContextCacheReading) -> Vec<(u64, Option<KeyValue>)>;

/// Reports the denoiser's conditioning cache, read through `read` at every collection:
/// `sd.context_cache.lookups` (`result` = `hit` or `miss`: a miss costs the caller a second
/// round trip with the context), `sd.context_cache.inserts`, `sd.context_cache.removals`
/// (`reason` = `evicted` or `expired`), `sd.context_cache.refused` (contexts over the whole
/// budget), and the gauges `sd.context_cache.entries` and `sd.context_cache.size` (bytes).
/// Once `read` returns `None` (the cache is gone) nothing more is reported.
pub fn observe_context_cache(
    read: impl Fn() -> Option<ContextCacheReading> + Send + Sync + 'static,
) {
    let m = meter();
    let read = Arc::new(read);
    let counter =
        |name: &'static str, unit: &'static str, description: &'static str, values: Samples| {
            let read = read.clone();
            m.u64_observable_counter(name)
                .with_unit(unit)
                .with_description(description)
                .with_callback(move |observer| {
                    for (value, attr) in read().as_ref().map(values).unwrap_or_default() {
                        observer.observe(value, attr.as_slice());
                    }
                })
                .build();
        };
    counter(
        "sd.context_cache.lookups",
        "{lookup}",
        "Steps that named a cached context, by result (hit, miss)",
        |r| {
            vec![
                (r.hits, Some(KeyValue::new("result", "hit"))),
                (r.misses, Some(KeyValue::new("result", "miss"))),
            ]
        },
    );
    counter(
        "sd.context_cache.inserts",
        "{context}",
        "Contexts cached",
        |r| vec![(r.inserts, None)],
    );
    counter(
        "sd.context_cache.removals",
        "{context}",
        "Contexts dropped, by reason (evicted for space, expired unused)",
        |r| {
            vec![
                (r.evictions, Some(KeyValue::new("reason", "evicted"))),
                (r.expirations, Some(KeyValue::new("reason", "expired"))),
            ]
        },
    );
    counter(
        "sd.context_cache.refused",
        "{context}",
        "Contexts not cached because one alone exceeds the byte budget",
        |r| vec![(r.oversize, None)],
    );
    let gauge = |name: &'static str,
                 unit: &'static str,
                 description: &'static str,
                 value: fn(&ContextCacheReading) -> u64| {
        let read = read.clone();
        m.u64_observable_gauge(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |observer| {
                if let Some(reading) = read() {
                    observer.observe(value(&reading), &[]);
                }
            })
            .build();
    };
    gauge(
        "sd.context_cache.entries",
        "{context}",
        "Contexts held",
        |r| r.entries,
    );
    gauge(
        "sd.context_cache.size",
        "By",
        "Device bytes the held contexts occupy",
        |r| r.bytes,
    );
}

/// Metrics of the orchestrator: generations and the calls it makes to each stage.
#[derive(Clone)]
pub struct Orchestrator {
    started: Counter<u64>,
    active: UpDownCounter<i64>,
    duration: Histogram<f64>,
    stage_call: Histogram<f64>,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator").finish_non_exhaustive()
    }
}

impl Default for Orchestrator {
    fn default() -> Self {
        Self::new()
    }
}

impl Orchestrator {
    /// The instruments.
    pub fn new() -> Self {
        let m = meter();
        Self {
            started: m
                .u64_counter("sd.generation.started")
                .with_unit("{generation}")
                .with_description("Generations accepted")
                .build(),
            active: m
                .i64_up_down_counter("sd.generation.active")
                .with_unit("{generation}")
                .with_description("Generations running")
                .build(),
            duration: seconds(
                "sd.generation.duration",
                "Time of a whole generation, by gRPC status code",
            ),
            stage_call: seconds(
                "sd.stage.client.duration",
                "Time of one call from the orchestrator to a stage, by stage, method and code",
            ),
        }
    }

    /// A generation started; finish it with [`Generation::finished`]. Dropped unfinished
    /// (the client went away), it is recorded as `CANCELLED`.
    pub fn generation_started(&self) -> Generation {
        self.started.add(1, &[]);
        self.active.add(1, &[]);
        Generation {
            metrics: self.clone(),
            start: std::time::Instant::now(),
            done: false,
        }
    }

    /// One stage call: `stage` (`text-encoder`, `denoiser`, `vae`), `method` (`Encode`,
    /// `Denoise`, `Decode`, ...), how long it took and how it ended.
    pub fn record_stage_call(
        &self,
        stage: &'static str,
        method: &'static str,
        elapsed: Duration,
        code: tonic::Code,
    ) {
        self.stage_call.record(
            elapsed.as_secs_f64(),
            &[
                KeyValue::new("stage", stage),
                KeyValue::new("rpc.method", method),
                KeyValue::new("rpc.grpc.status_code", code as i64),
            ],
        );
    }
}

/// One running generation (see [`Orchestrator::generation_started`]).
#[must_use = "finish the generation with `finished(code)`"]
pub struct Generation {
    metrics: Orchestrator,
    start: std::time::Instant,
    done: bool,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("start", &self.start)
            .finish()
    }
}

impl Generation {
    /// The generation ended with `code` (`Ok` when images went back).
    pub fn finished(mut self, code: tonic::Code) {
        self.record(code);
    }

    fn record(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.metrics.active.add(-1, &[]);
        self.metrics.duration.record(
            self.start.elapsed().as_secs_f64(),
            &[KeyValue::new("rpc.grpc.status_code", code as i64)],
        );
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.record(tonic::Code::Cancelled);
    }
}
