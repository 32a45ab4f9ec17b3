//! The sample browser: each chosen sample as the model sees it (trained spans highlighted, image
//! placeholders with their token counts) and each of its images as a PNG data URI (the base tile
//! and the grid, as `--tiles` draws them).

use std::fmt::Write;
use std::io::Cursor;

use base64::Engine;
use image::imageops::FilterType;
use llava_formats::constants::{IGNORE_INDEX, IMAGE_TOKEN_INDEX, TILE_SIZE};

use super::page::{esc, num};
use super::HtmlOptions;
use crate::inspect::sample::{image_picture, placeholder, segments, Found, Segment};
use crate::inspect::{BuildDir, InspectError};

pub(super) fn section(
    o: &mut String,
    build: &BuildDir,
    found: &[Found],
    options: &HtmlOptions,
    what: String,
) -> Result<(), InspectError> {
    let _ = write!(
        o,
        "<section id=samples><h2>Samples</h2><p>{}. <span class=legend><mark>trained</mark> \
         (label &#8800; &#8722;100), <span class=img>&lt;image: N tokens&gt;</span> an image's \
         place</span>. Tiles at {} px (the model's are {}: <code>--tile-px {}</code>).</p>\
         <p><input id=filter placeholder=\"filter by id, source or modality\"></p>",
        esc(&what),
        options.tile_px,
        TILE_SIZE,
        TILE_SIZE
    );
    if options.tokenizer.is_none() {
        o.push_str("<p class=note>No <code>--tokenizer</code> given: the text is not decoded.</p>");
    }
    super::page::thead(
        o,
        "sample-index",
        &[
            "#",
            "id",
            "source",
            "modality",
            "length",
            "images",
            "supervised",
        ],
    );
    for (k, f) in found.iter().enumerate() {
        let r = &f.row;
        let _ = write!(
            o,
            "<tr><td class=n data-v=\"{k}\"><a href=\"#sample-{k}\">{k}</a></td><td>{}</td><td>{}</td><td>{}</td>",
            esc(&r.id),
            esc(&r.source),
            esc(&r.modality)
        );
        super::page::td_num(o, u64::from(r.length));
        super::page::td_num(o, r.images.len() as u64);
        super::page::td_num(o, supervised(r));
        o.push_str("</tr>");
    }
    o.push_str("</tbody></table>");
    for (k, f) in found.iter().enumerate() {
        card(o, k, build, f, options)?;
    }
    o.push_str("</section>");
    Ok(())
}

fn supervised(r: &llava_formats::schema::ShardRow) -> u64 {
    r.labels.iter().filter(|&&l| l != IGNORE_INDEX).count() as u64
}

fn card(
    o: &mut String,
    k: usize,
    build: &BuildDir,
    f: &Found,
    options: &HtmlOptions,
) -> Result<(), InspectError> {
    let r = &f.row;
    let text_tokens = r
        .input_ids
        .iter()
        .filter(|&&t| t != IMAGE_TOKEN_INDEX)
        .count();
    let _ =
        write!(
        o,
        "<div class=sample id=\"sample-{k}\" data-id=\"{}\" data-key=\"{}\" data-images=\"{}\">\
         <h3>{k}. {}</h3><div class=meta>source <b>{}</b> · {}#{} · {} · length {} ({} text + {} \
         image tokens) · supervised {}{} · {} row group {} · group {} batch {}</div>",
        esc(&r.id),
        esc(&format!("{} {} {}", r.id, r.source, r.modality)),
        r.images.len(),
        esc(&r.id),
        esc(&r.source),
        esc(&r.json_file),
        r.index,
        esc(&r.modality),
        num(u64::from(r.length)),
        num(text_tokens as u64),
        num(u64::from(r.num_image_tokens)),
        num(supervised(r)),
        if r.truncated { " · <b>truncated</b>" } else { "" },
        esc(&f.shard),
        f.row_group,
        r.group,
        r.batch
    );
    o.push_str("<pre class=conv>");
    match options.tokenizer {
        Some(tokenizer) => {
            for segment in segments(r, tokenizer)? {
                match segment {
                    Segment::Context(t) => o.push_str(&esc(&t)),
                    Segment::Trained(t) => {
                        let _ = write!(o, "<mark>{}</mark>", esc(&t));
                    }
                    Segment::Image(i) => {
                        let text = r
                            .images
                            .get(i)
                            .map(placeholder)
                            .unwrap_or_else(|| "<image: no metadata>".into());
                        let _ = write!(o, "<span class=img>{}</span>", esc(&text));
                    }
                }
            }
        }
        None => {
            let _ = write!(
                o,
                "({} token ids; give --tokenizer to decode them)",
                r.input_ids.len()
            );
        }
    }
    o.push_str("</pre>");
    if !r.images.is_empty() {
        o.push_str("<div class=tiles>");
        for (i, img) in r.images.iter().enumerate() {
            let picture = image_picture(r, i, build.manifest.settings.tile_encoding)?;
            let picture = if options.tile_px != TILE_SIZE && options.tile_px > 0 {
                let scale = f64::from(options.tile_px) / f64::from(TILE_SIZE);
                let w = ((f64::from(picture.width()) * scale).round() as u32).max(1);
                let h = ((f64::from(picture.height()) * scale).round() as u32).max(1);
                image::imageops::resize(&picture, w, h, FilterType::Triangle)
            } else {
                picture
            };
            let mut png = Vec::new();
            picture
                .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
                .map_err(|e| InspectError::Image(format!("encoding a PNG: {e}")))?;
            let _ = write!(
                o,
                "<figure><img class=tile-picture width={} height={} alt=\"{}\" \
                 src=\"data:image/png;base64,{}\"><figcaption>image {i}: {} ({}x{}{}) · {}</figcaption></figure>",
                picture.width(),
                picture.height(),
                esc(&format!("tiles of image {i} of {}", r.id)),
                base64::engine::general_purpose::STANDARD.encode(&png),
                esc(&img.path),
                img.width,
                img.height,
                if img.best_width > 0 {
                    format!(", best resolution {}x{}", img.best_width, img.best_height)
                } else {
                    String::new()
                },
                esc(&placeholder(img))
            );
        }
        o.push_str("</div>");
    }
    o.push_str("</div>");
    Ok(())
}
