//! System V shared memory: what a `/SYSV<key> (deleted)` mapping is
//! attached to, read with `shmctl(IPC_STAT)` in the process's own IPC
//! namespace. The contents are the segment's pages, stored with the first
//! process of the tree that attaches it (`shared_memory.rs`).

use persist_common::image::{Mapping, MappingKind, PAGE_SIZE};

use super::CheckpointError;
use crate::sys::ipc;

/// The mapping kind of segment `shmid` attached by `pid` over
/// `start..end`; refuses a segment attached in part (a process that
/// unmapped or `mprotect`ed some of it), which `shmat` cannot give back.
pub fn describe(
    pid: i32,
    start: u64,
    end: u64,
    shmid: u64,
) -> Result<MappingKind, CheckpointError> {
    let unsupported = |what: String| CheckpointError::UnsupportedMapping {
        pid,
        start,
        end,
        what,
    };
    let id = i32::try_from(shmid)
        .map_err(|_| unsupported(format!("System V shared memory with shmid {shmid}")))?;
    let stat = ipc::in_namespace_of(pid, || ipc::shm_stat(id))
        .and_then(|stat| stat)
        .map_err(|err| {
            unsupported(format!(
                "System V shared memory shmid {id}: shmctl(IPC_STAT) in the process's IPC \
                 namespace failed: {err}"
            ))
        })?;
    if stat.size.next_multiple_of(PAGE_SIZE) != end - start {
        return Err(unsupported(format!(
            "System V shared memory shmid {id} (key {:#x}) of {} bytes is attached in part",
            stat.key, stat.size
        )));
    }
    Ok(MappingKind::SysvShm {
        key: stat.key,
        shmid: id,
        size: stat.size,
        uid: stat.uid,
        gid: stat.gid,
        mode: stat.mode,
        removed: stat.removed,
    })
}

/// Removes the System V segments `mappings` attach, once the processes
/// that attached them are killed and the image holding them is durable: the
/// restore makes them again in a namespace of its own, and a segment left
/// would outlive everything (PostgreSQL removes its own on a clean
/// shutdown). Only in our IPC namespace (`ours`: the processes were in
/// it), and only a segment that is still the one saved (key and size) and
/// that no process attaches any more. Failures are logged, not returned:
/// the image is complete either way.
pub fn remove_saved<'a>(ours: bool, mappings: impl IntoIterator<Item = &'a Mapping>) {
    if !ours {
        return;
    }
    let mut removed = std::collections::HashSet::new();
    for mapping in mappings {
        let MappingKind::SysvShm {
            key, shmid, size, ..
        } = mapping.kind
        else {
            continue;
        };
        if !removed.insert(shmid) {
            continue;
        }
        match ipc::shm_stat(shmid) {
            Ok(stat) if stat.key == key && stat.size == size && stat.attachments == 0 => {
                if let Err(err) = ipc::shm_remove(shmid) {
                    tracing::warn!(shmid, %err, "cannot remove the saved System V segment");
                }
            }
            Ok(_) => tracing::warn!(
                shmid,
                "System V segment still attached or changed: left alone"
            ),
            Err(_) => {}
        }
    }
}
