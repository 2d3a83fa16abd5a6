//! Bulk copies into a stopped process: the pages a wake is known to need,
//! copied before the resume in few, large ioctls spread over every CPU.
//!
//! A `UFFDIO_COPY` of many pages costs much less a page than one of a single
//! page, and two threads copy nearly twice as fast as one
//! (docs/kernel-facts.md, Costs that shaped the pager). So the pages are sorted
//! by address, merged into spans that are contiguous both in the process and in
//! the page store (bridging short gaps of pages that are stored too), and
//! threads, one a CPU, claim the spans one at a time, each from its own lane of
//! the address-ordered list: two threads copying neighbouring spans wait for
//! the same page table's lock (docs/kernel-facts.md, Restore and wake). The
//! process is stopped, so nothing else changes its address space meanwhile;
//! anything the kernel still refuses is copied again page by page by the
//! ordinary path.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use persist_common::image::{PAGE_SIZE, PageRun, WorkingSetPage};

use super::{Pager, RestoreError, Sources};
use crate::sys::uffd::{CopyOutcome, Userfault};

/// Longest span copied by one ioctl (256 KiB, a fraction of a millisecond):
/// a thread holding the last span is waited for.
const MAX_SPAN_PAGES: u64 = 64;

/// Longest run of pages the set does not name that still joins two spans:
/// copying them costs less than a second ioctl, and pages next to touched
/// ones tend to be touched soon.
const MAX_BRIDGE_PAGES: u64 = 3;

/// Never-stored pages mapped as zero pages on each side of one a working
/// set names.
const ZERO_AROUND_PAGES: u64 = 4;

/// Most threads copying at once.
const MAX_THREADS: usize = 4;

/// Pages a thread must have to copy to be worth starting: starting one costs
/// tens of µs, and on a busy machine it may get a CPU only once the copy is
/// over, then take it from the process just resumed (docs/kernel-facts.md,
/// Costs that shaped the pager).
const PAGES_PER_EXTRA_THREAD: u64 = 512;

/// `count` pending pages from `address` on, stored consecutively from
/// `store_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    address: u64,
    store_offset: u64,
    count: u64,
}

/// A bulk copy planned ahead, which several threads may do together.
#[derive(Clone)]
pub(crate) struct PlannedCopy {
    shared: Arc<Shared>,
}

/// What runs once every page of a planned copy is in.
pub(crate) type WhenCopied = Box<dyn FnOnce() + Send>;

impl PlannedCopy {
    /// Copies spans nobody has claimed yet, on the calling thread, until
    /// none is left, without waiting for the spans other threads hold. Safe
    /// from any thread, at any time before the copy is finished: the process
    /// is stopped until then.
    pub(crate) fn help(&self) {
        self.shared.work();
    }

    /// The number of pages the plan copies.
    pub(crate) fn pages(&self) -> u64 {
        self.shared.jobs.iter().map(|job| job.span.count).sum()
    }

    /// Copies spans nobody has claimed yet, as [`PlannedCopy::help`] does,
    /// and has `then` called once every page of the plan is in.
    ///
    /// Once every page of the plan is in, so that the process may run
    /// without [`Pager::finish_planned`] having retried anything, the thread
    /// that copied the last span calls `then` (this one, at once, if the
    /// copy was over already). Waiting for that thread instead cost a
    /// wake-up of this one before the process could run
    /// ({P}). A
    /// copy that failed anywhere never calls it.
    pub(crate) fn help_then(&self, then: WhenCopied) {
        {
            let mut finished = self.shared.finished.lock().expect("bulk copy lock");
            if finished.outcomes.len() < self.shared.jobs.len() {
                finished.then = Some(then);
            } else {
                let copied = all_copied(&finished.outcomes);
                drop(finished);
                if copied {
                    then();
                }
                return;
            }
        }
        self.shared.work();
    }

    /// Whether every page of the copy is in, once it is over (false
    /// before): the thread that copied its last span then went on
    /// ([`PlannedCopy::help_then`]).
    pub(crate) fn copied_whole(&self) -> bool {
        let finished = self.shared.finished.lock().expect("bulk copy lock");
        finished.outcomes.len() == self.shared.jobs.len() && all_copied(&finished.outcomes)
    }
}

/// Runs `steps` in turn: helps with each one's copy (if any) as
/// [`PlannedCopy::help_then`] does, and once every page of it is in, runs
/// its action, then goes on to the next step, on the thread that copied the
/// copy's last span. A copy that failed anywhere stops the steps there.
///
/// A tree's processes each have their own copy, and each may run as soon as
/// its own pages are in: the first one let run need not wait for the
/// others' copies.
pub(crate) fn help_each_then(steps: Vec<(Option<PlannedCopy>, WhenCopied)>) {
    let mut next: WhenCopied = Box::new(|| {});
    for (copy, action) in steps.into_iter().rev() {
        let after = next;
        let step: WhenCopied = Box::new(move || {
            action();
            after();
        });
        next = match copy {
            Some(copy) => Box::new(move || copy.help_then(step)),
            None => step,
        };
    }
    next();
}

impl Pager {
    /// Copies the pages of `set` (this process's pages of a working set)
    /// that the process still expects into it, in bulk, before it resumes.
    /// Returns the number of pages copied.
    pub(crate) fn prefetch_set(&mut self, set: &[WorkingSetPage]) -> Result<u64, RestoreError> {
        let zeroed = self.zero_ahead(set);
        let copy = self.plan_set(set);
        Ok(zeroed + self.finish_planned(&copy)?)
    }

    /// Maps the zero page where the set says the process touched memory the
    /// image does not store, and on the never-stored pages around: otherwise
    /// each costs a fault round trip on the wake, hundreds of µs when the pager
    /// has lost its CPU (docs/kernel-facts.md, Costs that shaped the pager). A
    /// zero page costs no memory, so this is done when the skeleton is
    /// prepared. Returns the number of pages mapped.
    ///
    /// The pages around count because allocations shift a little from one
    /// wake to the next: redis wrote the page before one its set named on
    /// every wake after the recording one.
    ///
    /// In a shared memory object served lazily a zero page is a page of the
    /// object's, which the parked skeleton holds: only the pages the set
    /// names, none around. PostgreSQL's backend, forked after the wake,
    /// touched a dozen never-written pages of the shared buffers on every
    /// wake, each a round trip to its pager; its faults are logged into the
    /// postmaster's part of the set, so they are in the object before the
    /// next resume.
    pub(crate) fn zero_ahead(&mut self, set: &[WorkingSetPage]) -> u64 {
        let mut addresses: Vec<u64> = Vec::new();
        for page in set.iter().filter(|page| !page.is_stored()) {
            let in_shared = |&(start, end): &(u64, u64)| (start..end).contains(&page.address);
            if self.shared_at_restore.iter().any(in_shared) {
                if !self.pending.contains_key(&page.address) {
                    addresses.push(page.address);
                }
                continue;
            }
            let Some(&(start, end)) = self
                .registered
                .iter()
                .find(|&&(start, end)| (start..end).contains(&page.address))
            else {
                continue;
            };
            let first = page
                .address
                .saturating_sub(ZERO_AROUND_PAGES * PAGE_SIZE)
                .max(start);
            let last = (page.address + ZERO_AROUND_PAGES * PAGE_SIZE).min(end - PAGE_SIZE);
            addresses.extend(
                (first..=last)
                    .step_by(PAGE_SIZE as usize)
                    .filter(|address| !self.pending.contains_key(address)),
            );
        }
        addresses.sort_unstable();
        addresses.dedup();
        let mut zeroed = 0;
        for address in addresses {
            // A page already there (EEXIST) is left as it is.
            if self.uffd.zeropage(address, PAGE_SIZE) == CopyOutcome::Done {
                zeroed += 1;
            }
        }
        self.stats.prefetched_pages += zeroed;
        zeroed
    }

    /// Checks now the checksums of the runs the pages of `set` come from, so
    /// that the copy on the wake does not (at prepare time, off the wake's
    /// critical path; a corrupt run kills the skeleton).
    pub(crate) fn verify_ahead(&mut self, set: &[WorkingSetPage]) -> Result<(), RestoreError> {
        for page in set {
            if let Some(&source) = self.pending.get(&page.address) {
                self.verify(source.run, page.address)?;
            }
        }
        Ok(())
    }

    /// Copies every pending page into the stopped process now.
    pub(crate) fn prefetch_all(&mut self) -> Result<(), RestoreError> {
        // Shared pages another process's prefetch put in are there for this
        // one too.
        let shared = Arc::clone(&self.shared);
        self.pending
            .retain(|_, source| !source.slot.is_some_and(|slot| shared.is_filled(slot)));
        let addresses: Vec<u64> = self.pending.keys().copied().collect();
        let spans = self.spans(&addresses, 0);
        self.copy_in_bulk(spans)?;
        if !self.pending.is_empty() {
            return Err(RestoreError::Pager {
                pid: self.pid(),
                reason: format!(
                    "{} pages still missing after prefetching every page",
                    self.pending.len()
                ),
            });
        }
        Ok(())
    }

    /// Merges sorted pending `addresses` into spans, bridging gaps of up to
    /// `bridge` pending pages whose contents continue the span in the store.
    fn spans(&self, addresses: &[u64], bridge: u64) -> Vec<Span> {
        // A copy lands in one mapping only: spans never cross the end of one.
        let mut ranges = self.registered.clone();
        ranges.sort_unstable();
        let range_of = |address: u64| ranges.partition_point(|&(start, _)| start <= address);
        let mut spans: Vec<Span> = Vec::new();
        for &address in addresses {
            let Some(&source) = self.pending.get(&address) else {
                continue;
            };
            let store_offset = self.store_offset(source);
            if let Some(last) = spans.last_mut()
                && range_of(last.address) == range_of(address)
                && self.extend_span(last, address, store_offset, bridge)
            {
                continue;
            }
            spans.push(Span {
                address,
                store_offset,
                count: 1,
            });
        }
        spans
    }

    /// Grows `span` up to and including the page at `address` (stored at
    /// `store_offset`) when every page in between is pending and stored
    /// right after the span's last page, the gap is at most `bridge` pages
    /// and the span stays within [`MAX_SPAN_PAGES`].
    fn extend_span(&self, span: &mut Span, address: u64, store_offset: u64, bridge: u64) -> bool {
        let end = span.address + span.count * PAGE_SIZE;
        let Some(gap) = address.checked_sub(end).map(|bytes| bytes / PAGE_SIZE) else {
            return false;
        };
        let grown = span.count + gap + 1;
        if gap > bridge
            || grown > MAX_SPAN_PAGES
            || store_offset != span.store_offset + (grown - 1) * PAGE_SIZE
        {
            return false;
        }
        let bridged = (0..gap).all(|index| {
            let page = end + index * PAGE_SIZE;
            self.pending.get(&page).is_some_and(|&source| {
                self.store_offset(source) == span.store_offset + (span.count + index) * PAGE_SIZE
            })
        });
        if bridged {
            span.count = grown;
        }
        bridged
    }

    /// Verifies and copies `spans`, on this thread and helpers, then updates
    /// what is pending. On a corrupt run the process is killed.
    ///
    /// Helpers claim spans one at a time and are never waited for unless
    /// they hold one: on a busy machine a helper may only get a CPU after
    /// this thread has copied everything, and then it finds nothing to do.
    fn copy_in_bulk(&mut self, spans: Vec<Span>) -> Result<u64, RestoreError> {
        let pages = spans.iter().map(|span| span.count).sum();
        let threads = copy_threads(pages);
        let copy = self.plan_copy(spans, threads);
        for _ in 1..threads {
            let shared = Arc::clone(&copy.shared);
            let spawned = std::thread::Builder::new()
                .name("persist-copy".into())
                .spawn(move || shared.work());
            if spawned.is_err() {
                break;
            }
        }
        self.finish_copy(&copy, true)
    }

    /// The copy of `spans`, ready for any thread to help with
    /// ([`PlannedCopy::help_then`]) until [`Pager::finish_copy`] ends it,
    /// split into `lanes` lanes for as many threads.
    fn plan_copy(&self, spans: Vec<Span>, lanes: usize) -> PlannedCopy {
        let claimed = spans.iter().map(|_| AtomicBool::new(false)).collect();
        let jobs = spans
            .into_iter()
            .map(|span| Job {
                runs: self.unverified_runs(&span),
                span,
            })
            .collect();
        PlannedCopy {
            shared: Arc::new(Shared {
                uffd: Arc::clone(&self.uffd),
                sources: Arc::clone(&self.sources),
                runs: self.runs.clone(),
                jobs,
                claimed,
                lanes: lanes.max(1),
                arrivals: AtomicUsize::new(0),
                finished: Mutex::new(Finished::default()),
                all_finished: Condvar::new(),
            }),
        }
    }

    /// Does what is left of `copy` on this thread, waits for the spans
    /// other threads hold, then updates what is pending. On a corrupt run
    /// the process is killed.
    fn finish_copy(&mut self, copy: &PlannedCopy, help: bool) -> Result<u64, RestoreError> {
        let before = self.pending.len();
        if help {
            copy.shared.work();
        }
        let outcomes = copy.shared.wait_all();

        let mut retry = Vec::new();
        let mut corrupt = None;
        for outcome in outcomes {
            match outcome {
                Outcome::Copied { span, pages, runs } => {
                    for run in runs {
                        self.verified[run as usize] = true;
                    }
                    self.filled(span.address, pages);
                    if pages < span.count {
                        retry.push((span.address + pages * PAGE_SIZE, span.count - pages));
                    }
                }
                Outcome::Corrupt { address, error } => corrupt = corrupt.or(Some((address, error))),
            }
        }
        if let Some((address, reason)) = corrupt {
            return Err(self.page_failed(address, &reason));
        }
        for (address, count) in retry {
            for index in 0..count {
                let page = address + index * PAGE_SIZE;
                if self.pending.contains_key(&page) && !self.copy_around(page, true)? {
                    return Err(RestoreError::Pager {
                        pid: self.pid(),
                        reason: format!(
                            "the address space changed while copying the page at {page:#x} before the resume"
                        ),
                    });
                }
            }
        }
        let copied = (before - self.pending.len()) as u64;
        self.stats.prefetched_pages += copied;
        Ok(copied)
    }

    /// Plans the copy of the pages of `set` the process still expects, at
    /// prepare time: on the wake any thread may [`PlannedCopy::help_to_the_end`] with
    /// it (the daemon's wake thread starts before the restore thread is
    /// even awake), and [`Pager::finish_planned`] ends it.
    pub(crate) fn plan_set(&self, set: &[WorkingSetPage]) -> PlannedCopy {
        let mut addresses: Vec<u64> = set
            .iter()
            .filter(|page| self.expects(**page))
            .map(|page| page.address)
            .collect();
        addresses.sort_unstable();
        addresses.dedup();
        // Copied by the restore thread and the daemon's wake thread.
        self.plan_copy(self.spans(&addresses, MAX_BRIDGE_PAGES), 2)
    }

    /// Ends a copy planned by [`Pager::plan_set`]. Returns the number of
    /// pages copied.
    pub(crate) fn finish_planned(&mut self, copy: &PlannedCopy) -> Result<u64, RestoreError> {
        self.finish_copy(copy, true)
    }

    /// Ends a copy planned by [`Pager::plan_set`] that another thread
    /// copies, without helping: this thread only waits for it (sleeping),
    /// and takes no CPU from a process of the tree already let run. Only
    /// for a copy that thread is sure to finish, or this one waits forever.
    pub(crate) fn finish_planned_behind(
        &mut self,
        copy: &PlannedCopy,
    ) -> Result<u64, RestoreError> {
        self.finish_copy(copy, false)
    }

    /// The runs the pages of `span` come from whose checksums are not yet checked.
    fn unverified_runs(&self, span: &Span) -> Vec<u32> {
        let mut runs: Vec<u32> = (0..span.count)
            .map(|index| self.pending[&(span.address + index * PAGE_SIZE)].run)
            .filter(|&run| !self.verified[run as usize])
            .collect();
        runs.dedup();
        runs
    }
}

/// One span to copy and the runs to verify first.
struct Job {
    span: Span,
    runs: Vec<u32>,
}

/// What became of one job.
#[derive(Clone)]
enum Outcome {
    /// The first `pages` pages of the span are in; its runs were verified.
    Copied {
        span: Span,
        pages: u64,
        runs: Vec<u32>,
    },
    /// A run of the span failed its checksum, or its file could not be
    /// read; nothing was copied.
    Corrupt { address: u64, error: String },
}

/// The jobs of one bulk copy, shared by the threads that claim them.
struct Shared {
    uffd: Arc<Userfault>,
    sources: Arc<Sources>,
    runs: Vec<PageRun>,
    /// In address order.
    jobs: Vec<Job>,
    /// Whether a thread has taken each job.
    claimed: Vec<AtomicBool>,
    /// How many parts the job list is split into: the n-th thread to come
    /// starts at the start of part n (modulo their number).
    lanes: usize,
    /// Threads that came to work so far.
    arrivals: AtomicUsize,
    finished: Mutex<Finished>,
    all_finished: Condvar,
}

impl Shared {
    /// Claims and does jobs until none is left: from the start of this
    /// thread's lane on, wrapping around, the jobs nobody took yet.
    fn work(&self) {
        let arrival = self.arrivals.fetch_add(1, Ordering::Relaxed);
        for index in lane_order(arrival, self.jobs.len(), self.lanes) {
            if self.claimed[index].swap(true, Ordering::AcqRel) {
                continue;
            }
            let job = &self.jobs[index];
            let outcome = self.copy(job);
            let mut finished = self.finished.lock().expect("bulk copy lock");
            finished.outcomes.push(outcome);
            if finished.outcomes.len() == self.jobs.len() {
                self.all_finished.notify_all();
                let then = finished.then.take();
                let copied = all_copied(&finished.outcomes);
                drop(finished);
                if let (Some(then), true) = (then, copied) {
                    then();
                }
            }
        }
    }

    fn copy(&self, job: &Job) -> Outcome {
        let span = job.span;
        for &run in &job.runs {
            if let Err(error) = self.sources.image().pages().run(&self.runs[run as usize]) {
                return Outcome::Corrupt {
                    address: span.address,
                    error: error.to_string(),
                };
            }
        }
        let len = (span.count * PAGE_SIZE) as usize;
        let bytes = match self.sources.read(span.store_offset, len) {
            Ok(bytes) => bytes,
            Err(error) => {
                return Outcome::Corrupt {
                    address: span.address,
                    error: error.to_string(),
                };
            }
        };
        let pages = match self.uffd.copy(span.address, bytes) {
            CopyOutcome::Done => span.count,
            CopyOutcome::Partial(copied) => copied / PAGE_SIZE,
            // Left to the one-by-one path, which knows what each means.
            CopyOutcome::Exists | CopyOutcome::Again | CopyOutcome::Gone => 0,
        };
        Outcome::Copied {
            span,
            pages,
            runs: job.runs.clone(),
        }
    }

    /// Waits until every job is done, and returns their outcomes.
    fn wait_all(&self) -> Vec<Outcome> {
        let mut finished = self.finished.lock().expect("bulk copy lock");
        while finished.outcomes.len() < self.jobs.len() {
            finished = self.all_finished.wait(finished).expect("bulk copy lock");
        }
        finished.outcomes.clone()
    }
}

/// The order in which the thread that came `arrival`-th (from 0) tries
/// `jobs` jobs split into `lanes` lanes: from the start of its lane to the
/// last job, then from the first.
fn lane_order(arrival: usize, jobs: usize, lanes: usize) -> impl Iterator<Item = usize> {
    let start = (arrival % lanes) * jobs / lanes;
    (start..jobs).chain(0..start)
}

/// The outcomes of the jobs done so far, and what to do once all are.
#[derive(Default)]
struct Finished {
    outcomes: Vec<Outcome>,
    then: Option<WhenCopied>,
}

/// True when every outcome is a whole span copied.
fn all_copied(outcomes: &[Outcome]) -> bool {
    outcomes.iter().all(
        |outcome| matches!(outcome, Outcome::Copied { span, pages, .. } if *pages == span.count),
    )
}

/// Threads worth using for `pages` pages: one a CPU, if there is work for it.
fn copy_threads(pages: u64) -> usize {
    static CPUS: OnceLock<usize> = OnceLock::new();
    // Read once: finding the CPU count reads cgroup files, which is slow
    // (docs/kernel-facts.md, Costs that shaped the pager).
    let cpus = *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from));
    let useful = (pages / PAGES_PER_EXTRA_THREAD).max(1) as usize;
    cpus.min(MAX_THREADS).min(useful)
}

#[cfg(test)]
mod tests {
    use super::lane_order;

    #[test]
    fn each_thread_starts_in_its_own_lane_and_wraps_around() {
        let order = |arrival, jobs, lanes| lane_order(arrival, jobs, lanes).collect::<Vec<_>>();
        assert_eq!(order(0, 6, 2), [0, 1, 2, 3, 4, 5]);
        assert_eq!(
            order(1, 6, 2),
            [3, 4, 5, 0, 1, 2],
            "the second thread starts halfway"
        );
        assert_eq!(
            order(2, 6, 2),
            order(0, 6, 2),
            "a third shares the first lane"
        );
        assert_eq!(order(2, 7, 3), [4, 5, 6, 0, 1, 2, 3]);
        assert_eq!(order(1, 1, 2), [0], "one job: both threads try it");
        assert!(order(1, 0, 2).is_empty());
    }
}
