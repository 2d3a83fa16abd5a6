//! Test fixture: POSIX timers, an interval timer and a timerfd.
//!
//! `fixture-timers DIR` starts a second thread, then creates POSIX timers
//! with sparse ids (one deleted between them) on several clocks and with
//! every notification: a signal to the process with a `sigev_value`, a
//! signal to the second thread (`SIGEV_THREAD_ID`), none (`SIGEV_NONE`),
//! one on CPU time and one never armed. It arms `ITIMER_REAL` and a
//! timerfd, records `/proc/self/timers` and every timer's time left, and
//! writes `DIR/ready`. Nothing expires for 30 s.
//!
//! On SIGUSR1 it checks that `/proc/self/timers` lists the same timers
//! (ids, signals, values, threads, clocks), that every interval is the
//! same, that every armed timer is still armed with no more time left than
//! it had when it was recorded, and that the unarmed one is still unarmed.
//! It writes `DIR/remaining` (one `NAME NANOSECONDS` line per armed timer:
//! `posix-ID`, `itimer-real`, `timerfd`) and then `DIR/result`: `OK` or
//! `FAIL: what differs`.

use std::fmt::Write as _;
use std::fs;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

/// Incremented by each SIGUSR1.
static ROUND: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_usr1(_: libc::c_int) {
    ROUND.fetch_add(1, Ordering::SeqCst);
}

const SEC: i64 = 1_000_000_000;

/// A POSIX timer as created, with what it must still be after a restore.
struct Timer {
    id: libc::timer_t,
    interval_ns: i64,
    /// Time left when recorded; 0 for the one never armed.
    left_ns: i64,
}

fn ns(spec: &libc::timespec) -> i64 {
    spec.tv_sec * SEC + spec.tv_nsec
}

fn spec(ns: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: ns / SEC,
        tv_nsec: ns % SEC,
    }
}

/// Creates a timer; `tid` makes it `SIGEV_THREAD_ID` to that thread.
fn create(clock: libc::clockid_t, notify: i32, signal: i32, value: u64, tid: i32) -> libc::timer_t {
    // SAFETY: all-zero is a valid sigevent; the fields set are plain data.
    let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
    event.sigev_notify = notify;
    event.sigev_signo = signal;
    event.sigev_value = libc::sigval {
        sival_ptr: value as *mut libc::c_void,
    };
    event.sigev_notify_thread_id = tid;
    let mut id: libc::timer_t = std::ptr::null_mut();
    // SAFETY: valid sigevent and timer_t pointers.
    let rc = unsafe { libc::timer_create(clock, &mut event, &mut id) };
    assert_eq!(rc, 0, "timer_create: {}", std::io::Error::last_os_error());
    id
}

fn arm(id: libc::timer_t, value_ns: i64, interval_ns: i64) {
    let setting = libc::itimerspec {
        it_interval: spec(interval_ns),
        it_value: spec(value_ns),
    };
    // SAFETY: `id` is a timer of ours; valid itimerspec.
    let rc = unsafe { libc::timer_settime(id, 0, &setting, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "timer_settime: {}", std::io::Error::last_os_error());
}

/// (time left, interval) of a POSIX timer.
fn get(id: libc::timer_t) -> Result<(i64, i64), String> {
    // SAFETY: all-zero is a valid itimerspec, which the call fills.
    let mut setting: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: valid itimerspec pointer.
    let rc = unsafe { libc::timer_gettime(id, &mut setting) };
    if rc != 0 {
        return Err(format!(
            "timer_gettime of timer {}: {}",
            id as usize,
            std::io::Error::last_os_error()
        ));
    }
    Ok((ns(&setting.it_value), ns(&setting.it_interval)))
}

/// (time left, interval) of `ITIMER_REAL`.
fn get_real() -> (i64, i64) {
    // SAFETY: all-zero is a valid itimerval, which the call fills.
    let mut value: libc::itimerval = unsafe { std::mem::zeroed() };
    // SAFETY: valid itimerval pointer.
    unsafe { libc::getitimer(libc::ITIMER_REAL, &mut value) };
    let us = |t: libc::timeval| t.tv_sec * SEC + t.tv_usec * 1000;
    (us(value.it_value), us(value.it_interval))
}

fn get_timerfd(timer: &TimerFd) -> (i64, i64) {
    // SAFETY: all-zero is a valid itimerspec, which the call fills.
    let mut setting: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: a timerfd of ours and a valid itimerspec pointer.
    unsafe { libc::timerfd_gettime(timer.as_fd().as_raw_fd(), &mut setting) };
    (ns(&setting.it_value), ns(&setting.it_interval))
}

/// Checks one armed timer against what was recorded, and notes its time left.
fn check_armed(
    name: &str,
    now: (i64, i64),
    recorded: (i64, i64),
    remaining: &mut String,
) -> Result<(), String> {
    let (left, interval) = now;
    if interval != recorded.1 {
        return Err(format!(
            "{name}: interval {interval} ns, recorded {}",
            recorded.1
        ));
    }
    if left <= 0 || left > recorded.0 {
        return Err(format!(
            "{name}: {left} ns left, recorded {} (it must still be armed, with no more left)",
            recorded.0
        ));
    }
    writeln!(remaining, "{name} {left}").expect("write to a string");
    Ok(())
}

fn write_atomically(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!("{name}.tmp"));
    fs::write(&tmp, text).expect("write");
    fs::rename(&tmp, dir.join(name)).expect("rename");
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: fixture-timers DIR"));
    let rt = libc::SIGRTMIN();
    // SAFETY: the handler only touches an atomic; the mask, set before the
    // second thread starts, blocks the timers' signals in both threads.
    unsafe {
        libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGALRM, rt + 2, rt + 3, rt + 4] {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let (tid_sender, tid_receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tid_sender.send(unsafe { libc::gettid() }).unwrap();
        loop {
            std::thread::park();
        }
    });
    let second = tid_receiver.recv().expect("the second thread's tid");

    let process = create(libc::CLOCK_MONOTONIC, libc::SIGEV_SIGNAL, rt + 2, 0x1111, 0);
    let gone = create(libc::CLOCK_MONOTONIC, libc::SIGEV_SIGNAL, rt + 2, 0, 0);
    let thread = create(
        libc::CLOCK_REALTIME,
        libc::SIGEV_THREAD_ID,
        rt + 3,
        0x3333,
        second,
    );
    // SAFETY: a timer of ours, deleted once: a hole among the ids.
    unsafe { libc::timer_delete(gone) };
    let silent = create(libc::CLOCK_BOOTTIME, libc::SIGEV_NONE, 0, 0, 0);
    let cpu = create(
        libc::CLOCK_PROCESS_CPUTIME_ID,
        libc::SIGEV_SIGNAL,
        rt + 4,
        5,
        0,
    );
    let unarmed = create(libc::CLOCK_MONOTONIC, libc::SIGEV_SIGNAL, rt + 2, 6, 0);
    arm(process, 40 * SEC, 40 * SEC);
    arm(thread, 50 * SEC, 0);
    arm(silent, 45 * SEC, 3 * SEC);
    arm(cpu, 100 * SEC, SEC);
    let real = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: 60,
            tv_usec: 0,
        },
        it_value: libc::timeval {
            tv_sec: 60,
            tv_usec: 0,
        },
    };
    // SAFETY: a valid itimerval.
    unsafe { libc::setitimer(libc::ITIMER_REAL, &real, std::ptr::null_mut()) };
    let timerfd = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::empty()).expect("timerfd");
    timerfd
        .set(
            Expiration::IntervalDelayed(
                TimeSpec::from(Duration::from_secs(55)),
                TimeSpec::from(Duration::from_secs(7)),
            ),
            TimerSetTimeFlags::empty(),
        )
        .expect("timerfd_settime");

    let listed = fs::read_to_string("/proc/self/timers").expect("read /proc/self/timers");
    let timers: Vec<Timer> = [process, thread, silent, cpu, unarmed]
        .into_iter()
        .map(|id| {
            let (left_ns, interval_ns) = get(id).expect("timer_gettime");
            Timer {
                id,
                interval_ns,
                left_ns,
            }
        })
        .collect();
    let real_recorded = get_real();
    let timerfd_recorded = get_timerfd(&timerfd);
    write_atomically(&dir, "ready", &std::process::id().to_string());

    let mut seen_round = 0;
    loop {
        std::thread::sleep(Duration::from_millis(2));
        let round = ROUND.load(Ordering::SeqCst);
        if round == seen_round {
            continue;
        }
        seen_round = round;
        let mut remaining = String::new();
        let mut check = || -> Result<(), String> {
            let now = fs::read_to_string("/proc/self/timers")
                .map_err(|e| format!("reading /proc/self/timers: {e}"))?;
            if now != listed {
                return Err(format!("/proc/self/timers is {now:?}, it was {listed:?}"));
            }
            for timer in &timers {
                let now = get(timer.id)?;
                let name = format!("posix-{}", timer.id as usize);
                if timer.left_ns == 0 {
                    if now != (0, 0) {
                        return Err(format!("{name}: armed as {now:?}, it was never armed"));
                    }
                    continue;
                }
                check_armed(
                    &name,
                    now,
                    (timer.left_ns, timer.interval_ns),
                    &mut remaining,
                )?;
            }
            check_armed("itimer-real", get_real(), real_recorded, &mut remaining)?;
            check_armed(
                "timerfd",
                get_timerfd(&timerfd),
                timerfd_recorded,
                &mut remaining,
            )
        };
        let text = match check() {
            Ok(()) => "OK".to_owned(),
            Err(what) => format!("FAIL: {what}"),
        };
        write_atomically(&dir, "remaining", &remaining);
        write_atomically(&dir, "result", &text);
    }
}
