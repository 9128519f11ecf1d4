//! Clients for the model stages, with replica discovery, balancing and failover.
//!
//! A stage address is a comma-separated list of entries, each `http://host:port` or
//! `file:///path` (a file listing such URLs, one per line, re-read periodically). A host name
//! may resolve to many addresses (a Kubernetes headless Service); it is re-resolved
//! periodically, so replicas that appear or go away are followed. Each replica gets its own
//! channel, because HTTP/2 multiplexes every call over one connection and a single channel
//! would pin all traffic to one replica.
//!
//! Calls go to the less busy of two random healthy replicas (power of two choices on
//! outstanding calls). A replica that fails with UNAVAILABLE is marked unhealthy and skipped
//! until it answers a gRPC health check with SERVING; the call is retried on another replica
//! within the request's deadline, as long as the retry budget allows (retries are at most a
//! fraction of successful calls, so a dead cluster does not cause a retry storm).

use sd_proto::stage::{
    denoiser_service_client::DenoiserServiceClient,
    text_encoder_service_client::TextEncoderServiceClient, vae_service_client::VaeServiceClient,
};
use sd_server::telemetry::{Inject, metrics::Orchestrator as Metrics};
use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use tonic::{
    Code, Status,
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

/// A channel whose calls carry the current span's W3C trace context.
pub type Traced = InterceptedService<Channel, Inject>;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Timeouts and intervals applied to every stage.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Establishing a connection; bounds how long a down stage takes to report UNAVAILABLE.
    pub connect: Duration,
    /// One call (one denoise step, one decode), unless the request's deadline is sooner.
    pub request: Duration,
    /// How often names and endpoint files are re-resolved.
    pub resolve_interval: Duration,
}

/// One replica of a stage.
struct Replica {
    address: String,
    channel: Channel,
    outstanding: AtomicUsize,
    healthy: AtomicBool,
}

/// A stage: its name (used in every error) and its replicas.
pub struct Stage {
    name: &'static str,
    entries: Vec<Entry>,
    replicas: RwLock<Vec<Arc<Replica>>>,
    timeouts: Timeouts,
    budget: RetryBudget,
    metrics: Metrics,
}

/// One entry of an address list.
#[derive(Debug, Clone)]
enum Entry {
    /// An IP address: one fixed replica.
    Fixed(String),
    /// A host name, resolved (and re-resolved) to one replica per address.
    Name {
        scheme: String,
        host: String,
        port: u16,
    },
    /// A file of URLs, re-read.
    File(std::path::PathBuf),
}

/// Why a stage address list was refused.
#[derive(Debug, thiserror::Error)]
#[error("--{stage}: {message}")]
pub struct AddressError {
    stage: &'static str,
    message: String,
}

fn parse_url(raw: &str) -> Result<Entry, String> {
    let uri: http::Uri = raw
        .parse()
        .map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    let scheme = uri.scheme_str().unwrap_or("");
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "{raw:?}: expected http://host:port or file:///path"
        ));
    }
    let host = uri.host().ok_or_else(|| format!("{raw:?}: no host"))?;
    let port = uri.port_u16().ok_or_else(|| format!("{raw:?}: no port"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    Ok(if bare.parse::<std::net::IpAddr>().is_ok() {
        Entry::Fixed(format!("{scheme}://{host}:{port}"))
    } else {
        Entry::Name {
            scheme: scheme.into(),
            host: host.into(),
            port,
        }
    })
}

impl Stage {
    /// Parses `addresses` and resolves them once. A name that does not resolve yet is not an
    /// error: it is retried at every re-resolution.
    pub async fn connect(
        name: &'static str,
        addresses: &str,
        timeouts: Timeouts,
    ) -> Result<Arc<Self>, AddressError> {
        let err = |message: String| AddressError {
            stage: name,
            message,
        };
        let mut entries = Vec::new();
        for raw in addresses
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            if let Some(path) = raw.strip_prefix("file://") {
                entries.push(Entry::File(path.into()));
            } else {
                entries.push(parse_url(raw).map_err(err)?);
            }
        }
        if entries.is_empty() {
            return Err(err("no endpoint given".into()));
        }
        let stage = Arc::new(Self {
            name,
            entries,
            replicas: RwLock::new(Vec::new()),
            timeouts,
            budget: RetryBudget::new(),
            metrics: Metrics::new(),
        });
        stage.resolve().await;
        Ok(stage)
    }

    /// The stage's name, as errors mention it.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Addresses of the current replicas and whether each is considered healthy.
    pub fn replicas(&self) -> Vec<(String, bool)> {
        self.read()
            .iter()
            .map(|r| (r.address.clone(), r.healthy.load(Ordering::Relaxed)))
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Replica>>> {
        self.replicas.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-resolves every entry and updates the replica set: new addresses get channels,
    /// vanished ones are dropped (their in-flight calls finish on the channel they hold).
    pub async fn resolve(&self) {
        let mut wanted = BTreeSet::new();
        for entry in &self.entries {
            match entry {
                Entry::Fixed(url) => {
                    wanted.insert(url.clone());
                }
                Entry::Name { scheme, host, port } => {
                    match tokio::net::lookup_host((host.as_str(), *port)).await {
                        Ok(addrs) => wanted.extend(addrs.map(|a| format!("{scheme}://{a}"))),
                        Err(e) => tracing::warn!(stage = self.name, "cannot resolve {host}: {e}"),
                    }
                }
                Entry::File(path) => match tokio::fs::read_to_string(path).await {
                    Ok(text) => {
                        for line in text.lines().map(str::trim) {
                            if line.is_empty() || line.starts_with('#') {
                                continue;
                            }
                            match parse_url(line) {
                                Ok(Entry::Fixed(url)) => {
                                    wanted.insert(url);
                                }
                                Ok(Entry::Name { scheme, host, port }) => {
                                    wanted.insert(format!("{scheme}://{host}:{port}"));
                                }
                                Ok(Entry::File(_)) | Err(_) => tracing::warn!(
                                    stage = self.name,
                                    "{}: ignoring {line:?}",
                                    path.display()
                                ),
                            }
                        }
                    }
                    Err(e) => tracing::warn!(stage = self.name, "{}: {e}", path.display()),
                },
            }
        }
        let current: BTreeMap<String, Arc<Replica>> = self
            .read()
            .iter()
            .map(|r| (r.address.clone(), r.clone()))
            .collect();
        if current.keys().cloned().collect::<BTreeSet<_>>() == wanted {
            return;
        }
        let mut next = Vec::with_capacity(wanted.len());
        for address in wanted {
            if let Some(existing) = current.get(&address) {
                next.push(existing.clone());
                continue;
            }
            match Endpoint::from_shared(address.clone()) {
                Ok(endpoint) => {
                    let channel = endpoint
                        .connect_timeout(self.timeouts.connect)
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(30))
                        .keep_alive_while_idle(true)
                        .connect_lazy();
                    tracing::info!(stage = self.name, replica = %address, "replica added");
                    next.push(Arc::new(Replica {
                        address,
                        channel,
                        outstanding: AtomicUsize::new(0),
                        healthy: AtomicBool::new(true),
                    }));
                }
                Err(e) => tracing::warn!(stage = self.name, "{address}: {e}"),
            }
        }
        *self.replicas.write().unwrap_or_else(|e| e.into_inner()) = next;
    }

    /// Re-resolves the entries and health-checks unhealthy replicas until the process ends.
    pub async fn maintain(self: Arc<Self>) {
        let mut last_resolve = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if last_resolve.elapsed() >= self.timeouts.resolve_interval {
                self.resolve().await;
                last_resolve = Instant::now();
            }
            let sick: Vec<Arc<Replica>> = self
                .read()
                .iter()
                .filter(|r| !r.healthy.load(Ordering::Relaxed))
                .cloned()
                .collect();
            for replica in sick {
                let mut client = HealthClient::new(replica.channel.clone());
                let mut request = tonic::Request::new(HealthCheckRequest {
                    service: String::new(),
                });
                request.set_timeout(self.timeouts.connect);
                if let Ok(reply) = client.check(request).await
                    && reply.into_inner().status == ServingStatus::Serving as i32
                {
                    replica.healthy.store(true, Ordering::Relaxed);
                    tracing::info!(stage = self.name, replica = %replica.address, "replica healthy again");
                }
            }
        }
    }

    /// Picks a replica not in `tried`: the less busy of two random healthy ones; unhealthy
    /// ones only when no healthy one is left.
    fn pick(&self, tried: &[String]) -> Option<Arc<Replica>> {
        let replicas = self.read();
        let fresh: Vec<&Arc<Replica>> = replicas
            .iter()
            .filter(|r| !tried.contains(&r.address))
            .collect();
        let healthy: Vec<&Arc<Replica>> = fresh
            .iter()
            .copied()
            .filter(|r| r.healthy.load(Ordering::Relaxed))
            .collect();
        let pool = if healthy.is_empty() { fresh } else { healthy };
        match pool.len() {
            0 => None,
            1 => Some(pool[0].clone()),
            n => {
                let a = rand::random_range(0..n);
                let b = (a + rand::random_range(1..n)) % n;
                let (ra, rb) = (pool[a], pool[b]);
                let load = |r: &Replica| r.outstanding.load(Ordering::Relaxed);
                Some(if load(rb) < load(ra) {
                    rb.clone()
                } else {
                    ra.clone()
                })
            }
        }
    }

    /// Calls `f(channel, timeout)` on a replica, failing over to others on UNAVAILABLE within
    /// `deadline`. `timeout` is what the call may take (the stage timeout, or less when the
    /// deadline is nearer). Errors become statuses that name the stage and replica.
    pub async fn call<T, F, Fut>(
        &self,
        what: &'static str,
        deadline: Option<Instant>,
        f: F,
    ) -> Result<(T, String), Status>
    where
        F: Fn(Traced, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut tried = Vec::new();
        loop {
            let timeout = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left.min(self.timeouts.request),
                    _ => {
                        return Err(Status::deadline_exceeded(format!(
                            "deadline passed before {} ({what})",
                            self.name
                        )));
                    }
                },
                None => self.timeouts.request,
            };
            let Some(replica) = self.pick(&tried) else {
                return Err(Status::unavailable(format!(
                    "{} stage unavailable ({what}): no replica{}",
                    self.name,
                    if tried.is_empty() {
                        " known".to_string()
                    } else {
                        format!(" left after trying {}", tried.join(", "))
                    }
                )));
            };
            replica.outstanding.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let outcome = f(
                InterceptedService::new(replica.channel.clone(), Inject),
                timeout,
            )
            .await;
            replica.outstanding.fetch_sub(1, Ordering::Relaxed);
            let code = outcome.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
            self.metrics
                .record_stage_call(self.name, what, started.elapsed(), code);
            match outcome {
                Ok(response) => {
                    self.budget.deposit();
                    return Ok((response.into_inner(), replica.address.clone()));
                }
                Err(status) if is_unreachable(&status) => {
                    replica.healthy.store(false, Ordering::Relaxed);
                    if status.message().contains("warming up") {
                        // Expected while a stage loads its weights: not worth a warning.
                        tracing::info!(stage = self.name, replica = %replica.address, "{what}: {}", status.message());
                    } else {
                        tracing::warn!(stage = self.name, replica = %replica.address, "{what}: {}", status.message());
                    }
                    tried.push(replica.address.clone());
                    let past = deadline.is_some_and(|d| Instant::now() >= d);
                    if past || !self.budget.withdraw() {
                        return Err(self.annotate(what, &replica.address, status));
                    }
                }
                Err(status) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(Status::deadline_exceeded(format!(
                            "{} ({what}) did not answer before the deadline: {}",
                            self.name,
                            status.message()
                        )));
                    }
                    return Err(self.annotate(what, &replica.address, status));
                }
            }
        }
    }

    /// Prefixes a stage's status with where it came from.
    fn annotate(&self, what: &str, address: &str, status: Status) -> Status {
        let code = if is_unreachable(&status) {
            Code::Unavailable
        } else {
            status.code()
        };
        let message = if code == Code::Unavailable {
            format!(
                "{} stage unavailable at {address} ({what}): {}",
                self.name,
                status.message()
            )
        } else {
            format!("{} stage ({what}): {}", self.name, status.message())
        };
        Status::new(code, message)
    }
}

/// UNAVAILABLE, or a transport failure that tonic reports otherwise (a reset connection is
/// UNKNOWN with a transport message): the replica, not the request, is the problem.
fn is_unreachable(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Internal => {
            let m = status.message().to_ascii_lowercase();
            m.contains("transport") || m.contains("connection") || m.contains("broken pipe")
        }
        _ => false,
    }
}

/// Retries allowed as a fraction of successes: each success deposits 0.2 tokens (up to 100),
/// each retry costs one; a fresh budget holds 10. When a whole stage is down the budget drains
/// and calls fail at the first error instead of multiplying the load.
struct RetryBudget {
    tokens: Mutex<f64>,
}

impl RetryBudget {
    const RATIO: f64 = 0.2;
    const MAX: f64 = 100.0;
    const INITIAL: f64 = 10.0;

    fn new() -> Self {
        Self {
            tokens: Mutex::new(Self::INITIAL),
        }
    }

    fn deposit(&self) {
        let mut t = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        *t = (*t + Self::RATIO).min(Self::MAX);
    }

    fn withdraw(&self) -> bool {
        let mut t = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if *t >= 1.0 {
            *t -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A text-encoder client on `channel` with the system's message limits.
pub fn text_encoder(channel: Traced) -> TextEncoderServiceClient<Traced> {
    TextEncoderServiceClient::new(channel)
        .max_decoding_message_size(sd_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(sd_proto::MAX_MESSAGE_BYTES)
}

/// A denoiser client on `channel` with the system's message limits.
pub fn denoiser(channel: Traced) -> DenoiserServiceClient<Traced> {
    DenoiserServiceClient::new(channel)
        .max_decoding_message_size(sd_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(sd_proto::MAX_MESSAGE_BYTES)
}

/// A VAE client on `channel` with the system's message limits.
pub fn vae(channel: Traced) -> VaeServiceClient<Traced> {
    VaeServiceClient::new(channel)
        .max_decoding_message_size(sd_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(sd_proto::MAX_MESSAGE_BYTES)
}

/// A request carrying `message` with `timeout` as its gRPC deadline.
pub fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts() -> Timeouts {
        Timeouts {
            connect: Duration::from_millis(500),
            request: Duration::from_secs(1),
            resolve_interval: Duration::from_secs(10),
        }
    }

    #[tokio::test]
    async fn parses_lists_and_refuses_bad_addresses() {
        let s = Stage::connect("vae", "http://127.0.0.1:1, http://127.0.0.1:2", timeouts())
            .await
            .unwrap();
        assert_eq!(s.replicas().len(), 2);
        let e = Stage::connect("vae", "127.0.0.1:1", timeouts())
            .await
            .err()
            .unwrap();
        assert!(e.to_string().starts_with("--vae:"), "{e}");
        assert!(Stage::connect("vae", " , ", timeouts()).await.is_err());
        assert!(
            Stage::connect("vae", "http://127.0.0.1", timeouts())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn names_resolve_to_one_replica_per_address() {
        let s = Stage::connect("denoiser", "http://localhost:50062", timeouts())
            .await
            .unwrap();
        let replicas = s.replicas();
        assert!(!replicas.is_empty());
        assert!(
            replicas.iter().all(|(a, _)| !a.contains("localhost")),
            "{replicas:?}"
        );
    }

    #[tokio::test]
    async fn endpoint_files_are_re_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("denoisers.txt");
        std::fs::write(&file, "# replicas\nhttp://127.0.0.1:7001\n").unwrap();
        let s = Stage::connect(
            "denoiser",
            &format!("file://{}", file.display()),
            timeouts(),
        )
        .await
        .unwrap();
        assert_eq!(s.replicas().len(), 1);
        std::fs::write(&file, "http://127.0.0.1:7001\nhttp://127.0.0.1:7002\n").unwrap();
        s.resolve().await;
        let addresses: Vec<String> = s.replicas().into_iter().map(|(a, _)| a).collect();
        assert_eq!(
            addresses,
            ["http://127.0.0.1:7001", "http://127.0.0.1:7002"]
        );
    }

    #[tokio::test]
    async fn down_stage_is_unavailable_named_and_marked_unhealthy() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let s = Stage::connect(
            "text-encoder",
            &format!("http://127.0.0.1:{port}"),
            timeouts(),
        )
        .await
        .unwrap();
        let err = s
            .call("info", None, |ch, t| async move {
                text_encoder(ch)
                    .info(request(
                        sd_proto::stage::TextEncoderServiceInfoRequest {},
                        t,
                    ))
                    .await
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(
            err.message().contains("text-encoder stage unavailable"),
            "{}",
            err.message()
        );
        assert!(!s.replicas()[0].1, "the replica stays marked healthy");
    }

    #[tokio::test]
    async fn an_expired_deadline_is_deadline_exceeded() {
        let s = Stage::connect("vae", "http://127.0.0.1:9", timeouts())
            .await
            .unwrap();
        let past = Instant::now() - Duration::from_millis(1);
        let err = s
            .call("decode", Some(past), |ch, t| async move {
                vae(ch)
                    .info(request(sd_proto::stage::VaeServiceInfoRequest {}, t))
                    .await
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded);
    }

    #[test]
    fn retry_budget_drains_and_refills() {
        let b = RetryBudget::new();
        let granted = (0..20).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 10);
        for _ in 0..5 {
            b.deposit();
        }
        assert!(b.withdraw());
        assert!(!b.withdraw());
    }
}
