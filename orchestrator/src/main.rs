//! `sd-orchestrator`: the public image-generation API.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = sd_orchestrator::server::Args::parse();
    let telemetry = sd_server::telemetry::init("sd-orchestrator", &args.log).await?;
    let listener = sd_server::bind(args.listen, "sd-orchestrator").await?;
    let outcome =
        sd_orchestrator::server::run(args.orchestrator, listener, sd_server::shutdown_signal())
            .await;
    telemetry.shutdown().await;
    outcome
}
