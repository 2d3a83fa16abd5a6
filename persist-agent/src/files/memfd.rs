//! memfds: anonymous files with a name, seals and contents.
//!
//! Saved: name, size, seals, offset, and contents unless the process maps
//! the memfd (its pages are then saved with the memory). Restored: one new
//! memfd per saved inode, shared by all its descriptors and mappings.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use persist_common::image::{FdInfo, FdKind};

use super::FilesError;
use super::listed::Listed;
use super::open::{open_with, self_link};
use crate::sys::kobjects;
use crate::sys::pidfd::PidFd;

/// Inodes of memfds the process maps (their pages are saved with memory).
pub(super) fn mapped_memfd_inodes(pid: i32) -> Result<HashSet<u64>, FilesError> {
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

/// A memfd: its name, size, seals and (once per memfd, unless the process
/// maps it, whose pages are saved with its memory) its contents.
pub(super) fn save(
    pid: i32,
    pidfd: &PidFd,
    entry: &Listed,
    name: &str,
    mapped_memfds: &HashSet<u64>,
    contents_saved: &mut HashSet<u64>,
) -> Result<FdKind, FilesError> {
    let fd = entry.fd;
    let name = name.strip_suffix(" (deleted)").unwrap_or(name).to_owned();
    let inode = entry.info.ino;
    let dup = pidfd
        .get_fd(fd)
        .map_err(FilesError::io(fd, "pidfd_getfd"))?;
    let seals = kobjects::seals(dup.as_fd()).map_err(FilesError::io(fd, "F_GET_SEALS"))?;
    let size = fs::File::from(dup)
        .metadata()
        .map_err(FilesError::io(fd, "fstat"))?
        .len();
    let contents = if mapped_memfds.contains(&inode) || !contents_saved.insert(inode) {
        Vec::new()
    } else {
        super::regular::read_through_proc(pid, fd)?
    };
    Ok(FdKind::Memfd {
        name,
        inode,
        offset: entry.info.pos,
        size,
        seals,
        contents,
    })
}

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
pub(super) fn memfd(
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
