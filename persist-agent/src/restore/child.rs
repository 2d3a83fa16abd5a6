//! The forked child's side of a restore: everything it does before it
//! jumps into the restorer region, with raw system calls only.
//!
//! The plan is built by the agent before the fork; the child only reads it.
//! Any failure is reported on the status pipe as `(step, errno)` and the
//! child exits.

use std::os::fd::RawFd;

use crate::files::ChildFds;
use crate::sys::spawner::SharedArena;
use crate::sys::{blob, clone, uffd};

/// Steps reported on the status pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Step {
    /// Creating the userfaultfd.
    Userfaultfd = 1,
    /// Moving it to its number.
    UffdNumber = 2,
    /// Installing the process's descriptors.
    Fds = 3,
    /// Waiting for the agent's go.
    Go = 4,
    /// Unregistering the agent's rseq area.
    Rseq = 5,
    /// Mapping the restorer region.
    Region = 6,
    /// (init of a pid namespace) creating the restored process.
    Clone = 7,
    /// (init of a pid namespace) mounting its own /proc.
    Proc = 8,
    /// (a process of a tree) setting its session or process group.
    Session = 9,
    /// (a process of a tree) forking a child with its recorded pid.
    ForkChild = 10,
    /// Joining the IPC namespace holding its System V shared memory.
    IpcNamespace = 11,
    /// (a process of a tree) staging the memory its children share.
    Staging = 12,
    /// Taking a descriptor table of its own.
    OwnFds = 13,
}

impl Step {
    /// Decodes a reported step.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            1 => Self::Userfaultfd,
            2 => Self::UffdNumber,
            3 => Self::Fds,
            4 => Self::Go,
            5 => Self::Rseq,
            6 => Self::Region,
            7 => Self::Clone,
            8 => Self::Proc,
            9 => Self::Session,
            10 => Self::ForkChild,
            11 => Self::IpcNamespace,
            12 => Self::Staging,
            13 => Self::OwnFds,
            _ => return None,
        })
    }

    /// What the step does, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Userfaultfd => "creating the userfaultfd",
            Self::UffdNumber => "placing the userfaultfd",
            Self::Fds => "installing file descriptors",
            Self::Go => "waiting for the agent",
            Self::Rseq => "unregistering the inherited rseq area",
            Self::Region => "mapping the restorer region",
            Self::Clone => "creating the process in its pid namespace",
            Self::Proc => "mounting /proc for the pid namespace",
            Self::Session => "setting its session or process group",
            Self::ForkChild => "forking a child process with its recorded pid",
            Self::IpcNamespace => "joining the IPC namespace of its System V shared memory",
            Self::Staging => "staging the private memory its children share",
            Self::OwnFds => "taking a descriptor table of its own",
        }
    }
}

/// Length of the go message: magic, rseq address, rseq length and signature.
pub const GO_LEN: usize = 24;
/// First word of a go message.
pub const GO_MAGIC: u64 = 0x676f_2070_6572_7369;

/// Everything the child needs, prepared before the fork.
#[derive(Clone, Copy)]
pub struct ChildPlan<'a> {
    /// The process's descriptors.
    pub fds: ChildFds<'a>,
    /// Descriptors of ours the child keeps (sorted).
    pub keep: &'a [RawFd],
    /// The number the userfaultfd takes.
    pub uffd_fd: RawFd,
    /// Read end of the go pipe.
    pub go_fd: RawFd,
    /// Write end of the status pipe.
    pub status_fd: RawFd,
    /// Restorer region address and size.
    pub region_base: u64,
    /// Size of the region.
    pub region_size: usize,
    /// The region's initial bytes (routine, layout table).
    pub region_bytes: &'a [u8],
    /// Address of the layout table's first entry.
    pub table_addr: u64,
    /// Number of entries.
    pub table_count: u64,
    /// The IPC namespace to join first (`/proc/.../ns/ipc` open at this
    /// number), holding the System V segments it attaches.
    pub ipc_namespace: Option<RawFd>,
    /// (a process of a tree) The mappings it stages before forking its
    /// children (`inherited_memory.rs`).
    pub staged: &'a [StagedMap],
    /// Forked sharing the agent's descriptor table (by the spawner): its
    /// first step is a table of its own with the descriptors below this
    /// number only, every one it uses among them (`spawner.rs`).
    pub own_fds_below: Option<RawFd>,
}

impl ChildPlan<'_> {
    /// The same plan, everything it points to copied into `arena`, for a
    /// process the spawner forks (`spawner.rs`). `None` if it does not fit.
    pub fn copy_into(&self, arena: &mut SharedArena) -> Option<ChildPlan<'static>> {
        Some(ChildPlan {
            fds: self.fds.copy_into(arena)?,
            keep: arena.copy_slice(self.keep)?,
            region_bytes: arena.copy_slice(self.region_bytes)?,
            staged: arena.copy_slice(self.staged)?,
            ..*self
        })
    }
}

/// A mapping a process of a tree stages for its children: mapped readable
/// and writable at `slot` before the forks, filled by the agent while the
/// process stops itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagedMap {
    /// Where.
    pub slot: u64,
    /// Its length.
    pub len: u64,
    /// The file mapped (open at this number), or none for anonymous memory.
    pub fd: Option<RawFd>,
    /// The offset in the file.
    pub offset: u64,
}

/// Joins the plan's IPC namespace, if any: before the process forks its
/// own children (who inherit it) and before its descriptors are installed
/// over the number.
fn join_ipc_namespace(plan: &ChildPlan<'_>) {
    if let Some(fd) = plan.ipc_namespace
        && let Err(err) = crate::sys::ipc::join_raw(fd)
    {
        fail(plan.status_fd, Step::IpcNamespace, errno_of(&err));
    }
}

fn fail(status_fd: RawFd, step: Step, errno: i32) -> ! {
    let mut message = [0u8; 8];
    message[..4].copy_from_slice(&(step as u32).to_ne_bytes());
    message[4..].copy_from_slice(&errno.to_ne_bytes());
    clone::write_all_raw(status_fd, &message);
    clone::exit_now(100 + step as i32)
}

fn errno_of(err: &std::io::Error) -> i32 {
    err.raw_os_error().unwrap_or(libc::EIO)
}

/// Runs in the forked child: never returns.
pub fn child_main(plan: &ChildPlan<'_>) -> ! {
    clone::block_all_signals();
    // Before anything else: until then it shares the agent's table.
    if let Some(below) = plan.own_fds_below
        && let Err(err) = clone::own_fds_below(below)
    {
        fail(plan.status_fd, Step::OwnFds, errno_of(&err));
    }
    join_ipc_namespace(plan);
    // The descriptors first: the agent's number the userfaultfd takes may
    // hold, in this copy of the agent's table, the source of one of them
    // (nothing of the agent is kept at that number), which the move
    // would replace with the userfaultfd: the process would get its own
    // userfaultfd in that descriptor's place, its flags set to the
    // descriptor's, clearing the O_NONBLOCK the pager relies on.
    if let Err(errno) = plan.fds.install_in_child(plan.keep) {
        fail(plan.status_fd, Step::Fds, errno as i32);
    }
    let raw_uffd = match uffd::create_raw() {
        Ok(fd) => fd,
        Err(err) => fail(plan.status_fd, Step::Userfaultfd, errno_of(&err)),
    };
    if let Err(err) = clone::move_fd(raw_uffd, plan.uffd_fd) {
        fail(plan.status_fd, Step::UffdNumber, errno_of(&err));
    }
    let mut go = [0u8; GO_LEN];
    if let Err(err) = clone::read_exact_raw(plan.go_fd, &mut go) {
        fail(plan.status_fd, Step::Go, errno_of(&err));
    }
    let word = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&go[at..at + 8]);
        u64::from_ne_bytes(bytes)
    };
    if word(0) != GO_MAGIC {
        fail(plan.status_fd, Step::Go, libc::EPROTO);
    }
    let rseq_address = word(8);
    let rseq_length = word(16) as u32;
    let rseq_signature = (word(16) >> 32) as u32;
    if rseq_address != 0
        && let Err(err) = clone::rseq_unregister(rseq_address, rseq_length, rseq_signature)
    {
        fail(plan.status_fd, Step::Rseq, errno_of(&err));
    }
    if let Err(err) = blob::map_region(plan.region_base, plan.region_size, plan.region_bytes) {
        fail(plan.status_fd, Step::Region, errno_of(&err));
    }
    // SAFETY: the region holds the routine and the layout table; we are
    // traced by the agent (it sent the go message after seizing us), which
    // handles the routine's int3.
    unsafe { blob::jump(plan.region_base, plan.table_addr, plan.table_count) }
}

/// How a process of a tree gets its recorded session and process group,
/// before it forks its own children (who inherit both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionStep {
    /// Its parent's, inherited through the fork.
    Inherit,
    /// A session (and process group) of its own: `setsid`.
    NewSession,
    /// A process group of its own in its parent's session.
    OwnGroup,
    /// The group of this pid (an earlier process of the tree leads it).
    JoinGroup(i32),
}

/// What a process of a tree becomes once its session is set.
#[derive(Clone, Copy)]
pub enum NodeRole<'a> {
    /// A process of the image: forks its children, then goes on as
    /// [`child_main`].
    Process(ChildPlan<'a>),
    /// A zombie of the image: waits for the agent's byte, then exits with
    /// its recorded status and stays a zombie until its parent reaps it.
    Zombie(ZombiePlan),
}

/// What a zombie of a tree needs, prepared before the fork.
#[derive(Clone, Copy)]
pub struct ZombiePlan {
    /// The wait status it ends with.
    pub wait_status: i32,
    /// Read end of the pipe on which the agent sends one byte per zombie
    /// once the tree is built.
    pub go_fd: RawFd,
    /// Write end of its status pipe.
    pub status_fd: RawFd,
}

impl NodeRole<'_> {
    fn status_fd(&self) -> RawFd {
        match self {
            Self::Process(plan) => plan.status_fd,
            Self::Zombie(plan) => plan.status_fd,
        }
    }
}

/// One process of a tree, for [`tree_main`].
#[derive(Clone, Copy)]
pub struct TreeNode<'a> {
    /// What it does once its session is set.
    pub role: NodeRole<'a>,
    /// Its recorded pid.
    pub pid: i32,
    /// Index of its parent among the nodes (`None` for the root).
    pub parent: Option<usize>,
    /// Its session and process group.
    pub session: SessionStep,
}

/// Runs in a forked process of a tree (node `index`): sets its session and
/// group, forks its children with their recorded pids (each running this
/// in turn), then goes on as [`child_main`]. The root first waits for a
/// byte on `fork_go`, sent once the agent traces it (and through it, every
/// process it forks). Never returns.
pub fn tree_main(nodes: &[TreeNode<'_>], index: usize, fork_go: Option<RawFd>) -> ! {
    clone::block_all_signals();
    let node = &nodes[index];
    let status = node.role.status_fd();
    if let Some(fd) = fork_go
        && let Err(err) = clone::read_byte(fd)
    {
        fail(status, Step::Go, errno_of(&err));
    }
    if let NodeRole::Process(plan) = &node.role {
        join_ipc_namespace(plan);
    }
    let session = match node.session {
        SessionStep::Inherit => Ok(()),
        SessionStep::NewSession => nix::unistd::setsid().map(drop),
        SessionStep::OwnGroup => {
            nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))
        }
        SessionStep::JoinGroup(pgid) => nix::unistd::setpgid(
            nix::unistd::Pid::from_raw(0),
            nix::unistd::Pid::from_raw(pgid),
        ),
    };
    if let Err(errno) = session {
        fail(status, Step::Session, errno as i32);
    }
    let plan = match &node.role {
        NodeRole::Process(plan) => plan,
        NodeRole::Zombie(plan) => zombie_main(plan),
    };
    if !plan.staged.is_empty() {
        for map in plan.staged {
            if let Err(err) = clone::map_private_at(map.slot, map.len, map.fd, map.offset) {
                fail(status, Step::Staging, errno_of(&err));
            }
        }
        // The agent fills the slots while we are stopped.
        if let Err(err) = clone::stop_self() {
            fail(status, Step::Staging, errno_of(&err));
        }
    }
    for (child, _) in nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.parent == Some(index))
    {
        match clone::fork_with(0, Some(nodes[child].pid)) {
            Ok(clone::Forked::Child) => tree_main(nodes, child, None),
            Ok(clone::Forked::Parent(_)) => {}
            Err(err) => fail(status, Step::ForkChild, errno_of(&err)),
        }
    }
    child_main(plan)
}

/// Runs in a zombie of a tree, its session set: holds nothing of the
/// agent's but its two pipes, waits for the agent's byte (sent once every
/// process of the tree has its signal handlers, so that its parent's
/// SIGCHLD finds them), then exits with its recorded status. Never returns.
fn zombie_main(plan: &ZombiePlan) -> ! {
    let mut keep = [plan.go_fd, plan.status_fd];
    keep.sort_unstable();
    clone::close_all_except(&keep);
    if clone::read_byte(plan.go_fd).is_err() {
        // The agent gave up on the tree (and kills it): no status to keep.
        clone::exit_now(0);
    }
    clone::exit_with_status(plan.wait_status)
}

/// Runs as init of a fresh pid and mount namespace: waits for the go byte,
/// mounts a /proc of the new pid namespace (the process reads
/// /proc/self/task/TID with its own tids), creates the restored process
/// with its recorded pid, closes everything and reaps until no child is
/// left. Never returns.
pub fn init_main(plan: &ChildPlan<'_>, init_go_fd: RawFd, pid: i32, start: &dyn Fn()) -> ! {
    clone::block_all_signals();
    if let Err(err) = clone::read_byte(init_go_fd) {
        fail(plan.status_fd, Step::Go, errno_of(&err));
    }
    if let Err(err) = clone::mount_own_proc() {
        fail(plan.status_fd, Step::Proc, errno_of(&err));
    }
    match clone::fork_with(0, Some(pid)) {
        // `start` never returns; exiting is only for the type.
        Ok(clone::Forked::Child) => {
            start();
            clone::exit_now(127)
        }
        Ok(clone::Forked::Parent(_)) => {
            clone::close_all_except(&[]);
            clone::reap_until_no_children();
            clone::exit_now(0)
        }
        Err(err) => fail(plan.status_fd, Step::Clone, errno_of(&err)),
    }
}
