//! System V semaphore sets and message queues of a checkpointed tree.
//!
//! Nothing in /proc ties one to a process (they are used by id), so which
//! are the tree's is decided by namespace:
//! - a tree in an IPC namespace other than the agent's owns everything in
//!   it: every set and queue is saved;
//! - a tree in the agent's namespace (the host's, shared with everything
//!   else) owns those a process of the tree last used: a set one of whose
//!   semaphores a process of the tree changed last (`GETPID`), a queue a
//!   process of the tree last sent to or received from. A set or queue
//!   never used since it was made names no process and is not saved.
//!
//! Either way a set or queue that a live process outside the tree last
//! used, or that processes wait on (the tree's own are frozen, out of
//! their `semop`), is refused: the restored tree would have a copy of its
//! own where the other process expects to share it. So is a process with a
//! semaphore undo list (`SEM_UNDO`) in a tree with sets: its adjustments
//! cannot be read, and the checkpoint's kill applies them to the host's
//! set (see [`refuse_undo_lists`]).
//!
//! Messages are copied with `msgrcv(MSG_COPY)`, which leaves them queued:
//! a checkpoint that fails later loses nothing.

use std::collections::HashSet;

use persist_common::image::{IpcMessage, IpcOwner, MessageQueue, SemaphoreSet, SysvIpc};

use super::CheckpointError;
use crate::sys::ipc;
use crate::sys::sysv_ipc::{self, Kind, Owner};

/// What was saved, and the stamps that tell after the kill whether each
/// object is still as saved (for [`remove_saved`]).
#[derive(Debug, Default)]
pub struct SavedIpc {
    /// What goes into the image.
    pub image: SysvIpc,
    /// Whether the tree was in the agent's IPC namespace.
    ours: bool,
    /// Each saved set's id, key and (otime, ctime).
    sets: Vec<(i32, i32, [i64; 2])>,
    /// Each saved queue's id, key and (stime, rtime, ctime).
    queues: Vec<(i32, i32, [i64; 3])>,
    /// Each saved set's id and the pids that last changed its semaphores.
    users: Vec<(i32, Vec<i32>)>,
}

/// Saves the semaphore sets and message queues of `root`'s IPC namespace
/// that belong to the tree of `pids` (the root, its frozen descendants and
/// its zombies), refusing a process with a semaphore undo list.
pub fn save(root: i32, pids: &[i32]) -> Result<SavedIpc, CheckpointError> {
    let failed = |what: String| CheckpointError::SysvIpc { pid: root, what };
    let ours = ipc::same_namespace(root)
        .map_err(|err| failed(format!("reading /proc/{root}/ns/ipc: {err}")))?;
    let tree: HashSet<i32> = pids.iter().copied().collect();
    let mut saved = ipc::in_namespace_of(root, || collect(ours, &tree))
        .map_err(|err| failed(format!("joining the IPC namespace of pid {root}: {err}")))?
        .map_err(failed)?;
    saved.ours = ours;
    if !saved.image.semaphores.is_empty() {
        refuse_undo_lists(root, pids, &saved)?;
    }
    Ok(saved)
}

/// Refuses a tree whose semaphore sets are saved when one of its processes
/// has an undo list: its adjustments cannot be read, and a restored
/// process without them would leave a semaphore it held taken forever
/// once it exits (or release one it never held). A list is also made for a
/// process that made threads: such a process is refused too, for the list
/// cannot be told from one with adjustments.
fn refuse_undo_lists(root: i32, pids: &[i32], saved: &SavedIpc) -> Result<(), CheckpointError> {
    for &pid in pids {
        match sysv_ipc::has_undo_list(pid) {
            Ok(Some(false)) => {}
            Ok(Some(true)) => {
                let sets: Vec<String> = saved
                    .users
                    .iter()
                    .filter(|(_, users)| users.contains(&pid))
                    .map(|(semid, _)| semid.to_string())
                    .collect();
                let on = if sets.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", and last changed semaphore set semid {}",
                        sets.join(", semid ")
                    )
                };
                return Err(CheckpointError::SysvIpc {
                    pid: root,
                    what: format!(
                        "pid {pid} has System V semaphore undo state (semop with SEM_UNDO, or \
                         threads made with CLONE_SYSVSEM){on}: its adjustments cannot be read \
                         nor restored"
                    ),
                });
            }
            Ok(None) => {
                tracing::warn!(
                    pid,
                    "pid 2 is not kthreadd: System V semaphore undo lists are not checked"
                );
                return Ok(());
            }
            // Gone: a zombie reaped meanwhile by someone else (a zombie
            // itself compares as having none: its exit dropped the list).
            Err(err) if err.raw_os_error() == Some(libc::ESRCH) => {}
            Err(err) => {
                return Err(CheckpointError::SysvIpc {
                    pid: root,
                    what: format!(
                        "pid {pid}: comparing its System V semaphore undo list (kcmp): {err}"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Whether `pid` is a live process outside the tree. The agent is not
/// one: a restore made the objects of a restored tree with the agent's
/// calls, so the daemon is their last user until the tree uses them.
fn outsider(pid: i32, tree: &HashSet<i32>) -> bool {
    pid > 0
        && !tree.contains(&pid)
        && pid != std::process::id() as i32
        && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn owner(owner: Owner) -> IpcOwner {
    IpcOwner {
        uid: owner.uid,
        gid: owner.gid,
        cuid: owner.cuid,
        cgid: owner.cgid,
        mode: owner.mode,
    }
}

/// Reads the tree's sets and queues in the calling thread's namespace.
fn collect(ours: bool, tree: &HashSet<i32>) -> Result<SavedIpc, String> {
    let mut saved = SavedIpc::default();
    let semaphores = sysv_ipc::ids(Kind::Semaphores)
        .map_err(|err| format!("reading /proc/sysvipc/sem: {err}"))?;
    for semid in semaphores {
        let set_error =
            |err: std::io::Error| format!("System V semaphore set semid {semid}: {err}");
        let stat = match sysv_ipc::sem_stat(semid) {
            Ok(stat) => stat,
            // Removed since it was listed.
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(err) => return Err(set_error(err)),
        };
        let users = sysv_ipc::sem_users(semid, stat.count).map_err(set_error)?;
        if ours && !users.iter().any(|(pid, _)| tree.contains(pid)) {
            continue;
        }
        let what = format!("System V semaphore set semid {semid} (key {:#x})", stat.key);
        if let Some(&(pid, _)) = users.iter().find(|(pid, _)| outsider(*pid, tree)) {
            return Err(format!(
                "{what} was last changed by pid {pid}, which is not in the tree: the restored \
                 tree would not share it"
            ));
        }
        let waiting: u32 = users.iter().map(|&(_, waiting)| waiting).sum();
        if waiting > 0 {
            return Err(format!(
                "{what} has {waiting} operations waiting by processes outside the tree"
            ));
        }
        let values = sysv_ipc::sem_values(semid, stat.count).map_err(set_error)?;
        saved.sets.push((semid, stat.key, [stat.otime, stat.ctime]));
        saved
            .users
            .push((semid, users.iter().map(|&(pid, _)| pid).collect()));
        saved.image.semaphores.push(SemaphoreSet {
            key: stat.key,
            semid,
            owner: owner(stat.owner),
            values,
        });
    }
    let queues =
        sysv_ipc::ids(Kind::Queues).map_err(|err| format!("reading /proc/sysvipc/msg: {err}"))?;
    let msgmax = if queues.is_empty() {
        0
    } else {
        sysv_ipc::read_limit("msgmax").map_err(|err| format!("reading msgmax: {err}"))?
    };
    for msqid in queues {
        let queue_error =
            |err: std::io::Error| format!("System V message queue msqid {msqid}: {err}");
        let stat = match sysv_ipc::msg_stat(msqid) {
            Ok(stat) => stat,
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(err) => return Err(queue_error(err)),
        };
        let users = [stat.last_sender, stat.last_receiver];
        if ours && !users.iter().any(|pid| tree.contains(pid)) {
            continue;
        }
        let what = format!("System V message queue msqid {msqid} (key {:#x})", stat.key);
        if let Some(pid) = users.iter().find(|&&pid| outsider(pid, tree)) {
            return Err(format!(
                "{what} was last used by pid {pid}, which is not in the tree: the restored \
                 tree would not share it"
            ));
        }
        // Every body fits in the bytes queued, and in msgmax unless it was
        // lowered since (E2BIG then, naming the message).
        let max = stat.bytes.min(msgmax).max(1) as usize;
        let mut messages = Vec::with_capacity(stat.messages as usize);
        for index in 0..stat.messages {
            let (mtype, body) = sysv_ipc::msg_copy(msqid, index, max).map_err(|err| {
                format!(
                    "{what}: copying message {index} of {} (msgrcv MSG_COPY): {err}",
                    stat.messages
                )
            })?;
            messages.push(IpcMessage { mtype, body });
        }
        let bytes: u64 = messages.iter().map(|m| m.body.len() as u64).sum();
        if bytes != stat.bytes {
            return Err(format!(
                "{what} changed while it was read ({bytes} bytes copied, {} queued): another \
                 process uses it",
                stat.bytes
            ));
        }
        saved.queues.push((msqid, stat.key, stat.times));
        saved.image.queues.push(MessageQueue {
            key: stat.key,
            msqid,
            owner: owner(stat.owner),
            max_bytes: stat.max_bytes,
            messages,
        });
    }
    Ok(saved)
}

/// Removes the sets and queues `saved` holds, once the processes that used
/// them are killed and the image holding them is durable: the restore makes
/// them again in a namespace of its own, and nothing else would remove them.
/// Only in our IPC namespace (a namespace of the tree's own went with it),
/// and only an object still as saved (same key, not used since). Failures
/// are logged, not returned: the image is complete either way.
pub fn remove_saved(saved: &SavedIpc) {
    if !saved.ours {
        return;
    }
    for &(semid, key, times) in &saved.sets {
        match sysv_ipc::sem_stat(semid) {
            Ok(stat) if stat.key == key && [stat.otime, stat.ctime] == times => {
                if let Err(err) = sysv_ipc::sem_remove(semid) {
                    tracing::warn!(semid, %err, "cannot remove the saved System V semaphore set");
                }
            }
            Ok(_) => tracing::warn!(semid, "System V semaphore set changed: left alone"),
            Err(_) => {}
        }
    }
    for &(msqid, key, times) in &saved.queues {
        match sysv_ipc::msg_stat(msqid) {
            Ok(stat) if stat.key == key && stat.times == times => {
                if let Err(err) = sysv_ipc::msg_remove(msqid) {
                    tracing::warn!(msqid, %err, "cannot remove the saved System V message queue");
                }
            }
            Ok(_) => tracing::warn!(msqid, "System V message queue changed: left alone"),
            Err(_) => {}
        }
    }
}
