//! Pipes and FIFOs, with their unread data.
//!
//! Saved: each end, and the pipe's unread data and capacity once per pipe,
//! copied with `tee(2)` without consuming them; a FIFO also by path.
//! Restored: one pipe per saved pipe inode, refilled; a FIFO reopened by
//! path (as the process) and refilled; a write end whose reader was outside
//! the process writes to /dev/null.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::OFlag;
use persist_common::image::{FdInfo, FdKind, FileIdentity, FileType};

use super::FilesError;
use super::listed::Listed;
use super::open::{open_recorded, open_with, recorded_error};
use super::recorded::{self, PathAccess};
use crate::sys::kobjects;

/// Bigger pipes than this need `F_SETPIPE_SZ` before being refilled.
pub(super) const DEFAULT_PIPE_SIZE: usize = 65536;

/// A pipe or FIFO end. Unread data and capacity are saved once per pipe:
/// on the first read end in the process, or on the first end if the process
/// has no read end.
pub(super) fn save(
    pid: i32,
    entry: &Listed,
    listed: &[Listed],
    fifo: Option<(String, Option<FileIdentity>)>,
) -> Result<FdKind, FilesError> {
    let (fifo_path, fifo_identity) = fifo.unzip();
    let inode = entry.info.ino;
    let same_pipe = |other: &&Listed| other.info.ino == inode && other.target == entry.target;
    let holder = listed
        .iter()
        .filter(same_pipe)
        .find(|o| !o.write_only())
        .or_else(|| listed.iter().find(same_pipe))
        .map(|o| o.fd);
    // The holder is never a dup: a dup is numbered above what it duplicates.
    let (data, capacity) = if holder == Some(entry.fd) {
        peek(pid, entry.fd)?
    } else {
        (Vec::new(), 0)
    };
    Ok(FdKind::Pipe {
        inode,
        write_end: entry.write_only(),
        fifo_path,
        data,
        capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
        fifo_identity: fifo_identity.flatten(),
    })
}

/// Returns the bytes waiting in the pipe or FIFO behind descriptor `fd` of
/// process `pid`, leaving them in place, and the pipe's capacity.
///
/// A new read end is opened through `/proc/PID/fd/N` (which works whichever
/// end the process holds), and `tee(2)` copies the pipe's buffers into a
/// scratch pipe at least as large, in one call so nothing is copied twice.
fn peek(pid: i32, fd: i32) -> Result<(Vec<u8>, usize), FilesError> {
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

/// Pipes and FIFOs, re-created once per saved pipe inode.
pub(super) struct Pipes<'a> {
    saved: &'a [FdInfo],
    made: HashMap<u64, MadePipe>,
}

enum MadePipe {
    /// An anonymous pipe: the read end, and the write end if the process had one.
    Anonymous {
        read: OwnedFd,
        write: Option<OwnedFd>,
    },
    /// A FIFO, held open read-write while its ends are opened so neither
    /// open blocks or fails and the refilled data stays.
    Fifo { holder: File },
}

impl<'a> Pipes<'a> {
    /// Pipes of the image `saved`.
    pub fn new(saved: &'a [FdInfo]) -> Self {
        Self {
            saved,
            made: HashMap::new(),
        }
    }

    /// The saved ends of pipe `inode` (FIFOs and anonymous pipes apart).
    /// (write end, data, capacity) of each saved end.
    fn ends(
        &self,
        inode: u64,
        fifo: Option<&str>,
    ) -> impl Iterator<Item = (bool, &'a [u8], u32)> + 'a {
        let fifo = fifo.map(str::to_owned);
        self.saved.iter().filter_map(move |s| match &s.kind {
            FdKind::Pipe {
                inode: i,
                write_end,
                fifo_path,
                data,
                capacity,
                ..
            } if *i == inode && fifo_path.as_deref() == fifo.as_deref() => {
                Some((*write_end, data.as_slice(), *capacity))
            }
            _ => None,
        })
    }

    /// The pipe's saved data and capacity (both saved on one end).
    fn contents(&self, inode: u64, fifo: Option<&str>) -> (&'a [u8], usize) {
        let data = self
            .ends(inode, fifo)
            .map(|(_, d, _)| d)
            .find(|d| !d.is_empty())
            .unwrap_or_default();
        let capacity = self.ends(inode, fifo).map(|(_, _, c)| c).max().unwrap_or(0);
        (data, capacity as usize)
    }

    /// The descriptor for one saved pipe end.
    pub fn end(
        &mut self,
        info: &FdInfo,
        inode: u64,
        fifo: Option<(&str, Option<&FileIdentity>)>,
        access: &PathAccess,
    ) -> Result<OwnedFd, FilesError> {
        let fd = info.fd;
        let write_end = info.flags as i32 & libc::O_ACCMODE == libc::O_WRONLY;
        if let Some((path, identity)) = fifo {
            if !self.made.contains_key(&inode) {
                let holder = open_recorded(
                    info,
                    path,
                    (libc::O_RDWR | libc::O_NONBLOCK) as u32,
                    identity,
                    &[FileType::Fifo],
                    access,
                )?;
                fill_pipe(fd, holder.as_fd(), self.contents(inode, Some(path)))?;
                self.made.insert(inode, MadePipe::Fifo { holder });
            }
            let Some(MadePipe::Fifo { holder }) = self.made.get(&inode) else {
                return Err(FilesError::invalid(
                    fd,
                    format!("pipe inode {inode} is both a FIFO and an anonymous pipe"),
                ));
            };
            // The end is the same FIFO as the holder, opened again with the
            // process's permission check, not the path looked up again.
            let flags = (info.flags as i32 & libc::O_ACCMODE) | libc::O_NONBLOCK;
            let end = recorded::reopen(holder, OFlag::from_bits_retain(flags), access)
                .map_err(|err| recorded_error(fd, path, err))?;
            return Ok(end.into());
        }

        let has_read = self.ends(inode, None).any(|(w, _, _)| !w);
        if write_end && !has_read {
            // The reader was outside the process and is gone: writes go
            // nowhere rather than failing with EPIPE (or killing with SIGPIPE).
            tracing::warn!(
                fd,
                inode,
                "pipe write end without its reader; using /dev/null instead"
            );
            let null = open_with(Path::new("/dev/null"), libc::O_WRONLY as u32).map_err(
                FilesError::io(fd, "opening /dev/null for a pipe whose reader is gone"),
            )?;
            return Ok(null.into());
        }
        if !self.made.contains_key(&inode) {
            let (read, write) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                    .map_err(FilesError::io(fd, "pipe2"))?;
            fill_pipe(fd, write.as_fd(), self.contents(inode, None))?;
            // Without a writer in the process the reader sees the data, then end-of-file.
            let has_write = self.ends(inode, None).any(|(w, _, _)| w);
            self.made.insert(
                inode,
                MadePipe::Anonymous {
                    read,
                    write: has_write.then_some(write),
                },
            );
        }
        let Some(MadePipe::Anonymous { read, write }) = self.made.get(&inode) else {
            return Err(FilesError::invalid(
                fd,
                format!("pipe inode {inode} is both a FIFO and an anonymous pipe"),
            ));
        };
        let end = if write_end {
            write.as_ref()
        } else {
            Some(read)
        };
        end.ok_or_else(|| FilesError::invalid(fd, "pipe end missing"))?
            .try_clone()
            .map_err(FilesError::io(fd, "duplicating a pipe end"))
    }
}

/// Gives a pipe its saved capacity and writes its data back. The capacity
/// is best effort (above `pipe-max-size` it needs `CAP_SYS_RESOURCE`), but
/// the pipe must grow enough to hold the data.
fn fill_pipe(
    fd: i32,
    write: BorrowedFd<'_>,
    (data, capacity): (&[u8], usize),
) -> Result<(), FilesError> {
    if capacity > DEFAULT_PIPE_SIZE
        && let Err(err) = kobjects::set_pipe_size(write, capacity)
    {
        tracing::warn!(fd, capacity, "cannot restore the pipe's capacity: {err}");
    }
    if data.is_empty() {
        return Ok(());
    }
    let size = kobjects::pipe_size(write).map_err(FilesError::io(fd, "F_GETPIPE_SZ"))?;
    if data.len() > size {
        kobjects::set_pipe_size(write, data.len()).map_err(FilesError::io(
            fd,
            format!("F_SETPIPE_SZ {} for the pipe's data", data.len()),
        ))?;
    }
    let mut file = File::from(
        write
            .try_clone_to_owned()
            .map_err(FilesError::io(fd, "dup"))?,
    );
    file.write_all(data).map_err(FilesError::io(
        fd,
        format!("refilling the pipe with {} bytes", data.len()),
    ))
}
