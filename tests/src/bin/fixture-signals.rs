//! Test fixture: signals queued with their siginfo, process-wide and for
//! one thread.
//!
//! `fixture-signals DIR` blocks SIGRTMIN+1 and SIGUSR2 in every thread,
//! queues itself SIGRTMIN+1 three times with `sigqueue` values 11, 22 and
//! 33, sends itself SIGUSR2 with `kill` and queues SIGRTMIN+1 with value 77
//! to its second thread alone, then writes `DIR/ready`. On SIGUSR1 each
//! thread takes every signal waiting for it with `sigtimedwait` and checks
//! numbers, order, `si_code`, sender and values, and the main thread writes
//! `DIR/result`: `OK` or `FAIL: what differs`. The signals are taken, so it
//! checks once per run.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// Incremented by each SIGUSR1.
static ROUND: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_usr1(_: libc::c_int) {
    ROUND.fetch_add(1, Ordering::SeqCst);
}

/// `SI_QUEUE`: what `sigqueue` puts in `si_code`.
const SI_QUEUE: i32 = -1;
/// `SI_USER`: what `kill` puts in `si_code`.
const SI_USER: i32 = 0;

/// One signal as `sigtimedwait` hands it over.
#[derive(Debug, PartialEq)]
struct Taken {
    signo: i32,
    code: i32,
    pid: i32,
    uid: u32,
    /// `si_value`, meaningful for `SI_QUEUE` only.
    value: u64,
}

fn rt_signal() -> i32 {
    libc::SIGRTMIN() + 1
}

fn waited_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, rt_signal());
        libc::sigaddset(&mut set, libc::SIGUSR2);
        set
    }
}

/// The raw 128-byte siginfo `sigqueue` would build, sent with
/// `rt_tgsigqueueinfo` to thread `tid` of this process.
fn queue_to_thread(tid: i32, signo: i32, value: u64) {
    let mut info = [0u8; 128];
    info[0..4].copy_from_slice(&signo.to_ne_bytes());
    info[8..12].copy_from_slice(&SI_QUEUE.to_ne_bytes());
    // SAFETY: getpid and getuid have no preconditions.
    let (pid, uid) = unsafe { (libc::getpid(), libc::getuid()) };
    info[16..20].copy_from_slice(&pid.to_ne_bytes());
    info[20..24].copy_from_slice(&uid.to_ne_bytes());
    info[24..32].copy_from_slice(&value.to_ne_bytes());
    // SAFETY: the kernel reads 128 bytes of siginfo from `info`.
    let result =
        unsafe { libc::syscall(libc::SYS_rt_tgsigqueueinfo, pid, tid, signo, info.as_ptr()) };
    assert_eq!(
        result,
        0,
        "rt_tgsigqueueinfo: {}",
        std::io::Error::last_os_error()
    );
}

/// Takes every signal of [`waited_set`] waiting for the calling thread.
fn take_all() -> Vec<Taken> {
    let set = waited_set();
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let mut taken = Vec::new();
    loop {
        // SAFETY: siginfo_t is plain data the kernel fills in.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid set, siginfo and timeout pointers.
        let signo = unsafe { libc::sigtimedwait(&set, &mut info, &zero) };
        if signo < 0 {
            return taken;
        }
        // SAFETY: siginfo_t is 128 bytes of plain data.
        let raw: [u8; 128] = unsafe { std::mem::transmute(info) };
        let word = |at: usize| i32::from_ne_bytes(raw[at..at + 4].try_into().unwrap());
        taken.push(Taken {
            signo,
            code: word(8),
            pid: word(16),
            uid: word(20) as u32,
            value: u64::from_ne_bytes(raw[24..32].try_into().unwrap()),
        });
    }
}

fn expect(who: &str, taken: &[Taken], expected: &[Taken]) -> Result<(), String> {
    if taken == expected {
        Ok(())
    } else {
        Err(format!("{who} took {taken:?}, expected {expected:?}"))
    }
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: fixture-signals DIR"));
    // SAFETY: the handler only touches an atomic; the mask is a valid set
    // and is set before the second thread starts, which inherits it.
    unsafe {
        libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
        let set = waited_set();
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    // SAFETY: getpid and getuid have no preconditions.
    let (pid, uid) = unsafe { (libc::getpid(), libc::getuid()) };
    let queued = |signo, value| Taken {
        signo,
        code: SI_QUEUE,
        pid,
        uid,
        value,
    };

    let (tid_sender, tid_receiver) = mpsc::channel();
    let (ask, asked) = mpsc::channel::<()>();
    let (report, reports) = mpsc::channel();
    std::thread::Builder::new()
        .name("queued-to".into())
        .spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_sender.send(unsafe { libc::gettid() }).unwrap();
            while asked.recv().is_ok() {
                let taken = take_all();
                let _ = report.send(taken);
            }
        })
        .expect("spawn thread");
    let second = tid_receiver.recv().expect("second thread's tid");

    for value in [11, 22, 33] {
        let value = libc::sigval {
            sival_ptr: value as *mut libc::c_void,
        };
        // SAFETY: sigqueue to ourselves with a plain value.
        let result = unsafe { libc::sigqueue(pid, rt_signal(), value) };
        assert_eq!(result, 0, "sigqueue: {}", std::io::Error::last_os_error());
    }
    // SAFETY: kill to ourselves of a blocked signal.
    unsafe { libc::kill(pid, libc::SIGUSR2) };
    queue_to_thread(second, rt_signal(), 77);

    let ready = dir.join("ready.tmp");
    fs::write(&ready, pid.to_string()).expect("write ready");
    fs::rename(&ready, dir.join("ready")).expect("rename ready");

    let mut seen_round = 0;
    loop {
        std::thread::sleep(Duration::from_millis(2));
        let round = ROUND.load(Ordering::SeqCst);
        if round == seen_round {
            continue;
        }
        seen_round = round;
        // The lower number comes first, then one signal's instances in
        // queue order.
        let main_expected = [
            Taken {
                signo: libc::SIGUSR2,
                code: SI_USER,
                pid,
                uid,
                value: 0,
            },
            queued(rt_signal(), 11),
            queued(rt_signal(), 22),
            queued(rt_signal(), 33),
        ];
        let mut result = expect("the main thread", &take_all(), &main_expected);
        ask.send(()).expect("ask the second thread");
        let second_taken = reports
            .recv_timeout(Duration::from_secs(10))
            .map_err(|e| format!("the second thread did not report: {e}"));
        let second_result = second_taken
            .and_then(|taken| expect("the second thread", &taken, &[queued(rt_signal(), 77)]));
        result = result.and(second_result);
        let text = match result {
            Ok(()) => "OK".to_owned(),
            Err(what) => format!("FAIL: {what}"),
        };
        let tmp = dir.join("result.tmp");
        fs::write(&tmp, text).expect("write result");
        fs::rename(&tmp, dir.join("result")).expect("rename result");
    }
}
