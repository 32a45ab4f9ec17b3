//! Where shard bytes come from when `--shards` is an object store URL (`s3://bucket/prefix`,
//! `gs://`, `az://`, `https://`): the manifest and each shard's footer are read once when the
//! index opens, then only the byte ranges of the row groups a rank reads are fetched
//! (`llava_storage::Location::read_range`: retries with backoff, a cut range resumed, the
//! object's size and ETag checked on every read so that a replaced shard stops the run, named).
//!
//! Ranges can be kept in a local cache folder with a size cap (`--cache-dir`, `--cache-size`):
//! later epochs read them locally. The cache fills until the cap and then stops growing (no
//! eviction churn); a cached range is used only when its size matches.
//!
//! Prefetch: every loader worker fetches its own batch's range, so `workers` requests are in
//! flight while the model trains (the loader's bounded queue bounds the memory).
//!
//! One [`RemoteShards`] per URL, process-wide: the index, the workers' readers and `inspect`
//! share the ETags read at open.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::{Buf, Bytes};
use llava_storage::{Location, ObjectInfo};
use parquet::errors::ParquetError;
use parquet::file::reader::{ChunkReader, Length};

use super::error::{DataError, DataResult};

/// A local cache of fetched ranges.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    pub dir: PathBuf,
    /// Bytes the cache may hold.
    pub max_bytes: u64,
}

static CACHE: OnceLock<CacheOptions> = OnceLock::new();

/// Sets the cache for every object store read of this process (`--cache-dir`, before the index
/// opens). A second call is ignored.
pub fn set_cache(options: CacheOptions) {
    let _ = CACHE.set(options);
}

/// Parses `--cache-size`: bytes, or with a K/M/G/T suffix (powers of 1024), e.g. `200G`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("{text:?}: expected a size such as 500M or 200G"))
}

/// Whether `dir` names an object store rather than a local folder.
pub fn is_remote(dir: &Path) -> bool {
    llava_formats::config::is_url(dir)
}

/// The shards of one object store URL.
pub struct RemoteShards {
    location: Location,
    /// Size and ETag of each shard when the index opened it.
    objects: Mutex<HashMap<String, ObjectInfo>>,
    cache: Option<(PathBuf, u64)>,
    cached_bytes: AtomicU64,
}

/// The [`RemoteShards`] of `dir` (an object store URL), opened once per process.
pub fn remote(dir: &Path) -> DataResult<Arc<RemoteShards>> {
    static OPEN: OnceLock<Mutex<HashMap<String, Arc<RemoteShards>>>> = OnceLock::new();
    let url = dir.to_string_lossy().trim_end_matches('/').to_string();
    let mut open = OPEN
        .get_or_init(Default::default)
        .lock()
        .expect("not poisoned");
    if let Some(r) = open.get(&url) {
        return Ok(r.clone());
    }
    let location = Location::parse(&url)?;
    let cache = CACHE.get().map(|c| {
        let hash = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(url.as_bytes()))
        };
        (c.dir.join(&hash[..16]), c.max_bytes)
    });
    let cached_bytes = cache.as_ref().map_or(0, |(d, _)| folder_bytes(d));
    let r = Arc::new(RemoteShards {
        location,
        objects: Mutex::new(HashMap::new()),
        cache,
        cached_bytes: AtomicU64::new(cached_bytes),
    });
    open.insert(url, r.clone());
    Ok(r)
}

fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}

impl RemoteShards {
    /// A whole small object (the manifest).
    pub fn read(&self, key: &str) -> DataResult<Bytes> {
        Ok(self.location.read(key)?)
    }

    /// Checks that shard `key` exists with the manifest's size and remembers its ETag.
    pub fn open(&self, key: &str, size: u64) -> DataResult<()> {
        let info = self.location.check(key, size)?;
        self.objects
            .lock()
            .expect("not poisoned")
            .insert(key.to_string(), info);
        Ok(())
    }

    fn expect(&self, key: &str) -> Option<ObjectInfo> {
        self.objects.lock().expect("not poisoned").get(key).cloned()
    }

    /// Bytes `range` of shard `key` (from the cache when there).
    pub fn read_range(&self, key: &str, range: Range<u64>) -> DataResult<Bytes> {
        let want = range.end - range.start;
        let cached = self.cache.as_ref().map(|(dir, _)| {
            dir.join(format!(
                "{}.{}-{}",
                key.replace('/', "_"),
                range.start,
                range.end
            ))
        });
        if let Some(path) = &cached {
            if let Ok(bytes) = std::fs::read(path) {
                if bytes.len() as u64 == want {
                    return Ok(Bytes::from(bytes));
                }
            }
        }
        let expect = self.expect(key);
        let bytes = self.location.read_range(key, range, expect.as_ref())?;
        if let (Some(path), Some((dir, cap))) = (&cached, &self.cache) {
            self.store(dir, *cap, path, &bytes);
        }
        Ok(bytes)
    }

    /// Keeps `bytes` in the cache while it is under its cap (best effort: a full or unwritable
    /// cache only means reading from the store again).
    fn store(&self, dir: &Path, cap: u64, path: &Path, bytes: &[u8]) {
        let n = bytes.len() as u64;
        let before = self.cached_bytes.fetch_add(n, Ordering::Relaxed);
        if before + n > cap {
            self.cached_bytes.fetch_sub(n, Ordering::Relaxed);
            return;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let ok = std::fs::create_dir_all(dir).is_ok()
            && std::fs::write(&tmp, bytes).is_ok()
            && std::fs::rename(&tmp, path).is_ok();
        if !ok {
            self.cached_bytes.fetch_sub(n, Ordering::Relaxed);
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// The Parquet footer of shard `key` (`size` bytes), as a reader that serves only it.
    pub fn footer(&self, key: &str, size: u64) -> DataResult<Parts> {
        // Most footers fit in the last 64 KiB: one request; a bigger one needs a second.
        let tail = size.min(64 << 10);
        let mut data = self.read_range(key, size - tail..size)?;
        let corrupt = |detail: String| DataError::Corrupt {
            path: PathBuf::from(self.location.object_url(key)),
            row_group: None,
            detail,
        };
        if data.len() < 8 || &data[data.len() - 4..] != b"PAR1" {
            return Err(corrupt("not a Parquet file (no PAR1 footer)".into()));
        }
        let n = data.len();
        let footer_len = u32::from_le_bytes([data[n - 8], data[n - 7], data[n - 6], data[n - 5]]);
        let need = u64::from(footer_len) + 8;
        if need > size {
            return Err(corrupt(format!(
                "footer of {footer_len} bytes in a {size}-byte file"
            )));
        }
        if need > tail {
            data = self.read_range(key, size - need..size)?;
        }
        let start = size - data.len() as u64;
        Ok(Parts::new(vec![(start, data)], size))
    }

    /// The column chunks `ranges` of shard `key` (e.g. the small columns of every row group),
    /// fetched as few requests (neighbouring ranges merged).
    pub fn ranges(&self, key: &str, mut ranges: Vec<Range<u64>>, size: u64) -> DataResult<Parts> {
        ranges.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::new();
        for r in ranges {
            match merged.last_mut() {
                // Gaps under 1 MiB are cheaper fetched than asked for separately.
                Some(last) if r.start <= last.end + (1 << 20) => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        let mut parts = Vec::with_capacity(merged.len());
        for r in merged {
            let start = r.start;
            parts.push((start, self.read_range(key, r)?));
        }
        Ok(Parts::new(parts, size))
    }

    /// Reads every byte of shard `key` in 64 MiB ranges through `each` (a checksum).
    pub fn stream(&self, key: &str, size: u64, mut each: impl FnMut(&[u8])) -> DataResult<()> {
        let step = 64u64 << 20;
        let mut at = 0;
        while at < size {
            let end = (at + step).min(size);
            let expect = self.expect(key);
            each(&self.location.read_range(key, at..end, expect.as_ref())?);
            at = end;
        }
        Ok(())
    }
}

/// Byte ranges of one file held in memory, served to the Parquet decoder at file offsets.
pub struct Parts {
    parts: Vec<(u64, Bytes)>,
    len: u64,
}

impl Parts {
    pub fn new(parts: Vec<(u64, Bytes)>, len: u64) -> Self {
        Parts { parts, len }
    }

    fn locate(&self, start: u64, len: u64) -> parquet::errors::Result<(&Bytes, usize)> {
        self.parts
            .iter()
            .find(|(off, data)| start >= *off && start + len <= off + data.len() as u64)
            .map(|(off, data)| (data, (start - off) as usize))
            .ok_or_else(|| {
                ParquetError::General(format!(
                    "read of {start}..{} outside the fetched ranges",
                    start + len
                ))
            })
    }
}

impl Length for Parts {
    fn len(&self) -> u64 {
        self.len
    }
}

impl ChunkReader for Parts {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        let (data, at) = self.locate(start, 0)?;
        Ok(data.slice(at..).reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let (data, at) = self.locate(start, length as u64)?;
        Ok(data.slice(at..at + length))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("500M").unwrap(), 500 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("lots").is_err());
    }
}
