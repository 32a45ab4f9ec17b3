//! One sample as the model sees it: its tokens decoded back to text with the trained spans
//! marked and its images as placeholders, and its tiles as one picture.

use std::path::Path;

use image::{Rgb, RgbImage};
use llava_formats::constants::{IGNORE_INDEX, IMAGE_TOKEN_INDEX, TILE_SIZE};
use llava_formats::schema::{batch_to_rows, col as c, ImageMeta, ShardRow};
use llava_formats::tile_codec::TileEncoding;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use super::{BuildDir, InspectError};
use crate::tokenizer::TextTokenizer;

/// Pixels between the base tile and the grid (and between the pictures of two images).
pub const GAP: u32 = 8;

/// A sample found in the shards.
#[derive(Debug, Clone)]
pub struct Found {
    /// The shard file (as in the manifest).
    pub shard: String,
    pub row_group: usize,
    pub row: ShardRow,
}

fn parquet_err(path: &Path) -> impl Fn(parquet::errors::ParquetError) -> InspectError + '_ {
    move |e| InspectError::Parquet {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Finds a sample by id, or by `source:index` (the record's position in its JSON file), or, for a
/// bare number that is no id, by its position in shard order (`7` is the 8th row). Reads
/// the `id`, `source` and `index` columns of every shard until found, then the one row group
/// holding it (`tiles` only when `with_tiles`).
pub fn find(build: &BuildDir, key: &str, with_tiles: bool) -> Result<Found, InspectError> {
    let at = locate(build, &[key.to_string()])?;
    let mut rows = read_rows_at(build, &at, with_tiles)?;
    rows.pop()
        .ok_or_else(|| InspectError::NoSample(key.to_string()))
}

/// Where a sample is: the manifest's shard number and the row's position in that shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RowAt {
    pub shard: usize,
    pub position: usize,
}

/// Finds each key as [`find`] does (in one pass over the `id`, `source` and `index` columns of
/// the shards, stopping once all are found); fails naming the first key found nowhere.
pub fn locate(build: &BuildDir, keys: &[String]) -> Result<Vec<RowAt>, InspectError> {
    let by_index: Vec<Option<(&str, u64)>> = keys
        .iter()
        .map(|k| {
            k.rsplit_once(':')
                .and_then(|(s, i)| i.parse().ok().map(|i| (s, i)))
        })
        .collect();
    let mut found: Vec<Option<RowAt>> = vec![None; keys.len()];
    for (shard_no, shard) in build.manifest.shards.iter().enumerate() {
        if found.iter().all(Option::is_some) {
            break;
        }
        let path = build.shard_path(&shard.file);
        // On a bucket: only the id, source and index chunks.
        let file = build.open_shard(shard, &|meta| {
            super::remote::column_chunks(meta, Some(&[c::ID, c::SOURCE, c::INDEX]), None)
        })?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_err(&path))?;
        let schema = builder.schema().clone();
        let roots = |names: &[&str]| -> Result<Vec<usize>, InspectError> {
            names
                .iter()
                .map(|n| {
                    schema.index_of(n).map_err(|_| InspectError::Parquet {
                        path: path.clone(),
                        reason: format!("no column {n:?}"),
                    })
                })
                .collect()
        };
        let mask = ProjectionMask::roots(
            builder.parquet_schema(),
            roots(&[c::ID, c::SOURCE, c::INDEX])?,
        );
        let reader = builder
            .with_projection(mask)
            .build()
            .map_err(parquet_err(&path))?;
        let mut offset = 0usize;
        for batch in reader {
            let batch = batch.map_err(|e| InspectError::Parquet {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let ids = string_column(&batch, c::ID, &path)?;
            let sources = string_column(&batch, c::SOURCE, &path)?;
            let index = batch
                .column_by_name(c::INDEX)
                .and_then(|a| a.as_any().downcast_ref::<arrow_array::UInt64Array>())
                .ok_or_else(|| InspectError::Parquet {
                    path: path.clone(),
                    reason: "column \"index\" is missing or not uint64".into(),
                })?;
            for i in 0..batch.num_rows() {
                for (k, key) in keys.iter().enumerate() {
                    if found[k].is_some() {
                        continue;
                    }
                    let hit = ids.value(i) == key
                        || by_index[k]
                            .is_some_and(|(s, n)| sources.value(i) == s && index.value(i) == n);
                    if hit {
                        found[k] = Some(RowAt {
                            shard: shard_no,
                            position: offset + i,
                        });
                    }
                }
            }
            offset += batch.num_rows();
        }
    }
    keys.iter()
        .zip(found)
        .map(|(key, at)| match at {
            Some(at) => Ok(at),
            // A bare number that is no sample's id: the row at that position in shard order.
            None => key
                .parse::<u64>()
                .ok()
                .and_then(|n| nth_row(build, n))
                .ok_or_else(|| InspectError::NoSample(key.clone())),
        })
        .collect()
}

/// The `n`-th row in shard order (0 is the first).
pub fn nth_row(build: &BuildDir, n: u64) -> Option<RowAt> {
    let mut first = 0u64;
    for (shard_no, shard) in build.manifest.shards.iter().enumerate() {
        if n < first + shard.rows {
            return Some(RowAt {
                shard: shard_no,
                position: (n - first) as usize,
            });
        }
        first += shard.rows;
    }
    None
}

/// The rows at `at` (any order, repeats allowed), returned in that order. Per shard, reads only
/// the row groups holding them and, in those, only the selected rows (all columns, `tiles` only
/// when `with_tiles`).
pub fn read_rows_at(
    build: &BuildDir,
    at: &[RowAt],
    with_tiles: bool,
) -> Result<Vec<Found>, InspectError> {
    let mut out: Vec<Option<Found>> = vec![None; at.len()];
    let mut shards: Vec<usize> = at.iter().map(|a| a.shard).collect();
    shards.sort_unstable();
    shards.dedup();
    for shard_no in shards {
        let shard = build
            .manifest
            .shards
            .get(shard_no)
            .ok_or_else(|| InspectError::Usage(format!("no shard number {shard_no}")))?;
        let mut positions: Vec<usize> = at
            .iter()
            .filter(|a| a.shard == shard_no)
            .map(|a| a.position)
            .collect();
        positions.sort_unstable();
        positions.dedup();
        let rows = read_shard_rows(build, shard, &positions, with_tiles)?;
        for (k, a) in at.iter().enumerate() {
            if a.shard == shard_no {
                let i = positions.binary_search(&a.position).unwrap_or(0);
                out[k] = rows.get(i).cloned();
            }
        }
    }
    out.into_iter()
        .zip(at)
        .map(|(f, a)| {
            f.ok_or_else(|| {
                InspectError::Usage(format!(
                    "shard number {} has no row {}",
                    a.shard, a.position
                ))
            })
        })
        .collect()
}

/// Rows `positions` (sorted, distinct) of `shard`, through a row selection over the row groups
/// holding them: the other rows' pages are skipped, not decoded.
fn read_shard_rows(
    build: &BuildDir,
    shard: &llava_formats::manifest::ShardInfo,
    positions: &[usize],
    with_tiles: bool,
) -> Result<Vec<Found>, InspectError> {
    use parquet::arrow::arrow_reader::{RowSelection, RowSelector};
    let path = build.shard_path(&shard.file);
    // On a bucket: every column of the row groups holding `positions`.
    let file = build.open_shard(shard, &|meta| {
        let mut groups = Vec::new();
        let mut first = 0usize;
        for (g, rg) in meta.row_groups().iter().enumerate() {
            let n = rg.num_rows() as usize;
            if positions.iter().any(|&p| p >= first && p < first + n) {
                groups.push(g);
            }
            first += n;
        }
        super::remote::column_chunks(meta, None, Some(&groups))
    })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_err(&path))?;
    let rg_rows: Vec<usize> = builder
        .metadata()
        .row_groups()
        .iter()
        .map(|rg| rg.num_rows() as usize)
        .collect();
    // Each position's row group and place in it.
    let mut starts = Vec::with_capacity(rg_rows.len());
    let mut first = 0;
    for n in &rg_rows {
        starts.push(first);
        first += n;
    }
    let mut located = Vec::with_capacity(positions.len());
    for &p in positions {
        if p >= first {
            return Err(InspectError::Parquet {
                path: path.clone(),
                reason: format!("no row {p} (the shard has {first})"),
            });
        }
        let rg = starts.partition_point(|&s| s <= p) - 1;
        located.push((rg, p - starts[rg]));
    }
    let mut groups: Vec<usize> = located.iter().map(|l| l.0).collect();
    groups.dedup();
    let mut selectors = Vec::new();
    for &g in &groups {
        let mut next = 0;
        for &(_, r) in located.iter().filter(|l| l.0 == g) {
            if r > next {
                selectors.push(RowSelector::skip(r - next));
            }
            selectors.push(RowSelector::select(1));
            next = r + 1;
        }
        if rg_rows[g] > next {
            selectors.push(RowSelector::skip(rg_rows[g] - next));
        }
    }
    let all: Vec<usize> = (0..builder.schema().fields().len())
        .filter(|&i| with_tiles || builder.schema().field(i).name() != c::TILES)
        .collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), all);
    let reader = builder
        .with_projection(mask)
        .with_row_groups(groups)
        .with_row_selection(RowSelection::from(selectors))
        .build()
        .map_err(parquet_err(&path))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| InspectError::Parquet {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        rows.extend(batch_to_rows(&batch).map_err(|e| InspectError::Parquet {
            path: path.clone(),
            reason: e.to_string(),
        })?);
    }
    if rows.len() != located.len() {
        return Err(InspectError::Parquet {
            path: path.clone(),
            reason: format!(
                "read {} rows for {} selected: the row groups are shorter than their metadata says",
                rows.len(),
                located.len()
            ),
        });
    }
    Ok(rows
        .into_iter()
        .zip(located)
        .map(|(row, (row_group, _))| Found {
            shard: shard.file.clone(),
            row_group,
            row,
        })
        .collect())
}

fn string_column<'a>(
    batch: &'a arrow_array::RecordBatch,
    name: &str,
    path: &Path,
) -> Result<&'a arrow_array::StringArray, InspectError> {
    batch
        .column_by_name(name)
        .and_then(|a| a.as_any().downcast_ref::<arrow_array::StringArray>())
        .ok_or_else(|| InspectError::Parquet {
            path: path.to_path_buf(),
            reason: format!("column {name:?} is missing or not utf8"),
        })
}

/// How an image placeholder is shown in the text.
pub fn placeholder(img: &ImageMeta) -> String {
    let tiles = if img.num_tiles == 1 { "tile" } else { "tiles" };
    if img.processing == "anyres" {
        format!(
            "<image: {} tokens, {}x{} grid, {} {tiles}>",
            img.image_tokens, img.grid_cols, img.grid_rows, img.num_tiles
        )
    } else {
        format!(
            "<image: {} tokens, {}, {} {tiles}>",
            img.image_tokens, img.processing, img.num_tiles
        )
    }
}

/// How trained spans are marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marking {
    /// Bold green (ANSI), for a terminal.
    Color,
    /// `[[...]]`.
    Brackets,
}

const TRAINED_ON: &str = "\x1b[1;32m";
const TRAINED_OFF: &str = "\x1b[0m";

/// The sample's header (where it comes from, its images) and its text, trained spans marked.
pub fn render(
    found: &Found,
    tokenizer: &TextTokenizer,
    marking: Marking,
) -> Result<String, InspectError> {
    let r = &found.row;
    let mut out = format!(
        "id {:?}  source {}  {}#{}\nshard {}  row group {}  group {}  batch {}\nmodality {}  length {} ({} text + {} image tokens)  supervised {}{}\n",
        r.id,
        r.source,
        r.json_file,
        r.index,
        found.shard,
        found.row_group,
        r.group,
        r.batch,
        r.modality,
        r.length,
        r.input_ids.iter().filter(|&&t| t != IMAGE_TOKEN_INDEX).count(),
        r.num_image_tokens,
        r.labels.iter().filter(|&&l| l != IGNORE_INDEX).count(),
        if r.truncated { "  TRUNCATED" } else { "" },
    );
    for (k, img) in r.images.iter().enumerate() {
        out.push_str(&format!(
            "image {k}: {} ({}x{}, {}{})  {}\n",
            img.path,
            img.width,
            img.height,
            img.processing,
            if img.best_width > 0 {
                format!(", best resolution {}x{}", img.best_width, img.best_height)
            } else {
                String::new()
            },
            placeholder(img)
        ));
    }
    let legend = match marking {
        Marking::Color => format!("{TRAINED_ON}trained{TRAINED_OFF}"),
        Marking::Brackets => "[[trained]]".to_string(),
    };
    out.push_str(&format!("--- text ({legend}) ---\n"));
    out.push_str(&render_text(r, tokenizer, marking)?);
    out.push('\n');
    Ok(out)
}

/// What a run of positions is, as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Text the loss does not see (label −100): prompts, the template's headers.
    Context(String),
    /// Text with labels: what the model is trained to produce.
    Trained(String),
    /// An image placeholder: the image's number in the sample.
    Image(usize),
}

/// The sample's positions as runs of context text, trained text and images, decoded.
pub fn segments(r: &ShardRow, tokenizer: &TextTokenizer) -> Result<Vec<Segment>, InspectError> {
    #[derive(PartialEq, Clone, Copy)]
    enum Kind {
        Context,
        Trained,
        Image,
    }
    let kind = |i: usize| {
        if r.input_ids[i] == IMAGE_TOKEN_INDEX {
            Kind::Image
        } else if r.labels.get(i).is_some_and(|&l| l != IGNORE_INDEX) {
            Kind::Trained
        } else {
            Kind::Context
        }
    };
    let mut out = Vec::new();
    let mut image = 0;
    let mut i = 0;
    while i < r.input_ids.len() {
        let k = kind(i);
        if k == Kind::Image {
            out.push(Segment::Image(image));
            image += 1;
            i += 1;
            continue;
        }
        let start = i;
        while i < r.input_ids.len() && kind(i) == k {
            i += 1;
        }
        let ids: Vec<u32> = r.input_ids[start..i].iter().map(|&t| t as u32).collect();
        let text = tokenizer.decode(&ids)?;
        out.push(if k == Kind::Trained {
            Segment::Trained(text)
        } else {
            Segment::Context(text)
        });
    }
    Ok(out)
}

/// The decoded text alone.
pub fn render_text(
    r: &ShardRow,
    tokenizer: &TextTokenizer,
    marking: Marking,
) -> Result<String, InspectError> {
    let mut out = String::new();
    for segment in segments(r, tokenizer)? {
        match (segment, marking) {
            (Segment::Image(k), _) => match r.images.get(k) {
                Some(img) => out.push_str(&placeholder(img)),
                None => out.push_str("<image: no metadata>"),
            },
            (Segment::Trained(text), Marking::Color) => {
                out.push_str(TRAINED_ON);
                out.push_str(&text);
                out.push_str(TRAINED_OFF);
            }
            (Segment::Trained(text), Marking::Brackets) => {
                out.push_str("[[");
                out.push_str(&text);
                out.push_str("]]");
            }
            (Segment::Context(text), _) => out.push_str(&text),
        }
    }
    Ok(out)
}

/// Size (w, h) of the picture of one image: base tile, gap, grid of cols × rows tiles.
pub fn picture_size(img: &ImageMeta) -> (u32, u32) {
    let t = TILE_SIZE;
    if img.num_tiles > 1 {
        (t + GAP + img.grid_cols * t, t.max(img.grid_rows * t))
    } else {
        (t, t)
    }
}

/// One tile's bytes → an RGB picture.
fn decode_tile(bytes: &[u8], tile_encoding: TileEncoding) -> Result<RgbImage, InspectError> {
    let t = TILE_SIZE as usize;
    if tile_encoding == TileEncoding::Jpeg {
        let img = turbojpeg::decompress(bytes, turbojpeg::PixelFormat::RGB)
            .map_err(|e| InspectError::Image(format!("decoding a JPEG tile: {e}")))?;
        let mut packed = Vec::with_capacity(img.width * img.height * 3);
        for y in 0..img.height {
            packed.extend_from_slice(&img.pixels[y * img.pitch..y * img.pitch + img.width * 3]);
        }
        return RgbImage::from_raw(img.width as u32, img.height as u32, packed)
            .ok_or_else(|| InspectError::Image("JPEG tile of an odd size".into()));
    }
    let decoded;
    let bytes = if tile_encoding == TileEncoding::Raw {
        decoded = llava_formats::tile_codec::decode_raw(bytes, t)
            .map_err(|e| InspectError::Image(format!("decoding a raw tile: {e}")))?;
        &decoded[..]
    } else {
        bytes
    };
    if bytes.len() != 3 * t * t {
        return Err(InspectError::Image(format!(
            "raw tile has {} bytes, expected 3x{t}x{t} = {}",
            bytes.len(),
            3 * t * t
        )));
    }
    let plane = t * t;
    Ok(RgbImage::from_fn(t as u32, t as u32, |x, y| {
        let p = y as usize * t + x as usize;
        Rgb([bytes[p], bytes[plane + p], bytes[2 * plane + p]])
    }))
}

/// The picture of one image of a sample: its base tile on the left and its grid (rows × cols,
/// row-major) on the right, `GAP` px apart; white background.
pub fn image_picture(
    row: &ShardRow,
    image: usize,
    tile_encoding: TileEncoding,
) -> Result<RgbImage, InspectError> {
    let img = row
        .images
        .get(image)
        .ok_or_else(|| InspectError::Usage(format!("sample {:?} has no image {image}", row.id)))?;
    check_tiles(row)?;
    let first: usize = row.images[..image]
        .iter()
        .map(|i| i.num_tiles as usize)
        .sum();
    let (w, h) = picture_size(img);
    let mut canvas = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let t = TILE_SIZE;
    let base = decode_tile(&row.tiles[first], tile_encoding)?;
    image::imageops::replace(&mut canvas, &base, 0, 0);
    for k in 1..img.num_tiles {
        let g = k - 1;
        let (gx, gy) = (g % img.grid_cols.max(1), g / img.grid_cols.max(1));
        let piece = decode_tile(&row.tiles[first + k as usize], tile_encoding)?;
        image::imageops::replace(
            &mut canvas,
            &piece,
            i64::from(t + GAP + gx * t),
            i64::from(gy * t),
        );
    }
    Ok(canvas)
}

/// The tiles are as many as the images say.
fn check_tiles(row: &ShardRow) -> Result<(), InspectError> {
    let expected: u32 = row.images.iter().map(|i| i.num_tiles).sum();
    if row.tiles.len() != expected as usize {
        return Err(InspectError::Image(format!(
            "sample {:?} has {} tiles, its images say {expected}",
            row.id,
            row.tiles.len()
        )));
    }
    Ok(())
}

/// The picture of a sample's tiles: per image, [`image_picture`]; images one under the other,
/// `GAP` px apart. White background.
pub fn tiles_picture(
    row: &ShardRow,
    tile_encoding: TileEncoding,
) -> Result<RgbImage, InspectError> {
    if row.images.is_empty() {
        return Err(InspectError::Usage(format!(
            "sample {:?} has no image",
            row.id
        )));
    }
    check_tiles(row)?;
    let sizes: Vec<(u32, u32)> = row.images.iter().map(picture_size).collect();
    let width = sizes.iter().map(|s| s.0).max().unwrap_or(0);
    let height = sizes.iter().map(|s| s.1).sum::<u32>() + GAP * (sizes.len() as u32 - 1);
    let mut canvas = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let mut top = 0u32;
    for (k, size) in sizes.iter().enumerate() {
        let picture = image_picture(row, k, tile_encoding)?;
        image::imageops::replace(&mut canvas, &picture, 0, i64::from(top));
        top += size.1 + GAP;
    }
    Ok(canvas)
}
