//! Telemetry across the four processes: one generation is one trace (W3C context extracted by
//! every server, injected by the orchestrator's clients), with the expected span tree, and
//! every RPC is timed in the Prometheus metrics. The test runs its own OTLP trace receiver on
//! 127.0.0.1:0 and points the binaries at it.
//!
//! The orchestrator's spans it expects (`generate`, `encode`, `denoise_step` with `step` and
//! `timestep`, `decode`) are made by `orchestrator/src/pipeline.rs`, the stage server spans by
//! `sd_server::builder`.

#![allow(clippy::unwrap_used)]

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::{Span, span::SpanKind},
};
use sd_e2e::{Cluster, metric_sample, scrape_metrics, tiny_model};
use sd_proto::v1::GenerateRequest;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// A span as received, with the `service.name` of the process that sent it.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    span: Span,
}

/// An OTLP/gRPC trace receiver keeping every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| string_attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Serves on 127.0.0.1:0; returns the endpoint URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        format!("http://{addr}")
    }

    fn trace(&self, trace_id: &[u8]) -> Vec<Received> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.span.trace_id == trace_id)
            .cloned()
            .collect()
    }

    /// Waits until `done` holds for the spans of `trace_id` (export is batched), or panics
    /// with what arrived.
    async fn wait_for(&self, trace_id: &[u8], done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let spans = self.trace(trace_id);
            if done(&spans) {
                // A little longer, so late batches of the same trace are in too.
                tokio::time::sleep(Duration::from_millis(500)).await;
                return self.trace(trace_id);
            }
            assert!(
                Instant::now() < deadline,
                "trace {} incomplete after 30 s; got:\n{}",
                hex(trace_id),
                describe(&spans)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn string_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key)? {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn describe(spans: &[Received]) -> String {
    spans
        .iter()
        .map(|r| {
            format!(
                "  {:<16} {:<48} id={} parent={}\n",
                r.service,
                r.span.name,
                hex(&r.span.span_id),
                hex(&r.span.parent_span_id)
            )
        })
        .collect()
}

const SERVICES: [&str; 4] = [
    "sd-orchestrator",
    "sd-text-encoder",
    "sd-denoiser",
    "sd-vae",
];
const STEPS: u32 = 3;

fn request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a red circle on a blue background".into(),
        negative_prompt: "blurry".into(),
        width: Some(64),
        height: Some(64),
        steps: Some(STEPS),
        seed: Some(7),
        ..Default::default()
    }
}

/// The stage server spans a complete generation produces, and the orchestrator spans.
fn complete(spans: &[Received]) -> bool {
    let has = |service: &str, name: &str| {
        spans
            .iter()
            .any(|r| r.service == service && r.span.name == name)
    };
    let steps = spans
        .iter()
        .filter(|r| r.service == "sd-orchestrator" && r.span.name == "denoise_step")
        .count();
    has("sd-text-encoder", "sd.stage.v1.TextEncoderService/Encode")
        && has("sd-vae", "sd.stage.v1.VaeService/Decode")
        && has("sd-orchestrator", "generate")
        && has("sd-orchestrator", "decode")
        && steps >= STEPS as usize
        && spans
            .iter()
            .filter(|r| r.service == "sd-denoiser" && r.span.name.ends_with("/Denoise"))
            .count()
            >= STEPS as usize
}

/// The chain of spans from `span` up to the trace's root (or the first parent not received).
fn ancestors<'a>(by_id: &HashMap<Vec<u8>, &'a Received>, span: &'a Received) -> Vec<&'a Received> {
    let mut chain = Vec::new();
    let mut parent = &span.span.parent_span_id;
    while let Some(p) = by_id.get(parent) {
        chain.push(*p);
        parent = &p.span.parent_span_id;
        assert!(chain.len() < 64, "cycle in the span tree");
    }
    chain
}

fn cluster_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_string()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50".into()),
        ("OTEL_TRACES_SAMPLER", "parentbased_always_on".into()),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=e2e".into(),
        ),
        ("SD_METRICS_LISTEN", "127.0.0.1:0".into()),
    ]
}

async fn start_cluster(endpoint: &str) -> Cluster {
    let env = cluster_env(endpoint);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Cluster::start_with_env(&tiny_model("sd1"), &env).await
}

#[tokio::test(flavor = "multi_thread")]
async fn one_generation_is_one_trace_across_four_services() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let cluster = start_cluster(&endpoint).await;
    let mut client = cluster.client().await;

    // A public client's traceparent is honoured: the whole generation joins its trace.
    let trace_id = [
        0x4b_u8, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
        0x47, 0x36,
    ];
    let client_span_id = [0x00_u8, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];
    let mut req = tonic::Request::new(request());
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{}-{}-01", hex(&trace_id), hex(&client_span_id))
            .parse()
            .unwrap(),
    );
    let reply = client.generate(req).await.unwrap().into_inner();
    assert_eq!(reply.images.len(), 1);

    let spans = receiver.wait_for(&trace_id, complete).await;
    let by_id: HashMap<Vec<u8>, &Received> =
        spans.iter().map(|r| (r.span.span_id.clone(), r)).collect();
    let all = describe(&spans);

    // One trace id across the four services.
    for service in SERVICES {
        assert!(
            spans.iter().any(|r| r.service == service),
            "no span of {service} in the trace:\n{all}"
        );
    }

    // The orchestrator's server span is the child of the client's span, and the root of
    // everything else received.
    let server = spans
        .iter()
        .find(|r| {
            r.service == "sd-orchestrator" && r.span.name == "sd.v1.ImageGenerationService/Generate"
        })
        .unwrap_or_else(|| panic!("no orchestrator Generate server span:\n{all}"));
    assert_eq!(server.span.parent_span_id, client_span_id, "{all}");
    assert_eq!(server.span.kind, SpanKind::Server as i32);
    assert_eq!(
        string_attr(&server.span.attributes, "rpc.system").as_deref(),
        Some("grpc")
    );
    assert_eq!(
        string_attr(&server.span.attributes, "rpc.service").as_deref(),
        Some("sd.v1.ImageGenerationService")
    );
    assert_eq!(
        string_attr(&server.span.attributes, "rpc.method").as_deref(),
        Some("Generate")
    );
    for r in &spans {
        if r.span.span_id != server.span.span_id {
            let chain = ancestors(&by_id, r);
            assert!(
                chain.iter().any(|a| a.span.span_id == server.span.span_id),
                "{} / {} is not under the Generate server span:\n{all}",
                r.service,
                r.span.name
            );
        }
    }

    // `generate` at the orchestrator, with encode, every denoise_step and decode under it.
    let generate = spans
        .iter()
        .find(|r| r.service == "sd-orchestrator" && r.span.name == "generate")
        .unwrap_or_else(|| panic!("no `generate` span:\n{all}"));
    let under_generate = |r: &Received| {
        ancestors(&by_id, r)
            .iter()
            .any(|a| a.span.span_id == generate.span.span_id)
    };
    let steps: Vec<&Received> = spans
        .iter()
        .filter(|r| r.service == "sd-orchestrator" && r.span.name == "denoise_step")
        .collect();
    assert_eq!(
        steps.len(),
        STEPS as usize,
        "one denoise_step per step:\n{all}"
    );
    let mut step_numbers = Vec::new();
    for s in &steps {
        assert!(under_generate(s), "denoise_step outside generate:\n{all}");
        let step = attr(&s.span.attributes, "step")
            .unwrap_or_else(|| panic!("denoise_step without `step`:\n{all}"));
        step_numbers.push(format!("{step:?}"));
        assert!(
            attr(&s.span.attributes, "timestep").is_some(),
            "denoise_step without `timestep`:\n{all}"
        );
    }
    step_numbers.sort();
    step_numbers.dedup();
    assert_eq!(
        step_numbers.len(),
        STEPS as usize,
        "steps not distinct: {step_numbers:?}"
    );

    // Each stage hop: the stage's server span (kind SERVER, RPC attributes) is the child of
    // an orchestrator span, which lies under the orchestrator span named for that phase.
    let hops = [
        (
            "sd-text-encoder",
            "sd.stage.v1.TextEncoderService",
            "Encode",
            "encode",
            1,
        ),
        (
            "sd-denoiser",
            "sd.stage.v1.DenoiserService",
            "Denoise",
            "denoise_step",
            STEPS as usize,
        ),
        ("sd-vae", "sd.stage.v1.VaeService", "Decode", "decode", 1),
    ];
    for (service, rpc_service, method, phase, count) in hops {
        let calls: Vec<&Received> = spans
            .iter()
            .filter(|r| r.service == service && r.span.name == format!("{rpc_service}/{method}"))
            .collect();
        assert!(
            calls.len() >= count,
            "{service}: {} {method} server spans, expected {count}:\n{all}",
            calls.len()
        );
        let mut phases = Vec::new();
        for call in calls {
            assert_eq!(
                call.span.kind,
                SpanKind::Server as i32,
                "{service} {method}"
            );
            assert_eq!(
                string_attr(&call.span.attributes, "rpc.system").as_deref(),
                Some("grpc")
            );
            assert_eq!(
                string_attr(&call.span.attributes, "rpc.service").as_deref(),
                Some(rpc_service)
            );
            assert_eq!(
                string_attr(&call.span.attributes, "rpc.method").as_deref(),
                Some(method)
            );
            let parent = by_id
                .get(&call.span.parent_span_id)
                .unwrap_or_else(|| panic!("{service} {method}: parent span not received:\n{all}"));
            assert_eq!(
                parent.service, "sd-orchestrator",
                "{service} {method}: the parent must be the orchestrator's call span:\n{all}"
            );
            let phase_span = std::iter::once(*parent)
                .chain(ancestors(&by_id, parent))
                .find(|a| a.service == "sd-orchestrator" && a.span.name == phase)
                .unwrap_or_else(|| panic!("{service} {method}: not under `{phase}`:\n{all}"));
            assert!(
                under_generate(phase_span),
                "`{phase}` outside generate:\n{all}"
            );
            phases.push(phase_span.span.span_id.clone());
        }
        phases.sort();
        phases.dedup();
        assert!(
            phases.len() >= count,
            "{service}: the {method} calls share {} `{phase}` spans, expected {count}:\n{all}",
            phases.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_traceparent_the_orchestrator_starts_the_trace() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let cluster = start_cluster(&endpoint).await;
    let mut client = cluster.client().await;
    client.generate(request()).await.unwrap();

    // Find the generation's trace by its orchestrator server span.
    let deadline = Instant::now() + Duration::from_secs(30);
    let server = loop {
        let found = receiver
            .spans
            .lock()
            .unwrap()
            .iter()
            .find(|r| {
                r.service == "sd-orchestrator"
                    && r.span.name == "sd.v1.ImageGenerationService/Generate"
            })
            .cloned();
        if let Some(found) = found {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "no Generate server span received"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        server.span.parent_span_id.is_empty(),
        "the Generate server span must be the trace's root"
    );
    let spans = receiver.wait_for(&server.span.trace_id, complete).await;
    for service in SERVICES {
        assert!(
            spans.iter().any(|r| r.service == service),
            "no span of {service} in the trace:\n{}",
            describe(&spans)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn denoiser_metrics_count_every_rpc() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let cluster = start_cluster(&endpoint).await;
    let mut client = cluster.client().await;
    client.generate(request()).await.unwrap();

    for service in [
        &cluster.text_encoder,
        &cluster.denoiser,
        &cluster.vae,
        &cluster.orchestrator,
    ] {
        assert!(
            service.metrics_addr().is_some(),
            "{} printed no `metrics on` line",
            service.name
        );
    }
    // The generation's steps went on one DenoiseSteps stream, counted when it ended (just
    // after the generation).
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let body = scrape_metrics(&cluster.denoiser.metrics_addr().unwrap()).await;
        let count_line = body.lines().find(|l| {
            l.starts_with("rpc_server_call_duration_seconds_count{")
                && l.contains("rpc_method=\"DenoiseSteps\"")
                && l.contains("rpc_service=\"sd.stage.v1.DenoiserService\"")
        });
        if let Some(line) = count_line {
            let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            assert_eq!(count, 1.0, "one step stream per generation: {line}");
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no DenoiseSteps duration histogram in /metrics:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        body.contains("rpc_server_call_duration_seconds_bucket{"),
        "histogram buckets missing:\n{body}"
    );
    assert!(
        body.contains("# TYPE rpc_server_call_duration_seconds histogram"),
        "{body}"
    );
    assert!(
        body.contains("service_name=\"sd-denoiser\""),
        "target_info names the service:\n{body}"
    );
    // The conditioning cache: the first step sends and caches the context, the others hit.
    let hits = metric_sample(&body, "sd_context_cache_lookups_total{", "result=\"hit\"");
    assert_eq!(hits, f64::from(STEPS - 1), "cache hits:\n{body}");
    let misses = metric_sample(&body, "sd_context_cache_lookups_total{", "result=\"miss\"");
    assert_eq!(misses, 0.0, "cache misses:\n{body}");
    assert_eq!(
        metric_sample(&body, "sd_context_cache_inserts_total ", ""),
        1.0
    );
    assert_eq!(metric_sample(&body, "sd_context_cache_entries ", ""), 1.0);
    // Guided: [2, 77, 32] f32 for the tiny model.
    assert_eq!(
        metric_sample(&body, "sd_context_cache_size_bytes ", ""),
        (2 * 77 * 32 * 4) as f64
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_collector_never_fails_a_generation() {
    // Port 1 on loopback: nothing listens, every export is refused.
    let cluster = start_cluster("http://127.0.0.1:1").await;
    let mut client = cluster.client().await;
    for _ in 0..2 {
        let reply = client.generate(request()).await.unwrap().into_inner();
        assert_eq!(reply.images.len(), 1);
    }
    // Batches are exported every 50 ms: give the exporter time to fail and say so.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stderr = cluster.orchestrator.stderr();
    assert_eq!(
        stderr
            .matches("cannot export spans to the OTLP collector")
            .count(),
        1,
        "one warning when the collector is unreachable, not one per batch:\n{stderr}"
    );
    assert!(
        !stderr.contains("ERROR"),
        "an unreachable collector is not an error:\n{stderr}"
    );
}
