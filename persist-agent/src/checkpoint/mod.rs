//! Checkpoint: take a live process to an image on disk.
//!
//! 1. Refuse what cannot be saved (see [`CheckpointError`]) before touching
//!    the process.
//!    With a base image, open it and index where it stored each page.
//! 2. Freeze it: every thread seized, and the process group-stopped under
//!    ptrace (`freeze`), so that if the agent dies from here on the process
//!    stays stopped, for [`recover`] to undo what was under way (`recovery`).
//! 3. Save its memory mappings and pages (`memory`; with a base, pages it
//!    already stored are referred to there, see [`CheckpointOptions::base`]),
//!    every thread
//!    (`threads`; registers are saved ready to resume, see there), the
//!    process-wide state (`process`, with system calls injected into the
//!    stopped leader by `inject`) and its file descriptors
//!    ([`crate::files`]), into an [`ImageWriter`].
//! 4. Finish the image (atomic, root-only), then kill the process and wait
//!    until it is gone; or with `leave_running` detach first (the image is
//!    synced while the process goes on) and check that it runs again.
//!
//! Any error before the last step detaches every thread and leaves the
//! process running as it was; no image appears at the destination. An
//! agent killed at any instant leaves it stopped, with a recovery file
//! ([`CheckpointOptions::recovery_file`]) that [`recover`] undoes.

mod freeze;
mod inherited_pages;
mod inject;
mod memory;
mod posix_shm;
mod posix_timers;
mod process;
mod recovery;
mod seccomp;
mod shared_memory;
mod status;
mod sysv_ipc;
mod sysv_shm;
mod threads;
mod tree;

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use persist_common::image::{
    FdInfo, Image, ImageError, ImageWriter, Manifest, Mapping, PAGE_SIZE, ProcessInfo, SysvIpc,
    ThreadInfo,
};

use crate::files::{RepairedConnections, SavedFds, TreeScope};
use crate::host;
use crate::sys::cpu;
use crate::sys::pidfd::PidFd;
use crate::sys::procmem::ProcMem;

use freeze::Frozen;
use memory::{BasePages, KnownPages};
use recovery::Journal;
use shared_memory::SharedMemory;
use tree::Tree;

pub use recovery::{PAUSE_AFTER_SAVE_ENV, PAUSE_ENV, RecoverError, Recovered, recover};
pub use threads::resume_registers;

/// `PF_KTHREAD` in the flags of /proc/PID/stat.
const PF_KTHREAD: u32 = 0x0020_0000;

/// A base image with this many base stores gets a full image, not another
/// delta. Each delta adds a store to the chain, and a store stays on disk as
/// long as any image links it, however few of its pages are still in use:
/// without a bound, a service kept at every park would pile up stores of
/// long-gone states. A full image now and then starts the chain over.
pub const MAX_BASE_STORES: usize = 3;

/// What to checkpoint and where.
#[derive(Debug, Clone)]
pub struct CheckpointOptions {
    /// The process to checkpoint.
    pub pid: i32,
    /// The image directory to write.
    pub image: PathBuf,
    /// Let the process go on after the checkpoint instead of killing it.
    pub leave_running: bool,
    /// Descriptors persist itself put in the process (the userfaultfd a
    /// restored process keeps), left out of the image.
    pub exclude_fds: Vec<i32>,
    /// An earlier image of the process (typically the one it was restored
    /// from): a page equal to the one this image stored at the same address
    /// is not written again but referred to there, and its page stores are
    /// hard-linked into the new image (a delta image). A base that already
    /// has [`MAX_BASE_STORES`] base stores gets a full image instead.
    pub base: Option<PathBuf>,
    /// The base is the image of another process (a sibling service of the
    /// same program, `add --share-pages`), not one this process was
    /// restored from: only its pages are shared, and the files its agent
    /// opened are not taken as this process's.
    pub base_is_sibling: bool,
    /// Files the caller opened for the process (the log it gave it as its
    /// stdout and stderr), recorded so that a restore reopens them with the
    /// agent's credentials rather than the process's.
    pub agent_files: Vec<PathBuf>,
    /// Where to keep, while the checkpoint runs, what undoes it if the agent
    /// dies (root-only, removed when the checkpoint ends either way): the
    /// process then stays stopped until [`recover`] is given this file.
    pub recovery_file: Option<PathBuf>,
    /// Checkpoint the whole tree of processes under `pid` (saved as
    /// [`Manifest::children`]) rather than refusing a process with children
    /// ([`CheckpointError::HasChildren`]). `restore` rebuilds such an
    /// image, and so do the daemon's skeletons. Not with a recovery file
    /// ([`CheckpointError::TreeRecovery`]).
    pub tree: bool,
    /// The ports the process serves clients on: an established connection
    /// whose local port is one of them is a client still connected, and is
    /// refused as [`CheckpointError::ClientConnected`] instead of saved (the
    /// daemon does not park a service while a client is connected). Other
    /// established connections are saved with `TCP_REPAIR`.
    pub client_ports: Vec<u16>,
}

/// What a finished checkpoint saved, and how long it took.
#[derive(Debug, Clone)]
pub struct CheckpointSummary {
    /// The process (the root of the tree).
    pub pid: i32,
    /// Processes saved: 1, or the size of the tree.
    pub processes: usize,
    /// Threads of every process saved.
    pub threads: usize,
    /// Mappings of every process saved.
    pub mappings: usize,
    /// File descriptors of every process saved (a description several of
    /// them share counted in each).
    pub fds: usize,
    /// Pages stored: written, or reused from the base image.
    pub pages: u64,
    /// Pages written to the image's own page store.
    pub pages_written: u64,
    /// Pages referred to where the base image, or the parent process in
    /// this image, stored them instead of written.
    pub pages_reused: u64,
    /// Base stores the image links (0 for a full image).
    pub base_stores: usize,
    /// Size of the page store, base stores included.
    pub page_store_bytes: u64,
    /// Time the process was stopped for (freeze to image finished).
    pub frozen_for: Duration,
    /// Time spent reading and storing pages.
    pub memory_time: Duration,
    /// The process was left running.
    pub left_running: bool,
}

impl std::fmt::Display for CheckpointSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = (self.pages * PAGE_SIZE) as f64 / (1024.0 * 1024.0);
        let secs = self.memory_time.as_secs_f64();
        let rate = if secs > 0.0 { mib / secs } else { 0.0 };
        write!(f, "pid {}", self.pid)?;
        if self.processes > 1 {
            write!(f, " and {} descendants", self.processes - 1)?;
        }
        write!(
            f,
            ": {} threads, {} mappings, {} fds, {} pages ({mib:.1} MiB, {rate:.0} MiB/s): \
             {} written, {} reused (base stores: {}); frozen for {:.1} ms; {}",
            self.threads,
            self.mappings,
            self.fds,
            self.pages,
            self.pages_written,
            self.pages_reused,
            self.base_stores,
            self.frozen_for.as_secs_f64() * 1000.0,
            if self.left_running {
                "left running"
            } else {
                "killed"
            }
        )
    }
}

/// Why a checkpoint failed. Every variant names the process, and the thread,
/// address or file involved.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// There is no process with that pid.
    #[error("pid {pid}: no such process")]
    NoSuchProcess {
        /// The pid asked for.
        pid: i32,
    },
    /// The pid is the agent itself.
    #[error("pid {pid} is this agent itself")]
    IsSelf {
        /// The pid asked for.
        pid: i32,
    },
    /// The pid is a thread, not a process.
    #[error("pid {pid} is a thread of process {tgid}: checkpoint pid {tgid} instead")]
    NotAProcess {
        /// The pid asked for.
        pid: i32,
        /// Its thread group.
        tgid: i32,
    },
    /// A kernel thread has no user memory to save.
    #[error("pid {pid} is a kernel thread")]
    KernelThread {
        /// The pid asked for.
        pid: i32,
    },
    /// The process has exited (a zombie, or gone while freezing).
    #[error("pid {pid} has exited")]
    Exited {
        /// The pid asked for.
        pid: i32,
    },
    /// A thread runs in seccomp strict mode (mode 1), which is not restored.
    #[error(
        "pid {pid}, thread {tid} runs in seccomp strict mode (mode 1), which cannot be checkpointed"
    )]
    SeccompStrict {
        /// The process.
        pid: i32,
        /// The thread.
        tid: i32,
    },
    /// A seccomp filter can hand system calls to a user-space listener
    /// (`SECCOMP_RET_USER_NOTIF`): the listener's descriptor, perhaps in
    /// another process, cannot be restored with it.
    #[error(
        "pid {pid}, thread {tid}: seccomp filter {filter} of {count} (in install order) returns \
         SECCOMP_RET_USER_NOTIF, whose listener cannot be restored"
    )]
    SeccompUserNotif {
        /// The process.
        pid: i32,
        /// The thread.
        tid: i32,
        /// The filter's position in the thread's chain, 1 for the first
        /// installed.
        filter: usize,
        /// Filters of the thread.
        count: usize,
    },
    /// Another tracer holds the process.
    #[error("pid {pid} is already traced by pid {tracer}")]
    Traced {
        /// The pid asked for.
        pid: i32,
        /// Its tracer.
        tracer: i32,
    },
    /// Child processes are checkpointed with their parent only when asked
    /// ([`CheckpointOptions::tree`]), and a parent restored without them
    /// would wait for them in vain.
    #[error(
        "pid {pid} has child processes ({children:?}): only a checkpoint of the whole tree \
         (--tree) can save them"
    )]
    HasChildren {
        /// The process.
        pid: i32,
        /// Its children.
        children: Vec<i32>,
    },
    /// A recovery file records how to undo the checkpoint of one process.
    #[error(
        "pid {pid}: a recovery file can undo the checkpoint of one process, not of a tree: \
         checkpoint a tree without one"
    )]
    TreeRecovery {
        /// The root of the tree.
        pid: i32,
    },
    /// A child of a process of the tree reads as exited but is not a
    /// zombie: its main thread ended while other threads run.
    #[error(
        "pid {pid} (a child of pid {parent}) has exited but is not a zombie: its main thread \
         ended while other threads run, which is not supported"
    )]
    Zombie {
        /// The zombie.
        pid: i32,
        /// Its parent, which has not reaped it.
        parent: i32,
    },
    /// A process of the tree shares its address space, descriptor table or
    /// filesystem context with its parent (`clone` flags `CLONE_VM`,
    /// `CLONE_FILES`, `CLONE_FS`): each process is restored with its own.
    #[error(
        "pid {pid} shares its {what} with its parent pid {parent} (clone {flag}), which a tree \
         checkpoint cannot save"
    )]
    SharesWithParent {
        /// The child.
        pid: i32,
        /// Its parent.
        parent: i32,
        /// What they share.
        what: &'static str,
        /// The clone flag that made them share it.
        flag: &'static str,
    },
    /// Two descriptors of processes of a tree could not be compared.
    #[error("pid {pid}, fd {fd}: comparing with pid {other_pid}, fd {other_fd} (kcmp)")]
    Kcmp {
        /// The process.
        pid: i32,
        /// Its descriptor.
        fd: i32,
        /// The process it was compared with.
        other_pid: i32,
        /// That process's descriptor.
        other_fd: i32,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Memory still registered with a userfaultfd (a restored process whose
    /// pager has not finished): its unserved pages are not in memory.
    #[error(
        "pid {pid}: mapping {start:#x}-{end:#x} is still registered with a userfaultfd: pages \
         not yet served are not in memory; checkpoint once the restore has filled it"
    )]
    UserfaultfdPending {
        /// The process.
        pid: i32,
        /// Start of the mapping.
        start: u64,
        /// End of the mapping.
        end: u64,
    },
    /// A mapping of a kind that cannot be restored.
    #[error("pid {pid}: mapping {start:#x}-{end:#x}: {what} is not supported")]
    UnsupportedMapping {
        /// The process.
        pid: i32,
        /// Start of the mapping.
        start: u64,
        /// End of the mapping.
        end: u64,
        /// What it is.
        what: String,
    },
    /// System V semaphores or message queues that cannot be saved, or
    /// could not be read.
    #[error("pid {pid}: {what}")]
    SysvIpc {
        /// The checkpointed process (the tree's root).
        pid: i32,
        /// What and why, naming the process, set or queue.
        what: String,
    },
    /// A POSIX timer that a restore could not rebuild.
    #[error("pid {pid}: POSIX timer {id} cannot be checkpointed: {what}")]
    UnsupportedTimer {
        /// The process.
        pid: i32,
        /// The timer id.
        id: i32,
        /// Why.
        what: String,
    },
    /// A /proc file or other per-process source could not be read.
    #[error("pid {pid}: reading {path}: {source}")]
    Proc {
        /// The process.
        pid: i32,
        /// What was read.
        path: String,
        /// The error.
        source: io::Error,
    },
    /// The procfs crate could not parse a /proc file.
    #[error("pid {pid}: reading /proc/{pid}/{what}: {source}")]
    ProcFs {
        /// The process.
        pid: i32,
        /// Which file.
        what: &'static str,
        /// The error.
        source: procfs::ProcError,
    },
    /// A /proc field is missing or malformed.
    #[error("pid {pid}: {path}: field {field} is missing or malformed")]
    ProcField {
        /// The process.
        pid: i32,
        /// The file.
        path: String,
        /// The field.
        field: String,
    },
    /// A ptrace request failed.
    #[error("pid {pid}, thread {tid}: {op} failed: {source}")]
    Ptrace {
        /// The process.
        pid: i32,
        /// The thread.
        tid: i32,
        /// The request.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// A thread did not stop when asked to (uninterruptible sleep).
    #[error("pid {pid}, thread {tid} did not stop within {seconds} s of being asked to")]
    StopTimeout {
        /// The process.
        pid: i32,
        /// The thread.
        tid: i32,
        /// The time waited.
        seconds: u64,
    },
    /// A thread stopped for another reason than the one awaited.
    #[error("pid {pid}, thread {tid}: unexpected {stop} during {during}")]
    UnexpectedStop {
        /// The process.
        pid: i32,
        /// The thread.
        tid: i32,
        /// What we were doing.
        during: &'static str,
        /// How it stopped.
        stop: String,
    },
    /// Memory of the process could not be read or written.
    #[error("pid {pid}: {what} at {addr:#x} ({len} bytes): {source}")]
    Memory {
        /// The process.
        pid: i32,
        /// The address.
        addr: u64,
        /// The length.
        len: usize,
        /// What was accessed.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// No `syscall` instruction was found to inject calls with.
    #[error(
        "pid {pid}: no syscall instruction found in its executable memory to inject calls with"
    )]
    NoSyscallInsn {
        /// The process.
        pid: i32,
    },
    /// A system call injected into a thread failed.
    #[error("pid {pid}, thread {tid}: injected {syscall} failed: {}", io::Error::from_raw_os_error(*errno))]
    InjectedSyscall {
        /// The process.
        pid: i32,
        /// The thread.
        tid: i32,
        /// The call.
        syscall: &'static str,
        /// Its errno.
        errno: i32,
    },
    /// The pidfd of the process could not be opened.
    #[error("pid {pid}: pidfd_open: {source}")]
    PidFd {
        /// The process.
        pid: i32,
        /// The error.
        source: io::Error,
    },
    /// File descriptors could not be saved.
    #[error("pid {pid}: saving file descriptors: {source}")]
    Files {
        /// The process.
        pid: i32,
        /// The error.
        source: crate::files::FilesError,
    },
    /// The base image of a delta could not be opened.
    #[error("pid {pid}: base image {}: {source}", base.display())]
    Base {
        /// The process.
        pid: i32,
        /// The base image asked for.
        base: PathBuf,
        /// Why it cannot be used.
        source: ImageError,
    },
    /// The image could not be written.
    #[error("writing the image of pid {pid}: {source}")]
    Image {
        /// The process.
        pid: i32,
        /// The error.
        source: ImageError,
    },
    /// A client is still connected to a port the process serves on
    /// ([`CheckpointOptions::client_ports`]).
    #[error(
        "pid {pid}: fd {fd}: established TCP connection {local} -> {peer} is a client of port \
         {port}: not checkpointed while clients are connected"
    )]
    ClientConnected {
        /// The process.
        pid: i32,
        /// The connection's descriptor.
        fd: i32,
        /// Its local address.
        local: String,
        /// The client's address.
        peer: String,
        /// The served port.
        port: u16,
    },
    /// SIGKILL could not be sent.
    #[error("pid {pid}: sending SIGKILL: {source}")]
    Kill {
        /// The process.
        pid: i32,
        /// The error.
        source: io::Error,
    },
    /// The process did not exit after SIGKILL.
    #[error("pid {pid} did not exit within {seconds} s of SIGKILL")]
    KillTimeout {
        /// The process.
        pid: i32,
        /// The time waited.
        seconds: u64,
    },
    /// The recovery file could not be written.
    #[error("pid {pid}: writing recovery file {}", path.display())]
    Recovery {
        /// The process.
        pid: i32,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A signal could not be sent.
    #[error("pid {pid}: sending {signal}")]
    Signal {
        /// The process.
        pid: i32,
        /// The signal.
        signal: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A thread stayed stopped after being detached.
    #[error("pid {pid}, thread {tid} is still stopped after being detached")]
    StillStopped {
        /// The process.
        pid: i32,
        /// The thread.
        tid: i32,
    },
}

impl CheckpointError {
    /// True when only the base image stood in the way: it could not be
    /// opened, or its page stores cannot be hard-linked next to the new
    /// image (another filesystem). A checkpoint without a base may succeed.
    pub fn is_base_unusable(&self) -> bool {
        matches!(
            self,
            Self::Base { .. }
                | Self::Image {
                    source: ImageError::BaseLink { .. },
                    ..
                }
        )
    }
}

/// Checkpoints the process named by `options` (and, with
/// [`CheckpointOptions::tree`], every process under it).
pub fn checkpoint(options: &CheckpointOptions) -> Result<CheckpointSummary, CheckpointError> {
    let pid = options.pid;
    if options.tree && options.recovery_file.is_some() {
        // The descendants' journals are kept in memory only.
        return Err(CheckpointError::TreeRecovery { pid });
    }
    let Preflight {
        under_seccomp,
        stopped_before,
    } = preflight(pid)?;
    let base = open_base(options)?;
    // Indexed before the freeze, so the process does not wait for it.
    let base_pages = base.as_ref().map(BasePages::new);
    let pidfd = open_pidfd(pid)?;

    // Dropped last: the file goes once the process runs again or is gone.
    let journal = Journal::begin(options.recovery_file.as_deref(), pid, !stopped_before)?;
    let frozen_at = Instant::now();
    let frozen = Frozen::freeze(pid, &pidfd, !stopped_before, under_seccomp)?;
    // Listed once the root is frozen: it cannot fork meanwhile.
    let tree = if options.tree {
        Tree::freeze(pid)?
    } else {
        let children = children(pid)?;
        if !children.is_empty() {
            return Err(CheckpointError::HasChildren { pid, children });
        }
        Tree::default()
    };
    let root = Target {
        pid,
        frozen: &frozen,
        pidfd: &pidfd,
        journal: &journal,
        exclude: &options.exclude_fds,
        client_ports: &options.client_ports,
    };
    // Read while every process is frozen, before the (longer) save of
    // their memory: a refusal comes first.
    let ipc = sysv_ipc::save(pid, &tree.pids(pid))?;
    // Dropped on an error, the connections leave repair mode and the
    // processes run on with them as they were.
    let (mut manifest, writer, stats, connections) =
        save(&root, &tree, options, base_pages.as_ref())?;
    manifest.sysv_ipc = ipc.image.clone();
    journal.pause_after_save_for_tests();
    let image_error = |source| CheckpointError::Image { pid, source };
    let frozen_for;
    if options.leave_running {
        // Everything is saved in memory: let the processes go on while the
        // image is synced to disk.
        connections
            .resume()
            .map_err(|source| CheckpointError::Files { pid, source })?;
        tree.release()?;
        frozen.release()?;
        frozen_for = frozen_at.elapsed();
        writer.finish(&mut manifest).map_err(image_error)?;
    } else {
        // The processes die only once their image is durable.
        writer.finish(&mut manifest).map_err(image_error)?;
        frozen_for = frozen_at.elapsed();
        let our_ipc_namespace = crate::sys::ipc::same_namespace(pid).unwrap_or(false);
        tree.kill()?;
        frozen.kill(&pidfd)?;
        // Its connections end here without a word to their peers, for the
        // restored process to take them over.
        connections.close_silently();
        // The image holds the POSIX shared memory they mapped: the files go,
        // as on their clean exit, for the restore to make again.
        posix_shm::remove_saved(manifest.every_mapping());
        sysv_shm::remove_saved(our_ipc_namespace, manifest.every_mapping());
        sysv_ipc::remove_saved(&ipc);
    }
    let children = &manifest.children;
    Ok(CheckpointSummary {
        pid,
        processes: 1 + children.len(),
        threads: manifest.threads.len() + children.iter().map(|c| c.threads.len()).sum::<usize>(),
        mappings: manifest.mappings.len()
            + children.iter().map(|c| c.mappings.len()).sum::<usize>(),
        fds: manifest.fds.len()
            + children
                .iter()
                .map(|c| c.fds.len() + c.inherited_fds.len())
                .sum::<usize>(),
        pages: stats.pages,
        pages_written: stats.pages - stats.pages_reused,
        pages_reused: stats.pages_reused,
        base_stores: manifest.base_stores.len(),
        page_store_bytes: manifest.page_store_bytes,
        frozen_for,
        memory_time: stats.time,
        left_running: options.leave_running,
    })
}

/// A pidfd of `pid`, which must still exist.
fn open_pidfd(pid: i32) -> Result<PidFd, CheckpointError> {
    PidFd::open(pid).map_err(|source| match source.raw_os_error() {
        Some(libc::ESRCH) => CheckpointError::NoSuchProcess { pid },
        _ => CheckpointError::PidFd { pid, source },
    })
}

/// The files the agent opened for the process: those of `options`, and
/// those of the base image, which the process was restored with (none of a
/// sibling's: they are another process's).
fn agent_files(options: &CheckpointOptions, base: Option<&BasePages>) -> Vec<String> {
    let mut files: Vec<String> = options
        .agent_files
        .iter()
        .map(|path| path.display().to_string())
        .collect();
    if let Some(base) = base.filter(|_| !options.base_is_sibling) {
        for file in &base.image().manifest().agent_files {
            if !files.contains(file) {
                files.push(file.clone());
            }
        }
    }
    files
}

/// The image to write a delta of: `options.base`, opened and checked,
/// unless its chain is long enough that a full image is due.
fn open_base(options: &CheckpointOptions) -> Result<Option<Image>, CheckpointError> {
    let Some(path) = &options.base else {
        return Ok(None);
    };
    let image = Image::open(path).map_err(|source| CheckpointError::Base {
        pid: options.pid,
        base: path.clone(),
        source,
    })?;
    Ok((image.manifest().base_stores.len() < MAX_BASE_STORES).then_some(image))
}

/// Totals of [`save`].
#[derive(Debug, Default)]
struct SaveStats {
    pages: u64,
    pages_reused: u64,
    time: Duration,
}

impl SaveStats {
    fn add(&mut self, other: &SaveStats) {
        self.pages += other.pages;
        self.pages_reused += other.pages_reused;
        self.time += other.time;
    }
}

/// A frozen process to save.
struct Target<'a> {
    pid: i32,
    frozen: &'a Frozen,
    pidfd: &'a PidFd,
    /// Undoes what is injected into it.
    journal: &'a Journal,
    /// Descriptors persist put in it, left out of the image.
    exclude: &'a [i32],
    /// Ports a client connection to refuses the checkpoint
    /// ([`CheckpointOptions::client_ports`]).
    client_ports: &'a [u16],
}

/// Everything [`save_one`] saved of one process.
struct SavedProcess {
    process: ProcessInfo,
    threads: Vec<ThreadInfo>,
    mappings: Vec<Mapping>,
    fds: Vec<FdInfo>,
    stats: SaveStats,
    /// Its established TCP connections, in repair mode.
    connections: RepairedConnections,
}

/// Saves everything of the frozen root and of its frozen `tree` into a new
/// image writer (a delta of `base`, if given). Their established TCP
/// connections are handed back in repair mode.
fn save(
    root: &Target<'_>,
    tree: &Tree,
    options: &CheckpointOptions,
    base: Option<&BasePages>,
) -> Result<(Manifest, ImageWriter, SaveStats, RepairedConnections), CheckpointError> {
    let pid = root.pid;
    let mut writer = match base {
        Some(base) => ImageWriter::create_delta(&options.image, base.image()),
        None => ImageWriter::create(&options.image),
    }
    .map_err(|source| CheckpointError::Image { pid, source })?;
    let scope = tree.scope_of_root(pid, root.exclude)?;
    let mut shared_memory = SharedMemory::default();
    let known = base.map(|base| base as &dyn KnownPages);
    let saved = save_one(root, &scope, &mut writer, known, &mut shared_memory)?;
    let mut stats = saved.stats;
    let mut connections = saved.connections;
    let descendants = tree.save(
        root,
        &saved.mappings,
        &saved.threads,
        &mut writer,
        base,
        &mut shared_memory,
    )?;
    stats.add(&descendants.stats);
    connections.extend(descendants.connections);
    let children = descendants.children;
    let zombies = descendants.zombies;
    let manifest = Manifest {
        kernel: host::kernel_info(),
        cpu: host::cpu_info(),
        created_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        process: saved.process,
        threads: saved.threads,
        mappings: saved.mappings,
        fds: saved.fds,
        // Both filled in by the writer when it finishes.
        page_store_bytes: 0,
        base_stores: Vec::new(),
        agent_files: agent_files(options, base),
        children,
        zombies,
        // Filled in by `checkpoint`, once every process is saved.
        sysv_ipc: SysvIpc::default(),
    };
    Ok((manifest, writer, stats, connections))
}

/// Saves one frozen process of a tree: its memory into `writer` (but not
/// the pages of a shared memory object another process of the tree stored,
/// see [`SharedMemory`], nor those `known` holds already), its threads, its
/// process-wide state and its descriptors (as `scope` tells them apart from
/// the rest of the tree's).
fn save_one(
    target: &Target<'_>,
    scope: &TreeScope,
    writer: &mut ImageWriter,
    known: Option<&dyn KnownPages>,
    shared_memory: &mut SharedMemory,
) -> Result<SavedProcess, CheckpointError> {
    let pid = target.pid;
    let mem = ProcMem::open(pid).map_err(|source| CheckpointError::Proc {
        pid,
        path: format!("/proc/{pid}/mem"),
        source,
    })?;
    let mut mappings = memory::read_mappings(pid)?;
    if mappings.is_empty() {
        return Err(CheckpointError::KernelThread { pid });
    }

    let memory_start = Instant::now();
    let dumped = shared_memory.dump(pid, &mut mappings, writer, &mem, known)?;
    let memory_time = memory_start.elapsed();

    let syscall_at = inject::find_syscall_insn(&mem, &mappings, pid)?;
    let xsave_len = cpu::xsave_max_size().max(cpu::xsave_size()) as usize;
    let tids = target.frozen.tids();
    let seccomp = seccomp::save(pid, tids)?;
    let threads = tids
        .iter()
        .zip(seccomp.chains)
        .map(|(&tid, chain)| {
            threads::save_thread(pid, tid, &mem, syscall_at, xsave_len, chain, target.journal)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut process =
        process::save_process(pid, &mem, syscall_at, target.frozen.tids(), target.journal)?;
    process.seccomp_filters = seccomp.filters;
    let SavedFds { fds, connections } =
        crate::files::save_fds_in_tree(pid, target.pidfd, target.exclude, scope)
            .map_err(|source| CheckpointError::Files { pid, source })?;
    refuse_clients(pid, &fds, target.client_ports)?;
    process.file_locks = crate::files::save_locks(pid, &fds)
        .map_err(|source| CheckpointError::Files { pid, source })?;
    Ok(SavedProcess {
        process,
        threads,
        mappings,
        fds,
        stats: SaveStats {
            pages: dumped.pages,
            pages_reused: dumped.pages_reused,
            time: memory_time,
        },
        connections,
    })
}

/// The userfaultfds open in `pid`, for [`CheckpointOptions::exclude_fds`].
///
/// The restore engine leaves one in every process it rebuilds (so that a
/// dead pager blocks faults instead of zero-filling them); it is not the
/// service's state. Only idle ones are ever left out this way: memory still
/// registered with any userfaultfd is refused as
/// [`CheckpointError::UserfaultfdPending`] before descriptors are saved.
pub fn restorer_userfaultfds(pid: i32) -> Vec<i32> {
    let Ok(fds) = procfs::process::Process::new(pid).and_then(|process| process.fd()) else {
        return Vec::new();
    };
    fds.flatten()
        .filter(|fd| {
            matches!(&fd.target, procfs::process::FDTarget::AnonInode(name) if name == "[userfaultfd]")
        })
        .map(|fd| fd.fd)
        .collect()
}

/// Refuses a connection of a client to one of `ports` among `fds`.
fn refuse_clients(
    pid: i32,
    fds: &[persist_common::image::FdInfo],
    ports: &[u16],
) -> Result<(), CheckpointError> {
    for info in fds {
        let persist_common::image::FdKind::TcpConnection(connection) = &info.kind else {
            continue;
        };
        let port = connection
            .local
            .parse::<std::net::SocketAddr>()
            .map(|local| local.port())
            .ok()
            .filter(|port| ports.contains(port));
        if let Some(port) = port {
            return Err(CheckpointError::ClientConnected {
                pid,
                fd: info.fd,
                local: connection.local.clone(),
                peer: connection.peer.clone(),
                port,
            });
        }
    }
    Ok(())
}

/// What [`preflight`] found out about the process.
struct Preflight {
    /// A thread runs under seccomp filters.
    under_seccomp: bool,
    /// The process was stopped (state `T`) before we came.
    stopped_before: bool,
}

/// Refuses, before touching the process, what cannot be checkpointed.
/// Says whether a thread runs under seccomp filters (the freeze then
/// suspends them, so that the calls injected to read the process's state
/// are not filtered) and whether the process is stopped (state `T`) already.
fn preflight(pid: i32) -> Result<Preflight, CheckpointError> {
    if pid <= 0 {
        return Err(CheckpointError::NoSuchProcess { pid });
    }
    if pid as u32 == std::process::id() {
        return Err(CheckpointError::IsSelf { pid });
    }
    let status = status::read(pid, None)?;
    let tgid = status.tgid;
    if tgid != pid {
        if tgid as u32 == std::process::id() {
            return Err(CheckpointError::IsSelf { pid });
        }
        return Err(CheckpointError::NotAProcess { pid, tgid });
    }
    let stat = procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .map_err(|source| CheckpointError::ProcFs {
            pid,
            what: "stat",
            source,
        })?;
    if stat.flags & PF_KTHREAD != 0 {
        return Err(CheckpointError::KernelThread { pid });
    }
    if matches!(stat.state, 'Z' | 'X') {
        return Err(CheckpointError::Exited { pid });
    }
    let tracer = status.tracerpid;
    if tracer != 0 {
        return Err(CheckpointError::Traced { pid, tracer });
    }
    let mut under_seccomp = false;
    for tid in freeze::list_threads(pid)? {
        let mode = match status::read(pid, Some(tid)) {
            Ok(status) => status.seccomp.unwrap_or(0),
            // The thread exited since the listing.
            Err(_) if !std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists() => 0,
            Err(err) => return Err(err),
        };
        if mode == seccomp::MODE_STRICT {
            return Err(CheckpointError::SeccompStrict { pid, tid });
        }
        under_seccomp |= mode != 0;
    }
    Ok(Preflight {
        under_seccomp,
        stopped_before: stat.state == 'T',
    })
}

/// Children of every thread of `pid` (`/proc/PID/task/TID/children`).
fn children(pid: i32) -> Result<Vec<i32>, CheckpointError> {
    let mut children = Vec::new();
    for tid in freeze::list_threads(pid)? {
        let path = format!("/proc/{pid}/task/{tid}/children");
        match std::fs::read_to_string(&path) {
            Ok(text) => children.extend(
                text.split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok()),
            ),
            // The thread exited meanwhile.
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(CheckpointError::Proc { pid, path, source }),
        }
    }
    Ok(children)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pid: i32) -> CheckpointOptions {
        CheckpointOptions {
            pid,
            image: PathBuf::from("/nonexistent/image"),
            leave_running: true,
            exclude_fds: Vec::new(),
            base: None,
            base_is_sibling: false,
            agent_files: Vec::new(),
            recovery_file: None,
            tree: false,
            client_ports: Vec::new(),
        }
    }

    #[test]
    fn refuses_itself() {
        let err = checkpoint(&options(std::process::id() as i32)).unwrap_err();
        assert!(matches!(err, CheckpointError::IsSelf { .. }), "{err}");
    }

    #[test]
    fn refuses_its_own_threads() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            tx.send(nix::unistd::gettid().as_raw()).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let err = checkpoint(&options(tid)).unwrap_err();
        done_tx.send(()).unwrap();
        thread.join().unwrap();
        assert!(matches!(err, CheckpointError::IsSelf { .. }), "{err}");
    }

    #[test]
    fn killing_our_own_child_leaves_its_exit_status_to_us() {
        crate::test_support::require_root!();
        use std::os::unix::process::ExitStatusExt;
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        // Checkpointed before its exec, it would be a copy of this test binary.
        let exe = format!("/proc/{}/exe", child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_link(&exe).is_ok_and(|path| !path.ends_with("sleep")) {
            assert!(std::time::Instant::now() < deadline, "sleep never ran");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let summary = checkpoint(&CheckpointOptions {
            image: dir.path().join("image"),
            leave_running: false,
            ..options(child.id() as i32)
        });
        if summary.is_err() {
            let _ = child.kill();
        }
        let summary = summary.unwrap();
        assert!(!summary.left_running);
        let status = child.wait().expect("the child is still ours to reap");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn a_tree_is_not_checkpointed_with_a_recovery_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = checkpoint(&CheckpointOptions {
            tree: true,
            recovery_file: Some(dir.path().join("recovery")),
            ..options(1)
        })
        .unwrap_err();
        assert!(
            matches!(err, CheckpointError::TreeRecovery { pid: 1 }),
            "{err}"
        );
        assert!(
            !dir.path().join("recovery").exists(),
            "the refusal wrote a recovery file"
        );
    }

    #[test]
    fn refuses_nonpositive_pids() {
        for pid in [0, -1] {
            let err = checkpoint(&options(pid)).unwrap_err();
            assert_eq!(err.to_string(), format!("pid {pid}: no such process"));
        }
    }
}
