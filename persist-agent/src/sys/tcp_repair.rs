//! The `TCP_REPAIR` interface of a TCP socket (`tcp(7)`, kernel
//! `Documentation/networking/tcp-repair` and CRIU's `soccr`): options that
//! carry structures, and the queue-size ioctls. The plain `int` options
//! (`TCP_REPAIR`, `TCP_REPAIR_QUEUE`, `TCP_QUEUE_SEQ`, `TCP_TIMESTAMP`,
//! `TCP_MAXSEG`) go through [`super::kobjects::sockopt_int`].

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `TCP_REPAIR` value that leaves repair mode without sending a window
/// probe (`TCP_REPAIR_OFF_NO_WP`, not in the libc crate).
pub const REPAIR_OFF_NO_WINDOW_PROBE: i32 = -1;

/// `TCP_REPAIR_QUEUE` values (`TCP_RECV_QUEUE`, `TCP_SEND_QUEUE`).
pub const RECV_QUEUE: i32 = 1;
/// See [`RECV_QUEUE`].
pub const SEND_QUEUE: i32 = 2;

/// `TCPOPT_*` codes accepted by `TCP_REPAIR_OPTIONS`.
pub const OPT_MAXSEG: u32 = 2;
/// Window scale: the value is `snd_wscale | rcv_wscale << 16`.
pub const OPT_WINDOW: u32 = 3;
/// SACK permitted.
pub const OPT_SACK_PERM: u32 = 4;
/// Timestamps.
pub const OPT_TIMESTAMP: u32 = 8;

/// `tcpi_options` bits of `TCP_INFO`.
pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
/// See [`TCPI_OPT_TIMESTAMPS`].
pub const TCPI_OPT_SACK: u8 = 2;
/// See [`TCPI_OPT_TIMESTAMPS`].
pub const TCPI_OPT_WSCALE: u8 = 4;

/// `struct tcp_repair_window` (`TCP_REPAIR_WINDOW`, Linux 4.8+).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepairWindow {
    /// Sequence number of the segment that last updated the send window.
    pub snd_wl1: u32,
    /// The peer's receive window.
    pub snd_wnd: u32,
    /// Largest window the peer ever offered.
    pub max_window: u32,
    /// Our receive window.
    pub rcv_wnd: u32,
    /// `rcv_nxt` when the window was last advertised.
    pub rcv_wup: u32,
}

/// `struct tcp_repair_opt`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RepairOpt {
    code: u32,
    value: u32,
}

/// What `TCP_INFO` says of a connection that its repair needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// `tcpi_state` (`TCP_ESTABLISHED` = 1, ...).
    pub state: u8,
    /// `tcpi_options`: [`TCPI_OPT_TIMESTAMPS`], [`TCPI_OPT_SACK`],
    /// [`TCPI_OPT_WSCALE`].
    pub options: u8,
    /// Our send window scale (the peer's shift).
    pub snd_wscale: u8,
    /// Our receive window scale.
    pub rcv_wscale: u8,
}

/// The options negotiated at the handshake, from `TCP_INFO`.
pub fn negotiated(fd: BorrowedFd<'_>) -> io::Result<Negotiated> {
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
    check(rc)?;
    // `__u8 tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4`: little-endian
    // bit-fields fill the low bits first.
    Ok(Negotiated {
        state: info.tcpi_state,
        options: info.tcpi_options,
        snd_wscale: info.tcpi_snd_rcv_wscale & 0x0f,
        rcv_wscale: info.tcpi_snd_rcv_wscale >> 4,
    })
}

/// `getsockopt(TCP_REPAIR_WINDOW)`; the socket must be in repair mode.
pub fn window(fd: BorrowedFd<'_>) -> io::Result<RepairWindow> {
    let mut window = RepairWindow::default();
    let mut len = std::mem::size_of::<RepairWindow>() as libc::socklen_t;
    // SAFETY: `window` and `len` are valid for writes of their sizes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_WINDOW,
            (&raw mut window).cast(),
            &mut len,
        )
    };
    check(rc)?;
    Ok(window)
}

/// `setsockopt(TCP_REPAIR_WINDOW)`; the socket must be in repair mode.
pub fn set_window(fd: BorrowedFd<'_>, window: &RepairWindow) -> io::Result<()> {
    let len = std::mem::size_of::<RepairWindow>() as libc::socklen_t;
    // SAFETY: `window` is readable for `len` bytes during the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_WINDOW,
            std::ptr::from_ref(window).cast(),
            len,
        )
    };
    check(rc)
}

/// `setsockopt(TCP_REPAIR_OPTIONS)` with `(TCPOPT_* code, value)` pairs;
/// the socket must be in repair mode, established, with nothing sent yet.
pub fn set_options(fd: BorrowedFd<'_>, options: &[(u32, u32)]) -> io::Result<()> {
    let options: Vec<RepairOpt> = options
        .iter()
        .map(|&(code, value)| RepairOpt { code, value })
        .collect();
    let len = std::mem::size_of_val(options.as_slice()) as libc::socklen_t;
    // SAFETY: `options` is readable for `len` bytes during the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_OPTIONS,
            options.as_ptr().cast(),
            len,
        )
    };
    check(rc)
}

/// Bytes queued on a TCP socket: unread (`SIOCINQ`), not yet acknowledged
/// by the peer (`SIOCOUTQ`), and of those, never sent (`SIOCOUTQNSD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSizes {
    /// Received, not read by the process.
    pub inq: u32,
    /// Written by the process, not acknowledged.
    pub outq: u32,
    /// Written by the process, not sent.
    pub outq_unsent: u32,
}

/// The queue sizes of a TCP socket.
pub fn queue_sizes(fd: BorrowedFd<'_>) -> io::Result<QueueSizes> {
    let ioctl = |request: libc::c_ulong| -> io::Result<u32> {
        let mut value: libc::c_int = 0;
        // SAFETY: the three requests write one int to the pointer given.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, &raw mut value) };
        check(rc)?;
        Ok(value as u32)
    };
    Ok(QueueSizes {
        inq: ioctl(libc::FIONREAD)?,
        outq: ioctl(libc::TIOCOUTQ)?,
        outq_unsent: ioctl(libc::SIOCOUTQNSD)?,
    })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
