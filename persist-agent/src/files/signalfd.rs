//! signalfd: its signal mask, both directions.

use std::os::fd::OwnedFd;

use persist_common::image::FdKind;

use super::FilesError;
use super::fdinfo::FdInfoText;
use crate::sys::kobjects;

/// A signalfd's mask, from its fdinfo.
pub(super) fn save(fd: i32, info: &FdInfoText) -> Result<FdKind, FilesError> {
    let mask = info
        .signalfd_mask()
        .ok_or_else(|| FilesError::unsupported(fd, "[signalfd]: unexpected fdinfo (no sigmask)"))?;
    Ok(FdKind::Signalfd { mask })
}

/// A new signalfd with the saved mask.
pub(super) fn create(fd: i32, mask: u64) -> Result<OwnedFd, FilesError> {
    kobjects::signalfd(mask, 0).map_err(FilesError::io(fd, "signalfd"))
}
