//! `llava-data convert`: one JSON line per record, for looking at what a record becomes.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use llava_data::convert::{convert, ConvertConfig, Sample};
use llava_data::record::{entry_id, parse_record, read_entries, RawEntry};
use llava_data::reject::Reject;
use llava_data::template::Template;
use llava_data::tokenizer::TextTokenizer;
use llava_formats::geometry::{pinpoints_text, RECIPE_PINPOINTS};
use llava_imaging::{parse_pinpoints, AspectMode, MergeType};
use rayon::prelude::*;
use serde_json::json;
use sha2::{Digest, Sha256};

#[derive(Args)]
#[command(
    after_help = "Examples:\n  llava-data convert --data fixtures/data/llava_instruct_150k.json \\\n    --image-folder fixtures/images/coco/train2017 --tokenizer .cache/tokenizer/tokenizer.json \\\n    --template llava_llama_3 | head -n 1 | jq ."
)]
pub struct ConvertArgs {
    /// LLaVA records: a `.json` list or a `.jsonl` file.
    #[arg(long)]
    data: PathBuf,
    /// Folder that the records' `image` paths are relative to.
    #[arg(long, default_value = ".")]
    image_folder: PathBuf,
    /// The Llama-3-Instruct `tokenizer.json`.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Conversation template: `llava_llama_3` (fine-tuning) or `plain` (projector pretraining).
    #[arg(long, default_value = "llava_llama_3")]
    template: String,
    /// Image processing: `anyres` (base + best-resolution tiles), `pad` or `square` (one tile).
    #[arg(long, default_value = "anyres")]
    aspect: String,
    /// Anyres grid pinpoints as (width, height) pairs, or the range syntax `(1x1),...,(3x3)`.
    #[arg(long, default_value_t = pinpoints_text(&RECIPE_PINPOINTS))]
    pinpoints: String,
    /// The model's merge type: `spatial_unpad` (fine-tuning) or `flat` (pretraining); it decides
    /// how many tokens an image becomes.
    #[arg(long, default_value_t = MergeType::SpatialUnpad)]
    merge: MergeType,
    /// Maximum sequence length after image expansion (`model_max_length`).
    #[arg(long, default_value_t = 8192)]
    max_len: usize,
    /// Images with more pixels are rejected from their header (`max_image_pixels`; Pillow's
    /// `DecompressionBombError` threshold by default).
    #[arg(long, default_value_t = llava_imaging::PILLOW_MAX_IMAGE_PIXELS)]
    max_image_pixels: u64,
    /// Image files larger than this many MiB are rejected before they are read.
    #[arg(long, default_value_t = 256)]
    max_image_file_mb: u64,
    /// Write every tile as `DIR/<index>_<image>_<tile>.png` (tile 0 = the squashed base image).
    #[arg(long)]
    dump_tiles: Option<PathBuf>,
}

pub fn parse_aspect(aspect: &str, pinpoints: &str) -> Result<AspectMode> {
    Ok(match aspect {
        "anyres" => AspectMode::Anyres(
            parse_pinpoints(pinpoints).with_context(|| format!("--pinpoints {pinpoints:?}"))?,
        ),
        "pad" => AspectMode::Pad,
        "square" => AspectMode::Square,
        other => anyhow::bail!("--aspect {other:?}: expected anyres, pad or square"),
    })
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let template: Template = args
        .template
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--template: {e}"))?;
    let limits = llava_imaging::DecodeLimits {
        max_pixels: args.max_image_pixels,
        max_file_bytes: args.max_image_file_mb.saturating_mul(1 << 20),
    };
    let config = ConvertConfig {
        template,
        aspect: parse_aspect(&args.aspect, &args.pinpoints)?,
        merge: args.merge,
        model_max_length: args.max_len,
        budget: ConvertConfig::budget_for(&limits),
        limits,
    };
    let tokenizer = TextTokenizer::from_file(&args.tokenizer)?;
    let entries = read_entries(&args.data)?;
    if let Some(dir) = &args.dump_tiles {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // Convert in parallel a chunk at a time so that output stays in order and memory bounded.
    for chunk in entries.chunks(64) {
        let results: Vec<(&RawEntry, Result<Sample, Reject>)> = chunk
            .par_iter()
            .map(|entry| {
                let result = parse_record(entry)
                    .and_then(|r| convert(&r, &args.image_folder, &config, &tokenizer));
                (entry, result)
            })
            .collect();
        for (entry, result) in results {
            if let (Some(dir), Ok(sample)) = (&args.dump_tiles, &result) {
                dump_tiles(dir, sample)?;
            }
            match writeln!(out, "{}", sample_json(entry, &result)) {
                // `convert ... | head` is normal use: stop quietly when the reader is gone.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                other => other?,
            }
        }
    }
    Ok(())
}

fn sample_json(entry: &RawEntry, result: &Result<Sample, Reject>) -> serde_json::Value {
    match result {
        Ok(s) => json!({
            "index": entry.index,
            "id": s.id,
            "status": "ok",
            "input_ids": s.input_ids,
            "labels": s.labels,
            "length": s.length,
            "truncated": s.truncated,
            "images": s.images.iter().map(|img| json!({
                "path": img.path,
                "image_size": [img.image_size.0, img.image_size.1],
                "processing": &img.processing,
                "best_resolution": img.tiles.best_resolution.map(|(w, h)| [w, h]),
                "grid_cols": img.tiles.grid_cols,
                "grid_rows": img.tiles.grid_rows,
                "num_tiles": img.tiles.num_tiles,
                "image_tokens": img.image_tokens,
                "tiles_uint8_sha256": (0..img.tiles.num_tiles)
                    .map(|t| hex::encode(Sha256::digest(img.tiles.tile(t))))
                    .collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }),
        Err(reason) => json!({
            "index": entry.index,
            "id": entry_id(entry),
            "line": entry.line,
            "status": "rejected",
            "reason": reason.to_string(),
            "reason_kind": reason.kind(),
        }),
    }
}

fn dump_tiles(dir: &std::path::Path, sample: &Sample) -> Result<()> {
    for (i, img) in sample.images.iter().enumerate() {
        for t in 0..img.tiles.num_tiles {
            let path = dir.join(format!("{}_{}_{}.png", sample.index, i, t));
            llava_imaging::write_tile_png(&img.tiles, t, &path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}
