//! The restore work of one snapshot-mode service, run by the daemon's
//! restore pool ([`RestorePool`]).
//!
//! A service's jobs run in order on a pool thread: prepare its skeleton (a
//! restored process stopped before its first instruction, mapped but with
//! nothing resident), resume it when a SYN arrives, then serve its pages
//! until they are all in (on a thread that left the pool meanwhile). The
//! skeleton is prepared right after parking, so a wake only pays for the
//! resume. A prepared skeleton is released to a group stop and needs no
//! thread while parked; one that cannot be released stays traced by the
//! thread that built it, which serves that service alone until it resumes
//! (ptrace ties a tracee to its tracer thread). The SYN's wake comes straight
//! from the daemon's wake-event thread ([`ResumeTrigger`]), which lets the
//! process run itself, and a pool thread that armed a skeleton waits for its
//! next job at real-time priority, so that the rest of the resume runs the
//! moment the wake arrives; the supervisor hears of it afterwards.
//!
//! With [`Prefetch::Recorded`], the first wake from an image records the
//! pages the process touches during its first 200 ms, in touch order (those
//! the image does not store included), and stores them beside the image as
//! its working set; later wakes copy that set in bulk just before the resume,
//! so the process does not fault on it. A tree's set names the pages of each
//! of its processes, recorded by each one's pager and copied into each one
//! before the tree runs. A missing, stale or corrupt set (or one of an
//! older format) is ignored (with a warning) and recorded anew on the next
//! wake.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use persist_common::image::{Image, ImageError, PagesByProcess, WorkingSet};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::cold_wake::{self, ColdAhead};
use super::metrics::Metrics;
use super::pagers::{PagerAtWork, Pagers};
use super::restore_pool::{PoolTask, RestorePool};
use super::run_alone;
use super::run_state::{PageSource, RunStateDir};
use crate::files::InheritedFds;
use crate::restore::{
    Continuer, EventJournal, FillGate, Pager, PagerStats, PlannedCopy, RestoreConfig, RestoreError,
    Restored, Skeleton, Timings, WhenCopied, help_each_then,
};
use crate::service::Prefetch;
use crate::snapshot::{listener_backlog_in_image, listener_holders_in_image, place_listeners};
use crate::sys::pidfd::PidFd;
use crate::sys::sched;

/// A resumed process.
#[derive(Debug)]
pub struct Resumed {
    /// Its pid.
    pub pid: i32,
    /// Init of its private pid namespace, if it has one.
    pub init_pid: Option<i32>,
    /// A pidfd for it, shared with its pager.
    pub pidfd: Arc<PidFd>,
    /// How long preparing and resuming took.
    pub timings: Timings,
    /// When it was resumed (CLOCK_MONOTONIC, as BPF stamps SYNs).
    pub resumed_at_ns: u64,
}

/// Microseconds of `duration`, for a log line (0 when there is none).
fn micros(duration: Option<Duration>) -> u64 {
    duration.map_or(0, |d| d.as_micros() as u64)
}

/// CLOCK_MONOTONIC now, in nanoseconds.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
    })
}

/// What the worker publishes for `status` and metrics.
#[derive(Debug, Clone, Default)]
pub struct WorkerReport {
    /// Pid of the prepared skeleton, while parked.
    pub skeleton_pid: Option<i32>,
    /// Pid of the init of the skeleton's pid namespace, if it has one.
    pub skeleton_init_pid: Option<i32>,
    /// Why the last prepare failed.
    pub error: Option<String>,
    /// Whether it failed because the image was taken on another kernel
    /// build or CPU: it will not restore here however often it is tried.
    pub stale: bool,
    /// A restored process its pager killed (a page of the image could not
    /// be served), and why: that wake failed.
    pub wake_error: Option<(i32, String)>,
    /// The restored process whose pager runs, until its outcome is in
    /// `last_pager` or `wake_error`.
    pub serving: Option<i32>,
    /// The backlog the service gave its listener, from the image of the
    /// prepared skeleton.
    pub listener_backlog: Option<u32>,
    /// Pager statistics of the last wake: the root's, except for
    /// `prefetched_pages`, which counts the pages copied ahead of any fault
    /// into every process of a tree.
    pub last_pager: Option<PagerStats>,
    /// SYN resumes the supervisor will hear of but has not yet (it is told
    /// once the first request had its CPU): counted up by the wake thread,
    /// down by the supervisor as it hears, or by the restore thread when
    /// there was no skeleton to resume after all.
    pub syn_resumes_unreported: u32,
    /// Prepares asked for and not yet done: a skeleton is on its way.
    pub prepares_queued: u32,
    /// What the last skeleton the skeleton budget measured cost: its
    /// estimate of the next one's.
    pub last_skeleton_bytes: Option<u64>,
}

impl WorkerReport {
    /// One prepare asked for is done (or will never run).
    fn prepare_done(&mut self) {
        self.prepares_queued = self.prepares_queued.saturating_sub(1);
    }

    /// Counts one SYN resume off: the supervisor heard of it, or there was
    /// no skeleton to resume after all.
    pub fn syn_resume_settled(&mut self) {
        self.syn_resumes_unreported = self.syn_resumes_unreported.saturating_sub(1);
    }
}

/// Whether a service's process already runs when its restore thread starts.
pub enum Running {
    /// No: a first skeleton is prepared.
    No,
    /// Yes, with all its memory.
    Filled,
    /// Yes, adopted while its pages were still coming in: this pager goes
    /// on serving them.
    Filling(Box<Pager>),
}

enum Job {
    /// Serve the pages of an adopted process until they are all in.
    ServeAdopted { pager: Box<Pager> },
    Prepare {
        image: PathBuf,
        /// Told the outcome, after every page of the image was verified.
        checked: Option<oneshot::Sender<Result<(), String>>>,
    },
    Resume {
        reply: oneshot::Sender<Result<Resumed, ResumeRefused>>,
    },
    /// Prepare a skeleton from the current image if the service is parked
    /// with none (its skeleton was released).
    Restock,
    /// Kill the prepared skeleton; the image stays for the next wake.
    Release {
        /// The image of the next wake, when it changed (a park with no
        /// skeleton kept): any skeleton goes. Without it, one that a SYN is
        /// already resuming stays.
        image: Option<PathBuf>,
    },
    /// A SYN arrived: resume the prepared skeleton now, without waiting for
    /// the supervisor (see [`ResumeTrigger`]).
    ResumeOnSyn {
        then: EarlyReply,
        /// Counted by the wake thread, which may let the process run
        /// before this thread gets the job.
        at_work: PagerAtWork,
    },
}

/// What becomes of a resume asked for by a SYN: `Some` with the outcome
/// when a skeleton was resumed (or prepared then resumed: a cold wake), or
/// could not be; `None` when the skeleton of this park was already resumed
/// or there is no image to prepare one from (the supervisor then wakes the
/// service its usual way, or ignores the SYN as it runs).
pub type EarlyReply = Box<dyn FnOnce(Option<Result<Resumed, String>>) + Send>;

/// What [`RestoreWorker::resume`] did instead of resuming a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeRefused {
    /// A SYN already resumed the skeleton of this park: the supervisor is
    /// told of that wake separately, and no second process may start.
    AlreadyResumed,
    /// The skeleton could not be prepared or resumed, for this reason.
    Failed(String),
}

/// Sends a SYN's wake straight to a restore thread, so that the resume does not
/// wait for the daemon's async tasks to be scheduled (that hop cost hundreds of
/// µs, often behind the client that sent the SYN: docs/kernel-facts.md, Costs
/// that shaped the wake path).
#[derive(Clone)]
pub struct ResumeTrigger {
    jobs: Jobs,
    armed: ArmedWake,
    report: Arc<Mutex<WorkerReport>>,
    pagers: Arc<Pagers>,
}

impl ResumeTrigger {
    /// Resumes the prepared skeleton, then calls `then` with what happened.
    ///
    /// The calling thread does what it can itself, as the restore thread may
    /// take long to wake up on another CPU: it copies the working set in (with
    /// the restore thread once that is up), then lets the process run. The
    /// restore thread then only takes over its pager. The job goes first: told
    /// only after the resume, the restore thread helped with nothing and the
    /// first byte came later (docs/kernel-facts.md, Costs that shaped the wake
    /// path).
    pub fn resume(&self, then: EarlyReply) {
        // Counted before the process can answer: a park asked for after the
        // answer must wait for the news.
        self.report
            .lock()
            .expect("report lock")
            .syn_resumes_unreported += 1;
        let at_work = self.pagers.start();
        if let Err(Job::ResumeOnSyn { then, .. }) =
            self.jobs.send(Job::ResumeOnSyn { then, at_work })
        {
            self.report
                .lock()
                .expect("report lock")
                .syn_resume_settled();
            then(None);
            return;
        }
        let armed = self.armed.lock().expect("armed lock").clone();
        let Some(continuer) = armed.continuer else {
            return;
        };
        // On failure the restore thread resumes it, and reports why not.
        armed.copying.store(true, Ordering::Release);
        continue_each_when_copied(
            continuer,
            armed.copies,
            armed.run_alone,
            std::thread::current().id(),
        );
    }
}

/// Copies each process's pages of the working set in and lets it run as
/// soon as its own are in, in the order a tree is let run: the descendants
/// last first (children before their parents), the root last. A worker
/// that answers the wake's request thus waits for its own pages only, not
/// for every process's (docs/process-trees.md, The wake's critical path).
/// A copy that fails stops there: the restore thread then copies and
/// continues the rest (and reports why not).
///
/// When the first process let run is `run_alone` and has pages to copy,
/// only it is: the restore thread lets it run alone until it blocks, then
/// copies and continues the others ([`Worker::prefetch_before_resume`]).
/// This thread, which every service's SYNs share, never waits for that.
///
/// Each step runs on whichever thread copied the last page it waited for;
/// one other than `wake_thread` (the restore thread, at real-time priority
/// while armed) becomes ordinary right after it lets a process run, or the
/// process, woken on its CPU, would wait for it. Not before: made ordinary
/// first, it was at times preempted (by the client, at ordinary priority
/// too) before the continue, which then came 20–30 µs later.
fn continue_each_when_copied(
    root: Continuer,
    copies: Vec<(u32, PlannedCopy)>,
    run_alone: Option<u32>,
    wake_thread: std::thread::ThreadId,
) {
    let mut copies: std::collections::HashMap<u32, PlannedCopy> = copies.into_iter().collect();
    let ordinary = move || {
        if std::thread::current().id() != wake_thread {
            let _ = sched::set_current_thread_realtime(false);
        }
    };
    let mut steps: Vec<(Option<PlannedCopy>, WhenCopied)> = Vec::new();
    let descendants: Vec<(u32, Continuer)> = (1u32..).zip(root.descendants().to_vec()).collect();
    for (index, descendant) in descendants.into_iter().rev() {
        let copy = copies.remove(&index);
        let alone = steps.is_empty() && copy.is_some() && run_alone == Some(index);
        steps.push((
            copy,
            Box::new(move || {
                let _ = descendant.try_continue_process();
                ordinary();
            }),
        ));
        if alone {
            help_each_then(steps);
            return;
        }
    }
    steps.push((
        copies.remove(&0),
        Box::new(move || {
            let _ = root.try_continue_process();
            ordinary();
        }),
    ));
    help_each_then(steps);
}

/// What the wake thread may do for the armed skeleton on a SYN.
#[derive(Clone, Default)]
struct Armed {
    /// The working-set copies planned for it: for each process of the tree
    /// whose pages the set names, its index in tree order and its copy.
    copies: Vec<(u32, PlannedCopy)>,
    /// How to let it run (the whole tree), once `copies` are done, when
    /// nothing else must be copied first.
    continuer: Option<Continuer>,
    /// Set by the wake thread before it starts on `copies`: it copies each
    /// in turn and lets each process run, unless a copy fails.
    copying: Arc<AtomicBool>,
    /// The process of a tree let run alone first (by index in tree order),
    /// if one may be: the last, when it holds the service's listener.
    run_alone: Option<u32>,
    /// How long it ran alone on the wake, for the wake's log line.
    ran_alone: Arc<Mutex<Option<run_alone::RanAlone>>>,
}

type ArmedWake = Arc<Mutex<Armed>>;

/// What every restore thread shares with the daemon.
#[derive(Clone)]
pub struct WorkerShared {
    /// The daemon's metrics.
    pub metrics: Arc<Metrics>,
    /// Where the processes of running services are recorded.
    pub run_state: Arc<RunStateDir>,
    /// The pagers at work, which a stopping daemon lets finish.
    pub pagers: Arc<Pagers>,
    /// The threads that run every service's restore work.
    pub pool: Arc<RestorePool>,
}

/// How a service's wakes restore it, from its spec.
#[derive(Debug, Clone, Default)]
pub struct WakeOptions {
    /// Which pages are copied in before the process resumes.
    pub prefetch: Prefetch,
    /// Reopen recorded files that changed since the checkpoint (other inode
    /// or device) instead of failing the wake.
    pub accept_changed_files: bool,
    /// The service's log, which the daemon opened for it as its stdout and
    /// stderr: reopened as root, not as the service's user.
    pub log: Option<PathBuf>,
}

/// The daemon's handle on a service's restore work; dropping it (and every
/// [`ResumeTrigger`]) ends that work and kills an unused skeleton.
pub struct RestoreWorker {
    jobs: Jobs,
    report: Arc<Mutex<WorkerReport>>,
    armed: ArmedWake,
    pagers: Arc<Pagers>,
}

impl RestoreWorker {
    /// Sets up the restore work of the service `name` listening through
    /// `listener` and the other members of its group `group`, which every
    /// restored process gets back at their descriptors, run by
    /// `shared.pool`. It prepares nothing until told to
    /// ([`RestoreWorker::prepare_checked`]); the pages of an adopted process
    /// still filling are served first.
    pub fn spawn(
        name: &str,
        port: u16,
        listener: Arc<OwnedFd>,
        group: Vec<OwnedFd>,
        running: Running,
        shared: WorkerShared,
        options: WakeOptions,
    ) -> std::io::Result<Self> {
        let report = Arc::new(Mutex::new(WorkerReport::default()));
        let armed = ArmedWake::default();
        let pagers = shared.pagers.clone();
        let worker = Worker {
            name: name.to_owned(),
            port,
            listener,
            group,
            image: None,
            skeleton: None,
            report: report.clone(),
            metrics: shared.metrics,
            run_state: shared.run_state,
            pagers: shared.pagers,
            pool: shared.pool.clone(),
            prefetch: options.prefetch,
            accept_changed_files: options.accept_changed_files,
            log: options.log,
            plan: WakePlan::Lazy,
            resumed_on_syn: false,
            resumed: false,
            verify_next: false,
            armed: armed.clone(),
        };
        let jobs = Jobs::new(Arc::new(Service {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                scheduled: false,
                pinned: false,
                senders: 0,
                dead: false,
            }),
            pinned_job: Condvar::new(),
            worker: Mutex::new(Some(worker)),
            pool: shared.pool,
        }));
        let worker = Self {
            jobs,
            report,
            armed,
            pagers,
        };
        if let Running::Filling(pager) = running {
            let _ = worker.jobs.send(Job::ServeAdopted { pager });
        }
        Ok(worker)
    }

    /// Prepares a skeleton from `image` for the next wake (in the background).
    pub fn prepare(&self, image: PathBuf) {
        self.send_prepare(image, None);
    }

    /// Parks with no skeleton: the next wake prepares one from `image`
    /// (a cold wake), and any skeleton prepared before is killed.
    pub fn park_cold(&self, image: PathBuf) {
        let _ = self.jobs.send(Job::Release { image: Some(image) });
    }

    /// Prepares a skeleton again for a service parked without one (it was
    /// released); nothing if one is there or the service was woken since.
    pub fn restock(&self) {
        self.report.lock().expect("report lock").prepares_queued += 1;
        if self.jobs.send(Job::Restock).is_err() {
            self.prepare_done();
        }
    }

    fn prepare_done(&self) {
        self.report.lock().expect("report lock").prepare_done();
    }

    /// Kills the prepared skeleton to give its memory back; the image stays,
    /// and the next wake prepares one from it. A skeleton a SYN is already
    /// resuming stays.
    pub fn release_skeleton(&self) {
        let _ = self.jobs.send(Job::Release { image: None });
    }

    fn send_prepare(&self, image: PathBuf, checked: Option<oneshot::Sender<Result<(), String>>>) {
        self.report.lock().expect("report lock").prepares_queued += 1;
        if self.jobs.send(Job::Prepare { image, checked }).is_err() {
            self.prepare_done();
        }
    }

    /// Prepares a skeleton from `image` after checking the whole image as
    /// `restore` does (every page run's checksum included); the answer says
    /// whether the service can be woken.
    pub fn prepare_checked(&self, image: PathBuf) -> oneshot::Receiver<Result<(), String>> {
        let (reply, answer) = oneshot::channel();
        self.send_prepare(image, Some(reply));
        answer
    }

    /// Resumes the prepared skeleton (preparing one first if needed).
    pub async fn resume(&self) -> Result<Resumed, ResumeRefused> {
        let stopped = || ResumeRefused::Failed("the restore thread has stopped".to_owned());
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Resume { reply })
            .map_err(|_| stopped())?;
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// What the worker publishes, shared.
    pub fn report(&self) -> Arc<Mutex<WorkerReport>> {
        self.report.clone()
    }

    /// A handle that resumes the skeleton on a SYN, from any thread.
    pub fn trigger(&self) -> ResumeTrigger {
        ResumeTrigger {
            jobs: self.jobs.clone(),
            armed: self.armed.clone(),
            report: self.report.clone(),
            pagers: self.pagers.clone(),
        }
    }
}

/// One service's jobs and restore state, run by the pool.
struct Service {
    queue: Mutex<Queue>,
    /// Wakes the thread pinned to the service by its traced skeleton.
    pinned_job: Condvar,
    /// Taken and dropped (an unused skeleton killed) once no handle is left.
    worker: Mutex<Option<Worker>>,
    pool: Arc<RestorePool>,
}

struct Queue {
    jobs: VecDeque<Job>,
    /// A pool thread runs the service's jobs, or was asked to.
    scheduled: bool,
    /// The thread running them stays with the service: it traces its
    /// skeleton.
    pinned: bool,
    /// Handles that may queue jobs ([`Jobs`]).
    senders: usize,
    /// A job panicked: the service's work is over, and jobs are refused.
    dead: bool,
}

/// Queues jobs of one service, and has a pool thread run them.
struct Jobs {
    service: Arc<Service>,
}

impl Jobs {
    fn new(service: Arc<Service>) -> Self {
        service.queue.lock().expect("queue lock").senders += 1;
        Self { service }
    }

    /// Queues `job`; gives it back when the service's work is over.
    fn send(&self, job: Job) -> Result<(), Job> {
        let mut queue = self.service.queue.lock().expect("queue lock");
        if queue.dead {
            return Err(job);
        }
        queue.jobs.push_back(job);
        self.service.schedule(&mut queue);
        Ok(())
    }
}

impl Clone for Jobs {
    fn clone(&self) -> Self {
        Self::new(self.service.clone())
    }
}

impl Drop for Jobs {
    fn drop(&mut self) {
        let mut queue = self.service.queue.lock().expect("queue lock");
        queue.senders -= 1;
        if queue.senders == 0 && !queue.dead {
            // The last handle: a thread drops the state (and its skeleton).
            self.service.schedule(&mut queue);
        }
    }
}

impl Service {
    /// Has the service's jobs run: by its pinned thread, or a pool thread.
    fn schedule(self: &Arc<Self>, queue: &mut Queue) {
        if queue.pinned {
            self.pinned_job.notify_one();
        } else if !queue.scheduled {
            queue.scheduled = true;
            self.pool.submit(self.clone());
        }
    }

    /// Runs the queued jobs until there are none; a traced skeleton keeps
    /// the thread (out of the pool) until it resumes.
    fn run_jobs(&self, worker: &mut Option<Worker>) {
        loop {
            let job = {
                let mut queue = self.queue.lock().expect("queue lock");
                loop {
                    if let Some(job) = queue.jobs.pop_front() {
                        break job;
                    }
                    let traced = worker.as_ref().is_some_and(Worker::traces_skeleton);
                    if queue.senders == 0 || !traced {
                        queue.scheduled = false;
                        queue.pinned = false;
                        if queue.senders == 0 {
                            drop(queue);
                            // The service is gone: an unused skeleton dies
                            // with its `Drop`.
                            *worker = None;
                        }
                        return;
                    }
                    if !queue.pinned {
                        queue.pinned = true;
                        self.pool.leave();
                    }
                    queue = self.pinned_job.wait(queue).expect("queue lock");
                }
            };
            match worker.as_mut() {
                Some(worker) => worker.handle(job),
                // Over already: the job's reply is dropped unanswered.
                None => drop(job),
            }
        }
    }
}

impl PoolTask for Service {
    fn run(self: Arc<Self>, _pool: &Arc<RestorePool>) {
        let Ok(mut worker) = self.worker.lock() else {
            return;
        };
        let ran =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_jobs(&mut worker)));
        if ran.is_err() {
            let mut queue = self.queue.lock().expect("queue lock");
            queue.dead = true;
            queue.pinned = false;
            // Answered as by a stopped thread: dropped.
            queue.jobs.clear();
            drop(queue);
            *worker = None;
        }
    }
}

struct Worker {
    name: String,
    port: u16,
    /// The listener, shared with the service's supervisor: one descriptor
    /// per service, not two (10,000 services under a limit of 20,000).
    listener: Arc<OwnedFd>,
    /// The other members of the listener's `SO_REUSEPORT` group.
    group: Vec<OwnedFd>,
    image: Option<PathBuf>,
    /// Boxed: most parked services have none (under a skeleton budget),
    /// and every registered service holds a `Worker`.
    skeleton: Option<Box<Skeleton>>,
    report: Arc<Mutex<WorkerReport>>,
    metrics: Arc<Metrics>,
    run_state: Arc<RunStateDir>,
    pagers: Arc<Pagers>,
    /// The pool this service's jobs run in, left while a pager works.
    pool: Arc<RestorePool>,
    prefetch: Prefetch,
    /// Reopen recorded files that changed since the checkpoint.
    accept_changed_files: bool,
    /// The service's log, opened by the daemon for it.
    log: Option<PathBuf>,
    /// What the next wake of the prepared skeleton does about its working set.
    plan: WakePlan,
    /// A SYN resumed the skeleton of this park (cleared by the next prepare).
    resumed_on_syn: bool,
    /// The skeleton of this park was resumed, by a SYN or the supervisor
    /// (cleared by the next prepare or park): a SYN then prepares no other.
    resumed: bool,
    /// The next prepare verifies every page first: the last wake found a
    /// corrupt one, and a skeleton that would die on it must not be armed.
    verify_next: bool,
    /// What the wake thread may do for the armed skeleton.
    armed: ArmedWake,
}

/// What one wake does beyond serving faults lazily.
enum WakePlan {
    /// Nothing: pure lazy paging.
    Lazy,
    /// Copy every stored page before resuming.
    All,
    /// Copy this recorded working set of the image (whose manifest has
    /// this CRC) before resuming, and extend it with the pages the wake
    /// faults on.
    Recorded {
        set: Arc<WorkingSet>,
        image: Arc<Image>,
        image_crc: u32,
    },
    /// Record the working set of the image (whose manifest has this CRC).
    Record { image: Arc<Image>, image_crc: u32 },
}

impl Worker {
    fn handle(&mut self, job: Job) {
        match job {
            Job::Prepare { image, checked } => {
                self.image = Some(image);
                self.verify_next |= checked.is_some();
                let outcome = self.prepare();
                self.prepare_done();
                if let Some(checked) = checked {
                    let _ = checked.send(outcome);
                }
            }
            Job::Restock => {
                if self.skeleton.is_none() && !self.resumed && self.image.is_some() {
                    let _ = self.prepare();
                }
                self.prepare_done();
            }
            Job::Release { image } => self.release(image),
            Job::Resume { reply } => self.resume(reply),
            Job::ResumeOnSyn { then, at_work } => self.resume_on_syn(then, at_work),
            Job::ServeAdopted { pager } => self.serve_adopted(*pager),
        }
    }

    /// Whether the prepared skeleton is still traced by this thread (it
    /// could not be released to a group stop).
    fn traces_skeleton(&self) -> bool {
        self.skeleton.as_deref().is_some_and(Skeleton::is_traced)
    }

    fn prepare_done(&self) {
        self.report.lock().expect("report lock").prepare_done();
    }

    /// Serves the pages of a process adopted from a dead daemon until they
    /// are all in; a stopping daemon waits for that as it does for a wake's.
    fn serve_adopted(&mut self, mut pager: Pager) {
        let at_work = self.pagers.start();
        // The pager spins at times: never at real-time priority, and on a
        // thread of its own while it works.
        let _ = sched::set_current_thread_realtime(false);
        self.pool.leave();
        pager.hurry_when(self.pagers.stopping());
        let pid = pager.pid();
        match pager.run_until_filled() {
            Ok(stats) => {
                info!(service = %self.name, pid, faults = stats.faults, filled = stats.filled_pages, took_us = stats.total_time.as_micros() as u64, "all pages of the adopted process in");
                self.metrics.observe_pager(&self.name, &stats);
                self.report.lock().expect("report lock").last_pager = Some(stats);
            }
            Err(err) => warn!(service = %self.name, pid, "pager of the adopted process: {err}"),
        }
        drop(at_work);
    }

    /// Prepares the skeleton of the next wake; says why not when it cannot.
    fn prepare(&mut self) -> Result<(), String> {
        self.prepare_for(None)
    }

    /// Prepares the skeleton of the next wake; with `cold`, for a SYN that
    /// waits for it (a cold wake), whose stages it times. The skeleton of a
    /// cold wake stays under ptrace: this thread resumes it at once, and a
    /// group stop (for the wake thread to end) would only cost a `SIGSTOP`
    /// and a `SIGCONT` on the SYN's path.
    fn prepare_for(&mut self, mut cold: Option<&mut ColdPrepare>) -> Result<(), String> {
        let started = std::time::Instant::now();
        // A skeleton of an older image must not be resumed, by a SYN
        // either: disarmed first.
        *self.armed.lock().expect("armed lock") = Armed::default();
        self.skeleton = None;
        self.plan = WakePlan::Lazy;
        self.resumed_on_syn = false;
        self.resumed = false;
        // A wake waits for a cold prepare: it runs at real-time priority,
        // the skeleton's fork (building its layout) too, so that a busy host
        // does not make the SYN wait for a CPU at every step; the skeleton's
        // threads are made ordinary before they ever run their own code.
        let _ = sched::set_current_thread_realtime(cold.is_some());
        let verify = std::mem::take(&mut self.verify_next);
        let mut stale = false;
        let mut backlog = None;
        let mut image_crc = None;
        let result = self
            .build_skeleton(verify, &mut stale, cold.is_some())
            .and_then(|(mut skeleton, image, set_ahead)| {
                if let Some(cold) = cold.as_deref_mut() {
                    cold.build = started.elapsed();
                    make_ordinary(&skeleton)?;
                }
                backlog = listener_backlog_in_image(image.manifest(), self.port);
                image_crc = Some(image.crc());
                // The last process of a tree, when it may accept the
                // waking connection: a worker holding the listener.
                let last = image.manifest().children.len() as u32;
                let run_alone = (last > 0
                    && listener_holders_in_image(image.manifest(), self.port).contains(&last))
                .then_some(last);
                let (loaded, early_copy) = match set_ahead {
                    Some(ahead) => {
                        let (loaded, copy) = ahead.finish();
                        (Some(loaded), copy)
                    }
                    None => (None, None),
                };
                self.plan = match loaded.and_then(|loaded| self.take_set_ahead(loaded)) {
                    Some(ahead) => WakePlan::Recorded {
                        set: Arc::new(ahead.set),
                        image,
                        image_crc: ahead.image_crc,
                    },
                    None => self.plan_wake(image),
                };
                let mut armed = Armed::default();
                if let Some(cold) = cold.as_deref_mut() {
                    cold.copy_begun = early_copy.is_some();
                }
                if let WakePlan::Recorded { set, .. } = &self.plan {
                    armed.copies = match early_copy {
                        // One process, whose copy began in its prepare.
                        Some(copy) => vec![(0, copy)],
                        None => self.plan_copies(&mut skeleton, set)?,
                    };
                    armed.run_alone = run_alone;
                }
                let continuer = match cold {
                    Some(_) => None,
                    None => skeleton.release().map_err(|err| err.to_string())?,
                };
                // Every page must be in before the process runs: the restore
                // thread copies them all, then resumes it.
                if !matches!(self.plan, WakePlan::All) {
                    armed.continuer = continuer;
                }
                *self.armed.lock().expect("armed lock") = armed;
                Ok(skeleton)
            });
        let armed_at = started.elapsed();
        let mut report = self.report.lock().expect("report lock");
        match result {
            Ok(mut skeleton) => {
                // Recorded now, off the wake's critical path: the skeleton's
                // pid is the service's once resumed, and a daemon restarted
                // while it is still a skeleton finds it gone (it dies with
                // its tracer) and parks the service.
                self.run_state.record_process(
                    &self.name,
                    skeleton.pid(),
                    &self.listener,
                    &self.group,
                    self.page_source(&mut skeleton, image_crc),
                );
                if let Some(cold) = cold {
                    cold.arm = armed_at.saturating_sub(cold.build);
                    cold.record = started.elapsed().saturating_sub(armed_at);
                    cold.skeleton = skeleton.timings();
                }
                report.skeleton_pid = Some(skeleton.pid());
                report.skeleton_init_pid = skeleton.init_pid();
                // Armed: the resume on the next SYN runs ahead of ordinary
                // threads (the client's included) on whichever CPU it gets.
                if let Err(err) = sched::set_current_thread_realtime(true) {
                    tracing::debug!(service = %self.name, "no real-time priority: {err}");
                }
                report.error = None;
                report.stale = false;
                report.listener_backlog = backlog;
                let timings = skeleton.timings();
                info!(service = %self.name, pid = skeleton.pid(), prepare_us = timings.prepare.as_micros() as u64, setup_us = timings.setup.as_micros() as u64, layout_us = timings.layout.as_micros() as u64, finish_us = timings.finish.as_micros() as u64, "skeleton ready");
                self.skeleton = Some(Box::new(skeleton));
                Ok(())
            }
            Err(err) => {
                warn!(service = %self.name, "cannot prepare a skeleton: {err}");
                report.skeleton_pid = None;
                report.skeleton_init_pid = None;
                report.error = Some(err.clone());
                report.stale = stale;
                // Checked again next time: it may have been damaged rather
                // than only be unusable.
                self.verify_next = !stale;
                Err(err)
            }
        }
    }

    /// Kills the prepared skeleton, if any, keeping the image (or taking
    /// `image` as the next wake's, when given: then any skeleton goes).
    /// Without `image`, a skeleton a SYN is resuming stays: the wake thread
    /// may already have let it run.
    fn release(&mut self, image: Option<PathBuf>) {
        let parked_cold = image.is_some();
        {
            // Disarmed under the lock the wake thread takes after counting
            // its SYN: either it counted first (and the skeleton stays) or
            // it finds nothing armed (and this thread prepares a new one).
            let mut armed = self.armed.lock().expect("armed lock");
            let report = self.report.lock().expect("report lock");
            if image.is_none() && report.syn_resumes_unreported > 0 {
                return;
            }
            *armed = Armed::default();
        }
        if let Some(image) = image {
            self.image = Some(image);
            self.resumed_on_syn = false;
            self.resumed = false;
        }
        self.plan = WakePlan::Lazy;
        let released = self.skeleton.take().map(|skeleton| skeleton.pid());
        {
            let mut report = self.report.lock().expect("report lock");
            report.skeleton_pid = None;
            report.skeleton_init_pid = None;
        }
        if let Some(pid) = released {
            // The record named the skeleton, which its drop just killed.
            self.run_state.clear(&self.name);
            info!(service = %self.name, pid, "skeleton released");
            crate::sys::alloc::give_back_free_memory();
        }
        if parked_cold && let Some(image) = &self.image {
            self.remove_posix_shm_left(image);
        }
    }

    /// Removes the POSIX shared memory files the processes of `image`
    /// map and a killed run of it left (PostgreSQL's): parked without a
    /// skeleton, the service then holds nothing in memory, and its next
    /// wake makes them again from the image.
    fn remove_posix_shm_left(&self, image: &Path) {
        match Image::open(image) {
            Ok(image) => {
                let removed = crate::restore::posix_shm::remove_left_by(image.manifest());
                if !removed.is_empty() {
                    info!(service = %self.name, files = ?removed, "POSIX shared memory left by the parked run removed");
                }
            }
            Err(err) => {
                warn!(service = %self.name, image = %image.display(), "cannot read the image for the POSIX shared memory it names: {err}");
            }
        }
    }

    /// What a daemon taking over after this one needs to serve the pages
    /// of `skeleton` once resumed; its pager journals for that daemon.
    /// `None` (with a warning) when that cannot be set up: the process
    /// then works as well, but a daemon killed while its pages come in
    /// leaves it to be stopped and parked again.
    fn page_source(&self, skeleton: &mut Skeleton, image_crc: Option<u32>) -> Option<PageSource> {
        let image = self.image.clone()?;
        let image_crc = image_crc?;
        match EventJournal::create(&self.run_state.events_path(&self.name)) {
            Ok(journal) => {
                skeleton.pager_mut().journal_to(journal);
                Some(PageSource {
                    image,
                    image_crc,
                    uffd_fd: skeleton.uffd_fd(),
                })
            }
            Err(err) => {
                warn!(service = %self.name, "a daemon restarted during the next wake could not take its pages over: {err}");
                None
            }
        }
    }

    /// The working set a cold wake loaded and checked while its skeleton
    /// was built, if it has one to prefetch; `None` leaves the decision to
    /// [`Worker::plan_wake`].
    fn take_set_ahead(&self, loaded: cold_wake::Loaded) -> Option<cold_wake::SetAhead> {
        match loaded {
            Ok(Ok(ahead)) if !ahead.set.is_empty() => {
                info!(service = %self.name, pages = ahead.set.len(), "working set loaded");
                Some(ahead)
            }
            Ok(Ok(_)) => None,
            Ok(Err(err)) => {
                tracing::debug!(service = %self.name, "no working set loaded ahead: {err}");
                None
            }
            Err(_) => {
                warn!(service = %self.name, "the thread loading the working set panicked");
                None
            }
        }
    }

    /// Decides, at prepare time, what the next wake does about its working
    /// set; the set is read and verified now, off the wake's critical path.
    fn plan_wake(&self, image: Arc<Image>) -> WakePlan {
        match self.prefetch {
            Prefetch::None => return WakePlan::Lazy,
            Prefetch::All => return WakePlan::All,
            Prefetch::Recorded => {}
        }
        let image_crc = image.crc();
        match WorkingSet::open(image.dir(), image_crc) {
            Ok(set) if !set.is_empty() => {
                info!(service = %self.name, pages = set.len(), "working set loaded");
                return WakePlan::Recorded {
                    set: Arc::new(set),
                    image,
                    image_crc,
                };
            }
            Ok(_) => {}
            Err(ImageError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            }
            Err(err) => {
                warn!(service = %self.name, "working set ignored, the next wake records it again: {err}");
            }
        }
        WakePlan::Record { image, image_crc }
    }

    /// Gets each process of `skeleton` ready for the copy of its pages of
    /// `set` on the wake, at prepare time: the runs they come from verified,
    /// the pages the image does not store mapped as zeros, the copy planned.
    /// Returns each process's copy with its index in tree order. Pages of a
    /// process the tree does not have are left out (and an address outside
    /// a process's lazy mappings is never copied by its pager).
    fn plan_copies(
        &self,
        skeleton: &mut Skeleton,
        set: &WorkingSet,
    ) -> Result<Vec<(u32, PlannedCopy)>, String> {
        let mut copies = Vec::new();
        let mut processes = 0;
        for (index, pager) in (0u32..).zip(skeleton.tree_pagers_mut()) {
            processes += 1;
            let pages = set.pages_of(index);
            if pages.is_empty() {
                continue;
            }
            pager.verify_ahead(pages).map_err(|err| err.to_string())?;
            pager.zero_ahead(pages);
            copies.push((index, pager.plan_set(pages)));
        }
        if let Some(&extra) = set.processes().keys().find(|&&index| index >= processes) {
            warn!(service = %self.name, process = extra, processes, "the working set names a process the image does not have; its pages are skipped");
        }
        Ok(copies)
    }

    /// Restores the skeleton of the current image, every page verified
    /// first if `verify`. Sets `stale` when the image was taken on another
    /// kernel build or CPU. For a `cold` wake that prefetches its recorded
    /// working set, also returns what loads and checks that set meanwhile,
    /// and starts copying it into a single process's skeleton before the
    /// prepare ends.
    fn build_skeleton(&self, verify: bool, stale: &mut bool, cold: bool) -> Result<Built, String> {
        let dir = self.image.as_ref().ok_or("no image to restore")?;
        let image = Image::open(dir).map_err(|err| err.to_string())?;
        // Every process of a tree: a worker's recorded pid still held by
        // its zombie would put the whole tree in a pid namespace.
        let manifest = image.manifest();
        for pid in std::iter::once(manifest.process.pid)
            .chain(manifest.children.iter().map(|child| child.process.pid))
        {
            wait_until_pid_is_free(pid);
        }
        let held = std::iter::once(&*self.listener)
            .chain(&self.group)
            .map(OwnedFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|err| format!("duplicating the listener: {err}"))?;
        let placed = place_listeners(image.manifest(), self.port, held)
            .map_err(|err| format!("the listeners of port {}: {err}", self.port))?;
        if placed.is_empty() {
            return Err(format!(
                "image {} has no TCP listener on port {}",
                dir.display(),
                self.port
            ));
        }
        let mut inherited = InheritedFds::new();
        let root = image.manifest().process.pid;
        // A listener a descendant holds on its own (not shared with the
        // root) is created again by the tree's restore, not installed from
        // the held one: see docs/sockets.md.
        for (_, fd, listener) in placed.into_iter().filter(|&(pid, ..)| pid == root) {
            inherited.insert(fd, listener);
        }
        if let Some(log) = &self.log {
            // A log the administrator removed is created anew, as the
            // restored process's stdout and stderr.
            crate::service_log::open(log)
                .map_err(|err| format!("opening the log {}: {err}", log.display()))?;
        }
        let image = Arc::new(image);
        let set_ahead = (cold && self.prefetch == Prefetch::Recorded)
            .then(|| ColdAhead::start(Arc::clone(&image)))
            .flatten();
        let config = RestoreConfig {
            verify_pages_first: verify,
            inherited,
            accept_changed_files: self.accept_changed_files,
            agent_files: self.log.iter().cloned().collect(),
            on_pager: set_ahead.as_ref().map(ColdAhead::on_pager),
            cold,
        };
        let skeleton = Skeleton::prepare(Arc::clone(&image), config).map_err(|err| {
            *stale = matches!(
                err,
                RestoreError::Image(
                    ImageError::KernelMismatch { .. } | ImageError::CpuMismatch { .. }
                )
            );
            crate::error_text::error_line(&err)
        })?;
        Ok((skeleton, image, set_ahead))
    }

    fn resume(&mut self, reply: oneshot::Sender<Result<Resumed, ResumeRefused>>) {
        let mut cold = false;
        if self.skeleton.is_none() {
            if self.resumed_on_syn {
                // A second process must never start: the supervisor hears
                // of the SYN's wake on its own.
                let _ = reply.send(Err(ResumeRefused::AlreadyResumed));
                return;
            }
            // Its failure is the resume's: the reply says why.
            self.prepare_cold();
            cold = true;
        }
        let at_work = self.pagers.start();
        self.resume_and_serve(
            Box::new(move |result| {
                let _ = reply.send(result.map_err(ResumeRefused::Failed));
            }),
            at_work,
            cold,
        );
    }

    /// Prepares the skeleton of a wake that waits for it (a cold wake),
    /// and logs where the time went; a failure is in the report.
    fn prepare_cold(&mut self) {
        let started = std::time::Instant::now();
        let mut times = ColdPrepare::default();
        if self.prepare_for(Some(&mut times)).is_ok() {
            let us = |d: Duration| d.as_micros() as u64;
            info!(
                service = %self.name,
                took_us = us(started.elapsed()),
                build_us = us(times.build),
                setup_us = us(times.skeleton.setup),
                layout_us = us(times.skeleton.layout),
                finish_us = us(times.skeleton.finish),
                arm_us = us(times.arm),
                record_us = us(times.record),
                copy_begun = times.copy_begun,
                "cold wake: skeleton prepared for the waiting wake"
            );
        }
    }

    fn resume_on_syn(&mut self, then: EarlyReply, at_work: PagerAtWork) {
        if self.skeleton.is_none() && (self.resumed || self.image.is_none()) {
            self.report
                .lock()
                .expect("report lock")
                .syn_resume_settled();
            then(None);
            return;
        }
        let cold = self.skeleton.is_none();
        if cold {
            // A cold wake: prepared here and now, on the SYN's path. A
            // failure is the resume's, reported to the supervisor.
            self.prepare_cold();
        }
        // Set only for a skeleton to resume: after a failed prepare, the
        // supervisor's retry must prepare again.
        self.resumed_on_syn = self.skeleton.is_some();
        self.resume_and_serve(Box::new(move |result| then(Some(result))), at_work, cold);
    }

    /// Resumes the prepared skeleton, tells `reply`, then serves its pages
    /// until they are all in; a stopping daemon waits for that as long as
    /// `at_work` is held. `cold`: prepared for this wake, whose copy of the
    /// working set no wake thread helped with.
    fn resume_and_serve(
        &mut self,
        reply: Box<dyn FnOnce(Result<Resumed, String>) + Send>,
        at_work: PagerAtWork,
        cold: bool,
    ) {
        let Some(mut skeleton) = self.skeleton.take() else {
            let error = self.report.lock().expect("report lock").error.clone();
            reply(Err(error.unwrap_or_else(|| "no skeleton".into())));
            return;
        };
        self.resumed = true;
        {
            let mut report = self.report.lock().expect("report lock");
            report.skeleton_pid = None;
            report.skeleton_init_pid = None;
            report.last_pager = None;
            report.wake_error = None;
        }
        let plan = std::mem::replace(&mut self.plan, WakePlan::Lazy);
        let armed = std::mem::take(&mut *self.armed.lock().expect("armed lock"));
        let prefetched_set = matches!(plan, WakePlan::Recorded { .. });
        let ran_alone = Arc::clone(&armed.ran_alone);
        let record = self.prefetch_before_resume(&mut skeleton, plan, armed, cold);
        // Final now: pages are copied ahead of faults only before the resume.
        let descendants_prefetched: u64 = skeleton
            .descendant_pagers_mut()
            .map(|pager| pager.stats().prefetched_pages)
            .sum();
        // Ordinary before the resume: the process, woken on this thread's
        // CPU, waited for it otherwise. And the pager spins at
        // times: never at real-time priority.
        let _ = sched::set_current_thread_realtime(false);
        let resumed = skeleton.resume();
        let Restored {
            pid,
            init_pid,
            pidfd,
            mut pager,
            timings,
            resumed_at,
            descendants,
        } = match resumed {
            Ok(restored) => restored,
            Err(err) => {
                // Perhaps a corrupt page of the working set: the next
                // skeleton is checked whole.
                self.verify_next = true;
                reply(Err(err.to_string()));
                return;
            }
        };
        let resumed = Resumed {
            pid,
            init_pid,
            pidfd,
            timings,
            resumed_at_ns: monotonic_ns().saturating_sub(resumed_at.elapsed().as_nanos() as u64),
        };
        if let Some(recording) = &record {
            recording.start_logging(&mut pager);
        }
        if prefetched_set {
            // Told once the first request is likely answered: the daemon's
            // work on the news (a log line, state) would take a CPU from it.
            pager.when_quiet(Box::new(move || reply(Ok(resumed))));
        } else {
            reply(Ok(resumed));
        }
        pager.hurry_when(self.pagers.stopping());
        // A tree's background fill waits until its processes are quiet:
        // it would compete for the CPUs with the first request.
        let gate = (!descendants.is_empty()).then(|| Arc::new(FillGate::for_wake()));
        if let Some(gate) = &gate {
            pager.hold_fill_until(Arc::clone(gate));
        }
        let descendant_logs = self.serve_descendants(descendants, record.as_ref(), gate.as_ref());
        self.report.lock().expect("report lock").serving = Some(pid);
        // Its faults must never wait behind other services' jobs: the pool
        // goes on without this thread until all pages are in.
        self.pool.leave();
        let filled = pager.run_until_filled();
        drop(at_work);
        let mut report = self.report.lock().expect("report lock");
        report.serving = None;
        match filled {
            Ok(mut stats) => {
                let ran_alone = *ran_alone.lock().expect("ran-alone lock");
                info!(service = %self.name, pid, alone_us = ran_alone.map(|ran| ran.waited.as_micros() as u64), alone_cut_short = ran_alone.map(|ran| ran.cut_short), faults = stats.faults, fault_pages = stats.fault_pages, prefetched = stats.prefetched_pages, filled = stats.filled_pages, fault_us = stats.fault_time.as_micros() as u64, fill_after_us = stats.fill_started_after.map(|at| at.as_micros() as u64), took_us = stats.total_time.as_micros() as u64, first_fault_us = micros(stats.first_fault_after_resume), "all pages in");
                self.metrics.observe_pager(&self.name, &stats);
                // What a tree's wake copied ahead is into all its
                // processes; the other counters stay the root's, as its
                // descendants' pagers may still be at work.
                stats.prefetched_pages += descendants_prefetched;
                report.last_pager = Some(stats);
            }
            Err(err) => {
                warn!(service = %self.name, pid, "pager: {err}");
                if matches!(err, RestoreError::CorruptPage { .. }) {
                    // Killed: the supervisor reports the wake as failed,
                    // and the next skeleton is checked whole.
                    report.wake_error = Some((pid, err.to_string()));
                    self.verify_next = true;
                }
            }
        }
        drop(report);
        // A daemon stopping cut the window short: the set would lack pages.
        if let Some(recording) = record
            && !self.pagers.is_stopping()
        {
            let mut faulted = PagesByProcess::from([(0, pager.take_fault_log())]);
            // Each descendant's log is complete once its pager is done.
            for (index, serving) in descendant_logs {
                match serving.recv() {
                    Ok(log) => {
                        faulted.insert(index, log);
                    }
                    Err(_) => {
                        warn!(service = %self.name, process = index, "the pager of a process of the tree panicked; the working set lacks its pages")
                    }
                }
            }
            if !self.pagers.is_stopping() {
                self.write_working_set(recording, faulted);
            }
        }
        drop(pager);
        // The wake's buffers are free now: given back rather than kept in
        // this thread's heap for as long as the service runs.
        crate::sys::alloc::give_back_free_memory();
    }

    /// Serves the pages of a tree's other processes, each pager in a thread
    /// of its own until its process's memory is all in (a stopping daemon
    /// waits for them as for the root's): a pool thread waiting for work
    /// when there is one, as waking it costs the worker answering the
    /// wake's request less CPU than starting a thread (docs/process-trees.md,
    /// The wake's critical path). With `record`, each logs its faults as
    /// the root's pager does, and its thread sends that log back: the
    /// receivers are returned with each process's index in tree order (from
    /// 1; a process that got no thread was killed).
    fn serve_descendants(
        &self,
        descendants: Vec<Restored>,
        record: Option<&Recording>,
        gate: Option<&Arc<FillGate>>,
    ) -> Vec<(u32, DescendantPager)> {
        let mut serving = Vec::new();
        for (index, restored) in (1u32..).zip(descendants) {
            let at_work = self.pagers.start();
            let mut pager = restored.pager;
            let pid = restored.pid;
            let resumed_at = restored.resumed_at;
            if let Some(recording) = record {
                recording.start_logging(&mut pager);
            }
            pager.hurry_when(self.pagers.stopping());
            if let Some(gate) = gate {
                pager.hold_fill_until(Arc::clone(gate));
            }
            let name = self.name.clone();
            let (log, logged) = std::sync::mpsc::channel();
            let serve: Box<dyn FnOnce() + Send> = Box::new(move || {
                let serving_after = Some(resumed_at.elapsed());
                match pager.run_until_filled() {
                    Ok(stats) => {
                        info!(service = %name, pid, faults = stats.faults, fault_pages = stats.fault_pages, prefetched = stats.prefetched_pages, filled = stats.filled_pages, fill_after_us = stats.fill_started_after.map(|at| at.as_micros() as u64), first_fault_us = micros(stats.first_fault_after_resume), serving_after_us = micros(serving_after), "all pages of a process of the tree in");
                    }
                    Err(err) => warn!(service = %name, pid, "pager: {err}"),
                }
                drop(at_work);
                let _ = log.send(pager.take_fault_log());
            });
            let task = Arc::new(PagerTask {
                serve: Mutex::new(Some(serve)),
            });
            let spawned = match self.pool.submit_if_idle(task.clone()) {
                Ok(()) => Ok(()),
                Err(_) => std::thread::Builder::new()
                    .name(format!("pager-{pid}"))
                    .spawn(move || task.serve())
                    .map(drop),
            };
            match spawned {
                Ok(()) => serving.push((index, logged)),
                Err(err) => {
                    // Its faults would wait forever: it must not run so.
                    warn!(service = %self.name, pid, "no thread for the pager, the process is killed: {err}");
                    let _ = restored
                        .pidfd
                        .send_signal(nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
        serving
    }

    /// Writes the working set `recording` names: the pages each process of
    /// the wake faulted on, or, when it prefetched a set, that set extended
    /// by them.
    fn write_working_set(&self, recording: Recording, faulted: PagesByProcess) {
        let Recording {
            image,
            image_crc,
            known,
        } = recording;
        let processes = match known {
            None => faulted,
            Some(set) => match set.extended_by(&faulted) {
                Some(processes) => processes,
                None => return,
            },
        };
        let pages: usize = processes.values().map(Vec::len).sum();
        match WorkingSet::write(image.dir(), image_crc, &processes, image.pages()) {
            Ok(()) => {
                info!(service = %self.name, pages, processes = processes.len(), "working set recorded");
            }
            Err(err) => warn!(service = %self.name, "cannot record the working set: {err}"),
        }
    }

    /// Copies what `plan` says into the stopped skeleton. Returns the
    /// working set this wake records or extends, if any. With `helper`, a
    /// second thread copies the planned pages with this one (no wake
    /// thread did: a cold wake).
    ///
    /// Before the resume rather than after it: python's http.server answered
    /// its first request sooner with its set copied before it ran than with the
    /// copy racing it, and redis was even (docs/kernel-facts.md, Costs that
    /// shaped the wake path). And only a stopped process lets the copy use
    /// every CPU.
    ///
    /// In a tree, once the first process's pages are in (a worker the wake
    /// thread lets run then), this thread is ordinary, and leaves the other
    /// copies to the wake thread when it is at them: at real-time priority,
    /// or copying beside it, this thread took the CPU the worker answering
    /// the request needed (docs/process-trees.md, The wake's critical path).
    fn prefetch_before_resume(
        &self,
        skeleton: &mut Skeleton,
        plan: WakePlan,
        armed: Armed,
        helper: bool,
    ) -> Option<Recording> {
        let planned_copies = armed.copies;
        match plan {
            WakePlan::Lazy => None,
            WakePlan::All => {
                for pager in skeleton.tree_pagers_mut() {
                    if let Err(err) = pager.prefetch_all() {
                        warn!(service = %self.name, pid = pager.pid(), "prefetching every page: {err}");
                    }
                }
                None
            }
            WakePlan::Record { image, image_crc } => Some(Recording {
                image,
                image_crc,
                known: None,
            }),
            WakePlan::Recorded {
                set,
                image,
                image_crc,
            } => {
                let helping = helper.then(|| help_with_copies(&planned_copies)).flatten();
                // In the order the wake thread copies them and lets each
                // process run: the descendants last first, the root last.
                let mut pagers: Vec<_> = (0u32..).zip(skeleton.tree_pagers_mut()).collect();
                pagers.reverse();
                let stepping = armed.copying.load(Ordering::Acquire);
                // The process the wake thread let run alone, leaving the
                // others to this thread (`continue_each_when_copied`).
                let alone = armed
                    .run_alone
                    .filter(|&alone| stepping && planned_copies.iter().any(|(i, _)| *i == alone));
                // Whether every copy so far was whole: the wake thread then
                // goes on to the next, unless it let one run alone.
                let mut whole_so_far = true;
                let mut first = true;
                for (index, pager) in pagers {
                    let pages = set.pages_of(index);
                    if pages.is_empty() {
                        continue;
                    }
                    let planned = planned_copies.iter().find(|(planned, _)| *planned == index);
                    let copied = match planned {
                        Some((_, copy))
                            if !first && whole_so_far && stepping && alone.is_none() =>
                        {
                            pager.finish_planned_behind(copy)
                        }
                        Some((_, copy)) if first => {
                            // Ordinary once no span is left to claim: the
                            // process is let run by whichever thread copies
                            // its last page, maybe on this CPU, while this
                            // one still records what was copied (~90 µs
                            // for python's 900 pages, which it waited for
                            // when this thread was at real-time priority).
                            copy.help();
                            let _ = sched::set_current_thread_realtime(false);
                            pager.finish_planned_behind(copy)
                        }
                        Some((_, copy)) => pager.finish_planned(copy),
                        None => pager.prefetch_set(pages),
                    };
                    if let Some((_, copy)) = planned {
                        whole_so_far &= copy.copied_whole();
                    }
                    if first {
                        first = false;
                        let _ = sched::set_current_thread_realtime(false);
                        // Let run by whichever thread copied its last page
                        // (perhaps this one, just now): it runs alone until
                        // it blocks, before the others are copied here.
                        if alone == Some(index) && whole_so_far {
                            let continuer = armed.continuer.as_ref().and_then(|root| {
                                root.descendants().get(index as usize - 1).cloned()
                            });
                            if let Some(continuer) = continuer {
                                // At once if done; waits if another thread
                                // is at it.
                                let _ = continuer.continue_process();
                                let ran = run_alone::wait_until_blocked(
                                    continuer.pid(),
                                    run_alone::RUN_ALONE_BOUND,
                                );
                                *armed.ran_alone.lock().expect("ran-alone lock") = Some(ran);
                            }
                        }
                    }
                    // A page of the image that cannot be served kills its
                    // process here; the root's death fails the resume,
                    // which reports it.
                    if let Err(err) = copied {
                        warn!(service = %self.name, pid = pager.pid(), "prefetching the working set: {err}");
                    }
                }
                // Done by now: each copy waited for the spans it held.
                if let Some(helping) = helping {
                    let _ = helping.join();
                }
                Some(Recording {
                    image,
                    image_crc,
                    known: Some(set),
                })
            }
        }
    }
}

/// Pages of a cold wake's working set worth a second copying thread:
/// starting one costs tens of µs, about what 64 pages' copies cost.
const HELPED_COPY_PAGES: u64 = 128;

/// Starts a thread that copies spans of `copies` nobody claimed yet, beside
/// the restore thread, if they are worth one (a thread costs tens of µs).
fn help_with_copies(copies: &[(u32, PlannedCopy)]) -> Option<std::thread::JoinHandle<()>> {
    let pages: u64 = copies.iter().map(|(_, copy)| copy.pages()).sum();
    if pages < HELPED_COPY_PAGES {
        return None;
    }
    let copies: Vec<PlannedCopy> = copies.iter().map(|(_, copy)| copy.clone()).collect();
    std::thread::Builder::new()
        .name("persist-copy".into())
        .spawn(move || {
            for copy in &copies {
                copy.help();
            }
        })
        .ok()
}

/// Puts every thread of `skeleton` (and the init of its pid namespace) in
/// `SCHED_OTHER`: forked by a real-time thread, they inherited its policy.
fn make_ordinary(skeleton: &Skeleton) -> Result<(), String> {
    for &tid in skeleton.tids().iter().chain(skeleton.init_pid().iter()) {
        sched::set_thread_ordinary(tid).map_err(|err| {
            format!(
                "cannot give thread {tid} of pid {} its ordinary scheduling back: {err}",
                skeleton.pid()
            )
        })?;
    }
    Ok(())
}

/// Where the prepare of a cold wake spent its time.
#[derive(Debug, Default)]
struct ColdPrepare {
    /// Opening the image and building the skeleton (of which `skeleton`).
    build: Duration,
    /// The skeleton's own phases.
    skeleton: Timings,
    /// Planning the wake: the working set read, verified, its pages planned.
    arm: Duration,
    /// Recording the process for a daemon taking over.
    record: Duration,
    /// The copy of its working set began during the build.
    copy_begun: bool,
}

/// A wake that records or extends the working set of its image.
struct Recording {
    image: Arc<Image>,
    /// The image's identity (its manifest's CRC).
    image_crc: u32,
    /// The set the wake prefetched, which the pages it faults on extend.
    known: Option<Arc<WorkingSet>>,
}

impl Recording {
    /// Has `pager` (of any process of the tree) log what this wake needs
    /// for [`RECORD_WINDOW`] from now on: every page touched, or, after a
    /// set was prefetched, the pages it lacked.
    fn start_logging(&self, pager: &mut Pager) {
        match self.known {
            None => pager.record_faults(RECORD_WINDOW),
            Some(_) => pager.log_faults(RECORD_WINDOW),
        }
    }
}

/// The thread serving a descendant's pages, which returns the pages it
/// logged.
type DescendantPager = std::sync::mpsc::Receiver<Vec<persist_common::image::WorkingSetPage>>;

/// A descendant's pager, to run on a pool thread (or a thread of its own).
struct PagerTask {
    serve: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl PagerTask {
    /// Runs the pager, once. A panic drops the log's sender: the working
    /// set then lacks this process's pages (said where it is received), and
    /// a pool thread lives on.
    fn serve(&self) {
        let Some(serve) = self.serve.lock().expect("pager task lock").take() else {
            return;
        };
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(serve));
    }
}

impl PoolTask for PagerTask {
    fn run(self: Arc<Self>, pool: &Arc<RestorePool>) {
        // A pool thread that armed a skeleton waited at real-time priority;
        // the pager spins at times. And it serves until every page is in:
        // out of the pool meanwhile.
        let _ = sched::set_current_thread_realtime(false);
        pool.leave();
        self.serve();
    }
}

/// A built skeleton, its image, and for a cold wake what loads (and
/// starts copying) its working set.
type Built = (Skeleton, Arc<Image>, Option<Arc<ColdAhead>>);

/// How long after the resume a wake logs the pages the process touches (a
/// recording wake) or faults on (a prefetched one): its first request and a
/// settle time after it.
const RECORD_WINDOW: std::time::Duration = std::time::Duration::from_millis(200);

/// Gives the previous process of the image time to be reaped, so the skeleton
/// gets the recorded pid itself rather than a private pid namespace. A process
/// a previous daemon started is reaped by init, which can take over a second
/// (docs/kernel-facts.md, Costs that shaped the wake path).
fn wait_until_pid_is_free(pid: i32) {
    let deadline = std::time::Instant::now() + PID_RELEASE_WAIT;
    while std::time::Instant::now() < deadline {
        let zombie = procfs::process::Process::new(pid)
            .and_then(|process| process.stat())
            .is_ok_and(|stat| stat.state == 'Z');
        // A process of the parked tree just killed may not have run its
        // exit yet (a busy machine): it still maps the tree's POSIX shared
        // memory, which the new skeleton would then refuse to share.
        if !zombie && !crate::process_tree::is_dying(pid) {
            // Free, or held by a live process (the skeleton then gets a pid namespace).
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// How long [`wait_until_pid_is_free`] waits for a zombie to be reaped
/// (or a killed process to exit).
const PID_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
