//! `sd-vae`: the VAE decoder stage as a gRPC server.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = sd_vae::Args::parse();
    sd_server::init_logging(&args.log);
    let listener = sd_server::bind(args.listen, "sd-vae").await?;
    sd_vae::run(args.stage, listener, sd_server::shutdown_signal()).await
}
