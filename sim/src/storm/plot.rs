//! An SVG picture of storm runs: the boot-time CDF of each run on one set of axes, and beside
//! it each run's bytes by source (servers, nodes of the same rack, nodes of other racks,
//! duplicates). Written by hand: two panels of lines and bars need no plotting library, and
//! the file is plain text that diffs and opens in any browser.

use std::fmt::Write as _;

use super::report::StormReport;

/// Points per CDF curve at most: enough for a smooth line, few enough for 100k nodes.
const CURVE_POINTS_MAX: usize = 400;
const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 420.0;
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
const SOURCE_COLOURS: [&str; 4] = ["#bf8700", "#1a7f37", "#0969da", "#8c959f"];

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

/// The picture of `runs`, each with its label (for example "swarm" and "central").
pub fn storm_svg(title: &str, runs: &[(&str, &StormReport)]) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/><text x="{CDF_LEFT}" y="24" font-size="15" font-weight="bold">{}</text>"#,
        escape(title)
    );
    cdf_panel(&mut svg, runs);
    bytes_panel(&mut svg, runs);
    svg.push_str("</svg>\n");
    svg
}

fn cdf_panel(svg: &mut String, runs: &[(&str, &StormReport)]) {
    let slowest = runs
        .iter()
        .flat_map(|(_, report)| report.figures.boot_seconds.iter().copied())
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
    for (number, (label, report)) in runs.iter().enumerate() {
        let colour = RUN_COLOURS[number % RUN_COLOURS.len()];
        let mut path = String::new();
        let mut previous_fraction = 0.0;
        for (index, (seconds, fraction)) in cdf_points(&report.figures.boot_seconds)
            .into_iter()
            .enumerate()
        {
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
        let [p50, p99, max] = report.boot_percentiles;
        // The legend sits between the title and the panel, one run per row.
        let legend_y = 40.0 + 13.0 * number as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{CDF_LEFT}" y="{}" width="14" height="4" fill="{colour}"/><text x="{}" y="{legend_y}">{}: p50 {p50:.2} s, p99 {p99:.2} s, max {max:.2} s</text>"#,
            legend_y - 4.0,
            CDF_LEFT + 20.0,
            escape(label)
        );
    }
}

fn bytes_panel(svg: &mut String, runs: &[(&str, &StormReport)]) {
    let sources = |report: &StormReport| -> [f64; 4] {
        let figures = &report.figures;
        let from_nodes_across = figures.bytes_across_racks_from_nodes as f64;
        let from_nodes = figures.bytes_from_nodes as f64;
        [
            figures.bytes_from_servers as f64,
            (from_nodes - from_nodes_across).max(0.0),
            from_nodes_across.min(from_nodes),
            figures.bytes_duplicate as f64,
        ]
    };
    let largest = runs
        .iter()
        .map(|(_, report)| sources(report).iter().sum::<f64>())
        .fold(0.0, f64::max);
    let gib = 1024.0 * 1024.0 * 1024.0;
    let y_end = nice_ceiling(largest / gib);
    let y_of = |bytes: f64| BOTTOM - (BOTTOM - TOP) * (bytes / gib / y_end).min(1.0);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">image bytes by source (GiB)</text>"#,
        (BARS_LEFT + BARS_RIGHT) / 2.0,
        TOP - 12.0
    );
    for tick in 0..=5 {
        let value = y_end * f64::from(tick) / 5.0;
        let y = y_of(value * gib);
        let _ = writeln!(
            svg,
            r##"<line x1="{BARS_LEFT}" y1="{y}" x2="{BARS_RIGHT}" y2="{y}" stroke="#d0d7de"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            BARS_LEFT - 6.0,
            y + 4.0,
            trim_number(value)
        );
    }
    let slot = (BARS_RIGHT - BARS_LEFT) / runs.len().max(1) as f64;
    for (number, (label, report)) in runs.iter().enumerate() {
        let x = BARS_LEFT + slot * number as f64 + slot * 0.2;
        let width = slot * 0.6;
        let mut stacked = 0.0;
        for (source, bytes) in sources(report).into_iter().enumerate() {
            let (top, bottom) = (y_of(stacked + bytes), y_of(stacked));
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{top:.1}" width="{width:.1}" height="{:.1}" fill="{}"/>"#,
                (bottom - top).max(0.0),
                SOURCE_COLOURS[source]
            );
            stacked += bytes;
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            x + width / 2.0,
            BOTTOM + 16.0,
            escape(label)
        );
    }
    let names = [
        "from servers",
        "from nodes, same rack",
        "from nodes, other racks",
        "duplicates",
    ];
    for (source, name) in names.iter().enumerate() {
        let y = BOTTOM + 34.0 + 14.0 * (source / 2) as f64;
        let x = BARS_LEFT - 60.0 + 165.0 * (source % 2) as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{y}">{name}</text>"#,
            y - 9.0,
            SOURCE_COLOURS[source],
            x + 14.0
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
}
