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
    llava_formats::cli::init_logging();
    let result = match Cli::parse().command {
        Command::Build(args) => cli::build::run_build(args),
        Command::Merge(args) => cli::build::run_merge(args),
        Command::Convert(args) => cli::convert::run(args),
        Command::Inspect(args) => cli::inspect::run(args),
        Command::Bench(args) => cli::bench::run(args),
    };
    llava_formats::cli::exit_code(result)
}
