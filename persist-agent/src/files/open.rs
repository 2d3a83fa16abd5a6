//! Opening descriptors again with the flags the image saved: the flags a
//! reopen may use, and the recorded paths opened as the restored process.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::OFlag;
use persist_common::image::{FdInfo, FileIdentity, FileType};

use super::FilesError;
use super::recorded::{self, PathAccess, RecordedError};

/// Flags that only matter while opening, or that would make a reopen
/// through a path or a `/proc/self/fd` link fail or create a file.
pub(super) const OPEN_ONLY_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_CREAT
    | libc::O_EXCL
    | libc::O_TRUNC
    | libc::O_CLOEXEC
    | libc::O_NOFOLLOW
    | (libc::O_TMPFILE & !libc::O_DIRECTORY);

/// The `open` flags that reopen a file with saved `O_*` flags: the access
/// mode and status flags, never a controlling terminal, nothing that creates
/// or truncates.
pub(super) fn reopen_flags(saved: u32) -> i32 {
    let saved = saved as i32;
    (saved & !OPEN_ONLY_FLAGS) | (saved & libc::O_ACCMODE) | libc::O_NOCTTY
}

/// Opens `path` with saved `O_*` flags (close-on-exec, never a controlling
/// terminal).
pub(super) fn open_with(path: &Path, flags: u32) -> io::Result<File> {
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
pub(super) fn open_recorded(
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
pub(super) fn recorded_error(fd: i32, path: &str, err: RecordedError) -> FilesError {
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
pub(super) fn self_link(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}
