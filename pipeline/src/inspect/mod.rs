//! `llava-data inspect`: see and verify what a build wrote.
//!
//! - [`summary`]: per source and modality counts, length percentiles, grid shapes, rejects, read
//!   through polars from the small columns only (never `tiles`). With the `inspect` feature
//!   (default), as is [`plot`].
//! - [`padding`]: padding efficiency of the build's grouping vs random batching.
//! - [`sample`]: one sample decoded back to text with its trained spans, and its tiles as a PNG.
//! - [`verify`]: every shard against the manifest.
//! - [`plot`]: charts drawn with plotters: the length distribution per modality as a PNG, and
//!   the SVG charts of the report.
//! - [`html`]: the whole build as one self-contained HTML page (`--html`).

#[cfg(feature = "inspect")]
pub mod html;
pub mod padding;
#[cfg(feature = "inspect")]
pub mod plot;
pub mod remote;
pub mod sample;
#[cfg(feature = "inspect")]
pub mod summary;
pub mod verify;

use std::path::{Path, PathBuf};

use llava_formats::manifest::{Manifest, RejectEntry, MANIFEST_FILE, REJECTS_FILE};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum InspectError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a build manifest: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("{path}: line {line}: {reason}")]
    Rejects {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[cfg(feature = "inspect")]
    /// polars failed reading a shard (`context` names it) or aggregating the summary.
    #[error("{context}: {source}")]
    Polars {
        context: String,
        source: polars::prelude::PolarsError,
    },
    #[error("{path}: {reason}")]
    Parquet { path: PathBuf, reason: String },
    #[error("no sample matches {0:?} (give its id, or source:index as in rejects.jsonl)")]
    NoSample(String),
    #[error("{0}")]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error("{0}")]
    Image(String),
    #[error("{0}")]
    Usage(String),
    /// An object store build (`s3://…`): the object and the reason.
    #[error("{0}")]
    Storage(String),
}

/// The object store of `dir` when it is a URL (`s3://…`, `gs://…`, `az://…`).
pub fn remote(dir: &Path) -> Result<Option<llava_storage::Location>, InspectError> {
    if !llava_formats::config::is_url(dir) {
        return Ok(None);
    }
    llava_storage::Location::parse(&dir.to_string_lossy())
        .map(Some)
        .map_err(|e| InspectError::Storage(e.to_string()))
}

#[cfg(feature = "inspect")]
impl From<polars::prelude::PolarsError> for InspectError {
    fn from(e: polars::prelude::PolarsError) -> Self {
        InspectError::Polars {
            context: "aggregating the summary with polars".into(),
            source: e,
        }
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> InspectError + '_ {
    move |source| InspectError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A build output folder: `manifest.json`, `rejects.jsonl`, `shards/`.
pub struct BuildDir {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl BuildDir {
    pub fn open(dir: &Path) -> Result<Self, InspectError> {
        let path = dir.join(MANIFEST_FILE);
        let text = match remote(dir)? {
            // An object store (`s3://bucket/prefix`): `verify` fetches each shard in turn.
            Some(location) => location
                .read(MANIFEST_FILE)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .map_err(|e| InspectError::Storage(e.to_string()))?,
            None => std::fs::read_to_string(&path).map_err(io_err(&path))?,
        };
        let manifest = Manifest::from_json(&text).map_err(|e| InspectError::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(BuildDir {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// Path of a shard listed in the manifest (`file` is relative to the build folder).
    pub fn shard_path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Shard `shard` as a file for the Parquet and polars readers: the local file, or for a
    /// bucket a sparse copy holding the footer and the ranges `want` picks ([`remote`]).
    pub fn open_shard(
        &self,
        shard: &llava_formats::manifest::ShardInfo,
        want: remote::Want,
    ) -> Result<std::fs::File, InspectError> {
        match remote(&self.dir)? {
            Some(location) => remote::sparse_copy(&location, shard, want),
            None => {
                let path = self.shard_path(&shard.file);
                std::fs::File::open(&path).map_err(io_err(&path))
            }
        }
    }

    /// The entries of `rejects.jsonl` (none when the file does not exist).
    pub fn rejects(&self) -> Result<Vec<RejectEntry>, InspectError> {
        let path = self.dir.join(REJECTS_FILE);
        let read = match remote(&self.dir)? {
            Some(location) => match location.read(REJECTS_FILE) {
                Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
                Err(llava_storage::StorageError::Missing { .. }) => return Ok(Vec::new()),
                Err(e) => return Err(InspectError::Storage(e.to_string())),
            },
            None => std::fs::read_to_string(&path),
        };
        let text = match read {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| InspectError::Rejects {
                    path: path.clone(),
                    line: i + 1,
                    reason: e.to_string(),
                })
            })
            .collect()
    }
}
