//! `inspect --plot`: the length histogram of each modality as one PNG (drawn with the `image`
//! crate and a built-in pixel font: no plotting or font library, nothing from the system).

use image::{Rgb, RgbImage};

use super::font::{draw_text, text_width};
use super::summary::ModalitySummary;

pub const WIDTH: u32 = 900;
pub const PANEL_HEIGHT: u32 = 300;
const MARGIN_LEFT: u32 = 70;
const MARGIN_RIGHT: u32 = 20;
const MARGIN_TOP: u32 = 40;
const MARGIN_BOTTOM: u32 = 40;

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([40, 40, 40]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);

fn bar_color(modality: &str) -> Rgb<u8> {
    match modality {
        "image" => Rgb([52, 101, 164]),
        "text" => Rgb([230, 140, 30]),
        _ => Rgb([100, 140, 100]),
    }
}

fn fill(img: &mut RgbImage, x0: u32, y0: u32, x1: u32, y1: u32, color: Rgb<u8>) {
    for y in y0..y1.min(img.height()) {
        for x in x0..x1.min(img.width()) {
            img.put_pixel(x, y, color);
        }
    }
}

/// One panel per modality (its own x axis: 0 to its longest sample), stacked vertically:
/// `WIDTH × PANEL_HEIGHT·n` pixels.
pub fn length_plot(modalities: &[ModalitySummary]) -> RgbImage {
    let n = modalities.len().max(1) as u32;
    let mut img = RgbImage::from_pixel(WIDTH, PANEL_HEIGHT * n, WHITE);
    for (k, m) in modalities.iter().enumerate() {
        let top = k as u32 * PANEL_HEIGHT;
        let c = &m.counts;
        let title = format!(
            "{}: {} samples, length p50 {} p90 {} p99 {} max {}",
            c.modality, c.samples, c.length.p50, c.length.p90, c.length.p99, c.length.max
        );
        draw_text(
            &mut img,
            i64::from(MARGIN_LEFT),
            i64::from(top + 12),
            &title,
            2,
            INK,
        );
        let (x0, x1) = (MARGIN_LEFT, WIDTH - MARGIN_RIGHT);
        let (y0, y1) = (top + MARGIN_TOP, top + PANEL_HEIGHT - MARGIN_BOTTOM);
        let max_count = m
            .histogram
            .iter()
            .map(|b| b.count)
            .max()
            .unwrap_or(0)
            .max(1);
        // Horizontal grid lines at quarters, labelled with counts (whole counts only).
        let ticks = max_count.min(4) as u32;
        for q in 0..=ticks {
            let count = max_count * u64::from(q) / u64::from(ticks);
            let y = y1 - ((y1 - y0) as u64 * count / max_count) as u32;
            fill(&mut img, x0, y, x1, y + 1, GRID);
            let label = count.to_string();
            let w = text_width(&label, 1);
            draw_text(
                &mut img,
                i64::from(x0 - 6 - w),
                i64::from(y) - 3,
                &label,
                1,
                INK,
            );
        }
        let bins = m.histogram.len().max(1) as u32;
        let slot = (x1 - x0) / bins;
        for (i, b) in m.histogram.iter().enumerate() {
            let h = ((y1 - y0) as u64 * b.count / max_count) as u32;
            let bx = x0 + i as u32 * slot;
            fill(
                &mut img,
                bx + 1,
                y1 - h,
                bx + slot.max(2) - 1,
                y1,
                bar_color(&c.modality),
            );
        }
        fill(&mut img, x0, y1, x1, y1 + 1, INK);
        // X ticks: every few bins, labelled with the bin's lower bound.
        let every = bins.div_ceil(8).max(1);
        for (i, b) in m.histogram.iter().enumerate() {
            if !(i as u32).is_multiple_of(every) {
                continue;
            }
            let x = x0 + i as u32 * slot;
            fill(&mut img, x, y1, x + 1, y1 + 5, INK);
            draw_text(
                &mut img,
                i64::from(x),
                i64::from(y1 + 9),
                &b.lo.to_string(),
                1,
                INK,
            );
        }
        let unit = "tokens";
        draw_text(
            &mut img,
            i64::from(x1 - text_width(unit, 1)),
            i64::from(y1 + 22),
            unit,
            1,
            INK,
        );
    }
    img
}
