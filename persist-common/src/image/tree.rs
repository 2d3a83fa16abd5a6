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

/// A child of a process of the tree that exited and was not reaped yet (a
/// zombie): its parent will reap it after the restore, as it would have.
/// It has no memory, threads or descriptors; the restore makes a process
/// with its pid, group and session that exits at once with its status.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Zombie {
    /// Its pid.
    pub pid: i32,
    /// Pid of its parent: the root or a process in `children`.
    pub ppid: i32,
    /// Its process group.
    pub pgid: i32,
    /// Its session.
    pub sid: i32,
    /// Its wait status, as `waitpid` gives it (field 52, `exit_code`, of
    /// `/proc/PID/stat`): the exit code in bits 8 to 15, or the
    /// terminating signal in bits 0 to 6 with the core-dump bit 7.
    pub wait_status: i32,
}

impl Zombie {
    /// The exit code, when it exited rather than died by a signal.
    pub fn exit_code(&self) -> Option<i32> {
        (self.wait_status & 0x7f == 0).then_some((self.wait_status >> 8) & 0xff)
    }

    /// The signal that ended it, when one did.
    pub fn signal(&self) -> Option<i32> {
        let signal = self.wait_status & 0x7f;
        // 0x7f is a stop, never the status of an exited process.
        (signal != 0 && signal != 0x7f).then_some(signal)
    }

    /// Whether it dumped core as it died.
    pub fn core_dumped(&self) -> bool {
        self.signal().is_some() && self.wait_status & 0x80 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zombie(wait_status: i32) -> Zombie {
        Zombie {
            pid: 2,
            ppid: 1,
            pgid: 1,
            sid: 1,
            wait_status,
        }
    }

    #[test]
    fn a_wait_status_is_an_exit_code_or_a_signal() {
        let exited = zombie(7 << 8);
        assert_eq!(
            (exited.exit_code(), exited.signal(), exited.core_dumped()),
            (Some(7), None, false)
        );
        let killed = zombie(15);
        assert_eq!(
            (killed.exit_code(), killed.signal(), killed.core_dumped()),
            (None, Some(15), false)
        );
        let dumped = zombie(11 | 0x80);
        assert_eq!(
            (dumped.exit_code(), dumped.signal(), dumped.core_dumped()),
            (None, Some(11), true)
        );
    }
}
