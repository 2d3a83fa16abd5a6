//! The two phases of a restore: [`Skeleton::prepare`] builds the process,
//! stopped under ptrace with its layout mapped and nothing of its anonymous
//! memory resident; [`Skeleton::resume`] lets it run, and the returned
//! [`Pager`] serves its memory.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use nix::fcntl::OFlag;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use persist_common::image::{
    FileType, Image, Manifest, Mapping, MappingKind, PAGE_SIZE, PageRun, ThreadInfo,
};

use super::child::{self, ChildPlan, GO_LEN, GO_MAGIC, Step};
use super::layout::{self, Attributes, LayoutFds, OwnLayout, Region, describe, is_lazy};
use super::pager::{MappedFiles, Pager};
use super::table::{Table, TableBuilder};
use super::{RestoreError, creds, seccomp};
use crate::files::{self, InheritedFds, PathAccess, PreparedFds, RecordedError};
use crate::host;
use crate::sys::clone::{self, Forked};
use crate::sys::pidfd::PidFd;
use crate::sys::procmem::ProcMem;
use crate::sys::ptrace::{self, Regs, Stop, reg};
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

/// Lets a released skeleton run (`SIGCONT`), from any thread: the daemon's
/// wake thread resumes it itself rather than wake the thread that prepared
/// it, which on this 2-CPU VM took 30–260 µs, plus ~45 µs of detaching.
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

/// Kills what a failed prepare leaves behind.
struct KillGuard {
    /// The process, then the init of its pid namespace if it has one.
    pids: Vec<i32>,
    /// Threads made after the first.
    threads: Vec<i32>,
}

impl Drop for KillGuard {
    fn drop(&mut self) {
        for &pid in self.pids.iter().chain(&self.threads) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        // Traced threads first: until we reap them, their leader's exit is
        // never reported, and the init waits for the leader.
        for &pid in self.threads.iter().chain(&self.pids) {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::__WALL),
            );
        }
    }
}

impl Skeleton {
    /// Builds the process of `image`, stopped before its first instruction.
    /// Refuses an image from another kernel or CPU before anything runs.
    pub fn prepare(image: Arc<Image>, config: RestoreConfig) -> Result<Self, RestoreError> {
        let started = Instant::now();
        image.check_host(&host::kernel_info(), &host::cpu_info())?;
        let manifest = image.manifest();
        if manifest.threads.is_empty() {
            return Err(RestoreError::Layout("the image has no threads".into()));
        }
        if manifest.process.root != "/" {
            return Err(RestoreError::Layout(format!(
                "root directory {} is not supported (only /)",
                manifest.process.root
            )));
        }
        if config.verify_pages_first {
            verify_all_pages(&image)?;
        }
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
        let (pid, init_pid) = spawn(&plan, manifest.process.pid, &pipes, &mut guard)?;
        let proc_self_positions = fds.proc_self_positions();
        drop(fds);
        let lazy_files = resources.lazy_files(manifest)?;
        // The child holds its own copies now.
        drop(resources);

        go(pid, &go_write, &status_read)?;
        check_table(pid, &region.layout)?;
        let layout_time = forked_at.elapsed();

        let pidfd = PidFd::open(pid).map_err(RestoreError::ptrace(pid, "pidfd_open"))?;
        let uffd = pidfd
            .get_fd(uffd_fd)
            .map_err(RestoreError::ptrace(pid, "pidfd_getfd of its userfaultfd"))?;
        let mem = ProcMem::open(pid).map_err(RestoreError::ptrace(pid, "open /proc/PID/mem"))?;
        let mut pager = Pager::new(Userfault::new(uffd), pidfd, Arc::clone(&image), &lazy_files)?;
        let pidfd = PidFd::open(pid).map_err(RestoreError::ptrace(pid, "pidfd_open"))?;

        let mut builder = Builder {
            pid,
            mem: &mem,
            region: &region,
        };
        let tids = builder.threads(manifest)?;
        guard.threads.extend(tids.iter().skip(1));
        builder.thread_state(manifest, &tids, &mut pager)?;
        files::restore_proc_self_positions(&pidfd, &proc_self_positions)?;
        files::warm_own_proc_entries(pid);

        guard.pids.clear();
        guard.threads.clear();
        let sigcont_is_default = manifest
            .process
            .sigactions
            .iter()
            .filter(|action| action.signal == libc::SIGCONT as u32)
            .all(|action| action.handler == SIG_DFL || action.handler == SIG_IGN);
        Ok(Self {
            pid,
            tids,
            init_pid,
            sigcont_is_default,
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

const TRACE_OPTIONS: i32 = libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_EXITKILL;

/// Dispositions that leave a signal to the kernel.
const SIG_DFL: u64 = 0;
const SIG_IGN: u64 = 1;

/// The agent's ends of the pipes to the child (and to the init of its pid
/// namespace, when it needs one).
struct SyncPipes<'a> {
    status: &'a OwnedFd,
    init_go: &'a OwnedFd,
    init_go_child: RawFd,
}

/// Forks the process with its recorded pid and seizes it; when the pid is
/// taken here, forks an init in a new pid and mount namespace that creates
/// it. Returns the process's pid (in our namespace) and the init's, both
/// pushed on `guard` so that a later error kills them.
fn spawn(
    plan: &ChildPlan<'_>,
    recorded_pid: i32,
    pipes: &SyncPipes<'_>,
    guard: &mut KillGuard,
) -> Result<(i32, Option<i32>), RestoreError> {
    match clone::fork_with(0, Some(recorded_pid)) {
        Ok(Forked::Child) => child::child_main(plan),
        Ok(Forked::Parent(pid)) => {
            guard.pids.push(pid);
            ptrace::seize_with_options(pid, TRACE_OPTIONS)
                .map_err(RestoreError::ptrace(pid, "seize"))?;
            ptrace::interrupt(pid).map_err(RestoreError::ptrace(pid, "interrupt"))?;
            expect_event_stop(pid, pipes.status)?;
            Ok((pid, None))
        }
        Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {
            spawn_in_namespace(plan, recorded_pid, pipes, guard)
        }
        Err(err) => Err(RestoreError::Fork(err)),
    }
}

/// The pid is taken here: a private pid namespace, whose init creates the
/// process with the recorded pid; the fork event gives us its pid, and the
/// process is traced from its first instruction on (`PTRACE_O_TRACEFORK`).
fn spawn_in_namespace(
    plan: &ChildPlan<'_>,
    recorded_pid: i32,
    pipes: &SyncPipes<'_>,
    guard: &mut KillGuard,
) -> Result<(i32, Option<i32>), RestoreError> {
    let flags = (libc::CLONE_NEWPID | libc::CLONE_NEWNS) as u64;
    let init = match clone::fork_with(flags, None).map_err(RestoreError::Fork)? {
        Forked::Child => child::init_main(plan, pipes.init_go_child, recorded_pid),
        Forked::Parent(init) => init,
    };
    guard.pids.push(init);
    ptrace::seize_with_options(init, TRACE_OPTIONS | libc::PTRACE_O_TRACEFORK)
        .map_err(RestoreError::ptrace(init, "seize"))?;
    write_pipe(pipes.init_go, &[1])?;
    let pid = match ptrace::wait(init).map_err(RestoreError::ptrace(init, "wait"))? {
        Stop::Event {
            event: ptrace::PTRACE_EVENT_FORK,
            ..
        } => {
            ptrace::event_message(init).map_err(RestoreError::ptrace(init, "event message"))? as i32
        }
        other => return Err(child_failure(init, other, pipes.status)),
    };
    guard.pids.insert(0, pid);
    ptrace::detach(init).map_err(RestoreError::ptrace(init, "detach"))?;
    expect_event_stop(pid, pipes.status)?;
    Ok((pid, Some(init)))
}

/// Tells the stopped child which rseq area it inherited from us (it must
/// unregister it before the agent's memory goes), lets it jump into the
/// restorer and waits for the routine's final `int3`.
fn go(pid: i32, go_write: &OwnedFd, status: &OwnedFd) -> Result<(), RestoreError> {
    let rseq = ptrace::get_rseq_configuration(pid)
        .map_err(RestoreError::ptrace(pid, "rseq configuration"))?;
    let mut go = [0u8; GO_LEN];
    go[..8].copy_from_slice(&GO_MAGIC.to_ne_bytes());
    go[8..16].copy_from_slice(&rseq.rseq_abi_pointer.to_ne_bytes());
    go[16..20].copy_from_slice(&rseq.rseq_abi_size.to_ne_bytes());
    go[20..24].copy_from_slice(&rseq.signature.to_ne_bytes());
    ptrace::cont(pid, 0).map_err(RestoreError::ptrace(pid, "cont"))?;
    write_pipe(go_write, &go)?;
    let stop = ptrace::wait(pid).map_err(RestoreError::ptrace(pid, "wait"))?;
    if stop != Stop::Signal(libc::SIGTRAP) {
        return Err(child_failure(pid, stop, status));
    }
    Ok(())
}

fn verify_all_pages(image: &Image) -> Result<(), RestoreError> {
    for mapping in &image.manifest().mappings {
        for (index, run) in mapping.pages.iter().enumerate() {
            image
                .pages()
                .run(run)
                .map_err(|err| RestoreError::CorruptImage {
                    address: mapping.start + run.first_page * PAGE_SIZE,
                    reason: format!("page run {index} of mapping {:#x}: {err}", mapping.start),
                })?;
        }
    }
    Ok(())
}

fn pipe_above(min: RawFd) -> Result<(OwnedFd, OwnedFd), RestoreError> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| RestoreError::Fork(e.into()))?;
    Ok((dup_above(read, min)?, dup_above(write, min)?))
}

fn dup_above(fd: OwnedFd, min: RawFd) -> Result<OwnedFd, RestoreError> {
    let raw = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min))
        .map_err(|e| RestoreError::Fork(e.into()))?;
    // SAFETY: fcntl just returned this new descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn write_pipe(fd: &OwnedFd, bytes: &[u8]) -> Result<(), RestoreError> {
    nix::unistd::write(fd, bytes)
        .map(drop)
        .map_err(|e| RestoreError::Fork(e.into()))
}

/// Waits for the first stop of a freshly seized child; on its death reports
/// what the status pipe says.
fn expect_event_stop(pid: i32, status: &OwnedFd) -> Result<(), RestoreError> {
    match ptrace::wait(pid).map_err(RestoreError::ptrace(pid, "wait"))? {
        Stop::Event { .. } => Ok(()),
        other => Err(child_failure(pid, other, status)),
    }
}

fn child_failure(pid: i32, stop: Stop, status: &OwnedFd) -> RestoreError {
    let mut message = [0u8; 8];
    let _ = nix::fcntl::fcntl(
        status,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    if let Ok(8) = nix::unistd::read(status, &mut message) {
        let step = u32::from_ne_bytes(message[..4].try_into().unwrap_or_default());
        let errno = i32::from_ne_bytes(message[4..].try_into().unwrap_or_default());
        let what = Step::from_raw(step).map_or("an unknown step", Step::describe);
        return RestoreError::Child {
            pid,
            step: what.to_owned(),
            source: std::io::Error::from_raw_os_error(errno),
        };
    }
    RestoreError::Unexpected {
        pid,
        what: format!("{stop:?} while building the process"),
    }
}

/// Checks a table run's result registers at its int3.
fn check_table(tid: i32, table: &Table) -> Result<(), RestoreError> {
    let regs = ptrace::get_regs(tid).map_err(RestoreError::ptrace(tid, "getregs"))?;
    if regs[R13] == 0 {
        return Ok(());
    }
    let index = table.index_of(regs[R12]);
    let errno = -(regs[reg::RAX] as i64);
    Err(RestoreError::Step {
        pid: tid,
        step: index.map_or_else(|| "?".to_owned(), |i| table.label(i).to_owned()),
        source: std::io::Error::from_raw_os_error(errno as i32),
    })
}

/// `r12` and `r13` in `user_regs_struct`: the routine's cursor and count.
const R12: usize = 3;
const R13: usize = 2;

/// Runs later tables in the stopped process.
struct Builder<'a> {
    pid: i32,
    mem: &'a ProcMem,
    region: &'a Region,
}

impl Builder<'_> {
    fn table(&self) -> TableBuilder {
        TableBuilder::new(self.region.base)
    }

    /// Runs `table` in stopped thread `tid`; returns the tids of threads it
    /// created (in creation order).
    fn run(
        &mut self,
        tid: i32,
        table: Table,
        ends_unmapped: bool,
    ) -> Result<Vec<i32>, RestoreError> {
        if table.bytes.len() as u64 > self.region.table_room {
            return Err(RestoreError::Layout(format!(
                "a table of {} bytes does not fit the restorer region",
                table.bytes.len()
            )));
        }
        self.mem
            .write_all_at(table.base, &table.bytes)
            .map_err(RestoreError::ptrace(self.pid, "write the restorer table"))?;
        let mut regs: Regs = ptrace::get_regs(tid).map_err(RestoreError::ptrace(tid, "getregs"))?;
        regs[reg::RIP] = table.base;
        regs[reg::RDI] = table.entries_addr;
        regs[reg::RSI] = table.count;
        regs[reg::ORIG_RAX] = u64::MAX;
        regs[reg::RAX] = 0;
        ptrace::set_regs(tid, &regs).map_err(RestoreError::ptrace(tid, "setregs"))?;
        ptrace::cont(tid, 0).map_err(RestoreError::ptrace(tid, "cont"))?;
        let mut created = Vec::new();
        loop {
            match ptrace::wait(tid).map_err(RestoreError::ptrace(tid, "wait"))? {
                Stop::Event {
                    event: ptrace::PTRACE_EVENT_CLONE,
                    ..
                } => {
                    let new = ptrace::event_message(tid)
                        .map_err(RestoreError::ptrace(tid, "event message"))?;
                    created.push(new as i32);
                    ptrace::cont(tid, 0).map_err(RestoreError::ptrace(tid, "cont"))?;
                }
                Stop::Signal(libc::SIGTRAP) => break,
                Stop::Signal(libc::SIGSEGV) if ends_unmapped => return Ok(created),
                other => {
                    return Err(RestoreError::Unexpected {
                        pid: tid,
                        what: format!("{other:?} while running a restorer table"),
                    });
                }
            }
        }
        check_table(tid, &table)?;
        Ok(created)
    }

    /// Per-thread state and credentials (natively, last), the restorer
    /// region unmapped, then registers, xsave, signal masks and pending
    /// signals set from outside; `tids` are the threads in manifest order.
    fn thread_state(
        &mut self,
        manifest: &Manifest,
        tids: &[i32],
        pager: &mut Pager,
    ) -> Result<(), RestoreError> {
        let pid = self.pid;
        let current_creds = creds::own();
        let shared = seccomp::shared_prefix(&manifest.threads).len();
        for (thread, &tid) in manifest.threads.iter().zip(tids) {
            if let Some(rseq) = &thread.rseq {
                // The kernel writes the rseq area at registration.
                pager.prefill_page(rseq.address)?;
                pager.prefill_page(rseq.address + u64::from(rseq.length.max(1)) - 1)?;
            }
            let mut t = self.table();
            per_thread(&mut t, thread);
            // Before the credentials, while the thread may still install
            // any filter; the filters are suspended until the end.
            seccomp::append(
                &mut t,
                &manifest.process.seccomp_filters,
                &thread.seccomp[shared..],
            )?;
            if let Some(current) = &current_creds {
                creds::append(&mut t, &manifest.process.credentials, current);
            }
            if tid == pid {
                itimers(&mut t, manifest);
            }
            self.run(tid, t.finish(), false)?;
        }
        // Last: the region goes, so the main thread faults right after the
        // munmap returns; that SIGSEGV is the expected end.
        let mut t = self.table();
        t.call(
            "unmap the restorer region",
            libc::SYS_munmap,
            &[self.region.base, self.region.size],
        );
        self.run(pid, t.finish(), true)?;

        for (thread, &tid) in manifest.threads.iter().zip(tids) {
            set_thread_state(tid, thread)?;
            // Every thread starts on its stack top and TLS: those pages
            // alone, so that a parked skeleton stays a few pages small
            // (their neighbours fault in on the wake).
            for hot in [thread.regs[reg::RSP], thread.regs[reg::FS_BASE]] {
                pager.prefill_page(hot)?;
            }
            for signal in signals(thread.pending) {
                clone::tgkill(pid, tid, signal)
                    .map_err(RestoreError::ptrace(tid, "queue a pending signal"))?;
            }
        }
        for signal in signals(manifest.process.shared_pending) {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                Signal::try_from(signal).ok(),
            )
            .map_err(|errno| RestoreError::ptrace(pid, "queue a pending signal")(errno.into()))?;
        }
        if !manifest.process.seccomp_filters.is_empty() {
            // The filters apply from the thread's first instruction on,
            // whether it resumes under ptrace or from a group stop.
            for &tid in tids {
                ptrace::set_options(tid, TRACE_OPTIONS)
                    .map_err(RestoreError::ptrace(tid, "resume seccomp"))?;
            }
        }
        Ok(())
    }

    /// Creates the threads after the first with their recorded tids; returns
    /// every thread's tid in our namespace, the leader first.
    /// The filters every thread shares are installed first, so that the
    /// threads inherit them (see [`seccomp`]); from then on the process is
    /// traced with its filters suspended until [`Builder::thread_state`]
    /// is done.
    fn threads(&mut self, manifest: &Manifest) -> Result<Vec<i32>, RestoreError> {
        let mut tids = vec![self.pid];
        let filtered = !manifest.process.seccomp_filters.is_empty();
        if filtered {
            ptrace::set_options(self.pid, TRACE_OPTIONS | libc::PTRACE_O_SUSPEND_SECCOMP)
                .map_err(RestoreError::ptrace(self.pid, "suspend seccomp"))?;
        }
        let shared = seccomp::shared_prefix(&manifest.threads);
        if manifest.threads.len() == 1 && shared.is_empty() {
            return Ok(tids);
        }
        let mut t = self.table();
        seccomp::append(&mut t, &manifest.process.seccomp_filters, shared)?;
        for thread in &manifest.threads[1..] {
            let set_tid = t.data(&thread.tid.to_ne_bytes());
            let args = t.data(&clone::thread_clone_args(set_tid));
            t.call(
                format!("clone3 of thread {}", thread.tid),
                libc::SYS_clone3,
                &[args, clone::CLONE_ARGS_SIZE as u64],
            );
        }
        let created = self.run(self.pid, t.finish(), false)?;
        if created.len() != manifest.threads.len() - 1 {
            return Err(RestoreError::Unexpected {
                pid: self.pid,
                what: format!(
                    "{} threads created, {} expected",
                    created.len(),
                    manifest.threads.len() - 1
                ),
            });
        }
        for &tid in &created {
            match ptrace::wait(tid).map_err(RestoreError::ptrace(tid, "wait"))? {
                Stop::Event { .. } | Stop::Signal(libc::SIGSTOP) => {}
                other => {
                    return Err(RestoreError::Unexpected {
                        pid: tid,
                        what: format!("{other:?} as a new thread's first stop"),
                    });
                }
            }
            if filtered {
                // Inherited from the creator's tracing; set all the same.
                ptrace::set_options(tid, TRACE_OPTIONS | libc::PTRACE_O_SUSPEND_SECCOMP)
                    .map_err(RestoreError::ptrace(tid, "suspend seccomp"))?;
            }
        }
        tids.extend(created);
        Ok(tids)
    }
}

/// rseq, alternate signal stack and clear_child_tid of one thread.
/// `sizeof(struct robust_list_head)` on x86-64: three pointer-sized words.
const ROBUST_LIST_HEAD_LEN: u64 = 24;

fn per_thread(t: &mut TableBuilder, thread: &ThreadInfo) {
    if let Some(rseq) = &thread.rseq {
        t.call(
            format!("rseq registration at {:#x}", rseq.address),
            libc::SYS_rseq,
            &[
                rseq.address,
                u64::from(rseq.length),
                0,
                u64::from(rseq.signature),
            ],
        );
    }
    let stack = thread.sigaltstack;
    let enabled = stack.flags & libc::SS_DISABLE == 0 && stack.size > 0;
    let words = if enabled {
        [stack.sp, 0, stack.size]
    } else {
        [0, libc::SS_DISABLE as u64, 0]
    };
    let address = t.words(&words);
    t.call("sigaltstack", libc::SYS_sigaltstack, &[address, 0]);
    let mut name = thread.comm.as_bytes().to_vec();
    name.truncate(15);
    name.push(0);
    let name_addr = t.data(&name);
    t.call(
        format!("set thread name {}", thread.comm),
        libc::SYS_prctl,
        &[libc::PR_SET_NAME as u64, name_addr],
    );
    t.call(
        "set_tid_address",
        libc::SYS_set_tid_address,
        &[thread.clear_child_tid],
    );
    // Always set: a thread made here has none, and the main thread has the
    // agent's forking thread's, an address meaning nothing in this process.
    // The kernel accepts only the head's own size, also to clear it.
    let (head, len) = thread
        .robust_list
        .map_or((0, ROBUST_LIST_HEAD_LEN), |list| (list.head, list.len));
    t.call(
        format!("set_robust_list at {head:#x}"),
        libc::SYS_set_robust_list,
        &[head, len],
    );
}

fn itimers(t: &mut TableBuilder, manifest: &Manifest) {
    for timer in &manifest.process.itimers {
        if timer.value_us == 0 {
            continue;
        }
        let address = t.words(&[
            timer.interval_us / 1_000_000,
            timer.interval_us % 1_000_000,
            timer.value_us / 1_000_000,
            timer.value_us % 1_000_000,
        ]);
        t.call(
            format!("setitimer {}", timer.which),
            libc::SYS_setitimer,
            &[u64::from(timer.which), address, 0],
        );
    }
}

/// Final registers, xsave area and signal mask of a stopped thread.
fn set_thread_state(tid: i32, thread: &ThreadInfo) -> Result<(), RestoreError> {
    let mut regs: Regs = thread.regs.as_slice().try_into().map_err(|_| {
        RestoreError::Layout(format!(
            "thread {}: {} register words, expected {}",
            thread.tid,
            thread.regs.len(),
            ptrace::USER_REGS_WORDS
        ))
    })?;
    normalize_syscall_restart(&mut regs);
    ptrace::set_regs(tid, &regs).map_err(RestoreError::ptrace(tid, "setregs"))?;
    if !thread.xsave.is_empty() {
        ptrace::set_xstate(tid, &thread.xsave)
            .map_err(RestoreError::ptrace(tid, "set xsave area"))?;
    }
    ptrace::set_sigmask(tid, thread.sigmask)
        .map_err(RestoreError::ptrace(tid, "set signal mask"))?;
    Ok(())
}

/// A thread recorded inside an interrupted syscall resumes by re-entering it
/// (as the kernel would have); the checkpoint usually did this already.
fn normalize_syscall_restart(regs: &mut Regs) {
    const RESTART: [i64; 3] = [-512, -513, -514];
    let in_syscall = regs[reg::ORIG_RAX] as i64;
    if in_syscall >= 0 {
        let rax = regs[reg::RAX] as i64;
        if RESTART.contains(&rax) {
            regs[reg::RAX] = in_syscall as u64;
            regs[reg::RIP] -= 2;
        } else if rax == -516 {
            regs[reg::RAX] = (-i64::from(libc::EINTR)) as u64;
        }
    }
    regs[reg::ORIG_RAX] = u64::MAX;
}

fn signals(mask: u64) -> impl Iterator<Item = i32> {
    (1..=64).filter(move |s| {
        mask & (1u64 << (s - 1)) != 0 && *s != libc::SIGKILL && *s != libc::SIGSTOP
    })
}

/// The address and checksum-verified contents of one stored run of `mapping`.
fn stored_run<'a>(
    image: &'a Image,
    mapping: &Mapping,
    run: &PageRun,
) -> Result<(u64, &'a [u8]), RestoreError> {
    let address = mapping.start + run.first_page * PAGE_SIZE;
    let bytes = image
        .pages()
        .run(run)
        .map_err(|err| RestoreError::CorruptImage {
            address,
            reason: err.to_string(),
        })?;
    Ok((address, bytes))
}

/// Descriptors opened before the fork for the layout table.
struct Resources {
    mapping_fds: Vec<Option<OwnedFd>>,
    exe: OwnedFd,
    cwd: OwnedFd,
    attributes: Attributes,
}

impl Resources {
    fn open(
        image: &Image,
        fds: &PreparedFds,
        min: RawFd,
        access: &PathAccess,
    ) -> Result<Self, RestoreError> {
        let manifest = image.manifest();
        let mut shared: HashMap<u64, RawFd> = HashMap::new();
        let mut mapping_fds = Vec::with_capacity(manifest.mappings.len());
        let mut memfds: Vec<OwnedFd> = Vec::new();
        for mapping in &manifest.mappings {
            let fd = match &mapping.kind {
                MappingKind::File {
                    path,
                    inode,
                    device,
                    ..
                } => Some(open_mapped_file(
                    mapping.start,
                    path,
                    *inode,
                    device,
                    mapping.shared && mapping.protection.write,
                    min,
                    access,
                )?),
                MappingKind::Memfd { inode, .. } | MappingKind::SharedAnonymous { inode } => {
                    let existing = match shared.get(inode) {
                        Some(&raw) => raw,
                        None => {
                            let fd = match (&mapping.kind, fds.memfd(*inode)) {
                                (MappingKind::Memfd { .. }, Some(fd)) => fd
                                    .try_clone_to_owned()
                                    .map_err(|e| RestoreError::io("memfd", e))?,
                                _ => new_memfd(*inode)?,
                            };
                            fill_shared_memory(image, *inode, &fd)?;
                            let fd = dup_above(fd, min)?;
                            let raw = fd.as_raw_fd();
                            memfds.push(fd);
                            shared.insert(*inode, raw);
                            raw
                        }
                    };
                    let source = memfds
                        .iter()
                        .find(|f| f.as_raw_fd() == existing)
                        .expect("every recorded shared object has a memfd");
                    let copy = source
                        .try_clone()
                        .map_err(|e| RestoreError::io("memfd", e))?;
                    Some(dup_above(copy, min)?)
                }
                _ => None,
            };
            mapping_fds.push(fd);
        }
        let exe = open_process_path(
            &manifest.process.exe,
            OFlag::O_RDONLY,
            FileType::Regular,
            access,
        )?;
        let cwd = open_process_path(
            &manifest.process.cwd,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            FileType::Directory,
            access,
        )?;
        let mut rlimits = Vec::new();
        for limit in &manifest.process.rlimits {
            let resource = limit.resource;
            let (soft, hard) = own_rlimit(resource);
            // Without CAP_SYS_RESOURCE a hard limit cannot be raised: keep ours.
            let new_hard = limit.hard.min(hard);
            if new_hard < limit.hard {
                tracing::warn!(
                    resource,
                    recorded = limit.hard,
                    kept = hard,
                    "hard rlimit lowered"
                );
            }
            let new_soft = limit.soft.min(new_hard);
            if (new_soft, new_hard) != (soft, hard) {
                rlimits.push((resource, new_soft, new_hard));
            }
        }
        Ok(Self {
            mapping_fds,
            exe: dup_above(exe.into(), min)?,
            cwd: dup_above(cwd.into(), min)?,
            attributes: Attributes { rlimits },
        })
    }

    /// The files of the mappings the pager serves, for their pages nothing
    /// was stored for.
    fn lazy_files(&self, manifest: &Manifest) -> Result<MappedFiles, RestoreError> {
        let mut files = MappedFiles::new();
        for (index, mapping) in manifest.mappings.iter().enumerate() {
            if !(is_lazy(mapping) && matches!(mapping.kind, MappingKind::File { .. })) {
                continue;
            }
            if let Some(Some(fd)) = self.mapping_fds.get(index) {
                let file = fd
                    .try_clone()
                    .map_err(|e| RestoreError::io(describe(mapping), e))?;
                files.insert(index, Arc::new(File::from(file)));
            }
        }
        Ok(files)
    }

    fn raw_fds(&self) -> Vec<RawFd> {
        self.mapping_fds
            .iter()
            .flatten()
            .map(AsRawFd::as_raw_fd)
            .chain([self.exe.as_raw_fd(), self.cwd.as_raw_fd()])
            .collect()
    }

    fn layout_fds(&self, uffd: RawFd) -> LayoutFds {
        LayoutFds {
            mapping_fds: self
                .mapping_fds
                .iter()
                .map(|fd| fd.as_ref().map(AsRawFd::as_raw_fd))
                .collect(),
            exe: Some(self.exe.as_raw_fd()),
            cwd: Some(self.cwd.as_raw_fd()),
            uffd,
            close: self.raw_fds(),
        }
    }
}

fn own_rlimit(resource: u32) -> (u64, u64) {
    crate::sys::rlimit::get(0, resource).unwrap_or((u64::MAX, u64::MAX))
}

/// The files of the lazy file mappings of `image`, opened again (for a
/// pager taking over a restored process), each checked to be the file
/// recorded.
pub(crate) fn lazy_files_of(image: &Image) -> Result<MappedFiles, RestoreError> {
    // As the process would open them: mapped files must be the very ones.
    let access = PathAccess::for_process(&image.manifest().process.credentials, false, Vec::new());
    let mut files = MappedFiles::new();
    for (index, mapping) in image.manifest().mappings.iter().enumerate() {
        if let MappingKind::File {
            path,
            inode,
            device,
            ..
        } = &mapping.kind
            && is_lazy(mapping)
        {
            let fd = open_mapped_file(mapping.start, path, *inode, device, false, 0, &access)?;
            files.insert(index, Arc::new(File::from(fd)));
        }
    }
    Ok(files)
}

/// Opens the executable or the working directory, as the process would
/// and never through a symlink.
fn open_process_path(
    path: &str,
    flags: OFlag,
    file_type: FileType,
    access: &PathAccess,
) -> Result<File, RestoreError> {
    files::open_recorded(path, flags, None, &[file_type], access).map_err(|err| match err {
        RecordedError::Changed(what) => RestoreError::PathChanged {
            path: path.to_owned(),
            what,
        },
        RecordedError::Io { source, .. } => RestoreError::io(path, source),
    })
}

/// Opens the file of the mapping at `start`, as the process would, never
/// through a symlink, and only if it is still the file mapped at checkpoint
/// (whatever the access accepts for descriptors: the process's memory holds
/// pages of that file).
fn open_mapped_file(
    start: u64,
    path: &str,
    inode: u64,
    device: &str,
    writable: bool,
    min: RawFd,
    access: &PathAccess,
) -> Result<OwnedFd, RestoreError> {
    let flags = if writable {
        OFlag::O_RDWR
    } else {
        OFlag::O_RDONLY
    };
    let changed = |what: String| RestoreError::FileChanged {
        address: start,
        path: path.to_owned(),
        what,
    };
    let file =
        files::open_recorded(path, flags, None, &[FileType::Regular], access).map_err(|err| {
            match err {
                RecordedError::Changed(what) => changed(what),
                RecordedError::Io { source, .. } => RestoreError::io(path, source),
            }
        })?;
    let meta = file.metadata().map_err(|e| RestoreError::io(path, e))?;
    let device_matches = device.split_once(':').is_none_or(|(major, minor)| {
        match (
            u64::from_str_radix(major, 16),
            u64::from_str_radix(minor, 16),
        ) {
            (Ok(major), Ok(minor)) => {
                libc::major(meta.dev()) as u64 == major && libc::minor(meta.dev()) as u64 == minor
            }
            _ => true,
        }
    });
    if meta.ino() != inode {
        return Err(changed(format!(
            "its inode was {inode}, it is now {}",
            meta.ino()
        )));
    }
    if !device_matches {
        return Err(changed(format!(
            "its device was {device}, it is now {:x}:{:02x}",
            libc::major(meta.dev()),
            libc::minor(meta.dev())
        )));
    }
    dup_above(file.into(), min)
}

fn new_memfd(inode: u64) -> Result<OwnedFd, RestoreError> {
    let name = CString::new(format!("persist-shm-{inode}")).expect("no NUL in a number");
    nix::sys::memfd::memfd_create(name.as_c_str(), nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(|e| RestoreError::io("memfd_create", e.into()))
}

/// Writes the stored pages of a shared memory object into `fd`, which every
/// mapping of the object then maps, so they stay shared.
fn fill_shared_memory(image: &Image, inode: u64, fd: &OwnedFd) -> Result<(), RestoreError> {
    let file = File::from(fd.try_clone().map_err(|e| RestoreError::io("memfd", e))?);
    let current = file
        .metadata()
        .map_err(|e| RestoreError::io("memfd", e))?
        .len();
    for mapping in &image.manifest().mappings {
        let (offset, same) = match &mapping.kind {
            MappingKind::Memfd {
                inode: i, offset, ..
            } => (*offset, *i == inode),
            MappingKind::SharedAnonymous { inode: i } => (0, *i == inode),
            _ => continue,
        };
        if !same {
            continue;
        }
        if offset + mapping.len() > current {
            file.set_len(offset + mapping.len())
                .map_err(|e| RestoreError::io("memfd", e))?;
        }
        for run in &mapping.pages {
            let (_, bytes) = stored_run(image, mapping, run)?;
            std::os::unix::fs::FileExt::write_all_at(
                &file,
                bytes,
                offset + run.first_page * PAGE_SIZE,
            )
            .map_err(|e| RestoreError::io("memfd", e))?;
        }
    }
    Ok(())
}
