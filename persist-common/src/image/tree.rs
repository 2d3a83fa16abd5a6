//! The processes of a tree other than its root, and what they share.
//!
//! The root of a checkpointed tree is the manifest's own process, as for a
//! single process; every other process of the tree is a [`ChildProcess`] in
//! [`super::Manifest::children`], parents before their children. Each holds
//! the same per-process records as the root (process state, threads,
//! mappings, descriptors), plus its parent and the descriptors it shares
//! with a process listed before it.
//!
//! What processes of a tree share is stored once:
//! - an open file description held by several processes (inherited through
//!   fork: a listening socket, a log file, a pipe end) is saved with the
//!   first process, in tree order, that holds it; each later holder lists
//!   it in [`ChildProcess::inherited_fds`] instead of its `fds`;
//! - the pages of a shared memory object (`SharedAnonymous` or `Memfd`
//!   mapping, told apart by its inode; `SysvShm` by its shmid; `PosixShm`
//!   by its file's inode) are stored with the first mapping of it in tree
//!   order; the same object mapped by a later process has no page runs of
//!   its own;
//! - a pipe or UNIX socket pair whose ends are held by different processes
//!   is saved by each holder with its inodes (`Pipe::inode`,
//!   `UnixPair::inode` and `peer_inode`), which name the one object.
//!
//! Private memory is stored per process, even pages a child still shares
//! copy-on-write with its parent since fork.

use serde::{Deserialize, Serialize};

use super::manifest::{FdInfo, Mapping, ProcessInfo, ThreadInfo};

/// A process of a checkpointed tree other than its root.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ChildProcess {
    /// Pid of its parent: the root or a process listed before it.
    pub ppid: i32,
    /// Process-wide state, its pid, process group and session among it.
    pub process: ProcessInfo,
    /// Every thread, the thread-group leader first.
    pub threads: Vec<ThreadInfo>,
    /// Every memory mapping, in address order.
    pub mappings: Vec<Mapping>,
    /// Its own open file descriptors, in fd order: those whose open file
    /// description no process listed before it holds.
    pub fds: Vec<FdInfo>,
    /// Descriptors sharing an open file description with a process listed
    /// before it, in fd order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inherited_fds: Vec<InheritedFd>,
}

/// A descriptor whose open file description was saved with another process
/// of the tree: restored as that same description, sharing offset, flags and
/// state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct InheritedFd {
    /// Descriptor number in this process.
    pub fd: i32,
    /// Close-on-exec (a per-descriptor flag, not shared).
    pub cloexec: bool,
    /// The process the description was saved with.
    pub from_pid: i32,
    /// Its descriptor number there (one that is saved in its `fds`).
    pub from_fd: i32,
}
