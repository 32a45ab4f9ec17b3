//! `llava-data`: offline preprocessing for LLaVA-NeXT training.

mod cli;

use clap::{Parser, Subcommand};

/// Turns LLaVA JSON/JSONL + image folders into pre-tiled, pre-tokenized training shards, exactly
/// as the reference LLaVA-NeXT code would feed them to the model, with bad samples reported
/// instead of silently swapped.
#[derive(Parser)]
#[command(name = "llava-data", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what each record of one JSON/JSONL file becomes: token ids, labels, tiles (one JSON
    /// line per record).
    Convert(cli::convert::ConvertArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Convert(args) => cli::convert::run(args),
    }
}
