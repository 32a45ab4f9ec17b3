//! The manifest: written once every shard of the plan is finished, from the plan and the shards'
//! records alone (so `llava-data merge` can join partitions built on different machines).

use std::collections::BTreeMap;
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
        // Absolute, so a trainer started elsewhere finds it (and checks it by SHA-256).
        tokenizer_path: Some(
            std::fs::canonicalize(&c.tokenizer)
                .unwrap_or_else(|_| c.tokenizer.clone())
                .to_string_lossy()
                .into_owned(),
        ),
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

fn read_build_record(output: &Path) -> Result<BuildRecord, BuildError> {
    let build_path = output.join(WORK_DIR).join(BUILD_RECORD);
    let text = std::fs::read_to_string(&build_path).map_err(io_err(&build_path))?;
    serde_json::from_str(&text).map_err(json_err(&build_path))
}

/// The record of shard `file` if the shard is finished (for this config, at its recorded size;
/// `shard_len` says the stored size, local or in a bucket).
fn finished_record(
    output: &Path,
    file: &str,
    config_sha256: &str,
    shard_len: &dyn Fn(&str) -> Option<u64>,
) -> Option<ShardRecord> {
    std::fs::read_to_string(record_path(output, file))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .filter(|r: &ShardRecord| r.config_sha256 == config_sha256)
        .filter(|r| shard_len(file) == Some(r.info.bytes))
}

/// Rejects in source order, then file order, then record order: independent of which pass or
/// partition found them.
fn sort_rejects(sources: &[SourceStats], rejects: &mut [RejectEntry]) {
    let source_index: BTreeMap<&str, usize> = sources
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    rejects.sort_by_key(|r| {
        let s = source_index.get(r.source.as_str()).copied();
        let f = s.and_then(|s| sources[s].json.iter().position(|f| *f == r.json_file));
        (s.unwrap_or(usize::MAX), f, r.index)
    });
}

fn write_rejects(output: &Path, rejects: &[RejectEntry]) -> Result<(), BuildError> {
    let rejects_path = output.join(REJECTS_FILE);
    let mut out = Vec::new();
    for r in rejects {
        serde_json::to_writer(&mut out, r).map_err(json_err(&rejects_path))?;
        out.push(b'\n');
    }
    // Per process: partitions that fail at once do not write into each other's file.
    let tmp = rejects_path.with_extension(format!("jsonl.{}.tmp", std::process::id()));
    std::fs::write(&tmp, out).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &rejects_path).map_err(io_err(&rejects_path))
}

/// After a failed pass 2: `rejects.jsonl` with what pass 1 and every finished shard rejected, so
/// that a build that stops still says which records it refused and why. Returns how many.
pub fn write_rejects_so_far(output: &Path) -> Result<usize, BuildError> {
    let build = read_build_record(output)?;
    let mut rejects = build.pass1_rejects;
    for file in &build.shard_files {
        if let Some(record) =
            finished_record(output, file, &build.base.config_sha256, &local_len(output))
        {
            rejects.extend(record.rejects);
        }
    }
    sort_rejects(&build.base.sources, &mut rejects);
    write_rejects(output, &rejects)?;
    Ok(rejects.len())
}

fn assemble_inner(
    output: &Path,
    progress: Option<bool>,
    shard_len: &dyn Fn(&str) -> Option<u64>,
) -> Result<Manifest, BuildError> {
    let build = read_build_record(output)?;
    let mut manifest = build.base.clone();
    let source_index: BTreeMap<String, usize> = manifest
        .sources
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), i))
        .collect();
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
        let Some(record) = finished_record(output, file, &manifest.config_sha256, shard_len) else {
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
    sort_rejects(&manifest.sources, &mut rejects);
    for r in &rejects {
        if let Some(&s) = source_index.get(&r.source) {
            let source = &mut manifest.sources[s];
            source.rejected += 1;
            *source.rejects_by_kind.entry(r.kind.clone()).or_default() += 1;
        }
    }
    // On disk before the counts are checked: a build that fails keeps what explains it.
    write_rejects(output, &rejects)?;
    let wrong: Vec<usize> = (0..manifest.sources.len())
        .filter(|&i| {
            let s = &manifest.sources[i];
            s.written + s.rejected != s.read
        })
        .collect();
    if !wrong.is_empty() {
        let explained: Vec<String> = wrong
            .iter()
            .map(|&s| explain_counts(output, &build, (s, &manifest.sources[s]), &rejects))
            .collect();
        return Err(BuildError::Inconsistent(format!(
            "{}; every reject found is in {}",
            explained.join("; "),
            output.join(REJECTS_FILE).display()
        )));
    }
    totals.rejected = rejects.len() as u64;
    manifest.totals = totals;

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

/// Why a source's counts do not add up, naming the records that explain it: shards whose rows
/// of the source differ from their record's count (with the rejects found in them), records
/// written twice or both written and rejected, records neither. Reads the shards' small columns
/// back; runs only when a build is about to fail.
fn explain_counts(
    output: &Path,
    build: &BuildRecord,
    (source_pos, source): (usize, &SourceStats),
    rejects: &[RejectEntry],
) -> String {
    let head = format!(
        "source {}: written {} + rejected {} != read {}",
        source.name, source.written, source.rejected, source.read
    );
    let mut seen: BTreeMap<(String, u64), (String, usize)> = BTreeMap::new();
    for r in rejects.iter().filter(|r| r.source == source.name) {
        let entry = seen.entry((r.json_file.clone(), r.index));
        entry
            .or_insert_with(|| (format!("{} (rejected: {})", r.id, r.kind), 0))
            .1 += 1;
    }
    let mut findings = Vec::new();
    for file in &build.shard_files {
        let path = output.join(SHARDS_DIR).join(file);
        let rows = match source_rows(&path, &source.name) {
            Ok(rows) => rows,
            Err(e) => return format!("{head} (reading {}: {e})", path.display()),
        };
        let record = finished_record(output, file, &build.base.config_sha256, &local_len(output));
        let counted = record.as_ref().map_or(0, |r| r.written[source_pos]);
        if rows.len() as u64 != counted {
            let in_shard: Vec<String> = record
                .iter()
                .flat_map(|r| &r.rejects)
                .take(5)
                .map(|r| {
                    format!(
                        "{} {} record {} ({})",
                        r.source, r.json_file, r.index, r.kind
                    )
                })
                .collect();
            findings.push(format!(
                "{file} holds {} row(s) of it but its record counts {counted} (rejected while \
                 writing it: {})",
                rows.len(),
                if in_shard.is_empty() {
                    "none".to_string()
                } else {
                    in_shard.join(", ")
                }
            ));
        }
        for (json_file, index, id) in rows {
            let entry = seen.entry((json_file, index));
            entry.or_insert_with(|| (format!("{id} (in {file})"), 0)).1 += 1;
        }
    }
    let doubled: Vec<String> = seen
        .iter()
        .filter(|(_, (_, n))| *n > 1)
        .take(10)
        .map(|((file, index), (what, n))| format!("{file} record {index}: {what}, {n} times"))
        .collect();
    if !doubled.is_empty() {
        findings.push(format!("counted more than once: {}", doubled.join(", ")));
    }
    let neither = source.read.saturating_sub(seen.len() as u64);
    if neither > 0 {
        findings.push(format!(
            "{neither} record(s) read are neither written nor rejected"
        ));
    }
    format!("{head}: {}", findings.join("; "))
}

/// (json file, index, id) of every row of `source` in the shard at `path`.
fn source_rows(path: &Path, source: &str) -> Result<Vec<(String, u64, String)>, String> {
    use arrow_array::{Array, StringArray, UInt64Array};
    use llava_formats::schema::col;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::arrow::ProjectionMask;

    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| e.to_string())?;
    let columns = [col::ID, col::SOURCE, col::JSON_FILE, col::INDEX];
    let mask = ProjectionMask::columns(builder.parquet_schema(), columns);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        let column = |name: &str| batch.column_by_name(name).map(|c| c.as_any());
        let strings = |name: &str| column(name).and_then(|c| c.downcast_ref::<StringArray>());
        let (Some(id), Some(src), Some(json_file), Some(index)) = (
            strings(col::ID),
            strings(col::SOURCE),
            strings(col::JSON_FILE),
            column(col::INDEX).and_then(|c| c.downcast_ref::<UInt64Array>()),
        ) else {
            return Err("not a shard of this format".into());
        };
        for r in (0..batch.num_rows()).filter(|&r| src.value(r) == source) {
            rows.push((
                json_file.value(r).to_string(),
                index.value(r),
                id.value(r).to_string(),
            ));
        }
    }
    Ok(rows)
}
