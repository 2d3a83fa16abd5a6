//! Checkpointing a process to an image and restoring it, with the engine
//! alone (build with `--no-default-features`: no daemon, no BPF).
//!
//! A small Python counter writes one number a line to a file. It is
//! checkpointed (and so stopped), then restored from its image: the restored
//! process goes on counting where it stopped, its memory paged in lazily
//! from the image by a pager thread of ours. Run as root:
//!
//!     cargo run -p persist-agent --no-default-features --example checkpoint_and_restore

use std::fs::File;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use persist_agent::checkpoint::{CheckpointOptions, checkpoint};
use persist_agent::restore::{RestoreConfig, Skeleton};
use persist_common::image::Image;

const COUNTER: &str = "
import time
count = 0
while True:
    count += 1
    print(count, flush=True)
    time.sleep(0.05)
";

fn main() -> Result<()> {
    let work = tempfile::tempdir()?;
    let output = work.path().join("count.txt");
    let image_dir = work.path().join("image");

    let mut counter = Command::new("python3")
        .args(["-c", COUNTER])
        .stdin(Stdio::null())
        .stdout(File::create(&output)?)
        .stderr(Stdio::null())
        .spawn()
        .context("starting python3")?;
    // A loaded machine can take a while to start python.
    wait_for_count(&output, |_| true)?;

    // Checkpoint: the process is frozen, saved and killed.
    let summary = checkpoint(&CheckpointOptions {
        pid: counter.id() as i32,
        image: image_dir.clone(),
        leave_running: false,
        exclude_fds: Vec::new(),
        base: None,
        base_is_sibling: false,
        agent_files: Vec::new(),
        recovery_file: None,
        client_ports: Vec::new(),
        tree: false,
    })?;
    counter.wait()?;
    let last_before = last_count(&output)?;
    println!(
        "checkpointed pid {} at count {last_before}: {} threads, {} mappings, {} pages",
        summary.pid, summary.threads, summary.mappings, summary.pages
    );

    // Restore: the skeleton is built stopped, then resumed; its pages come
    // in from the image as it touches them.
    let image = Arc::new(Image::open(&image_dir)?);
    let skeleton = Skeleton::prepare(image, RestoreConfig::default())?;
    let restored = skeleton.resume()?;
    let pid = restored.pid;
    let mut pager = restored.pager;
    let pager = std::thread::spawn(move || pager.run_until_filled());
    let last_after = wait_for_count(&output, |count| count > last_before).unwrap_or(last_before);
    println!("restored as pid {pid}: counted on to {last_after}");

    // The restored process (or the init of its pid namespace) is our child.
    let child = restored.init_pid.unwrap_or(pid);
    kill(Pid::from_raw(child), Signal::SIGKILL)?;
    waitpid(Pid::from_raw(child), None)?;
    let stats = pager.join().expect("the pager thread does not panic")?;
    println!(
        "pager: {} faults, {} pages filled in the background",
        stats.faults, stats.filled_pages
    );
    if last_after <= last_before {
        bail!("the restored counter did not go on from {last_before}");
    }
    Ok(())
}

/// Waits up to 10 s for the counter to write a number that `wanted`
/// accepts, and returns it.
fn wait_for_count(path: &std::path::Path, wanted: impl Fn(u64) -> bool) -> Result<u64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match last_count(path) {
            Ok(count) if wanted(count) => return Ok(count),
            result if std::time::Instant::now() >= deadline => return result,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The last number the counter wrote.
fn last_count(path: &std::path::Path) -> Result<u64> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .last()
        .and_then(|line| line.parse().ok())
        .with_context(|| format!("no count in {}", path.display()))
}
