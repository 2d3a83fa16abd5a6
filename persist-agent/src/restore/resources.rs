//! What the agent opens before the fork for the layout table: every mapped
//! file (checked to be the one recorded), a memfd per shared memory object
//! (filled with its stored pages, unless its pages come in lazily:
//! `shared_pages.rs`), the executable and the working directory, and the
//! resource limits to set. The child inherits them all.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::fcntl::OFlag;
use persist_common::image::{FileType, Image, MappingKind, PAGE_SIZE};

use super::RestoreError;
use super::layout::{Attributes, LayoutFds};
use super::mapped_files::{MappedFile, OpenedFiles, would_merge};
use super::posix_shm::{self, MadeFile, MadeFiles};
use super::shared_pages::SharedPages;
use super::spawn::dup_above;
use super::verify::stored_run;
use crate::files::{self, PathAccess, PreparedFds, RecordedError};

/// Descriptors opened before the fork for the layout table.
pub(super) struct Resources {
    /// The descriptor each mapping maps from, by index in the manifest.
    mapping_fds: Vec<Option<RawFd>>,
    /// The descriptors behind `mapping_fds`, each once: the mappings of one
    /// file (a library's text, data and read-only parts) or of one shared
    /// memory object share one.
    held: Vec<OwnedFd>,
    exe: OwnedFd,
    cwd: OwnedFd,
    /// The process attributes the table sets (its resource limits).
    pub(super) attributes: Attributes,
    /// The POSIX shared memory files made for it, to remove if the
    /// restore fails.
    pub(super) created_files: Vec<MadeFile>,
    /// Its shared memory mappings whose pages its pager serves.
    lazy_shared: Vec<(u64, u64)>,
}

impl Resources {
    /// Opens what the layout of `image` needs, each descriptor at `min` or
    /// above (clear of those the process gets), as the process would open
    /// them (`access`). `shared` holds the memfd of each shared memory
    /// object by its saved inode: those met first here are created and
    /// added, so that the other processes of a tree map the same ones. The
    /// objects `lazy` serves are only given their size: their pages come
    /// in through the pagers.
    pub(super) fn open(
        image: &Image,
        fds: &PreparedFds,
        min: RawFd,
        access: &PathAccess,
        opened: &mut OpenedForTree,
        lazy: &SharedPages,
    ) -> Result<Self, RestoreError> {
        let manifest = image.manifest();
        let mut filled = HashSet::new();
        // Removed again if anything below fails.
        let mut created_files = MadeFiles::default();
        let mut mapping_fds = Vec::with_capacity(manifest.mappings.len());
        let mut held: Vec<OwnedFd> = Vec::new();
        // Each file opened once (about 30 files for python's 130 file
        // mappings: each open checks the path as the process and costs
        // ~10 µs on a cold wake's path). By file, the index in `held` of the
        // description its last mapping maps from, and how many descriptions
        // of it the process has.
        let mut opened_files: HashMap<(&str, u64, &str, bool), (usize, usize)> = HashMap::new();
        let mut dup_objects: HashMap<SharedObject, RawFd> = HashMap::new();
        let mut lazy_shared = Vec::new();
        let mut previous = None;
        for mapping in &manifest.mappings {
            let fd = match &mapping.kind {
                MappingKind::File {
                    path,
                    inode,
                    device,
                    ..
                } => {
                    let writable = mapping.shared && mapping.protection.write;
                    let key = (path.as_str(), *inode, device.as_str(), writable);
                    let apart = previous.is_some_and(|previous| would_merge(previous, mapping));
                    let entry = match opened_files.get(&key) {
                        Some(&(known, count)) if !apart => (known, count),
                        known => {
                            let nth = known.map_or(0, |&(_, count)| count);
                            let file = MappedFile {
                                start: mapping.start,
                                path,
                                inode: *inode,
                                device,
                                writable,
                            };
                            held.push(opened.files.description(&file, nth, min, access)?);
                            (held.len() - 1, nth + 1)
                        }
                    };
                    opened_files.insert(key, entry);
                    Some(held[entry.0].as_raw_fd())
                }
                MappingKind::Memfd { inode, .. }
                | MappingKind::SharedAnonymous { inode }
                | MappingKind::PosixShm { inode, .. } => {
                    let object = SharedObject::of(&mapping.kind).expect("shared memory");
                    let source = match opened.shared.entry(object) {
                        Entry::Occupied(known) => known.into_mut(),
                        Entry::Vacant(new) => {
                            new.insert(match (&mapping.kind, fds.memfd(*inode)) {
                                (MappingKind::Memfd { .. }, Some(fd)) => fd
                                    .try_clone_to_owned()
                                    .map_err(|e| RestoreError::io("memfd", e))?,
                                (
                                    MappingKind::PosixShm {
                                        path,
                                        uid,
                                        gid,
                                        mode,
                                        ..
                                    },
                                    _,
                                ) => {
                                    let (fd, made) = posix_shm::create(path, *uid, *gid, *mode)?;
                                    created_files.0.push(made);
                                    fd
                                }
                                _ => new_memfd(*inode)?,
                            })
                        }
                    };
                    // Once per process: a later process of a tree stores
                    // only the pages an earlier one did not.
                    if filled.insert(object) {
                        fill_shared_memory(image, object, source, lazy.serves(object))?;
                    }
                    if lazy.is_lazy(mapping) {
                        lazy_shared.push((mapping.start, mapping.end));
                    }
                    let fd = match dup_objects.entry(object) {
                        Entry::Occupied(known) => *known.get(),
                        Entry::Vacant(new) => {
                            let copy = source
                                .try_clone()
                                .map_err(|e| RestoreError::io("memfd", e))?;
                            *new.insert(hold(&mut held, dup_above(copy, min)?))
                        }
                    };
                    Some(fd)
                }
                _ => None,
            };
            mapping_fds.push(fd);
            previous = Some(mapping);
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
            held,
            exe: dup_above(exe, min)?,
            cwd: dup_above(cwd, min)?,
            attributes: Attributes {
                rlimits,
                session_set: false,
            },
            created_files: std::mem::take(&mut created_files.0),
            lazy_shared,
        })
    }

    /// Every descriptor held, for the child to keep until its table closes them.
    pub(super) fn raw_fds(&self) -> Vec<RawFd> {
        self.held
            .iter()
            .map(AsRawFd::as_raw_fd)
            .chain([self.exe.as_raw_fd(), self.cwd.as_raw_fd()])
            .collect()
    }

    /// The descriptors as the layout table uses them, the userfaultfd at `uffd`.
    pub(super) fn layout_fds(&self, uffd: RawFd) -> LayoutFds {
        LayoutFds {
            mapping_fds: self.mapping_fds.clone(),
            exe: Some(self.exe.as_raw_fd()),
            cwd: Some(self.cwd.as_raw_fd()),
            uffd,
            close: self.raw_fds(),
            lazy_shared: self.lazy_shared.clone(),
        }
    }
}

/// What the processes of a tree open once for all of them (for a single
/// process, what it opens for itself).
#[derive(Debug, Default)]
pub(super) struct OpenedForTree {
    /// Every shared memory object, by object: each process's mappings of
    /// it map this one description.
    pub(super) shared: HashMap<SharedObject, OwnedFd>,
    /// The files mapped, by the credentials they were opened with.
    pub(super) files: OpenedFiles,
}

/// Keeps `fd` in `held` and returns its number.
fn hold(held: &mut Vec<OwnedFd>, fd: OwnedFd) -> RawFd {
    let raw = fd.as_raw_fd();
    held.push(fd);
    raw
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

/// A shared memory object of an image, which every mapping of it maps
/// from one descriptor: the numbers of different kinds may collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum SharedObject {
    /// Shared anonymous memory or a memfd, by saved inode.
    Shmem(u64),
    /// A POSIX shared memory file, by saved inode.
    PosixShm(u64),
}

impl SharedObject {
    /// The object a mapping of `kind` maps from a descriptor, if shared.
    pub(super) fn of(kind: &MappingKind) -> Option<Self> {
        match kind {
            MappingKind::Memfd { inode, .. } | MappingKind::SharedAnonymous { inode } => {
                Some(Self::Shmem(*inode))
            }
            MappingKind::PosixShm { inode, .. } => Some(Self::PosixShm(*inode)),
            _ => None,
        }
    }
}

/// Writes the stored pages of a shared memory object into `fd`, which every
/// mapping of the object then maps, so they stay shared. An object served
/// lazily (`lazy`) is only given its size: a page written here would be
/// held by the parked skeleton.
fn fill_shared_memory(
    image: &Image,
    object: SharedObject,
    fd: &OwnedFd,
    lazy: bool,
) -> Result<(), RestoreError> {
    let file = File::from(fd.try_clone().map_err(|e| RestoreError::io("memfd", e))?);
    let current = file
        .metadata()
        .map_err(|e| RestoreError::io("memfd", e))?
        .len();
    let mut exact_size = None;
    for mapping in &image.manifest().mappings {
        if SharedObject::of(&mapping.kind) != Some(object) {
            continue;
        }
        let offset = match &mapping.kind {
            MappingKind::Memfd { offset, .. } => *offset,
            MappingKind::PosixShm { offset, size, .. } => {
                exact_size = Some(*size);
                *offset
            }
            _ => 0,
        };
        if offset + mapping.len() > current {
            file.set_len(offset + mapping.len())
                .map_err(|e| RestoreError::io("memfd", e))?;
        }
        if lazy {
            continue;
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
    // A POSIX object keeps its recorded size (its owner may fstat it), not
    // its mappings' page-rounded one.
    if let Some(size) = exact_size {
        file.set_len(size)
            .map_err(|e| RestoreError::io("POSIX shared memory", e))?;
    }
    Ok(())
}
