//! File leases (`fcntl(F_SETLEASE)`), used to learn whether any other open
//! file description of a file exists without looking at every process.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Whether an open file description of `file`'s inode other than `file`
/// itself exists: a descriptor of any process, or a mapping (which keeps the
/// description it was made from open after its descriptor is closed).
///
/// A write lease is granted only when the inode's open-for-read and
/// open-for-write counts are the caller's own; it is dropped at once.
/// Needs `CAP_LEASE` or the file's owner, and `fs.leases-enable`.
pub fn opened_elsewhere(file: &File) -> io::Result<bool> {
    let fd = file.as_raw_fd();
    // SAFETY: F_SETLEASE takes an int argument and touches no user memory.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EAGAIN) => Ok(true),
            _ => Err(err),
        };
    }
    // SAFETY: as above; the lease is this description's own.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(false)
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
}
