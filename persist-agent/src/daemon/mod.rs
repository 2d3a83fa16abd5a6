//! The agent daemon.

use std::path::Path;

/// Runs the daemon in the foreground until SIGTERM or SIGINT.
pub fn run(state_dir: &Path) -> anyhow::Result<()> {
    let _ = state_dir;
    anyhow::bail!("not yet")
}
