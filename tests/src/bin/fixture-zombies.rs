//! Test fixture: a parent with two children that ended and are not reaped.
//!
//! `fixture-zombies DIR` forks a child that exits with code 7 and one that
//! it kills with SIGTERM, waits until both are zombies (`waitid` with
//! `WNOWAIT`, which does not reap them), and writes `DIR/ready`:
//! `PARENT EXITED KILLED` (pids). On SIGUSR1 it reaps both with `waitpid`
//! and writes `DIR/result`: `PID STATUS PID STATUS`, each pid `waitpid`
//! returned and its raw wait status, in the order reaped (the exited child
//! first).

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static REAP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    REAP.store(true, Ordering::SeqCst);
}

/// Forks a child that runs `child` and never returns.
fn fork(child: impl FnOnce()) -> i32 {
    // SAFETY: the fixture has a single thread, so the child may run Rust
    // code freely.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        child();
        // SAFETY: ends the child without running the parent's exit hooks.
        unsafe { libc::_exit(0) };
    }
    pid
}

/// Waits until `pid` has ended, without reaping it.
fn wait_ended(pid: i32) {
    // SAFETY: a zeroed siginfo_t is valid for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid fills the valid siginfo_t passed.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT,
        )
    };
    assert_eq!(rc, 0, "waitid: {}", std::io::Error::last_os_error());
}

/// Reaps `pid`: what `waitpid` returned and the wait status.
fn reap(pid: i32) -> (i32, i32) {
    let mut status = 0;
    // SAFETY: waitpid fills the valid status passed.
    let reaped = unsafe { libc::waitpid(pid, &mut status, 0) };
    (reaped, status)
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: fixture-zombies DIR"));
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
    }
    // SAFETY: _exit in the child, as after any fork.
    let exited = fork(|| unsafe { libc::_exit(7) });
    let killed = fork(|| {
        loop {
            // SAFETY: pause only waits for a signal.
            unsafe { libc::pause() };
        }
    });
    // SAFETY: kill takes two integers.
    unsafe { libc::kill(killed, libc::SIGTERM) };
    wait_ended(exited);
    wait_ended(killed);
    let ready = dir.join("ready");
    fs::write(
        dir.join("ready.tmp"),
        format!("{} {exited} {killed}", std::process::id()),
    )
    .expect("write ready");
    fs::rename(dir.join("ready.tmp"), ready).expect("rename ready");
    loop {
        if REAP.swap(false, Ordering::SeqCst) {
            let (first, first_status) = reap(exited);
            let (second, second_status) = reap(killed);
            let text = format!("{first} {first_status} {second} {second_status}");
            fs::write(dir.join("result.tmp"), text).expect("write result");
            fs::rename(dir.join("result.tmp"), dir.join("result")).expect("rename result");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
