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

/// Every TCP socket of the process behind `pidfd` listening on `port`, as
/// its lowest descriptor and its inode, in descriptor order: one, or the
/// members of an `SO_REUSEPORT` group (nginx's `listen PORT reuseport;`, a
/// server with one socket per thread), or listeners of the port on several
/// addresses. Never empty.
pub fn find_listeners(pidfd: &PidFd, port: u16) -> Result<Vec<(i32, u64)>, String> {
    let mut found: Vec<(i32, u64)> = sockets(pidfd)
        .into_iter()
        .filter(|&(_, _, role)| role == SocketRole::TcpListener { port })
        .map(|(fd, inode, _)| (fd, inode))
        .collect();
    found.sort_unstable();
    let mut seen = Vec::new();
    found.retain(|&(_, inode)| {
        let first = !seen.contains(&inode);
        seen.push(inode);
        first
    });
    if found.is_empty() {
        return Err(format!("it holds no TCP socket listening on port {port}"));
    }
    Ok(found)
}

/// The descriptor of the process behind `pidfd` that is a TCP socket
/// listening on `port` (the lowest, if several), with its inode.
pub fn find_listener(pidfd: &PidFd, port: u16) -> Result<(i32, u64), String> {
    find_listeners(pidfd, port).map(|listeners| listeners[0])
}

/// Takes duplicates of the process's listeners on `port`: the first (by
/// descriptor number), with its number, and the others (the rest of its
/// `SO_REUSEPORT` group), which the agent holds too so that their queues
/// survive the process.
pub(super) fn take_listeners(
    pidfd: &PidFd,
    port: u16,
) -> Result<(i32, OwnedFd, Vec<OwnedFd>), BuildError> {
    let pid = pidfd.pid();
    let no_listener = |reason: String| BuildError::NoListener { pid, port, reason };
    let mut taken = Vec::new();
    for (fd, _) in find_listeners(pidfd, port).map_err(no_listener)? {
        let listener = pidfd
            .get_fd(fd)
            .map_err(|err| no_listener(format!("pidfd_getfd of fd {fd}: {err}")))?;
        taken.push((fd, listener));
    }
    let mut taken = taken.into_iter();
    let (fd, main) = taken.next().expect("find_listeners finds one or fails");
    Ok((fd, main, taken.map(|(_, listener)| listener).collect()))
}

/// Where the listeners the agent holds for `port` go in the processes
/// restored from `manifest`, as `(pid, fd, socket)`: each to the image's
/// descriptor of the same socket (the inode the image recorded: the socket
/// taken from the process, or handed to it by an earlier restore), then
/// each socket left over, in order, to the image's listeners on the port
/// left over (a listener the agent opened itself has another inode). The
/// image's listeners are taken process by process in tree order (the root
/// first), each process's by descriptor number; a socket several processes
/// share is saved with its first holder only, and the others inherit it
/// from that one. Image listeners left without a socket are created anew by
/// the restore, and join the group of the held ones if they have
/// `SO_REUSEPORT` and its owner.
pub fn place_listeners(
    manifest: &Manifest,
    port: u16,
    held: Vec<OwnedFd>,
) -> std::io::Result<Vec<(i32, i32, OwnedFd)>> {
    let processes = std::iter::once((manifest.process.pid, &manifest.fds)).chain(
        manifest
            .children
            .iter()
            .map(|child| (child.process.pid, &child.fds)),
    );
    let mut in_image: Vec<(i32, i32, u64)> = Vec::new();
    for (pid, fds) in processes {
        let mut listeners: Vec<(i32, i32, u64)> = fds
            .iter()
            .filter(|fd| fd.shared_with.is_none())
            .filter_map(|fd| match &fd.kind {
                FdKind::TcpListener { local, inode, .. } if port_of(local) == Some(port) => {
                    Some((pid, fd.fd, *inode))
                }
                _ => None,
            })
            .collect();
        listeners.sort_unstable_by_key(|&(_, fd, _)| fd);
        in_image.extend(listeners);
    }
    let mut left = Vec::new();
    let mut placed = Vec::new();
    for socket in held {
        let inode = nix::sys::stat::fstat(&socket)?.st_ino;
        match in_image.iter().position(|&(_, _, i)| i == inode) {
            Some(at) => {
                let (pid, fd, _) = in_image.remove(at);
                placed.push((pid, fd, socket));
            }
            None => left.push(socket),
        }
    }
    placed.extend(
        in_image
            .into_iter()
            .zip(left)
            .map(|((pid, fd, _), socket)| (pid, fd, socket)),
    );
    Ok(placed)
}

/// The `SO_REUSEPORT` group the image's process(es) listened through on
/// `port`, if it had one of two or more members: how many, and the owner
/// of the first. A listener of another owner or without `SO_REUSEPORT` on
/// the port makes it `None`: no group of the agent's would take it.
pub fn reuseport_group_in_image(manifest: &Manifest, port: u16) -> Option<(usize, Option<u32>)> {
    let fds = manifest
        .fds
        .iter()
        .chain(manifest.children.iter().flat_map(|child| &child.fds))
        .filter(|fd| fd.shared_with.is_none());
    let mut members = 0;
    let mut owner = None;
    for fd in fds {
        if let FdKind::TcpListener {
            local,
            reuseport,
            owner_uid,
            ..
        } = &fd.kind
            && port_of(local) == Some(port)
        {
            if !reuseport || (members > 0 && owner != *owner_uid) {
                return None;
            }
            owner = *owner_uid;
            members += 1;
        }
    }
    (members >= 2).then_some((members, owner))
}

fn port_of(local: &str) -> Option<u16> {
    local.rsplit(':').next().and_then(|p| p.parse().ok())
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

/// The processes of `manifest` (by index in tree order: 0 the root, `i`
/// its `i`-th child) that hold a TCP listener on `port`, their own or one
/// they share with the process it was saved with: those that may accept
/// the connection that wakes the service.
pub fn listener_holders_in_image(manifest: &Manifest, port: u16) -> Vec<u32> {
    let processes = std::iter::once((manifest.process.pid, &manifest.fds, &[][..])).chain(
        manifest.children.iter().map(|child| {
            (
                child.process.pid,
                &child.fds,
                child.inherited_fds.as_slice(),
            )
        }),
    );
    // A shared description is saved with its first holder, listed before
    // the others: its listeners are known when a later holder is reached.
    let mut listeners: Vec<(i32, i32)> = Vec::new();
    let mut holders = Vec::new();
    for (index, (pid, fds, inherited)) in (0u32..).zip(processes) {
        let own: Vec<(i32, i32)> = fds
            .iter()
            .filter(|fd| matches!(&fd.kind, FdKind::TcpListener { local, .. } if port_of(local) == Some(port)))
            .map(|fd| (pid, fd.fd))
            .collect();
        let inherits = inherited
            .iter()
            .any(|fd| listeners.contains(&(fd.from_pid, fd.from_fd)));
        if !own.is_empty() || inherits {
            holders.push(index);
        }
        listeners.extend(own);
    }
    holders
}

fn listener_in_image(manifest: &Manifest, port: u16) -> Option<(i32, u32)> {
    manifest.fds.iter().find_map(|fd| match &fd.kind {
        FdKind::TcpListener { local, backlog, .. } if port_of(local) == Some(port) => {
            Some((fd.fd, *backlog))
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::os::fd::OwnedFd;

    use persist_common::image::{ChildProcess, FdInfo, FdKind, InheritedFd, Manifest, ProcessInfo};

    use super::{listener_holders_in_image, place_listeners, reuseport_group_in_image};

    fn listener(fd: i32, port: u16, inode: u64) -> FdInfo {
        FdInfo {
            fd,
            cloexec: false,
            flags: 0,
            shared_with: None,
            kind: FdKind::TcpListener {
                local: format!("127.0.0.1:{port}"),
                inode,
                backlog: 128,
                reuseaddr: true,
                reuseport: true,
                v6only: false,
                options: Vec::new(),
                owner_uid: Some(0),
            },
        }
    }

    fn socket() -> (OwnedFd, u64) {
        let socket = OwnedFd::from(TcpListener::bind("127.0.0.1:0").expect("a listener"));
        let inode = nix::sys::stat::fstat(&socket).expect("fstat").st_ino;
        (socket, inode)
    }

    fn placed(manifest: &Manifest, held: Vec<OwnedFd>) -> Vec<(i32, i32, u64)> {
        place_listeners(manifest, 80, held)
            .expect("placed")
            .into_iter()
            .map(|(pid, fd, socket)| (pid, fd, nix::sys::stat::fstat(&socket).unwrap().st_ino))
            .collect()
    }

    /// Held sockets go to the descriptor the image recorded them at, in
    /// whichever process saved them, whatever order they are held in;
    /// listeners of other ports are left alone.
    #[test]
    fn each_held_socket_goes_to_its_own_descriptor() {
        let ((a, a_inode), (b, b_inode)) = (socket(), socket());
        let manifest = Manifest {
            process: ProcessInfo {
                pid: 10,
                ..ProcessInfo::default()
            },
            fds: vec![listener(3, 80, a_inode), listener(4, 8080, 99)],
            children: vec![ChildProcess {
                process: ProcessInfo {
                    pid: 11,
                    ..ProcessInfo::default()
                },
                fds: vec![listener(5, 80, b_inode)],
                ..ChildProcess::default()
            }],
            ..Manifest::default()
        };
        assert_eq!(
            placed(&manifest, vec![b, a]),
            [(11, 5, b_inode), (10, 3, a_inode)]
        );
    }

    /// A socket the image does not know (the agent opened it) takes the
    /// first listener of the port left over; a listener left without a
    /// socket is not placed (the restore creates it).
    #[test]
    fn unknown_sockets_take_the_listeners_left_in_order() {
        let ((a, a_inode), (fresh, fresh_inode)) = (socket(), socket());
        let manifest = Manifest {
            fds: vec![
                listener(7, 80, 1000),
                listener(4, 80, a_inode),
                listener(6, 80, 1001),
            ],
            ..Manifest::default()
        };
        assert_eq!(
            placed(&manifest, vec![fresh, a]),
            [(0, 4, a_inode), (0, 6, fresh_inode)]
        );
    }

    /// Two or more listeners of the port with `SO_REUSEPORT` and one owner
    /// make a group; one without the flag, or of another owner, none.
    #[test]
    fn a_group_is_listeners_of_one_owner_with_reuseport() {
        let image = |fds: Vec<FdInfo>| Manifest {
            fds,
            ..Manifest::default()
        };
        let of = |fd, uid| {
            let mut info = listener(fd, 80, 0);
            if let FdKind::TcpListener { owner_uid, .. } = &mut info.kind {
                *owner_uid = uid;
            }
            info
        };
        assert_eq!(
            reuseport_group_in_image(&image(vec![of(3, Some(33)), of(4, Some(33))]), 80),
            Some((2, Some(33)))
        );
        assert_eq!(
            reuseport_group_in_image(&image(vec![of(3, Some(33))]), 80),
            None
        );
        assert_eq!(
            reuseport_group_in_image(&image(vec![of(3, Some(33)), of(4, Some(0))]), 80),
            None
        );
        let mut plain = of(4, Some(33));
        if let FdKind::TcpListener { reuseport, .. } = &mut plain.kind {
            *reuseport = false;
        }
        assert_eq!(
            reuseport_group_in_image(&image(vec![of(3, Some(33)), plain]), 80),
            None
        );
    }
    /// A process holds the port's listener when it has one of its own or
    /// shares one saved with an earlier process (nginx's workers share
    /// their master's); a helper that kept no listener (PostgreSQL's) or
    /// shares a listener of another port does not.
    #[test]
    fn the_holders_of_a_listener_are_found_through_inherited_descriptors() {
        let child = |pid, fds, inherited_fds| ChildProcess {
            ppid: 10,
            process: ProcessInfo {
                pid,
                ..ProcessInfo::default()
            },
            fds,
            inherited_fds,
            ..ChildProcess::default()
        };
        let inherits = |fd, from_fd| InheritedFd {
            fd,
            cloexec: false,
            from_pid: 10,
            from_fd,
        };
        let manifest = Manifest {
            process: ProcessInfo {
                pid: 10,
                ..ProcessInfo::default()
            },
            fds: vec![listener(6, 80, 1), listener(7, 8080, 2)],
            children: vec![
                child(11, Vec::new(), vec![inherits(6, 6)]),
                child(12, Vec::new(), vec![inherits(7, 7)]),
                child(13, vec![listener(5, 80, 3)], Vec::new()),
                child(14, Vec::new(), Vec::new()),
            ],
            ..Manifest::default()
        };
        assert_eq!(listener_holders_in_image(&manifest, 80), [0, 1, 3]);
        assert_eq!(listener_holders_in_image(&manifest, 8080), [0, 2]);
        assert!(listener_holders_in_image(&manifest, 443).is_empty());
    }
}
