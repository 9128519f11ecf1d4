//! `sd-denoiser`: the U-Net denoiser stage as a gRPC server.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = sd_denoiser::Args::parse();
    let telemetry = sd_server::telemetry::init("sd-denoiser", &args.log).await?;
    let listener = sd_server::bind(args.listen, "sd-denoiser").await?;
    let outcome = sd_denoiser::run(
        args.stage,
        args.batch,
        listener,
        sd_server::shutdown_signal(),
    )
    .await;
    telemetry.shutdown().await;
    outcome
}
