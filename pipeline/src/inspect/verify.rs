//! `inspect --verify`: every shard against the manifest. Lists every problem found (file + what),
//! never stops at the first.
//!
//! Per shard: present; size and SHA-256; readable as Parquet; schema version in the key-value
//! metadata; row count and row groups; per row: modality = the shard's, group id within the
//! shard's range, `length` = non-image ids + the images' tokens, `num_image_tokens` = the images'
//! tokens, one `-200` id per image, `labels` as long as `input_ids`, the row checksum (schema
//! version 4: `input_ids`, `labels` and the stored tile bytes); per shard: tokens, supervised
//! tokens, tiles, batches (runs of equal group and batch) and min/max length as in the manifest.
//! Then the totals.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read;
use std::panic::AssertUnwindSafe;

use llava_formats::constants::{IGNORE_INDEX, IMAGE_TOKEN_INDEX};
use llava_formats::manifest::ShardInfo;
use llava_formats::schema::{batch_checksums, batch_to_rows, check_version, shard_row_checksum};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sha2::{Digest, Sha256};

use super::BuildDir;

/// Row-level problems of one kind listed per shard before "and N more".
const ROWS_LISTED: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The shard (as in the manifest), or `manifest.json` / `shards/` for build-wide problems.
    pub file: String,
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file, self.what)
    }
}

#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub shards: usize,
    /// Rows read and checked.
    pub rows: u64,
    pub problems: Vec<Problem>,
    /// Not wrong, worth knowing (e.g. files in `shards/` that the manifest does not list).
    pub warnings: Vec<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Counts row-level problems of one kind, keeping the first few messages.
#[derive(Default)]
struct RowIssues {
    listed: Vec<String>,
    count: usize,
}

impl RowIssues {
    fn add(&mut self, msg: impl FnOnce() -> String) {
        self.count += 1;
        if self.listed.len() < ROWS_LISTED {
            self.listed.push(msg());
        }
    }

    fn flush(self, file: &str, problems: &mut Vec<Problem>) {
        let more = self.count - self.listed.len();
        let n = self.listed.len();
        for (i, what) in self.listed.into_iter().enumerate() {
            let what = if i + 1 == n && more > 0 {
                format!("{what} (and {more} more rows)")
            } else {
                what
            };
            problems.push(Problem {
                file: file.to_string(),
                what,
            });
        }
    }
}

fn sha256_of(path: &std::path::Path) -> std::io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// For a build in an object store: `shard` copied into a temporary folder (removed when the
/// returned guard drops). `Ok(None)` for a local build.
#[allow(clippy::type_complexity)]
fn fetch_remote(
    build: &BuildDir,
    shard: &ShardInfo,
) -> Result<Option<(tempdir::TempDir, std::path::PathBuf)>, String> {
    let Some(location) = super::remote(&build.dir).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let dir = tempdir::TempDir::new().map_err(|e| format!("a temporary folder: {e}"))?;
    let path = dir.0.join("shard.parquet");
    match location.download(&shard.file, &path) {
        Ok(_) => Ok(Some((dir, path))),
        Err(llava_storage::StorageError::Missing { .. }) => Err("missing".into()),
        Err(e) => Err(format!("cannot read: {e}")),
    }
}

/// A temporary folder removed on drop (no extra dependency for one use).
mod tempdir {
    pub struct TempDir(pub std::path::PathBuf);

    impl TempDir {
        pub fn new() -> std::io::Result<Self> {
            let dir = std::env::temp_dir().join(format!(
                "llava-verify-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::create_dir_all(&dir)?;
            Ok(TempDir(dir))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Checks one shard; returns the rows read.
fn verify_shard(build: &BuildDir, shard: &ShardInfo, problems: &mut Vec<Problem>) -> u64 {
    let mut problem = |what: String| {
        problems.push(Problem {
            file: shard.file.clone(),
            what,
        })
    };
    // A bucket's shard is checked from a temporary local copy (one shard at a time).
    let fetched = match fetch_remote(build, shard) {
        Ok(f) => f,
        Err(e) => {
            problem(e);
            return 0;
        }
    };
    let path = fetched
        .as_ref()
        .map_or_else(|| build.shard_path(&shard.file), |(_, p)| p.clone());
    if !path.is_file() {
        problem("missing".into());
        return 0;
    }
    match sha256_of(&path) {
        Ok((size, sha)) => {
            if size != shard.bytes {
                problem(format!(
                    "size {size} bytes, the manifest says {} (truncated or rewritten)",
                    shard.bytes
                ));
            }
            if sha != shard.sha256 {
                problem(format!(
                    "sha256 {sha} differs from the manifest's {}",
                    shard.sha256
                ));
            }
        }
        Err(e) => {
            problem(format!("cannot read: {e}"));
            return 0;
        }
    }
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            problem(format!("cannot open: {e}"));
            return 0;
        }
    };
    let builder = match ParquetRecordBatchReaderBuilder::try_new(file) {
        Ok(b) => b,
        Err(e) => {
            problem(format!("not readable as Parquet: {e}"));
            return 0;
        }
    };
    let meta = builder.metadata().file_metadata();
    // The writer's key-value metadata (schema version) travels in the embedded Arrow schema; a
    // plain Parquet key-value entry is accepted too.
    let mut kv: std::collections::HashMap<String, String> = meta
        .key_value_metadata()
        .map(|kv| {
            kv.iter()
                .filter_map(|e| e.value.clone().map(|v| (e.key.clone(), v)))
                .collect()
        })
        .unwrap_or_default();
    kv.extend(
        builder
            .schema()
            .metadata()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    if let Err(e) = check_version(&kv) {
        problem(format!("schema version: {e}"));
    }
    let file_rows = meta.num_rows() as u64;
    if file_rows != shard.rows {
        problem(format!(
            "{file_rows} rows in the file, the manifest says {}",
            shard.rows
        ));
    }
    let row_groups = builder.metadata().num_row_groups() as u64;
    if row_groups != shard.row_groups {
        problem(format!(
            "{row_groups} row groups in the file, the manifest says {}",
            shard.row_groups
        ));
    }
    // Every column, tiles included (the row checksums cover them), a few rows at a time: an
    // image row holds megabytes of tiles.
    let reader = match builder.with_batch_size(64).build() {
        Ok(r) => r,
        Err(e) => {
            problem(format!("not readable as Parquet: {e}"));
            return 0;
        }
    };

    let groups = shard.first_group..shard.first_group + shard.groups;
    let mut issues: [RowIssues; 7] = Default::default();
    let (mut rows, mut tokens, mut supervised, mut tiles) = (0u64, 0u64, 0u64, 0u64);
    let (mut min_len, mut max_len) = (u32::MAX, 0u32);
    // Batches: runs of equal (group, batch).
    let (mut batches, mut last_batch) = (0u64, None);
    for batch in reader {
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                problem(format!("unreadable rows after row {rows}: {e}"));
                break;
            }
        };
        let (shard_rows, checksums) = match (batch_to_rows(&batch), batch_checksums(&batch)) {
            (Ok(r), Ok(s)) => (r, s),
            (Err(e), _) | (_, Err(e)) => {
                problem(format!("columns: {e}"));
                break;
            }
        };
        for (r, &stored) in shard_rows.into_iter().zip(checksums) {
            let at = || format!("row {rows} (id {:?})", r.id);
            if r.modality != shard.modality.as_str() {
                issues[0].add(|| {
                    format!(
                        "{}: modality {:?} in a {} shard",
                        at(),
                        r.modality,
                        shard.modality
                    )
                });
            }
            if !groups.contains(&r.group) {
                issues[1].add(|| {
                    format!(
                        "{}: group {} outside the shard's groups {}..{}",
                        at(),
                        r.group,
                        groups.start,
                        groups.end
                    )
                });
            }
            let image_tokens: u64 = r.images.iter().map(|i| u64::from(i.image_tokens)).sum();
            let placeholders = r
                .input_ids
                .iter()
                .filter(|&&t| t == IMAGE_TOKEN_INDEX)
                .count();
            let expected = (r.input_ids.len() - placeholders) as u64 + image_tokens;
            if u64::from(r.length) != expected {
                issues[2].add(|| {
                    format!(
                        "{}: length {} but ids + image tokens give {expected}",
                        at(),
                        r.length
                    )
                });
            }
            if u64::from(r.num_image_tokens) != image_tokens || placeholders != r.images.len() {
                issues[3].add(|| {
                    format!(
                        "{}: {} image placeholders and {} image tokens for {} images with {image_tokens} tokens",
                        at(),
                        placeholders,
                        r.num_image_tokens,
                        r.images.len()
                    )
                });
            }
            if r.labels.len() != r.input_ids.len() {
                issues[4].add(|| {
                    format!(
                        "{}: {} labels for {} input ids",
                        at(),
                        r.labels.len(),
                        r.input_ids.len()
                    )
                });
            }
            if r.images.iter().any(|i| i.num_tiles == 0) {
                issues[5].add(|| format!("{}: an image with no tile", at()));
            }
            let found = shard_row_checksum(&r);
            if found != stored {
                issues[6].add(|| {
                    format!(
                        "{}: row checksum {found:016x}, stored {stored:016x} (the row changed \
                         after the build)",
                        at()
                    )
                });
            }
            if last_batch != Some((r.group, r.batch)) {
                batches += 1;
                last_batch = Some((r.group, r.batch));
            }
            rows += 1;
            tokens += u64::from(r.length);
            supervised += r.labels.iter().filter(|&&l| l != IGNORE_INDEX).count() as u64;
            tiles += r.images.iter().map(|i| u64::from(i.num_tiles)).sum::<u64>();
            min_len = min_len.min(r.length);
            max_len = max_len.max(r.length);
        }
    }
    for i in issues {
        i.flush(&shard.file, problems);
    }
    let mut problem = |what: String| {
        problems.push(Problem {
            file: shard.file.clone(),
            what,
        })
    };
    if rows == file_rows {
        let sums = [
            ("tokens", tokens, shard.tokens),
            ("supervised tokens", supervised, shard.supervised_tokens),
            ("tiles", tiles, shard.tiles),
            ("batches", batches, shard.batches),
        ];
        for (what, found, listed) in sums {
            if found != listed {
                problem(format!("{found} {what}, the manifest says {listed}"));
            }
        }
        if rows > 0 && (min_len, max_len) != (shard.min_length, shard.max_length) {
            problem(format!(
                "lengths {min_len}..={max_len}, the manifest says {}..={}",
                shard.min_length, shard.max_length
            ));
        }
    } else if rows < file_rows {
        problem(format!("only {rows} of {file_rows} rows readable"));
    }
    rows
}

/// Verifies every shard of a build against its manifest.
pub fn verify(build: &BuildDir) -> VerifyReport {
    verify_inner(build, None)
}

/// [`verify`] for `inspect --verify`: a bar over the rows on a terminal (`terminal`), else
/// progress lines when `crate::progress::set_progress_log_interval` asked for them.
pub fn verify_with_progress(build: &BuildDir, terminal: bool) -> VerifyReport {
    verify_inner(build, Some(terminal))
}

fn verify_inner(build: &BuildDir, progress: Option<bool>) -> VerifyReport {
    let m = &build.manifest;
    let bar = progress.map(|terminal| {
        let rows = m.shards.iter().map(|s| s.rows).sum();
        crate::progress::progress_bar(terminal, rows, "verify: rows")
    });
    let mut report = VerifyReport {
        shards: m.shards.len(),
        ..Default::default()
    };
    for shard in &m.shards {
        // A decoder that panics on corrupt bytes is one more problem, not the end of the check.
        let mut found = Vec::new();
        let rows =
            std::panic::catch_unwind(AssertUnwindSafe(|| verify_shard(build, shard, &mut found)));
        match rows {
            Ok(n) => report.rows += n,
            Err(_) => found.push(Problem {
                file: shard.file.clone(),
                what: "the Parquet reader failed on corrupt data".into(),
            }),
        }
        report.problems.extend(found);
        if let Some(b) = &bar {
            b.inc(shard.rows);
        }
    }
    if let Some(b) = &bar {
        crate::progress::finish_progress(b);
    }
    let listed_rows: u64 = m.shards.iter().map(|s| s.rows).sum();
    if listed_rows != m.totals.samples {
        report.problems.push(Problem {
            file: "manifest.json".into(),
            what: format!(
                "shards list {listed_rows} rows, totals say {} samples",
                m.totals.samples
            ),
        });
    }
    let written: u64 = m.sources.iter().map(|s| s.written).sum();
    if written != m.totals.samples {
        report.problems.push(Problem {
            file: "manifest.json".into(),
            what: format!(
                "sources wrote {written} samples, totals say {}",
                m.totals.samples
            ),
        });
    }
    // Files in shards/ that the manifest does not list.
    let listed: BTreeSet<String> = m.shards.iter().map(|s| s.file.clone()).collect();
    let dir = build.dir.join(crate::shard_build::SHARDS_DIR);
    // The shards folder's files, from the bucket or the disk.
    let present: Vec<String> = if let Ok(Some(location)) = super::remote(&build.dir) {
        location
            .list(crate::shard_build::SHARDS_DIR)
            .unwrap_or_default()
            .into_iter()
            .map(|(key, _)| key)
            .collect()
    } else if let Ok(entries) = std::fs::read_dir(&dir) {
        entries
            .filter_map(Result::ok)
            .map(|e| {
                format!(
                    "{}/{}",
                    crate::shard_build::SHARDS_DIR,
                    e.file_name().to_string_lossy()
                )
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut extra: Vec<String> = present
        .into_iter()
        .filter(|f| !listed.contains(f))
        .collect();
    extra.sort();
    for f in extra {
        report.warnings.push(Problem {
            file: f,
            what: "not in the manifest (ignored by trainers)".into(),
        });
    }
    report
}
