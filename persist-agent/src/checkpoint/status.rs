//! `/proc/PID/status` (or a thread's), read with procfs, with errors in
//! checkpoint terms.

use procfs::ProcError;
use procfs::process::{Process, Status};

use super::CheckpointError;

/// Reads `/proc/PID/status`, or `/proc/PID/task/TID/status` with a `tid`.
/// A process that does not exist is [`CheckpointError::NoSuchProcess`].
pub fn read(pid: i32, tid: Option<i32>) -> Result<Status, CheckpointError> {
    let status = Process::new(pid).and_then(|process| match tid {
        Some(tid) => process.task_from_tid(tid)?.status(),
        None => process.status(),
    });
    status.map_err(|source| match source {
        ProcError::NotFound(_) if tid.is_none() => CheckpointError::NoSuchProcess { pid },
        source => CheckpointError::ProcFs {
            pid,
            what: "status",
            source,
        },
    })
}

/// A field the kernel has had for years but procfs treats as optional.
pub fn required<T>(pid: i32, field: &str, value: Option<T>) -> Result<T, CheckpointError> {
    value.ok_or_else(|| CheckpointError::ProcField {
        pid,
        path: format!("/proc/{pid}/status"),
        field: field.to_owned(),
    })
}
