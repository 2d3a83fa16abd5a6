//! Opening the paths of an image as the process it restores would.
//!
//! [`FsCreds::assume`] gives the *calling thread* another fsuid, fsgid and
//! supplementary groups until the returned guard is dropped. The raw
//! system calls change only the calling thread's credentials (glibc's
//! `setgroups` and `setfsuid` wrappers may apply them to every thread of the
//! agent). While the fsuid is not 0 the kernel clears the file-system
//! capabilities (`CAP_DAC_OVERRIDE`, `CAP_FOWNER`, `CAP_CHOWN`, ...) from the
//! thread's effective set, and raises them again from the permitted set
//! when the fsuid goes back to 0: a root-owned file mode 0600 is out of
//! reach meanwhile, as it is for the process itself.
//!
//! [`open_no_symlinks`] resolves a path without following any symbolic link
//! (`openat2` with `RESOLVE_NO_SYMLINKS`), for paths recorded from
//! `/proc/PID/fd` and `/proc/PID/maps`, which the kernel already resolved.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

/// The file-system credentials of a process: whose files it may open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsCreds {
    /// File-system user id.
    pub uid: u32,
    /// File-system group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Gives the calling thread its previous file-system credentials back when
/// dropped. Not `Send`: credentials belong to one thread.
#[derive(Debug)]
pub struct FsCredsGuard {
    previous: FsCreds,
    _thread_bound: PhantomData<*const ()>,
}

impl FsCreds {
    /// The calling thread's own file-system credentials.
    pub fn current() -> io::Result<Self> {
        Ok(Self {
            uid: set_fsuid(u32::MAX),
            gid: set_fsgid(u32::MAX),
            groups: get_groups()?,
        })
    }

    /// Makes the calling thread open files as `self` until the guard is
    /// dropped. Fails (changing nothing) when the thread may not take them
    /// (no `CAP_SETUID` or `CAP_SETGID`).
    pub fn assume(&self) -> io::Result<FsCredsGuard> {
        let previous = Self::current()?;
        let guard = FsCredsGuard {
            previous,
            _thread_bound: PhantomData,
        };
        // Groups and gid first: setting them needs CAP_SETGID, which stays
        // effective whatever the fsuid, but clearing this way round keeps
        // the order of the drop simple. The guard undoes what was done if
        // one step fails.
        set_groups(&self.groups)?;
        set_fsgid(self.gid);
        if set_fsgid(u32::MAX) != self.gid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("setfsgid {} was refused", self.gid),
            ));
        }
        set_fsuid(self.uid);
        if set_fsuid(u32::MAX) != self.uid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("setfsuid {} was refused", self.uid),
            ));
        }
        Ok(guard)
    }
}

impl Drop for FsCredsGuard {
    fn drop(&mut self) {
        // fsuid first: back to 0 it gives the file-system capabilities back;
        // CAP_SETUID and CAP_SETGID are not among those cleared, so every
        // step succeeds for a thread that could take the credentials.
        set_fsuid(self.previous.uid);
        set_fsgid(self.previous.gid);
        if let Err(err) = set_groups(&self.previous.groups) {
            tracing::error!("cannot give the thread its supplementary groups back: {err}");
        }
        if set_fsuid(u32::MAX) != self.previous.uid || set_fsgid(u32::MAX) != self.previous.gid {
            tracing::error!(
                uid = self.previous.uid,
                gid = self.previous.gid,
                "cannot give the thread its file-system ids back"
            );
        }
    }
}

/// `setfsuid(uid)` for the calling thread; returns the previous fsuid.
/// `u32::MAX` (-1) changes nothing and reads the current one.
fn set_fsuid(uid: u32) -> u32 {
    // SAFETY: setfsuid takes an integer and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_setfsuid, libc::c_long::from(uid)) as u32 }
}

/// `setfsgid(gid)` for the calling thread; returns the previous fsgid.
fn set_fsgid(gid: u32) -> u32 {
    // SAFETY: setfsgid takes an integer and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_setfsgid, libc::c_long::from(gid)) as u32 }
}

/// `setgroups` for the calling thread only.
fn set_groups(groups: &[u32]) -> io::Result<()> {
    // SAFETY: the kernel reads `groups.len()` gids from a live slice.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's supplementary groups.
fn get_groups() -> io::Result<Vec<u32>> {
    // SAFETY: with a size of 0 the kernel only returns the count.
    let count = unsafe { libc::syscall(libc::SYS_getgroups, 0, std::ptr::null_mut::<u32>()) };
    if count < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut groups = vec![0u32; count as usize];
    // SAFETY: the kernel writes at most `groups.len()` gids into the vector.
    let count = unsafe { libc::syscall(libc::SYS_getgroups, groups.len(), groups.as_mut_ptr()) };
    if count < 0 {
        return Err(io::Error::last_os_error());
    }
    groups.truncate(count as usize);
    Ok(groups)
}

/// Opens `path` with `flags` (and `mode`, when creating) without following
/// a symbolic link in any of its components; a symlink fails with `ELOOP`.
pub fn open_no_symlinks(path: &Path, flags: OFlag, mode: Mode) -> io::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(mode)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    nix::fcntl::openat2(nix::fcntl::AT_FDCWD, path, how).map_err(io::Error::from)
}

/// Opens the file `fd` refers to (an `O_PATH` descriptor, say) again with
/// `flags`, through `/proc/self/fd`: the open checks the permissions of the
/// calling thread, as an open by path would, but cannot land on another file.
pub fn reopen(fd: BorrowedFd<'_>, flags: OFlag) -> io::Result<File> {
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    // open(2), not openat2: saved status flags may hold bits openat2 refuses.
    nix::fcntl::open(link.as_str(), flags | OFlag::O_CLOEXEC, Mode::empty())
        .map(File::from)
        .map_err(io::Error::from)
}

/// `fstat` of `fd`, for the identity of what it opened.
pub fn stat(fd: BorrowedFd<'_>) -> io::Result<nix::sys::stat::FileStat> {
    nix::sys::stat::fstat(fd.as_fd()).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const NOBODY: u32 = 65534;

    fn effective_caps() -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .unwrap();
        u64::from_str_radix(line.trim(), 16).unwrap()
    }

    /// Runs `test` in a thread of its own, so that nothing else of the test
    /// binary runs with its credentials.
    fn in_own_thread(test: impl FnOnce() + Send + 'static) {
        std::thread::spawn(test).join().expect("test thread");
    }

    #[test]
    fn guard_drops_and_restores_root_file_access() {
        in_own_thread(|| {
            let dir = tempfile::tempdir().unwrap();
            let secret = dir.path().join("secret");
            std::fs::write(&secret, "root only").unwrap();
            std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
            let before = FsCreds::current().unwrap();
            let caps_before = effective_caps();
            // CAP_DAC_OVERRIDE is capability 1.
            let dac_override = 1u64 << 1;
            assert_ne!(caps_before & dac_override, 0, "tests run as root");
            {
                let nobody = FsCreds {
                    uid: NOBODY,
                    gid: NOBODY,
                    groups: vec![NOBODY],
                };
                let _guard = nobody.assume().unwrap();
                assert_eq!(FsCreds::current().unwrap(), nobody);
                assert_eq!(
                    effective_caps() & dac_override,
                    0,
                    "CAP_DAC_OVERRIDE must be gone while the fsuid is nobody's"
                );
                let err = std::fs::File::open(&secret).expect_err("nobody opened root's 0600 file");
                assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
            }
            assert_eq!(
                FsCreds::current().unwrap(),
                before,
                "credentials not given back"
            );
            assert_eq!(effective_caps(), caps_before, "capabilities not given back");
            std::fs::File::open(&secret).expect("root reads its file again after the guard");
        });
    }

    #[test]
    fn guard_changes_only_the_calling_thread() {
        let (started, wait) = std::sync::mpsc::channel();
        let (finish, done) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            let nobody = FsCreds {
                uid: NOBODY,
                gid: NOBODY,
                groups: Vec::new(),
            };
            let _guard = nobody.assume().unwrap();
            started.send(()).unwrap();
            done.recv().unwrap();
        });
        wait.recv().unwrap();
        in_own_thread(|| {
            let mine = FsCreds::current().unwrap();
            assert_eq!(
                (mine.uid, mine.gid),
                (0, 0),
                "another thread's guard changed this thread's fsuid"
            );
        });
        finish.send(()).unwrap();
        other.join().unwrap();
    }

    #[test]
    fn open_no_symlinks_refuses_a_symlink_in_any_component() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::fs::write(dir.path().join("real/file"), "x").unwrap();
        std::os::unix::fs::symlink("real", dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink("file", dir.path().join("real/last")).unwrap();
        let open =
            |name: &str| open_no_symlinks(&dir.path().join(name), OFlag::O_PATH, Mode::empty());
        open("real/file").expect("a path without symlinks opens");
        for name in ["link/file", "real/last"] {
            let err = open(name).expect_err(name);
            assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{name}: {err}");
        }
    }
}
