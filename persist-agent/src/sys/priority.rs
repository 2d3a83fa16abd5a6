//! The scheduling priority (nice value) of the calling thread.

use std::io;

/// The nice value of the calling thread.
pub fn current_thread_nice() -> io::Result<i32> {
    let tid = nix::unistd::gettid().as_raw() as libc::id_t;
    // SAFETY: getpriority reads no memory of ours; -1 is a valid nice value,
    // so errno is cleared first and checked after.
    let nice = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, tid)
    };
    if nice == -1 {
        let err = io::Error::last_os_error();
        if err.raw_os_error().is_some_and(|code| code != 0) {
            return Err(err);
        }
    }
    Ok(nice)
}

/// Sets the nice value of the calling thread only (Linux applies
/// `PRIO_PROCESS` with a thread id to that thread).
pub fn set_current_thread_nice(nice: i32) -> io::Result<()> {
    let tid = nix::unistd::gettid().as_raw() as libc::id_t;
    // SAFETY: setpriority reads no memory of ours.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_lowers_and_restores_its_own_priority() {
        std::thread::spawn(|| {
            let original = current_thread_nice().unwrap();
            set_current_thread_nice(19).unwrap();
            assert_eq!(current_thread_nice().unwrap(), 19);
            set_current_thread_nice(original).unwrap();
            assert_eq!(current_thread_nice().unwrap(), original);
        })
        .join()
        .unwrap();
    }
}
