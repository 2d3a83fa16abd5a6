//! Installing prepared descriptors in a forked child.

use std::ffi::CString;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;

use super::timerfd::TimerfdArm;
use crate::sys::fdops;

/// One descriptor to install: `source` (held open by [`PreparedFds`]) goes
/// to number `target`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    pub target: RawFd,
    pub source: RawFd,
    pub cloexec: bool,
    /// File status flags to set with `F_SETFL`, or `None` to leave them.
    pub status_flags: Option<i32>,
}

/// One epoll watch to add while the objects are staged.
#[derive(Debug, Clone, Copy)]
pub(super) struct Watch {
    /// Staging index of the epoll instance (see `install_in_child`).
    pub epoll: usize,
    /// Staging index of the watched file.
    pub file: usize,
    /// The number the watch is keyed by: the file is placed there for the
    /// `EPOLL_CTL_ADD`.
    pub fd: RawFd,
    pub events: u32,
    pub data: u64,
}

/// A file under the process's own `/proc` directory, which the child opens
/// itself so that it names the restored process (see `super::proc_self`).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ProcSelfFile {
    /// `/proc/self/...` or `/proc/thread-self/...`.
    pub path: CString,
    /// Flags for `open`, with `O_CLOEXEC`.
    pub flags: i32,
    /// The file position to restore once the process is complete.
    pub offset: u64,
    /// Every number that shares this open file: its own, then its `dup`s,
    /// each with its close-on-exec bit.
    pub targets: Vec<(RawFd, bool)>,
}

/// Where one of the process's own `/proc` files was read up to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcSelfPosition {
    /// Its descriptor number in the process.
    pub fd: RawFd,
    /// Its path, for messages.
    pub path: String,
    /// The saved file position.
    pub offset: u64,
}

/// Every descriptor of a process, re-created by [`super::prepare()`] and held
/// open in the agent, ready for [`PreparedFds::install_in_child`].
///
/// Use one `PreparedFds` for one restore: the objects are shared with the
/// child, so a second child would share pipes, sockets and epoll instances
/// with the first. Drop it in the parent as soon as the child is forked:
/// until then the agent's copies keep pipes from reporting end-of-file and
/// hold the listening sockets.
#[derive(Debug)]
pub struct PreparedFds {
    /// Keeps every source open; slots refer to these by number.
    pub(super) objects: Vec<OwnedFd>,
    pub(super) slots: Vec<Slot>,
    pub(super) watches: Vec<Watch>,
    /// Opened by the child itself, after the slots.
    pub(super) proc_self_files: Vec<ProcSelfFile>,
    /// Memfd inode (as saved) to the read-write memfd re-created for it.
    pub(super) memfds: Vec<(u64, RawFd)>,
    /// What arms the timerfds, left to the resume.
    pub(super) timerfds: Vec<TimerfdArm>,
}

impl PreparedFds {
    /// Takes what arms the re-created timerfds, which are unarmed: the
    /// caller arms them ([`TimerfdArm::arm`]) when the process resumes, so
    /// that they count their time left from then.
    pub fn take_timerfds(&mut self) -> Vec<TimerfdArm> {
        std::mem::take(&mut self.timerfds)
    }

    /// The highest descriptor number that [`Self::install_in_child`] fills
    /// or uses for a moment, or -1 if there is none. Descriptors the child
    /// must keep (a uffd, a report pipe) should be numbered above it.
    pub fn max_target_fd(&self) -> RawFd {
        self.target_fds()
            .chain(self.watches.iter().map(|w| w.fd))
            .max()
            .unwrap_or(-1)
    }

    /// The descriptor numbers [`Self::install_in_child`] fills.
    pub fn target_fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        let opened = self
            .proc_self_files
            .iter()
            .flat_map(|file| file.targets.iter().map(|&(target, _)| target));
        self.slots.iter().map(|s| s.target).chain(opened)
    }

    /// The positions of the process's own `/proc` files that the child
    /// opens, to restore with [`super::restore_proc_self_positions`] once
    /// the process is complete: a `/proc` file's text is made when it is
    /// first read or seeked, and before then the child still has the
    /// agent's name.
    pub fn proc_self_positions(&self) -> Vec<ProcSelfPosition> {
        self.proc_self_files
            .iter()
            .filter(|file| file.offset != 0)
            .map(|file| ProcSelfPosition {
                fd: file.targets[0].0,
                path: file.path.to_string_lossy().into_owned(),
                offset: file.offset,
            })
            .collect()
    }

    /// The object installed at number `target`, to install the same open
    /// file description in another process of a tree. `None` for a number
    /// it does not fill, or one the child opens itself (its own `/proc`
    /// files).
    pub fn source_of(&self, target: RawFd) -> Option<BorrowedFd<'_>> {
        let raw = self.slots.iter().find(|s| s.target == target)?.source;
        self.objects
            .iter()
            .find(|o| std::os::fd::AsRawFd::as_raw_fd(*o) == raw)
            .map(std::os::fd::AsFd::as_fd)
    }

    /// The re-created memfd for the memfd with inode `inode` in the image
    /// (open read-write), so that restoring its shared mappings maps the same
    /// object the descriptors refer to.
    pub fn memfd(&self, inode: u64) -> Option<BorrowedFd<'_>> {
        let raw = self.memfds.iter().find(|(i, _)| *i == inode)?.1;
        self.objects
            .iter()
            .find(|o| std::os::fd::AsRawFd::as_raw_fd(*o) == raw)
            .map(std::os::fd::AsFd::as_fd)
    }

    /// Installs the descriptors in the calling process, which must be a
    /// freshly forked child that owns its whole descriptor table.
    ///
    /// Async-signal-safe: raw system calls only, no allocation, no locks, no
    /// panics, so it may run in the child of a multi-threaded agent.
    ///
    /// 1. Every source is first duplicated to a staging number above the
    ///    highest target, keep and source number, so no move can overwrite a
    ///    source still needed; the process's own `/proc` files are opened
    ///    and staged the same way.
    /// 2. Epoll watches are added: the kernel keys a watch by the file and
    ///    the number it was added with, which the process may since have
    ///    closed or given to another file, so the staged file is first
    ///    placed at that number for the `EPOLL_CTL_ADD` (the number is then
    ///    filled or closed by the next steps).
    /// 3. Each staged copy is moved to its target with `dup3`, with its
    ///    close-on-exec bit, and its file status flags are set (`F_SETFL`);
    ///    an own `/proc` file is placed at each of its numbers (its position
    ///    is restored later, see [`Self::proc_self_positions`]).
    /// 4. Every descriptor that is neither a target nor in `keep` is closed
    ///    (`close_range`).
    ///
    /// Fails with `EINVAL` if a `keep` descriptor is also a target or a
    /// watch's number, and with the error of the first system call that
    /// fails otherwise.
    pub fn install_in_child(&self, keep: &[RawFd]) -> Result<(), Errno> {
        let used = || self.target_fds().chain(self.watches.iter().map(|w| w.fd));
        if keep.iter().any(|k| used().any(|t| t == *k)) {
            return Err(Errno::EINVAL);
        }
        let highest = used()
            .chain(self.slots.iter().map(|s| s.source))
            .chain(keep.iter().copied())
            .max()
            .unwrap_or(-1);
        let base = highest.checked_add(1).ok_or(Errno::EMFILE)?;

        let mut staged = base;
        for slot in &self.slots {
            fdops::dup_to(slot.source, staged, true)?;
            staged = staged.checked_add(1).ok_or(Errno::EMFILE)?;
        }
        for file in &self.proc_self_files {
            let opened = fdops::open_path(&file.path, file.flags)?;
            if opened != staged {
                fdops::dup_to(opened, staged, true)?;
                fdops::close(opened)?;
            }
            staged = staged.checked_add(1).ok_or(Errno::EMFILE)?;
        }
        let staged_at = |index: usize| {
            i32::try_from(index)
                .ok()
                .and_then(|index| base.checked_add(index))
                .ok_or(Errno::EMFILE)
        };
        for watch in &self.watches {
            fdops::dup_to(staged_at(watch.file)?, watch.fd, true)?;
            fdops::epoll_add(staged_at(watch.epoll)?, watch.fd, watch.events, watch.data)?;
        }

        let mut staged = base;
        for slot in &self.slots {
            fdops::dup_to(staged, slot.target, slot.cloexec)?;
            if let Some(flags) = slot.status_flags {
                fdops::set_status_flags(slot.target, flags)?;
            }
            staged = staged.checked_add(1).ok_or(Errno::EMFILE)?;
        }
        for file in &self.proc_self_files {
            for &(target, cloexec) in &file.targets {
                fdops::dup_to(staged, target, cloexec)?;
            }
            staged = staged.checked_add(1).ok_or(Errno::EMFILE)?;
        }

        self.close_others(keep)
    }

    /// Closes every descriptor but the targets and `keep`, one
    /// `close_range` per gap between kept numbers, without allocating.
    fn close_others(&self, keep: &[RawFd]) -> Result<(), Errno> {
        let mut next: u32 = 0;
        loop {
            let kept = self
                .target_fds()
                .chain(keep.iter().copied())
                .filter_map(|fd| u32::try_from(fd).ok())
                .filter(|fd| *fd >= next)
                .min();
            match kept {
                Some(fd) => {
                    if fd > next {
                        fdops::close_range(next, fd - 1)?;
                    }
                    match fd.checked_add(1) {
                        Some(after) => next = after,
                        None => return Ok(()),
                    }
                }
                None => return fdops::close_range(next, u32::MAX),
            }
        }
    }
}
