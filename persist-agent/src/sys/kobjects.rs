//! Kernel file objects the standard library does not wrap: eventfd, timerfd,
//! signalfd, epoll, memfd, pipe peeking with `tee`, socket options, and the
//! `kcmp` identity test.
//!
//! Every function returns an owned descriptor or a plain value; errors are
//! `io::Error`s from `errno`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Wraps a new descriptor returned by the kernel (or `-1`).
fn owned(raw: libc::c_long) -> io::Result<OwnedFd> {
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

/// Turns a `-1`/value return into an `io::Result`.
fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Creates an eventfd with counter `count` and `EFD_*` `flags`
/// (`EFD_CLOEXEC` is always added).
pub fn eventfd(count: u64, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes integers only.
    let fd = owned(unsafe { libc::eventfd(0, flags | libc::EFD_CLOEXEC) }.into())?;
    if count > 0 {
        // The initial value of eventfd(2) is only 32 bits wide; a write adds
        // any 64-bit value.
        let bytes = count.to_ne_bytes();
        // SAFETY: `bytes` is 8 readable bytes for the call.
        let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        check(n as libc::c_long)?;
    }
    Ok(fd)
}

/// Creates a close-on-exec timerfd on `clock`.
pub fn timerfd(clock: i32) -> io::Result<OwnedFd> {
    // SAFETY: timerfd_create takes integers only.
    owned(unsafe { libc::timerfd_create(clock, libc::TFD_CLOEXEC) }.into())
}

fn timespec(ns: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    }
}

/// `timerfd_settime`: arms `fd` to expire after `value` (absolute when
/// `flags` has `TFD_TIMER_ABSTIME`) and then every `interval` (nanoseconds).
pub fn timerfd_settime(
    fd: BorrowedFd<'_>,
    flags: i32,
    value_ns: u64,
    interval_ns: u64,
) -> io::Result<()> {
    let spec = libc::itimerspec {
        it_interval: timespec(interval_ns),
        it_value: timespec(value_ns),
    };
    // SAFETY: `spec` is a valid itimerspec; the old value pointer may be null.
    let rc = unsafe { libc::timerfd_settime(fd.as_raw_fd(), flags, &spec, std::ptr::null_mut()) };
    check(rc.into()).map(drop)
}

/// `TFD_IOC_SET_TICKS`: sets the number of expirations not yet read.
pub fn timerfd_set_ticks(fd: BorrowedFd<'_>, ticks: u64) -> io::Result<()> {
    // _IOW('T', 0, u64)
    const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;
    // SAFETY: the ioctl reads one u64 from the pointer, valid for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS as _, &ticks as *const u64) };
    check(rc.into()).map(drop)
}

/// Reads a clock (`clock_gettime`) in nanoseconds.
pub fn clock_now_ns(clock: i32) -> io::Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    check(rc.into())?;
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Creates a close-on-exec signalfd for the signals in `mask` (bit `n - 1`
/// for signal `n`) with `SFD_*` `flags`.
pub fn signalfd(mask: u64, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: signalfd4 reads an 8-byte kernel sigset from the pointer.
    let raw = unsafe {
        libc::syscall(
            libc::SYS_signalfd4,
            -1,
            &mask as *const u64,
            8usize,
            flags | libc::SFD_CLOEXEC,
        )
    };
    owned(raw)
}

/// Creates an empty close-on-exec epoll instance.
pub fn epoll() -> io::Result<OwnedFd> {
    // SAFETY: epoll_create1 takes one integer.
    owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }.into())
}

/// Creates a close-on-exec memfd that allows sealing.
pub fn memfd(name: &str) -> io::Result<OwnedFd> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `name` is a NUL-terminated string valid for the call.
    let raw =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    owned(raw.into())
}

/// `F_GET_SEALS` of a memfd.
pub fn seals(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: F_GET_SEALS takes no argument.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    Ok(check(rc.into())? as u32)
}

/// `F_ADD_SEALS` on a memfd.
pub fn add_seals(fd: BorrowedFd<'_>, seals: u32) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an int argument.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals as libc::c_int) };
    check(rc.into()).map(drop)
}

/// `F_GETPIPE_SZ`: capacity of a pipe in bytes.
pub fn pipe_size(fd: BorrowedFd<'_>) -> io::Result<usize> {
    // SAFETY: F_GETPIPE_SZ takes no argument.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) };
    Ok(check(rc.into())? as usize)
}

/// `F_SETPIPE_SZ`: sets the capacity of a pipe (rounded up by the kernel).
pub fn set_pipe_size(fd: BorrowedFd<'_>, size: usize) -> io::Result<()> {
    // SAFETY: F_SETPIPE_SZ takes an int argument.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
    check(rc.into()).map(drop)
}

/// `tee(from, to, len, SPLICE_F_NONBLOCK)`: copies up to `len` bytes of the
/// pipe `from` into the pipe `to` without consuming them. Returns 0 when
/// `from` is empty.
pub fn tee(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: tee takes integers only.
    let rc = unsafe {
        libc::tee(
            from.as_raw_fd(),
            to.as_raw_fd(),
            len,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    match check(rc as libc::c_long) {
        Ok(n) => Ok(n as usize),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e),
    }
}

/// True when `fd1` of `pid1` and `fd2` of `pid2` are the same open file
/// description (`kcmp(KCMP_FILE)`).
pub fn same_file(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> io::Result<bool> {
    const KCMP_FILE: libc::c_int = 0;
    // SAFETY: kcmp takes integers only.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid1,
            pid2,
            KCMP_FILE,
            fd1 as libc::c_ulong,
            fd2 as libc::c_ulong,
        )
    };
    Ok(check(rc)? == 0)
}

/// `getsockopt` of an `int` option.
pub fn sockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of their sizes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    check(rc.into())?;
    Ok(value)
}

/// `setsockopt` of an `int` option.
pub fn set_sockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32, value: i32) -> io::Result<()> {
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` is a readable int for the call.
    let rc =
        unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, (&raw const value).cast(), len) };
    check(rc.into()).map(drop)
}

/// State of a TCP socket and, for a listener, its maximum backlog
/// (`TCP_INFO`: `tcpi_state`, and `tcpi_sacked` which the kernel fills with
/// `sk_max_ack_backlog` on listeners).
pub fn tcp_state(fd: BorrowedFd<'_>) -> io::Result<(u8, u32)> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of their sizes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    check(rc.into())?;
    Ok((info.tcpi_state, info.tcpi_sacked))
}

/// `recv(fd, buf, MSG_PEEK | MSG_DONTWAIT | extra)`: the returned length may
/// exceed `buf` for a datagram when `extra` has `MSG_TRUNC`. `Ok(None)` when
/// nothing is queued.
pub fn peek(fd: BorrowedFd<'_>, buf: &mut [u8], extra: i32) -> io::Result<Option<usize>> {
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT | extra;
    // SAFETY: `buf` is valid for writes of its length.
    let rc = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
    match check(rc as libc::c_long) {
        Ok(n) => Ok(Some(n as usize)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// `send(fd, data, MSG_DONTWAIT | MSG_NOSIGNAL)`; returns the bytes sent.
pub fn send_nonblocking(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    // SAFETY: `data` is valid for reads of its length.
    let rc = unsafe { libc::send(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), flags) };
    Ok(check(rc as libc::c_long)? as usize)
}
