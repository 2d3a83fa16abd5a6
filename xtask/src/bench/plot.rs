//! The latency distributions as an SVG: one panel per server, one cumulative
//! distribution curve per mode, on a log-scale time axis.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::modes::{Mode, ServerResult};

/// Draws the panels of every server with samples into `path`.
pub fn latency_svg(results: &[ServerResult], title: &str, path: &Path) -> Result<()> {
    let panels: Vec<&ServerResult> = results
        .iter()
        .filter(|r| r.modes.iter().any(|m| !m.ttfb.is_empty()))
        .collect();
    let all = panels
        .iter()
        .flat_map(|r| r.modes.iter())
        .flat_map(|m| m.ttfb.us.iter().copied());
    let (low, high) = all.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if panels.is_empty() || !low.is_finite() {
        return Err(anyhow!("no samples to plot"));
    }
    let x_range = (low / 1.5).max(1.0)..high * 1.5;
    let columns = 2;
    let rows = panels.len().div_ceil(columns);
    let root = SVGBackend::new(path, (1200, 40 + 420 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(plot_error)?;
    let areas = root.split_evenly((rows, columns));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        let mut chart = ChartBuilder::on(area)
            .caption(panel.server.as_str(), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(x_range.clone().log_scale(), 0.0..1.0)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("connect() → first byte (log scale)")
            .y_desc("fraction of runs")
            .x_label_formatter(&|us| short_us(*us))
            .draw()
            .map_err(plot_error)?;
        for row in panel.modes.iter().filter(|m| !m.ttfb.is_empty()) {
            let sorted = row.ttfb.sorted();
            let count = sorted.len() as f64;
            let points = sorted
                .iter()
                .enumerate()
                .map(|(i, us)| (*us, (i + 1) as f64 / count));
            let color = mode_color(row.mode);
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(plot_error)?
                .label(row.mode.label())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

/// An axis label: 100 µs, 1 ms, 10 ms, 1 s.
fn short_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{} ms", us / 1e3)
    } else {
        format!("{us} µs")
    }
}

fn mode_color(mode: Mode) -> RGBColor {
    match mode {
        Mode::Warm => RGBColor(0x33, 0x33, 0x33),
        Mode::PersistLazy => RGBColor(0x1f, 0x77, 0xb4),
        Mode::PersistPrefetch => RGBColor(0x17, 0xbe, 0xcf),
        Mode::PersistCold => RGBColor(0xff, 0x7f, 0x0e),
        Mode::Fresh => RGBColor(0xd6, 0x27, 0x28),
        Mode::Frozen => RGBColor(0x2c, 0xa0, 0x2c),
        Mode::Criu => RGBColor(0x94, 0x67, 0xbd),
    }
}

fn plot_error(err: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the latency plot: {err}")
}
