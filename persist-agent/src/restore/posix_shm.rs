//! POSIX shared memory files (`/dev/shm/NAME`, PostgreSQL's dynamic shared
//! memory): made again for a restored process, and removed once its
//! processes are gone, as the program itself removes them when it exits
//! cleanly. A killed tree (every park) leaves them otherwise, holding their
//! pages in the host's memory while the service is parked.

use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

use persist_common::image::{Manifest, MappingKind};

use super::RestoreError;
use crate::sys::kobjects::{self, TaskObject};
use crate::sys::lease;

/// A POSIX shared memory file a restore made: its path and the inode it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MadeFile {
    /// Its path, under /dev/shm.
    pub path: String,
    /// The inode made: a file of that name made since by someone else is
    /// not ours to remove.
    pub inode: u64,
}

impl MadeFile {
    /// Removes the file if it is still the one made and no live process
    /// maps or holds it. Returns whether it was removed.
    pub fn remove_if_unused(&self) -> bool {
        remove_unused(&self.path, Some(self.inode))
    }
}

/// Removes the POSIX shared memory files the processes of `manifest` map
/// that no live process maps or holds: what they left when they were
/// killed to park the service. Its next restore makes them again from the
/// image. Returns the paths removed.
pub fn remove_left_by(manifest: &Manifest) -> Vec<String> {
    let mut paths: Vec<&str> = manifest
        .every_mapping()
        .filter_map(|mapping| match &mapping.kind {
            MappingKind::PosixShm { path, .. } => Some(path.as_str()),
            _ => None,
        })
        .collect();
    paths.sort_unstable();
    paths.dedup();
    paths
        .into_iter()
        .filter(|path| check_name(path).is_ok() && remove_unused(path, None))
        .map(str::to_owned)
        .collect()
}

/// Removes file `path` if it is inode `inode` (any, if `None`) and no live
/// process maps or holds it: a lease tells at once; when it is refused,
/// the users found may all be dying (a killed tree's processes not yet
/// gone), whose mappings go with them.
fn remove_unused(path: &str, inode: Option<u64>) -> bool {
    let Ok(file) = open_existing(path) else {
        return false;
    };
    let found = file.metadata().map(|meta| meta.ino()).ok();
    if found.is_none() || inode.is_some_and(|inode| found != Some(inode)) {
        return false;
    }
    user_if_any(&file, path).is_none() && std::fs::remove_file(path).is_ok()
}

/// Files made for a restore, removed when dropped unless taken out: what
/// a failed restore made is not left behind.
#[derive(Debug, Default)]
pub(super) struct MadeFiles(pub(super) Vec<MadeFile>);

impl Drop for MadeFiles {
    fn drop(&mut self) {
        for made in &self.0 {
            let same = std::fs::symlink_metadata(&made.path).is_ok_and(|m| m.ino() == made.inode);
            if same {
                let _ = std::fs::remove_file(&made.path);
            }
        }
    }
}

/// Makes POSIX shared memory file `path` again, owned by `uid`:`gid` with
/// `mode`. It must not exist: a file there is another process's (a restore
/// of the same image still running, or the original left running), and two
/// restored processes must never share one object unknowingly.
pub(super) fn create(
    path: &str,
    uid: u32,
    gid: u32,
    mode: u32,
) -> Result<(OwnedFd, MadeFile), RestoreError> {
    check_name(path)?;
    let create = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
    };
    let file = match create() {
        Err(source) if source.kind() == std::io::ErrorKind::AlreadyExists => {
            // Left by processes that died without removing it (a tree
            // killed by someone else, or before the daemon removed what its
            // parked trees made): stale if no process maps or holds it.
            let user = match open_existing(path) {
                Ok(file) => user_if_any(&file, path),
                // Not a file we can open (a symbolic link there): look.
                Err(_) => user(path),
            };
            if let Some(pid) = user {
                return Err(RestoreError::Layout(format!(
                    "POSIX shared memory {path} exists and pid {pid} uses it (the checkpointed \
                     process left running, or another restore of this image): two restores \
                     must not share it"
                )));
            }
            tracing::warn!(path, "replacing a POSIX shared memory file no process uses");
            std::fs::remove_file(path).map_err(|e| RestoreError::io(path, e))?;
            create()
        }
        other => other,
    }
    .map_err(|e| RestoreError::io(path, e))?;
    std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
        .map_err(|e| RestoreError::io(path, e))?;
    // Permission bits only: an image never makes a set-id file.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode & 0o777))
        .map_err(|e| RestoreError::io(path, e))?;
    let inode = file
        .metadata()
        .map_err(|e| RestoreError::io(path, e))?
        .ino();
    let made = MadeFile {
        path: path.to_owned(),
        inode,
    };
    Ok((file.into(), made))
}

/// Refuses a path that is not a file directly under /dev/shm: an image
/// names it, and a restore makes or removes nothing elsewhere.
fn check_name(path: &str) -> Result<(), RestoreError> {
    let name = path.strip_prefix("/dev/shm/").unwrap_or_default();
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(RestoreError::Layout(format!(
            "POSIX shared memory {path} is not a file directly under /dev/shm"
        )));
    }
    Ok(())
}

fn open_existing(path: &str) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// A live process that maps `file` (at `path`, under /dev/shm) or holds it
/// open, if any: its pid. A lease on the file tells at once that nobody
/// does (the usual case); only a file some description still holds has
/// every process's maps and descriptors looked through, to name the user
/// or find it dying (~5 ms with 70 processes on the host).
fn user_if_any(file: &File, path: &str) -> Option<i32> {
    match lease::opened_elsewhere(file) {
        Ok(false) => None,
        Ok(true) => user(path),
        Err(error) => {
            tracing::debug!(path, %error, "no lease on a POSIX shared memory file");
            user(path)
        }
    }
}

/// A process other than the agent that maps file `path` (under /dev/shm)
/// or holds it open, if any: its pid. The agent's own descriptors of it,
/// and its spawner's (which shares its descriptor table), are no restored
/// process's use of it (docs/process-trees.md, Shared memory and IPC).
fn user(path: &str) -> Option<i32> {
    let own = std::process::id() as i32;
    let ours = |pid: i32| {
        pid == own || kobjects::same_task_object(own, pid, TaskObject::FdTable).unwrap_or(false)
    };
    let inode = std::fs::symlink_metadata(path).ok()?.ino();
    let pids = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| !ours(pid));
    for pid in pids {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        let mapped = maps.lines().any(|line| {
            let mut fields = line.split_whitespace();
            let line_inode = fields.nth(4).and_then(|i| i.parse::<u64>().ok());
            line_inode == Some(inode) && fields.next() == Some(path)
        });
        let held = || {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == path)
                        && std::fs::metadata(fd.path()).is_ok_and(|m| m.ino() == inode)
                })
        };
        if mapped || held() {
            if crate::process_tree::is_dying(pid) {
                // Killed (a parked tree: its supervisor waits for the root
                // only): its mapping goes with it, and the file made now is
                // another object.
                tracing::info!(pid, path, "a dying process still maps or holds the file");
                continue;
            }
            return Some(pid);
        }
    }
    None
}
