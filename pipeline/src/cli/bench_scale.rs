//! `llava-data bench --scale`: a build at dataset scale. Generates N text records (seeded random
//! conversations from the fixtures' words, ~180 tokens each) and M image records (cycling the
//! fixture images), builds them in a child `llava-data build` (so the peak RSS is the build's
//! alone), and reports wall time, peak RSS, footer bytes per shard and the time to open the
//! shards' metadata; with `llava-trainer` next to this binary (or `--trainer`), also its
//! `loader-bench` on the result (index open time, first batch, samples/s per worker, peak RSS).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use llava_formats::manifest::MANIFEST_FILE;
use llava_formats::rng::SplitMix64;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use serde_json::json;

/// What `--scale` needs from `bench`'s flags.
pub struct ScaleArgs<'a> {
    pub text_records: u64,
    pub image_records: u64,
    pub fixtures: &'a Path,
    pub tokenizer: &'a Path,
    pub work: Option<&'a Path>,
    pub tile_encoding: &'a str,
    pub jpeg_quality: u8,
    /// Image records get these images (cycled) instead of the fixture records' own.
    pub images: Option<&'a Path>,
    pub threads: Option<usize>,
    pub builder: Option<&'a Path>,
    pub trainer: Option<&'a Path>,
    pub loader_workers: usize,
    pub json: bool,
}

/// What the bench reads of a manifest's shard entry (any schema version).
#[derive(serde::Deserialize)]
struct ShardEntry {
    file: String,
    rows: u64,
    bytes: u64,
}

/// Runs `cmd`, sampling its peak RSS every 20 ms; (wall seconds, peak MiB, stdout).
fn run_measured(mut cmd: Command) -> Result<(f64, f64, String)> {
    let t = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id();
    let mut stdout = child.stdout.take().context("child stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).ok();
        s
    });
    let mut peak = 0f64;
    let status = loop {
        if let Some(m) = llava_formats::process::peak_rss_mib(Some(pid)) {
            peak = peak.max(m);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = t.elapsed().as_secs_f64();
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok((wall, peak, out))
}

fn words(fixtures: &Path) -> Result<Vec<String>> {
    let path = fixtures.join("data").join("sharegpt_text.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let mut words = Vec::new();
    for r in &list {
        for turn in r["conversations"].as_array().into_iter().flatten() {
            for w in turn["value"].as_str().unwrap_or("").split_whitespace() {
                if w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".,;:!?'-".contains(c))
                {
                    words.push(w.to_string());
                }
            }
        }
    }
    if words.len() < 50 {
        bail!("{}: too few words to generate text", path.display());
    }
    Ok(words)
}

/// The fixture records that have an image, with absolute image paths (what the generated
/// mixtures cycle).
pub(super) fn image_pool(fixtures: &Path) -> Result<Vec<serde_json::Value>> {
    let mut pool = Vec::new();
    for (file, folder) in [
        ("llava_instruct_150k.json", "images/coco/train2017"),
        ("llava_v1_5_mix665k.json", "images"),
        ("sharegpt4v.json", "images"),
    ] {
        let path = fixtures.join("data").join(file);
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        let list: Vec<serde_json::Value> = serde_json::from_str(&text)?;
        for mut r in list {
            if let Some(img) = r.get("image").and_then(|v| v.as_str()) {
                let abs = fixtures.join(folder).join(img);
                r["image"] = json!(abs.display().to_string());
                pool.push(r);
            }
        }
    }
    Ok(pool)
}

/// Writes the mixture (JSONL, streamed: constant memory) and its `datasets.toml`.
fn generate(args: &ScaleArgs, work: &Path) -> Result<PathBuf> {
    let fixtures = args
        .fixtures
        .canonicalize()
        .with_context(|| format!("{}", args.fixtures.display()))?;
    let mut sources = String::new();
    if args.text_records > 0 {
        let words = words(&fixtures)?;
        let path = work.join("text.jsonl");
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
        let mut rng = SplitMix64::new(19);
        let sentence = |n: u64, rng: &mut SplitMix64| -> String {
            let mut s = String::new();
            for i in 0..n {
                if i > 0 {
                    s.push(' ');
                }
                s.push_str(&words[(rng.next_u64() % words.len() as u64) as usize]);
            }
            s
        };
        for i in 0..args.text_records {
            // ~130 words ≈ 180 tokens on average, 40–220 words.
            let q = 10 + rng.next_u64() % 20;
            let a = 30 + rng.next_u64() % 160;
            let record = json!({
                "id": format!("text-{i}"),
                "conversations": [
                    {"from": "human", "value": sentence(q, &mut rng)},
                    {"from": "gpt", "value": sentence(a, &mut rng)},
                ],
            });
            writeln!(out, "{record}")?;
        }
        out.flush()?;
        sources.push_str(
            "\n[[sources]]\nname = \"text\"\njson = \"text.jsonl\"\ntemplate = \"llava_llama_3\"\n",
        );
    }
    if args.image_records > 0 {
        let pool = image_pool(&fixtures)?;
        let images = match args.images {
            Some(dir) => Some(super::bench::image_files(dir)?),
            None => None,
        };
        let path = work.join("image.jsonl");
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for i in 0..args.image_records {
            let mut r = pool[(i % pool.len() as u64) as usize].clone();
            r["id"] = json!(format!("image-{i}"));
            if let Some(images) = &images {
                let image = &images[(i % images.len() as u64) as usize];
                r["image"] = json!(image.display().to_string());
            }
            writeln!(out, "{r}")?;
        }
        out.flush()?;
        sources.push_str("\n[[sources]]\nname = \"image\"\njson = \"image.jsonl\"\nimage_folder = \"/\"\ntemplate = \"llava_llama_3\"\n");
    }
    if sources.is_empty() {
        bail!("--text-records and --image-records are both 0: nothing to build");
    }
    let config = work.join("datasets.toml");
    let tokenizer = args
        .tokenizer
        .canonicalize()
        .with_context(|| format!("{}", args.tokenizer.display()))?;
    std::fs::write(
        &config,
        format!(
            "output = \"out\"\ntokenizer = \"{}\"\ntile_encoding = \"{}\"\njpeg_quality = {}\n{sources}",
            tokenizer.display(),
            args.tile_encoding,
            args.jpeg_quality
        ),
    )?;
    Ok(config)
}

/// Footer length of a Parquet file (the 4 bytes before the closing `PAR1`).
fn footer_bytes(path: &Path) -> Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    f.seek(SeekFrom::End(-8))?;
    let mut tail = [0u8; 8];
    f.read_exact(&mut tail)?;
    if &tail[4..] != b"PAR1" {
        bail!("{}: not a Parquet file", path.display());
    }
    Ok(u64::from(u32::from_le_bytes([
        tail[0], tail[1], tail[2], tail[3],
    ])))
}

pub fn run(args: ScaleArgs) -> Result<()> {
    let (work, cleanup) = match args.work {
        Some(w) => (w.to_path_buf(), false),
        None => (
            std::env::temp_dir().join(format!("llava-bench-scale-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&work)?;
    let t = Instant::now();
    let config = generate(&args, &work)?;
    let generate_s = t.elapsed().as_secs_f64();
    let out = work.join("out");

    let exe = std::env::current_exe().context("locating llava-data")?;
    let builder = args.builder.map_or_else(|| exe.clone(), Path::to_path_buf);
    let mut cmd = Command::new(&builder);
    cmd.arg("build")
        .arg(&config)
        .arg("--output")
        .arg(&out)
        .arg("--progress-every")
        .arg("60");
    if let Some(n) = args.threads {
        cmd.arg("--threads").arg(n.to_string());
    }
    let (build_s, build_rss, _) = run_measured(cmd)?;

    let manifest_path = out.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("{}", manifest_path.display()))?;
    // Read loosely (any schema version: `--builder` may be an older llava-data).
    let manifest: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}", manifest_path.display()))?;
    let listed: Vec<ShardEntry> = serde_json::from_value(manifest["shards"].clone())
        .with_context(|| format!("{}: shards", manifest_path.display()))?;
    let mut shards = Vec::new();
    let t = Instant::now();
    for s in &listed {
        let path = out.join(&s.file);
        let file = std::fs::File::open(&path).with_context(|| format!("{}", path.display()))?;
        let meta = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
            .with_context(|| format!("{}", path.display()))?;
        let footer = footer_bytes(&path)?;
        shards.push(json!({
            "file": s.file,
            "rows": s.rows,
            "bytes": s.bytes,
            "row_groups": meta.metadata().num_row_groups(),
            "footer_bytes": footer,
            "footer_bytes_per_sample": footer as f64 / s.rows.max(1) as f64,
        }));
    }
    let metadata_open_ms = t.elapsed().as_secs_f64() * 1e3;
    let footer_total: u64 = shards
        .iter()
        .map(|s| s["footer_bytes"].as_u64().unwrap_or(0))
        .sum();
    let samples = manifest["totals"]["samples"].as_u64().unwrap_or(0);
    let total_bytes = manifest["totals"]["bytes"].as_u64().unwrap_or(0);

    let trainer = match args.trainer {
        Some(t) => Some(t.to_path_buf()),
        None => exe
            .parent()
            .map(|d| d.join("llava-trainer"))
            .filter(|p| p.is_file()),
    };
    let loader = match &trainer {
        Some(trainer) => {
            let mut cmd = Command::new(trainer);
            cmd.arg("loader-bench")
                .arg("--shards")
                .arg(&out)
                .arg("--workers")
                .arg(args.loader_workers.to_string())
                .arg("--max-batches")
                .arg("200")
                .arg("--u8")
                .arg("--json");
            let (wall, rss, stdout) = run_measured(cmd)?;
            let mut v: serde_json::Value = serde_json::from_str(stdout.trim())
                .with_context(|| format!("loader-bench output: {stdout}"))?;
            v["process_seconds"] = json!(wall);
            v["process_peak_rss_mib"] = json!(rss);
            v
        }
        None => json!(null),
    };
    let report = json!({
        "text_records": args.text_records,
        "image_records": args.image_records,
        "samples": samples,
        "threads": args.threads,
        "generate_seconds": generate_s,
        "build_seconds": build_s,
        "build_peak_rss_mib": build_rss,
        "shards": shards,
        "bytes": total_bytes,
        "footer_bytes": footer_total,
        "footer_bytes_per_sample": footer_total as f64 / samples.max(1) as f64,
        "metadata_open_ms": metadata_open_ms,
        "loader": loader,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} text + {} image records → {samples} samples in {} shards, {:.1} MiB",
            args.text_records,
            args.image_records,
            listed.len(),
            total_bytes as f64 / (1024.0 * 1024.0)
        );
        println!("build: {build_s:.1} s, peak RSS {build_rss:.0} MiB (generate {generate_s:.1} s)");
        for s in &shards {
            println!(
                "  {:<28} {:>9} rows {:>7} row groups  footer {:>10} bytes ({:.1} bytes/sample)",
                s["file"].as_str().unwrap_or(""),
                s["rows"],
                s["row_groups"],
                s["footer_bytes"],
                s["footer_bytes_per_sample"].as_f64().unwrap_or(0.0)
            );
        }
        println!(
            "footers: {footer_total} bytes ({:.1} bytes/sample); all shards' metadata opened in {metadata_open_ms:.1} ms",
            footer_total as f64 / samples.max(1) as f64
        );
        if loader.is_null() {
            println!(
                "loader: llava-trainer not found next to llava-data (build it, or pass --trainer)"
            );
        } else {
            println!(
                "loader ({} workers, 200 batches): process {:.2} s; index open {:.0} ms, first batch {:.0} ms after start, {:.1} samples/s/worker, peak RSS {:.0} MiB",
                args.loader_workers,
                loader["process_seconds"].as_f64().unwrap_or(f64::NAN),
                loader["open_ms"].as_f64().unwrap_or(f64::NAN),
                loader["time_to_first_batch_ms"].as_f64().unwrap_or(f64::NAN),
                loader["samples_per_s_per_worker"].as_f64().unwrap_or(f64::NAN),
                loader["process_peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    if cleanup {
        std::fs::remove_dir_all(&work).ok();
    }
    Ok(())
}
