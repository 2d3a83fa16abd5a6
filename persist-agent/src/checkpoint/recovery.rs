//! Undoing a checkpoint whose agent died before it finished.
//!
//! A checkpoint puts the process in a group stop (SIGSTOP) before it changes
//! anything in it. If the agent dies, the kernel detaches every thread, and a
//! thread of a group-stopped process stays stopped (state `T`) instead of
//! running on with the registers of an injected system call (see
//! docs/kernel-facts.md). Before a thread's registers, signal mask or scratch
//! bytes are changed, what undoes it is written to the recovery file
//! ([`super::CheckpointOptions::recovery_file`]), and it is taken off again
//! once they are put back. [`recover`] reads the file of a dead agent, puts
//! back what it lists and lets the process run again, exactly as if no
//! checkpoint had begun.
//!
//! The file is written without fsync: it guards against the agent's death,
//! and a machine that goes down takes the process with it.

use std::cell::{Cell, RefCell};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use persist_common::trust::{TrustError, read_trusted_file};

use crate::sys::pidfd::PidFd;
use crate::sys::procmem::ProcMem;
use crate::sys::ptrace::{self, Regs, Stop, USER_REGS_WORDS};

use super::CheckpointError;

/// Longest recovery file read: a few hundred bytes per thread.
const MAX_RECOVERY_BYTES: u64 = 1 << 20;

/// How long a thread may take to report its stop once seized.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Set to a number of milliseconds, a checkpoint given a recovery file
/// pauses that long after its first injected system call, with the
/// thread's registers still changed: for tests that kill the agent at that
/// instant (a debug hook; a daemon's keep parks have a recovery file, the
/// builds of its images do not).
pub const PAUSE_ENV: &str = "PERSIST_DEBUG_CHECKPOINT_PAUSE_MS";

/// Like [`PAUSE_ENV`], the pause coming once everything is saved, before
/// the process is killed or let go: its TCP connections are then held in
/// repair mode (a debug hook for the test of that instant).
pub const PAUSE_AFTER_SAVE_ENV: &str = "PERSIST_DEBUG_CHECKPOINT_PAUSE_AFTER_SAVE_MS";

/// What a recovery file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RecoveryRecord {
    /// The process being checkpointed.
    pid: i32,
    /// Its start time (`/proc/PID/stat` field 22), which tells it apart from
    /// a later process with a recycled pid.
    start_time: u64,
    /// Whether the checkpoint stopped it (rather than finding it stopped),
    /// so that undoing it means SIGCONT.
    resume: bool,
    /// The threads whose state is changed at this instant.
    threads: Vec<ThreadUndo>,
}

/// What puts a thread back as it was before calls were injected into it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThreadUndo {
    /// The thread.
    pub tid: i32,
    /// Its general registers.
    pub regs: Vec<u64>,
    /// Its blocked-signal mask.
    pub sigmask: u64,
    /// Address of the scratch area below its stack.
    pub scratch_at: u64,
    /// The scratch area's bytes.
    pub scratch: Vec<u8>,
}

/// The recovery file of a checkpoint under way: kept up to date with what
/// would undo the checkpoint now, and removed when the checkpoint ends
/// either way (dropped after the process runs again or is gone). Without a
/// path it only keeps the record in memory.
pub struct Journal {
    path: Option<PathBuf>,
    record: RefCell<RecoveryRecord>,
    pause: Cell<Option<Duration>>,
    pause_after_save: Cell<Option<Duration>>,
}

impl Journal {
    /// Writes the first record, before the process is stopped: undoing now
    /// means letting it run (SIGCONT when `resume`).
    pub fn begin(path: Option<&Path>, pid: i32, resume: bool) -> Result<Self, CheckpointError> {
        let start_time = procfs::process::Process::new(pid)
            .and_then(|process| process.stat())
            .map_err(|source| CheckpointError::ProcFs {
                pid,
                what: "stat",
                source,
            })?
            .starttime;
        let pause_from = |name| {
            std::env::var(name)
                .ok()
                .filter(|_| path.is_some())
                .and_then(|ms| ms.parse().ok())
                .map(Duration::from_millis)
        };
        let journal = Self {
            path: path.map(Path::to_owned),
            record: RefCell::new(RecoveryRecord {
                pid,
                start_time,
                resume,
                threads: Vec::new(),
            }),
            pause: Cell::new(pause_from(PAUSE_ENV)),
            pause_after_save: Cell::new(pause_from(PAUSE_AFTER_SAVE_ENV)),
        };
        journal.write()?;
        Ok(journal)
    }

    /// Records how to undo what is about to change in a thread.
    pub fn injecting(&self, undo: ThreadUndo) -> Result<(), CheckpointError> {
        {
            let mut record = self.record.borrow_mut();
            record.threads.retain(|thread| thread.tid != undo.tid);
            record.threads.push(undo);
        }
        self.write()
    }

    /// Records that thread `tid` is as it was again.
    pub fn restored(&self, tid: i32) -> Result<(), CheckpointError> {
        self.record
            .borrow_mut()
            .threads
            .retain(|thread| thread.tid != tid);
        self.write()
    }

    /// Pauses once, when [`PAUSE_ENV`] asks for it (tests only).
    pub fn pause_for_tests(&self) {
        if let Some(pause) = self.pause.take() {
            std::thread::sleep(pause);
        }
    }

    /// Pauses once, when [`PAUSE_AFTER_SAVE_ENV`] asks for it (tests only).
    pub fn pause_after_save_for_tests(&self) {
        if let Some(pause) = self.pause_after_save.take() {
            std::thread::sleep(pause);
        }
    }

    fn write(&self) -> Result<(), CheckpointError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let record = self.record.borrow();
        let json = serde_json::to_vec(&*record).expect("a recovery record always serialises");
        write_replacing(path, &json).map_err(|source| CheckpointError::Recovery {
            pid: record.pid,
            path: path.clone(),
            source,
        })
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = fs::remove_file(path);
        }
    }
}

/// Writes `bytes` to a new root-only file and renames it over `path`.
fn write_replacing(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        file.write_all(bytes)?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// What [`recover`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovered {
    /// The process the file names is gone: nothing to undo.
    Gone {
        /// The recorded process.
        pid: i32,
    },
    /// The process runs again as it did before the checkpoint.
    Resumed {
        /// The process.
        pid: i32,
        /// How many of its threads had their registers, mask and scratch
        /// bytes put back.
        threads: usize,
    },
}

/// Why an unfinished checkpoint could not be undone.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// The file is missing, unreadable, or not owned by root and private.
    #[error("recovery file")]
    Untrusted(#[source] TrustError),
    /// The file does not hold a recovery record.
    #[error("recovery file {} is not a recovery record", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A thread is listed with a register set of the wrong size.
    #[error("recovery file {}: thread {tid} has {len} registers, not {USER_REGS_WORDS}", path.display())]
    BadRegisters {
        /// The file.
        path: PathBuf,
        /// The thread.
        tid: i32,
        /// How many words were recorded.
        len: usize,
    },
    /// Threads are listed as changed but the process is not stopped: it ran
    /// since, and putting old registers back would break it.
    #[error("pid {pid} is not stopped: the registers in {} are not put back", path.display())]
    NotStopped {
        /// The process.
        pid: i32,
        /// The file.
        path: PathBuf,
    },
    /// Putting a thread back failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// Undoes the checkpoint recorded in `file` by an agent that died: puts back
/// the registers, signal mask and scratch bytes of every thread listed,
/// takes its TCP connections out of repair mode, detaches, and continues
/// the process if the checkpoint stopped it. A
/// process that is gone needs nothing. The file is removed once undone.
pub fn recover(file: &Path) -> Result<Recovered, RecoverError> {
    let bytes = read_trusted_file(file, MAX_RECOVERY_BYTES).map_err(RecoverError::Untrusted)?;
    let record: RecoveryRecord =
        serde_json::from_slice(&bytes).map_err(|source| RecoverError::Parse {
            path: file.to_owned(),
            source,
        })?;
    let pid = record.pid;
    let same_process = || start_time(pid) == Some(record.start_time);
    let pidfd = match PidFd::open(pid) {
        // Checked again through the pidfd: the pid cannot be recycled under it.
        Ok(pidfd) if same_process() => pidfd,
        _ => {
            let _ = fs::remove_file(file);
            return Ok(Recovered::Gone { pid });
        }
    };
    if !record.threads.is_empty() {
        if state(pid) != Some('T') {
            return Err(RecoverError::NotStopped {
                pid,
                path: file.to_owned(),
            });
        }
        let mem = ProcMem::open(pid).map_err(|source| CheckpointError::Proc {
            pid,
            path: format!("/proc/{pid}/mem"),
            source,
        })?;
        for thread in &record.threads {
            let regs: Regs =
                thread
                    .regs
                    .as_slice()
                    .try_into()
                    .map_err(|_| RecoverError::BadRegisters {
                        path: file.to_owned(),
                        tid: thread.tid,
                        len: thread.regs.len(),
                    })?;
            put_back(pid, thread, &regs, &mem)?;
        }
    }
    // The dead agent may have held the process's connections in repair
    // mode, where they would neither send nor take data.
    crate::files::leave_repair_mode_of(pid, &pidfd)
        .map_err(|source| CheckpointError::Files { pid, source })?;
    if record.resume {
        pidfd
            .send_signal(nix::sys::signal::Signal::SIGCONT)
            .map_err(|source| CheckpointError::Signal {
                pid,
                signal: "SIGCONT",
                source,
            })?;
        await_running(pid);
    }
    let _ = fs::remove_file(file);
    Ok(Recovered::Resumed {
        pid,
        threads: record.threads.len(),
    })
}

/// Seizes group-stopped thread `thread.tid`, puts back its scratch bytes,
/// registers and mask, and detaches it (it stays in the group stop).
fn put_back(
    pid: i32,
    thread: &ThreadUndo,
    regs: &Regs,
    mem: &ProcMem,
) -> Result<(), CheckpointError> {
    let tid = thread.tid;
    let ptrace_error = |op, source| CheckpointError::Ptrace {
        pid,
        tid,
        op,
        source,
    };
    match ptrace::seize(tid) {
        Ok(()) => {}
        // The thread exited meanwhile: nothing of it to put back.
        Err(err) if err.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
        Err(source) => return Err(ptrace_error("PTRACE_SEIZE", source)),
    }
    // A group-stopped thread reports a stop of its own once seized.
    let mut signal = 0;
    match ptrace::wait_timeout(tid, STOP_TIMEOUT).map_err(|e| ptrace_error("waitpid", e))? {
        Some(Stop::Event { .. }) => {}
        // Stopped to deliver a signal: delivered on detach, as it would have been.
        Some(Stop::Signal(pending)) => signal = pending,
        Some(Stop::Exited(_) | Stop::Killed(_)) => return Ok(()),
        None => {
            let _ = ptrace::detach(tid);
            return Err(CheckpointError::StopTimeout {
                pid,
                tid,
                seconds: STOP_TIMEOUT.as_secs(),
            });
        }
    }
    let result = (|| {
        mem.write_all_at(thread.scratch_at, &thread.scratch)
            .map_err(|source| CheckpointError::Memory {
                pid,
                addr: thread.scratch_at,
                len: thread.scratch.len(),
                what: "putting back scratch space",
                source,
            })?;
        ptrace::set_regs(tid, regs).map_err(|e| ptrace_error("PTRACE_SETREGS", e))?;
        ptrace::set_sigmask(tid, thread.sigmask).map_err(|e| ptrace_error("PTRACE_SETSIGMASK", e))
    })();
    let detached =
        ptrace::detach_delivering(tid, signal).map_err(|e| ptrace_error("PTRACE_DETACH", e));
    result.and(detached)
}

/// Waits (a second at most) until continued process `pid` has left its
/// group stop, so that whoever looks next sees it run.
fn await_running(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while state(pid) == Some('T') && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Start time of `pid` in clock ticks since boot, if it exists.
fn start_time(pid: i32) -> Option<u64> {
    procfs::process::Process::new(pid)
        .and_then(|process| process.stat())
        .ok()
        .map(|stat| stat.starttime)
}

/// The state letter of process `pid`, if it exists.
fn state(pid: i32) -> Option<char> {
    procfs::process::Process::new(pid)
        .and_then(|process| process.stat())
        .ok()
        .map(|stat| stat.state)
}
