//! The process's timers: POSIX timers created again with their ids, and
//! every timer (interval timers, POSIX timers) armed with its time left.
//!
//! Both run natively in the process: a timer belongs to the process that
//! creates or sets it, so the agent cannot do it from outside. The ids come
//! back through `PR_TIMER_CREATE_RESTORE_IDS` (Linux 6.15): while it is on,
//! `timer_create` takes the id to allocate from the `timer_t` it is given.
//!
//! A timer on a clock that runs while the process is stopped (every clock
//! but CPU time) is armed when the process resumes ([`arm_at_resume`]), not
//! when its skeleton is prepared: a skeleton may wait hours for its wake,
//! and its timers would have fired or piled up overruns meanwhile.

use persist_common::image::{ITimer, Manifest, PosixTimer, SIGEV_THREAD_ID};

use super::table::TableBuilder;

/// `PR_TIMER_CREATE_RESTORE_IDS` and its modes (linux/prctl.h).
const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
const RESTORE_IDS_OFF: u64 = 0;
const RESTORE_IDS_ON: u64 = 1;
/// `sizeof(struct sigevent)`.
const SIGEVENT_LEN: usize = 64;
const NS_PER_SEC: u64 = 1_000_000_000;

/// Room the tables of [`create`] and [`arm`] take in the restorer region.
pub(super) fn table_room(manifest: &Manifest) -> u64 {
    let timers = manifest.process.posix_timers.len() as u64;
    let itimers = manifest.process.itimers.len() as u64;
    // Per POSIX timer: sigevent, id, itimerspec and two entries; per
    // interval timer an itimerval and an entry; the prctl pair.
    timers * (SIGEVENT_LEN as u64 + 8 + 32 + 2 * 64) + itimers * (32 + 64) + 2 * 64
}

/// Whether some timer must be armed when the process resumes: one armed
/// on a clock that runs on while the skeleton waits for its wake.
pub(super) fn arm_at_resume(manifest: &Manifest) -> bool {
    running_clock_armed(&manifest.process.itimers, &manifest.process.posix_timers)
}

fn running_clock_armed(itimers: &[ITimer], posix_timers: &[PosixTimer]) -> bool {
    let real = itimers
        .iter()
        .any(|t| t.which == libc::ITIMER_REAL as u32 && itimer_value(t).is_some());
    let posix = posix_timers
        .iter()
        .any(|t| t.counts_while_stopped() && posix_value(t).is_some());
    real || posix
}

/// Appends the calls that create every POSIX timer again, unarmed, with
/// its id, clock and notification, in their creation order. The threads a
/// timer signals must exist.
pub(super) fn create(t: &mut TableBuilder, manifest: &Manifest) {
    let timers = &manifest.process.posix_timers;
    if timers.is_empty() {
        return;
    }
    t.call(
        "prctl(PR_TIMER_CREATE_RESTORE_IDS, on)",
        libc::SYS_prctl,
        &[PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_ON],
    );
    // `/proc/PID/timers` lists the newest first, as the checkpoint saved
    // them: created oldest first, they list as they did.
    for timer in timers.iter().rev() {
        let event = t.data(&sigevent(timer));
        let id = t.data(&timer.id.to_ne_bytes());
        t.call(
            format!(
                "timer_create of POSIX timer {} on clock {}",
                timer.id, timer.clock
            ),
            libc::SYS_timer_create,
            &[timer.clock as u64, event, id],
        );
    }
    t.call(
        "prctl(PR_TIMER_CREATE_RESTORE_IDS, off)",
        libc::SYS_prctl,
        &[PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_OFF],
    );
}

/// Appends the calls that arm every armed timer with its time left,
/// counted from the call.
pub(super) fn arm(t: &mut TableBuilder, manifest: &Manifest) {
    for timer in &manifest.process.itimers {
        let Some(value_us) = itimer_value(timer) else {
            continue;
        };
        let address = t.words(&[
            timer.interval_us / 1_000_000,
            timer.interval_us % 1_000_000,
            value_us / 1_000_000,
            value_us % 1_000_000,
        ]);
        t.call(
            format!("setitimer {}", timer.which),
            libc::SYS_setitimer,
            &[u64::from(timer.which), address, 0],
        );
    }
    for timer in &manifest.process.posix_timers {
        let Some(value_ns) = posix_value(timer) else {
            continue;
        };
        let address = t.words(&[
            timer.interval_ns / NS_PER_SEC,
            timer.interval_ns % NS_PER_SEC,
            value_ns / NS_PER_SEC,
            value_ns % NS_PER_SEC,
        ]);
        t.call(
            format!("timer_settime of POSIX timer {}", timer.id),
            libc::SYS_timer_settime,
            &[timer.id as u64, 0, address, 0],
        );
    }
}

/// The time to an interval timer's first expiry, `None` when disarmed. A
/// periodic timer whose signal was still pending shows no time left (the
/// kernel re-arms it when the signal is taken): it goes on one interval
/// away.
fn itimer_value(timer: &ITimer) -> Option<u64> {
    first_expiry(timer.value_us, timer.interval_us)
}

/// Like [`itimer_value`], for a POSIX timer.
fn posix_value(timer: &PosixTimer) -> Option<u64> {
    first_expiry(timer.remaining_ns, timer.interval_ns)
}

fn first_expiry(left: u64, interval: u64) -> Option<u64> {
    match (left, interval) {
        (0, 0) => None,
        (0, interval) => Some(interval),
        (left, _) => Some(left),
    }
}

/// The `struct sigevent` a timer was created with: `sigev_value`,
/// `sigev_signo`, `sigev_notify`, then the target thread.
fn sigevent(timer: &PosixTimer) -> [u8; SIGEVENT_LEN] {
    let mut event = [0u8; SIGEVENT_LEN];
    event[0..8].copy_from_slice(&timer.value.to_ne_bytes());
    event[8..12].copy_from_slice(&timer.signal.to_ne_bytes());
    event[12..16].copy_from_slice(&timer.notify.to_ne_bytes());
    if timer.notify & SIGEV_THREAD_ID != 0 {
        event[16..20].copy_from_slice(&timer.tid.to_ne_bytes());
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timer(clock: i32, remaining_ns: u64, interval_ns: u64) -> PosixTimer {
        PosixTimer {
            id: 3,
            clock,
            notify: SIGEV_THREAD_ID,
            tid: 812,
            signal: 34,
            value: 0xabcd,
            interval_ns,
            remaining_ns,
            overrun: 0,
        }
    }

    #[test]
    fn the_sigevent_is_the_kernel_layout() {
        let event = sigevent(&timer(1, 5, 0));
        assert_eq!(&event[0..8], &0xabcdu64.to_ne_bytes());
        assert_eq!(&event[8..12], &34i32.to_ne_bytes());
        assert_eq!(&event[12..16], &SIGEV_THREAD_ID.to_ne_bytes());
        assert_eq!(&event[16..20], &812i32.to_ne_bytes());
    }

    #[test]
    fn a_periodic_timer_with_no_time_left_goes_on_one_interval_away() {
        assert_eq!(first_expiry(0, 0), None);
        assert_eq!(first_expiry(0, 7), Some(7));
        assert_eq!(first_expiry(3, 7), Some(3));
    }

    #[test]
    fn only_timers_on_running_clocks_wait_for_the_resume() {
        let virtual_timer = ITimer {
            which: libc::ITIMER_VIRTUAL as u32,
            interval_us: 0,
            value_us: 5,
        };
        let mut posix = vec![timer(libc::CLOCK_PROCESS_CPUTIME_ID, 5, 0)];
        assert!(
            !running_clock_armed(&[virtual_timer], &posix),
            "CPU-time timers are armed at once"
        );
        posix.push(timer(libc::CLOCK_MONOTONIC, 0, 0));
        assert!(
            !running_clock_armed(&[], &posix),
            "a disarmed timer needs no arming"
        );
        posix.push(timer(libc::CLOCK_BOOTTIME, 5, 0));
        assert!(
            running_clock_armed(&[], &posix),
            "a BOOTTIME timer waits for the resume"
        );
        let real = ITimer {
            which: libc::ITIMER_REAL as u32,
            interval_us: 9,
            value_us: 0,
        };
        assert!(
            running_clock_armed(&[real], &[]),
            "a periodic ITIMER_REAL waits for the resume"
        );
    }
}
