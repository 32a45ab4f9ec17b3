//! The manifest: written once every shard of the plan is finished, from the plan and the shards'
//! records alone (so `llava-data merge` can join partitions built on different machines).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use llava_formats::manifest::{
    BuildSettings, Grouping, Manifest, Modality, RejectEntry, SourceStats, Totals, FORMAT_NAME,
    MANIFEST_FILE, REJECTS_FILE,
};
use llava_formats::schema::SCHEMA_VERSION;
use serde::{Deserialize, Serialize};

use super::group::Plan;
use super::pass1::Pass1;
use super::shard::{record_path, ShardRecord};
use super::{io_err, json_err, BuildContext, BuildError, SHARDS_DIR, WORK_DIR};

pub(crate) const BUILD_RECORD: &str = "build.json";

/// What pass 1 and the plan decided: identical in every partition of a build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildRecord {
    /// The manifest without shards and totals; sources carry `in_files` and `read`.
    pub base: Manifest,
    pub shard_files: Vec<String>,
    pub pass1_rejects: Vec<RejectEntry>,
}

pub fn write_pass1_and_plan(
    work: &Path,
    ctx: &BuildContext,
    pass1: &Pass1,
    plan: &Plan,
) -> Result<(), BuildError> {
    let c = &ctx.config;
    let sources = c
        .sources
        .iter()
        .zip(&pass1.counts)
        .map(|(s, counts)| SourceStats {
            name: s.name.clone(),
            json: s.json_as_written.clone(),
            template: s.template.clone(),
            image_aspect_ratio: s.image_aspect_ratio.clone(),
            sampling: s.sampling.to_string(),
            in_files: counts.in_files,
            read: counts.read,
            written: 0,
            rejected: 0,
            rejects_by_kind: BTreeMap::new(),
        })
        .collect();
    let base = Manifest {
        format: FORMAT_NAME.to_string(),
        schema_version: SCHEMA_VERSION,
        created_by: format!("llava-data {}", env!("CARGO_PKG_VERSION")),
        config_sha256: ctx.config_sha256.clone(),
        tokenizer_sha256: ctx.tokenizer.sha256().to_string(),
        settings: BuildSettings {
            model_max_length: c.model_max_length,
            image_grid_pinpoints: ctx.pinpoints.iter().map(|&(w, h)| [w, h]).collect(),
            mm_patch_merge_type: c.mm_patch_merge_type,
            tile_size: llava_imaging::TILE,
            tile_encoding: c.tile_encoding,
            seed: c.seed,
        },
        grouping: Grouping {
            method: "length_pools".to_string(),
            batch_size: c.batch_size,
            group_size: c.group_size,
            length_pool_groups: c.length_pool_groups,
            groups: plan.groups.len() as u64,
            batches: plan.groups.iter().map(|g| plan.batch_count(g) as u64).sum(),
        },
        sources,
        shards: Vec::new(),
        totals: Totals::default(),
    };
    let record = BuildRecord {
        base,
        shard_files: plan.shards.iter().map(|s| s.file.clone()).collect(),
        pass1_rejects: pass1.rejects.clone(),
    };
    write_json_atomic(&work.join(BUILD_RECORD), &record)
}

fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), BuildError> {
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_vec_pretty(value).map_err(json_err(path))?;
    std::fs::write(&tmp, json).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Joins the plan and every shard record into `manifest.json` and `rejects.jsonl`.
pub fn assemble(output: &Path) -> Result<Manifest, BuildError> {
    assemble_inner(output, None, &local_len(output))
}

/// The size of each finished shard file in a local output folder.
fn local_len(output: &Path) -> impl Fn(&str) -> Option<u64> + '_ {
    move |file| {
        std::fs::metadata(output.join(SHARDS_DIR).join(file))
            .ok()
            .map(|m| m.len())
    }
}

/// [`assemble`] of a build whose shards live elsewhere (a bucket: `super::sink`): `output` holds
/// the work records, `shard_len` says each shard's stored size.
pub(crate) fn assemble_sized(
    output: &Path,
    progress: Option<bool>,
    shard_len: &dyn Fn(&str) -> Option<u64>,
) -> Result<Manifest, BuildError> {
    assemble_inner(output, progress, shard_len)
}

/// [`assemble`] for `llava-data merge`: a bar over the shard records on a terminal
/// (`terminal`), else progress lines when `crate::progress::set_progress_log_interval` asked.
pub fn assemble_with_progress(output: &Path, terminal: bool) -> Result<Manifest, BuildError> {
    assemble_inner(output, Some(terminal), &local_len(output))
}

fn assemble_inner(
    output: &Path,
    progress: Option<bool>,
    shard_len: &dyn Fn(&str) -> Option<u64>,
) -> Result<Manifest, BuildError> {
    let build_path = output.join(WORK_DIR).join(BUILD_RECORD);
    let text = std::fs::read_to_string(&build_path).map_err(io_err(&build_path))?;
    let build: BuildRecord = serde_json::from_str(&text).map_err(json_err(&build_path))?;
    let mut manifest = build.base.clone();
    let source_index: BTreeMap<String, usize> = manifest
        .sources
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), i))
        .collect();
    let json_files: Vec<Vec<String>> = manifest.sources.iter().map(|s| s.json.clone()).collect();
    let mut rejects = build.pass1_rejects.clone();
    let mut missing = Vec::new();
    let mut totals = Totals::default();
    let bar = progress.map(|terminal| {
        crate::progress::progress_bar(
            terminal,
            build.shard_files.len() as u64,
            "merge: shard records",
        )
    });
    for file in &build.shard_files {
        if let Some(b) = &bar {
            b.inc(1);
        }
        let path = record_path(output, file);
        let record: Option<ShardRecord> = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .filter(|r: &ShardRecord| r.config_sha256 == manifest.config_sha256)
            .filter(|r| shard_len(file) == Some(r.info.bytes));
        let Some(record) = record else {
            missing.push(file.clone());
            continue;
        };
        for (source, written) in manifest.sources.iter_mut().zip(&record.written) {
            source.written += written;
        }
        let info = &record.info;
        totals.samples += info.rows;
        if info.modality == Modality::Image {
            totals.image_samples += info.rows;
        } else {
            totals.text_samples += info.rows;
        }
        totals.tokens += info.tokens;
        totals.supervised_tokens += info.supervised_tokens;
        totals.tiles += info.tiles;
        totals.bytes += info.bytes;
        totals.images += record.images;
        totals.image_tokens += record.image_tokens;
        totals.truncated += record.truncated;
        rejects.extend(record.rejects.iter().cloned());
        manifest.shards.push(record.info);
    }
    if let Some(b) = &bar {
        crate::progress::finish_progress(b);
    }
    if !missing.is_empty() {
        return Err(BuildError::Incomplete {
            missing: missing.len(),
            total: build.shard_files.len(),
            first: missing[0].clone(),
        });
    }
    // Rejects in source order, then file order, then record order: independent of which pass or
    // partition found them.
    rejects.sort_by_key(|r| {
        let s = source_index.get(&r.source).copied().unwrap_or(usize::MAX);
        let f = json_files
            .get(s)
            .and_then(|j| j.iter().position(|f| *f == r.json_file));
        (s, f, r.index)
    });
    for r in &rejects {
        if let Some(&s) = source_index.get(&r.source) {
            let source = &mut manifest.sources[s];
            source.rejected += 1;
            *source.rejects_by_kind.entry(r.kind.clone()).or_default() += 1;
        }
    }
    for s in &manifest.sources {
        if s.written + s.rejected != s.read {
            return Err(BuildError::Inconsistent(format!(
                "source {}: written {} + rejected {} != read {}",
                s.name, s.written, s.rejected, s.read
            )));
        }
    }
    totals.rejected = rejects.len() as u64;
    manifest.totals = totals;

    let rejects_path = output.join(REJECTS_FILE);
    let mut out = Vec::new();
    for r in &rejects {
        serde_json::to_writer(&mut out, r).map_err(json_err(&rejects_path))?;
        out.write_all(b"\n").map_err(io_err(&rejects_path))?;
    }
    let tmp = rejects_path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, out).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &rejects_path).map_err(io_err(&rejects_path))?;
    write_json_atomic(&output.join(MANIFEST_FILE), &manifest)?;
    remove_stale_shards(output, &build.shard_files)?;
    // The build is complete: pass 1's cache is no longer needed.
    super::pass1::remove_caches(&output.join(WORK_DIR));
    Ok(manifest)
}

/// Shard files of an earlier build of another config would be mistaken for data: remove files
/// with our naming pattern that the plan does not list.
fn remove_stale_shards(output: &Path, planned: &[String]) -> Result<(), BuildError> {
    let dir = output.join(SHARDS_DIR);
    let entries = std::fs::read_dir(&dir).map_err(io_err(&dir))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let ours = (name.starts_with("image-") || name.starts_with("text-"))
            && (name.ends_with(".parquet") || name.ends_with(".parquet.tmp"));
        if ours && !planned.contains(&name) {
            tracing::warn!(
                "removing {} (not part of this build)",
                entry.path().display()
            );
            std::fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
        }
    }
    Ok(())
}
