//! Samples of one measured quantity and their order statistics.

use std::time::Duration;

use serde::Serialize;

/// Samples in microseconds, in the order they were taken.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Samples {
    /// The samples, in microseconds.
    pub us: Vec<f64>,
}

impl Samples {
    /// Adds a duration.
    pub fn push(&mut self, duration: Duration) {
        self.us.push(duration.as_secs_f64() * 1e6);
    }

    /// Adds a value already in microseconds (or a count).
    pub fn push_value(&mut self, value: f64) {
        self.us.push(value);
    }

    /// How many samples there are.
    pub fn len(&self) -> usize {
        self.us.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.us.is_empty()
    }

    /// The samples, sorted.
    pub fn sorted(&self) -> Vec<f64> {
        let mut sorted = self.us.clone();
        sorted.sort_by(f64::total_cmp);
        sorted
    }

    /// The nearest-rank percentile (`fraction` in 0..=1), `None` without samples.
    pub fn percentile(&self, fraction: f64) -> Option<f64> {
        let sorted = self.sorted();
        if sorted.is_empty() {
            return None;
        }
        let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
        Some(sorted[rank - 1])
    }

    /// The median.
    pub fn median(&self) -> Option<f64> {
        self.percentile(0.5)
    }
}

/// A duration in microseconds, written with a unit that keeps it short.
pub fn format_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.2} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{us:.0} µs")
    }
}

/// A size in bytes, in KiB or MiB.
pub fn format_bytes(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    } else {
        format!("{:.0} KiB", bytes as f64 / 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples = Samples::default();
        for value in [5.0, 1.0, 4.0, 2.0, 3.0] {
            samples.push_value(value);
        }
        assert_eq!(samples.median(), Some(3.0));
        assert_eq!(samples.percentile(0.99), Some(5.0));
        assert_eq!(samples.percentile(0.0), Some(1.0));
        assert_eq!(Samples::default().median(), None);
    }

    #[test]
    fn units_follow_magnitude() {
        assert_eq!(format_us(412.4), "412 µs");
        assert_eq!(format_us(1234.0), "1.23 ms");
        assert_eq!(format_us(2_500_000.0), "2.50 s");
        assert_eq!(format_bytes(2048), "2 KiB");
        assert_eq!(format_bytes(3 << 20), "3.0 MiB");
    }
}
