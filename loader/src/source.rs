//! Where shard bytes come from when `--shards` is an object store URL (`s3://bucket/prefix`,
//! `gs://`, `az://`, `https://`): the manifest and each shard's footer are read once when the
//! index opens, then only the byte ranges of the row groups a rank reads are fetched
//! (`llava_storage::Location::read_range`: retries with backoff, a cut range resumed, the
//! object's size and ETag checked on every read so that a replaced shard stops the run, named).
//!
//! Ranges can be kept in a local cache folder with a size cap (`--cache-dir`, `--cache-size`):
//! later epochs read them locally. Past the cap the least recently used ranges are deleted; a
//! cached range is used only when its size matches. One cache folder per process (per rank):
//! each process counts only its own files against the cap.
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

static CACHE: Mutex<Option<CacheOptions>> = Mutex::new(None);

/// Sets the cache for the object store locations this process opens from now on (`--cache-dir`,
/// before the index opens); `None`: no cache.
pub fn set_cache(options: Option<CacheOptions>) {
    *CACHE.lock().expect("not poisoned") = options;
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
    cache: Option<Cache>,
    /// Ranges served from the cache, fetched from the store, and deleted to stay under the cap.
    hits: AtomicU64,
    fetches: AtomicU64,
    evictions: AtomicU64,
}

impl std::fmt::Debug for RemoteShards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteShards({})", self.location)
    }
}

/// The cache folder of one URL and what it holds, least recently used first.
struct Cache {
    dir: PathBuf,
    cap: u64,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    /// File → (bytes, last use).
    files: HashMap<PathBuf, (u64, u64)>,
    /// Last use → file: the eviction order.
    by_use: std::collections::BTreeMap<u64, PathBuf>,
    bytes: u64,
    clock: u64,
}

impl CacheState {
    /// The files already in `dir` (an earlier run), oldest modification first.
    fn scan(dir: &Path) -> Self {
        let mut found: Vec<(std::time::SystemTime, PathBuf, u64)> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                let is_tmp = e
                    .path()
                    .extension()
                    .is_some_and(|x| x.to_string_lossy().starts_with("tmp"));
                if !m.is_file() || is_tmp {
                    return None;
                }
                Some((m.modified().ok()?, e.path(), m.len()))
            })
            .collect();
        found.sort();
        let mut state = CacheState::default();
        for (_, path, len) in found {
            state.touch(path, len);
        }
        state
    }

    fn touch(&mut self, path: PathBuf, len: u64) {
        self.clock += 1;
        if let Some((old_len, used)) = self.files.insert(path.clone(), (len, self.clock)) {
            self.by_use.remove(&used);
            self.bytes -= old_len;
        }
        self.by_use.insert(self.clock, path);
        self.bytes += len;
    }

    /// Deletes least recently used files until `room` more bytes fit under `cap`; how many.
    fn evict(&mut self, cap: u64, room: u64) -> u64 {
        let mut n = 0;
        while self.bytes + room > cap {
            let Some((_, path)) = self.by_use.pop_first() else {
                break;
            };
            if let Some((len, _)) = self.files.remove(&path) {
                self.bytes -= len;
            }
            let _ = std::fs::remove_file(&path);
            n += 1;
        }
        n
    }
}

/// The [`RemoteShards`] of `dir` (an object store URL) with the cache set now, opened once per
/// process.
pub fn remote(dir: &Path) -> DataResult<Arc<RemoteShards>> {
    /// (URL, cache folder and cap) → its shards.
    type Key = (String, Option<(PathBuf, u64)>);
    static OPEN: OnceLock<Mutex<HashMap<Key, Arc<RemoteShards>>>> = OnceLock::new();
    let url = dir.to_string_lossy().trim_end_matches('/').to_string();
    let options = CACHE.lock().expect("not poisoned").clone();
    let key = (
        url.clone(),
        options.as_ref().map(|c| (c.dir.clone(), c.max_bytes)),
    );
    let mut open = OPEN
        .get_or_init(Default::default)
        .lock()
        .expect("not poisoned");
    if let Some(r) = open.get(&key) {
        return Ok(r.clone());
    }
    let location = Location::parse(&url)?;
    let cache = options.map(|c| {
        let hash = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(url.as_bytes()))
        };
        let dir = c.dir.join(&hash[..16]);
        let state = CacheState::scan(&dir);
        Cache {
            dir,
            cap: c.max_bytes,
            state: Mutex::new(state),
        }
    });
    let r = Arc::new(RemoteShards {
        location,
        objects: Mutex::new(HashMap::new()),
        cache,
        hits: AtomicU64::new(0),
        fetches: AtomicU64::new(0),
        evictions: AtomicU64::new(0),
    });
    open.insert(key, r.clone());
    Ok(r)
}

/// What the cache of one location did (tests, `loader-bench`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub fetches: u64,
    pub evictions: u64,
    /// Bytes in the cache folder now.
    pub bytes: u64,
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
        let cached = self.cache.as_ref().map(|c| {
            c.dir.join(format!(
                "{}.{}-{}",
                key.replace('/', "_"),
                range.start,
                range.end
            ))
        });
        if let (Some(path), Some(cache)) = (&cached, &self.cache) {
            if let Ok(bytes) = std::fs::read(path) {
                if bytes.len() as u64 == want {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    cache
                        .state
                        .lock()
                        .expect("not poisoned")
                        .touch(path.clone(), want);
                    return Ok(Bytes::from(bytes));
                }
            }
        }
        let expect = self.expect(key);
        let bytes = self.location.read_range(key, range, expect.as_ref())?;
        self.fetches.fetch_add(1, Ordering::Relaxed);
        if let (Some(path), Some(cache)) = (&cached, &self.cache) {
            self.store(cache, path, &bytes);
        }
        Ok(bytes)
    }

    /// Keeps `bytes` in the cache, deleting the least recently used ranges past the cap (best
    /// effort: a full or unwritable cache only means reading from the store again).
    fn store(&self, cache: &Cache, path: &Path, bytes: &[u8]) {
        let n = bytes.len() as u64;
        if n > cache.cap {
            return;
        }
        let mut state = cache.state.lock().expect("not poisoned");
        let evicted = state.evict(cache.cap, n);
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
        // Appended, not replacing the extension (the range): one temporary name per range.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let ok = std::fs::create_dir_all(&cache.dir).is_ok()
            && std::fs::write(&tmp, bytes).is_ok()
            && std::fs::rename(&tmp, path).is_ok();
        if ok {
            state.touch(path.to_path_buf(), n);
        } else {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// What the cache did so far (zeros without a cache).
    pub fn cache_stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            fetches: self.fetches.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            bytes: self
                .cache
                .as_ref()
                .map_or(0, |c| c.state.lock().expect("not poisoned").bytes),
        }
    }

    /// The cache folder of this location, if any.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.cache.as_ref().map(|c| c.dir.as_path())
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
