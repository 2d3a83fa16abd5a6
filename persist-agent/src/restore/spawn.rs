//! Forking the process to restore, with its recorded pid, and taking it
//! under ptrace: the agent's side of [`super::child`], up to the end of the
//! restorer table that builds its layout.

use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::signal::Signal;

use super::RestoreError;
use super::child::{self, ChildPlan, GO_LEN, GO_MAGIC, Step};
use super::spawner::{self, Lease};
use crate::sys::clone::{self, Forked};
use crate::sys::ptrace::{self, Stop};

/// How the restored process's threads are traced: their clones too, and
/// killed if the agent dies while they are still traced.
pub(super) const TRACE_OPTIONS: i32 = libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_EXITKILL;

/// Kills what a failed prepare leaves behind.
pub(super) struct KillGuard {
    /// The process, then the init of its pid namespace if it has one.
    pub(super) pids: Vec<i32>,
    /// Threads made after the first.
    pub(super) threads: Vec<i32>,
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
            crate::sys::spawn::unclaim(pid);
        }
    }
}

/// The agent's ends of the pipes to the child (and to the init of its pid
/// namespace, when it needs one).
pub(super) struct SyncPipes<'a> {
    pub(super) status: &'a OwnedFd,
    pub(super) init_go: &'a OwnedFd,
    pub(super) init_go_child: RawFd,
}

/// A process forked and seized, stopped before its layout.
pub(super) struct Spawned {
    /// Its pid, in our namespace.
    pub(super) pid: i32,
    /// The init of its pid namespace, when it needed one.
    pub(super) init_pid: Option<i32>,
    /// The daemon's spawner forked it: held until its layout is built
    /// (`spawner.rs`).
    pub(super) lease: Option<Lease>,
}

/// Forks the process with its recorded pid and seizes it: through the
/// daemon's spawner when it runs, else from the agent; when the pid is
/// taken here, forks an init in a new pid and mount namespace that creates
/// it. The process and the init are pushed on `guard` so that a later error
/// kills them.
pub(super) fn spawn(
    plan: &ChildPlan<'_>,
    recorded_pid: i32,
    pipes: &SyncPipes<'_>,
    guard: &mut KillGuard,
) -> Result<Spawned, RestoreError> {
    if let spawner::Outcome::Forked(pid, lease) = spawner::spawn(plan, recorded_pid)? {
        seize_forked(pid, pipes, guard, TRACE_OPTIONS)?;
        return Ok(Spawned {
            pid,
            init_pid: None,
            lease: Some(lease),
        });
    }
    let (pid, init_pid) = spawn_with(
        plan,
        recorded_pid,
        pipes,
        guard,
        TRACE_OPTIONS,
        false,
        &|| child::child_main(plan),
    )?;
    Ok(Spawned {
        pid,
        init_pid,
        lease: None,
    })
}

/// Takes the freshly forked `pid` under ptrace with `options` and waits
/// for it to stop; pushed on `guard` first.
pub(super) fn seize_forked(
    pid: i32,
    pipes: &SyncPipes<'_>,
    guard: &mut KillGuard,
    options: i32,
) -> Result<(), RestoreError> {
    guard.pids.push(pid);
    ptrace::seize_with_options(pid, options).map_err(RestoreError::ptrace(pid, "seize"))?;
    ptrace::interrupt(pid).map_err(RestoreError::ptrace(pid, "interrupt"))?;
    expect_event_stop(pid, pipes.status)
}

/// [`spawn`], the forked process running `start` (which uses `plan`'s
/// status pipe), traced with `options`; in a pid namespace of its own when
/// `own_namespace` (the pids of a tree's other processes are taken here)
/// or when its pid is taken here.
pub(super) fn spawn_with(
    plan: &ChildPlan<'_>,
    recorded_pid: i32,
    pipes: &SyncPipes<'_>,
    guard: &mut KillGuard,
    options: i32,
    own_namespace: bool,
    start: &dyn Fn(),
) -> Result<(i32, Option<i32>), RestoreError> {
    if own_namespace {
        return spawn_in_namespace(plan, recorded_pid, pipes, guard, options, start);
    }
    match clone::fork_with(0, Some(recorded_pid)) {
        // `start` never returns; exiting is only for the type.
        Ok(Forked::Child) => {
            start();
            clone::exit_now(127)
        }
        Ok(Forked::Parent(pid)) => {
            spawner::count_agent_fork();
            seize_forked(pid, pipes, guard, options)?;
            Ok((pid, None))
        }
        Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {
            spawn_in_namespace(plan, recorded_pid, pipes, guard, options, start)
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
    options: i32,
    start: &dyn Fn(),
) -> Result<(i32, Option<i32>), RestoreError> {
    let flags = (libc::CLONE_NEWPID | libc::CLONE_NEWNS) as u64;
    let init = match clone::fork_with(flags, None).map_err(RestoreError::Fork)? {
        Forked::Child => child::init_main(plan, pipes.init_go_child, recorded_pid, start),
        Forked::Parent(init) => init,
    };
    guard.pids.push(init);
    ptrace::seize_with_options(init, options | libc::PTRACE_O_TRACEFORK)
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
    spawner::count_agent_fork();
    guard.pids.insert(0, pid);
    ptrace::detach(init).map_err(RestoreError::ptrace(init, "detach"))?;
    expect_event_stop(pid, pipes.status)?;
    Ok((pid, Some(init)))
}

/// Tells the stopped child which rseq area it inherited from us (it must
/// unregister it before the agent's memory goes) and lets it jump into the
/// restorer, where it runs its layout table on its own while the agent goes
/// on; [`wait_for_layout`] waits for the end.
pub(super) fn send_go(pid: i32, go_write: &OwnedFd) -> Result<(), RestoreError> {
    let rseq = ptrace::get_rseq_configuration(pid)
        .map_err(RestoreError::ptrace(pid, "rseq configuration"))?;
    let mut go = [0u8; GO_LEN];
    go[..8].copy_from_slice(&GO_MAGIC.to_ne_bytes());
    go[8..16].copy_from_slice(&rseq.rseq_abi_pointer.to_ne_bytes());
    go[16..20].copy_from_slice(&rseq.rseq_abi_size.to_ne_bytes());
    go[20..24].copy_from_slice(&rseq.signature.to_ne_bytes());
    ptrace::cont(pid, 0).map_err(RestoreError::ptrace(pid, "cont"))?;
    write_pipe(go_write, &go)
}

/// Waits for the end of the child's layout table (the routine's final
/// `int3`), after [`send_go`].
pub(super) fn wait_for_layout(pid: i32, status: &OwnedFd) -> Result<(), RestoreError> {
    let stop = ptrace::wait(pid).map_err(RestoreError::ptrace(pid, "wait"))?;
    if stop != Stop::Signal(libc::SIGTRAP) {
        return Err(child_failure(pid, stop, status));
    }
    Ok(())
}

pub(super) fn pipe_above(min: RawFd) -> Result<(OwnedFd, OwnedFd), RestoreError> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| RestoreError::Fork(e.into()))?;
    Ok((dup_above(read, min)?, dup_above(write, min)?))
}

pub(super) fn dup_above(fd: impl AsFd, min: RawFd) -> Result<OwnedFd, RestoreError> {
    let raw = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min))
        .map_err(|e| RestoreError::Fork(e.into()))?;
    // SAFETY: fcntl just returned this new descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

pub(super) fn write_pipe(fd: &OwnedFd, bytes: &[u8]) -> Result<(), RestoreError> {
    nix::unistd::write(fd, bytes)
        .map(drop)
        .map_err(|e| RestoreError::Fork(e.into()))
}

/// Waits for the first stop of a freshly seized child; on its death reports
/// what the status pipe says.
pub(super) fn expect_event_stop(pid: i32, status: &OwnedFd) -> Result<(), RestoreError> {
    match ptrace::wait(pid).map_err(RestoreError::ptrace(pid, "wait"))? {
        Stop::Event { .. } => Ok(()),
        other => Err(child_failure(pid, other, status)),
    }
}

pub(super) fn child_failure(pid: i32, stop: Stop, status: &OwnedFd) -> RestoreError {
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
