//! Exporters that say once, as a warning, that the collector cannot be reached (and once
//! when it is back), instead of the SDK's ERROR line per batch. Telemetry that cannot be
//! delivered is dropped; it never slows or fails the work it describes.

use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    metrics::{Temporality, data::ResourceMetrics, exporter::PushMetricExporter},
    trace::{SpanData, SpanExporter},
};
use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

/// Remembers whether the last export failed, to log only the changes.
#[derive(Debug)]
struct Reachability {
    what: &'static str,
    endpoint: String,
    failing: AtomicBool,
}

impl Reachability {
    fn new(what: &'static str, endpoint: &str) -> Self {
        Self {
            what,
            endpoint: endpoint.to_string(),
            failing: AtomicBool::new(false),
        }
    }

    fn report(&self, outcome: &OTelSdkResult) {
        match outcome {
            Err(error) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        target: "sd_server::telemetry",
                        endpoint = %self.endpoint,
                        %error,
                        "cannot export {} to the OTLP collector: dropping them until it is \
                         reachable (requests are not affected)",
                        self.what
                    );
                }
            }
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        target: "sd_server::telemetry",
                        endpoint = %self.endpoint,
                        "the OTLP collector is reachable again: exporting {}",
                        self.what
                    );
                }
            }
        }
    }
}

/// A span exporter whose failures are reported by [`Reachability`], not by the SDK.
#[derive(Debug)]
pub(crate) struct QuietSpans<E> {
    inner: E,
    reachability: Reachability,
}

impl<E> QuietSpans<E> {
    pub(crate) fn new(inner: E, endpoint: &str) -> Self {
        Self {
            inner,
            reachability: Reachability::new("spans", endpoint),
        }
    }
}

impl<E: SpanExporter> SpanExporter for QuietSpans<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let outcome = self.inner.export(batch).await;
        self.reachability.report(&outcome);
        Ok(())
    }

    fn shutdown_with_timeout(&mut self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&mut self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// A metric exporter whose failures are reported by [`Reachability`], not by the SDK.
#[derive(Debug)]
pub(crate) struct QuietMetrics<E> {
    inner: E,
    reachability: Reachability,
}

impl<E> QuietMetrics<E> {
    pub(crate) fn new(inner: E, endpoint: &str) -> Self {
        Self {
            inner,
            reachability: Reachability::new("metrics", endpoint),
        }
    }
}

impl<E: PushMetricExporter> PushMetricExporter for QuietMetrics<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let outcome = self.inner.export(metrics).await;
        self.reachability.report(&outcome);
        Ok(())
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}
