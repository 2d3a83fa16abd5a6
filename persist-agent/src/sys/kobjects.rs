//! Kernel file objects the standard library does not wrap: eventfd, timerfd,
//! signalfd, epoll, memfd, pipe peeking with `tee`, socket options, and the
//! `kcmp` identity tests.
//!
//! Most are thin adapters over `nix`, keeping the plain integer flags the
//! image records; what `nix` lacks is done by hand, each saying why. Every
//! function returns an owned descriptor or a plain value; errors are
//! `io::Error`s from `errno`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use nix::fcntl::{FcntlArg, SealFlag, SpliceFFlags, fcntl};
use nix::sys::epoll::{Epoll, EpollCreateFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::socket::MsgFlags;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use nix::time::clock_gettime;

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
    let flags = EfdFlags::from_bits_retain(flags) | EfdFlags::EFD_CLOEXEC;
    let fd = EventFd::from_value_and_flags(0, flags)?;
    if count > 0 {
        // The initial value of eventfd(2) is only 32 bits wide; a write adds
        // any 64-bit value.
        fd.write(count)?;
    }
    Ok(fd.into())
}

/// Creates a close-on-exec timerfd on `clock` (a `CLOCK_*` number).
pub fn timerfd(clock: i32) -> io::Result<TimerFd> {
    let clock = match clock {
        libc::CLOCK_REALTIME => ClockId::CLOCK_REALTIME,
        libc::CLOCK_MONOTONIC => ClockId::CLOCK_MONOTONIC,
        libc::CLOCK_BOOTTIME => ClockId::CLOCK_BOOTTIME,
        libc::CLOCK_REALTIME_ALARM => ClockId::CLOCK_REALTIME_ALARM,
        libc::CLOCK_BOOTTIME_ALARM => ClockId::CLOCK_BOOTTIME_ALARM,
        // The kernel's own answer for a clock timerfd does not support.
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    Ok(TimerFd::new(clock, TimerFlags::TFD_CLOEXEC)?)
}

/// `timerfd_settime`: arms `timer` to expire after `value_ns` (absolute
/// when `flags` has `TFD_TIMER_ABSTIME`) and then every `interval_ns`
/// (nanoseconds; 0 for a one-shot timer). A `value_ns` of 0 disarms it.
pub fn timerfd_settime(
    timer: &TimerFd,
    flags: i32,
    value_ns: u64,
    interval_ns: u64,
) -> io::Result<()> {
    let timespec = |ns| TimeSpec::from(Duration::from_nanos(ns));
    // Maps to exactly { it_value, it_interval }, whatever the two values.
    let expiration = Expiration::IntervalDelayed(timespec(value_ns), timespec(interval_ns));
    timer.set(expiration, TimerSetTimeFlags::from_bits_retain(flags))?;
    Ok(())
}

/// `TFD_IOC_SET_TICKS`: sets the number of expirations not yet read.
pub fn timerfd_set_ticks(fd: BorrowedFd<'_>, ticks: u64) -> io::Result<()> {
    // By hand: nix has no TFD_IOC_SET_TICKS wrapper.
    const TFD_IOC_SET_TICKS: u32 = linux_raw_sys::ioctl::TFD_IOC_SET_TICKS;
    // SAFETY: the ioctl reads one u64 from the pointer, valid for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS as _, &ticks as *const u64) };
    check(rc.into()).map(drop)
}

/// Reads a clock (`clock_gettime`) in nanoseconds.
pub fn clock_now_ns(clock: i32) -> io::Result<u64> {
    let now = clock_gettime(nix::time::ClockId::from_raw(clock))?;
    Ok(now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
}

/// Creates a close-on-exec signalfd for the signals in `mask` (bit `n - 1`
/// for signal `n`) with `SFD_*` `flags`.
pub fn signalfd(mask: u64, flags: i32) -> io::Result<OwnedFd> {
    // By hand: nix's SigSet holds only the standard signals, and a saved
    // mask may hold real-time ones.
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
    Ok(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?.0)
}

/// Creates a close-on-exec memfd that allows sealing.
pub fn memfd(name: &str) -> io::Result<OwnedFd> {
    Ok(memfd_create(
        name,
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?)
}

/// `F_GET_SEALS` of a memfd.
pub fn seals(fd: BorrowedFd<'_>) -> io::Result<u32> {
    Ok(fcntl(fd, FcntlArg::F_GET_SEALS)? as u32)
}

/// `F_ADD_SEALS` on a memfd.
pub fn add_seals(fd: BorrowedFd<'_>, seals: u32) -> io::Result<()> {
    let seals = SealFlag::from_bits_retain(seals as libc::c_int);
    fcntl(fd, FcntlArg::F_ADD_SEALS(seals))?;
    Ok(())
}

/// `F_GETPIPE_SZ`: capacity of a pipe in bytes.
pub fn pipe_size(fd: BorrowedFd<'_>) -> io::Result<usize> {
    Ok(fcntl(fd, FcntlArg::F_GETPIPE_SZ)? as usize)
}

/// `F_SETPIPE_SZ`: sets the capacity of a pipe (rounded up by the kernel).
pub fn set_pipe_size(fd: BorrowedFd<'_>, size: usize) -> io::Result<()> {
    fcntl(fd, FcntlArg::F_SETPIPE_SZ(size as libc::c_int))?;
    Ok(())
}

/// `tee(from, to, len, SPLICE_F_NONBLOCK)`: copies up to `len` bytes of the
/// pipe `from` into the pipe `to` without consuming them. Returns 0 when
/// `from` is empty.
pub fn tee(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    match nix::fcntl::tee(from, to, len, SpliceFFlags::SPLICE_F_NONBLOCK) {
        Ok(n) => Ok(n),
        Err(nix::errno::Errno::EAGAIN) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// True when `fd1` of `pid1` and `fd2` of `pid2` are the same open file
/// description (`kcmp(KCMP_FILE)`).
pub fn same_file(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> io::Result<bool> {
    // By hand: neither nix nor libc wraps kcmp, nor has its KCMP_* types.
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

/// What two processes may share since a `clone`, as `kcmp` compares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskObject {
    /// The address space (`CLONE_VM`: `vfork`, or threads of another
    /// thread group).
    Memory,
    /// The descriptor table (`CLONE_FILES`).
    FdTable,
    /// The working directory, root and umask (`CLONE_FS`).
    Filesystem,
}

/// True when processes `pid1` and `pid2` share `object`
/// (`kcmp(KCMP_VM / KCMP_FILES / KCMP_FS)`).
pub fn same_task_object(pid1: i32, pid2: i32, object: TaskObject) -> io::Result<bool> {
    // The KCMP_* types of linux/kcmp.h, which libc does not have.
    let kind: libc::c_int = match object {
        TaskObject::Memory => 1,
        TaskObject::FdTable => 2,
        TaskObject::Filesystem => 3,
    };
    // SAFETY: kcmp takes integers only; these kinds ignore the last two.
    let rc = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, kind, 0, 0) };
    Ok(check(rc)? == 0)
}

/// True when descriptor `fd` of `pid` is open on the file that the epoll
/// instance `epoll` of `epoll_pid` watches as `tfd`, the `nth` (from 0) of
/// its watches added as `tfd` (`kcmp(KCMP_EPOLL_TFD)`). `ENOENT` when the
/// instance has no such watch.
pub fn same_epoll_target(
    pid: i32,
    fd: i32,
    epoll_pid: i32,
    epoll: i32,
    tfd: i32,
    nth: u32,
) -> io::Result<bool> {
    // By hand: as for `same_file`; the slot is `struct kcmp_epoll_slot`.
    const KCMP_EPOLL_TFD: libc::c_int = 7;
    #[repr(C)]
    struct KcmpEpollSlot {
        efd: u32,
        tfd: u32,
        toff: u32,
    }
    let slot = KcmpEpollSlot {
        efd: epoll as u32,
        tfd: tfd as u32,
        toff: nth,
    };
    // SAFETY: the kernel reads one `kcmp_epoll_slot` from the pointer,
    // valid for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            epoll_pid,
            KCMP_EPOLL_TFD,
            fd as libc::c_ulong,
            &raw const slot,
        )
    };
    Ok(check(rc)? == 0)
}

/// `getsockopt` of an `int` option.
pub fn sockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    // By hand: nix's socket options are one type per option, and these
    // level/name pairs come from tables and images at run time.
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
    // By hand: as for `sockopt_int`.
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
    // By hand: nix has no TCP_INFO option.
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
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT | MsgFlags::from_bits_retain(extra);
    match nix::sys::socket::recv(fd.as_raw_fd(), buf, flags) {
        Ok(n) => Ok(Some(n)),
        Err(nix::errno::Errno::EAGAIN) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `send(fd, data, MSG_DONTWAIT | MSG_NOSIGNAL)`; returns the bytes sent.
pub fn send_nonblocking(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    Ok(nix::sys::socket::send(fd.as_raw_fd(), data, flags)?)
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Read;
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn an_eventfd_starts_with_a_count_wider_than_32_bits() {
        let fd = eventfd(1 << 40, 0).expect("eventfd");
        let mut bytes = [0u8; 8];
        File::from(fd).read_exact(&mut bytes).expect("reading it");
        assert_eq!(u64::from_ne_bytes(bytes), 1 << 40, "the eventfd's counter");
    }

    #[test]
    fn a_timerfd_is_armed_with_the_value_and_interval_given() {
        let timer = timerfd(libc::CLOCK_MONOTONIC).expect("timerfd");
        timerfd_settime(&timer, 0, 50_000_000_000, 2_500_000_000).expect("settime");
        let Some(Expiration::IntervalDelayed(value, interval)) = timer.get().expect("gettime")
        else {
            panic!("the timer is not armed periodically: {:?}", timer.get());
        };
        assert_eq!(interval, TimeSpec::new(2, 500_000_000), "the interval");
        assert!(
            value > TimeSpec::new(40, 0) && value <= TimeSpec::new(50, 0),
            "the time left is {value}, not just under 50 s"
        );
    }

    #[test]
    fn an_unknown_clock_is_refused() {
        let err = timerfd(libc::CLOCK_PROCESS_CPUTIME_ID).expect_err("a CPU-time timerfd");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }

    #[test]
    fn tee_copies_a_pipe_without_draining_it() {
        let (read, write) = nix::unistd::pipe().expect("pipe");
        let (copy_read, copy_write) = nix::unistd::pipe().expect("pipe");
        assert_eq!(
            tee(read.as_fd(), copy_write.as_fd(), 4096).unwrap(),
            0,
            "an empty pipe copies nothing"
        );
        nix::unistd::write(&write, b"hello").expect("writing the pipe");
        assert_eq!(
            tee(read.as_fd(), copy_write.as_fd(), 4096).unwrap(),
            5,
            "bytes copied"
        );
        drop((write, copy_write));
        let (mut original, mut copy) = (String::new(), String::new());
        File::from(read).read_to_string(&mut original).unwrap();
        File::from(copy_read).read_to_string(&mut copy).unwrap();
        assert_eq!(
            (original.as_str(), copy.as_str()),
            ("hello", "hello"),
            "what the pipe and its copy hold"
        );
    }

    #[test]
    fn peek_reports_an_empty_queue_then_the_full_datagram_length() {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::Datagram,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let mut buf = [0u8; 4];
        assert_eq!(
            peek(b.as_fd(), &mut buf, libc::MSG_TRUNC).unwrap(),
            None,
            "an empty queue"
        );
        assert_eq!(
            send_nonblocking(a.as_fd(), b"a datagram").unwrap(),
            10,
            "bytes sent"
        );
        assert_eq!(
            peek(b.as_fd(), &mut buf, libc::MSG_TRUNC).unwrap(),
            Some(10),
            "the whole datagram's length"
        );
        assert_eq!(&buf, b"a da", "the peeked bytes");
        assert_eq!(
            peek(b.as_fd(), &mut buf, 0).unwrap(),
            Some(4),
            "still queued"
        );
    }

    #[test]
    fn memfd_seals_and_pipe_sizes_read_back() {
        let memfd = memfd("kobjects-test").expect("memfd");
        add_seals(memfd.as_fd(), libc::F_SEAL_SHRINK as u32).expect("sealing");
        assert_eq!(
            seals(memfd.as_fd()).unwrap(),
            libc::F_SEAL_SHRINK as u32,
            "the memfd's seals"
        );
        let (_read, write) = nix::unistd::pipe().expect("pipe");
        set_pipe_size(write.as_fd(), 3 * 4096).expect("F_SETPIPE_SZ");
        assert_eq!(
            pipe_size(write.as_fd()).unwrap(),
            4 * 4096,
            "rounded to a power of two"
        );
    }
}
