//! Installing prepared descriptors in a forked child.

use std::ffi::{CStr, CString};
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;

use super::timerfd::TimerfdArm;
use crate::sys::fdops;
use crate::sys::spawner::SharedArena;

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
/// open in the agent, ready for [`ChildFds::install_in_child`].
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
    /// The same, as the child reads them ([`encode_own_proc`]).
    pub(super) own_proc: Vec<u8>,
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

    /// What the forked child needs to install the descriptors.
    pub fn child_fds(&self) -> ChildFds<'_> {
        ChildFds {
            slots: &self.slots,
            watches: &self.watches,
            own_proc: &self.own_proc,
        }
    }

    /// The highest descriptor number that [`ChildFds::install_in_child`]
    /// fills or uses for a moment, or -1 if there is none. Descriptors the
    /// child must keep (a uffd, a report pipe) should be numbered above it.
    pub fn max_target_fd(&self) -> RawFd {
        self.child_fds().max_target_fd()
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
}

/// What a forked child needs of [`PreparedFds`] to install the descriptors:
/// plain data, borrowed, which [`ChildFds::copy_into`] can also place in
/// memory another process maps (`restore/spawner.rs`).
#[derive(Debug, Clone, Copy)]
pub struct ChildFds<'a> {
    slots: &'a [Slot],
    watches: &'a [Watch],
    /// The process's own `/proc` files, in the form [`encode_own_proc`]
    /// gives them.
    own_proc: &'a [u8],
}

impl<'a> ChildFds<'a> {
    /// The descriptor numbers [`Self::install_in_child`] fills.
    fn target_fds(&self) -> impl Iterator<Item = RawFd> + use<'a> {
        let opened =
            OwnProcFiles(self.own_proc).flat_map(|file| file.targets().map(|(target, _)| target));
        self.slots.iter().map(|s| s.target).chain(opened)
    }

    fn max_target_fd(&self) -> RawFd {
        self.target_fds()
            .chain(self.watches.iter().map(|w| w.fd))
            .max()
            .unwrap_or(-1)
    }

    /// The highest of the agent's descriptors the child installs from, or
    /// -1 if there is none.
    pub fn max_source_fd(&self) -> RawFd {
        self.slots.iter().map(|s| s.source).max().unwrap_or(-1)
    }

    fn own_proc_files(&self) -> OwnProcFiles<'a> {
        OwnProcFiles(self.own_proc)
    }

    /// The same, its data copied into `arena` (`restore/spawner.rs`).
    pub fn copy_into(&self, arena: &mut SharedArena) -> Option<ChildFds<'static>> {
        Some(ChildFds {
            slots: arena.copy_slice(self.slots)?,
            watches: arena.copy_slice(self.watches)?,
            own_proc: arena.copy_slice(self.own_proc)?,
        })
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
    ///    is restored later, see [`PreparedFds::proc_self_positions`]).
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
        for slot in self.slots {
            fdops::dup_to(slot.source, staged, true)?;
            staged = staged.checked_add(1).ok_or(Errno::EMFILE)?;
        }
        for file in self.own_proc_files() {
            let opened = fdops::open_path(file.path, file.flags)?;
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
        for watch in self.watches {
            fdops::dup_to(staged_at(watch.file)?, watch.fd, true)?;
            fdops::epoll_add(staged_at(watch.epoll)?, watch.fd, watch.events, watch.data)?;
        }

        let mut staged = base;
        for slot in self.slots {
            fdops::dup_to(staged, slot.target, slot.cloexec)?;
            if let Some(flags) = slot.status_flags {
                fdops::set_status_flags(slot.target, flags)?;
            }
            staged = staged.checked_add(1).ok_or(Errno::EMFILE)?;
        }
        for file in self.own_proc_files() {
            for (target, cloexec) in file.targets() {
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

/// The process's own `/proc` files as one run of bytes, read in the child
/// without allocating ([`OwnProcFiles`]). Each file: its open flags, the
/// number of its descriptors, each descriptor's number and close-on-exec
/// bit, the length of its path with the NUL, the path, then padding to
/// four bytes. Words are native-endian: the bytes never leave the host.
pub(super) fn encode_own_proc(files: &[ProcSelfFile]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for file in files {
        let path = file.path.as_bytes_with_nul();
        bytes.extend_from_slice(&file.flags.to_ne_bytes());
        bytes.extend_from_slice(&(file.targets.len() as u32).to_ne_bytes());
        for &(fd, cloexec) in &file.targets {
            bytes.extend_from_slice(&fd.to_ne_bytes());
            bytes.extend_from_slice(&u32::from(cloexec).to_ne_bytes());
        }
        bytes.extend_from_slice(&(path.len() as u32).to_ne_bytes());
        bytes.extend_from_slice(path);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
    }
    bytes
}

/// One of the process's own `/proc` files, read from [`encode_own_proc`]'s
/// bytes.
struct OwnProcFile<'a> {
    path: &'a CStr,
    flags: i32,
    targets: &'a [u8],
}

impl<'a> OwnProcFile<'a> {
    /// Each number it is installed at, with its close-on-exec bit.
    fn targets(&self) -> impl Iterator<Item = (RawFd, bool)> + use<'a> {
        self.targets
            .chunks_exact(8)
            .map(|pair| (word(pair, 0) as RawFd, word(pair, 4) != 0))
    }
}

/// The files of [`encode_own_proc`]'s bytes. Bytes that end early end the
/// files: the agent encoded them itself.
struct OwnProcFiles<'a>(&'a [u8]);

impl<'a> Iterator for OwnProcFiles<'a> {
    type Item = OwnProcFile<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        let bytes = self.0;
        let flags = word(bytes.get(..4)?, 0) as i32;
        let count = word(bytes.get(4..8)?, 0) as usize;
        let targets_end = 8usize.checked_add(count.checked_mul(8)?)?;
        let targets = bytes.get(8..targets_end)?;
        let path_len = word(bytes.get(targets_end..targets_end.checked_add(4)?)?, 0) as usize;
        let path_start = targets_end + 4;
        let path_end = path_start.checked_add(path_len)?;
        let path = CStr::from_bytes_with_nul(bytes.get(path_start..path_end)?).ok()?;
        self.0 = bytes
            .get(path_end.next_multiple_of(4)..)
            .unwrap_or_default();
        Some(OwnProcFile {
            path,
            flags,
            targets,
        })
    }
}

/// The native-endian 32-bit word at `at` in `bytes`, which holds it.
fn word(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_ne_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_proc_file(path: &str, flags: i32, targets: &[(RawFd, bool)]) -> ProcSelfFile {
        ProcSelfFile {
            path: CString::new(path).unwrap(),
            flags,
            offset: 0,
            targets: targets.to_vec(),
        }
    }

    #[test]
    fn own_proc_files_read_back_as_encoded() {
        let files = [
            own_proc_file("/proc/self/status", libc::O_RDONLY, &[(3, true)]),
            own_proc_file("/proc/thread-self/stat", 2, &[(7, false), (9, true)]),
            own_proc_file("/proc/self/x", 0, &[]),
        ];
        type File = (String, i32, Vec<(RawFd, bool)>);
        let bytes = encode_own_proc(&files);
        let read: Vec<File> = OwnProcFiles(&bytes)
            .map(|file| {
                (
                    file.path.to_str().unwrap().to_owned(),
                    file.flags,
                    file.targets().collect(),
                )
            })
            .collect();
        let expected: Vec<File> = files
            .iter()
            .map(|file| {
                (
                    file.path.to_str().unwrap().to_owned(),
                    file.flags,
                    file.targets.clone(),
                )
            })
            .collect();
        assert_eq!(read, expected);
        // Cut anywhere before the last path's NUL (at most three bytes of
        // padding follow it), the bytes give only the files before the cut.
        for cut in 0..bytes.len() - 3 {
            assert!(OwnProcFiles(&bytes[..cut]).count() < files.len(), "{cut}");
        }
    }
}
