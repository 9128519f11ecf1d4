//! The life cycle every model stage shares: serve health (NOT_SERVING) at once, load the
//! weights and run a warm-up forward on the worker thread, then flip to SERVING. A load that
//! fails ends `run` with the error (naming the file), so the process exits at start-up.

use sd_models::ModelError;
use sd_server::Health;
use sd_server::TracedRouter as Router;
use std::future::Future;
use tokio::{net::TcpListener, sync::oneshot};

/// Serves `router` on `listener` while the model loads; returns when `shutdown` resolves, or
/// with an error when loading fails.
pub async fn serve_stage(
    stage: &'static str,
    router: Router,
    listener: TcpListener,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
    loaded: oneshot::Receiver<Result<(), ModelError>>,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut server = tokio::spawn(sd_server::serve(router, listener, health.clone(), shutdown));
    tokio::select! {
        outcome = loaded => match outcome {
            Ok(Ok(())) => {
                health.set_serving().await;
                tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "{stage} ready");
            }
            Ok(Err(e)) => {
                server.abort();
                anyhow::bail!("{stage}: cannot load the model: {e}");
            }
            Err(_) => {
                server.abort();
                anyhow::bail!("{stage}: the model worker thread died while loading");
            }
        },
        served = &mut server => return served?,
    }
    server.await?
}
