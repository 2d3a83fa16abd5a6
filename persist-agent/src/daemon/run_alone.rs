//! Lets the process of a woken tree that accepts the waking connection run
//! alone until it blocks, before the others are copied and let run.
//!
//! On two CPUs, everything the wake does once the first worker of a tree
//! runs takes a CPU from it: copying the other processes' pages (at
//! real-time priority on the wake thread), letting them run (nginx's other
//! worker then woke for the same queued connection, and at times took it,
//! faulting on the pages its working set lacked), and the restore thread's
//! work after the resume (docs/process-trees.md, The wake's critical path).
//! None of it is needed for the first answer. So the wake thread lets the
//! worker run and goes back to the SYNs of every service, and the service's
//! restore thread waits, asleep, until the worker leaves the CPU of its own
//! accord (it blocks: back in `epoll_wait` once it answered, or on a page
//! its pager must serve, or a lock), or [`RUN_ALONE_BOUND`] passed, then
//! copies and lets run the others at ordinary priority.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use crate::sys::sched;

/// Longest a tree's other processes wait for the first one to block: a
/// worker busy for longer (a slow request) has them let run beside it.
pub(super) const RUN_ALONE_BOUND: Duration = Duration::from_millis(5);

/// How often the waiting thread looks at the process. Each look costs the
/// process ~15 µs when the thread wakes on its CPU (a switch each way and
/// the read of /proc/PID/stat): looking every 20 µs, nginx's worker took
/// twice as long to answer on a busy machine; it takes 100–250 µs from its
/// continue to its answer on the 2-vCPU VM. Looking late only lets the
/// others run later.
const POLL_INTERVAL: Duration = Duration::from_micros(100);

/// How a wait for the first process to block ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RanAlone {
    /// How long it ran alone.
    pub waited: Duration,
    /// Whether it still ran when the bound passed (or its state could not
    /// be read).
    pub cut_short: bool,
}

/// Waits, asleep and at ordinary priority, until process `pid` (just let
/// run) blocks or exits, or `bound` passed.
///
/// The calling thread becomes ordinary: a real-time thread woken on the
/// process's CPU to look at it would take that CPU from it. The caller
/// makes it real-time again if it must be.
pub(super) fn wait_until_blocked(pid: i32, bound: Duration) -> RanAlone {
    let started = Instant::now();
    let _ = sched::set_current_thread_realtime(false);
    // An ordinary thread's sleep may last 50 µs longer than asked.
    let _ = sched::set_current_thread_timer_slack(Duration::from_micros(1));
    let Ok(stat) = File::open(format!("/proc/{pid}/stat")) else {
        return RanAlone {
            waited: started.elapsed(),
            cut_short: true,
        };
    };
    let mut buf = [0u8; 512];
    loop {
        match runs(&stat, &mut buf) {
            Some(true) => {}
            Some(false) => {
                return RanAlone {
                    waited: started.elapsed(),
                    cut_short: false,
                };
            }
            // Gone (a reaped process reads as an error): nothing to wait for.
            None => {
                return RanAlone {
                    waited: started.elapsed(),
                    cut_short: false,
                };
            }
        }
        if started.elapsed() >= bound {
            return RanAlone {
                waited: started.elapsed(),
                cut_short: true,
            };
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Whether the process whose /proc/PID/stat is `stat` runs or waits for a
/// CPU (state `R`); `None` when it cannot be read.
fn runs(stat: &File, buf: &mut [u8]) -> Option<bool> {
    // Read again from the start: the kernel makes the text anew each time.
    let len = stat.read_at(buf, 0).ok()?;
    state_of(&buf[..len]).map(|state| state == b'R')
}

/// The state letter of a /proc/PID/stat line: the field after the command,
/// which is in parentheses and may itself hold `)`.
fn state_of(line: &[u8]) -> Option<u8> {
    let close = line.iter().rposition(|&byte| byte == b')')?;
    line.get(close + 2).copied()
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;

    #[test]
    fn the_state_follows_the_last_parenthesis() {
        assert_eq!(state_of(b"12 (nginx) S 1 12 12 0"), Some(b'S'));
        assert_eq!(state_of(b"12 (a) (b)) R 1 12 12 0"), Some(b'R'));
        assert_eq!(state_of(b"12 (nginx"), None);
    }

    #[test]
    fn a_process_that_sleeps_is_not_waited_for() {
        let mut child = Command::new("sleep")
            .arg("5")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        // Once it sleeps (it may still be starting).
        let deadline = Instant::now() + Duration::from_secs(5);
        let ran = loop {
            let ran = wait_until_blocked(child.id() as i32, Duration::from_secs(1));
            if !ran.cut_short || Instant::now() > deadline {
                break ran;
            }
        };
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!ran.cut_short, "{ran:?}");
    }

    #[test]
    fn a_busy_process_is_waited_for_until_the_bound() {
        let mut child = Command::new("/bin/sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        // Once it loops: starting, it may wait for its libraries to be read.
        let deadline = Instant::now() + Duration::from_secs(5);
        let ran = loop {
            let ran = wait_until_blocked(child.id() as i32, Duration::from_millis(20));
            if ran.cut_short || Instant::now() > deadline {
                break ran;
            }
        };
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(ran.cut_short, "{ran:?}");
        assert!(ran.waited >= Duration::from_millis(20), "{ran:?}");
    }
}
