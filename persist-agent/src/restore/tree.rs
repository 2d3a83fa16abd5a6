//! Restoring a tree of processes (an image with [`Manifest::children`]):
//! every process prepared as one is ([`Setup`]), then forked with its
//! recorded pid by its recorded parent, and completed and resumed one by
//! one.
//!
//! 1. Before any fork: the pipes and socket pairs whose ends different
//!    processes hold are created once ([`files::cross_process_ends`]); each
//!    process's descriptors are prepared, a descriptor it inherited being a
//!    duplicate of the one prepared for the process it was saved with (the
//!    same open file description); shared memory objects are one memfd per
//!    saved inode for every process that maps them, their pages served by
//!    the pager of whichever process faults first where the kernel allows
//!    it (`shared_pages.rs`).
//! 2. The agent forks the root (as for one process, in a pid namespace of
//!    its own when the pid is taken) and traces it with
//!    `PTRACE_O_TRACEFORK`; the root then sets its session, forks its
//!    children with their recorded pids (`clone3` `set_tid`), each of which
//!    sets its session or group and forks its own ([`child::tree_main`]).
//!    The agent follows every fork event, so every process is traced from
//!    its first instruction.
//! 3. Each process then builds its layout and gets its threads, state and
//!    pager, as one process does; the caller resumes them all.
//! 4. The zombies ([`Manifest::zombies`]), forked last by their parents and
//!    left untraced, exit with their recorded statuses once every process
//!    is built: their parents reap them once resumed.
//!
//! Private memory a child shares copy-on-write with its parent is stored
//! once in the image and shared again: the parent stages it before its
//! forks, and each process moves the staged copy into place
//! (`inherited_memory.rs`).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use persist_common::image::{Image, Manifest, Zombie};

use super::child::{self, NodeRole, SessionStep, TreeNode, ZombiePlan};
use super::inherited_memory::InheritedMemory;
use super::layout::OwnLayout;
use super::posix_shm::MadeFiles;
use super::resources::OpenedForTree;
use super::setup::Setup;
use super::shared_pages::SharedPages;
use super::skeleton::{RestoreConfig, Restored, Skeleton};
use super::spawn::{self, KillGuard, Spawned, TRACE_OPTIONS, pipe_above};
use super::spawner;
use super::sysv_shm;
use super::{RestoreError, verify};
use crate::files::{self, PathAccess};
use crate::host;
use crate::sys::ptrace::{self, Stop};

/// Every process of a restored tree, stopped before its first instruction;
/// dropping it kills them all.
#[derive(Debug)]
pub struct TreeSkeleton {
    /// Dropped first: kills the tree unless it was resumed.
    guard: TreeGuard,
    /// The root first, then the descendants in image order.
    skeletons: Vec<Skeleton>,
}

impl TreeSkeleton {
    /// Builds every process of `image` (which holds a tree), stopped.
    pub fn prepare(image: Arc<Image>, config: RestoreConfig) -> Result<Self, RestoreError> {
        let started = Instant::now();
        image.check_host(&host::kernel_info(), &host::cpu_info())?;
        let manifest = image.manifest();
        let mut images = vec![Arc::clone(&image)];
        for index in 0..manifest.children.len() {
            let view = image
                .process_image(index)
                .expect("index within the image's children");
            images.push(Arc::new(view));
        }
        if config.verify_pages_first {
            for view in &images {
                verify::all_pages(view)?;
            }
        }
        let shape = Shape::of(manifest)?;
        // The checkpointed tree, just killed, may not be reaped yet: its
        // pids free in a moment spare the tree a pid (and mount) namespace
        // of its own, which could not be checkpointed again from here
        // (docs/kernel-facts.md).
        wait_for_zombies(&shape.pids, ZOMBIE_WAIT);
        let accesses: Vec<PathAccess> = images
            .iter()
            .map(|view| {
                let mut agent_files = config.agent_files.clone();
                agent_files.extend(
                    view.manifest()
                        .agent_files
                        .iter()
                        .map(std::path::PathBuf::from),
                );
                PathAccess::for_process(
                    &view.manifest().process.credentials,
                    config.accept_changed_files,
                    agent_files,
                )
            })
            .collect();
        let own_fds: Vec<&[persist_common::image::FdInfo]> =
            images.iter().map(|view| &view.manifest().fds[..]).collect();
        let mut cross = files::cross_process_ends(&own_fds, &accesses[0])?;
        // Private memory the children share with their parents, staged by
        // the parents before they fork.
        let manifests: Vec<&Manifest> = images.iter().map(|view| view.manifest()).collect();
        // The agent's memory, or the spawner's that a process it forks
        // starts with: the restorer region and the staging area go
        // elsewhere than both.
        let own = OwnLayout::read()?.and(&spawner::kept_ranges());
        let memory = InheritedMemory::plan(&manifests, &shape.parents[..shape.live], &own.ranges);
        let mut root_inherited = Some(config.inherited);

        // Every process prepared before the first fork.
        let mut opened = OpenedForTree::default();
        let lazy_shared = Arc::new(SharedPages::of_tree(manifest));
        let mut setups: Vec<Setup> = Vec::with_capacity(images.len());
        // The POSIX shared memory files made, removed unless the tree is
        // built.
        let mut created_files = MadeFiles::default();
        for (index, view) in images.iter().enumerate() {
            let pid = view.manifest().process.pid;
            let mut inherited = std::mem::take(&mut cross[index]);
            if index == 0 {
                inherited.append(root_inherited.take().unwrap_or_default());
            } else {
                let child = &manifest.children[index - 1];
                for link in &child.inherited_fds {
                    let holder = shape.index_of(link.from_pid).filter(|&h| h < index);
                    let source = holder
                        .and_then(|holder| setups[holder].fds().source_of(link.from_fd))
                        .ok_or_else(|| {
                            RestoreError::Layout(format!(
                                "pid {pid} fd {}: inherits fd {} of pid {}, which is not prepared \
                             before it",
                                link.fd, link.from_fd, link.from_pid
                            ))
                        })?;
                    let copy = source
                        .try_clone_to_owned()
                        .map_err(|e| RestoreError::io(format!("pid {pid} fd {}", link.fd), e))?;
                    if link.cloexec {
                        inherited.insert_cloexec(link.fd, copy);
                    } else {
                        inherited.insert(link.fd, copy);
                    }
                }
            }
            let setup = Setup::new(
                Arc::clone(view),
                inherited,
                &accesses[index],
                &mut opened,
                &lazy_shared,
                Some(memory.part(index)),
                &own,
            )
            .map_err(|source| RestoreError::InTree {
                pid,
                source: Box::new(source),
            })?;
            created_files.0.extend(setup.created_files());
            let mut setup = setup;
            if config.cold {
                setup.leave_file_pages_to_fault();
            }
            if index > 0 {
                setup.set_parent_restored();
            }
            setups.push(setup);
        }
        drop(opened);
        // System V segments, in an IPC namespace the root joins before it
        // forks the others; open until every process is forked.
        let views: Vec<&Image> = images.iter().map(|view| &**view).collect();
        let ipc_namespace = sysv_shm::namespace(&views)?;
        if let Some(namespace) = &ipc_namespace {
            setups[0].join_ipc_namespace(namespace.as_raw_fd());
        }

        let max_fd = setups
            .iter()
            .flat_map(|setup| setup.plan().keep.last().copied())
            .max()
            .unwrap_or(0);
        let (fork_go_read, fork_go_write) = pipe_above(max_fd + 1)?;
        let fork_go = fork_go_read.as_raw_fd();
        let zombies = Zombies::new(&manifest.zombies, max_fd + 1)?;
        let mut nodes: Vec<TreeNode<'_>> = setups
            .iter()
            .enumerate()
            .map(|(index, setup)| TreeNode {
                role: NodeRole::Process(setup.plan()),
                pid: setup.image.manifest().process.pid,
                parent: shape.parents[index],
                session: shape.sessions[index],
            })
            .collect();
        for (offset, zombie) in manifest.zombies.iter().enumerate() {
            let index = shape.live + offset;
            nodes.push(TreeNode {
                role: NodeRole::Zombie(zombies.plan(offset, zombie.wait_status)),
                pid: zombie.pid,
                parent: shape.parents[index],
                session: shape.sessions[index],
            });
        }

        // The root, forked by the agent, forks the rest.
        let forked_at = Instant::now();
        let mut guard = KillGuard {
            pids: Vec::new(),
            threads: Vec::new(),
        };
        let root = &setups[0];
        // Checked here, not found out by the root's forks: the namespace
        // is chosen once, for the whole tree.
        let own_namespace = shape.pids[1..]
            .iter()
            .any(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        let options = TRACE_OPTIONS | libc::PTRACE_O_TRACEFORK;
        let from_spawner = if own_namespace {
            spawner::Outcome::NotHere
        } else {
            spawner::spawn_tree(&nodes, fork_go, manifest.process.pid)?
        };
        let (root_pid, init_pid, mut root_lease) = match from_spawner {
            spawner::Outcome::Forked(pid, lease) => {
                spawn::seize_forked(pid, &root.pipes(), &mut guard, options)?;
                (pid, None, Some(lease))
            }
            spawner::Outcome::NotHere => {
                let (pid, init) = spawn::spawn_with(
                    &root.plan(),
                    manifest.process.pid,
                    &root.pipes(),
                    &mut guard,
                    options,
                    own_namespace,
                    &|| child::tree_main(&nodes, 0, Some(fork_go)),
                )?;
                (pid, init, None)
            }
        };
        // A root the spawner forked shares our descriptor table until its
        // first step: what it reads there stays open until its layout is
        // built (the end of this prepare).
        let mut kept_for_root = Vec::new();
        if root_lease.is_some() {
            kept_for_root.push(fork_go_read);
        } else {
            drop(fork_go_read);
        }
        // From here on, the whole tree is killed on an error; the guard is
        // declared after the skeletons so that it is dropped first.
        let mut skeletons = Vec::with_capacity(setups.len());
        guard.pids.clear();
        let mut tree_guard = TreeGuard {
            pids: vec![root_pid],
            threads: Vec::new(),
            init: init_pid,
        };
        let mut pids = vec![0; shape.pids.len()];
        pids[0] = root_pid;
        ptrace::cont(root_pid, 0).map_err(RestoreError::ptrace(root_pid, "cont"))?;
        spawn::write_pipe(&fork_go_write, &[1])?;
        let mut staged_pages = 0;
        for index in 0..setups.len() {
            let pid = pids[index];
            let status = setups[index].pipes().status;
            if index > 0 {
                // Its first stop, as a traced child of a traced process.
                match ptrace::wait(pid).map_err(RestoreError::ptrace(pid, "wait"))? {
                    Stop::Event { .. } => {}
                    other => return Err(spawn::child_failure(pid, other, status)),
                }
                ptrace::cont(pid, 0).map_err(RestoreError::ptrace(pid, "cont"))?;
            }
            if setups[index].stages_memory() {
                // Stopped itself once its slots are mapped; the stop is
                // not delivered.
                match ptrace::wait(pid).map_err(RestoreError::ptrace(pid, "wait"))? {
                    Stop::Signal(libc::SIGSTOP) => {}
                    other => return Err(spawn::child_failure(pid, other, status)),
                }
                staged_pages +=
                    setups[index]
                        .fill_staged(pid)
                        .map_err(|source| RestoreError::InTree {
                            pid: images[index].manifest().process.pid,
                            source: Box::new(source),
                        })?;
                ptrace::cont(pid, 0).map_err(RestoreError::ptrace(pid, "cont"))?;
            }
            for child in (0..shape.pids.len()).filter(|&c| shape.parents[c] == Some(index)) {
                let forked = match ptrace::wait(pid).map_err(RestoreError::ptrace(pid, "wait"))? {
                    Stop::Event {
                        event: ptrace::PTRACE_EVENT_FORK,
                        ..
                    } => ptrace::event_message(pid)
                        .map_err(RestoreError::ptrace(pid, "event message"))?
                        as i32,
                    other => return Err(spawn::child_failure(pid, other, status)),
                };
                tree_guard.pids.push(forked);
                pids[child] = forked;
                ptrace::cont(pid, 0).map_err(RestoreError::ptrace(pid, "cont"))?;
            }
        }
        match ipc_namespace {
            Some(namespace) if root_lease.is_some() => kept_for_root.push(namespace),
            other => drop(other),
        }
        if staged_pages > 0 {
            tracing::debug!(
                pages = staged_pages,
                "private pages staged once for the processes sharing them"
            );
        }
        // A zombie runs untraced: its exit is then its parent's to reap.
        for (offset, &pid) in pids[shape.live..].iter().enumerate() {
            match ptrace::wait(pid).map_err(RestoreError::ptrace(pid, "wait"))? {
                Stop::Event { .. } => {}
                other => return Err(spawn::child_failure(pid, other, zombies.status(offset))),
            }
            ptrace::detach(pid).map_err(RestoreError::ptrace(pid, "detach"))?;
        }
        // Each stopped again before its layout, as one process is.
        for (index, &pid) in pids[..shape.live].iter().enumerate() {
            ptrace::interrupt(pid).map_err(RestoreError::ptrace(pid, "interrupt"))?;
            spawn::expect_event_stop(pid, setups[index].pipes().status)?;
        }
        drop(nodes);
        // Every layout table runs at once (each unmaps its copy of the
        // agent and maps its own memory: the kernel's work, on any CPU);
        // each process is then completed in turn.
        for (setup, &pid) in setups.iter_mut().zip(&pids) {
            setup.start_layout(pid)?;
        }

        for (index, setup) in setups.into_iter().enumerate() {
            let pid = pids[index];
            let init = if index == 0 { init_pid } else { None };
            // The root's lease keeps its descriptors here until its layout
            // is built, as for one process the spawner forked.
            let lease = if index == 0 { root_lease.take() } else { None };
            let mut threads = KillGuard {
                pids: Vec::new(),
                threads: Vec::new(),
            };
            let skeleton = setup
                .finish(
                    Spawned {
                        pid,
                        init_pid: init,
                        lease,
                    },
                    started,
                    forked_at,
                    None,
                    &mut threads,
                )
                .map_err(|source| RestoreError::InTree {
                    pid: images[index].manifest().process.pid,
                    source: Box::new(source),
                })?;
            tree_guard.threads.append(&mut threads.threads);
            skeletons.push(skeleton);
        }
        // Every parent has its own signal handlers and blocks every signal
        // until it is resumed: the zombies' SIGCHLD waits for it there, as
        // one not handled yet at the checkpoint would have.
        zombies.exit(&pids[shape.live..], &manifest.zombies)?;
        drop(kept_for_root);
        // Built: the files are the tree's, held by its root.
        skeletons[0].posix_shm_files = std::mem::take(&mut created_files.0);
        Ok(Self {
            guard: tree_guard,
            skeletons,
        })
    }

    /// The root's skeleton holding every other process of the tree
    /// ([`Skeleton::descendant_pids`]): released, resumed and killed with
    /// it, as the daemon handles one process.
    pub fn into_root(mut self) -> Skeleton {
        // The skeletons kill the tree from here on.
        self.guard.pids.clear();
        self.guard.threads.clear();
        self.guard.init = None;
        let mut root = self.skeletons.remove(0);
        root.descendants = std::mem::take(&mut self.skeletons);
        root
    }

    /// Lets every process run, the descendants first, the root last; each
    /// one's pager must then be run.
    pub fn resume(mut self) -> Result<Vec<Restored>, RestoreError> {
        let mut restored = Vec::with_capacity(self.skeletons.len());
        while let Some(skeleton) = self.skeletons.pop() {
            restored.push(skeleton.resume()?);
        }
        restored.reverse();
        // Disarmed: the processes run on.
        self.guard.pids.clear();
        self.guard.threads.clear();
        self.guard.init = None;
        Ok(restored)
    }
}

/// The pipes of a tree's zombies: one the agent sends a byte per zombie on
/// once the tree is built, and a status pipe each.
struct Zombies {
    go_read: OwnedFd,
    go_write: OwnedFd,
    /// Read and write ends of each zombie's status pipe.
    status: Vec<(OwnedFd, OwnedFd)>,
}

/// How long a zombie may take to exit once told to.
const ZOMBIE_EXIT_WAIT: Duration = Duration::from_secs(5);

impl Zombies {
    /// Pipes for `zombies`, numbered from `min` on.
    fn new(zombies: &[Zombie], min: i32) -> Result<Self, RestoreError> {
        let (go_read, go_write) = pipe_above(min)?;
        let status = zombies
            .iter()
            .map(|_| pipe_above(min))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            go_read,
            go_write,
            status,
        })
    }

    /// The plan of the `index`th zombie.
    fn plan(&self, index: usize, wait_status: i32) -> ZombiePlan {
        ZombiePlan {
            wait_status,
            go_fd: self.go_read.as_raw_fd(),
            status_fd: self.status[index].1.as_raw_fd(),
        }
    }

    /// Read end of the `index`th zombie's status pipe.
    fn status(&self, index: usize) -> &OwnedFd {
        &self.status[index].0
    }

    /// Lets every zombie (running as `pids`, as the agent sees them) exit,
    /// and waits until each is a zombie with its recorded status, the
    /// core-dump bit aside (never set: see `clone::exit_with_status`).
    fn exit(&self, pids: &[i32], zombies: &[Zombie]) -> Result<(), RestoreError> {
        if pids.is_empty() {
            return Ok(());
        }
        spawn::write_pipe(&self.go_write, &vec![1; pids.len()])?;
        for (index, (&pid, zombie)) in pids.iter().zip(zombies).enumerate() {
            let deadline = Instant::now() + ZOMBIE_EXIT_WAIT;
            let status = loop {
                if let Some(status) = zombie_status(pid) {
                    break status;
                }
                if Instant::now() >= deadline {
                    return Err(RestoreError::Unexpected {
                        pid,
                        what: format!(
                            "zombie pid {} did not exit within {} s",
                            zombie.pid,
                            ZOMBIE_EXIT_WAIT.as_secs()
                        ),
                    });
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            if status & !0x80 != zombie.wait_status & !0x80 {
                let failure = spawn::child_failure(pid, Stop::Exited(status), self.status(index));
                return Err(match failure {
                    RestoreError::Child { .. } => failure,
                    _ => RestoreError::Unexpected {
                        pid,
                        what: format!(
                            "zombie pid {} exited with wait status {status:#x}, not {:#x}",
                            zombie.pid, zombie.wait_status
                        ),
                    },
                });
            }
        }
        Ok(())
    }
}

/// The wait status of `pid` once it is a zombie (field 52 of its stat).
fn zombie_status(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // Fields counted from 3 (the state) on.
    if fields.first() != Some(&"Z") {
        return None;
    }
    fields.get(52 - 3)?.parse().ok()
}

/// How long a restore waits for the zombies holding its recorded pids.
const ZOMBIE_WAIT: Duration = Duration::from_secs(3);

/// Waits up to `limit` while a process among `pids` is a zombie.
fn wait_for_zombies(pids: &[i32], limit: Duration) {
    let zombie = |pid: &i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rfind(')')
                .is_some_and(|end| stat[end + 1..].trim_start().starts_with('Z'))
        })
    };
    let deadline = Instant::now() + limit;
    while pids.iter().any(zombie) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills what is made of a tree when dropped. All at once, then reaped
/// children first: the init of a pid namespace waits for every process
/// in it, and a killed process we trace reaches its parent only once we
/// have waited for it.
#[derive(Debug)]
struct TreeGuard {
    /// Every process forked, parents before their children.
    pids: Vec<i32>,
    /// Threads made after the first of each process.
    threads: Vec<i32>,
    /// The init of the tree's pid namespace.
    init: Option<i32>,
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        let all = || self.pids.iter().chain(&self.threads).chain(&self.init);
        for &pid in all() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for &pid in self
            .threads
            .iter()
            .chain(self.pids.iter().rev())
            .chain(&self.init)
        {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::__WALL),
            );
        }
    }
}

/// Who forks whom, and how each gets its session and group.
struct Shape {
    /// Recorded pid of each process, the root first, the zombies last.
    pids: Vec<i32>,
    /// How many of them are processes of the image (the rest are zombies).
    live: usize,
    /// Index of each process's parent.
    parents: Vec<Option<usize>>,
    sessions: Vec<SessionStep>,
}

impl Shape {
    /// Refuses a parent that is not restored before its child, and a
    /// session or process group that the forks cannot give back.
    fn of(manifest: &Manifest) -> Result<Self, RestoreError> {
        let root = &manifest.process;
        let mut pids = vec![root.pid];
        let mut parents = vec![None];
        // The root becomes a session and group leader, as one process does;
        // the session and group it had are its own from then on.
        let mut sessions = vec![SessionStep::NewSession];
        let mut restored_group: HashMap<i32, i32> =
            HashMap::from([(root.pgid, root.pid), (root.pid, root.pid)]);
        let mut restored_session: HashMap<i32, i32> =
            HashMap::from([(root.sid, root.pid), (root.pid, root.pid)]);
        // The restored group and session of each process.
        let mut groups = vec![(root.pid, root.pid)];
        let live = 1 + manifest.children.len();
        // Zombies last: none is anyone's parent, and none leads a group a
        // live process joins (a zombie that does is refused below).
        let processes = manifest
            .children
            .iter()
            .map(|child| {
                let p = &child.process;
                (p.pid, child.ppid, p.pgid, p.sid)
            })
            .chain(
                manifest
                    .zombies
                    .iter()
                    .map(|z| (z.pid, z.ppid, z.pgid, z.sid)),
            );
        for (pid, ppid, pgid, sid) in processes {
            let parent = pids[..live.min(pids.len())]
                .iter()
                .position(|&p| p == ppid)
                .ok_or_else(|| {
                    RestoreError::Layout(format!(
                        "pid {pid}: its parent pid {ppid} is not restored before it"
                    ))
                })?;
            let (parent_group, parent_session) = groups[parent];
            let session = if sid == pid {
                if pgid != pid {
                    return Err(RestoreError::Layout(format!(
                        "pid {pid} leads session {sid} but is in process group {pgid}"
                    )));
                }
                SessionStep::NewSession
            } else if restored_session.get(&sid) == Some(&parent_session) {
                match restored_group.get(&pgid) {
                    Some(&group) if group == parent_group => SessionStep::Inherit,
                    Some(&group) => SessionStep::JoinGroup(group),
                    None if pgid == pid => SessionStep::OwnGroup,
                    None => {
                        return Err(RestoreError::Layout(format!(
                            "pid {pid}: process group {pgid} has no leader restored before it"
                        )));
                    }
                }
            } else {
                return Err(RestoreError::Layout(format!(
                    "pid {pid}: session {sid} is not its parent's (pid {ppid})"
                )));
            };
            let group = match session {
                SessionStep::Inherit => parent_group,
                SessionStep::NewSession | SessionStep::OwnGroup => pid,
                SessionStep::JoinGroup(group) => group,
            };
            let own_session = if session == SessionStep::NewSession {
                pid
            } else {
                parent_session
            };
            restored_group.entry(pgid).or_insert(group);
            restored_session.entry(sid).or_insert(own_session);
            groups.push((group, own_session));
            pids.push(pid);
            parents.push(Some(parent));
            sessions.push(session);
        }
        Ok(Self {
            pids,
            live,
            parents,
            sessions,
        })
    }

    fn index_of(&self, pid: i32) -> Option<usize> {
        self.pids.iter().position(|&p| p == pid)
    }
}

#[cfg(test)]
mod tests {
    use persist_common::image::{ChildProcess, ProcessInfo};

    use super::*;

    fn process(pid: i32, pgid: i32, sid: i32) -> ProcessInfo {
        ProcessInfo {
            pid,
            pgid,
            sid,
            ..ProcessInfo::default()
        }
    }

    fn child(ppid: i32, pid: i32, pgid: i32, sid: i32) -> ChildProcess {
        ChildProcess {
            ppid,
            process: process(pid, pgid, sid),
            threads: Vec::new(),
            mappings: Vec::new(),
            fds: Vec::new(),
            inherited_fds: Vec::new(),
        }
    }

    fn tree(root: ProcessInfo, children: Vec<ChildProcess>) -> Manifest {
        Manifest {
            process: root,
            children,
            ..Manifest::default()
        }
    }

    #[test]
    fn workers_in_the_masters_group_and_session_inherit_them() {
        // nginx started from a shell: the shell's group and session.
        let manifest = tree(
            process(10, 5, 5),
            vec![child(10, 11, 5, 5), child(10, 12, 5, 5)],
        );
        let shape = Shape::of(&manifest).expect("a restorable tree");
        assert_eq!(shape.parents, [None, Some(0), Some(0)]);
        assert_eq!(
            shape.sessions,
            [
                SessionStep::NewSession,
                SessionStep::Inherit,
                SessionStep::Inherit
            ]
        );
    }

    #[test]
    fn groups_and_sessions_of_their_own_are_made_and_joined() {
        let manifest = tree(
            process(10, 10, 10),
            vec![
                // A group of its own, then its child in it, and a sibling
                // that joined it.
                child(10, 12, 12, 10),
                child(12, 13, 12, 10),
                child(10, 14, 12, 10),
                // A daemonised helper: a session of its own.
                child(10, 15, 15, 15),
            ],
        );
        let shape = Shape::of(&manifest).expect("a restorable tree");
        assert_eq!(
            shape.sessions,
            [
                SessionStep::NewSession,
                SessionStep::OwnGroup,
                SessionStep::Inherit,
                SessionStep::JoinGroup(12),
                SessionStep::NewSession
            ]
        );
        assert_eq!(shape.parents, [None, Some(0), Some(1), Some(0), Some(0)]);
    }

    fn zombie(ppid: i32, pid: i32, pgid: i32, sid: i32) -> Zombie {
        Zombie {
            pid,
            ppid,
            pgid,
            sid,
            wait_status: 7 << 8,
        }
    }

    #[test]
    fn zombies_are_forked_last_by_their_parents_in_their_groups() {
        let mut manifest = tree(process(10, 10, 10), vec![child(10, 11, 11, 10)]);
        manifest.zombies = vec![
            // A PostgreSQL backend: a session of its own.
            zombie(10, 12, 12, 12),
            zombie(11, 13, 11, 10),
        ];
        let shape = Shape::of(&manifest).expect("a restorable tree");
        assert_eq!(shape.live, 2);
        assert_eq!(shape.pids, [10, 11, 12, 13]);
        assert_eq!(shape.parents, [None, Some(0), Some(0), Some(1)]);
        assert_eq!(
            shape.sessions[2..],
            [SessionStep::NewSession, SessionStep::Inherit]
        );
        // A zombie is nobody's parent.
        manifest.zombies.push(zombie(12, 14, 10, 10));
        assert!(Shape::of(&manifest).is_err());
    }

    #[test]
    fn what_the_forks_cannot_give_back_is_refused_by_pid() {
        let refused = |children| match Shape::of(&tree(process(10, 10, 10), children)) {
            Err(err) => err.to_string(),
            Ok(_) => panic!("a tree the forks cannot rebuild was accepted"),
        };
        assert_eq!(
            refused(vec![child(99, 11, 10, 10)]),
            "pid 11: its parent pid 99 is not restored before it"
        );
        assert_eq!(
            refused(vec![child(10, 11, 12, 10), child(10, 12, 12, 10)]),
            "pid 11: process group 12 has no leader restored before it"
        );
        assert_eq!(
            refused(vec![child(10, 11, 11, 7)]),
            "pid 11: session 7 is not its parent's (pid 10)"
        );
        assert_eq!(
            refused(vec![child(10, 11, 10, 11)]),
            "pid 11 leads session 11 but is in process group 10"
        );
    }
}
