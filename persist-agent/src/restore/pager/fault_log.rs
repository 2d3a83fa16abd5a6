//! The fault log: the pages a wake faults on, recorded as the working set of
//! the next wakes, and what holds the background fill back meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use persist_common::image::WorkingSetPage;

use super::Pager;

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
    /// has run without a fault for [`super::serve::SPIN_WINDOW`] since the resume (checked
    /// each time the pager wakes, at least every millisecond), when the
    /// background fill starts, or when the pager returns. By then a wake's
    /// first request is most likely answered: what the callback wakes up no
    /// longer competes with it for a CPU.
    pub(crate) fn when_quiet(&mut self, callback: Box<dyn FnOnce() + Send>) {
        self.when_quiet = Some(callback);
    }

    pub(super) fn quiet(&mut self) {
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

    pub(super) fn hurried(&self) -> bool {
        self.hurry
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::Relaxed))
    }

    /// True while faults are being recorded.
    pub(super) fn recording(&self) -> bool {
        self.record_until
            .is_some_and(|until| Instant::now() < until)
            && !self.hurried()
    }

    /// True while faults are being logged, recorded or not.
    pub(super) fn logging(&self) -> bool {
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
    pub(super) fn expects(&self, page: WorkingSetPage) -> bool {
        self.pending
            .get(&page.address)
            .is_some_and(|&source| self.store_offset(source) == page.store_offset)
    }
}
