//! `cargo xtask bench`: how long the first request to a server takes when the
//! server is running, parked by persist, started on demand, or frozen, for
//! several real servers, in one run, on this machine, in a network namespace
//! of its own.
//!
//! Every number is the time from the start of the client's connect() to the
//! first byte of the answer (for the fresh starts the bench does itself: from
//! the server's start). Timings on a small VM are noisy: compare the ratios
//! between rows of one run, not absolute numbers across runs.

mod client;
mod interrupt;
mod modes;
mod plot;
mod procs;
mod progress;
mod report;
mod scale;
mod servers;
mod stats;
mod unregistered;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use persist_tests::{Sandbox, binary};
use serde::Serialize;

use crate::{deps, privilege};
use modes::{Bench, ServerResult};
use progress::Progress;
use servers::Server;
use stats::format_us;

pub use scale::Options as ScaleOptions;

/// Timed runs per mode by default: the full bench stays under five minutes
/// on a 2-vCPU VM, `--quick` near one.
const RUNS: usize = 150;
const QUICK_RUNS: usize = 40;

/// Everything one bench run measured, as written to `latency.json`.
#[derive(Debug, Serialize)]
struct BenchRun {
    /// When it ran (UTC).
    date: String,
    /// The machine: kernel and CPUs.
    machine: String,
    /// The source measured: commit, and whether the tree had changes.
    source: String,
    /// Timed runs per mode.
    runs: usize,
    /// Whether `--quick` was given.
    quick: bool,
    /// Wall time of the whole run, in seconds.
    elapsed_s: f64,
    /// The results, per server.
    servers: Vec<ServerResult>,
}

/// Runs the bench: progress on stderr, Markdown on stdout, raw samples and
/// the plot under `target/bench/`.
pub fn run(
    quick: bool,
    runs: Option<usize>,
    update_docs: bool,
    scale: Option<ScaleOptions>,
    only: Option<&str>,
) -> Result<()> {
    if privilege::rerun_as_root(|| {
        deps::ensure(deps::TEST)?;
        deps::build_binaries("release")
    })? {
        return Ok(());
    }
    interrupt::install()?;
    deps::ensure(deps::TEST)?;
    deps::build_binaries("release")?;
    if let Some(options) = scale {
        return run_scale(options);
    }
    let source = source();
    let runs = runs.unwrap_or(if quick { QUICK_RUNS } else { RUNS }).max(1);
    let started = Instant::now();
    let date = utc_now()?;

    let prefetch = add_takes("--prefetch")?;
    let cold = add_takes("--keep-skeleton")?;
    let criu = deps::find_in_path("criu");
    let scratch = tempfile::Builder::new()
        .prefix("persist-bench-")
        .tempdir()?;
    let mut servers = Server::all(scratch.path())?;
    if let Some(only) = only {
        servers.retain(|server| server.service.starts_with(only));
        if servers.is_empty() {
            anyhow::bail!("no server of the bench has a service name starting with {only:?}");
        }
    }
    let sandbox = Sandbox::with_daemon()?;
    let bench = Bench {
        sandbox: &sandbox,
        runs,
        prefetch,
        cold,
        criu,
        scratch: scratch.path(),
    };
    eprintln!(
        "bench: {runs} runs per mode, {} servers, in network namespace {}",
        servers.len(),
        sandbox.netns.name()
    );

    let progress = Progress::new(runs)?;
    let mut results = Vec::new();
    for server in &servers {
        let bar = |mode: &str| progress.bar(&format!("{}: {mode}", server.label));
        interrupt::check()?;
        let result = bench.server(server, &bar);
        interrupt::check()?;
        for row in &result.modes {
            let summary = match (row.ttfb.median(), &row.note) {
                (Some(median), _) => format!(
                    "median {}, p99 {}",
                    format_us(median),
                    format_us(row.ttfb.percentile(0.99).unwrap_or(median))
                ),
                (None, Some(note)) => note.clone(),
                (None, None) => "no samples".into(),
            };
            progress.line(&format!(
                "bench: {}: {}: {summary}",
                server.label,
                row.mode.label()
            ));
        }
        results.push(result);
    }
    // Its wake timings say where a slow wake's time went.
    let daemon_log = sandbox.daemon_log();
    drop(sandbox);

    let run = BenchRun {
        date,
        machine: machine()?,
        source,
        runs,
        quick,
        elapsed_s: started.elapsed().as_secs_f64(),
        servers: results,
    };
    let out_dir = bench_dir();
    std::fs::create_dir_all(&out_dir)?;
    let json = out_dir.join("latency.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&run)?)?;
    std::fs::write(out_dir.join("daemon.log"), daemon_log)?;
    let svg = out_dir.join("latency.svg");
    let title = format!(
        "persist bench {}: connect() to first byte, cumulative over {} runs per mode",
        run.date, run.runs
    );
    plot::latency_svg(&run.servers, &title, &svg)?;
    eprintln!(
        "bench: done in {:.0} s; raw samples in {}, plot in {}, tables in latency.md and the \
         daemon's log in daemon.log beside them",
        run.elapsed_s,
        json.display(),
        svg.display()
    );
    if update_docs {
        // The README shows this plot: replaced only when asked, so a bench
        // run never leaves the tracked file changed by accident.
        let docs = deps::workspace_root().join("docs");
        std::fs::create_dir_all(&docs)?;
        std::fs::copy(&svg, docs.join("bench-latency.svg"))?;
        eprintln!("bench: copied the plot to docs/bench-latency.svg");
    }

    let markdown = format!(
        "persist bench, {}, {}, {}, {} runs per mode{}; time from connect() to the first byte\n\n{}\n\
         What parking costs and what a wake does (medians over the runs)\n\n{}",
        run.date,
        run.machine,
        run.source,
        run.runs,
        if quick { " (--quick)" } else { "" },
        report::latency_table(&run.servers),
        report::cost_table(&run.servers),
    );
    std::fs::write(out_dir.join("latency.md"), &markdown)?;
    print!("{markdown}");
    Ok(())
}

/// The `--scale` bench: N parked services, what they cost in each tier,
/// how fast they wake.
fn run_scale(options: ScaleOptions) -> Result<()> {
    let date = utc_now()?;
    let machine = machine()?;
    let source = source();
    let services = options.services;
    eprintln!(
        "bench --scale {services}: adding {services} services ({} of them python3 http.server)",
        options.python
    );
    let run = scale::run(options)?;
    let out_dir = bench_dir();
    std::fs::create_dir_all(&out_dir)?;
    let mut name = format!("scale-{services}");
    if options.python > 0 {
        name.push_str(&format!("-python{}", options.python));
    }
    if options.share_pages {
        name.push_str("-shared");
    }
    std::fs::write(
        out_dir.join(format!("{name}.json")),
        serde_json::to_vec_pretty(&run)?,
    )?;
    print!(
        "persist bench --scale {services}, {date}, {machine}, {source}\n\n{}",
        scale::markdown(&run)
    );
    Ok(())
}

/// `target/bench` of the target directory in use (`CARGO_TARGET_DIR` is respected).
fn bench_dir() -> PathBuf {
    let release = deps::profile_dir("release");
    release
        .parent()
        .map_or_else(|| release.join("bench"), |target| target.join("bench"))
}

/// Whether this build of the agent offers `add OPTION`.
fn add_takes(option: &str) -> Result<bool> {
    let output = Command::new(binary("persist-agent"))
        .args(["add", "--help"])
        .output()
        .context("running persist-agent add --help")?;
    Ok(String::from_utf8_lossy(&output.stdout).contains(option))
}

/// Kernel release and online CPUs.
fn machine() -> Result<String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?;
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    Ok(format!(
        "Linux {} {}, {cpus} CPUs",
        release.trim(),
        std::env::consts::ARCH
    ))
}

/// The commit built, marked when tracked files had changes (the bench
/// builds the working tree as it is).
fn source() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(deps::workspace_root())
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let Some(commit) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "not a git checkout".into();
    };
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|changes| !changes.is_empty());
    if dirty {
        format!("commit {commit} with uncommitted changes")
    } else {
        format!("commit {commit}")
    }
}

fn utc_now() -> Result<String> {
    let output = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .context("running date")?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}
