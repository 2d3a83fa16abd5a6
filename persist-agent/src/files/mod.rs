//! Saving and recreating file descriptors, for checkpoint and restore.
//!
//! Checkpoint calls [`save_fds`] while the process is frozen: it reads
//! `/proc/PID/fd` and `/proc/PID/fdinfo`, and looks at the live objects from
//! our side (through `pidfd_getfd` or by reopening `/proc/PID/fd/N`) without
//! disturbing them: pipe data is copied with `tee`, socket queues are read
//! with `MSG_PEEK`.
//!
//! Restore calls [`prepare()`] in the agent before forking: it re-creates every
//! object (files reopened at their offset, with the restored process's
//! credentials, never through a symlink, and only if they are still the
//! files recorded: see [`PathAccess`]; pipes refilled, eventfd, timerfd,
//! signalfd and memfd rebuilt, TCP, UDP and UNIX sockets bound again and
//! listening or connected as they were, socket pairs refilled, inotify
//! instances given their watches again, epoll instances created empty), or takes
//! the descriptors the caller hands over ([`InheritedFds`]). In the forked child,
//! [`ChildFds::install_in_child`] then moves each object to its descriptor
//! number with raw system calls only, closes everything else and re-adds the
//! epoll watches once the numbers are final.
//!
//! What is supported is listed on [`save_fds`]; everything else is refused
//! with an error naming the descriptor. Each kind of descriptor is saved and
//! re-created in one file of its own (`regular.rs`, `pipe.rs`, `memfd.rs`,
//! `eventfd.rs`, `timerfd.rs`, `signalfd.rs`, `epoll.rs`, `inotify.rs`,
//! `inet.rs`, `tcp_socket.rs`, `tcp_repair.rs`, `unix.rs`, `unix_socket.rs`);
//! `save.rs` and `prepare.rs` walk the descriptors and hand each to its kind.

// The walk over a process's descriptors, in each direction.
mod install;
mod prepare;
mod save;

// One kind of descriptor each, saved and restored.
mod epoll;
mod eventfd;
mod inet;
mod inotify;
mod locks;
mod memfd;
mod pipe;
mod regular;
mod signalfd;
mod tcp_repair;
mod tcp_socket;
mod timerfd;
mod unix;
mod unix_socket;

// What the kinds share.
mod fdinfo;
mod listed;
mod open;
mod proc_self;
mod recorded;
mod socket_file;
mod sockopts;
mod tree_ends;

use std::io;

pub use install::{ChildFds, PreparedFds, ProcSelfPosition};
pub use locks::save_locks;
pub use prepare::{InheritedFds, prepare};
pub use proc_self::{restore_proc_self_positions, warm_own_proc_entries};
pub use recorded::{
    PathAccess, RecordedError, identity_of, open as open_recorded, reopen as reopen_recorded,
};
pub use save::{
    SavedFds, TreeScope, save_fds, save_fds_excluding, save_fds_holding, save_fds_in_tree,
};
pub use tcp_repair::{RepairedConnections, leave_repair_mode_of};
pub use timerfd::TimerfdArm;
pub use tree_ends::cross_process_ends;

/// Why saving or recreating file descriptors failed.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The descriptor refers to something that cannot be checkpointed.
    #[error("fd {fd}: {what}")]
    Unsupported {
        /// The descriptor.
        fd: i32,
        /// What it is and why it is refused.
        what: String,
    },
    /// Reading the process's `/proc` entries failed.
    #[error("pid {pid}: reading {path}: {source}")]
    Proc {
        /// The process.
        pid: i32,
        /// The `/proc` path.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A system call about one descriptor failed.
    #[error("fd {fd}: {action}: {source}")]
    Io {
        /// The descriptor (its number in the checkpointed process).
        fd: i32,
        /// What was being done, naming the path or address involved.
        action: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A recorded path no longer names the file the image recorded, or goes
    /// through a symbolic link: it is not reopened.
    #[error("fd {fd}: {path}: {what}")]
    Changed {
        /// The descriptor.
        fd: i32,
        /// The recorded path.
        path: String,
        /// What differs.
        what: String,
    },
    /// The saved descriptors are inconsistent (a damaged or hostile image).
    #[error("fd {fd}: invalid image: {what}")]
    Invalid {
        /// The descriptor.
        fd: i32,
        /// What is wrong.
        what: String,
    },
}

impl FilesError {
    fn unsupported(fd: i32, what: impl Into<String>) -> Self {
        Self::Unsupported {
            fd,
            what: what.into(),
        }
    }

    fn invalid(fd: i32, what: impl Into<String>) -> Self {
        Self::Invalid {
            fd,
            what: what.into(),
        }
    }

    /// A closure for `map_err` that wraps an error about `fd`.
    fn io<E: Into<io::Error>>(fd: i32, action: impl Into<String>) -> impl FnOnce(E) -> Self {
        let action = action.into();
        move |source| Self::Io {
            fd,
            action,
            source: source.into(),
        }
    }
}
