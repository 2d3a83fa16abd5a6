//! The agent daemon: holds every service's port, wakes services on their
//! first SYN and parks them when idle.
//!
//! Start-up, in order: take the state directory's lock, become a child
//! subreaper, load and attach the BPF program, bring back every registered
//! service (finding running ones again), then serve wake events and the
//! control socket (telling systemd `READY=1`) until SIGTERM or SIGINT. Services keep running when the
//! daemon exits; the next daemon finds them again.
//!
//! # Threads
//!
//! ```text
//!  kernel: sk_lookup ──ring buffer──▶ persist-wakes (real-time thread)
//!                                        │ a snapshot service's SYN: straight to
//!                                        ▼ the restore pool (ResumeTrigger)
//!  restore-N (a pool of --restore-threads, default two per CPU, started as
//!    work comes) ◀── each service's jobs, in order: prepare, resume ── supervisor
//!    prepares skeletons and releases them to a group stop (no thread is
//!    tied to a parked service), resumes them; a thread leaves the pool
//!    while it runs a wake's pager until every page is in, or while it
//!    traces a skeleton that could not be released (ptrace ties it to the
//!    thread that made it); a wake's bulk copy borrows short-lived helpers.
//!  tokio runtime (2 workers):
//!    supervisor task per service ── its event loop: wake, park, idle, stop
//!    control socket, metrics, reaper (SIGCHLD)
//!    blocking work (build, checkpoint, image checks, fork/exec) goes to
//!    spawn_blocking or block_in_place, never stays on a worker.
//!  one port keeper process (persist-agent keep-ports) holds every listener
//!    while no daemon runs, so SYNs queue instead of being refused.
//! ```
//!
//! Every message between threads is typed (`supervisor::Command`, the
//! restore jobs and `ResumeRefused`). Shared state and its lock
//! order: the registry's `services` map is taken before the BPF `watcher`,
//! never the other way round; a service's `published` view and its restore
//! `report` are leaf locks, taken alone or last; a service's job queue is
//! taken before the pool's queue, never the other way round. The wake thread
//! holds `services` only to find the service, and wakes it after letting go.

mod cold_wake;
mod control_server;
mod exits;
mod families;
mod generations;
mod idle;
mod keeper;
mod listener;
mod log_rotation;
mod memory;
mod metrics;
mod pagers;
mod parked_cost;
mod reaper;
mod registry;
mod reload;
mod restore_pool;
mod restore_worker;
mod run_alone;
mod run_state;
mod skeleton_budget;
mod supervisor;
mod syn_watcher;
mod takeover;

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use persist_common::trust::TrustError;
use tracing::{info, warn};

use crate::service::create_trusted_dir;
pub use keeper::run_keeper;
pub use registry::Registry;
pub use reload::ReloadReport;
pub use restore_pool::default_size as default_restore_threads;
pub use skeleton_budget::parse_size;
pub use supervisor::since_monotonic_us;
pub use syn_watcher::{SynWatcher, SynWatcherError};

/// The BPF maps, shared by the registry and the supervisors.
pub type SharedWatcher = Arc<Mutex<SynWatcher>>;

/// How the daemon runs, from its command line.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Serve Prometheus metrics on this address.
    pub metrics: Option<std::net::SocketAddr>,
    /// Generations of a `--on-idle keep` service's state kept besides the
    /// pristine image and tagged ones.
    pub keep_generations: usize,
    /// The directory of service files ([`crate::service_file`]), applied at
    /// start, on SIGHUP and on `persist-agent reload`.
    pub services_dir: PathBuf,
    /// Size past which a service's log is rotated ([`crate::service_log`]).
    pub log_max_bytes: u64,
    /// Threads that prepare, resume and page snapshot services, shared by
    /// all of them.
    pub restore_threads: usize,
    /// What the prepared skeletons may cost together, in bytes (`None`: no
    /// limit; docs/parked-cost.md, Tiers).
    pub skeleton_budget: Option<u64>,
}

/// How long an idle thread of the async runtime's blocking pool waits for
/// work before it ends.
const BLOCKING_THREAD_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(1);

/// Default of [`DaemonOptions::log_max_bytes`]: 10 MiB.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 10 << 20;

/// Runs the daemon in the foreground until SIGTERM or SIGINT.
pub fn run(state_dir: &Path, options: &DaemonOptions) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, never into journald or a file.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();

    let state_dir = &prepare_state_dir(state_dir)
        .with_context(|| format!("state directory {}", state_dir.display()))?;
    let _lock = lock_state_dir(state_dir)?;
    // Orphans of our services are reparented to us and reaped at once: init
    // reaps them late, keeping their pids taken (docs/kernel-facts.md, Costs
    // that shaped the wake path).
    nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;
    // Before any thread: the memory a service's work frees goes back to the
    // host rather than stay in the agent (docs/parked-cost.md).
    crate::sys::alloc::keep_little_free_memory();
    // Each service holds a few descriptors of the agent (its listener, its
    // pidfds, its mapped page store): 1,024 would stop it near 150 services.
    // The programs it starts get the limit it had (`sys::spawn`).
    match crate::sys::rlimit::raise_open_files() {
        Ok((before, after)) if after > before => {
            info!(before, after, "raised the limit on open files");
        }
        Ok(_) => {}
        Err(err) => warn!("cannot raise the limit on open files: {err}"),
    }
    // While the agent is small and has no other thread: the processes it
    // restores are forked from this helper, not from the agent
    // (restore/spawner.rs).
    match crate::restore::start_spawner() {
        Ok(pid) => info!(pid, "spawner started"),
        Err(err) => warn!("restored processes are forked from the agent itself: {err}"),
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // The blocking pool's idle threads wait for work in turn: with the
        // default 10 s, the skeleton budget's check every 500 ms alone kept
        // every thread a burst of adds had started (12 of them after
        // 10,000 adds) alive for good.
        .thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(state_dir, options))
}

async fn serve(state_dir: &Path, options: &DaemonOptions) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Before anything slow: SIGHUP's default action would end the daemon.
    let mut hangup = signal(SignalKind::hangup())?;
    let (watcher, mut wake_events) = SynWatcher::attach()?;
    info!("sk_lookup program attached to this network namespace");
    let registry = Arc::new(
        Registry::new(
            state_dir,
            &options.services_dir,
            Arc::new(Mutex::new(watcher)),
        )?
        .keeping_generations(options.keep_generations)
        .restore_threads(options.restore_threads)
        .with_skeleton_budget(options.skeleton_budget),
    );
    registry.restore_registered().await;
    // The services directory is applied before the control socket answers,
    // so the first `status` shows every declared service.
    log_reload(registry.reload().await, "start");

    let control = control_server::bind(state_dir)?;
    tokio::spawn(control_server::serve(control, registry.clone()));
    tokio::spawn(reaper::reap_orphans());
    tokio::spawn(skeleton_budget::enforce(registry.clone()));
    tokio::spawn(log_rotation::rotate_logs(
        registry.clone(),
        state_dir.join("logs"),
        options.log_max_bytes,
    ));
    if let Some(addr) = options.metrics {
        let registry = registry.clone();
        tokio::spawn(async move {
            if let Err(err) = metrics::serve(addr, registry).await {
                warn!("metrics on {addr}: {err}");
            }
        });
        info!("metrics on http://{addr}/metrics");
    }

    // A thread of its own, at real-time priority: it runs the moment the first
    // SYN arrives, ahead of the client that sent it (which otherwise kept this
    // CPU a while: docs/kernel-facts.md, Costs that shaped the wake path), and
    // hands the wake straight to the restore pool.
    let wake_registry = registry.clone();
    std::thread::Builder::new()
        .name("persist-wakes".into())
        .spawn(move || {
            if let Err(err) = crate::sys::sched::set_current_thread_realtime(true) {
                warn!("wake events at ordinary priority: {err}");
            }
            loop {
                match wake_events.next_batch() {
                    Ok(events) => events.iter().for_each(|event| wake_registry.wake(event)),
                    Err(err) => {
                        warn!("wake events: {err}");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            }
        })
        .context("starting the wake-event thread")?;

    // systemd's Type=notify: from here every registered port is steered and
    // woken, and the control socket answers.
    notify_service_manager(sd_notify::NotifyState::Ready);
    let mut terminate = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = terminate.recv() => {
                info!("SIGTERM: exiting");
                break;
            }
            _ = tokio::signal::ctrl_c() => {
                info!("SIGINT: exiting");
                break;
            }
            _ = hangup.recv() => {
                let registry = registry.clone();
                tokio::spawn(async move { log_reload(registry.reload().await, "SIGHUP") });
            }
        }
    }
    notify_service_manager(sd_notify::NotifyState::Stopping);
    let left = tokio::task::spawn_blocking(move || registry.finish_pagers(PAGER_FINISH_TIMEOUT))
        .await
        .unwrap_or(0);
    if left > 0 {
        warn!(
            left,
            "exiting before every pager finished: those processes wait on their next missing page until a restarted daemon kills them"
        );
    }
    let _ = fs::remove_file(crate::control::socket_path(state_dir));
    Ok(())
}

/// Logs what a reload of the services directory did.
fn log_reload(outcome: Result<ReloadReport, TrustError>, cause: &str) {
    match outcome {
        Ok(report) if report.is_clean() => {
            info!(
                "{cause}: services directory: {}",
                report.to_string().replace('\n', "; ")
            )
        }
        Ok(report) => {
            warn!(
                "{cause}: services directory: {}",
                report.to_string().replace('\n', "; ")
            )
        }
        Err(err) => warn!("{cause}: services directory not applied: {err}"),
    }
}

/// Tells the service manager that started the daemon (`NOTIFY_SOCKET`, set
/// by systemd for a `Type=notify` unit) about a change of state; nothing
/// without it.
fn notify_service_manager(state: sd_notify::NotifyState<'_>) {
    if let Err(err) = sd_notify::notify(&[state]) {
        warn!("notifying the service manager through NOTIFY_SOCKET: {err}");
    }
}

/// The directories of a state directory, each created (mode 0700) when
/// missing and refused when not trusted.
const STATE_SUBDIRS: [&str; 4] = ["services", "images", "run", "logs"];

/// Creates the state directory and its subdirectories where missing (mode
/// 0700), and checks that each is trusted ([`persist_common::trust`]):
/// whoever can write any of them can make the daemon run commands as root.
/// An existing directory with another owner or a writable mode is refused,
/// never repaired: that is the administrator's call, and the files already
/// in it may be hostile. Returns the state directory's resolved path.
fn prepare_state_dir(state_dir: &Path) -> Result<PathBuf, TrustError> {
    let resolved = create_trusted_dir(state_dir)?;
    for name in STATE_SUBDIRS {
        create_trusted_dir(&resolved.join(name))?;
    }
    Ok(resolved)
}

/// How long a stopping daemon waits for the pagers of restored processes to
/// copy in their remaining pages (a few MiB take milliseconds).
const PAGER_FINISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Holds an exclusive lock on `STATE_DIR/agent.lock` for the daemon's life,
/// so two daemons never manage the same services.
fn lock_state_dir(state_dir: &Path) -> Result<nix::fcntl::Flock<fs::File>> {
    let path = state_dir.join("agent.lock");
    // A daemon that just exited holds its lock a moment longer: its spawner
    // shares its descriptors until it sees it gone (restore/spawner.rs).
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let mut file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    loop {
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((unlocked, _)) if std::time::Instant::now() < deadline => {
                file = unlocked;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(_) => bail!(
                "another persist daemon is already running on {}",
                state_dir.display()
            ),
        }
    }
}

/// How long a starting daemon waits for the lock of its state directory.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
