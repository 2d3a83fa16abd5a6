//! epoll instances: every watch with its events and data.
//!
//! Saved: the watches from fdinfo, each checked to still name the file it
//! was added for. Restored: an empty instance here; the watches are added
//! in the child once every descriptor has its final number (`install.rs`).

use std::os::fd::OwnedFd;

use persist_common::image::FdKind;

use super::FilesError;
use super::fdinfo::FdInfoText;
use super::listed::Listed;
use crate::sys::kobjects;

/// An epoll instance's watches, from its fdinfo.
pub(super) fn save(fd: i32, info: &FdInfoText) -> Result<FdKind, FilesError> {
    let watches = info.epoll_watches().ok_or_else(|| {
        FilesError::unsupported(fd, "[eventpoll]: unexpected fdinfo (no readable tfd lines)")
    })?;
    Ok(FdKind::Epoll {
        watches: watches.into_iter().map(|(w, _)| w).collect(),
    })
}

/// An epoll instance is keyed by (file, descriptor number): a watch whose
/// number was closed, or now names another file, cannot be re-added.
pub(super) fn check_epoll_targets(listed: &[Listed]) -> Result<(), FilesError> {
    for epoll in listed
        .iter()
        .filter(|e| e.target == "anon_inode:[eventpoll]")
    {
        for (watch, ino) in epoll.info.epoll_watches().unwrap_or_default() {
            match listed.iter().find(|o| o.fd == watch.fd) {
                None => {
                    return Err(FilesError::unsupported(
                        epoll.fd,
                        format!(
                            "epoll watches fd {}, which was closed after being added",
                            watch.fd
                        ),
                    ));
                }
                Some(target) if ino != 0 && target.info.ino != ino => {
                    return Err(FilesError::unsupported(
                        epoll.fd,
                        format!(
                            "epoll watches a file that fd {} no longer refers to",
                            watch.fd
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// A new, empty epoll instance.
pub(super) fn create(fd: i32) -> Result<OwnedFd, FilesError> {
    kobjects::epoll().map_err(FilesError::io(fd, "epoll_create1"))
}
