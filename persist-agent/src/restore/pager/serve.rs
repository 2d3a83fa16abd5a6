//! The pager's loop: serve faults as they come, fill what is missing in
//! between, and hand the ranges back to the kernel once everything is in.

use std::time::{Duration, Instant};

use persist_common::image::{PAGE_SIZE, WorkingSetPage};

use super::cpu_share::CpuShare;
use super::{Pager, PagerStats, RestoreError};
use crate::sys::uffd::{CopyOutcome, UffdEvent};

/// Most pages copied by one background ioctl: small enough that a fault waiting
/// behind it is not held up for long (docs/kernel-facts.md, Costs that shaped
/// the pager).
const FILL_BATCH_PAGES: u64 = 64;

/// Background batch while the process is faulting: eight times shorter a
/// copy for a fault to wait behind.
const FILL_BATCH_PAGES_FAULTING: u64 = 8;

/// How long after the resume or a fault the pager polls for the next fault
/// without sleeping, while recording; also how long a process must run
/// without a fault to count as quiet (`Pager::when_quiet`).
pub(super) const SPIN_WINDOW: Duration = Duration::from_micros(500);

/// How long after a fault the process counts as faulting.
const FAULTING_WINDOW: Duration = Duration::from_millis(2);

impl Pager {
    /// Serves faults and fills memory until every stored page is in the
    /// process, then unregisters its ranges and returns. Returns early when
    /// the process exits. On a page checksum error the process is killed.
    ///
    /// The loop never sleeps while pages are missing: it polls the
    /// (non-blocking) userfaultfd between small fill batches, so a fault waits
    /// at most one batch instead of a thread wake-up (tens of µs:
    /// docs/kernel-facts.md, Costs that shaped the pager).
    ///
    /// The fill may take a CPU the process wants, and lowering the pager's
    /// priority does not prevent it: the restored process leads its own
    /// session, so autogroup scheduling weighs it against the agent as a group.
    /// So after a resume with a working set copied in, the fill is held back
    /// while the wake logs the faults (`Pager::log_faults`). A lazy wake keeps
    /// filling between faults: holding it back there made lazy wakes slower, as
    /// the fill no longer brought pages in ahead of the faults
    /// (docs/kernel-facts.md, Costs that shaped the pager).
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
                if let Some(address) = self.apply_event(event) {
                    faults.push(address);
                }
            }
            if !faults.is_empty() {
                last_fault = Some(Instant::now());
                self.fault_noted();
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
            // Only faults while logging, so that every page the process touches
            // and lacks faults and is logged: a fill would bring some in first,
            // and the next wake faulted on them again. This also keeps the fill
            // from taking a CPU from a prefetched wake's first request. While
            // recording, right after the resume or a fault, faults are polled
            // for from another CPU than the one the process runs on (a fill
            // there would delay its request, and sleeping adds a wake-up to
            // each fault); once faults pause, the pager sleeps, so that the
            // process's other threads get that CPU. A wake whose set was copied
            // in rarely faults: the pager sleeps from the start, as moving
            // itself off the process's CPU delayed the first request more than
            // it saved, and polls only after a fault, as the pages its set
            // lacked tend to come in a row (figures: docs/kernel-facts.md,
            // Costs that shaped the pager).
            // Held back for a tree's quiet as while logging, but faults
            // still bring in their whole run.
            if self.logging() || self.fill_held() {
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
                // A forked child's pager knows its parent's pid only.
                if spin && !self.forked && cpu.avoid_cpu_of(self.pid()) {
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
            if self.stats.fill_started_after.is_none() {
                self.stats.fill_started_after = Some(started.elapsed());
            }
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
        for child in std::mem::take(&mut self.children) {
            match child.join() {
                Ok((result, log)) => {
                    if let Err(err) = result {
                        tracing::warn!(pid = self.pidfd.pid(), %err, "pager of a forked child");
                    }
                    // What the child lacked, its parent lacked at the fork:
                    // in the parent's part of the working set, the next
                    // wake's children inherit it.
                    if let Some(own) = self.fault_log.as_mut() {
                        own.extend(log);
                    }
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

    /// Serves one fault; false when it must be retried after reading events.
    fn serve_fault(&mut self, address: u64) -> Result<bool, RestoreError> {
        let page = address & !(PAGE_SIZE - 1);
        self.stats.faults += 1;
        if self.pending.contains_key(&page) {
            let before = self.pending.len();
            // While logging, only the page touched comes in, so that every page
            // the process needs faults and the set learns it: a whole run
            // copied for one fault hid the run's other pages, and a process
            // walking a run then faulted one page further on each wake
            // (docs/kernel-facts.md, Costs that shaped the pager).
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

    /// Adds the pending `page` to the fault log.
    fn log_fault(&mut self, page: u64) {
        let source = self.pending[&page];
        let store_offset = self.store_offset(source);
        if let Some(log) = self.fault_log.as_mut() {
            log.push(WorkingSetPage {
                address: page,
                store_offset,
            });
        }
    }
}
