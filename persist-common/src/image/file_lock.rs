//! File locks held by a process, as the manifest records them.

use serde::{Deserialize, Serialize};

/// The kind of a file lock, which decides who owns it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LockKind {
    /// `flock(2)`: owned by the open file description.
    Flock,
    /// POSIX record lock (`fcntl` `F_SETLK`, `lockf`): owned by the
    /// process.
    Posix,
    /// Open file description lock (`F_OFD_SETLK`): owned by the open file
    /// description.
    Ofd,
}

/// A file lock held through one of the process's descriptors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileLock {
    /// The descriptor it was taken through (the lowest of those sharing
    /// the open file description).
    pub fd: i32,
    /// Its kind.
    pub kind: LockKind,
    /// A write (exclusive) lock; a read (shared) lock otherwise.
    pub write: bool,
    /// First byte locked (0 for a flock).
    pub start: u64,
    /// Last byte locked, included; `None` up to the end of the file,
    /// however far it grows (always, for a flock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<u64>,
}
