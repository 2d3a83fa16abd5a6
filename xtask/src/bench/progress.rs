//! Progress on stderr: bars on a terminal, plain lines otherwise (indicatif
//! draws nothing when stderr is not a terminal).

use anyhow::{Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// The bench's progress display.
pub struct Progress {
    bars: MultiProgress,
    style: ProgressStyle,
    runs: u64,
}

impl Progress {
    /// A display for steps of `runs` runs each.
    pub fn new(runs: usize) -> Result<Self> {
        let style = ProgressStyle::with_template("{prefix:>48} [{bar:30}] {pos}/{len} {elapsed}")
            .context("progress bar template")?
            .progress_chars("=> ");
        Ok(Self {
            bars: MultiProgress::new(),
            style,
            runs: runs as u64,
        })
    }

    /// A bar for one step (`label`), shown until it is finished.
    pub fn bar(&self, label: &str) -> ProgressBar {
        let bar = self.bars.add(
            ProgressBar::new(self.runs)
                .with_style(self.style.clone())
                .with_prefix(label.to_owned()),
        );
        if bar.is_hidden() {
            eprintln!("bench: {label}: {} runs", self.runs);
        }
        bar
    }

    /// A line above the bars.
    pub fn line(&self, text: &str) {
        if self.bars.is_hidden() || self.bars.println(text).is_err() {
            eprintln!("{text}");
        }
    }
}
