//! The bounded pool of threads that runs every snapshot service's restore
//! work: preparing skeletons, resuming them, serving their pages.
//!
//! A parked service needs no thread: its skeleton, once released to a
//! group stop, is traced by none (`Skeleton::release`). So services share a
//! few threads, started as work comes (at most [`RestorePool::size`] of
//! them wait for work). Each service's jobs run in order, one at a time, on
//! whichever pool thread takes the service ([`PoolTask`]).
//!
//! Two kinds of work would hold a pool thread for long, and leave the pool
//! while they do ([`RestorePool::leave`]): a pager serving a woken process
//! until all its pages are in (a fault must never wait behind other
//! services' jobs), and a skeleton that could not be released, which stays
//! traced by the thread that built it until it resumes. The pool starts
//! another thread if work then waits; the leaving thread comes back when
//! done, or ends if the pool has its threads meanwhile. A host with many
//! parked services thus has the pool's threads, plus one per wake still
//! filling and per skeleton that handles `SIGCONT` itself.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tracing::warn;

/// Work the pool runs: one service's queued jobs.
pub trait PoolTask: Send + Sync {
    /// Runs the queued jobs on the calling pool thread, until there are no
    /// more.
    fn run(self: Arc<Self>, pool: &Arc<RestorePool>);
}

/// The restore threads shared by every service.
pub struct RestorePool {
    size: usize,
    state: Mutex<PoolState>,
}

struct PoolState {
    /// Tasks waiting for a thread, in order.
    ready: VecDeque<Arc<dyn PoolTask>>,
    /// Threads of the pool (not left for long work).
    members: usize,
    /// Of which waiting for work, the last to wait last: work goes to it
    /// first, as it is the likeliest to have just armed a skeleton and to
    /// wait at real-time priority.
    idle: Vec<std::thread::Thread>,
    /// Threads started so far, for their names.
    started: usize,
}

thread_local! {
    /// Whether the calling thread is a pool thread that left the pool.
    static LEFT: Cell<bool> = const { Cell::new(false) };
    /// Whether the calling thread is a pool thread.
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

/// Default pool size: two threads per CPU.
pub fn default_size() -> usize {
    std::thread::available_parallelism().map_or(2, |cpus| cpus.get()) * 2
}

impl RestorePool {
    /// A pool of at most `size` threads waiting for work (at least one);
    /// none is started before there is work.
    pub fn new(size: usize) -> Arc<Self> {
        Arc::new(Self {
            size: size.max(1),
            state: Mutex::new(PoolState {
                ready: VecDeque::new(),
                members: 0,
                idle: Vec::new(),
                started: 0,
            }),
        })
    }

    /// Queues `task` for the next free thread, starting one if none is
    /// free and the pool has room.
    pub fn submit(self: &Arc<Self>, task: Arc<dyn PoolTask>) {
        let mut state = self.state.lock().expect("pool lock");
        state.ready.push_back(task);
        let start = self.wake_or_grow(&mut state);
        drop(state);
        self.start_thread(start);
    }

    /// Hands `task` to a thread waiting for work, if one is; gives it back
    /// otherwise (the caller then runs it elsewhere: queued, it could wait
    /// behind other services' jobs). Waking a waiting thread costs less
    /// than starting one, on a wake's path.
    pub fn submit_if_idle(
        self: &Arc<Self>,
        task: Arc<dyn PoolTask>,
    ) -> Result<(), Arc<dyn PoolTask>> {
        let mut state = self.state.lock().expect("pool lock");
        // The one waiting longest: the last to wait likely armed a skeleton,
        // and waits at real-time priority for its wake.
        if state.idle.is_empty() {
            return Err(task);
        }
        let idle = state.idle.remove(0);
        // Ahead of any queued work: the thread woken takes the first.
        state.ready.push_front(task);
        drop(state);
        idle.unpark();
        Ok(())
    }

    /// Wakes a waiting thread for the work queued, or counts in a thread to
    /// start (once the lock is let go: a storm of wakes must not queue behind
    /// one thread's start). Returns its number.
    fn wake_or_grow(&self, state: &mut PoolState) -> Option<usize> {
        if state.ready.is_empty() {
            return None;
        }
        if let Some(idle) = state.idle.pop() {
            idle.unpark();
            return None;
        }
        if state.members >= self.size {
            return None;
        }
        state.members += 1;
        state.started += 1;
        Some(state.started)
    }

    /// Starts thread `number` of the pool, counted in already.
    fn start_thread(self: &Arc<Self>, number: Option<usize>) {
        let Some(number) = number else {
            return;
        };
        let pool = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name(format!("restore-{number}"))
            .spawn(move || pool.serve());
        if let Err(err) = spawned {
            self.state.lock().expect("pool lock").members -= 1;
            // The work waits for a thread that finishes; with none at all
            // it waits for the next one started.
            warn!("cannot start a restore thread: {err}");
        }
    }

    /// A pool thread's life: take tasks until the thread leaves the pool
    /// for long work and finds the pool full on coming back.
    fn serve(self: Arc<Self>) {
        IN_POOL.with(|in_pool| in_pool.set(true));
        loop {
            // A thread that armed a skeleton waits at real-time priority
            // (the worker sets it), so that a SYN's resume runs the moment
            // it is queued; one back from paging waits at ordinary priority.
            let me = std::thread::current();
            let task = loop {
                let mut state = self.state.lock().expect("pool lock");
                state.idle.retain(|idle| idle.id() != me.id());
                if let Some(task) = state.ready.pop_front() {
                    break task;
                }
                state.idle.push(me.clone());
                drop(state);
                std::thread::park();
            };
            task.run(&self);
            if LEFT.with(|left| left.replace(false)) && !self.rejoin() {
                return;
            }
        }
    }

    /// Takes the calling pool thread out of the pool for long work (a
    /// pager, a traced skeleton): another thread is started if work waits.
    /// Does nothing on a thread that is not the pool's or left already.
    pub fn leave(self: &Arc<Self>) {
        if !IN_POOL.with(Cell::get) || LEFT.with(|left| left.replace(true)) {
            return;
        }
        let mut state = self.state.lock().expect("pool lock");
        state.members -= 1;
        let start = self.wake_or_grow(&mut state);
        drop(state);
        self.start_thread(start);
    }

    /// Whether a thread back from long work stays in the pool (it ends
    /// otherwise).
    fn rejoin(&self) -> bool {
        let mut state = self.state.lock().expect("pool lock");
        if state.members < self.size {
            state.members += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Blocking {
        started: mpsc::Sender<std::thread::ThreadId>,
        release: Mutex<mpsc::Receiver<()>>,
        leave: bool,
    }

    impl PoolTask for Blocking {
        fn run(self: Arc<Self>, pool: &Arc<RestorePool>) {
            if self.leave {
                pool.leave();
            }
            self.started.send(std::thread::current().id()).unwrap();
            self.release.lock().unwrap().recv().unwrap();
        }
    }

    fn task(
        leave: bool,
    ) -> (
        Arc<Blocking>,
        mpsc::Receiver<std::thread::ThreadId>,
        mpsc::Sender<()>,
    ) {
        let (started, started_rx) = mpsc::channel();
        let (release_tx, release) = mpsc::channel();
        let task = Arc::new(Blocking {
            started,
            release: Mutex::new(release),
            leave,
        });
        (task, started_rx, release_tx)
    }

    fn members(pool: &RestorePool) -> usize {
        pool.state.lock().unwrap().members
    }

    #[test]
    fn at_most_size_threads_take_work_and_the_rest_waits() {
        let pool = RestorePool::new(2);
        let tasks: Vec<_> = (0..3).map(|_| task(false)).collect();
        for (task, _, _) in &tasks {
            pool.submit(task.clone());
        }
        let first = tasks[0].1.recv().unwrap();
        let second = tasks[1].1.recv().unwrap();
        assert_ne!(first, second);
        assert_eq!(members(&pool), 2);
        // The third waits for a thread.
        assert!(
            tasks[2]
                .1
                .recv_timeout(std::time::Duration::from_millis(100))
                .is_err()
        );
        tasks[0].2.send(()).unwrap();
        let third = tasks[2].1.recv().unwrap();
        assert_eq!(third, first, "the freed thread takes the waiting work");
        tasks[1].2.send(()).unwrap();
        tasks[2].2.send(()).unwrap();
    }

    #[test]
    fn a_thread_leaving_for_long_work_is_replaced_then_ends() {
        let pool = RestorePool::new(1);
        let (long, long_started, long_release) = task(true);
        pool.submit(long);
        let long_thread = long_started.recv().unwrap();
        assert_eq!(members(&pool), 0);
        let (short, short_started, short_release) = task(false);
        pool.submit(short);
        assert_ne!(short_started.recv().unwrap(), long_thread);
        assert_eq!(members(&pool), 1);
        short_release.send(()).unwrap();
        long_release.send(()).unwrap();
        // The pool is full: the thread back from long work ends.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while pool.state.lock().unwrap().idle.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(members(&pool), 1);
    }

    #[test]
    fn work_goes_to_a_waiting_thread_only_if_one_waits() {
        let pool = RestorePool::new(2);
        let (first, first_started, first_release) = task(false);
        assert!(
            pool.submit_if_idle(first.clone()).is_err(),
            "no thread waits yet: the task is given back, not queued"
        );
        pool.submit(first);
        let thread = first_started.recv().unwrap();
        first_release.send(()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while pool.state.lock().unwrap().idle.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let (second, second_started, second_release) = task(true);
        assert!(pool.submit_if_idle(second).is_ok());
        assert_eq!(
            second_started.recv().unwrap(),
            thread,
            "the waiting thread takes it"
        );
        second_release.send(()).unwrap();
    }
}
