//! Resource limits: another process's (`prlimit(2)` with no new limit),
//! and the agent's own limit on open files.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// The soft limit on open files the agent started with, once it raised its
/// own ([`raise_open_files`]); `u64::MAX` while it has not.
static STARTED_WITH_OPEN_FILES: AtomicU64 = AtomicU64::new(u64::MAX);

/// Highest soft limit on open files the agent sets itself: the kernel's
/// default `fs.nr_open`.
const MOST_OPEN_FILES: u64 = 1 << 20;

/// Raises the agent's soft limit on open files to its hard limit (at most
/// 2^20), and remembers the soft limit it had: the programs it starts get
/// that one back ([`open_files_for_programs`]), since a program may rely on
/// descriptors below 1024 (`select(2)`). Returns (before, after).
pub fn raise_open_files() -> io::Result<(u64, u64)> {
    let (soft, hard) = get(0, libc::RLIMIT_NOFILE)?;
    let wanted = hard.min(MOST_OPEN_FILES).max(soft);
    if wanted > soft {
        let limit = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads the valid struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let _ = STARTED_WITH_OPEN_FILES.compare_exchange(
            u64::MAX,
            soft,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
    Ok((soft, wanted))
}

/// The soft limit on open files a program the agent starts gets, if the
/// agent raised its own: the one the agent started with.
pub fn open_files_for_programs() -> Option<u64> {
    match STARTED_WITH_OPEN_FILES.load(Ordering::Relaxed) {
        u64::MAX => None,
        soft => Some(soft),
    }
}

/// Reads resource limit `resource` (`RLIMIT_*`) of process `pid` as
/// (soft, hard); `RLIM_INFINITY` is `u64::MAX`.
pub fn get(pid: i32, resource: u32) -> io::Result<(u64, u64)> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit with a null new limit only writes the old one into the
    // valid struct we pass.
    let rc = unsafe {
        libc::prlimit(
            pid,
            resource as libc::__rlimit_resource_t,
            std::ptr::null(),
            &mut old,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((old.rlim_cur, old.rlim_max))
}
