//! `sd-text-encoder`: the CLIP text-encoder stage as a gRPC server.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = sd_text_encoder::Args::parse();
    sd_server::init_logging(&args.log);
    let listener = sd_server::bind(args.listen, "sd-text-encoder").await?;
    sd_text_encoder::run(args.stage, listener, sd_server::shutdown_signal()).await
}
