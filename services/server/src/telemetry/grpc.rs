//! W3C trace context across gRPC hops, and a server span (with RPC metrics) for every call.
//!
//! Server side: [`crate::builder`] installs [`server_span`] through tonic's `trace_fn`, so
//! every service built on it extracts `traceparent`/`tracestate` from the request headers and
//! runs its handler inside a `grpc.server` span (OpenTelemetry kind SERVER, `rpc.system`,
//! `rpc.service`, `rpc.method`); `#[tracing::instrument]` spans in handlers become its
//! children. [`RpcMetricsLayer`] (installed by [`super::init`]) times each such span into
//! `rpc.server.call.duration`.
//!
//! Client side: [`inject`] / [`Inject`] write the current span's context into the outgoing
//! metadata: `FooServiceClient::with_interceptor(channel, sd_server::telemetry::Inject)`.

use opentelemetry::{
    KeyValue,
    metrics::{Counter, Histogram},
    propagation::{Extractor, Injector},
};
use std::time::Instant;
use tracing::{Subscriber, field::Field, span};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{Layer, layer::Context, registry::LookupSpan};

/// The `tracing` target of the server spans.
pub const TARGET: &str = "sd_server::grpc";
/// The name of the server span opened for each call.
pub const SERVER_SPAN: &str = "grpc.server";

/// Reads W3C trace context out of HTTP/2 request headers.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes W3C trace context into gRPC request metadata.
struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Splits `/pkg.Service/Method` into (`pkg.Service`, `Method`).
fn service_and_method(path: &str) -> (&str, &str) {
    let path = path.trim_start_matches('/');
    path.split_once('/').unwrap_or((path, ""))
}

/// The span a server runs one call in (tonic `trace_fn`): the remote parent comes from the
/// request's `traceparent` when it carries a valid one, otherwise the call starts a trace.
/// Health checks get a DEBUG-level span (timed, never exported: probes are not traffic).
pub fn server_span(req: &http::Request<()>) -> tracing::Span {
    let path = req.uri().path();
    let (service, method) = service_and_method(path);
    let span = if service == "grpc.health.v1.Health" {
        tracing::debug_span!(
            target: TARGET,
            SERVER_SPAN,
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        )
    } else {
        tracing::info_span!(
            target: TARGET,
            SERVER_SPAN,
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        )
    };
    continue_trace(&span, &HeaderExtractor(req.headers()));
    span
}

/// Makes `span` a child of the trace context `carrier` holds, when it holds a valid one;
/// otherwise `span` keeps the parent it was created with.
fn continue_trace(span: &tracing::Span, carrier: &dyn Extractor) {
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(carrier));
    if opentelemetry::trace::TraceContextExt::span(&parent)
        .span_context()
        .is_valid()
    {
        let _ = span.set_parent(parent);
    }
}

/// Writes the current span's trace context into `carrier` (a no-op outside any span).
fn inject_current(carrier: &mut dyn Injector) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, carrier));
}

/// Writes the current span's trace context into `metadata` (a no-op outside any span).
pub fn inject_context(metadata: &mut tonic::metadata::MetadataMap) {
    inject_current(&mut MetadataInjector(metadata));
}

/// Writes the current span's trace context into `carrier` (the W3C `traceparent` and
/// `tracestate` keys), for a context that travels in a message instead of call headers: each
/// step on a stream belongs to the trace of the span that sent it.
pub fn inject_into(carrier: &mut std::collections::HashMap<String, String>) {
    inject_current(carrier);
}

/// Makes `span` a child of the trace context in `carrier` (see [`inject_into`]) when it holds
/// a valid one; otherwise `span` keeps the parent it was created with.
pub fn set_parent_from(span: &tracing::Span, carrier: &std::collections::HashMap<String, String>) {
    if !carrier.is_empty() {
        continue_trace(span, carrier);
    }
}

/// Client interceptor that propagates the current span's trace context:
/// `DenoiserServiceClient::with_interceptor(channel, sd_server::telemetry::inject)`.
pub fn inject(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    inject_context(req.metadata_mut());
    Ok(req)
}

/// [`inject`] as a nameable type, for struct fields:
/// `DenoiserServiceClient<InterceptedService<Channel, sd_server::telemetry::Inject>>`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inject;

impl tonic::service::Interceptor for Inject {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        inject(req)
    }
}

/// What [`RpcMetricsLayer`] keeps in a server span while it is open.
struct CallTiming {
    start: Instant,
    service: String,
    method: String,
    status_code: Option<i64>,
}

#[derive(Default)]
struct CallFields {
    service: Option<String>,
    method: Option<String>,
    status_code: Option<i64>,
}

impl tracing::field::Visit for CallFields {
    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "rpc.grpc.status_code" {
            self.status_code = Some(value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record_i64(field, value as i64);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "rpc.service" => self.service = Some(value.to_string()),
            "rpc.method" => self.method = Some(value.to_string()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "rpc.service" => self.service = Some(format!("{value:?}")),
            "rpc.method" => self.method = Some(format!("{value:?}")),
            _ => {}
        }
    }
}

/// Times every [`server_span`] into `rpc.server.call.duration` (seconds; Prometheus
/// `rpc_server_call_duration_seconds`) with `rpc.system`, `rpc.service`, `rpc.method`, and
/// `rpc.grpc.status_code` when the span recorded one; counts non-zero codes in
/// `rpc.server.errors`. For server-streaming calls the time is until the response headers.
pub struct RpcMetricsLayer {
    duration: Histogram<f64>,
    errors: Counter<u64>,
}

impl RpcMetricsLayer {
    /// Instruments from the global meter provider (set it first).
    pub fn new() -> Self {
        let meter = opentelemetry::global::meter("sd");
        Self {
            duration: meter
                .f64_histogram("rpc.server.call.duration")
                .with_unit("s")
                .with_description("Duration of gRPC calls served")
                .with_boundaries(super::metrics::SECONDS_BUCKETS.to_vec())
                .build(),
            errors: meter
                .u64_counter("rpc.server.errors")
                .with_description("gRPC calls served that ended with a non-OK status")
                .build(),
        }
    }
}

impl Default for RpcMetricsLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for RpcMetricsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let meta = attrs.metadata();
        if meta.target() != TARGET || meta.name() != SERVER_SPAN {
            return;
        }
        let mut fields = CallFields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(CallTiming {
                start: Instant::now(),
                service: fields.service.unwrap_or_default(),
                method: fields.method.unwrap_or_default(),
                status_code: fields.status_code,
            });
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(timing) = ext.get_mut::<CallTiming>() {
            let mut fields = CallFields::default();
            values.record(&mut fields);
            if fields.status_code.is_some() {
                timing.status_code = fields.status_code;
            }
        }
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(timing) = span.extensions_mut().remove::<CallTiming>() else {
            return;
        };
        let mut attrs = vec![
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", timing.service),
            KeyValue::new("rpc.method", timing.method),
        ];
        if let Some(code) = timing.status_code {
            attrs.push(KeyValue::new("rpc.grpc.status_code", code));
            if code != 0 {
                self.errors.add(1, &attrs);
            }
        }
        self.duration
            .record(timing.start.elapsed().as_secs_f64(), &attrs);
    }
}

/// Tower layer that records how each call ended on its `grpc.server` span:
/// `rpc.grpc.status_code` (from the `grpc-status` of a trailers-only answer, else 0), and
/// `otel.status_code = error` for the codes OpenTelemetry counts as server errors. With it,
/// `rpc.server.call.duration` carries the code and `rpc.server.errors` counts failures.
///
/// tonic's `trace_fn` (which opens the span) cannot see responses, so this is a layer:
/// [`crate::traced_builder`] installs it. The status of a server-streaming call is the one
/// known when its headers go out.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcStatusLayer;

impl<S> tower::Layer<S> for GrpcStatusLayer {
    type Service = GrpcStatus<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcStatus { inner }
    }
}

/// The service [`GrpcStatusLayer`] wraps around a router.
#[derive(Debug, Clone)]
pub struct GrpcStatus<S> {
    inner: S,
}

/// Codes that are the server's fault (OpenTelemetry gRPC conventions, server side).
fn is_server_error(code: i64) -> bool {
    use tonic::Code;
    [
        Code::Unknown,
        Code::DeadlineExceeded,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
    ]
    .iter()
    .any(|c| *c as i64 == code)
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcStatus<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await;
            // Polled inside the call's span (tonic enters it around the whole future).
            let span = tracing::Span::current();
            let code = match &response {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or(0),
                Err(_) => tonic::Code::Unknown as i64,
            };
            span.record("rpc.grpc.status_code", code);
            if is_server_error(code) {
                span.record("otel.status_code", "error");
            }
            response
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
    use tracing_subscriber::layer::SubscriberExt as _;

    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT_ID: &str = "00f067aa0ba902b7";

    /// Runs `f` under a subscriber that turns spans into OpenTelemetry spans (no exporter).
    fn with_otel<R>(f: impl FnOnce() -> R) -> R {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f)
    }

    fn request_with_traceparent(path: &str) -> http::Request<()> {
        http::Request::builder()
            .uri(format!("http://localhost{path}"))
            .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
            .body(())
            .unwrap()
    }

    #[test]
    fn splits_the_grpc_path() {
        assert_eq!(
            service_and_method("/sd.stage.v1.DenoiserService/Denoise"),
            ("sd.stage.v1.DenoiserService", "Denoise")
        );
        assert_eq!(service_and_method("/odd"), ("odd", ""));
    }

    #[test]
    fn server_span_continues_the_callers_trace_and_inject_passes_it_on() {
        with_otel(|| {
            let span = server_span(&request_with_traceparent(
                "/sd.stage.v1.DenoiserService/Denoise",
            ));
            let cx = span.context();
            let sc = cx.span().span_context().clone();
            assert_eq!(sc.trace_id().to_string(), TRACE_ID);
            assert_ne!(
                sc.span_id().to_string(),
                PARENT_ID,
                "a new span, not the caller's"
            );

            // A client call made inside the handler carries the same trace, with the server
            // span (or its child) as the parent.
            let _entered = span.enter();
            let child = tracing::info_span!("denoise_step", step = 0);
            let _child = child.enter();
            let req = inject(tonic::Request::new(())).unwrap();
            let traceparent = req.metadata().get("traceparent").unwrap().to_str().unwrap();
            let child_id = child.context().span().span_context().span_id().to_string();
            assert_eq!(traceparent, format!("00-{TRACE_ID}-{child_id}-01"));
        });
    }

    #[test]
    fn without_traceparent_a_call_starts_a_trace() {
        with_otel(|| {
            let req = http::Request::builder()
                .uri("http://localhost/sd.v1.ImageGenerationService/Generate")
                .body(())
                .unwrap();
            let span = server_span(&req);
            let cx = span.context();
            let sc = cx.span().span_context().clone();
            assert!(sc.is_valid());
            assert_ne!(sc.trace_id().to_string(), TRACE_ID);
        });
    }

    #[test]
    fn inject_outside_any_span_adds_nothing() {
        with_otel(|| {
            let req = inject(tonic::Request::new(())).unwrap();
            assert!(req.metadata().get("traceparent").is_none());
        });
    }
}
