//! Binding a re-created UNIX socket to its path, which makes the socket
//! file anew.
//!
//! `bind` fails if anything is at the path, and the process's old socket
//! file usually still is: a killed process does not remove it. That file is
//! removed only when it is *stale* and *the process's own*:
//!
//! - stale: no socket in this network namespace is bound to the path any
//!   more (`/proc/net/unix`), so removing it takes the name from no one;
//! - the process's own: it has the owner the process's socket file had at
//!   checkpoint (the old file itself, or one made by an earlier restore of
//!   the same image, which gave it that owner). The inode number cannot
//!   tell: a file system reuses the number of a removed file at once.
//!
//! Anything else (a file of another type, a socket still in use, another
//! user's socket file) is left alone and the restore is refused, naming the
//! descriptor, the path and what is there.
//!
//! The socket is bound with the restored process's file-system credentials
//! ([`PathAccess::assume`]), never through a symbolic link, and its file
//! then gets the recorded mode and owner through a descriptor of the file
//! just made, never through a name someone may have replaced since.

use std::fs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::socket::UnixAddr;
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;
use persist_common::image::FileType;

use super::FilesError;
use super::recorded::PathAccess;
use crate::sys::fscreds;

/// What the image recorded of a socket's file.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Recorded {
    /// Its permission bits.
    pub mode: Option<u32>,
    /// Its owner uid and gid.
    pub owner: Option<(u32, u32)>,
}

/// Binds `sock` (re-created for `fd`) to the socket file `path`, replacing
/// the process's own stale file there, and gives the new file the
/// recorded mode and owner. With `remove_after`, the file is removed again
/// once bound: the process's socket had lost its file before the
/// checkpoint, and keeps only its name.
pub(super) fn bind(
    fd: i32,
    sock: &OwnedFd,
    path: &str,
    recorded: &Recorded,
    remove_after: bool,
    access: &PathAccess,
) -> Result<(), FilesError> {
    let target = Path::new(path);
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(FilesError::invalid(
            fd,
            format!("bad UNIX socket path {path:?}"),
        ));
    };
    let changed = |what: String| FilesError::Changed {
        fd,
        path: path.to_owned(),
        what,
    };
    let symlink = |what: &str| changed(format!("a symbolic link is in its {what} now"));
    let _creds = access
        .assume()
        .map_err(FilesError::io(fd, "taking the process's credentials"))?;
    let dir_fd = fscreds::open_no_symlinks(dir, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty())
        .map_err(|err| match err.raw_os_error() {
            Some(libc::ELOOP) => symlink("directory's path"),
            _ => FilesError::io(fd, format!("opening the directory of UNIX socket {path}"))(err),
        })?;
    if let Ok(st) = nix::sys::stat::fstatat(&dir_fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        let file_type = FileType::from_mode(st.st_mode);
        if file_type != Some(FileType::Socket) {
            let shown = file_type.map_or("file of unknown type", FileType::as_str);
            return Err(changed(format!("a {shown} is there, not a socket file")));
        }
        if bound_in_namespace(path) {
            return Err(changed(
                "a socket that is still open is bound to it (is the checkpointed process, \
                 or another program, still running?)"
                    .into(),
            ));
        }
        if recorded.owner != Some((st.st_uid, st.st_gid)) {
            return Err(changed(format!(
                "a socket file of uid {} gid {} is there, which the process did not make",
                st.st_uid, st.st_gid
            )));
        }
        nix::unistd::unlinkat(&dir_fd, name, UnlinkatFlags::NoRemoveDir)
            .map_err(FilesError::io(fd, format!("removing stale socket {path}")))?;
    }
    let addr = UnixAddr::new(path).map_err(FilesError::io(fd, format!("UNIX address {path}")))?;
    nix::sys::socket::bind(sock.as_raw_fd(), &addr)
        .map_err(FilesError::io(fd, format!("binding UNIX socket {path}")))?;
    if remove_after {
        return nix::unistd::unlinkat(&dir_fd, name, UnlinkatFlags::NoRemoveDir)
            .map_err(FilesError::io(fd, format!("removing socket file {path}")));
    }
    if recorded.mode.is_none() && recorded.owner.is_none() {
        return Ok(());
    }
    let socket_file = nix::fcntl::openat(
        &dir_fd,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|err| match err {
        nix::errno::Errno::ELOOP => symlink("place"),
        _ => FilesError::io(fd, format!("opening the socket file {path}"))(err),
    })?;
    let file_stat = fscreds::stat(socket_file.as_fd())
        .map_err(FilesError::io(fd, format!("fstat of socket file {path}")))?;
    if FileType::from_mode(file_stat.st_mode) != Some(FileType::Socket) {
        return Err(changed("what was just bound there is no socket".into()));
    }
    if let Some(mode) = recorded.mode {
        let link = format!("/proc/self/fd/{}", socket_file.as_raw_fd());
        fs::set_permissions(&link, fs::Permissions::from_mode(mode))
            .map_err(FilesError::io(fd, format!("chmod {mode:o} {path}")))?;
    }
    if let Some((uid, gid)) = recorded.owner
        && (file_stat.st_uid, file_stat.st_gid) != (uid, gid)
    {
        nix::unistd::fchownat(
            &socket_file,
            "",
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
            AtFlags::AT_EMPTY_PATH,
        )
        .map_err(FilesError::io(fd, format!("chown {uid}:{gid} {path}")))?;
    }
    Ok(())
}

/// Whether a socket of this network namespace is bound to `path`. An
/// unreadable table counts as "yes": nothing is removed on a guess.
fn bound_in_namespace(path: &str) -> bool {
    procfs::net::unix().map_or(true, |sockets| {
        sockets
            .iter()
            .any(|s| s.path.as_deref() == Some(Path::new(path)))
    })
}
