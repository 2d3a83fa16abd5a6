//! The lazy pager: serves a restored process's first touches of anonymous
//! memory from the page store through userfaultfd, and fills the rest in the
//! background until nothing is missing.
//!
//! One thread does everything, on purpose: a background copy decided before
//! a `madvise(DONTNEED)` event was read could otherwise land after it and
//! resurrect image content where the process expects zeros. Handling events
//! and copies in one sequence, and treating `EAGAIN` (the kernel's "address
//! space changing") as "read events first", keeps that ordering.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use persist_common::image::{
    Image, MAX_RUN_PAGES, Mapping, MappingKind, PAGE_SIZE, PageRun, WorkingSetPage,
};

use super::RestoreError;
use super::layout::{describe, is_lazy};
use crate::sys::pidfd::PidFd;
use crate::sys::uffd::{CopyOutcome, UffdEvent, Userfault};

mod adopt;
mod bulk;
mod cpu_share;
mod sources;

pub use adopt::{AddressEvent, EventJournal, JournalError};

pub(crate) use bulk::PlannedCopy;

use cpu_share::CpuShare;
use sources::Sources;

/// Most pages copied by one background ioctl: small enough that a fault
/// waiting behind it is served within ~100 µs.
const FILL_BATCH_PAGES: u64 = 64;

/// Background batch while the process is faulting (~10 µs of copying).
const FILL_BATCH_PAGES_FAULTING: u64 = 8;

/// How long after the resume or a fault the pager polls for the next fault
/// without sleeping, while recording; also how long a process must run
/// without a fault to count as quiet (`Pager::when_quiet`).
const SPIN_WINDOW: Duration = Duration::from_micros(500);

/// How long after a fault the process counts as faulting.
const FAULTING_WINDOW: Duration = Duration::from_millis(2);

/// Where a missing page's content is: run index and page index in the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Source {
    run: u32,
    page: u32,
}

/// The files of lazy file mappings, by index of the mapping in the manifest.
pub(crate) type MappedFiles = std::collections::HashMap<usize, Arc<std::fs::File>>;

/// Pages of a private file mapping that nothing was stored for and the file
/// holds (a page wholly past its end would have been a SIGBUS: it reads
/// zeros instead), as runs of at most [`MAX_RUN_PAGES`] pages.
fn unstored_file_pages(mapping: &Mapping, offset: u64, file_len: u64) -> Vec<(u64, u64)> {
    let in_file = file_len
        .saturating_sub(offset)
        .div_ceil(PAGE_SIZE)
        .min(mapping.len() / PAGE_SIZE);
    let mut stored = vec![false; in_file as usize];
    for run in &mapping.pages {
        for page in run.first_page..(run.first_page + run.count).min(in_file) {
            stored[page as usize] = true;
        }
    }
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for page in (0..in_file).filter(|&page| !stored[page as usize]) {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == page && *count < MAX_RUN_PAGES => {
                *count += 1
            }
            _ => runs.push((page, 1)),
        }
    }
    runs
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

/// Serves one restored process's lazy memory.
pub struct Pager {
    uffd: Arc<Userfault>,
    pidfd: PidFd,
    sources: Arc<Sources>,
    runs: Vec<PageRun>,
    verified: Vec<bool>,
    pending: BTreeMap<u64, Source>,
    registered: Vec<(u64, u64)>,
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
    /// Pagers of children the process forked while pages were missing.
    children: Vec<std::thread::JoinHandle<Result<PagerStats, RestoreError>>>,
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
    /// `pidfd` whose userfaultfd is `uffd`. `files` holds the file of every
    /// lazy file mapping, by index in the manifest: its pages nothing was
    /// stored for come from there.
    pub(crate) fn new(
        uffd: Userfault,
        pidfd: PidFd,
        image: Arc<Image>,
        files: &MappedFiles,
    ) -> Result<Self, RestoreError> {
        let mut sources = Sources::new(Arc::clone(&image));
        let mut runs = Vec::new();
        let mut verified = Vec::new();
        let mut pending = BTreeMap::new();
        let mut registered = Vec::new();
        let mut add_run = |run: PageRun, checked: bool, start: u64| {
            let index = runs.len() as u32;
            runs.push(run);
            verified.push(checked);
            for page in 0..run.count {
                let address = start + (run.first_page + page) * PAGE_SIZE;
                let source = Source {
                    run: index,
                    page: page as u32,
                };
                pending.insert(address, source);
            }
        };
        for (index, mapping) in image.manifest().mappings.iter().enumerate() {
            if !is_lazy(mapping) {
                continue;
            }
            registered.push((mapping.start, mapping.end));
            for run in &mapping.pages {
                add_run(*run, false, mapping.start);
            }
            let MappingKind::File { offset, .. } = mapping.kind else {
                continue;
            };
            let file = files.get(&index).ok_or_else(|| {
                RestoreError::Layout(format!(
                    "mapping {:#x}-{:#x} ({}): its file is not open for the pager",
                    mapping.start,
                    mapping.end,
                    describe(mapping)
                ))
            })?;
            let file_len = file
                .metadata()
                .map_err(|e| RestoreError::io(describe(mapping), e))?
                .len();
            let pages = mapping.len() / PAGE_SIZE;
            let base = sources.add_file(Arc::clone(file), offset, pages);
            for (first, count) in unstored_file_pages(mapping, offset, file_len) {
                let run = PageRun {
                    first_page: first,
                    count,
                    store_offset: base + first * PAGE_SIZE,
                    crc32c: 0,
                };
                // The file's pages carry no checksum: the file was checked
                // to be the one recorded (same inode) when it was opened.
                add_run(run, true, mapping.start);
            }
        }
        Ok(Self::serving(
            uffd,
            pidfd,
            Arc::new(sources),
            runs,
            verified,
            pending,
            registered,
        ))
    }

    /// A pager with these pages still to serve, and nothing done yet.
    fn serving(
        uffd: Userfault,
        pidfd: PidFd,
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
            stats: PagerStats::default(),
            resumed_at: None,
            fault_log: None,
            record_until: None,
            log_until: None,
            when_quiet: None,
            hurry: None,
            children: Vec::new(),
            journal: None,
        }
    }

    /// Pid of the restored process (in the agent's namespace).
    pub fn pid(&self) -> i32 {
        self.pidfd.pid()
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

    /// Serves faults and fills memory until every stored page is in the
    /// process, then unregisters its ranges and returns. Returns early when
    /// the process exits. On a page checksum error the process is killed.
    ///
    /// The loop never sleeps while pages are missing: it polls the
    /// (non-blocking) userfaultfd between small fill batches, so a fault
    /// waits at most one batch instead of a thread wake-up (~45 µs here).
    ///
    /// The fill may take a CPU the process wants, and lowering the pager's
    /// priority does not prevent it: the restored process leads its own
    /// session, so autogroup scheduling weighs it against the agent as a
    /// group. So after a resume with a working set copied in, the fill is
    /// held back while the wake logs the faults (`Pager::log_faults`). A lazy
    /// wake keeps filling between faults: holding it back there made redis's
    /// lazy wakes 20–40 % slower, as the fill no longer brought pages in
    /// ahead of the faults.
    pub fn run_until_filled(&mut self) -> Result<PagerStats, RestoreError> {
        let result = self.serve_and_fill();
        // Whoever waits for the process to be quiet hears of it, even on an error.
        self.quiet();
        result
    }

    fn serve_and_fill(&mut self) -> Result<PagerStats, RestoreError> {
        let started = Instant::now();
        let mut cpu = CpuShare::new();
        let mut events = Vec::new();
        let mut retry: Vec<u64> = Vec::new();
        let mut last_fault: Option<Instant> = None;
        loop {
            events.clear();
            if let Err(err) = self.uffd.read_events(&mut events) {
                if self.pidfd.has_exited() {
                    break;
                }
                return Err(RestoreError::Pager {
                    pid: self.pid(),
                    reason: format!("reading userfaultfd events: {err}"),
                });
            }
            let mut faults = std::mem::take(&mut retry);
            for event in &events {
                match *event {
                    UffdEvent::Fault { address, .. } => faults.push(address),
                    UffdEvent::Remove { start, end } => {
                        self.journal(AddressEvent::Removed { start, end });
                        self.drop_range(start, end);
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
            }
            if !faults.is_empty() {
                last_fault = Some(Instant::now());
            }
            for address in faults {
                let fault_start = Instant::now();
                if self.stats.first_fault_after.is_none() {
                    self.stats.first_fault_after = Some(started.elapsed());
                }
                if !self.serve_fault(address)? {
                    retry.push(address);
                } else if self.stats.first_fault_after_resume.is_none() {
                    self.stats.first_fault_after_resume = self.resumed_at.map(|at| at.elapsed());
                }
                self.stats.fault_time += fault_start.elapsed();
            }
            if !retry.is_empty() {
                continue;
            }
            if self.pending.is_empty() {
                break;
            }
            // Only faults while logging, so that every page the process
            // touches and lacks faults and is logged: a fill would bring
            // some in first (a busy machine's redis then faulted on 39 pages
            // again on the next wake). This also keeps the fill from taking
            // a CPU from a prefetched wake's first request. While recording,
            // right after the resume or a fault, faults are polled for from
            // another CPU than the one the process runs on (a fill there
            // would delay its request, and sleeping adds a wake-up, ~100 µs
            // here, to each fault); once faults pause, the pager sleeps, so
            // that the process's other threads get that CPU. A wake whose set
            // was copied in rarely faults: the pager sleeps from the start,
            // as moving itself off the process's CPU delayed redis's first
            // request more (4 %) than it saved, and polls only after a
            // fault, as the pages its set lacked tend to come in a row.
            if self.logging() {
                let recent = last_fault
                    .or(self.resumed_at)
                    .is_some_and(|at| at.elapsed() < SPIN_WINDOW);
                if !recent {
                    self.quiet();
                }
                let spin = if self.recording() {
                    recent
                } else {
                    last_fault.is_some_and(|at| at.elapsed() < SPIN_WINDOW)
                };
                if spin && cpu.avoid_cpu_of(self.pid()) {
                    std::hint::spin_loop();
                } else {
                    cpu.restore();
                    let _ = self.uffd.wait(1);
                }
                continue;
            }
            self.quiet();
            cpu.restore();
            // While faults keep coming the process is on its critical path:
            // small batches keep the wait behind a batch short.
            let faulting = last_fault.is_some_and(|at| at.elapsed() < FAULTING_WINDOW);
            let batch = if faulting {
                FILL_BATCH_PAGES_FAULTING
            } else {
                FILL_BATCH_PAGES
            };
            if !self.fill_batch(batch)? && self.pidfd.has_exited() {
                break;
            }
        }
        self.quiet();
        cpu.restore();
        // Faults on never-stored pages may still be queued: answer them so
        // nobody waits, then give the ranges back to the kernel.
        self.finish_events(&mut events);
        for &(start, end) in &self.registered {
            if let Err(err) = self.uffd.unregister(start, end - start) {
                tracing::debug!(pid = self.pid(), start, end, %err, "unregister");
            }
        }
        // An event queued before the unregistration (a fork, a madvise)
        // waits for a reader: read it, or its thread would wait forever.
        self.finish_events(&mut events);
        for child in self.children.drain(..) {
            match child.join() {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => {
                    tracing::warn!(pid = self.pidfd.pid(), %err, "pager of a forked child")
                }
                Err(_) => {
                    tracing::warn!(pid = self.pidfd.pid(), "pager of a forked child panicked")
                }
            }
        }
        self.stats.total_time = started.elapsed();
        Ok(self.stats)
    }

    /// Reads what is queued once the memory is all in: faults on pages
    /// nothing was stored for get zero pages (or a wake-up once the range is
    /// unregistered), a fork gets its own pager, and reading completes the
    /// other events.
    fn finish_events(&mut self, events: &mut Vec<UffdEvent>) {
        events.clear();
        let _ = self.uffd.read_events(events);
        for event in events.iter() {
            match *event {
                UffdEvent::Fault { address, .. } => {
                    let page = address & !(PAGE_SIZE - 1);
                    if self.uffd.zeropage(page, PAGE_SIZE) != CopyOutcome::Done {
                        let _ = self.uffd.wake(page, PAGE_SIZE);
                    }
                }
                UffdEvent::Fork { ufd } => self.serve_forked_child(ufd),
                _ => {}
            }
        }
    }

    /// The process forked while pages were missing: its child shares them
    /// (missing too, registered with a new userfaultfd), so a pager of its
    /// own serves the child on a thread, from a copy of what is still
    /// pending here.
    fn serve_forked_child(&mut self, ufd: std::os::fd::RawFd) {
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
            pidfd,
            Arc::clone(&self.sources),
            self.runs.clone(),
            self.verified.clone(),
            self.pending.clone(),
            self.registered.clone(),
        );
        self.children
            .push(std::thread::spawn(move || child.run_until_filled()));
    }

    /// Serves one fault; false when it must be retried after reading events.
    fn serve_fault(&mut self, address: u64) -> Result<bool, RestoreError> {
        let page = address & !(PAGE_SIZE - 1);
        self.stats.faults += 1;
        if self.pending.contains_key(&page) {
            let before = self.pending.len();
            // While logging, only the page touched comes in, so that every
            // page the process needs faults and the set learns it: a whole
            // run copied for one fault hid the run's other pages, and a
            // process walking a run then faulted one page further on each
            // wake (redis: two faults, ~100 µs each, on every wake).
            let logging = self.logging();
            if logging {
                self.log_fault(page);
            }
            let done = self.copy_around(page, !logging)?;
            self.stats.fault_pages += (before - self.pending.len()) as u64;
            return Ok(done);
        }
        self.stats.zero_faults += 1;
        if self.logging()
            && let Some(log) = self.fault_log.as_mut()
        {
            log.push(WorkingSetPage::not_stored(page));
        }
        match self.uffd.zeropage(page, PAGE_SIZE) {
            CopyOutcome::Again => Ok(false),
            CopyOutcome::Exists | CopyOutcome::Partial(_) => {
                let _ = self.uffd.wake(page, PAGE_SIZE);
                Ok(true)
            }
            CopyOutcome::Done | CopyOutcome::Gone => Ok(true),
        }
    }

    /// Adds the pending `page` to the fault log (store pages only: a working
    /// set names pages of the page store).
    fn log_fault(&mut self, page: u64) {
        let source = self.pending[&page];
        let store_offset = self.store_offset(source);
        if !self.sources.in_store(store_offset) {
            return;
        }
        if let Some(log) = self.fault_log.as_mut() {
            log.push(WorkingSetPage {
                address: page,
                store_offset,
            });
        }
    }

    /// Copies `page` and, when `whole_run`, the pending pages of its run
    /// that are contiguous with it. False when it must be retried.
    fn copy_around(&mut self, page: u64, whole_run: bool) -> Result<bool, RestoreError> {
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
    fn fill_batch(&mut self, max_pages: u64) -> Result<bool, RestoreError> {
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

    fn store_offset(&self, source: Source) -> u64 {
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
        let mut scratch = Vec::new();
        let bytes = sources
            .read(start, len, &mut scratch)
            .map_err(|err| self.page_failed(first, &err))?;
        let mut done = 0u64;
        while done < count {
            let dst = first + done * PAGE_SIZE;
            let src = &bytes[(done * PAGE_SIZE) as usize..];
            match self.uffd.copy(dst, src) {
                CopyOutcome::Done => {
                    self.forget(dst, count - done);
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
                    self.forget(dst, pages);
                    done += pages;
                }
                CopyOutcome::Exists => {
                    // Already present: nothing to copy, but a thread may wait.
                    let _ = self.uffd.wake(dst, PAGE_SIZE);
                    self.forget(dst, 1);
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
            CopyOutcome::Done | CopyOutcome::Gone => self.forget(page, 1),
            CopyOutcome::Exists | CopyOutcome::Partial(_) => {
                let _ = self.uffd.wake(page, PAGE_SIZE);
                self.forget(page, 1);
            }
            CopyOutcome::Again => return Ok(false),
        }
        Ok(true)
    }

    fn forget(&mut self, start: u64, pages: u64) {
        for index in 0..pages {
            self.pending.remove(&(start + index * PAGE_SIZE));
        }
    }

    /// Checks a run's checksum once; on a mismatch kills the process.
    fn verify(&mut self, run: u32, address: u64) -> Result<(), RestoreError> {
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
    fn page_failed(&self, address: u64, err: &dyn std::fmt::Display) -> RestoreError {
        let pid = self.pid();
        let _ = self.pidfd.send_signal(Signal::SIGKILL);
        tracing::error!(pid, address, %err, "page cannot be served: restored process killed");
        RestoreError::CorruptPage {
            pid,
            address,
            reason: err.to_string(),
        }
    }

    fn drop_range(&mut self, start: u64, end: u64) {
        let keys: Vec<u64> = self.pending.range(start..end).map(|(k, _)| *k).collect();
        self.stats.dropped_pages += keys.len() as u64;
        for key in keys {
            self.pending.remove(&key);
        }
    }

    fn unregistered(&mut self, start: u64, end: u64) {
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

    fn remap(&mut self, from: u64, to: u64, len: u64) {
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

/// Recording a working set.
impl Pager {
    /// Logs the pages copied to serve faults for `window` from now on, in
    /// order, for [`Pager::take_fault_log`]. The background fill waits until
    /// the window ends, so that every page touched in it faults.
    pub(crate) fn record_faults(&mut self, window: Duration) {
        self.fault_log = Some(Vec::new());
        self.record_until = Some(Instant::now() + window);
    }

    /// Calls `callback` from [`Pager::run_until_filled`] once the process
    /// has run without a fault for [`SPIN_WINDOW`] since the resume (checked
    /// each time the pager wakes, at least every millisecond), when the
    /// background fill starts, or when the pager returns. By then a wake's
    /// first request is most likely answered: what the callback wakes up no
    /// longer competes with it for a CPU.
    pub(crate) fn when_quiet(&mut self, callback: Box<dyn FnOnce() + Send>) {
        self.when_quiet = Some(callback);
    }

    fn quiet(&mut self) {
        if let Some(callback) = self.when_quiet.take() {
            callback();
        }
    }

    /// Logs the pages the process faults on for `window` from now on, in
    /// order, for [`Pager::take_fault_log`]: on a wake whose working set was
    /// copied in, these are the pages the set lacks. As while recording, each
    /// comes in alone and the background fill waits until the window ends,
    /// so that every such page the process touches faults.
    pub(crate) fn log_faults(&mut self, window: Duration) {
        self.fault_log = Some(Vec::new());
        self.log_until = Some(Instant::now() + window);
    }

    /// Ends recording and logging, and the fill's wait for them, once
    /// `flag` is set (the daemon stops, and the process must have all its
    /// pages before the pager is gone).
    pub(crate) fn hurry_when(&mut self, flag: Arc<AtomicBool>) {
        self.hurry = Some(flag);
    }

    fn hurried(&self) -> bool {
        self.hurry
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::Relaxed))
    }

    /// True while faults are being recorded.
    fn recording(&self) -> bool {
        self.record_until
            .is_some_and(|until| Instant::now() < until)
            && !self.hurried()
    }

    /// True while faults are being logged, recorded or not.
    fn logging(&self) -> bool {
        self.recording()
            || (self.log_until.is_some_and(|until| Instant::now() < until) && !self.hurried())
    }

    /// The pages copied to serve faults since [`Pager::record_faults`], in
    /// the order they were first copied.
    pub(crate) fn take_fault_log(&mut self) -> Vec<WorkingSetPage> {
        let mut seen = std::collections::HashSet::new();
        let mut log = self.fault_log.take().unwrap_or_default();
        log.retain(|page| seen.insert(page.address));
        log
    }

    /// True when the process still expects the image page of `page` at its address.
    fn expects(&self, page: WorkingSetPage) -> bool {
        self.pending
            .get(&page.address)
            .is_some_and(|&source| self.store_offset(source) == page.store_offset)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::fd::FromRawFd;

    use persist_common::image::{ImageWriter, Manifest, Mapping};

    use super::*;
    use crate::sys::uffd;

    fn manifest(mappings: Vec<Mapping>) -> Manifest {
        Manifest {
            mappings,
            ..Manifest::default()
        }
    }

    /// An anonymous mapping of our own, registered with a fresh userfaultfd,
    /// and an image whose pages for it hold `page index + 1` in every byte.
    #[test]
    fn serves_image_pages_and_zeros_after_dontneed() {
        crate::test_support::require_root!();
        const PAGES: u64 = 64;
        let len = (PAGES * PAGE_SIZE) as usize;
        let (area, mut pager, _temp) = patterned_pager(PAGES);
        let start = area as u64;

        // Discard pages 8..16 before anything is filled: the madvise waits
        // for the pager to read the event, so it runs on its own thread.
        let discard = std::thread::spawn(move || {
            // SAFETY: the range lies inside our own anonymous mapping.
            unsafe {
                libc::madvise(
                    (start + 8 * PAGE_SIZE) as *mut libc::c_void,
                    (8 * PAGE_SIZE) as usize,
                    libc::MADV_DONTNEED,
                )
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        let serving = std::thread::spawn(move || pager.run_until_filled().unwrap());
        assert_eq!(discard.join().unwrap(), 0);
        // SAFETY: reading our own mapping; missing pages are served by the
        // pager thread.
        let bytes = unsafe { std::slice::from_raw_parts(area.cast::<u8>(), len) };
        for page in 0..PAGES as usize {
            let expected = if (8..16).contains(&page) {
                0
            } else {
                page as u8 + 1
            };
            let chunk = &bytes[page * PAGE_SIZE as usize..(page + 1) * PAGE_SIZE as usize];
            assert!(chunk.iter().all(|&b| b == expected), "page {page}");
        }
        let stats = serving.join().unwrap();
        assert_eq!(stats.dropped_pages, 8);
        assert_eq!(stats.fault_pages + stats.filled_pages, PAGES - 8);
        // Unregistered at the end: a later DONTNEED reads zeros without help.
        // SAFETY: as above.
        unsafe { libc::madvise(area, len, libc::MADV_DONTNEED) };
        assert!(bytes.iter().all(|&b| b == 0));
    }

    /// A mapping split in three by mprotect: copies of spans that cross the
    /// splits fall back to single pages, and no page is lost or zeroed.
    #[test]
    fn spans_across_split_mappings_are_copied_page_by_page() {
        crate::test_support::require_root!();
        const PAGES: u64 = 32;
        let (area, mut pager, _temp) = patterned_pager(PAGES);
        let start = area as u64;
        // SAFETY: pages 8..10 lie inside our own mapping; reading them stays allowed.
        let rc = unsafe {
            libc::mprotect(
                (start + 8 * PAGE_SIZE) as *mut libc::c_void,
                (2 * PAGE_SIZE) as usize,
                libc::PROT_READ,
            )
        };
        assert_eq!(rc, 0);
        pager.prefetch_all().unwrap();
        assert_eq!(pager.pending_pages(), 0);
        // SAFETY: every page of our own mapping is present now.
        let bytes =
            unsafe { std::slice::from_raw_parts(area.cast::<u8>(), (PAGES * PAGE_SIZE) as usize) };
        for (page, chunk) in bytes.chunks(PAGE_SIZE as usize).enumerate() {
            assert!(chunk.iter().all(|&b| b == page as u8 + 1), "page {page}");
        }
    }

    /// Enough pages for several copy threads: each page arrives with its own
    /// content and nothing is left to fault.
    #[test]
    fn prefetch_all_copies_on_several_threads() {
        crate::test_support::require_root!();
        const PAGES: u64 = 1024;
        let (area, mut pager, _temp) = patterned_pager(PAGES);
        pager.prefetch_all().unwrap();
        assert_eq!(pager.pending_pages(), 0);
        // SAFETY: every page of our own mapping is present now.
        let bytes =
            unsafe { std::slice::from_raw_parts(area.cast::<u8>(), (PAGES * PAGE_SIZE) as usize) };
        for (page, chunk) in bytes.chunks(PAGE_SIZE as usize).enumerate() {
            assert!(
                chunk.iter().all(|&b| b == (page % 251) as u8 + 1),
                "page {page}"
            );
        }
        assert_eq!(pager.stats.prefetched_pages, PAGES);
    }

    /// A pager for an anonymous mapping of our own of `pages` pages,
    /// registered with a fresh userfaultfd, whose image holds `page index + 1`
    /// (modulo 251) in every byte of each page.
    fn patterned_pager(pages: u64) -> (*mut libc::c_void, Pager, tempfile::TempDir) {
        let len = (pages * PAGE_SIZE) as usize;
        let area = nix_mmap(len);
        let start = area as u64;
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("image");
        let mut writer = ImageWriter::create(&dir).unwrap();
        let mut data = Vec::with_capacity(len);
        for page in 0..pages {
            data.extend(std::iter::repeat_n(
                (page % 251) as u8 + 1,
                PAGE_SIZE as usize,
            ));
        }
        let runs = writer.append_pages(0, &data).unwrap();
        let mut manifest = manifest(vec![Mapping::anonymous(start, pages, runs)]);
        writer.finish(&mut manifest).unwrap();
        let image = Arc::new(Image::open(&dir).unwrap());
        let raw = uffd::create_raw().unwrap();
        // SAFETY: create_raw returned a new fd that nothing else owns.
        let fault = unsafe { Userfault::from_raw_fd(raw) };
        fault.register(start, pages * PAGE_SIZE).unwrap();
        let pidfd = PidFd::open(std::process::id() as i32).unwrap();
        (
            area,
            Pager::new(fault, pidfd, image, &MappedFiles::new()).unwrap(),
            temp,
        )
    }

    /// mremap moves missing pages (they must arrive at their new address
    /// with their own content) and munmap drops them.
    #[test]
    fn follows_mremap_and_munmap_of_missing_pages() {
        crate::test_support::require_root!();
        const PAGES: u64 = 64;
        let (area, mut pager, _temp) = patterned_pager(PAGES);
        let start = area as u64;
        let target = nix_mmap((16 * PAGE_SIZE) as usize) as u64;
        // Both calls wait for the pager to read their events.
        let changes = std::thread::spawn(move || {
            // SAFETY: moving pages 32..48 of our own mapping over a mapping
            // reserved for them, and unmapping pages 48..56 of it.
            unsafe {
                let moved = libc::mremap(
                    (start + 32 * PAGE_SIZE) as *mut libc::c_void,
                    (16 * PAGE_SIZE) as usize,
                    (16 * PAGE_SIZE) as usize,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    target as *mut libc::c_void,
                );
                let unmapped = libc::munmap(
                    (start + 48 * PAGE_SIZE) as *mut libc::c_void,
                    (8 * PAGE_SIZE) as usize,
                );
                (moved as u64, unmapped)
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        let serving = std::thread::spawn(move || pager.run_until_filled().unwrap());
        assert_eq!(changes.join().unwrap(), (target, 0));
        // SAFETY: the moved pages now live at `target`, served by the pager.
        let moved =
            unsafe { std::slice::from_raw_parts(target as *const u8, (16 * PAGE_SIZE) as usize) };
        for page in 0..16usize {
            let chunk = &moved[page * PAGE_SIZE as usize..(page + 1) * PAGE_SIZE as usize];
            assert!(
                chunk.iter().all(|&b| b == 32 + page as u8 + 1),
                "moved page {page}"
            );
        }
        // SAFETY: pages 0..32 and 56..64 are still mapped where they were.
        let kept =
            unsafe { std::slice::from_raw_parts(area.cast::<u8>(), (PAGES * PAGE_SIZE) as usize) };
        for page in (0..32usize).chain(56..64) {
            let chunk = &kept[page * PAGE_SIZE as usize..(page + 1) * PAGE_SIZE as usize];
            assert!(chunk.iter().all(|&b| b == page as u8 + 1), "page {page}");
        }
        let stats = serving.join().unwrap();
        assert_eq!(stats.dropped_pages, 8, "the unmapped pages are dropped");
        assert_eq!(stats.fault_pages + stats.filled_pages, PAGES - 8);
    }

    /// A fresh private anonymous mapping of `len` bytes, leaked for the test.
    pub(crate) fn nix_mmap(len: usize) -> *mut libc::c_void {
        // SAFETY: a fresh private anonymous mapping, leaked for the test.
        let area = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(area, libc::MAP_FAILED);
        area
    }
}
