//! The lazy pager: serves a restored process's first touches of anonymous
//! memory, and of the shared memory objects served lazily
//! (`shared_pages.rs`), from the page store through userfaultfd, and fills
//! the rest in the background until nothing is missing. A shared page
//! another process's pager filled first is there already: its copy fails
//! with `EEXIST`, which counts as done (and wakes the thread that may wait).
//!
//! One thread does everything, on purpose: a background copy decided before
//! a `madvise(DONTNEED)` event was read could otherwise land after it and
//! resurrect image content where the process expects zeros. Handling events
//! and copies in one sequence, and treating `EAGAIN` (the kernel's "address
//! space changing") as "read events first", keeps that ordering.
//!
//! This file holds the pager and what it knows; the work is in `pager/`:
//! the loop (`serve.rs`), copying pages in (`copy.rs`), following the
//! process's address-space events (`events.rs`), the fault log that
//! records a working set (`fault_log.rs`), bulk copies before a resume
//! (`bulk.rs`), where pages come from (`sources.rs`), staying off the
//! process's CPU (`cpu_share.rs`) and taking over from a dead pager
//! (`adopt.rs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use persist_common::image::{Image, PAGE_SIZE, PageRun, WorkingSetPage};

use super::RestoreError;
use super::layout::is_lazy;
use super::shared_pages::SharedPages;
use crate::sys::pidfd::PidFd;
use crate::sys::uffd::Userfault;

mod adopt;
mod bulk;
mod copy;
mod cpu_share;
mod events;
mod fault_log;
mod fill_gate;
mod serve;
mod sources;
#[cfg(test)]
pub(crate) mod tests;

pub use adopt::{AddressEvent, EventJournal, JournalError};
pub use fill_gate::FillGate;

pub(crate) use bulk::{PlannedCopy, WhenCopied, help_each_then};

use sources::Sources;

/// Where a missing page's content is: run index and page index in the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Source {
    run: u32,
    page: u32,
    /// The page's slot when it is in a shared memory object's mapping
    /// ([`SharedPages`]): discarding it (`MADV_DONTNEED`) drops it from
    /// this process only, and the object keeps the page it holds or still
    /// lacks.
    slot: Option<u32>,
}

/// Counters of a pager's work.
#[derive(Debug, Clone, Copy, Default)]
pub struct PagerStats {
    /// Faults served (a fault may bring in a whole run).
    pub faults: u64,
    /// Pages copied to serve faults.
    pub fault_pages: u64,
    /// Faults served with a zero page (nothing stored there).
    pub zero_faults: u64,
    /// Pages copied in the background.
    pub filled_pages: u64,
    /// Pages dropped because the process discarded or unmapped them.
    pub dropped_pages: u64,
    /// Time spent serving faults (ioctls and checks).
    pub fault_time: Duration,
    /// From the start of [`Pager::run_until_filled`] to the first fault.
    pub first_fault_after: Option<Duration>,
    /// From the start of [`super::Skeleton::resume`] to the first fault
    /// served: the process's first instruction plus one fault round trip.
    pub first_fault_after_resume: Option<Duration>,
    /// From the start of [`Pager::run_until_filled`] to the end.
    pub total_time: Duration,
    /// From the start of [`Pager::run_until_filled`] to the first batch of
    /// the background fill.
    pub fill_started_after: Option<Duration>,
    /// Pages copied ahead of any fault from a recorded working set (or, to
    /// prefetch everything, from the image).
    pub prefetched_pages: u64,
}

impl PagerStats {
    /// Faults served per second of serving time.
    pub fn faults_per_second(&self) -> f64 {
        let secs = self.fault_time.as_secs_f64();
        if secs > 0.0 {
            self.faults as f64 / secs
        } else {
            0.0
        }
    }
}

/// What the pager of a forked child returns: its counters, and the pages
/// it logged (the child's faults on pages its parent lacked too).
type ChildPaged = (Result<PagerStats, RestoreError>, Vec<WorkingSetPage>);

/// Serves one restored process's lazy memory.
pub struct Pager {
    uffd: Arc<Userfault>,
    pidfd: Arc<PidFd>,
    sources: Arc<Sources>,
    runs: Vec<PageRun>,
    verified: Vec<bool>,
    pending: BTreeMap<u64, Source>,
    registered: Vec<(u64, u64)>,
    /// The shared memory mappings registered when the process was
    /// restored (not followed through its address-space changes).
    shared_at_restore: Vec<(u64, u64)>,
    /// The tree's lazily served shared pages, and which are in.
    shared: Arc<SharedPages>,
    stats: PagerStats,
    resumed_at: Option<Instant>,
    /// Pages copied to serve faults, in order, while recording a working set
    /// or logging the faults of a prefetched wake.
    fault_log: Option<Vec<WorkingSetPage>>,
    /// Until when faults are recorded: logged into `fault_log`, with
    /// single-page copies and the background fill held back.
    record_until: Option<Instant>,
    /// Until when faults are logged into `fault_log`, one page each, with
    /// the background fill held back.
    log_until: Option<Instant>,
    /// Called once the process first runs without faulting for a while.
    when_quiet: Option<Box<dyn FnOnce() + Send>>,
    /// Once set, faults are neither recorded nor logged any more, and the
    /// fill goes ahead: the daemon is stopping.
    hurry: Option<Arc<AtomicBool>>,
    /// True for the pager of a child forked after the restore: its pidfd
    /// is its parent's (the fork event does not name the child).
    forked: bool,
    /// Held back until this opens: the background fill (a tree's wake).
    fill_gate: Option<Arc<FillGate>>,
    /// Pagers of children the process forked while pages were missing;
    /// each returns what it logged of its child's faults.
    children: Vec<std::thread::JoinHandle<ChildPaged>>,
    /// Where the address-space events read are journaled, for a pager
    /// that takes over if the daemon dies (`Pager::adopt`).
    journal: Option<EventJournal>,
}

impl std::fmt::Debug for Pager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pager")
            .field("pid", &self.pidfd.pid())
            .field("pending_pages", &self.pending.len())
            .field("registered", &self.registered.len())
            .finish()
    }
}

impl Pager {
    /// A pager for the lazy mappings of `image`, restored into the process of
    /// `pidfd` whose userfaultfd is `uffd`; its shared memory mappings of
    /// objects `shared` serves get those objects' stored pages, whatever
    /// process of the tree stored them.
    pub(super) fn new(
        uffd: Userfault,
        pidfd: Arc<PidFd>,
        image: Arc<Image>,
        shared: &Arc<SharedPages>,
    ) -> Self {
        let sources = Sources::new(Arc::clone(&image));
        let mut runs = Vec::new();
        let mut verified = Vec::new();
        // Collected first and built at once, sorted: thousands of inserts
        // one by one took ~0.4 ms a process of PostgreSQL's tree, each
        // of which pages its shared buffers too.
        let mut pending = Vec::new();
        let mut registered = Vec::new();
        for mapping in image.manifest().mappings.iter().filter(|m| is_lazy(m)) {
            registered.push((mapping.start, mapping.end));
            for run in &mapping.pages {
                let index = runs.len() as u32;
                runs.push(*run);
                verified.push(false);
                for page in 0..run.count {
                    let address = mapping.start + (run.first_page + page) * PAGE_SIZE;
                    let source = Source {
                        run: index,
                        page: page as u32,
                        slot: None,
                    };
                    pending.push((address, source));
                }
            }
        }
        let mut shared_at_restore = Vec::new();
        // Each run once, by its place in the store: several mappings may
        // take pages from it.
        let mut shared_runs: HashMap<u64, u32> = HashMap::new();
        for mapping in image.manifest().mappings.iter() {
            if !shared.is_lazy(mapping) {
                continue;
            }
            registered.push((mapping.start, mapping.end));
            shared_at_restore.push((mapping.start, mapping.end));
            for (address, stored) in shared.stored_in(mapping) {
                let run = *shared_runs
                    .entry(stored.run.store_offset)
                    .or_insert_with(|| {
                        runs.push(stored.run);
                        verified.push(false);
                        (runs.len() - 1) as u32
                    });
                let source = Source {
                    run,
                    page: stored.page as u32,
                    slot: Some(stored.slot),
                };
                pending.push((address, source));
            }
        }
        // A later entry for an address wins, as with inserts.
        let pending = BTreeMap::from_iter(pending);
        let mut pager = Self::serving(
            uffd,
            pidfd,
            Arc::new(sources),
            runs,
            verified,
            pending,
            registered,
        );
        pager.shared_at_restore = shared_at_restore;
        pager.shared = Arc::clone(shared);
        pager
    }

    /// A pager with these pages still to serve, and nothing done yet.
    fn serving(
        uffd: Userfault,
        pidfd: Arc<PidFd>,
        sources: Arc<Sources>,
        runs: Vec<PageRun>,
        verified: Vec<bool>,
        pending: BTreeMap<u64, Source>,
        registered: Vec<(u64, u64)>,
    ) -> Self {
        Self {
            uffd: Arc::new(uffd),
            pidfd,
            sources,
            runs,
            verified,
            pending,
            registered,
            shared_at_restore: Vec::new(),
            shared: Arc::default(),
            stats: PagerStats::default(),
            resumed_at: None,
            fault_log: None,
            record_until: None,
            log_until: None,
            when_quiet: None,
            hurry: None,
            forked: false,
            fill_gate: None,
            children: Vec::new(),
            journal: None,
        }
    }

    /// Pid of the restored process (in the agent's namespace).
    pub fn pid(&self) -> i32 {
        self.pidfd.pid()
    }

    /// Its counters so far.
    pub(crate) fn stats(&self) -> PagerStats {
        self.stats
    }

    /// Records when the process was resumed, for [`PagerStats`].
    pub(crate) fn set_resumed_at(&mut self, at: Instant) {
        self.resumed_at = Some(at);
    }

    /// Pages not yet in the process.
    pub fn pending_pages(&self) -> usize {
        self.pending.len()
    }

    /// True when the page at `address` is stored and not yet in the process.
    pub fn is_pending(&self, address: u64) -> bool {
        self.pending.contains_key(&address)
    }

    /// Takes `addresses` as in the process already (pages it got through
    /// a fork from a staged copy, `inherited_memory.rs`): never copied.
    pub(crate) fn mark_present(&mut self, addresses: &[u64]) {
        for address in addresses {
            self.pending.remove(address);
        }
    }

    /// Brings in the page at `address` now, if it is stored and missing,
    /// counted as prefetched (used during prepare for pages the kernel itself
    /// writes, such as rseq areas, and those every thread touches first).
    pub(crate) fn prefill_page(&mut self, address: u64) -> Result<(), RestoreError> {
        let page = address & !(PAGE_SIZE - 1);
        if self.pending.contains_key(&page) && self.copy_around(page, false)? {
            self.stats.prefetched_pages += 1;
        }
        Ok(())
    }
}
