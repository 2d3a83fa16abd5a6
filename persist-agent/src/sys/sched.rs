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
}
