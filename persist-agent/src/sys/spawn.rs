//! Starting a program in a fresh session with a chosen set of file descriptors.
//!
//! `std::process::Command` cannot set `LISTEN_PID`, which must hold the
//! child's own pid and so is only known after the fork. Here the environment
//! is built before the fork with a slot for it that the child fills in,
//! touching nothing but memory it already owns and raw system calls.

use std::collections::BTreeSet;
use std::ffi::{CString, c_char};
use std::os::fd::AsFd;
use std::sync::Mutex;

use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use super::pidfd::PidFd;

/// Children whose exit status their owner collects with [`reap`]; the
/// daemon's orphan reaper leaves them alone.
static CLAIMED: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// Whether the exit of `pid` is collected by its owner through [`reap`].
pub fn is_claimed(pid: i32) -> bool {
    CLAIMED.lock().expect("claimed lock").contains(&pid)
}

/// Claims our child `pid` for whoever holds its pidfd and collects its exit
/// status with [`reap`] (a restored process): the daemon's orphan reaper
/// leaves it alone, so that its exit status is not lost.
pub fn claim(pid: i32) {
    CLAIMED.lock().expect("claimed lock").insert(pid);
}

/// Gives up a [`claim`] whose exit status nobody will collect with [`reap`]
/// (the process was reaped another way).
pub fn unclaim(pid: i32) {
    CLAIMED.lock().expect("claimed lock").remove(&pid);
}

/// Collects the exit status of a child started by [`spawn`]: waits for it
/// when `block`, else returns `None` while it runs.
pub fn reap(pidfd: &PidFd, block: bool) -> Option<WaitStatus> {
    let flags = if block {
        WaitPidFlag::WEXITED
    } else {
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG
    };
    let status = match waitid(Id::PIDFd(pidfd.as_fd()), flags) {
        Ok(WaitStatus::StillAlive) => return None,
        Ok(status) => Some(status),
        // Not our child (or already collected): nothing to wait for.
        Err(_) => None,
    };
    CLAIMED.lock().expect("claimed lock").remove(&pidfd.pid());
    status
}

/// Environment variable systemd uses to tell a service its own pid.
const LISTEN_PID: &str = "LISTEN_PID=";

/// A program to start.
pub struct SpawnRequest<'fd> {
    /// Absolute path of the program.
    pub program: CString,
    /// `argv`, program name included.
    pub argv: Vec<CString>,
    /// Environment entries `KEY=VALUE`.
    pub env: Vec<CString>,
    /// Set `LISTEN_PID` to the child's pid.
    pub listen_pid: bool,
    /// Descriptors to place in the child: (our fd, its number in the child).
    /// Every other descriptor is closed on exec.
    pub fds: Vec<(BorrowedFd<'fd>, RawFd)>,
    /// Identity to switch to before exec; `None` keeps ours.
    pub identity: Option<Identity>,
    /// Exec with address-space layout randomisation off
    /// (`ADDR_NO_RANDOMIZE`), so that every start of one program lays out
    /// its memory alike.
    pub no_aslr: bool,
}

/// A user identity for the child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// A started child.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid.
    pub pid: i32,
    /// A pidfd for it, readable once it exits.
    pub pidfd: PidFd,
}

/// `ADDR_NO_RANDOMIZE` of `personality(2)` (linux/personality.h).
const ADDR_NO_RANDOMIZE: libc::c_ulong = 0x0040000;

/// Forks, arranges the descriptors, starts a new session and execs. Returns
/// once the exec has succeeded, or with the exec's error.
pub fn spawn(request: &SpawnRequest<'_>) -> io::Result<Spawned> {
    let mut env: Vec<Vec<u8>> = request
        .env
        .iter()
        .map(|entry| entry.as_bytes_with_nul().to_vec())
        .collect();
    // Room for the pid and its terminating NUL, filled in by the child.
    let listen_pid_slot = request.listen_pid.then(|| {
        let mut slot = LISTEN_PID.as_bytes().to_vec();
        slot.resize(LISTEN_PID.len() + 24, 0);
        env.push(slot);
        env.len() - 1
    });
    let mut envp: Vec<*const c_char> = env.iter().map(|e| e.as_ptr().cast()).collect();
    envp.push(std::ptr::null());
    let mut argv: Vec<*const c_char> = request.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let fds: Vec<(RawFd, RawFd)> = request
        .fds
        .iter()
        .map(|(fd, target)| (fd.as_raw_fd(), *target))
        .collect();
    let lowest_free = fds.iter().map(|&(_, target)| target + 1).max().unwrap_or(0);

    let open_files = super::rlimit::open_files_for_programs();
    let (error_read, error_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;

    // Held across the fork, so that the daemon's reaper cannot collect a
    // child that exits at once (`/bin/false`) before it is claimed: its
    // pidfd could not be opened any more.
    let mut claimed = CLAIMED.lock().expect("claimed lock");
    // SAFETY: between fork and exec the child only calls async-signal-safe
    // raw system calls on memory prepared above (no allocation, no locks),
    // then execs or exits with `_exit`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: we are the freshly forked child; see `child_exec`.
        unsafe {
            child_exec(
                request.program.as_ptr(),
                &argv,
                &mut env,
                &envp,
                listen_pid_slot,
                &fds,
                lowest_free,
                request.identity.as_ref(),
                request.no_aslr,
                open_files,
                error_write.as_raw_fd(),
            )
        }
    }
    claimed.insert(pid);
    drop(claimed);
    drop(error_write);
    let pidfd = PidFd::open(pid)?;
    let mut errno = [0u8; 4];
    match nix::unistd::read(&error_read, &mut errno) {
        Ok(0) => Ok(Spawned { pid, pidfd }),
        Ok(_) => {
            // The child has exited with 127; reap it.
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            CLAIMED.lock().expect("claimed lock").remove(&pid);
            Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)))
        }
        Err(err) => Err(err.into()),
    }
}

/// The child's side of [`spawn`]: never returns.
///
/// # Safety
/// Must be called only in a child just forked from [`spawn`], with pointers
/// into memory prepared by it.
#[allow(clippy::too_many_arguments)]
unsafe fn child_exec(
    program: *const c_char,
    argv: &[*const c_char],
    env: &mut [Vec<u8>],
    envp: &[*const c_char],
    listen_pid_slot: Option<usize>,
    fds: &[(RawFd, RawFd)],
    lowest_free: RawFd,
    identity: Option<&Identity>,
    no_aslr: bool,
    open_files: Option<u64>,
    error_fd: RawFd,
) -> ! {
    let fail = |error_fd: RawFd| -> ! {
        // SAFETY: errno_location is thread-local and always valid; write and
        // _exit are async-signal-safe.
        unsafe {
            let errno = *libc::__errno_location();
            libc::write(error_fd, (&raw const errno).cast(), 4);
            libc::_exit(127)
        }
    };
    // SAFETY: plain system calls on integers and on memory owned by this
    // (forked) process; see the function's contract.
    unsafe {
        if let Some(slot) = listen_pid_slot {
            write_decimal(&mut env[slot][LISTEN_PID.len()..], libc::getpid() as u64);
        }
        // Move sources out of the way first, so that a source numbered like
        // another target is not overwritten before it is placed.
        let mut moved = [0 as RawFd; 16];
        for (index, &(source, _)) in fds.iter().enumerate().take(moved.len()) {
            moved[index] = libc::fcntl(source, libc::F_DUPFD_CLOEXEC, lowest_free.max(64));
            if moved[index] < 0 {
                fail(error_fd);
            }
        }
        for (index, &(_, target)) in fds.iter().enumerate().take(moved.len()) {
            if libc::dup2(moved[index], target) < 0 {
                fail(error_fd);
            }
        }
        // Everything we inherited beyond the chosen descriptors closes on exec.
        libc::syscall(
            libc::SYS_close_range,
            lowest_free as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        if libc::setsid() < 0 {
            fail(error_fd);
        }
        // The agent's own limit is raised for the services it holds; the
        // program gets the one it would have had without the agent.
        if let Some(soft) = open_files {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) < 0 {
                fail(error_fd);
            }
            limit.rlim_cur = soft.min(limit.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) < 0 {
                fail(error_fd);
            }
        }
        if let Some(identity) = identity
            && (libc::setgroups(identity.groups.len(), identity.groups.as_ptr()) < 0
                || libc::setgid(identity.gid) < 0
                || libc::setuid(identity.uid) < 0)
        {
            fail(error_fd);
        }
        if no_aslr {
            // 0xffffffff queries the current persona without changing it.
            let current = libc::personality(0xffff_ffff);
            if current < 0 || libc::personality((current as libc::c_ulong) | ADDR_NO_RANDOMIZE) < 0
            {
                fail(error_fd);
            }
        }
        // The Rust runtime ignores SIGPIPE; a service expects the default.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        libc::execve(program, argv.as_ptr(), envp.as_ptr());
    }
    fail(error_fd)
}

/// Writes `value` in decimal followed by a NUL into `buffer` (which has room).
fn write_decimal(buffer: &mut [u8], mut value: u64) {
    let mut digits = [0u8; 20];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (value % 10) as u8;
        len += 1;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    for (index, digit) in digits[..len].iter().rev().enumerate() {
        buffer[index] = *digit;
    }
    buffer[len] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_is_nul_terminated() {
        let mut buffer = [b'x'; 24];
        write_decimal(&mut buffer, 40213);
        assert_eq!(&buffer[..6], b"40213\0");
        write_decimal(&mut buffer, 0);
        assert_eq!(&buffer[..2], b"0\0");
    }
}
