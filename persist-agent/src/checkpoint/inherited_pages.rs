//! Private memory a child of a tree shares with its parent, stored once.
//!
//! After a fork, parent and child share every private page copy-on-write
//! until one of them writes it: a pre-fork server's workers hold most of
//! their master's heap unchanged. A child's page whose contents equal the
//! page its parent stored in the same image at the same address is
//! referred to there instead of being written again. The parent is frozen
//! and its pages are stored as they are, so its live memory is what the
//! image holds: the contents are compared with it (`/proc/PID/mem`), never
//! assumed from the address alone.
//!
//! Except for the pages holding its threads' rseq areas: the kernel writes
//! the current CPU there each time a thread returns to user space, which
//! the syscalls injected into the parent after its memory was stored do.
//! Its live rseq page then no longer is the stored one, and may equal the
//! child's (the same CPU), so those pages are never referred to.

use persist_common::image::{Mapping, PAGE_SIZE, ThreadInfo};

use super::memory::{BasePages, KnownPages, StoredRange, stored_offset, stored_ranges};
use crate::sys::procmem::ProcMem;

/// The pages a frozen parent stored in the image being written.
pub struct ParentPages {
    mem: ProcMem,
    ranges: Vec<StoredRange>,
    /// Pages the kernel may have written since they were stored.
    rseq_pages: Vec<u64>,
}

impl ParentPages {
    /// Indexes the pages stored for `mappings` and `threads`, the saved
    /// mappings and threads of the frozen process whose memory `mem` reads.
    pub fn new(mem: ProcMem, mappings: &[Mapping], threads: &[ThreadInfo]) -> Self {
        let rseq_pages = threads
            .iter()
            .filter_map(|thread| thread.rseq)
            .flat_map(|rseq| {
                let last = rseq.address + u64::from(rseq.length.max(1)) - 1;
                [rseq.address & !(PAGE_SIZE - 1), last & !(PAGE_SIZE - 1)]
            })
            .collect();
        Self {
            mem,
            ranges: stored_ranges(mappings),
            rseq_pages,
        }
    }
}

impl KnownPages for ParentPages {
    fn find(&self, address: u64, page: &[u8]) -> Option<u64> {
        if self.rseq_pages.contains(&address) {
            return None;
        }
        let offset = stored_offset(&self.ranges, address)?;
        let mut parent = vec![0u8; PAGE_SIZE as usize];
        self.mem.read_exact_at(address, &mut parent).ok()?;
        (parent == page).then_some(offset)
    }
}

/// The pages a child may refer to: its parent's in this image, else the
/// base image's.
pub struct ChildKnownPages<'a> {
    /// The parent's stored pages.
    pub parent: &'a ParentPages,
    /// The base image of a delta checkpoint.
    pub base: Option<&'a BasePages<'a>>,
}

impl KnownPages for ChildKnownPages<'_> {
    fn find(&self, address: u64, page: &[u8]) -> Option<u64> {
        self.parent
            .find(address, page)
            .or_else(|| self.base.and_then(|base| base.find(address, page)))
    }
}
