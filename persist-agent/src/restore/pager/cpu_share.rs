//! Keeping the pager off the restored process's CPU while it runs.
//!
//! Right after a resume with its working set copied in, the process answers its
//! first request: the pager then only serves faults, and polls for them on
//! another CPU than the process's, so that its polling never delays the process
//! and a fault costs no thread wake-up (docs/kernel-facts.md, Costs that shaped
//! the pager). Lowering the pager's priority does not do this: the restored
//! process leads its own session, so with autogroup scheduling it competes with
//! the agent as a group, whatever the pager's nice value.

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

/// The calling thread's CPU affinity, narrowed while the process is busy.
pub(super) struct CpuShare {
    own: Option<CpuSet>,
    narrowed: bool,
}

impl CpuShare {
    /// Remembers the calling thread's affinity.
    pub(super) fn new() -> Self {
        Self {
            own: sched_getaffinity(Pid::from_raw(0)).ok(),
            narrowed: false,
        }
    }

    /// Moves the calling thread off the CPU process `pid` last ran on, if
    /// another CPU is allowed. True when the thread is off that CPU.
    pub(super) fn avoid_cpu_of(&mut self, pid: i32) -> bool {
        if self.narrowed {
            return true;
        }
        let (Some(own), Some(cpu)) = (self.own, last_cpu(pid)) else {
            return false;
        };
        if !matches!(own.is_set(cpu), Ok(true)) {
            return true;
        }
        let mut others = own;
        if others.unset(cpu).is_err() || !has_any(&others) {
            return false;
        }
        self.narrowed = sched_setaffinity(Pid::from_raw(0), &others).is_ok();
        self.narrowed
    }

    /// Gives the calling thread back every CPU it had.
    pub(super) fn restore(&mut self) {
        if let (true, Some(own)) = (self.narrowed, self.own) {
            self.narrowed = sched_setaffinity(Pid::from_raw(0), &own).is_err();
        }
    }
}

impl Drop for CpuShare {
    fn drop(&mut self) {
        self.restore();
    }
}

/// The CPU a process last ran on (field `processor` of /proc/PID/stat).
fn last_cpu(pid: i32) -> Option<usize> {
    let stat = procfs::process::Process::new(pid).ok()?.stat().ok()?;
    stat.processor.and_then(|cpu| usize::try_from(cpu).ok())
}

fn has_any(set: &CpuSet) -> bool {
    (0..CpuSet::count()).any(|cpu| matches!(set.is_set(cpu), Ok(true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_avoids_a_cpu_and_gets_every_cpu_back() {
        std::thread::spawn(|| {
            let own = sched_getaffinity(Pid::from_raw(0)).unwrap();
            let mut share = CpuShare::new();
            share.avoid_cpu_of(std::process::id() as i32);
            let narrowed = sched_getaffinity(Pid::from_raw(0)).unwrap();
            let allowed = |set: &CpuSet| {
                (0..CpuSet::count())
                    .filter(|&cpu| matches!(set.is_set(cpu), Ok(true)))
                    .count()
            };
            if allowed(&own) > 1 {
                assert_eq!(allowed(&narrowed), allowed(&own) - 1);
            }
            share.restore();
            assert_eq!(
                allowed(&sched_getaffinity(Pid::from_raw(0)).unwrap()),
                allowed(&own)
            );
        })
        .join()
        .unwrap();
    }
}
