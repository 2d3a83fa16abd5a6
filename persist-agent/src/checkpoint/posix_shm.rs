//! POSIX shared memory: files under `/dev/shm` (`shm_open`) mapped
//! shared. The image holds their contents (a reboot empties /dev/shm), and
//! their size, owner and mode; once the checkpointed processes are killed,
//! the files they mapped are removed, as their owner would on a clean exit,
//! so that the restore makes them again from the image and never shares one
//! with another process unknowingly (docs/process-trees.md).

use std::os::unix::fs::MetadataExt;

use persist_common::image::{Mapping, MappingKind};

use super::CheckpointError;

/// Where POSIX shared memory objects live.
pub const DIRECTORY: &str = "/dev/shm/";

/// The mapping kind of `path` (under [`DIRECTORY`]) mapped shared by `pid`
/// over `start..end` at `offset`, read through /proc/PID/map_files.
pub fn describe(
    pid: i32,
    start: u64,
    end: u64,
    path: &str,
    inode: u64,
    offset: u64,
) -> Result<MappingKind, CheckpointError> {
    let link = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
    let metadata = std::fs::metadata(&link).map_err(|source| CheckpointError::Proc {
        pid,
        path: link,
        source,
    })?;
    Ok(MappingKind::PosixShm {
        path: path.to_owned(),
        inode,
        offset,
        size: metadata.len(),
        uid: metadata.uid(),
        gid: metadata.gid(),
        mode: metadata.mode() & 0o777,
    })
}

/// Removes the POSIX shared memory files `mappings` name, if each still
/// is the object saved (same inode): called once the processes that mapped
/// them are killed and the image holding them is durable. Failures are
/// logged, not returned: the image is complete either way.
pub fn remove_saved<'a>(mappings: impl IntoIterator<Item = &'a Mapping>) {
    let mut removed = std::collections::HashSet::new();
    for mapping in mappings {
        let MappingKind::PosixShm { path, inode, .. } = &mapping.kind else {
            continue;
        };
        if !removed.insert(path.clone()) {
            continue;
        }
        match std::fs::symlink_metadata(path) {
            Ok(metadata) if metadata.ino() == *inode && metadata.is_file() => {
                if let Err(err) = std::fs::remove_file(path) {
                    tracing::warn!(path, %err, "cannot remove the saved POSIX shared memory file");
                }
            }
            Ok(_) => tracing::warn!(path, "POSIX shared memory file was replaced: left alone"),
            Err(_) => {}
        }
    }
}
