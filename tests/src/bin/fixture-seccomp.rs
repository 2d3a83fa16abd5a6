//! Test fixture: threads under stacked seccomp filters.
//!
//! `fixture-seccomp DIR` sets no_new_privs and installs two filters: the
//! first makes `getppid`, `sysinfo`, `getitimer` and `set_tid_address`
//! fail with EPERM (the last two are calls the agent makes in the process
//! when it checkpoints and restores it), the second (with
//! `SECCOMP_FILTER_FLAG_LOG`) makes `getppid` and `uname` fail with E2BIG.
//! Where both fail a call, the last installed gives the errno, so
//! `getppid` shows their order. It then starts two threads, which inherit
//! both; `worker-1` adds a third filter of its own, making `sysinfo` and
//! `getppid` fail with EIO. Every thread records what it sees
//! (each call's result, its seccomp mode and filter count, no_new_privs),
//! checks that against what the filters should do, and writes `DIR/ready`.
//! On SIGUSR1 every thread looks again and `DIR/result` says `OK` when all
//! see what they saw at first, or `FAIL: what differs`.
//!
//! `fixture-seccomp DIR strict` puts a thread in strict mode (mode 1),
//! blocked in a read; `fixture-seccomp DIR user-notif` installs a filter
//! whose verdict for `getppid` is `SECCOMP_RET_USER_NOTIF` and keeps its
//! listener open. Both write `DIR/ready` and wait.
//!
//! `fixture-seccomp --exec CMD ARGS...` sets no_new_privs, installs a
//! filter making `uname` fail with EPERM and executes CMD under it.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::time::Duration;

/// Incremented by each SIGUSR1: threads look again when it changes.
static ROUND: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_usr1(_: libc::c_int) {
    ROUND.fetch_add(1, Ordering::SeqCst);
}

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// A filter with a verdict for each listed system call, allow for the rest.
fn filter_for(verdicts: &[(libc::c_long, u32)]) -> Vec<libc::sock_filter> {
    let count = verdicts.len() as u8;
    let mut program = vec![
        // A = arch; other architectures are allowed (none here).
        insn(0x20, 0, 0, 4),
        insn(0x15, 0, 2 * count + 1, AUDIT_ARCH_X86_64),
        // A = syscall number.
        insn(0x20, 0, 0, 0),
    ];
    for &(nr, action) in verdicts {
        // This call: its verdict next; another: skip the verdict.
        program.push(insn(0x15, 0, 1, nr as u32));
        program.push(insn(0x06, 0, 0, action));
    }
    program.push(insn(0x06, 0, 0, libc::SECCOMP_RET_ALLOW));
    program
}

fn denying(calls: &[(libc::c_long, i32)]) -> Vec<libc::sock_filter> {
    let verdicts: Vec<(libc::c_long, u32)> = calls
        .iter()
        .map(|&(nr, errno)| (nr, libc::SECCOMP_RET_ERRNO | errno as u32))
        .collect();
    filter_for(&verdicts)
}

/// Installs `program` with `seccomp(2)` and `flags`; returns what the call
/// returned (a listener fd with `SECCOMP_FILTER_FLAG_NEW_LISTENER`).
fn install(program: &mut [libc::sock_filter], flags: libc::c_ulong) -> libc::c_long {
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: the kernel copies the program the sock_fprog points to.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            flags,
            &prog as *const libc::sock_fprog,
        )
    };
    assert!(rc >= 0, "seccomp: {}", std::io::Error::last_os_error());
    rc
}

fn set_no_new_privs() {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_NO_NEW_PRIVS");
}

/// The errno name of a raw call's result, or `ok`.
fn outcome(rc: libc::c_long) -> String {
    if rc >= 0 {
        return "ok".into();
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::E2BIG) => "E2BIG".into(),
        Some(libc::EIO) => "EIO".into(),
        other => format!("errno {other:?}"),
    }
}

/// What the calling thread sees of its filters.
fn observe() -> String {
    // Each result is read at once: errno belongs to the last call.
    // SAFETY: getppid takes nothing.
    let getppid = outcome(unsafe { libc::syscall(libc::SYS_getppid) });
    // SAFETY: uname only writes into the zeroed struct, which outlives it.
    let uname = outcome(unsafe {
        let mut utsname: libc::utsname = std::mem::zeroed();
        libc::syscall(libc::SYS_uname, &mut utsname as *mut libc::utsname)
    });
    // SAFETY: sysinfo only writes into the zeroed struct, which outlives it.
    let sysinfo = outcome(unsafe {
        let mut info: libc::sysinfo = std::mem::zeroed();
        libc::syscall(libc::SYS_sysinfo, &mut info as *mut libc::sysinfo)
    });
    // SAFETY: getitimer only writes into the zeroed struct, which outlives
    // the call.
    let getitimer = outcome(unsafe {
        let mut timer: libc::itimerval = std::mem::zeroed();
        libc::syscall(
            libc::SYS_getitimer,
            libc::ITIMER_REAL,
            &mut timer as *mut libc::itimerval,
        )
    });
    // SAFETY: PR_GET_NO_NEW_PRIVS takes plain integers.
    let no_new_privs = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let status = fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .unwrap_or("?")
            .trim()
            .to_owned()
    };
    format!(
        "getppid={getppid} uname={uname} sysinfo={sysinfo} getitimer={getitimer} seccomp={} filters={} no_new_privs={no_new_privs}",
        field("Seccomp:"),
        field("Seccomp_filters:"),
    )
}

/// What a thread must see. Where two filters fail the same call, the errno
/// of the one installed last wins: `getppid` tells their order.
fn expected(own_filter: bool) -> String {
    let (getppid, sysinfo, filters) = if own_filter {
        ("EIO", "EIO", 3)
    } else {
        ("E2BIG", "EPERM", 2)
    };
    format!(
        "getppid={getppid} uname=E2BIG sysinfo={sysinfo} getitimer=EPERM seccomp=2 filters={filters} \
         no_new_privs=1"
    )
}

/// Checks a first look against what the filters should do.
fn first_look(who: &str, own_filter: bool) -> String {
    let seen = observe();
    let want = expected(own_filter);
    assert_eq!(seen, want, "{who} before any checkpoint");
    seen
}

fn worker(index: usize, start: Arc<Barrier>, report: mpsc::Sender<(usize, String)>) {
    let own_filter = index == 1;
    if own_filter {
        install(
            &mut denying(&[
                (libc::SYS_sysinfo, libc::EIO),
                (libc::SYS_getppid, libc::EIO),
            ]),
            0,
        );
    }
    let recorded = first_look(&format!("worker-{index}"), own_filter);
    start.wait();
    let mut seen_round = 0;
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let round = ROUND.load(Ordering::SeqCst);
        if round == seen_round {
            continue;
        }
        seen_round = round;
        let now = observe();
        let verdict = if now == recorded {
            String::new()
        } else {
            format!("worker-{index} saw {recorded:?}, now {now:?}")
        };
        if report.send((index, verdict)).is_err() {
            return;
        }
    }
}

fn write_atomically(dir: &Path, name: &str, contents: &str) {
    let tmp = dir.join(format!("{name}.tmp"));
    fs::write(&tmp, contents).expect("write");
    fs::rename(&tmp, dir.join(name)).expect("rename");
}

fn filtered_threads(dir: &Path) -> ! {
    set_no_new_privs();
    install(
        &mut denying(&[
            (libc::SYS_getppid, libc::EPERM),
            (libc::SYS_sysinfo, libc::EPERM),
            // Calls the checkpoint injects and the restore makes in each
            // thread, which must not be filtered for the agent.
            (libc::SYS_getitimer, libc::EPERM),
            (libc::SYS_set_tid_address, libc::EPERM),
        ]),
        0,
    );
    install(
        &mut denying(&[
            (libc::SYS_getppid, libc::E2BIG),
            (libc::SYS_uname, libc::E2BIG),
        ]),
        libc::SECCOMP_FILTER_FLAG_LOG,
    );
    let recorded = first_look("main", false);
    let start = Arc::new(Barrier::new(3));
    let (sender, receiver) = mpsc::channel();
    for index in 0..2 {
        let start = Arc::clone(&start);
        let sender = sender.clone();
        std::thread::Builder::new()
            .name(format!("worker-{index}"))
            .spawn(move || worker(index, start, sender))
            .expect("spawn worker");
    }
    start.wait();
    write_atomically(dir, "ready", &std::process::id().to_string());
    let mut seen_round = 0;
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let round = ROUND.load(Ordering::SeqCst);
        if round == seen_round {
            continue;
        }
        seen_round = round;
        let now = observe();
        let mut failures = Vec::new();
        if now != recorded {
            failures.push(format!("main saw {recorded:?}, now {now:?}"));
        }
        for _ in 0..2 {
            match receiver.recv_timeout(Duration::from_secs(20)) {
                Ok((_, verdict)) if verdict.is_empty() => {}
                Ok((_, verdict)) => failures.push(verdict),
                Err(err) => failures.push(format!("a worker did not report: {err}")),
            }
        }
        let result = if failures.is_empty() {
            "OK".to_owned()
        } else {
            format!("FAIL: {}", failures.join("; "))
        };
        write_atomically(dir, "result", &result);
    }
}

fn strict_thread(dir: &Path) -> ! {
    let (read_end, _write_end) = nix::unistd::pipe().expect("pipe");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&read_end);
    let (entered, strict) = mpsc::channel();
    std::thread::spawn(move || {
        entered.send(()).expect("report");
        let mut byte = 0u8;
        // SAFETY: prctl takes integers; read writes one byte to a live
        // local. Nothing else runs in this thread once it is strict.
        unsafe {
            libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_STRICT, 0, 0, 0);
            libc::read(fd, (&mut byte as *mut u8).cast(), 1);
        }
    });
    strict.recv().expect("thread started");
    // Let it enter strict mode and block.
    std::thread::sleep(Duration::from_millis(100));
    write_atomically(dir, "ready", &std::process::id().to_string());
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn user_notif(dir: &Path) -> ! {
    set_no_new_privs();
    let _listener = install(
        &mut filter_for(&[(libc::SYS_getppid, libc::SECCOMP_RET_USER_NOTIF)]),
        libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
    );
    write_atomically(dir, "ready", &std::process::id().to_string());
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn exec_filtered(command: &[std::ffi::OsString]) -> ! {
    set_no_new_privs();
    install(&mut denying(&[(libc::SYS_uname, libc::EPERM)]), 0);
    let args: Vec<CString> = command
        .iter()
        .map(|arg| CString::new(arg.as_bytes()).expect("no NUL in an argument"))
        .collect();
    let err = nix::unistd::execvp(&args[0], &args).unwrap_err();
    panic!("exec {:?}: {err}", command[0]);
}

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|arg| arg == "--exec") {
        assert!(args.len() > 1, "usage: fixture-seccomp --exec CMD ARGS...");
        exec_filtered(&args[1..]);
    }
    let dir = PathBuf::from(
        args.first()
            .expect("usage: fixture-seccomp DIR [strict|user-notif]"),
    );
    // SAFETY: the handler only touches an atomic.
    unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t) };
    match args.get(1).and_then(|mode| mode.to_str()) {
        None => filtered_threads(&dir),
        Some("strict") => strict_thread(&dir),
        Some("user-notif") => user_notif(&dir),
        Some(other) => panic!("unknown mode {other}"),
    }
}
