//! Shards on object storage: a URL or a local path → a [`Location`] (an `object_store` store and
//! a prefix in it), with the few operations the build, the readers and `inspect` need: whole
//! objects, byte ranges that resume when a connection is cut, listing, multipart uploads and a
//! put-if-absent for the manifest.
//!
//! Credentials and endpoints come from each cloud's usual environment variables (`AWS_*`,
//! `GOOGLE_*`, `AZURE_*`: the `from_env` of object_store's builders); signing, retries with
//! backoff and timeouts are object_store's ([`RetryConfig`], [`ClientOptions`]). Everything here
//! is blocking: the workspace is threads, not async, so one small runtime serves every call.

mod error;
mod location;
mod upload;

pub use error::StorageError;
pub use location::{is_url, Location, ObjectInfo};
pub use upload::Upload;

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// The runtime every blocking call runs on (object_store is async).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .thread_name("llava-storage")
            .enable_all()
            .build()
            .expect("starting the storage runtime (threads and timers)")
    })
}

/// Runs `future` to completion from a plain thread.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    runtime().block_on(future)
}
