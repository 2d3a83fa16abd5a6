//! File leases (`fcntl(F_SETLEASE)`), used to learn whether any other open
//! file description of a file exists without looking at every process.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// `F_SETSIG` of linux/fcntl.h, which libc does not have.
const F_SETSIG: libc::c_int = 10;

/// Whether an open file description of `file`'s inode other than `file`
/// itself exists: a descriptor of any process, or a mapping (which keeps the
/// description it was made from open after its descriptor is closed).
///
/// A write lease is granted only when the inode's open-for-read and
/// open-for-write counts are the caller's own; it is dropped at once.
/// Needs `CAP_LEASE` or the file's owner, and `fs.leases-enable`.
pub fn opened_elsewhere(file: &File) -> io::Result<bool> {
    let fd = file.as_raw_fd();
    if !take_write_lease(fd)? {
        return Ok(true);
    }
    release(fd)?;
    Ok(false)
}

/// Takes a write lease on `fd`: false when another description is open.
/// Whoever opens the file meanwhile breaks the lease, and the kernel then
/// signals the holder, by default with `SIGIO`, whose default action ends
/// the process: it is told to send `SIGURG` instead, which is ignored by
/// default and which the agent does not handle.
fn take_write_lease(fd: RawFd) -> io::Result<bool> {
    // SAFETY: F_SETSIG takes an int argument and touches no user memory.
    if unsafe { libc::fcntl(fd, F_SETSIG, libc::SIGURG) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETLEASE takes an int argument and touches no user memory.
    if unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK) } < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EAGAIN) => Ok(false),
            _ => Err(err),
        };
    }
    Ok(true)
}

/// Gives up the lease on `fd`.
fn release(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETLEASE takes an int argument and touches no user memory.
    if unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_description_or_a_mapping_is_seen_and_none_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("object");
        std::fs::write(&path, vec![1u8; 4096]).unwrap();
        let probe = File::open(&path).unwrap();
        assert!(!opened_elsewhere(&probe).unwrap(), "no other description");

        let other = File::options().read(true).write(true).open(&path).unwrap();
        assert!(opened_elsewhere(&probe).unwrap(), "a second open");

        // A shared mapping outlives the descriptor it was made from.
        let len = std::num::NonZeroUsize::new(4096).unwrap();
        // SAFETY: a fresh shared mapping of a file this test owns, unmapped below.
        let mapping = unsafe {
            nix::sys::mman::mmap(
                None,
                len,
                nix::sys::mman::ProtFlags::PROT_READ,
                nix::sys::mman::MapFlags::MAP_SHARED,
                &other,
                0,
            )
        }
        .unwrap();
        drop(other);
        assert!(
            opened_elsewhere(&probe).unwrap(),
            "a mapping of a closed one"
        );

        // SAFETY: the mapping made above, used by nothing else.
        unsafe { nix::sys::mman::munmap(mapping, 4096) }.unwrap();
        assert!(!opened_elsewhere(&probe).unwrap(), "all gone");
    }

    /// An open of the file while the lease is held breaks it: the holder
    /// is signalled with SIGURG, ignored, not SIGIO, which would end this
    /// test's process. The open waits for the release.
    #[test]
    fn a_broken_lease_does_not_end_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("object");
        std::fs::write(&path, b"x").unwrap();
        let holder = File::open(&path).unwrap();
        assert!(take_write_lease(holder.as_raw_fd()).unwrap());
        let opener = std::thread::spawn({
            let path = path.clone();
            move || File::open(path).map(drop)
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        release(holder.as_raw_fd()).unwrap();
        opener.join().unwrap().unwrap();
    }
}
