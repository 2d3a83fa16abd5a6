//! TCP sockets that neither listen nor are connected (state `CLOSE`): just
//! created by `socket()`, or bound to an address a server will listen on
//! or a client connect from.
//!
//! Saved: the local address (the family alone when unbound), `SO_REUSEADDR`,
//! `SO_REUSEPORT`, `IPV6_V6ONLY`, the options of [`super::sockopts`] and
//! `SO_LINGER`. Restored: a new socket of the same family with those
//! options, bound again to the same address and port if it was bound.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage};
use persist_common::image::{FdKind, TcpSocket};

use super::FilesError;
use super::sockopts::{self, Protocol};
use crate::sys::kobjects;

/// Saves the closed TCP socket `sock` (the process's `fd`) bound to `local`.
pub(super) fn save(fd: i32, sock: BorrowedFd<'_>, local: SocketAddr) -> Result<FdKind, FilesError> {
    let flag = |level, name, what: &str| {
        kobjects::sockopt_int(sock, level, name)
            .map(|v| v != 0)
            .map_err(FilesError::io(fd, format!("getsockopt {what}")))
    };
    let v6only = local.is_ipv6() && flag(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, "IPV6_V6ONLY")?;
    Ok(FdKind::TcpSocket(TcpSocket {
        local: local.to_string(),
        reuseaddr: flag(libc::SOL_SOCKET, libc::SO_REUSEADDR, "SO_REUSEADDR")?,
        reuseport: flag(libc::SOL_SOCKET, libc::SO_REUSEPORT, "SO_REUSEPORT")?,
        v6only,
        options: sockopts::save(fd, sock, Protocol::Tcp)?,
        linger: sockopts::save_linger(fd, sock)?,
    }))
}

/// A new TCP socket like `saved`, bound to its address if it had one.
///
/// The bind is an ordinary one with the saved `SO_REUSEADDR` and
/// `SO_REUSEPORT`: if another socket holds the port now, the restore fails
/// naming the descriptor and the address rather than hand the process a
/// socket bound elsewhere.
pub(super) fn create(fd: i32, saved: &TcpSocket) -> Result<OwnedFd, FilesError> {
    let local = &saved.local;
    let addr: SocketAddr = local
        .parse()
        .map_err(|_| FilesError::invalid(fd, format!("bad TCP socket address {local:?}")))?;
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let name = format!("TCP socket {local}");
    let sock = nix::sys::socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(FilesError::io(fd, format!("socket for {name}")))?;
    let set = |level, option, value: bool, what: &str| {
        kobjects::set_sockopt_int(sock.as_fd(), level, option, i32::from(value))
            .map_err(FilesError::io(fd, format!("{what} for {name}")))
    };
    set(
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        saved.reuseaddr,
        "SO_REUSEADDR",
    )?;
    set(
        libc::SOL_SOCKET,
        libc::SO_REUSEPORT,
        saved.reuseport,
        "SO_REUSEPORT",
    )?;
    if addr.is_ipv6() {
        set(
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            saved.v6only,
            "IPV6_V6ONLY",
        )?;
    }
    // Before the bind: IP_FREEBIND, IP_BIND_ADDRESS_NO_PORT and
    // IP_TRANSPARENT change what it accepts.
    sockopts::restore(fd, sock.as_fd(), &saved.options, saved.linger, &name)?;
    if !is_unbound(&addr) {
        nix::sys::socket::bind(sock.as_raw_fd(), &SockaddrStorage::from(addr))
            .map_err(FilesError::io(fd, format!("binding {name}")))?;
    }
    Ok(sock)
}

/// The unspecified address and port 0 is what `getsockname` reports for a
/// socket never bound; binding to it would pick a port.
fn is_unbound(addr: &SocketAddr) -> bool {
    addr.ip().is_unspecified() && addr.port() == 0
}
