//! The scheduling policy of the calling thread.

use std::io;

/// Puts the calling thread in `SCHED_FIFO` at the lowest real-time priority
/// (`true`), or back in `SCHED_OTHER` (`false`). A real-time thread runs as
/// soon as it wakes, ahead of every ordinary one; the kernel still keeps 5 %
/// of each CPU for ordinary threads (`sched_rt_runtime_us`).
pub fn set_current_thread_realtime(realtime: bool) -> io::Result<()> {
    let (policy, priority) = if realtime {
        (libc::SCHED_FIFO, 1)
    } else {
        (libc::SCHED_OTHER, 0)
    };
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: sched_setscheduler reads the `sched_param` we pass, which
    // lives for the call; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts thread `tid` (of any process) in `SCHED_OTHER`, keeping its nice
/// value: a restored thread forked by a real-time thread inherited its
/// policy, and must not run with it.
pub fn set_thread_ordinary(tid: i32) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads the `sched_param` we pass, which
    // lives for the call; `tid` names a thread, or the call fails.
    let rc = unsafe { libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets how late the kernel may wake the calling thread from a timed sleep
/// (its timer slack, 50 µs by default for an ordinary thread; none for a
/// real-time one), to `slack`.
pub fn set_current_thread_timer_slack(slack: std::time::Duration) -> io::Result<()> {
    let ns = libc::c_ulong::try_from(slack.as_nanos()).unwrap_or(libc::c_ulong::MAX);
    // 0 would mean "the thread's default" to the kernel.
    nix::sys::prctl::set_timerslack(ns.max(1)).map_err(io::Error::from)
}

/// The scheduling policy of thread `tid`.
pub fn thread_policy(tid: i32) -> io::Result<i32> {
    // SAFETY: sched_getscheduler only reads the thread's policy.
    let policy = unsafe { libc::sched_getscheduler(tid) };
    if policy < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_becomes_realtime_and_ordinary_again() {
        crate::test_support::require_root!();
        std::thread::spawn(|| {
            set_current_thread_realtime(true).unwrap();
            // SAFETY: sched_getscheduler only reads the calling thread's policy.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_FIFO);
            set_current_thread_realtime(false).unwrap();
            // SAFETY: as above.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_child_of_a_realtime_thread_is_made_ordinary() {
        crate::test_support::require_root!();
        std::thread::spawn(|| {
            set_current_thread_realtime(true).unwrap();
            let mut child = std::process::Command::new("sleep")
                .arg("10")
                .spawn()
                .unwrap();
            let pid = child.id() as i32;
            assert_eq!(thread_policy(pid).unwrap(), libc::SCHED_FIFO);
            set_thread_ordinary(pid).unwrap();
            assert_eq!(thread_policy(pid).unwrap(), libc::SCHED_OTHER);
            set_current_thread_realtime(false).unwrap();
            child.kill().unwrap();
            child.wait().unwrap();
        })
        .join()
        .unwrap();
    }
}
