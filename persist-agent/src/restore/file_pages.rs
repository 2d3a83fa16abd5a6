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

use std::sync::atomic::{AtomicUsize, Ordering};

use persist_common::image::{Image, ImageError, Mapping, MappingKind, PAGE_SIZE, PageRun};

use super::RestoreError;
use super::inherited_memory::PresentPages;
use super::verify::stored_run;
use crate::sys::procmem::ProcMem;

/// True for a mapping whose stored pages this module writes.
pub(super) fn has_written_pages(mapping: &Mapping) -> bool {
    !mapping.shared && !mapping.pages.is_empty() && matches!(mapping.kind, MappingKind::File { .. })
}

/// Checks every run [`SharedRuns`] writes against its checksum. The image's
/// page store remembers the runs found sound, so that the writes do not
/// check them again: a cold wake checks them on another CPU while the
/// process lays out its memory (`daemon/cold_wake.rs`). The first run
/// that fails is reported.
pub(crate) fn check_runs(image: &Image) -> Result<(), ImageError> {
    runs(image).try_for_each(|(_, run)| image.pages().check(run))
}

/// Every run [`SharedRuns`] writes, with its mapping, in address order.
fn runs(image: &Image) -> impl Iterator<Item = (&Mapping, &PageRun)> {
    image
        .manifest()
        .mappings
        .iter()
        .filter(|m| has_written_pages(m))
        .flat_map(|mapping| mapping.pages.iter().map(move |run| (mapping, run)))
}

/// The stored pages of every private file mapping of an image, to be
/// written into its stopped process by one thread or several: handed out a
/// run at a time to whichever thread asks next, so that threads that
/// started at different times, or were kept from their CPU a while, still
/// end together.
pub(super) struct SharedRuns<'a> {
    runs: Vec<(&'a Mapping, &'a PageRun)>,
    next: AtomicUsize,
}

impl<'a> SharedRuns<'a> {
    /// The runs of `image`, none handed out yet.
    pub(super) fn of(image: &'a Image) -> Self {
        Self {
            runs: runs(image).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// The number of pages in them.
    pub(super) fn pages(&self) -> u64 {
        self.runs.iter().map(|(_, run)| run.count).sum()
    }

    /// Writes runs into the stopped process of `mem`, each checked against
    /// its checksum first, until none is left to take, but the pages it got
    /// from its parent's staged copy (`skip`). Returns the number of pages
    /// this thread wrote.
    pub(super) fn write(
        &self,
        image: &Image,
        mem: &ProcMem,
        skip: &PresentPages,
    ) -> Result<u64, RestoreError> {
        let mut pages = 0;
        while let Some(&(mapping, run)) = self.runs.get(self.next.fetch_add(1, Ordering::Relaxed)) {
            pages += write_run(image, mem, mapping, run, skip, false, mapping.start)?;
        }
        Ok(pages)
    }
}

/// Writes the pages of `run`, stored for `mapping`, that are in `pages`
/// (`present`) or not in it (`!present`) into the stopped process of
/// `mem`, the mapping's first page at `placed_at`: its recorded start, or
/// a staged copy's slot (`inherited_memory.rs`). The run is read, and
/// checked against its checksum, only when one of its pages is written.
/// Returns how many were.
pub(super) fn write_run(
    image: &Image,
    mem: &ProcMem,
    mapping: &Mapping,
    run: &PageRun,
    pages: &PresentPages,
    present: bool,
    placed_at: u64,
) -> Result<u64, RestoreError> {
    let first = mapping.start + run.first_page * PAGE_SIZE;
    let segments: Vec<(u64, u64)> = pages
        .segments(first, run.count)
        .into_iter()
        .filter(|&(_, _, is_present)| is_present == present)
        .map(|(page, count, _)| (page, count))
        .collect();
    if segments.is_empty() {
        return Ok(0);
    }
    let (address, bytes) = stored_run(image, mapping, run)?;
    let mut written = 0;
    for (page, count) in segments {
        let at = address + page * PAGE_SIZE;
        let from = (page * PAGE_SIZE) as usize;
        let to = from + (count * PAGE_SIZE) as usize;
        mem.write_all_at(placed_at + (at - mapping.start), &bytes[from..to])
            .map_err(|source| RestoreError::FilePages {
                pid: mem.pid(),
                address: at,
                pages: count,
                path: super::layout::describe(mapping),
                source,
            })?;
        written += count;
    }
    Ok(written)
}
