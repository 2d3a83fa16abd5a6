//! Regular files, directories and character devices, reopened by path.
//!
//! Saved: the path, offset and identity (device, inode, type) of the file;
//! an unlinked file with its contents; the memory devices and terminals.
//! Restored: reopened with the saved flags as the restored process, never
//! through a symbolic link, refused if the file is no longer the one
//! recorded; an unlinked file re-created in its directory; a terminal that
//! is gone replaced by /dev/null.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;
use persist_common::image::{FdInfo, FdKind, FileIdentity, FileType};

use super::FilesError;
use super::listed::Listed;
use super::open::{open_recorded, open_with, reopen_flags};
use super::proc_self;
use super::recorded::PathAccess;
use crate::sys::fscreds;

/// Largest contents of an unlinked file or unmapped memfd saved in the
/// manifest.
pub const MAX_SAVED_CONTENTS: u64 = 64 << 20;

/// A descriptor on a path: a regular file or directory (an unlinked file
/// with its contents), a FIFO (saved as a pipe end) or a device.
pub(super) fn save(pid: i32, entry: &Listed, listed: &[Listed]) -> Result<FdKind, FilesError> {
    let fd = entry.fd;
    let target = entry.target.as_str();
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
        return super::pipe::save(pid, entry, listed, Some((path, identity)));
    }
    if kind.is_char_device() {
        return save_device(fd, path, meta.rdev(), identity);
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
pub(super) fn read_through_proc(pid: i32, fd: i32) -> Result<Vec<u8>, FilesError> {
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

/// Character devices: the memory devices and terminals.
fn save_device(
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

/// What the image saved about a file descriptor's file.
pub(super) struct SavedFile<'a> {
    pub path: &'a str,
    pub offset: u64,
    pub unlinked: bool,
    pub contents: &'a [u8],
    pub identity: Option<&'a FileIdentity>,
}

pub(super) fn file(
    info: &FdInfo,
    saved: &SavedFile<'_>,
    access: &PathAccess,
) -> Result<OwnedFd, FilesError> {
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
pub(super) fn device(
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
