//! inotify instances and opening files by handle, for saving and restoring
//! inotify watches.
//!
//! By hand: nix's `Inotify` hides the watch descriptor number (its
//! `WatchDescriptor` cannot be read or built), and a restore must choose
//! and check that number; neither nix nor libc wraps `open_by_handle_at`'s
//! variable-length handle or `INOTIFY_IOC_SETNEXTWD`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `MAX_HANDLE_SZ`: the longest file handle the kernel encodes.
pub const MAX_HANDLE_BYTES: usize = 128;

/// `struct file_handle` with room for the longest handle.
#[repr(C)]
struct FileHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_BYTES],
}

/// Turns a `-1`/value return into an `io::Result`.
fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Creates a close-on-exec inotify instance.
pub fn inotify() -> io::Result<OwnedFd> {
    // SAFETY: inotify_init1 takes flags only.
    let raw = check(unsafe { libc::inotify_init1(libc::IN_CLOEXEC) }.into())?;
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

/// Creates a close-on-exec inotify instance charged to user `euid`, as if
/// that user had made it: the kernel counts an instance and its watches
/// against `fs.inotify.max_user_instances` and `max_user_watches` of the
/// *effective* uid that created it, so the calling thread takes `euid` as
/// its effective uid for the call only. The thread's file-system uid
/// follows its effective uid back (do not call this under an
/// [`super::fscreds::FsCredsGuard`]).
pub fn inotify_charged_to(euid: u32) -> io::Result<OwnedFd> {
    // SAFETY: geteuid takes nothing and cannot fail.
    let own = unsafe { libc::geteuid() };
    if euid == own {
        return inotify();
    }
    set_thread_euid(euid)?;
    let created = inotify();
    if let Err(err) = set_thread_euid(own) {
        // The real or saved uid is `own`, so this cannot fail; if it did,
        // the agent's thread would go on as the service's user.
        tracing::error!("cannot take effective uid {own} back after {euid}: {err}");
        std::process::abort();
    }
    created
}

/// `setresuid(-1, euid, -1)` for the calling thread only (glibc's wrapper
/// would change every thread of the agent). Going from 0 to another uid
/// clears the effective capabilities, and back to 0 raises them again from
/// the permitted set.
fn set_thread_euid(euid: u32) -> io::Result<()> {
    let unchanged = libc::c_long::from(-1i32);
    // SAFETY: setresuid takes integers only.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_setresuid,
            unchanged,
            libc::c_long::from(euid),
            unchanged,
        )
    };
    check(rc).map(drop)
}

/// `INOTIFY_IOC_SETNEXTWD`: the next watch added to `instance` gets the
/// lowest free descriptor from `wd` on (needs `CONFIG_CHECKPOINT_RESTORE`).
pub fn set_next_wd(instance: BorrowedFd<'_>, wd: i32) -> io::Result<()> {
    const INOTIFY_IOC_SETNEXTWD: u32 = linux_raw_sys::ioctl::INOTIFY_IOC_SETNEXTWD;
    // SAFETY: this ioctl takes its argument by value and touches no memory.
    let rc = unsafe {
        libc::ioctl(
            instance.as_raw_fd(),
            INOTIFY_IOC_SETNEXTWD as _,
            libc::c_long::from(wd),
        )
    };
    check(rc.into()).map(drop)
}

/// `inotify_add_watch` on the file `target` is open on (an `O_PATH`
/// descriptor, say), through its `/proc/self/fd` link: the watch lands on
/// exactly that inode, with the permission check (read access) of the
/// calling thread. Returns the watch descriptor the kernel gave.
pub fn add_watch(instance: BorrowedFd<'_>, target: BorrowedFd<'_>, mask: u32) -> io::Result<i32> {
    let link = CString::new(format!("/proc/self/fd/{}", target.as_raw_fd()))
        .expect("a /proc/self/fd path has no NUL");
    // SAFETY: `link` is a NUL-terminated string that outlives the call.
    let wd = unsafe { libc::inotify_add_watch(instance.as_raw_fd(), link.as_ptr(), mask) };
    check(wd.into()).map(|wd| wd as i32)
}

/// `open_by_handle_at(mount, handle, flags)`: opens the file a handle from
/// fdinfo names, on the file system `mount` is on (needs
/// `CAP_DAC_READ_SEARCH`). `EINVAL` for a handle longer than the kernel
/// makes.
pub fn open_by_handle(
    mount: BorrowedFd<'_>,
    handle_type: i32,
    handle: &[u8],
    flags: i32,
) -> io::Result<OwnedFd> {
    if handle.len() > MAX_HANDLE_BYTES {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut file_handle = FileHandle {
        handle_bytes: handle.len() as u32,
        handle_type,
        f_handle: [0; MAX_HANDLE_BYTES],
    };
    file_handle.f_handle[..handle.len()].copy_from_slice(handle);
    // SAFETY: `file_handle` is a valid `struct file_handle` whose
    // `handle_bytes` does not exceed its buffer; the kernel only reads it.
    let raw = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            &raw mut file_handle,
            flags | libc::O_CLOEXEC,
        )
    };
    let raw = check(raw)?;
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn the_next_watch_gets_the_chosen_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let target = std::fs::File::open(dir.path()).unwrap();
        let instance = inotify().expect("inotify_init1");
        set_next_wd(instance.as_fd(), 42).expect("INOTIFY_IOC_SETNEXTWD");
        let wd = add_watch(instance.as_fd(), target.as_fd(), libc::IN_CREATE).expect("add");
        assert_eq!(wd, 42, "the watch descriptor after SETNEXTWD 42");
    }

    fn thread_status(key: &str) -> String {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap()
            .trim()
            .to_owned()
    }

    #[test]
    fn an_instance_charged_to_another_user_gives_the_thread_its_credentials_back() {
        std::thread::spawn(|| {
            let (uids, caps) = (thread_status("Uid:"), thread_status("CapEff:"));
            let instance = inotify_charged_to(65534).expect("an instance for nobody");
            let dir = tempfile::tempdir().unwrap();
            let target = std::fs::File::open(dir.path()).unwrap();
            add_watch(instance.as_fd(), target.as_fd(), libc::IN_CREATE).expect("a watch");
            assert_eq!(thread_status("Uid:"), uids, "the thread's uids afterwards");
            assert_eq!(
                thread_status("CapEff:"),
                caps,
                "the thread's capabilities afterwards"
            );
        })
        .join()
        .expect("test thread");
    }

    /// A user of its own fills its instance limit while root (the test)
    /// still creates instances: the instances were charged to that user.
    #[test]
    fn instances_count_against_the_limit_of_the_user_they_are_charged_to() {
        const UNUSED_UID: u32 = 54_321;
        let limit: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let held: Vec<OwnedFd> = (0..limit)
            .map_while(|_| inotify_charged_to(UNUSED_UID).ok())
            .collect();
        assert_eq!(held.len(), limit, "instances charged to uid {UNUSED_UID}");
        let err = inotify_charged_to(UNUSED_UID).expect_err("one past the user's limit");
        assert_eq!(err.raw_os_error(), Some(libc::EMFILE), "{err}");
        inotify().expect("root's own instance, its count untouched");
    }

    #[test]
    fn an_oversized_handle_is_refused() {
        let dir = std::fs::File::open("/").unwrap();
        let err = open_by_handle(dir.as_fd(), 1, &[0; MAX_HANDLE_BYTES + 1], libc::O_PATH)
            .expect_err("a 129-byte handle");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }
}
