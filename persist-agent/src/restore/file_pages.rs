//! The pages a process wrote to in its private file mappings (a library's
//! `.data`, its relocated `.got` and relro, a file it mapped privately and
//! changed), written back over the file's pages before the process runs.
//!
//! Such a mapping is mapped again from its file, so that /proc/PID/maps shows
//! the path, device, inode and offset it had and the pages the process never
//! wrote come from the page cache, lazily and shared with every other process
//! mapping the file. Userfaultfd cannot serve the written ones (it registers on
//! no regular file mapping, docs/kernel-facts.md), so they are written through
//! `/proc/PID/mem`, which ignores protection and copies each page on write as
//! the process's own write did. Done when the skeleton is prepared, so the
//! parked skeleton holds these pages: written on the wake instead, they made
//! it 2.5–3 times as long for nginx and Redis (docs/kernel-facts.md, Private
//! file mappings).

use persist_common::image::{Image, Mapping, MappingKind, PAGE_SIZE, PageRun};

use super::RestoreError;
use super::inherited_memory::PresentPages;
use super::verify::stored_run;
use crate::sys::procmem::ProcMem;

/// True for a mapping whose stored pages this module writes.
pub(super) fn has_written_pages(mapping: &Mapping) -> bool {
    !mapping.shared && !mapping.pages.is_empty() && matches!(mapping.kind, MappingKind::File { .. })
}

/// The number of pages [`write`] writes for `image`.
pub(super) fn count(image: &Image) -> u64 {
    runs(image).map(|(_, run)| run.count).sum()
}

/// Every run [`write`] writes, with its mapping, in address order.
fn runs(image: &Image) -> impl Iterator<Item = (&Mapping, &PageRun)> {
    image
        .manifest()
        .mappings
        .iter()
        .filter(|m| has_written_pages(m))
        .flat_map(|mapping| mapping.pages.iter().map(move |run| (mapping, run)))
}

/// Writes the stored pages of every private file mapping of `image` into the
/// stopped process `pid`, each run checked against its checksum first,
/// but those it got from its parent's staged copy (`skip`). Returns the
/// number of pages written.
pub(super) fn write(
    image: &Image,
    pid: i32,
    mem: &ProcMem,
    skip: &PresentPages,
) -> Result<u64, RestoreError> {
    write_share(image, pid, mem, 0, 1, skip)
}

/// Writes share `share` of `shares` of what [`write`] writes: the runs that
/// start in that share of its pages, so that as many threads may write
/// about as many pages each, to different pages. Returns the number of
/// pages written.
pub(super) fn write_share(
    image: &Image,
    pid: i32,
    mem: &ProcMem,
    share: u64,
    shares: u64,
    skip: &PresentPages,
) -> Result<u64, RestoreError> {
    let total = count(image);
    let (from, to) = (total * share / shares, total * (share + 1) / shares);
    let mut before = 0;
    let mut pages = 0;
    for (mapping, run) in runs(image) {
        let first = before;
        before += run.count;
        if !(from..to).contains(&first) {
            continue;
        }
        let (address, bytes) = stored_run(image, mapping, run)?;
        for (first, count, present) in skip.segments(address, run.count) {
            if present {
                continue;
            }
            let at = address + first * PAGE_SIZE;
            let from = (first * PAGE_SIZE) as usize;
            let to = from + (count * PAGE_SIZE) as usize;
            mem.write_all_at(at, &bytes[from..to])
                .map_err(|source| RestoreError::FilePages {
                    pid,
                    address: at,
                    pages: count,
                    path: super::layout::describe(mapping),
                    source,
                })?;
            pages += count;
        }
    }
    Ok(pages)
}
