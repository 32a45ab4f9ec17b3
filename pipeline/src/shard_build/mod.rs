//! `llava-data build`: a `datasets.toml` mixture → length-grouped Parquet shards + manifest.
//!
//! Two passes, so that memory stays bounded and the output does not depend on thread count:
//! 1. [`pass1`]: every selected record is parsed, tokenized and its images' sizes read from their
//!    headers: that gives each sample's exact length. Prepared samples are spilled to a work file.
//!    Computed once and cached in the output folder: resume and every partition reuse it.
//! 2. [`group`] plans groups and shards from the lengths alone (seeded), then [`shard`] renders the
//!    pixels of one shard at a time (rayon) and writes it under a temporary name, renamed when
//!    complete. A rerun skips finished shards; `--partition i/N` writes every N-th shard, and
//!    [`assemble`] joins the parts into `manifest.json`.

pub mod assemble;
pub mod context;
pub mod group;
pub mod pass1;
pub mod shard;
pub mod sink;
mod stage_clock;

use std::path::{Path, PathBuf};

use llava_formats::config::ConfigError;
use llava_formats::manifest::Manifest;
use thiserror::Error;

pub use context::BuildContext;

/// Folder (inside the output) for plan, spill and per-shard records; not part of the dataset.
pub const WORK_DIR: &str = ".work";
pub const SHARDS_DIR: &str = "shards";

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Source(#[from] crate::record::SourceError),
    /// An object store output (`s3://…`): a location, credentials, an upload.
    #[error(transparent)]
    Storage(#[from] llava_storage::StorageError),
    #[error("writing {path}: {source}")]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    /// `zstd_level` (or the tile encoding) that the Parquet writer does not accept.
    #[error("zstd_level: {0}")]
    WriterSettings(parquet::errors::ParquetError),
    /// A shard writer thread panicked (a bug: the message above it says where).
    #[error("the writer of {shard} panicked (a bug: please report it)")]
    WriterPanicked { shard: String },
    /// The build's own records (plan, pass-1 cache, shard records, rejects) as JSON.
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// Shards of other partitions are not written yet: `merge` must wait for them.
    #[error(
        "{missing} of {total} shards are not built yet (first: {first}); run the missing \
         partitions, then merge again"
    )]
    Incomplete {
        missing: usize,
        total: usize,
        first: String,
    },
    /// A record or file past what the build's compact per-sample summary holds.
    #[error("{0}")]
    TooLarge(String),
    /// Counts that must agree do not: a bug in the build.
    #[error("{0} (a bug: please report it)")]
    Inconsistent(String),
}

pub(crate) fn json_err(path: &Path) -> impl FnOnce(serde_json::Error) -> BuildError + '_ {
    move |source| BuildError::Json {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Which part of the shards this process writes (`--partition i/N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub index: usize,
    pub count: usize,
}

impl Partition {
    pub const WHOLE: Partition = Partition { index: 0, count: 1 };

    pub fn owns(&self, shard: usize) -> bool {
        shard % self.count == self.index
    }
}

impl std::str::FromStr for Partition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let err = || format!("{s:?}: expected i/N with 0 <= i < N, e.g. 3/8");
        let (i, n) = s.split_once('/').ok_or_else(err)?;
        let (index, count): (usize, usize) = (
            i.trim().parse().map_err(|_| err())?,
            n.trim().parse().map_err(|_| err())?,
        );
        if count == 0 || index >= count {
            return Err(err());
        }
        Ok(Partition { index, count })
    }
}

#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Overrides the config's `output`.
    pub output: Option<PathBuf>,
    pub partition: Partition,
    /// Draw progress bars (on a terminal).
    pub progress: bool,
}

/// Where a build's time went (seconds; `render`, `encode` and `write` summed over threads, so on
/// several threads they can exceed the wall time). For `llava-data bench`.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuildTimes {
    /// Pass 1 (tokenize, read image headers, spill), or loading its cache.
    pub pass1_s: f64,
    /// Pass 2's wall time (pixels + write, every shard).
    pub pass2_s: f64,
    /// Reading spilled samples, decoding and tiling images (CPU time, all threads).
    pub render_s: f64,
    /// Encoding tiles as stored: predictor + zstd, or JPEG (CPU time, all threads).
    pub encode_s: f64,
    /// The writer thread: Arrow batches, Parquet encoding and compression, SHA-256, file writes
    /// (CPU time).
    pub write_s: f64,
    /// Waiting for finished shards to reach the disk (wall time of their fsync).
    pub sync_s: f64,
}

/// What a build run did.
#[derive(Debug)]
pub struct BuildOutcome {
    pub output: PathBuf,
    pub shards_written: usize,
    pub shards_skipped: usize,
    /// Pass 1 came from the cache (an earlier run or another partition computed it).
    pub pass1_reused: bool,
    /// `Some` when this run completed the build (a whole build, or the last missing partition).
    pub manifest: Option<Manifest>,
    pub times: BuildTimes,
}

/// Runs a build (or one partition of it).
pub fn build(config_path: &Path, options: &BuildOptions) -> Result<BuildOutcome, BuildError> {
    let ctx = BuildContext::load(config_path, options.output.as_deref())?;
    build_with(&ctx, options)
}

/// [`build`] with a loaded context (`llava-data bench` changes its output settings).
pub fn build_with(ctx: &BuildContext, options: &BuildOptions) -> Result<BuildOutcome, BuildError> {
    let started = std::time::Instant::now();
    let pass1 = pass1::run(ctx, options)?;
    let mut times = BuildTimes {
        pass1_s: started.elapsed().as_secs_f64(),
        ..BuildTimes::default()
    };
    let plan = group::plan(ctx, &pass1.samples);
    let work = ctx.output.join(WORK_DIR);
    assemble::write_pass1_and_plan(&work, ctx, &pass1, &plan)?;
    sink::upload_build_record(ctx)?;
    let started = std::time::Instant::now();
    let (written, skipped) = match shard::write_owned(ctx, &pass1, &plan, options, &mut times) {
        Ok(done) => done,
        Err(e) => {
            // Keep what pass 1 and the finished shards rejected: why records are missing.
            match assemble::write_rejects_so_far(&ctx.output) {
                Ok(n) => tracing::warn!(
                    "the {n} rejects found so far are in {}",
                    ctx.output
                        .join(llava_formats::manifest::REJECTS_FILE)
                        .display()
                ),
                Err(w) => tracing::warn!("cannot write the rejects found so far: {w}"),
            }
            return Err(e);
        }
    };
    times.pass2_s = started.elapsed().as_secs_f64();
    let manifest = match (&ctx.remote, options.partition == Partition::WHOLE) {
        (_, false) => None,
        (None, true) => Some(assemble::assemble(&ctx.output)?),
        (Some(remote), true) => Some(sink::merge_remote(remote, &ctx.output, None)?),
    };
    Ok(BuildOutcome {
        output: ctx
            .remote
            .as_ref()
            .map_or_else(|| ctx.output.clone(), |r| PathBuf::from(r.url())),
        shards_written: written,
        shards_skipped: skipped,
        pass1_reused: pass1.reused,
        manifest,
        times,
    })
}
