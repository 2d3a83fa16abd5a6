//! inotify watches, as an image records them.

use serde::{Deserialize, Serialize};

use super::FileIdentity;

/// One watch of an inotify instance.
///
/// The kernel keys a watch by inode, and shows it in fdinfo by inode number
/// and file handle only; checkpoint resolves that to a path, and restore
/// watches what the path names then, if it is still the recorded file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InotifyWatch {
    /// The watch descriptor the process knows it by (events carry it).
    pub wd: i32,
    /// `IN_*` events watched, with `IN_ONESHOT` and `IN_EXCL_UNLINK` when
    /// set; the flags that only matter when adding (`IN_DONT_FOLLOW`,
    /// `IN_ONLYDIR`, `IN_MASK_ADD`) are not kept by the kernel.
    pub mask: u32,
    /// Path of the watched file or directory, as the kernel resolved it.
    pub path: String,
    /// The file `path` named at checkpoint; restore refuses another one.
    pub identity: FileIdentity,
}
