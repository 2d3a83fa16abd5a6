//! Saving sockets: TCP and UNIX listeners, UNIX socket pairs; refusing the rest.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use nix::sys::socket::{SockaddrStorage, UnixAddr};
use persist_common::image::{FdKind, QueuedMessage, SocketOption};

use super::FilesError;
use super::save::Listed;
use crate::sys::pidfd::PidFd;
use crate::sys::{kobjects, sockdiag};

/// `TCP_ESTABLISHED` .. `TCP_CLOSING` names, indexed by `tcpi_state`.
const TCP_STATES: [&str; 13] = [
    "unknown",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

/// Integer options of a TCP listener worth keeping: accepted connections
/// inherit the first five; the last two change how it accepts.
const LISTENER_OPTIONS: [(i32, i32, &str); 7] = [
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE, "SO_KEEPALIVE"),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY, "TCP_NODELAY"),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, "TCP_KEEPIDLE"),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, "TCP_KEEPINTVL"),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, "TCP_KEEPCNT"),
    (
        libc::IPPROTO_TCP,
        libc::TCP_DEFER_ACCEPT,
        "TCP_DEFER_ACCEPT",
    ),
    (libc::IPPROTO_TCP, libc::TCP_FASTOPEN, "TCP_FASTOPEN"),
];

/// Largest datagram or stream chunk read in one peek.
const PEEK_BUFFER: usize = 1 << 20;

/// Saves the socket behind `entry`, duplicated into the agent to query it.
pub(super) fn save_socket(
    pid: i32,
    pidfd: &PidFd,
    entry: &Listed,
    listed: &[Listed],
) -> Result<FdKind, FilesError> {
    let fd = entry.fd;
    let sock = pidfd
        .get_fd(fd)
        .map_err(FilesError::io(fd, "pidfd_getfd"))?;
    let int = |name, what: &str| {
        kobjects::sockopt_int(sock.as_fd(), libc::SOL_SOCKET, name)
            .map_err(FilesError::io(fd, format!("getsockopt {what}")))
    };
    let domain = int(libc::SO_DOMAIN, "SO_DOMAIN")?;
    let socket_type = int(libc::SO_TYPE, "SO_TYPE")?;
    let listening = int(libc::SO_ACCEPTCONN, "SO_ACCEPTCONN")? != 0;
    match domain {
        libc::AF_INET | libc::AF_INET6 => {
            let protocol = int(libc::SO_PROTOCOL, "SO_PROTOCOL")?;
            inet(
                fd,
                sock.as_fd(),
                domain,
                socket_type,
                protocol,
                listening,
                entry.info.ino,
            )
        }
        libc::AF_UNIX => unix(pid, fd, sock.as_fd(), socket_type, listening, entry, listed),
        libc::AF_NETLINK => Err(FilesError::unsupported(
            fd,
            "netlink socket is not supported",
        )),
        libc::AF_PACKET => Err(FilesError::unsupported(
            fd,
            "packet socket is not supported",
        )),
        other => Err(FilesError::unsupported(
            fd,
            format!("socket of address family {other} is not supported"),
        )),
    }
}

fn inet_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6((*v6).into()))
}

fn inet(
    fd: i32,
    sock: BorrowedFd<'_>,
    domain: i32,
    socket_type: i32,
    protocol: i32,
    listening: bool,
    inode: u64,
) -> Result<FdKind, FilesError> {
    let local = nix::sys::socket::getsockname::<SockaddrStorage>(sock.as_raw_fd())
        .map_err(FilesError::io(fd, "getsockname"))?;
    let local = inet_addr(&local).map_or_else(|| "?".to_owned(), |a| a.to_string());
    let flag = |level, name, what: &str| {
        kobjects::sockopt_int(sock, level, name)
            .map(|v| v != 0)
            .map_err(FilesError::io(fd, format!("getsockopt {what}")))
    };
    let v6only =
        domain == libc::AF_INET6 && flag(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, "IPV6_V6ONLY")?;
    match (socket_type, protocol) {
        (libc::SOCK_STREAM, libc::IPPROTO_TCP) => {}
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => {
            let peer = nix::sys::socket::getpeername::<SockaddrStorage>(sock.as_raw_fd())
                .ok()
                .and_then(|p| inet_addr(&p))
                .map(|p| p.to_string());
            return Ok(FdKind::UdpSocket {
                local,
                peer,
                reuseaddr: flag(libc::SOL_SOCKET, libc::SO_REUSEADDR, "SO_REUSEADDR")?,
                reuseport: flag(libc::SOL_SOCKET, libc::SO_REUSEPORT, "SO_REUSEPORT")?,
                v6only,
            });
        }
        (libc::SOCK_RAW, _) => {
            return Err(FilesError::unsupported(
                fd,
                format!("raw IP socket {local} is not supported"),
            ));
        }
        _ => {
            return Err(FilesError::unsupported(
                fd,
                format!(
                    "IP socket {local} of type {socket_type}, protocol {protocol} is not supported"
                ),
            ));
        }
    }
    let (state, max_backlog) =
        kobjects::tcp_state(sock).map_err(FilesError::io(fd, "getsockopt TCP_INFO"))?;
    if !listening {
        let state_name = TCP_STATES
            .get(usize::from(state))
            .copied()
            .unwrap_or("unknown");
        let peer = nix::sys::socket::getpeername::<SockaddrStorage>(sock.as_raw_fd())
            .ok()
            .and_then(|p| inet_addr(&p));
        return Err(FilesError::unsupported(
            fd,
            match (state_name, peer) {
                ("ESTABLISHED", Some(peer)) => {
                    format!("established TCP connection {local} -> {peer} cannot be checkpointed")
                }
                (_, Some(peer)) => format!(
                    "TCP connection {local} -> {peer} in state {state_name} cannot be checkpointed"
                ),
                (_, None) => {
                    format!("TCP socket {local} in state {state_name} cannot be checkpointed")
                }
            },
        ));
    }
    let reuseaddr = flag(libc::SOL_SOCKET, libc::SO_REUSEADDR, "SO_REUSEADDR")?;
    let reuseport = flag(libc::SOL_SOCKET, libc::SO_REUSEPORT, "SO_REUSEPORT")?;
    // TCP_INFO reports sk_max_ack_backlog for listeners; 0 would be odd but
    // harmless, so fall back to the system maximum.
    let backlog = if max_backlog == 0 {
        libc::SOMAXCONN as u32
    } else {
        max_backlog
    };
    let mut options = Vec::new();
    for (level, name, what) in LISTENER_OPTIONS {
        let value = kobjects::sockopt_int(sock, level, name)
            .map_err(FilesError::io(fd, format!("getsockopt {what}")))?;
        if value != 0 {
            options.push(SocketOption { level, name, value });
        }
    }
    Ok(FdKind::TcpListener {
        local,
        inode,
        backlog,
        reuseaddr,
        reuseport,
        v6only,
        options,
    })
}

/// A UNIX socket's bound name: the path, `@name` for the abstract namespace,
/// or empty when unbound.
fn unix_name(sock: BorrowedFd<'_>) -> nix::Result<String> {
    let addr = nix::sys::socket::getsockname::<UnixAddr>(sock.as_raw_fd())?;
    Ok(if let Some(path) = addr.path() {
        path.to_string_lossy().into_owned()
    } else if let Some(name) = addr.as_abstract() {
        format!("@{}", String::from_utf8_lossy(name))
    } else {
        String::new()
    })
}

fn unix(
    pid: i32,
    fd: i32,
    sock: BorrowedFd<'_>,
    socket_type: i32,
    listening: bool,
    entry: &Listed,
    listed: &[Listed],
) -> Result<FdKind, FilesError> {
    let inode = entry.info.ino;
    let name = unix_name(sock).map_err(FilesError::io(fd, "getsockname"))?;
    let diag = sockdiag::unix_socket(inode).map_err(FilesError::io(
        fd,
        format!("sock_diag of UNIX socket inode {inode}"),
    ))?;
    if listening {
        if name.is_empty() {
            return Err(FilesError::unsupported(
                fd,
                "unbound listening UNIX socket is not supported",
            ));
        }
        let name = absolute_socket_path(pid, fd, name)?;
        let backlog = if diag.wqueue == 0 {
            libc::SOMAXCONN as u32
        } else {
            diag.wqueue
        };
        // Who may connect is decided by the socket file's mode and owner.
        let file = (!name.starts_with('@'))
            .then(|| std::fs::symlink_metadata(&name).ok())
            .flatten()
            .filter(|m| m.file_type().is_socket());
        return Ok(FdKind::UnixListener {
            mode: file.as_ref().map(|m| m.mode() & 0o7777),
            owner: file.as_ref().map(|m| (m.uid(), m.gid())),
            path: name,
            socket_type,
            backlog,
        });
    }
    let shown = if name.is_empty() {
        String::new()
    } else {
        format!(" {name}")
    };
    let Some(peer_inode) = diag.peer else {
        return Err(FilesError::unsupported(
            fd,
            format!("unconnected UNIX socket{shown} is not supported"),
        ));
    };
    let peer_in_process = listed
        .iter()
        .any(|o| o.info.ino == peer_inode && o.target.starts_with("socket:["));
    if !peer_in_process {
        return Err(FilesError::unsupported(
            fd,
            format!(
                "UNIX socket{shown} connected to a peer outside the process (socket inode {peer_inode}) cannot be checkpointed"
            ),
        ));
    }
    if entry.info.scm_fds() > 0 {
        return Err(FilesError::unsupported(
            fd,
            "UNIX socket with file descriptors in flight is not supported",
        ));
    }
    let queued = peek_queue(fd, sock, socket_type)?;
    Ok(FdKind::UnixPair {
        inode,
        peer_inode,
        socket_type,
        queued,
    })
}

/// A socket bound to a relative path is named relative to the working
/// directory it had then; the process's current one is the best guess, and
/// is kept only if a socket file is found there.
fn absolute_socket_path(pid: i32, fd: i32, name: String) -> Result<String, FilesError> {
    if name.starts_with('/') || name.starts_with('@') {
        return Ok(name);
    }
    let cwd_link = format!("/proc/{pid}/cwd");
    let cwd = std::fs::read_link(&cwd_link).map_err(|source| FilesError::Proc {
        pid,
        path: cwd_link,
        source,
    })?;
    let path = cwd.join(&name);
    let is_socket = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket());
    if !is_socket {
        return Err(FilesError::unsupported(
            fd,
            format!(
                "UNIX listener bound to relative path {name}, which is not a socket under {}",
                cwd.display()
            ),
        ));
    }
    Ok(path.to_string_lossy().into_owned())
}

/// Reads everything queued for reading on `sock` without consuming it:
/// `SO_PEEK_OFF` makes each `MSG_PEEK` continue where the last one ended,
/// so stream data comes in chunks and datagrams one by one. The socket's
/// own peek offset is put back afterwards.
fn peek_queue(
    fd: i32,
    sock: BorrowedFd<'_>,
    socket_type: i32,
) -> Result<Vec<QueuedMessage>, FilesError> {
    let old = kobjects::sockopt_int(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF)
        .map_err(FilesError::io(fd, "getsockopt SO_PEEK_OFF"))?;
    kobjects::set_sockopt_int(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0)
        .map_err(FilesError::io(fd, "setsockopt SO_PEEK_OFF"))?;
    let result = peek_all(fd, sock, socket_type);
    kobjects::set_sockopt_int(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF, old)
        .map_err(FilesError::io(fd, "restoring SO_PEEK_OFF"))?;
    result
}

fn peek_all(
    fd: i32,
    sock: BorrowedFd<'_>,
    socket_type: i32,
) -> Result<Vec<QueuedMessage>, FilesError> {
    let stream = socket_type == libc::SOCK_STREAM;
    let mut buf = vec![0u8; PEEK_BUFFER];
    let mut queued: Vec<QueuedMessage> = Vec::new();
    let mut stream_data = Vec::new();
    loop {
        // MSG_TRUNC makes a datagram peek report the full length; on a
        // stream it would mean "discard", so it is only used on messages.
        let extra = if stream { 0 } else { libc::MSG_TRUNC };
        let Some(n) =
            kobjects::peek(sock, &mut buf, extra).map_err(FilesError::io(fd, "recv MSG_PEEK"))?
        else {
            break;
        };
        if stream {
            if n == 0 {
                break; // the peer shut down its sending side
            }
            stream_data.extend_from_slice(&buf[..n]);
        } else {
            if n > buf.len() {
                return Err(FilesError::unsupported(
                    fd,
                    format!("queued message of {n} bytes is too large"),
                ));
            }
            if n == 0 {
                // A zero-length message does not move the peek offset.
                return Err(FilesError::unsupported(
                    fd,
                    "zero-length queued message is not supported",
                ));
            }
            queued.push(QueuedMessage {
                data: buf[..n].to_vec(),
            });
        }
    }
    if stream && !stream_data.is_empty() {
        queued.push(QueuedMessage { data: stream_data });
    }
    Ok(queued)
}
