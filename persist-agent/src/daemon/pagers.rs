//! The pagers serving restored processes, which a stopping daemon lets
//! finish.
//!
//! A restored process's missing pages come from its pager, a thread of the
//! daemon. A process whose pager is gone waits forever on its next missing
//! page (and a restarted daemon kills it), so a daemon asked to stop first
//! ends every wake's fault-logging window and waits, for a bounded time, until
//! each pager has copied in the rest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Counts the pagers at work and tells them when the daemon stops.
#[derive(Debug, Default)]
pub struct Pagers {
    working: Mutex<usize>,
    one_done: Condvar,
    stopping: Arc<AtomicBool>,
}

/// One pager at work, until dropped: counted from before its process may
/// run, and handed to the thread that then serves its pages.
#[derive(Debug)]
pub struct PagerAtWork {
    pagers: Arc<Pagers>,
}

impl Pagers {
    /// Counts a pager at work until the returned guard is dropped.
    pub fn start(self: &Arc<Self>) -> PagerAtWork {
        *self.working.lock().expect("pagers lock") += 1;
        PagerAtWork {
            pagers: Arc::clone(self),
        }
    }

    /// Set once the daemon stops: a pager seeing it ends its fault-logging
    /// window and copies in the rest at once.
    pub fn stopping(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stopping)
    }

    /// True once [`Pagers::finish_all`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Tells every pager the daemon stops, and waits up to `timeout` until
    /// none is at work. Returns how many still are.
    pub fn finish_all(&self, timeout: Duration) -> usize {
        self.stopping.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + timeout;
        let mut working = self.working.lock().expect("pagers lock");
        while *working > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            working = self
                .one_done
                .wait_timeout(working, left)
                .expect("pagers lock")
                .0;
        }
        *working
    }
}

impl Drop for PagerAtWork {
    fn drop(&mut self) {
        *self.pagers.working.lock().expect("pagers lock") -= 1;
        self.pagers.one_done.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finishing_waits_for_the_pagers_at_work() {
        let pagers = Arc::new(Pagers::default());
        assert_eq!(pagers.finish_all(Duration::ZERO), 0);

        let pagers = Arc::new(Pagers::default());
        let stopping = pagers.stopping();
        let (started, has_started) = std::sync::mpsc::channel();
        let worker = {
            let pagers = Arc::clone(&pagers);
            std::thread::spawn(move || {
                let _at_work = pagers.start();
                started.send(()).unwrap();
                while !stopping.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                std::thread::sleep(Duration::from_millis(20));
            })
        };
        has_started.recv().unwrap();
        assert_eq!(pagers.finish_all(Duration::from_secs(10)), 0);
        assert!(pagers.is_stopping());
        worker.join().unwrap();
    }

    #[test]
    fn finishing_gives_up_after_the_timeout() {
        let pagers = Arc::new(Pagers::default());
        let _at_work = pagers.start();
        assert_eq!(pagers.finish_all(Duration::from_millis(20)), 1);
    }
}
