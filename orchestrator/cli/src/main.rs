//! `sd`: the command line of the system.
//!
//! `sd generate` sends one request to an orchestrator (`--orchestrator URL`) and writes the
//! images; with `--local --model DIR` it first starts the three stages and the orchestrator
//! inside this process on loopback ports (the embedded default that needs no cluster) and
//! stops them when done.

mod bench;
mod bench_serve;
mod bench_split;
mod eval;
mod generate;
mod local;
mod tokenize;
mod train;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "sd",
    version,
    about = "Stable Diffusion over gRPC: text in, images out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: sd_server::LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate images from a prompt.
    Generate(generate::GenerateArgs),
    /// Time model components in this process (no gRPC), e.g. `sd bench unet --model DIR`.
    Bench(bench::BenchArgs),
    /// Show a prompt's token ids and vocabulary strings, as the text encoder tokenizes it
    /// (`--bench`: tokenizer throughput).
    Tokenize(tokenize::TokenizeArgs),
    /// Train the default model's architecture from scratch on the synthetic shapes dataset
    /// and write a diffusers folder.
    Train(train::TrainArgs),
    /// Score a model on the shapes dataset's held-out prompts with its pixel classifier.
    Eval(eval::EvalArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // One process, one service name: `sd generate --local` hosts all four services here.
    let telemetry = match sd_server::telemetry::init("sd", &cli.log).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let outcome = match cli.command {
        Command::Generate(args) => generate::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Tokenize(args) => tokenize::run(args),
        // Training is CPU/GPU-bound libtorch work: off the async runtime's threads.
        Command::Train(args) => tokio::task::spawn_blocking(move || train::run(args))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("training thread: {e}"))),
        Command::Eval(args) => eval::run(args).await,
    };
    telemetry.shutdown().await;
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
