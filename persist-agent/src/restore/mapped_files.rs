//! The files the restored process maps: each opened as the process would,
//! and only if it is still the very file mapped at the checkpoint (its pages
//! are in the process's memory, and the pages it wrote are written over
//! them).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use nix::fcntl::OFlag;
use persist_common::image::{FileType, Mapping, MappingKind};

use super::RestoreError;
use super::spawn::dup_above;
use crate::files::{self, PathAccess, RecordedError};

/// The file of a file mapping, as the image names it.
#[derive(Debug, Clone, Copy)]
pub(super) struct MappedFile<'a> {
    /// Where the mapping starts, for messages.
    pub start: u64,
    /// Its path.
    pub path: &'a str,
    /// Its inode and device at the checkpoint.
    pub inode: u64,
    /// Its device, `major:minor` in hexadecimal.
    pub device: &'a str,
    /// Opened for writing (a shared writable mapping).
    pub writable: bool,
}

/// The files opened for the mappings of a tree's processes, by the
/// credentials they were opened with. A process maps the very open file
/// descriptions an earlier process with the same access had opened, as the
/// forks of one process share theirs, instead of opening and checking each
/// path again (about 20 µs an open; PostgreSQL's six processes map 49 files
/// each, and need a second description of most).
#[derive(Debug, Default)]
pub(super) struct OpenedFiles(Vec<(PathAccess, HashMap<OpenedKey, Vec<File>>)>);

/// A mapped file as the image names it, and whether it is opened for writing.
type OpenedKey = (String, u64, String, bool);

impl OpenedFiles {
    /// The `nth` open file description of `file` a process maps from, as
    /// a new descriptor above `min`. A process needs several of one file
    /// when two of its mappings of it must stay apart ([`would_merge`]):
    /// the first is opened from the path, the others opened again from it,
    /// each checked as the process's open would be; or copied, opened by an
    /// earlier process with the same `access`.
    pub(super) fn description(
        &mut self,
        file: &MappedFile<'_>,
        nth: usize,
        min: RawFd,
        access: &PathAccess,
    ) -> Result<OwnedFd, RestoreError> {
        let index = match self.0.iter().position(|(known, _)| known == access) {
            Some(index) => index,
            None => {
                self.0.push((access.clone(), HashMap::new()));
                self.0.len() - 1
            }
        };
        let key = (
            file.path.to_owned(),
            file.inode,
            file.device.to_owned(),
            file.writable,
        );
        let opened = self.0[index].1.entry(key).or_default();
        while opened.len() <= nth {
            let fd = match opened.first() {
                None => open_mapped_file(file, min, access)?,
                Some(first) => reopen_mapped_file(first, file, min, access)?,
            };
            opened.push(File::from(fd));
        }
        dup_above(&opened[nth], min)
    }
}

/// Opens the file of the mapping at `start`, as the process would, never
/// through a symlink, and only if it is still the file mapped at checkpoint
/// (whatever the access accepts for descriptors: the process's memory holds
/// pages of that file).
fn open_mapped_file(
    file: &MappedFile<'_>,
    min: RawFd,
    access: &PathAccess,
) -> Result<OwnedFd, RestoreError> {
    let MappedFile {
        start,
        path,
        inode,
        device,
        writable,
    } = *file;
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

/// Opens `opened` (opened by [`open_mapped_file`] for `file`) again as a
/// new open file description, with the permission check of an open by the
/// process. For a mapping that must not share its description with the
/// one before it: see [`would_merge`].
fn reopen_mapped_file(
    opened: &File,
    file: &MappedFile<'_>,
    min: RawFd,
    access: &PathAccess,
) -> Result<OwnedFd, RestoreError> {
    let again = files::reopen_recorded(opened, open_flags(file.writable), access)
        .map_err(open_error(file.start, file.path))?;
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

    /// A file mapped by several processes with the same credentials is
    /// opened once, and each maps that open file description; a second
    /// description of it (two mappings kept apart) is another; a process
    /// with other credentials opens it again as itself, and is refused a
    /// file only root may reach.
    #[test]
    fn a_description_is_shared_only_by_processes_with_the_same_access() {
        crate::test_support::require_root!();
        use crate::sys::fscreds::FsCreds;
        use crate::sys::kobjects::same_file;
        use std::os::fd::AsRawFd;

        // A directory only root may enter.
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let path = dir.path().join("lib.so");
        std::fs::write(&path, b"code").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let device = format!(
            "{:x}:{:02x}",
            libc::major(meta.dev()),
            libc::minor(meta.dev())
        );
        let file = MappedFile {
            start: 0x1000,
            path: path.to_str().unwrap(),
            inode: meta.ino(),
            device: &device,
            writable: false,
        };
        let pid = std::process::id() as i32;
        let same = |a: &OwnedFd, b: &OwnedFd| same_file(pid, a.as_raw_fd(), pid, b.as_raw_fd());
        let root = PathAccess::default();
        let mut opened = OpenedFiles::default();

        let first = opened.description(&file, 0, 3, &root).unwrap();
        let again = opened.description(&file, 0, 3, &root).unwrap();
        assert!(
            same(&first, &again).unwrap(),
            "one description for one access"
        );
        let apart = opened.description(&file, 1, 3, &root).unwrap();
        assert!(
            !same(&first, &apart).unwrap(),
            "the second description is another"
        );
        let apart_again = opened.description(&file, 1, 3, &root).unwrap();
        assert!(same(&apart, &apart_again).unwrap(), "and shared in turn");

        let nobody = PathAccess {
            creds: Some(FsCreds {
                uid: 65534,
                gid: 65534,
                groups: Vec::new(),
            }),
            ..PathAccess::default()
        };
        assert!(
            opened.description(&file, 0, 3, &nobody).is_err(),
            "another user's process was given root's description"
        );
    }
}
