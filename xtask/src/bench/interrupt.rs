//! Ctrl-C and SIGTERM end the bench between two runs, so that the guards of
//! the processes it started still kill them (the servers run in process
//! groups of their own, out of reach of the terminal's signals).

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Turns SIGINT and SIGTERM into a flag the bench's loops check.
pub fn install() -> Result<()> {
    ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            // A second Ctrl-C: the user does not want to wait for cleanup.
            std::process::exit(130);
        }
        eprintln!("bench: interrupted; stopping what it started");
    })
    .context("installing the Ctrl-C handler")
}

/// Fails once the bench was asked to stop.
pub fn check() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}
