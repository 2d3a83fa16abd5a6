//! The processes under the checkpointed one: frozen, saved, killed or let
//! go together with it.
//!
//! The tree is walked from the root, which is frozen first: a frozen
//! process cannot fork, so the children it lists (`/proc/PID/task/TID/
//! children`, every thread's) are all it will ever have until it is let go.
//! Each child is checked as the root is (`preflight`), frozen, and its own
//! children listed in turn, parents before children (breadth first). A
//! child that exited and was not reaped (a zombie, or one exiting before it
//! is frozen: its parent, frozen, cannot reap it) is recorded as a
//! [`Zombie`] with its wait status, and left for its parent to reap. Any
//! error lets every frozen process of the tree go on as it was (each
//! [`Frozen`] does on drop).
//!
//! Saving a child is saving a process ([`super::save_one`]), with what it
//! shares with the processes saved before it found out first: a descriptor
//! whose open file description an earlier process holds (`kcmp(KCMP_FILE)`
//! across processes) is recorded as an [`InheritedFd`] of that process, not
//! saved again. See `persist_common::image::ChildProcess` for the rest.

use std::collections::{HashSet, VecDeque};
use std::fs;

use persist_common::image::{ChildProcess, ImageWriter, InheritedFd, Mapping, ThreadInfo, Zombie};

use super::freeze::Frozen;
use super::inherited_pages::{ChildKnownPages, ParentPages};
use super::memory::BasePages;
use super::recovery::Journal;
use super::shared_memory::SharedMemory;
use super::{
    CheckpointError, Preflight, SaveStats, Target, children, open_pidfd, preflight,
    restorer_userfaultfds, save_one,
};
use crate::files::{RepairedConnections, TreeScope};
use crate::sys::kobjects::{self, TaskObject};
use crate::sys::pidfd::PidFd;
use crate::sys::procmem::ProcMem;

/// The frozen descendants of a frozen root, parents before children; empty
/// for a process without children.
#[derive(Default)]
pub struct Tree {
    descendants: Vec<Descendant>,
    /// Children of the root or of a descendant that exited and were not
    /// reaped, in the order their parents were walked.
    zombies: Vec<Zombie>,
}

/// One frozen process of the tree under the root.
struct Descendant {
    pid: i32,
    ppid: i32,
    // Dropped before the journal: the process runs on first.
    frozen: Frozen,
    pidfd: PidFd,
    /// Undoes what is injected into it (in memory only: a recovery file
    /// covers the root alone).
    journal: Journal,
    /// Descriptors persist put in it.
    exclude: Vec<i32>,
}

/// What [`Tree::save`] saved of the descendants.
pub struct SavedDescendants {
    /// Every descendant, parents first.
    pub children: Vec<ChildProcess>,
    /// Their totals.
    pub stats: SaveStats,
    /// Their established TCP connections, in repair mode.
    pub connections: RepairedConnections,
    /// The tree's zombies.
    pub zombies: Vec<Zombie>,
}

/// The descriptors of a process of the tree that are saved with it, with
/// their link targets, for later processes to compare theirs with.
struct SavedFds {
    pid: i32,
    fds: Vec<(i32, String)>,
}

impl Tree {
    /// Freezes every descendant of `root`, which must be frozen already.
    pub fn freeze(root: i32) -> Result<Self, CheckpointError> {
        let mut tree = Self::default();
        let mut parents = VecDeque::from([root]);
        while let Some(parent) = parents.pop_front() {
            for pid in children(parent)? {
                match ChildState::of(pid, parent)? {
                    ChildState::Running => {}
                    ChildState::Zombie(zombie) => {
                        tree.zombies.push(zombie);
                        continue;
                    }
                    ChildState::Gone => continue,
                }
                match Descendant::freeze(pid, parent) {
                    Ok(descendant) => {
                        tree.descendants.push(descendant);
                        parents.push_back(pid);
                    }
                    // It exited since it was looked at: frozen, its parent
                    // cannot reap it.
                    Err(err @ CheckpointError::Zombie { .. }) => match ChildState::of(pid, parent)?
                    {
                        ChildState::Zombie(zombie) => tree.zombies.push(zombie),
                        // Reaped by the kernel: its parent ignores SIGCHLD.
                        ChildState::Gone => {}
                        ChildState::Running => return Err(err),
                    },
                    Err(err) => return Err(err),
                }
            }
        }
        Ok(tree)
    }

    /// The pids of the tree: `root`, every descendant and every zombie.
    pub fn pids(&self, root: i32) -> Vec<i32> {
        std::iter::once(root)
            .chain(self.descendants.iter().map(|d| d.pid))
            .chain(self.zombies.iter().map(|z| z.pid))
            .collect()
    }

    /// What the root's descriptors are saved with: the sockets of the
    /// whole tree, for pairs between processes.
    pub fn scope_of_root(&self, root: i32, exclude: &[i32]) -> Result<TreeScope, CheckpointError> {
        Ok(TreeScope {
            saved_elsewhere: Vec::new(),
            sockets: self.sockets(root, exclude)?,
        })
    }

    /// Inodes of the sockets every process of the tree holds.
    fn sockets(&self, root: i32, exclude: &[i32]) -> Result<HashSet<u64>, CheckpointError> {
        let mut sockets = HashSet::new();
        if self.descendants.is_empty() {
            return Ok(sockets);
        }
        let processes = std::iter::once((root, exclude))
            .chain(self.descendants.iter().map(|d| (d.pid, &d.exclude[..])));
        for (pid, exclude) in processes {
            for (_, target) in list_fds(pid, exclude)? {
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|rest| rest.strip_suffix(']'))
                    .and_then(|inode| inode.parse().ok())
                {
                    sockets.insert(inode);
                }
            }
        }
        Ok(sockets)
    }

    /// Saves every descendant after the root (whose saved mappings are
    /// `root_mappings`), each as [`super::save_one`] saves a process, adding
    /// their totals and their established TCP connections (in repair
    /// mode) to what it hands back. A private page equal to the one its parent
    /// stored at the same address refers to that copy
    /// ([`ParentPages`]).
    pub fn save(
        &self,
        root: &Target<'_>,
        root_mappings: &[Mapping],
        root_threads: &[ThreadInfo],
        writer: &mut ImageWriter,
        base: Option<&BasePages>,
        shared_memory: &mut SharedMemory,
    ) -> Result<SavedDescendants, CheckpointError> {
        let mut stats = SaveStats::default();
        let mut connections = RepairedConnections::default();
        if self.descendants.is_empty() {
            return Ok(SavedDescendants {
                children: Vec::new(),
                stats,
                connections,
                zombies: self.zombies.clone(),
            });
        }
        let sockets = self.sockets(root.pid, root.exclude)?;
        let mut earlier = vec![SavedFds {
            pid: root.pid,
            fds: list_fds(root.pid, root.exclude)?,
        }];
        let mut children = Vec::with_capacity(self.descendants.len());
        for descendant in &self.descendants {
            let pid = descendant.pid;
            let fds = list_fds(pid, &descendant.exclude)?;
            let inherited_fds = inherited(pid, &fds, &earlier)?;
            let scope = TreeScope {
                saved_elsewhere: inherited_fds.iter().map(|fd| fd.fd).collect(),
                sockets: sockets.clone(),
            };
            let target = Target {
                pid,
                frozen: &descendant.frozen,
                pidfd: &descendant.pidfd,
                journal: &descendant.journal,
                exclude: &descendant.exclude,
                client_ports: root.client_ports,
            };
            let (parent_mappings, parent_threads) = if descendant.ppid == root.pid {
                (root_mappings, root_threads)
            } else {
                children
                    .iter()
                    .find(|child: &&ChildProcess| child.process.pid == descendant.ppid)
                    .map(|child| (&child.mappings[..], &child.threads[..]))
                    .unwrap_or_default()
            };
            let parent_mem =
                ProcMem::open(descendant.ppid).map_err(|source| CheckpointError::Proc {
                    pid: descendant.ppid,
                    path: format!("/proc/{}/mem", descendant.ppid),
                    source,
                })?;
            let parent = ParentPages::new(parent_mem, parent_mappings, parent_threads);
            let known = ChildKnownPages {
                parent: &parent,
                base,
            };
            let saved = save_one(&target, &scope, writer, Some(&known), shared_memory)?;
            stats.add(&saved.stats);
            connections.extend(saved.connections);
            earlier.push(SavedFds {
                pid,
                fds: fds
                    .into_iter()
                    .filter(|(fd, _)| !scope.saved_elsewhere.contains(fd))
                    .collect(),
            });
            children.push(ChildProcess {
                ppid: descendant.ppid,
                process: saved.process,
                threads: saved.threads,
                mappings: saved.mappings,
                fds: saved.fds,
                inherited_fds,
            });
        }
        Ok(SavedDescendants {
            children,
            stats,
            connections,
            zombies: self.zombies.clone(),
        })
    }

    /// Detaches and continues every descendant.
    pub fn release(self) -> Result<(), CheckpointError> {
        let mut first_error = None;
        for descendant in self.descendants {
            if let Err(err) = descendant.frozen.release() {
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Kills every descendant, children before their parents, and waits
    /// until each is gone.
    pub fn kill(mut self) -> Result<(), CheckpointError> {
        while let Some(descendant) = self.descendants.pop() {
            descendant.frozen.kill(&descendant.pidfd)?;
        }
        Ok(())
    }
}

/// What a child of a frozen process is.
enum ChildState {
    /// A process to freeze and save (or refuse).
    Running,
    /// Exited and not reaped.
    Zombie(Zombie),
    /// No longer there.
    Gone,
}

impl ChildState {
    /// Reads `/proc/PID/stat` of `pid`, a child of the frozen `ppid`.
    fn of(pid: i32, ppid: i32) -> Result<Self, CheckpointError> {
        let stat = match procfs::process::Process::new(pid).and_then(|p| p.stat()) {
            Ok(stat) => stat,
            Err(procfs::ProcError::NotFound(_)) => return Ok(Self::Gone),
            Err(source) => {
                return Err(CheckpointError::ProcFs {
                    pid,
                    what: "stat",
                    source,
                });
            }
        };
        // A thread-group leader that exited while other threads run shows
        // `Z` too, but is a running process (refused by `preflight`).
        if stat.state != 'Z' || stat.num_threads > 1 {
            return Ok(if stat.state == 'X' {
                Self::Gone
            } else {
                Self::Running
            });
        }
        let wait_status = stat.exit_code.ok_or_else(|| CheckpointError::ProcField {
            pid,
            path: format!("/proc/{pid}/stat"),
            field: "exit_code".into(),
        })?;
        Ok(Self::Zombie(Zombie {
            pid,
            ppid,
            pgid: stat.pgrp,
            sid: stat.session,
            wait_status,
        }))
    }
}

impl Descendant {
    /// Checks and freezes `pid`, a child of the frozen `ppid`.
    fn freeze(pid: i32, ppid: i32) -> Result<Self, CheckpointError> {
        let zombie = |err| match err {
            CheckpointError::Exited { .. } => CheckpointError::Zombie { pid, parent: ppid },
            other => other,
        };
        let Preflight {
            under_seccomp,
            stopped_before,
        } = preflight(pid).map_err(zombie)?;
        refuse_shared_task_objects(pid, ppid)?;
        let pidfd = open_pidfd(pid)?;
        let journal = Journal::begin(None, pid, !stopped_before)?;
        // Its parent is frozen and cannot reap it: gone from here means a
        // zombie.
        let frozen = Frozen::freeze(pid, &pidfd, !stopped_before, under_seccomp).map_err(zombie)?;
        Ok(Self {
            pid,
            ppid,
            frozen,
            pidfd,
            journal,
            exclude: restorer_userfaultfds(pid),
        })
    }
}

/// Refuses a child that shares with its parent what each process of a
/// restored tree gets on its own. Checked before the child is frozen: its
/// parent is, so neither can change it meanwhile.
fn refuse_shared_task_objects(pid: i32, ppid: i32) -> Result<(), CheckpointError> {
    let objects = [
        (TaskObject::Memory, "address space", "CLONE_VM"),
        (TaskObject::FdTable, "descriptor table", "CLONE_FILES"),
        (
            TaskObject::Filesystem,
            "working directory and umask",
            "CLONE_FS",
        ),
    ];
    for (object, what, flag) in objects {
        let shared = kobjects::same_task_object(pid, ppid, object).map_err(|source| {
            CheckpointError::Proc {
                pid,
                path: format!("kcmp of its {what} with pid {ppid}"),
                source,
            }
        })?;
        if shared {
            return Err(CheckpointError::SharesWithParent {
                pid,
                parent: ppid,
                what,
                flag,
            });
        }
    }
    Ok(())
}

/// The descriptors of `pid` whose open file description a process saved
/// before it holds: each names the first such process and descriptor.
fn inherited(
    pid: i32,
    fds: &[(i32, String)],
    earlier: &[SavedFds],
) -> Result<Vec<InheritedFd>, CheckpointError> {
    let mut inherited = Vec::new();
    for (fd, target) in fds {
        if let Some((from_pid, from_fd)) = first_holder(pid, *fd, target, earlier)? {
            inherited.push(InheritedFd {
                fd: *fd,
                cloexec: cloexec(pid, *fd)?,
                from_pid,
                from_fd,
            });
        }
    }
    Ok(inherited)
}

/// The first process of `earlier` and its descriptor sharing `fd`'s open
/// file description, if any. Only descriptors with the same link target
/// can, so only those are compared.
fn first_holder(
    pid: i32,
    fd: i32,
    target: &str,
    earlier: &[SavedFds],
) -> Result<Option<(i32, i32)>, CheckpointError> {
    for process in earlier {
        for (other_fd, _) in process.fds.iter().filter(|(_, t)| t == target) {
            let same = kobjects::same_file(pid, fd, process.pid, *other_fd).map_err(|source| {
                CheckpointError::Kcmp {
                    pid,
                    fd,
                    other_pid: process.pid,
                    other_fd: *other_fd,
                    source,
                }
            })?;
            if same {
                return Ok(Some((process.pid, *other_fd)));
            }
        }
    }
    Ok(None)
}

/// The descriptors of `pid` but those of `exclude`, in order, with their
/// link targets.
fn list_fds(pid: i32, exclude: &[i32]) -> Result<Vec<(i32, String)>, CheckpointError> {
    let dir = format!("/proc/{pid}/fd");
    let proc_error = |path: &str| {
        let path = path.to_owned();
        move |source| CheckpointError::Proc { pid, path, source }
    };
    let mut fds = Vec::new();
    for entry in fs::read_dir(&dir).map_err(proc_error(&dir))? {
        let entry = entry.map_err(proc_error(&dir))?;
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if exclude.contains(&fd) {
            continue;
        }
        let link = format!("{dir}/{fd}");
        let target = fs::read_link(&link).map_err(proc_error(&link))?;
        fds.push((fd, target.to_string_lossy().into_owned()));
    }
    fds.sort_unstable();
    Ok(fds)
}

/// Whether `fd` of `pid` is close-on-exec, from the `flags` line of its
/// fdinfo (octal).
fn cloexec(pid: i32, fd: i32) -> Result<bool, CheckpointError> {
    let path = format!("/proc/{pid}/fdinfo/{fd}");
    let text = fs::read_to_string(&path).map_err(|source| CheckpointError::Proc {
        pid,
        path: path.clone(),
        source,
    })?;
    let flags = text
        .lines()
        .find_map(|line| line.strip_prefix("flags:"))
        .and_then(|flags| u32::from_str_radix(flags.trim(), 8).ok())
        .ok_or_else(|| CheckpointError::ProcField {
            pid,
            path,
            field: "flags".into(),
        })?;
    Ok(flags & libc::O_CLOEXEC as u32 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_without_children_is_a_tree_of_one() {
        let tree = Tree::default();
        let own = std::process::id() as i32;
        let scope = tree.scope_of_root(own, &[]).unwrap();
        assert!(
            scope.sockets.is_empty() && scope.saved_elsewhere.is_empty(),
            "a single process needs no tree scope: {scope:?}"
        );
    }

    #[test]
    fn fds_are_close_on_exec_as_fdinfo_says() {
        let own = std::process::id() as i32;
        let (plain_r, plain_w) = nix::unistd::pipe().unwrap();
        let (exec_r, exec_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        use std::os::fd::AsRawFd;
        assert!(!cloexec(own, plain_r.as_raw_fd()).unwrap());
        assert!(cloexec(own, exec_r.as_raw_fd()).unwrap());
        drop((plain_w, exec_w));
    }
}
