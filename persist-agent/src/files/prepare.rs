//! Re-creating the saved descriptors in the agent, before forking.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use nix::sys::socket::SockaddrStorage;
use persist_common::image::{FdInfo, FdKind};

use super::FilesError;
use super::install::{PreparedFds, ProcSelfFile, Slot, Watch};
use super::memfd::Memfds;
use super::pipe::Pipes;
use super::proc_self;
use super::recorded::PathAccess;
use super::socket_file::Recorded;
use super::timerfd::TimerfdArm;
use super::unix::UnixPairs;
use super::{
    epoll, eventfd, inet, inotify, memfd, regular, signalfd, tcp_repair, tcp_socket, timerfd, unix,
    unix_socket,
};

/// File status flags `F_SETFL` can change; the others are fixed at open.
const SETFL_MASK: i32 =
    libc::O_APPEND | libc::O_NONBLOCK | libc::O_ASYNC | libc::O_DIRECT | libc::O_NOATIME;

/// Descriptors the caller already holds and wants installed as they are,
/// by target descriptor number, instead of re-created objects.
///
/// The daemon hands over the original listening socket this way, so SYNs
/// queued while the service was parked are accepted by the restored process.
/// An inherited descriptor takes the image's close-on-exec bit and status
/// flags for its number (status flags belong to the open file description,
/// so they change for the caller's copy too); one for a number the image
/// does not have is installed as it is.
#[derive(Debug, Default)]
pub struct InheritedFds {
    fds: BTreeMap<RawFd, OwnedFd>,
    /// Numbers the image does not have that get close-on-exec.
    cloexec: HashSet<RawFd>,
}

impl InheritedFds {
    /// No inherited descriptors.
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs `fd` at number `target`; returns the one it replaces.
    pub fn insert(&mut self, target: RawFd, fd: OwnedFd) -> Option<OwnedFd> {
        self.fds.insert(target, fd)
    }

    /// Installs `fd` at number `target` with close-on-exec set, when the
    /// image has no such number (a descriptor another process of a tree
    /// saved); returns the one it replaces.
    pub fn insert_cloexec(&mut self, target: RawFd, fd: OwnedFd) -> Option<OwnedFd> {
        self.cloexec.insert(target);
        self.fds.insert(target, fd)
    }

    /// Adds every descriptor of `other`; on a number both have, `other`'s.
    pub fn append(&mut self, other: InheritedFds) {
        self.fds.extend(other.fds);
        self.cloexec.extend(other.cloexec);
    }

    /// Number of inherited descriptors.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }
}

/// Re-creates every descriptor of `fds` (from an image's manifest) in the
/// agent, ready to be installed in a forked child with
/// [`ChildFds::install_in_child`](super::ChildFds::install_in_child).
///
/// Runs before the fork, as ordinary code. Files are reopened with their
/// flags and offset (an unlinked file is re-created unlinked in its old
/// directory with its contents); pipes are refilled (an anonymous pipe end
/// whose other end was outside the process gets a fresh pipe: a read end
/// reads the saved data then end-of-file, a write end writes to /dev/null);
/// FIFOs are reopened by path and refilled; eventfd, timerfd (unarmed: see
/// [`PreparedFds::take_timerfds`]), signalfd and memfd (name, size,
/// contents, seals) are rebuilt; inotify instances get their watches again,
/// each with its watch descriptor, on the file its path names if that is
/// still the recorded one; TCP listeners are bound again with `SO_REUSEADDR`
/// to the same address and listen; other TCP sockets get their options and
/// are bound again if they were; UDP sockets are bound and connected again;
/// UNIX sockets are bound again (a stale socket file of the process's is
/// replaced, see `socket_file.rs`) and listen, or connect again by name to a
/// peer outside the process once every socket is bound; socket pairs are
/// re-created with their queued data; established TCP connections are
/// re-created with `TCP_REPAIR` in their saved state, and leave repair mode
/// once everything else is ready; epoll instances are created empty and
/// filled in the child. A terminal that no longer exists (or cannot be
/// opened from the agent, like `/dev/tty`) is replaced by /dev/null.
///
/// Paths (files, devices, FIFOs, the directories of unlinked files and of
/// UNIX sockets) are opened with `access`: the restored process's
/// credentials, no symlinks followed, and a file that is not the one
/// recorded refused unless `access` accepts changed files.
///
/// `inherited` descriptors are used as they are for their numbers; a TCP
/// listener must be bound to the saved address. Errors name the descriptor
/// and the path or address.
pub fn prepare(
    fds: &[FdInfo],
    inherited: InheritedFds,
    access: &PathAccess,
) -> Result<PreparedFds, FilesError> {
    validate(fds)?;
    let inherited_cloexec = inherited.cloexec;
    let mut inherited = inherited.fds;
    let mut pipes = Pipes::new(fds);
    let mut pairs = UnixPairs::new(fds);
    let mut created_memfds = Memfds::default();
    let mut objects: Vec<OwnedFd> = Vec::with_capacity(fds.len() + inherited.len());
    let mut slots = Vec::with_capacity(fds.len() + inherited.len());
    let mut memfds = Vec::new();
    let mut sources: HashMap<i32, RawFd> = HashMap::new();
    let mut proc_self_files: Vec<ProcSelfFile> = Vec::new();
    let mut connections = Vec::new();
    let mut timerfds = Vec::new();

    for info in fds {
        if !inherited.contains_key(&info.fd) && opened_by_child(info, &mut proc_self_files)? {
            continue;
        }
        let source = match (inherited.remove(&info.fd), info.shared_with) {
            (Some(fd), _) => {
                check_inherited(info, &fd)?;
                fd
            }
            (None, Some(primary)) => {
                let raw = sources.get(&primary).copied();
                let original = objects
                    .iter()
                    .find(|o| Some(o.as_raw_fd()) == raw)
                    .map(|o| o.as_fd());
                original
                    .ok_or_else(|| {
                        FilesError::invalid(
                            info.fd,
                            format!("shares fd {primary}, which is missing"),
                        )
                    })?
                    .try_clone_to_owned()
                    .map_err(FilesError::io(info.fd, format!("duplicating fd {primary}")))?
            }
            (None, None) => {
                let created = object(
                    info,
                    &mut pipes,
                    &mut pairs,
                    &mut created_memfds,
                    &mut timerfds,
                    access,
                )?;
                if let FdKind::TcpConnection(saved) = &info.kind {
                    connections.push((info.fd, created.as_raw_fd(), saved));
                }
                created
            }
        };
        sources.insert(info.fd, source.as_raw_fd());
        slots.push(Slot {
            target: info.fd,
            source: source.as_raw_fd(),
            cloexec: info.cloexec,
            status_flags: Some(info.flags as i32 & SETFL_MASK),
        });
        objects.push(source);
    }
    pairs.finish()?;
    connect_unix_sockets(fds, &objects, &sources, access)?;
    drop(pipes);
    // Last, once every other object exists: a connection still in repair
    // mode when a failure drops it closes without a word to the peer.
    for (fd, raw, saved) in connections {
        if let Some(sock) = objects.iter().find(|o| o.as_raw_fd() == raw) {
            tcp_repair::finish(fd, sock.as_fd(), saved)?;
        }
    }
    for (inode, base) in created_memfds.into_bases() {
        memfds.push((inode, base.as_raw_fd()));
        objects.push(base);
    }

    for (target, fd) in inherited {
        slots.push(Slot {
            target,
            source: fd.as_raw_fd(),
            cloexec: inherited_cloexec.contains(&target),
            status_flags: None,
        });
        objects.push(fd);
    }

    // Where install_in_child stages each target's object: the slots in
    // order, then the process's own /proc files.
    let staged_at = |target: RawFd| {
        slots.iter().position(|s| s.target == target).or_else(|| {
            proc_self_files
                .iter()
                .position(|f| f.targets.iter().any(|t| t.0 == target))
                .map(|index| slots.len() + index)
        })
    };
    let mut watches = Vec::new();
    for info in fds {
        if let FdKind::Epoll { watches: saved } = &info.kind {
            if info.shared_with.is_some() {
                continue; // the same instance, filled through its primary
            }
            let epoll = staged_at(info.fd)
                .ok_or_else(|| FilesError::invalid(info.fd, "epoll instance not prepared"))?;
            for watch in saved {
                let holder = watch.file_fd.unwrap_or(watch.fd);
                let file = staged_at(holder).ok_or_else(|| {
                    FilesError::invalid(
                        info.fd,
                        format!("epoll watches fd {holder}, which is not in the image"),
                    )
                })?;
                if !(0..FD_LIMIT).contains(&watch.fd) {
                    return Err(FilesError::invalid(
                        info.fd,
                        format!("epoll watches fd {}, which no process can have", watch.fd),
                    ));
                }
                watches.push(Watch {
                    epoll,
                    file,
                    fd: watch.fd,
                    events: watch.events,
                    data: watch.data,
                });
            }
        }
    }

    Ok(PreparedFds {
        objects,
        slots,
        watches,
        own_proc: super::install::encode_own_proc(&proc_self_files),
        proc_self_files,
        memfds,
        timerfds,
    })
}

/// Connects the UNIX sockets that had a peer outside the process (or one
/// not connected back) to it again, once every socket of the process is
/// bound: the peer may be one of them.
fn connect_unix_sockets(
    fds: &[FdInfo],
    objects: &[OwnedFd],
    sources: &HashMap<i32, RawFd>,
    access: &PathAccess,
) -> Result<(), FilesError> {
    for info in fds.iter().filter(|info| info.shared_with.is_none()) {
        let FdKind::UnixSocket(saved) = &info.kind else {
            continue;
        };
        let Some(peer) = &saved.peer else {
            continue;
        };
        let raw = sources.get(&info.fd).copied();
        let sock = objects
            .iter()
            .find(|o| Some(o.as_raw_fd()) == raw)
            .ok_or_else(|| FilesError::invalid(info.fd, "UNIX socket was not re-created"))?;
        unix_socket::connect(info.fd, sock.as_fd(), saved, peer, access)?;
    }
    Ok(())
}

/// Adds `info` to the files the child opens itself when it names the
/// process's own `/proc` entries (or shares such a file); returns whether
/// it did.
fn opened_by_child(info: &FdInfo, files: &mut Vec<ProcSelfFile>) -> Result<bool, FilesError> {
    if let Some(primary) = info.shared_with {
        let shared = files
            .iter_mut()
            .find(|file| file.targets.first().is_some_and(|&(fd, _)| fd == primary));
        return Ok(match shared {
            Some(file) => {
                file.targets.push((info.fd, info.cloexec));
                true
            }
            None => false,
        });
    }
    let FdKind::File {
        path,
        offset,
        unlinked: false,
        ..
    } = &info.kind
    else {
        return Ok(false);
    };
    Ok(match proc_self::child_open(info, path, *offset)? {
        Some(file) => {
            files.push(file);
            true
        }
        None => false,
    })
}

/// Above the kernel's ceiling for `fs.nr_open` (`INT_MAX` rounded down to
/// a multiple of 64): no process has a descriptor this high, and numbers
/// below it leave room to count up without overflow.
const FD_LIMIT: RawFd = i32::MAX - 63;

/// Checks numbers are unique and in range and `shared_with` points back.
fn validate(fds: &[FdInfo]) -> Result<(), FilesError> {
    let mut seen = HashSet::new();
    for info in fds {
        if !(0..FD_LIMIT).contains(&info.fd) || !seen.insert(info.fd) {
            return Err(FilesError::invalid(
                info.fd,
                "negative, too high or repeated descriptor number",
            ));
        }
        if let Some(primary) = info.shared_with {
            let ok = fds
                .iter()
                .any(|p| p.fd == primary && p.shared_with.is_none() && p.fd < info.fd);
            if !ok {
                return Err(FilesError::invalid(
                    info.fd,
                    format!("shares fd {primary}, which is not a lower primary"),
                ));
            }
        }
    }
    Ok(())
}

/// An inherited TCP listener must be bound to the address in the image.
fn check_inherited(info: &FdInfo, fd: &OwnedFd) -> Result<(), FilesError> {
    let FdKind::TcpListener { local, .. } = &info.kind else {
        return Ok(());
    };
    let bound = nix::sys::socket::getsockname::<SockaddrStorage>(fd.as_raw_fd()).map_err(
        FilesError::io(info.fd, "getsockname of the inherited socket"),
    )?;
    let bound: Option<SocketAddr> = bound
        .as_sockaddr_in()
        .map(|a| SocketAddr::V4((*a).into()))
        .or_else(|| bound.as_sockaddr_in6().map(|a| SocketAddr::V6((*a).into())));
    let saved: Option<SocketAddr> = local.parse().ok();
    if bound.is_none() || bound != saved {
        let shown = bound.map_or_else(|| "a non-IP address".to_owned(), |a| a.to_string());
        return Err(FilesError::invalid(
            info.fd,
            format!("inherited socket is bound to {shown}, the image has {local}"),
        ));
    }
    Ok(())
}

/// Re-creates the object for `info` (which is not a `shared_with` copy).
fn object(
    info: &FdInfo,
    pipes: &mut Pipes<'_>,
    pairs: &mut UnixPairs<'_>,
    memfds: &mut Memfds,
    timerfds: &mut Vec<TimerfdArm>,
    access: &PathAccess,
) -> Result<OwnedFd, FilesError> {
    let fd = info.fd;
    Ok(match &info.kind {
        FdKind::File {
            path,
            offset,
            unlinked,
            contents,
            identity,
        } => {
            let saved = regular::SavedFile {
                path,
                offset: *offset,
                unlinked: *unlinked,
                contents,
                identity: identity.as_ref(),
            };
            regular::file(info, &saved, access)?
        }
        FdKind::Device { path, identity } => {
            regular::device(info, path, identity.as_ref(), access)?
        }
        FdKind::Pipe {
            inode,
            fifo_path,
            fifo_identity,
            ..
        } => {
            let fifo = fifo_path
                .as_deref()
                .map(|path| (path, fifo_identity.as_ref()));
            pipes.end(info, *inode, fifo, access)?
        }
        FdKind::Eventfd { count, semaphore } => eventfd::create(fd, *count, *semaphore)?,
        FdKind::Timerfd {
            clock,
            settime_flags,
            interval_ns,
            value_ns,
            ticks,
        } => {
            let (timer, arm) =
                timerfd::create(fd, *clock, *settime_flags, *interval_ns, *value_ns, *ticks)?;
            timerfds.push(arm);
            timer
        }
        FdKind::Signalfd { mask } => signalfd::create(fd, *mask)?,
        FdKind::Epoll { .. } => epoll::create(fd)?,
        FdKind::Inotify { watches } => inotify::create(fd, watches, access)?,
        FdKind::Memfd {
            name,
            offset,
            size,
            seals,
            contents,
            inode,
        } => memfd::memfd(info, memfds, *inode, name, *offset, *size, *seals, contents)?,
        FdKind::TcpListener {
            local,
            backlog,
            reuseport,
            v6only,
            options,
            owner_uid,
            ..
        } => inet::tcp_listener(
            fd, local, *backlog, *reuseport, *v6only, options, *owner_uid,
        )?,
        FdKind::UdpSocket {
            local,
            peer,
            reuseaddr,
            reuseport,
            v6only,
            options,
        } => inet::udp_socket(
            fd,
            local,
            peer.as_deref(),
            *reuseaddr,
            *reuseport,
            *v6only,
            options,
        )?,
        FdKind::TcpSocket(saved) => tcp_socket::create(fd, saved)?,
        FdKind::UnixListener {
            path,
            socket_type,
            backlog,
            mode,
            owner,
        } => {
            let file = Recorded {
                mode: *mode,
                owner: *owner,
            };
            unix::unix_listener(fd, path, *socket_type, *backlog, file, access)?
        }
        FdKind::UnixPair { .. } => pairs.end(info)?,
        FdKind::TcpConnection(saved) => tcp_repair::create(fd, saved)?,
        FdKind::UnixSocket(saved) => unix_socket::create(fd, saved, access)?,
    })
}
