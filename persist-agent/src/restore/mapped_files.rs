//! The files the restored process maps: each opened as the process would,
//! and only if it is still the very file mapped at the checkpoint (its pages
//! are in the process's memory, and the pages it wrote are written over
//! them).

use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use nix::fcntl::OFlag;
use persist_common::image::FileType;

use super::RestoreError;
use super::spawn::dup_above;
use crate::files::{self, PathAccess, RecordedError};

/// Opens the file of the mapping at `start`, as the process would, never
/// through a symlink, and only if it is still the file mapped at checkpoint
/// (whatever the access accepts for descriptors: the process's memory holds
/// pages of that file).
pub(super) fn open_mapped_file(
    start: u64,
    path: &str,
    inode: u64,
    device: &str,
    writable: bool,
    min: RawFd,
    access: &PathAccess,
) -> Result<OwnedFd, RestoreError> {
    let flags = if writable {
        OFlag::O_RDWR
    } else {
        OFlag::O_RDONLY
    };
    let changed = |what: String| RestoreError::FileChanged {
        address: start,
        path: path.to_owned(),
        what,
    };
    let file =
        files::open_recorded(path, flags, None, &[FileType::Regular], access).map_err(|err| {
            match err {
                RecordedError::Changed(what) => changed(what),
                RecordedError::Io { source, .. } => RestoreError::io(path, source),
            }
        })?;
    let meta = file.metadata().map_err(|e| RestoreError::io(path, e))?;
    let device_matches = device.split_once(':').is_none_or(|(major, minor)| {
        match (
            u64::from_str_radix(major, 16),
            u64::from_str_radix(minor, 16),
        ) {
            (Ok(major), Ok(minor)) => {
                libc::major(meta.dev()) as u64 == major && libc::minor(meta.dev()) as u64 == minor
            }
            _ => true,
        }
    });
    if meta.ino() != inode {
        return Err(changed(format!(
            "its inode was {inode}, it is now {}",
            meta.ino()
        )));
    }
    if !device_matches {
        return Err(changed(format!(
            "its device was {device}, it is now {:x}:{:02x}",
            libc::major(meta.dev()),
            libc::minor(meta.dev())
        )));
    }
    dup_above(file.into(), min)
}
