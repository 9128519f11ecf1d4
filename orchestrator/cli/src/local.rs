//! `--local`: the three stages and the orchestrator in this process, each on its own loopback
//! port, talking gRPC exactly as they do when deployed apart.

use anyhow::Context;
use sd_runtime::{BatchArgs as StageBatchArgs, StageArgs};
use std::{future::Future, path::Path, pin::Pin, time::Duration};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

type Service = JoinHandle<anyhow::Result<()>>;

/// The running services.
pub struct Cluster {
    orchestrator: std::net::SocketAddr,
    stop: watch::Sender<bool>,
    services: Vec<(&'static str, Service)>,
}

/// How long to wait for the stages to load their weights.
const READY_TIMEOUT: Duration = Duration::from_secs(600);

fn stopped(rx: watch::Receiver<bool>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    let mut rx = rx;
    Box::pin(async move {
        let _ = rx.wait_for(|stop| *stop).await;
    })
}

impl Cluster {
    /// Starts everything and waits until the orchestrator reports SERVING (every stage loaded
    /// and warmed up). A stage that fails to load ends this with its error.
    pub async fn start(model: &Path, device: &str, dtype: &str) -> anyhow::Result<Self> {
        let denoiser = sd_denoiser::BatchArgs::default();
        Self::start_with(model, device, dtype, denoiser, StageBatchArgs::default()).await
    }

    /// [`Cluster::start`] with the denoiser's batching and cache settings, and the text
    /// encoder's and VAE's batching settings.
    pub async fn start_with(
        model: &Path,
        device: &str,
        dtype: &str,
        batch: sd_denoiser::BatchArgs,
        stage_batch: StageBatchArgs,
    ) -> anyhow::Result<Self> {
        let stage = StageArgs {
            model: model.to_path_buf(),
            model_id: None,
            device: device
                .parse()
                .map_err(anyhow::Error::msg)
                .context("--device")?,
            dtype: dtype
                .parse()
                .map_err(anyhow::Error::msg)
                .context("--dtype")?,
            max_queue: 64,
        };
        let (stop, rx) = watch::channel(false);
        let bind = || TcpListener::bind("127.0.0.1:0");
        let (te, dn, vae, orch) = (bind().await?, bind().await?, bind().await?, bind().await?);
        let url = |l: &TcpListener| l.local_addr().map(|a| format!("http://{a}"));
        let mut args =
            <sd_orchestrator::server::OrchestratorArgs as clap::FromArgMatches>::from_arg_matches(
                &<sd_orchestrator::server::OrchestratorArgs as clap::Args>::augment_args(
                    clap::Command::new("sd"),
                )
                .get_matches_from(["sd"]),
            )?;
        args.text_encoder = url(&te)?;
        args.denoiser = url(&dn)?;
        args.vae = url(&vae)?;
        args.max_concurrent_generations = 64;
        let orchestrator = orch.local_addr()?;
        let services = vec![
            (
                "text-encoder",
                tokio::spawn(sd_text_encoder::run(
                    stage.clone(),
                    stage_batch.clone(),
                    te,
                    stopped(rx.clone()),
                )),
            ),
            (
                "denoiser",
                tokio::spawn(sd_denoiser::run(
                    stage.clone(),
                    batch,
                    dn,
                    stopped(rx.clone()),
                )),
            ),
            (
                "vae",
                tokio::spawn(sd_vae::run(stage, stage_batch, vae, stopped(rx.clone()))),
            ),
            (
                "orchestrator",
                tokio::spawn(sd_orchestrator::server::run(args, orch, stopped(rx))),
            ),
        ];
        let mut cluster = Self {
            orchestrator,
            stop,
            services,
        };
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// The orchestrator's URL.
    pub fn orchestrator_url(&self) -> String {
        format!("http://{}", self.orchestrator)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(i) = self.services.iter().position(|(_, s)| s.is_finished()) {
                // A service ended during start-up (a model folder that does not load, say):
                // stop the others and surface its error.
                self.stop.send_replace(true);
                let (name, service) = self.services.remove(i);
                return Err(match service.await {
                    Ok(Ok(())) => anyhow::anyhow!("{name} stopped during start-up"),
                    Ok(Err(e)) => e.context(format!("{name} failed to start")),
                    Err(e) => anyhow::anyhow!("{name}: {e}"),
                });
            }
            if self.serving().await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("the local stages were not ready after {READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn serving(&self) -> bool {
        let Ok(channel) = tonic::transport::Endpoint::from_shared(self.orchestrator_url()) else {
            return false;
        };
        let Ok(channel) = channel.connect().await else {
            return false;
        };
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status == ServingStatus::Serving as i32)
            .unwrap_or(false)
    }

    /// Stops every service and waits for them to finish.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        for (name, service) in self.services {
            match service.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("{name}: {e:#}"),
                Err(e) => eprintln!("{name}: {e}"),
            }
        }
    }
}
