//! One task per service: the wake path, the idle path and the stop path of
//! that service, in the order they happen.
//!
//! A parked service has no process; the agent holds its listener, so SYNs
//! queue there. A wake (a BPF event, or connections found queued) starts the
//! service; the idle timer or a `remove` stops it and parks it again.
//!
//! Here: the task's types and its event loop (`run_process`); the wake path
//! in `wake.rs`, parking (and keeping the state) in `keep.rs`, the listener's
//! backlog in `backlog.rs`, the inetd mode's own loop in `inetd.rs`. When a
//! service is idle and what an exit means are plain functions, in
//! `daemon/idle.rs` and `daemon/exits.rs`.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use persist_common::bpf::BpfState;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

mod backlog;
mod generations;
mod inetd;
mod keep;
mod wake;

pub use generations::GenerationsCommand;

use super::SharedWatcher;
use super::exits::{AfterExit, ExitHistory};
use super::generations::{Generation, Generations};
use super::idle;
use super::listener;
use super::metrics::Metrics;
use super::restore_worker::{RestoreWorker, ResumeTrigger, Resumed, WorkerReport};
use super::run_state::{Adopted, RunStateDir};
use super::skeleton_budget::Order;
use crate::service::{KeepSkeleton, ServiceMode, ServiceSpec};
use crate::sys::pidfd::PidFd;

/// How long a stopped service gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a service that failed to start stays failed before the next SYN may retry.
const RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// How many times (10 ms apart) the supervisor looks for the outcome of a
/// dead restored process's pager.
const PAGER_OUTCOME_POLLS: u32 = 100;

/// A service's lifecycle state as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No process; the next SYN wakes it.
    Parked,
    /// Being started.
    Waking,
    /// Its process runs.
    Running,
    /// Being stopped.
    Stopping,
    /// The last wake failed (`error` says why); the next SYN tries again.
    Failed,
    /// The image was taken on another kernel build or CPU and does not
    /// restore here (`error` says which); the next SYN tries again, so a
    /// replaced image is picked up.
    Stale,
}

impl State {
    /// The name `status` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Parked => "parked",
            Self::Waking => "waking",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Failed => "failed",
            Self::Stale => "stale",
        }
    }
}

/// What the supervisor publishes for `status`.
#[derive(Debug, Clone)]
pub struct Published {
    /// Lifecycle state.
    pub state: State,
    /// Main pid, if a process runs.
    pub pid: Option<i32>,
    /// Session ids of every process the service runs (for RSS accounting).
    pub sessions: Vec<i32>,
    /// Times the service was woken.
    pub wakes: u64,
    /// SYN-to-running latency of the last wake.
    pub last_wake_us: Option<u64>,
    /// SYN-to-agent latency of the last wake event (BPF timestamp to the
    /// daemon reading the ring buffer).
    pub last_event_us: Option<u64>,
    /// Duration of the last skeleton resume (snapshot mode's critical path).
    pub last_resume_us: Option<u64>,
    /// Why the service last failed.
    pub error: Option<String>,
    /// The generation the running process was restored from, or the one
    /// the next wake restores (snapshot mode).
    pub generation: Option<Generation>,
    /// What the supervisor did on its own that the owner should know (a
    /// rollback past a generation that crashed).
    pub note: Option<String>,
    /// When it was last woken (the skeleton budget keeps the skeletons of
    /// the most recently woken services).
    pub last_woken: Option<Instant>,
}

/// Messages to a supervisor.
///
/// Kept small: each supervisor's channel allocates room for 32 of them when
/// it is made, for every registered service (a 4 KiB block per service
/// when a command took 120 bytes), so the rare large ones are boxed.
#[derive(Debug)]
pub enum Command {
    /// The BPF program saw a SYN for the parked service.
    Wake {
        /// CLOCK_MONOTONIC of the SYN.
        syn_ns: u64,
    },
    /// A SYN resumed the prepared skeleton straight from the wake-event
    /// thread ([`super::restore_worker::ResumeTrigger`]).
    Resumed {
        /// CLOCK_MONOTONIC of the SYN.
        syn_ns: u64,
        /// The resumed process, or why the resume failed.
        result: Box<Result<Resumed, String>>,
    },
    /// Stop the service now and park it (`persist-agent park`).
    Park {
        /// Answered once parked, or with why not.
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Start the service now (`persist-agent wake`).
    WakeNow {
        /// Answered once running, or with why not.
        done: oneshot::Sender<Result<(), String>>,
    },
    /// A failed service's retry backoff is over: start it if connections
    /// wait (their SYNs came while it was failed and woke nothing).
    Retry,
    /// A request about the kept generations (`history`, `rollback`, `snapshot`).
    Generations(Box<GenerationsCommand>),
    /// The skeleton budget's order for a parked snapshot service
    /// ([`super::skeleton_budget`]); ignored unless parked.
    Skeleton(Order),
    /// Stop the service if it runs and end the supervisor.
    Shutdown {
        /// Answered once the service is stopped.
        done: oneshot::Sender<()>,
    },
}

// Paid by every registered service (docs/scale.md, Agent memory).
const _: () = assert!(std::mem::size_of::<Command>() <= 24);

/// The daemon's handle on a supervisor.
pub struct Handle {
    /// The service, shared with its supervisor.
    pub spec: Arc<ServiceSpec>,
    /// Its slot in the BPF maps.
    pub slot: u32,
    /// Commands to the supervisor.
    pub commands: mpsc::UnboundedSender<Command>,
    /// What it publishes.
    pub published: Arc<Mutex<Published>>,
    /// What its restore thread publishes (snapshot mode).
    pub worker_report: Option<Arc<Mutex<WorkerReport>>>,
    /// Resumes its prepared skeleton on a SYN (snapshot mode).
    pub resume_trigger: Option<ResumeTrigger>,
}

impl Handle {
    /// What routes a SYN's wake to this service, usable without the
    /// registry's lock.
    pub fn waker(&self) -> Waker {
        Waker {
            name: self.spec.name.clone(),
            commands: self.commands.clone(),
            resume_trigger: self.resume_trigger.clone(),
        }
    }
}

/// Routes a SYN's wake to one service.
#[derive(Clone)]
pub struct Waker {
    name: String,
    commands: mpsc::UnboundedSender<Command>,
    resume_trigger: Option<ResumeTrigger>,
}

impl Waker {
    /// Routes a SYN's wake: straight to the restore thread when there is
    /// one (which tells the supervisor what it did), else to the supervisor.
    pub fn wake(self, syn_ns: u64) {
        let Self {
            name,
            commands,
            resume_trigger,
        } = self;
        let Some(trigger) = resume_trigger else {
            let _ = commands.send(Command::Wake { syn_ns });
            return;
        };
        trigger.resume(Box::new(move |outcome| match outcome {
            Some(result) => {
                let result = Box::new(result);
                if let Err(mpsc::error::SendError(Command::Resumed { result, .. })) =
                    commands.send(Command::Resumed { syn_ns, result })
                {
                    // The supervisor is gone: nobody would watch it.
                    kill_stray(&name, *result);
                }
            }
            None => {
                let _ = commands.send(Command::Wake { syn_ns });
            }
        }));
    }
}

/// How a service's process comes to run.
pub enum Starter {
    /// Exec the command with the listener (or per connection, in inetd mode).
    Command {
        /// The service's log, its stdout and stderr ([`crate::service_log`]).
        log: std::path::PathBuf,
    },
    /// Resume a skeleton restored from the service's image.
    Restore {
        /// The restore thread.
        worker: RestoreWorker,
        /// The pristine image and the states `--on-idle keep` kept.
        generations: Generations,
        /// The generation the next wake restores (its skeleton's image).
        next: Generation,
    },
}

/// Who started or resumed a woken service's process.
#[derive(Debug, Clone, Copy)]
enum WokenBy {
    /// The supervisor (exec, inetd, `wake`, or a SYN with no armed skeleton).
    Supervisor,
    /// The restore thread, on the SYN handed to it by the wake-event thread.
    SynThread,
}

impl WokenBy {
    fn as_str(self) -> &'static str {
        match self {
            Self::Supervisor => "supervisor",
            Self::SynThread => "syn-thread",
        }
    }
}

/// A process just started or resumed for a wake.
struct Started {
    pid: i32,
    pidfd: Arc<PidFd>,
    /// Init of its private pid namespace, if it has one.
    namespace_init: Option<i32>,
    /// How long the resume of a restored process took.
    resume_us: Option<u64>,
    /// When it was running (CLOCK_MONOTONIC), if known more precisely than
    /// "when the supervisor heard of it".
    running_at_ns: Option<u64>,
}

impl From<Resumed> for Started {
    fn from(resumed: Resumed) -> Self {
        Self {
            pid: resumed.pid,
            pidfd: resumed.pidfd,
            namespace_init: resumed.init_pid,
            resume_us: Some(resumed.timings.resume.as_micros() as u64),
            running_at_ns: Some(resumed.resumed_at_ns),
        }
    }
}

/// A process the supervisor watches.
struct Child {
    pid: i32,
    /// Its pidfd; a restored process's pager holds the same.
    exited: AsyncFd<Arc<PidFd>>,
    /// Init of the process's private pid namespace, killed with it.
    namespace_init: Option<i32>,
}

impl Child {
    fn new(pid: i32, pidfd: Arc<PidFd>) -> std::io::Result<Self> {
        Ok(Self {
            pid,
            exited: crate::sys::async_fd::watch(pidfd)?,
            namespace_init: None,
        })
    }

    /// Waits for the process to exit; its status, when it is our child.
    async fn wait(&self) -> Option<nix::sys::wait::WaitStatus> {
        let _ = self.exited.readable().await;
        reap(&self.exited)
    }

    fn signal(&self, signal: Signal) {
        if signal == Signal::SIGKILL {
            // Every process of a tree by pid, children first, whatever
            // group it moved to: no worker outlives its service.
            crate::process_tree::kill_tree(self.pid);
        }
        // The whole session: a service's workers go with it.
        if nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid), signal).is_err() {
            let _ = self.exited.get_ref().send_signal(signal);
        }
        if let Some(init) = self.namespace_init.filter(|_| signal == Signal::SIGKILL) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(init), signal);
        }
    }
}

/// Collects the exit status of our own child; another process's exit is
/// collected by its parent.
fn reap(pidfd: &AsyncFd<Arc<PidFd>>) -> Option<nix::sys::wait::WaitStatus> {
    crate::sys::spawn::reap(pidfd.get_ref(), false)
}

/// The supervisor task's state.
pub struct Supervisor {
    spec: Arc<ServiceSpec>,
    slot: u32,
    /// Shared with the service's restore worker.
    listener: Arc<OwnedFd>,
    /// The other listeners of the port the agent holds: the rest of the
    /// listener's `SO_REUSEPORT` group (usually none). The kernel queues a
    /// SYN steered to the listener in any member of its group.
    group: Vec<OwnedFd>,
    watcher: SharedWatcher,
    run_state: Arc<RunStateDir>,
    metrics: Arc<Metrics>,
    published: Arc<Mutex<Published>>,
    child: Option<Child>,
    running_since: Instant,
    /// When a park last could not keep the state (`--on-idle keep`), and
    /// how many times in a row: the service runs on, and the idle park is
    /// tried again after an idle timeout, doubled at each failure.
    keep_failed: Option<(Instant, u32)>,
    /// Consecutive starts after which the process exited at once.
    exits: ExitHistory,
    starter: Starter,
    /// Parks asked for while a SYN's resume was on its way to us: done once
    /// that resume is heard of.
    parks_when_resumed: Vec<oneshot::Sender<Result<(), String>>>,
    /// Our own command queue, to retry a failed service after its backoff.
    retry: mpsc::WeakUnboundedSender<Command>,
    /// When the woken service started running with the agent's deep
    /// backlog still on its listener, until the wake's burst is over.
    deep_backlog_since: Option<Instant>,
    /// The generation the running process was restored from (unknown for
    /// a process a previous daemon started).
    running_generation: Option<Generation>,
}

/// What every supervisor shares with the daemon.
#[derive(Clone)]
pub struct Shared {
    /// The BPF maps.
    pub watcher: SharedWatcher,
    /// Where running processes are recorded.
    pub run_state: Arc<RunStateDir>,
    /// The exported metrics.
    pub metrics: Arc<Metrics>,
}

impl Supervisor {
    /// Starts the supervisor task of a registered service. `adopted` is a
    /// process a previous daemon started and that still runs. `group` are
    /// the other listeners of the port the agent holds.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        spec: Arc<ServiceSpec>,
        slot: u32,
        listener: Arc<OwnedFd>,
        group: Vec<OwnedFd>,
        shared: Shared,
        adopted: Option<Adopted>,
        starter: Starter,
    ) -> Handle {
        let (commands, receiver) = mpsc::unbounded_channel();
        let published = Arc::new(Mutex::new(Published {
            state: State::Parked,
            pid: None,
            sessions: Vec::new(),
            wakes: 0,
            last_wake_us: None,
            last_event_us: None,
            last_resume_us: None,
            error: None,
            generation: match &starter {
                Starter::Restore { next, .. } => Some(*next),
                Starter::Command { .. } => None,
            },
            note: None,
            last_woken: None,
        }));
        let mut supervisor = Self {
            spec: spec.clone(),
            slot,
            listener,
            group,
            watcher: shared.watcher,
            run_state: shared.run_state,
            metrics: shared.metrics,
            published: published.clone(),
            child: None,
            running_since: Instant::now(),
            keep_failed: None,
            exits: ExitHistory::default(),
            starter,
            parks_when_resumed: Vec::new(),
            retry: commands.downgrade(),
            deep_backlog_since: None,
            running_generation: None,
        };
        let (worker_report, resume_trigger) = match &supervisor.starter {
            Starter::Restore { worker, .. } => (Some(worker.report()), Some(worker.trigger())),
            Starter::Command { .. } => (None, None),
        };
        if let Some(adopted) = adopted {
            match Child::new(adopted.record.pid, Arc::new(adopted.pidfd)) {
                Ok(child) => {
                    info!(service = %spec.name, pid = child.pid, "found the running service again");
                    supervisor.child = Some(child);
                    supervisor.set_bpf_state(BpfState::Running);
                    supervisor.publish(State::Running, Some(adopted.record.pid));
                }
                Err(err) => warn!(service = %spec.name, "cannot watch adopted pid: {err}"),
            }
        } else {
            supervisor.hold_backlog();
        }
        let name = spec.name.clone();
        tokio::spawn(async move {
            let result = match supervisor.spec.mode {
                ServiceMode::Exec | ServiceMode::Snapshot => supervisor.run_process(receiver).await,
                ServiceMode::Inetd => supervisor.run_inetd(receiver).await,
            };
            if let Err(err) = result {
                warn!(service = %name, "supervisor ended: {err}");
            }
        });
        Handle {
            spec,
            slot,
            commands,
            published,
            worker_report,
            resume_trigger,
        }
    }

    /// The exec and snapshot modes: one long-running process that gets the listener.
    ///
    /// Its future lives in the service's task for as long as the service
    /// is registered, and is as large as the largest future it awaits: the
    /// rare large ones (parking with a checkpoint, a generations request, a
    /// stop) are boxed, so that a parked service's task stays under 1 KiB
    /// instead of 2 KiB.
    async fn run_process(
        &mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) -> std::io::Result<()> {
        let mut idle_check = tokio::time::interval(self.idle_check_period());
        idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let Some(child) = &self.child else {
                // Parked. Connections that queued while we were stopping would
                // otherwise wait for a SYN that never comes.
                if self.state() == State::Parked && self.has_pending() {
                    self.start(None).await;
                    continue;
                }
                match commands.recv().await {
                    Some(Command::Wake { syn_ns }) => self.start(Some(syn_ns)).await,
                    Some(Command::Resumed { syn_ns, result }) => {
                        self.heard_of_syn_resume();
                        self.publish(State::Waking, None);
                        self.started(
                            (*result).map(Started::from),
                            Some(syn_ns),
                            WokenBy::SynThread,
                        );
                        if !self.parks_when_resumed.is_empty() {
                            let parked = if self.child.is_some() {
                                Box::pin(self.park_now()).await
                            } else {
                                Ok(())
                            };
                            for done in self.parks_when_resumed.drain(..) {
                                let _ = done.send(parked.clone());
                            }
                        }
                    }
                    Some(Command::Park { done }) if self.syn_resume_unreported() => {
                        // Parking now would be forgotten once the news arrives.
                        self.parks_when_resumed.push(done);
                    }
                    Some(Command::Park { done }) => drop(done.send(Ok(()))),
                    Some(Command::Retry) => {
                        if matches!(self.state(), State::Failed | State::Stale)
                            && self.has_pending()
                        {
                            self.start(None).await;
                        }
                    }
                    Some(Command::WakeNow { done }) => {
                        self.start(None).await;
                        let published = self.published.lock().expect("published lock");
                        let _ = done.send(published.error.clone().map_or(Ok(()), Err));
                    }
                    Some(Command::Generations(request)) => {
                        Box::pin(self.generations_request(*request)).await
                    }
                    Some(Command::Skeleton(order)) => self.skeleton_order(order),
                    Some(Command::Shutdown { done }) => {
                        let _ = done.send(());
                        return Ok(());
                    }
                    None => return Ok(()),
                }
                continue;
            };
            tokio::select! {
                status = child.wait() => {
                    let pid = child.pid;
                    info!(service = %self.spec.name, pid, ?status, "service exited");
                    self.child = None;
                    if matches!(self.starter, Starter::Restore { .. }) {
                        // The root's exit is the service's: a worker left
                        // in its group must not hold the port on (the
                        // group's id cannot be a new process's meanwhile).
                        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                    }
                    let ran_for = self.running_since.elapsed();
                    let wake_failure = Box::pin(self.wake_failure(pid)).await;
                    if wake_failure.is_none() && self.roll_back_after_crash(status, ran_for) {
                        self.prepare_next();
                        self.park();
                        continue;
                    }
                    self.prepare_next();
                    match self.exits.after_exit(ran_for, wake_failure) {
                        AfterExit::Park => self.park(),
                        AfterExit::Fail(err) => self.fail_start(err),
                    }
                }
                () = tokio::time::sleep(backlog::BURST_CHECK), if self.deep_backlog_since.is_some() => {
                    self.give_back_backlog_after_burst();
                }
                _ = idle_check.tick(), if self.spec.idle_timeout.is_some() => {
                    if self.is_idle() {
                        info!(service = %self.spec.name, "idle: parking");
                        // A failure is published; the service runs on.
                        let _ = Box::pin(self.park_now()).await;
                    }
                }
                command = commands.recv() => match command {
                    Some(Command::Wake { .. } | Command::Retry | Command::Skeleton(_)) => {}
                    Some(Command::Resumed { result, .. }) => {
                        self.heard_of_syn_resume();
                        kill_stray(&self.spec.name, *result);
                    }
                    Some(Command::WakeNow { done }) => drop(done.send(Ok(()))),
                    Some(Command::Park { done }) => {
                        let _ = done.send(Box::pin(self.park_now()).await);
                    }
                    Some(Command::Generations(request)) => Box::pin(self.generations_request(*request)).await,
                    Some(Command::Shutdown { done }) => {
                        Box::pin(self.stop()).await;
                        let _ = done.send(());
                        return Ok(());
                    }
                    // The daemon is going away: the service keeps running.
                    None => return Ok(()),
                },
            }
        }
    }

    /// Snapshot mode: prepares the skeleton of the next wake right away,
    /// or with `--keep-skeleton never` only names its image (the wake
    /// prepares it: a cold wake). A service just woken keeps its skeleton
    /// under an `auto` budget too: the budget releases the least recently
    /// woken ones. The process is gone: its record goes first, as the
    /// restore thread records the skeleton once ready (cleared after that,
    /// a skeleton left by a killed daemon would hold the port unknown to
    /// the next).
    fn prepare_next(&self) {
        if let Starter::Restore {
            worker,
            generations,
            next,
        } = &self.starter
        {
            self.run_state.clear(&self.spec.name);
            let image = generations.path(*next);
            match self.keep_skeleton() {
                KeepSkeleton::Never => worker.park_cold(image),
                KeepSkeleton::Always | KeepSkeleton::Auto => worker.prepare(image),
            }
        }
    }

    /// The service's `--keep-skeleton`.
    fn keep_skeleton(&self) -> KeepSkeleton {
        self.spec
            .snapshot
            .as_ref()
            .map_or(KeepSkeleton::default(), |s| s.keep_skeleton)
    }

    /// Releases or prepares the skeleton of a parked service, as the budget
    /// orders. A SYN may be resuming it meanwhile: the restore thread
    /// checks again, and a skeleton being resumed is never released.
    fn skeleton_order(&self, order: Order) {
        let Starter::Restore { worker, .. } = &self.starter else {
            return;
        };
        if self.child.is_some() || self.state() != State::Parked || self.syn_resume_unreported() {
            return;
        }
        match order {
            Order::Release if self.keep_skeleton() != KeepSkeleton::Always => {
                worker.release_skeleton();
            }
            Order::Prepare if self.keep_skeleton() != KeepSkeleton::Never => worker.restock(),
            Order::Release | Order::Prepare => {}
        }
    }

    /// Stops the running process: SIGTERM, then SIGKILL after the grace period.
    async fn stop(&mut self) {
        let Some(child) = self.child.take() else {
            return;
        };
        self.publish(State::Stopping, Some(child.pid));
        self.set_bpf_state(BpfState::Stopping);
        if matches!(self.starter, Starter::Restore { .. }) {
            // Its state is in the image (or was just saved): no grace needed.
            child.signal(Signal::SIGKILL);
            child.wait().await;
            return;
        }
        child.signal(Signal::SIGTERM);
        if tokio::time::timeout(STOP_GRACE, child.wait())
            .await
            .is_err()
        {
            warn!(service = %self.spec.name, pid = child.pid, "did not stop on SIGTERM; killing it");
            child.signal(Signal::SIGKILL);
            child.wait().await;
        }
    }

    /// No process runs any more: the next SYN wakes the service again.
    fn park(&mut self) {
        // A snapshot service's record now names its next skeleton.
        if matches!(self.starter, Starter::Command { .. }) {
            self.run_state.clear(&self.spec.name);
        }
        self.hold_backlog();
        self.publish(State::Parked, None);
        self.set_bpf_state(BpfState::Parked);
    }

    /// Idle as [`idle::is_idle`] decides from what is observed now.
    fn is_idle(&self) -> bool {
        let Some(timeout) = self.spec.idle_timeout else {
            return false;
        };
        let stats = self.watcher.lock().expect("watcher lock").stats(self.slot);
        let observed = idle::Observed {
            since_syn: (stats.last_syn_ns != 0)
                .then(|| Duration::from_micros(since_monotonic_us(stats.last_syn_ns))),
            running_for: self.running_since.elapsed(),
            keep_failures: self
                .keep_failed
                .map(|(failed, failures)| (failures, failed.elapsed())),
            queued: self.has_pending(),
        };
        idle::is_idle(timeout, &observed) && !idle::has_established_connections(self.spec.port)
    }

    /// True when connections wait in the accept queue of the listener or
    /// of another member of its group.
    fn has_pending(&self) -> bool {
        listener::has_pending(&self.listener) || self.group.iter().any(listener::has_pending)
    }

    /// The listener and the other members of its group.
    fn listeners(&self) -> impl Iterator<Item = &OwnedFd> {
        std::iter::once(&*self.listener).chain(&self.group)
    }

    fn idle_check_period(&self) -> Duration {
        idle::check_period(self.spec.idle_timeout)
    }

    fn state(&self) -> State {
        self.published.lock().expect("published lock").state
    }

    fn publish(&self, state: State, pid: Option<i32>) {
        let mut published = self.published.lock().expect("published lock");
        published.state = state;
        published.pid = pid;
        published.sessions = pid.into_iter().collect();
    }

    fn set_bpf_state(&self, state: BpfState) {
        if let Err(err) = self
            .watcher
            .lock()
            .expect("watcher lock")
            .set_state(self.slot, state)
        {
            warn!(service = %self.spec.name, "{err}");
        }
    }
}

/// A process a SYN resumed while the service already ran: never two
/// instances, so it is killed.
pub fn kill_stray(service: &str, result: Result<Resumed, String>) {
    if let Ok(resumed) = result {
        warn!(
            service,
            pid = resumed.pid,
            "a second process was resumed: killed"
        );
        crate::process_tree::kill_tree(resumed.pid);
        let _ = resumed.pidfd.send_signal(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Microseconds from a CLOCK_MONOTONIC timestamp (as BPF records them) to now.
pub fn since_monotonic_us(then_ns: u64) -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|ts| ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
        .unwrap_or(then_ns);
    now.saturating_sub(then_ns) / 1000
}
