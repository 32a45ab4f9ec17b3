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
    /// Build a datasets.toml mixture into length-grouped Parquet shards + manifest.json.
    Build(cli::build::BuildArgs),
    /// Join the partitions of a `build --partition i/N` into one manifest.
    Merge(cli::build::MergeArgs),
    /// Show what each record of one JSON/JSONL file becomes: token ids, labels, tiles (one JSON
    /// line per record).
    Convert(cli::convert::ConvertArgs),
    /// See and verify a build: summary (counts, lengths, grids, rejects, padding), one sample as
    /// the model sees it, its tiles as a picture, a length plot, or a check of every shard.
    Inspect(cli::inspect::InspectArgs),
    /// Measure build throughput on a generated mixture (decode, convert and build in one run).
    Bench(cli::bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Log lines go to stderr with any progress bar cleared first: never on a bar's line.
        .with_writer(llava_formats::progress::LogWriter::default)
        // Colours only on a terminal, and never with NO_COLOR (https://no-color.org).
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    let result = match Cli::parse().command {
        Command::Build(args) => cli::build::run_build(args),
        Command::Merge(args) => cli::build::run_merge(args),
        Command::Convert(args) => cli::convert::run(args),
        Command::Inspect(args) => cli::inspect::run(args),
        Command::Bench(args) => cli::bench::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Each cause once: wrappers that already print their source are not repeated.
            eprintln!("{}", llava_formats::located::error_report(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
