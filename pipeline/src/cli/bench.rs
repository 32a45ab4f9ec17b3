//! `llava-data bench`: decode, convert and build throughput and bytes per sample, on a generated
//! mixture or on a user's `datasets.toml`, with the build run once per tile encoding and zstd
//! level, all in one run, so the numbers are ratios measured together, not guesses.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use llava_data::convert::{prepare, render};
use llava_data::record::{parse_record, read_entries};
use llava_data::shard_build::{build_with, BuildContext, BuildOptions, BuildTimes, Partition};
use llava_formats::tile_codec::TileEncoding;
use rayon::prelude::*;
use serde_json::json;
use sha2::{Digest, Sha256};

#[derive(Args)]
#[command(after_help = "\
Examples:
  llava-data bench                                   # 2000 generated records, every encoding
  llava-data bench --config datasets.toml --threads 1 --json
  llava-data bench --images /data/photos --records 400 --encodings raw --levels 1,2,3
  llava-data bench --scale --text-records 300000 --image-records 0 --work /tmp/scale
  llava-data bench --scale --text-records 10000000 --image-records 0 --threads 2 --work /big/scale --json
  llava-data bench --scale --text-records 0 --image-records 1000000 --images /data/photos \\
    --tile-encoding jpeg --jpeg-quality 50 --work /big/scale-images   # ~35 GB of shards

For one core, pin the process as well (the build has a writer thread beside the workers):
  taskset -c 0 llava-data bench --threads 1")]
pub struct BenchArgs {
    /// Bench this datasets.toml (its sources, records and settings; the outputs go under --work)
    /// instead of a generated mixture.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Records in the generated mixture (cycled from the fixture instruction data).
    #[arg(long, default_value_t = 2000)]
    records: usize,
    /// Generated mixture (and `--scale`'s image records): give the records the images under this
    /// folder (every image file, sorted, cycled) instead of the fixture records' own images, e.g.
    /// a folder of photographs.
    #[arg(long)]
    images: Option<PathBuf>,
    /// The repo's `fixtures/` folder (images and LLaVA JSON).
    #[arg(long, default_value = "fixtures")]
    fixtures: PathBuf,
    /// The Llama-3-Instruct `tokenizer.json` (generated mixtures only).
    #[arg(long, default_value = ".cache/tokenizer/tokenizer.json")]
    tokenizer: PathBuf,
    /// Scratch folder (default: a folder under the system temp dir, removed at the end).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Tile encodings to build, comma-separated, in this order (`raw-plain` is the schema v2
    /// layout: the baseline for `raw`).
    #[arg(long, value_delimiter = ',', default_value = "raw-plain,raw,jpeg")]
    encodings: Vec<TileEncoding>,
    /// zstd levels to build each exact encoding at, comma-separated (`jpeg` is built once, at
    /// the first).
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    levels: Vec<i32>,
    /// `--scale` only: the tile encoding of the generated build.
    #[arg(long, default_value = "raw")]
    tile_encoding: TileEncoding,
    /// `--scale` only: `jpeg_quality` of the generated build (`jpeg` tiles; a lower quality keeps
    /// a million image records within a small disk).
    #[arg(long, default_value_t = 95)]
    jpeg_quality: u8,
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Print the measurements as one JSON object.
    #[arg(long)]
    json: bool,
    /// Scale bench instead: generate --text-records text and --image-records image records, build
    /// them in a child `llava-data build` and report wall time, peak RSS, footer bytes per shard,
    /// metadata open time and (with llava-trainer beside this binary) the loader's open time.
    #[arg(long)]
    scale: bool,
    /// `--scale`: generated text-only records (~180 tokens each).
    #[arg(long, default_value_t = 300_000)]
    text_records: u64,
    /// `--scale`: generated image records (cycling the fixture images).
    #[arg(long, default_value_t = 0)]
    image_records: u64,
    /// `--scale`: the `llava-data` binary that builds (default: this one; e.g. an older release
    /// to compare layouts on the same generated data).
    #[arg(long)]
    builder: Option<PathBuf>,
    /// `--scale`: the `llava-trainer` binary for `loader-bench` (default: beside this binary).
    #[arg(long)]
    trainer: Option<PathBuf>,
    /// `--scale`: loader worker threads for `loader-bench`.
    #[arg(long, default_value_t = 4)]
    loader_workers: usize,
}

/// CPU seconds used by this process so far (all threads, user + system). A ratio of CPU times
/// is steadier than one of wall times on a shared machine: another process's load stretches the
/// wall clock of whichever phase it overlaps, not the CPU time of ours.
fn process_cpu_s() -> f64 {
    // SAFETY: an all-zero `rusage` is a valid value, and getrusage only writes the struct it is
    // given, which lives on this stack.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Image files under `dir`, sorted (what `--images` cycles).
pub(super) fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("{}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                ["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"]
                    .contains(&e.to_ascii_lowercase().as_str())
            }) {
                out.push(path.canonicalize()?);
            }
        }
    }
    out.sort();
    if out.is_empty() {
        bail!("no image files under {}", dir.display());
    }
    Ok(out)
}

/// A generated mixture: `records` records cycled from the fixtures' instruction data (with their
/// own images, or with `--images` cycled), and a datasets.toml for them in `work`.
fn generate(args: &BenchArgs, work: &Path) -> Result<PathBuf> {
    let fixtures = args
        .fixtures
        .canonicalize()
        .with_context(|| format!("{}", args.fixtures.display()))?;
    let pool = super::bench_scale::image_pool(&fixtures)?;
    let images = match &args.images {
        Some(dir) => Some(image_files(dir)?),
        None => None,
    };
    let data = work.join("bench.jsonl");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&data)?);
    for i in 0..args.records {
        let mut r = pool[i % pool.len()].clone();
        r["id"] = json!(format!("bench-{i}"));
        if let Some(images) = &images {
            r["image"] = json!(images[i % images.len()].display().to_string());
        }
        writeln!(out, "{r}")?;
    }
    out.flush()?;
    let config = work.join("datasets.toml");
    let tokenizer = args
        .tokenizer
        .canonicalize()
        .with_context(|| format!("{}", args.tokenizer.display()))?;
    std::fs::write(
        &config,
        format!(
            "output = \"out\"\ntokenizer = \"{}\"\nshard_target_mb = 256\n\n[[sources]]\nname = \"bench\"\njson = \"bench.jsonl\"\nimage_folder = \"/\"\ntemplate = \"llava_llama_3\"\n",
            tokenizer.display(),
        ),
    )?;
    Ok(config)
}

/// Every record of every source file (sampling not applied), with its source.
fn all_records(ctx: &BuildContext) -> Result<Vec<(usize, llava_data::record::RawEntry)>> {
    let mut out = Vec::new();
    for (s, source) in ctx.config.sources.iter().enumerate() {
        for path in source.json.paths() {
            for e in read_entries(&path).with_context(|| format!("{}", path.display()))? {
                out.push((s, e));
            }
        }
    }
    Ok(out)
}

/// One build of the bench: its settings and what it measured.
struct Run {
    encoding: TileEncoding,
    level: i32,
    seconds: f64,
    cpu_seconds: f64,
    samples: u64,
    records: u64,
    bytes: u64,
    image_samples: u64,
    times: BuildTimes,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.scale {
        return super::bench_scale::run(super::bench_scale::ScaleArgs {
            text_records: args.text_records,
            image_records: args.image_records,
            fixtures: &args.fixtures,
            tokenizer: &args.tokenizer,
            work: args.work.as_deref(),
            tile_encoding: args.tile_encoding.name(),
            jpeg_quality: args.jpeg_quality,
            images: args.images.as_deref(),
            threads: args.threads,
            builder: args.builder.as_deref(),
            trainer: args.trainer.as_deref(),
            loader_workers: args.loader_workers,
            json: args.json,
        });
    }
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()?;
    }
    if args.levels.is_empty() || args.levels.iter().any(|l| !(1..=22).contains(l)) {
        bail!("--levels: zstd levels are 1..=22");
    }
    let threads = rayon::current_num_threads();
    let (work, cleanup) = match &args.work {
        Some(w) => (w.clone(), false),
        None => (
            std::env::temp_dir().join(format!("llava-bench-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&work)?;
    let config = match &args.config {
        Some(c) => c.clone(),
        None => generate(&args, &work)?,
    };
    let mut ctx = BuildContext::load(&config, None)?;
    let records = all_records(&ctx)?;
    let n = records.len() as f64;

    // 1. Plain decode of every record's images: the floor for any pixel pipeline.
    let t = Instant::now();
    records.par_iter().for_each(|(s, e)| {
        if let Ok(r) = parse_record(e) {
            for img in &r.images {
                let _ = llava_imaging::decode_rgb_file(&ctx.image_folder(*s).join(img));
            }
        }
    });
    let decode_s = t.elapsed().as_secs_f64();

    // 2. Conversion alone: tokens + tiles, nothing written.
    let t = Instant::now();
    let cpu = process_cpu_s();
    records.par_iter().for_each(|(s, e)| {
        let (folder, convert) = (ctx.image_folder(*s), &ctx.convert[*s]);
        let _ = parse_record(e)
            .and_then(|r| prepare(&r, folder, convert, &ctx.tokenizer))
            .and_then(|p| render(p, folder, convert));
    });
    let convert_s = t.elapsed().as_secs_f64();
    let convert_cpu_s = process_cpu_s() - cpu;
    let rss_convert = llava_formats::process::peak_rss_mib(None);

    // 3. The whole build (pass 1, grouping, pixels, tile encoding, Parquet, SHA-256, manifest)
    // once per encoding and level, each into its own folder.
    let base_sha = ctx.config_sha256.clone();
    let mut runs = Vec::new();
    for &encoding in &args.encodings {
        let levels = if encoding == TileEncoding::Jpeg {
            &args.levels[..1]
        } else {
            &args.levels[..]
        };
        for &level in levels {
            ctx.config.tile_encoding = encoding;
            ctx.config.zstd_level = level;
            ctx.output = work.join(format!("out-{encoding}-zstd{level}"));
            std::fs::remove_dir_all(&ctx.output).ok();
            // The settings are part of what the build's caches are keyed by.
            ctx.config_sha256 =
                hex::encode(Sha256::digest(format!("{base_sha} {encoding} {level}")));
            let t = Instant::now();
            let cpu = process_cpu_s();
            let outcome = build_with(
                &ctx,
                &BuildOptions {
                    output: None,
                    partition: Partition::WHOLE,
                    progress: false,
                },
            )?;
            let seconds = t.elapsed().as_secs_f64();
            let cpu_seconds = process_cpu_s() - cpu;
            let m = outcome.manifest.context("whole build writes a manifest")?;
            runs.push(Run {
                encoding,
                level,
                seconds,
                cpu_seconds,
                samples: m.totals.samples,
                records: m.sources.iter().map(|s| s.read).sum(),
                bytes: m.totals.bytes,
                image_samples: m
                    .shards
                    .iter()
                    .filter(|s| s.modality == llava_formats::manifest::Modality::Image)
                    .map(|s| s.rows)
                    .sum(),
                times: outcome.times,
            });
            if cleanup {
                std::fs::remove_dir_all(&ctx.output).ok();
            }
        }
    }
    let rss_build = llava_formats::process::peak_rss_mib(None);
    let convert_per_record = convert_s / n;
    let convert_cpu_per_record = convert_cpu_s / n;
    let report = json!({
        "config": args.config.as_ref().map(|c| c.display().to_string()),
        "records": records.len(),
        "threads": threads,
        "decode_samples_per_s": n / decode_s,
        "convert_samples_per_s": n / convert_s,
        "convert_over_decode_time": convert_s / decode_s,
        "convert_cpu_s": convert_cpu_s,
        "builds": runs.iter().map(|r| json!({
            "tile_encoding": r.encoding.name(),
            "zstd_level": r.level,
            "seconds": r.seconds,
            "records": r.records,
            "samples": r.samples,
            "image_samples": r.image_samples,
            "build_samples_per_s": r.records as f64 / r.seconds,
            "build_over_convert_time": r.seconds / r.records as f64 / convert_per_record,
            "cpu_seconds": r.cpu_seconds,
            "build_over_convert_cpu_time":
                r.cpu_seconds / r.records as f64 / convert_cpu_per_record,
            "bytes": r.bytes,
            "bytes_per_sample": r.bytes as f64 / r.samples.max(1) as f64,
            "pass1_s": r.times.pass1_s,
            "pass2_s": r.times.pass2_s,
            "render_s": r.times.render_s,
            "encode_s": r.times.encode_s,
            "write_s": r.times.write_s,
            "sync_s": r.times.sync_s,
        })).collect::<Vec<_>>(),
        "peak_rss_mib_after_convert": rss_convert,
        "peak_rss_mib_after_build": rss_build,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let what = match &args.config {
            Some(c) => c.display().to_string(),
            None => "generated mixture".to_string(),
        };
        println!("{what}: {} records, {threads} threads", records.len());
        println!(
            "{:<30} {:>8} {:>10} {:>8} {:>8} {:>12}",
            "phase", "seconds", "samples/s", "ratio", "cpu ratio", "bytes/sample"
        );
        println!(
            "{:<30} {:>8.2} {:>10.1} {:>8}",
            "decode images only",
            decode_s,
            n / decode_s,
            ""
        );
        println!(
            "{:<30} {:>8.2} {:>10.1} {:>7.2}x",
            "convert (tokens + tiles)",
            convert_s,
            n / convert_s,
            convert_s / decode_s
        );
        for r in &runs {
            println!(
                "{:<30} {:>8.2} {:>10.1} {:>7.2}x {:>8.2}x {:>12.0}",
                format!("build {} zstd {}", r.encoding, r.level),
                r.seconds,
                r.records as f64 / r.seconds,
                r.seconds / r.records as f64 / convert_per_record,
                r.cpu_seconds / r.records as f64 / convert_cpu_per_record,
                r.bytes as f64 / r.samples.max(1) as f64
            );
        }
        println!(
            "\nwhere build time went (seconds; render, encode and write: CPU time summed over \
             threads; sync: waiting for the disk):"
        );
        println!(
            "{:<30} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "build", "pass 1", "pass 2", "render", "encode", "write", "sync"
        );
        for r in &runs {
            let t = &r.times;
            println!(
                "{:<30} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                format!("{} zstd {}", r.encoding, r.level),
                t.pass1_s,
                t.pass2_s,
                t.render_s,
                t.encode_s,
                t.write_s,
                t.sync_s
            );
        }
        println!(
            "peak RSS {:.0} MiB after convert, {:.0} MiB after the builds",
            rss_convert.unwrap_or(f64::NAN),
            rss_build.unwrap_or(f64::NAN)
        );
        println!(
            "ratios: convert / decode time; build / convert time per record (the cost of writing); \
             cpu ratio: the same with process CPU time (steadier on a shared machine)."
        );
        println!("bytes/sample: shard bytes / samples written (text samples included).");
    }
    if cleanup {
        std::fs::remove_dir_all(&work).ok();
    }
    Ok(())
}
