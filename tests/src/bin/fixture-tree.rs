//! Test fixture: a process tree sharing resources between its processes.
//!
//! `fixture-tree DIR` opens `DIR/log` (one open file description), a pipe,
//! a UNIX socket pair and 4 pages of `MAP_SHARED` anonymous memory (page
//! `i` filled with `i + 1`), then forks two children:
//! - the reader keeps the pipe's read end and one end of the socket pair;
//! - the idler moves to a process group of its own and holds nothing but
//!   what it inherited (the log, the memory); with `--share-fd-table` as
//!   second argument it is cloned with `CLONE_FILES` instead of forked, so
//!   that it shares the parent's descriptor table.
//!
//! The parent keeps the pipe's write end and the other end of the pair,
//! writes [`PIPE_TEXT`] into the pipe and [`SOCKET_TEXT`] into the pair,
//! both left unread, stores 0x11 in the first byte of the shared memory,
//! and writes `DIR/ready`: `PARENT READER IDLER` (pids). On SIGUSR1, the
//! reader checks that the unread data is still there (it reads it) and that
//! the shared memory holds what the parent stored, and writes
//! `DIR/result`: `OK` or `FAIL: what differs`.

use std::fs;
use std::io::Write as _;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType};

/// What the parent leaves unread in the pipe.
const PIPE_TEXT: &[u8] = b"through the pipe";
/// What the parent leaves unread in the socket pair.
const SOCKET_TEXT: &[u8] = b"through the socket";
/// Pages of shared memory.
const SHARED_PAGES: usize = 4;
const PAGE: usize = 4096;

static CHECK: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    CHECK.store(true, Ordering::SeqCst);
}

/// A `MAP_SHARED` anonymous mapping, page `i` filled with `i + 1`.
fn shared_memory() -> &'static mut [u8] {
    let len = SHARED_PAGES * PAGE;
    // SAFETY: a fresh anonymous mapping, leaked for the process's life.
    let memory = unsafe {
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(ptr, libc::MAP_FAILED, "mmap of shared memory");
        std::slice::from_raw_parts_mut(ptr.cast::<u8>(), len)
    };
    for (index, page) in memory.chunks_mut(PAGE).enumerate() {
        page.fill(index as u8 + 1);
    }
    memory
}

/// Forks; the child runs `child` and never returns.
fn fork(child: impl FnOnce()) -> i32 {
    // SAFETY: the fixture has a single thread, so the child may run Rust
    // code freely.
    spawn(unsafe { libc::fork() } as libc::c_long, child)
}

/// Forks with `clone(flags)`, which like fork returns twice with a null
/// stack; the child runs `child` and never returns.
fn clone(flags: libc::c_long, child: impl FnOnce()) -> i32 {
    // SAFETY: a null stack makes clone run the child on a copy of ours,
    // as fork does; the fixture has a single thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags | libc::SIGCHLD as libc::c_long,
            0,
            0,
            0,
            0,
        )
    };
    spawn(rc, child)
}

/// What a fork returned: runs `child` in the child.
fn spawn(rc: libc::c_long, child: impl FnOnce()) -> i32 {
    match rc {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            child();
            std::process::exit(0);
        }
        pid => pid as i32,
    }
}

/// Closes the descriptor of `fd` without taking it (in a forked child).
fn close(fd: &OwnedFd) {
    nix::unistd::close(fd.as_raw_fd()).expect("close");
}

fn write_atomically(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!("{name}.tmp"));
    fs::write(&tmp, text).expect("write");
    fs::rename(&tmp, dir.join(name)).expect("rename");
}

/// The reader's checks, on SIGUSR1.
fn verify(pipe: &OwnedFd, socket: &OwnedFd, memory: &[u8]) -> Result<(), String> {
    let mut buffer = [0u8; 64];
    let n = nix::unistd::read(pipe, &mut buffer).map_err(|e| format!("reading the pipe: {e}"))?;
    if &buffer[..n] != PIPE_TEXT {
        return Err(format!(
            "the pipe held {:?}",
            String::from_utf8_lossy(&buffer[..n])
        ));
    }
    let n = nix::sys::socket::recv(socket.as_raw_fd(), &mut buffer, MsgFlags::MSG_DONTWAIT)
        .map_err(|e| format!("reading the socket pair: {e}"))?;
    if &buffer[..n] != SOCKET_TEXT {
        return Err(format!(
            "the socket pair held {:?}",
            String::from_utf8_lossy(&buffer[..n])
        ));
    }
    if memory[0] != 0x11 {
        return Err(format!(
            "shared memory holds {:#x} where the parent stored 0x11",
            memory[0]
        ));
    }
    for (index, page) in memory.chunks(PAGE).enumerate() {
        let expected = index as u8 + 1;
        if page[1..].iter().any(|&byte| byte != expected) {
            return Err(format!("shared page {index} is not filled with {expected}"));
        }
    }
    Ok(())
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: fixture-tree DIR"));
    let dir = dir.canonicalize().expect("canonical DIR");
    let memory = shared_memory();
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))
        .expect("open log");
    let (pipe_read, pipe_write) = nix::unistd::pipe().expect("pipe");
    let (parent_end, reader_end) = nix::sys::socket::socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::empty(),
    )
    .expect("socketpair");
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        assert_ne!(
            libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t),
            libc::SIG_ERR
        );
    }

    let reader = fork(|| {
        // The parent's ends; the child never returns, so their owners in
        // this copy of the parent's memory are never dropped.
        close(&pipe_write);
        close(&parent_end);
        loop {
            while !CHECK.swap(false, Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let result = match verify(&pipe_read, &reader_end, memory) {
                Ok(()) => "OK".to_owned(),
                Err(what) => format!("FAIL: {what}"),
            };
            write_atomically(&dir, "result", &result);
        }
    });
    let idle = || {
        nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))
            .expect("setpgid");
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    };
    let share_fd_table = std::env::args().nth(2).as_deref() == Some("--share-fd-table");
    let idler = if share_fd_table {
        clone(libc::CLONE_FILES as libc::c_long, idle)
    } else {
        fork(idle)
    };
    drop(pipe_read);
    drop(reader_end);
    nix::unistd::write(&pipe_write, PIPE_TEXT).expect("write the pipe");
    nix::sys::socket::send(parent_end.as_raw_fd(), SOCKET_TEXT, MsgFlags::empty())
        .expect("send on the socket pair");
    memory[0] = 0x11;
    writeln!(
        log,
        "parent {} forked {reader} and {idler}",
        std::process::id()
    )
    .expect("log");
    write_atomically(
        &dir,
        "ready",
        &format!("{} {reader} {idler}", std::process::id()),
    );
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}
