//! Benchmark comparison chart, rendered to a PNG file.
//!
//! [`render_png`] draws one small vertical bar chart per workload ([`Panel`]) in a grid of up
//! to three columns, under a common title and a shared colour legend. Every panel gets its own
//! y axis because workloads report different units (MiB/s, files/s, latency in ms), so putting
//! them on one axis would flatten all but the largest. A series (e.g. "local disk") keeps the
//! same colour in every panel, so a reader can follow it across the grid.
//!
//! Drawing uses `plotters` with only its bitmap backend and the `ab_glyph` text renderer: that
//! keeps the dependency tree pure Rust (no fontconfig/freetype system libraries), at the price
//! of having to hand it a font file ourselves. We don't ship one; a TrueType/OpenType font is
//! looked up at run time in `STAGEFS_CHART_FONT` and then in common system locations, and
//! [`ChartError::NoFont`] is returned if none is found, so callers can skip the chart with a
//! warning. The pixels are encoded with the `png` crate rather than plotters' `image`-based
//! encoder, which is heavier and picks the format from the file extension.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

/// One workload's results: a small bar chart with one bar per series.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Workload name, e.g. "checkpoint".
    pub title: String,
    /// Unit of the values, e.g. "MiB/s" or "files/s" or "ms (p99, lower is better)".
    pub unit: String,
    /// One bar per series, in display order: (series label, value). Series labels repeat across
    /// panels (e.g. "stagefs gateway", "write-through", "local disk", "raw device"); the same label
    /// must get the same colour in every panel.
    pub bars: Vec<(String, f64)>,
}

/// Why a chart could not be rendered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChartError {
    /// No readable TrueType/OpenType font was found; text cannot be drawn without one.
    #[error(
        "no usable TrueType/OpenType font found (set {FONT_ENV} to a .ttf file); searched: {}",
        join_paths(.searched)
    )]
    NoFont {
        /// Every path that was tried, in order.
        searched: Vec<PathBuf>,
    },
    /// A font file looked like a font but the text renderer could not parse it.
    #[error("font file {} could not be parsed", .path.display())]
    InvalidFont {
        /// The rejected font file.
        path: PathBuf,
    },
    /// Drawing failed (plotters error), with what was being drawn.
    #[error("drawing chart failed: {0}")]
    Draw(String),
    /// The PNG could not be encoded or written.
    #[error("writing chart to {}: {message}", .path.display())]
    Write {
        /// Destination that could not be written.
        path: PathBuf,
        /// Underlying I/O or encoder error.
        message: String,
    },
}

/// Environment variable naming a font file to use before the built-in search list.
pub const FONT_ENV: &str = "STAGEFS_CHART_FONT";

/// Font files tried after `STAGEFS_CHART_FONT`: the usual places of DejaVu, Liberation and Noto
/// Sans on Debian/Ubuntu, Fedora and Arch, plus macOS's Arial.
const SYSTEM_FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/google-noto/NotoSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// Family name under which the font is registered; plotters' own defaults use it too.
const FAMILY: &str = "sans-serif";

const WIDTH: u32 = 1500;
const OUTER_MARGIN: u32 = 20;
const TITLE_HEIGHT: u32 = 56;
const LEGEND_ROW_HEIGHT: u32 = 30;
const PANEL_HEIGHT: u32 = 430;
const MAX_COLUMNS: usize = 3;

const TITLE_SIZE: f64 = 30.0;
const PANEL_TITLE_SIZE: f64 = 22.0;
const LEGEND_SIZE: f64 = 17.0;
const LABEL_SIZE: f64 = 14.0;
const VALUE_SIZE: f64 = 15.0;
const UNIT_SIZE: f64 = 15.0;

const BACKGROUND: RGBColor = RGBColor(255, 255, 255);
const PANEL_BACKGROUND: RGBColor = RGBColor(250, 250, 252);
const PANEL_BORDER: RGBColor = RGBColor(215, 215, 222);
const TEXT: RGBColor = RGBColor(35, 35, 45);
const MUTED_TEXT: RGBColor = RGBColor(120, 120, 130);
const GRID_LINE: RGBColor = RGBColor(225, 225, 232);

/// Tableau 10: distinct, print-friendly colours that stay apart for colour-blind readers
/// better than plotters' saturated primaries. Cycled if there are more series.
const PALETTE: [RGBColor; 10] = [
    RGBColor(78, 121, 167),
    RGBColor(242, 142, 43),
    RGBColor(89, 161, 79),
    RGBColor(225, 87, 89),
    RGBColor(118, 183, 178),
    RGBColor(176, 122, 161),
    RGBColor(237, 201, 72),
    RGBColor(255, 157, 167),
    RGBColor(156, 117, 95),
    RGBColor(186, 176, 172),
];

/// Renders `panels` as a grid of small bar charts (one per workload, each with its own y axis,
/// because units differ), with `title` on top and a shared legend, into a PNG at `path`.
///
/// The image is 1500 px wide; its height grows with the number of grid rows. Panels without
/// bars, or whose values are all NaN/infinite, show "no data"; a single non-finite value shows
/// "n/a" in place of its bar.
pub fn render_png(title: &str, panels: &[Panel], path: &Path) -> Result<(), ChartError> {
    ensure_font()?;

    let series = series_labels(panels);
    let legend_rows = legend_layout(&series, WIDTH - 2 * OUTER_MARGIN)?;
    let columns = grid_columns(panels.len());
    let rows = panels.len().div_ceil(columns).max(1);
    let header = OUTER_MARGIN + TITLE_HEIGHT + LEGEND_ROW_HEIGHT * legend_rows.len() as u32 + 10;
    let height = header + PANEL_HEIGHT * rows as u32 + OUTER_MARGIN;

    let mut pixels = vec![0u8; WIDTH as usize * height as usize * 3];
    {
        // The backend borrows `pixels`; it must be dropped before they are encoded.
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, height)).into_drawing_area();
        root.fill(&BACKGROUND).map_err(draw_err("background"))?;

        let (header_area, body) = root.split_vertically(header);
        draw_header(&header_area, title, &legend_rows, &series)?;

        let body = body.margin(0, OUTER_MARGIN, OUTER_MARGIN, OUTER_MARGIN);
        if panels.is_empty() {
            draw_centered(&body, "no data", MUTED_TEXT, PANEL_TITLE_SIZE)?;
        }
        for (panel, area) in panels.iter().zip(body.split_evenly((rows, columns))) {
            let colour_of = |label: &str| colour_for(&series, label);
            draw_panel(&area.margin(6, 6, 6, 6), panel, &colour_of)
                .map_err(|e| in_panel(e, &panel.title))?;
        }
        root.present().map_err(draw_err("finishing bitmap"))?;
    }
    write_png(path, &pixels, WIDTH, height)
}

/// Registers the first usable font with plotters, once per process. The outcome (also a
/// failure) is cached: fonts do not appear while a benchmark runs, and searching again on
/// every chart would only repeat the same warning more slowly.
fn ensure_font() -> Result<(), ChartError> {
    static REGISTERED: OnceLock<Result<PathBuf, ChartError>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let (path, bytes) = find_font(&font_candidates())?;
            // plotters keeps fonts in a process-wide table and wants 'static bytes; this runs
            // at most once, so leaking one font file is the simple, bounded answer.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font(FAMILY, FontStyle::Normal, bytes)
                .map_err(|_| ChartError::InvalidFont { path: path.clone() })?;
            Ok(path)
        })
        .as_ref()
        .map(|_| ())
        .map_err(Clone::clone)
}

/// `STAGEFS_CHART_FONT` (if set) followed by [`SYSTEM_FONTS`].
fn font_candidates() -> Vec<PathBuf> {
    let mut candidates = Vec::with_capacity(SYSTEM_FONTS.len() + 1);
    if let Some(path) = std::env::var_os(FONT_ENV).filter(|p| !p.is_empty()) {
        candidates.push(PathBuf::from(path));
    }
    candidates.extend(SYSTEM_FONTS.iter().map(PathBuf::from));
    candidates
}

/// Returns the path and contents of the first candidate that is a readable font file.
/// Unreadable or non-font files are skipped, so a stale `STAGEFS_CHART_FONT` falls back to the
/// system fonts instead of failing outright.
fn find_font(candidates: &[PathBuf]) -> Result<(PathBuf, Vec<u8>), ChartError> {
    candidates
        .iter()
        .find_map(|path| {
            let bytes = std::fs::read(path).ok()?;
            looks_like_font(&bytes).then(|| (path.clone(), bytes))
        })
        .ok_or_else(|| ChartError::NoFont {
            searched: candidates.to_vec(),
        })
}

/// Cheap check of the sfnt magic (TrueType, OpenType/CFF, legacy Apple, collection), so that a
/// directory listing or an HTML error page saved as .ttf is skipped rather than registered.
fn looks_like_font(bytes: &[u8]) -> bool {
    matches!(
        bytes.get(..4),
        Some([0, 1, 0, 0]) | Some(b"OTTO") | Some(b"true") | Some(b"ttcf")
    )
}

fn join_paths(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    shown.join(", ")
}

/// Series labels in order of first appearance; the index picks the colour, which makes colours
/// stable across panels even when a panel lacks some series.
fn series_labels(panels: &[Panel]) -> Vec<String> {
    let mut labels: Vec<String> = Vec::new();
    for (label, _) in panels.iter().flat_map(|p| &p.bars) {
        if !labels.contains(label) {
            labels.push(label.clone());
        }
    }
    labels
}

fn colour_for(series: &[String], label: &str) -> RGBColor {
    let index = series.iter().position(|s| s == label).unwrap_or(0);
    PALETTE[index % PALETTE.len()]
}

/// Up to three columns; four panels read better as 2x2 than as 3+1.
fn grid_columns(panels: usize) -> usize {
    match panels {
        0 => 1,
        4 => 2,
        n => n.min(MAX_COLUMNS),
    }
}

fn font(size: f64) -> FontDesc<'static> {
    (FAMILY, size).into_font()
}

fn text_style(size: f64, colour: RGBColor, h: HPos, v: VPos) -> TextStyle<'static> {
    font(size).color(&colour).pos(Pos::new(h, v))
}

/// Rendered width of `text`, in pixels.
fn text_width(text: &str, size: f64) -> Result<u32, ChartError> {
    font(size)
        .box_size(text)
        .map(|(w, _)| w)
        .map_err(|e| ChartError::Draw(format!("measuring text {text:?}: {e}")))
}

const SWATCH: u32 = 16;
const SWATCH_GAP: u32 = 8;
const ITEM_GAP: u32 = 32;

/// Splits the legend entries into centred rows that fit `width`; each row holds
/// (first entry index, entry count, row width).
fn legend_layout(series: &[String], width: u32) -> Result<Vec<(usize, usize, u32)>, ChartError> {
    let mut rows = Vec::new();
    let (mut start, mut row_width) = (0, 0);
    for (i, label) in series.iter().enumerate() {
        let item = SWATCH + SWATCH_GAP + text_width(label, LEGEND_SIZE)?;
        let needed = if i == start {
            item
        } else {
            row_width + ITEM_GAP + item
        };
        if needed > width && i > start {
            rows.push((start, i - start, row_width));
            start = i;
            row_width = item;
        } else {
            row_width = needed;
        }
    }
    if start < series.len() {
        rows.push((start, series.len() - start, row_width));
    }
    Ok(rows)
}

fn draw_header(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    legend_rows: &[(usize, usize, u32)],
    series: &[String],
) -> Result<(), ChartError> {
    let (width, _) = area.dim_in_pixel();
    let centre = (width / 2) as i32;
    area.draw(&Text::new(
        title.to_string(),
        (centre, (OUTER_MARGIN + TITLE_HEIGHT / 2) as i32),
        text_style(TITLE_SIZE, TEXT, HPos::Center, VPos::Center),
    ))
    .map_err(draw_err("title"))?;

    let label_style = text_style(LEGEND_SIZE, TEXT, HPos::Left, VPos::Center);
    for (row, &(start, count, row_width)) in legend_rows.iter().enumerate() {
        let y =
            (OUTER_MARGIN + TITLE_HEIGHT + LEGEND_ROW_HEIGHT * row as u32 + LEGEND_ROW_HEIGHT / 2)
                as i32;
        let mut x = centre - (row_width / 2) as i32;
        for label in &series[start..start + count] {
            let half = (SWATCH / 2) as i32;
            area.draw(&Rectangle::new(
                [(x, y - half), (x + SWATCH as i32, y + half)],
                colour_for(series, label).filled(),
            ))
            .map_err(draw_err("legend swatch"))?;
            x += (SWATCH + SWATCH_GAP) as i32;
            area.draw(&Text::new(label.clone(), (x, y), label_style.clone()))
                .map_err(draw_err("legend label"))?;
            x += (text_width(label, LEGEND_SIZE)? + ITEM_GAP) as i32;
        }
    }
    Ok(())
}

const MIN_Y_LABEL_AREA: u32 = 64;
/// Rotated unit text, tick marks and the gaps between them, left of the tick labels.
const Y_DESC_ROOM: u32 = 46;
const CHART_MARGIN: u32 = 12;
const LABEL_LINE_HEIGHT: u32 = 17;
const MAX_LABEL_LINES: usize = 3;
/// Fraction of a slot a bar occupies; the rest separates neighbouring bars.
const BAR_FILL: f64 = 0.7;
const MAX_BAR_WIDTH: f64 = 160.0;

fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    panel: &Panel,
    colour_of: &dyn Fn(&str) -> RGBColor,
) -> Result<(), ChartError> {
    area.fill(&PANEL_BACKGROUND)
        .map_err(draw_err("panel background"))?;
    let (width, height) = area.dim_in_pixel();
    area.draw(&Rectangle::new(
        [(0, 0), (width as i32 - 1, height as i32 - 1)],
        PANEL_BORDER.stroke_width(1),
    ))
    .map_err(draw_err("panel border"))?;

    let finite: Vec<f64> = panel
        .bars
        .iter()
        .map(|b| b.1)
        .filter(|v| v.is_finite())
        .collect();
    if finite.is_empty() {
        area.draw(&Text::new(
            panel.title.clone(),
            ((width / 2) as i32, (CHART_MARGIN + 14) as i32),
            text_style(PANEL_TITLE_SIZE, TEXT, HPos::Center, VPos::Center),
        ))
        .map_err(draw_err("title"))?;
        return draw_centered(area, "no data", MUTED_TEXT, PANEL_TITLE_SIZE);
    }

    // The y axis starts at 0 (bars compare magnitudes); it only dips below for negative values.
    let max = finite.iter().copied().fold(0.0, f64::max);
    let min = finite.iter().copied().fold(0.0, f64::min);
    let span = if max - min > 0.0 { max - min } else { 1.0 };
    // Headroom so the value printed above the tallest bar stays inside the plot.
    let top = if max > 0.0 || min == 0.0 {
        max + span * 0.14
    } else {
        0.0
    };
    let bottom = if min < 0.0 { min - span * 0.14 } else { 0.0 };

    // Room for the widest tick label (no tick exceeds the axis ends) plus the rotated unit.
    let widest_tick = text_width(&format_value(top), LABEL_SIZE)?
        .max(text_width(&format_value(bottom), LABEL_SIZE)?);
    let y_label_area = (widest_tick + Y_DESC_ROOM).max(MIN_Y_LABEL_AREA);

    // Wrap series names to their slot so long names never run into the neighbours'.
    let n = panel.bars.len();
    let plot_width = width.saturating_sub(y_label_area + 2 * CHART_MARGIN);
    let slot = plot_width / n as u32;
    let labels: Vec<Vec<String>> = panel
        .bars
        .iter()
        .map(|(label, _)| wrap(label, slot.saturating_sub(6), LABEL_SIZE))
        .collect::<Result<_, _>>()?;
    let label_lines = labels.iter().map(Vec::len).max().unwrap_or(1) as u32;

    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, font(PANEL_TITLE_SIZE).color(&TEXT))
        .margin(CHART_MARGIN)
        .x_label_area_size(10 + LABEL_LINE_HEIGHT * label_lines)
        .y_label_area_size(y_label_area)
        .build_cartesian_2d(0f64..n as f64, bottom..top)
        .map_err(draw_err("axes"))?;

    let value_label = |v: &f64| format_value(*v);
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(6)
        .y_label_formatter(&value_label)
        .y_desc(panel.unit.as_str())
        .label_style(font(LABEL_SIZE).color(&TEXT))
        .axis_desc_style(font(UNIT_SIZE).color(&TEXT))
        .bold_line_style(GRID_LINE)
        // Only one grid line per labelled tick: the default light sub-grid is busy at this size.
        .max_light_lines(0)
        .axis_style(MUTED_TEXT)
        .draw()
        .map_err(draw_err("axes"))?;

    // Cap the bar width so one or two series in a wide panel don't turn into slabs.
    let half_bar = (BAR_FILL / 2.0).min(MAX_BAR_WIDTH / 2.0 / f64::from(slot.max(1)));
    for (i, (label, value)) in panel.bars.iter().enumerate() {
        let centre = i as f64 + 0.5;
        if !value.is_finite() {
            chart
                .draw_series(std::iter::once(
                    EmptyElement::at((centre, 0.0))
                        + Text::new(
                            "n/a",
                            (0, -4),
                            text_style(VALUE_SIZE, MUTED_TEXT, HPos::Center, VPos::Bottom),
                        ),
                ))
                .map_err(draw_err("missing value"))?;
            continue;
        }
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(centre - half_bar, 0.0), (centre + half_bar, *value)],
                colour_of(label).filled(),
            )))
            .map_err(draw_err("bar"))?;
        // Above a positive bar, below a negative one.
        let (offset, anchor) = if *value >= 0.0 {
            (-4, VPos::Bottom)
        } else {
            (4, VPos::Top)
        };
        chart
            .draw_series(std::iter::once(
                EmptyElement::at((centre, *value))
                    + Text::new(
                        format_value(*value),
                        (0, offset),
                        text_style(VALUE_SIZE, TEXT, HPos::Center, anchor),
                    ),
            ))
            .map_err(draw_err("value label"))?;
    }

    // Series names are drawn by hand below the axis: plotters' tick labels are single-line
    // and would overlap for names like "stagefs gateway" in a third-of-the-image panel.
    let (base_x, base_y) = area.get_base_pixel();
    let label_style = text_style(LABEL_SIZE, TEXT, HPos::Center, VPos::Top);
    for (i, lines) in labels.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64 + 0.5, bottom));
        for (k, line) in lines.iter().enumerate() {
            let pos = (
                x - base_x,
                y - base_y + 7 + (LABEL_LINE_HEIGHT * k as u32) as i32,
            );
            area.draw(&Text::new(line.clone(), pos, label_style.clone()))
                .map_err(draw_err("series label"))?;
        }
    }
    Ok(())
}

fn draw_centered(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    text: &str,
    colour: RGBColor,
    size: f64,
) -> Result<(), ChartError> {
    let (width, height) = area.dim_in_pixel();
    area.draw(&Text::new(
        text.to_string(),
        ((width / 2) as i32, (height / 2) as i32),
        text_style(size, colour, HPos::Center, VPos::Center),
    ))
    .map_err(draw_err("placeholder text"))
}

/// Greedy word wrap to `max_width` pixels, at most [`MAX_LABEL_LINES`] lines; a word too wide
/// for a line, or text beyond the last line, is cut with an ellipsis so that neighbouring
/// labels never overlap (the legend still has the full name).
fn wrap(text: &str, max_width: u32, size: f64) -> Result<Vec<String>, ChartError> {
    let mut lines: Vec<String> = Vec::new();
    let mut overflow = false;
    for word in text.split_whitespace() {
        let full = lines.len() == MAX_LABEL_LINES;
        match lines.last_mut() {
            Some(line) if text_width(&format!("{line} {word}"), size)? <= max_width => {
                line.push(' ');
                line.push_str(word);
            }
            _ if full => {
                overflow = true;
                break;
            }
            _ => lines.push(word.to_string()),
        }
    }
    if lines.is_empty() {
        lines.push(String::new());
    }
    let last = lines.len() - 1;
    for (i, line) in lines.iter_mut().enumerate() {
        let mark_cut = overflow && i == last;
        *line = ellipsize(line, max_width, size, mark_cut)?;
    }
    Ok(lines)
}

/// Shortens `line` with a trailing "…" until it fits `max_width`; `force` adds the "…" even if
/// it already fits (used when later words were dropped).
fn ellipsize(line: &str, max_width: u32, size: f64, force: bool) -> Result<String, ChartError> {
    if !force && text_width(line, size)? <= max_width {
        return Ok(line.to_string());
    }
    let mut chars: Vec<char> = line.chars().collect();
    loop {
        let candidate: String = chars.iter().chain(std::iter::once(&'…')).collect();
        if chars.is_empty() || text_width(&candidate, size)? <= max_width {
            return Ok(candidate);
        }
        chars.pop();
    }
}

/// Three significant digits without trailing zeros, but never fewer than the integer digits:
/// 1234 → "1234", 12.3 → "12.3", 0.42 → "0.42", 2.0 → "2".
fn format_value(value: f64) -> String {
    if !value.is_finite() {
        return "n/a".to_string();
    }
    let magnitude = value.abs();
    // round() first: formatting alone rounds halves to even (1834.5 -> "1834").
    if magnitude >= 100.0 {
        return format!("{:.0}", value.round());
    }
    if magnitude == 0.0 {
        return "0".to_string();
    }
    let decimals = (2 - magnitude.log10().floor() as i32).clamp(0, 6) as usize;
    let scale = 10f64.powi(decimals as i32);
    let text = format!("{:.decimals$}", (value * scale).round() / scale);
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        &text
    };
    if text == "-0" {
        "0".to_string()
    } else {
        text.to_string()
    }
}

fn write_png(path: &Path, rgb: &[u8], width: u32, height: u32) -> Result<(), ChartError> {
    let write_err = |message: String| ChartError::Write {
        path: path.to_path_buf(),
        message,
    };
    let file = File::create(path).map_err(|e| write_err(e.to_string()))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder
        .write_header()
        .map_err(|e| write_err(e.to_string()))?;
    writer
        .write_image_data(rgb)
        .map_err(|e| write_err(e.to_string()))?;
    // finish() flushes the trailing IEND chunk; an error here means a truncated file.
    writer.finish().map_err(|e| write_err(e.to_string()))
}

/// Maps a plotters error to [`ChartError::Draw`], naming what was being drawn.
fn draw_err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> ChartError {
    move |e| ChartError::Draw(format!("{what}: {e}"))
}

/// Prefixes a drawing error with the panel it happened in.
fn in_panel(error: ChartError, panel: &str) -> ChartError {
    match error {
        ChartError::Draw(message) => ChartError::Draw(format!("panel {panel:?}: {message}")),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_panels() -> Vec<Panel> {
        let series = [
            "stagefs gateway",
            "write-through",
            "local disk",
            "raw device",
        ];
        let panel = |title: &str, unit: &str, values: [f64; 4]| Panel {
            title: title.to_string(),
            unit: unit.to_string(),
            bars: series.iter().map(|s| s.to_string()).zip(values).collect(),
        };
        vec![
            panel("checkpoint", "MiB/s", [1834.5, 612.0, 2210.0, 2875.3]),
            panel(
                "small files",
                "files/s",
                [12840.0, 3120.0, 18750.0, 21000.0],
            ),
            panel("restore", "MiB/s", [950.2, 948.7, 1620.0, 2400.0]),
            panel(
                "metadata",
                "ms (p99, lower is better)",
                [0.42, 12.3, 0.18, 0.09],
            ),
            panel("append log", "MiB/s", [88.4, f64::NAN, 120.5, 141.0]),
            Panel {
                title: "compaction".to_string(),
                unit: "MiB/s".to_string(),
                bars: vec![],
            },
        ]
    }

    /// Width and height from the IHDR chunk, which the PNG format puts first.
    fn png_dimensions(bytes: &[u8]) -> (u32, u32) {
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
        (be(&bytes[16..20]), be(&bytes[20..24]))
    }

    /// Renders, or returns None (skipping the test) on a machine without any font.
    fn render(title: &str, panels: &[Panel], path: &Path) -> Option<()> {
        match render_png(title, panels, path) {
            Ok(()) => Some(()),
            Err(e @ ChartError::NoFont { .. }) => {
                eprintln!("skipping: {e}");
                None
            }
            Err(e) => panic!("render failed: {e}"),
        }
    }

    #[test]
    fn renders_six_panels_to_png() {
        let dir = tempfile::tempdir().unwrap();
        // No .png extension on purpose: the encoder must not depend on it.
        let path = dir.path().join("chart");
        let panels = sample_panels();
        if render("stagefs benchmark", &panels, &path).is_none() {
            return;
        }
        let bytes = std::fs::read(&path).unwrap();
        let (width, height) = png_dimensions(&bytes);
        assert_eq!(width, WIDTH);
        let header = OUTER_MARGIN + TITLE_HEIGHT + LEGEND_ROW_HEIGHT + 10;
        assert_eq!(height, header + 2 * PANEL_HEIGHT + OUTER_MARGIN);

        // Decode fully: catches a truncated or corrupt stream, not just a good header.
        let decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (width, height));
        // Something was drawn: not every pixel is background.
        assert!(buf.chunks(3).any(|px| px != [255, 255, 255]));

        // Keep a copy to look at when asked to.
        if let Some(out) = std::env::var_os("CHART_SAMPLE_OUT") {
            std::fs::copy(&path, out).unwrap();
        }
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let nan = |title: &str| Panel {
            title: title.to_string(),
            unit: "MiB/s".to_string(),
            bars: vec![("a".into(), f64::NAN), ("b".into(), f64::INFINITY)],
        };
        let zero = Panel {
            title: "zero".to_string(),
            unit: "x".to_string(),
            bars: vec![("a".into(), 0.0)],
        };
        let negative = Panel {
            title: "negative".to_string(),
            unit: "%".to_string(),
            bars: vec![("a".into(), -3.0), ("b".into(), 5.0), ("".into(), -0.5)],
        };
        for (i, panels) in [vec![], vec![nan("nan")], vec![zero, negative]]
            .iter()
            .enumerate()
        {
            let path = dir.path().join(format!("{i}.png"));
            if render("", panels, &path).is_none() {
                return;
            }
            let (width, _) = png_dimensions(&std::fs::read(&path).unwrap());
            assert_eq!(width, WIDTH);
        }
    }

    #[test]
    fn unwritable_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("chart.png");
        match render_png("t", &sample_panels(), &path) {
            Err(ChartError::Write { path: p, .. }) => assert_eq!(p, path),
            Err(ChartError::NoFont { .. }) => {}
            other => panic!("expected a write error, got {other:?}"),
        }
    }

    #[test]
    fn font_search_reports_every_path_when_none_exists() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_font = dir.path().join("fake.ttf");
        std::fs::write(&not_a_font, b"<html>not found</html>").unwrap();
        let candidates = vec![
            dir.path().join("nope.ttf"),
            not_a_font,
            dir.path().to_path_buf(),
        ];
        match find_font(&candidates) {
            Err(ChartError::NoFont { searched }) => assert_eq!(searched, candidates),
            other => panic!("expected NoFont, got {:?}", other.map(|(p, _)| p)),
        }
        let message = find_font(&candidates).unwrap_err().to_string();
        assert!(
            message.contains(FONT_ENV) && message.contains("nope.ttf"),
            "{message}"
        );
    }

    #[test]
    fn font_search_takes_first_usable_candidate() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake.ttf");
        std::fs::write(&fake, b"\x00\x01\x00\x00rest-of-font").unwrap();
        let candidates = vec![dir.path().join("nope.ttf"), fake.clone()];
        let (path, bytes) = find_font(&candidates).unwrap();
        assert_eq!(path, fake);
        assert!(bytes.starts_with(&[0, 1, 0, 0]));
    }

    #[test]
    fn series_keep_their_colour_across_panels() {
        let panels = sample_panels();
        let series = series_labels(&panels);
        assert_eq!(
            series,
            [
                "stagefs gateway",
                "write-through",
                "local disk",
                "raw device"
            ]
        );
        let panel = |bars: &[&str]| Panel {
            title: String::new(),
            unit: String::new(),
            bars: bars.iter().map(|b| (b.to_string(), 1.0)).collect(),
        };
        // "b" first appears second, so it is colour 1 in both panels.
        let series = series_labels(&[panel(&["a", "b"]), panel(&["b", "c"])]);
        assert_eq!(colour_for(&series, "b"), PALETTE[1]);
        assert_eq!(colour_for(&series, "c"), PALETTE[2]);
    }

    #[test]
    fn values_are_formatted_compactly() {
        let cases = [
            (1234.0, "1234"),
            (12.3, "12.3"),
            (0.42, "0.42"),
            (2.0, "2"),
            (0.0, "0"),
            (99.96, "100"),
            (1834.5, "1835"),
            (12.25, "12.3"),
            (0.0042, "0.0042"),
            (-3.5, "-3.5"),
            (f64::NAN, "n/a"),
        ];
        for (value, expected) in cases {
            assert_eq!(format_value(value), expected, "{value}");
        }
    }

    #[test]
    fn series_labels_fit_their_slot() {
        if ensure_font().is_err() {
            return;
        }
        let lines = wrap("stagefs gateway", 80, LABEL_SIZE).unwrap();
        assert_eq!(lines, ["stagefs", "gateway"]);
        let lines = wrap("a b c d e f supercalifragilistic", 30, LABEL_SIZE).unwrap();
        assert_eq!(lines.len(), MAX_LABEL_LINES);
        for line in &lines {
            assert!(text_width(line, LABEL_SIZE).unwrap() <= 30, "{line:?}");
        }
        assert!(lines.last().unwrap().ends_with('…'), "{lines:?}");
        assert_eq!(wrap("", 30, LABEL_SIZE).unwrap(), [""]);
    }

    #[test]
    fn grid_uses_at_most_three_columns() {
        assert_eq!(
            (1..=7).map(grid_columns).collect::<Vec<_>>(),
            [1, 2, 3, 2, 3, 3, 3]
        );
    }
}
