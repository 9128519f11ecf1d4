//! `sd-denoiser`: the U-Net denoiser stage as a gRPC server.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = sd_denoiser::Args::parse();
    sd_server::init_logging(&args.log);
    let listener = sd_server::bind(args.listen, "sd-denoiser").await?;
    sd_denoiser::run(args.stage, listener, sd_server::shutdown_signal()).await
}
