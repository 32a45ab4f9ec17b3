//! Synthetic shards in the real format (schema v3: `raw` tiles, row groups of whole batches, manifest), for the
//! loader's tests and `loader-bench`. Not a builder: lengths and pixels are made up, but the
//! layout rules (one modality per shard, whole groups, groups sorted by length, consecutive
//! batches) are the ones `llava-data build` follows.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use llava_formats::constants::{IGNORE_INDEX, IMAGE_TOKEN_INDEX, TOKENS_PER_TILE};
use llava_formats::manifest::{Manifest, Modality, ShardInfo, MANIFEST_FILE};
use llava_formats::schema::{
    rows_to_batch, shard_schema, writer_properties, ImageMeta, RowGroupCutter, ShardRow,
};
use llava_formats::tile_codec::{self, TileEncoding};
use parquet::arrow::ArrowWriter;
use sha2::{Digest, Sha256};

use super::error::{DataError, DataResult};
use super::rng::{shuffle, SplitMix64};

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub image_samples: usize,
    pub text_samples: usize,
    pub batch_size: usize,
    pub group_size: usize,
    /// Groups per shard file.
    pub groups_per_shard: usize,
    /// Tiles per image: 1 (pad/square) or 3, 4, 5 (anyres). 0 = vary per sample.
    pub tiles_per_image: u32,
    pub tile_size: u32,
    pub seed: u64,
    /// Rows after which a row group is closed (at a batch end); the build's rule otherwise
    /// (~1 MiB of raw bytes or 8192 rows).
    pub row_group_max_rows: Option<usize>,
}

impl Default for SynthSpec {
    fn default() -> Self {
        Self {
            image_samples: 40,
            text_samples: 25,
            batch_size: 4,
            group_size: 12,
            groups_per_shard: 2,
            tiles_per_image: 0,
            tile_size: 336,
            seed: 7,
            row_group_max_rows: None,
        }
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn parquet_err(path: &Path) -> impl Fn(parquet::errors::ParquetError) -> DataError + '_ {
    move |source| DataError::Parquet {
        path: path.to_path_buf(),
        row_group: None,
        source,
    }
}

/// Writes one shard (row groups of whole batches, cut as `llava-data build` cuts them) and
/// returns its manifest entry.
pub fn write_shard(
    dir: &Path,
    file: &str,
    modality: Modality,
    batches: impl IntoIterator<Item = Vec<ShardRow>>,
) -> DataResult<ShardInfo> {
    write_shard_with(dir, file, modality, batches, RowGroupCutter::default())
}

/// [`write_shard`] with row groups cut by `cutter`.
pub fn write_shard_with(
    dir: &Path,
    file: &str,
    modality: Modality,
    batches: impl IntoIterator<Item = Vec<ShardRow>>,
    mut cutter: RowGroupCutter,
) -> DataResult<ShardInfo> {
    let path = dir.join(file);
    let schema = shard_schema(TileEncoding::Raw);
    let props = writer_properties(1, TileEncoding::Raw).map_err(parquet_err(&path))?;
    let out = File::create(&path).map_err(io_err(&path))?;
    let mut writer =
        ArrowWriter::try_new(out, schema.clone(), Some(props)).map_err(parquet_err(&path))?;
    let mut info = ShardInfo::empty(file, modality);
    for rows in batches {
        for r in &rows {
            info.count_row(r);
        }
        writer
            .write(&rows_to_batch(&encode_tiles(&rows, &path)?, &schema))
            .map_err(parquet_err(&path))?;
        info.batches += 1;
        if cutter.add_batch(&rows) {
            writer.flush().map_err(parquet_err(&path))?;
            info.row_groups += 1;
        }
    }
    if cutter.pending_rows() > 0 {
        info.row_groups += 1;
    }
    writer.close().map_err(parquet_err(&path))?;
    let mut bytes = Vec::new();
    File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err(&path))?;
    info.bytes = bytes.len() as u64;
    info.sha256 = hex::encode(Sha256::digest(&bytes));
    Ok(info)
}

/// A manifest for `shards` (sources and most totals left empty: the loader does not use them).
pub fn manifest(
    shards: Vec<ShardInfo>,
    batch_size: usize,
    group_size: usize,
    tile_size: u32,
) -> Manifest {
    Manifest::for_shards(
        "llava-trainer synthetic",
        shards,
        batch_size,
        group_size,
        tile_size,
    )
}

pub fn write_manifest(dir: &Path, manifest: &Manifest) -> DataResult<()> {
    let path = dir.join(MANIFEST_FILE);
    let text = serde_json::to_string_pretty(manifest).map_err(|source| DataError::Manifest {
        path: path.clone(),
        source,
    })?;
    std::fs::write(&path, text).map_err(io_err(&path))
}

/// The rows with their CHW tiles stored as `raw` tiles are (`tile_codec::encode_raw`, zstd 1).
fn encode_tiles(rows: &[ShardRow], path: &Path) -> DataResult<Vec<ShardRow>> {
    rows.iter()
        .map(|r| {
            let tiles = r
                .tiles
                .iter()
                .map(|t| {
                    let side = ((t.len() / 3) as f64).sqrt() as usize;
                    tile_codec::encode_raw(t, side, 1).map_err(|e| DataError::Corrupt {
                        path: path.to_path_buf(),
                        row_group: None,
                        detail: format!("cannot store a synthetic tile: {e}"),
                    })
                })
                .collect::<DataResult<Vec<_>>>()?;
            Ok(ShardRow { tiles, ..r.clone() })
        })
        .collect()
}

/// A deterministic tile with some structure (gradients) and noise, so zstd sees image-like data.
pub fn synth_tile(seed: u64, tile_size: u32) -> Vec<u8> {
    let s = tile_size as usize;
    let mut rng = SplitMix64::new(seed);
    let mut out = vec![0u8; 3 * s * s];
    let mut noise = 0u64;
    for (i, v) in out.iter_mut().enumerate() {
        if i % 8 == 0 {
            noise = rng.next_u64();
        }
        let (c, y, x) = (i / (s * s), (i / s) % s, i % s);
        let base = (x + 2 * y + 50 * c) as u64 + seed;
        *v = (base as u8) ^ ((noise >> ((i % 8) * 8)) as u8 & 0x0f);
    }
    out
}

/// Sample `n` of a modality, with a made-up but consistent length.
fn synth_sample(image: bool, n: usize, spec: &SynthSpec, rng: &mut SplitMix64) -> ShardRow {
    let text_len = 8 + rng.below(300) as usize;
    let mut input_ids: Vec<i32> = (0..text_len).map(|_| rng.below(128_000) as i32).collect();
    input_ids[0] = 128_000;
    // Genuine token 0 ("!") must survive collation: the mask comes from lengths.
    if text_len > 4 {
        input_ids[3] = 0;
    }
    let mut images = Vec::new();
    let mut tiles = Vec::new();
    if image {
        input_ids[1] = IMAGE_TOKEN_INDEX;
        let num_tiles = match spec.tiles_per_image {
            0 => [1, 3, 4, 5][n % 4],
            t => t,
        };
        let (cols, rows) = match num_tiles {
            3 => (1, 2),
            4 => (3, 1),
            5 => (2, 2),
            _ => (1, 1),
        };
        let image_tokens = if num_tiles == 1 {
            TOKENS_PER_TILE + 1
        } else {
            TOKENS_PER_TILE + 24 * rows * (24 * cols + 1)
        };
        images.push(ImageMeta {
            path: format!("synth/{n}.jpg"),
            // Anyres images exactly fill their grid, so `spatial_unpad` removes nothing and the
            // token count above is the model's too (the shards train, not only load).
            width: if num_tiles == 1 { 640 } else { 336 * cols },
            height: if num_tiles == 1 { 480 } else { 336 * rows },
            processing: if num_tiles == 1 { "pad" } else { "anyres" }.to_string(),
            best_width: if num_tiles == 1 { 0 } else { 336 * cols },
            best_height: if num_tiles == 1 { 0 } else { 336 * rows },
            grid_cols: cols,
            grid_rows: rows,
            num_tiles,
            image_tokens,
        });
        for t in 0..num_tiles {
            tiles.push(synth_tile(
                spec.seed ^ ((n as u64) << 8) ^ u64::from(t),
                spec.tile_size,
            ));
        }
    }
    let labels = input_ids
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            if i < text_len / 2 || t == IMAGE_TOKEN_INDEX {
                IGNORE_INDEX
            } else {
                t
            }
        })
        .collect();
    let num_image_tokens: u32 = images.iter().map(|m| m.image_tokens).sum();
    let source = if image { "synth_image" } else { "synth_text" };
    ShardRow {
        id: format!("{source}-{n}"),
        source: source.to_string(),
        json_file: format!("{source}.json"),
        index: n as u64,
        length: (text_len - images.len()) as u32 + num_image_tokens,
        input_ids,
        labels,
        num_image_tokens,
        modality: if image { "image" } else { "text" }.to_string(),
        truncated: false,
        group: 0,
        batch: 0,
        images,
        tiles,
    }
}

/// Writes synthetic shards and `manifest.json` into `dir`; returns the manifest. Rows are made
/// one batch at a time, so large benchmark sets do not need to fit in memory.
pub fn write_synthetic(dir: &Path, spec: &SynthSpec) -> DataResult<Manifest> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut rng = SplitMix64::new(spec.seed);
    let mut shards = Vec::new();
    let mut next_group = 0u32;
    for (modality, count) in [
        (Modality::Image, spec.image_samples),
        (Modality::Text, spec.text_samples),
    ] {
        // Lengths first (cheap), then shuffle, cut into groups, sort each group by length.
        let seeds: Vec<u64> = {
            let mut r = SplitMix64::new(spec.seed ^ 0xabcdef ^ count as u64);
            (0..count).map(|_| r.next_u64()).collect()
        };
        let lengths: Vec<u32> = (0..count)
            .map(|n| {
                // Tile size 1: the same row (lengths only) without full-size pixels.
                let cheap = SynthSpec {
                    tile_size: 1,
                    ..spec.clone()
                };
                synth_sample(
                    modality == Modality::Image,
                    n,
                    &cheap,
                    &mut SplitMix64::new(seeds[n]),
                )
                .length
            })
            .collect();
        let mut order: Vec<usize> = (0..count).collect();
        shuffle(&mut order, &mut rng);
        let groups: Vec<Vec<usize>> = order
            .chunks(spec.group_size.max(1))
            .map(|g| {
                let mut g = g.to_vec();
                g.sort_by_key(|&n| (std::cmp::Reverse(lengths[n]), n));
                g
            })
            .collect();
        for (s, shard_groups) in groups.chunks(spec.groups_per_shard.max(1)).enumerate() {
            let file = format!("{modality}-{s:05}.parquet");
            let mut batches = Vec::new();
            for g in shard_groups {
                let group = next_group;
                next_group += 1;
                for (b, chunk) in g.chunks(spec.batch_size.max(1)).enumerate() {
                    batches.push((group, b as u32, chunk.to_vec()));
                }
            }
            let rows = batches.into_iter().map(|(group, b, chunk)| {
                chunk
                    .iter()
                    .map(|&n| {
                        let mut row = synth_sample(
                            modality == Modality::Image,
                            n,
                            spec,
                            &mut SplitMix64::new(seeds[n]),
                        );
                        row.group = group;
                        row.batch = b;
                        row
                    })
                    .collect::<Vec<_>>()
            });
            let cutter = match spec.row_group_max_rows {
                Some(rows) => RowGroupCutter::new(u64::MAX, rows),
                None => RowGroupCutter::default(),
            };
            shards.push(write_shard_with(dir, &file, modality, rows, cutter)?);
        }
    }
    let manifest = manifest(shards, spec.batch_size, spec.group_size, spec.tile_size);
    write_manifest(dir, &manifest)?;
    Ok(manifest)
}
