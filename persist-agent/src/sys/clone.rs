//! `clone3` as a fork with a chosen pid, and the few async-signal-safe calls
//! a forked child of a possibly multi-threaded agent may make.
//!
//! After `clone3` without `CLONE_VM` the child is a copy of the calling
//! thread only: other threads may have held locks (the allocator's among
//! them), so until it stops existing as agent code the child touches only
//! memory prepared before the fork and makes raw system calls.

use std::io;
use std::os::fd::RawFd;

/// Which side of a [`fork_with`] we are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// In the new process.
    Child,
    /// In the caller; the child has this pid (in the caller's namespace).
    Parent(i32),
}

/// Size of `struct clone_args` (version 2, with `cgroup`).
pub const CLONE_ARGS_SIZE: usize = size_of::<libc::clone_args>();

/// Forks like `fork()` but through `clone3`, optionally with extra `flags`
/// (e.g. `CLONE_NEWPID`) and a chosen pid (`set_tid`, needs
/// `CAP_CHECKPOINT_RESTORE`). The child gets `SIGCHLD` as exit signal, or
/// with `CLONE_PARENT` (a sibling of the caller) the caller's.
///
/// In the child, only async-signal-safe code may run (see the module doc).
pub fn fork_with(flags: u64, pid: Option<i32>) -> io::Result<Forked> {
    let tids = [pid.unwrap_or(0)];
    let args = libc::clone_args {
        flags,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        // With CLONE_PARENT the kernel takes the caller's own exit signal
        // and refuses any other.
        exit_signal: if flags & libc::CLONE_PARENT as u64 == 0 {
            libc::SIGCHLD as u64
        } else {
            0
        },
        stack: 0,
        stack_size: 0,
        tls: 0,
        set_tid: if pid.is_some() {
            tids.as_ptr() as u64
        } else {
            0
        },
        set_tid_size: u64::from(pid.is_some()),
        cgroup: 0,
    };
    // SAFETY: clone3 without CLONE_VM and without a stack duplicates the
    // calling thread like fork(); the argument struct and tid array outlive
    // the call. The child only returns into code that follows the
    // async-signal-safety rule documented above.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const libc::clone_args,
            CLONE_ARGS_SIZE,
        )
    };
    match rc {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid as i32)),
    }
}

/// Encodes a `struct clone_args` for a new thread of a restored process with
/// thread id `tid` (array at `set_tid_address`), for a restorer table.
pub fn thread_clone_args(set_tid_address: u64) -> [u8; CLONE_ARGS_SIZE] {
    let flags = libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM;
    let words = [flags as u64, 0, 0, 0, 0, 0, 0, 0, set_tid_address, 1, 0];
    let mut out = [0u8; CLONE_ARGS_SIZE];
    for (chunk, word) in out.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    out
}

/// Blocks every signal in the calling thread. Async-signal-safe.
pub fn block_all_signals() {
    let all = !0u64;
    // SAFETY: rt_sigprocmask with a valid 8-byte mask and a null old mask.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &all as *const u64,
            std::ptr::null_mut::<u64>(),
            8,
        );
    }
}

/// Reads one byte from `fd`, retrying on EINTR. Async-signal-safe.
pub fn read_byte(fd: RawFd) -> io::Result<u8> {
    let mut byte = 0u8;
    loop {
        // SAFETY: reading one byte into a valid local.
        let rc = unsafe { libc::read(fd, (&raw mut byte).cast(), 1) };
        match rc {
            1 => return Ok(byte),
            0 => return Err(io::Error::from_raw_os_error(libc::EPIPE)),
            _ => {
                let err = io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EINTR) {
                    return Err(err);
                }
            }
        }
    }
}

/// Writes all of `bytes` to `fd`, ignoring errors. Async-signal-safe.
pub fn write_all_raw(fd: RawFd, bytes: &[u8]) {
    // SAFETY: writing from a valid slice; a short write of a few bytes to a
    // pipe does not happen (writes up to PIPE_BUF are atomic).
    unsafe {
        libc::write(fd, bytes.as_ptr().cast(), bytes.len());
    }
}

/// Moves `fd` to exactly `target` (close-on-exec) and closes the original.
/// Async-signal-safe.
pub fn move_fd(fd: RawFd, target: RawFd) -> io::Result<()> {
    if fd == target {
        return Ok(());
    }
    // SAFETY: dup3 and close on descriptor numbers; no memory involved.
    unsafe {
        if libc::dup3(fd, target, libc::O_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
        libc::close(fd);
    }
    Ok(())
}

/// Terminates the calling process at once. Async-signal-safe.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and runs no destructors or atexit hooks,
    // which is what a forked child of a multi-threaded process needs.
    unsafe { libc::_exit(code) }
}

/// Waits for any child of this process (an init of a pid namespace reaping
/// what it started) until none is left. Async-signal-safe.
pub fn reap_until_no_children() {
    loop {
        let mut status = 0;
        // SAFETY: wait4 with a valid status pointer and no rusage.
        let rc = unsafe { libc::wait4(-1, &mut status, libc::__WALL, std::ptr::null_mut()) };
        if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

/// Fills `buf` from `fd`, retrying on EINTR. Async-signal-safe.
pub fn read_exact_raw(fd: RawFd, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: reading into the unfilled tail of a valid slice.
        let rc = unsafe { libc::read(fd, buf[done..].as_mut_ptr().cast(), buf.len() - done) };
        match rc {
            0 => return Err(io::Error::from_raw_os_error(libc::EPIPE)),
            n if n > 0 => done += n as usize,
            _ => {
                let err = io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EINTR) {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}

/// Gives the calling process a descriptor table of its own (it shared one:
/// `CLONE_FILES`) holding only the descriptors below `below`: the kernel
/// copies no others (`close_range` with `CLOSE_RANGE_UNSHARE`).
/// Async-signal-safe.
pub fn own_fds_below(below: RawFd) -> io::Result<()> {
    const CLOSE_RANGE_UNSHARE: u32 = 1 << 1;
    // SAFETY: close_range on descriptor numbers; no memory involved.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            below as u32,
            u32::MAX,
            CLOSE_RANGE_UNSHARE,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Closes every descriptor except those in `keep`, which must be sorted.
/// Async-signal-safe.
pub fn close_all_except(keep: &[RawFd]) {
    let mut next: u32 = 0;
    for &fd in keep {
        let fd = fd as u32;
        if fd > next {
            // SAFETY: close_range on a range of descriptor numbers.
            unsafe { libc::syscall(libc::SYS_close_range, next, fd - 1, 0) };
        }
        next = fd + 1;
    }
    // SAFETY: as above, up to the highest possible descriptor.
    unsafe { libc::syscall(libc::SYS_close_range, next, u32::MAX, 0) };
}

/// Unregisters the calling thread's rseq area (inherited from the agent
/// across the fork, it would otherwise be written into the restored layout).
/// Async-signal-safe.
pub fn rseq_unregister(address: u64, length: u32, signature: u32) -> io::Result<()> {
    // By hand: neither libc nor linux-raw-sys has <linux/rseq.h>'s flags.
    const RSEQ_FLAG_UNREGISTER: u64 = 1;
    // SAFETY: rseq unregistration only compares the arguments with the
    // current registration and clears it; no memory is written.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rseq,
            address,
            length,
            RSEQ_FLAG_UNREGISTER,
            signature,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens `path` (a NUL-terminated byte string) and places it at exactly
/// `target`. Async-signal-safe.
pub fn open_at_fd(path: &[u8], flags: i32, target: RawFd) -> io::Result<()> {
    if path.last() != Some(&0) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: path is NUL-terminated (checked above).
    let fd = unsafe { libc::open(path.as_ptr().cast(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    if fd == target {
        return Ok(());
    }
    // SAFETY: dup2 and close on descriptor numbers; the result must be
    // inheritable by the restored process, so no O_CLOEXEC on the target.
    unsafe {
        if libc::dup2(fd, target) < 0 {
            let err = io::Error::last_os_error();
            libc::close(fd);
            return Err(err);
        }
        libc::close(fd);
    }
    Ok(())
}

/// Sends `signal` to thread `tid` of process `pid` (`tgkill`).
pub fn tgkill(pid: i32, tid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: tgkill takes three integers.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `signal` to process `pid` as a whole (`kill`); unlike nix's, any
/// number, realtime signals included.
pub fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill takes two integers.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// In a fresh mount namespace: stops mount propagation towards the parent
/// namespace (recursive slave) and mounts a procfs for the calling process's
/// pid namespace on /proc, so that the pids it sees match /proc.
/// Async-signal-safe.
pub fn mount_own_proc() -> io::Result<()> {
    // SAFETY: mount with static NUL-terminated strings and null data.
    unsafe {
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
        if libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Ends the calling process so that its parent's `waitpid` reads
/// `wait_status`: `_exit` with its exit code, or death by its signal (default
/// action, unblocked). A signal that would dump core dumps none: the process
/// is made non-dumpable and its core limit 0 first (a `core_pattern` piping
/// to a helper ignores a limit of 0), so the status's core-dump bit is never
/// set. Async-signal-safe.
pub fn exit_with_status(wait_status: i32) -> ! {
    let signal = wait_status & 0x7f;
    if signal == 0 {
        exit_now((wait_status >> 8) & 0xff);
    }
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let default_action = libc::sigaction {
        sa_sigaction: libc::SIG_DFL,
        // SAFETY: an all-zero sigset_t is a valid empty set.
        sa_mask: unsafe { std::mem::zeroed() },
        sa_flags: 0,
        sa_restorer: None,
    };
    let unblock: u64 = 1 << (signal - 1);
    // SAFETY: setrlimit and sigaction read the valid structs passed (no old
    // action asked for); prctl and kill take integers; rt_sigprocmask reads
    // a valid 8-byte mask. All are async-signal-safe.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        libc::sigaction(signal, &default_action, std::ptr::null_mut());
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_UNBLOCK,
            &unblock as *const u64,
            std::ptr::null_mut::<u64>(),
            8,
        );
        libc::kill(libc::getpid(), signal);
    }
    // Only a signal whose default action is not to terminate survives; the
    // image check refuses none of those, so this is a shell's convention.
    exit_now(128 + signal)
}

/// Maps `len` bytes at `address`, readable and writable and private: anonymous
/// memory, or file `fd` from `offset`. Never replaces a mapping that is there
/// (`MAP_FIXED_NOREPLACE`, `EEXIST`). Async-signal-safe.
pub fn map_private_at(address: u64, len: u64, fd: Option<RawFd>, offset: u64) -> io::Result<()> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_FIXED_NOREPLACE;
    if fd.is_none() {
        flags |= libc::MAP_ANONYMOUS;
    }
    // SAFETY: MAP_FIXED_NOREPLACE fails rather than replace any mapping, so
    // no memory of ours changes; the new mapping is not referenced by Rust.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mmap,
            address,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd.unwrap_or(-1),
            offset,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if rc as u64 != address {
        // A kernel that ignores the flag (before 4.17) placed it elsewhere.
        // SAFETY: the range was just mapped by us and nothing refers to it.
        unsafe { libc::syscall(libc::SYS_munmap, rc, len) };
        return Err(io::Error::from_raw_os_error(libc::EEXIST));
    }
    Ok(())
}

/// Stops the calling process with `SIGSTOP`, for its tracer to see (a
/// signal-delivery stop) and let it go on. Async-signal-safe.
pub fn stop_self() -> io::Result<()> {
    // SAFETY: getpid and kill take and return integers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kill,
            libc::syscall(libc::SYS_getpid),
            libc::SIGSTOP,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
