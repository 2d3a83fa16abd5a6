//! The manifest: everything about a checkpointed process except its page contents.
//!
//! Field names are the JSON keys. Addresses, sizes and masks are JSON numbers
//! (u64); byte strings that are not text (register areas, pipe data) are
//! base64 strings. New optional fields may be added within a format version
//! with `#[serde(default)]` when an older reader may safely ignore them;
//! anything else (a field that restricts the process, a changed meaning)
//! bumps [`super::FORMAT_VERSION`].

use serde::{Deserialize, Serialize};

use super::sockets::{TcpSocket, UnixSocket};

/// Everything needed to rebuild a process, except its page contents.
///
/// `Manifest::default()` is an empty manifest (no process state, threads,
/// mappings or descriptors), the starting point for images built in tests.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Manifest {
    /// The kernel the image was taken on.
    pub kernel: KernelInfo,
    /// The CPU state the image's threads use.
    pub cpu: CpuInfo,
    /// Wall-clock time of the checkpoint, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Process-wide state.
    pub process: ProcessInfo,
    /// Every thread, the thread-group leader first.
    pub threads: Vec<ThreadInfo>,
    /// Every memory mapping, in address order.
    pub mappings: Vec<Mapping>,
    /// Every open file descriptor, in fd order.
    pub fds: Vec<FdInfo>,
    /// Total size of the page store in bytes: the base stores and the
    /// image's own `pages` file together.
    pub page_store_bytes: u64,
    /// Page stores of earlier images that this image's runs also read from,
    /// in the order they come in the page store, before its own `pages`.
    /// Empty for a full image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub base_stores: Vec<BaseStore>,
    /// Paths of files the agent opened for the process (the log it gave a
    /// service it built as its stdout and stderr). Restore reopens these
    /// with the agent's credentials, not the process's: the process never
    /// had them by path. Written only by root's agent, in a root-only image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agent_files: Vec<String>,
    /// The other processes of a checkpointed tree, parents before their
    /// children (see [`super::ChildProcess`]); empty for a single process,
    /// whose images do not have the field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<super::ChildProcess>,
    /// Children of processes of the tree that exited and were not reaped
    /// (see [`super::Zombie`]), in tree order of their parents; absent when
    /// there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zombies: Vec<super::Zombie>,
    /// The System V semaphore sets and message queues of the processes'
    /// IPC namespace that are theirs (see [`super::SysvIpc`]); absent when
    /// there are none. An older reader ignores it and restores without
    /// them.
    #[serde(default, skip_serializing_if = "super::SysvIpc::is_empty")]
    pub sysv_ipc: super::SysvIpc,
}

impl Manifest {
    /// Every mapping of every process: the root's, then each child's in
    /// tree order.
    pub fn every_mapping(&self) -> impl Iterator<Item = &Mapping> {
        self.mappings
            .iter()
            .chain(self.children.iter().flat_map(|child| &child.mappings))
    }

    /// Whether the image holds a tree: processes under the root, or
    /// zombies of the root (which a restore makes as processes too).
    pub fn is_tree(&self) -> bool {
        !self.children.is_empty() || !self.zombies.is_empty()
    }
}

/// A page store of an earlier image, hard-linked into this image's directory
/// so that runs can refer to its pages without storing them again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BaseStore {
    /// File name inside the image directory: `pages.base.N`, `N` being its
    /// index in [`Manifest::base_stores`].
    pub file: String,
    /// Size of the file in bytes, a multiple of [`super::PAGE_SIZE`].
    pub bytes: u64,
}

/// The kernel an image was taken on: images restore only on the same build.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct KernelInfo {
    /// `uname -r`.
    pub release: String,
    /// `uname -v` (build number and date).
    pub version: String,
    /// `uname -m`.
    pub machine: String,
}

/// CPU features the saved register state depends on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct CpuInfo {
    /// XCR0: the xsave state components enabled when the image was taken.
    pub xcr0: u64,
    /// Size in bytes of the xsave area (`NT_X86_XSTATE` regset).
    pub xsave_size: u32,
}

/// Process-wide state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ProcessInfo {
    /// Pid of the process (in its own pid namespace when restored).
    pub pid: i32,
    /// Process group id.
    pub pgid: i32,
    /// Session id.
    pub sid: i32,
    /// `comm` name.
    pub comm: String,
    /// Target of `/proc/PID/exe`.
    pub exe: String,
    /// Arguments as the kernel shows them (`/proc/PID/cmdline`).
    pub argv: Vec<String>,
    /// Environment as the kernel shows it (`/proc/PID/environ`).
    pub environ: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// Root directory.
    pub root: String,
    /// File mode creation mask.
    pub umask: u32,
    /// `personality(2)` flags.
    pub personality: u32,
    /// Resource limits.
    pub rlimits: Vec<Rlimit>,
    /// User and group ids, groups, capabilities and related bits.
    pub credentials: Credentials,
    /// Signal dispositions other than the default.
    pub sigactions: Vec<SigAction>,
    /// Signals pending for the whole process (bit `n - 1` for signal `n`).
    pub shared_pending: u64,
    /// The process-wide signal queue, one record per queued signal in
    /// queue order (`PTRACE_PEEKSIGINFO_SHARED`): restore queues them again
    /// with their siginfo. A bit of [`ProcessInfo::shared_pending`] no record
    /// is for (every bit, in images written before records were saved) is
    /// raised again by number, its siginfo that of a `kill`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_queue: Vec<QueuedSignal>,
    /// Interval timers (`ITIMER_REAL`, `ITIMER_VIRTUAL`, `ITIMER_PROF`).
    pub itimers: Vec<ITimer>,
    /// POSIX timers (`timer_create`), newest first as `/proc/PID/timers`
    /// lists them. Missing from images written before they were saved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub posix_timers: Vec<super::PosixTimer>,
    /// File locks (flock, POSIX and OFD) the process holds, by descriptor.
    /// Missing from images written before they were saved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub file_locks: Vec<super::FileLock>,
    /// The kernel's memory-layout fields (`PR_SET_MM_MAP`).
    pub mm: MmFields,
    /// Every distinct seccomp filter of the process's threads, each stored
    /// once however many threads run under it; threads name theirs by index
    /// in [`ThreadInfo::seccomp`]. Two filters are the same when their
    /// programs and flags are (the kernel says no more of a filter's
    /// identity). Empty when no thread runs under seccomp; missing from
    /// images written before filters were saved (format 1 throughout).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seccomp_filters: Vec<SeccompFilter>,
    /// The signal the main thread gets when its parent dies
    /// (`PR_SET_PDEATHSIG`), 0 for none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pdeath_signal: u32,
    /// The process is a child subreaper (`PR_SET_CHILD_SUBREAPER`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub child_subreaper: bool,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// A seccomp filter (`SECCOMP_SET_MODE_FILTER`), as
/// `PTRACE_SECCOMP_GET_FILTER` and `PTRACE_SECCOMP_GET_METADATA` read it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SeccompFilter {
    /// The classic BPF program: `struct sock_filter` instructions, 8 bytes
    /// each (`code` u16, `jt` u8, `jf` u8, `k` u32, little-endian), 1 to
    /// 4096 of them.
    #[serde(with = "base64_bytes")]
    pub program: Vec<u8>,
    /// `SECCOMP_FILTER_FLAG_*` flags to install it with: only
    /// `SECCOMP_FILTER_FLAG_LOG` (2) is recorded, the one flag the kernel
    /// keeps with a filter and reports.
    #[serde(default)]
    pub flags: u64,
}

/// Size of one instruction of [`SeccompFilter::program`].
pub const SECCOMP_INSN_LEN: usize = 8;

/// Most instructions the kernel accepts in one filter (`BPF_MAXINSNS`).
pub const SECCOMP_MAX_INSNS: usize = 4096;

/// One resource limit.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rlimit {
    /// `RLIMIT_*` number.
    pub resource: u32,
    /// Soft limit (`u64::MAX` for unlimited).
    pub soft: u64,
    /// Hard limit (`u64::MAX` for unlimited).
    pub hard: u64,
}

/// Identity and privileges of the process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Credentials {
    /// Real, effective, saved and filesystem uid.
    pub uids: [u32; 4],
    /// Real, effective, saved and filesystem gid.
    pub gids: [u32; 4],
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Inheritable capabilities.
    pub cap_inheritable: u64,
    /// Permitted capabilities.
    pub cap_permitted: u64,
    /// Effective capabilities.
    pub cap_effective: u64,
    /// Bounding set.
    pub cap_bounding: u64,
    /// Ambient capabilities.
    pub cap_ambient: u64,
    /// The no_new_privs bit.
    pub no_new_privs: bool,
    /// `PR_GET_SECUREBITS`.
    pub securebits: u32,
}

/// A signal disposition.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SigAction {
    /// Signal number.
    pub signal: u32,
    /// Handler address (`SIG_IGN` is 1).
    pub handler: u64,
    /// `SA_*` flags.
    pub flags: u64,
    /// `sa_restorer` address.
    pub restorer: u64,
    /// Signals blocked while the handler runs.
    pub mask: u64,
}

/// An interval timer.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ITimer {
    /// `ITIMER_*` number.
    pub which: u32,
    /// Interval in microseconds.
    pub interval_us: u64,
    /// Time to the next expiry in microseconds (0: disarmed).
    pub value_us: u64,
}

/// The fields of `struct prctl_mm_map`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct MmFields {
    /// Start of the text segment.
    pub start_code: u64,
    /// End of the text segment.
    pub end_code: u64,
    /// Start of the data segment.
    pub start_data: u64,
    /// End of the data segment.
    pub end_data: u64,
    /// Start of the heap.
    pub start_brk: u64,
    /// Current program break.
    pub brk: u64,
    /// Start of the main thread's stack.
    pub start_stack: u64,
    /// Start of the argument strings.
    pub arg_start: u64,
    /// End of the argument strings.
    pub arg_end: u64,
    /// Start of the environment strings.
    pub env_start: u64,
    /// End of the environment strings.
    pub env_end: u64,
    /// The auxiliary vector, as (type, value) words.
    pub auxv: Vec<u64>,
}

/// One thread.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ThreadInfo {
    /// Thread id (in the process's pid namespace when restored).
    pub tid: i32,
    /// `comm` name of the thread.
    pub comm: String,
    /// General registers, `struct user_regs_struct` in declaration order
    /// (r15 first, gs last: 27 words). fs_base and gs_base are among them.
    ///
    /// Saved ready to resume: a thread interrupted in a restartable system
    /// call has `rip` moved back onto its `syscall` instruction and `rax` set
    /// to the call's number (`__NR_restart_syscall` for
    /// `-ERESTART_RESTARTBLOCK`), and `orig_rax` is always -1, so setting
    /// these registers never triggers a kernel restart of its own.
    pub regs: Vec<u64>,
    /// The `NT_X86_XSTATE` register set: FPU, SSE, AVX and the rest.
    #[serde(with = "base64_bytes")]
    pub xsave: Vec<u8>,
    /// Blocked signals.
    pub sigmask: u64,
    /// Signals pending for this thread.
    pub pending: u64,
    /// The thread's own signal queue, as [`ProcessInfo::shared_queue`] is
    /// the process's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queue: Vec<QueuedSignal>,
    /// Alternate signal stack, as `sigaltstack(NULL, &old)` reports it:
    /// `SS_DISABLE` (2) in `flags` when there is none, `SS_ONSTACK` (1) when
    /// the thread was running on it.
    pub sigaltstack: SigAltStack,
    /// rseq registration, if any.
    pub rseq: Option<Rseq>,
    /// Address the kernel clears and wakes on thread exit (`set_tid_address`).
    pub clear_child_tid: u64,
    /// The robust futex list the thread registered (`set_robust_list`):
    /// the kernel walks it when the thread exits, marking the robust
    /// mutexes it held as their owner died. glibc registers one per thread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust_list: Option<RobustList>,
    /// The thread's seccomp filters, as indices in
    /// [`ProcessInfo::seccomp_filters`], the first installed first (as
    /// `PTRACE_SECCOMP_GET_FILTER` numbers them). The kernel runs them all
    /// on each system call and the most restrictive action wins; between
    /// equal actions (two `SECCOMP_RET_ERRNO`), the last installed's data. Empty: no filter (seccomp mode 0).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seccomp: Vec<u32>,
}

/// One queued signal: the kernel's raw 128-byte `siginfo_t` (x86-64
/// layout, little-endian), as `PTRACE_PEEKSIGINFO` copies it out and
/// `rt_sigqueueinfo` takes it back: `si_signo` (i32) at 0, `si_errno` at 4,
/// `si_code` at 8, then the union: for `SI_QUEUE` (-1) and `SI_USER` (0)
/// the sender's pid (i32, in the process's pid namespace) at 16, its uid at
/// 20 and, for `SI_QUEUE`, the `sigqueue` value at 24. Stored whole, so
/// that every kind of signal (timers, children, faults) keeps its fields.
/// A base64 string in JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct QueuedSignal(#[serde(with = "base64_bytes")] pub Vec<u8>);

impl QueuedSignal {
    /// Size of a record: the kernel's `sizeof(siginfo_t)`.
    pub const LEN: usize = 128;

    /// The signal number (`si_signo`); 0 for a record too short to hold one.
    pub fn signo(&self) -> i32 {
        self.word(0)
    }

    /// `si_code`: who sent it and how (negative: from user space).
    pub fn code(&self) -> i32 {
        self.word(8)
    }

    fn word(&self, offset: usize) -> i32 {
        self.0
            .get(offset..offset + 4)
            .map_or(0, |b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// A robust futex list registration.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct RobustList {
    /// Address of the list's head.
    pub head: u64,
    /// Size of the head as registered.
    pub len: u64,
}

/// An alternate signal stack (`stack_t`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SigAltStack {
    /// Base address.
    pub sp: u64,
    /// `SS_*` flags.
    pub flags: i32,
    /// Size in bytes.
    pub size: u64,
}

/// An rseq registration (`PTRACE_GET_RSEQ_CONFIGURATION`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rseq {
    /// Address of the `struct rseq`.
    pub address: u64,
    /// Its registered length.
    pub length: u32,
    /// Signature.
    pub signature: u32,
}

/// Page protection bits.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Protection {
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
}

/// What backs a mapping.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MappingKind {
    /// Private anonymous memory (also bss and thread stacks).
    Anonymous,
    /// The heap (`[heap]`, between `start_brk` and `brk`).
    Heap,
    /// The main thread's stack (`[stack]`).
    Stack,
    /// A file mapping, private or shared.
    File {
        /// Path of the file.
        path: String,
        /// Device of the file, as `major:minor` from /proc/PID/maps.
        device: String,
        /// Inode of the file.
        inode: u64,
        /// Offset of the mapping in the file.
        offset: u64,
    },
    /// Shared anonymous memory (`/dev/zero (deleted)`, `MAP_SHARED|MAP_ANONYMOUS`).
    SharedAnonymous {
        /// Identity of the shmem object, so that mappings of one object are
        /// restored as one.
        inode: u64,
    },
    /// A memfd or other shmem file (`/memfd:NAME (deleted)`).
    Memfd {
        /// Name given to `memfd_create`.
        name: String,
        /// Inode of the shmem file, shared by its mappings and fds.
        inode: u64,
        /// Offset of the mapping in the file.
        offset: u64,
    },
    /// A System V shared memory segment (`/SYSV<key> (deleted)`), attached
    /// whole at the mapping's start. Restored in an IPC namespace of the
    /// tree's own, with the same key, id, size, owner and mode.
    SysvShm {
        /// The segment's key (`IPC_PRIVATE`, 0, for none).
        key: i32,
        /// The segment's id, which the process keeps and passes to `shmat`.
        shmid: i32,
        /// Size in bytes, as given to `shmget`.
        size: u64,
        /// Owner (`shm_perm.uid`).
        uid: u32,
        /// Group (`shm_perm.gid`).
        gid: u32,
        /// Permission bits (`shm_perm.mode & 0o777`).
        mode: u32,
        /// Marked for removal (`IPC_RMID`, `SHM_DEST`): gone once the last
        /// process detaches; marked again once restored.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        removed: bool,
    },
    /// A POSIX shared memory object (a file under `/dev/shm`, `shm_open`)
    /// mapped shared. The image holds its contents: on restore the file is
    /// made again (it must not exist) with its size, owner and mode.
    PosixShm {
        /// Path of the file.
        path: String,
        /// Inode of the file at checkpoint: the mappings of one object.
        inode: u64,
        /// Offset of the mapping in the file.
        offset: u64,
        /// Size of the file in bytes.
        size: u64,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
        /// Permission bits.
        mode: u32,
    },
    /// The vDSO.
    Vdso,
    /// One of the vvar pages (`[vvar]`, `[vvar_vclock]`); `name` says which.
    Vvar {
        /// Name as /proc/PID/maps shows it.
        name: String,
    },
}

/// One memory mapping.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Protection.
    pub protection: Protection,
    /// `MAP_SHARED` rather than `MAP_PRIVATE`.
    pub shared: bool,
    /// What backs it.
    #[serde(flatten)]
    pub kind: MappingKind,
    /// Pages stored in the page store, in address order.
    pub pages: Vec<PageRun>,
}

impl Mapping {
    /// A private, readable and writable anonymous mapping of `pages` pages
    /// from `start`, whose stored pages are `runs`.
    pub fn anonymous(start: u64, pages: u64, runs: Vec<PageRun>) -> Self {
        Self {
            start,
            end: start + pages * super::PAGE_SIZE,
            protection: Protection {
                read: true,
                write: true,
                exec: false,
            },
            shared: false,
            kind: MappingKind::Anonymous,
            pages: runs,
        }
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True for a zero-length mapping (never valid in a manifest).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Number of pages stored for the mapping.
    pub fn stored_pages(&self) -> u64 {
        self.pages.iter().map(|run| run.count).sum()
    }
}

/// Consecutive pages of a mapping stored consecutively in the page store.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PageRun {
    /// Index of the first page within its mapping.
    pub first_page: u64,
    /// Number of pages, at most [`super::MAX_RUN_PAGES`].
    pub count: u64,
    /// Byte offset of the first page in the page store: in the whole
    /// store, base stores included (see [`Manifest::base_stores`]).
    pub store_offset: u64,
    /// CRC32C of the run's bytes.
    pub crc32c: u32,
}

/// One open file descriptor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FdInfo {
    /// Descriptor number.
    pub fd: i32,
    /// Close-on-exec.
    pub cloexec: bool,
    /// Open-file status flags (`O_*` from fdinfo `flags`, without `O_CLOEXEC`).
    pub flags: u32,
    /// The lowest descriptor that shares this one's open file description
    /// (made by `dup`), if any: it is restored as a duplicate of that one,
    /// sharing offset and flags, and `kind` repeats that one's kind without
    /// saved contents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_with: Option<i32>,
    /// What the descriptor refers to.
    #[serde(flatten)]
    pub kind: FdKind,
}

/// Which file a path named at checkpoint, so that restore can tell whether
/// the path still names it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileIdentity {
    /// Device of the file system holding the file (`st_dev`, as the
    /// kernel encodes it).
    pub device: u64,
    /// Inode number (`st_ino`).
    pub inode: u64,
    /// Type of the file.
    pub file_type: FileType,
}

/// The type of a file, from its `st_mode`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileType {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A FIFO (named pipe).
    Fifo,
    /// A UNIX socket.
    Socket,
    /// A symbolic link.
    Symlink,
}

impl FileType {
    /// The type named by the `S_IFMT` bits of `mode`, if any.
    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & 0o170_000 {
            0o100_000 => Self::Regular,
            0o040_000 => Self::Directory,
            0o020_000 => Self::CharDevice,
            0o060_000 => Self::BlockDevice,
            0o010_000 => Self::Fifo,
            0o140_000 => Self::Socket,
            0o120_000 => Self::Symlink,
            _ => return None,
        })
    }

    /// The name messages use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Regular => "regular file",
            Self::Directory => "directory",
            Self::CharDevice => "character device",
            Self::BlockDevice => "block device",
            Self::Fifo => "FIFO",
            Self::Socket => "socket",
            Self::Symlink => "symbolic link",
        }
    }
}

impl FileIdentity {
    /// How `now` differs from this identity, for an error message; `None`
    /// when it is the same file.
    pub fn difference(&self, now: &FileIdentity) -> Option<String> {
        if self.file_type != now.file_type {
            Some(format!(
                "it was a {}, it is now a {}",
                self.file_type.as_str(),
                now.file_type.as_str()
            ))
        } else if self.device != now.device {
            Some(format!(
                "its device was {:#x}, it is now {:#x}",
                self.device, now.device
            ))
        } else if self.inode != now.inode {
            Some(format!(
                "its inode was {}, it is now {}",
                self.inode, now.inode
            ))
        } else {
            None
        }
    }
}

/// What a file descriptor refers to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FdKind {
    /// A regular file or directory.
    File {
        /// Path; for an unlinked file, the path it had.
        path: String,
        /// File position.
        offset: u64,
        /// The file was unlinked while open; its contents are in `contents`.
        unlinked: bool,
        /// Contents of an unlinked file.
        #[serde(default, with = "base64_bytes")]
        contents: Vec<u8>,
        /// The file `path` named at checkpoint (not for an unlinked file);
        /// restore refuses another one. Absent in older images.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        identity: Option<FileIdentity>,
    },
    /// A character device such as /dev/null, /dev/zero, /dev/urandom.
    Device {
        /// Path of the device node.
        path: String,
        /// The device node `path` named at checkpoint; restore refuses
        /// another one. Absent in older images.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        identity: Option<FileIdentity>,
    },
    /// One end of a pipe or FIFO.
    Pipe {
        /// Inode of the pipe: fds with the same inode share one pipe.
        inode: u64,
        /// This is the write end.
        write_end: bool,
        /// Path of the FIFO, or `None` for an anonymous pipe.
        fifo_path: Option<String>,
        /// Unread data in the pipe (saved once, on the read end).
        #[serde(default, with = "base64_bytes")]
        data: Vec<u8>,
        /// Capacity of the pipe in bytes (`F_GETPIPE_SZ`; 0: unknown).
        #[serde(default)]
        capacity: u32,
        /// For a FIFO, the node `fifo_path` named at checkpoint; restore
        /// refuses another one. Absent in older images.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fifo_identity: Option<FileIdentity>,
    },
    /// An eventfd.
    Eventfd {
        /// Current counter.
        count: u64,
        /// Semaphore mode.
        semaphore: bool,
    },
    /// A timerfd.
    Timerfd {
        /// Clock id.
        clock: i32,
        /// `TFD_TIMER_*` settime flags.
        settime_flags: i32,
        /// Interval in nanoseconds.
        interval_ns: u64,
        /// Time to next expiry in nanoseconds (0: disarmed).
        value_ns: u64,
        /// Expirations not yet read.
        ticks: u64,
    },
    /// A signalfd.
    Signalfd {
        /// Signals it reads.
        mask: u64,
    },
    /// An epoll instance.
    Epoll {
        /// Watched descriptors.
        watches: Vec<EpollWatch>,
    },
    /// An inotify instance (its `O_NONBLOCK` is in the descriptor's flags).
    /// Events queued and not yet read are not kept.
    Inotify {
        /// Every watch, in watch-descriptor order.
        watches: Vec<super::InotifyWatch>,
    },
    /// A memfd (its contents are in the page store via a `Memfd` mapping,
    /// or in `contents` when it is not mapped).
    Memfd {
        /// Name given to `memfd_create`.
        name: String,
        /// Inode shared with its mappings.
        inode: u64,
        /// File position.
        offset: u64,
        /// Size of the file.
        size: u64,
        /// `F_SEAL_*` seals (`F_SEAL_SEAL` alone for a memfd made without
        /// `MFD_ALLOW_SEALING`).
        #[serde(default)]
        seals: u32,
        /// Contents when not mapped.
        #[serde(default, with = "base64_bytes")]
        contents: Vec<u8>,
    },
    /// A listening TCP socket.
    TcpListener {
        /// Local address and port, e.g. `127.0.0.1:8080` or `[::]:80`.
        local: String,
        /// Inode of the socket (to recognise the same socket when handed over).
        inode: u64,
        /// Listen backlog.
        backlog: u32,
        /// `SO_REUSEADDR`.
        reuseaddr: bool,
        /// `SO_REUSEPORT`.
        reuseport: bool,
        /// `IPV6_V6ONLY` for IPv6 sockets.
        v6only: bool,
        /// Other integer socket options that were not zero: the ones accepted
        /// connections inherit (`SO_KEEPALIVE`, `TCP_NODELAY`, keepalive
        /// timing) and the listener's own (`TCP_DEFER_ACCEPT`, `TCP_FASTOPEN`).
        #[serde(default)]
        options: Vec<SocketOption>,
        /// The socket's owner (the uid of whoever created it, or set by
        /// `fchown`): the kernel puts listeners with `SO_REUSEPORT` in one
        /// group only if they have the same owner. `None` in images written
        /// before it was kept: such a listener is restored owned by root.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner_uid: Option<u32>,
    },
    /// A UDP socket, bound and possibly connected. Datagrams queued on it
    /// are not saved (UDP may drop them anyway).
    UdpSocket {
        /// Local address and port (`0.0.0.0:0` when unbound).
        local: String,
        /// Connected peer, if any.
        #[serde(default)]
        peer: Option<String>,
        /// `SO_REUSEADDR`.
        reuseaddr: bool,
        /// `SO_REUSEPORT`.
        reuseport: bool,
        /// `IPV6_V6ONLY` for IPv6 sockets.
        v6only: bool,
        /// Other integer options that were set (`SO_BROADCAST`, locked
        /// buffer sizes, ...). Absent in older images.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        options: Vec<SocketOption>,
    },
    /// A TCP socket created or bound, neither listening nor connected.
    TcpSocket(TcpSocket),
    /// A UNIX socket neither listening nor paired inside the process.
    UnixSocket(UnixSocket),
    /// A listening UNIX socket.
    UnixListener {
        /// Bound path (a leading `@` for the abstract namespace).
        path: String,
        /// Socket type (`SOCK_STREAM` or `SOCK_SEQPACKET`).
        socket_type: i32,
        /// Listen backlog.
        backlog: u32,
        /// Permission bits of the socket file (who may connect), if bound
        /// to a path.
        #[serde(default)]
        mode: Option<u32>,
        /// Owner uid and gid of the socket file, if bound to a path.
        #[serde(default)]
        owner: Option<(u32, u32)>,
    },
    /// One end of a UNIX socket pair whose other end is also in the process.
    UnixPair {
        /// Inode of this end.
        inode: u64,
        /// Inode of the peer end.
        peer_inode: u64,
        /// Socket type.
        socket_type: i32,
        /// Data queued for reading on this end, one entry per message for
        /// datagram sockets.
        #[serde(default)]
        queued: Vec<QueuedMessage>,
        /// Directions shut down on this end (see [`UnixSocket::shutdown`]).
        /// Absent in older images.
        #[serde(default, skip_serializing_if = "super::sockets::is_zero")]
        shutdown: u8,
    },
    /// An established TCP connection, saved with `TCP_REPAIR`.
    TcpConnection(super::TcpConnection),
}

/// An integer socket option (`setsockopt(level, name, &value)`). The
/// timeouts `SO_RCVTIMEO` and `SO_SNDTIMEO` of `SOL_SOCKET` are kept as
/// milliseconds and set as a `timeval`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SocketOption {
    /// Protocol level (`SOL_SOCKET`, `IPPROTO_TCP`).
    pub level: i32,
    /// Option name (`SO_*`, `TCP_*`).
    pub name: i32,
    /// Value.
    pub value: i32,
}

/// One queued message of a socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueuedMessage {
    /// Its bytes.
    #[serde(with = "base64_bytes")]
    pub data: Vec<u8>,
}

/// A descriptor watched by an epoll instance.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct EpollWatch {
    /// Watched descriptor number.
    pub fd: i32,
    /// `EPOLL*` event mask.
    pub events: u32,
    /// User data.
    pub data: u64,
    /// A descriptor of the process open on the watched file, when `fd` no
    /// longer is: the process closed `fd` after adding the watch and keeps
    /// the file open through a `dup`. The kernel still keys the watch by
    /// the file and `fd`, so restore adds it through a copy of `file_fd`
    /// placed at number `fd` for the call. Absent when `fd` is the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_fd: Option<i32>,
}

pub(super) mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}
