//! Opening a path an image recorded as the restored process would, and
//! only if it still names the recorded file.
//!
//! Every path of an image came from `/proc/PID/fd`, `/proc/PID/maps`,
//! `/proc/PID/exe` or `/proc/PID/cwd`, which the kernel resolved: none of
//! them goes through a symbolic link, so a symlink found on the way now was
//! put there since, perhaps by the service's user to reach a file it may not
//! read. Paths are opened with the file-system credentials of the process
//! being restored (so the agent's root never opens a file for it), without
//! following any symlink, first as `O_PATH` to check what they name, then
//! reopened through that descriptor with the saved flags.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use persist_common::image::{Credentials, FileIdentity, FileType};

use crate::sys::fscreds::{self, FsCreds, FsCredsGuard};

/// How restore opens the paths an image names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathAccess {
    /// Credentials to open them with: the restored process's, or `None` to
    /// open them as the agent (for a process whose fsuid is root).
    pub creds: Option<FsCreds>,
    /// Reopen a path that names another file than the one recorded (other
    /// device or inode, same type) instead of refusing it.
    pub accept_changed_files: bool,
    /// The process's effective uid, to charge the per-user kernel objects
    /// made for it (inotify instances) to, or `None` to charge the agent's
    /// (for a process whose effective uid is root).
    pub euid: Option<u32>,
    /// Files the agent itself opened for the process (the daemon's log of
    /// the service, its stdout and stderr), opened with the agent's
    /// credentials: the process never had access to them by path. They are
    /// still checked like every other path, but one replaced by another
    /// file of the same type is reopened: the agent's own files live in
    /// its root-only state directory, and a log removed by the
    /// administrator is created anew by the agent. [`PathAccess::for_process`]
    /// adds each one's resolved path, once (a prepare opens a hundred paths).
    pub agent_files: Vec<PathBuf>,
}

impl PathAccess {
    /// Access as the process with credentials `creds` has it: root keeps the
    /// agent's own.
    pub fn for_process(
        creds: &Credentials,
        accept_changed_files: bool,
        agent_files: Vec<PathBuf>,
    ) -> Self {
        // Resolved once here rather than at every path opened: python's
        // restore opened 70 paths, each resolving the log twice.
        let resolved: Vec<PathBuf> = agent_files
            .iter()
            .filter_map(|file| std::fs::canonicalize(file).ok())
            .filter(|resolved| !agent_files.contains(resolved))
            .collect();
        let mut agent_files = agent_files;
        agent_files.extend(resolved);
        let fsuid = creds.uids[3];
        let euid = creds.uids[1];
        Self {
            euid: (euid != 0).then_some(euid),
            creds: (fsuid != 0).then(|| FsCreds {
                uid: fsuid,
                gid: creds.gids[3],
                groups: creds.groups.clone(),
            }),
            accept_changed_files,
            agent_files,
        }
    }

    /// Whether `path` (resolved, as recorded) is one of the agent's files,
    /// which may have been named through a symlink (its resolved path is
    /// among them too).
    fn is_agent_file(&self, path: &str) -> bool {
        self.agent_files.iter().any(|file| file == Path::new(path))
    }

    /// Switches the calling thread to the process's file-system credentials
    /// until the guard is dropped (nothing for root).
    pub fn assume(&self) -> io::Result<Option<FsCredsGuard>> {
        self.creds.as_ref().map(FsCreds::assume).transpose()
    }
}

/// Why a recorded path was not opened.
#[derive(Debug, thiserror::Error)]
pub enum RecordedError {
    /// The path names another file than the recorded one, or goes through
    /// a symbolic link.
    #[error("{0}")]
    Changed(String),
    /// The open failed.
    #[error("{action}")]
    Io {
        /// What was being done (a verb the path follows in messages).
        action: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl RecordedError {
    fn io(action: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io { action, source }
    }
}

/// The identity of what `fd` is open on.
pub fn identity_of(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<FileIdentity> {
    let stat = fscreds::stat(fd)?;
    Ok(FileIdentity {
        device: stat.st_dev,
        inode: stat.st_ino,
        file_type: FileType::from_mode(stat.st_mode).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown file type in mode {:o}", stat.st_mode),
            )
        })?,
    })
}

/// Opens the recorded `path` with `flags`, under `access`, if it is still
/// the file `expected` (when the image recorded one) and of one of the
/// `types`. A changed file of the right type is opened anyway when
/// `access` accepts changed files; a symlink on the way, or a file of
/// another type, never is (opening a FIFO in place of a file would block).
pub fn open(
    path: &str,
    flags: OFlag,
    expected: Option<&FileIdentity>,
    types: &[FileType],
    access: &PathAccess,
) -> Result<File, RecordedError> {
    let agent_file = access.is_agent_file(path);
    let _creds = if agent_file {
        None
    } else {
        access
            .assume()
            .map_err(RecordedError::io("taking the process's credentials"))?
    };
    let at = fscreds::open_no_symlinks(Path::new(path), OFlag::O_PATH, Mode::empty())
        .map_err(|err| match err.raw_os_error() {
            Some(libc::ELOOP) => RecordedError::Changed(
                "a symbolic link is in its path now, and recorded paths are never followed through one".into(),
            ),
            _ => RecordedError::Io {
                action: "reopening",
                source: err,
            },
        })?;
    let now = identity_of(at.as_fd()).map_err(RecordedError::io("fstat"))?;
    if !types.contains(&now.file_type) {
        return Err(RecordedError::Changed(format!(
            "it is a {} now, not a {}",
            now.file_type.as_str(),
            types.first().map_or("file", |t| t.as_str())
        )));
    }
    if let Some(difference) = expected.and_then(|e| e.difference(&now)) {
        let same_type = expected.is_some_and(|e| e.file_type == now.file_type);
        if !((access.accept_changed_files || agent_file) && same_type) {
            let hint = if same_type {
                " (--accept-changed-files reopens it anyway)"
            } else {
                ""
            };
            return Err(RecordedError::Changed(format!(
                "not the file the image recorded: {difference}{hint}"
            )));
        }
        tracing::warn!(path, "reopening a changed file as accepted: {difference}");
    }
    fscreds::reopen(at.as_fd(), flags).map_err(RecordedError::io("reopening"))
}

/// Reopens `file` with `flags` under `access`, with the permission check an
/// open of its path by the restored process would have.
pub fn reopen(file: &File, flags: OFlag, access: &PathAccess) -> Result<File, RecordedError> {
    let _creds = access
        .assume()
        .map_err(RecordedError::io("taking the process's credentials"))?;
    fscreds::reopen(file.as_fd(), flags).map_err(RecordedError::io("reopening"))
}
