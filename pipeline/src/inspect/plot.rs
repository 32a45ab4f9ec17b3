//! Charts drawn with `plotters`: the same drawing code renders a PNG (`--plot`, bitmap backend)
//! and the inline SVG of the HTML report (svg backend). Text in the PNG is set in the bundled
//! DejaVu Sans (assets/fonts, read by plotters' `ab_glyph`: no system font lookup); the SVG names
//! `sans-serif` and the browser sets it, with the bundled font's metrics used for the layout.

use std::sync::Once;

use image::RgbImage;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::summary::{Bin, ModalitySummary};
use super::InspectError;

/// Width of `--plot`'s picture, and height of each modality's panel.
pub const WIDTH: u32 = 900;
pub const PANEL_HEIGHT: u32 = 300;

/// DejaVu Sans 2.37 (Bitstream Vera licence, assets/fonts/LICENSE-DejaVu), cut to Latin-1 and a
/// few punctuation marks by `pyftsubset` (31 KB instead of 760 KB).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");

/// Registers the bundled font as plotters' `sans-serif` (once per process).
fn fonts() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            if plotters::style::register_font("sans-serif", style, FONT).is_err() {
                tracing::warn!("the bundled font does not parse: charts will have no text");
            }
        }
    });
}

/// The colour of a modality's bars.
pub fn modality_color(modality: &str) -> RGBColor {
    match modality {
        "image" => RGBColor(52, 101, 164),
        "text" => RGBColor(230, 140, 30),
        _ => RGBColor(100, 140, 100),
    }
}

fn chart_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> InspectError {
    InspectError::Image(format!("drawing a chart: {e}"))
}

/// A length histogram on `area`: equal-width bins, the x axis in tokens.
pub fn draw_histogram<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    bins: &[Bin],
    color: RGBColor,
) -> Result<(), InspectError> {
    fonts();
    let x_max = bins.last().map(|b| b.hi).unwrap_or(1).max(1);
    let y_max = bins.iter().map(|b| b.count).max().unwrap_or(0).max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0u64..x_max, 0u64..y_max + y_max.div_ceil(10))
        .map_err(chart_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("length (tokens)")
        .y_desc("samples")
        .y_labels(6)
        .y_label_formatter(&|v| format!("{v}"))
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 13))
        .draw()
        .map_err(chart_err)?;
    chart
        .draw_series(bins.iter().filter(|b| b.count > 0).map(|b| {
            // A pixel between neighbouring bars.
            let mut r = Rectangle::new([(b.lo, b.count), (b.hi, 0)], color.filled());
            r.set_margin(0, 0, 1, 1);
            r
        }))
        .map_err(chart_err)?;
    Ok(())
}

/// One bar per category (each its own colour), values on a y axis from 0 to `y_max`, each bar
/// labelled with `label(value)` above it.
pub fn draw_bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    bars: &[(String, f64, RGBColor)],
    y_max: f64,
    label: &dyn Fn(f64) -> String,
) -> Result<(), InspectError> {
    fonts();
    // A segmented range `0..k` has the k + 1 segments 0..=k.
    let last = bars.len().max(1) as u32 - 1;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d((0u32..last).into_segmented(), 0f64..y_max * 1.12)
        .map_err(chart_err)?;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_desc)
        .x_labels(bars.len().max(1))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_formatter(&|v| label(*v))
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 13))
        .draw()
        .map_err(chart_err)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let i = i as u32;
            let mut r = Rectangle::new(
                [
                    (SegmentValue::Exact(i), b.1),
                    (SegmentValue::Exact(i + 1), 0.0),
                ],
                b.2.filled(),
            );
            r.set_margin(0, 0, 6, 6);
            r
        }))
        .map_err(chart_err)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            Text::new(
                label(b.1),
                (SegmentValue::CenterOf(i as u32), b.1 + y_max * 0.02),
                ("sans-serif", 12).into_font().color(&BLACK).pos(
                    plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Center,
                        plotters::style::text_anchor::VPos::Bottom,
                    ),
                ),
            )
        }))
        .map_err(chart_err)?;
    Ok(())
}

/// An SVG document of `width × height` drawn by `draw` (for inlining in HTML).
pub fn svg(
    width: u32,
    height: u32,
    draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Result<(), InspectError>,
) -> Result<String, InspectError> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_err)?;
        draw(&root)?;
        root.present().map_err(chart_err)?;
    }
    Ok(out)
}

/// A picture of `width × height` drawn by `draw`.
pub fn bitmap(
    width: u32,
    height: u32,
    draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Result<(), InspectError>,
) -> Result<RgbImage, InspectError> {
    let mut buf = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_err)?;
        draw(&root)?;
        root.present().map_err(chart_err)?;
    }
    RgbImage::from_raw(width, height, buf)
        .ok_or_else(|| InspectError::Image("chart buffer of the wrong size".into()))
}

/// The title of a modality's (or source's) length histogram.
pub fn length_title(name: &str, c: &super::summary::Counts) -> String {
    format!(
        "{name}: {} samples, length p50 {} p90 {} p99 {} max {}",
        c.samples, c.length.p50, c.length.p90, c.length.p99, c.length.max
    )
}

/// `--plot`: one panel per modality (its own x axis, 0 to its longest sample), stacked
/// vertically: `WIDTH × PANEL_HEIGHT·n` pixels.
pub fn length_plot(modalities: &[ModalitySummary]) -> Result<RgbImage, InspectError> {
    let n = modalities.len().max(1);
    bitmap(WIDTH, PANEL_HEIGHT * n as u32, |root| {
        for (area, m) in root.split_evenly((n, 1)).iter().zip(modalities) {
            let c = &m.counts;
            draw_histogram(
                area,
                &length_title(&c.modality, c),
                &m.histogram,
                modality_color(&c.modality),
            )?;
        }
        Ok(())
    })
}
