//! Traces, metrics and trace-aware logs, set up the same way by every binary.
//!
//! - **Traces**: `tracing` spans become OpenTelemetry spans (`tracing-opentelemetry`), exported
//!   over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `--otlp-endpoint`) is set. W3C
//!   `traceparent`/`tracestate` is extracted by every server ([`builder`](crate::builder)
//!   installs [`grpc::server_span`]) and injected by clients with [`inject`] / [`Inject`], so
//!   one generation is one trace across the four processes. Without an endpoint nothing is
//!   exported, but contexts still propagate and log lines still carry the trace id.
//! - **Metrics**: the OpenTelemetry metrics API ([`metrics`]), exported over OTLP when the
//!   endpoint is set and always readable as Prometheus text on `--metrics-listen ADDR`
//!   (`GET /metrics`). Every gRPC call served is timed as `rpc.server.call.duration` with no
//!   service code.
//! - **Logs**: text or JSON on stderr; inside a span each line carries `trace_id`.
//!
//! An unreachable collector is one warning (and one line when it is back), never a failed
//! request: export runs on background threads, the connection is made lazily, and what
//! cannot be delivered is dropped.

mod export;
mod format;
pub mod grpc;
pub mod metrics;
mod prometheus_http;

pub use grpc::{Inject, inject, inject_into, set_parent_from};

use crate::LogArgs;
use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    metrics::{PeriodicReader, SdkMeterProvider},
    trace::{Sampler, SdkTracerProvider},
};
use std::net::SocketAddr;
use tracing_subscriber::{
    Layer, filter::Targets, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

/// Telemetry flags shared by every binary (flattened into [`LogArgs`]). The environment
/// variables are the OpenTelemetry standard ones, so the usual collector set-ups work as is.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TelemetryArgs {
    /// OTLP/gRPC collector endpoint, e.g. `http://otel-collector:4317`. Unset: nothing is
    /// exported (contexts still propagate, Prometheus metrics are still served).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of this process's spans and metrics (default: the binary's name).
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub service_name: Option<String>,
    /// Trace sampler: `always_on`, `always_off`, `traceidratio`, `parentbased_always_on`
    /// (default), `parentbased_always_off`, `parentbased_traceidratio`.
    #[arg(long, env = "OTEL_TRACES_SAMPLER")]
    pub traces_sampler: Option<String>,
    /// The sampler's argument: the ratio in 0..=1 for the `*traceidratio` samplers.
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG")]
    pub traces_sampler_arg: Option<String>,
    /// Extra resource attributes, `key=value,key2=value2` (e.g. `deployment.environment=prod`).
    #[arg(long, env = "OTEL_RESOURCE_ATTRIBUTES")]
    pub resource_attributes: Option<String>,
    /// Serve Prometheus text metrics on `http://ADDR/metrics` (e.g. `0.0.0.0:9464`; port 0
    /// picks a free one). The bound address is printed as `metrics on ADDR`. Unset: off.
    #[arg(long, env = "SD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

impl TelemetryArgs {
    /// The sampler these flags name; an unknown name or a bad ratio is an error at start-up.
    pub fn sampler(&self) -> anyhow::Result<Sampler> {
        let ratio = || -> anyhow::Result<f64> {
            match self.traces_sampler_arg.as_deref() {
                None | Some("") => Ok(1.0),
                Some(s) => {
                    let r: f64 = s.trim().parse().map_err(|_| {
                        anyhow::anyhow!("OTEL_TRACES_SAMPLER_ARG: {s:?} is not a number")
                    })?;
                    anyhow::ensure!(
                        (0.0..=1.0).contains(&r),
                        "OTEL_TRACES_SAMPLER_ARG: {r} is outside 0..=1"
                    );
                    Ok(r)
                }
            }
        };
        let name = self
            .traces_sampler
            .as_deref()
            .unwrap_or("parentbased_always_on");
        Ok(match name.trim() {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
            "" | "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            "parentbased_traceidratio" => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio()?)))
            }
            other => anyhow::bail!(
                "OTEL_TRACES_SAMPLER: {other:?} is not one of always_on, always_off, \
                 traceidratio, parentbased_always_on, parentbased_always_off, \
                 parentbased_traceidratio"
            ),
        })
    }

    /// `OTEL_RESOURCE_ATTRIBUTES` parsed (`k=v` pairs, comma-separated, values trimmed).
    pub fn resource_attributes(&self) -> anyhow::Result<Vec<KeyValue>> {
        let Some(s) = self.resource_attributes.as_deref() else {
            return Ok(Vec::new());
        };
        s.split(',')
            .filter(|kv| !kv.trim().is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').ok_or_else(|| {
                    anyhow::anyhow!("OTEL_RESOURCE_ATTRIBUTES: {kv:?} is not key=value")
                })?;
                Ok(KeyValue::new(k.trim().to_string(), v.trim().to_string()))
            })
            .collect()
    }
}

/// What [`init`] set up; flushes spans and metrics when shut down or dropped. Keep it alive
/// for the life of the process and call [`Telemetry::shutdown`] after `run` returns.
#[must_use = "dropping the guard shuts telemetry down"]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
    metrics_addr: Option<SocketAddr>,
    metrics_server: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("exporting", &self.tracer.is_some())
            .field("metrics_addr", &self.metrics_addr)
            .finish()
    }
}

impl Telemetry {
    /// Where Prometheus metrics are served, if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Flushes pending spans and metrics and stops the exporters (off the async threads:
    /// flushing blocks, for at most the exporter's timeout when the collector is down).
    pub async fn shutdown(mut self) {
        let tracer = self.tracer.take();
        let meter = self.meter.take();
        if let Some(server) = self.metrics_server.take() {
            server.abort();
        }
        let _ = tokio::task::spawn_blocking(move || flush(tracer, meter)).await;
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(server) = self.metrics_server.take() {
            server.abort();
        }
        flush(self.tracer.take(), self.meter.take());
    }
}

fn flush(tracer: Option<SdkTracerProvider>, meter: Option<SdkMeterProvider>) {
    if let Some(tracer) = tracer
        && let Err(e) = tracer.shutdown()
    {
        eprintln!("warning: telemetry: flushing spans failed: {e}");
    }
    if let Some(meter) = meter
        && let Err(e) = meter.shutdown()
    {
        eprintln!("warning: telemetry: flushing metrics failed: {e}");
    }
}

/// Targets whose spans never become OpenTelemetry spans: the transport under the exporter
/// itself (exporting its own spans would feed back) and connection-level noise.
fn otel_targets() -> Targets {
    Targets::new()
        .with_default(tracing::Level::INFO)
        .with_target("opentelemetry", tracing::level_filters::LevelFilter::OFF)
        .with_target(
            "opentelemetry_sdk",
            tracing::level_filters::LevelFilter::OFF,
        )
        .with_target(
            "opentelemetry_otlp",
            tracing::level_filters::LevelFilter::OFF,
        )
        .with_target("h2", tracing::level_filters::LevelFilter::OFF)
        .with_target("hyper", tracing::level_filters::LevelFilter::OFF)
        .with_target("hyper_util", tracing::level_filters::LevelFilter::OFF)
        .with_target("tower", tracing::level_filters::LevelFilter::OFF)
        .with_target("tonic", tracing::level_filters::LevelFilter::OFF)
}

/// The log filter: `RUST_LOG`, or `info` with the OpenTelemetry crates at `warn` (an
/// unreachable collector shows up as their warnings).
fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,opentelemetry=warn,opentelemetry_sdk=warn,opentelemetry_otlp=warn",
        )
    })
}

/// Sets up logging, tracing and metrics for a process whose default `service.name` is
/// `default_service_name` (`sd-denoiser`, ...). Must run inside the Tokio runtime (the OTLP
/// channel and the metrics endpoint are spawned on it). Call it once per process; a second
/// call keeps the first subscriber and returns an error.
pub async fn init(default_service_name: &str, args: &LogArgs) -> anyhow::Result<Telemetry> {
    let t = &args.telemetry;
    let service_name = t
        .service_name
        .clone()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| default_service_name.to_string());
    let sampler = t.sampler()?;
    let resource = Resource::builder()
        .with_attributes(t.resource_attributes()?)
        .with_service_name(service_name.clone())
        .build();
    let endpoint = t.otlp_endpoint.clone().filter(|e| !e.trim().is_empty());

    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );

    // Traces: always a provider (so contexts propagate and logs carry trace ids), an exporter
    // only when there is somewhere to send to.
    let mut tracer_builder = SdkTracerProvider::builder()
        .with_sampler(sampler)
        .with_resource(resource.clone());
    if let Some(endpoint) = &endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| anyhow::anyhow!("OTLP span exporter for {endpoint}: {e}"))?;
        tracer_builder =
            tracer_builder.with_batch_exporter(export::QuietSpans::new(exporter, endpoint));
    }
    let tracer_provider = tracer_builder.build();
    let tracer = tracer_provider.tracer(service_name.clone());
    opentelemetry::global::set_tracer_provider(tracer_provider.clone());

    // Metrics: Prometheus always (scraped on demand), OTLP periodically when configured.
    let registry = prometheus::Registry::new();
    let prometheus_reader = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .without_scope_info()
        .build()
        .map_err(|e| anyhow::anyhow!("prometheus exporter: {e}"))?;
    let mut meter_builder = SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(prometheus_reader);
    if let Some(endpoint) = &endpoint {
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| anyhow::anyhow!("OTLP metric exporter for {endpoint}: {e}"))?;
        meter_builder = meter_builder.with_reader(
            PeriodicReader::builder(export::QuietMetrics::new(exporter, endpoint)).build(),
        );
    }
    let meter_provider = meter_builder.build();
    opentelemetry::global::set_meter_provider(meter_provider.clone());

    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(otel_targets());
    let rpc_layer =
        grpc::RpcMetricsLayer::new().with_filter(tracing_subscriber::filter::filter_fn(|m| {
            m.target() == grpc::TARGET
        }));
    let fmt_layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt_layer = if args.log_format == "json" {
        fmt_layer
            .event_format(format::WithTraceId::json(
                tracing_subscriber::fmt::format().json(),
            ))
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .with_filter(log_filter())
            .boxed()
    } else {
        fmt_layer
            .event_format(format::WithTraceId::text(tracing_subscriber::fmt::format()))
            .with_filter(log_filter())
            .boxed()
    };
    tracing_subscriber::registry()
        .with(fmt_layer)
        .with(otel_layer)
        .with(rpc_layer)
        .try_init()
        .map_err(|e| anyhow::anyhow!("telemetry already initialised: {e}"))?;
    // `try_init` routes the `log` crate into tracing at TRACE (the per-layer filters hide the
    // real maximum), and dependencies such as `tokenizers` then build a record per character
    // only for it to be filtered out: that made tokenizing 5x slower. Cap `log` at the level
    // the log filter can show.
    log::set_max_level(match log_filter().max_level_hint() {
        Some(tracing::level_filters::LevelFilter::OFF) => log::LevelFilter::Off,
        Some(tracing::level_filters::LevelFilter::ERROR) => log::LevelFilter::Error,
        Some(tracing::level_filters::LevelFilter::WARN) => log::LevelFilter::Warn,
        Some(tracing::level_filters::LevelFilter::INFO) => log::LevelFilter::Info,
        Some(tracing::level_filters::LevelFilter::DEBUG) => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    });

    let (metrics_addr, metrics_server) = match t.metrics_listen {
        Some(addr) => {
            let (bound, task) = prometheus_http::serve(addr, registry).await?;
            (Some(bound), Some(task))
        }
        None => (None, None),
    };
    if let Some(endpoint) = &endpoint {
        tracing::info!(%endpoint, service.name = %service_name, "exporting traces and metrics over OTLP");
    }
    Ok(Telemetry {
        tracer: Some(tracer_provider),
        meter: Some(meter_provider),
        metrics_addr,
        metrics_server,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn args(sampler: Option<&str>, arg: Option<&str>) -> TelemetryArgs {
        TelemetryArgs {
            traces_sampler: sampler.map(str::to_string),
            traces_sampler_arg: arg.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn samplers_by_their_standard_names() {
        assert!(matches!(
            args(None, None).sampler().unwrap(),
            Sampler::ParentBased(_)
        ));
        assert!(matches!(
            args(Some("always_off"), None).sampler().unwrap(),
            Sampler::AlwaysOff
        ));
        assert!(matches!(
            args(Some("traceidratio"), Some("0.25")).sampler().unwrap(),
            Sampler::TraceIdRatioBased(r) if r == 0.25
        ));
        let e = args(Some("traceidratio"), Some("2")).sampler().unwrap_err();
        assert!(e.to_string().contains("outside 0..=1"), "{e}");
        let e = args(Some("sometimes"), None).sampler().unwrap_err();
        assert!(e.to_string().starts_with("OTEL_TRACES_SAMPLER"), "{e}");
    }

    #[test]
    fn resource_attributes_are_key_value_pairs() {
        let t = TelemetryArgs {
            resource_attributes: Some("deployment.environment=prod, k8s.pod.name = p-1,".into()),
            ..Default::default()
        };
        let kv = t.resource_attributes().unwrap();
        assert_eq!(kv.len(), 2);
        assert_eq!(kv[1].key.as_str(), "k8s.pod.name");
        assert_eq!(kv[1].value.as_str(), "p-1");
        let bad = TelemetryArgs {
            resource_attributes: Some("novalue".into()),
            ..Default::default()
        };
        assert!(bad.resource_attributes().is_err());
    }

    #[test]
    fn flags_read_the_standard_environment_names() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            log: LogArgs,
        }
        let cli = Cli::try_parse_from([
            "x",
            "--otlp-endpoint",
            "http://c:4317",
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(
            cli.log.telemetry.otlp_endpoint.as_deref(),
            Some("http://c:4317")
        );
        assert_eq!(cli.log.telemetry.metrics_listen.unwrap().port(), 0);
        let help = <Cli as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        for env in [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_SERVICE_NAME",
            "OTEL_TRACES_SAMPLER",
            "OTEL_TRACES_SAMPLER_ARG",
            "OTEL_RESOURCE_ATTRIBUTES",
            "SD_METRICS_LISTEN",
        ] {
            assert!(help.contains(env), "{env} missing from --help");
        }
    }
}
