//! The listening sockets the agent holds for its services.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrLike, SockaddrStorage, bind, getsockname,
    getsockopt, listen, setsockopt, socket, sockopt,
};

/// Why a listener could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// Something else listens on the address.
    #[error("port {} on {} is already in use", address.port(), address.ip())]
    InUse {
        /// The address and port.
        address: SocketAddr,
    },
    /// Another socket error.
    #[error("listening on {address}")]
    Io {
        /// The address and port.
        address: SocketAddr,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Opens a TCP listener on `addr:port` with the largest backlog the kernel
/// allows. On `::` it is dual-stack (it takes IPv4 too), whatever
/// `net.ipv6.bindv6only` says, as a server binding `::` expects.
pub fn open(addr: IpAddr, port: u16) -> Result<OwnedFd, ListenerError> {
    open_member(addr, port, None)
}

/// Opens `members` TCP listeners on `addr:port` as [`open`] does, all with
/// `SO_REUSEPORT` and owned by `owner_uid` (root if `None`), so that they
/// make one group as the service's did (the kernel groups by owner). The
/// first is the one SYNs are steered to.
pub fn open_group(
    addr: IpAddr,
    port: u16,
    members: usize,
    owner_uid: Option<u32>,
) -> Result<(OwnedFd, Vec<OwnedFd>), ListenerError> {
    let mut group = (0..members.max(1))
        .map(|_| open_member(addr, port, Some(owner_uid)))
        .collect::<Result<Vec<_>, _>>()?;
    let first = group.remove(0);
    Ok((first, group))
}

/// [`open`], with `SO_REUSEPORT` and the owner `reuseport` gives, if any.
fn open_member(
    addr: IpAddr,
    port: u16,
    reuseport: Option<Option<u32>>,
) -> Result<OwnedFd, ListenerError> {
    let address = SocketAddr::new(addr, port);
    let fail = |errno: nix::errno::Errno| match errno {
        nix::errno::Errno::EADDRINUSE => ListenerError::InUse { address },
        other => ListenerError::Io {
            address,
            source: other.into(),
        },
    };
    let family = match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    let socket = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(fail)?;
    setsockopt(&socket, sockopt::ReuseAddr, &true).map_err(fail)?;
    if addr.is_ipv6() {
        setsockopt(&socket, sockopt::Ipv6V6Only, &false).map_err(fail)?;
    }
    if let Some(owner_uid) = reuseport {
        setsockopt(&socket, sockopt::ReusePort, &true).map_err(fail)?;
        // Before the bind, which makes the group of one owner's listeners.
        if let Some(uid) = owner_uid {
            nix::unistd::fchown(&socket, Some(nix::unistd::Uid::from_raw(uid)), None)
                .map_err(fail)?;
        }
    }
    bind(socket.as_raw_fd(), &SockaddrStorage::from(address)).map_err(fail)?;
    listen(&socket, Backlog::MAXCONN).map_err(fail)?;
    Ok(socket)
}

/// The local address a TCP listener is bound to, and whether it takes
/// IPv6 only (`IPV6_V6ONLY`; always false for an IPv4 socket).
pub fn bound_address(listener: &impl AsFd) -> io::Result<(SocketAddr, bool)> {
    let fd = listener.as_fd();
    let local: SockaddrStorage = getsockname(fd.as_raw_fd())?;
    if let Some(v4) = local.as_sockaddr_in() {
        return Ok((SocketAddr::V4((*v4).into()), false));
    }
    if let Some(v6) = local.as_sockaddr_in6() {
        return Ok((
            SocketAddr::V6((*v6).into()),
            getsockopt(&fd, sockopt::Ipv6V6Only)?,
        ));
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("socket of family {:?} is not an IP socket", local.family()),
    ))
}

/// Duplicates of `listeners`, held for as long as their service is
/// registered: numbered apart from what a restore copies
/// ([`crate::restore::set_apart`]).
pub fn clone_all(listeners: &[OwnedFd]) -> io::Result<Vec<OwnedFd>> {
    listeners
        .iter()
        .map(|listener| crate::restore::copy_apart(listener.as_fd()))
        .collect()
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
