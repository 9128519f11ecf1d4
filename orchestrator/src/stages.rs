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
//! outstanding calls). A caller may name a preferred replica (a generation's denoising steps
//! name the one that served its previous step, where its text context is cached); it gets the
//! call while it is no busier than that choice. A replica that fails with UNAVAILABLE is
//! marked unhealthy and skipped until it answers a gRPC health check with SERVING; the call is
//! retried on another replica within the request's deadline, as long as the retry budget
//! allows (retries are at most a fraction of successful calls, so a dead cluster does not
//! cause a retry storm).
//!
//! Replicas prove what they serve before they get work. Once a [`Probe`] is installed (the
//! pipeline installs one reading each stage's Info RPC), a replica is in rotation only after it
//! reported the stage's established [`Identity`] (model id and revision, fixed at start-up by
//! [`Stage::establish`]). Replicas that appear later, or did not answer at start-up, are probed
//! until they answer; one serving another model or revision is kept out of rotation, logged,
//! and re-probed every resolve interval, so a fixed replica joins.

use sd_proto::stage::{
    denoiser_service_client::DenoiserServiceClient,
    text_encoder_service_client::TextEncoderServiceClient, vae_service_client::VaeServiceClient,
};
use sd_server::telemetry::{Inject, metrics::Orchestrator as Metrics};
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::task::JoinSet;
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

/// What a replica says it serves: every replica of a stage must report the same.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The model's name (`--model-id`), the same across the stages of one model.
    pub model_id: String,
    /// Fingerprint of the stage's component (config and weight layout).
    pub revision: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = if self.model_id.is_empty() {
            "(no model id)"
        } else {
            &self.model_id
        };
        let revision = if self.revision.is_empty() {
            "(none)"
        } else {
            &self.revision
        };
        write!(f, "{id} revision {revision}")
    }
}

/// What a [`Probe`] returns.
pub type ProbeFuture = Pin<Box<dyn Future<Output = Result<Identity, Status>> + Send>>;

/// Reads what the replica on a channel serves (its Info RPC), within a timeout.
pub type Probe = Arc<dyn Fn(Traced, Duration) -> ProbeFuture + Send + Sync>;

/// A replica's verification state (see the module docs).
const UNCHECKED: u8 = 0;
const VERIFIED: u8 = 1;
const REJECTED: u8 = 2;

/// One replica of a stage.
struct Replica {
    address: String,
    channel: Channel,
    outstanding: AtomicUsize,
    healthy: AtomicBool,
    /// UNCHECKED, VERIFIED or REJECTED: only verified replicas get work.
    check: AtomicU8,
    /// What it last reported when that was not the stage's identity (logged once per value).
    rejected_as: Mutex<Option<Identity>>,
    /// A probe of it is under way.
    probing: AtomicBool,
}

/// A stage: its name (used in every error) and its replicas.
pub struct Stage {
    name: &'static str,
    entries: Vec<Entry>,
    replicas: RwLock<Vec<Arc<Replica>>>,
    timeouts: Timeouts,
    budget: RetryBudget,
    metrics: Metrics,
    /// Set: replicas must pass it before they get work.
    probe: OnceLock<Probe>,
    /// What every replica must report, once known.
    established: RwLock<Option<Identity>>,
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
            probe: OnceLock::new(),
            established: RwLock::new(None),
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

    /// Addresses of the replicas that get work (verified, healthy or not).
    pub fn in_rotation(&self) -> Vec<String> {
        self.read()
            .iter()
            .filter(|r| r.check.load(Ordering::Relaxed) == VERIFIED)
            .map(|r| r.address.clone())
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Replica>>> {
        self.replicas.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes replicas prove what they serve: from now on a replica gets work only once `probe`
    /// reported the identity given to [`Stage::establish`]. The current replicas wait for that
    /// too. Only the first probe installed counts.
    pub fn set_probe(&self, probe: Probe) {
        if self.probe.set(probe).is_ok() {
            for replica in self.read().iter() {
                replica.check.store(UNCHECKED, Ordering::Relaxed);
            }
        }
    }

    /// The identity every replica must report, once established.
    pub fn established(&self) -> Option<Identity> {
        self.established
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Fixes the identity every replica must report and puts `verified` (replicas seen to
    /// report it) in rotation. The others are probed by [`Stage::maintain`].
    pub fn establish(&self, identity: Identity, verified: &[String]) {
        *self.established.write().unwrap_or_else(|e| e.into_inner()) = Some(identity);
        for replica in self.read().iter() {
            if verified.contains(&replica.address) {
                replica.healthy.store(true, Ordering::Relaxed);
                replica.check.store(VERIFIED, Ordering::Relaxed);
            }
        }
    }

    /// Calls `f(channel, timeout)` once on every current replica at once, whatever its health
    /// or verification, with the stage timeout; returns each replica's address and outcome,
    /// errors annotated with the stage and replica. Unreachable replicas are marked unhealthy.
    pub async fn call_each<T, F, Fut>(
        &self,
        what: &'static str,
        f: F,
    ) -> Vec<(String, Result<T, Status>)>
    where
        F: Fn(Traced, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>> + Send + 'static,
        T: Send + 'static,
    {
        let replicas: Vec<Arc<Replica>> = self.read().clone();
        let mut calls = JoinSet::new();
        for (i, replica) in replicas.iter().enumerate() {
            let call = f(
                InterceptedService::new(replica.channel.clone(), Inject),
                self.timeouts.request,
            );
            calls.spawn(async move {
                let started = Instant::now();
                let outcome = call.await;
                (i, outcome, started.elapsed())
            });
        }
        let mut outcomes: Vec<Option<Result<T, Status>>> = std::iter::repeat_with(|| None)
            .take(replicas.len())
            .collect();
        while let Some(joined) = calls.join_next().await {
            let Ok((i, outcome, elapsed)) = joined else {
                continue;
            };
            let code = outcome.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
            self.metrics
                .record_stage_call(self.name, what, elapsed, code);
            let replica = &replicas[i];
            outcomes[i] = Some(match outcome {
                Ok(response) => Ok(response.into_inner()),
                Err(status) => {
                    if is_unreachable(&status) {
                        replica.healthy.store(false, Ordering::Relaxed);
                    }
                    Err(self.annotate(what, &replica.address, status))
                }
            });
        }
        replicas
            .iter()
            .zip(outcomes)
            .map(|(r, outcome)| {
                let outcome = outcome.unwrap_or_else(|| {
                    Err(Status::internal(format!(
                        "{} ({what}): call task failed",
                        self.name
                    )))
                });
                (r.address.clone(), outcome)
            })
            .collect()
    }

    /// Probes the replicas awaiting a check (and with `rejected` the rejected ones too) and
    /// puts those reporting the established identity in rotation; a replica reporting another
    /// is kept out with an error log naming both. Does nothing without a probe or before
    /// [`Stage::establish`].
    pub async fn verify(&self, rejected: bool) {
        let (Some(probe), Some(expected)) = (self.probe.get(), self.established()) else {
            return;
        };
        // A replica already being probed (by an earlier round that waits on a slow or
        // unreachable one) is left to that probe.
        let todo: Vec<Arc<Replica>> = self
            .read()
            .iter()
            .filter(|r| match r.check.load(Ordering::Relaxed) {
                UNCHECKED => true,
                REJECTED => rejected,
                _ => false,
            })
            .filter(|r| !r.probing.swap(true, Ordering::Relaxed))
            .cloned()
            .collect();
        let mut probes = JoinSet::new();
        for replica in todo {
            let call = probe(
                InterceptedService::new(replica.channel.clone(), Inject),
                self.timeouts.request,
            );
            probes.spawn(async move {
                let outcome = call.await;
                replica.probing.store(false, Ordering::Relaxed);
                (replica, outcome)
            });
        }
        while let Some(joined) = probes.join_next().await {
            if let Ok((replica, outcome)) = joined {
                self.judge(&replica, &expected, outcome);
            }
        }
    }

    /// Applies a probe's outcome to `replica`; returns whether it is verified.
    fn judge(
        &self,
        replica: &Replica,
        expected: &Identity,
        outcome: Result<Identity, Status>,
    ) -> bool {
        match outcome {
            Ok(seen) if seen == *expected => {
                replica.healthy.store(true, Ordering::Relaxed);
                *replica
                    .rejected_as
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
                if replica.check.swap(VERIFIED, Ordering::Relaxed) != VERIFIED {
                    tracing::info!(
                        stage = self.name,
                        replica = %replica.address,
                        "replica serves {seen}: in rotation"
                    );
                }
                true
            }
            Ok(seen) => {
                replica.check.store(REJECTED, Ordering::Relaxed);
                let mut last = replica
                    .rejected_as
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if last.as_ref() != Some(&seen) {
                    tracing::error!(
                        stage = self.name,
                        replica = %replica.address,
                        "{} replica {} serves {seen} but the stage serves {expected}: kept out \
                         of rotation (re-checked every resolve interval)",
                        self.name,
                        replica.address
                    );
                    *last = Some(seen);
                }
                false
            }
            Err(status) => {
                tracing::debug!(
                    stage = self.name,
                    replica = %replica.address,
                    "model check: {}",
                    status.message()
                );
                false
            }
        }
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
                        .max_frame_size(sd_proto::MAX_FRAME_BYTES)
                        .http2_keep_alive_interval(Duration::from_secs(30))
                        .keep_alive_while_idle(true)
                        .connect_lazy();
                    tracing::info!(stage = self.name, replica = %address, "replica added");
                    let check = if self.probe.get().is_some() {
                        UNCHECKED
                    } else {
                        VERIFIED
                    };
                    next.push(Arc::new(Replica {
                        address,
                        channel,
                        outstanding: AtomicUsize::new(0),
                        healthy: AtomicBool::new(true),
                        check: AtomicU8::new(check),
                        rejected_as: Mutex::new(None),
                        probing: AtomicBool::new(false),
                    }));
                }
                Err(e) => tracing::warn!(stage = self.name, "{address}: {e}"),
            }
        }
        *self.replicas.write().unwrap_or_else(|e| e.into_inner()) = next;
    }

    /// Until the process ends: re-resolves the entries, probes replicas awaiting their model
    /// check (rejected ones every resolve interval, see [`Stage::verify`]) and health-checks
    /// unhealthy verified replicas. One coming back is probed again before it gets work.
    pub async fn maintain(self: Arc<Self>) {
        let mut last_resolve = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let resolved = last_resolve.elapsed() >= self.timeouts.resolve_interval;
            if resolved {
                self.resolve().await;
                last_resolve = Instant::now();
            }
            // Probes run in the background (each replica at most once at a time), so that a
            // slow or unreachable replica holds up neither the others nor resolution and
            // health checks.
            let stage = self.clone();
            let rejected = resolved;
            tokio::spawn(async move { stage.verify(rejected).await });
            let sick: Vec<Arc<Replica>> = self
                .read()
                .iter()
                .filter(|r| {
                    !r.healthy.load(Ordering::Relaxed)
                        && r.check.load(Ordering::Relaxed) == VERIFIED
                })
                .cloned()
                .collect();
            for replica in sick {
                let mut client = HealthClient::new(replica.channel.clone());
                let mut request = tonic::Request::new(HealthCheckRequest {
                    service: String::new(),
                });
                request.set_timeout(self.timeouts.connect);
                let serving = client
                    .check(request)
                    .await
                    .is_ok_and(|reply| reply.into_inner().status == ServingStatus::Serving as i32);
                if !serving {
                    continue;
                }
                // It may have come back serving something else (a restart at the same address).
                if let (Some(probe), Some(expected)) = (self.probe.get(), self.established()) {
                    let outcome = probe(
                        InterceptedService::new(replica.channel.clone(), Inject),
                        self.timeouts.connect,
                    )
                    .await;
                    if !self.judge(&replica, &expected, outcome) {
                        continue;
                    }
                }
                replica.healthy.store(true, Ordering::Relaxed);
                tracing::info!(stage = self.name, replica = %replica.address, "replica healthy again");
            }
        }
    }

    /// A replica for the next call: power of two choices by outstanding calls among the
    /// healthy, verified replicas not yet tried (all verified ones when none is healthy).
    /// `prefer` (the replica that served the caller's previous call) wins when it is in that
    /// pool and no busier than the choice: a generation's steps stay where its context is
    /// cached, but move as soon as another replica is less loaded.
    fn pick(&self, tried: &[String], prefer: Option<&str>) -> Option<Arc<Replica>> {
        let replicas = self.read();
        let fresh: Vec<&Arc<Replica>> = replicas
            .iter()
            .filter(|r| r.check.load(Ordering::Relaxed) == VERIFIED && !tried.contains(&r.address))
            .collect();
        let healthy: Vec<&Arc<Replica>> = fresh
            .iter()
            .copied()
            .filter(|r| r.healthy.load(Ordering::Relaxed))
            .collect();
        let pool = if healthy.is_empty() { fresh } else { healthy };
        let load = |r: &Replica| r.outstanding.load(Ordering::Relaxed);
        let chosen = match pool.len() {
            0 => return None,
            1 => pool[0],
            n => {
                let a = rand::random_range(0..n);
                let b = (a + rand::random_range(1..n)) % n;
                let (ra, rb) = (pool[a], pool[b]);
                if load(rb) < load(ra) { rb } else { ra }
            }
        };
        let preferred = prefer.and_then(|address| pool.iter().find(|r| r.address == address));
        Some(match preferred {
            Some(p) if load(p) <= load(chosen) => (*p).clone(),
            _ => chosen.clone(),
        })
    }

    /// Calls `f(channel, timeout)` on a replica, failing over to others on UNAVAILABLE within
    /// `deadline`. `timeout` is what the call may take (the stage timeout, or less when the
    /// deadline is nearer). Errors become statuses that name the stage and replica. Returns
    /// the response and the address of the replica that gave it.
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
        self.call_on(what, deadline, None, |_, ch, timeout| f(ch, timeout))
            .await
    }

    /// [`Stage::call`] whose `f` also gets the chosen replica's address, for a caller that
    /// keeps per-replica state across calls (a generation's open step stream), preferring the
    /// replica at address `prefer` while it is healthy and no busier than the balancer's
    /// choice (see [`Stage::pick`]). A preference, not a session: failover and balancing work
    /// as for any call.
    pub async fn call_on<T, F, Fut>(
        &self,
        what: &'static str,
        deadline: Option<Instant>,
        prefer: Option<&str>,
        f: F,
    ) -> Result<(T, String), Status>
    where
        F: Fn(String, Traced, Duration) -> Fut,
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
            let Some(replica) = self.pick(&tried, prefer) else {
                let waiting = self.out_of_rotation();
                let why = match (tried.is_empty(), waiting) {
                    (true, None) => "no replica known".to_string(),
                    (true, Some(waiting)) => format!("no replica in rotation ({waiting})"),
                    (false, None) => format!("no replica left after trying {}", tried.join(", ")),
                    (false, Some(waiting)) => format!(
                        "no replica left after trying {} ({waiting})",
                        tried.join(", ")
                    ),
                };
                return Err(Status::unavailable(format!(
                    "{} stage unavailable ({what}): {why}",
                    self.name
                )));
            };
            replica.outstanding.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let outcome = f(
                replica.address.clone(),
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

    /// `"N awaiting their model check, M serving another model or revision"`, or `None` when
    /// every replica is in rotation.
    fn out_of_rotation(&self) -> Option<String> {
        let replicas = self.read();
        let count = |state| {
            replicas
                .iter()
                .filter(|r| r.check.load(Ordering::Relaxed) == state)
                .count()
        };
        let mut parts = Vec::new();
        match count(UNCHECKED) {
            0 => {}
            n => parts.push(format!("{n} awaiting their model check")),
        }
        match count(REJECTED) {
            0 => {}
            n => parts.push(format!("{n} serving another model or revision")),
        }
        (!parts.is_empty()).then(|| parts.join(", "))
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

    /// An endpoint file with `contents` in a fresh temporary folder (kept while the first
    /// value lives).
    fn endpoint_file(contents: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("denoisers.txt");
        std::fs::write(&file, contents).unwrap();
        (dir, file)
    }

    /// A denoiser stage whose replicas are listed in `file`.
    async fn denoisers_from(file: &std::path::Path) -> Arc<Stage> {
        Stage::connect(
            "denoiser",
            &format!("file://{}", file.display()),
            timeouts(),
        )
        .await
        .unwrap()
    }

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
        let (_dir, file) = endpoint_file("# replicas\nhttp://127.0.0.1:7001\n");
        let s = denoisers_from(&file).await;
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

    fn id(model_id: &str, revision: &str) -> Identity {
        Identity {
            model_id: model_id.into(),
            revision: revision.into(),
        }
    }

    /// A probe that ignores the channel and reports whatever `seen` holds, counting calls.
    fn fake_probe(seen: Arc<Mutex<Identity>>, calls: Arc<AtomicUsize>) -> Probe {
        Arc::new(move |_, _| {
            calls.fetch_add(1, Ordering::Relaxed);
            let seen = seen.lock().unwrap().clone();
            Box::pin(async move { Ok(seen) })
        })
    }

    #[test]
    fn identities_print_model_and_revision() {
        assert_eq!(id("sd", "00ff").to_string(), "sd revision 00ff");
        assert_eq!(
            Identity::default().to_string(),
            "(no model id) revision (none)"
        );
    }

    #[tokio::test]
    async fn without_a_probe_every_replica_is_in_rotation() {
        let s = Stage::connect("vae", "http://127.0.0.1:1,http://127.0.0.1:2", timeouts())
            .await
            .unwrap();
        assert_eq!(s.in_rotation().len(), 2);
        // verify() is a no-op without a probe.
        s.verify(true).await;
        assert_eq!(s.in_rotation().len(), 2);
    }

    #[tokio::test]
    async fn the_preferred_replica_wins_only_while_no_busier() {
        let (a, b) = ("http://127.0.0.1:1", "http://127.0.0.1:2");
        let s = Stage::connect("denoiser", &format!("{a},{b}"), timeouts())
            .await
            .unwrap();
        let picked = |tried: &[String], prefer| s.pick(tried, prefer).unwrap().address.clone();
        let set_load = |address: &str, n| {
            let replicas = s.read();
            let r = replicas.iter().find(|r| r.address == address).unwrap();
            r.outstanding.store(n, Ordering::Relaxed);
        };
        // Equally loaded: the caller's previous replica, every time.
        for _ in 0..50 {
            assert_eq!(picked(&[], Some(b)), b);
        }
        // Busier than the other: the balancer's choice instead.
        set_load(b, 2);
        assert_eq!(picked(&[], Some(b)), a);
        // Tried already (it failed this call): never.
        set_load(b, 0);
        assert_eq!(picked(&[b.to_string()], Some(b)), a);
        // A preference for a replica that is not in rotation changes nothing.
        set_load(a, 1);
        assert_eq!(picked(&[], Some("http://127.0.0.1:3")), b);
    }

    #[tokio::test]
    async fn unverified_replicas_get_no_work() {
        let s = Stage::connect("denoiser", "http://127.0.0.1:9", timeouts())
            .await
            .unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        s.set_probe(fake_probe(
            Arc::new(Mutex::new(id("m", "r"))),
            calls.clone(),
        ));
        assert!(s.in_rotation().is_empty());
        // Nothing is probed before the stage's identity is established.
        s.verify(true).await;
        assert_eq!(calls.load(Ordering::Relaxed), 0);
        let err = s
            .call("denoise", None, |ch, t| async move {
                vae(ch)
                    .info(request(sd_proto::stage::VaeServiceInfoRequest {}, t))
                    .await
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(
            err.message(),
            "denoiser stage unavailable (denoise): no replica in rotation (1 awaiting their \
             model check)"
        );
    }

    #[tokio::test]
    async fn replicas_added_later_join_only_when_they_serve_the_established_revision() {
        let (_dir, file) = endpoint_file("http://127.0.0.1:7001\n");
        let s = denoisers_from(&file).await;
        let seen = Arc::new(Mutex::new(id("m", "bbbb")));
        let calls = Arc::new(AtomicUsize::new(0));
        s.set_probe(fake_probe(seen.clone(), calls.clone()));
        s.establish(id("m", "aaaa"), &["http://127.0.0.1:7001".to_string()]);
        assert_eq!(s.in_rotation(), ["http://127.0.0.1:7001"]);

        // A new replica waits for its check; serving another revision, it is kept out.
        std::fs::write(&file, "http://127.0.0.1:7001\nhttp://127.0.0.1:7002\n").unwrap();
        s.resolve().await;
        assert_eq!(s.replicas().len(), 2);
        assert_eq!(s.in_rotation(), ["http://127.0.0.1:7001"]);
        s.verify(false).await;
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert_eq!(s.in_rotation(), ["http://127.0.0.1:7001"]);
        assert_eq!(
            s.out_of_rotation().as_deref(),
            Some("1 serving another model or revision")
        );
        // Rejected replicas are only re-checked when asked (every resolve interval).
        s.verify(false).await;
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        s.verify(true).await;
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        assert_eq!(s.in_rotation(), ["http://127.0.0.1:7001"]);
        // Another model id with the right revision is no better.
        *seen.lock().unwrap() = id("other", "aaaa");
        s.verify(true).await;
        assert_eq!(s.in_rotation(), ["http://127.0.0.1:7001"]);

        // Fixed, it joins the rotation.
        *seen.lock().unwrap() = id("m", "aaaa");
        s.verify(true).await;
        assert_eq!(
            s.in_rotation(),
            ["http://127.0.0.1:7001", "http://127.0.0.1:7002"]
        );
        assert_eq!(s.out_of_rotation(), None);
        // Verified replicas are not probed again.
        assert_eq!(calls.load(Ordering::Relaxed), 4);
        s.verify(true).await;
        assert_eq!(calls.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn call_each_reaches_every_replica_and_names_failures() {
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let list = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let s = Stage::connect("vae", &list, timeouts()).await.unwrap();
        let outcomes = s
            .call_each("info", |ch, t| async move {
                vae(ch)
                    .info(request(sd_proto::stage::VaeServiceInfoRequest {}, t))
                    .await
            })
            .await;
        // In the stage's replica order (addresses sorted).
        let mut expected: Vec<String> = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        expected.sort();
        assert_eq!(outcomes.len(), 2);
        for ((address, outcome), want) in outcomes.iter().zip(&expected) {
            assert_eq!(address, want);
            let err = outcome.as_ref().unwrap_err();
            assert_eq!(err.code(), Code::Unavailable);
            assert!(
                err.message().contains(address.as_str()),
                "{}",
                err.message()
            );
        }
        assert!(s.replicas().iter().all(|(_, healthy)| !healthy));
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
