//! Stopping every thread of a process under ptrace, and letting it go again.
//!
//! Threads are seized (`PTRACE_SEIZE`), the process is sent SIGSTOP, and
//! every thread is awaited until it reports the group stop
//! (`PTRACE_EVENT_STOP`). Running threads may create threads meanwhile, so
//! `/proc/PID/task` is scanned again until a scan finds nothing new while
//! every known thread is stopped: a stopped thread cannot create another.
//!
//! A group stop rather than `PTRACE_INTERRUPT`: when the tracer dies, the
//! kernel detaches its tracees, and a thread of a group-stopped process stays
//! stopped (state `T`) where an interrupted one would run on, with whatever
//! registers the tracer had injected (see docs/kernel-facts.md). Letting the
//! process go is detaching, then SIGCONT (unless it was stopped before).
//!
//! Dropping a [`Frozen`] detaches every thread and continues the process, so
//! on any error the process goes on untouched.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::time::{Duration, Instant};

use crate::sys::pidfd::PidFd;
use crate::sys::ptrace::{self, Stop};

use super::CheckpointError;

/// How long the threads may take to stop once the process is sent SIGSTOP.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a killed process may take to be gone.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// A process whose threads are all stopped under our ptrace.
#[derive(Debug)]
pub struct Frozen {
    pid: i32,
    pidfd: PidFd,
    /// Seized threads, the leader first.
    tids: Vec<i32>,
    /// Whether SIGCONT lets it go (we stopped it; it was not stopped before).
    resume: bool,
}

impl Frozen {
    /// Seizes every thread of `pid` and stops the process (group stop).
    /// `resume`: SIGCONT it when letting it go (false for a process that was
    /// stopped before). With `suspend_seccomp`, its seccomp filters do not
    /// apply while we trace it (`PTRACE_O_SUSPEND_SECCOMP`, which needs
    /// CAP_SYS_ADMIN and an agent under no filter), so that the calls
    /// injected into it run.
    pub fn freeze(
        pid: i32,
        pidfd: &PidFd,
        resume: bool,
        suspend_seccomp: bool,
    ) -> Result<Self, CheckpointError> {
        let options = if suspend_seccomp {
            libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_SUSPEND_SECCOMP
        } else {
            libc::PTRACE_O_TRACESYSGOOD
        };
        let mut frozen = Self {
            pid,
            pidfd: pidfd
                .try_clone()
                .map_err(|source| CheckpointError::PidFd { pid, source })?,
            tids: Vec::new(),
            resume,
        };
        let mut stop_sent = false;
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
            if !stop_sent && !seized.is_empty() {
                // Sent once the first threads are seized, so that each of
                // them reports its part of the group stop to us.
                frozen
                    .pidfd
                    .send_signal(nix::sys::signal::Signal::SIGSTOP)
                    .map_err(|source| CheckpointError::Signal {
                        pid,
                        signal: "SIGSTOP",
                        source,
                    })?;
                stop_sent = true;
            }
            for tid in frozen.await_stops(&seized)? {
                frozen.tids.retain(|&t| t != tid);
            }
        }
        if !frozen.tids.contains(&pid) {
            return Err(CheckpointError::Exited { pid });
        }
        frozen.tids.sort_by_key(|&tid| (tid != pid, tid));
        Ok(frozen)
    }

    /// Waits until every thread of `tids` reports the group stop, polling
    /// them in turn: the thread that takes our SIGSTOP stops first to have
    /// it delivered, and the others stop only once it is. Returns the
    /// threads that exited instead.
    fn await_stops(&self, tids: &[i32]) -> Result<Vec<i32>, CheckpointError> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut waiting = tids.to_vec();
        let mut exited = Vec::new();
        let mut pause = Duration::from_micros(20);
        while let Some(&first) = waiting.first() {
            let mut progressed = false;
            let mut index = 0;
            while index < waiting.len() {
                let tid = waiting[index];
                let stop = ptrace::wait_timeout(tid, Duration::ZERO)
                    .map_err(|source| self.ptrace_error(tid, "waitpid", source))?;
                let done = match stop {
                    None => false,
                    Some(Stop::Event {
                        event: ptrace::PTRACE_EVENT_STOP,
                        ..
                    }) => true,
                    // A signal to deliver (our SIGSTOP among them, which
                    // starts the group stop): delivered as it would have
                    // been; the group stop stops the thread right after.
                    Some(Stop::Signal(signal)) => {
                        ptrace::cont(tid, signal)
                            .map_err(|source| self.ptrace_error(tid, "PTRACE_CONT", source))?;
                        false
                    }
                    Some(Stop::Event { .. }) => {
                        ptrace::cont(tid, 0)
                            .map_err(|source| self.ptrace_error(tid, "PTRACE_CONT", source))?;
                        false
                    }
                    Some(Stop::Exited(_) | Stop::Killed(_)) => {
                        exited.push(tid);
                        true
                    }
                };
                progressed |= stop.is_some();
                if done {
                    waiting.swap_remove(index);
                } else {
                    index += 1;
                }
            }
            if progressed {
                pause = Duration::from_micros(20);
                continue;
            }
            if Instant::now() > deadline {
                return Err(CheckpointError::StopTimeout {
                    pid: self.pid,
                    tid: first,
                    seconds: STOP_TIMEOUT.as_secs(),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
        Ok(exited)
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

    /// Detaches every thread, continues the process, and checks that no
    /// thread is left stopped.
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
        if let Err(err) = self.resume()
            && first_error.is_none()
        {
            first_error = Some(err);
        }
        if let Some(err) = first_error {
            return Err(err);
        }
        // A detached thread leaves the `t` (tracing stop) state at once, and
        // a continued one the `T` (stopped) state; one still in either after
        // a while means the process did not resume.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let stuck: Vec<i32> = tids
                .iter()
                .copied()
                .filter(|&tid| match thread_state(self.pid, tid) {
                    Some('t') => true,
                    Some('T') => self.resume,
                    _ => false,
                })
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

impl Frozen {
    /// Ends the group stop we started.
    fn resume(&self) -> Result<(), CheckpointError> {
        if !self.resume {
            return Ok(());
        }
        self.pidfd
            .send_signal(nix::sys::signal::Signal::SIGCONT)
            .map_err(|source| CheckpointError::Signal {
                pid: self.pid,
                signal: "SIGCONT",
                source,
            })
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // Reached on errors (and after a kill, with no thread left): let
        // the process go on as it was.
        if self.tids.is_empty() {
            return;
        }
        for &tid in &self.tids {
            let _ = ptrace::detach(tid);
        }
        let _ = self.resume();
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
