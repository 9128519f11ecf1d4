//! What every binary of the system does the same way: bind a listener and say where, serve
//! gRPC health and reflection next to its own service, stop gracefully on SIGTERM/SIGINT, and
//! log as text or JSON, and take part in the system's telemetry ([`telemetry`]: traces with
//! W3C context across every gRPC hop, metrics over OTLP and Prometheus).
//!
//! Services are libraries whose `run` takes an already-bound [`tokio::net::TcpListener`] and a
//! shutdown future, so tests (and `sd generate --local`) can run them on `127.0.0.1:0`.

use std::{future::Future, net::SocketAddr, time::Duration};
use tokio::net::TcpListener;
use tonic_health::{ServingStatus, server::HealthReporter};

pub mod telemetry;

pub use telemetry::TelemetryArgs;
pub use tonic_health;

/// Logging flags shared by every binary.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log line format: `text` for people, `json` for log pipelines. Levels are set with
    /// RUST_LOG (default `info`).
    #[arg(long, env = "SD_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Traces and metrics (`OTEL_*` variables, `--metrics-listen`).
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// Installs a plain global tracing subscriber (stderr, no OpenTelemetry). Safe to call more
/// than once: later calls are ignored. Binaries use [`telemetry::init`] instead, which also
/// sets up traces and metrics; this stays for tools and tests that want logs only.
pub fn init_logging(args: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if args.log_format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Binds `addr` and prints `listening on ADDR` on stdout, the line tests and scripts read to
/// learn an ephemeral port.
pub async fn bind(addr: SocketAddr, service: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("{service}: cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    println!("listening on {local}");
    tracing::info!(%local, "{service} listening");
    Ok(listener)
}

/// Resolves when the process receives SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received: draining in-flight requests");
}

/// gRPC health of one service, NOT_SERVING until [`Health::set_serving`] is called: Kubernetes
/// probes `grpc.health.v1` natively and must not route traffic to a stage still loading
/// weights. Both the named service and the server-wide `""` entry are kept in step.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    service: &'static str,
}

impl Health {
    /// Creates the health service, with `service` and `""` reporting NOT_SERVING.
    pub async fn new(
        service: &'static str,
    ) -> (
        Self,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ) {
        let (reporter, server) = tonic_health::server::health_reporter();
        let health = Self { reporter, service };
        health.set(ServingStatus::NotServing).await;
        (health, server)
    }

    async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status(self.service, status).await;
        self.reporter.set_service_status("", status).await;
    }

    /// Marks the service ready.
    pub async fn set_serving(&self) {
        self.set(ServingStatus::Serving).await;
    }

    /// Marks the service not ready (warming up, or draining before shutdown).
    pub async fn set_not_serving(&self) {
        self.set(ServingStatus::NotServing).await;
    }
}

/// The reflection service, listing only `services` (all of the system's message types stay
/// resolvable through their files).
pub fn reflection(
    services: &[&str],
) -> anyhow::Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sd_proto::FILE_DESCRIPTOR_SET);
    for s in services {
        builder = builder.with_service_name(*s);
    }
    Ok(builder.build_v1()?)
}

/// A tonic server builder with the settings every service shares. Each call is served inside
/// a `grpc.server` span whose parent is the caller's W3C `traceparent`, and is timed into
/// `rpc.server.call.duration` ([`telemetry::grpc`]).
pub fn builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .trace_fn(telemetry::grpc::server_span)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_nodelay(true)
        .max_frame_size(sd_proto::MAX_FRAME_BYTES)
}

/// The layers [`traced_builder`] adds to [`builder`].
pub type Layers =
    tower::layer::util::Stack<telemetry::grpc::GrpcStatusLayer, tower::layer::util::Identity>;

/// A router made by [`traced_builder`].
pub type TracedRouter = tonic::transport::server::Router<Layers>;

/// [`builder`] plus [`telemetry::grpc::GrpcStatusLayer`], so every call's span also records
/// its `rpc.grpc.status_code` and errors are counted per code. Its routers are
/// [`TracedRouter`]s (a different type from `builder`'s, hence a separate function).
pub fn traced_builder() -> tonic::transport::Server<Layers> {
    builder().layer(telemetry::grpc::GrpcStatusLayer)
}

/// A [`traced_builder`] router already serving `health` and reflection for `service`: what
/// every binary of the system starts from before adding its own service.
pub fn router<H: tonic_health::pb::health_server::Health>(
    service: &'static str,
    health: tonic_health::pb::health_server::HealthServer<H>,
) -> anyhow::Result<TracedRouter> {
    Ok(traced_builder()
        .add_service(health)
        .add_service(reflection(&[service])?))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves `router` on `listener` until `shutdown` resolves; marks `health` NOT_SERVING first
/// so load balancers stop sending new work, then lets in-flight calls finish. Takes routers
/// of [`builder`] and of [`traced_builder`].
pub async fn serve<L, ResBody>(
    router: tonic::transport::server::Router<L>,
    listener: TcpListener,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    L: tower::Layer<tonic::service::Routes>,
    L::Service: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    <L::Service as tower::Service<http::Request<tonic::body::Body>>>::Future: Send,
    <L::Service as tower::Service<http::Request<tonic::body::Body>>>::Error: Into<BoxError> + Send,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    // tonic applies `tcp_nodelay` only to listeners it binds itself; ours are bound by the
    // caller, so set it on every accepted connection. Without it, Nagle's algorithm and
    // delayed ACKs add about 40 ms to every small response (a denoising step's round trip).
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |conn| {
            if let Ok(stream) = &conn {
                let _ = stream.set_nodelay(true);
            }
            conn
        },
    );
    let drain = async move {
        shutdown.await;
        health.set_not_serving().await;
    };
    router.serve_with_incoming_shutdown(incoming, drain).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    /// Both kinds of router go through `serve`, and a traced one answers calls.
    #[tokio::test]
    async fn a_traced_router_serves_and_drains() {
        let (health, health_service) = Health::new("test.Service").await;
        health.set_serving().await;
        let router: TracedRouter = traced_builder().add_service(health_service);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(router, listener, health, async {
            let _ = stopped.await;
        }));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::with_interceptor(channel, telemetry::inject);
        let reply = client
            .check(HealthCheckRequest {
                service: "test.Service".into(),
            })
            .await
            .unwrap();
        assert_eq!(reply.into_inner().status, ServingStatus::Serving as i32);
        let unknown = client
            .check(HealthCheckRequest {
                service: "no.Such".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();

        // The plain builder's routers still fit `serve` (what every service uses today).
        let (health, health_service) = Health::new("test.Service").await;
        let router = builder().add_service(health_service);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        serve(router, listener, health, async {}).await.unwrap();
    }
}
