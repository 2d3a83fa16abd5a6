//! Socket options kept for sockets that are re-created empty (bound,
//! unbound, or connected again): read as integers at checkpoint, set again
//! before the socket is bound.

use std::io;
use std::os::fd::BorrowedFd;

use nix::sys::socket::sockopt;
use nix::sys::time::{TimeVal, TimeValLike};
use persist_common::image::SocketOption;

use super::FilesError;
use crate::sys::kobjects;

/// `SO_BUF_LOCK` (Linux 5.14): which buffer sizes the program set itself
/// (bit 0 send, bit 1 receive); libc does not name it yet.
const SO_BUF_LOCK: i32 = 72;
const SNDBUF_LOCK: i32 = 1;
const RCVBUF_LOCK: i32 = 2;

/// Options of every socket, kept when not zero.
const SOCKET_OPTIONS: [(i32, i32, &str); 6] = [
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE, "SO_KEEPALIVE"),
    (libc::SOL_SOCKET, libc::SO_BROADCAST, "SO_BROADCAST"),
    (libc::SOL_SOCKET, libc::SO_OOBINLINE, "SO_OOBINLINE"),
    (libc::SOL_SOCKET, libc::SO_DONTROUTE, "SO_DONTROUTE"),
    (libc::SOL_SOCKET, libc::SO_PRIORITY, "SO_PRIORITY"),
    (libc::SOL_SOCKET, libc::SO_MARK, "SO_MARK"),
];

/// Options of UNIX sockets, kept when not zero (other sockets refuse them).
const UNIX_OPTIONS: [(i32, i32, &str); 1] = [(libc::SOL_SOCKET, libc::SO_PASSCRED, "SO_PASSCRED")];

/// Options of TCP sockets, kept when not zero.
const TCP_OPTIONS: [(i32, i32, &str); 6] = [
    (libc::IPPROTO_TCP, libc::TCP_NODELAY, "TCP_NODELAY"),
    (libc::IPPROTO_TCP, libc::TCP_CORK, "TCP_CORK"),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, "TCP_KEEPIDLE"),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, "TCP_KEEPINTVL"),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, "TCP_KEEPCNT"),
    (
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        "TCP_USER_TIMEOUT",
    ),
];

/// Options of IPv4 sockets (and IPv6 ones, which have them too), kept when
/// not zero; the last three change what `bind` accepts.
const IP_OPTIONS: [(i32, i32, &str); 4] = [
    (libc::IPPROTO_IP, libc::IP_TOS, "IP_TOS"),
    (libc::IPPROTO_IP, libc::IP_FREEBIND, "IP_FREEBIND"),
    (libc::IPPROTO_IP, libc::IP_TRANSPARENT, "IP_TRANSPARENT"),
    (
        libc::IPPROTO_IP,
        libc::IP_BIND_ADDRESS_NO_PORT,
        "IP_BIND_ADDRESS_NO_PORT",
    ),
];

/// Which protocol's options to read besides the socket-level ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    /// TCP over IPv4 or IPv6.
    Tcp,
    /// UDP over IPv4 or IPv6.
    Udp,
    /// A UNIX socket.
    Unix,
}

/// The options of `sock` worth setting again on a new socket, with its
/// receive and send timeouts in milliseconds. Buffer sizes
/// are kept only if the program set them (`SO_BUF_LOCK`): they are saved as
/// `SO_SNDBUFFORCE`/`SO_RCVBUFFORCE` of half the size read back, which the
/// kernel doubles again, so the new socket gets the very size the old one
/// had, even above `wmem_max`/`rmem_max`.
pub(super) fn save(
    fd: i32,
    sock: BorrowedFd<'_>,
    protocol: Protocol,
) -> Result<Vec<SocketOption>, FilesError> {
    let get = |level, name, what: &str| {
        kobjects::sockopt_int(sock, level, name)
            .map_err(FilesError::io(fd, format!("getsockopt {what}")))
    };
    let table: &[(i32, i32, &str)] = match protocol {
        Protocol::Tcp => &TCP_OPTIONS,
        Protocol::Udp => &[],
        Protocol::Unix => &UNIX_OPTIONS,
    };
    let ip: &[(i32, i32, &str)] = match protocol {
        Protocol::Tcp | Protocol::Udp => &IP_OPTIONS,
        Protocol::Unix => &[],
    };
    let mut options = Vec::new();
    for &(level, name, what) in SOCKET_OPTIONS.iter().chain(table).chain(ip) {
        let value = get(level, name, what)?;
        if value != 0 {
            options.push(SocketOption { level, name, value });
        }
    }
    let timeouts = [
        (
            libc::SO_RCVTIMEO,
            "SO_RCVTIMEO",
            nix::sys::socket::getsockopt(&sock, sockopt::ReceiveTimeout),
        ),
        (
            libc::SO_SNDTIMEO,
            "SO_SNDTIMEO",
            nix::sys::socket::getsockopt(&sock, sockopt::SendTimeout),
        ),
    ];
    for (name, what, timeout) in timeouts {
        let timeout = timeout.map_err(FilesError::io(fd, format!("getsockopt {what}")))?;
        let value = i32::try_from(timeout.num_milliseconds()).unwrap_or(i32::MAX);
        if value != 0 {
            options.push(SocketOption {
                level: libc::SOL_SOCKET,
                name,
                value,
            });
        }
    }
    let locks = get(libc::SOL_SOCKET, SO_BUF_LOCK, "SO_BUF_LOCK")?;
    for (lock, read, force, what) in [
        (
            SNDBUF_LOCK,
            libc::SO_SNDBUF,
            libc::SO_SNDBUFFORCE,
            "SO_SNDBUF",
        ),
        (
            RCVBUF_LOCK,
            libc::SO_RCVBUF,
            libc::SO_RCVBUFFORCE,
            "SO_RCVBUF",
        ),
    ] {
        if locks & lock != 0 {
            let value = get(libc::SOL_SOCKET, read, what)? / 2;
            options.push(SocketOption {
                level: libc::SOL_SOCKET,
                name: force,
                value,
            });
        }
    }
    Ok(options)
}

/// The `SO_LINGER` time in seconds, if lingering is on.
pub(super) fn save_linger(fd: i32, sock: BorrowedFd<'_>) -> Result<Option<i32>, FilesError> {
    let linger = nix::sys::socket::getsockopt(&sock, sockopt::Linger)
        .map_err(FilesError::io(fd, "getsockopt SO_LINGER"))?;
    Ok((linger.l_onoff != 0).then_some(linger.l_linger))
}

/// Sets `options` and the linger time on `sock`, re-created for `fd`; the
/// timeouts (milliseconds) as a `timeval`.
pub(super) fn restore(
    fd: i32,
    sock: BorrowedFd<'_>,
    options: &[SocketOption],
    linger: Option<i32>,
    name: &str,
) -> Result<(), FilesError> {
    for option in options {
        let timeout = || TimeVal::milliseconds(option.value.into());
        let set = match (option.level, option.name) {
            (libc::SOL_SOCKET, libc::SO_RCVTIMEO) => {
                nix::sys::socket::setsockopt(&sock, sockopt::ReceiveTimeout, &timeout())
                    .map_err(io::Error::from)
            }
            (libc::SOL_SOCKET, libc::SO_SNDTIMEO) => {
                nix::sys::socket::setsockopt(&sock, sockopt::SendTimeout, &timeout())
                    .map_err(io::Error::from)
            }
            _ => kobjects::set_sockopt_int(sock, option.level, option.name, option.value),
        };
        set.map_err(FilesError::io(
            fd,
            format!(
                "setsockopt {}/{} = {} for {name}",
                option.level, option.name, option.value
            ),
        ))?;
    }
    if let Some(seconds) = linger {
        let value = libc::linger {
            l_onoff: 1,
            l_linger: seconds,
        };
        nix::sys::socket::setsockopt(&sock, sockopt::Linger, &value)
            .map_err(FilesError::io(fd, format!("SO_LINGER for {name}")))?;
    }
    Ok(())
}
