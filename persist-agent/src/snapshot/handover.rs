//! Finding the listening socket of a ready service and taking it over.

use std::os::fd::OwnedFd;

use persist_common::image::{FdKind, Manifest};

use super::BuildError;
use crate::sys::pidfd::PidFd;

/// The descriptor of `pid` that is a TCP socket listening on `port`, with its inode.
pub fn find_listener(pid: i32, port: u16) -> Result<(i32, u64), String> {
    let listening: Vec<u64> = procfs::net::tcp()
        .into_iter()
        .flatten()
        .chain(procfs::net::tcp6().into_iter().flatten())
        .filter(|entry| {
            entry.state == procfs::net::TcpState::Listen && entry.local_address.port() == port
        })
        .map(|entry| entry.inode)
        .collect();
    if listening.is_empty() {
        return Err(format!("nothing listens on port {port}"));
    }
    let process = procfs::process::Process::new(pid).map_err(|err| err.to_string())?;
    process
        .fd()
        .map_err(|err| err.to_string())?
        .flatten()
        .find_map(|fd| match fd.target {
            procfs::process::FDTarget::Socket(inode) if listening.contains(&inode) => {
                Some((fd.fd, inode))
            }
            _ => None,
        })
        .ok_or_else(|| format!("port {port} is held by another process"))
}

/// Takes a duplicate of the process's listener on `port`.
pub(super) fn take_listener(pidfd: &PidFd, port: u16) -> Result<(i32, OwnedFd), BuildError> {
    let pid = pidfd.pid();
    let no_listener = |reason: String| BuildError::NoListener { pid, port, reason };
    let (fd, _) = find_listener(pid, port).map_err(no_listener)?;
    let listener = pidfd
        .get_fd(fd)
        .map_err(|err| no_listener(format!("pidfd_getfd of fd {fd}: {err}")))?;
    Ok((fd, listener))
}

/// The descriptor number of the image's TCP listener on `port`.
pub fn listener_fd_in_image(manifest: &Manifest, port: u16) -> Option<i32> {
    listener_in_image(manifest, port).map(|(fd, _)| fd)
}

/// The backlog the service gave its TCP listener on `port`, as the image
/// recorded it.
pub fn listener_backlog_in_image(manifest: &Manifest, port: u16) -> Option<u32> {
    listener_in_image(manifest, port).map(|(_, backlog)| backlog)
}

fn listener_in_image(manifest: &Manifest, port: u16) -> Option<(i32, u32)> {
    manifest.fds.iter().find_map(|fd| match &fd.kind {
        FdKind::TcpListener { local, backlog, .. }
            if local.rsplit(':').next().and_then(|p| p.parse().ok()) == Some(port) =>
        {
            Some((fd.fd, *backlog))
        }
        _ => None,
    })
}
