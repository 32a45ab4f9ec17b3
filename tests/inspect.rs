//! `llava-data inspect` on the fixture mixture (issue 4's "done when"): the summary's numbers
//! against the manifest, the JSON fields, `--verify` on a good build and on three broken ones,
//! the tile picture's size, the sample text's marked spans.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llava_data::inspect::sample::{self, Marking, GAP};
use llava_data::inspect::summary::{summarize, SummaryOptions};
use llava_data::inspect::{verify::verify, BuildDir};
use llava_data::shard_build::{build, BuildOptions, Partition};
use llava_data::tokenizer::TextTokenizer;
use llava_e2e::*;
use llava_formats::constants::TILE_SIZE;
use llava_formats::manifest::Manifest;

/// One fixture build shared by every test of this file (built once, read-only afterwards).
fn built() -> &'static (PathBuf, Manifest) {
    static BUILT: OnceLock<(PathBuf, Manifest)> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = scratch("inspect");
        let config = fixture_mixture(&dir, "");
        let options = BuildOptions {
            output: None,
            partition: Partition::WHOLE,
            progress: false,
        };
        let manifest = build(&config, &options)
            .expect("build succeeds")
            .manifest
            .expect("a whole build writes the manifest");
        (dir.join("out"), manifest)
    })
}

/// A copy of the build, for breaking.
fn copy_build(name: &str) -> PathBuf {
    let (out, _) = built();
    let dir = scratch(name);
    for entry in ["manifest.json", "rejects.jsonl"] {
        std::fs::copy(out.join(entry), dir.join(entry)).unwrap();
    }
    std::fs::create_dir_all(dir.join("shards")).unwrap();
    for e in std::fs::read_dir(out.join("shards")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join("shards").join(p.file_name().unwrap())).unwrap();
    }
    dir
}

#[test]
fn summary_numbers_equal_the_manifest() {
    let (out, m) = built();
    let s = summarize(&BuildDir::open(out).unwrap(), &SummaryOptions::default()).unwrap();
    assert_eq!(s.samples, m.totals.samples);
    assert_eq!(s.tokens, m.totals.tokens);
    assert_eq!(s.supervised_tokens, m.totals.supervised_tokens);
    assert_eq!(s.shards, m.shards.len());
    // Per modality: the sums of the manifest's shard entries.
    for modality in ["image", "text"] {
        let shards: Vec<_> = m
            .shards
            .iter()
            .filter(|s| s.modality.as_str() == modality)
            .collect();
        let c = &s
            .modalities
            .iter()
            .find(|x| x.counts.modality == modality)
            .unwrap_or_else(|| panic!("no {modality} in the summary"))
            .counts;
        assert_eq!(
            c.samples,
            shards.iter().map(|s| s.rows).sum::<u64>(),
            "{modality}"
        );
        assert_eq!(
            c.tokens,
            shards.iter().map(|s| s.tokens).sum::<u64>(),
            "{modality}"
        );
        assert_eq!(
            c.supervised_tokens,
            shards.iter().map(|s| s.supervised_tokens).sum::<u64>(),
            "{modality}"
        );
        assert_eq!(
            c.tiles,
            shards.iter().map(|s| s.tiles).sum::<u64>(),
            "{modality}"
        );
        assert_eq!(
            c.length.max,
            u64::from(shards.iter().map(|s| s.max_length).max().unwrap())
        );
        assert_eq!(
            c.length.min,
            u64::from(shards.iter().map(|s| s.min_length).min().unwrap())
        );
        let histogram: u64 = s
            .modalities
            .iter()
            .filter(|x| x.counts.modality == modality)
            .flat_map(|x| &x.histogram)
            .map(|b| b.count)
            .sum();
        assert_eq!(
            c.samples, histogram,
            "the {modality} histogram counts every sample"
        );
    }
    // Per source: written samples; images and tiles add up to the totals.
    for src in &m.sources {
        let n: u64 = s
            .sources
            .iter()
            .filter(|c| c.source == src.name)
            .map(|c| c.samples)
            .sum();
        assert_eq!(n, src.written, "{}", src.name);
    }
    let sum =
        |f: fn(&llava_data::inspect::summary::Counts) -> u64| s.sources.iter().map(f).sum::<u64>();
    assert_eq!(sum(|c| c.images), m.totals.images);
    assert_eq!(sum(|c| c.tiles), m.totals.tiles);
    assert_eq!(sum(|c| c.image_tokens), m.totals.image_tokens);
    assert_eq!(sum(|c| c.truncated), m.totals.truncated);
    assert_eq!(
        s.grids.iter().map(|g| g.images).sum::<u64>(),
        m.totals.images
    );
    // Rejects: the manifest's count, the kinds from rejects.jsonl.
    assert_eq!(s.rejects.total, m.totals.rejected);
    assert_eq!(
        s.rejects.by_kind.iter().map(|k| k.count).sum::<u64>(),
        m.totals.rejected
    );
    // At the build's batch size the grouped batches are the build's batches.
    assert_eq!(s.padding.batch_size, m.grouping.batch_size);
    assert_eq!(s.padding.total.grouped.batches, m.grouping.batches);
    assert_eq!(s.padding.total.grouped.real_tokens, m.totals.tokens);
    assert!(s.padding.total.grouped.efficiency > 0.0 && s.padding.total.grouped.efficiency <= 1.0);
    // Four ranks: a quarter of the batches as steps (rounded up per modality).
    let s4 = summarize(
        &BuildDir::open(out).unwrap(),
        &SummaryOptions {
            world_size: 4,
            ..Default::default()
        },
    )
    .unwrap();
    for p in &s4.padding.modalities {
        assert_eq!(p.grouped.steps, p.grouped.batches.div_ceil(4));
        assert!(p.grouped.step_efficiency <= p.grouped.efficiency);
    }
}

#[test]
fn packing_report_packs_each_grouped_batch() {
    let (out, m) = built();
    let longest = m.shards.iter().map(|s| s.max_length).max().expect("shards");
    let at = |pack_length: u32| {
        summarize(
            &BuildDir::open(out).unwrap(),
            &SummaryOptions {
                pack_length: Some(pack_length),
                ..Default::default()
            },
        )
    };
    // Room for the whole batch in one row: no padding at all, one row per batch.
    let s = at(1 << 20).expect("summary");
    let total = s.padding.total.packed.as_ref().expect("packed report");
    assert_eq!(total.padding.real_tokens, m.totals.tokens);
    assert_eq!(total.rows, s.padding.total.grouped.batches);
    assert!((total.padding.efficiency - 1.0).abs() < 1e-12);
    // Pack length = the longest sample: at least a row per batch, at most one per sample.
    let s = at(longest).expect("summary");
    for p in &s.padding.modalities {
        let k = p.packed.as_ref().expect("per modality");
        assert_eq!(k.padding.real_tokens, p.grouped.real_tokens);
        assert!(k.rows >= p.grouped.batches);
        assert!(k.fill > 0.0 && k.fill <= 1.0);
    }
    let total = s.padding.total.packed.as_ref().expect("packed report");
    assert!(
        total.rows <= s.samples,
        "{} rows for {} samples",
        total.rows,
        s.samples
    );
    // Shorter than the longest sample: an error naming the pack length.
    let err = at(longest - 1).unwrap_err().to_string();
    assert!(
        err.contains(&format!("pack length {}", longest - 1)),
        "{err}"
    );
}

#[test]
fn summary_json_has_the_documented_fields() {
    let (out, _) = built();
    let s = summarize(&BuildDir::open(out).unwrap(), &SummaryOptions::default()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    for key in [
        "dir",
        "schema_version",
        "shards",
        "samples",
        "tokens",
        "supervised_tokens",
        "build",
        "sources",
        "modalities",
        "grids",
        "rejects",
        "padding",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    let source = &v["sources"][0];
    for key in [
        "source",
        "modality",
        "samples",
        "tokens",
        "supervised_tokens",
        "image_tokens",
        "images",
        "tiles",
        "truncated",
        "length",
    ] {
        assert!(source.get(key).is_some(), "sources[].{key}");
    }
    for key in ["min", "p50", "p90", "p99", "max", "mean"] {
        assert!(source["length"].get(key).is_some(), "length.{key}");
    }
    assert!(v["modalities"][0]["histogram"][0].get("count").is_some());
    for key in ["batch_size", "world_size", "random", "modalities", "total"] {
        assert!(v["padding"].get(key).is_some(), "padding.{key}");
    }
    for key in [
        "batches",
        "steps",
        "real_tokens",
        "padded_tokens",
        "efficiency",
        "step_efficiency",
    ] {
        assert!(
            v["padding"]["total"]["grouped"].get(key).is_some(),
            "grouped.{key}"
        );
        assert!(
            v["padding"]["total"]["random"].get(key).is_some(),
            "random.{key}"
        );
    }
    for key in ["total", "by_source", "by_kind"] {
        assert!(v["rejects"].get(key).is_some(), "rejects.{key}");
    }
}

fn problems(dir: &Path) -> Vec<String> {
    let report = verify(&BuildDir::open(dir).unwrap());
    report.problems.iter().map(|p| p.to_string()).collect()
}

#[test]
fn verify_passes_on_a_good_build() {
    let (out, m) = built();
    let report = verify(&BuildDir::open(out).unwrap());
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.rows, m.totals.samples);
    assert_eq!(report.shards, m.shards.len());
}

#[test]
fn verify_finds_a_flipped_byte() {
    let (_, m) = built();
    let dir = copy_build("inspect-flip");
    let shard = &m.shards[0];
    let path = dir.join(&shard.file);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let p = problems(&dir);
    assert!(
        p.iter()
            .any(|p| p.starts_with(&shard.file) && p.contains("sha256")),
        "{p:?}"
    );
}

#[test]
fn verify_finds_a_missing_shard() {
    let (_, m) = built();
    let dir = copy_build("inspect-missing");
    let shard = m.shards.last().unwrap();
    std::fs::remove_file(dir.join(&shard.file)).unwrap();
    let p = problems(&dir);
    assert_eq!(p, vec![format!("{}: missing", shard.file)]);
}

#[test]
fn verify_finds_a_truncated_shard() {
    let (_, m) = built();
    let dir = copy_build("inspect-truncated");
    let shard = &m.shards[0];
    let path = dir.join(&shard.file);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let p = problems(&dir);
    let of_shard = |what: &str| {
        p.iter()
            .any(|x| x.starts_with(&shard.file) && x.contains(what))
    };
    assert!(
        of_shard(&format!("the manifest says {}", shard.bytes)),
        "{p:?}"
    );
    assert!(of_shard("not readable as Parquet"), "{p:?}");
}

/// The id of an anyres sample with a `cols x rows` grid.
fn sample_with_grid(out: &Path, m: &Manifest, cols: u32, rows: u32) -> String {
    for shard in m
        .shards
        .iter()
        .filter(|s| s.modality == llava_formats::manifest::Modality::Image)
    {
        for r in read_shard(&out.join(&shard.file)) {
            if r.images.len() == 1
                && (r.images[0].grid_cols, r.images[0].grid_rows) == (cols, rows)
                && r.images[0].num_tiles > 1
            {
                return r.id;
            }
        }
    }
    panic!("no {cols}x{rows} sample in the fixture build");
}

#[test]
fn tile_picture_has_the_expected_size() {
    let (out, m) = built();
    let b = BuildDir::open(out).unwrap();
    let id = sample_with_grid(out, m, 2, 2);
    let found = sample::find(&b, &id, true).unwrap();
    let picture = sample::tiles_picture(&found.row, m.settings.tile_encoding).unwrap();
    assert_eq!(
        (picture.width(), picture.height()),
        (TILE_SIZE + GAP + 2 * TILE_SIZE, 2 * TILE_SIZE)
    );
    // The base tile is at the top left, pixel for pixel (raw CHW tile → RGB).
    assert_eq!(
        m.settings.tile_encoding,
        llava_formats::tile_codec::TileEncoding::Raw
    );
    let base = &llava_formats::tile_codec::decode_raw(&found.row.tiles[0], TILE_SIZE as usize)
        .expect("raw tile decodes");
    let plane = (TILE_SIZE * TILE_SIZE) as usize;
    let px = picture.get_pixel(5, 7).0;
    let at = 7 * TILE_SIZE as usize + 5;
    assert_eq!(px, [base[at], base[plane + at], base[2 * plane + at]]);
}

#[test]
fn sample_text_marks_the_trained_spans() {
    let (out, _) = built();
    let b = BuildDir::open(out).unwrap();
    let tokenizer = TextTokenizer::from_file(&tokenizer_path()).unwrap();
    // By source:index: the good text record of bad.jsonl (index 4).
    let found = sample::find(&b, "bad:4", false).unwrap();
    assert_eq!(found.row.id, "good_text");
    let text = sample::render(&found, &tokenizer, Marking::Brackets).unwrap();
    assert!(text.contains("Name a colour."), "{text}");
    assert!(
        text.contains("[[") && text.contains("Blue.") && text.contains("]]"),
        "{text}"
    );
    let blue = text.find("Blue.").unwrap();
    assert!(
        text[..blue].rfind("[[").unwrap() > text.find("Name a colour.").unwrap(),
        "{text}"
    );
    // An image sample shows its placeholder with token count, grid and tiles.
    let (_, m) = built();
    let id = sample_with_grid(out, m, 2, 2);
    let found = sample::find(&b, &id, false).unwrap();
    let text = sample::render(&found, &tokenizer, Marking::Color).unwrap();
    let tokens = found.row.images[0].image_tokens;
    assert!(
        text.contains(&format!("<image: {tokens} tokens, 2x2 grid, 5 tiles>")),
        "{text}"
    );
    assert!(text.contains("\x1b[1;32m"), "{text}");
    assert!(matches!(
        sample::find(&b, "no-such-id", false),
        Err(llava_data::inspect::InspectError::NoSample(_))
    ));
}
