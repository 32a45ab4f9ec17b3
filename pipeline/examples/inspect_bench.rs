//! How long `inspect` takes on a 100,000-row build: writes a synthetic build (text rows and
//! one-tile image rows with tiny fake tiles: the summary never reads tiles; realistic token
//! columns, row groups of whole batches of 8 as the build cuts them) with its manifest, then times the summary and
//! `--verify`. Not a test: `cargo run --release -p llava-data --example inspect_bench [ROWS] [DIR]`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::time::Instant;

use llava_data::inspect::summary::{summarize, SummaryOptions};
use llava_data::inspect::{verify::verify, BuildDir};
use llava_formats::constants::{IGNORE_INDEX, IMAGE_TOKEN_INDEX};
use llava_formats::manifest::Modality;
use llava_formats::manifest::{Manifest, ShardInfo, SourceStats, Totals};
use llava_formats::schema::{
    rows_to_batch, shard_schema, writer_properties, ImageMeta, RowGroupCutter, ShardRow,
};
use llava_formats::tile_codec::TileEncoding;
use parquet::arrow::ArrowWriter;
use sha2::{Digest, Sha256};

const BATCH: usize = 8;
const GROUP: usize = 64;
const SHARD_ROWS: usize = 10_048;
const SOURCES: [&str; 4] = ["caption", "vqa", "detail", "text"];

/// A small deterministic generator (the example must not depend on the build's RNG).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn row(i: usize, rng: &mut Lcg, is_image: bool, group: u32, batch: u32) -> ShardRow {
    let source = if is_image { SOURCES[i % 3] } else { SOURCES[3] };
    let text = 60 + rng.next(900) as usize;
    let prompt = text / 3;
    let mut input_ids: Vec<i32> = (0..text)
        .map(|k| 1000 + (k as i32 * 7919) % 120_000)
        .collect();
    let mut labels = input_ids.clone();
    labels[..prompt].fill(IGNORE_INDEX);
    let (images, tiles, image_tokens) = if is_image {
        input_ids[1] = IMAGE_TOKEN_INDEX;
        labels[1] = IGNORE_INDEX;
        let (cols, rows) = [(1, 2), (2, 1), (2, 2), (3, 1)][rng.next(4) as usize];
        let num_tiles = 1 + cols * rows;
        let tokens = 576 + 24 * rows * (24 * cols + 1);
        let meta = ImageMeta {
            path: format!("img/{i}.jpg"),
            width: 640,
            height: 480,
            processing: "anyres".into(),
            best_width: 336 * cols,
            best_height: 336 * rows,
            grid_cols: cols,
            grid_rows: rows,
            num_tiles,
            image_tokens: tokens,
        };
        (vec![meta], vec![vec![0u8; 16]; num_tiles as usize], tokens)
    } else {
        (vec![], vec![], 0)
    };
    let text_tokens = input_ids
        .iter()
        .filter(|&&t| t != IMAGE_TOKEN_INDEX)
        .count() as u32;
    ShardRow {
        id: format!("{source}-{i}"),
        source: source.into(),
        json_file: format!("{source}.json"),
        index: i as u64,
        input_ids,
        labels,
        length: text_tokens + image_tokens,
        num_image_tokens: image_tokens,
        modality: if is_image { "image" } else { "text" }.into(),
        truncated: false,
        group,
        batch,
        images,
        tiles,
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let total: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(100_000);
    let dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/inspect-bench"));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(dir.join("shards"))?;

    let started = Instant::now();
    let schema = shard_schema(TileEncoding::Raw);
    let props = writer_properties(3, TileEncoding::Raw)?;
    let mut rng = Lcg(42);
    let mut shards = Vec::new();
    let mut totals = Totals::default();
    let mut per_source: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut group, mut batch) = (0u32, 0u32);
    // 80% image rows, then 20% text rows; each shard one modality, whole groups.
    let image_rows = total * 4 / 5;
    for (modality, count, offset) in [
        ("image", image_rows, 0),
        ("text", total - image_rows, image_rows),
    ] {
        let mut done = 0;
        let mut n = 0;
        while done < count {
            let rows_here = SHARD_ROWS.min(count - done);
            let file = format!("shards/{modality}-{n:05}.parquet");
            let path = dir.join(&file);
            let mut writer =
                ArrowWriter::try_new(File::create(&path)?, schema.clone(), Some(props.clone()))?;
            let mut cutter = RowGroupCutter::default();
            let modality_of_shard = Modality::parse(modality).expect("image or text");
            let mut info = ShardInfo::empty(file.clone(), modality_of_shard);
            for g in (0..rows_here).collect::<Vec<_>>().chunks(GROUP) {
                let mut rows: Vec<ShardRow> = g
                    .iter()
                    .map(|&k| row(offset + done + k, &mut rng, modality == "image", group, 0))
                    .collect();
                rows.sort_by_key(|r| std::cmp::Reverse(r.length));
                for b in rows.chunks_mut(BATCH) {
                    for r in b.iter_mut() {
                        r.batch = batch;
                        info.count_row(r);
                        totals.images += r.images.len() as u64;
                        totals.image_tokens += u64::from(r.num_image_tokens);
                        *per_source
                            .entry(if modality == "image" {
                                SOURCES[(r.index % 3) as usize]
                            } else {
                                "text"
                            })
                            .or_default() += 1;
                    }
                    writer.write(&rows_to_batch(b, &schema))?;
                    if cutter.add_batch(b) {
                        writer.flush()?;
                        info.row_groups += 1;
                    }
                    info.batches += 1;
                    batch += 1;
                }
                group += 1;
            }
            if cutter.pending_rows() > 0 {
                info.row_groups += 1;
            }
            writer.close()?;
            let bytes = std::fs::read(&path)?;
            info.bytes = bytes.len() as u64;
            info.sha256 = hex::encode(Sha256::digest(&bytes));
            totals.tokens += info.tokens;
            totals.supervised_tokens += info.supervised_tokens;
            totals.tiles += info.tiles;
            totals.bytes += info.bytes;
            shards.push(info);
            done += rows_here;
            n += 1;
        }
    }
    totals.samples = total as u64;
    totals.image_samples = image_rows as u64;
    totals.text_samples = (total - image_rows) as u64;
    let mut manifest = Manifest::for_shards("inspect_bench", shards, BATCH, GROUP, 336);
    manifest.settings.seed = 42;
    manifest.totals = totals;
    manifest.sources = per_source
        .iter()
        .map(|(name, &n)| SourceStats {
            name: name.to_string(),
            json: vec![format!("{name}.json")],
            template: "llava_llama_3".into(),
            image_aspect_ratio: "anyres".into(),
            sampling: "all".into(),
            in_files: n,
            read: n,
            written: n,
            rejected: 0,
            rejects_by_kind: BTreeMap::new(),
        })
        .collect();

    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    println!(
        "wrote {total} rows in {} shards ({:.1} MiB) to {} in {:.1}s",
        manifest.shards.len(),
        manifest.totals.bytes as f64 / 1048576.0,
        dir.display(),
        started.elapsed().as_secs_f64()
    );

    let build = BuildDir::open(&dir)?;
    let t = Instant::now();
    let summary = summarize(&build, &SummaryOptions::default())?;
    let summary_s = t.elapsed().as_secs_f64();
    assert_eq!(summary.samples, total as u64);
    assert_eq!(summary.tokens, manifest.totals.tokens);
    let t = Instant::now();
    let report = verify(&build);
    let verify_s = t.elapsed().as_secs_f64();
    assert!(report.ok(), "{:?}", report.problems);
    println!("inspect summary: {summary_s:.2}s; inspect --verify: {verify_s:.2}s ({total} rows)");
    Ok(())
}
