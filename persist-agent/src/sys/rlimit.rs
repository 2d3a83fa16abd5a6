//! Resource limits of another process (`prlimit(2)` with no new limit).

use std::io;

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
