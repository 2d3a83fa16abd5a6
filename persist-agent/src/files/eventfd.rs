//! eventfd: its counter and semaphore mode, both directions.

use std::os::fd::OwnedFd;

use persist_common::image::FdKind;

use super::FilesError;
use super::fdinfo::FdInfoText;
use crate::sys::kobjects;

/// An eventfd's counter and mode, from its fdinfo.
pub(super) fn save(fd: i32, info: &FdInfoText) -> Result<FdKind, FilesError> {
    let (count, semaphore) = info.eventfd().ok_or_else(|| {
        FilesError::unsupported(fd, "[eventfd]: unexpected fdinfo (no eventfd-count)")
    })?;
    Ok(FdKind::Eventfd { count, semaphore })
}

/// A new eventfd with the saved counter and mode.
pub(super) fn create(fd: i32, count: u64, semaphore: bool) -> Result<OwnedFd, FilesError> {
    let flags = if semaphore { libc::EFD_SEMAPHORE } else { 0 };
    kobjects::eventfd(count, flags).map_err(FilesError::io(fd, "eventfd"))
}
