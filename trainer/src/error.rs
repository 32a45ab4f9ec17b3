//! Errors of the trainer library.

use std::path::PathBuf;

/// Everything that can go wrong while building, loading or running the model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },

    #[error("{path}: cannot read tensors: {source}")]
    Read {
        path: PathBuf,
        source: candle_core::Error,
    },

    #[error("{path}: cannot write tensors: {source}")]
    Write {
        path: PathBuf,
        source: candle_core::Error,
    },

    /// A thread panicked while holding this lock; what it guarded may be half-updated.
    #[error("{0} lock poisoned: a thread panicked while holding it")]
    Poisoned(&'static str),

    #[error("cannot serialise {what}: {source}")]
    Serialize {
        what: &'static str,
        source: serde_json::Error,
    },

    /// The prefetching loader stopped before the epoch plan's last batch (a worker died).
    #[error("the data loader ended before the planned batch {0}")]
    LoaderEnded(u64),

    #[error("missing tensor `{name}` (searched: {searched})")]
    MissingTensor { name: String, searched: String },

    #[error("tensor `{name}` in {path} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        path: PathBuf,
        found: Vec<usize>,
        expected: Vec<usize>,
    },

    #[error("tensor `{name}` is provided twice: as `{first}` and as `{second}`")]
    DuplicateTensor {
        name: String,
        first: String,
        second: String,
    },

    #[error("invalid config: {0}")]
    Config(String),

    #[error("invalid batch: {0}")]
    Batch(String),

    /// A collective failed: another rank failed, did not arrive in time, or the group broke.
    /// A process-level setup step failed (signal handlers).
    #[error("installing {what}: {source}")]
    Setup {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Joining a multi-process job failed: `context` names the rank and where it tried to join.
    #[error("{context}")]
    Join {
        context: String,
        #[source]
        source: Box<Error>,
    },
    /// What this build cannot do (e.g. NCCL ranks without the `cuda` feature), and how to get it.
    #[error("{0}")]
    Unsupported(String),
    #[error("distributed: {0}")]
    Distributed(String),

    #[error(transparent)]
    Data(#[from] llava_loader::DataError),

    /// Shards, model and run configuration do not fit together.
    #[error("{0}")]
    Mismatch(String),

    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;
