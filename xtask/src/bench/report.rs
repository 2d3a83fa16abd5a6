//! The bench's Markdown tables.

use std::collections::BTreeSet;
use std::fmt::Write;

use super::modes::{Mode, ServerResult, WakeStats};
use super::stats::{Samples, format_bytes, format_us};

/// The latency table: one row per server and mode.
pub fn latency_table(results: &[ServerResult]) -> String {
    let mut out = String::new();
    out.push_str(
        "| server | mode | median | p99 | runs | ÷ warm | fresh ÷ this | note |\n\
         |---|---|---:|---:|---:|---:|---:|---|\n",
    );
    for result in results {
        let median_of = |mode: Mode| {
            result
                .modes
                .iter()
                .find(|m| m.mode == mode)
                .and_then(|m| m.ttfb.median())
        };
        let warm = median_of(Mode::Warm);
        let fresh = median_of(Mode::Fresh);
        for row in &result.modes {
            let median = row.ttfb.median();
            let versus_warm = ratio(median, warm).filter(|_| row.mode != Mode::Warm);
            let fresh_over = matches!(
                row.mode,
                Mode::PersistLazy | Mode::PersistPrefetch | Mode::PersistCold
            )
            .then(|| ratio(fresh, median))
            .flatten();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                result.server,
                row.mode.label(),
                median.map_or("—".into(), format_us),
                row.ttfb.percentile(0.99).map_or("—".into(), format_us),
                row.ttfb.len(),
                versus_warm.map_or("—".into(), |r| format!("{r:.1}×")),
                fresh_over.map_or("—".into(), |r| format!("{r:.1}×")),
                row.note
                    .as_deref()
                    .unwrap_or("")
                    .replace('|', "\\|")
                    .replace('\n', " "),
            );
        }
    }
    out
}

/// The cost table: what parking a server takes and what a wake does.
pub fn cost_table(results: &[ServerResult]) -> String {
    let parked: Vec<(&ServerResult, Mode, &WakeStats)> = results
        .iter()
        .flat_map(|r| {
            [
                (Mode::PersistLazy, &r.lazy),
                (Mode::PersistPrefetch, &r.prefetch),
                (Mode::PersistCold, &r.cold),
            ]
            .into_iter()
            .filter_map(move |(mode, stats)| stats.as_ref().map(|stats| (r, mode, stats)))
        })
        .collect();
    // Whatever counters the agent's status exposes, under its own names.
    let counters: BTreeSet<&str> = parked
        .iter()
        .flat_map(|(_, _, stats)| stats.counters.keys().map(String::as_str))
        .collect();
    let mut out = String::new();
    out.push_str(
        "| server | mode | add (start + checkpoint) | image on disk | running RSS | running PSS (all processes) | parked cost (skeletons, keeper; agent apart) | parked ÷ running PSS | resume (critical path) | SYN → running |",
    );
    for counter in &counters {
        let _ = write!(out, " {} |", counter_label(counter));
    }
    out.push_str("\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    out.push_str(&"---:|".repeat(counters.len()));
    out.push('\n');
    for (result, mode, stats) in parked {
        let parked_rss = stats.parked_cost_bytes.median().map(|b| b as u64);
        // Against PSS, not the root's RSS: a tree's memory is in all its
        // processes, and what they share is counted once.
        let share = match (parked_rss, result.running_pss_bytes) {
            (Some(parked), Some(running)) if running > 0 => {
                format!("{:.1} %", parked as f64 * 100.0 / running as f64)
            }
            _ => "—".into(),
        };
        let _ = write!(
            out,
            "| {} | {} | {:.0} ms | {} | {} | {} | {} | {} | {} | {} |",
            result.server,
            mode.label(),
            stats.add_ms,
            format_bytes(stats.image_bytes),
            result.running_rss_bytes.map_or("—".into(), format_bytes),
            result.running_pss_bytes.map_or("—".into(), format_bytes),
            parked_rss.map_or("—".into(), format_bytes),
            share,
            median_us(&stats.resume_us),
            median_us(&stats.wake_us),
        );
        for counter in &counters {
            let value = stats.counters.get(*counter).and_then(Samples::median);
            let _ = write!(
                out,
                " {} |",
                value.map_or("—".into(), |v| format!("{v:.0}"))
            );
        }
        out.push('\n');
    }
    out
}

fn counter_label(key: &str) -> String {
    match key {
        "last_faults" => "faults / wake".into(),
        "last_fault_pages" => "pages faulted in / wake".into(),
        "last_filled_pages" => "pages filled in background / wake".into(),
        "last_prefetch_pages" => "pages prefetched / wake".into(),
        other => format!("{} / wake", other.trim_start_matches("last_")),
    }
}

fn median_us(samples: &Samples) -> String {
    samples.median().map_or("—".into(), format_us)
}

fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> Option<f64> {
    match (numerator, denominator) {
        (Some(n), Some(d)) if d > 0.0 => Some(n / d),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::modes::ModeResult;
    use crate::bench::servers::Kind;

    fn samples(values: &[f64]) -> Samples {
        let mut samples = Samples::default();
        for value in values {
            samples.push_value(*value);
        }
        samples
    }

    fn row(mode: Mode, values: &[f64]) -> ModeResult {
        ModeResult {
            mode,
            ttfb: samples(values),
            note: None,
        }
    }

    fn result() -> ServerResult {
        ServerResult {
            server: "srv".into(),
            kind: Kind::Hello,
            running_rss_bytes: Some(5 << 20),
            running_pss_bytes: Some(4 << 20),
            modes: vec![
                row(Mode::Warm, &[100.0, 100.0, 100.0]),
                row(Mode::PersistLazy, &[1000.0, 1000.0, 5000.0]),
                row(Mode::Fresh, &[10_000.0, 10_000.0, 10_000.0]),
                ModeResult::noted(Mode::Criu, "skipped: criu not installed"),
            ],
            lazy: Some(WakeStats {
                add_ms: 50.0,
                image_bytes: 2 << 20,
                parked_cost_bytes: samples(&[1024.0 * 1024.0]),
                resume_us: samples(&[20.0]),
                wake_us: samples(&[300.0]),
                counters: [("last_faults".to_owned(), samples(&[3.0]))].into(),
                ..WakeStats::default()
            }),
            prefetch: None,
            cold: None,
        }
    }

    #[test]
    fn latency_rows_carry_ratios_to_warm_and_fresh() {
        let table = latency_table(&[result()]);
        assert!(
            table.contains("| srv | persist lazy | 1.00 ms | 5.00 ms | 3 | 10.0× | 10.0× |  |"),
            "{table}"
        );
        assert!(
            table.contains("| srv | fresh on demand | 10.00 ms | 10.00 ms | 3 | 100.0× | — |  |"),
            "{table}"
        );
        assert!(
            table.contains(
                "| srv | CRIU restore | — | — | 0 | — | — | skipped: criu not installed |"
            ),
            "{table}"
        );
    }

    #[test]
    fn cost_rows_show_parked_share_and_status_counters() {
        let table = cost_table(&[result()]);
        assert!(table.contains("| faults / wake |"), "{table}");
        assert!(
            table.contains(
                "| srv | persist lazy | 50 ms | 2.0 MiB | 5.0 MiB | 4.0 MiB | 1.0 MiB | 25.0 % | 20 µs | 300 µs | 3 |"
            ),
            "{table}"
        );
    }
}
