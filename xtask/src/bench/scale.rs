//! `cargo xtask bench --scale N`: N parked hello-servers on one host. How
//! long adding them takes, what the agent grows to, what the host really
//! pays per parked service (its MemAvailable drop) against what `status`
//! says each costs, what the SYN watcher costs connections to a port no
//! service is registered on, and a wake storm of one request to every
//! service at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use persist_tests::{Sandbox, binary};
use serde::Serialize;

use super::client::{Probe, request};
use super::stats::{Samples, format_us};
use super::unregistered::{self, UnregisteredRate};

/// The first port; service `i` listens on `FIRST_PORT + i`.
const FIRST_PORT: u16 = 20000;

/// How long the host is given to settle before and after the adds.
const SETTLE: Duration = Duration::from_secs(2);

/// Adds in flight at once (each a `persist-agent add` of its own).
pub const ADDS_IN_FLIGHT: usize = 8;

/// What one scale run measured, as written to `target/bench/scale.json`.
#[derive(Debug, Serialize)]
pub struct ScaleRun {
    /// Parked services.
    pub services: usize,
    /// Whether the services were added with `--share-pages`.
    pub share_pages: bool,
    /// Adds in flight at once.
    pub adds_in_flight: usize,
    /// Wall time of adding them all.
    pub add_s: f64,
    /// Bytes the state directory's images take on disk once all are
    /// added (blocks allocated, each file counted once however many
    /// images link it), per service.
    pub disk_bytes_per_service: u64,
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
    /// Connections per second to an unregistered port, with and without
    /// the agent.
    pub unregistered: UnregisteredRate,
    /// Requests of the wake storm answered.
    pub storm_served: usize,
    /// Connect-to-first-byte of the storm's requests, in microseconds.
    pub storm: Samples,
}

/// Adds `services` hello-servers to a fresh daemon, measures, and wakes
/// them all at once.
pub fn run(services: usize, share_pages: bool) -> Result<ScaleRun> {
    if services == 0 || services > usize::from(u16::MAX - FIRST_PORT) {
        bail!("--scale takes 1 to {} services", u16::MAX - FIRST_PORT);
    }
    check_pid_room(services)?;
    let mut sandbox = Sandbox::new()?;
    sandbox.start_daemon()?;
    std::thread::sleep(SETTLE);
    let available_before = mem_available()?;

    let server = binary("hello-server").display().to_string();
    let started = Instant::now();
    add_all(&sandbox, &server, services, share_pages)?;
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
    let disk_bytes_per_service = disk_bytes(&sandbox.state_dir().join("images"))? / services as u64;

    let unregistered = unregistered::measure(&sandbox.netns)?;
    let (storm_served, storm) = wake_storm(&sandbox, services)?;
    Ok(ScaleRun {
        services,
        share_pages,
        adds_in_flight: ADDS_IN_FLIGHT,
        add_s,
        disk_bytes_per_service,
        agent_rss_bytes,
        agent_threads,
        keeper_processes,
        keeper_bytes,
        host_bytes_per_service: available_before.saturating_sub(available_after) / services as u64,
        status_bytes_per_service,
        status_breakdown,
        unregistered,
        storm_served,
        storm,
    })
}

/// Pids a parked service takes: its skeleton, its port keeper and its
/// restore thread in the agent.
const PIDS_PER_SERVICE: u64 = 3;

/// Refuses a run that would run out of pids halfway (`kernel.pid_max` is
/// 32,768 on many systems: about 10,000 services).
fn check_pid_room(services: usize) -> Result<()> {
    let read = |path: &str| -> Result<u64> {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading {path}"))?
            .trim()
            .parse()
            .with_context(|| format!("parsing {path}"))
    };
    let pid_max = read("/proc/sys/kernel/pid_max")?;
    let in_use = procfs::process::all_processes()
        .context("listing /proc")?
        .flatten()
        .filter_map(|process| process.stat().ok())
        .map(|stat| stat.num_threads.max(1) as u64)
        .sum::<u64>();
    let needed = services as u64 * PIDS_PER_SERVICE;
    if in_use + needed > pid_max {
        bail!(
            "{services} services need about {needed} pids and {in_use} are in use, \
             but kernel.pid_max is {pid_max}: raise it (sysctl -w kernel.pid_max=4194304)"
        );
    }
    Ok(())
}

/// Adds `services` hello-servers, [`ADDS_IN_FLIGHT`] at a time; the first
/// failure stops the others from starting more.
fn add_all(sandbox: &Sandbox, server: &str, services: usize, share_pages: bool) -> Result<()> {
    let options: &[&str] = if share_pages {
        &["--ready", "tcp", "--share-pages"]
    } else {
        &["--ready", "tcp"]
    };
    let next = AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..ADDS_IN_FLIGHT.min(services))
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let index = next.fetch_add(1, Ordering::SeqCst);
                        if index >= services || failed.load(Ordering::SeqCst) {
                            return Ok(());
                        }
                        if let Err(err) = super::interrupt::check() {
                            failed.store(true, Ordering::SeqCst);
                            return Err(err);
                        }
                        let port = FIRST_PORT + index as u16;
                        let command = [server.to_owned(), format!("127.0.0.1:{port}")];
                        let added = sandbox
                            .add_ok(&format!("hello-{index}"), port, options, &command)
                            .with_context(|| format!("adding service {index}"));
                        if added.is_err() {
                            failed.store(true, Ordering::SeqCst);
                        }
                        added?;
                        if (index + 1).is_multiple_of(100) {
                            eprintln!("bench --scale: {} services added", index + 1);
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap_or_else(|_| bail!("an adder panicked")))
            .collect::<Result<Vec<()>>>()
            .map(drop)
    })
}

/// Blocks allocated to the files under `dir`, each inode counted once (the
/// images of one program link their shared page stores).
fn disk_bytes(dir: &std::path::Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else if seen.insert((meta.dev(), meta.ino())) {
                total += meta.blocks() * 512;
            }
        }
    }
    Ok(total)
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
         | time to add them ({} in flight{}) | {:.1} s ({:.1} ms each) |\n\
         | image disk use per service | {} |\n\
         | agent RSS / threads | {:.1} MiB / {} |\n\
         | port keepers / their memory | {} / {} |\n\
         | host MemAvailable drop per service | {} |\n\
         | `status` parked cost per service | {} (private {}, page tables {}, kernel objects {}, agent share {}) |\n\
         | connections/s to an unregistered port, without / with the agent (median of {} rounds) | {:.0} / {:.0} (with/without {:.2}) |\n\
         | CPU time per connection, without / with the agent | {:.1} µs / {:.1} µs (with/without {:.3}) |\n\
         | wake storm (one request to each at once) | {}/{} served, median {}, p99 {}, max {} |\n",
        run.services,
        run.adds_in_flight,
        if run.share_pages {
            ", `--share-pages`"
        } else {
            ""
        },
        run.add_s,
        run.add_s * 1000.0 / run.services as f64,
        kib(run.disk_bytes_per_service),
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
        run.unregistered.with_agent.len(),
        run.unregistered.rate_without(),
        run.unregistered.rate_with(),
        run.unregistered.rate_with() / run.unregistered.rate_without(),
        run.unregistered.cpu_us_without(),
        run.unregistered.cpu_us_with(),
        run.unregistered.cpu_us_with() / run.unregistered.cpu_us_without(),
        run.storm_served,
        run.services,
        storm(0.5),
        storm(0.99),
        storm(1.0),
    )
}
