//! The daemon's spawner (`sys/spawner.rs`): a small process, started once,
//! that forks the processes the daemon restores in its place, so that none
//! of them starts as a copy of the agent. Each is still the agent's child,
//! with the agent's descriptors, and runs [`child_main`] as a fork of the
//! agent would, from a plan copied into memory the spawner shares.
//!
//! It forks a single process, or the root of a tree, which forks the
//! others from a plan of the whole tree in the arena. A process whose pid
//! (or a tree one of whose pids) is taken here needs an init of a pid
//! namespace of its own, and is forked from the agent. One restore at a
//! time uses it; a second one meanwhile, or any restore while it is not
//! running, forks from the agent as before.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use super::RestoreError;
use super::child::{ChildPlan, NodeRole, TreeNode, child_main, tree_main};
use super::layout::OwnLayout;
use super::spawn::dup_above;
use crate::sys::sched;
use crate::sys::spawner::{self, ForkError, SharedArena, Spawner};

/// Room for the plans: python's is 20 KiB, mostly its layout table.
const ARENA_BYTES: usize = 16 << 20;

/// What a process the spawner forks runs, from the arena.
#[derive(Clone, Copy)]
enum Start {
    /// One process: [`child_main`].
    Process(ChildPlan<'static>),
    /// The root of a tree (node 0): [`tree_main`], which forks the others.
    Tree {
        nodes: &'static [TreeNode<'static>],
        fork_go: RawFd,
    },
}

struct Running {
    spawner: Spawner<Start>,
    arena: SharedArena,
    /// The agent's memory it kept when it started.
    kept: Vec<(u64, u64)>,
}

fn running() -> &'static Mutex<Option<Running>> {
    static RUNNING: OnceLock<Mutex<Option<Running>>> = OnceLock::new();
    RUNNING.get_or_init(|| Mutex::new(None))
}

/// Starts the spawner (once: later calls return its pid). Forked from a
/// thread of its own, whose stack and thread-local storage it keeps.
pub fn start() -> Result<i32, RestoreError> {
    let mut running = running().lock().expect("spawner lock");
    if let Some(running) = running.as_ref().filter(|r| !r.spawner.has_exited()) {
        return Ok(running.spawner.pid());
    }
    let started = std::thread::Builder::new()
        .name("persist-spawner".into())
        .spawn(|| -> Result<Running, RestoreError> {
            let arena = SharedArena::map(ARENA_BYTES).map_err(RestoreError::Fork)?;
            let kept = kept_memory(&arena)?;
            let spawner = Spawner::start(&kept, run_plan).map_err(RestoreError::Fork)?;
            Ok(Running {
                spawner,
                arena,
                kept,
            })
        })
        .map_err(RestoreError::Fork)?
        .join()
        .map_err(|_| RestoreError::Layout("the thread starting the spawner panicked".into()))??;
    let pid = started.spawner.pid();
    *running = Some(started);
    Ok(pid)
}

/// The spawner's pid and the bytes of its arena in use at most, while it
/// runs: what it costs beside the agent.
pub fn cost() -> Option<(i32, u64)> {
    let running = running().lock().ok()?;
    let running = running.as_ref()?;
    Some((running.spawner.pid(), running.arena.high_water() as u64))
}

/// The memory the spawner keeps, which a process it forks starts with: a
/// restorer region must not go there, even where the agent itself has
/// since unmapped it (the stack of the thread that started it).
pub(super) fn kept_ranges() -> Vec<(u64, u64)> {
    running()
        .lock()
        .ok()
        .and_then(|running| running.as_ref().map(|running| running.kept.clone()))
        .unwrap_or_default()
}

/// Processes forked by the spawner and by the agent itself, since the
/// start.
static FORKED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// How many restored processes the spawner forked, and how many the agent
/// forked itself (a tree's, one while the spawner was busy or not running,
/// or one whose pid is taken here).
pub fn forks() -> (u64, u64) {
    (
        FORKED[0].load(Ordering::Relaxed),
        FORKED[1].load(Ordering::Relaxed),
    )
}

/// Counts a process the agent forked itself.
pub(super) fn count_agent_fork() {
    FORKED[1].fetch_add(1, Ordering::Relaxed);
}

/// Held while the process it forked may still read its plan in the arena:
/// until its layout is built.
pub(super) struct Lease {
    _running: MutexGuard<'static, Option<Running>>,
}

/// What [`spawn`] did.
pub(super) enum Outcome {
    /// The process was forked, with this pid.
    Forked(i32, Lease),
    /// The spawner is not running, is busy with another restore, or the
    /// pid is taken here: the caller forks it.
    NotHere,
}

/// The lowest number of the agent's descriptors set apart
/// ([`set_apart`]): half the open-files limit, at most 4,096 (the table's
/// size follows its highest number).
fn apart_from() -> RawFd {
    static APART_FROM: OnceLock<RawFd> = OnceLock::new();
    *APART_FROM.get_or_init(|| {
        let soft = crate::sys::rlimit::get(0, libc::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
        RawFd::try_from(soft / 2)
            .unwrap_or(RawFd::MAX)
            .clamp(64, 4096)
    })
}

/// Numbers `fd`, which the agent holds for as long as a service is
/// registered (its listener), apart from the descriptors a restore uses: a
/// process the spawner forks never copies it (`own_fds_below`). With
/// 10,000 services, copying their listeners into each cold wake's process
/// and closing them there took milliseconds. `fd` as it was if it is
/// apart already or no number is free up there.
pub fn set_apart(fd: OwnedFd) -> OwnedFd {
    if fd.as_raw_fd() >= apart_from() {
        return fd;
    }
    dup_above(&fd, apart_from()).unwrap_or(fd)
}

/// A copy of `fd` numbered apart as [`set_apart`] numbers it, or at the
/// lowest free number if none is free up there.
pub fn copy_apart(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    dup_above(fd, apart_from()).or_else(|_| fd.try_clone_to_owned())
}

/// The highest descriptor number `plan`'s process uses of the agent's.
fn highest_used(plan: &ChildPlan<'_>) -> RawFd {
    plan.keep
        .iter()
        .copied()
        .chain(plan.ipc_namespace)
        .chain(plan.staged.iter().filter_map(|map| map.fd))
        .chain([plan.fds.max_source_fd(), plan.go_fd, plan.status_fd])
        .max()
        .unwrap_or(-1)
}

/// `plan` copied into `arena`, its process's first step keeping the
/// descriptors below `below` only.
fn placed_plan(
    plan: &ChildPlan<'_>,
    arena: &mut SharedArena,
    below: RawFd,
) -> Option<ChildPlan<'static>> {
    plan.copy_into(arena).map(|copy| ChildPlan {
        own_fds_below: Some(below),
        ..copy
    })
}

/// Has the spawner fork the process of `plan` with pid `pid`, at the
/// calling thread's priority.
pub(super) fn spawn(plan: &ChildPlan<'_>, pid: i32) -> Result<Outcome, RestoreError> {
    // Its first step keeps the descriptors below this, of the agent's
    // table it shares until then: every one it uses must be there.
    let below = apart_from();
    if highest_used(plan) >= below {
        return Ok(Outcome::NotHere);
    }
    fork_placed(pid, |arena| {
        let copy = placed_plan(plan, arena, below)?;
        arena.place(Start::Process(copy))
    })
}

/// Has the spawner fork the root of the tree of `nodes` (node 0) with pid
/// `pid`; it waits for a byte on `fork_go` before it forks the others
/// ([`tree_main`]). Every process of the tree takes a table of its own of
/// the agent's descriptors it needs as its first step.
pub(super) fn spawn_tree(
    nodes: &[TreeNode<'_>],
    fork_go: RawFd,
    pid: i32,
) -> Result<Outcome, RestoreError> {
    let below = apart_from();
    let highest = nodes
        .iter()
        .map(|node| match &node.role {
            NodeRole::Process(plan) => highest_used(plan),
            NodeRole::Zombie(plan) => plan.go_fd.max(plan.status_fd),
        })
        .chain([fork_go])
        .max()
        .unwrap_or(-1);
    if highest >= below {
        return Ok(Outcome::NotHere);
    }
    fork_placed(pid, |arena| {
        let mut copies = Vec::with_capacity(nodes.len());
        for node in nodes {
            let role = match &node.role {
                NodeRole::Process(plan) => NodeRole::Process(placed_plan(plan, arena, below)?),
                NodeRole::Zombie(plan) => NodeRole::Zombie(*plan),
            };
            copies.push(TreeNode {
                role,
                pid: node.pid,
                parent: node.parent,
                session: node.session,
            });
        }
        let nodes = arena.copy_slice(&copies)?;
        arena.place(Start::Tree { nodes, fork_go })
    })
}

/// Places what the process runs with `place` in the arena and has the
/// spawner fork it with pid `pid`, at the calling thread's priority.
fn fork_placed(
    pid: i32,
    place: impl FnOnce(&mut SharedArena) -> Option<&'static Start>,
) -> Result<Outcome, RestoreError> {
    let Ok(mut guard) = running().try_lock() else {
        return Ok(Outcome::NotHere);
    };
    let Some(running) = guard.as_mut().filter(|r| !r.spawner.has_exited()) else {
        return Ok(Outcome::NotHere);
    };
    running.arena.reset();
    let Some(placed) = place(&mut running.arena) else {
        return Ok(Outcome::NotHere);
    };
    let realtime = sched::thread_policy(0).is_ok_and(|policy| policy == libc::SCHED_FIFO);
    match running.spawner.fork(placed, pid, realtime) {
        Ok(forked) => {
            FORKED[0].fetch_add(1, Ordering::Relaxed);
            Ok(Outcome::Forked(forked, Lease { _running: guard }))
        }
        Err(ForkError::Refused(err)) if err.raw_os_error() == Some(libc::EEXIST) => {
            Ok(Outcome::NotHere)
        }
        Err(ForkError::Refused(err)) => Err(RestoreError::Fork(err)),
        Err(ForkError::Lost(err)) => {
            // Not used again. Its process may yet appear: it fails at its
            // first step once the caller drops its end of the go pipe.
            *guard = None;
            Err(RestoreError::Fork(err))
        }
    }
}

/// What the spawner keeps of the agent's memory: the loaded objects, the
/// calling thread's stack and thread-local storage, the vdso and vvar
/// pages (a restored layout moves them from there) and the arena; sorted,
/// overlaps merged.
fn kept_memory(arena: &SharedArena) -> Result<Vec<(u64, u64)>, RestoreError> {
    let own = OwnLayout::read()?;
    let containing = |address: u64| {
        own.ranges
            .iter()
            .copied()
            .find(|&(start, end)| (start..end).contains(&address))
    };
    let on_stack = 0u8;
    let mut keep = spawner::loaded_object_ranges();
    keep.extend(
        own.specials
            .iter()
            .map(|special| (special.start, special.end)),
    );
    keep.extend(containing(&raw const on_stack as u64));
    keep.extend(containing(spawner::thread_pointer()));
    keep.push(arena.range());
    keep.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(keep.len());
    for (start, end) in keep {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    Ok(merged)
}

/// What a process the spawner forked runs.
fn run_plan(start: &'static Start) -> ! {
    match start {
        Start::Process(plan) => child_main(plan),
        Start::Tree { nodes, fork_go } => tree_main(nodes, 0, Some(*fork_go)),
    }
}
