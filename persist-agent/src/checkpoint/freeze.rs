//! Stopping every thread of a process under ptrace, and letting it go again.
//!
//! Threads are seized (`PTRACE_SEIZE`) and interrupted (`PTRACE_INTERRUPT`),
//! then awaited until they report `PTRACE_EVENT_STOP`. Running threads may
//! create threads meanwhile, so `/proc/PID/task` is scanned again until a
//! scan finds nothing new while every known thread is stopped: a stopped
//! thread cannot create another.
//!
//! Dropping a [`Frozen`] detaches every thread, so on any error the process
//! goes on untouched.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::time::{Duration, Instant};

use crate::sys::pidfd::PidFd;
use crate::sys::ptrace::{self, Stop};

use super::CheckpointError;

/// How long a thread may take to stop once interrupted.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a killed process may take to be gone.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// A process whose threads are all stopped under our ptrace.
#[derive(Debug)]
pub struct Frozen {
    pid: i32,
    /// Seized threads, the leader first.
    tids: Vec<i32>,
}

impl Frozen {
    /// Seizes and stops every thread of `pid`; with `suspend_seccomp`, its
    /// seccomp filters do not apply while we trace it
    /// (`PTRACE_O_SUSPEND_SECCOMP`, which needs CAP_SYS_ADMIN and an agent
    /// under no filter), so that the calls injected into it run.
    pub fn freeze(pid: i32, suspend_seccomp: bool) -> Result<Self, CheckpointError> {
        let options = if suspend_seccomp {
            libc::PTRACE_O_SUSPEND_SECCOMP
        } else {
            0
        };
        let mut frozen = Self {
            pid,
            tids: Vec::new(),
        };
        loop {
            let known: BTreeSet<i32> = frozen.tids.iter().copied().collect();
            let new: Vec<i32> = list_threads(pid)?
                .into_iter()
                .filter(|tid| !known.contains(tid))
                .collect();
            if new.is_empty() {
                break;
            }
            let mut seized = Vec::with_capacity(new.len());
            for tid in new {
                match ptrace::seize_with_options(tid, options) {
                    Ok(()) => {
                        frozen.tids.push(tid);
                        seized.push(tid);
                    }
                    // The thread exited between the scan and the seize
                    // (ESRCH), or is exiting (EPERM on a dead thread).
                    Err(err)
                        if err.raw_os_error() == Some(libc::ESRCH)
                            || matches!(thread_state(pid, tid), None | Some('Z' | 'X')) => {}
                    Err(source) => return Err(frozen.ptrace_error(tid, "PTRACE_SEIZE", source)),
                }
            }
            for &tid in &seized {
                if let Err(source) = ptrace::interrupt(tid)
                    && source.raw_os_error() != Some(libc::ESRCH)
                {
                    return Err(frozen.ptrace_error(tid, "PTRACE_INTERRUPT", source));
                }
            }
            for tid in seized {
                if !frozen.await_stop(tid)? {
                    frozen.tids.retain(|&t| t != tid);
                }
            }
        }
        if !frozen.tids.contains(&pid) {
            return Err(CheckpointError::Exited { pid });
        }
        frozen.tids.sort_by_key(|&tid| (tid != pid, tid));
        Ok(frozen)
    }

    /// Waits until `tid` reports the stop of our interrupt. Returns false if
    /// the thread exited instead.
    fn await_stop(&self, tid: i32) -> Result<bool, CheckpointError> {
        loop {
            let stop = ptrace::wait_timeout(tid, STOP_TIMEOUT)
                .map_err(|source| self.ptrace_error(tid, "waitpid", source))?
                .ok_or(CheckpointError::StopTimeout {
                    pid: self.pid,
                    tid,
                    seconds: STOP_TIMEOUT.as_secs(),
                })?;
            match stop {
                Stop::Event {
                    event: ptrace::PTRACE_EVENT_STOP,
                    ..
                } => return Ok(true),
                // A signal arrived before our interrupt: deliver it as it
                // would have been; the interrupt stays pending and stops the
                // thread right after.
                Stop::Signal(signal) => ptrace::cont(tid, signal)
                    .map_err(|source| self.ptrace_error(tid, "PTRACE_CONT", source))?,
                Stop::Event { .. } => ptrace::cont(tid, 0)
                    .map_err(|source| self.ptrace_error(tid, "PTRACE_CONT", source))?,
                Stop::Exited(_) | Stop::Killed(_) => return Ok(false),
            }
        }
    }

    fn ptrace_error(&self, tid: i32, op: &'static str, source: io::Error) -> CheckpointError {
        CheckpointError::Ptrace {
            pid: self.pid,
            tid,
            op,
            source,
        }
    }

    /// The stopped threads, the thread-group leader first.
    pub fn tids(&self) -> &[i32] {
        &self.tids
    }

    /// Detaches every thread and checks that none is left in a tracing stop.
    pub fn release(mut self) -> Result<(), CheckpointError> {
        let tids = std::mem::take(&mut self.tids);
        let mut first_error = None;
        for &tid in &tids {
            if let Err(source) = ptrace::detach(tid)
                && first_error.is_none()
            {
                first_error = Some(self.ptrace_error(tid, "PTRACE_DETACH", source));
            }
        }
        if let Some(err) = first_error {
            return Err(err);
        }
        // A detached thread leaves the `t` (tracing stop) state at once; one
        // still in it after a while means the process did not resume.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let stuck: Vec<i32> = tids
                .iter()
                .copied()
                .filter(|&tid| thread_state(self.pid, tid) == Some('t'))
                .collect();
            if stuck.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(CheckpointError::StillStopped {
                    pid: self.pid,
                    tid: stuck[0],
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Kills the process with SIGKILL and waits until it has exited.
    ///
    /// The exit of every traced thread is collected, so that the process is
    /// released to its parent at once, except the leader's when we are that
    /// parent: then its exit status is left for the code that started it.
    pub fn kill(mut self, pidfd: &PidFd) -> Result<(), CheckpointError> {
        let our_child = parent_of(self.pid) == Some(std::process::id() as i32);
        let tids = std::mem::take(&mut self.tids);
        pidfd
            .send_signal(nix::sys::signal::Signal::SIGKILL)
            .map_err(|source| CheckpointError::Kill {
                pid: self.pid,
                source,
            })?;
        // The leader last: the kernel reports it only once the others are gone.
        for &tid in tids.iter().rev() {
            if tid == self.pid && our_child {
                let _ = ptrace::wait_exit_keep(tid);
                continue;
            }
            loop {
                match ptrace::wait(tid) {
                    Ok(Stop::Exited(_) | Stop::Killed(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while !pidfd.has_exited() {
            if Instant::now() > deadline {
                return Err(CheckpointError::KillTimeout {
                    pid: self.pid,
                    seconds: EXIT_TIMEOUT.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // Reached on errors only: let the process go on as it was.
        for &tid in &self.tids {
            let _ = ptrace::detach(tid);
        }
    }
}

/// The thread ids listed in `/proc/PID/task`.
pub fn list_threads(pid: i32) -> Result<Vec<i32>, CheckpointError> {
    let dir = format!("/proc/{pid}/task");
    let entries = fs::read_dir(&dir).map_err(|source| CheckpointError::Proc {
        pid,
        path: dir.clone(),
        source,
    })?;
    let mut tids = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| CheckpointError::Proc {
            pid,
            path: dir.clone(),
            source,
        })?;
        if let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            tids.push(tid);
        }
    }
    tids.sort_unstable();
    Ok(tids)
}

/// The parent of process `pid`, from /proc/PID/stat.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// The state letter of a thread (`R`, `S`, `t`, ...), or `None` if it is gone.
fn thread_state(pid: i32, tid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    // The state follows the parenthesised comm, which may contain anything.
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}
