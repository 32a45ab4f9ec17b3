//! `llava-data bench`: build throughput on a generated mixture, with the conversion alone and
//! the plain image decode measured in the same run, so the numbers are ratios, not guesses.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use llava_data::build::{build, BuildContext, BuildOptions, Partition};
use llava_data::convert::{prepare, render};
use llava_data::record::{parse_record, read_entries};
use rayon::prelude::*;
use serde_json::json;

#[derive(Args)]
#[command(after_help = "\
Examples:
  llava-data bench                                   # 2000 records, raw tiles, all cores
  llava-data bench --records 500 --tile-encoding jpeg --threads 4 --json
  llava-data bench --scale --text-records 300000 --image-records 0 --work /tmp/scale
  llava-data bench --scale --text-records 10000000 --image-records 1000000 --json")]
pub struct BenchArgs {
    /// Records in the generated mixture (cycled from the fixture instruction data).
    #[arg(long, default_value_t = 2000)]
    records: usize,
    /// The repo's `fixtures/` folder (images and LLaVA JSON).
    #[arg(long, default_value = "fixtures")]
    fixtures: PathBuf,
    /// The Llama-3-Instruct `tokenizer.json`.
    #[arg(long, default_value = ".cache/tokenizer/tokenizer.json")]
    tokenizer: PathBuf,
    /// Scratch folder (default: a folder under the system temp dir, removed at the end).
    #[arg(long)]
    work: Option<PathBuf>,
    /// `raw` or `jpeg` tiles.
    #[arg(long, default_value = "raw")]
    tile_encoding: String,
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

/// Peak resident set size of this process so far (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn generate(fixtures: &Path, records: usize, work: &Path, args: &BenchArgs) -> Result<PathBuf> {
    let fixtures = fixtures
        .canonicalize()
        .with_context(|| format!("{}", fixtures.display()))?;
    let sources = [
        ("llava_instruct_150k.json", "images/coco/train2017"),
        ("llava_v1_5_mix665k.json", "images"),
        ("sharegpt4v.json", "images"),
    ];
    let mut pool = Vec::new();
    for (file, folder) in sources {
        let text = std::fs::read_to_string(fixtures.join("data").join(file))?;
        let list: Vec<serde_json::Value> = serde_json::from_str(&text)?;
        for mut r in list {
            if let Some(img) = r.get("image").and_then(|v| v.as_str()) {
                let abs = fixtures.join(folder).join(img);
                r["image"] = json!(abs.display().to_string());
                pool.push(r);
            }
        }
    }
    let data = work.join("bench.jsonl");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&data)?);
    for i in 0..records {
        let mut r = pool[i % pool.len()].clone();
        r["id"] = json!(format!("bench-{i}"));
        writeln!(out, "{r}")?;
    }
    out.flush()?;
    let config = work.join("datasets.toml");
    std::fs::write(
        &config,
        format!(
            "output = \"out\"\ntokenizer = \"{}\"\ntile_encoding = \"{}\"\nshard_target_mb = 256\n\n[[sources]]\nname = \"bench\"\njson = \"bench.jsonl\"\nimage_folder = \"/\"\ntemplate = \"llava_llama_3\"\n",
            args.tokenizer.canonicalize().with_context(|| format!("{}", args.tokenizer.display()))?.display(),
            args.tile_encoding
        ),
    )?;
    Ok(config)
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.scale {
        return super::bench_scale::run(super::bench_scale::ScaleArgs {
            text_records: args.text_records,
            image_records: args.image_records,
            fixtures: &args.fixtures,
            tokenizer: &args.tokenizer,
            work: args.work.as_deref(),
            tile_encoding: &args.tile_encoding,
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
    let threads = rayon::current_num_threads();
    let (work, cleanup) = match &args.work {
        Some(w) => (w.clone(), false),
        None => (
            std::env::temp_dir().join(format!("llava-bench-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&work)?;
    let config = generate(&args.fixtures, args.records, &work, &args)?;
    let ctx = BuildContext::load(&config, None)?;
    let entries = read_entries(&work.join("bench.jsonl"))?;

    // 1. Plain decode of every record's images: the floor for any pixel pipeline.
    let t = Instant::now();
    entries.par_iter().for_each(|e| {
        if let Ok(r) = parse_record(e) {
            for img in &r.images {
                let _ = llava_imaging::decode_rgb_file(Path::new(img));
            }
        }
    });
    let decode_s = t.elapsed().as_secs_f64();

    // 2. Conversion alone: tokens + tiles, nothing written.
    let t = Instant::now();
    entries.par_iter().for_each(|e| {
        let _ = parse_record(e)
            .and_then(|r| prepare(&r, Path::new("/"), &ctx.convert[0], &ctx.tokenizer))
            .and_then(|p| render(p, Path::new("/"), &ctx.convert[0]));
    });
    let convert_s = t.elapsed().as_secs_f64();
    let rss_convert = peak_rss_mib();

    // 3. The whole build: pass 1, grouping, pixels, Parquet + zstd, manifest.
    let t = Instant::now();
    let outcome = build(
        &config,
        &BuildOptions {
            output: None,
            partition: Partition::WHOLE,
            progress: false,
        },
    )?;
    let build_s = t.elapsed().as_secs_f64();
    let rss_build = peak_rss_mib();
    let manifest = outcome.manifest.context("whole build writes a manifest")?;
    let n = args.records as f64;
    let mib = manifest.totals.bytes as f64 / (1024.0 * 1024.0);
    let report = json!({
        "records": args.records,
        "threads": threads,
        "tile_encoding": args.tile_encoding,
        "decode_samples_per_s": n / decode_s,
        "convert_samples_per_s": n / convert_s,
        "build_samples_per_s": n / build_s,
        "convert_over_decode_time": convert_s / decode_s,
        "build_over_convert_time": build_s / convert_s,
        "written_mib": mib,
        "written_mib_per_s": mib / build_s,
        "bytes_per_sample": manifest.totals.bytes as f64 / n,
        "peak_rss_mib_after_convert": rss_convert,
        "peak_rss_mib_after_build": rss_build,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} records, {threads} threads, {} tiles",
            args.records, args.tile_encoding
        );
        println!(
            "{:<34} {:>10} {:>12} {:>10}",
            "phase", "seconds", "samples/s", "ratio"
        );
        println!(
            "{:<34} {:>10.2} {:>12.1} {:>10}",
            "decode images only",
            decode_s,
            n / decode_s,
            ""
        );
        println!(
            "{:<34} {:>10.2} {:>12.1} {:>9.2}x",
            "convert (tokens + tiles)",
            convert_s,
            n / convert_s,
            convert_s / decode_s
        );
        println!(
            "{:<34} {:>10.2} {:>12.1} {:>9.2}x",
            "build (convert + group + write)",
            build_s,
            n / build_s,
            build_s / convert_s
        );
        println!(
            "written {mib:.1} MiB ({:.1} MiB/s, {:.0} bytes/sample); peak RSS {:.0} MiB after convert, {:.0} MiB after build",
            mib / build_s,
            manifest.totals.bytes as f64 / n,
            rss_convert.unwrap_or(f64::NAN),
            rss_build.unwrap_or(f64::NAN)
        );
        println!("ratios: convert / decode time; build / convert time (the cost of writing).");
    }
    if cleanup {
        std::fs::remove_dir_all(&work).ok();
    }
    Ok(())
}
