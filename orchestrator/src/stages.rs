//! Clients for the three model stages.
//!
//! Each stage address is a comma-separated list of `http://host:port` endpoints; a host name
//! that resolves to several addresses (a Kubernetes headless Service) becomes one channel per
//! address, because HTTP/2 multiplexes every call over one connection and a single channel
//! would pin all traffic to one replica. Calls rotate over the channels; a call that fails
//! with UNAVAILABLE (replica down, connection refused) is retried on the next replica, so a
//! replica dying mid-generation costs one retried step, not the generation.

use sd_proto::stage::{
    denoiser_service_client::DenoiserServiceClient,
    text_encoder_service_client::TextEncoderServiceClient, vae_service_client::VaeServiceClient,
};
use std::{
    future::Future,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};
use tonic::{
    Code, Status,
    transport::{Channel, Endpoint},
};

/// Timeouts applied to every stage channel.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Establishing a connection; bounds how long a down stage takes to report UNAVAILABLE.
    pub connect: Duration,
    /// One call (one denoise step, one decode).
    pub request: Duration,
}

/// One model stage: its name (used in every error) and a channel per replica.
pub struct Stage {
    name: &'static str,
    replicas: Vec<Replica>,
    next: AtomicUsize,
}

struct Replica {
    address: String,
    channel: Channel,
}

/// Why a stage address list was refused.
#[derive(Debug, thiserror::Error)]
#[error("--{stage}: {message}")]
pub struct AddressError {
    stage: &'static str,
    message: String,
}

impl Stage {
    /// Builds channels for `addresses` (comma-separated URLs). Host names are resolved now;
    /// one that does not resolve yet keeps a single channel that resolves on connect.
    pub async fn connect(
        name: &'static str,
        addresses: &str,
        timeouts: Timeouts,
    ) -> Result<Self, AddressError> {
        let err = |message: String| AddressError {
            stage: name,
            message,
        };
        let mut replicas = Vec::new();
        for raw in addresses
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let uri: http::Uri = raw
                .parse()
                .map_err(|e| err(format!("{raw:?} is not a URL: {e}")))?;
            let scheme = uri.scheme_str().unwrap_or("");
            if scheme != "http" && scheme != "https" {
                return Err(err(format!("{raw:?}: expected http://host:port")));
            }
            let host = uri.host().ok_or_else(|| err(format!("{raw:?}: no host")))?;
            let port = uri
                .port_u16()
                .ok_or_else(|| err(format!("{raw:?}: no port")))?;
            let addresses: Vec<String> = match tokio::net::lookup_host((host, port)).await {
                Ok(resolved) if host.parse::<std::net::IpAddr>().is_err() => {
                    let mut all: Vec<String> =
                        resolved.map(|a| format!("{scheme}://{a}")).collect();
                    all.sort();
                    all.dedup();
                    if all.is_empty() {
                        vec![raw.to_string()]
                    } else {
                        all
                    }
                }
                _ => vec![raw.to_string()],
            };
            for address in addresses {
                let endpoint = Endpoint::from_shared(address.clone())
                    .map_err(|e| err(format!("{address:?}: {e}")))?
                    .connect_timeout(timeouts.connect)
                    .timeout(timeouts.request)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_while_idle(true);
                replicas.push(Replica {
                    address,
                    channel: endpoint.connect_lazy(),
                });
            }
        }
        if replicas.is_empty() {
            return Err(err("no endpoint given".into()));
        }
        Ok(Self {
            name,
            replicas,
            next: AtomicUsize::new(0),
        })
    }

    /// The stage's name, as errors mention it.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Calls `f` on a replica, moving on to the next one when a replica is unreachable; each
    /// replica is tried at most once. Errors become statuses that name the stage.
    pub async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, Status>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = None;
        for i in 0..self.replicas.len() {
            let replica = &self.replicas[(start + i) % self.replicas.len()];
            match f(replica.channel.clone()).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if status.code() == Code::Unavailable => {
                    tracing::debug!(stage = self.name, replica = %replica.address, "{what}: {}", status.message());
                    last = Some((replica.address.clone(), status));
                }
                Err(status) => return Err(self.annotate(what, &replica.address, status)),
            }
        }
        let (address, status) = last.expect("at least one replica");
        Err(self.annotate(what, &address, status))
    }

    /// Prefixes a stage's status with where it came from. The code is kept, except that
    /// transport failures (which tonic reports as UNKNOWN or CANCELLED on a reset connection)
    /// become UNAVAILABLE.
    fn annotate(&self, what: &str, address: &str, status: Status) -> Status {
        let code = match status.code() {
            Code::Unknown if status.message().contains("transport") => Code::Unavailable,
            c => c,
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

/// A text-encoder client on `channel` with the system's message limits.
pub fn text_encoder(channel: Channel) -> TextEncoderServiceClient<Channel> {
    TextEncoderServiceClient::new(channel)
        .max_decoding_message_size(sd_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(sd_proto::MAX_MESSAGE_BYTES)
}

/// A denoiser client on `channel` with the system's message limits.
pub fn denoiser(channel: Channel) -> DenoiserServiceClient<Channel> {
    DenoiserServiceClient::new(channel)
        .max_decoding_message_size(sd_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(sd_proto::MAX_MESSAGE_BYTES)
}

/// A VAE client on `channel` with the system's message limits.
pub fn vae(channel: Channel) -> VaeServiceClient<Channel> {
    VaeServiceClient::new(channel)
        .max_decoding_message_size(sd_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(sd_proto::MAX_MESSAGE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts() -> Timeouts {
        Timeouts {
            connect: Duration::from_millis(500),
            request: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn parses_lists_and_refuses_bad_addresses() {
        let s = Stage::connect("vae", "http://127.0.0.1:1, http://127.0.0.1:2", timeouts())
            .await
            .unwrap();
        assert_eq!(s.replicas.len(), 2);
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
    async fn localhost_resolves_to_channels() {
        let s = Stage::connect("denoiser", "http://localhost:50062", timeouts())
            .await
            .unwrap();
        assert!(!s.replicas.is_empty());
        assert!(s.replicas.iter().all(|r| !r.address.contains("localhost")));
    }

    #[tokio::test]
    async fn down_stage_is_unavailable_and_named() {
        // Bind then drop a listener to get a port nobody listens on.
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
            .call("info", |ch| async move {
                text_encoder(ch)
                    .info(sd_proto::stage::TextEncoderServiceInfoRequest {})
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
    }
}
