//! `llava-data inspect`: flags and printing; the work is in `llava_data::inspect`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use llava_data::inspect::html::{self, HtmlOptions};
use llava_data::inspect::sample::{self, Marking};
use llava_data::inspect::summary::{summarize, Summary, SummaryOptions};
use llava_data::inspect::{plot, verify, BuildDir};
use llava_data::tokenizer::TextTokenizer;

#[derive(Args)]
#[command(after_help = "\
Examples:
  llava-data inspect out/example                          # summary of a build
  llava-data inspect out/example --batch-size 8 --world-size 4
                                                          # padding at another batch size, 4 ranks
  llava-data inspect out/example --json | jq .padding     # the same as one JSON object
  llava-data inspect out/example --plot lengths.png       # length histograms as a picture
  llava-data inspect out/example --sample 000000033471 --tokenizer .cache/tokenizer/tokenizer.json
  llava-data inspect out/example --sample sharegpt4v:2 --tokenizer tok.json --tiles tiles.png
  llava-data inspect out/example --verify                 # every shard against the manifest
  llava-data inspect out/example --html report.html --tokenizer .cache/tokenizer/tokenizer.json
                                                          # everything as one page for a browser

The summary reads only the small columns of the shards (never the tiles), so it answers in
seconds on large builds. Padding efficiency is real tokens / padded tokens when every batch is
padded to its longest sample: \"grouped\" cuts each of the build's length groups into batches of
--batch-size (the build's own batches at its batch size), \"random\" batches the same samples in a
seeded random order within each modality, as a loader without length grouping would.
With --world-size W, a step is W consecutive batches and the step figure also counts the ranks
waiting for the slowest one. With --packing, \"packed\" lays each grouped batch's samples into rows
of at most --pack-length tokens by balanced first-fit decreasing, as `llava-trainer run --packing` does
(padding only at the end of each row), and \"fill\" is real tokens / (rows x pack length).")]
pub struct InspectArgs {
    /// A build output folder (holds manifest.json, rejects.jsonl and shards/).
    dir: PathBuf,
    /// Print the summary as one JSON object (fields: docs/data.md, `inspect`).
    #[arg(long)]
    json: bool,
    /// Batch size (per rank) of the padding report [default: the build's batch_size].
    #[arg(long, value_name = "B")]
    batch_size: Option<usize>,
    /// Ranks taking one batch each per step, for the padding report.
    #[arg(long, value_name = "W", default_value_t = 1)]
    world_size: usize,
    /// Add the padding of the grouped batches packed into rows (llava-trainer run --packing).
    #[arg(long)]
    packing: bool,
    /// Tokens per packed row [default: the build's model_max_length]; implies --packing.
    #[arg(long, value_name = "N")]
    pack_length: Option<u32>,
    /// Add the rows packed across batch boundaries, one row per micro-batch, as
    /// `llava-trainer run --pack-across-batches --seed S` makes them in epoch 0 (S: --seed,
    /// default the build's seed); implies --packing.
    #[arg(long)]
    pack_across_batches: bool,
    /// Bins of the length histograms (terminal and --plot).
    #[arg(long, default_value_t = 16)]
    bins: usize,
    /// Write the length distribution of each modality as a PNG picture.
    #[arg(long, value_name = "PNG")]
    plot: Option<PathBuf>,
    /// Show one sample as the model sees it: its id, or SOURCE:INDEX (the record's position in
    /// its JSON file, as in rejects.jsonl), or a bare number N that is no id (the N+1-th row in
    /// shard order: 0 is the first). Trained spans are marked (colour on a terminal,
    /// [[brackets]] otherwise), images shown as <image: N tokens, CxR grid, T tiles>.
    /// With --html: repeat it to choose the samples of the report's browser.
    #[arg(long, value_name = "ID | SOURCE:INDEX | N")]
    sample: Vec<String>,
    /// Write the whole build as one self-contained HTML page (no network, no external script or
    /// font): header, sortable source tables, length/tiles/grid/padding charts, the rejects by
    /// kind, and a sample browser (text with --tokenizer, tiles as pictures). Padding shows
    /// grouped, random and packed (--pack-length, default model_max_length) at --batch-size and
    /// --world-size.
    #[arg(long, value_name = "HTML")]
    html: Option<PathBuf>,
    /// With --html: samples in the browser, drawn with --seed across sources and length deciles
    /// (ignored when --sample is given).
    #[arg(long, value_name = "N", default_value_t = 50)]
    samples: usize,
    /// With --html: seed of the sample choice; with --pack-across-batches: the training seed
    /// [default: the build's seed].
    #[arg(long)]
    seed: Option<u64>,
    /// With --html: pixels per tile in the report's pictures (336 = the model's own pixels; the
    /// default halves them for a lighter page).
    #[arg(long, value_name = "PX", default_value_t = 168)]
    tile_px: u32,
    /// The tokenizer.json the build used, to decode --sample (checked against the manifest's
    /// tokenizer_sha256).
    #[arg(long, value_name = "JSON")]
    tokenizer: Option<PathBuf>,
    /// With --sample: mark trained spans with [[...]] even on a terminal (as NO_COLOR does).
    #[arg(long)]
    plain: bool,
    /// With --sample: write its tiles as one PNG (base tile left, the rows x cols grid right).
    #[arg(long, value_name = "PNG")]
    tiles: Option<PathBuf>,
    /// Check every shard against the manifest (presence, size, sha256, schema version, rows,
    /// row groups, modality, group ids, lengths recomputed from ids); exits 1 listing every
    /// problem.
    #[arg(long)]
    verify: bool,
    /// With --verify and without a terminal (a Slurm log, a file): log a progress line (rows,
    /// rate, ETA) every SECS seconds; on a terminal a progress bar is drawn instead.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    progress_every: f64,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let build = BuildDir::open(&args.dir)?;
    if args.verify {
        let terminal = super::build::progress_setup(args.progress_every)?;
        return run_verify(&build, terminal);
    }
    if let Some(path) = &args.html {
        return run_html(&build, path, &args);
    }
    match args.sample.as_slice() {
        [] => {}
        [key] => return run_sample(&build, key, &args),
        _ => bail!("give one --sample (several go with --html)"),
    }
    if args.tiles.is_some() || args.tokenizer.is_some() {
        bail!("--tiles and --tokenizer go with --sample ID_OR_SOURCE:INDEX");
    }
    let started = std::time::Instant::now();
    let options = summary_options(&build, &args)?;
    let summary = summarize(&build, &options)
        .with_context(|| format!("summarising {}", args.dir.display()))?;
    tracing::debug!("summary in {:.2}s", started.elapsed().as_secs_f64());
    if let Some(path) = &args.plot {
        plot::length_plot(&summary.modalities)?
            .save(path)
            .with_context(|| format!("writing {}", path.display()))?;
        tracing::info!("length plot written to {}", path.display());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", format_summary(&summary));
    }
    Ok(())
}

fn summary_options(build: &BuildDir, args: &InspectArgs) -> Result<SummaryOptions> {
    let pack_length = match (args.packing, args.pack_length) {
        (_, Some(0)) => bail!("--pack-length must be at least 1"),
        (_, Some(n)) => Some(n),
        (true, None) => Some(build.manifest.settings.model_max_length as u32),
        (false, None) if args.pack_across_batches => {
            Some(build.manifest.settings.model_max_length as u32)
        }
        (false, None) => None,
    };
    Ok(SummaryOptions {
        batch_size: args.batch_size,
        world_size: args.world_size,
        bins: args.bins,
        pack_length,
        across_batches: args.pack_across_batches,
        seed: args.seed,
    })
}

fn run_html(build: &BuildDir, path: &std::path::Path, args: &InspectArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let tokenizer = match &args.tokenizer {
        Some(p) => Some(load_tokenizer(build, p)?),
        None => {
            tracing::warn!(
                "no --tokenizer: the report's samples show their tiles but not their text"
            );
            None
        }
    };
    let options = HtmlOptions {
        summary: summary_options(build, args)?,
        samples: args.samples,
        sample_keys: args.sample.clone(),
        seed: args.seed.unwrap_or(build.manifest.settings.seed),
        tokenizer: tokenizer.as_ref(),
        tile_px: args.tile_px,
        rejects_per_kind: 1000,
    };
    let report = html::report(build, &options)
        .with_context(|| format!("writing the report of {}", args.dir.display()))?;
    std::fs::write(path, &report.html).with_context(|| format!("writing {}", path.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.summary)?);
    }
    tracing::info!(
        "{}: {:.2} MiB, {} samples; summary {:.2}s, samples {:.2}s, {:.2}s in all",
        path.display(),
        report.html.len() as f64 / (1 << 20) as f64,
        report.samples,
        report.summary_secs,
        report.samples_secs,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn load_tokenizer(build: &BuildDir, tok_path: &std::path::Path) -> Result<TextTokenizer> {
    let tokenizer = TextTokenizer::from_file(tok_path)?;
    if tokenizer.sha256() != build.manifest.tokenizer_sha256 {
        tracing::warn!(
            "{} (sha256 {}) is not the tokenizer of this build (sha256 {}): the text may be wrong",
            tok_path.display(),
            tokenizer.sha256(),
            build.manifest.tokenizer_sha256
        );
    }
    Ok(tokenizer)
}

fn run_verify(build: &BuildDir, terminal: bool) -> Result<()> {
    let report = verify::verify_with_progress(build, terminal);
    for w in &report.warnings {
        println!("warning: {w}");
    }
    if report.ok() {
        println!(
            "OK: {} shards, {} rows verified",
            report.shards, report.rows
        );
        return Ok(());
    }
    println!(
        "FAILED: {} problems ({} shards, {} rows read)",
        report.problems.len(),
        report.shards,
        report.rows
    );
    for p in &report.problems {
        println!("  {p}");
    }
    bail!(
        "{} does not match its manifest ({} problems listed above)",
        build.dir.display(),
        report.problems.len()
    )
}

fn run_sample(build: &BuildDir, key: &str, args: &InspectArgs) -> Result<()> {
    if args.tokenizer.is_none() && args.tiles.is_none() {
        bail!("--sample needs --tokenizer PATH (the build's tokenizer.json) to show text; --tiles PNG alone writes only the picture");
    }
    let found = sample::find(build, key, args.tiles.is_some())?;
    if let Some(path) = &args.tiles {
        let picture = sample::tiles_picture(&found.row, build.manifest.settings.tile_encoding)?;
        picture
            .save(path)
            .with_context(|| format!("writing {}", path.display()))?;
        tracing::info!(
            "tiles of {:?} written to {} ({}x{} px)",
            found.row.id,
            path.display(),
            picture.width(),
            picture.height()
        );
    }
    if let Some(tok_path) = &args.tokenizer {
        let tokenizer = load_tokenizer(build, tok_path)?;
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let marking = if args.plain || no_color || !std::io::stdout().is_terminal() {
            Marking::Brackets
        } else {
            Marking::Color
        };
        print!("{}", sample::render(&found, &tokenizer, marking)?);
    }
    Ok(())
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// A bar of `width` cells for `value / max`, in eighths.
fn bar(value: u64, max: u64, width: usize) -> String {
    const EIGHTHS: [char; 8] = [' ', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];
    let eighths = if max == 0 {
        0
    } else {
        (value as u128 * width as u128 * 8 / max as u128) as usize
    };
    let mut s = "█".repeat(eighths / 8);
    if eighths % 8 > 0 {
        s.push(EIGHTHS[eighths % 8]);
    }
    if value > 0 && s.is_empty() {
        s.push('▏');
    }
    s
}

/// The terminal summary.
pub fn format_summary(s: &Summary) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let b = &s.build;
    let _ = writeln!(
        o,
        "{}: {} samples, {} tokens ({} supervised) in {} shards (schema v{}); seed {}, batch_size {}, group_size {}, {} groups, {} batches\n",
        s.dir, s.samples, s.tokens, s.supervised_tokens, s.shards, s.schema_version, b.seed, b.batch_size, b.group_size, b.groups, b.batches
    );
    let width = s
        .sources
        .iter()
        .map(|c| c.source.len())
        .max()
        .unwrap_or(0)
        .max(8);
    let _ = writeln!(
        o,
        "{:<width$} {:<8} {:>8} {:>11} {:>11} {:>7} {:>7} {:>6} {:>7} {:>7} {:>7} {:>7}",
        "source",
        "modality",
        "samples",
        "tokens",
        "supervised",
        "images",
        "tiles",
        "trunc",
        "p50",
        "p90",
        "p99",
        "max"
    );
    let all = s.modalities.iter().map(|m| &m.counts);
    for c in s.sources.iter().chain(all) {
        let name = if c.source == "*" { "(all)" } else { &c.source };
        let _ = writeln!(
            o,
            "{:<width$} {:<8} {:>8} {:>11} {:>11} {:>7} {:>7} {:>6} {:>7} {:>7} {:>7} {:>7}",
            name,
            c.modality,
            c.samples,
            c.tokens,
            c.supervised_tokens,
            c.images,
            c.tiles,
            c.truncated,
            c.length.p50,
            c.length.p90,
            c.length.p99,
            c.length.max
        );
    }
    for m in &s.modalities {
        let bw = m.histogram.first().map(|b| b.hi - b.lo).unwrap_or(0);
        let _ = writeln!(
            o,
            "\nlength histogram, {} ({} samples, bins of {bw} tokens)",
            m.counts.modality, m.counts.samples
        );
        let max = m.histogram.iter().map(|b| b.count).max().unwrap_or(0);
        for bin in &m.histogram {
            let _ = writeln!(
                o,
                "  {:>7}..{:<7} │{:<40} {}",
                bin.lo,
                bin.hi,
                bar(bin.count, max, 40),
                bin.count
            );
        }
    }
    if !s.grids.is_empty() {
        let _ = writeln!(o, "\nimages by processing and grid (cols x rows)");
        for g in &s.grids {
            let shape = if g.processing == "anyres" {
                format!("anyres {}x{}", g.cols, g.rows)
            } else {
                g.processing.clone()
            };
            let _ = writeln!(o, "  {shape:<14} {:>7}", g.images);
        }
    }
    let truncated: u64 = s.modalities.iter().map(|m| m.counts.truncated).sum();
    let read: u64 = s.rejects.by_source.iter().map(|r| r.read).sum();
    let _ = writeln!(
        o,
        "\ntruncated: {truncated} samples cut at model_max_length {}",
        b.model_max_length
    );
    let _ = writeln!(
        o,
        "rejected: {} of {read} records read (details: rejects.jsonl)",
        s.rejects.total
    );
    for r in s.rejects.by_source.iter().filter(|r| r.rejected > 0) {
        let _ = writeln!(o, "  {:<width$} {:>6} of {}", r.source, r.rejected, r.read);
    }
    for k in s.rejects.by_kind.iter().take(8) {
        let mut example = k.example.clone();
        if example.chars().count() > 90 {
            example = example.chars().take(87).collect::<String>() + "...";
        }
        let _ = writeln!(o, "  {:<20} {:>6}  e.g. {example}", k.kind, k.count);
    }
    let p = &s.padding;
    let _ = writeln!(
        o,
        "\npadding efficiency (real / padded tokens), batch size {}, world size {}",
        p.batch_size, p.world_size
    );
    let steps = p.world_size > 1;
    let packing = p.total.packed.is_some();
    let _ = writeln!(
        o,
        "  {:<8} {:>9} {:>9} {:>9}{}{}",
        "modality",
        "batches",
        "grouped",
        "random*",
        if packing {
            "    packed    rows    fill"
        } else {
            ""
        },
        if steps {
            "   steps  grouped/step  random/step"
        } else {
            ""
        }
    );
    for m in p.modalities.iter().chain([&p.total]) {
        let name = if m.modality == "*" {
            "(all)"
        } else {
            &m.modality
        };
        let step = if steps {
            format!(
                " {:>7} {:>13} {:>12}",
                m.grouped.steps,
                pct(m.grouped.step_efficiency),
                pct(m.random.step_efficiency)
            )
        } else {
            String::new()
        };
        let packed = match &m.packed {
            Some(k) => format!(
                " {:>9} {:>7} {:>7}",
                pct(k.padding.efficiency),
                k.rows,
                pct(k.fill)
            ),
            None => String::new(),
        };
        let _ = writeln!(
            o,
            "  {:<8} {:>9} {:>9} {:>9}{packed}{step}",
            name,
            m.grouped.batches,
            pct(m.grouped.efficiency),
            pct(m.random.efficiency)
        );
    }
    let _ = writeln!(o, "  * random: {}", p.random);
    if let Some(k) = &p.total.across {
        let _ = writeln!(
            o,
            "\n  packed across batches: rows of <= {} tokens of one modality (the epoch's last rows, \
             of the pooled leftovers, may mix them), one row per micro-batch \
             (llava-trainer run --pack-across-batches, epoch 0)",
            k.pack_length
        );
        let mixed = p.across_mixed.as_ref().map(|a| ("mixed", a));
        let rows = p
            .modalities
            .iter()
            .filter_map(|m| m.across.as_ref().map(|a| (m.modality.as_str(), a)))
            .chain(mixed)
            .chain(p.total.across.as_ref().map(|a| ("(all)", a)));
        for (name, a) in rows {
            let _ = writeln!(
                o,
                "  {:<8} {:>7} rows  fill {:>6}  padding {:>6}{}",
                name,
                a.rows,
                if a.rows == 0 { "-".into() } else { pct(a.fill) },
                pct(a.padding.efficiency),
                if steps {
                    format!("  per step {}", pct(a.padding.step_efficiency))
                } else {
                    String::new()
                }
            );
        }
    }
    if let Some(k) = &p.total.packed {
        let _ = writeln!(
            o,
            "  packed: each grouped batch in rows of <= {} tokens (balanced first-fit decreasing); fill = \
             real tokens / (rows x {})",
            k.pack_length, k.pack_length
        );
    }
    o
}
