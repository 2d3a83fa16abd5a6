//! The files the restored process maps: each opened as the process would,
//! and only if it is still the very file mapped at the checkpoint (its pages
//! are in the process's memory, and the pages it wrote are written over
//! them).

use std::fs::File;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use nix::fcntl::OFlag;
use persist_common::image::{FileType, Mapping, MappingKind};

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
    let changed = |what: String| RestoreError::FileChanged {
        address: start,
        path: path.to_owned(),
        what,
    };
    let file = files::open_recorded(
        path,
        open_flags(writable),
        None,
        &[FileType::Regular],
        access,
    )
    .map_err(open_error(start, path))?;
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
    dup_above(file, min)
}

/// Opens `file` (opened by [`open_mapped_file`] for the mapping at `start`)
/// again as a new open file description, with the permission check of an
/// open by the process. For a mapping that must not share its description
/// with the one before it: see [`would_merge`].
pub(super) fn reopen_mapped_file(
    file: &File,
    start: u64,
    path: &str,
    writable: bool,
    min: RawFd,
    access: &PathAccess,
) -> Result<OwnedFd, RestoreError> {
    let again = files::reopen_recorded(file, open_flags(writable), access)
        .map_err(open_error(start, path))?;
    dup_above(again, min)
}

/// How a mapped file is opened: for writing only for a shared writable
/// mapping (a private one never writes to its file).
fn open_flags(writable: bool) -> OFlag {
    if writable {
        OFlag::O_RDWR
    } else {
        OFlag::O_RDONLY
    }
}

/// The restore error of a failed open of the file mapped at `start`.
fn open_error(start: u64, path: &str) -> impl Fn(RecordedError) -> RestoreError + '_ {
    move |err| match err {
        RecordedError::Changed(what) => RestoreError::FileChanged {
            address: start,
            path: path.to_owned(),
            what,
        },
        RecordedError::Io { source, .. } => RestoreError::io(path, source),
    }
}

/// Whether the kernel would merge `next`, mapped from the open file
/// description `previous` was mapped from, into `previous`: adjacent, the
/// same file at contiguous offsets, the same protection and sharing. The
/// process had them apart (a library's relro part, made read-only after
/// its other read-only part was mapped), so they must stay apart:
/// mappings of two open file descriptions never merge.
pub(super) fn would_merge(previous: &Mapping, next: &Mapping) -> bool {
    let (
        MappingKind::File {
            path,
            inode,
            offset,
            ..
        },
        MappingKind::File {
            path: next_path,
            inode: next_inode,
            offset: next_offset,
            ..
        },
    ) = (&previous.kind, &next.kind)
    else {
        return false;
    };
    previous.end == next.start
        && path == next_path
        && inode == next_inode
        && offset + previous.len() == *next_offset
        && previous.protection == next.protection
        && previous.shared == next.shared
}

#[cfg(test)]
mod tests {
    use persist_common::image::{PAGE_SIZE, Protection};

    use super::*;

    fn libc_part(start: u64, pages: u64, offset: u64, write: bool) -> Mapping {
        Mapping {
            start,
            end: start + pages * PAGE_SIZE,
            protection: Protection {
                read: true,
                write,
                exec: false,
            },
            shared: false,
            kind: MappingKind::File {
                path: "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
                device: "fe:00".into(),
                inode: 326279,
                offset,
            },
            pages: Vec::new(),
        }
    }

    #[test]
    fn a_read_only_part_right_after_another_of_its_file_would_merge() {
        let rodata = libc_part(0x7000_0000, 83, 0x17c000, false);
        let relro = libc_part(rodata.end, 4, 0x17c000 + 83 * PAGE_SIZE, false);
        assert!(would_merge(&rodata, &relro));
    }

    #[test]
    fn parts_apart_in_protection_address_or_offset_would_not_merge() {
        let rodata = libc_part(0x7000_0000, 83, 0x17c000, false);
        let data = libc_part(rodata.end, 2, 0x17c000 + 83 * PAGE_SIZE, true);
        assert!(!would_merge(&rodata, &data), "protection differs");
        let after_a_gap = libc_part(rodata.end + PAGE_SIZE, 4, 0x17c000 + 84 * PAGE_SIZE, false);
        assert!(!would_merge(&rodata, &after_a_gap), "not adjacent");
        let elsewhere_in_file = libc_part(rodata.end, 4, 0x1d3000, false);
        assert!(
            !would_merge(&rodata, &elsewhere_in_file),
            "offsets not contiguous"
        );
        let mut other_file = libc_part(rodata.end, 4, 0x17c000 + 83 * PAGE_SIZE, false);
        other_file.kind = MappingKind::File {
            path: "/usr/lib/x86_64-linux-gnu/libm.so.6".into(),
            device: "fe:00".into(),
            inode: 326603,
            offset: 0x17c000 + 83 * PAGE_SIZE,
        };
        assert!(!would_merge(&rodata, &other_file), "another file");
    }
}
