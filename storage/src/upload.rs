//! A multipart upload as a `std::io::Write`: the Parquet writer streams a shard straight to the
//! bucket, parts going up while the next rows are rendered, memory bounded by the parts in flight.

use object_store::{MultipartUpload, WriteMultipart};

use crate::error::StorageError;
use crate::{block_on, runtime, Result};

/// Part size: S3's minimum is 5 MiB (except the last part).
const PART_BYTES: usize = 16 << 20;
/// Parts uploading at once: at most `PARTS_IN_FLIGHT * PART_BYTES` of a shard held in memory.
const PARTS_IN_FLIGHT: usize = 4;

pub struct Upload {
    inner: Option<WriteMultipart>,
    object: String,
    scheme: String,
    bytes: u64,
}

impl Upload {
    pub(crate) fn new(upload: Box<dyn MultipartUpload>, object: String, scheme: &str) -> Self {
        Upload {
            inner: Some(WriteMultipart::new_with_chunk_size(upload, PART_BYTES)),
            object,
            scheme: scheme.to_string(),
            bytes: 0,
        }
    }

    fn error(&self, e: object_store::Error) -> StorageError {
        StorageError::from_store(self.object.clone(), &self.scheme, e)
    }

    /// Uploads the last part and completes the object; returns its size.
    pub fn finish(mut self) -> Result<u64> {
        let inner = self.inner.take().expect("finish is called once");
        block_on(inner.finish()).map_err(|e| self.error(e))?;
        Ok(self.bytes)
    }
}

impl std::io::Write for Upload {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some(inner) = self.inner.as_mut() else {
            return Err(std::io::Error::other("upload already finished"));
        };
        let waited = block_on(inner.wait_for_capacity(PARTS_IN_FLIGHT));
        if let Err(e) = waited {
            return Err(std::io::Error::other(self.error(e)));
        }
        // Full parts are spawned onto the runtime here.
        let _guard = runtime().enter();
        inner.write(buf);
        self.bytes += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Upload {
    /// An unfinished upload (an error, a panic) is aborted so that no parts linger.
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            if let Err(e) = block_on(inner.abort()) {
                tracing::warn!("{}: aborting the upload: {e}", self.object);
            }
        }
    }
}
