//! Holding a woken tree's background fill back until the tree is quiet.
//!
//! Right after a tree's wake, every process's pager would fill its missing
//! pages in the background: PostgreSQL's six pagers, and one more for each
//! backend the postmaster forks, each with thousands of pages (most of them
//! the shared memory segment's), on a machine with two CPUs, while the
//! first request is being answered by two of those processes (the
//! postmaster and the backend it forked). The pages that request needs come
//! in through faults (or the working set copied ahead); the rest can wait
//! until no process of the tree has faulted for a while, or a bound has
//! passed (docs/process-trees.md, The first query after a wake).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Pager;

/// How long no pager of the tree must have served a fault before the fill
/// starts: longer than the gaps between the faults of a request being
/// answered (a backend authenticating, then reading the catalog).
pub const QUIET: Duration = Duration::from_millis(10);

/// The fill starts this long after the wake whatever happens: a process
/// that faults now and then must still get all its pages, and its pager
/// end.
pub const LONGEST: Duration = Duration::from_millis(500);

/// Shared by every pager of a woken tree (and the pagers of the children
/// its processes fork): says when their background fill may start.
#[derive(Debug)]
pub struct FillGate {
    since: Instant,
    /// Microseconds from `since` to the last fault any pager served.
    last_fault_us: AtomicU64,
    open: AtomicBool,
    quiet: Duration,
    longest: Duration,
}

impl FillGate {
    /// A gate closed from now on, which opens once no fault was served for
    /// `quiet`, or after `longest` at the latest.
    pub fn new(quiet: Duration, longest: Duration) -> Self {
        Self {
            since: Instant::now(),
            last_fault_us: AtomicU64::new(0),
            open: AtomicBool::new(false),
            quiet,
            longest,
        }
    }

    /// The gate of a tree's wake: [`QUIET`], [`LONGEST`].
    pub fn for_wake() -> Self {
        Self::new(QUIET, LONGEST)
    }

    /// A pager of the tree served a fault now.
    pub(super) fn fault(&self) {
        let us = self.since.elapsed().as_micros() as u64;
        self.last_fault_us.fetch_max(us, Ordering::Relaxed);
    }

    /// True once the fill may go ahead (it stays so).
    pub fn is_open(&self) -> bool {
        if self.open.load(Ordering::Relaxed) {
            return true;
        }
        let now = self.since.elapsed();
        let last = Duration::from_micros(self.last_fault_us.load(Ordering::Relaxed));
        let open = now >= self.longest || now.saturating_sub(last) >= self.quiet;
        if open {
            self.open.store(true, Ordering::Relaxed);
        }
        open
    }
}

impl Pager {
    /// Holds the background fill back until `gate` opens; faults are served
    /// meanwhile, whole runs at a time, and noted on the gate. The pagers of
    /// the children the process forks share the gate.
    pub(crate) fn hold_fill_until(&mut self, gate: Arc<FillGate>) {
        self.fill_gate = Some(gate);
    }

    /// True while the background fill waits for the gate (never once the
    /// daemon is stopping).
    pub(super) fn fill_held(&self) -> bool {
        self.fill_gate.as_ref().is_some_and(|gate| !gate.is_open()) && !self.hurried()
    }

    /// Notes a fault served on the gate, if any.
    pub(super) fn fault_noted(&self) {
        if let Some(gate) = &self.fill_gate {
            gate.fault();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Sleeps only ever last longer than asked: each check holds however
    // loaded the machine is.

    #[test]
    fn stays_closed_while_faults_are_recent() {
        let gate = FillGate::new(Duration::from_secs(60), Duration::from_secs(60));
        assert!(!gate.is_open(), "closed right after the wake");
        gate.fault();
        assert!(!gate.is_open());
    }

    #[test]
    fn opens_once_quiet_and_stays_open() {
        let gate = FillGate::new(Duration::from_millis(20), Duration::from_secs(60));
        gate.fault();
        std::thread::sleep(Duration::from_millis(30));
        assert!(gate.is_open(), "30 ms without a fault opens it");
        gate.fault();
        assert!(gate.is_open(), "a later fault does not close it again");
    }

    #[test]
    fn opens_after_the_longest_wait_however_busy() {
        let gate = FillGate::new(Duration::from_secs(60), Duration::from_millis(20));
        gate.fault();
        assert!(!gate.is_open());
        std::thread::sleep(Duration::from_millis(25));
        gate.fault();
        assert!(gate.is_open());
    }
}
