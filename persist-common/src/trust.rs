//! Which files and directories the agent trusts: it runs as root and acts
//! on what it reads (an image names the credentials to restore, a service
//! file the command to run), so whoever can write them can act as root.
//!
//! # Rules
//!
//! A *trusted file* is opened with `O_NOFOLLOW | O_NONBLOCK` and judged on
//! the opened descriptor (`fstat`), never by its path first, so it cannot be
//! swapped between the check and the read. It must be a regular file (a
//! FIFO would block the reader forever, a device or socket is not data, a
//! symbolic link could point anywhere), owned by root (or by the agent's
//! effective uid) and not writable by group or others.
//!
//! A *trusted directory* is checked along its whole path, as sshd's
//! `StrictModes` does: the path is resolved (symbolic links followed once),
//! then every directory from `/` down to it is opened in turn, relative to
//! the one before and without following links, and each must be owned by
//! root (or the agent's euid) and not writable by group or others. One
//! exception, for ancestors only: a directory with the sticky bit (like
//! `/tmp`) may be writable by others. There the kernel lets only an entry's
//! owner (or root) rename or remove it, and the next directory on the path
//! must itself be owned by root, so nobody else can swap it for their own;
//! they can only add names of their own, which the path does not use. The
//! directory itself may never be writable by others, sticky or not, since
//! anyone could then add files to it.
//!
//! Once a directory passes, nobody but root can change any directory on its
//! path, so paths under it keep naming what was checked.

use std::fs::{File, Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use thiserror::Error;

/// Why a file or directory is not trusted.
#[derive(Debug, Error)]
pub enum TrustError {
    /// It could not be opened or examined.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Someone other than root (or the agent's euid) owns it.
    #[error(
        "{path}: owned by uid {uid}, not by root: refusing it (the agent runs as root and trusts only what root owns)"
    )]
    Owner {
        /// The file or directory.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// Its group or others may write it.
    #[error(
        "{path}: writable by group or others (mode {mode:04o}): refusing it (make it owned by root and not group- or world-writable)"
    )]
    Mode {
        /// The file or directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// It is not the kind of file expected.
    #[error("{path}: a {found}, not a {expected}: refusing it")]
    Type {
        /// The file.
        path: PathBuf,
        /// What it is.
        found: &'static str,
        /// What was expected.
        expected: &'static str,
    },
}

impl TrustError {
    /// The file or directory refused.
    pub fn path(&self) -> &Path {
        match self {
            Self::Io { path, .. }
            | Self::Owner { path, .. }
            | Self::Mode { path, .. }
            | Self::Type { path, .. } => path,
        }
    }

    /// True when the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Opens `path` for reading as a trusted file (see the module's rules).
pub fn open_trusted_file(path: &Path) -> Result<File, TrustError> {
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let file = match opened {
        Ok(file) => file,
        // O_NOFOLLOW's answer to a symbolic link as the last component.
        Err(err) if err.raw_os_error() == Some(libc::ELOOP) => {
            return Err(TrustError::Type {
                path: path.to_owned(),
                found: "symbolic link",
                expected: "regular file",
            });
        }
        Err(source) => {
            return Err(TrustError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let meta = file.metadata().map_err(|source| TrustError::Io {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(TrustError::Type {
            path: path.to_owned(),
            found: kind(&meta),
            expected: "regular file",
        });
    }
    check_owner_and_mode(&meta, path, false)?;
    Ok(file)
}

/// Reads the trusted file `path` (see [`open_trusted_file`]) whole, up to
/// `limit` bytes: a longer file is refused rather than read on.
pub fn read_trusted_file(path: &Path, limit: u64) -> Result<Vec<u8>, TrustError> {
    let io = |source| TrustError::Io {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    open_trusted_file(path)?
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("longer than {limit} bytes"),
        )));
    }
    Ok(bytes)
}

/// Checks `path` as a trusted directory (see the module's rules) and returns
/// it resolved, free of symbolic links: use that path from then on.
pub fn trusted_dir(path: &Path) -> Result<PathBuf, TrustError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| TrustError::Io { path, source }
    };
    let resolved = std::fs::canonicalize(path).map_err(io(path))?;
    let names: Vec<_> = resolved
        .components()
        .filter_map(|component| match component {
            Component::Normal(name) => Some(name),
            _ => None,
        })
        .collect();
    let mut current = PathBuf::from("/");
    let mut dir = open_dir_component(None, &current)?;
    check_dir(&dir, &current, names.is_empty())?;
    for (index, name) in names.iter().enumerate() {
        current.push(name);
        let child = open_dir_component(Some(&dir), Path::new(name))
            .map_err(|err| with_path(err, &current))?;
        check_dir(&child, &current, index + 1 == names.len())?;
        dir = child;
    }
    Ok(resolved)
}

/// Opens one directory on a path, `O_PATH` (no read access needed) and not
/// following a symbolic link, relative to `parent` when given.
fn open_dir_component(parent: Option<&File>, name: &Path) -> Result<File, TrustError> {
    use std::os::fd::AsFd;
    let flags =
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_CLOEXEC;
    let opened = match parent {
        Some(parent) => {
            nix::fcntl::openat(parent.as_fd(), name, flags, nix::sys::stat::Mode::empty())
        }
        None => nix::fcntl::open(name, flags, nix::sys::stat::Mode::empty()),
    };
    opened.map(File::from).map_err(|errno| TrustError::Io {
        path: name.to_owned(),
        source: errno.into(),
    })
}

fn with_path(err: TrustError, path: &Path) -> TrustError {
    match err {
        TrustError::Io { source, .. } => TrustError::Io {
            path: path.to_owned(),
            source,
        },
        other => other,
    }
}

/// Checks one directory of a trusted path; `last` is the directory itself,
/// which may not be writable by others even with the sticky bit.
fn check_dir(dir: &File, path: &Path, last: bool) -> Result<(), TrustError> {
    let meta = dir.metadata().map_err(|source| TrustError::Io {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(TrustError::Type {
            path: path.to_owned(),
            found: kind(&meta),
            expected: "directory",
        });
    }
    check_owner_and_mode(&meta, path, !last)
}

fn check_owner_and_mode(meta: &Metadata, path: &Path, sticky_ok: bool) -> Result<(), TrustError> {
    let uid = meta.uid();
    if uid != 0 && uid != nix::unistd::geteuid().as_raw() {
        return Err(TrustError::Owner {
            path: path.to_owned(),
            uid,
        });
    }
    let mode = meta.mode() & 0o7777;
    let sticky = mode & libc::S_ISVTX != 0;
    if mode & 0o022 != 0 && !(sticky_ok && sticky) {
        return Err(TrustError::Mode {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// A readable name for the type of file `meta` describes.
fn kind(meta: &Metadata) -> &'static str {
    let file_type = meta.file_type();
    if file_type.is_file() {
        "regular file"
    } else if file_type.is_dir() {
        "directory"
    } else if file_type.is_symlink() {
        "symbolic link"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_char_device() {
        "character device"
    } else {
        "file of unknown type"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_private_file_is_trusted_and_others_are_refused_by_check() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("file");
        fs::write(&path, b"data").unwrap();
        chmod(&path, 0o600);
        assert!(open_trusted_file(&path).is_ok());

        chmod(&path, 0o620);
        let err = open_trusted_file(&path).unwrap_err();
        assert!(matches!(err, TrustError::Mode { mode: 0o620, .. }), "{err}");

        chmod(&path, 0o600);
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let err = open_trusted_file(&path).unwrap_err();
        assert!(matches!(err, TrustError::Owner { uid: 65534, .. }), "{err}");
        assert!(err.to_string().contains("owned by uid 65534"), "{err}");
        assert!(!err.to_string().contains("mode"), "{err}");

        let link = temp.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let err = open_trusted_file(&link).unwrap_err();
        assert!(
            matches!(
                err,
                TrustError::Type {
                    found: "symbolic link",
                    ..
                }
            ),
            "{err}"
        );

        let fifo = temp.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = open_trusted_file(&fifo).unwrap_err();
        assert!(
            matches!(err, TrustError::Type { found: "FIFO", .. }),
            "{err}"
        );

        let err = open_trusted_file(temp.path()).unwrap_err();
        assert!(
            matches!(
                err,
                TrustError::Type {
                    found: "directory",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_trusted_file_is_read_whole_up_to_its_limit() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("record");
        fs::write(&path, b"12345678").unwrap();
        chmod(&path, 0o600);
        assert_eq!(read_trusted_file(&path, 8).unwrap(), b"12345678");
        let err = read_trusted_file(&path, 7).unwrap_err();
        assert!(
            err.to_string().contains("longer than 7 bytes"),
            "a file over the limit is refused: {err}"
        );
        chmod(&path, 0o622);
        assert!(
            matches!(read_trusted_file(&path, 8), Err(TrustError::Mode { .. })),
            "a file others can write is refused before it is read"
        );
    }

    #[test]
    fn a_directory_is_judged_along_its_whole_path() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("a/b");
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(
            trusted_dir(&dir).unwrap(),
            dir,
            "/tmp, sticky, is fine above"
        );

        chmod(&temp.path().join("a"), 0o777);
        let err = trusted_dir(&dir).unwrap_err();
        assert_eq!(err.path(), temp.path().join("a"), "{err}");
        assert!(matches!(err, TrustError::Mode { .. }), "{err}");

        chmod(&temp.path().join("a"), 0o1777);
        assert!(trusted_dir(&dir).is_ok(), "a sticky ancestor is fine");
        chmod(&dir, 0o1777);
        let err = trusted_dir(&dir).unwrap_err();
        assert!(
            matches!(err, TrustError::Mode { .. }),
            "but not the directory itself: {err}"
        );
        chmod(&dir, 0o700);

        std::os::unix::fs::chown(temp.path().join("a"), Some(65534), None).unwrap();
        let err = trusted_dir(&dir).unwrap_err();
        assert!(matches!(err, TrustError::Owner { uid: 65534, .. }), "{err}");
    }

    #[test]
    fn a_symbolic_link_is_resolved_then_judged() {
        let temp = tempfile::tempdir().unwrap();
        let real = temp.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = temp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(trusted_dir(&link).unwrap(), real);
        let err = trusted_dir(&temp.path().join("missing")).unwrap_err();
        assert!(err.is_not_found(), "{err}");
    }
}
