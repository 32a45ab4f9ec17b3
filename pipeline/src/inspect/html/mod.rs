//! `inspect --html`: the whole build as one self-contained HTML page: the header (settings,
//! tokenizer, seed, schema, when, totals), sortable per-source tables, charts (plotters SVG,
//! inline), the rejects by kind, and a browser of chosen samples with their trained spans and
//! their tiles as PNG data URIs. The summary reads only the small columns (as `inspect` does);
//! the sample browser reads only the chosen rows.

mod choose;
mod page;
mod samples;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::time::Instant;

use llava_formats::schema::col as c;
use plotters::prelude::RGBColor;

use super::plot::{self, draw_bars, draw_histogram, length_title, modality_color};
use super::summary::{
    histogram, read_rows, strings, summarize_rows, u64s, Summary, SummaryOptions,
};
use super::{io_err, BuildDir, InspectError};
use crate::tokenizer::TextTokenizer;
pub use choose::choose;
use page::{esc, num, pct, td_num, thead};

/// What goes in the report.
pub struct HtmlOptions<'a> {
    /// Batch size, world size, bins and pack length of the summary (the report always shows
    /// packing: `pack_length` defaults to the build's `model_max_length`).
    pub summary: SummaryOptions,
    /// Samples drawn for the browser when `sample_keys` is empty.
    pub samples: usize,
    /// The samples to show instead (ids, `source:index` or row numbers, as `--sample`).
    pub sample_keys: Vec<String>,
    /// Seed of the sample choice.
    pub seed: u64,
    /// Decodes the samples' text; without it the browser shows their tiles and metadata only.
    pub tokenizer: Option<&'a TextTokenizer>,
    /// Pixels per tile in the pictures (336 = the model's pixels, smaller = a lighter page).
    pub tile_px: u32,
    /// Rejects listed per kind (the rest are counted).
    pub rejects_per_kind: usize,
}

/// The page and what it took.
pub struct HtmlReport {
    pub html: String,
    pub summary: Summary,
    pub samples: usize,
    /// Seconds reading and summarising the small columns, and reading and drawing the samples.
    pub summary_secs: f64,
    pub samples_secs: f64,
}

/// Writes the report of `build` as one HTML string.
pub fn report(build: &BuildDir, options: &HtmlOptions) -> Result<HtmlReport, InspectError> {
    let m = &build.manifest;
    let started = Instant::now();
    let rows = read_rows(build)?;
    let mut summary_options = options.summary.clone();
    summary_options
        .pack_length
        .get_or_insert(m.settings.model_max_length as u32);
    let summary = summarize_rows(build, &rows, &summary_options)?;
    // Per row: source number and length (for the per-source histograms and the sample choice).
    let source_names: Vec<String> = {
        let mut v: Vec<String> = summary.sources.iter().map(|s| s.source.clone()).collect();
        v.dedup();
        v
    };
    let source_no: HashMap<&str, u32> = source_names
        .iter()
        .enumerate()
        .map(|(i, s)| (s.as_str(), i as u32))
        .collect();
    let row_source: Vec<u32> = rows
        .column(c::SOURCE)?
        .as_materialized_series()
        .str()?
        .iter()
        .map(|s| s.and_then(|s| source_no.get(s).copied()).unwrap_or(0))
        .collect();
    let row_length: Vec<u32> = u64s(&rows, c::LENGTH)?
        .into_iter()
        .map(|l| l as u32)
        .collect();
    let row_modality = strings(&rows, c::MODALITY)?;
    drop(rows);
    let rejects = build.rejects()?;
    let summary_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let at = if options.sample_keys.is_empty() {
        let chosen = choose(&row_source, &row_length, options.samples, options.seed);
        chosen
            .into_iter()
            .map(|i| super::sample::nth_row(build, i as u64))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                InspectError::Usage("the shards have fewer rows than the manifest says".into())
            })?
    } else {
        super::sample::locate(build, &options.sample_keys)?
    };
    let found = super::sample::read_rows_at(build, &at, true)?;
    let mut body = String::new();
    header(&mut body, build, &summary)?;
    sources_section(&mut body, build, &summary);
    lengths_section(
        &mut body,
        &summary,
        &source_names,
        &row_source,
        &row_length,
        &row_modality,
        summary_options.bins,
    )?;
    images_section(&mut body, &summary)?;
    padding_section(&mut body, &summary)?;
    rejects_section(&mut body, &rejects, options.rejects_per_kind);
    samples::section(
        &mut body,
        build,
        &found,
        options,
        if options.sample_keys.is_empty() {
            format!(
                "{} of {} samples drawn with seed {} across sources and length deciles",
                found.len(),
                summary.samples,
                options.seed
            )
        } else {
            format!("{} samples asked for with --sample", found.len())
        },
    )?;
    body.push_str("</main>");
    let samples_secs = started.elapsed().as_secs_f64();
    let html = format!(
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>\
         <meta name=viewport content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{}</style></head><body>{body}<script>{}</script></body></html>\n",
        esc(&format!("llava-data inspect: {}", build.dir.display())),
        page::STYLE,
        page::SCRIPT
    );
    Ok(HtmlReport {
        html,
        summary,
        samples: found.len(),
        summary_secs,
        samples_secs,
    })
}

const NAV: &str = "<nav><a href=#sources>Sources</a><a href=#lengths>Lengths</a>\
<a href=#images>Images</a><a href=#padding>Padding</a><a href=#rejects>Rejects</a>\
<a href=#samples>Samples</a></nav>";

fn kv(o: &mut String, key: &str, value: &str) {
    let _ = write!(o, "<dt>{}</dt><dd>{}</dd>", esc(key), esc(value));
}

/// Build settings, provenance and totals.
fn header(o: &mut String, build: &BuildDir, s: &Summary) -> Result<(), InspectError> {
    let m = &build.manifest;
    let manifest_path = build.dir.join(llava_formats::manifest::MANIFEST_FILE);
    let written = std::fs::metadata(&manifest_path)
        .and_then(|md| md.modified())
        .map_err(io_err(&manifest_path))?;
    let when = written
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| page::utc(d.as_secs()))
        .unwrap_or_else(|_| "unknown".into());
    let t = &m.totals;
    let _ = write!(
        o,
        "<header><h1>{}</h1><div class=sub>{} samples · {} tokens ({} supervised) · {} shards · \
         schema v{} · written {}</div></header>",
        esc(&build.dir.display().to_string()),
        num(s.samples),
        num(s.tokens),
        num(s.supervised_tokens),
        s.shards,
        m.schema_version,
        esc(&when)
    );
    o.push_str(NAV);
    o.push_str("<main><section id=build><h2>Build</h2><div class=charts><dl class=kv>");
    kv(
        o,
        "format",
        &format!("{} (schema v{})", m.format, m.schema_version),
    );
    kv(o, "created by", &m.created_by);
    kv(o, "manifest written", &when);
    kv(o, "config sha256", &m.config_sha256);
    kv(o, "tokenizer sha256", &m.tokenizer_sha256);
    kv(o, "seed", &m.settings.seed.to_string());
    kv(
        o,
        "model_max_length",
        &m.settings.model_max_length.to_string(),
    );
    kv(
        o,
        "image_grid_pinpoints",
        &m.settings
            .image_grid_pinpoints
            .iter()
            .map(|[w, h]| format!("{w}x{h}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    kv(
        o,
        "mm_patch_merge_type",
        &format!("{:?}", m.settings.mm_patch_merge_type),
    );
    kv(
        o,
        "tiles",
        &format!(
            "{} px, {:?} encoding",
            m.settings.tile_size, m.settings.tile_encoding
        ),
    );
    kv(
        o,
        "grouping",
        &format!(
            "{}: batch_size {}, group_size {}, length_pool_groups {}; {} groups, {} batches",
            m.grouping.method,
            m.grouping.batch_size,
            m.grouping.group_size,
            m.grouping.length_pool_groups,
            m.grouping.groups,
            m.grouping.batches
        ),
    );
    o.push_str("</dl><table id=totals><thead><tr><th>total</th><th>value</th></tr></thead><tbody>");
    for (name, v) in [
        ("samples", t.samples),
        ("image samples", t.image_samples),
        ("text samples", t.text_samples),
        ("tokens", t.tokens),
        ("image tokens", t.image_tokens),
        ("supervised tokens", t.supervised_tokens),
        ("images", t.images),
        ("tiles", t.tiles),
        ("truncated", t.truncated),
        ("rejected", t.rejected),
        ("shard bytes", t.bytes),
    ] {
        let _ = write!(o, "<tr><td>{name}</td>");
        td_num(o, v);
        o.push_str("</tr>");
    }
    o.push_str("</tbody></table></div></section>");
    Ok(())
}

/// Per source (read, written, rejected by kind, totals) and per source and modality (counts and
/// length percentiles, as `inspect --json`'s `sources`).
fn sources_section(o: &mut String, build: &BuildDir, s: &Summary) {
    let m = &build.manifest;
    o.push_str("<section id=sources><h2>Sources</h2>");
    let kinds: Vec<String> = {
        let mut k: Vec<String> = m
            .sources
            .iter()
            .flat_map(|s| s.rejects_by_kind.keys().cloned())
            .collect();
        k.sort();
        k.dedup();
        k
    };
    let mut columns = vec![
        "source",
        "read",
        "samples",
        "tokens",
        "supervised tokens",
        "images",
        "tiles",
        "truncated",
        "rejected",
    ];
    columns.extend(kinds.iter().map(|k| k.as_str()));
    thead(o, "by-source", &columns);
    for src in &m.sources {
        let mine = s.sources.iter().filter(|c| c.source == src.name);
        let sum = |f: fn(&super::summary::Counts) -> u64| mine.clone().map(f).sum::<u64>();
        let _ = write!(o, "<tr><td>{}</td>", esc(&src.name));
        td_num(o, src.read);
        for v in [
            sum(|c| c.samples),
            sum(|c| c.tokens),
            sum(|c| c.supervised_tokens),
            sum(|c| c.images),
            sum(|c| c.tiles),
            sum(|c| c.truncated),
            src.rejected,
        ] {
            td_num(o, v);
        }
        for k in &kinds {
            td_num(o, src.rejects_by_kind.get(k).copied().unwrap_or(0));
        }
        o.push_str("</tr>");
    }
    o.push_str("</tbody></table>");
    o.push_str("<h3>By source and modality</h3>");
    thead(
        o,
        "by-source-modality",
        &[
            "source",
            "modality",
            "samples",
            "tokens",
            "supervised tokens",
            "image tokens",
            "images",
            "tiles",
            "truncated",
            "min",
            "p50",
            "p90",
            "p99",
            "max",
        ],
    );
    let all = s.modalities.iter().map(|m| &m.counts);
    for c in s.sources.iter().chain(all) {
        let name = if c.source == "*" { "(all)" } else { &c.source };
        let _ = write!(o, "<tr><td>{}</td><td>{}</td>", esc(name), esc(&c.modality));
        for v in [
            c.samples,
            c.tokens,
            c.supervised_tokens,
            c.image_tokens,
            c.images,
            c.tiles,
            c.truncated,
            c.length.min,
            c.length.p50,
            c.length.p90,
            c.length.p99,
            c.length.max,
        ] {
            td_num(o, v);
        }
        o.push_str("</tr>");
    }
    o.push_str(
        "</tbody></table><p class=note>Lengths are exact token counts (text + image tokens); \
         percentiles are nearest-rank. Click a column to sort.</p>",
    );
    o.push_str("</section>");
}

fn figure(o: &mut String, svg: &str) {
    o.push_str("<figure>");
    o.push_str(svg);
    o.push_str("</figure>");
}

/// Length histograms per modality and per (source, modality).
fn lengths_section(
    o: &mut String,
    s: &Summary,
    source_names: &[String],
    row_source: &[u32],
    row_length: &[u32],
    row_modality: &[String],
    bins: usize,
) -> Result<(), InspectError> {
    o.push_str("<section id=lengths><h2>Lengths</h2><div class=charts>");
    for m in &s.modalities {
        let c = &m.counts;
        let svg = plot::svg(620, 300, |area| {
            draw_histogram(
                area,
                &length_title(&c.modality, c),
                &m.histogram,
                modality_color(&c.modality),
            )
        })?;
        figure(o, &svg);
    }
    o.push_str("</div><h3>Per source</h3><div class=charts>");
    let mut per: BTreeMap<(u32, &str), Vec<u64>> = BTreeMap::new();
    for i in 0..row_source.len() {
        per.entry((row_source[i], row_modality[i].as_str()))
            .or_default()
            .push(u64::from(row_length[i]));
    }
    for ((src, modality), lengths) in &per {
        let name = &source_names[*src as usize];
        let Some(c) = s
            .sources
            .iter()
            .find(|c| &c.source == name && c.modality == *modality)
        else {
            continue;
        };
        let svg = plot::svg(420, 240, |area| {
            draw_histogram(
                area,
                &format!("{name} ({modality}), {} samples", c.samples),
                &histogram(lengths, bins),
                modality_color(modality),
            )
        })?;
        figure(o, &svg);
    }
    o.push_str("</div></section>");
    Ok(())
}

/// Tiles per image and the anyres grids.
fn images_section(o: &mut String, s: &Summary) -> Result<(), InspectError> {
    o.push_str("<section id=images><h2>Images</h2>");
    if s.grids.is_empty() {
        o.push_str("<p>No image in this build.</p></section>");
        return Ok(());
    }
    let blue = modality_color("image");
    o.push_str("<div class=charts>");
    let tiles: Vec<(String, f64, RGBColor)> = s
        .tiles_per_image
        .iter()
        .map(|t| (t.tiles.to_string(), t.images as f64, blue))
        .collect();
    let max = tiles.iter().map(|t| t.1).fold(1.0, f64::max);
    let svg = plot::svg(460, 280, |area| {
        draw_bars(
            area,
            "images by tiles per image",
            "images",
            &tiles,
            max,
            &|v| format!("{v:.0}"),
        )
    })?;
    figure(o, &svg);
    let grids: Vec<(String, f64, RGBColor)> = s
        .grids
        .iter()
        .map(|g| {
            let name = if g.processing == "anyres" {
                format!("{}x{}", g.cols, g.rows)
            } else {
                g.processing.clone()
            };
            (name, g.images as f64, RGBColor(90, 130, 190))
        })
        .collect();
    let max = grids.iter().map(|t| t.1).fold(1.0, f64::max);
    let svg = plot::svg(560, 280, |area| {
        draw_bars(
            area,
            "images by anyres grid (cols x rows)",
            "images",
            &grids,
            max,
            &|v| format!("{v:.0}"),
        )
    })?;
    figure(o, &svg);
    o.push_str("</div>");
    thead(
        o,
        "grids",
        &["processing", "cols", "rows", "tiles", "images"],
    );
    for g in &s.grids {
        let _ = write!(o, "<tr><td>{}</td>", esc(&g.processing));
        td_num(o, u64::from(g.cols));
        td_num(o, u64::from(g.rows));
        let tiles = if g.processing == "anyres" {
            1 + g.cols * g.rows
        } else {
            1
        };
        td_num(o, u64::from(tiles));
        td_num(o, g.images);
        o.push_str("</tr>");
    }
    o.push_str("</tbody></table></section>");
    Ok(())
}

/// Padding efficiency of grouped, random and packed batches, per modality and in all.
fn padding_section(o: &mut String, s: &Summary) -> Result<(), InspectError> {
    let p = &s.padding;
    let _ = write!(
        o,
        "<section id=padding><h2>Padding</h2><p>Real tokens / padded tokens at batch size <b>{}</b> \
         per rank, world size <b>{}</b> (a step is {} batches; the step figure counts ranks \
         waiting for the slowest). <i>grouped</i>: the build's length groups cut into batches; \
         <i>random</i>: {}; <i>packed</i>: each grouped batch in rows of at most {} tokens \
         (balanced first-fit decreasing, as <code>llava-trainer run --packing</code>).</p>",
        p.batch_size,
        p.world_size,
        p.world_size,
        esc(&p.random),
        p.total.packed.as_ref().map_or(0, |k| k.pack_length)
    );
    let colors = [
        ("grouped", RGBColor(52, 101, 164)),
        ("random", RGBColor(200, 80, 60)),
        ("packed", RGBColor(70, 150, 90)),
    ];
    let mut bars = Vec::new();
    for m in p.modalities.iter().chain([&p.total]) {
        let name = if m.modality == "*" {
            "all"
        } else {
            &m.modality
        };
        let values = [
            m.grouped.step_efficiency,
            m.random.step_efficiency,
            m.packed.as_ref().map_or(0.0, |k| k.padding.step_efficiency),
        ];
        for ((kind, color), v) in colors.iter().zip(values) {
            bars.push((format!("{name} {kind}"), v, *color));
        }
    }
    let svg = plot::svg(140 + 70 * bars.len() as u32, 300, |area| {
        draw_bars(
            area,
            &format!(
                "padding efficiency per step, batch size {} x {} ranks",
                p.batch_size, p.world_size
            ),
            "real / padded tokens",
            &bars,
            1.0,
            &|v| pct(v),
        )
    })?;
    o.push_str("<div class=charts>");
    figure(o, &svg);
    o.push_str("</div>");
    thead(
        o,
        "padding",
        &[
            "modality",
            "batches",
            "steps",
            "real tokens",
            "grouped",
            "grouped per step",
            "random",
            "random per step",
            "packed rows",
            "packed",
            "packed per step",
            "fill",
        ],
    );
    for m in p.modalities.iter().chain([&p.total]) {
        let name = if m.modality == "*" {
            "(all)"
        } else {
            &m.modality
        };
        let _ = write!(o, "<tr><td>{}</td>", esc(name));
        td_num(o, m.grouped.batches);
        td_num(o, m.grouped.steps);
        td_num(o, m.grouped.real_tokens);
        let mut ratio = |x: f64| {
            let _ = write!(o, "<td class=n data-v=\"{x}\">{}</td>", pct(x));
        };
        ratio(m.grouped.efficiency);
        ratio(m.grouped.step_efficiency);
        ratio(m.random.efficiency);
        ratio(m.random.step_efficiency);
        match &m.packed {
            Some(k) => {
                td_num(o, k.rows);
                for x in [k.padding.efficiency, k.padding.step_efficiency, k.fill] {
                    let _ = write!(o, "<td class=n data-v=\"{x}\">{}</td>", pct(x));
                }
            }
            None => o.push_str("<td></td><td></td><td></td><td></td>"),
        }
        o.push_str("</tr>");
    }
    o.push_str("</tbody></table></section>");
    Ok(())
}

/// Kinds whose reason starts with `image PATH: ` (the file that failed).
const IMAGE_KINDS: [&str; 3] = ["image", "truncated_image", "image_too_large"];

/// The image file of an image failure (its reason reads `image PATH: why`).
pub fn image_path(kind: &str, reason: &str) -> Option<String> {
    if !IMAGE_KINDS.contains(&kind) {
        return None;
    }
    let rest = reason.strip_prefix("image ")?;
    rest.split_once(": ").map(|(p, _)| p.to_string())
}

/// Every reject, grouped by kind (most frequent first), at most `per_kind` listed per kind.
fn rejects_section(
    o: &mut String,
    rejects: &[llava_formats::manifest::RejectEntry],
    per_kind: usize,
) {
    let _ = write!(
        o,
        "<section id=rejects><h2>Rejects</h2><p>{} records rejected (rejects.jsonl).</p>",
        num(rejects.len() as u64)
    );
    let mut kinds: BTreeMap<&str, Vec<&llava_formats::manifest::RejectEntry>> = BTreeMap::new();
    for r in rejects {
        kinds.entry(&r.kind).or_default().push(r);
    }
    let mut kinds: Vec<_> = kinds.into_iter().collect();
    kinds.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
    for (kind, list) in kinds {
        let image = IMAGE_KINDS.contains(&kind);
        let _ = write!(
            o,
            "<details open class=reject-kind data-kind=\"{}\" data-count=\"{}\"><summary>{} ({})</summary>",
            esc(kind),
            list.len(),
            esc(kind),
            num(list.len() as u64)
        );
        let mut columns = vec!["source", "file", "index", "line", "id", "reason"];
        if image {
            columns.push("image file");
        }
        thead(o, &format!("rejects-{kind}"), &columns);
        for r in list.iter().take(per_kind) {
            let _ = write!(
                o,
                "<tr><td>{}</td><td>{}</td>",
                esc(&r.source),
                esc(&r.json_file)
            );
            td_num(o, r.index);
            match r.line {
                Some(l) => td_num(o, l),
                None => o.push_str("<td></td>"),
            }
            let _ = write!(o, "<td>{}</td><td>{}</td>", esc(&r.id), esc(&r.reason));
            if image {
                let _ = write!(
                    o,
                    "<td>{}</td>",
                    esc(&image_path(kind, &r.reason).unwrap_or_default())
                );
            }
            o.push_str("</tr>");
        }
        o.push_str("</tbody></table>");
        if list.len() > per_kind {
            let _ = write!(
                o,
                "<p class=note>{} more of this kind in rejects.jsonl.</p>",
                num((list.len() - per_kind) as u64)
            );
        }
        o.push_str("</details>");
    }
    o.push_str("</section>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_path_of_image_failures_only() {
        assert_eq!(
            image_path(
                "truncated_image",
                "image /a/b c.jpg: unexpected end of file"
            )
            .as_deref(),
            Some("/a/b c.jpg")
        );
        assert_eq!(image_path("nothing_to_train", "image x: y"), None);
    }
}
