//! System V semaphore sets and message queues of a restored process or
//! tree: made again in the IPC namespace of the tree's own
//! (`sysv_shm.rs` makes it, with the segments), each with its recorded id
//! (`sem_next_id`, `msg_next_id`), key, creator (made with the creator's
//! effective ids), owner and mode; the sets with their values, the queues
//! with their room and their messages in order.
//!
//! What is not kept: the times of the last operations, the pids of the last
//! users (the agent's, or 0 in the restored tree's pid namespace).

use std::io;

use persist_common::image::{IpcOwner, SysvIpc};

use crate::sys::sysv_ipc::{self, Owner};

fn owner(owner: &IpcOwner) -> Owner {
    Owner {
        uid: owner.uid,
        gid: owner.gid,
        cuid: owner.cuid,
        cgid: owner.cgid,
        mode: owner.mode,
    }
}

/// Checks what `ipc` records before anything is made: errors name the set
/// or queue.
pub(super) fn check(ipc: &SysvIpc) -> Result<(), String> {
    let mut semids = std::collections::HashSet::new();
    for set in &ipc.semaphores {
        if set.values.is_empty() || !semids.insert(set.semid) || set.semid < 0 {
            return Err(format!(
                "System V semaphore set semid {} is recorded twice, with a negative id or with \
                 no semaphores",
                set.semid
            ));
        }
    }
    let mut msqids = std::collections::HashSet::new();
    for queue in &ipc.queues {
        if !msqids.insert(queue.msqid) || queue.msqid < 0 {
            return Err(format!(
                "System V message queue msqid {} is recorded twice or with a negative id",
                queue.msqid
            ));
        }
        if let Some((index, message)) = queue
            .messages
            .iter()
            .enumerate()
            .find(|(_, message)| message.mtype <= 0)
        {
            return Err(format!(
                "System V message queue msqid {}: message {index} has type {}, not positive",
                queue.msqid, message.mtype
            ));
        }
    }
    Ok(())
}

/// Makes every set and queue of `ipc` in the calling thread's fresh IPC
/// namespace. Errors name the set or queue.
pub(super) fn make(ipc: &SysvIpc) -> io::Result<()> {
    for set in &ipc.semaphores {
        sysv_ipc::make_semaphore_set(set.semid, set.key, &owner(&set.owner), &set.values).map_err(
            |err| {
                io::Error::new(
                    err.kind(),
                    format!(
                        "System V semaphore set semid {} (key {:#x}): {err}",
                        set.semid, set.key
                    ),
                )
            },
        )?;
    }
    for queue in &ipc.queues {
        let messages: Vec<(i64, &[u8])> = queue
            .messages
            .iter()
            .map(|message| (message.mtype, &message.body[..]))
            .collect();
        sysv_ipc::make_queue(
            queue.msqid,
            queue.key,
            &owner(&queue.owner),
            queue.max_bytes,
            &messages,
        )
        .map_err(|err| {
            io::Error::new(
                err.kind(),
                format!(
                    "System V message queue msqid {} (key {:#x}): {err}",
                    queue.msqid, queue.key
                ),
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use persist_common::image::{IpcMessage, MessageQueue, SemaphoreSet};

    use super::*;

    fn set(semid: i32, values: Vec<u16>) -> SemaphoreSet {
        SemaphoreSet {
            key: 0,
            semid,
            owner: IpcOwner::default(),
            values,
        }
    }

    fn queue(msqid: i32, mtypes: &[i64]) -> MessageQueue {
        MessageQueue {
            key: 0,
            msqid,
            owner: IpcOwner::default(),
            max_bytes: 16384,
            messages: mtypes
                .iter()
                .map(|&mtype| IpcMessage {
                    mtype,
                    body: b"x".to_vec(),
                })
                .collect(),
        }
    }

    #[test]
    fn well_formed_objects_pass() {
        let ipc = SysvIpc {
            semaphores: vec![set(0, vec![1]), set(32768, vec![0, 2])],
            queues: vec![queue(0, &[1, 3]), queue(1, &[])],
        };
        assert_eq!(check(&ipc), Ok(()));
    }

    #[test]
    fn a_set_twice_or_without_semaphores_is_refused_by_id() {
        for semaphores in [
            vec![set(5, vec![1]), set(5, vec![2])],
            vec![set(7, Vec::new())],
            vec![set(-1, vec![1])],
        ] {
            let semid = semaphores.last().unwrap().semid;
            let ipc = SysvIpc {
                semaphores,
                queues: Vec::new(),
            };
            let error = check(&ipc).unwrap_err();
            assert!(error.contains(&format!("semid {semid} ")), "{error}");
        }
    }

    #[test]
    fn a_message_without_a_positive_type_is_refused_by_queue_and_index() {
        let ipc = SysvIpc {
            semaphores: Vec::new(),
            queues: vec![queue(3, &[2, 0])],
        };
        let error = check(&ipc).unwrap_err();
        assert!(error.contains("msqid 3: message 1 has type 0"), "{error}");
    }
}
