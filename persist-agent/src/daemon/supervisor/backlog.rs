//! The listener's backlog: deep while the agent holds the port (a parked or
//! waking service), the service's own once the burst that woke it is over.

use std::time::Duration;

use tracing::warn;

use super::super::listener;
use super::{Starter, Supervisor, since_monotonic_us};

/// How often a woken service's deep backlog is checked for the end of the
/// burst that woke it.
pub(super) const BURST_CHECK: Duration = Duration::from_millis(50);
/// No SYN for this long after a wake: the burst is over.
const BURST_QUIET: Duration = Duration::from_millis(200);
/// The longest a woken service keeps the agent's deep backlog.
const MAX_BURST_HOLD: Duration = Duration::from_secs(5);

impl Supervisor {
    /// While the agent holds the listener (parked, waking, failed), its
    /// queue is as deep as the kernel allows: a burst of connections waits
    /// there for the service rather than being dropped (python's
    /// http.server asks for 5).
    pub(super) fn hold_backlog(&mut self) {
        self.deep_backlog_since = None;
        for listener in self.listeners() {
            if let Err(err) = listener::set_backlog(listener, None) {
                warn!(service = %self.spec.name, "cannot deepen the listener's queue: {err}");
            }
        }
    }

    /// Gives the running service its own backlog back once the burst of
    /// connections that woke it is over: no SYN for [`BURST_QUIET`], or
    /// [`MAX_BURST_HOLD`] after the wake. Given back at once, the rest of a
    /// burst still on its way meets the service's own limit (python's 5)
    /// while the queue is full, and its SYNs are dropped.
    pub(super) fn give_back_backlog_after_burst(&mut self) {
        let Some(since) = self.deep_backlog_since else {
            return;
        };
        let stats = self.watcher.lock().expect("watcher lock").stats(self.slot);
        let quiet = stats.last_syn_ns == 0
            || Duration::from_micros(since_monotonic_us(stats.last_syn_ns)) >= BURST_QUIET;
        if quiet || since.elapsed() >= MAX_BURST_HOLD {
            self.give_back_backlog();
        }
    }

    /// A restored service runs with the backlog it gave its listener: the
    /// connections queued beyond it stay queued, only new ones see the limit.
    pub(super) fn give_back_backlog(&mut self) {
        if self.deep_backlog_since.take().is_none() {
            return;
        }
        let Starter::Restore { worker, .. } = &self.starter else {
            return;
        };
        let backlog = worker
            .report()
            .lock()
            .expect("report lock")
            .listener_backlog;
        let Some(backlog) = backlog else {
            return;
        };
        // The members of a group get the listener's: servers give theirs one.
        for listener in self.listeners() {
            if let Err(err) = listener::set_backlog(listener, Some(backlog)) {
                warn!(service = %self.spec.name, backlog, "cannot give the listener its own backlog back: {err}");
            }
        }
    }
}
