//! `llava-trainer`: a thin dispatcher; one module per subcommand under `cli/`.

mod cli;

// Counts live heap bytes for `bench`'s CPU memory figures (llava_trainer::diag::heap).
#[global_allocator]
static ALLOC: llava_trainer::diag::heap::CountingAlloc = llava_trainer::diag::heap::CountingAlloc;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "llava-trainer",
    version,
    about = "Train LLaVA-NeXT on llava-data shards"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure the data loader (or print a rank's plan with --dry-run).
    LoaderBench(cli::loader_bench::Args),
    /// Train on llava-data shards (--config train.toml; every key is also a flag).
    Run(Box<cli::run::Args>),
    /// Write a random (tiny) or assembled model in the HF LlavaNext layout.
    Init(cli::init::Args),
    /// Synthetic training steps of a model shape: tokens/s, MFU, peak memory (JSON).
    Bench(Box<cli::bench::Args>),
    /// The per-device memory a run would need (takes run's flags).
    Plan(Box<cli::plan::Args>),
    /// The model on a device against a fixture's HF goldens (JSON).
    Parity(cli::parity::Args),
    /// What a checkpoint answers: a prompt (+ images) or a JSONL of them, KV-cached decoding.
    Generate(Box<cli::generate::Args>),
}

fn main() -> std::process::ExitCode {
    llava_formats::cli::init_logging();
    let result = match Cli::parse().command {
        Command::LoaderBench(args) => cli::loader_bench::run(args),
        Command::Run(args) => cli::run::run(*args),
        Command::Init(args) => cli::init::run(args),
        Command::Bench(args) => cli::bench::run(*args),
        Command::Plan(args) => cli::plan::run(*args),
        Command::Parity(args) => cli::parity::run(args),
        Command::Generate(args) => cli::generate::run(*args),
    };
    llava_formats::cli::exit_code(result)
}
