//! UNIX sockets (stream, datagram, seqpacket) that neither listen nor are
//! paired with another socket of the process: unbound, bound to a path or an
//! abstract name, or connected to a named socket outside the process (a
//! datagram socket connected to `/dev/log`, a stream connection to another
//! daemon's socket).
//!
//! Saved: type, bound name (and its socket file's mode and owner), the name of the peer, and the options of [`super::sockopts`].
//! Restored: a new socket bound to the same name (see `socket_file.rs` for
//! the socket file), then, once every socket of the process exists,
//! connected again to the peer's name. The peer sees a new connection, as
//! if the process had reconnected: a stream peer's old connection ends
//! (end-of-file) when the checkpointed process dies.
//!
//! Refused, naming the descriptor: a connection whose peer is gone (its
//! name no longer names a socket, or the peer closed its end), a peer with
//! no name (nothing to connect to again), data queued for reading (it came
//! from a peer that cannot send it again) and descriptors in flight.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr};
use persist_common::image::{FdKind, SocketFile, UnixSocket};

use super::FilesError;
use super::listed::Listed;
use super::recorded::PathAccess;
use super::socket_file::{self, Recorded};
use super::sockopts::{self, Protocol};
use super::unix::shut_down;
use crate::sys::sockdiag::UnixDiag;

/// What the process's socket is, for messages: "UNIX datagram socket @x".
fn describe(socket_type: i32, name: &str) -> String {
    let kind = match socket_type {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "datagram",
        libc::SOCK_SEQPACKET => "seqpacket",
        _ => "",
    };
    let mut text = format!("UNIX {kind} socket");
    if !name.is_empty() {
        text.push(' ');
        text.push_str(name);
    }
    text
}

/// A UNIX socket address as a name: the path, `@name` for the abstract
/// namespace, empty when unnamed.
pub(super) fn address_name(addr: &UnixAddr) -> String {
    if let Some(path) = addr.path() {
        path.to_string_lossy().into_owned()
    } else if let Some(name) = addr.as_abstract() {
        format!("@{}", String::from_utf8_lossy(name))
    } else {
        String::new()
    }
}

/// The socket file `path` names now, if it is the one the socket is bound
/// to (`diag.file`), with its mode and owner.
fn bound_file(path: &str, diag: &UnixDiag) -> Option<SocketFile> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_socket() || diag.file != Some((meta.dev(), meta.ino())) {
        return None;
    }
    Some(SocketFile {
        mode: meta.mode() & 0o7777,
        owner: (meta.uid(), meta.gid()),
    })
}

/// Saves `sock`, the process's `fd`, bound to `name` (absolute, `@name` or
/// empty), which is not listening and has no peer inside the process.
pub(super) fn save(
    fd: i32,
    sock: BorrowedFd<'_>,
    socket_type: i32,
    name: String,
    diag: &UnixDiag,
    entry: &Listed,
) -> Result<FdKind, FilesError> {
    let shown = describe(socket_type, &name);
    let peer = match diag.peer {
        None => None,
        Some(0) => {
            return Err(FilesError::unsupported(
                fd,
                format!("{shown} whose peer has closed its end cannot be checkpointed"),
            ));
        }
        Some(peer_inode) => Some(peer_name(fd, sock, &shown, peer_inode)?),
    };
    if diag.rqueue > 0 {
        let from = peer
            .as_deref()
            .map_or_else(String::new, |p| format!(" from {p}"));
        return Err(FilesError::unsupported(
            fd,
            format!(
                "{shown} has data{from} queued for reading, which a new socket cannot get back"
            ),
        ));
    }
    if entry.info.scm_fds() > 0 {
        return Err(FilesError::unsupported(
            fd,
            format!("{shown} has file descriptors in flight, which is not supported"),
        ));
    }
    let file = (name.starts_with('/'))
        .then(|| bound_file(&name, diag))
        .flatten();
    Ok(FdKind::UnixSocket(UnixSocket {
        socket_type,
        name,
        file,
        peer,
        options: sockopts::save(fd, sock, Protocol::Unix)?,
        shutdown: diag.shutdown,
    }))
}

/// The name of the connected peer, checked to still name a socket: the
/// path of a socket file, or an abstract name some socket is bound to.
fn peer_name(
    fd: i32,
    sock: BorrowedFd<'_>,
    shown: &str,
    peer_inode: u64,
) -> Result<String, FilesError> {
    let addr = nix::sys::socket::getpeername::<UnixAddr>(sock.as_raw_fd())
        .map_err(FilesError::io(fd, "getpeername"))?;
    let peer = address_name(&addr);
    if peer.is_empty() {
        return Err(FilesError::unsupported(
            fd,
            format!(
                "{shown} is connected to an unnamed socket outside the process (socket inode \
                 {peer_inode}): there is nothing to connect to again"
            ),
        ));
    }
    let alive = if peer.starts_with('@') {
        procfs::net::unix().is_ok_and(|sockets| {
            sockets
                .iter()
                .any(|s| s.path.as_deref() == Some(Path::new(&peer)))
        })
    } else {
        std::fs::symlink_metadata(&peer).is_ok_and(|m| m.file_type().is_socket())
    };
    if !alive {
        return Err(FilesError::unsupported(
            fd,
            format!(
                "{shown} is connected to {peer}, which is gone (socket inode {peer_inode}): \
                 there is nothing to connect to again"
            ),
        ));
    }
    Ok(peer)
}

/// A new socket like `saved`, bound to its name; [`connect`] connects it
/// once every socket of the process exists (its peer may be one of them).
pub(super) fn create(
    fd: i32,
    saved: &UnixSocket,
    access: &PathAccess,
) -> Result<OwnedFd, FilesError> {
    let shown = describe(saved.socket_type, &saved.name);
    let ty = SockType::try_from(saved.socket_type).map_err(|_| {
        FilesError::invalid(fd, format!("bad UNIX socket type {}", saved.socket_type))
    })?;
    // Non-blocking, so that a connect to a full backlog fails instead of
    // hanging the restore; the saved status flags are set at install.
    let sock = nix::sys::socket::socket(
        AddressFamily::Unix,
        ty,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(FilesError::io(fd, format!("socket for {shown}")))?;
    sockopts::restore(fd, sock.as_fd(), &saved.options, None, &shown)?;
    let name = saved.name.as_str();
    if let Some(abstract_name) = name.strip_prefix('@') {
        bind_abstract(fd, &sock, abstract_name, &shown)?;
    } else if !name.is_empty() {
        let recorded = Recorded {
            mode: saved.file.map(|f| f.mode),
            owner: saved.file.map(|f| f.owner),
        };
        socket_file::bind(fd, &sock, name, &recorded, saved.file.is_none(), access)?;
    }
    if saved.peer.is_none() {
        shut_down(fd, sock.as_fd(), saved.shutdown)?;
    }
    Ok(sock)
}

/// Binds `sock` to the abstract name `name`. A name the kernel chose
/// itself (autobind: five hex digits, given to a socket that needed a name
/// to send credentials or to connect) may belong to another socket by now;
/// any name the kernel chooses then does as well, as nothing but this
/// socket's own peers learnt it.
fn bind_abstract(fd: i32, sock: &OwnedFd, name: &str, shown: &str) -> Result<(), FilesError> {
    let addr = UnixAddr::new_abstract(name.as_bytes())
        .map_err(FilesError::io(fd, format!("UNIX address @{name}")))?;
    match nix::sys::socket::bind(sock.as_raw_fd(), &addr) {
        Err(nix::errno::Errno::EADDRINUSE) if is_autobind_name(name) => {
            nix::sys::socket::bind(sock.as_raw_fd(), &UnixAddr::new_unnamed())
                .map_err(FilesError::io(fd, format!("autobinding {shown}")))
        }
        result => result.map_err(FilesError::io(fd, format!("binding {shown}"))),
    }
}

/// Whether `name` has the form of the abstract names the kernel picks
/// (`%05x` in `unix_autobind`).
fn is_autobind_name(name: &str) -> bool {
    name.len() == 5
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Connects `sock`, re-created for `fd`, to `peer` again, with the restored
/// process's file-system credentials (connecting needs write access to the
/// peer's socket file), then shuts it down as `saved` was.
pub(super) fn connect(
    fd: i32,
    sock: BorrowedFd<'_>,
    saved: &UnixSocket,
    peer: &str,
    access: &PathAccess,
) -> Result<(), FilesError> {
    let addr = match peer.strip_prefix('@') {
        Some(name) => UnixAddr::new_abstract(name.as_bytes()),
        None => UnixAddr::new(peer),
    }
    .map_err(FilesError::io(fd, format!("UNIX address {peer}")))?;
    let _creds = access
        .assume()
        .map_err(FilesError::io(fd, "taking the process's credentials"))?;
    nix::sys::socket::connect(sock.as_raw_fd(), &addr).map_err(FilesError::io(
        fd,
        format!("connecting again to {peer}, the UNIX socket's peer at checkpoint"),
    ))?;
    shut_down(fd, sock, saved.shutdown)
}
