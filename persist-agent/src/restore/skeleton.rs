//! The two phases of a restore: [`Skeleton::prepare`] builds the process,
//! stopped under ptrace with its layout mapped and nothing of its anonymous
//! memory resident; [`Skeleton::resume`] lets it run, and the returned
//! [`Pager`] serves its memory.
//!
//! Prepare, in the order of the work: check the image; re-create the
//! descriptors and open what the layout needs ([`super::resources`]); fork
//! the child with its recorded pid and let it build its layout
//! ([`super::spawn`]); write back the pages it wrote in its private file
//! mappings ([`super::file_pages`]); create the other threads and set each thread's state
//! ([`super::threads`]).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use persist_common::image::{Image, Manifest};

use super::layout::OwnLayout;
use super::pager::Pager;
use super::posix_shm::{MadeFile, MadeFiles};
use super::resources::OpenedForTree;
use super::setup::Setup;
use super::shared_pages::SharedPages;
use super::spawn::{self, KillGuard};
use super::spawner;
use super::sysv_shm;
use super::tree::TreeSkeleton;
use super::{RestoreError, threads, verify};
use crate::files::{self, InheritedFds, PathAccess};
use crate::host;
use crate::sys::pidfd::PidFd;
use crate::sys::ptrace;

/// How to restore.
#[derive(Debug, Default)]
pub struct RestoreConfig {
    /// Check every page run's checksum before building anything (the CLI
    /// does; the daemon may leave it to the pager, which checks each run
    /// before it first copies it).
    pub verify_pages_first: bool,
    /// Descriptors handed to the restored process as they are (the daemon's
    /// listening socket), by number.
    pub inherited: InheritedFds,
    /// Reopen a recorded file that is no longer the one the image recorded
    /// (other inode or device, same type) instead of refusing the restore.
    pub accept_changed_files: bool,
    /// Files the agent opened for the process (its log), reopened with the
    /// agent's credentials rather than the process's.
    pub agent_files: Vec<std::path::PathBuf>,
    /// Work handed the process's pager once its memory is laid out, while
    /// the prepare goes on. Not called for a tree.
    pub on_pager: Option<OnPager>,
    /// Prepared on the path of a wake that waits for it (a cold wake): the
    /// pages of its read-only file mappings are left to fault in when
    /// touched instead of being put in its page tables first, which cost
    /// python's cold wake more than the faults do (docs/kernel-facts.md,
    /// Costs that shaped the cold wake).
    pub cold: bool,
}

/// Work given the pager of a process being prepared once its file pages
/// are written and its read-only mappings populated, before its threads
/// are made: a cold wake starts copying its working set there, beside the
/// rest of the prepare ([`RestoreConfig::on_pager`]).
pub struct OnPager(pub Box<dyn FnOnce(&mut Pager) + Send>);

impl std::fmt::Debug for OnPager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnPager")
    }
}

/// Timings of a restore, for measurements.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// The whole of [`Skeleton::prepare`].
    pub prepare: Duration,
    /// Checks, descriptors and files opened, tables built: before the fork.
    pub setup: Duration,
    /// From the fork to the layout built (the native table).
    pub layout: Duration,
    /// From the layout to the end of prepare: file pages, threads, state.
    pub finish: Duration,
    /// Letting the process run: detaching every thread, or `SIGCONT` for a
    /// released skeleton (perhaps sent by another thread, before
    /// [`Skeleton::resume`]).
    pub resume: Duration,
}

/// A restored process that has not run yet: stopped under ptrace (or, once
/// [released](Skeleton::release), in a group stop), every thread with its
/// registers set, memory mapped but not resident. Dropping it kills the
/// process.
///
/// Restored from an image of a tree, it is the root and holds the other
/// processes ([`Skeleton::descendant_pids`]): they are released, resumed
/// and killed with it, so that a caller handles a tree as one process.
#[derive(Debug)]
pub struct Skeleton {
    pub(super) pid: i32,
    pub(super) tids: Vec<i32>,
    pub(super) init_pid: Option<i32>,
    /// Where the process keeps its userfaultfd.
    pub(super) uffd_fd: RawFd,
    /// Taken by [`Skeleton::resume`] for the [`Restored`] process.
    pub(super) pidfd: Option<Arc<PidFd>>,
    pub(super) pager: Option<Pager>,
    pub(super) timings: Timings,
    /// Whether the process leaves `SIGCONT` to the kernel (no handler of
    /// its own), so that a group stop can hold it instead of ptrace.
    pub(super) sigcont_is_default: bool,
    /// Set once [`Skeleton::release`] left it in a group stop.
    pub(super) continuer: Option<Continuer>,
    /// Its timers, armed when it resumes; taken by the first resume or
    /// release.
    pub(super) timers: Option<ResumeTimers>,
    /// The other processes of a restored tree (this one is its root), in
    /// image order: parents before their children. Released, resumed and
    /// killed with the root.
    pub(super) descendants: Vec<Skeleton>,
    /// The POSIX shared memory files made for it (for a tree, the root
    /// holds them all): removed when it is killed before it ever ran.
    pub(super) posix_shm_files: Vec<MadeFile>,
}

/// What arms a process's timers when it resumes, so that they count their
/// time left from then, however long the skeleton waited.
#[derive(Debug, Default)]
pub(super) struct ResumeTimers {
    /// Its timerfds, armed by the agent.
    pub(super) timerfds: Vec<files::TimerfdArm>,
    /// The table that arms its own timers (interval and POSIX timers on
    /// clocks that run while it is stopped), run by its main thread under
    /// ptrace: such a process is never released to a group stop.
    pub(super) table: Option<threads::ResumeTable>,
}

impl ResumeTimers {
    /// Arms every timer; `pid`'s main thread must be stopped under ptrace
    /// when there is a table to run.
    fn arm(&self, pid: i32) -> Result<(), RestoreError> {
        if let Some(table) = &self.table {
            table.run(pid)?;
        }
        for timerfd in &self.timerfds {
            timerfd.arm()?;
        }
        Ok(())
    }
}

/// Lets a released skeleton run (`SIGCONT`), from any thread: the daemon's wake
/// thread resumes it itself rather than wake the thread that prepared it and
/// have that thread detach every thread (both cost tens of µs:
/// docs/kernel-facts.md, Costs that shaped the wake path).
#[derive(Debug, Clone)]
pub struct Continuer {
    inner: Arc<ContinuerState>,
}

#[derive(Debug)]
struct ContinuerState {
    pidfd: Arc<PidFd>,
    /// When the process was continued, and how long that took, once it was.
    continued: std::sync::Mutex<Option<(Instant, Duration)>>,
    /// Its timers, armed right before the continue.
    timers: ResumeTimers,
    /// The released descendants of a tree's root, continued before it
    /// (children first).
    descendants: Vec<Continuer>,
}

impl Continuer {
    /// Lets the process run, unless that was done already. Returns when it
    /// was let run, and how long that took: for a tree's root, when the
    /// first of its processes was let run (a descendant may have been,
    /// before the root's own pages were in), and how long every continue
    /// took together.
    pub fn continue_process(&self) -> Result<(Instant, Duration), RestoreError> {
        let mut continued = self.inner.continued.lock().expect("continuer lock");
        if let Some(done) = *continued {
            return Ok(done);
        }
        let mut first = Instant::now();
        let mut took = Duration::ZERO;
        // A tree's workers first: the root (a master) finds them running.
        for descendant in self.inner.descendants.iter().rev() {
            let (at, its) = descendant.continue_process()?;
            first = first.min(at);
            took += its;
        }
        let started = Instant::now();
        let pid = self.inner.pidfd.pid();
        self.inner.timers.arm(pid)?;
        self.inner
            .pidfd
            .send_signal(Signal::SIGCONT)
            .map_err(RestoreError::ptrace(pid, "SIGCONT"))?;
        let done = (first, took + started.elapsed());
        *continued = Some(done);
        Ok(done)
    }

    /// The pid of the process it lets run.
    pub fn pid(&self) -> i32 {
        self.inner.pidfd.pid()
    }

    /// The continuers of a tree's other processes, one each (in image
    /// order, parents before their children), each letting only its own
    /// process run: a wake lets each go as soon as its own pages are in.
    pub(crate) fn descendants(&self) -> &[Continuer] {
        &self.inner.descendants
    }

    /// Lets the process run unless another thread is doing so right now or
    /// did already: that thread is never waited for, as waking it up again
    /// would cost a CPU the process needs.
    pub fn try_continue_process(&self) -> Result<(), RestoreError> {
        match self.inner.continued.try_lock() {
            Ok(continued) if continued.is_none() => {
                drop(continued);
                self.continue_process().map(drop)
            }
            _ => Ok(()),
        }
    }
}

/// A restored process that runs.
#[derive(Debug)]
pub struct Restored {
    /// Its pid in the agent's pid namespace.
    pub pid: i32,
    /// The pid of the init of its private pid namespace, when the recorded
    /// pid was taken here.
    pub init_pid: Option<i32>,
    /// A pidfd for it, opened when its skeleton was prepared (its pager
    /// holds the same).
    pub pidfd: Arc<PidFd>,
    /// Serves its memory; run [`Pager::run_until_filled`] (in a thread or a
    /// process) or its faults block forever.
    pub pager: Pager,
    /// How long the phases took.
    pub timings: Timings,
    /// When it was let run.
    pub resumed_at: Instant,
    /// The other processes of a restored tree, each with its own pager to
    /// run (image order: parents before their children).
    pub descendants: Vec<Restored>,
}

impl Skeleton {
    /// Builds the process of `image` (every process of a tree, the root's
    /// skeleton holding the others), stopped before its first instruction.
    /// Refuses an image from another kernel or CPU before anything runs.
    pub fn prepare(image: Arc<Image>, config: RestoreConfig) -> Result<Self, RestoreError> {
        let started = Instant::now();
        // Whether this image can be restored here, before anything is opened.
        image.check_host(&host::kernel_info(), &host::cpu_info())?;
        let manifest = image.manifest();
        if manifest.is_tree() {
            let root = TreeSkeleton::prepare(image, config)?.into_root();
            if root.init_pid.is_none() {
                // As for one process: its exit status goes to whoever
                // resumes it.
                crate::sys::spawn::claim(root.pid);
            }
            return Ok(root);
        }
        if config.verify_pages_first {
            verify::all_pages(&image)?;
        }
        let mut agent_files = config.agent_files;
        agent_files.extend(manifest.agent_files.iter().map(std::path::PathBuf::from));
        let access = PathAccess::for_process(
            &manifest.process.credentials,
            config.accept_changed_files,
            agent_files,
        );
        let recorded_pid = manifest.process.pid;
        let mut setup = Setup::new(
            Arc::clone(&image),
            config.inherited,
            &access,
            &mut OpenedForTree::default(),
            &Arc::new(SharedPages::of_tree(manifest)),
            None,
            &OwnLayout::read()?.and(&spawner::kept_ranges()),
        )?;
        if config.cold {
            setup.leave_file_pages_to_fault();
        }
        // Removed unless the process is built.
        let mut created_files = MadeFiles(setup.created_files());
        let ipc_namespace = sysv_shm::namespace(&[&image])?;
        if let Some(namespace) = &ipc_namespace {
            setup.join_ipc_namespace(namespace.as_raw_fd());
        }

        // The child, forked with the recorded pid, builds its layout.
        let forked_at = Instant::now();
        let mut guard = KillGuard {
            pids: Vec::new(),
            threads: Vec::new(),
        };
        let spawned = spawn::spawn(&setup.plan(), recorded_pid, &setup.pipes(), &mut guard)?;
        let pid = spawned.pid;
        if spawned.init_pid.is_none() {
            // Our child: its exit status goes to whoever resumes it, not to
            // a reaper of orphans.
            crate::sys::spawn::claim(pid);
        }
        // Once the process has a descriptor table of its own: the
        // spawner's shares ours until its layout.
        if spawned.lease.is_none() {
            drop(ipc_namespace);
        }
        let mut skeleton =
            setup.finish(spawned, started, forked_at, config.on_pager, &mut guard)?;
        guard.pids.clear();
        guard.threads.clear();
        skeleton.posix_shm_files = std::mem::take(&mut created_files.0);
        Ok(skeleton)
    }

    /// The process's pid in the agent's pid namespace.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The pids of the other processes of a restored tree (empty for one
    /// process), parents before their children.
    pub fn descendant_pids(&self) -> Vec<i32> {
        self.descendants.iter().map(|d| d.pid).collect()
    }

    /// The pagers of the other processes of a restored tree, to copy pages
    /// in before they resume.
    pub(crate) fn descendant_pagers_mut(&mut self) -> impl Iterator<Item = &mut Pager> {
        self.descendants.iter_mut().map(Skeleton::pager_mut)
    }

    /// The pagers of every process of a restored tree in tree order (the
    /// root's first, then the descendants' in image order: the order of a
    /// working set's process indexes), to copy pages in before they resume.
    pub(crate) fn tree_pagers_mut(&mut self) -> impl Iterator<Item = &mut Pager> {
        let root = self
            .pager
            .as_mut()
            .expect("a skeleton always holds its pager");
        std::iter::once(root).chain(self.descendants.iter_mut().map(Skeleton::pager_mut))
    }

    /// Pid of the init of the skeleton's own pid namespace, when its
    /// recorded pid was taken here and it needed one.
    pub fn init_pid(&self) -> Option<i32> {
        self.init_pid
    }

    /// Its threads' ids in the agent's pid namespace, the leader first.
    pub fn tids(&self) -> &[i32] {
        &self.tids
    }

    /// The descriptor number at which the process keeps its userfaultfd.
    pub fn uffd_fd(&self) -> i32 {
        self.uffd_fd
    }

    /// How long prepare took (resume is zero until resumed).
    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// Whether the process is still stopped under ptrace, by the thread that
    /// prepared it (not [released](Skeleton::release)): only that thread
    /// can resume it.
    pub fn is_traced(&self) -> bool {
        self.continuer.is_none() && !self.tids.is_empty()
    }

    /// The pager of the stopped process, to copy pages in before it resumes.
    pub(crate) fn pager_mut(&mut self) -> &mut Pager {
        self.pager
            .as_mut()
            .expect("a skeleton always holds its pager")
    }

    /// Moves the stopped process from ptrace to a group stop (`SIGSTOP`),
    /// so that any thread may let it run through the returned
    /// [`Continuer`]. `None`, leaving it under ptrace, when the process
    /// handles `SIGCONT` itself: the continue would run its handler.
    ///
    /// A process in a group stop no longer dies with the agent (ptrace's
    /// exit-kill): a daemon killed meanwhile leaves it stopped, holding its
    /// listening socket (which keeps queuing connections), and a restarted
    /// daemon takes that socket back and kills it (a recorded process found
    /// stopped is never adopted).
    /// `None` too when the process has timers of its own to arm at the
    /// resume, which takes a table run under ptrace.
    pub fn release(&mut self) -> Result<Option<Continuer>, RestoreError> {
        // A tree is released whole or not at all: the resume continues
        // every process from one place.
        if !self.can_release() || !self.descendants.iter().all(Skeleton::can_release) {
            return Ok(None);
        }
        if let Some(continuer) = &self.continuer {
            return Ok(Some(continuer.clone()));
        }
        let mut descendants = Vec::with_capacity(self.descendants.len());
        for descendant in &mut self.descendants {
            if let Some(continuer) = descendant.release()? {
                descendants.push(continuer);
            }
        }
        let pidfd = self.pidfd.as_ref().expect("a skeleton holds its pidfd");
        // Pending while every thread is in a ptrace stop: each takes it
        // before returning to user space, once detached.
        pidfd
            .send_signal(Signal::SIGSTOP)
            .map_err(RestoreError::ptrace(self.pid, "SIGSTOP"))?;
        self.detach_all()?;
        let continuer = Continuer {
            inner: Arc::new(ContinuerState {
                pidfd: Arc::clone(pidfd),
                continued: std::sync::Mutex::new(None),
                timers: self.timers.take().unwrap_or_default(),
                descendants,
            }),
        };
        self.continuer = Some(continuer.clone());
        Ok(Some(continuer))
    }

    /// Whether this process alone may wait in a group stop: it leaves
    /// `SIGCONT` to the kernel and has no timers of its own to arm under
    /// ptrace.
    fn can_release(&self) -> bool {
        let own_timers = self.timers.as_ref().is_some_and(|t| t.table.is_some());
        self.sigcont_is_default && !own_timers
    }

    /// Detaches every thread, the leader last.
    fn detach_all(&self) -> Result<(), RestoreError> {
        for &tid in self.tids.iter().rev() {
            ptrace::detach(tid).map_err(RestoreError::ptrace(tid, "detach"))?;
        }
        Ok(())
    }

    /// Lets every thread run. The process faults on its first touch of
    /// memory, so the caller must run the returned pager.
    pub fn resume(mut self) -> Result<Restored, RestoreError> {
        // A tree's descendants first, children before their parents, the
        // root last (a released tree's root continues them all at once).
        let mut descendants = Vec::with_capacity(self.descendants.len());
        while let Some(descendant) = self.descendants.pop() {
            match descendant.resume() {
                Ok(restored) => descendants.push(restored),
                Err(err) => {
                    // The root is killed as its skeleton drops; these run
                    // already and must not outlive it.
                    for running in &descendants {
                        let _ = running.pidfd.send_signal(Signal::SIGKILL);
                    }
                    for rest in &self.descendants {
                        if let Some(pidfd) = &rest.pidfd {
                            let _ = pidfd.send_signal(Signal::SIGKILL);
                        }
                    }
                    return Err(err);
                }
            }
        }
        descendants.reverse();
        let (resumed_at, took) = match &self.continuer {
            // Perhaps done already, by the daemon's wake thread.
            Some(continuer) => continuer.continue_process()?,
            None => {
                let started = Instant::now();
                if let Some(timers) = self.timers.take() {
                    timers.arm(self.pid)?;
                }
                self.detach_all()?;
                (started, started.elapsed())
            }
        };
        let mut timings = self.timings;
        timings.resume = took;
        let mut pager = self
            .pager
            .take()
            .expect("a skeleton always holds its pager");
        pager.set_resumed_at(resumed_at);
        let restored = Restored {
            pid: self.pid,
            init_pid: self.init_pid,
            pidfd: self
                .pidfd
                .take()
                .expect("a skeleton holds its pidfd until resumed"),
            pager,
            timings,
            resumed_at,
            descendants,
        };
        // The files are the running program's now, left if it is killed
        // (`posix_shm::remove_left_by` once it is parked).
        self.posix_shm_files.clear();
        self.tids.clear();
        Ok(restored)
    }
}

impl Drop for Skeleton {
    fn drop(&mut self) {
        if self.tids.is_empty() {
            return;
        }
        // Never resumed: the process must not survive its skeleton.
        if let Some(pidfd) = &self.pidfd {
            let _ = pidfd.send_signal(Signal::SIGKILL);
        }
        // A tree: every process killed at once, then reaped children
        // first (a killed process we trace reaches its parent only once
        // we have waited for it), the root and its namespace's init last.
        for descendant in &self.descendants {
            if let Some(pidfd) = &descendant.pidfd {
                let _ = pidfd.send_signal(Signal::SIGKILL);
            }
        }
        while let Some(descendant) = self.descendants.pop() {
            drop(descendant);
        }
        // Threads we still trace first: their leader is reported only once
        // they are reaped (a released skeleton's are not ours: ECHILD).
        for &tid in &self.tids[1..] {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(tid),
                Some(nix::sys::wait::WaitPidFlag::__WALL),
            );
        }
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(self.pid),
            Some(nix::sys::wait::WaitPidFlag::__WALL),
        );
        crate::sys::spawn::unclaim(self.pid);
        if let Some(init) = self.init_pid {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(init), None);
        }
        for file in &self.posix_shm_files {
            file.remove_if_unused();
        }
    }
}

/// Whether the process leaves `SIGCONT` to the kernel.
pub(super) fn sigcont_is_default(manifest: &Manifest) -> bool {
    manifest
        .process
        .sigactions
        .iter()
        .filter(|action| action.signal == libc::SIGCONT as u32)
        .all(|action| action.handler == SIG_DFL || action.handler == SIG_IGN)
}

/// Dispositions that leave a signal to the kernel.
const SIG_DFL: u64 = 0;
const SIG_IGN: u64 = 1;
