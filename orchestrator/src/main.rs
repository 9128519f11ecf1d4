//! `sd-orchestrator`: the public image-generation API.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = sd_orchestrator::server::Args::parse();
    sd_server::init_logging(&args.log);
    let listener = sd_server::bind(args.listen, "sd-orchestrator").await?;
    sd_orchestrator::server::run(args.orchestrator, listener, sd_server::shutdown_signal()).await
}
