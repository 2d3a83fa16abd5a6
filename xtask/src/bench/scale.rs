//! `cargo xtask bench --scale N`: N parked services on one host, measured
//! in both tiers of docs/parked-cost.md. First with every skeleton
//! prepared (the default), then with the daemon restarted under
//! `--skeleton-budget 0`, every skeleton released and the images alone on
//! disk. In each tier: what the agent grows to, what the host really pays
//! per parked service (the fall of its MemAvailable from before the first
//! add, agent included) against what `status` says each costs, a few wakes
//! one at a time, and a wake storm of one request to every service at once.
//! Also: how long adding them takes, their images' disk use, and what the
//! SYN watcher costs connections to a port no service is registered on.
//!
//! With `--mix-python K`, K of the services are python's http.server, whose
//! cold wake is set beside its fresh start (an interpreter that starts
//! slowly is what the image-only tier is for).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use persist_tests::{NetNs, Sandbox, binary, wait_until};
use serde::Serialize;
use serde_json::Value;

use super::client::{Probe, request, request_when_up};
use super::interrupt;
use super::procs::ServerProcess;
use super::servers::{Kind, Server};
use super::stats::{Samples, format_us};
use super::unregistered::{self, UnregisteredRate};

/// The first port; service `i` listens on `FIRST_PORT + i`.
const FIRST_PORT: u16 = 20000;

/// The port of python's fresh starts (the unregistered-port test takes
/// 19999), registered with no service.
const FRESH_PORT: u16 = 19998;

/// How long the host is given to settle before the baseline and after
/// the run.
const SETTLE: Duration = Duration::from_secs(2);

/// How long the agent is left alone before each tier is measured: its
/// async runtime ends a blocking thread (the adds and the restart's
/// prepares run on them) once it has been idle for 10 s, so the threads
/// counted are those the agent keeps, not those the adds left.
const SETTLE_AGENT: Duration = Duration::from_secs(12);

/// Adds in flight at once (each a `persist-agent add` of its own).
pub const ADDS_IN_FLIGHT: usize = 8;

/// Services of each program woken one at a time in each tier.
const SINGLE_WAKES: usize = 5;

/// How often a wait asks `status` about one service, and about all:
/// `status` measures every service, which costs the daemon more with more
/// of them.
const POLL_ONE: Duration = Duration::from_millis(20);
const POLL_ALL: Duration = Duration::from_millis(500);

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Parked services.
    pub services: usize,
    /// Of which python's http.server, spread among the hello-servers.
    pub python: usize,
    /// Whether the services are added with `--share-pages`.
    pub share_pages: bool,
    /// The image-only tier alone, under `--skeleton-budget 0` from the
    /// daemon's start.
    pub images_only: bool,
}

/// Most services the storm of an images-only run asks: one running
/// service holds more of the agent's descriptors than a parked one.
const IMAGES_ONLY_STORM: usize = 1000;

/// The program a service runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Program {
    /// The bundled `hello-server`.
    Hello,
    /// `python3 -m http.server`.
    Python,
}

impl Program {
    const ALL: [Self; 2] = [Self::Hello, Self::Python];

    fn label(self) -> &'static str {
        match self {
            Self::Hello => "hello-server",
            Self::Python => "python3 http.server",
        }
    }
}

/// One of the run's services.
#[derive(Debug)]
struct Service {
    name: String,
    port: u16,
    program: Program,
}

/// The run's services: `python` of them python's, spread evenly (service
/// `i` is python's where the count of python services up to it grows).
fn service_list(services: usize, python: usize) -> Vec<Service> {
    (0..services)
        .map(|index| {
            let program = if (index + 1) * python / services > index * python / services {
                Program::Python
            } else {
                Program::Hello
            };
            let prefix = match program {
                Program::Hello => "hello",
                Program::Python => "python",
            };
            Service {
                name: format!("{prefix}-{index}"),
                port: FIRST_PORT + index as u16,
                program,
            }
        })
        .collect()
}

/// What one tier costs and how fast its services wake.
#[derive(Debug, Default, Serialize)]
pub struct Tier {
    /// Services whose skeleton was prepared when measured.
    pub skeletons_prepared: usize,
    /// The agent's resident memory.
    pub agent_rss_bytes: u64,
    /// Of which private (anonymous and shmem); the rest is page cache, the
    /// prepared skeletons' page stores mapped.
    pub agent_private_bytes: u64,
    /// The agent's threads.
    pub agent_threads: u64,
    /// The agent's threads by name (their numbers taken off: `restore`
    /// for `restore-7`).
    pub agent_thread_names: BTreeMap<String, usize>,
    /// Port keeper processes holding the services' listeners.
    pub keeper_processes: usize,
    /// Their private memory and page tables, together.
    pub keeper_bytes: u64,
    /// The private memory and page tables of the daemon's spawner, and of
    /// the arena it shares with the agent (`restore/spawner.rs`).
    pub spawner_bytes: u64,
    /// Drop of the host's MemAvailable per parked service, from before the
    /// first add, agent included (negative where it rose: other work on
    /// the host moves it too).
    pub host_bytes_per_service: i64,
    /// Growth of the private memory and page tables of the namespace's
    /// processes (agent, port keeper, skeletons) from before the first add,
    /// per service.
    pub namespace_bytes_per_service: i64,
    /// What `status` says each costs (its `parked_bytes`), on average.
    pub status_bytes_per_service: u64,
    /// Of which: private memory, page tables, kernel objects, agent share.
    pub status_breakdown: [u64; 4],
    /// Average `parked_bytes` of each program's services.
    pub status_bytes_by_program: BTreeMap<Program, u64>,
    /// Connect-to-first-byte of wakes one at a time, per program, in
    /// microseconds: each of another service, whose working set an earlier
    /// wake recorded.
    pub single_wakes: BTreeMap<Program, Samples>,
    /// Services the wake storm asked.
    pub storm_services: usize,
    /// Requests of the wake storm answered.
    pub storm_served: usize,
    /// Connect-to-first-byte of the storm's requests, in microseconds.
    pub storm: Samples,
    /// Services that, after the storm, did not come back parked with a
    /// skeleton (a daemon with no budget prepares one for every parked
    /// service), with their state: a fault of the daemon.
    pub stranded_after_storm: Vec<String>,
    /// Services woken alone whose wake answered, but which the daemon did
    /// not then show running with their pager done within 10 s (a fault of
    /// the daemon): each is left out of the later single wakes.
    pub unfinished_wakes: Vec<String>,
}

/// What one scale run measured, as written to `target/bench/scale-N.json`.
#[derive(Debug, Serialize)]
pub struct ScaleRun {
    /// Parked services.
    pub services: usize,
    /// Of which python's http.server.
    pub python_services: usize,
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
    /// Every skeleton prepared (the default, no budget); not measured by an
    /// images-only run.
    pub prepared: Option<Tier>,
    /// From the daemon's restart under `--skeleton-budget 0` to every
    /// skeleton released (each is prepared once at the start, its image
    /// checked, then released).
    pub release_s: f64,
    /// Whether the daemon stopped within 30 s of its SIGTERM before the
    /// restart (else it was killed).
    pub stopped_in_time: bool,
    /// Every skeleton released: the images alone, cold wakes.
    pub image_only: Tier,
    /// python's http.server started afresh to its first answer, in
    /// microseconds, taken between the cold wakes (none without python).
    pub python_fresh: Samples,
    /// Connections per second to an unregistered port, with and without
    /// the agent.
    pub unregistered: UnregisteredRate,
    /// The host's MemAvailable once every service is gone and the daemon
    /// stopped, less before the first add: what other work on the host
    /// moved it by during the run, the noise of the drops above.
    pub host_drift_bytes: i64,
}

/// Adds the services to a fresh daemon and measures both tiers.
pub fn run(options: Options) -> Result<ScaleRun> {
    let Options {
        services,
        python,
        share_pages,
        images_only,
    } = options;
    if services == 0 || services > usize::from(u16::MAX - FIRST_PORT) {
        bail!("--scale takes 1 to {} services", u16::MAX - FIRST_PORT);
    }
    if python > services {
        bail!("--mix-python {python} is more than the {services} services");
    }
    check_pid_room(services)?;
    let scratch = tempfile::Builder::new()
        .prefix("persist-scale-")
        .tempdir()?;
    let python_server = Server::all(scratch.path())?
        .into_iter()
        .find(|server| server.kind == Kind::Python)
        .context("the bench has no python server")?;
    let list = service_list(services, python);
    // The first few of each program, each woken alone in both tiers.
    let mut taken: HashMap<Program, usize> = HashMap::new();
    let samples: Vec<&Service> = list
        .iter()
        .filter(|service| {
            let count = taken.entry(service.program).or_default();
            *count += 1;
            *count <= SINGLE_WAKES
        })
        .collect();
    let others: Vec<&Service> = list
        .iter()
        .filter(|service| !samples.iter().any(|sample| sample.name == service.name))
        .collect();

    let mut sandbox = Sandbox::new()?;
    if images_only {
        return run_images_only(options, sandbox, &list, &samples, &others, &python_server);
    }
    sandbox.start_daemon()?;
    std::thread::sleep(SETTLE);
    let baseline = Baseline {
        available: mem_available()?,
        namespace: namespace_bytes(&sandbox.netns),
    };

    let started = Instant::now();
    add_all(&sandbox, &list, &python_server, share_pages)?;
    let add_s = started.elapsed().as_secs_f64();
    let all: Vec<&Service> = list.iter().collect();
    wait_all(&sandbox, &all, "prepared")?;
    std::thread::sleep(SETTLE_AGENT);
    eprintln!("bench --scale: measuring the prepared tier");
    let mut prepared = measure(&sandbox, &list, &baseline)?;
    let disk_bytes_per_service = disk_bytes(&sandbox.state_dir().join("images"))? / services as u64;
    let unregistered = unregistered::measure(&sandbox.netns)?;

    // A first wake records the working set that every later wake
    // prefetches, cold ones included: the sampled services get theirs here,
    // the others in the storm, so that both tiers wake services that have
    // one, as a host's services mostly are.
    eprintln!("bench --scale: single wakes, skeletons prepared");
    for service in &samples {
        interrupt::check()?;
        if wake_once(&sandbox, service)?.finished {
            park_and_wait(&sandbox, service, "prepared")?;
        } else {
            prepared.unfinished_wakes.push(service.name.clone());
        }
    }
    let samples: Vec<&Service> = samples
        .into_iter()
        .filter(|service| !prepared.unfinished_wakes.contains(&service.name))
        .collect();
    for service in &samples {
        interrupt::check()?;
        let wake = wake_once(&sandbox, service)?;
        push(&mut prepared.single_wakes, service.program, wake.ttfb);
        if wake.finished {
            park_and_wait(&sandbox, service, "prepared")?;
        } else {
            prepared.unfinished_wakes.push(service.name.clone());
        }
    }
    eprintln!("bench --scale: wake storm, skeletons prepared");
    (prepared.storm_served, prepared.storm) = wake_storm(&sandbox, &all)?;
    prepared.storm_services = services;
    // Every service parked again, its skeleton prepared, before the
    // restart. One whose skeleton does not come back is a finding, not a
    // reason to stop: it is reported, and the restart starts afresh.
    let stranded = wait_for(
        &sandbox,
        &all,
        "prepared",
        true,
        Duration::from_secs(60) + Duration::from_millis(50) * services as u32,
    )?;
    if !stranded.is_empty() {
        eprintln!(
            "bench --scale: after the storm, {} services were not parked with a skeleton:\n{}",
            stranded.len(),
            describe(&sandbox, &stranded)
        );
    }
    prepared.stranded_after_storm = stranded
        .iter()
        .map(|status| {
            format!(
                "{} ({}, skeleton {})",
                status["name"].as_str().unwrap_or_default(),
                status["state"].as_str().unwrap_or_default(),
                status["skeleton"].as_str().unwrap_or("none")
            )
        })
        .collect();

    // The daemon's budget is fixed at its start: the image-only tier is the
    // same services under a daemon restarted with a budget of nothing.
    eprintln!("bench --scale: restarting the daemon with --skeleton-budget 0");
    let stopped_in_time = sandbox.stop_daemon_within(Duration::from_secs(30));
    if !stopped_in_time {
        eprintln!("bench --scale: the daemon did not stop within 30 s of SIGTERM; killed");
    }
    let restarted = Instant::now();
    if let Err(err) = sandbox.start_daemon_with(&["--skeleton-budget", "0"]) {
        // The sandbox waits 10 s for the control socket, and a daemon
        // taking a thousand services back takes longer: it still runs.
        if sandbox.daemon_pid().is_none() {
            return Err(err);
        }
        let socket = sandbox.state_dir().join("agent.sock");
        let timeout = Duration::from_secs(60) + Duration::from_millis(100) * services as u32;
        wait_until(timeout, || socket.exists()).with_context(|| {
            format!("the restarted daemon had no control socket after {timeout:?}: {err:#}")
        })?;
    }
    wait_released(&sandbox, &all)?;
    let release_s = restarted.elapsed().as_secs_f64();
    std::thread::sleep(SETTLE_AGENT);
    eprintln!("bench --scale: measuring the image-only tier");
    let mut image_only = measure(&sandbox, &list, &baseline)?;

    // Each python fresh start right after a cold wake of python, so that
    // both see the same load. One untimed start first fills the page cache.
    eprintln!("bench --scale: single wakes, images only");
    let fresh_command = python_server.command(FRESH_PORT)?;
    let mut python_fresh = Samples::default();
    if python > 0 {
        fresh_start(&sandbox.netns, &fresh_command)?;
    }
    for service in &samples {
        interrupt::check()?;
        // Not parked again: parked, it would be prepared and released once
        // more, and a wait could not tell "not prepared yet" from
        // "released".
        cold_wake_beside_fresh(
            &sandbox,
            service,
            &fresh_command,
            &mut image_only,
            &mut python_fresh,
        )?;
    }
    eprintln!("bench --scale: wake storm, images only");
    (image_only.storm_served, image_only.storm) = wake_storm(&sandbox, &others)?;
    image_only.storm_services = others.len();
    // What the host's MemAvailable moved by meanwhile for reasons of its
    // own: with every service gone, it would be back where it started.
    drop(sandbox);
    std::thread::sleep(SETTLE);
    let host_drift_bytes = mem_available()? as i64 - baseline.available as i64;

    Ok(ScaleRun {
        services,
        python_services: python,
        share_pages,
        adds_in_flight: ADDS_IN_FLIGHT,
        add_s,
        disk_bytes_per_service,
        prepared: Some(prepared),
        release_s,
        stopped_in_time,
        image_only,
        python_fresh,
        unregistered,
        host_drift_bytes,
    })
}

/// [`run`] of the image-only tier alone: the daemon under
/// `--skeleton-budget 0` from its start, each service's skeleton prepared
/// once by its add (its image checked) and released. Each sampled service
/// is woken once (its working set recorded) and parked before its timed
/// cold wake; the storm asks at most [`IMAGES_ONLY_STORM`] of the others.
fn run_images_only(
    options: Options,
    mut sandbox: Sandbox,
    list: &[Service],
    samples: &[&Service],
    others: &[&Service],
    python_server: &Server,
) -> Result<ScaleRun> {
    let services = list.len();
    sandbox.start_daemon_with(&["--skeleton-budget", "0"])?;
    std::thread::sleep(SETTLE);
    let baseline = Baseline {
        available: mem_available()?,
        namespace: namespace_bytes(&sandbox.netns),
    };
    let started = Instant::now();
    add_all(&sandbox, list, python_server, options.share_pages)?;
    let add_s = started.elapsed().as_secs_f64();
    let all: Vec<&Service> = list.iter().collect();
    wait_released(&sandbox, &all)?;
    std::thread::sleep(SETTLE_AGENT);
    eprintln!("bench --scale: measuring the image-only tier");
    let mut image_only = measure(&sandbox, list, &baseline)?;
    let disk_bytes_per_service = disk_bytes(&sandbox.state_dir().join("images"))? / services as u64;
    let unregistered = unregistered::measure(&sandbox.netns)?;

    eprintln!("bench --scale: single wakes, images only");
    let fresh_command = python_server.command(FRESH_PORT)?;
    let mut python_fresh = Samples::default();
    if options.python > 0 {
        fresh_start(&sandbox.netns, &fresh_command)?;
    }
    let released = |sandbox: &Sandbox| sandbox.daemon_log().matches("skeleton released").count();
    for service in samples {
        interrupt::check()?;
        // The recording wake, then a park whose skeleton the budget
        // releases again.
        let before = released(&sandbox);
        if !wake_once(&sandbox, service)?.finished {
            image_only.unfinished_wakes.push(service.name.clone());
            continue;
        }
        sandbox.agent_ok(&["park", &service.name])?;
        wait_until(Duration::from_secs(30), || released(&sandbox) > before)
            .with_context(|| format!("{}'s skeleton was not released", service.name))?;
        cold_wake_beside_fresh(
            &sandbox,
            service,
            &fresh_command,
            &mut image_only,
            &mut python_fresh,
        )?;
    }
    let storm: Vec<&Service> = others.iter().copied().take(IMAGES_ONLY_STORM).collect();
    eprintln!(
        "bench --scale: wake storm of {} services, images only",
        storm.len()
    );
    (image_only.storm_served, image_only.storm) = wake_storm(&sandbox, &storm)?;
    image_only.storm_services = storm.len();
    drop(sandbox);
    std::thread::sleep(SETTLE);
    let host_drift_bytes = mem_available()? as i64 - baseline.available as i64;
    Ok(ScaleRun {
        services,
        python_services: options.python,
        share_pages: options.share_pages,
        adds_in_flight: ADDS_IN_FLIGHT,
        add_s,
        disk_bytes_per_service,
        prepared: None,
        release_s: 0.0,
        stopped_in_time: true,
        image_only,
        python_fresh,
        unregistered,
        host_drift_bytes,
    })
}

/// The host before the first add.
struct Baseline {
    /// Its MemAvailable.
    available: u64,
    /// What the namespace's processes (the daemon alone) hold.
    namespace: u64,
}

fn push(wakes: &mut BTreeMap<Program, Samples>, program: Program, ttfb: Duration) {
    wakes.entry(program).or_default().push(ttfb);
}

/// Measures what the parked services cost now: the host's MemAvailable
/// (read first, before `status` makes the agent work), `status`, the
/// agent and the port keepers.
fn measure(sandbox: &Sandbox, list: &[Service], baseline: &Baseline) -> Result<Tier> {
    let available_after = mem_available()?;
    let available_before = baseline.available;
    // The agent before `status`, which runs on threads of its own that
    // then linger for 10 s.
    let daemon = sandbox.daemon_pid().context("the daemon runs")?;
    let (agent_rss_bytes, agent_private_bytes, agent_threads) = rss_and_threads(daemon)?;
    let agent_thread_names = thread_names(daemon);
    let statuses = sandbox.status()?;
    let programs: HashMap<&str, Program> = list
        .iter()
        .map(|service| (service.name.as_str(), service.program))
        .collect();
    let parked: Vec<(Program, &Value)> = statuses
        .iter()
        .filter(|status| status["state"] == "parked")
        .filter_map(|status| Some((*programs.get(status["name"].as_str()?)?, status)))
        .collect();
    let services = list.len();
    if parked.len() != services {
        bail!("{} of {services} services parked", parked.len());
    }
    let average = |bytes: &dyn Fn(&Value) -> u64, program: Option<Program>| {
        let chosen: Vec<&Value> = parked
            .iter()
            .filter(|(of, _)| program.is_none_or(|program| program == *of))
            .map(|(_, status)| *status)
            .collect();
        chosen.iter().map(|status| bytes(status)).sum::<u64>() / chosen.len().max(1) as u64
    };
    let parked_bytes = |status: &Value| status["parked_bytes"].as_u64().unwrap_or(0);
    let part = |name: &'static str| {
        move |status: &Value| status["parked_cost"][name].as_u64().unwrap_or(0)
    };
    let status_bytes_by_program = Program::ALL
        .into_iter()
        .filter(|program| parked.iter().any(|(of, _)| of == program))
        .map(|program| (program, average(&parked_bytes, Some(program))))
        .collect();
    let (keeper_processes, keeper_bytes) = keepers(sandbox);
    let spawner_bytes = spawner_bytes(sandbox);
    Ok(Tier {
        agent_thread_names,
        skeletons_prepared: parked
            .iter()
            .filter(|(_, status)| status["skeleton"] == "prepared")
            .count(),
        agent_rss_bytes,
        agent_private_bytes,
        agent_threads,
        keeper_processes,
        keeper_bytes,
        spawner_bytes,
        host_bytes_per_service: (available_before as i64 - available_after as i64)
            / services as i64,
        namespace_bytes_per_service: (namespace_bytes(&sandbox.netns) as i64
            - baseline.namespace as i64)
            / services as i64,
        status_bytes_per_service: average(&parked_bytes, None),
        status_breakdown: [
            average(&part("private_bytes"), None),
            average(&part("page_table_bytes"), None),
            average(&part("kernel_bytes"), None),
            average(&part("agent_share_bytes"), None),
        ],
        status_bytes_by_program,
        ..Tier::default()
    })
}

/// Runs `work` for `0..count`, [`ADDS_IN_FLIGHT`] at a time; the first
/// failure stops the others from starting more. Says every hundred how
/// many are `done`.
fn in_flight(count: usize, done: &str, work: impl Fn(usize) -> Result<()> + Sync) -> Result<()> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..ADDS_IN_FLIGHT.min(count))
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let index = next.fetch_add(1, Ordering::SeqCst);
                        if index >= count || failed.load(Ordering::SeqCst) {
                            return Ok(());
                        }
                        let result = interrupt::check().and_then(|()| work(index));
                        if result.is_err() {
                            failed.store(true, Ordering::SeqCst);
                        }
                        result?;
                        if (index + 1).is_multiple_of(100) {
                            eprintln!("bench --scale: {} services {done}", index + 1);
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap_or_else(|_| bail!("a worker panicked")))
            .collect::<Result<Vec<()>>>()
            .map(drop)
    })
}

/// Adds the services, [`ADDS_IN_FLIGHT`] at a time.
fn add_all(sandbox: &Sandbox, list: &[Service], python: &Server, share_pages: bool) -> Result<()> {
    let hello = binary("hello-server").display().to_string();
    in_flight(list.len(), "added", |index| {
        let service = &list[index];
        let (mut options, command) = match service.program {
            Program::Hello => (
                vec!["--ready".to_owned(), "tcp".to_owned()],
                vec![hello.clone(), format!("127.0.0.1:{}", service.port)],
            ),
            Program::Python => (python.add_args(service.port), python.command(service.port)?),
        };
        if share_pages {
            options.push("--share-pages".to_owned());
        }
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        sandbox
            .add_ok(&service.name, service.port, &options, &command)
            .map(drop)
            .with_context(|| format!("adding service {}", service.name))
    })
}

/// Waits until every service of `services` is parked with its skeleton
/// `skeleton` (`prepared`, `on disk`), failing on a service that failed
/// and, after a generous time, on one still not so (with its status and
/// daemon log).
fn wait_all(sandbox: &Sandbox, services: &[&Service], skeleton: &str) -> Result<()> {
    // Generous: the daemon prepares skeletons one per restore thread.
    let timeout = Duration::from_secs(60) + Duration::from_millis(500) * services.len() as u32;
    let waiting = wait_for(sandbox, services, skeleton, false, timeout)?;
    if waiting.is_empty() {
        return Ok(());
    }
    bail!(
        "after {timeout:?}, {} of {} services were not parked with skeleton {skeleton:?}:\n{}",
        waiting.len(),
        services.len(),
        describe(sandbox, &waiting)
    )
}

/// Waits up to `timeout` until every service of `services` is parked with
/// its skeleton `skeleton`, failing on a service that failed; the status
/// of those that are not at the end. With `park_running`, parks each one
/// it sees running, [`ADDS_IN_FLIGHT`] at a time, as often as it sees it:
/// a service the storm woke may still show `parked` for a moment, until
/// its supervisor hears of the wake.
fn wait_for(
    sandbox: &Sandbox,
    services: &[&Service],
    skeleton: &str,
    park_running: bool,
    timeout: Duration,
) -> Result<Vec<Value>> {
    let names: std::collections::HashSet<&str> = services
        .iter()
        .map(|service| service.name.as_str())
        .collect();
    let poll = if services.len() > 1 {
        POLL_ALL
    } else {
        POLL_ONE
    };
    let started = Instant::now();
    loop {
        let statuses = sandbox.status()?;
        let ours = || {
            statuses.iter().filter(|status| {
                status["name"]
                    .as_str()
                    .is_some_and(|name| names.contains(name))
            })
        };
        if let Some(failed) = ours().find(|status| status["error"].is_string()) {
            bail!("{} failed: {}", failed["name"], failed["error"]);
        }
        let waiting: Vec<&Value> = ours()
            .filter(|status| !(status["state"] == "parked" && status["skeleton"] == skeleton))
            .collect();
        if waiting.is_empty() || started.elapsed() > timeout {
            return Ok(waiting.into_iter().cloned().collect());
        }
        if park_running {
            let running: Vec<&str> = waiting
                .iter()
                .filter(|status| status["state"] == "running")
                .filter_map(|status| status["name"].as_str())
                .collect();
            // A park refused (the service parked meanwhile) is not an
            // error: the next round looks again.
            in_flight(running.len(), "parked", |index| {
                sandbox.agent(&["park", running[index]]);
                Ok(())
            })?;
        }
        interrupt::check()?;
        std::thread::sleep(poll);
    }
}

/// The status and the last lines of the daemon's log of a few of
/// `statuses`' services.
fn describe(sandbox: &Sandbox, statuses: &[Value]) -> String {
    let log = sandbox.daemon_log();
    statuses
        .iter()
        .take(3)
        .map(|status| {
            let name = status["name"].as_str().unwrap_or_default();
            // `service=NAME`, its parts coloured or not.
            let lines: Vec<&str> = log
                .lines()
                .filter(|line| line.split_whitespace().any(|word| word.ends_with(name)))
                .collect();
            format!(
                "{status}\nits daemon log, last lines:\n{}",
                lines[lines.len().saturating_sub(15)..].join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until a daemon just started under `--skeleton-budget 0` has
/// released every service's skeleton. `status` alone cannot say: it shows
/// `on disk` as well for a service whose skeleton the start has not
/// prepared yet; the daemon logs each release.
fn wait_released(sandbox: &Sandbox, services: &[&Service]) -> Result<()> {
    let timeout = Duration::from_secs(60) + Duration::from_millis(500) * services.len() as u32;
    let started = Instant::now();
    loop {
        let released = sandbox.daemon_log().matches("skeleton released").count();
        if released >= services.len() {
            return wait_all(sandbox, services, "on disk");
        }
        if started.elapsed() > timeout {
            bail!(
                "after {timeout:?}, the restarted daemon had released {released} of {} skeletons",
                services.len()
            );
        }
        interrupt::check()?;
        std::thread::sleep(POLL_ALL);
    }
}

/// One cold wake of `service`, counted in `tier`; for python's
/// http.server, a fresh start of it right after, for comparison.
fn cold_wake_beside_fresh(
    sandbox: &Sandbox,
    service: &Service,
    fresh_command: &[String],
    tier: &mut Tier,
    python_fresh: &mut Samples,
) -> Result<()> {
    let wake = wake_once(sandbox, service)?;
    push(&mut tier.single_wakes, service.program, wake.ttfb);
    if !wake.finished {
        tier.unfinished_wakes.push(service.name.clone());
    }
    if service.program == Program::Python {
        python_fresh.push(fresh_start(&sandbox.netns, fresh_command)?);
    }
    Ok(())
}

/// Wakes one parked service with a request, the time from connect() to
/// its first byte, and waits until the daemon shows it running and its
/// pager done (the working set the wake recorded is then saved).
fn wake_once(sandbox: &Sandbox, service: &Service) -> Result<Wake> {
    let wakes = |status: &Value| status["wakes"].as_u64().unwrap_or(0);
    let before = wakes(&sandbox.service(&service.name)?);
    let ttfb = sandbox
        .netns
        .enter(|| request(service.port, Probe::Http))??;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = sandbox.service(&service.name)?;
        if status["state"] == "running"
            && wakes(&status) > before
            && !status["last_faults"].is_null()
        {
            return Ok(Wake {
                ttfb,
                finished: true,
            });
        }
        if Instant::now() > deadline {
            eprintln!(
                "bench --scale: {} answered but did not show a finished wake within 10 s:\n{}",
                service.name,
                describe(sandbox, std::slice::from_ref(&status))
            );
            return Ok(Wake {
                ttfb,
                finished: false,
            });
        }
        std::thread::sleep(POLL_ONE);
    }
}

/// One wake of [`wake_once`].
struct Wake {
    /// From connect() to the first byte of the answer.
    ttfb: Duration,
    /// Whether the daemon then showed the service running and its pager
    /// done. A wake that answered and is not done within 10 s is a fault
    /// of the daemon; the service is then left alone.
    finished: bool,
}

/// Parks one service and waits until its skeleton is `skeleton`.
fn park_and_wait(sandbox: &Sandbox, service: &Service, skeleton: &str) -> Result<()> {
    sandbox.agent_ok(&["park", &service.name])?;
    wait_all(sandbox, &[service], skeleton)
}

/// Starts `command` (listening on [`FRESH_PORT`]) and asks it as soon as it
/// listens: the time from its start to the first byte of its answer.
fn fresh_start(netns: &NetNs, command: &[String]) -> Result<Duration> {
    netns.enter(|| -> Result<Duration> {
        let started = Instant::now();
        let process = ServerProcess::spawn(command)?;
        let ttfb = request_when_up(FRESH_PORT, Probe::Http, started)?;
        drop(process);
        Ok(ttfb)
    })?
}

/// One request to every service of `services` at once, from as many
/// threads.
fn wake_storm(sandbox: &Sandbox, services: &[&Service]) -> Result<(usize, Samples)> {
    let ports: Vec<u16> = services.iter().map(|service| service.port).collect();
    let results = sandbox.netns.enter(|| {
        let threads: Vec<_> = ports
            .iter()
            .map(|&port| std::thread::spawn(move || request(port, Probe::Http)))
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

/// The host's MemAvailable, in bytes.
fn mem_available() -> Result<u64> {
    use procfs::Current;
    let meminfo = procfs::Meminfo::current().context("reading /proc/meminfo")?;
    meminfo
        .mem_available
        .context("/proc/meminfo has no MemAvailable")
}

/// The resident memory of `pid`, its private part (anonymous and shmem:
/// the rest is page cache, shared and reclaimable) and its threads.
fn rss_and_threads(pid: i32) -> Result<(u64, u64, u64)> {
    let status = procfs::process::Process::new(pid)
        .and_then(|process| process.status())
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    Ok((
        status.vmrss.unwrap_or(0) * 1024,
        (status.rssanon.unwrap_or(0) + status.rssshmem.unwrap_or(0)) * 1024,
        status.threads,
    ))
}

/// The threads of `pid` by name, counted, their numbers taken off.
fn thread_names(pid: i32) -> BTreeMap<String, usize> {
    let mut names = BTreeMap::new();
    let Ok(tasks) = procfs::process::Process::new(pid).and_then(|process| process.tasks()) else {
        return names;
    };
    for task in tasks.flatten() {
        if let Ok(stat) = task.stat() {
            let name = stat
                .comm
                .trim_end_matches(|c: char| c.is_ascii_digit())
                .trim_end_matches('-')
                .to_owned();
            *names.entry(name).or_default() += 1;
        }
    }
    names
}

/// Private memory (anonymous and shmem) and page tables of every process
/// in the namespace: the agent, the port keeper, the skeletons. Unlike
/// MemAvailable, other work on the host does not move it; unlike the
/// host, it leaves out kernel objects.
fn namespace_bytes(netns: &NetNs) -> u64 {
    processes_costing(netns, |_| true).1
}

/// The processes in `netns` that `chosen` picks, and their private memory
/// (anonymous and shmem) and page tables together.
fn processes_costing(netns: &NetNs, chosen: impl Fn(i32) -> bool) -> (usize, u64) {
    let bytes: Vec<u64> = netns
        .processes()
        .into_iter()
        .filter(|&pid| chosen(pid))
        .filter_map(|pid| {
            procfs::process::Process::new(pid)
                .and_then(|process| process.status())
                .ok()
        })
        .map(|status| {
            (status.rssanon.unwrap_or(0) + status.rssshmem.unwrap_or(0) + status.vmpte.unwrap_or(0))
                * 1024
        })
        .collect();
    (bytes.len(), bytes.iter().sum())
}

/// The port keepers in the sandbox (named `persist-port-keeper` on their
/// command line, one per service in earlier agents), and what they cost
/// together: private memory and page tables.
fn keepers(sandbox: &Sandbox) -> (usize, u64) {
    processes_costing(&sandbox.netns, |pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmdline| cmdline.starts_with(b"persist-port-keeper\0"))
    })
}

/// What the daemon's spawner costs: its private memory, the memory it
/// shares with the agent (its arena) and its page tables.
fn spawner_bytes(sandbox: &Sandbox) -> u64 {
    processes_costing(&sandbox.netns, |pid| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.trim() == "persist-spawner")
    })
    .1
}

/// The scale run as Markdown: what holds for both tiers, then the two
/// side by side.
pub fn markdown(run: &ScaleRun) -> String {
    let kib = |bytes: u64| format!("{:.1} KiB", bytes as f64 / 1024.0);
    let signed_kib = |bytes: i64| format!("{:.1} KiB", bytes as f64 / 1024.0);
    let unregistered = &run.unregistered;
    let mut lines = vec![
        format!(
            "| parked services | {} |",
            if run.python_services > 0 {
                format!(
                    "{} ({} hello-servers, {} python3 http.servers)",
                    run.services,
                    run.services - run.python_services,
                    run.python_services
                )
            } else {
                format!("{} hello-servers", run.services)
            }
        ),
        "|---|---|".into(),
        format!(
            "| time to add them ({} in flight{}) | {:.1} s ({:.1} ms each) |",
            run.adds_in_flight,
            if run.share_pages {
                ", `--share-pages`"
            } else {
                ""
            },
            run.add_s,
            run.add_s * 1000.0 / run.services as f64
        ),
        format!(
            "| image disk use per service | {} |",
            kib(run.disk_bytes_per_service)
        ),
        format!(
            "| connections/s to an unregistered port, without / with the agent (median of {} rounds) | {:.0} / {:.0} (with/without {:.2}) |",
            unregistered.with_agent.len(),
            unregistered.rate_without(),
            unregistered.rate_with(),
            unregistered.rate_with() / unregistered.rate_without()
        ),
        format!(
            "| CPU time per connection, without / with the agent | {:.1} µs / {:.1} µs (with/without {:.3}) |",
            unregistered.cpu_us_without(),
            unregistered.cpu_us_with(),
            unregistered.cpu_us_with() / unregistered.cpu_us_without()
        ),
    ];
    if run.prepared.is_some() {
        lines.push(format!(
            "| daemon restarted with `--skeleton-budget 0`, until every skeleton is released | {:.1} s |",
            run.release_s
        ));
    }
    let cold_python = run
        .image_only
        .single_wakes
        .get(&Program::Python)
        .and_then(Samples::median);
    if let (Some(fresh), Some(cold)) = (run.python_fresh.median(), cold_python) {
        lines.push(format!(
            "| python3 http.server: fresh start to first byte / cold wake (medians of {}) | {} / {} (cold {:.1}× faster) |",
            run.python_fresh.len(),
            format_us(fresh),
            format_us(cold),
            fresh / cold
        ));
    }
    lines.push(String::new());
    lines.push("| | every skeleton prepared | images only (`--skeleton-budget 0`) |".into());
    lines.push("|---|---:|---:|".into());
    let not_measured = Tier::default();
    let prepared = run.prepared.as_ref().unwrap_or(&not_measured);
    let mut row = |label: String, cell: &dyn Fn(&Tier) -> String| {
        lines.push(format!(
            "| {label} | {} | {} |",
            match run.prepared {
                Some(_) => cell(prepared),
                None => "not measured (`--images-only`)".into(),
            },
            cell(&run.image_only)
        ));
    };
    row("skeletons prepared".into(), &|tier| {
        format!("{} of {}", tier.skeletons_prepared, run.services)
    });
    let mib = |bytes: u64| format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0));
    row("agent RSS (of which private) / threads".into(), &|tier| {
        let names: Vec<String> = tier
            .agent_thread_names
            .iter()
            .map(|(name, count)| format!("{name} {count}"))
            .collect();
        format!(
            "{} ({}) / {} ({})",
            mib(tier.agent_rss_bytes),
            mib(tier.agent_private_bytes),
            tier.agent_threads,
            names.join(", ")
        )
    });
    row("port keepers / their memory".into(), &|tier| {
        format!("{} / {}", tier.keeper_processes, kib(tier.keeper_bytes))
    });
    row("the spawner's memory".into(), &|tier| {
        kib(tier.spawner_bytes)
    });
    row(
        "host MemAvailable drop per service (from before the first add, agent included)".into(),
        &|tier| signed_kib(tier.host_bytes_per_service),
    );
    row(
        "private memory and page tables of the agent, keeper and skeletons, growth per service"
            .into(),
        &|tier| signed_kib(tier.namespace_bytes_per_service),
    );
    row("`status` parked cost per service".into(), &|tier| {
        let [private, tables, kernel, agent] = tier.status_breakdown;
        format!(
            "{} (private {}, page tables {}, kernel objects {}, agent share {})",
            kib(tier.status_bytes_per_service),
            kib(private),
            kib(tables),
            kib(kernel),
            kib(agent)
        )
    });
    let mixed = run.python_services > 0;
    for program in Program::ALL {
        if mixed
            && run
                .image_only
                .status_bytes_by_program
                .contains_key(&program)
        {
            row(
                format!("`status` parked cost per {}", program.label()),
                &|tier| {
                    tier.status_bytes_by_program
                        .get(&program)
                        .map_or("-".into(), |bytes| kib(*bytes))
                },
            );
        }
    }
    for program in Program::ALL {
        if run.image_only.single_wakes.contains_key(&program)
            || prepared.single_wakes.contains_key(&program)
        {
            row(
                format!(
                    "one wake at a time, {} (median, min–max, of services)",
                    program.label()
                ),
                &|tier| {
                    let Some(wakes) = tier.single_wakes.get(&program) else {
                        return "-".into();
                    };
                    let at =
                        |fraction: f64| wakes.percentile(fraction).map_or("-".into(), format_us);
                    format!("{} ({}–{}, {})", at(0.5), at(0.0), at(1.0), wakes.len())
                },
            );
        }
    }
    row(
        "wake storm, one request to each at once (served, median, p99, max)".into(),
        &|tier| {
            let at = |fraction: f64| {
                tier.storm
                    .percentile(fraction)
                    .map_or("-".into(), format_us)
            };
            format!(
                "{}/{}, {}, {}, {}",
                tier.storm_served,
                tier.storm_services,
                at(0.5),
                at(0.99),
                at(1.0)
            )
        },
    );
    lines.push(String::new());
    if !prepared.stranded_after_storm.is_empty() {
        lines.push(format!(
            "After the storm, {} did not come back parked with a skeleton: {}.",
            prepared.stranded_after_storm.len(),
            prepared.stranded_after_storm.join(", ")
        ));
    }
    for (tier, label) in [
        (prepared, "with its skeleton prepared"),
        (&run.image_only, "cold"),
    ] {
        if !tier.unfinished_wakes.is_empty() {
            lines.push(format!(
                "Woken alone {label}, {} answered but did not show a finished wake: {}.",
                tier.unfinished_wakes.len(),
                tier.unfinished_wakes.join(", ")
            ));
        }
    }
    if !run.stopped_in_time {
        lines.push(
            "The daemon did not stop within 30 s of SIGTERM before the restart: killed.".into(),
        );
    }
    lines.push(format!(
        "The host's MemAvailable after the run, every service gone, less before it: \
         {:.1} MiB (what other work moved it by: per service, the drops above are as \
         noisy as {:.1} KiB).",
        run.host_drift_bytes as f64 / (1024.0 * 1024.0),
        run.host_drift_bytes.unsigned_abs() as f64 / 1024.0 / run.services as f64
    ));
    lines.push(String::new());
    lines.join("\n")
}
