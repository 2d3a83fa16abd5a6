//! Test fixture: several threads, each with its own values in TLS, on its
//! stack, in a general register, in an SSE register and in FP state.
//!
//! `fixture-threads DIR` starts [`THREADS`] threads named `worker-N`, writes
//! `DIR/ready` once all run, and on SIGUSR1 has every thread check its
//! values (and that its cached tid is still its tid, and its robust futex
//! list the one glibc registered) and writes `DIR/result`: `OK` or
//! `FAIL: what differs`.

use std::arch::asm;
use std::cell::Cell;
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::time::Duration;

const THREADS: usize = 4;

/// Incremented by each SIGUSR1: threads check when it changes.
static ROUND: AtomicU64 = AtomicU64::new(0);
static STARTED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_usr1(_: libc::c_int) {
    ROUND.fetch_add(1, Ordering::SeqCst);
}

thread_local! {
    static TLS_VALUE: Cell<u64> = const { Cell::new(0) };
}

/// Sleeps 2 ms in a raw nanosleep with `r12` and `xmm8` holding values
/// across the system call (where a checkpoint most likely stops the
/// thread), and returns what they hold afterwards.
fn sleep_holding(general: u64, sse: u64) -> (u64, u64) {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 2_000_000,
    };
    let (out_general, out_sse): (u64, u64);
    // SAFETY: nanosleep reads the timespec and has no other effect; every
    // register the asm touches is declared.
    unsafe {
        asm!(
            "mov r12, {g}",
            "movq xmm8, {s}",
            "syscall",
            "mov {og}, r12",
            "movq {os}, xmm8",
            g = in(reg) general,
            s = in(reg) sse,
            og = lateout(reg) out_general,
            os = lateout(reg) out_sse,
            inlateout("rax") libc::SYS_nanosleep => _,
            in("rdi") &ts as *const libc::timespec,
            in("rsi") 0usize,
            out("rcx") _,
            out("r11") _,
            out("r12") _,
            out("xmm8") _,
        );
    }
    (out_general, out_sse)
}

/// The head of the calling thread's robust futex list, as registered.
fn robust_list_head() -> u64 {
    let mut head: u64 = 0;
    let mut len: u64 = 0;
    // SAFETY: get_robust_list(0, ...) writes one pointer and one size_t,
    // both 8 bytes here, to live locals.
    let result = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            0,
            &mut head as *mut u64,
            &mut len as *mut u64,
        )
    };
    if result == 0 { head } else { u64::MAX }
}

fn worker(index: usize, start: Arc<Barrier>, report: mpsc::Sender<Result<(), String>>) {
    let seed = 0x1000 * (index as u64 + 1);
    let robust = robust_list_head();
    TLS_VALUE.with(|v| v.set(seed + 1));
    let stack_array: [u64; 64] = std::array::from_fn(|i| seed + i as u64);
    let fp = (seed as f64) * 1.5 + 0.25;
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    STARTED.fetch_add(1, Ordering::SeqCst);
    start.wait();
    let mut seen_round = 0;
    let mut errors = Vec::new();
    loop {
        let (general, sse) = sleep_holding(seed + 2, (fp * 3.0).to_bits());
        if general != seed + 2 {
            errors.push(format!("worker {index}: r12 is {general:#x}"));
        }
        if f64::from_bits(sse) != fp * 3.0 {
            errors.push(format!("worker {index}: xmm8 is {}", f64::from_bits(sse)));
        }
        let round = ROUND.load(Ordering::SeqCst);
        if round == seen_round {
            continue;
        }
        seen_round = round;
        let mut result: Result<(), String> = match errors.first() {
            Some(err) => Err(err.clone()),
            None => Ok(()),
        };
        if TLS_VALUE.with(Cell::get) != seed + 1 {
            result = Err(format!("worker {index}: TLS value changed"));
        }
        if std::hint::black_box(&stack_array)
            .iter()
            .enumerate()
            .any(|(i, &v)| v != seed + i as u64)
        {
            result = Err(format!("worker {index}: stack array changed"));
        }
        if std::hint::black_box(fp) != (seed as f64) * 1.5 + 0.25 {
            result = Err(format!("worker {index}: fp value changed"));
        }
        // SAFETY: gettid has no preconditions.
        let now = unsafe { libc::gettid() };
        if now != tid {
            result = Err(format!("worker {index}: tid {tid} is now {now}"));
        }
        let name = thread_name();
        if name != format!("worker-{index}") {
            result = Err(format!("worker {index}: name is {name}"));
        }
        let robust_now = robust_list_head();
        if robust == 0 || robust_now != robust {
            result = Err(format!(
                "worker {index}: robust list at {robust_now:#x}, registered at {robust:#x}"
            ));
        }
        if report.send(result).is_err() {
            return;
        }
    }
}

fn thread_name() -> String {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: fixture-threads DIR"));
    // SAFETY: the handler only touches an atomic.
    unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t) };
    let start = Arc::new(Barrier::new(THREADS + 1));
    let (sender, receiver) = mpsc::channel();
    for index in 0..THREADS {
        let start = Arc::clone(&start);
        let sender = sender.clone();
        std::thread::Builder::new()
            .name(format!("worker-{index}"))
            .spawn(move || worker(index, start, sender))
            .expect("spawn worker");
    }
    start.wait();
    assert_eq!(STARTED.load(Ordering::SeqCst), THREADS);
    let ready = dir.join("ready.tmp");
    fs::write(&ready, std::process::id().to_string()).expect("write ready");
    fs::rename(&ready, dir.join("ready")).expect("rename ready");
    loop {
        let mut failures = Vec::new();
        for _ in 0..THREADS {
            match receiver.recv_timeout(Duration::from_secs(3600)) {
                Ok(Ok(())) => {}
                Ok(Err(what)) => failures.push(what),
                Err(err) => failures.push(format!("a worker did not report: {err}")),
            }
        }
        let result = if failures.is_empty() {
            "OK".to_owned()
        } else {
            format!("FAIL: {}", failures.join("; "))
        };
        let tmp = dir.join("result.tmp");
        fs::write(&tmp, result).expect("write result");
        fs::rename(&tmp, dir.join("result")).expect("rename result");
    }
}
