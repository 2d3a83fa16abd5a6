//! ptrace(2) on single threads: seize, interrupt, wait, registers, signal
//! masks, rseq configuration, single-stepping and detaching.
//!
//! Every function takes a thread id; errors are the raw `io::Error` of the
//! call, for the caller to wrap with the thread it was working on. The
//! requests `nix` wraps go through it; the rest are by hand, each saying why.

use std::io;

use nix::sys::ptrace::{self as nix_ptrace, Event, Options};
use nix::unistd::Pid;

/// Number of 64-bit words in `struct user_regs_struct` on x86-64.
pub const USER_REGS_WORDS: usize = size_of::<libc::user_regs_struct>() / 8;

/// Indices of registers in a [`Regs`] array (the order of `user_regs_struct`).
pub mod reg {
    use libc::user_regs_struct as R;
    use std::mem::offset_of;

    /// `rbp`.
    pub const RBP: usize = offset_of!(R, rbp) / 8;
    /// `r10`: fourth syscall argument.
    pub const R10: usize = offset_of!(R, r10) / 8;
    /// `r9`: sixth syscall argument.
    pub const R9: usize = offset_of!(R, r9) / 8;
    /// `r8`: fifth syscall argument.
    pub const R8: usize = offset_of!(R, r8) / 8;
    /// `rax`: syscall number in, result out.
    pub const RAX: usize = offset_of!(R, rax) / 8;
    /// `rdx`: third syscall argument.
    pub const RDX: usize = offset_of!(R, rdx) / 8;
    /// `rsi`: second syscall argument.
    pub const RSI: usize = offset_of!(R, rsi) / 8;
    /// `rdi`: first syscall argument.
    pub const RDI: usize = offset_of!(R, rdi) / 8;
    /// `orig_rax`: the syscall the thread is in, or -1.
    pub const ORIG_RAX: usize = offset_of!(R, orig_rax) / 8;
    /// `rip`.
    pub const RIP: usize = offset_of!(R, rip) / 8;
    /// `eflags`.
    pub const EFLAGS: usize = offset_of!(R, eflags) / 8;
    /// `rsp`.
    pub const RSP: usize = offset_of!(R, rsp) / 8;
    /// `fs_base`: the TLS pointer.
    pub const FS_BASE: usize = offset_of!(R, fs_base) / 8;
    /// `gs_base`.
    pub const GS_BASE: usize = offset_of!(R, gs_base) / 8;
}

/// The general registers of a thread, `struct user_regs_struct` word by word.
pub type Regs = [u64; USER_REGS_WORDS];

/// `NT_X86_XSTATE`, the regset of the whole xsave area.
const NT_X86_XSTATE: u32 = linux_raw_sys::elf_uapi::NT_X86_XSTATE;

/// Why a traced thread stopped or ended, as `waitpid` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A `PTRACE_EVENT_*` stop (`PTRACE_EVENT_STOP` after an interrupt).
    Event {
        /// The event number.
        event: i32,
        /// The signal reported with it.
        signal: i32,
    },
    /// A signal-delivery stop (also the SIGTRAP of a single step).
    Signal(i32),
    /// The thread exited with this status.
    Exited(i32),
    /// The thread was killed by this signal.
    Killed(i32),
}

/// `PTRACE_EVENT_STOP`: the stop caused by `PTRACE_INTERRUPT` or a group stop.
pub const PTRACE_EVENT_STOP: i32 = Event::PTRACE_EVENT_STOP as i32;

fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Attaches to `tid` without stopping it (`PTRACE_SEIZE`, no options).
pub fn seize(tid: i32) -> io::Result<()> {
    Ok(nix_ptrace::seize(Pid::from_raw(tid), Options::empty())?)
}

/// Asks a seized thread to stop (`PTRACE_INTERRUPT`).
pub fn interrupt(tid: i32) -> io::Result<()> {
    Ok(nix_ptrace::interrupt(Pid::from_raw(tid))?)
}

/// Detaches from a stopped thread, delivering no signal.
pub fn detach(tid: i32) -> io::Result<()> {
    Ok(nix_ptrace::detach(Pid::from_raw(tid), None)?)
}

/// Detaches from a stopped thread, delivering `signal` (0 for none).
pub fn detach_delivering(tid: i32, signal: i32) -> io::Result<()> {
    // By hand: nix's Signal cannot name real-time signals.
    // SAFETY: PTRACE_DETACH takes a tid and a signal number as data.
    check(unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0usize, signal as usize) }).map(drop)
}

/// Resumes a stopped thread, delivering `signal` (0 for none).
pub fn cont(tid: i32, signal: i32) -> io::Result<()> {
    // By hand: nix's Signal cannot name real-time signals, and the one a
    // thread stopped with must be given back to it.
    // SAFETY: PTRACE_CONT takes a tid and a signal number as data.
    check(unsafe { libc::ptrace(libc::PTRACE_CONT, tid, 0usize, signal as usize) }).map(drop)
}

/// Runs one instruction of a stopped thread (`PTRACE_SINGLESTEP`).
pub fn single_step(tid: i32) -> io::Result<()> {
    Ok(nix_ptrace::step(Pid::from_raw(tid), None)?)
}

/// Waits for the next stop or the end of traced thread `tid`.
pub fn wait(tid: i32) -> io::Result<Stop> {
    loop {
        if let Some(stop) = waitpid(tid, 0)? {
            return Ok(stop);
        }
    }
}

/// Waits until traced thread `tid` has exited without reaping it
/// (`waitid(WEXITED | WNOWAIT)`): for a process that is also our child,
/// collecting its exit status is left to whoever started it.
pub fn wait_exit_keep(tid: i32) -> io::Result<()> {
    // By hand: as for `waitpid`, nix's waitid fails on a thread killed by
    // a real-time signal.
    loop {
        // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes one siginfo_t to a valid pointer.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                tid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT | libc::__WALL,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Like [`wait`], but gives up with `None` after `timeout` (a thread in
/// uninterruptible sleep stops only when it leaves it).
pub fn wait_timeout(tid: i32, timeout: std::time::Duration) -> io::Result<Option<Stop>> {
    let deadline = std::time::Instant::now() + timeout;
    let mut pause = std::time::Duration::from_micros(20);
    loop {
        if let Some(stop) = waitpid(tid, libc::WNOHANG)? {
            return Ok(Some(stop));
        }
        if std::time::Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(5));
    }
}

/// One `waitpid(tid, __WALL | flags)`; `None` if nothing happened (WNOHANG)
/// or the call was interrupted.
fn waitpid(tid: i32, flags: libc::c_int) -> io::Result<Option<Stop>> {
    // By hand: nix's WaitStatus refuses (EINVAL) a status that carries a
    // real-time signal, which traced threads do stop and die with.
    let mut status: libc::c_int = 0;
    // SAFETY: waitpid writes one int to a valid pointer.
    let rc = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | flags) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(None);
        }
        return Err(err);
    }
    if rc == 0 {
        return Ok(None);
    }
    Ok(Some(if libc::WIFEXITED(status) {
        Stop::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Stop::Killed(libc::WTERMSIG(status))
    } else {
        let signal = libc::WSTOPSIG(status);
        let event = status >> 16;
        if event != 0 {
            Stop::Event { event, signal }
        } else {
            Stop::Signal(signal)
        }
    }))
}

/// Reads the general registers of a stopped thread.
pub fn get_regs(tid: i32) -> io::Result<Regs> {
    let regs = nix_ptrace::getregs(Pid::from_raw(tid))?;
    // SAFETY: user_regs_struct is, on x86-64, `USER_REGS_WORDS` u64 fields
    // without padding, so it is exactly a `Regs` and any value is valid.
    Ok(unsafe { std::mem::transmute::<libc::user_regs_struct, Regs>(regs) })
}

/// Writes the general registers of a stopped thread.
pub fn set_regs(tid: i32, regs: &Regs) -> io::Result<()> {
    // SAFETY: as in `get_regs`, the two types are the same 27 u64 words;
    // the kernel validates the values.
    let regs = unsafe { std::mem::transmute::<Regs, libc::user_regs_struct>(*regs) };
    Ok(nix_ptrace::setregs(Pid::from_raw(tid), regs)?)
}

/// Reads the xsave area of a stopped thread (`NT_X86_XSTATE`), at most
/// `max_len` bytes; the result is as long as the kernel's regset.
pub fn get_xstate(tid: i32, max_len: usize) -> io::Result<Vec<u8>> {
    // By hand: nix's getregset knows only fixed-size regsets, and the xsave
    // area's size depends on the CPU.
    let mut buf = vec![0u8; max_len];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: PTRACE_GETREGSET writes at most iov_len bytes to iov_base,
    // which points to a buffer of that length, and updates iov_len.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            tid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec,
        )
    })?;
    let len = iov.iov_len;
    buf.truncate(len);
    Ok(buf)
}

/// Reads the blocked-signal mask of a stopped thread.
pub fn get_sigmask(tid: i32) -> io::Result<u64> {
    // By hand: nix has no PTRACE_GETSIGMASK (nor SETSIGMASK).
    let mut mask: u64 = 0;
    // SAFETY: PTRACE_GETSIGMASK writes `addr` (8) bytes to the u64.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_GETSIGMASK,
            tid,
            std::mem::size_of::<u64>(),
            &mut mask as *mut u64,
        )
    })?;
    Ok(mask)
}

/// Sets the blocked-signal mask of a stopped thread (the kernel never blocks
/// SIGKILL or SIGSTOP whatever the mask says).
pub fn set_sigmask(tid: i32, mask: u64) -> io::Result<()> {
    // SAFETY: PTRACE_SETSIGMASK reads `addr` (8) bytes from the u64.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_SETSIGMASK,
            tid,
            std::mem::size_of::<u64>(),
            &mask as *const u64,
        )
    })
    .map(drop)
}

/// A thread's rseq registration as `PTRACE_GET_RSEQ_CONFIGURATION` reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RseqConfiguration {
    /// Address of the registered `struct rseq` (0: none).
    pub rseq_abi_pointer: u64,
    /// Registered length.
    pub rseq_abi_size: u32,
    /// Signature.
    pub signature: u32,
    /// Flags given at registration.
    pub flags: u32,
    /// Padding.
    pub pad: u32,
}

/// Reads the rseq registration of a stopped thread.
pub fn get_rseq_configuration(tid: i32) -> io::Result<RseqConfiguration> {
    // By hand: nix has no PTRACE_GET_RSEQ_CONFIGURATION.
    let mut config = RseqConfiguration::default();
    // SAFETY: the kernel writes at most `addr` bytes (the struct's size) to
    // the struct, whose layout matches `struct ptrace_rseq_configuration`.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_GET_RSEQ_CONFIGURATION,
            tid,
            std::mem::size_of::<RseqConfiguration>(),
            &mut config as *mut RseqConfiguration,
        )
    })?;
    Ok(config)
}

/// The robust futex list a thread registered (`set_robust_list`): the
/// address of its head and the head's length, or a null address. Needs the
/// right to trace the thread.
pub fn get_robust_list(tid: i32) -> io::Result<(u64, u64)> {
    // By hand: neither nix nor libc wraps get_robust_list.
    let mut head: u64 = 0;
    let mut len: u64 = 0;
    // SAFETY: the kernel writes one pointer to `head` and one size_t to
    // `len`, both 8 bytes on x86-64 and alive for the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid,
            &mut head as *mut u64,
            &mut len as *mut u64,
        )
    })?;
    Ok((head, len))
}

/// `PTRACE_EVENT_FORK`: a traced thread forked; the message is the new pid.
pub const PTRACE_EVENT_FORK: i32 = Event::PTRACE_EVENT_FORK as i32;
/// `PTRACE_EVENT_CLONE`: a traced thread made a thread; the message is its tid.
pub const PTRACE_EVENT_CLONE: i32 = Event::PTRACE_EVENT_CLONE as i32;

/// Attaches to `tid` without stopping it, with `PTRACE_O_*` `options`
/// (e.g. `PTRACE_O_TRACECLONE | PTRACE_O_EXITKILL` for a process being
/// restored).
pub fn seize_with_options(tid: i32, options: libc::c_int) -> io::Result<()> {
    let options = Options::from_bits_retain(options);
    Ok(nix_ptrace::seize(Pid::from_raw(tid), options)?)
}

/// Reads the message of the last `PTRACE_EVENT_*` stop (the new pid or tid
/// for fork and clone events, in the tracer's pid namespace).
pub fn event_message(tid: i32) -> io::Result<u64> {
    Ok(nix_ptrace::getevent(Pid::from_raw(tid))? as u64)
}

/// Writes the xsave area of a stopped thread (`NT_X86_XSTATE`), as read by
/// [`get_xstate`] on the same CPU model.
pub fn set_xstate(tid: i32, xstate: &[u8]) -> io::Result<()> {
    // By hand: as for `get_xstate`.
    let mut iov = libc::iovec {
        iov_base: xstate.as_ptr().cast_mut().cast(),
        iov_len: xstate.len(),
    };
    // SAFETY: PTRACE_SETREGSET only reads iov_len bytes from iov_base, a
    // live slice of that length; the kernel validates the content.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            tid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec,
        )
    })
    .map(drop)
}

/// Changes the `PTRACE_O_*` options of a stopped thread we trace
/// (`PTRACE_SETOPTIONS`; they replace the ones given at seize).
pub fn set_options(tid: i32, options: libc::c_int) -> io::Result<()> {
    // SAFETY: PTRACE_SETOPTIONS takes a tid, a null address and the options as data.
    check(unsafe { libc::ptrace(libc::PTRACE_SETOPTIONS, tid, 0usize, options as usize) }).map(drop)
}

/// `PTRACE_SECCOMP_GET_FILTER` (not in the libc crate for glibc targets).
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
/// `PTRACE_SECCOMP_GET_METADATA`.
const PTRACE_SECCOMP_GET_METADATA: libc::c_uint = 0x420d;

/// Size of one classic BPF instruction (`struct sock_filter`).
pub const SOCK_FILTER_LEN: usize = 8;

/// The seccomp filter `index` of a stopped thread we trace, as raw
/// `struct sock_filter` instructions (8 bytes each); index 0 is the filter
/// installed first (whatever ptrace(2) says). `None` once `index` is past
/// the last installed (ENOENT).
/// Needs CAP_SYS_ADMIN and no seccomp filter on the caller.
pub fn seccomp_filter(tid: i32, index: usize) -> io::Result<Option<Vec<u8>>> {
    // SAFETY: with a null data pointer the kernel only returns the number
    // of instructions of filter `index`.
    let count = match check(unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, 0usize) })
    {
        Ok(count) => count as usize,
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(err) => return Err(err),
    };
    let mut program = vec![0u8; count * SOCK_FILTER_LEN];
    // SAFETY: the kernel writes `count` instructions of 8 bytes to the
    // buffer, which is that long; the filter of a stopped thread cannot
    // change between the two calls.
    let written = check(unsafe {
        libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, program.as_mut_ptr())
    })? as usize;
    program.truncate(written * SOCK_FILTER_LEN);
    Ok(Some(program))
}

/// `struct seccomp_metadata`.
#[repr(C)]
struct SeccompMetadata {
    filter_off: u64,
    flags: u64,
}

/// The `SECCOMP_FILTER_FLAG_*` flags the kernel reports for filter `index`
/// of a stopped thread we trace (only `SECCOMP_FILTER_FLAG_LOG` is kept
/// with a filter).
pub fn seccomp_filter_flags(tid: i32, index: usize) -> io::Result<u64> {
    let mut metadata = SeccompMetadata {
        filter_off: index as u64,
        flags: 0,
    };
    // SAFETY: the kernel reads `filter_off` and writes the whole struct,
    // whose size is passed as the address argument.
    check(unsafe {
        libc::ptrace(
            PTRACE_SECCOMP_GET_METADATA,
            tid,
            std::mem::size_of::<SeccompMetadata>(),
            &mut metadata as *mut SeccompMetadata,
        )
    })?;
    Ok(metadata.flags)
}

/// The signal of a system-call stop of a thread seized with
/// `PTRACE_O_TRACESYSGOOD` (`SIGTRAP | 0x80`): never a real signal, so a
/// stop its tracer died before collecting delivers nothing.
pub const SYSCALL_STOP_SIGNAL: i32 = libc::SIGTRAP | 0x80;

/// Resumes a stopped thread until its next system-call entry or exit
/// (`PTRACE_SYSCALL`).
pub fn syscall_step(tid: i32) -> io::Result<()> {
    nix::sys::ptrace::syscall(nix::unistd::Pid::from_raw(tid), None).map_err(io::Error::from)
}

/// `PTRACE_PEEKSIGINFO`.
const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
/// `PTRACE_PEEKSIGINFO_SHARED`: read the process-wide queue instead of the
/// thread's own.
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;

/// Size of the kernel's `siginfo_t`: every record is this long.
pub const SIGINFO_LEN: usize = 128;

/// `struct ptrace_peeksiginfo_args`.
#[repr(C)]
struct PeekSiginfoArgs {
    off: u64,
    flags: u32,
    nr: i32,
}

/// Every signal queued for a stopped thread we trace, as raw 128-byte
/// `siginfo_t` records in queue order (the order they would be dequeued
/// within one signal number): the thread's own queue, or the process-wide
/// one when `shared`. Peeking leaves the queue as it is.
pub fn queued_siginfo(tid: i32, shared: bool) -> io::Result<Vec<[u8; SIGINFO_LEN]>> {
    const BATCH: usize = 32;
    let mut records = Vec::new();
    loop {
        let mut buffer = [[0u8; SIGINFO_LEN]; BATCH];
        let args = PeekSiginfoArgs {
            off: records.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: BATCH as i32,
        };
        // SAFETY: the kernel reads `args` and writes at most `nr` records
        // of SIGINFO_LEN bytes to `buffer`, which holds BATCH of them.
        let copied = check(unsafe {
            libc::ptrace(
                PTRACE_PEEKSIGINFO,
                tid,
                &args as *const PeekSiginfoArgs,
                buffer.as_mut_ptr(),
            )
        })? as usize;
        records.extend_from_slice(&buffer[..copied.min(BATCH)]);
        if copied < BATCH {
            return Ok(records);
        }
    }
}
