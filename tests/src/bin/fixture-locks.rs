//! Test fixture: file locks of every kind, and a file open with
//! `O_APPEND` at an offset of its own.
//!
//! `fixture-locks DIR` takes a write flock on `DIR/flock`, a read flock on
//! `DIR/shared`, POSIX locks on `DIR/posix` (write on bytes 10-14, read from
//! byte 100 to the end), an OFD write lock on the whole of `DIR/ofd`, opens
//! `DIR/append` with `O_APPEND`, writes `abc` and seeks back to offset 1,
//! then writes `DIR/ready`.
//!
//! On SIGUSR1 it checks what it can see from inside: another open file
//! description of `DIR/flock` cannot take a flock, one of `DIR/ofd` sees
//! the OFD lock, and the append file still has `O_APPEND`, offset 1, and
//! takes a write at its end. It writes `DIR/result`: `OK` or `FAIL: what
//! differs`. The POSIX locks, which a process never conflicts with, are
//! for another process to check.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::fcntl::{FcntlArg, Flock, FlockArg, OFlag, fcntl};

/// Incremented by each SIGUSR1.
static ROUND: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_usr1(_: libc::c_int) {
    ROUND.fetch_add(1, Ordering::SeqCst);
}

fn open(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn record(kind: i32, start: i64, len: i64) -> libc::flock {
    libc::flock {
        l_type: kind as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: start,
        l_len: len,
        l_pid: 0,
    }
}

fn check(dir: &Path, append: &mut File) -> Result<(), String> {
    let other = open(&dir.join("flock"));
    if Flock::lock(other, FlockArg::LockExclusiveNonblock).is_ok() {
        return Err("another open file of flock took its lock: the flock is not held".into());
    }
    let ofd = open(&dir.join("ofd"));
    let mut probe = record(libc::F_WRLCK, 0, 0);
    fcntl(&ofd, FcntlArg::F_OFD_GETLK(&mut probe)).map_err(|e| format!("F_OFD_GETLK: {e}"))?;
    if probe.l_type != libc::F_WRLCK as i16 {
        return Err(format!(
            "the OFD lock is not held: F_OFD_GETLK says type {}",
            probe.l_type
        ));
    }
    let flags = fcntl(&*append, FcntlArg::F_GETFL).map_err(|e| format!("F_GETFL: {e}"))?;
    if OFlag::from_bits_truncate(flags) & OFlag::O_APPEND != OFlag::O_APPEND {
        return Err(format!("the append file lost O_APPEND: flags {flags:#o}"));
    }
    let offset = append
        .stream_position()
        .map_err(|e| format!("lseek: {e}"))?;
    if offset != 1 {
        return Err(format!("the append file is at offset {offset}, not 1"));
    }
    let size = append.metadata().map_err(|e| e.to_string())?.len();
    append.write_all(b"d").map_err(|e| format!("write: {e}"))?;
    let after = append.stream_position().map_err(|e| e.to_string())?;
    if after != size + 1 {
        return Err(format!(
            "a write to the append file of {size} bytes left it at offset {after}"
        ));
    }
    // Back where the image has it, for the next round of this run.
    append.seek(SeekFrom::Start(1)).map_err(|e| e.to_string())?;
    Ok(())
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: fixture-locks DIR"));
    // SAFETY: the handler only touches an atomic.
    unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t) };
    let flock = Flock::lock(open(&dir.join("flock")), FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .expect("flock");
    let shared = Flock::lock(open(&dir.join("shared")), FlockArg::LockSharedNonblock)
        .map_err(|(_, e)| e)
        .expect("shared flock");
    let posix = open(&dir.join("posix"));
    fcntl(&posix, FcntlArg::F_SETLK(&record(libc::F_WRLCK, 10, 5))).expect("POSIX write lock");
    fcntl(&posix, FcntlArg::F_SETLK(&record(libc::F_RDLCK, 100, 0))).expect("POSIX read lock");
    let ofd = open(&dir.join("ofd"));
    fcntl(&ofd, FcntlArg::F_OFD_SETLK(&record(libc::F_WRLCK, 0, 0))).expect("OFD lock");
    let mut append = OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("append"))
        .expect("open append");
    append.write_all(b"abc").expect("write abc");
    append.seek(SeekFrom::Start(1)).expect("seek to 1");
    // Held, never closed: closing any descriptor of a file would drop the
    // process's POSIX locks on it.
    let _held = (flock, shared, posix, ofd);

    let ready = dir.join("ready.tmp");
    std::fs::write(&ready, std::process::id().to_string()).expect("write ready");
    std::fs::rename(&ready, dir.join("ready")).expect("rename ready");
    let mut seen_round = 0;
    loop {
        std::thread::sleep(Duration::from_millis(2));
        let round = ROUND.load(Ordering::SeqCst);
        if round == seen_round {
            continue;
        }
        seen_round = round;
        let text = match check(&dir, &mut append) {
            Ok(()) => "OK".to_owned(),
            Err(what) => format!("FAIL: {what}"),
        };
        let tmp = dir.join("result.tmp");
        std::fs::write(&tmp, text).expect("write result");
        std::fs::rename(&tmp, dir.join("result")).expect("rename result");
    }
}
