//! Pass 1: select records (sampling), prepare each (tokens + header sizes + exact length) in
//! parallel, spill prepared samples to a work file and keep only a small summary in memory
//! ([`Samples`]: 20 bytes per sample plus 8 per 64 samples).
//!
//! Computed once per build and cached in `OUT/.work/pass1-<key>/` (the spill, the summaries as a
//! binary file, counts and rejects), keyed by the config's and tokenizer's SHA-256, the input
//! files' sizes and this llava-data version. A resumed build and every `--partition i/N` reuse
//! it: the first process to need it takes `pass1-<key>.lock` and computes it, the others wait
//! for it (a lock whose holder stopped refreshing it for [`STALE_LOCK`] is taken over). The cache
//! is removed when the manifest is assembled.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use llava_formats::config::Sampling;
use llava_formats::manifest::RejectEntry;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{io_err, json_err, BuildContext, BuildError, BuildOptions, WORK_DIR};
use crate::convert::{prepare, Prepared};
// Moved to crate::progress (merge and inspect --verify use them too).
pub use crate::progress::{finish_progress, progress_bar, set_progress_log_interval};
use crate::record::{entry_id, for_each_entry, parse_record, RawEntry};
use llava_formats::rng::{shuffle, SplitMix64};

/// What the plan needs of one sample, kept in memory for every sample: 20 bytes (its spill
/// offset is kept per block, in [`Samples`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleMeta {
    /// Position of the record in its source file (pass 1 refuses a file of more than
    /// `u32::MAX` records: 4 bytes instead of 8 for every sample).
    pub index: u32,
    /// Size of the prepared sample in the spill file.
    pub bytes: u32,
    pub length: u32,
    /// Tiles of all its images, saturating at `u16::MAX` (only shard sizing reads the count);
    /// 0 for a text sample (every image has at least one tile).
    pub num_tiles: u16,
    pub source: u16,
    pub file: u16,
}

impl SampleMeta {
    /// Bytes of one sample in `samples.bin`: offset, index (u64), bytes, length, tiles (u32),
    /// source, file (u16).
    const ENCODED: usize = 32;

    pub fn is_image(&self) -> bool {
        self.num_tiles > 0
    }

    fn encode(&self, offset: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&u64::from(self.index).to_le_bytes());
        out.extend_from_slice(&self.bytes.to_le_bytes());
        out.extend_from_slice(&self.length.to_le_bytes());
        out.extend_from_slice(&u32::from(self.num_tiles).to_le_bytes());
        out.extend_from_slice(&self.source.to_le_bytes());
        out.extend_from_slice(&self.file.to_le_bytes());
    }

    /// (offset, meta); `None` for values this build would not have written.
    fn decode(b: &[u8; Self::ENCODED]) -> Option<(u64, Self)> {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap_or_default());
        let meta = SampleMeta {
            index: u32::try_from(u64_at(8)).ok()?,
            bytes: u32_at(16),
            length: u32_at(20),
            num_tiles: u16::try_from(u32_at(24)).ok()?,
            source: u16_at(28),
            file: u16_at(30),
        };
        Some((u64_at(0), meta))
    }
}

/// Samples per stored spill offset.
const OFFSET_BLOCK: usize = 64;

/// Every sample's [`SampleMeta`], in pass-1 order, and where each lies in the spill file. The
/// spill is written in this order, so a sample's offset is its block's offset (one `u64` per
/// [`OFFSET_BLOCK`] samples) plus the sizes of the samples before it in the block: 20.125 bytes
/// per sample instead of 28 with an offset each. Derefs to the slice of metas.
#[derive(Debug, Default)]
pub struct Samples {
    meta: Vec<SampleMeta>,
    /// Spill offset of samples 0, 64, 128, …
    blocks: Vec<u64>,
    /// Spill bytes of all samples (the next sample's offset).
    end: u64,
}

impl Samples {
    fn with_capacity(n: usize) -> Self {
        Self {
            meta: Vec::with_capacity(n),
            blocks: Vec::with_capacity(n.div_ceil(OFFSET_BLOCK)),
            end: 0,
        }
    }

    /// Appends the sample that follows the previous one in the spill file.
    fn push(&mut self, meta: SampleMeta) {
        if self.meta.len().is_multiple_of(OFFSET_BLOCK) {
            self.blocks.push(self.end);
        }
        self.end += u64::from(meta.bytes);
        self.meta.push(meta);
    }

    /// Byte offset of sample `i` in the spill file.
    pub fn offset(&self, i: usize) -> u64 {
        let block = i / OFFSET_BLOCK;
        let before: u64 = self.meta[block * OFFSET_BLOCK..i]
            .iter()
            .map(|m| u64::from(m.bytes))
            .sum();
        self.blocks[block] + before
    }

    /// Spill bytes of all samples.
    pub fn spill_bytes(&self) -> u64 {
        self.end
    }
}

impl std::ops::Deref for Samples {
    type Target = [SampleMeta];

    fn deref(&self) -> &[SampleMeta] {
        &self.meta
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCounts {
    pub in_files: u64,
    pub read: u64,
}

pub struct Pass1 {
    pub samples: Samples,
    pub rejects: Vec<RejectEntry>,
    pub counts: Vec<SourceCounts>,
    pub spill_path: PathBuf,
    /// Loaded from the cache (computed by an earlier run or another partition).
    pub reused: bool,
}

/// The cache's small parts (`summary.json`); written last, so its presence marks a complete cache.
#[derive(Debug, Serialize, Deserialize)]
struct Summary {
    key: String,
    samples: u64,
    spill_bytes: u64,
    counts: Vec<SourceCounts>,
    rejects: Vec<RejectEntry>,
}

const SPILL_FILE: &str = "prepared.jsonl";
const SAMPLES_FILE: &str = "samples.bin";
const SUMMARY_FILE: &str = "summary.json";
/// A lock not refreshed for this long belongs to a process that died: it is taken over.
pub const STALE_LOCK: Duration = Duration::from_secs(60);
const HEARTBEAT: Duration = Duration::from_secs(5);
const CACHE_PREFIX: &str = "pass1-";

/// The cache key: what decides pass 1's result.
pub fn cache_key(ctx: &BuildContext) -> Result<String, BuildError> {
    let mut h = Sha256::new();
    h.update(b"llava-data pass1 cache 1\n");
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(b"\nconfig ");
    h.update(ctx.config_sha256.as_bytes());
    h.update(b"\ntokenizer ");
    h.update(ctx.tokenizer.sha256().as_bytes());
    for source in &ctx.config.sources {
        for path in source.json.paths() {
            let len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
            h.update(format!("\n{} {len}", path.display()).as_bytes());
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// The cache folder of `key` in `work`.
fn cache_dir(work: &Path, key: &str) -> PathBuf {
    work.join(format!("{CACHE_PREFIX}{}", &key[..16]))
}

/// Removes every pass-1 cache (and lock) of `work`; called once the manifest is written.
pub fn remove_caches(work: &Path) {
    let Ok(entries) = std::fs::read_dir(work) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(CACHE_PREFIX)
        {
            let path = entry.path();
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(e) = removed {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }
}

/// Pass 1 from the cache, or computed (once, whichever process gets the lock) and cached.
pub fn run(ctx: &BuildContext, options: &BuildOptions) -> Result<Pass1, BuildError> {
    let work = ctx.output.join(WORK_DIR);
    std::fs::create_dir_all(&work).map_err(io_err(&work))?;
    let key = cache_key(ctx)?;
    let dir = cache_dir(&work, &key);
    let lock_path = dir.with_extension("lock");
    let mut last_note: Option<std::time::Instant> = None;
    loop {
        if let Some(pass1) = load(&dir, &key, ctx.config.sources.len())? {
            tracing::info!(
                "pass 1/2: reusing {} ({} samples, {} rejected)",
                dir.display(),
                pass1.samples.len(),
                pass1.rejects.len()
            );
            return Ok(pass1);
        }
        match Lock::take(&lock_path)? {
            Some(lock) => {
                // Another process may have finished between the check and the lock.
                if let Some(pass1) = load(&dir, &key, ctx.config.sources.len())? {
                    drop(lock);
                    return Ok(pass1);
                }
                let pass1 = compute_into(ctx, options, &work, &dir, &key)?;
                drop(lock);
                return Ok(pass1);
            }
            None => {
                let age = std::fs::metadata(&lock_path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok());
                if age.is_some_and(|a| a > STALE_LOCK) || holder_is_gone(&lock_path) {
                    tracing::warn!(
                        "{}: its build stopped (its process is gone, or it was not refreshed for \
                         {}s); taking it over",
                        lock_path.display(),
                        STALE_LOCK.as_secs()
                    );
                    std::fs::remove_file(&lock_path).ok();
                    continue;
                }
                if last_note.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                    tracing::info!(
                        "pass 1/2: another process is computing it ({}); waiting",
                        lock_path.display()
                    );
                    last_note = Some(std::time::Instant::now());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// The cache in `dir` if it is complete and for `key`.
fn load(dir: &Path, key: &str, sources: usize) -> Result<Option<Pass1>, BuildError> {
    let summary_path = dir.join(SUMMARY_FILE);
    let Ok(text) = std::fs::read_to_string(&summary_path) else {
        return Ok(None);
    };
    let Ok(summary) = serde_json::from_str::<Summary>(&text) else {
        tracing::warn!("{}: unreadable; pass 1 runs again", summary_path.display());
        return Ok(None);
    };
    let spill_path = dir.join(SPILL_FILE);
    let spill_ok = std::fs::metadata(&spill_path).is_ok_and(|m| m.len() == summary.spill_bytes);
    let samples_path = dir.join(SAMPLES_FILE);
    let samples_len = std::fs::metadata(&samples_path).map_or(u64::MAX, |m| m.len());
    if summary.key != key
        || !spill_ok
        || samples_len != summary.samples * SampleMeta::ENCODED as u64
        || summary.counts.len() != sources
    {
        tracing::warn!("{}: incomplete or stale; pass 1 runs again", dir.display());
        return Ok(None);
    }
    let file = File::open(&samples_path).map_err(io_err(&samples_path))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut samples = Samples::with_capacity(summary.samples as usize);
    let mut buf = [0u8; SampleMeta::ENCODED];
    for _ in 0..summary.samples {
        reader.read_exact(&mut buf).map_err(io_err(&samples_path))?;
        let decoded = SampleMeta::decode(&buf);
        // The spill holds the samples back to back, in this order.
        let consistent = decoded.is_some_and(|(offset, meta)| {
            offset == samples.spill_bytes()
                && offset + u64::from(meta.bytes) <= summary.spill_bytes
                && usize::from(meta.source) < sources
        });
        let Some((_, meta)) = decoded.filter(|_| consistent) else {
            tracing::warn!(
                "{}: inconsistent; pass 1 runs again",
                samples_path.display()
            );
            return Ok(None);
        };
        samples.push(meta);
    }
    Ok(Some(Pass1 {
        samples,
        rejects: summary.rejects,
        counts: summary.counts,
        spill_path,
        reused: true,
    }))
}

/// `host <name> pid <id>`: who holds a lock.
fn lock_owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("host {} pid {}", host.trim(), std::process::id())
}

/// A lock held by a process of this machine that no longer exists (killed during pass 1).
fn holder_is_gone(lock: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(lock) else {
        return false;
    };
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut words = text.split_whitespace();
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("host"), Some(h), Some("pid"), Some(pid))
            if !host.trim().is_empty() && h == host.trim() =>
        {
            pid.parse::<u32>()
                .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        }
        _ => false,
    }
}

/// An exclusive lock file, refreshed by a heartbeat thread while held, removed on drop.
struct Lock {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
}

impl Lock {
    /// `None` when another process holds it.
    fn take(path: &Path) -> Result<Option<Lock>, BuildError> {
        let mut file = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(None),
            Err(e) => return Err(io_err(path)(e)),
        };
        writeln!(file, "{}", lock_owner()).map_err(io_err(path))?;
        let stop = Arc::new(AtomicBool::new(false));
        let heartbeat = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut since = Duration::ZERO;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    since += Duration::from_millis(100);
                    if since >= HEARTBEAT {
                        since = Duration::ZERO;
                        file.set_modified(SystemTime::now()).ok();
                    }
                }
            })
        };
        Ok(Some(Lock {
            path: path.to_path_buf(),
            stop,
            heartbeat: Some(heartbeat),
        }))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.heartbeat.take() {
            h.join().ok();
        }
        std::fs::remove_file(&self.path).ok();
    }
}

/// Computes pass 1 into a temporary folder and publishes it as `dir` (a rename: complete or absent).
fn compute_into(
    ctx: &BuildContext,
    options: &BuildOptions,
    work: &Path,
    dir: &Path,
    key: &str,
) -> Result<Pass1, BuildError> {
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let mut pass1 = compute(ctx, options, &tmp.join(SPILL_FILE))?;
    let spill_bytes = std::fs::metadata(&pass1.spill_path)
        .map_err(io_err(&pass1.spill_path))?
        .len();
    let samples_path = tmp.join(SAMPLES_FILE);
    {
        let file = File::create(&samples_path).map_err(io_err(&samples_path))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut buf = Vec::with_capacity(SampleMeta::ENCODED);
        for (i, s) in pass1.samples.iter().enumerate() {
            buf.clear();
            s.encode(pass1.samples.offset(i), &mut buf);
            out.write_all(&buf).map_err(io_err(&samples_path))?;
        }
        out.flush().map_err(io_err(&samples_path))?;
    }
    let summary = Summary {
        key: key.to_string(),
        samples: pass1.samples.len() as u64,
        spill_bytes,
        counts: pass1.counts.clone(),
        rejects: pass1.rejects.clone(),
    };
    let summary_path = tmp.join(SUMMARY_FILE);
    let json = serde_json::to_vec(&summary).map_err(json_err(&summary_path))?;
    std::fs::write(&summary_path, json).map_err(io_err(&summary_path))?;
    // Caches of another config or tokenizer are stale; ours replaces any incomplete one.
    if let Ok(entries) = std::fs::read_dir(work) {
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with(CACHE_PREFIX) && path.is_dir() && path != tmp {
                std::fs::remove_dir_all(&path).ok();
            }
        }
    }
    std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
    pass1.spill_path = dir.join(SPILL_FILE);
    Ok(pass1)
}

/// Records are prepared this many at a time (parallel inside a chunk, ordered across chunks).
const CHUNK: usize = 1024;

fn compute(
    ctx: &BuildContext,
    options: &BuildOptions,
    spill_path: &Path,
) -> Result<Pass1, BuildError> {
    let spill_path = spill_path.to_path_buf();
    let spill_file = File::create(&spill_path).map_err(io_err(&spill_path))?;
    let mut spill = Spill {
        writer: BufWriter::new(spill_file),
    };

    // Selection needs each source's record count (percentages, `end:`, `random:`).
    let mut counts = Vec::new();
    let mut selections = Vec::new();
    for (s, source) in ctx.config.sources.iter().enumerate() {
        let mut in_files = 0u64;
        for path in source.json.paths() {
            for_each_entry(&path, &mut |_| in_files += 1)?;
        }
        let selection = select(
            source.sampling,
            in_files as usize,
            ctx.config.seed,
            &source.name,
        );
        counts.push(SourceCounts {
            in_files,
            read: selection.count() as u64,
        });
        selections.push((s, selection));
    }
    let total: u64 = counts.iter().map(|c| c.read).sum();
    let bar = progress_bar(options.progress, total, "pass 1/2: tokenize + sizes");

    let mut samples = Samples::with_capacity(total as usize);
    let mut rejects = Vec::new();
    for (s, selection) in selections {
        let source = &ctx.config.sources[s];
        let mut ordinal = 0usize; // position in the concatenation of the source's files
        for (f, path) in source.json.paths().iter().enumerate() {
            let mut chunk: Vec<RawEntry> = Vec::with_capacity(CHUNK);
            let mut failure = None;
            let mut flush = |chunk: &mut Vec<RawEntry>,
                             samples: &mut Samples,
                             rejects: &mut Vec<RejectEntry>|
             -> Result<(), BuildError> {
                let prepared: Vec<_> = chunk
                    .par_iter()
                    .map(|entry| {
                        parse_record(entry).and_then(|r| {
                            prepare(&r, ctx.image_folder(s), &ctx.convert[s], &ctx.tokenizer)
                        })
                    })
                    .collect();
                for (entry, result) in chunk.drain(..).zip(prepared) {
                    match result {
                        Ok(sample) => samples.push(spill.push(s, f, &sample)?),
                        Err(reason) => rejects.push(RejectEntry {
                            source: source.name.clone(),
                            json_file: source.json_as_written[f].clone(),
                            index: entry.index as u64,
                            line: entry.line.map(|l| l as u64),
                            id: entry_id(&entry),
                            kind: reason.kind().to_string(),
                            reason: reason.to_string(),
                        }),
                    }
                    bar.inc(1);
                }
                bar.set_message(format!("{} rejected", rejects.len()));
                Ok(())
            };
            for_each_entry(path, &mut |entry| {
                let selected = selection.contains(ordinal);
                ordinal += 1;
                if !selected || failure.is_some() {
                    return;
                }
                chunk.push(entry);
                if chunk.len() == CHUNK {
                    if let Err(e) = flush(&mut chunk, &mut samples, &mut rejects) {
                        failure = Some(e);
                    }
                }
            })?;
            if let Some(e) = failure {
                return Err(e);
            }
            flush(&mut chunk, &mut samples, &mut rejects)?;
        }
    }
    spill.writer.flush().map_err(io_err(&spill_path))?;
    finish_progress(&bar);
    Ok(Pass1 {
        samples,
        rejects,
        counts,
        spill_path,
        reused: false,
    })
}

struct Spill {
    writer: BufWriter<File>,
}

impl Spill {
    fn push(
        &mut self,
        source: usize,
        file: usize,
        sample: &Prepared,
    ) -> Result<SampleMeta, BuildError> {
        let index = u32::try_from(sample.index).map_err(|_| {
            BuildError::TooLarge(format!(
                "record {} of a JSON file: a file may hold at most {} records; split it",
                sample.index,
                u32::MAX
            ))
        })?;
        let mut line = serde_json::to_vec(sample).map_err(json_err(Path::new("(spill)")))?;
        line.push(b'\n');
        let bytes = u32::try_from(line.len()).map_err(|_| {
            BuildError::TooLarge(format!(
                "record {} of a JSON file prepares to {} bytes (at most {})",
                sample.index,
                line.len(),
                u32::MAX
            ))
        })?;
        self.writer.write_all(&line).map_err(|e| BuildError::Io {
            path: PathBuf::from("(spill)"),
            source: e,
        })?;
        let tiles = u16::try_from(sample.num_tiles()).unwrap_or(u16::MAX);
        Ok(SampleMeta {
            index,
            bytes,
            length: sample.length as u32,
            num_tiles: tiles.max(u16::from(!sample.images.is_empty())),
            source: source as u16,
            file: file as u16,
        })
    }
}

/// Which positions of a source (over the concatenation of its files) are used.
pub enum Selection {
    Range(std::ops::Range<usize>),
    /// Sorted positions.
    Set(Vec<usize>),
}

impl Selection {
    pub fn count(&self) -> usize {
        match self {
            Selection::Range(r) => r.len(),
            Selection::Set(s) => s.len(),
        }
    }
    pub fn contains(&self, i: usize) -> bool {
        match self {
            Selection::Range(r) => r.contains(&i),
            Selection::Set(s) => s.binary_search(&i).is_ok(),
        }
    }
}

/// Applies a sampling rule to `len` records; `random:` is seeded per source name, and keeps the
/// chosen records in file order (the order inside an epoch is the trainer's business).
pub fn select(sampling: Sampling, len: usize, seed: u64, source: &str) -> Selection {
    match sampling {
        Sampling::All => Selection::Range(0..len),
        Sampling::First(c) => Selection::Range(0..c.resolve(len)),
        Sampling::End(c) => Selection::Range(len - c.resolve(len)..len),
        Sampling::Random(c) => {
            let mut all: Vec<usize> = (0..len).collect();
            shuffle(
                &mut all,
                &mut SplitMix64::for_purpose(seed, &format!("sampling:{source}")),
            );
            all.truncate(c.resolve(len));
            all.sort_unstable();
            Selection::Set(all)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llava_formats::config::Count;

    #[test]
    fn sampling_rules() {
        assert_eq!(select(Sampling::All, 5, 0, "a").count(), 5);
        let s = select(Sampling::End(Count::Records(2)), 5, 0, "a");
        assert!(s.contains(3) && s.contains(4) && !s.contains(2));
        let r1 = select(Sampling::Random(Count::Percent(50.0)), 9, 7, "a");
        let r2 = select(Sampling::Random(Count::Percent(50.0)), 9, 7, "a");
        assert_eq!(r1.count(), 5);
        assert!((0..9).all(|i| r1.contains(i) == r2.contains(i)));
    }

    #[test]
    fn offsets_from_blocks_are_the_running_sums() {
        let mut samples = Samples::with_capacity(0);
        let mut offsets = Vec::new();
        let mut end = 0u64;
        for i in 0..3 * OFFSET_BLOCK as u32 + 5 {
            let meta = SampleMeta {
                index: i,
                bytes: 100 + (i * 7919) % 1000,
                length: i,
                num_tiles: (i % 3) as u16,
                source: 0,
                file: 0,
            };
            offsets.push(end);
            end += u64::from(meta.bytes);
            samples.push(meta);
        }
        assert_eq!(samples.spill_bytes(), end);
        for (i, &want) in offsets.iter().enumerate() {
            assert_eq!(samples.offset(i), want, "sample {i}");
            let mut buf = Vec::new();
            samples[i].encode(samples.offset(i), &mut buf);
            let bytes: [u8; SampleMeta::ENCODED] = buf.try_into().expect("32 bytes");
            assert_eq!(SampleMeta::decode(&bytes), Some((want, samples[i])));
        }
        assert_eq!(std::mem::size_of::<SampleMeta>(), 20);
    }
}
