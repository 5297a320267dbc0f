//! An SVG picture of simulated runs: the boot-time CDF of each run on one set of axes, and
//! beside it each run's image bytes by source (for a storm: servers, nodes of the same rack,
//! nodes of other racks, duplicates; for a chaos run: each server). Written by hand: two
//! panels of lines and bars need no plotting library, and the file is plain text that diffs
//! and opens in any browser.

use std::fmt::Write as _;

/// One run in a picture.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotRun {
    /// Its name in the legend and under its bar ("swarm", "central", "seed 7").
    pub label: String,
    /// Seconds from each node's power-on until it held its image.
    pub boot_seconds: Vec<f64>,
    /// Image bytes by source, in the order of [`BootPlot::sources`].
    pub bytes_by_source: Vec<f64>,
}

/// What [`boot_svg`] draws.
#[derive(Debug, Clone, PartialEq)]
pub struct BootPlot {
    /// The title line.
    pub title: String,
    /// The names of the byte sources, in the order of each run's `bytes_by_source`.
    pub sources: Vec<String>,
    /// The runs, one curve and one bar each.
    pub runs: Vec<PlotRun>,
}

/// Points per CDF curve at most: enough for a smooth line, few enough for 100k nodes.
const CURVE_POINTS_MAX: usize = 400;
const WIDTH: f64 = 960.0;
/// The height with up to four byte sources (two legend rows); each further row adds a line.
const HEIGHT: f64 = 420.0;
const LEGEND_ROW: f64 = 14.0;
/// The CDF panel's plot area.
const CDF_LEFT: f64 = 70.0;
const CDF_RIGHT: f64 = 590.0;
const TOP: f64 = 66.0;
const BOTTOM: f64 = 360.0;
/// The bytes panel's plot area.
const BARS_LEFT: f64 = 680.0;
const BARS_RIGHT: f64 = 930.0;
/// One colour per run (CDF lines), then one per byte source.
const RUN_COLOURS: [&str; 4] = ["#1f6feb", "#d1242f", "#1a7f37", "#8250df"];
const SOURCE_COLOURS: [&str; 6] = [
    "#bf8700", "#1a7f37", "#0969da", "#8c959f", "#8250df", "#cf222e",
];

/// Escapes text for an SVG text node or attribute.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" axis end at or above `value` (1, 2 or 5 times a power of ten).
fn nice_ceiling(value: f64) -> f64 {
    if value <= 0.0 || !value.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|step| step * power)
        .find(|candidate| *candidate >= value)
        .unwrap_or(10.0 * power)
}

/// The CDF of `values` as at most `CURVE_POINTS_MAX` (seconds, fraction) points.
fn cdf_points(values: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let count = sorted.len();
    if count == 0 {
        return Vec::new();
    }
    let step = count.div_ceil(CURVE_POINTS_MAX).max(1);
    let mut points: Vec<(f64, f64)> = (0..count)
        .step_by(step)
        .map(|index| (sorted[index], (index + 1) as f64 / count as f64))
        .collect();
    points.push((sorted[count - 1], 1.0));
    points
}

/// The `fraction` quantile (nearest rank) of sorted `values`.
pub(crate) fn quantile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50, p99 and max of `values`.
pub fn percentiles(values: &[f64]) -> [f64; 3] {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    [
        quantile(&sorted, 0.5),
        quantile(&sorted, 0.99),
        sorted.last().copied().unwrap_or(0.0),
    ]
}

/// The picture of `plot`'s runs.
pub fn boot_svg(plot: &BootPlot) -> String {
    let title = plot.title.as_str();
    let runs = plot.runs.as_slice();
    let legend_rows = plot.sources.len().div_ceil(2).max(2);
    let height = HEIGHT + LEGEND_ROW * (legend_rows - 2) as f64;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{WIDTH}" height="{height}" fill="white"/><text x="{CDF_LEFT}" y="24" font-size="15" font-weight="bold">{}</text>"#,
        escape(title)
    );
    cdf_panel(&mut svg, runs);
    bytes_panel(&mut svg, runs, &plot.sources);
    svg.push_str("</svg>\n");
    svg
}

fn cdf_panel(svg: &mut String, runs: &[PlotRun]) {
    let slowest = runs
        .iter()
        .flat_map(|run| run.boot_seconds.iter().copied())
        .fold(0.0, f64::max);
    let x_end = nice_ceiling(slowest);
    let x_of = |seconds: f64| CDF_LEFT + (CDF_RIGHT - CDF_LEFT) * (seconds / x_end).min(1.0);
    let y_of = |fraction: f64| BOTTOM - (BOTTOM - TOP) * fraction;
    let _ = writeln!(
        svg,
        r##"<rect x="{CDF_LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#57606a"/>"##,
        CDF_RIGHT - CDF_LEFT,
        BOTTOM - TOP
    );
    for tick in 0..=5 {
        let seconds = x_end * f64::from(tick) / 5.0;
        let fraction = f64::from(tick) / 5.0;
        let (x, y) = (x_of(seconds), y_of(fraction));
        let _ = writeln!(
            svg,
            r##"<line x1="{x}" y1="{TOP}" x2="{x}" y2="{BOTTOM}" stroke="#d0d7de"/><text x="{x}" y="{}" text-anchor="middle">{}</text>"##,
            BOTTOM + 16.0,
            trim_number(seconds)
        );
        let _ = writeln!(
            svg,
            r##"<line x1="{CDF_LEFT}" y1="{y}" x2="{CDF_RIGHT}" y2="{y}" stroke="#d0d7de"/><text x="{}" y="{}" text-anchor="end">{:.0} %</text>"##,
            CDF_LEFT - 6.0,
            y + 4.0,
            fraction * 100.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">seconds from power-on until the node holds its image</text>"#,
        (CDF_LEFT + CDF_RIGHT) / 2.0,
        BOTTOM + 36.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">nodes booted</text>"#,
        (TOP + BOTTOM) / 2.0,
        (TOP + BOTTOM) / 2.0
    );
    for (number, run) in runs.iter().enumerate() {
        let colour = RUN_COLOURS[number % RUN_COLOURS.len()];
        let mut path = String::new();
        let mut previous_fraction = 0.0;
        for (index, (seconds, fraction)) in cdf_points(&run.boot_seconds).into_iter().enumerate() {
            let command = if index == 0 { 'M' } else { 'L' };
            // A step curve: the fraction rises at each node's time, it does not slope.
            let _ = write!(
                path,
                "{command}{:.1},{:.1} L{:.1},{:.1} ",
                x_of(seconds),
                y_of(previous_fraction),
                x_of(seconds),
                y_of(fraction)
            );
            previous_fraction = fraction;
        }
        let _ = writeln!(
            svg,
            r#"<path d="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            path.trim_end()
        );
        let [p50, p99, max] = percentiles(&run.boot_seconds);
        // The legend sits between the title and the panel, one run per row.
        let legend_y = 40.0 + 13.0 * number as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{CDF_LEFT}" y="{}" width="14" height="4" fill="{colour}"/><text x="{}" y="{legend_y}">{}: p50 {p50:.2} s, p99 {p99:.2} s, max {max:.2} s</text>"#,
            legend_y - 4.0,
            CDF_LEFT + 20.0,
            escape(&run.label)
        );
    }
}

fn bytes_panel(svg: &mut String, runs: &[PlotRun], sources: &[String]) {
    let largest = runs
        .iter()
        .map(|run| run.bytes_by_source.iter().sum::<f64>())
        .fold(0.0, f64::max);
    let gib = 1024.0 * 1024.0 * 1024.0;
    // Small images (the chaos engine's) are drawn in MiB, fleets in GiB.
    let (unit, unit_name) = if largest >= gib {
        (gib, "GiB")
    } else {
        (1024.0 * 1024.0, "MiB")
    };
    let y_end = nice_ceiling(largest / unit);
    let y_of = |bytes: f64| BOTTOM - (BOTTOM - TOP) * (bytes / unit / y_end).min(1.0);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">image bytes by source ({unit_name})</text>"#,
        (BARS_LEFT + BARS_RIGHT) / 2.0,
        TOP - 12.0
    );
    for tick in 0..=5 {
        let value = y_end * f64::from(tick) / 5.0;
        let y = y_of(value * unit);
        let _ = writeln!(
            svg,
            r##"<line x1="{BARS_LEFT}" y1="{y}" x2="{BARS_RIGHT}" y2="{y}" stroke="#d0d7de"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            BARS_LEFT - 6.0,
            y + 4.0,
            trim_number(value)
        );
    }
    let slot = (BARS_RIGHT - BARS_LEFT) / runs.len().max(1) as f64;
    for (number, run) in runs.iter().enumerate() {
        let x = BARS_LEFT + slot * number as f64 + slot * 0.2;
        let width = slot * 0.6;
        let mut stacked = 0.0;
        for (source, bytes) in run.bytes_by_source.iter().copied().enumerate() {
            let (top, bottom) = (y_of(stacked + bytes), y_of(stacked));
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{top:.1}" width="{width:.1}" height="{:.1}" fill="{}"/>"#,
                (bottom - top).max(0.0),
                SOURCE_COLOURS[source % SOURCE_COLOURS.len()]
            );
            stacked += bytes;
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            x + width / 2.0,
            BOTTOM + 16.0,
            escape(&run.label)
        );
    }
    for (source, name) in sources.iter().enumerate() {
        let y = BOTTOM + 34.0 + LEGEND_ROW * (source / 2) as f64;
        let x = BARS_LEFT - 60.0 + 165.0 * (source % 2) as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{y}">{name}</text>"#,
            y - 9.0,
            SOURCE_COLOURS[source % SOURCE_COLOURS.len()],
            x + 14.0,
            name = escape(name)
        );
    }
}

/// A tick label without needless decimals.
fn trim_number(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_end_on_round_numbers_and_curves_are_bounded() {
        assert!((nice_ceiling(0.07) - 0.1).abs() < 1e-12);
        assert!((nice_ceiling(1.3) - 2.0).abs() < 1e-12);
        assert!((nice_ceiling(7.5) - 10.0).abs() < 1e-12);
        assert!((nice_ceiling(0.0) - 1.0).abs() < 1e-12);
        let values: Vec<f64> = (0..100_000).map(f64::from).collect();
        let points = cdf_points(&values);
        assert!(points.len() <= CURVE_POINTS_MAX + 1);
        assert_eq!(points.last().copied(), Some((99_999.0, 1.0)));
        assert!(points.windows(2).all(|pair| pair[0].1 <= pair[1].1));
        assert_eq!(trim_number(2.50), "2.5");
        assert_eq!(trim_number(10.0), "10");
        assert_eq!(escape("a<b&\"c\""), "a&lt;b&amp;&quot;c&quot;");
    }

    #[test]
    fn every_source_gets_a_bar_segment_and_a_legend_row_inside_the_picture() {
        let sources: Vec<String> = (1..=5).map(|id| format!("from server{id}")).collect();
        let plot = BootPlot {
            title: "five servers <chaos>".to_owned(),
            sources: sources.clone(),
            runs: vec![PlotRun {
                label: "chaos".to_owned(),
                boot_seconds: vec![0.5, 1.0, 4.0],
                bytes_by_source: vec![1.0e6, 2.0e6, 0.0, 3.0e6, 4.0e6],
            }],
        };
        let svg = boot_svg(&plot);
        assert!(svg.contains("five servers &lt;chaos&gt;"));
        assert!(svg.contains("p50 1.00 s, p99 4.00 s, max 4.00 s"));
        assert!(svg.contains("image bytes by source (MiB)"));
        for name in &sources {
            assert!(svg.contains(name.as_str()), "{name}");
        }
        // Three legend rows: the picture grows by one row, and the last row is inside it.
        let height = HEIGHT + LEGEND_ROW;
        assert!(svg.contains(&format!("height=\"{height}\"")));
        assert!(BOTTOM + 34.0 + LEGEND_ROW * 2.0 < height);
        assert_eq!(percentiles(&[]), [0.0, 0.0, 0.0]);
    }
}
