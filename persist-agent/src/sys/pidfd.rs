//! Process file descriptors: `pidfd_open`, `pidfd_getfd`, `pidfd_send_signal`.
//!
//! A pidfd names one process for good: unlike a pid it cannot be recycled
//! under us, and it becomes readable when the process exits, which lets the
//! daemon await the exit of processes that are not its children.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use nix::sys::signal::Signal;

/// An open pidfd.
#[derive(Debug)]
pub struct PidFd {
    fd: OwnedFd,
    pid: i32,
}

impl PidFd {
    /// Opens a pidfd for `pid`; fails with `ESRCH` if no such process exists.
    pub fn open(pid: i32) -> io::Result<Self> {
        // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd to us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        Ok(Self { fd, pid })
    }

    /// The pid this pidfd was opened for.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// A second pidfd for the same process.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
            pid: self.pid,
        })
    }

    /// Duplicates the target's file descriptor `target_fd` into this process
    /// (needs ptrace access to the target). The new fd is close-on-exec.
    pub fn get_fd(&self, target_fd: i32) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_getfd takes a valid pidfd, an fd number and flags 0,
        // and returns a new fd or -1.
        let raw =
            unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.fd.as_raw_fd(), target_fd, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd to us and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
    }

    /// Sends `signal` to the process. Fails with `ESRCH` once it has exited.
    pub fn send_signal(&self, signal: Signal) -> io::Result<()> {
        // SAFETY: a valid pidfd, a valid signal number, a null siginfo and flags 0.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal as i32,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// True once the process has exited (the pidfd polls readable).
    pub fn has_exited(&self) -> bool {
        self.wait_exit(std::time::Duration::ZERO)
    }

    /// Waits up to `timeout` for the process to exit; true once it has
    /// (its descriptors are closed by then, though it may not be reaped).
    pub fn wait_exit(&self, timeout: std::time::Duration) -> bool {
        let mut fds = [nix::poll::PollFd::new(
            self.fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let timeout =
            nix::poll::PollTimeout::try_from(timeout).unwrap_or(nix::poll::PollTimeout::MAX);
        matches!(nix::poll::poll(&mut fds, timeout), Ok(n) if n > 0)
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}
