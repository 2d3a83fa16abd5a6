//! How each mode is measured. Every mode times the same thing: from the start
//! of the client's connect() (or from the server's start, for fresh starts
//! the bench does itself) to the first byte of the answer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::ProgressBar;
use nix::sys::signal::Signal;
use persist_tests::{Sandbox, binary};
use serde::Serialize;
use serde_json::Value;

use super::client::{self, Probe};
use super::interrupt;
use super::procs::{self, ServerProcess};
use super::servers::{Kind, Server};
use super::stats::Samples;

/// How often `persist-agent add` is tried: an add can fail by a race (a
/// server caught while closing the readiness probe's connection), and the
/// bench then says so in the row's note.
const ADD_ATTEMPTS: usize = 3;

/// How the server is reached when the first request comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Already running: the floor.
    Warm,
    /// Parked by persist, restored on the SYN, pages faulted in on demand.
    PersistLazy,
    /// Like lazy, with the recorded working set prefetched.
    PersistPrefetch,
    /// Parked with its image only (`--keep-skeleton never`): the SYN's wake
    /// prepares the skeleton, then resumes it (with the working set).
    PersistCold,
    /// Started on demand from scratch, as socket activation would.
    Fresh,
    /// Running but SIGSTOPped; SIGCONT once the request is sent.
    Frozen,
    /// Restored by CRIU on demand.
    Criu,
}

impl Mode {
    /// Every mode, in table order.
    pub const ALL: [Self; 7] = [
        Self::Warm,
        Self::PersistLazy,
        Self::PersistPrefetch,
        Self::PersistCold,
        Self::Fresh,
        Self::Frozen,
        Self::Criu,
    ];

    /// Name in the tables and the plot.
    pub fn label(self) -> &'static str {
        match self {
            Self::Warm => "warm (running)",
            Self::PersistLazy => "persist lazy",
            Self::PersistPrefetch => "persist prefetch",
            Self::PersistCold => "persist cold (no skeleton)",
            Self::Fresh => "fresh on demand",
            Self::Frozen => "frozen (SIGSTOP/SIGCONT)",
            Self::Criu => "CRIU restore",
        }
    }

    /// Each mode gets its own port, so no mode waits for another's socket to go.
    fn port(self, server: &Server) -> u16 {
        let offset = Self::ALL.iter().position(|m| *m == self).unwrap_or(0) as u16;
        server.base_port + offset
    }
}

/// The samples of one server in one mode, or why there are none.
#[derive(Debug, Serialize)]
pub struct ModeResult {
    /// The mode.
    pub mode: Mode,
    /// Connect start (or server start) to first byte.
    pub ttfb: Samples,
    /// What was measured instead, or why nothing was.
    pub note: Option<String>,
}

impl ModeResult {
    fn measured(mode: Mode, ttfb: Samples) -> Self {
        Self {
            mode,
            ttfb,
            note: None,
        }
    }

    /// A row without numbers.
    pub fn noted(mode: Mode, note: impl Into<String>) -> Self {
        Self {
            mode,
            ttfb: Samples::default(),
            note: Some(note.into()),
        }
    }
}

/// What the agent reports about a service woken many times.
#[derive(Debug, Default, Serialize)]
pub struct WakeStats {
    /// Wall time of `persist-agent add` (start, readiness, checkpoint), ms.
    pub add_ms: f64,
    /// Bytes of the image on disk.
    pub image_bytes: u64,
    /// `rss_bytes` while parked, once the skeleton is prepared, per run.
    pub parked_rss_bytes: Samples,
    /// What the agent says a parked service costs, per run: `parked_bytes`
    /// (the skeleton's private memory) where the status has it, else `rss_bytes`.
    pub parked_cost_bytes: Samples,
    /// `last_resume_us`: the skeleton resume, the restore's critical path.
    pub resume_us: Samples,
    /// `last_wake_us`: SYN to the service running.
    pub wake_us: Samples,
    /// `last_event_us`: SYN to the agent reading the wake event.
    pub event_us: Samples,
    /// Every other numeric `last_*` key of the status (fault and page
    /// counters of the last wake), per run, under the status's own name.
    pub counters: BTreeMap<String, Samples>,
}

/// Everything measured for one server.
#[derive(Debug, Serialize)]
pub struct ServerResult {
    /// The server's label.
    pub server: String,
    /// What it is.
    pub kind: Kind,
    /// Its resident memory while running (the warm instance's root, after warm-up).
    pub running_rss_bytes: Option<u64>,
    /// The proportional set size of the warm instance's processes summed,
    /// after warm-up: what the running server holds, its processes' shared
    /// pages counted once. What the parked cost is compared with.
    #[serde(default)]
    pub running_pss_bytes: Option<u64>,
    /// One entry per mode.
    pub modes: Vec<ModeResult>,
    /// Agent statistics of the lazy persist mode.
    pub lazy: Option<WakeStats>,
    /// Agent statistics of the prefetching persist mode.
    pub prefetch: Option<WakeStats>,
    /// Agent statistics of the cold persist mode.
    #[serde(default)]
    pub cold: Option<WakeStats>,
}

/// A service registered with the agent, woken in turns with the others.
struct Woken {
    mode: Mode,
    service: String,
    port: u16,
    /// Snapshot mode, else exec mode.
    snapshot: bool,
    /// Parked with no skeleton (`--keep-skeleton never`).
    cold: bool,
    /// Errors of `add` attempts that failed before one worked.
    add_failures: Vec<String>,
    ttfb: Samples,
    stats: WakeStats,
    /// Why it stopped being measured.
    error: Option<String>,
}

impl Woken {
    fn into_row(self) -> (ModeResult, Option<WakeStats>) {
        let mut notes = Vec::new();
        if !self.add_failures.is_empty() {
            notes.push(format!(
                "`add` worked after {} failed attempt(s): {}",
                self.add_failures.len(),
                self.add_failures.join("; ")
            ));
        }
        notes.extend(self.error);
        let row = ModeResult {
            mode: self.mode,
            ttfb: self.ttfb,
            note: (!notes.is_empty()).then(|| notes.join("; ")),
        };
        (row, self.snapshot.then_some(self.stats))
    }
}

/// A bench run's fixed settings.
pub struct Bench<'a> {
    /// The namespace, state directory and daemon.
    pub sandbox: &'a Sandbox,
    /// Timed runs per mode.
    pub runs: usize,
    /// Whether `persist-agent add` takes `--prefetch` (`none`, `recorded`).
    pub prefetch: bool,
    /// Whether `persist-agent add` takes `--keep-skeleton` (cold wakes).
    pub cold: bool,
    /// The `criu` binary, if installed.
    pub criu: Option<PathBuf>,
    /// Scratch space for images and pid files.
    pub scratch: &'a Path,
}

impl Bench<'_> {
    /// Measures `server` in every mode.
    pub fn server(&self, server: &Server, bar: &dyn Fn(&str) -> ProgressBar) -> ServerResult {
        let mut result = ServerResult {
            server: server.label.to_owned(),
            kind: server.kind,
            running_rss_bytes: None,
            running_pss_bytes: None,
            modes: Vec::new(),
            lazy: None,
            prefetch: None,
            cold: None,
        };
        match self.warm_and_frozen(server, bar) {
            Ok((warm, frozen, memory)) => {
                result.running_rss_bytes = Some(memory.rss_bytes);
                result.running_pss_bytes = Some(memory.pss_bytes);
                result.modes.push(warm);
                result.modes.push(frozen);
            }
            Err(err) => {
                let note = format!("failed: {err:#}");
                result
                    .modes
                    .push(ModeResult::noted(Mode::Warm, note.clone()));
                result.modes.push(ModeResult::noted(Mode::Frozen, note));
            }
        }
        match self.agent_modes(server, bar) {
            Ok(rows) => {
                for (row, stats) in rows {
                    match row.mode {
                        Mode::PersistLazy => result.lazy = stats,
                        Mode::PersistPrefetch => result.prefetch = stats,
                        Mode::PersistCold => result.cold = stats,
                        _ => {}
                    }
                    result.modes.push(row);
                }
            }
            Err(err) => {
                for mode in self.agent_mode_list(server) {
                    result
                        .modes
                        .push(ModeResult::noted(mode, format!("failed: {err:#}")));
                }
            }
        }
        if !self.prefetch {
            result.modes.push(ModeResult::noted(
                Mode::PersistPrefetch,
                "n/a (not implemented yet)",
            ));
        }
        if !self.cold {
            result.modes.push(ModeResult::noted(
                Mode::PersistCold,
                "n/a (not implemented yet)",
            ));
        }
        // hello-server's fresh start is the agent's exec mode, measured above.
        if server.kind != Kind::Hello {
            result.modes.push(
                self.fresh(server, bar).unwrap_or_else(|err| {
                    ModeResult::noted(Mode::Fresh, format!("failed: {err:#}"))
                }),
            );
        }
        result.modes.push(match &self.criu {
            None => ModeResult::noted(Mode::Criu, "skipped: criu not installed"),
            Some(criu) => self
                .criu(server, criu, bar)
                .unwrap_or_else(|err| ModeResult::noted(Mode::Criu, format!("failed: {err:#}"))),
        });
        result
            .modes
            .sort_by_key(|m| Mode::ALL.iter().position(|mode| *mode == m.mode));
        result
    }

    /// Warm and frozen use the same running instance; also its memory.
    fn warm_and_frozen(
        &self,
        server: &Server,
        bar: &dyn Fn(&str) -> ProgressBar,
    ) -> Result<(ModeResult, ModeResult, RunningMemory)> {
        let port = Mode::Warm.port(server);
        let argv = server.spawn_command(port)?;
        let probe = server.probe;
        let process = self.in_netns(|| -> Result<ServerProcess> {
            let started = Instant::now();
            let process = ServerProcess::spawn(&argv)?;
            client::request_when_up(port, probe, started)?;
            for _ in 0..5 {
                client::request(port, probe)?;
            }
            Ok(process)
        })??;
        let memory = RunningMemory {
            rss_bytes: process.rss_bytes()?,
            pss_bytes: process.pss_bytes()?,
        };

        // Alternate the two, so that both see the same load on the machine.
        let progress = bar("warm and frozen, alternating");
        let (warm, frozen) = self.in_netns(|| -> Result<(Samples, Samples)> {
            let mut warm = Samples::default();
            let mut frozen = Samples::default();
            for _ in 0..self.runs {
                interrupt::check()?;
                warm.push(client::request(port, probe)?);
                process.freeze()?;
                frozen.push(client::request_with(port, probe, || {
                    process.signal(Signal::SIGCONT)
                })?);
                progress.inc(1);
            }
            Ok((warm, frozen))
        })??;
        progress.finish_and_clear();
        if let Some(signal) = server.stop_signal() {
            process.stop(signal)?;
        }
        Ok((
            ModeResult::measured(Mode::Warm, warm),
            ModeResult::measured(Mode::Frozen, frozen),
            memory,
        ))
    }

    /// The modes the agent serves: persist lazy, persist prefetch (where the
    /// agent has it) and, for hello-server, the fresh start of exec mode. They
    /// are registered together and woken in turns, so that all see the same
    /// load on the machine.
    fn agent_modes(
        &self,
        server: &Server,
        bar: &dyn Fn(&str) -> ProgressBar,
    ) -> Result<Vec<(ModeResult, Option<WakeStats>)>> {
        let mut rows = Vec::new();
        let mut woken = Vec::new();
        for mode in self.agent_mode_list(server) {
            match self.register(server, mode)? {
                Ok(registered) => woken.push(registered),
                Err(refusal) => rows.push((ModeResult::noted(mode, refusal), None)),
            }
        }
        if woken.is_empty() {
            return Ok(rows);
        }
        let labels: Vec<&str> = woken.iter().map(|w| w.mode.label()).collect();
        let progress = bar(&labels.join(" / "));
        // One untimed wake first: the page cache then holds the image (and a
        // prefetching agent has recorded its working set), as for every later wake.
        for entry in &mut woken {
            let warmup = self
                .wait_parked(&entry.service, entry.snapshot, entry.cold)
                .and_then(|_| self.in_netns(|| client::request(entry.port, server.probe))?);
            if let Err(err) = warmup {
                entry.error = Some(format!("failed: {err:#}"));
            }
        }
        for _ in 0..self.runs {
            interrupt::check()?;
            for entry in woken.iter_mut().filter(|w| w.error.is_none()) {
                if let Err(err) = self.wake_once(entry, server.probe) {
                    entry.error = Some(format!("failed: {err:#}"));
                }
            }
            progress.inc(1);
        }
        progress.finish_and_clear();
        for entry in woken {
            self.remove(&entry.service);
            rows.push(entry.into_row());
        }
        Ok(rows)
    }

    /// The modes of `server` that the agent serves.
    fn agent_mode_list(&self, server: &Server) -> Vec<Mode> {
        let mut modes = vec![Mode::PersistLazy];
        if self.prefetch {
            modes.push(Mode::PersistPrefetch);
        }
        if self.cold {
            modes.push(Mode::PersistCold);
        }
        if server.kind == Kind::Hello {
            modes.push(Mode::Fresh);
        }
        modes
    }

    /// Registers `server` with the agent for `mode`, or says why it was refused.
    fn register(&self, server: &Server, mode: Mode) -> Result<Result<Woken, String>> {
        let port = mode.port(server);
        let port_text = port.to_string();
        let (service, argv) = match mode {
            Mode::Fresh => (
                format!("{}-exec", server.service),
                vec![binary("hello-server").display().to_string()],
            ),
            Mode::PersistPrefetch => (
                format!("{}-prefetch", server.service),
                server.command(port)?,
            ),
            Mode::PersistCold => (format!("{}-cold", server.service), server.command(port)?),
            _ => (server.service.to_owned(), server.command(port)?),
        };
        let mut args: Vec<&str> = vec!["add", &service, "--port", &port_text];
        match (mode, self.prefetch) {
            (Mode::Fresh, _) => args.push("--exec"),
            (Mode::PersistPrefetch, _) => args.extend(["--prefetch", "recorded"]),
            // As a cold service would run: its working set prefetched.
            (Mode::PersistCold, prefetch) => {
                args.extend(["--keep-skeleton", "never"]);
                if prefetch {
                    args.extend(["--prefetch", "recorded"]);
                }
            }
            // Where the agent prefetches, lazy has to say it wants none.
            (_, true) => args.extend(["--prefetch", "none"]),
            (_, false) => {}
        }
        let snapshot = mode != Mode::Fresh;
        let add_args = server.add_args(port);
        if snapshot {
            args.extend(add_args.iter().map(String::as_str));
        }
        args.push("--");
        args.extend(argv.iter().map(String::as_str));
        let (add_ms, add_failures) = match self.add(&args) {
            Ok(added) => added,
            Err(refusals) => {
                return Ok(Err(format!(
                    "refused by `persist-agent add`: {}",
                    refusals.join("; ")
                )));
            }
        };
        let stats = WakeStats {
            add_ms,
            image_bytes: du(&self.sandbox.state_dir().join("images").join(&service)),
            ..WakeStats::default()
        };
        Ok(Ok(Woken {
            mode,
            service,
            port,
            snapshot,
            cold: mode == Mode::PersistCold,
            add_failures,
            ttfb: Samples::default(),
            stats,
            error: None,
        }))
    }

    /// `persist-agent add ARGS`, tried up to [`ADD_ATTEMPTS`] times: the wall
    /// time of the attempt that worked and the errors of those that did not,
    /// or every (distinct) error.
    fn add(&self, args: &[&str]) -> Result<(f64, Vec<String>), Vec<String>> {
        let mut failures: Vec<String> = Vec::new();
        for _ in 0..ADD_ATTEMPTS {
            let started = Instant::now();
            let output = self.sandbox.agent(args);
            let add_ms = started.elapsed().as_secs_f64() * 1e3;
            if output.status.success() {
                return Ok((add_ms, failures));
            }
            let err = String::from_utf8_lossy(&output.stderr);
            let err = err.trim().trim_start_matches("persist-agent: error: ");
            // The same refusal again (but for pids) is not a race: stop asking.
            let gist =
                |text: &str| -> String { text.chars().filter(|c| !c.is_ascii_digit()).collect() };
            if failures.iter().any(|seen| gist(seen) == gist(err)) {
                break;
            }
            failures.push(err.to_owned());
        }
        Err(failures)
    }

    /// Parks the service, waits until it is ready to wake, wakes it with one
    /// timed request and reads what the agent measured.
    fn wake_once(&self, entry: &mut Woken, probe: Probe) -> Result<()> {
        let service = entry.service.as_str();
        self.park(service)?;
        let parked = self.wait_parked(service, entry.snapshot, entry.cold)?;
        if entry.snapshot {
            let rss = parked["rss_bytes"].as_u64().unwrap_or(0);
            entry.stats.parked_rss_bytes.push_value(rss as f64);
            let cost = parked_cost(&parked).unwrap_or(rss);
            entry.stats.parked_cost_bytes.push_value(cost as f64);
        }
        let ttfb = self.in_netns(|| client::request(entry.port, probe))??;
        // The answer can come before the agent has published the wake.
        let wakes = |status: &Value| status["wakes"].as_u64().unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        let woken = loop {
            let status = self.sandbox.service(service)?;
            if status["state"] == "running" && wakes(&status) == wakes(&parked) + 1 {
                break status;
            }
            if wakes(&status) > wakes(&parked) + 1 || Instant::now() > deadline {
                bail!("the timed request did not wake {service} exactly once: {status}");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        // A restored process's pager reports once every page is in (up to
        // ~200 ms after the resume, while it learns what the set lacked).
        let woken = if entry.snapshot {
            self.wait_pager_done(service)?
        } else {
            woken
        };
        entry.ttfb.push(ttfb);
        record(&woken, &mut entry.stats);
        Ok(())
    }

    /// `persist-agent park SERVICE`, tried again for up to 10 s while it
    /// fails: the probe's connection, closed by the client, may not be gone
    /// from the server's side yet (PostgreSQL's backend exits after it).
    fn park(&self, service: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.sandbox.agent_ok(&["park", service]) {
                Ok(_) => return Ok(()),
                Err(err) if Instant::now() > deadline => return Err(err),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Removes `service` from the agent, and the POSIX shared memory files
    /// its processes mapped (PostgreSQL's): a restored tree killed by the
    /// removal leaves them, as a killed postmaster would.
    fn remove(&self, service: &str) {
        let pids: Vec<i32> = self
            .sandbox
            .service(service)
            .ok()
            .and_then(|status| status["pids"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|pid| pid.as_i64().map(|pid| pid as i32))
            .collect();
        let files = procs::posix_shm_files(&pids);
        let _ = self.sandbox.agent(&["remove", service]);
        procs::remove_unused_shm_files(&files);
    }

    /// Polls the status until the pager of `service`'s last wake is done.
    fn wait_pager_done(&self, service: &str) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.sandbox.service(service)?;
            if !status["last_faults"].is_null() {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("the pager of {service} did not finish within 10 s: {status}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Polls the status until `service` is parked and, in snapshot mode, its
    /// skeleton is prepared: the status names it (`skeleton_pid`), or, from
    /// agents that did not name it, shows it resident memory. A wake before
    /// that would prepare it on the SYN, and time the prepare. A `cold`
    /// service is ready once parked with no skeleton, its image on disk.
    fn wait_parked(&self, service: &str, snapshot: bool, cold: bool) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.sandbox.service(service)?;
            if let Some(error) = status["error"].as_str() {
                bail!("{service} failed: {error}");
            }
            let ready = !snapshot
                || (cold && status["skeleton"] == "on disk")
                || !cold
                    && match status.get("skeleton_pid") {
                        Some(pid) => pid.is_i64(),
                        None if status.get("parked_cost").is_some() => false,
                        None => parked_cost(&status).is_some_and(|bytes| bytes > 0),
                    };
            if status["state"] == "parked" && ready {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{service} was not parked with a skeleton within 30 s: {status}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Started on demand by the bench itself at t0, asked as soon as it listens.
    fn fresh(&self, server: &Server, bar: &dyn Fn(&str) -> ProgressBar) -> Result<ModeResult> {
        let port = Mode::Fresh.port(server);
        let progress = bar(Mode::Fresh.label());
        let argv = server.spawn_command(port)?;
        let probe = server.probe;
        let once = || -> Result<Duration> {
            let started = Instant::now();
            let process = ServerProcess::spawn(&argv)?;
            let ttfb = client::request_when_up(port, probe, started)?;
            // Untimed: a clean stop, so that the next start is as fresh.
            match server.stop_signal() {
                Some(signal) => process.stop(signal)?,
                None => drop(process),
            }
            Ok(ttfb)
        };
        self.in_netns(once)??;
        let samples = self.in_netns(|| -> Result<Samples> {
            let mut samples = Samples::default();
            for _ in 0..self.runs {
                interrupt::check()?;
                samples.push(once()?);
                progress.inc(1);
            }
            Ok(samples)
        })??;
        progress.finish_and_clear();
        Ok(ModeResult::measured(Mode::Fresh, samples))
    }

    /// CRIU: the server is dumped once, then restored by `criu restore -d` at
    /// t0 and asked as soon as it listens, `runs` times.
    fn criu(
        &self,
        server: &Server,
        criu: &Path,
        bar: &dyn Fn(&str) -> ProgressBar,
    ) -> Result<ModeResult> {
        let port = Mode::Criu.port(server);
        let argv = server.spawn_command(port)?;
        let probe = server.probe;
        let images = self.scratch.join(format!("criu-{}", server.service));
        std::fs::create_dir_all(&images)?;
        let images_text = images.display().to_string();
        self.in_netns(|| -> Result<()> {
            let started = Instant::now();
            let process = ServerProcess::spawn(&argv)?;
            client::request_when_up(port, probe, started)?;
            let pid = process.pid().to_string();
            persist_tests::run_ok(Command::new(criu).args([
                "dump",
                "--shell-job",
                "-t",
                &pid,
                "-D",
                &images_text,
            ]))
            .map(drop)
        })??;
        let pidfile = images.join("restored.pid");
        let pidfile_text = pidfile.display().to_string();
        let restore = [
            criu.display().to_string(),
            "restore".into(),
            "--shell-job".into(),
            "-d".into(),
            "-D".into(),
            images_text.clone(),
            "--pidfile".into(),
            pidfile_text,
        ];
        let progress = bar(Mode::Criu.label());
        // `criu restore -d` leaves the restored server an orphan. As our
        // orphan, we can reap it the moment it is killed: init reaps late,
        // and a restore fails while the server's old pid is still taken.
        nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;
        let samples = self.in_netns(|| -> Result<Samples> {
            let mut samples = Samples::default();
            for _ in 0..self.runs {
                interrupt::check()?;
                let _ = std::fs::remove_file(&pidfile);
                let started = Instant::now();
                let restorer = ServerProcess::spawn(&restore)?;
                let ttfb = client::request_when_up(port, probe, started);
                drop(restorer);
                if let Some(pid) = std::fs::read_to_string(&pidfile)
                    .ok()
                    .and_then(|pid| pid.trim().parse::<i32>().ok())
                {
                    procs::kill_and_reap_orphan(pid)?;
                }
                samples.push(ttfb?);
                progress.inc(1);
            }
            Ok(samples)
        });
        let _ = nix::sys::prctl::set_child_subreaper(false);
        let samples = samples??;
        progress.finish_and_clear();
        Ok(ModeResult::measured(Mode::Criu, samples))
    }

    fn in_netns<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T> {
        self.sandbox.netns.enter(work)
    }
}

/// A running server's memory.
struct RunningMemory {
    rss_bytes: u64,
    pss_bytes: u64,
}

/// What the status says the parked service itself costs: `parked_bytes`
/// less the agent's share (the agent's growth split among the few services
/// of a bench run says little of one service; `bench --scale` measures it),
/// in agents that report it, else the skeleton's `rss_bytes`.
fn parked_cost(status: &Value) -> Option<u64> {
    let agent_share = status["parked_cost"]["agent_share_bytes"]
        .as_u64()
        .unwrap_or(0);
    status
        .get("parked_bytes")
        .or_else(|| status.get("rss_bytes"))
        .and_then(Value::as_u64)
        .map(|bytes| bytes.saturating_sub(agent_share))
}

/// Adds the agent's measurements of the last wake to `stats`.
fn record(status: &Value, stats: &mut WakeStats) {
    let Some(fields) = status.as_object() else {
        return;
    };
    for (key, value) in fields {
        let Some(value) = value.as_u64() else {
            continue;
        };
        let value = value as f64;
        match key.as_str() {
            "last_resume_us" => stats.resume_us.push_value(value),
            "last_wake_us" => stats.wake_us.push_value(value),
            "last_event_us" => stats.event_us.push_value(value),
            other if other.starts_with("last_") => stats
                .counters
                .entry(other.to_owned())
                .or_default()
                .push_value(value),
            _ => {}
        }
    }
}

/// Disk space the files under `path` take, as `du` counts it (0 if it is gone).
fn du(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::symlink_metadata(path).map_or(0, |m| m.blocks() * 512);
    let Ok(entries) = std::fs::read_dir(path) else {
        return own;
    };
    own + entries
        .flatten()
        .map(|entry| du(&entry.path()))
        .sum::<u64>()
}
