//! Issue 27: builds of generated mixtures (1–6 sources, image and text-only records, records that
//! fail in pass 1 and in pass 2, any source order, 1 or 2 threads, whole or partitioned) succeed,
//! write every sound record once and report every other one once, with its source, JSON file,
//! index, id and kind. Images are a few dozen pixels, so that a case takes about a second.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use image::ImageEncoder;
use llava_data::shard_build::{assemble::assemble, build, Partition};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};
use serde_json::json;

use crate::common::tokenizer_path;
use crate::reject_attribution::{assert_reconciles, options, rejects, written_rows, RecordKey};
use llava_test_support::scratch;

/// One generated record, and what the build must do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rec {
    /// A sound image record (its image's format varies with its index).
    Image,
    /// A sound text-only record.
    Text,
    /// An empty human turn with a real answer: kept (the reference trains it).
    EmptyQuestion,
    /// Every turn empty or blank: pass 1 rejects it.
    AllEmpty,
    /// `conversations` is not a list: pass 1.
    BadShape,
    /// A line that is not JSON (JSONL files only): pass 1.
    InvalidJson,
    /// The image file does not exist: pass 1.
    MissingImage,
    /// Width × height over `max_image_pixels`: pass 1 (from the header).
    TooLarge,
    /// Baseline and progressive JPEGs cut mid-scan, a PNG cut in its pixel data, a WebP cut in
    /// half: the header probe passes, pass 2's decode rejects them.
    CutJpeg,
    CutProgressive,
    CutPng,
    CutWebp,
    /// A PNG whose pixel data is garbage (complete file): pass 2.
    CorruptPng,
}

impl Rec {
    /// `None` when the record is written; else the reject kind.
    fn kind(self) -> Option<&'static str> {
        match self {
            Rec::Image | Rec::Text | Rec::EmptyQuestion => None,
            Rec::AllEmpty => Some("empty_conversation"),
            Rec::BadShape => Some("no_conversations"),
            Rec::InvalidJson => Some("invalid_json"),
            Rec::MissingImage | Rec::CorruptPng => Some("image"),
            Rec::TooLarge => Some("image_too_large"),
            Rec::CutJpeg | Rec::CutProgressive | Rec::CutPng | Rec::CutWebp => {
                Some("truncated_image")
            }
        }
    }

    fn image_file(self, index: usize) -> Option<&'static str> {
        const GOOD: [&str; 4] = ["good.png", "good.jpg", "good_prog.jpg", "good.webp"];
        Some(match self {
            Rec::Image => GOOD[index % GOOD.len()],
            Rec::MissingImage => "missing.jpg",
            Rec::TooLarge => "big.png",
            Rec::CutJpeg => "cut.jpg",
            Rec::CutProgressive => "cut_prog.jpg",
            Rec::CutPng => "cut.png",
            Rec::CutWebp => "cut.webp",
            Rec::CorruptPng => "corrupt.png",
            _ => return None,
        })
    }

    /// The record as a JSON line (`id` is unique in the whole mixture).
    fn json(self, id: &str, index: usize) -> String {
        let ask = |q: String| json!([{"from": "human", "value": q}, {"from": "gpt", "value": format!("Answer {index}.")}]);
        let record = match self {
            Rec::InvalidJson => return format!("{{\"id\": \"{id}\", \"conversations\": ["),
            Rec::BadShape => json!({"id": id, "conversations": "hello"}),
            Rec::Text => json!({"id": id, "conversations": ask(format!("Question {index}?"))}),
            Rec::EmptyQuestion => json!({"id": id, "conversations": [
                {"from": "human", "value": ""},
                {"from": "gpt", "value": "You sent an empty message. How can I help?"}]}),
            Rec::AllEmpty => json!({"id": id, "conversations": [
                {"from": "human", "value": ""}, {"from": "gpt", "value": " \n"}]}),
            _ => json!({"id": id, "image": self.image_file(index),
                "conversations": ask(format!("<image>\nWhat is shown {index}?"))}),
        };
        record.to_string()
    }
}

#[derive(Debug, Clone)]
struct SourceSpec {
    jsonl: bool,
    anyres: bool,
    /// One or two JSON files, each a list of records.
    files: Vec<Vec<Rec>>,
}

#[derive(Debug, Clone)]
struct Case {
    /// Sources, in the order the config lists them.
    sources: Vec<SourceSpec>,
    /// Source `s` is named `src{names[s]}`: names do not follow the config's order.
    names: Vec<usize>,
    threads: usize,
    partitions: usize,
    seed: u64,
}

fn record_strategy(image_source: bool, jsonl: bool) -> BoxedStrategy<Rec> {
    // A JSON list cannot hold a line that is not JSON: a bad shape there instead.
    let in_file = move |r: Rec| match r {
        Rec::InvalidJson if !jsonl => Rec::BadShape,
        r => r,
    };
    let strategy = if image_source {
        prop_oneof![
            6 => Just(Rec::Image),
            1 => Just(Rec::Text),
            1 => Just(Rec::BadShape),
            1 => Just(Rec::InvalidJson),
            1 => Just(Rec::MissingImage),
            1 => Just(Rec::TooLarge),
            1 => Just(Rec::CutJpeg),
            1 => Just(Rec::CutProgressive),
            1 => Just(Rec::CutPng),
            1 => Just(Rec::CutWebp),
            1 => Just(Rec::CorruptPng),
        ]
        .boxed()
    } else {
        prop_oneof![
            6 => Just(Rec::Text),
            1 => Just(Rec::EmptyQuestion),
            1 => Just(Rec::AllEmpty),
            1 => Just(Rec::BadShape),
            1 => Just(Rec::InvalidJson),
        ]
        .boxed()
    };
    strategy.prop_map(in_file).boxed()
}

fn source_strategy() -> impl Strategy<Value = SourceSpec> {
    (any::<bool>(), any::<bool>(), any::<bool>(), 1..=2usize).prop_flat_map(
        |(image, jsonl, anyres, files)| {
            let file = prop::collection::vec(record_strategy(image, jsonl), 0..=6);
            prop::collection::vec(file, files).prop_map(move |files| SourceSpec {
                jsonl,
                anyres,
                files,
            })
        },
    )
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(source_strategy(), 1..=6),
        1..=2usize,
        1..=3usize,
        0..1u64 << 40, // TOML integers are i64
    )
        .prop_flat_map(|(sources, threads, partitions, seed)| {
            let names = Just((0..sources.len()).collect::<Vec<_>>()).prop_shuffle();
            (Just(sources), names).prop_map(move |(sources, names)| Case {
                sources,
                names,
                threads,
                partitions,
                seed,
            })
        })
}

/// Every image file a record may name, made once: tiny noisy pictures and their broken forms.
fn image_files() -> &'static Vec<(&'static str, Vec<u8>)> {
    static FILES: OnceLock<Vec<(&'static str, Vec<u8>)>> = OnceLock::new();
    FILES.get_or_init(|| {
        let (w, h) = (40, 30);
        let pixels = noise(w, h);
        let good_png = png(&pixels, w, h);
        let good_jpg = jpeg(&pixels, w, h, false);
        let good_prog = jpeg(&pixels, w, h, true);
        let good_webp = webp(&pixels, w, h);
        let big = png(&noise(80, 80), 80, 80);
        let idat = find(&good_png, b"IDAT").expect("a PNG has IDAT") + 4;
        let idat_len = u32::from_be_bytes(good_png[idat - 8..idat - 4].try_into().unwrap());
        let mut corrupt = good_png.clone();
        corrupt[idat + 2..idat + idat_len as usize].fill(0x5A);
        vec![
            ("cut.jpg", cut_mid_scan(&good_jpg)),
            ("cut_prog.jpg", cut_mid_scan(&good_prog)),
            ("cut.png", good_png[..idat + idat_len as usize / 2].to_vec()),
            ("cut.webp", good_webp[..good_webp.len() / 2].to_vec()),
            ("corrupt.png", corrupt),
            ("good.png", good_png),
            ("good.jpg", good_jpg),
            ("good_prog.jpg", good_prog),
            ("good.webp", good_webp),
            ("big.png", big),
        ]
    })
}

fn noise(w: u32, h: u32) -> Vec<u8> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    (0..w * h * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 56) as u8
        })
        .collect()
}

fn png(rgb: &[u8], w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(rgb, w, h, image::ExtendedColorType::Rgb8)
        .unwrap();
    out
}

fn webp(rgb: &[u8], w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut out)
        .write_image(rgb, w, h, image::ExtendedColorType::Rgb8)
        .unwrap();
    out
}

fn jpeg(rgb: &[u8], w: u32, h: u32, progressive: bool) -> Vec<u8> {
    let mut c = turbojpeg::Compressor::new().unwrap();
    c.set_quality(90).unwrap();
    c.set_progressive(progressive).unwrap();
    let image = turbojpeg::Image {
        pixels: rgb,
        width: w as usize,
        pitch: 3 * w as usize,
        height: h as usize,
        format: turbojpeg::PixelFormat::RGB,
    };
    c.compress_to_vec(image).unwrap()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The JPEG cut halfway through the entropy-coded data of its first scan.
fn cut_mid_scan(jpeg: &[u8]) -> Vec<u8> {
    let sos = find(jpeg, &[0xFF, 0xDA]).expect("a JPEG has a scan");
    let data = sos + 2 + usize::from(u16::from_be_bytes([jpeg[sos + 2], jpeg[sos + 3]]));
    let next = data
        + find(&jpeg[data..], &[0xFF, 0xC4])
            .or_else(|| find(&jpeg[data..], &[0xFF, 0xDA]))
            .or_else(|| find(&jpeg[data..], &[0xFF, 0xD9]))
            .expect("the scan ends");
    jpeg[..data + (next - data) / 2].to_vec()
}

/// What the build must produce: written key → id, rejected key → (id, kind); and per source
/// name the records read.
struct Expected {
    written: BTreeMap<RecordKey, String>,
    rejected: BTreeMap<RecordKey, (String, String)>,
}

/// Writes the case's files and config into `dir`.
fn write_case(dir: &Path, case: &Case) -> Expected {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for (name, bytes) in image_files() {
        std::fs::write(images.join(name), bytes).unwrap();
    }
    let mut expected = Expected {
        written: BTreeMap::new(),
        rejected: BTreeMap::new(),
    };
    let mut config = format!(
        "output = \"out\"\ntokenizer = \"{}\"\nseed = {}\nbatch_size = 2\ngroup_size = 4\n\
         length_pool_groups = 2\nshard_target_mb = 1\nmax_image_pixels = 4096\n",
        tokenizer_path().display(),
        case.seed
    );
    for (s, source) in case.sources.iter().enumerate() {
        let name = format!("src{}", case.names[s]);
        let ext = if source.jsonl { "jsonl" } else { "json" };
        let mut files = Vec::new();
        for (f, records) in source.files.iter().enumerate() {
            let file = format!("{name}_{f}.{ext}");
            let lines: Vec<String> = records
                .iter()
                .enumerate()
                .map(|(i, r)| r.json(&format!("{name}-{f}-{i}"), i))
                .collect();
            let text = if source.jsonl {
                lines.iter().map(|l| format!("{l}\n")).collect()
            } else {
                format!("[{}]", lines.join(",\n"))
            };
            std::fs::write(dir.join(&file), text).unwrap();
            for (i, r) in records.iter().enumerate() {
                let key = (name.clone(), file.clone(), i as u64);
                let id = match r {
                    Rec::InvalidJson => i.to_string(),
                    _ => format!("{name}-{f}-{i}"),
                };
                match r.kind() {
                    None => {
                        expected.written.insert(key, id);
                    }
                    Some(kind) => {
                        expected.rejected.insert(key, (id, kind.to_string()));
                    }
                }
            }
            files.push(format!("\"{file}\""));
        }
        config += &format!(
            "\n[[sources]]\nname = \"{name}\"\njson = [{}]\nimage_folder = \"images\"\n\
             template = \"llava_llama_3\"\nimage_aspect_ratio = \"{}\"\n",
            files.join(", "),
            if source.anyres { "anyres" } else { "pad" }
        );
    }
    std::fs::write(dir.join("datasets.toml"), config).unwrap();
    expected
}

fn run_case(case: &Case, n: usize) {
    let dir = scratch(&format!("mixture-props-{n}"));
    let expected = write_case(&dir, case);
    let config = dir.join("datasets.toml");
    let out = dir.join("out");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(case.threads)
        .build()
        .unwrap();
    let manifest = pool.install(|| {
        if case.partitions == 1 {
            let report = build(&config, &options(Partition::WHOLE)).expect("the build succeeds");
            report.manifest.expect("manifest")
        } else {
            // Partitions in reverse order: the last one does pass 1, the others reuse it.
            for index in (0..case.partitions).rev() {
                let partition = Partition {
                    index,
                    count: case.partitions,
                };
                build(&config, &options(partition)).expect("the partition builds");
            }
            assemble(&out).expect("the partitions merge")
        }
    });
    assert_reconciles(&manifest, &out);
    assert_eq!(written_rows(&out), expected.written, "written rows");
    let got: BTreeMap<RecordKey, (String, String)> = rejects(&out)
        .into_iter()
        .map(|r| ((r.source, r.json_file, r.index), (r.id, r.kind)))
        .collect();
    assert_eq!(got, expected.rejected, "rejects.jsonl");
    for s in &manifest.sources {
        let read = expected.written.keys().filter(|k| k.0 == s.name).count()
            + expected.rejected.keys().filter(|k| k.0 == s.name).count();
        assert_eq!(s.read, read as u64, "{}", s.name);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Fixed seed and case count: the same mixtures on every run (about a second each in a debug
/// build).
#[test]
fn generated_mixtures_reconcile() {
    let config = Config {
        cases: 20,
        rng_seed: RngSeed::Fixed(27),
        failure_persistence: None,
        max_shrink_iters: 64,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let n = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&case_strategy(), |case| {
        run_case(&case, n.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
