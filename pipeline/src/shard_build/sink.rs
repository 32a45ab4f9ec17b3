//! Where finished shards go: the local output folder (a temporary name renamed when complete),
//! or a bucket (`--output s3://bucket/prefix`, `gs://`, `az://`): each shard is streamed up as a
//! multipart upload while it is written (no local copy of the build), its record after it, and
//! the manifest last, so that a reader never sees a half build.
//!
//! A remote build keeps only its work files (pass 1's spill and cache, the plan, copies of the
//! shard records) in a local work folder: `LLAVA_DATA_WORK_DIR`, else one per output URL in the
//! temporary folder. The bucket holds `shards/`, `.work/build.json` and `.work/shards/*.json`, so
//! that a rerun on any machine continues from the shards already complete there, and `merge` of
//! partitions works on the bucket alone.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use llava_formats::manifest::{Manifest, MANIFEST_FILE, REJECTS_FILE};
use llava_storage::{Location, Upload};
use sha2::{Digest, Sha256};

use super::assemble::{assemble_sized, BUILD_RECORD};
use super::group::ShardPlan;
use super::shard::{record_path, ShardRecord};
use super::stage_clock::StageClocks;
use super::{io_err, json_err, BuildContext, BuildError, SHARDS_DIR, WORK_DIR};

/// The shard bytes' destination, as the Parquet writer writes them.
pub(crate) enum ShardOut {
    File(File),
    Upload(Upload),
}

impl Write for ShardOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            ShardOut::File(f) => f.write(buf),
            ShardOut::Upload(u) => u.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            ShardOut::File(f) => f.flush(),
            ShardOut::Upload(u) => u.flush(),
        }
    }
}

impl ShardOut {
    /// The local file (for early writeback), if this is one.
    pub(crate) fn file(&self) -> Option<&File> {
        match self {
            ShardOut::File(f) => Some(f),
            ShardOut::Upload(_) => None,
        }
    }
}

/// The local work folder of a build whose output is `url`.
pub fn work_folder(url: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("LLAVA_DATA_WORK_DIR") {
        return PathBuf::from(dir);
    }
    let hash = hex::encode(Sha256::digest(url.as_bytes()));
    std::env::temp_dir().join(format!("llava-data-work-{}", &hash[..16]))
}

fn key_of_shard(file: &str) -> String {
    format!("{SHARDS_DIR}/{file}")
}

fn key_of_record(file: &str) -> String {
    format!("{WORK_DIR}/{SHARDS_DIR}/{file}.json")
}

/// Opens the destination of shard `file`: `tmp_path` locally, an upload for a bucket.
pub(crate) fn create(
    ctx: &BuildContext,
    file: &str,
    tmp_path: &Path,
) -> Result<ShardOut, BuildError> {
    match &ctx.remote {
        None => Ok(ShardOut::File(
            File::create(tmp_path).map_err(io_err(tmp_path))?,
        )),
        Some(remote) => Ok(ShardOut::Upload(remote.upload(&key_of_shard(file))?)),
    }
}

/// Whether shard `shard` is complete in the bucket: its record (for this config) and an object
/// of the recorded size.
pub(crate) fn is_finished_remote(ctx: &BuildContext, remote: &Location, shard: &ShardPlan) -> bool {
    let Ok(text) = remote.read(&key_of_record(&shard.file)) else {
        return false;
    };
    let Ok(record) = serde_json::from_slice::<ShardRecord>(&text) else {
        return false;
    };
    record.config_sha256 == ctx.config_sha256
        && remote
            .head(&key_of_shard(&shard.file))
            .ok()
            .flatten()
            .is_some_and(|i| i.size == record.info.bytes)
}

/// Completes shard `file`: locally an fsync, the record, then the rename to its final name; in
/// a bucket the upload's completion, then the record (a record there means a complete shard).
pub(crate) fn commit(
    ctx: &BuildContext,
    out: ShardOut,
    record: &ShardRecord,
    file: &str,
    tmp_path: &Path,
    final_path: &Path,
    clocks: &StageClocks,
) -> Result<(), BuildError> {
    let record_file = record_path(&ctx.output, file);
    let record_tmp = record_file.with_extension("json.tmp");
    let json = serde_json::to_vec_pretty(record).map_err(json_err(&record_tmp))?;
    let t = Instant::now();
    match out {
        ShardOut::File(f) => {
            f.sync_all().map_err(io_err(tmp_path))?;
            clocks.sync.add(t);
            drop(f);
        }
        ShardOut::Upload(u) => {
            u.finish()?;
            clocks.sync.add(t);
        }
    }
    // The record first, the rename last: a shard file under its final name is always complete.
    std::fs::write(&record_tmp, &json).map_err(io_err(&record_tmp))?;
    std::fs::rename(&record_tmp, &record_file).map_err(io_err(&record_file))?;
    match &ctx.remote {
        None => std::fs::rename(tmp_path, final_path).map_err(io_err(final_path))?,
        Some(remote) => remote.put(&key_of_record(file), Bytes::from(json))?,
    }
    Ok(())
}

/// Copies the plan's record (`.work/build.json`) to the bucket, for `merge` on another machine.
pub(crate) fn upload_build_record(ctx: &BuildContext) -> Result<(), BuildError> {
    let Some(remote) = &ctx.remote else {
        return Ok(());
    };
    let path = ctx.output.join(WORK_DIR).join(BUILD_RECORD);
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    remote.put(&format!("{WORK_DIR}/{BUILD_RECORD}"), Bytes::from(bytes))?;
    Ok(())
}

/// `merge` of a bucket: the plan's record and every shard record come from the bucket into the
/// local work folder `work`, the manifest is assembled there, then `rejects.jsonl` and, last,
/// `manifest.json` go up.
pub fn merge_remote(
    remote: &Location,
    work: &Path,
    progress: Option<bool>,
) -> Result<Manifest, BuildError> {
    let records_dir = work.join(WORK_DIR).join(SHARDS_DIR);
    for dir in [&records_dir, &work.join(SHARDS_DIR)] {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let build = remote.read(&format!("{WORK_DIR}/{BUILD_RECORD}"))?;
    let build_path = work.join(WORK_DIR).join(BUILD_RECORD);
    std::fs::write(&build_path, &build).map_err(io_err(&build_path))?;
    let mut sizes = std::collections::HashMap::new();
    for (key, info) in remote.list(SHARDS_DIR)? {
        if let Some(file) = key.strip_prefix(&format!("{SHARDS_DIR}/")) {
            sizes.insert(file.to_string(), info.size);
        }
    }
    for (key, _) in remote.list(&format!("{WORK_DIR}/{SHARDS_DIR}"))? {
        let Some(name) = key.rsplit('/').next().filter(|n| n.ends_with(".json")) else {
            continue;
        };
        let bytes = remote.read(&key)?;
        let path = records_dir.join(name);
        std::fs::write(&path, &bytes).map_err(io_err(&path))?;
    }
    let manifest = assemble_sized(work, progress, &|file| sizes.get(file).copied())?;
    let rejects = work.join(REJECTS_FILE);
    let bytes = std::fs::read(&rejects).map_err(io_err(&rejects))?;
    remote.put(REJECTS_FILE, Bytes::from(bytes))?;
    let path = work.join(MANIFEST_FILE);
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    remote.put_if_absent(MANIFEST_FILE, Bytes::from(bytes))?;
    Ok(manifest)
}
