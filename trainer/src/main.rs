//! `llava-trainer`: a thin dispatcher; one module per subcommand under `cli/`.

mod cli;

// Counts live heap bytes for `bench`'s CPU memory figures (llava_trainer::heap).
#[global_allocator]
static ALLOC: llava_trainer::heap::CountingAlloc = llava_trainer::heap::CountingAlloc;

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
        Command::LoaderBench(args) => cli::loader_bench::run(args),
        Command::Run(args) => cli::run::run(*args),
        Command::Init(args) => cli::init::run(args),
        Command::Bench(args) => cli::bench::run(*args),
        Command::Plan(args) => cli::plan::run(*args),
        Command::Parity(args) => cli::parity::run(args),
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
