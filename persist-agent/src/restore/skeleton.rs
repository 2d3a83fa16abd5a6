//! The two phases of a restore: [`Skeleton::prepare`] builds the process,
//! stopped under ptrace with its layout mapped and nothing of its anonymous
//! memory resident; [`Skeleton::resume`] lets it run, and the returned
//! [`Pager`] serves its memory.
//!
//! Prepare, in the order of the work: check the image; re-create the
//! descriptors and open what the layout needs ([`super::resources`]); fork
//! the child with its recorded pid and let it build its layout
//! ([`super::spawn`]); create the other threads and set each thread's state
//! ([`super::threads`]).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use persist_common::image::{Image, Manifest};

use super::layout::{self, OwnLayout};
use super::pager::Pager;
use super::resources::Resources;
use super::runner::{TableRunner, check_table};
use super::spawn::{self, KillGuard, SyncPipes, pipe_above};
use super::{RestoreError, child::ChildPlan, threads, verify};
use crate::files::{self, InheritedFds, PathAccess};
use crate::host;
use crate::sys::pidfd::PidFd;
use crate::sys::procmem::ProcMem;
use crate::sys::ptrace;
use crate::sys::uffd::Userfault;

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
#[derive(Debug)]
pub struct Skeleton {
    pid: i32,
    tids: Vec<i32>,
    init_pid: Option<i32>,
    /// Where the process keeps its userfaultfd.
    uffd_fd: RawFd,
    /// Taken by [`Skeleton::resume`] for the [`Restored`] process.
    pidfd: Option<PidFd>,
    pager: Option<Pager>,
    timings: Timings,
    /// Whether the process leaves `SIGCONT` to the kernel (no handler of
    /// its own), so that a group stop can hold it instead of ptrace.
    sigcont_is_default: bool,
    /// Set once [`Skeleton::release`] left it in a group stop.
    continuer: Option<Continuer>,
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
    pidfd: PidFd,
    /// When the process was continued, and how long that took, once it was.
    continued: std::sync::Mutex<Option<(Instant, Duration)>>,
}

impl Continuer {
    /// Lets the process run, unless that was done already. Returns when it
    /// was let run, and how long that took.
    pub fn continue_process(&self) -> Result<(Instant, Duration), RestoreError> {
        let mut continued = self.inner.continued.lock().expect("continuer lock");
        if let Some(done) = *continued {
            return Ok(done);
        }
        let started = Instant::now();
        let pid = self.inner.pidfd.pid();
        self.inner
            .pidfd
            .send_signal(Signal::SIGCONT)
            .map_err(RestoreError::ptrace(pid, "SIGCONT"))?;
        let done = (started, started.elapsed());
        *continued = Some(done);
        Ok(done)
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
    /// A pidfd for it, opened when its skeleton was prepared.
    pub pidfd: PidFd,
    /// Serves its memory; run [`Pager::run_until_filled`] (in a thread or a
    /// process) or its faults block forever.
    pub pager: Pager,
    /// How long the phases took.
    pub timings: Timings,
    /// When it was let run.
    pub resumed_at: Instant,
}

impl Skeleton {
    /// Builds the process of `image`, stopped before its first instruction.
    /// Refuses an image from another kernel or CPU before anything runs.
    pub fn prepare(image: Arc<Image>, config: RestoreConfig) -> Result<Self, RestoreError> {
        let started = Instant::now();
        // Whether this image can be restored here, before anything is opened.
        image.check_host(&host::kernel_info(), &host::cpu_info())?;
        let manifest = image.manifest();
        if manifest.threads.is_empty() {
            return Err(RestoreError::Layout("the image has no threads".into()));
        }
        if !manifest.children.is_empty() {
            return Err(RestoreError::ProcessTree {
                pid: manifest.process.pid,
                descendants: manifest.children.len(),
            });
        }
        if manifest.process.root != "/" {
            return Err(RestoreError::Layout(format!(
                "root directory {} is not supported (only /)",
                manifest.process.root
            )));
        }
        if config.verify_pages_first {
            verify::all_pages(&image)?;
        }
        // What the child inherits: its descriptors, what its layout maps,
        // the pipes it is told through, and the layout table itself.
        let mut agent_files = config.agent_files;
        agent_files.extend(manifest.agent_files.iter().map(std::path::PathBuf::from));
        let access = PathAccess::for_process(
            &manifest.process.credentials,
            config.accept_changed_files,
            agent_files,
        );
        let fds = files::prepare(&manifest.fds, config.inherited, &access)?;
        let uffd_fd = (fds.max_target_fd() + 1).max(100);
        let resources = Resources::open(&image, &fds, uffd_fd + 1, &access)?;
        let own = OwnLayout::read()?;
        let (go_read, go_write) = pipe_above(uffd_fd + 1)?;
        let (status_read, status_write) = pipe_above(uffd_fd + 1)?;
        let (init_go_read, init_go_write) = pipe_above(uffd_fd + 1)?;
        let mut layout_fds = resources.layout_fds(uffd_fd);
        // The child's ends of the pipes are ours too: gone before it runs.
        layout_fds.close.extend([
            go_read.as_raw_fd(),
            status_write.as_raw_fd(),
            init_go_read.as_raw_fd(),
        ]);
        let region = layout::build(manifest, &own, &layout_fds, &resources.attributes)?;
        let mut keep: Vec<RawFd> = resources.raw_fds();
        keep.extend([
            uffd_fd,
            go_read.as_raw_fd(),
            status_write.as_raw_fd(),
            init_go_read.as_raw_fd(),
        ]);
        keep.sort_unstable();
        let plan = ChildPlan {
            fds: &fds,
            keep: &keep,
            uffd_fd,
            go_fd: go_read.as_raw_fd(),
            status_fd: status_write.as_raw_fd(),
            region_base: region.base,
            region_size: region.size as usize,
            region_bytes: &region.layout.bytes,
            table_addr: region.layout.entries_addr,
            table_count: region.layout.count,
        };

        // The child, forked with the recorded pid, builds its layout.
        let forked_at = Instant::now();
        let mut guard = KillGuard {
            pids: Vec::new(),
            threads: Vec::new(),
        };
        let pipes = SyncPipes {
            status: &status_read,
            init_go: &init_go_write,
            init_go_child: init_go_read.as_raw_fd(),
        };
        let (pid, init_pid) = spawn::spawn(&plan, manifest.process.pid, &pipes, &mut guard)?;
        let proc_self_positions = fds.proc_self_positions();
        drop(fds);
        let lazy_files = resources.lazy_files(manifest)?;
        // The child holds its own copies now.
        drop(resources);

        spawn::go(pid, &go_write, &status_read)?;
        check_table(pid, &region.layout)?;
        let layout_time = forked_at.elapsed();

        // Its pager, then its threads and their state.
        let pidfd = PidFd::open(pid).map_err(RestoreError::ptrace(pid, "pidfd_open"))?;
        let uffd = pidfd
            .get_fd(uffd_fd)
            .map_err(RestoreError::ptrace(pid, "pidfd_getfd of its userfaultfd"))?;
        let mem = ProcMem::open(pid).map_err(RestoreError::ptrace(pid, "open /proc/PID/mem"))?;
        let mut pager = Pager::new(Userfault::new(uffd), pidfd, Arc::clone(&image), &lazy_files)?;
        let pidfd = PidFd::open(pid).map_err(RestoreError::ptrace(pid, "pidfd_open"))?;

        let mut runner = TableRunner {
            pid,
            mem: &mem,
            region: &region,
        };
        let tids = threads::create(&mut runner, manifest)?;
        guard.threads.extend(tids.iter().skip(1));
        threads::restore_state(&mut runner, manifest, &tids, &mut pager)?;
        files::restore_proc_self_positions(&pidfd, &proc_self_positions)?;
        files::warm_own_proc_entries(pid);

        guard.pids.clear();
        guard.threads.clear();
        Ok(Self {
            pid,
            tids,
            init_pid,
            sigcont_is_default: sigcont_is_default(manifest),
            uffd_fd,
            continuer: None,
            pidfd: Some(pidfd),
            pager: Some(pager),
            timings: Timings {
                prepare: started.elapsed(),
                setup: forked_at - started,
                layout: layout_time,
                finish: forked_at.elapsed() - layout_time,
                resume: Duration::ZERO,
            },
        })
    }

    /// The process's pid in the agent's pid namespace.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The descriptor number at which the process keeps its userfaultfd.
    pub fn uffd_fd(&self) -> i32 {
        self.uffd_fd
    }

    /// How long prepare took (resume is zero until resumed).
    pub fn timings(&self) -> Timings {
        self.timings
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
    pub fn release(&mut self) -> Result<Option<Continuer>, RestoreError> {
        if !self.sigcont_is_default {
            return Ok(None);
        }
        if let Some(continuer) = &self.continuer {
            return Ok(Some(continuer.clone()));
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
                pidfd: pidfd
                    .try_clone()
                    .map_err(RestoreError::ptrace(self.pid, "dup pidfd"))?,
                continued: std::sync::Mutex::new(None),
            }),
        };
        self.continuer = Some(continuer.clone());
        Ok(Some(continuer))
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
        let (resumed_at, took) = match &self.continuer {
            // Perhaps done already, by the daemon's wake thread.
            Some(continuer) => continuer.continue_process()?,
            None => {
                let started = Instant::now();
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
        };
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
        if let Some(init) = self.init_pid {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(init), None);
        }
    }
}

/// Whether the process leaves `SIGCONT` to the kernel.
fn sigcont_is_default(manifest: &Manifest) -> bool {
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
