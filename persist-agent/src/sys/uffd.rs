//! userfaultfd: creating one inside a process being restored, and the
//! ioctls the pager uses to serve its faults from outside.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use linux_raw_sys::general as uapi;
use linux_raw_sys::ioctl as uapi_ioctl;

/// `UFFD_API`.
const UFFD_API: u64 = uapi::UFFD_API as u64;
/// `UFFDIO_API`.
const UFFDIO_API: u64 = uapi_ioctl::UFFDIO_API as u64;
/// `UFFDIO_REGISTER`.
pub const UFFDIO_REGISTER: u64 = uapi_ioctl::UFFDIO_REGISTER as u64;
/// `UFFDIO_UNREGISTER`.
const UFFDIO_UNREGISTER: u64 = uapi_ioctl::UFFDIO_UNREGISTER as u64;
/// `UFFDIO_WAKE`.
const UFFDIO_WAKE: u64 = uapi_ioctl::UFFDIO_WAKE as u64;
/// `UFFDIO_COPY`.
const UFFDIO_COPY: u64 = uapi_ioctl::UFFDIO_COPY as u64;
/// `UFFDIO_ZEROPAGE`.
const UFFDIO_ZEROPAGE: u64 = uapi_ioctl::UFFDIO_ZEROPAGE as u64;
/// `UFFDIO_REGISTER_MODE_MISSING`.
const MODE_MISSING: u64 = uapi::UFFDIO_REGISTER_MODE_MISSING as u64;

const FEATURE_EVENT_REMAP: u64 = uapi::UFFD_FEATURE_EVENT_REMAP as u64;
const FEATURE_EVENT_REMOVE: u64 = uapi::UFFD_FEATURE_EVENT_REMOVE as u64;
const FEATURE_EVENT_UNMAP: u64 = uapi::UFFD_FEATURE_EVENT_UNMAP as u64;
const FEATURE_THREAD_ID: u64 = uapi::UFFD_FEATURE_THREAD_ID as u64;
const FEATURE_EVENT_FORK: u64 = uapi::UFFD_FEATURE_EVENT_FORK as u64;

/// Features a restored process's userfaultfd is created with: the pager must
/// see `madvise(DONTNEED)`, `munmap` and `mremap` of registered ranges, or
/// it would copy stale image content over them, and `fork`, or the child
/// would read zeros where its parent still had missing pages.
pub const FEATURES: u64 = FEATURE_EVENT_REMAP
    | FEATURE_EVENT_REMOVE
    | FEATURE_EVENT_UNMAP
    | FEATURE_THREAD_ID
    | FEATURE_EVENT_FORK;

const EVENT_PAGEFAULT: u8 = uapi::UFFD_EVENT_PAGEFAULT as u8;
const EVENT_FORK: u8 = uapi::UFFD_EVENT_FORK as u8;
const EVENT_REMAP: u8 = uapi::UFFD_EVENT_REMAP as u8;
const EVENT_REMOVE: u8 = uapi::UFFD_EVENT_REMOVE as u8;
const EVENT_UNMAP: u8 = uapi::UFFD_EVENT_UNMAP as u8;

/// Size of `struct uffdio_register`.
pub const REGISTER_SIZE: usize = size_of::<uapi::uffdio_register>();

/// Creates a userfaultfd for the calling process's memory (close-on-exec,
/// non-blocking, user and kernel faults), negotiates [`FEATURES`] and
/// returns its raw number. Async-signal-safe: for the forked child.
pub fn create_raw() -> io::Result<RawFd> {
    // SAFETY: userfaultfd takes flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = fd as RawFd;
    let mut api = [UFFD_API, FEATURES, 0u64];
    // SAFETY: UFFDIO_API reads and writes a 24-byte struct uffdio_api.
    let rc = unsafe { libc::ioctl(fd, UFFDIO_API as _, api.as_mut_ptr()) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        // SAFETY: closing the fd we just created.
        unsafe { libc::close(fd) };
        return Err(err);
    }
    Ok(fd)
}

/// Encodes a `struct uffdio_register` for MISSING faults on a range, for a
/// restorer table.
pub fn register_args(start: u64, len: u64) -> [u8; REGISTER_SIZE] {
    let words = [start, len, MODE_MISSING, 0];
    let mut out = [0u8; REGISTER_SIZE];
    for (chunk, word) in out.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    out
}

/// Outcome of a copy into a registered range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyOutcome {
    /// Everything was copied.
    Done,
    /// The first `n` bytes were copied, then a page already present stopped it.
    Partial(u64),
    /// The first page was already present.
    Exists,
    /// The address space is changing (a remove/unmap/remap event is pending):
    /// read events, then retry.
    Again,
    /// The range is no longer mapped or the process is gone.
    Gone,
}

/// A userfaultfd held by the pager.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
}

/// An event read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdEvent {
    /// A thread faulted on a missing page.
    Fault {
        /// The faulting address.
        address: u64,
        /// The faulting thread.
        tid: u32,
    },
    /// `mremap` moved `len` bytes from `from` to `to`.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// `madvise(MADV_DONTNEED/REMOVE)`: the range reads as zeros from now on.
    Remove {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// `munmap` of the range.
    Unmap {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// The process forked: the child's missing pages fault on this new
    /// userfaultfd, installed in the reader's process.
    Fork {
        /// The new descriptor (ours to close).
        ufd: RawFd,
    },
    /// An event this pager did not ask for.
    Other(u8),
}

impl Userfault {
    /// Wraps an owned userfaultfd.
    pub fn new(fd: OwnedFd) -> Self {
        Self { fd }
    }

    fn ioctl(&self, request: u64, arg: *mut u64) -> io::Result<()> {
        // SAFETY: each caller passes a pointer to a struct of the size the
        // request expects, alive for the duration of the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, arg) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Copies `src` to `dst` (page-aligned, in a registered range) and wakes
    /// any thread waiting there.
    pub fn copy(&self, dst: u64, src: &[u8]) -> CopyOutcome {
        let mut args = [dst, src.as_ptr() as u64, src.len() as u64, 0u64, 0u64];
        match self.ioctl(UFFDIO_COPY, args.as_mut_ptr()) {
            Ok(()) => CopyOutcome::Done,
            Err(err) => {
                let copied = args[4] as i64;
                match err.raw_os_error() {
                    Some(libc::EAGAIN) if copied > 0 => CopyOutcome::Partial(copied as u64),
                    Some(libc::EAGAIN) => CopyOutcome::Again,
                    Some(libc::EEXIST) => CopyOutcome::Exists,
                    _ => CopyOutcome::Gone,
                }
            }
        }
    }

    /// Maps zero pages over `[start, start + len)` and wakes waiters.
    pub fn zeropage(&self, start: u64, len: u64) -> CopyOutcome {
        let mut args = [start, len, 0u64, 0u64];
        match self.ioctl(UFFDIO_ZEROPAGE, args.as_mut_ptr()) {
            Ok(()) => CopyOutcome::Done,
            Err(err) => match err.raw_os_error() {
                Some(libc::EAGAIN) => CopyOutcome::Again,
                Some(libc::EEXIST) => CopyOutcome::Exists,
                _ => CopyOutcome::Gone,
            },
        }
    }

    /// Wakes threads waiting on `[start, start + len)`.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut args = [start, len];
        self.ioctl(UFFDIO_WAKE, args.as_mut_ptr())
    }

    /// Registers `[start, start + len)` of the fd's own process for MISSING
    /// faults (restored processes register from their restorer table; this
    /// is for a pager serving the calling process, as in tests).
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut args = register_args(start, len);
        self.ioctl(UFFDIO_REGISTER, args.as_mut_ptr().cast())
    }

    /// Unregisters `[start, start + len)`: faults there are the kernel's again.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut args = [start, len];
        self.ioctl(UFFDIO_UNREGISTER, args.as_mut_ptr())
    }

    /// Waits up to `timeout_ms` (-1: forever) for an event to be readable.
    pub fn wait(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                return Ok(false);
            }
            return Err(err);
        }
        if pfd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(rc > 0)
    }

    /// Reads the events that are ready without blocking (the fd is
    /// non-blocking) and appends them to `out`.
    pub fn read_events(&self, out: &mut Vec<UffdEvent>) -> io::Result<()> {
        let mut buf = [0u8; 32 * 64];
        loop {
            // SAFETY: reading into a valid local buffer.
            let rc = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                return match err.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(()),
                    Some(libc::EINTR) => continue,
                    _ => Err(err),
                };
            }
            if rc == 0 {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            for msg in buf[..rc as usize].chunks_exact(32) {
                out.push(decode(msg));
            }
            if (rc as usize) < buf.len() {
                return Ok(());
            }
        }
    }
}

fn word(msg: &[u8], offset: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&msg[offset..offset + 8]);
    u64::from_ne_bytes(bytes)
}

/// Decodes one `struct uffd_msg` (32 bytes, the union at offset 8).
fn decode(msg: &[u8]) -> UffdEvent {
    match msg[0] {
        EVENT_PAGEFAULT => UffdEvent::Fault {
            address: word(msg, 16),
            tid: word(msg, 24) as u32,
        },
        EVENT_REMAP => UffdEvent::Remap {
            from: word(msg, 8),
            to: word(msg, 16),
            len: word(msg, 24),
        },
        EVENT_REMOVE => UffdEvent::Remove {
            start: word(msg, 8),
            end: word(msg, 16),
        },
        EVENT_UNMAP => UffdEvent::Unmap {
            start: word(msg, 8),
            end: word(msg, 16),
        },
        EVENT_FORK => UffdEvent::Fork {
            ufd: word(msg, 8) as u32 as RawFd,
        },
        other => UffdEvent::Other(other),
    }
}

impl FromRawFd for Userfault {
    unsafe fn from_raw_fd(fd: RawFd) -> Self {
        // SAFETY: the caller hands over ownership of an open userfaultfd.
        Self::new(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}
