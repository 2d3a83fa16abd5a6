//! What the agent opens before the fork for the layout table: every mapped
//! file (checked to be the one recorded), a memfd per shared memory object
//! (filled with its stored pages), the executable and the working directory,
//! and the resource limits to set. The child inherits them all.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::fcntl::OFlag;
use persist_common::image::{FileType, Image, MappingKind, PAGE_SIZE};

use super::RestoreError;
use super::layout::{Attributes, LayoutFds};
use super::mapped_files::open_mapped_file;
use super::spawn::dup_above;
use super::verify::stored_run;
use crate::files::{self, PathAccess, PreparedFds, RecordedError};

/// Descriptors opened before the fork for the layout table.
pub(super) struct Resources {
    mapping_fds: Vec<Option<OwnedFd>>,
    exe: OwnedFd,
    cwd: OwnedFd,
    /// The process attributes the table sets (its resource limits).
    pub(super) attributes: Attributes,
}

impl Resources {
    /// Opens what the layout of `image` needs, each descriptor at `min` or
    /// above (clear of those the process gets), as the process would open
    /// them (`access`). `shared` holds the memfd of each shared memory
    /// object by its saved inode: those met first here are created and
    /// added, so that the other processes of a tree map the same ones.
    pub(super) fn open(
        image: &Image,
        fds: &PreparedFds,
        min: RawFd,
        access: &PathAccess,
        shared: &mut HashMap<u64, OwnedFd>,
    ) -> Result<Self, RestoreError> {
        let manifest = image.manifest();
        let mut filled = HashSet::new();
        let mut mapping_fds = Vec::with_capacity(manifest.mappings.len());
        for mapping in &manifest.mappings {
            let fd = match &mapping.kind {
                MappingKind::File {
                    path,
                    inode,
                    device,
                    ..
                } => Some(open_mapped_file(
                    mapping.start,
                    path,
                    *inode,
                    device,
                    mapping.shared && mapping.protection.write,
                    min,
                    access,
                )?),
                MappingKind::Memfd { inode, .. } | MappingKind::SharedAnonymous { inode } => {
                    if !shared.contains_key(inode) {
                        let fd = match (&mapping.kind, fds.memfd(*inode)) {
                            (MappingKind::Memfd { .. }, Some(fd)) => fd
                                .try_clone_to_owned()
                                .map_err(|e| RestoreError::io("memfd", e))?,
                            _ => new_memfd(*inode)?,
                        };
                        shared.insert(*inode, fd);
                    }
                    let source = &shared[inode];
                    // Once per process: a later process of a tree stores
                    // only the pages an earlier one did not.
                    if filled.insert(*inode) {
                        fill_shared_memory(image, *inode, source)?;
                    }
                    let copy = source
                        .try_clone()
                        .map_err(|e| RestoreError::io("memfd", e))?;
                    Some(dup_above(copy, min)?)
                }
                _ => None,
            };
            mapping_fds.push(fd);
        }
        let exe = open_process_path(
            &manifest.process.exe,
            OFlag::O_RDONLY,
            FileType::Regular,
            access,
        )?;
        let cwd = open_process_path(
            &manifest.process.cwd,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            FileType::Directory,
            access,
        )?;
        let mut rlimits = Vec::new();
        for limit in &manifest.process.rlimits {
            let resource = limit.resource;
            let (soft, hard) = own_rlimit(resource);
            // Without CAP_SYS_RESOURCE a hard limit cannot be raised: keep ours.
            let new_hard = limit.hard.min(hard);
            if new_hard < limit.hard {
                tracing::warn!(
                    resource,
                    recorded = limit.hard,
                    kept = hard,
                    "hard rlimit lowered"
                );
            }
            let new_soft = limit.soft.min(new_hard);
            if (new_soft, new_hard) != (soft, hard) {
                rlimits.push((resource, new_soft, new_hard));
            }
        }
        Ok(Self {
            mapping_fds,
            exe: dup_above(exe.into(), min)?,
            cwd: dup_above(cwd.into(), min)?,
            attributes: Attributes {
                rlimits,
                session_set: false,
            },
        })
    }

    /// Every descriptor held, for the child to keep until its table closes them.
    pub(super) fn raw_fds(&self) -> Vec<RawFd> {
        self.mapping_fds
            .iter()
            .flatten()
            .map(AsRawFd::as_raw_fd)
            .chain([self.exe.as_raw_fd(), self.cwd.as_raw_fd()])
            .collect()
    }

    /// The descriptors as the layout table uses them, the userfaultfd at `uffd`.
    pub(super) fn layout_fds(&self, uffd: RawFd) -> LayoutFds {
        LayoutFds {
            mapping_fds: self
                .mapping_fds
                .iter()
                .map(|fd| fd.as_ref().map(AsRawFd::as_raw_fd))
                .collect(),
            exe: Some(self.exe.as_raw_fd()),
            cwd: Some(self.cwd.as_raw_fd()),
            uffd,
            close: self.raw_fds(),
        }
    }
}

fn own_rlimit(resource: u32) -> (u64, u64) {
    crate::sys::rlimit::get(0, resource).unwrap_or((u64::MAX, u64::MAX))
}

/// Opens the executable or the working directory, as the process would
/// and never through a symlink.
fn open_process_path(
    path: &str,
    flags: OFlag,
    file_type: FileType,
    access: &PathAccess,
) -> Result<File, RestoreError> {
    files::open_recorded(path, flags, None, &[file_type], access).map_err(|err| match err {
        RecordedError::Changed(what) => RestoreError::PathChanged {
            path: path.to_owned(),
            what,
        },
        RecordedError::Io { source, .. } => RestoreError::io(path, source),
    })
}

fn new_memfd(inode: u64) -> Result<OwnedFd, RestoreError> {
    let name = CString::new(format!("persist-shm-{inode}")).expect("no NUL in a number");
    nix::sys::memfd::memfd_create(name.as_c_str(), nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(|e| RestoreError::io("memfd_create", e.into()))
}

/// Writes the stored pages of a shared memory object into `fd`, which every
/// mapping of the object then maps, so they stay shared.
fn fill_shared_memory(image: &Image, inode: u64, fd: &OwnedFd) -> Result<(), RestoreError> {
    let file = File::from(fd.try_clone().map_err(|e| RestoreError::io("memfd", e))?);
    let current = file
        .metadata()
        .map_err(|e| RestoreError::io("memfd", e))?
        .len();
    for mapping in &image.manifest().mappings {
        let (offset, same) = match &mapping.kind {
            MappingKind::Memfd {
                inode: i, offset, ..
            } => (*offset, *i == inode),
            MappingKind::SharedAnonymous { inode: i } => (0, *i == inode),
            _ => continue,
        };
        if !same {
            continue;
        }
        if offset + mapping.len() > current {
            file.set_len(offset + mapping.len())
                .map_err(|e| RestoreError::io("memfd", e))?;
        }
        for run in &mapping.pages {
            let (_, bytes) = stored_run(image, mapping, run)?;
            std::os::unix::fs::FileExt::write_all_at(
                &file,
                bytes,
                offset + run.first_page * PAGE_SIZE,
            )
            .map_err(|e| RestoreError::io("memfd", e))?;
        }
    }
    Ok(())
}
