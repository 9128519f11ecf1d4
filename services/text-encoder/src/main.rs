//! `sd-text-encoder`: the CLIP text-encoder stage as a gRPC server.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = sd_text_encoder::Args::parse();
    let telemetry = sd_server::telemetry::init("sd-text-encoder", &args.log).await?;
    let listener = sd_server::bind(args.listen, "sd-text-encoder").await?;
    let outcome = sd_text_encoder::run(
        args.stage,
        args.batch,
        listener,
        sd_server::shutdown_signal(),
    )
    .await;
    telemetry.shutdown().await;
    outcome
}
