//! `cargo xtask bench --scale N`: N parked hello-servers on one host. How
//! long adding them takes, what the agent grows to, what the host really
//! pays per parked service (its MemAvailable drop) against what `status`
//! says each costs, and a wake storm of one request to every service at once.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use persist_tests::{Sandbox, binary};
use serde::Serialize;

use super::client::{Probe, request};
use super::stats::{Samples, format_us};

/// The first port; service `i` listens on `FIRST_PORT + i`.
const FIRST_PORT: u16 = 20000;

/// How long the host is given to settle before and after the adds.
const SETTLE: Duration = Duration::from_secs(2);

/// What one scale run measured, as written to `target/bench/scale.json`.
#[derive(Debug, Serialize)]
pub struct ScaleRun {
    /// Parked services.
    pub services: usize,
    /// Wall time of adding them all, one after the other.
    pub add_s: f64,
    /// The agent's resident memory and threads once all are parked.
    pub agent_rss_bytes: u64,
    /// The agent's threads once all are parked.
    pub agent_threads: u64,
    /// Port keeper processes holding the services' listeners.
    pub keeper_processes: usize,
    /// Their private memory and page tables, together.
    pub keeper_bytes: u64,
    /// Drop of the host's MemAvailable per parked service, agent included.
    pub host_bytes_per_service: u64,
    /// What `status` says each costs (its `parked_bytes`), on average.
    pub status_bytes_per_service: u64,
    /// Of which: private memory, page tables, kernel objects, agent share.
    pub status_breakdown: [u64; 4],
    /// Requests of the wake storm answered.
    pub storm_served: usize,
    /// Connect-to-first-byte of the storm's requests, in microseconds.
    pub storm: Samples,
}

/// Adds `services` hello-servers to a fresh daemon, measures, and wakes
/// them all at once.
pub fn run(services: usize) -> Result<ScaleRun> {
    if services == 0 || services > usize::from(u16::MAX - FIRST_PORT) {
        bail!("--scale takes 1 to {} services", u16::MAX - FIRST_PORT);
    }
    let mut sandbox = Sandbox::new()?;
    sandbox.start_daemon()?;
    std::thread::sleep(SETTLE);
    let available_before = mem_available()?;

    let server = binary("hello-server").display().to_string();
    let started = Instant::now();
    for index in 0..services {
        let port = FIRST_PORT + index as u16;
        let command = [server.clone(), format!("127.0.0.1:{port}")];
        sandbox
            .add_ok(
                &format!("hello-{index}"),
                port,
                &["--ready", "tcp"],
                &command,
            )
            .with_context(|| format!("adding service {index}"))?;
        if (index + 1) % 100 == 0 {
            eprintln!("bench --scale: {} services added", index + 1);
        }
    }
    let add_s = started.elapsed().as_secs_f64();
    std::thread::sleep(SETTLE);
    let available_after = mem_available()?;

    let statuses = sandbox.status()?;
    let parked: Vec<&serde_json::Value> =
        statuses.iter().filter(|s| s["state"] == "parked").collect();
    if parked.len() != services {
        bail!("{} of {services} services parked", parked.len());
    }
    let field =
        |status: &serde_json::Value, name: &str| status["parked_cost"][name].as_u64().unwrap_or(0);
    let average = |name: &str| parked.iter().map(|s| field(s, name)).sum::<u64>() / services as u64;
    let status_bytes_per_service = parked
        .iter()
        .filter_map(|s| s["parked_bytes"].as_u64())
        .sum::<u64>()
        / services as u64;
    let status_breakdown = [
        average("private_bytes"),
        average("page_table_bytes"),
        average("kernel_bytes"),
        average("agent_share_bytes"),
    ];
    let daemon = sandbox.daemon_pid().context("the daemon runs")?;
    let (agent_rss_bytes, agent_threads) = rss_and_threads(daemon)?;
    let (keeper_processes, keeper_bytes) = keepers(&sandbox);

    let (storm_served, storm) = wake_storm(&sandbox, services)?;
    Ok(ScaleRun {
        services,
        add_s,
        agent_rss_bytes,
        agent_threads,
        keeper_processes,
        keeper_bytes,
        host_bytes_per_service: available_before.saturating_sub(available_after) / services as u64,
        status_bytes_per_service,
        status_breakdown,
        storm_served,
        storm,
    })
}

/// One request to every service at once, from as many threads.
fn wake_storm(sandbox: &Sandbox, services: usize) -> Result<(usize, Samples)> {
    let results = sandbox.netns.enter(|| {
        let threads: Vec<_> = (0..services)
            .map(|index| {
                std::thread::spawn(move || request(FIRST_PORT + index as u16, Probe::Http))
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| thread.join().unwrap_or_else(|_| bail!("a client panicked")))
            .collect::<Vec<_>>()
    })?;
    let mut samples = Samples::default();
    for ttfb in results.iter().flatten() {
        samples.push(*ttfb);
    }
    Ok((samples.len(), samples))
}

/// The host's MemAvailable, in bytes.
fn mem_available() -> Result<u64> {
    use procfs::Current;
    let meminfo = procfs::Meminfo::current().context("reading /proc/meminfo")?;
    meminfo
        .mem_available
        .context("/proc/meminfo has no MemAvailable")
}

fn rss_and_threads(pid: i32) -> Result<(u64, u64)> {
    let status = procfs::process::Process::new(pid)
        .and_then(|process| process.status())
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    Ok((status.vmrss.unwrap_or(0) * 1024, status.threads))
}

/// The port keepers in the sandbox (named `persist-port-keeper` on their
/// command line, one per service in earlier agents), and what they cost
/// together: private memory and page tables.
fn keepers(sandbox: &Sandbox) -> (usize, u64) {
    let mut count = 0;
    let mut bytes = 0;
    for pid in sandbox.netns.processes() {
        let is_keeper = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmdline| cmdline.starts_with(b"persist-port-keeper\0"));
        let Ok(status) = procfs::process::Process::new(pid).and_then(|process| process.status())
        else {
            continue;
        };
        if is_keeper {
            count += 1;
            bytes += (status.rssanon.unwrap_or(0)
                + status.rssshmem.unwrap_or(0)
                + status.vmpte.unwrap_or(0))
                * 1024;
        }
    }
    (count, bytes)
}

/// The scale run as Markdown.
pub fn markdown(run: &ScaleRun) -> String {
    let kib = |bytes: u64| format!("{:.1} KiB", bytes as f64 / 1024.0);
    let [private, tables, kernel, agent] = run.status_breakdown;
    let storm = |fraction: f64| run.storm.percentile(fraction).map_or("-".into(), format_us);
    format!(
        "| parked services | {} |\n|---|---|\n\
         | time to add them (one after the other) | {:.1} s ({:.0} ms each) |\n\
         | agent RSS / threads | {:.1} MiB / {} |\n\
         | port keepers / their memory | {} / {} |\n\
         | host MemAvailable drop per service | {} |\n\
         | `status` parked cost per service | {} (private {}, page tables {}, kernel objects {}, agent share {}) |\n\
         | wake storm (one request to each at once) | {}/{} served, median {}, p99 {}, max {} |\n",
        run.services,
        run.add_s,
        run.add_s * 1000.0 / run.services as f64,
        run.agent_rss_bytes as f64 / (1024.0 * 1024.0),
        run.agent_threads,
        run.keeper_processes,
        kib(run.keeper_bytes),
        kib(run.host_bytes_per_service),
        kib(run.status_bytes_per_service),
        kib(private),
        kib(tables),
        kib(kernel),
        kib(agent),
        run.storm_served,
        run.services,
        storm(0.5),
        storm(0.99),
        storm(1.0),
    )
}
