//! Saving a process's descriptors: listing, classifying, capturing contents.

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use persist_common::image::{FdInfo, FdKind, FileIdentity, FileType};

use super::FilesError;
use super::fdinfo::FdInfoText;
use super::{pipes, proc_self, sockets};
use crate::sys::kobjects;
use crate::sys::pidfd::PidFd;

/// Largest contents of an unlinked file or unmapped memfd saved in the
/// manifest.
pub const MAX_SAVED_CONTENTS: u64 = 64 << 20;

/// One open descriptor as `/proc` shows it.
#[derive(Debug)]
pub(super) struct Listed {
    pub fd: i32,
    /// Target of the `/proc/PID/fd/N` link.
    pub target: String,
    pub info: FdInfoText,
}

impl Listed {
    /// The access mode is write-only.
    fn write_only(&self) -> bool {
        self.info.flags as i32 & libc::O_ACCMODE == libc::O_WRONLY
    }
}

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
///   epoll (every watch with its events and data);
/// - memfds (name, size, seals, and contents unless the process maps it:
///   mapped pages are saved with the memory);
/// - listening TCP sockets (IPv4/IPv6, `SO_REUSEADDR`, `SO_REUSEPORT`,
///   `IPV6_V6ONLY`, backlog), listening UNIX sockets (path or abstract), and
///   connected UNIX sockets whose peer is also in the process, with their
///   queued data;
/// - UDP sockets: address, connected peer, `SO_REUSEADDR`, `SO_REUSEPORT`,
///   `IPV6_V6ONLY` (queued datagrams are not kept).
///
/// Descriptors sharing one open file description (`dup`) are saved once,
/// the others with [`FdInfo::shared_with`].
///
/// Everything else is refused with [`FilesError::Unsupported`] naming the
/// descriptor, e.g. `fd 7: established TCP connection 127.0.0.1:5000 ->
/// 127.0.0.1:41234 cannot be checkpointed` or `fd 5: inotify is not supported`.
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
    let mut listed = list(pid)?;
    listed.retain(|entry| !exclude.contains(&entry.fd));
    let mapped_memfds = mapped_memfd_inodes(pid)?;
    let mut saved: Vec<FdInfo> = Vec::with_capacity(listed.len());
    let mut memfd_contents_saved = HashSet::new();

    for (index, entry) in listed.iter().enumerate() {
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
            &listed,
            &mapped_memfds,
            &mut memfd_contents_saved,
        )?;
        saved.push(FdInfo {
            fd: entry.fd,
            cloexec,
            flags,
            shared_with: None,
            kind,
        });
    }
    check_epoll_targets(&listed)?;
    Ok(saved)
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
            ..
        } => FdKind::UnixPair {
            inode,
            peer_inode,
            socket_type,
            queued: Vec::new(),
        },
        other => other,
    }
}

/// Inodes of memfds the process maps (their pages are saved with memory).
fn mapped_memfd_inodes(pid: i32) -> Result<HashSet<u64>, FilesError> {
    let path = format!("/proc/{pid}/maps");
    let maps =
        fs::read_to_string(&path).map_err(|source| FilesError::Proc { pid, path, source })?;
    Ok(maps
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let inode = words.nth(4)?.parse().ok()?;
            words.next()?.starts_with("/memfd:").then_some(inode)
        })
        .collect())
}

/// Works out what one descriptor is and captures its state.
fn classify(
    pid: i32,
    pidfd: &PidFd,
    entry: &Listed,
    listed: &[Listed],
    mapped_memfds: &HashSet<u64>,
    memfd_contents_saved: &mut HashSet<u64>,
) -> Result<FdKind, FilesError> {
    let fd = entry.fd;
    let target = entry.target.as_str();
    if target.starts_with("pipe:[") {
        return pipe(pid, entry, listed, None);
    }
    if target.starts_with("socket:[") {
        return sockets::save_socket(pid, pidfd, entry, listed);
    }
    if let Some(name) = target.strip_prefix("anon_inode:") {
        return anon_inode(fd, name, &entry.info);
    }
    if let Some(rest) = target.strip_prefix("/memfd:") {
        let name = rest.strip_suffix(" (deleted)").unwrap_or(rest).to_owned();
        let inode = entry.info.ino;
        let dup = pidfd
            .get_fd(fd)
            .map_err(FilesError::io(fd, "pidfd_getfd"))?;
        let seals = kobjects::seals(dup.as_fd()).map_err(FilesError::io(fd, "F_GET_SEALS"))?;
        let size = fs::File::from(dup)
            .metadata()
            .map_err(FilesError::io(fd, "fstat"))?
            .len();
        let contents = if mapped_memfds.contains(&inode) || !memfd_contents_saved.insert(inode) {
            Vec::new()
        } else {
            read_through_proc(pid, fd)?
        };
        return Ok(FdKind::Memfd {
            name,
            inode,
            offset: entry.info.pos,
            size,
            seals,
            contents,
        });
    }
    if !target.starts_with('/') {
        return Err(FilesError::unsupported(
            fd,
            format!("{target} is not supported"),
        ));
    }

    let link = format!("/proc/{pid}/fd/{fd}");
    let meta = fs::metadata(&link).map_err(FilesError::io(fd, format!("stat {target}")))?;
    let kind = meta.file_type();
    let identity = FileType::from_mode(meta.mode()).map(|file_type| FileIdentity {
        device: meta.dev(),
        inode: meta.ino(),
        file_type,
    });
    let (path, deleted) = match target.strip_suffix(" (deleted)") {
        Some(path) => (path.to_owned(), true),
        None => (target.to_owned(), false),
    };
    if kind.is_file() || kind.is_dir() {
        let unlinked = kind.is_file() && (deleted || meta.nlink() == 0);
        let contents = if unlinked {
            read_through_proc(pid, fd)?
        } else {
            Vec::new()
        };
        let path = if unlinked {
            path
        } else {
            proc_self::saved_path(pid, fd, &path)?
        };
        return Ok(FdKind::File {
            path,
            offset: entry.info.pos,
            unlinked,
            contents,
            identity: identity.filter(|_| !unlinked),
        });
    }
    if kind.is_fifo() {
        return pipe(pid, entry, listed, Some((path, identity)));
    }
    if kind.is_char_device() {
        return device(fd, path, meta.rdev(), identity);
    }
    if kind.is_block_device() {
        return Err(FilesError::unsupported(
            fd,
            format!("block device {path} is not supported"),
        ));
    }
    Err(FilesError::unsupported(
        fd,
        format!("{target} is not supported"),
    ))
}

/// Reads the whole file behind a descriptor through a new open of
/// `/proc/PID/fd/N`, which works for unlinked files and leaves the
/// process's offset alone.
///
/// The contents go into the manifest, so they are capped at
/// [`MAX_SAVED_CONTENTS`].
fn read_through_proc(pid: i32, fd: i32) -> Result<Vec<u8>, FilesError> {
    let link = format!("/proc/{pid}/fd/{fd}");
    let file = fs::File::open(&link).map_err(FilesError::io(fd, format!("opening {link}")))?;
    let mut contents = Vec::new();
    file.take(MAX_SAVED_CONTENTS + 1)
        .read_to_end(&mut contents)
        .map_err(FilesError::io(
            fd,
            format!("reading contents through {link}"),
        ))?;
    if contents.len() as u64 > MAX_SAVED_CONTENTS {
        return Err(FilesError::unsupported(
            fd,
            format!(
                "contents exceed {} MiB, the most an image keeps for one file",
                MAX_SAVED_CONTENTS >> 20
            ),
        ));
    }
    Ok(contents)
}

/// A pipe or FIFO end. Unread data and capacity are saved once per pipe:
/// on the first read end in the process, or on the first end if the process
/// has no read end.
fn pipe(
    pid: i32,
    entry: &Listed,
    listed: &[Listed],
    fifo: Option<(String, Option<FileIdentity>)>,
) -> Result<FdKind, FilesError> {
    let (fifo_path, fifo_identity) = fifo.unzip();
    let inode = entry.info.ino;
    let same_pipe = |other: &&Listed| other.info.ino == inode && other.target == entry.target;
    let holder = listed
        .iter()
        .filter(same_pipe)
        .find(|o| !o.write_only())
        .or_else(|| listed.iter().find(same_pipe))
        .map(|o| o.fd);
    // The holder is never a dup: a dup is numbered above what it duplicates.
    let (data, capacity) = if holder == Some(entry.fd) {
        pipes::peek(pid, entry.fd)?
    } else {
        (Vec::new(), 0)
    };
    Ok(FdKind::Pipe {
        inode,
        write_end: entry.write_only(),
        fifo_path,
        data,
        capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
        fifo_identity: fifo_identity.flatten(),
    })
}

/// eventfd, timerfd, signalfd, epoll; everything else on anon_inode is refused.
fn anon_inode(fd: i32, name: &str, info: &FdInfoText) -> Result<FdKind, FilesError> {
    let missing =
        |what: &str| FilesError::unsupported(fd, format!("{name}: unexpected fdinfo (no {what})"));
    match name {
        "[eventfd]" => {
            let (count, semaphore) = info.eventfd().ok_or_else(|| missing("eventfd-count"))?;
            Ok(FdKind::Eventfd { count, semaphore })
        }
        "[timerfd]" => {
            let t = info.timerfd().ok_or_else(|| missing("timer settings"))?;
            Ok(FdKind::Timerfd {
                clock: t.clock,
                settime_flags: t.settime_flags,
                interval_ns: t.interval_ns,
                value_ns: t.value_ns,
                ticks: t.ticks,
            })
        }
        "[signalfd]" => Ok(FdKind::Signalfd {
            mask: info.signalfd_mask().ok_or_else(|| missing("sigmask"))?,
        }),
        "[eventpoll]" => {
            let watches = info
                .epoll_watches()
                .ok_or_else(|| missing("readable tfd lines"))?;
            Ok(FdKind::Epoll {
                watches: watches.into_iter().map(|(w, _)| w).collect(),
            })
        }
        "inotify" => Err(FilesError::unsupported(fd, "inotify is not supported")),
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

/// Character devices: the memory devices and terminals.
fn device(
    fd: i32,
    path: String,
    rdev: u64,
    identity: Option<FileIdentity>,
) -> Result<FdKind, FilesError> {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let memory_device = major == 1 && matches!(minor, 3 | 5 | 7 | 8 | 9);
    // 136-143: /dev/pts/N; 4: /dev/ttyN and serial; 5:0 /dev/tty; 5:1 /dev/console.
    let terminal = (136..=143).contains(&major) || major == 4 || (major == 5 && minor <= 1);
    if memory_device || terminal {
        Ok(FdKind::Device { path, identity })
    } else {
        Err(FilesError::unsupported(
            fd,
            format!("device {path} ({major}:{minor}) is not supported"),
        ))
    }
}

/// An epoll instance is keyed by (file, descriptor number): a watch whose
/// number was closed, or now names another file, cannot be re-added.
fn check_epoll_targets(listed: &[Listed]) -> Result<(), FilesError> {
    for epoll in listed
        .iter()
        .filter(|e| e.target == "anon_inode:[eventpoll]")
    {
        for (watch, ino) in epoll.info.epoll_watches().unwrap_or_default() {
            match listed.iter().find(|o| o.fd == watch.fd) {
                None => {
                    return Err(FilesError::unsupported(
                        epoll.fd,
                        format!(
                            "epoll watches fd {}, which was closed after being added",
                            watch.fd
                        ),
                    ));
                }
                Some(target) if ino != 0 && target.info.ino != ino => {
                    return Err(FilesError::unsupported(
                        epoll.fd,
                        format!(
                            "epoll watches a file that fd {} no longer refers to",
                            watch.fd
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}
