//! System V shared memory segments and IPC namespaces: reading a segment's
//! attributes (`shmctl(IPC_STAT)`) in a process's IPC namespace, and making
//! a segment again with its recorded id in a fresh namespace.
//!
//! IPC namespaces are per thread (`setns`/`unshare` with `CLONE_NEWIPC` are
//! allowed in a multi-threaded process): the work is done on a scoped
//! thread of its own, so the agent's other threads never change namespace.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};

use nix::sched::CloneFlags;

/// `shm_perm.mode` bit of a segment marked for removal.
const SHM_DEST: u32 = 0o1000;

/// What `shmctl(IPC_STAT)` says of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmStat {
    /// The key it was made with.
    pub key: i32,
    /// Size in bytes.
    pub size: u64,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Permission bits.
    pub mode: u32,
    /// Marked for removal (`SHM_DEST`).
    pub removed: bool,
    /// Processes attached (`shm_nattch`).
    pub attachments: u64,
}

/// Reads segment `shmid` in the caller's IPC namespace.
pub fn shm_stat(shmid: i32) -> io::Result<ShmStat> {
    // SAFETY: shmid_ds is plain data; zero is a valid value for every field.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes one shmid_ds into the valid struct we pass.
    let rc = unsafe { libc::shmctl(shmid, libc::IPC_STAT, &mut ds) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ShmStat {
        key: ds.shm_perm.__key,
        size: ds.shm_segsz as u64,
        uid: ds.shm_perm.uid,
        gid: ds.shm_perm.gid,
        mode: u32::from(ds.shm_perm.mode) & 0o777,
        removed: u32::from(ds.shm_perm.mode) & SHM_DEST != 0,
        attachments: ds.shm_nattch,
    })
}

/// Removes segment `shmid` (`IPC_RMID`) in the caller's IPC namespace.
pub fn shm_remove(shmid: i32) -> io::Result<()> {
    // SAFETY: IPC_RMID takes no buffer.
    if unsafe { libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether process `pid` is in the caller's IPC namespace.
pub fn same_namespace(pid: i32) -> io::Result<bool> {
    Ok(namespace_inode(&format!("/proc/{pid}/ns/ipc"))?
        == namespace_inode("/proc/thread-self/ns/ipc")?)
}

/// The inode of an IPC namespace file (`/proc/PID/ns/ipc`).
fn namespace_inode(path: &str) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.ino())
}

/// Runs `work` in the IPC namespace of process `pid`: on the calling
/// thread when it is ours, otherwise on a thread that joins it.
pub fn in_namespace_of<T: Send>(pid: i32, work: impl FnOnce() -> T + Send) -> io::Result<T> {
    let theirs = format!("/proc/{pid}/ns/ipc");
    if namespace_inode(&theirs)? == namespace_inode("/proc/thread-self/ns/ipc")? {
        return Ok(work());
    }
    let namespace = File::open(&theirs)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(namespace.as_fd(), CloneFlags::CLONE_NEWIPC)?;
                Ok(work())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("IPC namespace thread panicked")))
    })
}

/// A System V shared memory segment to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSpec<'a> {
    /// The id it must get.
    pub shmid: i32,
    /// Its attributes.
    pub stat: ShmStat,
    /// Its contents, at most `stat.size` bytes (the rest is zero).
    pub contents: &'a [u8],
}

/// Makes a fresh IPC namespace holding `segments`, each with its recorded
/// id, key, size, owner, mode and contents, then runs `then` in it (which
/// makes the semaphore sets and message queues, `sys/sysv_ipc.rs`), and
/// returns it as an open `/proc/.../ns/ipc` file (the namespace lives
/// while it is open or a process is in it). Errors name the segment.
pub fn namespace_with(
    segments: &[SegmentSpec<'_>],
    then: impl FnOnce() -> io::Result<()> + Send,
) -> io::Result<OwnedFd> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::unshare(CloneFlags::CLONE_NEWIPC)?;
                for segment in segments {
                    make_segment(segment).map_err(|err| {
                        io::Error::new(
                            err.kind(),
                            format!(
                                "System V shared memory segment shmid {} (key {:#x}): {err}",
                                segment.shmid, segment.stat.key
                            ),
                        )
                    })?;
                }
                then()?;
                Ok(OwnedFd::from(File::open("/proc/thread-self/ns/ipc")?))
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("IPC namespace thread panicked")))
    })
}

/// Makes one segment in the calling thread's (fresh) IPC namespace.
fn make_segment(segment: &SegmentSpec<'_>) -> io::Result<()> {
    // The next id made in this namespace: read by the kernel at shmget,
    // then reset to -1.
    File::options()
        .write(true)
        .open("/proc/sys/kernel/shm_next_id")?
        .write_all(segment.shmid.to_string().as_bytes())?;
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | 0o600;
    // SAFETY: shmget takes plain integers.
    let shmid = unsafe { libc::shmget(segment.stat.key, segment.stat.size as usize, flags) };
    if shmid < 0 {
        return Err(io::Error::last_os_error());
    }
    if shmid != segment.shmid {
        return Err(io::Error::other(format!(
            "the kernel gave it id {shmid} instead"
        )));
    }
    if !segment.contents.is_empty() {
        // SAFETY: attaching at an address the kernel chooses maps nothing
        // over our own memory.
        let address = unsafe { libc::shmat(shmid, std::ptr::null(), 0) };
        if address as isize == -1 {
            return Err(io::Error::last_os_error());
        }
        let len = segment.contents.len().min(segment.stat.size as usize);
        // SAFETY: the segment is `size` bytes, mapped read-write at
        // `address`, and nothing else refers to it yet.
        unsafe {
            std::ptr::copy_nonoverlapping(segment.contents.as_ptr(), address.cast::<u8>(), len);
        }
        // SAFETY: detaches only the attachment made above.
        if unsafe { libc::shmdt(address) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: shmid_ds is plain data; zero is a valid value for every field.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes one shmid_ds into the valid struct we pass.
    if unsafe { libc::shmctl(shmid, libc::IPC_STAT, &mut ds) } < 0 {
        return Err(io::Error::last_os_error());
    }
    ds.shm_perm.uid = segment.stat.uid;
    ds.shm_perm.gid = segment.stat.gid;
    ds.shm_perm.mode = (segment.stat.mode & 0o777) as _;
    // SAFETY: IPC_SET reads the owner and mode from the struct we pass.
    if unsafe { libc::shmctl(shmid, libc::IPC_SET, &mut ds) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Joins the IPC namespace `namespace` (an open `/proc/.../ns/ipc`), from
/// a forked child before its layout: raw, async-signal-safe.
pub fn join_raw(namespace: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: setns takes plain integers.
    if unsafe { libc::setns(namespace, libc::CLONE_NEWIPC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
