//! epoll instances: every watch with its events and data.
//!
//! The kernel keys an epoll watch by the watched *file* and the descriptor
//! number it was added with (`tfd` in fdinfo); closing that number does not
//! remove the watch while the file is open elsewhere (a `dup`). Saved: the
//! watches from fdinfo, and for each the descriptor of the process that is
//! open on the watched file, found with `kcmp(KCMP_EPOLL_TFD)`: `tfd`
//! itself when it still names that file, else another descriptor on the
//! same inode. Restored: an empty instance here; the watches are added in
//! the child (`install.rs`) through a copy of that descriptor placed at
//! number `tfd` for the call, so the kernel keys them as before.

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use persist_common::image::{EpollWatch, FdInfo, FdKind};

use super::FilesError;
use super::fdinfo::FdInfoText;
use super::listed::Listed;
use crate::sys::kobjects;

/// An epoll instance's watches, from its fdinfo; which descriptor holds
/// each watched file is found later by [`find_watched_files`].
pub(super) fn save(fd: i32, info: &FdInfoText) -> Result<FdKind, FilesError> {
    let watches = info.epoll_watches().ok_or_else(|| {
        FilesError::unsupported(fd, "[eventpoll]: unexpected fdinfo (no readable tfd lines)")
    })?;
    Ok(FdKind::Epoll {
        watches: watches.into_iter().map(|(w, _)| w).collect(),
    })
}

/// Finds, for every watch of every epoll instance in `saved`, a descriptor
/// of process `pid` open on the watched file, and records it in
/// [`EpollWatch::file_fd`] when it is not the watch's own number. A watch
/// whose file is open nowhere in the process (kept alive by another
/// process) is refused.
pub(super) fn find_watched_files(
    pid: i32,
    listed: &[Listed],
    saved: &mut [FdInfo],
) -> Result<(), FilesError> {
    let mut resolved: HashMap<i32, Vec<EpollWatch>> = HashMap::new();
    for entry in listed
        .iter()
        .filter(|e| e.target == "anon_inode:[eventpoll]")
    {
        let Some(info) = saved.iter().find(|s| s.fd == entry.fd) else {
            continue;
        };
        if info.shared_with.is_some() {
            continue;
        }
        let watches = entry.info.epoll_watches().unwrap_or_default();
        let mut nth_of_tfd: HashMap<i32, u32> = HashMap::new();
        let mut found = Vec::with_capacity(watches.len());
        for (mut watch, ino) in watches {
            // kcmp finds a watch by its number and its rank among the
            // watches added with that number, in fdinfo's order.
            let nth = nth_of_tfd.entry(watch.fd).or_default();
            let holder = holder(pid, entry.fd, &watch, *nth, ino, listed)?;
            *nth += 1;
            watch.file_fd = (holder != watch.fd).then_some(holder);
            found.push(watch);
        }
        resolved.insert(entry.fd, found);
    }
    for info in saved.iter_mut() {
        let key = info.shared_with.unwrap_or(info.fd);
        if let (FdKind::Epoll { watches }, Some(found)) = (&mut info.kind, resolved.get(&key)) {
            watches.clone_from(found);
        }
    }
    Ok(())
}

/// The descriptor of `pid` open on the file that `epoll` watches as
/// `watch.fd` (the `nth` such watch): the watch's own number if it still
/// names that file, else the lowest other descriptor that does.
fn holder(
    pid: i32,
    epoll: i32,
    watch: &EpollWatch,
    nth: u32,
    ino: u64,
    listed: &[Listed],
) -> Result<i32, FilesError> {
    let own = listed.iter().filter(|o| o.fd == watch.fd);
    let others = listed
        .iter()
        .filter(|o| o.fd != watch.fd && (ino == 0 || o.info.ino == ino));
    for candidate in own.chain(others) {
        let same = kobjects::same_epoll_target(pid, candidate.fd, pid, epoll, watch.fd, nth)
            .map_err(FilesError::io(
                epoll,
                format!(
                    "comparing fd {} with the file watched as fd {} (kcmp)",
                    candidate.fd, watch.fd
                ),
            ))?;
        if same {
            return Ok(candidate.fd);
        }
    }
    Err(FilesError::unsupported(
        epoll,
        format!(
            "epoll watches fd {}, which was closed after being added, and its file (inode {ino}) \
             is open nowhere else in the process",
            watch.fd
        ),
    ))
}

/// A new, empty epoll instance.
pub(super) fn create(fd: i32) -> Result<OwnedFd, FilesError> {
    kobjects::epoll().map_err(FilesError::io(fd, "epoll_create1"))
}
