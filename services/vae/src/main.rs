//! `sd-vae`: the VAE decoder stage as a gRPC server.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = sd_vae::Args::parse();
    let telemetry = sd_server::telemetry::init("sd-vae", &args.log).await?;
    let listener = sd_server::bind(args.listen, "sd-vae").await?;
    let outcome = sd_vae::run(
        args.stage,
        args.batch,
        listener,
        sd_server::shutdown_signal(),
    )
    .await;
    telemetry.shutdown().await;
    outcome
}
