//! Errors of the data path. Every error about a shard names its file, and the row group when
//! one is involved, so a bad shard can be found without a debugger.

use std::path::PathBuf;

use llava_formats::schema::SchemaError;

pub type DataResult<T> = std::result::Result<T, DataError>;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path}: invalid manifest: {source}")]
    Manifest {
        path: PathBuf,
        source: serde_json::Error,
    },

    #[error("{path}: {source}")]
    ManifestCheck {
        path: PathBuf,
        source: llava_formats::manifest::ManifestError,
    },

    #[error("{path}: shard listed in the manifest is missing or unreadable: {source}")]
    MissingShard {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path}: size {found} bytes, the manifest says {expected}; the shard was changed or truncated")]
    ShardSize {
        path: PathBuf,
        expected: u64,
        found: u64,
    },

    #[error("{path}: SHA-256 {found}, the manifest says {expected}")]
    Checksum {
        path: PathBuf,
        expected: String,
        found: String,
    },

    #[error("{path}: {source}")]
    Schema { path: PathBuf, source: SchemaError },

    #[error("{path}{}: {source}", row_group_suffix(*.row_group))]
    Parquet {
        path: PathBuf,
        row_group: Option<usize>,
        source: parquet::errors::ParquetError,
    },

    #[error("{path}{}: {detail}", row_group_suffix(*.row_group))]
    Corrupt {
        path: PathBuf,
        row_group: Option<usize>,
        detail: String,
    },

    #[error("{0}: the row changed after the build (bit rot, an interrupted copy?): copy the shard again or rebuild it, or skip such samples with `llava-trainer run --on-corrupt skip` (docs/integrity.md)")]
    RowChecksum(Box<CorruptRow>),

    #[error("per-device batch size {requested} is not supported for shards built with batch size {built}: use a divisor or a multiple of {built}, or rebuild the shards")]
    BatchSize { requested: usize, built: usize },

    #[error("invalid plan request: {0}")]
    Plan(String),

    /// An object store (`--shards s3://…`): a missing or changed object, credentials, a
    /// request that failed after its retries.
    #[error(transparent)]
    Storage(#[from] llava_storage::StorageError),

    #[error("cannot resume: {0}")]
    Resume(String),

    #[error("loader worker failed: {0}")]
    Worker(String),
}

/// A row whose stored checksum does not match its bytes, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptRow {
    pub path: PathBuf,
    pub row_group: usize,
    /// Row within the row group.
    pub row: usize,
    /// The sample the index expects there (source name, record index) and the row's `id`.
    pub source: String,
    pub index: u64,
    pub id: String,
    /// Stored and computed [`llava_formats::schema::row_checksum`].
    pub expected: u64,
    pub found: u64,
}

impl std::fmt::Display for CorruptRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} row group {} row {}: sample {}#{} (id {:?}): row checksum {:016x}, the shard \
             says {:016x}",
            self.path.display(),
            self.row_group,
            self.row,
            self.source,
            self.index,
            self.id,
            self.found,
            self.expected
        )
    }
}

fn row_group_suffix(row_group: Option<usize>) -> String {
    match row_group {
        Some(rg) => format!(" row group {rg}"),
        None => String::new(),
    }
}
