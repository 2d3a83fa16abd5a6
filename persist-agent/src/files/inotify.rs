//! inotify instances: every watch, by path, with its mask and descriptor.
//!
//! fdinfo shows a watch by inode and file handle only. Saved: the path of
//! each watched file, found by opening the handle (`open_by_handle_at`, on
//! a mount of the watch's file system in the process's mount table) and
//! reading back where that descriptor points, checked by opening the path
//! again; the watch descriptor, the mask and the file's identity. A watch
//! on a deleted file, or on a file system that cannot open handles
//! (`/proc`, `/sys`), is refused. Events queued and not yet read are not
//! saved: they describe changes before the checkpoint, and a process
//! restored later has missed the changes since anyway.
//!
//! Restored: a new instance here, in the agent, charged to the process's
//! effective user (instances count against a per-user limit); each watch is
//! added, in
//! descriptor order, to the file its path names if that is still the
//! recorded file (opened as the process would, without following symbolic
//! links, see [`super::recorded`]), with the process's credentials (a watch
//! needs read access), and with `INOTIFY_IOC_SETNEXTWD` first so that it
//! gets the descriptor the process knows. The flags (`O_NONBLOCK`) are set
//! with the descriptor's, like every other kind's.

use std::fs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use persist_common::image::{FdKind, FileType, InotifyWatch};
use procfs::FromRead;
use procfs::process::{MountInfo, MountInfos};

use super::FilesError;
use super::fdinfo::{FdInfoText, InotifyWatchText};
use super::recorded::{self, PathAccess, RecordedError};
use crate::sys::{fscreds, notify};

/// The mask bits a watch can hold: events, `IN_ONESHOT`, `IN_EXCL_UNLINK`.
const WATCH_MASK: u32 = libc::IN_ALL_EVENTS | libc::IN_ONESHOT | libc::IN_EXCL_UNLINK;

/// Every type of file a watch may be on (a symbolic link itself cannot be
/// reopened: recorded paths never go through one).
const WATCHABLE: [FileType; 6] = [
    FileType::Directory,
    FileType::Regular,
    FileType::CharDevice,
    FileType::BlockDevice,
    FileType::Fifo,
    FileType::Socket,
];

/// An inotify instance's watches, each resolved to its path.
pub(super) fn save(pid: i32, fd: i32, info: &FdInfoText) -> Result<FdKind, FilesError> {
    let mut marks = info.inotify_watches().ok_or_else(|| {
        FilesError::unsupported(fd, "inotify: unexpected fdinfo (unreadable watch lines)")
    })?;
    marks.sort_by_key(|mark| mark.wd);
    let mounts = if marks.is_empty() {
        MountInfos(Vec::new())
    } else {
        mount_table(pid)?
    };
    let watches = marks
        .iter()
        .map(|mark| saved_watch(pid, fd, mark, &mounts))
        .collect::<Result<_, _>>()?;
    Ok(FdKind::Inotify { watches })
}

/// The process's mount table.
fn mount_table(pid: i32) -> Result<MountInfos, FilesError> {
    let path = format!("/proc/{pid}/mountinfo");
    let proc_err = |source| FilesError::Proc {
        pid,
        path: path.clone(),
        source,
    };
    let text = fs::read(&path).map_err(proc_err)?;
    MountInfos::from_read(text.as_slice())
        .map_err(|err| proc_err(std::io::Error::new(std::io::ErrorKind::InvalidData, err)))
}

/// One watch of instance `fd`: its path, found through its file handle.
fn saved_watch(
    pid: i32,
    fd: i32,
    mark: &InotifyWatchText,
    mounts: &MountInfos,
) -> Result<InotifyWatch, FilesError> {
    let device = format!("{}:{}", mark.sdev >> 20, mark.sdev & 0xf_ffff);
    let what = format!(
        "inotify watch {} (inode {} on device {device})",
        mark.wd, mark.ino
    );
    let Some((handle_type, handle)) = &mark.handle else {
        return Err(FilesError::unsupported(
            fd,
            format!("{what}: the kernel shows no file handle for it, so its path is unknown"),
        ));
    };
    // A mount of the whole file system first: a bind mount of a
    // subdirectory does not reach every file.
    let mut candidates: Vec<&MountInfo> = mounts.iter().filter(|m| m.majmin == device).collect();
    candidates.sort_by_key(|m| m.root != "/");
    let mut failure = None;
    for mount in candidates {
        let at = Path::new(&format!("/proc/{pid}/root")).join(
            mount
                .mount_point
                .strip_prefix("/")
                .unwrap_or(&mount.mount_point),
        );
        // Not O_PATH: open_by_handle_at refuses an O_PATH mount descriptor.
        let opened = nix::fcntl::open(
            &at,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(std::io::Error::from)
        .and_then(|dir| notify::open_by_handle(dir.as_fd(), *handle_type, handle, libc::O_PATH));
        match opened {
            Ok(file) => return described(fd, mark, &what, &file),
            Err(err) => {
                failure.get_or_insert((mount.mount_point.clone(), err));
            }
        }
    }
    Err(match failure {
        Some((mount, source)) => FilesError::Io {
            fd,
            action: format!(
                "{what}: opening it by its file handle on {}",
                mount.display()
            ),
            source,
        },
        None => FilesError::unsupported(
            fd,
            format!("{what}: no mount of that device in the process's mount table"),
        ),
    })
}

/// The watch for `mark`, whose file `file` was opened by handle.
fn described(
    fd: i32,
    mark: &InotifyWatchText,
    what: &str,
    file: &OwnedFd,
) -> Result<InotifyWatch, FilesError> {
    let link = format!("/proc/self/fd/{}", file.as_raw_fd());
    let path =
        fs::read_link(&link).map_err(FilesError::io(fd, format!("{what}: reading {link}")))?;
    let stat = fscreds::stat(file.as_fd()).map_err(FilesError::io(fd, format!("{what}: fstat")))?;
    let path = path.to_string_lossy().into_owned();
    if stat.st_nlink == 0 {
        let shown = path.strip_suffix(" (deleted)").unwrap_or(&path);
        return Err(FilesError::unsupported(
            fd,
            format!(
                "{what}: {shown} was deleted, and a watch on a deleted file cannot be restored"
            ),
        ));
    }
    let identity = recorded::identity_of(file.as_fd())
        .map_err(FilesError::io(fd, format!("{what}: fstat")))?;
    // The handle may give a file without a known name (a hard-linked file
    // whose name left the cache): the path must lead back to it.
    let leads_back = fscreds::open_no_symlinks(Path::new(&path), OFlag::O_PATH, Mode::empty())
        .and_then(|again| recorded::identity_of(again.as_fd()))
        .is_ok_and(|again| identity.difference(&again).is_none());
    if !leads_back {
        return Err(FilesError::unsupported(
            fd,
            format!("{what}: no path leads to it ({path} is another file)"),
        ));
    }
    Ok(InotifyWatch {
        wd: mark.wd,
        mask: mark.mask,
        path,
        identity,
    })
}

/// A new inotify instance with the saved watches, each at its descriptor.
pub(super) fn create(
    fd: i32,
    watches: &[InotifyWatch],
    access: &PathAccess,
) -> Result<OwnedFd, FilesError> {
    // Charged to the process's user, as its own instance was: not to the
    // agent's root, whose instance limit (128 by default) the host shares.
    let instance = match access.euid {
        Some(euid) => notify::inotify_charged_to(euid)
            .map_err(FilesError::io(fd, format!("inotify_init1 as uid {euid}")))?,
        None => notify::inotify().map_err(FilesError::io(fd, "inotify_init1"))?,
    };
    let mut previous = 0;
    for watch in watches {
        let wd = watch.wd;
        if wd <= previous {
            return Err(FilesError::invalid(
                fd,
                format!("inotify watch {wd} is not above the one before ({previous})"),
            ));
        }
        previous = wd;
        if !watch.path.starts_with('/') {
            return Err(FilesError::invalid(
                fd,
                format!("inotify watch {wd}: {} is not an absolute path", watch.path),
            ));
        }
        if watch.mask & !WATCH_MASK != 0 || watch.mask & libc::IN_ALL_EVENTS == 0 {
            return Err(FilesError::invalid(
                fd,
                format!(
                    "inotify watch {wd}: mask {:#x} is not a watch's",
                    watch.mask
                ),
            ));
        }
        let file = recorded::open(
            &watch.path,
            OFlag::O_PATH,
            Some(&watch.identity),
            &WATCHABLE,
            access,
        )
        .map_err(|err| watch_error(fd, watch, err))?;
        notify::set_next_wd(instance.as_fd(), wd).map_err(FilesError::io(
            fd,
            format!("inotify watch {wd}: INOTIFY_IOC_SETNEXTWD"),
        ))?;
        let given = {
            let _creds = access
                .assume()
                .map_err(FilesError::io(fd, "taking the process's credentials"))?;
            // IN_MASK_CREATE: a path that now names the file of an earlier
            // watch must not merge into it.
            notify::add_watch(
                instance.as_fd(),
                file.as_fd(),
                watch.mask | libc::IN_MASK_CREATE,
            )
        }
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EEXIST) => FilesError::Changed {
                fd,
                path: watch.path.clone(),
                what: format!("inotify watch {wd}: an earlier watch is on this file now"),
            },
            _ => FilesError::Io {
                fd,
                action: format!("inotify watch {wd}: watching {}", watch.path),
                source,
            },
        })?;
        if given != wd {
            return Err(FilesError::unsupported(
                fd,
                format!(
                    "inotify watch {wd}: the kernel gave descriptor {given} for {}",
                    watch.path
                ),
            ));
        }
    }
    Ok(instance)
}

/// The error about the path of `watch` of instance `fd`.
fn watch_error(fd: i32, watch: &InotifyWatch, err: RecordedError) -> FilesError {
    match err {
        RecordedError::Changed(what) => FilesError::Changed {
            fd,
            path: watch.path.clone(),
            what: format!("inotify watch {}: {what}", watch.wd),
        },
        RecordedError::Io { action, source } => FilesError::Io {
            fd,
            action: format!("inotify watch {}: {action} {}", watch.wd, watch.path),
            source,
        },
    }
}
