//! What the daemon knows of a running service, kept in `STATE_DIR/run/NAME.json`
//! so that a restarted daemon finds the process again instead of starting a second one.

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use persist_common::trust::{TrustError, read_trusted_file};

use crate::restore::{EventJournal, Pager};
use crate::service::{create_trusted_dir, replace_file};
use crate::sys::pidfd::PidFd;

/// Longest run record read: a few numbers in JSON.
const MAX_RECORD_BYTES: u64 = 4096;

/// A running service's process, as recorded by the daemon that started it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Pid of the service's main process.
    pub pid: i32,
    /// Its start time in clock ticks since boot (`/proc/PID/stat` field 22),
    /// which tells it apart from a later process with a recycled pid.
    pub start_time: u64,
    /// Inode of the listening socket it was given.
    pub listener_inode: u64,
    /// Inodes of the other listeners of the port it was given (the rest of
    /// the listener's `SO_REUSEPORT` group), taken back with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_inodes: Vec<u64>,
    /// For a restored process, where its pages come from: what a restarted
    /// daemon needs to go on serving them if this one dies first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<PageSource>,
}

/// Where the pages of a restored process come from, recorded before it is
/// resumed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageSource {
    /// The image it was restored from.
    pub image: PathBuf,
    /// CRC of that image's manifest: which state of the image it was (a
    /// kept image is rewritten in place at each park).
    pub image_crc: u32,
    /// The descriptor number of the userfaultfd the process keeps open.
    pub uffd_fd: i32,
}

/// A running service found again after a daemon restart.
pub struct Adopted {
    /// The recorded process.
    pub record: RunRecord,
    /// A pidfd for it.
    pub pidfd: PidFd,
    /// The listening socket, taken back from the process.
    pub listener: OwnedFd,
    /// The other listeners of its group that it still holds, taken back.
    pub group: Vec<OwnedFd>,
    /// A pager taking over its pages, when they were still being filled.
    pub pager: Option<Pager>,
}

/// Why the pages of a restored process cannot be served by a new pager.
#[derive(Debug, thiserror::Error)]
pub enum TakeOverError {
    /// The run record does not say where its pages come from.
    #[error("pid {pid}: its run record names no image and userfaultfd")]
    NotRecorded {
        /// The process.
        pid: i32,
    },
    /// The image is no longer the one it was restored from.
    #[error("pid {pid}: image {image} changed since it was restored from it")]
    ImageChanged {
        /// The process.
        pid: i32,
        /// The image.
        image: PathBuf,
    },
    /// The image cannot be read.
    #[error("pid {pid}: its image")]
    Image {
        /// The process.
        pid: i32,
        /// Why.
        #[source]
        source: persist_common::image::ImageError,
    },
    /// The recorded descriptor is not a userfaultfd (any more).
    #[error("pid {pid}: fd {fd} is not its userfaultfd")]
    NotUserfaultfd {
        /// The process.
        pid: i32,
        /// The descriptor.
        fd: i32,
    },
    /// pidfd_getfd failed.
    #[error("pid {pid}: taking its userfaultfd (fd {fd})")]
    TakeFd {
        /// The process.
        pid: i32,
        /// The descriptor.
        fd: i32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The previous pager's journal is unreadable.
    #[error(transparent)]
    Journal(#[from] crate::restore::JournalError),
    /// The new pager cannot be set up.
    #[error(transparent)]
    Pager(#[from] crate::restore::RestoreError),
}

/// The `run` directory of a state directory.
pub struct RunStateDir {
    dir: PathBuf,
}

impl RunStateDir {
    /// Opens `STATE_DIR/run`, creating it (mode 0700) if missing; it must
    /// be trusted ([`persist_common::trust`]), as a record names a process
    /// the daemon takes over.
    pub fn open(state_dir: &Path) -> Result<Self, TrustError> {
        let dir = create_trusted_dir(&state_dir.join("run"))?;
        Ok(Self { dir })
    }

    /// Records that `name` runs as `pid`, which holds the listening socket
    /// `listener` and the other members of its group `group` (and,
    /// restored, has its pages from `pages`); warns when that cannot be
    /// recorded.
    pub fn record_process(
        &self,
        name: &str,
        pid: i32,
        listener: &impl AsFd,
        group: &[OwnedFd],
        pages: Option<PageSource>,
    ) {
        self.record(&self.path(name), name, pid, listener, group, pages);
    }

    /// Records that the port keeper of `name` is `pid`, holding `listener`
    /// and the other members of its group `group`.
    pub fn record_keeper(&self, name: &str, pid: i32, listener: &impl AsFd, group: &[OwnedFd]) {
        self.record(&self.keeper_path(name), name, pid, listener, group, None);
    }

    fn record(
        &self,
        path: &Path,
        name: &str,
        pid: i32,
        listener: &impl AsFd,
        group: &[OwnedFd],
        pages: Option<PageSource>,
    ) {
        let group_inodes: Option<Vec<u64>> = group
            .iter()
            .map(|member| super::listener::inode(member).ok())
            .collect();
        let record = start_time(pid)
            .zip(super::listener::inode(listener).ok())
            .zip(group_inodes)
            .map(|((start_time, listener_inode), group_inodes)| RunRecord {
                pid,
                start_time,
                listener_inode,
                group_inodes,
                pages,
            });
        let saved = match record {
            Some(record) => {
                let json = serde_json::to_vec(&record).expect("a run record always serialises");
                replace_file(path, &json)
            }
            None => Err(std::io::Error::other(format!(
                "pid {pid} or its listener is gone"
            ))),
        };
        if let Err(err) = saved {
            tracing::warn!(service = %name, pid, path = %path.display(), "cannot record a process of the service: {err}");
        }
    }

    /// Forgets the running process of `name`.
    pub fn clear(&self, name: &str) {
        let _ = fs::remove_file(self.path(name));
    }

    /// Forgets the port keeper of `name`.
    pub fn clear_keeper(&self, name: &str) {
        let _ = fs::remove_file(self.keeper_path(name));
    }

    /// The recorded process of `name`, if the record exists, is trusted and
    /// parses; a record that is not trusted is ignored with a warning.
    pub fn load(&self, name: &str) -> Option<RunRecord> {
        load(&self.path(name))
    }

    /// The recorded port keeper of `name`, if any (trusted, as [`Self::load`]).
    pub fn load_keeper(&self, name: &str) -> Option<RunRecord> {
        load(&self.keeper_path(name))
    }

    /// Where the pager of `name`'s restored process journals the
    /// address-space events it reads.
    pub fn events_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.events"))
    }

    /// Where a keep-mode park of `name` keeps what undoes its checkpoint
    /// ([`crate::checkpoint::CheckpointOptions::recovery_file`]).
    pub fn checkpoint_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.checkpoint"))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Where the port keeper listens for daemons ([`super::keeper`]).
    pub fn keeper_socket_path(&self) -> PathBuf {
        self.dir.join("keeper.sock")
    }

    fn keeper_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.keeper.json"))
    }
}

fn load(path: &Path) -> Option<RunRecord> {
    let bytes = match read_trusted_file(path, MAX_RECORD_BYTES) {
        Ok(bytes) => bytes,
        Err(err) if err.is_not_found() => return None,
        Err(err) => {
            tracing::warn!("run record ignored: {err}");
            return None;
        }
    };
    serde_json::from_slice(&bytes).ok()
}

/// Start time of `pid` in clock ticks since boot, if it exists.
pub fn start_time(pid: i32) -> Option<u64> {
    procfs::process::Process::new(pid)
        .ok()?
        .stat()
        .ok()
        .map(|stat| stat.starttime)
}

/// Whether the recorded process is still the same live process.
pub fn is_alive(record: &RunRecord) -> bool {
    start_time(record.pid) == Some(record.start_time)
}

/// Whether `pid` runs on its own: not stopped, traced, dying or with a
/// SIGKILL pending. A skeleton a killed daemon left (recorded when it was
/// prepared) is stopped, and must never be taken for a running service.
pub fn is_running(pid: i32) -> bool {
    let Ok(process) = procfs::process::Process::new(pid) else {
        return false;
    };
    let Ok(stat) = process.stat() else {
        return false;
    };
    if matches!(stat.state, 'T' | 't' | 'Z' | 'X' | 'x') {
        return false;
    }
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    process.status().is_ok_and(|status| {
        status.tracerpid == 0 && (status.sigpnd | status.shdpnd) & SIGKILL_BIT == 0
    })
}

/// Whether `pid` still has memory registered with a userfaultfd (`um` in
/// its smaps `VmFlags`): a restored process whose pager had pages left to
/// fill when the daemon died. Nothing serves them any more, so its next
/// fault on one waits until a new pager takes over ([`take_pager`]).
/// (A snapshot-mode service that used userfaultfd itself would be taken
/// for one too.)
pub fn has_pages_nobody_serves(pid: i32) -> bool {
    procfs::process::Process::new(pid)
        .and_then(|process| process.smaps())
        .is_ok_and(|maps| {
            maps.iter().any(|map| {
                map.extension
                    .vm_flags
                    .contains(procfs::process::VmFlags::UM)
            })
        })
}

/// Whether `pid` is on its way out: a zombie, or killed (a skeleton the
/// dead daemon was still preparing dies with it, as ptrace's exit-kill).
pub fn is_dying(pid: i32) -> bool {
    let Ok(process) = procfs::process::Process::new(pid) else {
        return true;
    };
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    process
        .stat()
        .is_ok_and(|stat| matches!(stat.state, 'Z' | 'X' | 'x'))
        || process
            .status()
            .is_ok_and(|status| (status.sigpnd | status.shdpnd) & SIGKILL_BIT != 0)
}

/// Whether `pid` is in a group stop (state `T`).
pub fn is_stopped(pid: i32) -> bool {
    procfs::process::Process::new(pid)
        .and_then(|process| process.stat())
        .is_ok_and(|stat| stat.state == 'T')
}

/// Finds the recorded process again and takes back its listening socket
/// (by inode, wherever the service moved it). `None` if it is gone, does
/// not run on its own or no longer holds that socket.
pub fn adopt(record: &RunRecord) -> Option<Adopted> {
    if !is_running(record.pid) {
        return None;
    }
    take_listener(record)
}

/// Takes the recorded listening socket from the recorded process, whatever
/// its state (a stopped skeleton included), with the other members of its
/// group the process still holds. `None` if the process is gone or no
/// longer holds that socket.
pub fn take_listener(record: &RunRecord) -> Option<Adopted> {
    if !is_alive(record) {
        return None;
    }
    let pidfd = PidFd::open(record.pid).ok()?;
    // Check again through the pidfd: the pid cannot be recycled under it now.
    if !is_alive(record) {
        return None;
    }
    let process = procfs::process::Process::new(record.pid).ok()?;
    let sockets: Vec<(i32, u64)> = process
        .fd()
        .ok()?
        .flatten()
        .filter_map(|fd| match fd.target {
            procfs::process::FDTarget::Socket(inode) => Some((fd.fd, inode)),
            _ => None,
        })
        .collect();
    let fd_of = |wanted: u64| {
        sockets
            .iter()
            .find_map(|&(fd, inode)| (inode == wanted).then_some(fd))
    };
    let listener = pidfd.get_fd(fd_of(record.listener_inode)?).ok()?;
    // A member the process no longer holds is left out: its queue died
    // with its last holder.
    let group = record
        .group_inodes
        .iter()
        .filter_map(|&inode| pidfd.get_fd(fd_of(inode)?).ok())
        .collect();
    Some(Adopted {
        record: record.clone(),
        pidfd,
        listener,
        group,
        pager: None,
    })
}

/// A pager that goes on serving the pages of the adopted restored process
/// where the dead daemon's pager stopped: the process's own userfaultfd,
/// the image it was restored from (unchanged since) and the journal of
/// address-space events at `events`.
pub fn take_pager(adopted: &Adopted, events: &Path) -> Result<Pager, TakeOverError> {
    let pid = adopted.record.pid;
    let source = adopted
        .record
        .pages
        .as_ref()
        .ok_or(TakeOverError::NotRecorded { pid })?;
    let fd = source.uffd_fd;
    let is_uffd = fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:[userfaultfd]");
    if !is_uffd {
        return Err(TakeOverError::NotUserfaultfd { pid, fd });
    }
    let image_error = |source| TakeOverError::Image { pid, source };
    if persist_common::image::manifest_crc(&source.image).map_err(image_error)? != source.image_crc
    {
        return Err(TakeOverError::ImageChanged {
            pid,
            image: source.image.clone(),
        });
    }
    let image = persist_common::image::Image::open(&source.image).map_err(image_error)?;
    let uffd = adopted
        .pidfd
        .get_fd(fd)
        .map_err(|source| TakeOverError::TakeFd { pid, fd, source })?;
    let pidfd = PidFd::open(pid).map_err(|source| TakeOverError::TakeFd { pid, fd, source })?;
    let journal = EventJournal::read(events)?;
    Ok(Pager::adopt(
        uffd,
        pidfd,
        std::sync::Arc::new(image),
        &journal,
    )?)
}

#[cfg(test)]
mod tests {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    use super::*;

    /// A stopped process (as a dead daemon's skeleton is) is never taken for
    /// a running service; the same process running again is.
    #[test]
    fn a_stopped_process_is_not_running() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        assert!(is_running(pid));
        kill(Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
        let stopped = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            !is_running(pid)
        });
        kill(Pid::from_raw(pid), Signal::SIGCONT).unwrap();
        let running_again = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            is_running(pid)
        });
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(stopped, "a stopped process counts as running");
        assert!(
            running_again,
            "a continued process does not count as running"
        );
        assert!(!is_running(pid), "a reaped process counts as running");
    }
}
