//! One open descriptor of a process being saved, as `/proc` shows it.

use super::fdinfo::FdInfoText;

/// One open descriptor as `/proc` shows it.
#[derive(Debug)]
pub(super) struct Listed {
    pub fd: i32,
    /// Target of the `/proc/PID/fd/N` link.
    pub target: String,
    pub info: FdInfoText,
}

impl Listed {
    /// The access mode is write-only.
    pub(super) fn write_only(&self) -> bool {
        self.info.flags as i32 & libc::O_ACCMODE == libc::O_WRONLY
    }
}
