//! System V semaphore sets and message queues of a checkpointed process or
//! tree ([`super::Manifest::sysv_ipc`]).
//!
//! Nothing in /proc ties one of these to a process: they are used by id.
//! The checkpoint saves those of the processes' IPC namespace that belong
//! to them (every one when the namespace is not the agent's; otherwise those
//! a process of the tree last operated on), and the restore makes each again
//! with its key and id in the IPC namespace of the restored tree's own.

use serde::{Deserialize, Serialize};

use super::manifest::base64_bytes;

/// The System V semaphore sets and message queues of an image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct SysvIpc {
    /// Semaphore sets, by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub semaphores: Vec<SemaphoreSet>,
    /// Message queues, by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<MessageQueue>,
}

impl SysvIpc {
    /// Whether it holds neither sets nor queues.
    pub fn is_empty(&self) -> bool {
        self.semaphores.is_empty() && self.queues.is_empty()
    }
}

/// Owner, creator and mode of a System V IPC object (`struct ipc_perm`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct IpcOwner {
    /// Owner.
    pub uid: u32,
    /// Owner's group.
    pub gid: u32,
    /// Creator.
    pub cuid: u32,
    /// Creator's group.
    pub cgid: u32,
    /// Permission bits.
    pub mode: u32,
}

/// A semaphore set (`semget`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SemaphoreSet {
    /// The key it was made with (0: `IPC_PRIVATE`).
    pub key: i32,
    /// Its id, which the processes hold.
    pub semid: i32,
    /// Owner, creator and mode.
    pub owner: IpcOwner,
    /// The value of each semaphore (`GETALL`), as many as the set has.
    pub values: Vec<u16>,
}

/// A message queue (`msgget`) and the messages in it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageQueue {
    /// The key it was made with (0: `IPC_PRIVATE`).
    pub key: i32,
    /// Its id, which the processes hold.
    pub msqid: i32,
    /// Owner, creator and mode.
    pub owner: IpcOwner,
    /// The most bytes it holds (`msg_qbytes`).
    pub max_bytes: u64,
    /// Its messages, first to be received first.
    pub messages: Vec<IpcMessage>,
}

/// One message of a [`MessageQueue`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IpcMessage {
    /// Its type (`mtype`, positive).
    pub mtype: i64,
    /// Its body.
    #[serde(with = "base64_bytes")]
    pub body: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_stored_as_base64_and_read_back() {
        let ipc = SysvIpc {
            semaphores: Vec::new(),
            queues: vec![MessageQueue {
                key: 0x1234,
                msqid: 32769,
                owner: IpcOwner::default(),
                max_bytes: 16384,
                messages: vec![IpcMessage {
                    mtype: 2,
                    body: b"hi\0".to_vec(),
                }],
            }],
        };
        let json = serde_json::to_string(&ipc).unwrap();
        assert!(json.contains(r#""body":"aGkA""#), "{json}");
        assert!(
            !json.contains("semaphores"),
            "empty lists are left out: {json}"
        );
        assert_eq!(serde_json::from_str::<SysvIpc>(&json).unwrap(), ipc);
        assert_eq!(
            serde_json::from_str::<SysvIpc>("{}").unwrap(),
            SysvIpc::default()
        );
    }
}
