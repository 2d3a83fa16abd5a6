//! timerfd: clock, settings, time left and unread ticks, both directions.
//!
//! A timerfd is re-created unarmed when the skeleton is prepared and armed
//! with its time left only when the process resumes ([`TimerfdArm`]): its
//! clock runs on while the skeleton waits for its wake, which may be
//! hours later.

use std::os::fd::{AsFd, OwnedFd};

use nix::sys::timerfd::TimerFd;
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

/// What arms a re-created timerfd as it was at the checkpoint: the agent
/// keeps the timer and calls [`TimerfdArm::arm`] right before the process
/// resumes.
#[derive(Debug)]
pub struct TimerfdArm {
    /// The descriptor number in the process, for messages.
    fd: i32,
    timer: TimerFd,
    clock: i32,
    settime_flags: i32,
    /// Time to the first expiry, counted from the arming.
    left_ns: u64,
    interval_ns: u64,
    ticks: u64,
}

impl TimerfdArm {
    /// Arms the timer with its time left, counted from now, and gives it
    /// back its unread ticks (after the settime, which clears them).
    pub fn arm(&self) -> Result<(), FilesError> {
        let fd = self.fd;
        if self.left_ns > 0 {
            // An absolute timer needs its time left turned back into a
            // deadline on its clock.
            let value = if self.settime_flags & libc::TFD_TIMER_ABSTIME != 0 {
                let clock = self.clock;
                let now = kobjects::clock_now_ns(clock)
                    .map_err(FilesError::io(fd, format!("clock_gettime {clock}")))?;
                now.saturating_add(self.left_ns)
            } else {
                self.left_ns
            };
            kobjects::timerfd_settime(&self.timer, self.settime_flags, value, self.interval_ns)
                .map_err(FilesError::io(fd, "timerfd_settime"))?;
        }
        if self.ticks > 0 {
            kobjects::timerfd_set_ticks(self.timer.as_fd(), self.ticks)
                .map_err(FilesError::io(fd, "TFD_IOC_SET_TICKS"))?;
        }
        Ok(())
    }
}

/// Creates the timerfd for descriptor `fd`, unarmed; the returned
/// [`TimerfdArm`] arms it.
pub(super) fn create(
    fd: i32,
    clock: i32,
    settime_flags: i32,
    interval_ns: u64,
    value_ns: u64,
    ticks: u64,
) -> Result<(OwnedFd, TimerfdArm), FilesError> {
    let timer = kobjects::timerfd(clock).map_err(FilesError::io(
        fd,
        format!("timerfd_create on clock {clock}"),
    ))?;
    let object = timer
        .as_fd()
        .try_clone_to_owned()
        .map_err(FilesError::io(fd, "dup of the timerfd"))?;
    // A periodic timer that expired and was not read yet shows no time
    // left: the kernel only re-arms it on the next read. The restored one
    // runs on, its next expiry one interval away, the unread ticks kept.
    let left_ns = if value_ns == 0 { interval_ns } else { value_ns };
    let arm = TimerfdArm {
        fd,
        timer,
        clock,
        settime_flags,
        left_ns,
        interval_ns,
        ticks,
    };
    Ok((object, arm))
}
