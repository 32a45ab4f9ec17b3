//! `llava-data build` and `llava-data merge`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use llava_data::shard_build::sink::{merge_remote, work_folder};
use llava_data::shard_build::{assemble::assemble_with_progress, build, BuildOptions, Partition};
use llava_formats::manifest::Manifest;

#[derive(Args)]
#[command(
    after_help = "Examples:\n  llava-data build datasets.toml\n  llava-data build datasets.toml --output /data/shards --partition 3/8   # one of 8 array jobs\n  llava-data merge /data/shards                                           # after all 8\n\nA killed build, rerun with the same config, keeps its finished shards and writes the rest."
)]
pub struct BuildArgs {
    /// The mixture: `datasets.toml` (every key is documented in docs/configuration.md).
    config: PathBuf,
    /// Output folder (overrides the config's `output`), or an object store URL: `s3://bucket/prefix`
    /// (also S3-compatible servers via AWS_ENDPOINT_URL), `gs://…`, `az://…`; shards are uploaded
    /// as they are written, the manifest last (docs/object-storage.md).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Build only every N-th shard starting at i (`i/N`), e.g. from a Slurm array task or a
    /// Kubernetes indexed Job; then run `llava-data merge` on the output.
    #[arg(long, default_value = "0/1")]
    partition: Partition,
    /// Worker threads (default: all cores; the output is the same for any number).
    #[arg(long)]
    threads: Option<usize>,
    /// Print the manifest summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Without a terminal (a Slurm log, a file): log a progress line (counts, rate, ETA) every
    /// SECS seconds; on a terminal a progress bar is drawn instead.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    progress_every: f64,
}

#[derive(Args)]
#[command(
    after_help = "Examples:\n  llava-data merge /data/shards          # once every `build --partition i/N` is done\n  llava-data merge /data/shards --json   # the merged manifest as JSON\n\nThe merged output is identical to a single-machine build."
)]
pub struct MergeArgs {
    /// The output folder (or `s3://…` URL) that all partitions wrote into.
    output: PathBuf,
    /// Print the manifest summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Without a terminal (a Slurm log, a file): log a progress line (counts, rate, ETA) every
    /// SECS seconds; on a terminal a progress bar is drawn instead.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    progress_every: f64,
}

/// A bar on a terminal; without one, progress lines every `every_secs` (the `--progress-every`
/// of build, merge and inspect --verify). Returns whether stderr is a terminal.
pub(crate) fn progress_setup(every_secs: f64) -> Result<bool> {
    let terminal = std::io::stderr().is_terminal();
    if !terminal {
        let every = std::time::Duration::try_from_secs_f64(every_secs)
            .context("--progress-every: a number of seconds")?;
        llava_data::progress::set_progress_log_interval(Some(every));
    }
    Ok(terminal)
}

pub fn run_build(args: BuildArgs) -> Result<()> {
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting the thread count")?;
    }
    let terminal = progress_setup(args.progress_every)?;
    let options = BuildOptions {
        output: args.output,
        partition: args.partition,
        progress: terminal,
    };
    let started = std::time::Instant::now();
    let outcome = build(&args.config, &options)
        .with_context(|| format!("building {}", args.config.display()))?;
    tracing::info!(
        "{} shards written, {} already finished, in {:.1}s → {}",
        outcome.shards_written,
        outcome.shards_skipped,
        started.elapsed().as_secs_f64(),
        outcome.output.display()
    );
    match outcome.manifest {
        Some(m) => report(&m, args.json),
        None => {
            tracing::info!(
                "partition {}/{} done; run `llava-data merge {}` once every partition is",
                args.partition.index,
                args.partition.count,
                outcome.output.display()
            );
            Ok(())
        }
    }
}

pub fn run_merge(args: MergeArgs) -> Result<()> {
    let terminal = progress_setup(args.progress_every)?;
    let manifest = if llava_formats::config::is_url(&args.output) {
        // A bucket: the partitions' records are there; the manifest is assembled locally.
        let url = args.output.to_string_lossy();
        let remote = llava_storage::Location::parse(&url)?;
        merge_remote(&remote, &work_folder(&url), Some(terminal))
    } else {
        assemble_with_progress(&args.output, terminal)
    }
    .with_context(|| format!("merging {}", args.output.display()))?;
    report(&manifest, args.json)
}

fn report(m: &Manifest, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(m)?);
        return Ok(());
    }
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>9}",
        "source", "in files", "read", "written", "rejected"
    );
    for s in &m.sources {
        println!(
            "{:<24} {:>9} {:>9} {:>9} {:>9}",
            s.name, s.in_files, s.read, s.written, s.rejected
        );
    }
    let t = &m.totals;
    println!(
        "\n{} samples ({} image, {} text) in {} shards, {} groups, {} batches; {:.1} MiB",
        t.samples,
        t.image_samples,
        t.text_samples,
        m.shards.len(),
        m.grouping.groups,
        m.grouping.batches,
        t.bytes as f64 / (1024.0 * 1024.0)
    );
    println!(
        "{} tokens ({} image, {} supervised), {} images, {} tiles, {} truncated, {} rejected (see rejects.jsonl)",
        t.tokens, t.image_tokens, t.supervised_tokens, t.images, t.tiles, t.truncated, t.rejected
    );
    Ok(())
}
