//! Finding the listening socket of a ready service and taking it over.

use std::os::fd::{AsRawFd, OwnedFd};

use persist_common::image::{FdKind, Manifest};

use super::BuildError;
use crate::sys::pidfd::PidFd;

/// What one socket descriptor of a service is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SocketRole {
    /// A TCP socket listening on this port.
    TcpListener {
        /// Its local port.
        port: u16,
    },
    /// Any other TCP socket: a connection, or one not yet connected.
    TcpOther,
    /// Not TCP (Unix, UDP, netlink...).
    Other,
}

/// Every socket descriptor of the process behind `pidfd`, with its inode
/// and what it is. Each is judged on a duplicate taken with
/// `pidfd_getfd`, closed at once: the cost is the process's sockets, not
/// every socket of the namespace, as reading /proc/net/tcp would be (a
/// thousand services hold a thousand listeners there).
pub(super) fn sockets(pidfd: &PidFd) -> Vec<(i32, u64, SocketRole)> {
    let Ok(fds) = procfs::process::Process::new(pidfd.pid()).and_then(|process| process.fd())
    else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| match fd.target {
            procfs::process::FDTarget::Socket(inode) => Some((fd.fd, inode)),
            _ => None,
        })
        .filter_map(|(fd, inode)| {
            // Closed meanwhile: not a socket of the process any more.
            let socket = pidfd.get_fd(fd).ok()?;
            Some((fd, inode, socket_role(&socket)))
        })
        .collect()
}

/// What `socket` is: its type, address family and whether it listens.
fn socket_role(socket: &OwnedFd) -> SocketRole {
    use nix::sys::socket::{
        AddressFamily, SockType, SockaddrLike, SockaddrStorage, getsockname, getsockopt, sockopt,
    };
    let stream = getsockopt(socket, sockopt::SockType).is_ok_and(|t| t == SockType::Stream);
    // Only a TCP socket answers a TCP-level option (an SCTP stream socket does not).
    let tcp = getsockopt(socket, sockopt::TcpNoDelay).is_ok();
    let Ok(local) = getsockname::<SockaddrStorage>(socket.as_raw_fd()) else {
        return SocketRole::Other;
    };
    let inet = matches!(
        local.family(),
        Some(AddressFamily::Inet | AddressFamily::Inet6)
    );
    if !(stream && tcp && inet) {
        return SocketRole::Other;
    }
    if !getsockopt(socket, sockopt::AcceptConn).unwrap_or(false) {
        return SocketRole::TcpOther;
    }
    let port = local
        .as_sockaddr_in()
        .map(|addr| addr.port())
        .or_else(|| local.as_sockaddr_in6().map(|addr| addr.port()))
        .unwrap_or(0);
    SocketRole::TcpListener { port }
}

/// The descriptor of the process behind `pidfd` that is a TCP socket
/// listening on `port`, with its inode.
pub fn find_listener(pidfd: &PidFd, port: u16) -> Result<(i32, u64), String> {
    sockets(pidfd)
        .into_iter()
        .find_map(|(fd, inode, role)| {
            (role == SocketRole::TcpListener { port }).then_some((fd, inode))
        })
        .ok_or_else(|| format!("it holds no TCP socket listening on port {port}"))
}

/// Takes a duplicate of the process's listener on `port`.
pub(super) fn take_listener(pidfd: &PidFd, port: u16) -> Result<(i32, OwnedFd), BuildError> {
    let pid = pidfd.pid();
    let no_listener = |reason: String| BuildError::NoListener { pid, port, reason };
    let (fd, _) = find_listener(pidfd, port).map_err(no_listener)?;
    let listener = pidfd
        .get_fd(fd)
        .map_err(|err| no_listener(format!("pidfd_getfd of fd {fd}: {err}")))?;
    Ok((fd, listener))
}

/// The descriptor number of the image's TCP listener on `port`.
pub fn listener_fd_in_image(manifest: &Manifest, port: u16) -> Option<i32> {
    listener_in_image(manifest, port).map(|(fd, _)| fd)
}

/// The backlog the service gave its TCP listener on `port`, as the image
/// recorded it.
pub fn listener_backlog_in_image(manifest: &Manifest, port: u16) -> Option<u32> {
    listener_in_image(manifest, port).map(|(_, backlog)| backlog)
}

fn listener_in_image(manifest: &Manifest, port: u16) -> Option<(i32, u32)> {
    manifest.fds.iter().find_map(|fd| match &fd.kind {
        FdKind::TcpListener { local, backlog, .. }
            if local.rsplit(':').next().and_then(|p| p.parse().ok()) == Some(port) =>
        {
            Some((fd.fd, *backlog))
        }
        _ => None,
    })
}

/// Child processes of `pid`, all threads included.
pub(super) fn children(pid: i32) -> Vec<i32> {
    let Ok(process) = procfs::process::Process::new(pid) else {
        return Vec::new();
    };
    let Ok(tasks) = process.tasks() else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| task.children().ok())
        .flatten()
        .map(|child| child as i32)
        .collect()
}
