//! A small SVG chart of a sweep across message sizes: ferry's rate and its CPU per
//! message against the payload size, one line per body mode, `concurrency` and endpoint
//! latency. Written by hand (a few dozen SVG elements) so that the harness needs no
//! plotting or font crates.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::sweep::Row;
use crate::BodyMode;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 400.0;
const PANEL: f64 = 380.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const LEFT: f64 = 70.0;
const GAP: f64 = 100.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#7f7f7f",
];

/// One line of the chart: its label and its points (size, value).
type Series = BTreeMap<String, Vec<(usize, f64)>>;

/// The chart of `rows`, titled `title`.
pub fn size_chart(title: &str, rows: &[Row]) -> String {
    let mut rates = Series::new();
    let mut cpu = Series::new();
    for r in rows {
        let label = format!(
            "{}{}, c={}, {} ms",
            r.mode.map_or("envelope", BodyMode::name),
            if r.http2 { " HTTP/2" } else { "" },
            r.case.setting,
            r.case.latency_ms
        );
        rates
            .entry(label.clone())
            .or_default()
            .push((r.case.size, r.ferry));
        // CPU seconds per 100,000 messages → microseconds per message.
        cpu.entry(label)
            .or_default()
            .push((r.case.size, r.cpu_per_100k * 10.0));
    }
    let sizes: Vec<usize> = {
        let mut s: Vec<usize> = rows.iter().map(|r| r.case.size).collect();
        s.sort_unstable();
        s.dedup();
        s
    };
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{h}" viewBox="0 0 {WIDTH} {h}" font-family="sans-serif" font-size="12">"#,
        h = HEIGHT + 20.0 * rates.len() as f64
    );
    let _ = writeln!(
        svg,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    panel(&mut svg, LEFT, "ferry msg/s", &sizes, &rates);
    panel(
        &mut svg,
        LEFT + PANEL + GAP,
        "ferry CPU µs per message",
        &sizes,
        &cpu,
    );
    for (i, label) in rates.keys().enumerate() {
        let y = HEIGHT + 20.0 * i as f64;
        let colour = COLOURS[i % COLOURS.len()];
        let _ = writeln!(
            svg,
            r#"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            LEFT + 24.0,
            LEFT + 30.0,
            y + 4.0,
            escape(label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// One panel at `x0`: axes, ticks and a polyline per series; x is log-scaled by size.
fn panel(svg: &mut String, x0: f64, heading: &str, sizes: &[usize], series: &Series) {
    let plot_h = HEIGHT - TOP - BOTTOM;
    let top = series
        .values()
        .flatten()
        .map(|&(_, v)| v)
        .fold(0.0_f64, f64::max);
    let step = nice_step(top / 4.0);
    let y_max = (top / step).ceil().max(1.0) * step;
    let (lo, hi) = match (sizes.first(), sizes.last()) {
        (Some(&lo), Some(&hi)) => ((lo as f64).log2(), (hi as f64).log2()),
        _ => (0.0, 1.0),
    };
    let span = (hi - lo).max(1.0);
    let x_of = |size: usize| x0 + ((size as f64).log2() - lo) / span * PANEL;
    let y_of = |v: f64| TOP + plot_h - v / y_max * plot_h;
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text><line x1="{x0}" y1="{TOP}" x2="{x0}" y2="{b}" stroke="black"/><line x1="{x0}" y1="{b}" x2="{}" y2="{b}" stroke="black"/>"#,
        x0 + PANEL / 2.0,
        TOP - 8.0,
        escape(heading),
        x0 + PANEL,
        b = TOP + plot_h
    );
    let mut v = 0.0;
    while v <= y_max + step / 2.0 {
        let y = y_of(v);
        let _ = writeln!(
            svg,
            r##"<line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            x0 + PANEL,
            x0 - 6.0,
            y + 4.0,
            short(v)
        );
        v += step;
    }
    for &size in sizes {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            x_of(size),
            TOP + plot_h + 18.0,
            size_label(size)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">payload size</text>"#,
        x0 + PANEL / 2.0,
        TOP + plot_h + 38.0
    );
    for (i, points) in series.values().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|&(s, v)| format!("{:.1},{:.1}", x_of(s), y_of(v)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for &(s, v) in points {
            let _ = writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                x_of(s),
                y_of(v)
            );
        }
    }
}

/// A round tick step (1, 2 or 5 × a power of ten) near `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(raw.log10().floor());
    let m = raw / power;
    let nice = if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * power
}

/// A tick label: 25000 → "25k".
fn short(v: f64) -> String {
    if v >= 1000.0 {
        format!("{}k", v / 1000.0)
    } else {
        format!("{v}")
    }
}

/// 262144 → "256 KiB".
fn size_label(size: usize) -> String {
    if size >= 1 << 20 && size % (1 << 20) == 0 {
        format!("{} MiB", size >> 20)
    } else if size >= 1024 && size % 1024 == 0 {
        format!("{} KiB", size >> 10)
    } else {
        format!("{size} B")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(nice_step(2300.0), 5000.0);
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(0.0), 1.0);
        assert_eq!(size_label(262_144), "256 KiB");
        assert_eq!(size_label(256), "256 B");
        assert_eq!(short(25_000.0), "25k");
    }
}
