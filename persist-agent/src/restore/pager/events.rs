//! Changes to the process's address space, read from the userfaultfd: pages
//! it discarded, unmapped or moved, and the children it forked.

use std::sync::Arc;

use super::{AddressEvent, Pager, Source};
use crate::sys::pidfd::PidFd;
use crate::sys::uffd::{UffdEvent, Userfault};

impl Pager {
    /// Follows an address-space event (journaled first, for a pager that
    /// may take over); returns the address of a fault, which the caller
    /// serves.
    pub(super) fn apply_event(&mut self, event: &UffdEvent) -> Option<u64> {
        match *event {
            UffdEvent::Fault { address, .. } => return Some(address),
            UffdEvent::Remove { start, end } => {
                self.journal(AddressEvent::Removed { start, end });
                self.discard_range(start, end);
            }
            UffdEvent::Unmap { start, end } => {
                self.journal(AddressEvent::Unmapped { start, end });
                self.drop_range(start, end);
                self.unregistered(start, end);
            }
            UffdEvent::Remap { from, to, len } => {
                self.journal(AddressEvent::Moved { from, to, len });
                self.remap(from, to, len);
            }
            UffdEvent::Fork { ufd } => self.serve_forked_child(ufd),
            UffdEvent::Other(kind) => {
                tracing::warn!(pid = self.pid(), kind, "unexpected userfaultfd event");
            }
        }
        None
    }

    /// The process forked while pages were missing: its child shares them
    /// (missing too, registered with a new userfaultfd), so a pager of its
    /// own serves the child on a thread, from a copy of what is still
    /// pending here.
    pub(super) fn serve_forked_child(&mut self, ufd: std::os::fd::RawFd) {
        // SAFETY: the kernel just installed this descriptor for us when the
        // fork event was read; nothing else owns it.
        let uffd = unsafe { <Userfault as std::os::fd::FromRawFd>::from_raw_fd(ufd) };
        let pidfd = match PidFd::open(self.pidfd.pid()) {
            Ok(pidfd) => pidfd,
            Err(err) => {
                tracing::warn!(pid = self.pidfd.pid(), %err, "forked child left unserved");
                return;
            }
        };
        let mut child = Pager::serving(
            uffd,
            Arc::new(pidfd),
            Arc::clone(&self.sources),
            self.runs.clone(),
            self.verified.clone(),
            self.pending.clone(),
            self.registered.clone(),
        );
        child.shared = Arc::clone(&self.shared);
        child.forked = true;
        // It logs while its parent does, for its parent's part of the
        // working set, and its fill waits as its parent's does.
        child.fault_log = self.fault_log.as_ref().map(|_| Vec::new());
        child.record_until = self.record_until;
        child.log_until = self.log_until;
        child.hurry = self.hurry.clone();
        child.fill_gate = self.fill_gate.clone();
        let parent = self.pidfd.pid();
        let forked_at = std::time::Instant::now();
        self.children.push(std::thread::spawn(move || {
            let result = child.run_until_filled();
            if let Ok(stats) = &result {
                tracing::info!(
                    parent,
                    faults = stats.faults,
                    fault_pages = stats.fault_pages,
                    zero_faults = stats.zero_faults,
                    filled = stats.filled_pages,
                    first_fault_us = stats.first_fault_after.map(|at| at.as_micros() as u64),
                    fault_us = stats.fault_time.as_micros() as u64,
                    fill_after_us = stats.fill_started_after.map(|at| at.as_micros() as u64),
                    took_us = forked_at.elapsed().as_micros() as u64,
                    "all pages of a forked child in"
                );
            }
            let log = child.take_fault_log();
            (result, log)
        }));
    }

    /// The process discarded `[start, end)` (`MADV_DONTNEED`): its private
    /// pages read zeros from then on, so they are not copied any more. A
    /// shared memory object keeps its pages (the page cache's, or those
    /// still to come): a later touch maps them again, so they stay pending.
    /// (`MADV_REMOVE`, which punches the object's pages out, sends the same
    /// event: see docs/process-trees.md, What is not done.)
    pub(super) fn discard_range(&mut self, start: u64, end: u64) {
        self.drop_pending(start, end, |source| source.slot.is_none());
    }

    /// Forgets the pending pages of `[start, end)`, unmapped.
    pub(super) fn drop_range(&mut self, start: u64, end: u64) {
        self.drop_pending(start, end, |_| true);
    }

    /// Forgets the pending pages of `[start, end)` that `dropped` says so of.
    fn drop_pending(&mut self, start: u64, end: u64, dropped: impl Fn(&Source) -> bool) {
        let keys: Vec<u64> = self
            .pending
            .range(start..end)
            .filter(|(_, source)| dropped(source))
            .map(|(k, _)| *k)
            .collect();
        self.stats.dropped_pages += keys.len() as u64;
        for key in keys {
            self.pending.remove(&key);
        }
    }

    pub(super) fn unregistered(&mut self, start: u64, end: u64) {
        let mut kept = Vec::new();
        for &(s, e) in &self.registered {
            if e <= start || s >= end {
                kept.push((s, e));
                continue;
            }
            if s < start {
                kept.push((s, start));
            }
            if e > end {
                kept.push((end, e));
            }
        }
        self.registered = kept;
    }

    pub(super) fn remap(&mut self, from: u64, to: u64, len: u64) {
        let moved: Vec<(u64, Source)> = self
            .pending
            .range(from..from + len)
            .map(|(k, v)| (*k, *v))
            .collect();
        for (key, _) in &moved {
            self.pending.remove(key);
        }
        for (key, source) in moved {
            self.pending.insert(key - from + to, source);
        }
        let overlapping: Vec<(u64, u64)> = self
            .registered
            .iter()
            .filter(|&&(s, e)| s < from + len && e > from)
            .copied()
            .collect();
        self.unregistered(from, from + len);
        for (s, e) in overlapping {
            let s = s.max(from);
            let e = e.min(from + len);
            self.registered.push((s - from + to, e - from + to));
        }
    }
}
