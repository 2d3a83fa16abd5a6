//! Access to another process's memory: `process_vm_readv` for bulk reads,
//! `/proc/PID/mem` for memory whose protection forbids that (and for
//! writes), `/proc/PID/pagemap` to learn which pages exist.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use linux_raw_sys::general::{page_region, pm_scan_arg};

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
    pid: i32,
}

impl ProcMem {
    /// Opens `/proc/PID/mem` for reading and writing.
    pub fn open(pid: i32) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))?;
        Ok(Self { file, pid })
    }

    /// The process whose memory this is.
    pub fn pid(&self) -> i32 {
        self.pid
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

/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)`.
// By hand: linux-raw-sys has the struct but not the request number.
const PAGEMAP_SCAN: libc::c_ulong =
    nix::request_code_readwrite!(b'f', 16, size_of::<pm_scan_arg>());

/// Page categories of `PAGEMAP_SCAN` (`PAGE_IS_*`).
pub mod category {
    use linux_raw_sys::general as uapi;

    /// The page is in RAM.
    pub const PRESENT: u64 = uapi::PAGE_IS_PRESENT as u64;
    /// The page is in swap.
    pub const SWAPPED: u64 = uapi::PAGE_IS_SWAPPED as u64;
    /// Not a private anonymous page: page cache or shmem.
    pub const FILE: u64 = uapi::PAGE_IS_FILE as u64;
    /// The shared zero page (reads as zeros, was never written).
    pub const PFNZERO: u64 = uapi::PAGE_IS_PFNZERO as u64;
}

/// `struct page_region`: pages `start..end` sharing `categories`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageRegion {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `category` bits of these pages (within the requested return mask).
    pub categories: u64,
}

// The kernel fills `PageRegion`s as its `struct page_region`.
const _: () = assert!(size_of::<PageRegion>() == size_of::<page_region>());

impl Pagemap {
    /// Lists regions of `start..end` holding pages in any of the
    /// `anyof` categories, with their categories among `report`, into
    /// `out` (at most its capacity, at least one). Returns the address the
    /// walk stopped at: call again from there until it reaches `end`.
    /// Fails with `ENOTTY` on kernels without `PAGEMAP_SCAN` (before 6.7).
    pub fn scan(
        &self,
        start: u64,
        end: u64,
        anyof: u64,
        report: u64,
        out: &mut Vec<PageRegion>,
    ) -> io::Result<u64> {
        out.clear();
        let capacity = out.capacity().max(1);
        out.reserve(capacity);
        let mut arg = pm_scan_arg {
            size: size_of::<pm_scan_arg>() as u64,
            flags: 0,
            start,
            end,
            walk_end: 0,
            vec: out.as_mut_ptr() as u64,
            vec_len: capacity as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: 0,
            category_anyof_mask: anyof,
            return_mask: report,
        };
        // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points to `out`'s
        // spare capacity of `vec_len` page_region structs, which the kernel
        // fills; it returns how many it wrote.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let filled = (rc as usize).min(capacity);
        // SAFETY: the kernel initialised the first `filled` regions.
        unsafe { out.set_len(filled) };
        Ok(arg.walk_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_scan_finds_the_pages_just_written() {
        let page = 4096;
        let mut buffer = vec![1u8; 8 * page];
        buffer.iter_mut().step_by(page).for_each(|b| *b = 2);
        let start = (buffer.as_ptr() as u64).next_multiple_of(page as u64);
        let end = start + 4 * page as u64;
        let pagemap = Pagemap::open(std::process::id() as i32).expect("opening own pagemap");
        let mut regions = Vec::with_capacity(8);
        let report = category::PRESENT | category::FILE;
        let walk_end = pagemap
            .scan(start, end, category::PRESENT, report, &mut regions)
            .expect("PAGEMAP_SCAN");
        assert_eq!(walk_end, end, "the walk stopped early: {regions:?}");
        assert_eq!(
            regions,
            [PageRegion {
                start,
                end,
                categories: category::PRESENT,
            }],
            "four present, private, anonymous pages"
        );
        drop(buffer);
    }
}
