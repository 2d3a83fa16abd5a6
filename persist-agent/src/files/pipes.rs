//! Copying the unread data of a pipe without consuming it.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::OFlag;

use super::FilesError;
use crate::sys::kobjects;

/// Returns the bytes waiting in the pipe or FIFO behind descriptor `fd` of
/// process `pid`, leaving them in place, and the pipe's capacity.
///
/// A new read end is opened through `/proc/PID/fd/N` (which works whichever
/// end the process holds), and `tee(2)` copies the pipe's buffers into a
/// scratch pipe at least as large, in one call so nothing is copied twice.
pub(super) fn peek(pid: i32, fd: i32) -> Result<(Vec<u8>, usize), FilesError> {
    let link = format!("/proc/{pid}/fd/{fd}");
    let reader = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&link)
        .map_err(FilesError::io(
            fd,
            format!("opening a read end through {link}"),
        ))?;
    let capacity =
        kobjects::pipe_size(reader.as_fd()).map_err(FilesError::io(fd, "F_GETPIPE_SZ"))?;

    let (scratch_read, scratch_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        .map_err(FilesError::io(fd, "pipe2"))?;
    let scratch_capacity =
        kobjects::pipe_size(scratch_write.as_fd()).map_err(FilesError::io(fd, "F_GETPIPE_SZ"))?;
    if scratch_capacity < capacity {
        kobjects::set_pipe_size(scratch_write.as_fd(), capacity).map_err(FilesError::io(
            fd,
            format!("F_SETPIPE_SZ {capacity} on a scratch pipe"),
        ))?;
    }
    let copied = kobjects::tee(reader.as_fd(), scratch_write.as_fd(), capacity)
        .map_err(FilesError::io(fd, "tee into a scratch pipe"))?;
    drop(scratch_write);

    let mut data = Vec::with_capacity(copied);
    File::from(scratch_read)
        .read_to_end(&mut data)
        .map_err(FilesError::io(fd, "reading the scratch pipe"))?;
    Ok((data, capacity))
}
