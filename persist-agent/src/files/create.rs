//! Re-creating one saved descriptor's object in the agent.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, UnixAddr};
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;
use persist_common::image::{FdInfo, FdKind, FileIdentity, FileType, QueuedMessage, SocketOption};

use super::FilesError;
use super::recorded::{self, PathAccess, RecordedError};
use crate::sys::fscreds;
use crate::sys::kobjects;

/// Flags that only matter while opening, or that would make a reopen
/// through a path or a `/proc/self/fd` link fail or create a file.
const OPEN_ONLY_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_CREAT
    | libc::O_EXCL
    | libc::O_TRUNC
    | libc::O_CLOEXEC
    | libc::O_NOFOLLOW
    | (libc::O_TMPFILE & !libc::O_DIRECTORY);

/// Bigger pipes than this need `F_SETPIPE_SZ` before being refilled.
const DEFAULT_PIPE_SIZE: usize = 65536;

/// Memfds re-created so far, by saved inode: every descriptor of one memfd
/// (and its shared mappings) must get the same new object.
#[derive(Default)]
pub(super) struct Memfds {
    bases: HashMap<u64, File>,
}

impl Memfds {
    /// The read-write memfds, by saved inode, to keep open and hand to the
    /// restore of shared mappings.
    pub fn into_bases(self) -> impl Iterator<Item = (u64, OwnedFd)> {
        self.bases
            .into_iter()
            .map(|(inode, file)| (inode, file.into()))
    }
}

/// The `open` flags that reopen a file with saved `O_*` flags: the access
/// mode and status flags, never a controlling terminal, nothing that creates
/// or truncates.
pub(super) fn reopen_flags(saved: u32) -> i32 {
    let saved = saved as i32;
    (saved & !OPEN_ONLY_FLAGS) | (saved & libc::O_ACCMODE) | libc::O_NOCTTY
}

/// Opens `path` with saved `O_*` flags (close-on-exec, never a controlling
/// terminal).
fn open_with(path: &Path, flags: u32) -> io::Result<File> {
    let flags = flags as i32;
    let mut options = OpenOptions::new();
    match flags & libc::O_ACCMODE {
        libc::O_WRONLY => options.write(true),
        libc::O_RDWR => options.read(true).write(true),
        _ => options.read(true),
    };
    options
        .custom_flags((flags & !OPEN_ONLY_FLAGS) | libc::O_NOCTTY)
        .open(path)
}

/// Opens the recorded `path` for descriptor `info` with its saved flags (see
/// [`recorded::open`]).
fn open_recorded(
    info: &FdInfo,
    path: &str,
    flags: u32,
    expected: Option<&FileIdentity>,
    types: &[FileType],
    access: &PathAccess,
) -> Result<File, FilesError> {
    recorded::open(
        path,
        OFlag::from_bits_retain(reopen_flags(flags)),
        expected,
        types,
        access,
    )
    .map_err(|err| recorded_error(info.fd, path, err))
}

/// The error about `path` of descriptor `fd`.
fn recorded_error(fd: i32, path: &str, err: RecordedError) -> FilesError {
    match err {
        RecordedError::Changed(what) => FilesError::Changed {
            fd,
            path: path.to_owned(),
            what,
        },
        RecordedError::Io { action, source } => FilesError::Io {
            fd,
            action: format!("{action} {path}"),
            source,
        },
    }
}

/// The path naming our descriptor `fd`, for reopening it with other flags.
fn self_link(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Re-creates the object for `info` (which is not a `shared_with` copy).
pub(super) fn object(
    info: &FdInfo,
    pipes: &mut Pipes<'_>,
    pairs: &mut UnixPairs<'_>,
    memfds: &mut Memfds,
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
            let saved = SavedFile {
                path,
                offset: *offset,
                unlinked: *unlinked,
                contents,
                identity: identity.as_ref(),
            };
            file(info, &saved, access)?
        }
        FdKind::Device { path, identity } => device(info, path, identity.as_ref(), access)?,
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
        FdKind::Eventfd { count, semaphore } => {
            let flags = if *semaphore { libc::EFD_SEMAPHORE } else { 0 };
            kobjects::eventfd(*count, flags).map_err(FilesError::io(fd, "eventfd"))?
        }
        FdKind::Timerfd {
            clock,
            settime_flags,
            interval_ns,
            value_ns,
            ticks,
        } => timerfd(fd, *clock, *settime_flags, *interval_ns, *value_ns, *ticks)?,
        FdKind::Signalfd { mask } => {
            kobjects::signalfd(*mask, 0).map_err(FilesError::io(fd, "signalfd"))?
        }
        FdKind::Epoll { .. } => kobjects::epoll().map_err(FilesError::io(fd, "epoll_create1"))?,
        FdKind::Memfd {
            name,
            offset,
            size,
            seals,
            contents,
            inode,
        } => memfd(info, memfds, *inode, name, *offset, *size, *seals, contents)?,
        FdKind::TcpListener {
            local,
            backlog,
            reuseport,
            v6only,
            options,
            ..
        } => tcp_listener(fd, local, *backlog, *reuseport, *v6only, options)?,
        FdKind::UdpSocket {
            local,
            peer,
            reuseaddr,
            reuseport,
            v6only,
        } => udp_socket(fd, local, peer.as_deref(), *reuseaddr, *reuseport, *v6only)?,
        FdKind::UnixListener {
            path,
            socket_type,
            backlog,
            mode,
            owner,
        } => unix_listener(fd, path, *socket_type, *backlog, *mode, *owner, access)?,
        FdKind::UnixPair { .. } => pairs.end(info)?,
    })
}

/// What the image saved about a file descriptor's file.
struct SavedFile<'a> {
    path: &'a str,
    offset: u64,
    unlinked: bool,
    contents: &'a [u8],
    identity: Option<&'a FileIdentity>,
}

fn file(info: &FdInfo, saved: &SavedFile<'_>, access: &PathAccess) -> Result<OwnedFd, FilesError> {
    let fd = info.fd;
    let path = saved.path;
    let file = if saved.unlinked {
        recreate_unlinked(info, path, saved.contents, access)?
    } else {
        open_recorded(
            info,
            path,
            info.flags,
            saved.identity,
            &[FileType::Regular, FileType::Directory],
            access,
        )?
    };
    // O_PATH descriptors have no offset to restore.
    let offset = saved.offset;
    if offset != 0 && info.flags as i32 & libc::O_PATH == 0 {
        (&file)
            .seek(SeekFrom::Start(offset))
            .map_err(FilesError::io(fd, format!("seeking {path} to {offset}")))?;
    }
    Ok(file.into())
}

/// An unlinked file comes back as an anonymous file in the directory it was
/// in, with its contents, reopened with the saved flags. It is made with the
/// restored process's credentials: a directory the process cannot write
/// gets no file.
fn recreate_unlinked(
    info: &FdInfo,
    path: &str,
    contents: &[u8],
    access: &PathAccess,
) -> Result<File, FilesError> {
    let fd = info.fd;
    let action = format!("re-creating unlinked file {path}");
    let target = Path::new(path);
    let (dir, name) = match (target.parent(), target.file_name()) {
        (Some(dir), Some(name)) => (dir, name),
        _ => {
            return Err(FilesError::invalid(
                fd,
                format!("unlinked file {path:?} has no directory"),
            ));
        }
    };
    let _creds = access
        .assume()
        .map_err(FilesError::io(fd, "taking the process's credentials"))?;
    let dir_fd = fscreds::open_no_symlinks(dir, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty())
        .map_err(|err| match err.raw_os_error() {
            Some(libc::ELOOP) => FilesError::Changed {
                fd,
                path: path.to_owned(),
                what: "a symbolic link is in its directory's path now".into(),
            },
            _ => FilesError::io(fd, format!("{action}: opening {}", dir.display()))(err),
        })?;
    // Created under its old name and unlinked again, so /proc shows the same
    // "PATH (deleted)"; if the name is taken by now, as an anonymous file
    // (O_TMPFILE) in the same directory.
    let create =
        OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let named = nix::fcntl::openat(&dir_fd, name, create, Mode::from_bits_truncate(0o600));
    let (tmp, created_at_path) = match named {
        Ok(file) => (File::from(file), true),
        Err(nix::errno::Errno::EEXIST) => {
            let file = nix::fcntl::openat(
                &dir_fd,
                ".",
                OFlag::O_RDWR | OFlag::O_TMPFILE | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
            .map_err(FilesError::io(fd, format!("{action} in {}", dir.display())))?;
            (File::from(file), false)
        }
        Err(e) => return Err(FilesError::io(fd, action)(e)),
    };
    let filled = (&tmp).write_all(contents).and_then(|()| {
        fscreds::reopen(
            tmp.as_fd(),
            OFlag::from_bits_retain(reopen_flags(info.flags)),
        )
    });
    if created_at_path {
        nix::unistd::unlinkat(&dir_fd, name, UnlinkatFlags::NoRemoveDir)
            .map_err(FilesError::io(fd, format!("unlinking {path} again")))?;
    }
    filled.map_err(FilesError::io(fd, action))
}

fn is_terminal(path: &str) -> bool {
    path.starts_with("/dev/pts/") || path.starts_with("/dev/tty") || path == "/dev/console"
}

/// Devices are reopened by path; a terminal that cannot be reopened becomes
/// /dev/null.
fn device(
    info: &FdInfo,
    path: &str,
    identity: Option<&FileIdentity>,
    access: &PathAccess,
) -> Result<OwnedFd, FilesError> {
    let fd = info.fd;
    match open_recorded(
        info,
        path,
        info.flags,
        identity,
        &[FileType::CharDevice],
        access,
    ) {
        Ok(file) => Ok(file.into()),
        // Gone (a closed pty), or not openable from here (/dev/tty without a
        // controlling terminal): output to it is lost either way.
        Err(e) if is_terminal(path) => {
            tracing::warn!(
                fd,
                path,
                "terminal cannot be reopened ({e}); using /dev/null instead"
            );
            Ok(open_with(Path::new("/dev/null"), info.flags)
                .map_err(FilesError::io(
                    fd,
                    format!("opening /dev/null in place of {path}"),
                ))?
                .into())
        }
        Err(e) => Err(e),
    }
}

fn timerfd(
    fd: i32,
    clock: i32,
    settime_flags: i32,
    interval_ns: u64,
    value_ns: u64,
    ticks: u64,
) -> Result<OwnedFd, FilesError> {
    let timer = kobjects::timerfd(clock).map_err(FilesError::io(
        fd,
        format!("timerfd_create on clock {clock}"),
    ))?;
    // A periodic timer that expired and was not read yet shows no time
    // left: the kernel only re-arms it on the next read. The restored one
    // runs on, its next expiry one interval away, the unread ticks kept.
    let left = if value_ns == 0 { interval_ns } else { value_ns };
    if left > 0 {
        // The saved value is the time left; an absolute timer needs it
        // turned back into a deadline on its clock.
        let value = if settime_flags & libc::TFD_TIMER_ABSTIME != 0 {
            let now = kobjects::clock_now_ns(clock)
                .map_err(FilesError::io(fd, format!("clock_gettime {clock}")))?;
            now.saturating_add(left)
        } else {
            left
        };
        kobjects::timerfd_settime(&timer, settime_flags, value, interval_ns)
            .map_err(FilesError::io(fd, "timerfd_settime"))?;
    }
    if ticks > 0 {
        kobjects::timerfd_set_ticks(timer.as_fd(), ticks)
            .map_err(FilesError::io(fd, "TFD_IOC_SET_TICKS"))?;
    }
    Ok(timer.into())
}

/// A new memfd with the saved size, contents and seals.
fn new_memfd(
    fd: i32,
    name: &str,
    size: u64,
    seals: u32,
    contents: &[u8],
) -> Result<File, FilesError> {
    let base = File::from(
        kobjects::memfd(name).map_err(FilesError::io(fd, format!("memfd_create {name}")))?,
    );
    base.set_len(size).map_err(FilesError::io(
        fd,
        format!("resizing memfd {name} to {size}"),
    ))?;
    base.write_all_at(contents, 0)
        .map_err(FilesError::io(fd, format!("filling memfd {name}")))?;
    if seals != 0 {
        kobjects::add_seals(base.as_fd(), seals)
            .map_err(FilesError::io(fd, format!("sealing memfd {name}")))?;
    }
    Ok(base)
}

#[allow(clippy::too_many_arguments)]
fn memfd(
    info: &FdInfo,
    memfds: &mut Memfds,
    inode: u64,
    name: &str,
    offset: u64,
    size: u64,
    seals: u32,
    contents: &[u8],
) -> Result<OwnedFd, FilesError> {
    let fd = info.fd;
    let base = match memfds.bases.entry(inode) {
        Entry::Occupied(known) => known.into_mut(),
        Entry::Vacant(new) => new.insert(new_memfd(fd, name, size, seals, contents)?),
    };
    // The descriptor gets its own open with the saved access mode and offset.
    let file = open_with(Path::new(&self_link(base.as_fd())), info.flags)
        .map_err(FilesError::io(fd, format!("reopening memfd {name}")))?;
    if offset != 0 {
        (&file)
            .seek(SeekFrom::Start(offset))
            .map_err(FilesError::io(fd, format!("seeking memfd {name}")))?;
    }
    Ok(file.into())
}

fn tcp_listener(
    fd: i32,
    local: &str,
    backlog: u32,
    reuseport: bool,
    v6only: bool,
    options: &[SocketOption],
) -> Result<OwnedFd, FilesError> {
    let addr: SocketAddr = local
        .parse()
        .map_err(|_| FilesError::invalid(fd, format!("bad TCP listener address {local:?}")))?;
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let action = |what: &str| format!("{what} for TCP listener {local}");
    let sock = nix::sys::socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(FilesError::io(fd, action("socket")))?;
    let set = |level, name, value: bool, what: &str| {
        kobjects::set_sockopt_int(sock.as_fd(), level, name, i32::from(value))
            .map_err(FilesError::io(fd, action(what)))
    };
    set(libc::SOL_SOCKET, libc::SO_REUSEADDR, true, "SO_REUSEADDR")?;
    if reuseport {
        set(libc::SOL_SOCKET, libc::SO_REUSEPORT, true, "SO_REUSEPORT")?;
    }
    if addr.is_ipv6() {
        set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, v6only, "IPV6_V6ONLY")?;
    }
    nix::sys::socket::bind(sock.as_raw_fd(), &SockaddrStorage::from(addr))
        .map_err(FilesError::io(fd, format!("binding TCP listener {local}")))?;
    for option in options {
        kobjects::set_sockopt_int(sock.as_fd(), option.level, option.name, option.value).map_err(
            FilesError::io(
                fd,
                format!(
                    "setsockopt {}/{} for TCP listener {local}",
                    option.level, option.name
                ),
            ),
        )?;
    }
    listen(fd, &sock, backlog, local)?;
    Ok(sock)
}

/// A UDP socket bound again to its address (if it had one) and connected
/// again to its peer (if it had one).
fn udp_socket(
    fd: i32,
    local: &str,
    peer: Option<&str>,
    reuseaddr: bool,
    reuseport: bool,
    v6only: bool,
) -> Result<OwnedFd, FilesError> {
    let parse = |text: &str| {
        text.parse::<SocketAddr>()
            .map_err(|_| FilesError::invalid(fd, format!("bad UDP address {text:?}")))
    };
    let addr = parse(local)?;
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let sock = nix::sys::socket::socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(FilesError::io(fd, format!("socket for UDP socket {local}")))?;
    let set = |level, name, value: bool, what: &str| {
        kobjects::set_sockopt_int(sock.as_fd(), level, name, i32::from(value))
            .map_err(FilesError::io(fd, format!("{what} for UDP socket {local}")))
    };
    set(
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        reuseaddr,
        "SO_REUSEADDR",
    )?;
    set(
        libc::SOL_SOCKET,
        libc::SO_REUSEPORT,
        reuseport,
        "SO_REUSEPORT",
    )?;
    if addr.is_ipv6() {
        set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, v6only, "IPV6_V6ONLY")?;
    }
    // Port 0: the socket was never bound (or only implicitly, by connect).
    if addr.port() != 0 {
        nix::sys::socket::bind(sock.as_raw_fd(), &SockaddrStorage::from(addr))
            .map_err(FilesError::io(fd, format!("binding UDP socket {local}")))?;
    }
    if let Some(peer) = peer {
        let peer_addr = parse(peer)?;
        nix::sys::socket::connect(sock.as_raw_fd(), &SockaddrStorage::from(peer_addr)).map_err(
            FilesError::io(fd, format!("connecting UDP socket {local} to {peer}")),
        )?;
    }
    Ok(sock)
}

fn listen(fd: i32, sock: &OwnedFd, backlog: u32, name: &str) -> Result<(), FilesError> {
    let backlog = i32::try_from(backlog)
        .unwrap_or(i32::MAX)
        .min(libc::SOMAXCONN);
    let backlog = Backlog::new(backlog).unwrap_or(Backlog::MAXCONN);
    nix::sys::socket::listen(sock, backlog).map_err(FilesError::io(fd, format!("listen on {name}")))
}

fn unix_listener(
    fd: i32,
    path: &str,
    socket_type: i32,
    backlog: u32,
    mode: Option<u32>,
    owner: Option<(u32, u32)>,
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
        bind_socket_file(fd, &sock, path, mode, owner, access)?;
    }
    listen(fd, &sock, backlog, path)?;
    Ok(sock)
}

/// Binds `sock` to the socket file `path` with the restored process's
/// credentials, after removing a stale socket file there (and nothing else),
/// and gives the file its saved mode and owner.
fn bind_socket_file(
    fd: i32,
    sock: &OwnedFd,
    path: &str,
    mode: Option<u32>,
    owner: Option<(u32, u32)>,
    access: &PathAccess,
) -> Result<(), FilesError> {
    if path.is_empty() {
        return Err(FilesError::invalid(fd, "UNIX listener without an address"));
    }
    let target = Path::new(path);
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(FilesError::invalid(
            fd,
            format!("bad UNIX socket path {path:?}"),
        ));
    };
    let symlink = |what: &str| FilesError::Changed {
        fd,
        path: path.to_owned(),
        what: format!("a symbolic link is in its {what} now"),
    };
    let _creds = access
        .assume()
        .map_err(FilesError::io(fd, "taking the process's credentials"))?;
    let dir_fd = fscreds::open_no_symlinks(dir, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty())
        .map_err(|err| match err.raw_os_error() {
            Some(libc::ELOOP) => symlink("directory's path"),
            _ => FilesError::io(fd, format!("opening the directory of UNIX socket {path}"))(err),
        })?;
    // A socket file left by the checkpointed process would make bind fail;
    // anything that is not a socket is left alone.
    let stale = nix::sys::stat::fstatat(&dir_fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_mode(st.st_mode) == Some(FileType::Socket));
    if stale {
        nix::unistd::unlinkat(&dir_fd, name, UnlinkatFlags::NoRemoveDir)
            .map_err(FilesError::io(fd, format!("removing stale socket {path}")))?;
    }
    let addr = UnixAddr::new(path).map_err(FilesError::io(fd, format!("UNIX address {path}")))?;
    nix::sys::socket::bind(sock.as_raw_fd(), &addr)
        .map_err(FilesError::io(fd, format!("binding UNIX listener {path}")))?;
    // Clients need the socket file's old mode and owner to connect. The
    // file is changed through a descriptor of the socket just bound, never
    // through a name someone may have replaced since.
    if mode.is_none() && owner.is_none() {
        return Ok(());
    }
    let socket_file = nix::fcntl::openat(
        &dir_fd,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|err| match err {
        nix::errno::Errno::ELOOP => symlink("place"),
        _ => FilesError::io(fd, format!("opening the socket file {path}"))(err),
    })?;
    let file_stat = fscreds::stat(socket_file.as_fd())
        .map_err(FilesError::io(fd, format!("fstat of socket file {path}")))?;
    if FileType::from_mode(file_stat.st_mode) != Some(FileType::Socket) {
        return Err(FilesError::Changed {
            fd,
            path: path.to_owned(),
            what: "what was just bound there is no socket".into(),
        });
    }
    if let Some(mode) = mode {
        let link = format!("/proc/self/fd/{}", socket_file.as_raw_fd());
        fs::set_permissions(&link, fs::Permissions::from_mode(mode))
            .map_err(FilesError::io(fd, format!("chmod {mode:o} {path}")))?;
    }
    if let Some((uid, gid)) = owner
        && (file_stat.st_uid, file_stat.st_gid) != (uid, gid)
    {
        nix::unistd::fchownat(
            &socket_file,
            "",
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
            AtFlags::AT_EMPTY_PATH,
        )
        .map_err(FilesError::io(fd, format!("chown {uid}:{gid} {path}")))?;
    }
    Ok(())
}

/// Pipes and FIFOs, re-created once per saved pipe inode.
pub(super) struct Pipes<'a> {
    saved: &'a [FdInfo],
    made: HashMap<u64, MadePipe>,
}

enum MadePipe {
    /// An anonymous pipe: the read end, and the write end if the process had one.
    Anonymous {
        read: OwnedFd,
        write: Option<OwnedFd>,
    },
    /// A FIFO, held open read-write while its ends are opened so neither
    /// open blocks or fails and the refilled data stays.
    Fifo { holder: File },
}

impl<'a> Pipes<'a> {
    /// Pipes of the image `saved`.
    pub fn new(saved: &'a [FdInfo]) -> Self {
        Self {
            saved,
            made: HashMap::new(),
        }
    }

    /// The saved ends of pipe `inode` (FIFOs and anonymous pipes apart).
    /// (write end, data, capacity) of each saved end.
    fn ends(
        &self,
        inode: u64,
        fifo: Option<&str>,
    ) -> impl Iterator<Item = (bool, &'a [u8], u32)> + 'a {
        let fifo = fifo.map(str::to_owned);
        self.saved.iter().filter_map(move |s| match &s.kind {
            FdKind::Pipe {
                inode: i,
                write_end,
                fifo_path,
                data,
                capacity,
                ..
            } if *i == inode && fifo_path.as_deref() == fifo.as_deref() => {
                Some((*write_end, data.as_slice(), *capacity))
            }
            _ => None,
        })
    }

    /// The pipe's saved data and capacity (both saved on one end).
    fn contents(&self, inode: u64, fifo: Option<&str>) -> (&'a [u8], usize) {
        let data = self
            .ends(inode, fifo)
            .map(|(_, d, _)| d)
            .find(|d| !d.is_empty())
            .unwrap_or_default();
        let capacity = self.ends(inode, fifo).map(|(_, _, c)| c).max().unwrap_or(0);
        (data, capacity as usize)
    }

    /// The descriptor for one saved pipe end.
    pub fn end(
        &mut self,
        info: &FdInfo,
        inode: u64,
        fifo: Option<(&str, Option<&FileIdentity>)>,
        access: &PathAccess,
    ) -> Result<OwnedFd, FilesError> {
        let fd = info.fd;
        let write_end = info.flags as i32 & libc::O_ACCMODE == libc::O_WRONLY;
        if let Some((path, identity)) = fifo {
            if !self.made.contains_key(&inode) {
                let holder = open_recorded(
                    info,
                    path,
                    (libc::O_RDWR | libc::O_NONBLOCK) as u32,
                    identity,
                    &[FileType::Fifo],
                    access,
                )?;
                fill_pipe(fd, holder.as_fd(), self.contents(inode, Some(path)))?;
                self.made.insert(inode, MadePipe::Fifo { holder });
            }
            let Some(MadePipe::Fifo { holder }) = self.made.get(&inode) else {
                return Err(FilesError::invalid(
                    fd,
                    format!("pipe inode {inode} is both a FIFO and an anonymous pipe"),
                ));
            };
            // The end is the same FIFO as the holder, opened again with the
            // process's permission check, not the path looked up again.
            let flags = (info.flags as i32 & libc::O_ACCMODE) | libc::O_NONBLOCK;
            let end = recorded::reopen(holder, OFlag::from_bits_retain(flags), access)
                .map_err(|err| recorded_error(fd, path, err))?;
            return Ok(end.into());
        }

        let has_read = self.ends(inode, None).any(|(w, _, _)| !w);
        if write_end && !has_read {
            // The reader was outside the process and is gone: writes go
            // nowhere rather than failing with EPIPE (or killing with SIGPIPE).
            tracing::warn!(
                fd,
                inode,
                "pipe write end without its reader; using /dev/null instead"
            );
            let null = open_with(Path::new("/dev/null"), libc::O_WRONLY as u32).map_err(
                FilesError::io(fd, "opening /dev/null for a pipe whose reader is gone"),
            )?;
            return Ok(null.into());
        }
        if !self.made.contains_key(&inode) {
            let (read, write) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                    .map_err(FilesError::io(fd, "pipe2"))?;
            fill_pipe(fd, write.as_fd(), self.contents(inode, None))?;
            // Without a writer in the process the reader sees the data, then end-of-file.
            let has_write = self.ends(inode, None).any(|(w, _, _)| w);
            self.made.insert(
                inode,
                MadePipe::Anonymous {
                    read,
                    write: has_write.then_some(write),
                },
            );
        }
        let Some(MadePipe::Anonymous { read, write }) = self.made.get(&inode) else {
            return Err(FilesError::invalid(
                fd,
                format!("pipe inode {inode} is both a FIFO and an anonymous pipe"),
            ));
        };
        let end = if write_end {
            write.as_ref()
        } else {
            Some(read)
        };
        end.ok_or_else(|| FilesError::invalid(fd, "pipe end missing"))?
            .try_clone()
            .map_err(FilesError::io(fd, "duplicating a pipe end"))
    }
}

/// Gives a pipe its saved capacity and writes its data back. The capacity
/// is best effort (above `pipe-max-size` it needs `CAP_SYS_RESOURCE`), but
/// the pipe must grow enough to hold the data.
fn fill_pipe(
    fd: i32,
    write: BorrowedFd<'_>,
    (data, capacity): (&[u8], usize),
) -> Result<(), FilesError> {
    if capacity > DEFAULT_PIPE_SIZE
        && let Err(err) = kobjects::set_pipe_size(write, capacity)
    {
        tracing::warn!(fd, capacity, "cannot restore the pipe's capacity: {err}");
    }
    if data.is_empty() {
        return Ok(());
    }
    let size = kobjects::pipe_size(write).map_err(FilesError::io(fd, "F_GETPIPE_SZ"))?;
    if data.len() > size {
        kobjects::set_pipe_size(write, data.len()).map_err(FilesError::io(
            fd,
            format!("F_SETPIPE_SZ {} for the pipe's data", data.len()),
        ))?;
    }
    let mut file = File::from(
        write
            .try_clone_to_owned()
            .map_err(FilesError::io(fd, "dup"))?,
    );
    file.write_all(data).map_err(FilesError::io(
        fd,
        format!("refilling the pipe with {} bytes", data.len()),
    ))
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
            } if p.shared_with.is_none() && i == peer_inode => Some((pi, t, queued)),
            _ => None,
        });
        let Some((back, peer_type, peer_queued)) = peer else {
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
