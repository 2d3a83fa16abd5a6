//! Copying pages in: one fault's page or run, a batch of the background
//! fill, each run's checksum checked before its first copy.

use std::sync::Arc;

use nix::sys::signal::Signal;
use persist_common::image::PAGE_SIZE;

use super::{Pager, RestoreError, Source};
use crate::sys::uffd::CopyOutcome;

impl Pager {
    /// Copies `page` and, when `whole_run`, the pending pages of its run
    /// that are contiguous with it. False when it must be retried.
    pub(super) fn copy_around(&mut self, page: u64, whole_run: bool) -> Result<bool, RestoreError> {
        let source = self.pending[&page];
        let mut first = page;
        let mut first_source = source;
        let mut count = 1u64;
        if whole_run {
            while let Some(previous) = first.checked_sub(PAGE_SIZE) {
                match self.pending.get(&previous) {
                    Some(s) if s.run == source.run && s.page + 1 == first_source.page => {
                        first = previous;
                        first_source = *s;
                    }
                    _ => break,
                }
            }
            loop {
                let next = first + count * PAGE_SIZE;
                match self.pending.get(&next) {
                    Some(s)
                        if s.run == source.run
                            && u64::from(s.page) == u64::from(first_source.page) + count =>
                    {
                        count += 1;
                    }
                    _ => break,
                }
            }
        }
        self.copy_span(first, count)
    }

    /// Fills the lowest pending span in one copy. False when it must be
    /// retried after reading events.
    pub(super) fn fill_batch(&mut self, max_pages: u64) -> Result<bool, RestoreError> {
        self.skip_filled(max_pages);
        let Some((&first, &first_source)) = self.pending.iter().next() else {
            return Ok(true);
        };
        let mut offset = self.store_offset(first_source);
        let mut count = 1u64;
        while count < max_pages {
            let next = first + count * PAGE_SIZE;
            match self.pending.get(&next) {
                Some(s) if self.store_offset(*s) == offset + PAGE_SIZE => {
                    offset += PAGE_SIZE;
                    count += 1;
                }
                _ => break,
            }
        }
        let before = self.pending.len();
        let done = self.copy_span(first, count)?;
        self.stats.filled_pages += (before - self.pending.len()) as u64;
        Ok(done)
    }

    /// Forgets up to `max_pages` of the lowest pending pages that another
    /// pager of the tree put in their shared object already: a copy would
    /// only find them there. (A fault on one is still answered: the page
    /// is there, and the faulting thread is woken.)
    pub(super) fn skip_filled(&mut self, max_pages: u64) {
        for _ in 0..max_pages {
            let Some((&first, source)) = self.pending.iter().next() else {
                return;
            };
            if !source.slot.is_some_and(|slot| self.shared.is_filled(slot)) {
                return;
            }
            self.pending.remove(&first);
            self.stats.filled_pages += 1;
        }
    }

    pub(super) fn store_offset(&self, source: Source) -> u64 {
        self.runs[source.run as usize].store_offset + u64::from(source.page) * PAGE_SIZE
    }

    /// Copies `count` pending pages from `first` on, whose contents are
    /// consecutive in the store. False when it must be retried.
    fn copy_span(&mut self, first: u64, count: u64) -> Result<bool, RestoreError> {
        for index in 0..count {
            let source = self.pending[&(first + index * PAGE_SIZE)];
            self.verify(source.run, first + index * PAGE_SIZE)?;
        }
        let start = self.store_offset(self.pending[&first]);
        let len = (count * PAGE_SIZE) as usize;
        let sources = Arc::clone(&self.sources);
        let bytes = sources
            .read(start, len)
            .map_err(|err| self.page_failed(first, &err))?;
        let mut done = 0u64;
        while done < count {
            let dst = first + done * PAGE_SIZE;
            let src = &bytes[(done * PAGE_SIZE) as usize..];
            match self.uffd.copy(dst, src) {
                CopyOutcome::Done => {
                    self.filled(dst, count - done);
                    return Ok(true);
                }
                // The span may cross mappings (the kernel copies within
                // one): page by page, only pages really gone are dropped.
                CopyOutcome::Gone if count - done > 1 => {
                    for page in done..count {
                        let content = &bytes[(page * PAGE_SIZE) as usize..][..PAGE_SIZE as usize];
                        if !self.copy_span_page(first + page * PAGE_SIZE, content)? {
                            return Ok(false);
                        }
                    }
                    return Ok(true);
                }
                CopyOutcome::Gone => {
                    self.forget(dst, 1);
                    return Ok(true);
                }
                CopyOutcome::Partial(bytes_copied) => {
                    let pages = bytes_copied / PAGE_SIZE;
                    self.filled(dst, pages);
                    done += pages;
                }
                CopyOutcome::Exists => {
                    // Already present: nothing to copy, but a thread may wait.
                    let _ = self.uffd.wake(dst, PAGE_SIZE);
                    self.filled(dst, 1);
                    done += 1;
                }
                CopyOutcome::Again => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Copies one page of a span; false when it must be retried.
    fn copy_span_page(&mut self, page: u64, bytes: &[u8]) -> Result<bool, RestoreError> {
        match self.uffd.copy(page, bytes) {
            CopyOutcome::Done => self.filled(page, 1),
            CopyOutcome::Gone => self.forget(page, 1),
            CopyOutcome::Exists | CopyOutcome::Partial(_) => {
                let _ = self.uffd.wake(page, PAGE_SIZE);
                self.filled(page, 1);
            }
            CopyOutcome::Again => return Ok(false),
        }
        Ok(true)
    }

    /// Forgets `pages` pending pages from `start` on, which are in the
    /// process now; shared ones are noted for the tree's other pagers.
    pub(super) fn filled(&mut self, start: u64, pages: u64) {
        for index in 0..pages {
            let address = start + index * PAGE_SIZE;
            if let Some(slot) = self.pending.remove(&address).and_then(|source| source.slot) {
                self.shared.mark_filled(slot);
            }
        }
    }

    pub(super) fn forget(&mut self, start: u64, pages: u64) {
        for index in 0..pages {
            self.pending.remove(&(start + index * PAGE_SIZE));
        }
    }

    /// Checks a run's checksum once; on a mismatch kills the process.
    pub(super) fn verify(&mut self, run: u32, address: u64) -> Result<(), RestoreError> {
        if self.verified[run as usize] {
            return Ok(());
        }
        let page_run = self.runs[run as usize];
        if let Err(err) = self.sources.image().pages().run(&page_run) {
            return Err(self.page_failed(address, &err));
        }
        self.verified[run as usize] = true;
        Ok(())
    }

    /// Kills the process, whose page at `address` cannot be served (a
    /// corrupt run, an unreadable file), and says why.
    pub(super) fn page_failed(&self, address: u64, err: &dyn std::fmt::Display) -> RestoreError {
        let pid = self.pid();
        let _ = self.pidfd.send_signal(Signal::SIGKILL);
        tracing::error!(pid, address, %err, "page cannot be served: restored process killed");
        RestoreError::CorruptPage {
            pid,
            address,
            reason: err.to_string(),
        }
    }
}
