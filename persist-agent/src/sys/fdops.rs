//! Descriptor-table operations for a freshly forked child.
//!
//! Everything here is async-signal-safe: one raw system call each, no
//! allocation, no locks, no panics, errors as plain [`Errno`] values. They
//! are meant for the child of a fork of a multi-threaded program, where only
//! such calls are allowed before `exec` or `_exit`.
//!
//! They act on descriptor *numbers* and may overwrite or close descriptors
//! that other code in this process owns: the caller must be a child that is
//! about to become another program and owns its whole descriptor table.

use std::ffi::CStr;
use std::os::fd::RawFd;

use nix::errno::Errno;

/// Turns a raw `-1`/value return into a `Result`, reading `errno` without
/// allocating.
fn check(rc: libc::c_long) -> Result<libc::c_long, Errno> {
    if rc < 0 { Err(Errno::last()) } else { Ok(rc) }
}

/// `dup3(old, new, O_CLOEXEC if cloexec)`: makes `new` refer to the open
/// file of `old`, silently closing whatever `new` was.
pub fn dup_to(old: RawFd, new: RawFd, cloexec: bool) -> Result<(), Errno> {
    let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
    // SAFETY: dup3 takes integers only; the caller owns the descriptor table
    // (see the module doc), so replacing `new` breaks no owner.
    let rc = unsafe { libc::dup3(old, new, flags) };
    check(rc.into()).map(drop)
}

/// `fcntl(fd, F_SETFL, flags)`: sets the changeable file status flags
/// (`O_APPEND`, `O_NONBLOCK`, `O_ASYNC`, `O_DIRECT`, `O_NOATIME`).
pub fn set_status_flags(fd: RawFd, flags: i32) -> Result<(), Errno> {
    // SAFETY: F_SETFL takes an int argument and touches no user memory.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
    check(rc.into()).map(drop)
}

/// `close_range(first, last, 0)`: closes every descriptor in the range.
pub fn close_range(first: u32, last: u32) -> Result<(), Errno> {
    // SAFETY: close_range takes integers only; the caller owns the
    // descriptor table (see the module doc).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    check(rc).map(drop)
}

/// `epoll_ctl(epfd, EPOLL_CTL_ADD, fd, {events, data})`.
pub fn epoll_add(epfd: RawFd, fd: RawFd, events: u32, data: u64) -> Result<(), Errno> {
    let mut event = libc::epoll_event { events, u64: data };
    // SAFETY: `event` is a valid epoll_event on our stack for the call.
    let rc = unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut event) };
    check(rc.into()).map(drop)
}

/// `openat(AT_FDCWD, path, flags)`: opens `path`, returning the new number.
pub fn open_path(path: &CStr, flags: i32) -> Result<RawFd, Errno> {
    // SAFETY: `path` is a NUL-terminated string that outlives the call; the
    // mode argument is ignored without O_CREAT.
    let rc = unsafe { libc::openat(libc::AT_FDCWD, path.as_ptr(), flags, 0) };
    check(rc.into()).map(|fd| fd as RawFd)
}

/// `close(fd)`.
pub fn close(fd: RawFd) -> Result<(), Errno> {
    // SAFETY: close takes an integer; the caller owns the descriptor table
    // (see the module doc).
    let rc = unsafe { libc::close(fd) };
    check(rc.into()).map(drop)
}
