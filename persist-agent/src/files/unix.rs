//! UNIX sockets: listeners (named or abstract) and connected pairs within
//! the process, with their queued data, both directions; the others
//! (unbound, bound, connected outside the process) are in `unix_socket.rs`.
//!
//! Saved: a listener's name, type, backlog and socket file mode and owner
//! (refused while clients wait to be accepted); a connected socket whose
//! peer is in the process and connected back to it, with what is queued for
//! reading on it (peeked, not consumed). Restored: a listener bound again
//! (its socket file made as the process, see `socket_file.rs`), a pair
//! re-created with `socketpair` and its queues refilled.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use nix::sys::socket::{AddressFamily, Shutdown, SockFlag, SockType, UnixAddr};
use persist_common::image::{FdInfo, FdKind, QueuedMessage};

use super::FilesError;
use super::inet::listen;
use super::listed::Listed;
use super::pipe::DEFAULT_PIPE_SIZE;
use super::recorded::PathAccess;
use super::socket_file::{self, Recorded};
use super::unix_socket;
use crate::sys::kobjects;
use crate::sys::sockdiag;

/// Largest datagram or stream chunk read in one peek.
const PEEK_BUFFER: usize = 1 << 20;

/// A UNIX socket's bound name: the path, `@name` for the abstract namespace,
/// or empty when unbound.
fn unix_name(sock: BorrowedFd<'_>) -> nix::Result<String> {
    let addr = nix::sys::socket::getsockname::<UnixAddr>(sock.as_raw_fd())?;
    Ok(unix_socket::address_name(&addr))
}

pub(super) fn save(
    pid: i32,
    fd: i32,
    sock: BorrowedFd<'_>,
    socket_type: i32,
    listening: bool,
    entry: &Listed,
    sockets: &HashSet<u64>,
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
        if diag.rqueue > 0 {
            return Err(FilesError::unsupported(
                fd,
                format!(
                    "UNIX listener {name} has clients waiting to be accepted ({}), \
                     who would be lost",
                    diag.rqueue
                ),
            ));
        }
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
    let Some(peer_inode) = diag
        .peer
        .filter(|&peer| pair_in_process(inode, peer, sockets))
    else {
        let name = if name.is_empty() || name.starts_with('@') {
            name
        } else {
            absolute_socket_path(pid, fd, name)?
        };
        return unix_socket::save(fd, sock, socket_type, name, &diag, entry);
    };
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
        shutdown: diag.shutdown,
    })
}

/// Whether the sockets with inodes `inode` and `peer` are both in the
/// process (or its tree: `sockets`) and connected to each other, so that `socketpair` re-creates
/// them. A datagram socket may be connected to one that is not connected
/// back: that one is restored on its own and connected again by name.
fn pair_in_process(inode: u64, peer: u64, sockets: &HashSet<u64>) -> bool {
    sockets.contains(&peer)
        && sockdiag::unix_socket(peer).is_ok_and(|diag| diag.peer == Some(inode))
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
                "UNIX socket bound to relative path {name}, which is not a socket under {}",
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

pub(super) fn unix_listener(
    fd: i32,
    path: &str,
    socket_type: i32,
    backlog: u32,
    file: Recorded,
    access: &PathAccess,
) -> Result<OwnedFd, FilesError> {
    let ty = SockType::try_from(socket_type)
        .map_err(|_| FilesError::invalid(fd, format!("bad UNIX socket type {socket_type}")))?;
    let sock =
        nix::sys::socket::socket(AddressFamily::Unix, ty, SockFlag::SOCK_CLOEXEC, None).map_err(
            FilesError::io(fd, format!("socket for UNIX listener {path}")),
        )?;
    if let Some(name) = path.strip_prefix('@') {
        let addr = UnixAddr::new_abstract(name.as_bytes())
            .map_err(FilesError::io(fd, format!("UNIX address {path}")))?;
        nix::sys::socket::bind(sock.as_raw_fd(), &addr)
            .map_err(FilesError::io(fd, format!("binding UNIX listener {path}")))?;
    } else {
        if path.is_empty() {
            return Err(FilesError::invalid(fd, "UNIX listener without an address"));
        }
        socket_file::bind(fd, &sock, path, &file, false, access)?;
    }
    listen(fd, &sock, backlog, path)?;
    Ok(sock)
}

/// UNIX socket pairs, re-created with `socketpair` when their first end is met.
pub(super) struct UnixPairs<'a> {
    saved: &'a [FdInfo],
    /// Socket inode to the new end waiting for its descriptor, and the fd
    /// that created it.
    waiting: HashMap<u64, (i32, OwnedFd)>,
}

impl<'a> UnixPairs<'a> {
    /// Pairs of the image `saved`.
    pub fn new(saved: &'a [FdInfo]) -> Self {
        Self {
            saved,
            waiting: HashMap::new(),
        }
    }

    /// The descriptor for one saved pair end.
    pub fn end(&mut self, info: &FdInfo) -> Result<OwnedFd, FilesError> {
        let fd = info.fd;
        let FdKind::UnixPair {
            inode,
            peer_inode,
            socket_type,
            queued,
            shutdown,
        } = &info.kind
        else {
            return Err(FilesError::invalid(fd, "not a socket pair"));
        };
        if let Some((_, end)) = self.waiting.remove(inode) {
            return Ok(end);
        }
        let peer = self.saved.iter().find_map(|p| match &p.kind {
            FdKind::UnixPair {
                inode: i,
                peer_inode: pi,
                socket_type: t,
                queued,
                shutdown,
            } if p.shared_with.is_none() && i == peer_inode => Some((pi, t, queued, shutdown)),
            _ => None,
        });
        let Some((back, peer_type, peer_queued, peer_shutdown)) = peer else {
            return Err(FilesError::invalid(
                fd,
                format!("peer socket inode {peer_inode} is not in the image"),
            ));
        };
        if back != inode || peer_type != socket_type {
            return Err(FilesError::invalid(
                fd,
                format!("peer socket inode {peer_inode} does not match"),
            ));
        }
        let ty = SockType::try_from(*socket_type)
            .map_err(|_| FilesError::invalid(fd, format!("bad UNIX socket type {socket_type}")))?;
        let (mine, theirs) =
            nix::sys::socket::socketpair(AddressFamily::Unix, ty, None, SockFlag::SOCK_CLOEXEC)
                .map_err(FilesError::io(fd, "socketpair"))?;
        // What was queued for reading on an end is sent from the other one.
        requeue(fd, theirs.as_fd(), queued)?;
        requeue(fd, mine.as_fd(), peer_queued)?;
        // Only now: a shut down end neither sends nor receives the queues.
        shut_down(fd, mine.as_fd(), *shutdown)?;
        shut_down(fd, theirs.as_fd(), *peer_shutdown)?;
        self.waiting.insert(*peer_inode, (fd, theirs));
        Ok(mine)
    }

    /// Fails if an end was created whose descriptor never came.
    pub fn finish(self) -> Result<(), FilesError> {
        match self.waiting.into_iter().next() {
            Some((inode, (fd, _))) => Err(FilesError::invalid(
                fd,
                format!("peer socket inode {inode} has no descriptor"),
            )),
            None => Ok(()),
        }
    }
}

/// Shuts `sock` down in the directions `flags` names (`sk_shutdown`: 1
/// receiving, 2 sending). On a stream pair the kernel mirrors each end's
/// shutdown on the other, so applying both ends' flags gives the same
/// state again.
pub(super) fn shut_down(fd: i32, sock: BorrowedFd<'_>, flags: u8) -> Result<(), FilesError> {
    let how = match flags & 3 {
        0 => return Ok(()),
        1 => Shutdown::Read,
        2 => Shutdown::Write,
        _ => Shutdown::Both,
    };
    nix::sys::socket::shutdown(sock.as_raw_fd(), how)
        .map_err(FilesError::io(fd, format!("shutdown {how:?}")))
}

/// Sends `queued` from `from`, message by message, without blocking.
fn requeue(fd: i32, from: BorrowedFd<'_>, queued: &[QueuedMessage]) -> Result<(), FilesError> {
    let total: usize = queued.iter().map(|m| m.data.len()).sum();
    if total > DEFAULT_PIPE_SIZE {
        // Stream data is charged to the sender's buffer.
        let size = i32::try_from(total.saturating_mul(2)).unwrap_or(i32::MAX);
        kobjects::set_sockopt_int(from, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, size)
            .map_err(FilesError::io(fd, "SO_SNDBUFFORCE for queued data"))?;
    }
    for message in queued {
        let mut rest = message.data.as_slice();
        loop {
            let sent = kobjects::send_nonblocking(from, rest).map_err(FilesError::io(
                fd,
                format!("re-queueing {} bytes on a socket pair", message.data.len()),
            ))?;
            rest = &rest[sent..];
            if rest.is_empty() {
                break;
            }
        }
    }
    Ok(())
}
