//! Shared memory of a process tree, stored once.
//!
//! A `MAP_SHARED` anonymous mapping or a shared memfd mapping made before a
//! fork is the same memory object, at the same addresses, in the parent
//! and the child. Its pages are stored with the first process of the tree
//! that maps it; a later process's mapping of the same object over the same
//! range (and offset) gets no page runs: its contents are that first
//! mapping's. A mapping of the object over another range (one process
//! unmapped part of it, or mapped it again elsewhere) is stored on its own,
//! which repeats some pages but loses none.

use std::collections::HashSet;

use persist_common::image::{ImageWriter, Mapping, MappingKind};

use super::CheckpointError;
use super::memory::{self, DumpStats, KnownPages};
use crate::sys::procmem::ProcMem;

/// The shared memory objects whose pages the image holds so far, each
/// with the range it was stored for.
#[derive(Debug, Default)]
pub struct SharedMemory {
    stored: HashSet<StoredObject>,
}

/// A shared memory object as one mapping showed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct StoredObject {
    object: Object,
    start: u64,
    end: u64,
    offset: u64,
}

/// A shared memory object: the numbers of different kinds may collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Object {
    /// Shared anonymous memory or a memfd, by inode.
    Shmem(u64),
    /// A System V segment, by id.
    Sysv(i32),
    /// A file under /dev/shm, by inode.
    PosixShm(u64),
}

impl StoredObject {
    /// The object behind `mapping`, if it is shared memory whose pages the
    /// image stores (see `memory::policy`).
    fn of(mapping: &Mapping) -> Option<Self> {
        let (object, offset) = match mapping.kind {
            MappingKind::SharedAnonymous { inode } => (Object::Shmem(inode), 0),
            MappingKind::Memfd { inode, offset, .. } => (Object::Shmem(inode), offset),
            MappingKind::SysvShm { shmid, .. } => (Object::Sysv(shmid), 0),
            MappingKind::PosixShm { inode, offset, .. } => (Object::PosixShm(inode), offset),
            _ => return None,
        };
        mapping.shared.then_some(Self {
            object,
            start: mapping.start,
            end: mapping.end,
            offset,
        })
    }
}

impl SharedMemory {
    /// [`memory::dump`] of the mappings of `pid`, but for those whose
    /// object an earlier process of the tree stored over the same range:
    /// they keep no page runs. Records the objects this process stored.
    pub fn dump(
        &mut self,
        pid: i32,
        mappings: &mut [Mapping],
        writer: &mut ImageWriter,
        mem: &ProcMem,
        known: Option<&dyn KnownPages>,
    ) -> Result<DumpStats, CheckpointError> {
        let stored_before = |mapping: &Mapping| {
            StoredObject::of(mapping).is_some_and(|object| self.stored.contains(&object))
        };
        let mut to_store: Vec<Mapping> = mappings
            .iter()
            .filter(|mapping| !stored_before(mapping))
            .cloned()
            .collect();
        let stats = memory::dump(pid, &mut to_store, writer, mem, known)?;
        let targets = mappings
            .iter_mut()
            .filter(|mapping| !stored_before(mapping));
        for (mapping, stored) in targets.zip(to_store) {
            *mapping = stored;
        }
        self.stored
            .extend(mappings.iter().filter_map(StoredObject::of));
        Ok(stats)
    }
}
