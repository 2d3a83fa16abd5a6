//! The listening sockets the agent holds for its services.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
    sockopt,
};

/// Why a listener could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// Something else listens on the address.
    #[error("port {port} on {addr} is already in use")]
    InUse {
        /// The address.
        addr: Ipv4Addr,
        /// The port.
        port: u16,
    },
    /// Another socket error.
    #[error("listening on {addr}:{port}: {source}")]
    Io {
        /// The address.
        addr: Ipv4Addr,
        /// The port.
        port: u16,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Opens a TCP listener on `addr:port` with the largest backlog the kernel allows.
pub fn open(addr: Ipv4Addr, port: u16) -> Result<OwnedFd, ListenerError> {
    let fail = |errno: nix::errno::Errno| match errno {
        nix::errno::Errno::EADDRINUSE => ListenerError::InUse { addr, port },
        other => ListenerError::Io {
            addr,
            port,
            source: other.into(),
        },
    };
    let socket = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(fail)?;
    setsockopt(&socket, sockopt::ReuseAddr, &true).map_err(fail)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&socket),
        &SockaddrIn::from(SocketAddrV4::new(addr, port)),
    )
    .map_err(fail)?;
    listen(&socket, Backlog::MAXCONN).map_err(fail)?;
    Ok(socket)
}

/// True when connections wait in the listener's accept queue.
pub fn has_pending(listener: &impl AsFd) -> bool {
    let mut fds = [nix::poll::PollFd::new(
        listener.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Inode of a socket, which names it across processes (`socket:[INODE]`).
pub fn inode(socket: &impl AsFd) -> io::Result<u64> {
    Ok(nix::sys::stat::fstat(socket.as_fd())?.st_ino)
}

/// Sets the accept-queue limit of a socket that already listens: `listen()`
/// on a listening socket changes only that limit, and the connections
/// already queued stay queued. `None` is the largest the kernel allows.
pub fn set_backlog(listener: &impl AsFd, backlog: Option<u32>) -> io::Result<()> {
    let backlog = match backlog.and_then(|b| i32::try_from(b).ok()) {
        Some(backlog) => Backlog::new(backlog).unwrap_or(Backlog::MAXCONN),
        None => Backlog::MAXCONN,
    };
    Ok(listen(listener, backlog)?)
}
