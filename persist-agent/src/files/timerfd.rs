//! timerfd: clock, settings, time left and unread ticks, both directions.

use std::os::fd::{AsFd, OwnedFd};

use persist_common::image::FdKind;

use super::FilesError;
use super::fdinfo::FdInfoText;
use crate::sys::kobjects;

/// A timerfd's clock, settings, time left and unread ticks, from its fdinfo.
pub(super) fn save(fd: i32, info: &FdInfoText) -> Result<FdKind, FilesError> {
    let t = info.timerfd().ok_or_else(|| {
        FilesError::unsupported(fd, "[timerfd]: unexpected fdinfo (no timer settings)")
    })?;
    Ok(FdKind::Timerfd {
        clock: t.clock,
        settime_flags: t.settime_flags,
        interval_ns: t.interval_ns,
        value_ns: t.value_ns,
        ticks: t.ticks,
    })
}

pub(super) fn create(
    fd: i32,
    clock: i32,
    settime_flags: i32,
    interval_ns: u64,
    value_ns: u64,
    ticks: u64,
) -> Result<OwnedFd, FilesError> {
    let timer = kobjects::timerfd(clock).map_err(FilesError::io(
        fd,
        format!("timerfd_create on clock {clock}"),
    ))?;
    // A periodic timer that expired and was not read yet shows no time
    // left: the kernel only re-arms it on the next read. The restored one
    // runs on, its next expiry one interval away, the unread ticks kept.
    let left = if value_ns == 0 { interval_ns } else { value_ns };
    if left > 0 {
        // The saved value is the time left; an absolute timer needs it
        // turned back into a deadline on its clock.
        let value = if settime_flags & libc::TFD_TIMER_ABSTIME != 0 {
            let now = kobjects::clock_now_ns(clock)
                .map_err(FilesError::io(fd, format!("clock_gettime {clock}")))?;
            now.saturating_add(left)
        } else {
            left
        };
        kobjects::timerfd_settime(&timer, settime_flags, value, interval_ns)
            .map_err(FilesError::io(fd, "timerfd_settime"))?;
    }
    if ticks > 0 {
        kobjects::timerfd_set_ticks(timer.as_fd(), ticks)
            .map_err(FilesError::io(fd, "TFD_IOC_SET_TICKS"))?;
    }
    Ok(timer.into())
}
