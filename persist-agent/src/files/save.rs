//! Saving a process's descriptors: listing, classifying, capturing contents.

use std::collections::HashSet;
use std::fs;
use std::os::fd::AsFd;

use persist_common::image::{FdInfo, FdKind, TcpConnection};

use super::FilesError;
use super::fdinfo::FdInfoText;
use super::listed::Listed;
use super::tcp_repair::{self, RepairedConnections};
use super::{epoll, eventfd, inet, inotify, memfd, pipe, regular, signalfd, timerfd, unix};
use crate::sys::kobjects;
use crate::sys::pidfd::PidFd;

/// Saves every open descriptor of process `pid`, which should be frozen
/// (ptrace-stopped) so that nothing changes while we look.
///
/// `pidfd` must name the same process; it is used to duplicate sockets and
/// memfds into the agent (`pidfd_getfd`) to query them. Nothing is consumed:
/// pipe data is copied with `tee(2)`, socket queues are read with `MSG_PEEK`.
///
/// Supported, as [`FdKind`]s:
/// - regular files (path, flags, offset) and directories; a file unlinked
///   while open is saved with its contents; the process's own `/proc` files
///   are saved as `/proc/self/...` (a file of another of its threads is
///   refused);
/// - character devices `/dev/null`, `/dev/zero`, `/dev/full`, `/dev/random`,
///   `/dev/urandom`, and terminals (`/dev/pts/N`, `/dev/ttyN`, `/dev/tty`,
///   `/dev/console`): a terminal is saved by path and reopened on restore if
///   it still exists, else replaced by `/dev/null` (servers started from a
///   shell keep one on 0, 1 and 2; note that a pty number may have been
///   reused by another session in between);
/// - pipes and FIFOs with their unread data, both ends or one end present;
/// - eventfd, timerfd (settings, remaining time, unread ticks), signalfd,
///   epoll (every watch with its events and data, also one whose descriptor
///   was closed while its file stays open through another);
/// - inotify (every watch by path, with its mask and watch descriptor;
///   events not yet read are not kept);
/// - memfds (name, size, seals, and contents unless the process maps it:
///   mapped pages are saved with the memory);
/// - listening TCP sockets (IPv4/IPv6, `SO_REUSEADDR`, `SO_REUSEPORT`,
///   `IPV6_V6ONLY`, backlog), and TCP sockets created or bound but not
///   listening (address, options, linger);
/// - UDP sockets: address, connected peer, `SO_REUSEADDR`, `SO_REUSEPORT`,
///   `IPV6_V6ONLY`, options (queued datagrams are not kept);
/// - UNIX sockets of every type: listeners (path or abstract), pairs
///   inside the process with their queued data, and sockets unbound, bound,
///   or connected to a named socket outside the process (connected to it
///   again at restore; `docs/sockets.md` says what is kept and refused);
/// - established TCP connections, with `TCP_REPAIR`: sequence numbers,
///   windows, negotiated options and the data of both queues (see
///   `tcp_repair.rs`). They are left in repair mode while saved; this
///   function takes them out of it before returning, [`save_fds_holding`]
///   hands them back still in it.
///
/// Descriptors sharing one open file description (`dup`) are saved once,
/// the others with [`FdInfo::shared_with`].
///
/// Everything else is refused with [`FilesError::Unsupported`] naming the
/// descriptor, e.g. `fd 7: TCP connection 127.0.0.1:5000 -> 127.0.0.1:41234
/// in state CLOSE_WAIT cannot be checkpointed` or `fd 5: fanotify is not
/// supported`.
pub fn save_fds(pid: i32, pidfd: &PidFd) -> Result<Vec<FdInfo>, FilesError> {
    save_fds_excluding(pid, pidfd, &[])
}

/// [`save_fds`], leaving out the descriptors in `exclude`: those persist
/// itself put in the process (the userfaultfd a lazily restored process
/// keeps, for one), which are not the service's and are re-created by the
/// restore anyway.
pub fn save_fds_excluding(
    pid: i32,
    pidfd: &PidFd,
    exclude: &[i32],
) -> Result<Vec<FdInfo>, FilesError> {
    save_fds_holding(pid, pidfd, exclude).map(|saved| saved.fds)
}

/// What [`save_fds_holding`] and [`save_fds_in_tree`] saved.
#[derive(Debug)]
pub struct SavedFds {
    /// The descriptors.
    pub fds: Vec<FdInfo>,
    /// The established TCP connections among them, still in repair mode.
    pub connections: RepairedConnections,
}

/// [`save_fds_excluding`], handing back the established TCP connections
/// still in repair mode: the caller closes them silently once the process
/// is killed, or resumes them if it goes on (see [`RepairedConnections`]).
pub fn save_fds_holding(pid: i32, pidfd: &PidFd, exclude: &[i32]) -> Result<SavedFds, FilesError> {
    save_fds_in_tree(pid, pidfd, exclude, &TreeScope::default())
}

/// What the other processes of a checkpointed tree hold, for
/// [`save_fds_in_tree`].
#[derive(Debug, Default)]
pub struct TreeScope {
    /// Descriptors of this process whose open file description is saved
    /// with another process of the tree: not saved here, but still open
    /// (an epoll instance of this process may watch them).
    pub saved_elsewhere: Vec<i32>,
    /// Inodes of every socket a process of the tree holds: a UNIX socket
    /// connected to one of them is saved as a pair, its peer saved by the
    /// process that holds it.
    pub sockets: HashSet<u64>,
}

/// [`save_fds_holding`] for one process of a tree: the descriptors of
/// `tree.saved_elsewhere` are left out too, and a UNIX socket may be
/// connected to a socket another process of the tree holds.
pub fn save_fds_in_tree(
    pid: i32,
    pidfd: &PidFd,
    exclude: &[i32],
    tree: &TreeScope,
) -> Result<SavedFds, FilesError> {
    let mut connections = RepairedConnections::default();
    let mut listed = list(pid)?;
    listed.retain(|entry| !exclude.contains(&entry.fd));
    let mapped_memfds = memfd::mapped_memfd_inodes(pid)?;
    let mut saved: Vec<FdInfo> = Vec::with_capacity(listed.len());
    let mut memfd_contents_saved = HashSet::new();
    // The sockets a UNIX socket of the process may be connected to: its
    // own, and those of the rest of the tree.
    let mut sockets = tree.sockets.clone();
    sockets.extend(
        listed
            .iter()
            .filter(|entry| entry.target.starts_with("socket:["))
            .map(|entry| entry.info.ino),
    );

    let around = Around {
        listed: &listed,
        mapped_memfds: &mapped_memfds,
        sockets: &sockets,
    };
    for (index, entry) in listed.iter().enumerate() {
        if tree.saved_elsewhere.contains(&entry.fd) {
            continue;
        }
        let cloexec = entry.info.flags & libc::O_CLOEXEC as u32 != 0;
        let flags = entry.info.flags & !(libc::O_CLOEXEC as u32);

        if let Some(primary) = shared_with(pid, &listed[..index], entry)? {
            let kind = saved
                .iter()
                .find(|s| s.fd == primary)
                .map(|s| without_payload(s.kind.clone()))
                .ok_or_else(|| FilesError::invalid(entry.fd, "shared descriptor not saved"))?;
            saved.push(FdInfo {
                fd: entry.fd,
                cloexec,
                flags,
                shared_with: Some(primary),
                kind,
            });
            continue;
        }

        let kind = classify(
            pid,
            pidfd,
            entry,
            &around,
            &mut memfd_contents_saved,
            &mut connections,
        )?;
        saved.push(FdInfo {
            fd: entry.fd,
            cloexec,
            flags,
            shared_with: None,
            kind,
        });
    }
    epoll::find_watched_files(pid, &listed, &mut saved)?;
    Ok(SavedFds {
        fds: saved,
        connections,
    })
}

/// Lists `/proc/PID/fd` in descriptor order with link targets and fdinfo.
fn list(pid: i32) -> Result<Vec<Listed>, FilesError> {
    let dir = format!("/proc/{pid}/fd");
    let proc_err = |path: &str| {
        let path = path.to_owned();
        move |source| FilesError::Proc { pid, path, source }
    };
    let mut fds: Vec<i32> = fs::read_dir(&dir)
        .map_err(proc_err(&dir))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();

    let mut listed = Vec::with_capacity(fds.len());
    for fd in fds {
        let link = format!("/proc/{pid}/fd/{fd}");
        let target = fs::read_link(&link).map_err(proc_err(&link))?;
        let info_path = format!("/proc/{pid}/fdinfo/{fd}");
        let text = fs::read_to_string(&info_path).map_err(proc_err(&info_path))?;
        let info = FdInfoText::parse(&text).ok_or_else(|| FilesError::Proc {
            pid,
            path: info_path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no pos or flags line"),
        })?;
        listed.push(Listed {
            fd,
            target: target.to_string_lossy().into_owned(),
            info,
        });
    }
    Ok(listed)
}

/// The lowest earlier descriptor sharing `entry`'s open file description.
fn shared_with(pid: i32, earlier: &[Listed], entry: &Listed) -> Result<Option<i32>, FilesError> {
    for other in earlier
        .iter()
        .filter(|o| o.target == entry.target && o.info.ino == entry.info.ino)
    {
        let same = kobjects::same_file(pid, other.fd, pid, entry.fd).map_err(FilesError::io(
            entry.fd,
            format!("comparing with fd {} (kcmp)", other.fd),
        ))?;
        if same {
            return Ok(Some(other.fd));
        }
    }
    Ok(None)
}

/// The kind without saved contents, for a descriptor that shares another's.
fn without_payload(kind: FdKind) -> FdKind {
    match kind {
        FdKind::File {
            path,
            offset,
            unlinked,
            identity,
            ..
        } => FdKind::File {
            path,
            offset,
            unlinked,
            contents: Vec::new(),
            identity,
        },
        FdKind::Pipe {
            inode,
            write_end,
            fifo_path,
            fifo_identity,
            ..
        } => FdKind::Pipe {
            inode,
            write_end,
            fifo_path,
            data: Vec::new(),
            capacity: 0,
            fifo_identity,
        },
        FdKind::Memfd {
            name,
            inode,
            offset,
            size,
            seals,
            ..
        } => FdKind::Memfd {
            name,
            inode,
            offset,
            size,
            seals,
            contents: Vec::new(),
        },
        FdKind::UnixPair {
            inode,
            peer_inode,
            socket_type,
            shutdown,
            ..
        } => FdKind::UnixPair {
            inode,
            peer_inode,
            socket_type,
            queued: Vec::new(),
            shutdown,
        },
        FdKind::TcpConnection(connection) => FdKind::TcpConnection(TcpConnection {
            send_queue: Vec::new(),
            send_unsent: 0,
            recv_queue: Vec::new(),
            ..connection
        }),
        other => other,
    }
}

/// What the rest of the process (and tree) holds, for [`classify`].
struct Around<'a> {
    /// Every descriptor of the process.
    listed: &'a [Listed],
    /// Inodes of the memfds the process maps.
    mapped_memfds: &'a HashSet<u64>,
    /// Inodes of the sockets of the process and of the rest of its tree.
    sockets: &'a HashSet<u64>,
}

/// Works out what one descriptor is and captures its state.
fn classify(
    pid: i32,
    pidfd: &PidFd,
    entry: &Listed,
    around: &Around<'_>,
    memfd_contents_saved: &mut HashSet<u64>,
    connections: &mut RepairedConnections,
) -> Result<FdKind, FilesError> {
    let Around {
        listed,
        mapped_memfds,
        sockets,
    } = *around;
    let fd = entry.fd;
    let target = entry.target.as_str();
    if target.starts_with("pipe:[") {
        return pipe::save(pid, entry, listed, None);
    }
    if target.starts_with("socket:[") {
        return socket(pid, pidfd, entry, sockets, connections);
    }
    if let Some(name) = target.strip_prefix("anon_inode:") {
        return anon_inode(pid, fd, name, &entry.info);
    }
    if let Some(name) = target.strip_prefix("/memfd:") {
        return memfd::save(pid, pidfd, entry, name, mapped_memfds, memfd_contents_saved);
    }
    if !target.starts_with('/') {
        return Err(FilesError::unsupported(
            fd,
            format!("{target} is not supported"),
        ));
    }
    regular::save(pid, entry, listed)
}

/// eventfd, timerfd, signalfd, epoll, inotify; everything else on anon_inode
/// is refused.
fn anon_inode(pid: i32, fd: i32, name: &str, info: &FdInfoText) -> Result<FdKind, FilesError> {
    match name {
        "[eventfd]" => eventfd::save(fd, info),
        "[timerfd]" => timerfd::save(fd, info),
        "[signalfd]" => signalfd::save(fd, info),
        "[eventpoll]" => epoll::save(fd, info),
        "inotify" => inotify::save(pid, fd, info),
        "[fanotify]" => Err(FilesError::unsupported(fd, "fanotify is not supported")),
        "[io_uring]" => Err(FilesError::unsupported(fd, "io_uring is not supported")),
        "[perf_event]" => Err(FilesError::unsupported(fd, "perf_event is not supported")),
        "[userfaultfd]" => Err(FilesError::unsupported(fd, "userfaultfd is not supported")),
        "[pidfd]" => Err(FilesError::unsupported(fd, "pidfd is not supported")),
        bpf if bpf.starts_with("bpf") => Err(FilesError::unsupported(
            fd,
            format!("BPF object (anon_inode:{bpf}) is not supported"),
        )),
        other => Err(FilesError::unsupported(
            fd,
            format!("anon_inode:{other} is not supported"),
        )),
    }
}

/// Saves the socket behind `entry`, duplicated into the agent to query it:
/// IP sockets in `inet.rs`, UNIX sockets in `unix.rs`.
fn socket(
    pid: i32,
    pidfd: &PidFd,
    entry: &Listed,
    sockets: &HashSet<u64>,
    connections: &mut RepairedConnections,
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
            if protocol == libc::IPPROTO_TCP && !listening {
                let (state, _) = kobjects::tcp_state(sock.as_fd())
                    .map_err(FilesError::io(fd, "getsockopt TCP_INFO"))?;
                if state == tcp_repair::TCP_ESTABLISHED {
                    return tcp_repair::save(fd, sock.as_fd(), domain, connections);
                }
            }
            inet::save(
                fd,
                sock.as_fd(),
                domain,
                socket_type,
                protocol,
                listening,
                entry.info.ino,
            )
        }
        libc::AF_UNIX => unix::save(
            pid,
            fd,
            sock.as_fd(),
            socket_type,
            listening,
            entry,
            sockets,
        ),
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
