//! A small process that forks the daemon's restored processes in its place.
//!
//! A process forked from the agent starts as a copy of the agent: the fork
//! copies the page tables of all its memory and write-protects every page
//! of it, the child's first step unmaps it all again, and the agent then
//! takes a fault at the first write to each of its pages. On this kind of
//! VM, where page-table work is dear, that was about 0.35 ms of a python
//! cold wake of 5 (docs/kernel-facts.md, Costs that shaped the cold wake).
//! The spawner is forked once, sharing the agent's descriptor table
//! (`CLONE_FILES`, so the processes it forks get the agent's descriptors as
//! a fork of the agent would), unmaps everything but the code of the loaded
//! objects, its own stack and the [`SharedArena`], and then forks on request
//! (`CLONE_PARENT` and `CLONE_FILES`, with a chosen pid): the new process is
//! the agent's child, starts from the spawner's small address space, and
//! takes a table of its own of the descriptors it needs (the first step of
//! its entry, which the caller provides). It reads what it needs from the
//! arena, which the agent fills before the request.
//!
//! The spawner makes raw system calls only and never allocates: it runs on
//! the agent's code without the agent's heap. It exits when the agent does
//! (it waits on a pidfd of the agent beside its requests).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::clone::{self, Forked};
use super::pidfd::PidFd;

/// Most ranges of memory the spawner keeps.
const MAX_KEPT: usize = 256;

/// One past the highest user address with 4-level paging.
const TASK_SIZE: u64 = 0x7fff_ffff_f000;

/// How long the agent waits for the spawner's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Bytes of a request: the address the forked process starts with, its
/// pid and whether it is forked at real-time priority.
const REQUEST_LEN: usize = 16;

/// Memory the agent and the spawner (and the processes it forks) map at the
/// same address, shared: the agent places there what a forked process
/// reads, bump-allocated, from the start again for each request.
///
/// Never unmapped: the slices it hands out are valid for the rest of the
/// program (their contents until the next [`SharedArena::reset`]).
#[derive(Debug)]
pub struct SharedArena {
    base: u64,
    len: usize,
    used: usize,
    high_water: usize,
}

impl SharedArena {
    /// Maps an arena of `len` bytes; its pages take memory once written.
    pub fn map(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh shared anonymous mapping at an address the kernel
        // chooses; nothing of ours is affected.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            base: address as u64,
            len,
            used: 0,
            high_water: 0,
        })
    }

    /// Where it is mapped, and its length.
    pub fn range(&self) -> (u64, u64) {
        (self.base, self.base + self.len as u64)
    }

    /// The most bytes it ever held (what its pages cost).
    pub fn high_water(&self) -> usize {
        self.high_water
    }

    /// Forgets everything placed so far.
    pub fn reset(&mut self) {
        self.used = 0;
    }

    /// A copy of `items`, or `None` once the arena is full.
    pub fn copy_slice<T: Copy>(&mut self, items: &[T]) -> Option<&'static [T]> {
        let at = self.allocate(std::mem::size_of_val(items), std::mem::align_of::<T>())?;
        // SAFETY: `at` is the start of `size_of_val(items)` bytes of the
        // arena, aligned for `T` and handed out to nothing else since the
        // last reset; `T: Copy`, so a bitwise copy is a valid value. The
        // arena is never unmapped.
        unsafe {
            std::ptr::copy_nonoverlapping(items.as_ptr(), at as *mut T, items.len());
            Some(std::slice::from_raw_parts(at as *const T, items.len()))
        }
    }

    /// A copy of `value`.
    pub fn place<T: Copy>(&mut self, value: T) -> Option<&'static T> {
        self.copy_slice(std::slice::from_ref(&value))?.first()
    }

    fn allocate(&mut self, bytes: usize, align: usize) -> Option<u64> {
        let start = self.used.checked_next_multiple_of(align.max(1))?;
        let end = start.checked_add(bytes)?;
        if end > self.len {
            return None;
        }
        self.used = end;
        self.high_water = self.high_water.max(end);
        Some(self.base + start as u64)
    }
}

/// The address ranges of the loaded objects (the agent's binary, its
/// libraries and the vdso): every `PT_LOAD` segment, whole pages.
pub fn loaded_object_ranges() -> Vec<(u64, u64)> {
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info for the duration of
        // the call, and `data` is the Vec given below.
        let (info, ranges) = unsafe { (&*info, &mut *data.cast::<Vec<(u64, u64)>>()) };
        if info.dlpi_phdr.is_null() {
            return 0;
        }
        // SAFETY: dlpi_phdr points at dlpi_phnum program headers.
        let headers =
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
        for header in headers.iter().filter(|h| h.p_type == libc::PT_LOAD) {
            let start = info.dlpi_addr + header.p_vaddr;
            let end = start + header.p_memsz;
            ranges.push((start & !0xfff, (end + 0xfff) & !0xfff));
        }
        0
    }
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    // SAFETY: the callback only reads what it is given and pushes into the
    // Vec, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(each), (&raw mut ranges).cast()) };
    ranges
}

/// The calling thread's thread pointer (`%fs` base): its TLS lives there.
pub fn thread_pointer() -> u64 {
    let mut base: u64 = 0;
    // SAFETY: ARCH_GET_FS writes the fs base into the u64 we pass.
    unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1003, &raw mut base) };
    base
}

/// The agent's side of a running spawner, whose processes each start from
/// a `T` the agent placed in the arena.
#[derive(Debug)]
pub struct Spawner<T: 'static> {
    pidfd: PidFd,
    requests: OwnedFd,
    answers: OwnedFd,
    start: std::marker::PhantomData<fn(&'static T)>,
}

impl<T: 'static> Spawner<T> {
    /// Forks the spawner from the calling thread. It keeps the memory of
    /// `keep` (sorted, without overlaps: the loaded objects, the calling
    /// thread's stack and thread pointer, `arena`, the vdso and vvar
    /// pages) and unmaps the rest; each process it forks runs `entry` with
    /// the value of its request.
    pub fn start(keep: &[(u64, u64)], entry: fn(&'static T) -> !) -> io::Result<Self> {
        if keep.len() > MAX_KEPT || keep.windows(2).any(|w| w[0].1 > w[1].0) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut kept = [(0u64, 0u64); MAX_KEPT];
        kept[..keep.len()].copy_from_slice(keep);
        let kept_count = keep.len();
        let (requests_read, requests) = pipe()?;
        let (answers, answers_write) = pipe()?;
        let agent = std::process::id() as i32;
        let (read_fd, write_fd) = (requests_read.as_raw_fd(), answers_write.as_raw_fd());
        match clone::fork_with(libc::CLONE_FILES as u64, None)? {
            Forked::Child => serve(&kept[..kept_count], agent, read_fd, write_fd, entry),
            Forked::Parent(pid) => {
                // Shared with the spawner: ours to keep open, never to close.
                std::mem::forget(requests_read);
                std::mem::forget(answers_write);
                let pidfd = PidFd::open(pid)?;
                Ok(Self {
                    pidfd,
                    requests,
                    answers,
                    start: std::marker::PhantomData,
                })
            }
        }
    }

    /// The spawner's pid.
    pub fn pid(&self) -> i32 {
        self.pidfd.pid()
    }

    /// Whether the spawner has exited.
    pub fn has_exited(&self) -> bool {
        self.pidfd.has_exited()
    }

    /// Has the spawner fork a process with pid `pid` (the agent's child),
    /// which runs the entry with `value` (placed in the arena the spawner
    /// keeps), in `SCHED_FIFO` if `realtime`. Returns its pid.
    pub fn fork(&self, value: &'static T, pid: i32, realtime: bool) -> Result<i32, ForkError> {
        self.request(value, pid, realtime)
            .map_err(ForkError::Lost)?
            .map_err(ForkError::Refused)
    }

    fn request(&self, value: &'static T, pid: i32, realtime: bool) -> io::Result<io::Result<i32>> {
        let address = value as *const T as u64;
        let mut request = [0u8; REQUEST_LEN];
        request[..8].copy_from_slice(&address.to_ne_bytes());
        request[8..12].copy_from_slice(&pid.to_ne_bytes());
        request[12..].copy_from_slice(&u32::from(realtime).to_ne_bytes());
        // A signal handled on this thread (the runtime's SIGCHLD) must not
        // end the wait: the answer would be read as the next request's.
        loop {
            match nix::unistd::write(&self.requests, &request) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(err) => return Err(err.into()),
                Ok(_) => break,
            }
        }
        let deadline = std::time::Instant::now() + ANSWER_TIMEOUT;
        let answered = loop {
            let mut fds = [
                nix::poll::PollFd::new(self.answers.as_fd(), nix::poll::PollFlags::POLLIN),
                nix::poll::PollFd::new(self.pidfd.as_fd(), nix::poll::PollFlags::POLLIN),
            ];
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let timeout =
                nix::poll::PollTimeout::try_from(left).unwrap_or(nix::poll::PollTimeout::MAX);
            match nix::poll::poll(&mut fds, timeout) {
                Err(nix::errno::Errno::EINTR) if !left.is_zero() => continue,
                Err(err) => return Err(err.into()),
                Ok(_) => {
                    break fds[0]
                        .revents()
                        .is_some_and(|events| events.contains(nix::poll::PollFlags::POLLIN));
                }
            }
        };
        if !answered {
            return Err(io::Error::other(format!(
                "the spawner (pid {}) did not answer",
                self.pid()
            )));
        }
        let mut answer = [0u8; 8];
        clone::read_exact_raw(self.answers.as_raw_fd(), &mut answer)?;
        Ok(match i64::from_ne_bytes(answer) {
            forked if forked > 0 => Ok(forked as i32),
            errno => Err(io::Error::from_raw_os_error(-errno as i32)),
        })
    }
}

/// Why a [`Spawner::fork`] forked nothing.
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    /// The fork failed in the spawner (the pid is taken, no memory): it
    /// goes on serving.
    #[error("forking the process: {0}")]
    Refused(#[source] io::Error),
    /// The spawner did not answer, or could not be asked: what it did is
    /// unknown.
    #[error("asking the spawner: {0}")]
    Lost(#[source] io::Error),
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// The spawner: keeps `kept` of its memory, then forks on each request
/// until the agent exits. Never returns.
fn serve<T>(
    kept: &[(u64, u64)],
    agent: i32,
    requests: RawFd,
    answers: RawFd,
    entry: fn(&'static T) -> !,
) -> ! {
    clone::block_all_signals();
    // Nothing of the agent's memory after this but what `kept` names: no
    // allocation, no agent data.
    let mut from = 0u64;
    for &(start, end) in kept.iter().chain(&[(TASK_SIZE, TASK_SIZE)]) {
        if start > from {
            // SAFETY: unmaps memory this process never touches again: only
            // `kept` (its code, stack, thread pointer and the arena) is used
            // from here on.
            unsafe { libc::munmap(from as *mut libc::c_void, (start - from) as usize) };
        }
        from = from.max(end);
    }
    // SAFETY: prctl with a NUL-terminated name in our (kept) code.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"persist-spawner".as_ptr()) };
    // SAFETY: pidfd_open takes two integers.
    let agent_pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, agent, 0) } as RawFd;
    if agent_pidfd < 0 {
        clone::exit_now(1);
    }
    loop {
        let mut fds = [
            libc::pollfd {
                fd: requests,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: agent_pidfd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on two pollfds of a local array.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            clone::exit_now(0);
        }
        let mut request = [0u8; REQUEST_LEN];
        if clone::read_exact_raw(requests, &mut request).is_err() {
            clone::exit_now(0);
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&request[..8]);
        let address = u64::from_ne_bytes(word);
        let mut half = [0u8; 4];
        half.copy_from_slice(&request[8..12]);
        let pid = i32::from_ne_bytes(half);
        half.copy_from_slice(&request[12..]);
        // Async-signal-safe: one system call, no allocation.
        let _ = super::sched::set_current_thread_realtime(u32::from_ne_bytes(half) != 0);
        // Sharing the agent's descriptor table: the process takes a copy of
        // the part it needs as its first step.
        let flags = (libc::CLONE_PARENT | libc::CLONE_FILES) as u64;
        let answer: i64 = match clone::fork_with(flags, Some(pid)) {
            // SAFETY: the agent sent the address of a `T` it placed in the
            // arena, which this process keeps mapped.
            Ok(Forked::Child) => entry(unsafe { &*(address as *const T) }),
            Ok(Forked::Parent(forked)) => i64::from(forked),
            Err(err) => -i64::from(err.raw_os_error().unwrap_or(libc::EIO)),
        };
        clone::write_all_raw(answers, &answer.to_ne_bytes());
    }
}
