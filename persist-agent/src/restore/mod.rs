//! Restore: rebuild a process from an image, its memory paged in lazily.
//!
//! 1. [`Skeleton::prepare`]: the agent re-creates the descriptors
//!    ([`crate::files`]) and opens the mapped files, then forks a child with
//!    the recorded pid (`clone3` `set_tid`; inside a fresh pid namespace when
//!    the pid is taken here). The child installs its descriptors, maps a
//!    small restorer region at an address free in both layouts and jumps
//!    into it; the routine there ([`crate::sys::blob`]) runs a table of
//!    syscalls natively: unmap the agent, move vdso and vvar, map every
//!    recorded mapping (file mappings from their files),
//!    `PR_SET_MM_MAP`, process attributes, userfaultfd registration of the
//!    lazy memory. The agent, which seized the child before the jump, then
//!    creates the other threads with their tids, sets per-thread state,
//!    seccomp filters (suspended by ptrace until the end, see `seccomp.rs`)
//!    and credentials (last), unmaps the region and sets registers. Only the
//!    pages the process wrote in its private file mappings (`file_pages.rs`),
//!    each thread's stack-top and TLS pages and its rseq area are copied in.
//! 2. Before the resume, the daemon may copy in a recorded working set in
//!    bulk (`pager/bulk.rs`).
//! 3. [`Skeleton::resume`]: detach every thread, or continue a released
//!    skeleton ([`Continuer`]).
//! 4. [`Pager::run_until_filled`]: serve faults from the page store and
//!    fill the rest in the background; the restored process keeps a
//!    duplicate of its userfaultfd, so a dead pager means blocked faults,
//!    never zero pages.
//!
//! A tree of processes (an image with descendants) is restored by
//! [`TreeSkeleton`] (`tree.rs`): every process prepared as above, then
//! forked by its recorded parent, then completed one by one.
//!
//! # For callers
//!
//! - ptrace ties the stopped skeleton to the thread that prepared it:
//!   call [`Skeleton::prepare`] and [`Skeleton::resume`] on the same thread.
//!   The pager may run anywhere (it only needs the userfaultfd).
//! - The restored process (or, in the pid namespace case, the init of its
//!   namespace, [`Restored::init_pid`]) is a child of the caller: reap it.
//! - The restored process keeps its userfaultfd at a descriptor above its
//!   own; a later checkpoint of it must leave that descriptor out.
//! - When the recorded pid is taken, the process runs in a new pid and mount
//!   namespace (with its own /proc), with its recorded pid and tids inside.
//! - Dropping a [`Skeleton`] that was never resumed kills its process;
//!   every error of prepare kills whatever it had started.

mod child;
mod creds;
mod file_pages;
mod inherited_memory;
mod layout;
mod locks;
mod mapped_files;
mod pager;
pub mod posix_shm;
#[cfg(test)]
mod prefetch_tests;
mod resources;
mod runner;
mod seccomp;
mod setup;
mod shared_pages;
mod signals;
mod skeleton;
mod spawn;
mod spawner;
mod sysv_ipc;
mod sysv_shm;
mod table;
mod threads;
mod timers;
mod tree;
mod verify;

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use persist_common::image::{Image, ImageError};

pub(crate) use creds::from_status as credentials_from_status;
pub(crate) use file_pages::check_runs as check_file_page_runs;
pub use pager::{AddressEvent, EventJournal, FillGate, JournalError, Pager, PagerStats};
pub(crate) use pager::{PlannedCopy, WhenCopied, help_each_then};
pub use skeleton::{Continuer, OnPager, RestoreConfig, Restored, Skeleton, Timings};
pub use spawner::{
    copy_apart, cost as spawner_cost, forks as spawner_forks, set_apart, start as start_spawner,
};
pub use tree::TreeSkeleton;

use crate::files::FilesError;
use crate::sys::clone::{self, Forked};

/// What to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The image directory.
    pub image: PathBuf,
    /// Reopen a recorded file that changed since the checkpoint (other inode
    /// or device) instead of refusing.
    pub accept_changed_files: bool,
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The image cannot be used (corrupt, truncated, insecure, other host).
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A descriptor could not be re-created.
    #[error(transparent)]
    Files(#[from] FilesError),
    /// A page run failed its checksum.
    #[error("page at {address:#x}: {reason}")]
    CorruptImage {
        /// First address of the run.
        address: u64,
        /// What is wrong.
        reason: String,
    },
    /// A page failed its checksum while being served; the process was killed.
    #[error(
        "pid {pid}: page at {address:#x} is corrupt ({reason}); the restored process was killed"
    )]
    CorruptPage {
        /// The restored process.
        pid: i32,
        /// The faulting address.
        address: u64,
        /// What is wrong.
        reason: String,
    },
    /// A mapped file is not the one the image was taken with.
    #[error("mapping {address:#x}: {path} changed since the checkpoint: {what}")]
    FileChanged {
        /// Start of the mapping.
        address: u64,
        /// The file.
        path: String,
        /// What differs.
        what: String,
    },
    /// The executable or working directory cannot be reopened safely (a
    /// symlink in its path, or another type of file).
    #[error("{path}: {what}")]
    PathChanged {
        /// The recorded path.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// One process of a tree could not be restored.
    #[error("pid {pid} of the tree")]
    InTree {
        /// Its recorded pid.
        pid: i32,
        /// Why.
        #[source]
        source: Box<RestoreError>,
    },
    /// The layout cannot be built.
    #[error("{0}")]
    Layout(String),
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Creating the process failed.
    #[error("creating the process: {0}")]
    Fork(#[source] std::io::Error),
    /// The child failed before its layout was built.
    #[error("pid {pid}: {step} failed: {source}")]
    Child {
        /// The child.
        pid: i32,
        /// What it was doing.
        step: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A syscall of a restorer table failed.
    #[error("pid {pid}: {step} failed: {source}")]
    Step {
        /// The thread.
        pid: i32,
        /// The entry's description (names the mapping address).
        step: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A ptrace or /proc operation on the process failed.
    #[error("pid {pid}: {action}: {source}")]
    Ptrace {
        /// The thread.
        pid: i32,
        /// The operation.
        action: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The pages a process wrote to in a private file mapping could not be
    /// written back (a file shorter than when they were written: the kernel
    /// refuses pages past its end).
    #[error("pid {pid}: writing back the {pages} written page(s) at {address:#x} of {path}")]
    FilePages {
        /// The restored process.
        pid: i32,
        /// First address of the pages.
        address: u64,
        /// How many pages.
        pages: u64,
        /// The mapped file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The process did something unexpected while being built.
    #[error("pid {pid}: {what}")]
    Unexpected {
        /// The thread.
        pid: i32,
        /// What happened.
        what: String,
    },
    /// The pager failed.
    #[error("pager of pid {pid}: {reason}")]
    Pager {
        /// The restored process.
        pid: i32,
        /// What failed.
        reason: String,
    },
}

impl RestoreError {
    fn io(path: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    fn ptrace(pid: i32, action: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Ptrace {
            pid,
            action,
            source,
        }
    }
}

/// Restores the image detached from the caller and returns the pid of the
/// restored process as seen from the caller's pid namespace.
///
/// A detached pager process (its own session, stdio on /dev/null) serves
/// the memory and exits once everything is in. Every page checksum is
/// verified before anything runs, so a corrupt image fails here with an
/// error naming the page.
pub fn restore_detached(options: &RestoreOptions) -> Result<i32, RestoreError> {
    let image = Arc::new(Image::open(&options.image)?);
    let config = RestoreConfig {
        verify_pages_first: true,
        accept_changed_files: options.accept_changed_files,
        ..RestoreConfig::default()
    };
    if image.manifest().is_tree() {
        // A tree: every process gets a pager process of its own.
        let restored = TreeSkeleton::prepare(image, config)?.resume()?;
        let root = restored[0].pid;
        for process in restored {
            detach_pager(process.pid, process.pager)?;
        }
        return Ok(root);
    }
    let skeleton = Skeleton::prepare(image, config)?;
    let prepare_time = skeleton_timings(&skeleton);
    let restored = skeleton.resume()?;
    let pid = restored.pid;
    let timings = restored.timings;
    detach_pager(pid, restored.pager)?;
    if std::env::var_os("PERSIST_RESTORE_TIMINGS").is_some() {
        eprintln!(
            "restore timings: prepare {:?} (setup {:?}, layout {:?}, finish {:?}), resume {:?}",
            prepare_time.prepare,
            prepare_time.setup,
            prepare_time.layout,
            prepare_time.finish,
            timings.resume
        );
    }
    Ok(pid)
}

/// Forks a detached process (its own session, stdio on /dev/null) that
/// serves the memory of restored process `pid` until everything is in.
fn detach_pager(pid: i32, mut pager: Pager) -> Result<(), RestoreError> {
    match clone::fork_with(0, None).map_err(RestoreError::Fork)? {
        Forked::Child => {
            // The CLI is single-threaded, so the child may run ordinary code.
            let _ = nix::unistd::setsid();
            let log = std::env::var_os("PERSIST_PAGER_LOG");
            redirect_stdio(log.as_deref());
            let code = match pager.run_until_filled() {
                Ok(stats) => {
                    eprintln!(
                        "pager pid {pid}: done: {} faults ({} pages, {} zero), {} pages filled, {} dropped, first fault served {:?} after resume, {:.0} faults/s, total {:?}",
                        stats.faults,
                        stats.fault_pages,
                        stats.zero_faults,
                        stats.filled_pages,
                        stats.dropped_pages,
                        stats.first_fault_after_resume,
                        stats.faults_per_second(),
                        stats.total_time
                    );
                    0
                }
                Err(err) => {
                    eprintln!("pager pid {pid}: {err}");
                    1
                }
            };
            let _ = std::io::stderr().flush();
            clone::exit_now(code)
        }
        Forked::Parent(_) => Ok(()),
    }
}

fn skeleton_timings(skeleton: &Skeleton) -> Timings {
    skeleton.timings()
}

/// Points stdin and stdout at /dev/null and stderr at `log` (or /dev/null),
/// so the detached pager does not keep the caller's pipes open.
fn redirect_stdio(log: Option<&std::ffi::OsStr>) {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null");
    let err = log.and_then(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()
    });
    if let Ok(null) = null {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
        match &err {
            Some(file) => {
                let _ = nix::unistd::dup2_stderr(file);
            }
            None => {
                let _ = nix::unistd::dup2_stderr(&null);
            }
        }
    }
}
