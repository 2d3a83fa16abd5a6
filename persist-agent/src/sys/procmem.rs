//! Access to another process's memory: `process_vm_readv` for bulk reads,
//! `/proc/PID/mem` for memory whose protection forbids that (and for
//! writes), `/proc/PID/pagemap` to learn which pages exist.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;

/// Most iovecs one `process_vm_readv` call accepts (`IOV_MAX`).
pub const MAX_IOVECS: usize = 1024;

/// A range of the target's address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRange {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub len: usize,
}

/// Reads the remote ranges of process `pid`, in order, into `local`, which
/// must be at least as long as their sum. Returns the number of bytes read:
/// less than the sum if a range is (partly) unreadable, as the kernel stops
/// at the first fault. At most [`MAX_IOVECS`] ranges.
pub fn read_vectored(pid: i32, local: &mut [u8], remote: &[RemoteRange]) -> io::Result<usize> {
    let total: usize = remote.iter().map(|r| r.len).sum();
    assert!(
        total <= local.len(),
        "local buffer shorter than the remote ranges"
    );
    assert!(remote.len() <= MAX_IOVECS, "too many remote ranges");
    let local_iov = libc::iovec {
        iov_base: local.as_mut_ptr().cast(),
        iov_len: total,
    };
    let remote_iov: Vec<libc::iovec> = remote
        .iter()
        .map(|r| libc::iovec {
            iov_base: r.addr as *mut libc::c_void,
            iov_len: r.len,
        })
        .collect();
    // SAFETY: the local iovec covers `total` bytes of `local`, which we
    // borrow mutably; remote iovecs are only dereferenced by the kernel in
    // the other process's address space, with its own checks.
    let rc = unsafe {
        libc::process_vm_readv(
            pid,
            &local_iov,
            1,
            remote_iov.as_ptr(),
            remote_iov.len() as libc::c_ulong,
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as usize)
}

/// `/proc/PID/mem` of a process we trace: reads and writes ignore page
/// protection (the kernel uses FOLL_FORCE for a tracer).
#[derive(Debug)]
pub struct ProcMem {
    file: File,
}

impl ProcMem {
    /// Opens `/proc/PID/mem` for reading and writing.
    pub fn open(pid: i32) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))?;
        Ok(Self { file })
    }

    /// Fills `buf` from address `addr`.
    pub fn read_exact_at(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, addr)
    }

    /// Writes `data` at address `addr`.
    pub fn write_all_at(&self, addr: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, addr)
    }
}

/// A `/proc/PID/pagemap` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagemapEntry(pub u64);

impl PagemapEntry {
    /// Bit 63: the page is in RAM.
    pub fn present(self) -> bool {
        self.0 & (1 << 63) != 0
    }

    /// Bit 62: the page is in swap.
    pub fn swapped(self) -> bool {
        self.0 & (1 << 62) != 0
    }

    /// Bit 61: a page-cache page or shared anonymous memory, i.e. not a
    /// private anonymous (copy-on-written) page.
    pub fn file_or_shared(self) -> bool {
        self.0 & (1 << 61) != 0
    }
}

/// `/proc/PID/pagemap`, one 64-bit entry per virtual page.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens `/proc/PID/pagemap`.
    pub fn open(pid: i32) -> io::Result<Self> {
        Ok(Self {
            file: File::open(format!("/proc/{pid}/pagemap"))?,
        })
    }

    /// Reads the entries of `out.len()` pages starting at page-aligned `addr`.
    pub fn read(&self, addr: u64, out: &mut [PagemapEntry]) -> io::Result<()> {
        let mut bytes = vec![0u8; out.len() * 8];
        self.file.read_exact_at(&mut bytes, (addr / 4096) * 8)?;
        for (entry, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            *entry = PagemapEntry(u64::from_ne_bytes(word));
        }
        Ok(())
    }
}
