//! POSIX timers (`timer_create`) of a process, as the manifest records them.

use serde::{Deserialize, Serialize};

/// `SIGEV_SIGNAL`: the timer queues a signal to the process.
pub const SIGEV_SIGNAL: i32 = 0;
/// `SIGEV_NONE`: the timer notifies nobody; it is only read.
pub const SIGEV_NONE: i32 = 1;
/// `SIGEV_THREAD_ID`: the timer queues a signal to one thread (glibc's
/// `SIGEV_THREAD` timers are this, aimed at its helper thread).
pub const SIGEV_THREAD_ID: i32 = 4;

/// One POSIX timer: what `/proc/PID/timers` shows of it, and its settings
/// as `timer_gettime` and `timer_getoverrun` report them at the checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PosixTimer {
    /// The timer id the process holds (`timer_t`).
    pub id: i32,
    /// The clock (`CLOCK_*`).
    pub clock: i32,
    /// How it notifies: [`SIGEV_SIGNAL`], [`SIGEV_NONE`] or
    /// [`SIGEV_THREAD_ID`].
    pub notify: i32,
    /// The thread a [`SIGEV_THREAD_ID`] timer signals, as the process
    /// sees its tid; 0 otherwise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tid: i32,
    /// The signal it queues.
    pub signal: i32,
    /// `sigev_value`, handed to the process in `si_value`.
    pub value: u64,
    /// Interval in nanoseconds (0: one-shot).
    pub interval_ns: u64,
    /// Time to the next expiry in nanoseconds (0: disarmed).
    pub remaining_ns: u64,
    /// `timer_getoverrun` at the checkpoint, for the record: the kernel
    /// offers no way to set it again (see docs/kernel-facts.md).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub overrun: i32,
}

fn is_zero(value: &i32) -> bool {
    *value == 0
}

impl PosixTimer {
    /// Whether its clock runs while the process is stopped (every clock
    /// but CPU time), so that it must be armed when the process resumes,
    /// not when its skeleton is prepared.
    pub fn counts_while_stopped(&self) -> bool {
        !is_cpu_clock(self.clock)
    }
}

/// Whether `clock` measures CPU time (`CLOCK_PROCESS_CPUTIME_ID`,
/// `CLOCK_THREAD_CPUTIME_ID`, or a CPU clock id of a given process or
/// thread, which the kernel encodes as a negative number).
pub fn is_cpu_clock(clock: i32) -> bool {
    clock == 2 || clock == 3 || clock < 0
}
