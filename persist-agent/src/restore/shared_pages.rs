//! The stored pages of the shared memory objects a restored tree maps,
//! whatever process stored them, so that every process's pager serves the
//! faults on its own mappings of an object.
//!
//! The image stores an object's pages with the first mapping of it (same
//! inode, range and offset) in tree order; the same mapping in a later
//! process has no page runs. Through userfaultfd a fault on a hole of a
//! shmem object goes to the uffd of the process that faulted, and a copy
//! fills the object's page cache, which every mapping then sees
//! (docs/kernel-facts.md, Shared memory and IPC): so each process's pager
//! needs, for each of its shared mappings, the object's stored pages at
//! that mapping's offsets.
//!
//! Only objects that nothing but their mappings reach are served lazily:
//! shared anonymous memory, and memfds no process holds a descriptor of. A
//! `read` through a descriptor does not fault, it would read the hole as
//! zeros; a POSIX shared memory file is reachable by its path by any
//! program; userfaultfd refuses System V segments (`EINVAL`: their
//! mappings are not shmem's). Those are filled when the skeleton is
//! prepared, as is an object mapped privately somewhere.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};

use persist_common::image::{FdInfo, FdKind, Manifest, Mapping, MappingKind, PAGE_SIZE, PageRun};

use super::resources::SharedObject;

/// One stored page of a shared object: the run holding it and its index
/// in the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StoredPage {
    /// The run, as stored by whichever process stored it.
    pub(super) run: PageRun,
    /// Index of the page in the run.
    pub(super) page: u64,
    /// The page's number among every stored page of the tree's lazily
    /// served objects ([`SharedPages::mark_filled`]).
    pub(super) slot: u32,
}

/// The stored pages of each shared object served lazily, by page index in
/// the object, and which of them a pager of the tree has filled.
#[derive(Debug, Default)]
pub(super) struct SharedPages {
    objects: HashMap<SharedObject, BTreeMap<u64, StoredPage>>,
    /// By slot: the page is in the object. Every pager of a tree would
    /// otherwise copy each page again in its background fill, for
    /// `EEXIST`: the kernel allocates and fills a page before it finds the
    /// object's, and five pagers doing so on a 2-CPU machine slowed
    /// PostgreSQL's first query.
    filled: Vec<AtomicBool>,
}

impl SharedPages {
    /// The lazily served objects of the tree (or single process) of
    /// `manifest`, with their stored pages.
    pub(super) fn of_tree(manifest: &Manifest) -> Self {
        let processes: Vec<(&[Mapping], &[FdInfo])> =
            std::iter::once((&manifest.mappings[..], &manifest.fds[..]))
                .chain(
                    manifest
                        .children
                        .iter()
                        .map(|child| (&child.mappings[..], &child.fds[..])),
                )
                .collect();
        let mut eager = HashSet::new();
        for (mappings, fds) in &processes {
            for fd in *fds {
                if let FdKind::Memfd { inode, .. } = fd.kind {
                    eager.insert(SharedObject::Shmem(inode));
                }
            }
            for mapping in *mappings {
                if let Some((object, _)) = object_of(mapping)
                    && !mapping.shared
                {
                    eager.insert(object);
                }
            }
        }
        let mut objects: HashMap<SharedObject, BTreeMap<u64, StoredPage>> = HashMap::new();
        // Tree order: the root, then the descendants as the image lists them.
        for (mappings, _) in &processes {
            for mapping in *mappings {
                let Some((object, first)) = object_of(mapping) else {
                    continue;
                };
                if eager.contains(&object) || mapping.pages.is_empty() {
                    continue;
                }
                let pages = objects.entry(object).or_default();
                for run in &mapping.pages {
                    for page in 0..run.count {
                        // A range stored twice (two mappings of different
                        // ranges) holds the same contents: the first is kept.
                        pages
                            .entry(first + run.first_page + page)
                            .or_insert(StoredPage {
                                run: *run,
                                page,
                                slot: 0,
                            });
                    }
                }
            }
        }
        let mut slots = 0u32;
        for stored in objects.values_mut().flat_map(BTreeMap::values_mut) {
            stored.slot = slots;
            slots += 1;
        }
        let filled = (0..slots).map(|_| AtomicBool::new(false)).collect();
        Self { objects, filled }
    }

    /// Notes that the page of `slot` is in its object (copied, or found
    /// there), for the other pagers to skip it.
    pub(super) fn mark_filled(&self, slot: u32) {
        if let Some(filled) = self.filled.get(slot as usize) {
            filled.store(true, Ordering::Relaxed);
        }
    }

    /// True when a pager noted the page of `slot` in its object. Pages once
    /// in stay in (see docs/process-trees.md, What is not done, for holes
    /// punched meanwhile).
    pub(super) fn is_filled(&self, slot: u32) -> bool {
        self.filled
            .get(slot as usize)
            .is_some_and(|filled| filled.load(Ordering::Relaxed))
    }

    /// True when `mapping` maps an object served lazily: it is registered
    /// with userfaultfd, and its object is not filled at prepare.
    pub(super) fn is_lazy(&self, mapping: &Mapping) -> bool {
        object_of(mapping).is_some_and(|(object, _)| self.objects.contains_key(&object))
    }

    /// True when `object` is served lazily.
    pub(super) fn serves(&self, object: SharedObject) -> bool {
        self.objects.contains_key(&object)
    }

    /// The stored pages of the object `mapping` maps that fall within it,
    /// by address, in address order.
    pub(super) fn stored_in(
        &self,
        mapping: &Mapping,
    ) -> impl Iterator<Item = (u64, StoredPage)> + '_ {
        let found = object_of(mapping)
            .and_then(|(object, first)| Some((self.objects.get(&object)?, first)));
        let count = mapping.len() / PAGE_SIZE;
        let start = mapping.start;
        found.into_iter().flat_map(move |(pages, first)| {
            pages
                .range(first..first + count)
                .map(move |(&index, &stored)| (start + (index - first) * PAGE_SIZE, stored))
        })
    }
}

/// The shared object a mapping maps and the index in it of the mapping's
/// first page, for the kinds that may be served lazily.
fn object_of(mapping: &Mapping) -> Option<(SharedObject, u64)> {
    match &mapping.kind {
        // Restored from offset 0, as the checkpoint stores it.
        MappingKind::SharedAnonymous { inode } => Some((SharedObject::Shmem(*inode), 0)),
        MappingKind::Memfd { inode, offset, .. } => {
            Some((SharedObject::Shmem(*inode), offset / PAGE_SIZE))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use persist_common::image::{ChildProcess, ProcessInfo};

    use super::*;

    fn run(first_page: u64, count: u64, store_offset: u64) -> PageRun {
        PageRun {
            first_page,
            count,
            store_offset,
            crc32c: 0,
        }
    }

    fn shared(start: u64, pages: u64, kind: MappingKind, runs: Vec<PageRun>) -> Mapping {
        Mapping {
            shared: true,
            kind,
            ..Mapping::anonymous(start, pages, runs)
        }
    }

    fn memfd(inode: u64, offset: u64) -> MappingKind {
        MappingKind::Memfd {
            name: "buffers".into(),
            inode,
            offset,
        }
    }

    fn tree(root: Vec<Mapping>, child: Vec<Mapping>, child_fds: Vec<FdInfo>) -> Manifest {
        Manifest {
            mappings: root,
            children: vec![ChildProcess {
                ppid: 1,
                process: ProcessInfo {
                    pid: 2,
                    ..ProcessInfo::default()
                },
                threads: Vec::new(),
                mappings: child,
                fds: child_fds,
                inherited_fds: Vec::new(),
            }],
            ..Manifest::default()
        }
    }

    fn pages_of(manifest: Manifest) -> (SharedPages, Manifest) {
        (SharedPages::of_tree(&manifest), manifest)
    }

    #[test]
    fn a_later_mapping_gets_the_pages_an_earlier_process_stored() {
        let anon = MappingKind::SharedAnonymous { inode: 7 };
        // The root stored pages 1-2 and 5 of the object; the child maps it
        // elsewhere and stored nothing.
        let root = shared(
            0x10_000,
            8,
            anon.clone(),
            vec![run(1, 2, 0), run(5, 1, 0x2000)],
        );
        let child = shared(0x40_000, 8, anon, Vec::new());
        let (pages, manifest) = pages_of(tree(vec![root], vec![child], Vec::new()));
        let child = &manifest.children[0].mappings[0];
        assert!(pages.is_lazy(child));
        let stored: Vec<_> = pages.stored_in(child).collect();
        let addresses: Vec<u64> = stored.iter().map(|(address, _)| *address).collect();
        assert_eq!(addresses, [0x41_000, 0x42_000, 0x45_000]);
        assert_eq!(stored[1].1.page, 1, "the second page of the first run");
        assert_eq!(stored[2].1.run.store_offset, 0x2000);
    }

    #[test]
    fn a_memfd_mapping_at_an_offset_gets_the_pages_at_that_offset() {
        // The root maps pages 0-3 of the memfd; the child pages 2-5.
        let root = shared(0x10_000, 4, memfd(9, 0), vec![run(0, 4, 0)]);
        let child = shared(
            0x80_000,
            4,
            memfd(9, 2 * PAGE_SIZE),
            vec![run(2, 2, 0x4000)],
        );
        let (pages, manifest) = pages_of(tree(vec![root], vec![child], Vec::new()));
        let child = &manifest.children[0].mappings[0];
        let stored: Vec<_> = pages.stored_in(child).collect();
        // Object pages 2 and 3 from the root's run (stored first), 4 and 5
        // from the child's own.
        let found: Vec<(u64, u64, u64)> = stored
            .iter()
            .map(|(address, page)| (*address, page.run.store_offset, page.page))
            .collect();
        assert_eq!(
            found,
            [
                (0x80_000, 0, 2),
                (0x81_000, 0, 3),
                (0x82_000, 0x4000, 0),
                (0x83_000, 0x4000, 1)
            ]
        );
    }

    #[test]
    fn objects_reachable_otherwise_than_by_their_mappings_stay_eager() {
        // A memfd the child holds open, and one mapped privately.
        let held = shared(0x10_000, 1, memfd(3, 0), vec![run(0, 1, 0)]);
        let private = Mapping {
            shared: false,
            ..shared(0x20_000, 1, memfd(4, 0), vec![run(0, 1, 0x1000)])
        };
        let posix = shared(
            0x30_000,
            1,
            MappingKind::PosixShm {
                path: "/dev/shm/x".into(),
                inode: 5,
                offset: 0,
                size: 4096,
                uid: 0,
                gid: 0,
                mode: 0o600,
            },
            vec![run(0, 1, 0x2000)],
        );
        let fd = FdInfo {
            fd: 4,
            kind: FdKind::Memfd {
                name: "buffers".into(),
                inode: 3,
                offset: 0,
                size: 4096,
                seals: 0,
                contents: Vec::new(),
            },
            cloexec: false,
            flags: 0,
            shared_with: None,
        };
        let (pages, manifest) = pages_of(tree(vec![held, private, posix], Vec::new(), vec![fd]));
        for mapping in &manifest.mappings {
            assert!(!pages.is_lazy(mapping), "{mapping:?}");
        }
        assert!(!pages.serves(SharedObject::Shmem(3)));
    }
}
