//! POSIX timers (`timer_create`). `/proc/PID/timers` names each one (id,
//! signal and `sigev_value`, how it notifies, clock); `timer_gettime` and
//! `timer_getoverrun`, injected into the stopped leader, give its settings.
//! A timer restore could not rebuild (a CPU clock of another process, an
//! unknown notification) is refused by id, never dropped.

use persist_common::image::{PosixTimer, SIGEV_NONE, SIGEV_SIGNAL, SIGEV_THREAD_ID};

use super::CheckpointError;
use super::inject::Injector;

/// A timer as `/proc/PID/timers` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Listed {
    id: i32,
    signal: i32,
    value: u64,
    notify: i32,
    /// The thread or process signalled, as our pid namespace sees it.
    target: i32,
    clock: i32,
}

/// The timers of stopped process `pid`, as `/proc/PID/timers` lists them.
pub(super) fn list(pid: i32) -> Result<Vec<Listed>, CheckpointError> {
    let path = format!("/proc/{pid}/timers");
    let text = std::fs::read_to_string(&path).map_err(|source| CheckpointError::Proc {
        pid,
        path,
        source,
    })?;
    parse(&text).map_err(|field| CheckpointError::ProcField {
        pid,
        path: format!("/proc/{pid}/timers"),
        field,
    })
}

/// Parses the kernel's `show_timer` records: `ID: %d`, `signal: %d/%px`,
/// `notify: %s/%s.%d`, `ClockID: %d`. The error names the malformed line.
fn parse(text: &str) -> Result<Vec<Listed>, String> {
    let mut timers = Vec::new();
    let mut lines = text.lines().filter(|line| !line.trim().is_empty());
    while let Some(line) = lines.next() {
        let mut next = |key: &str| -> Result<String, String> {
            let line = lines.next().ok_or_else(|| format!("{key} (missing)"))?;
            line.strip_prefix(key)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(|rest| rest.trim().to_owned())
                .ok_or_else(|| format!("{key} ({line:?})"))
        };
        let id = line
            .strip_prefix("ID:")
            .and_then(|rest| rest.trim().parse().ok())
            .ok_or_else(|| format!("ID ({line:?})"))?;
        let signal_text = next("signal")?;
        let notify_text = next("notify")?;
        let clock_text = next("ClockID")?;
        let (signal, value) = signal_text
            .split_once('/')
            .and_then(|(signal, value)| {
                let value = value.trim_start_matches("0x");
                Some((signal.parse().ok()?, u64::from_str_radix(value, 16).ok()?))
            })
            .ok_or_else(|| format!("signal ({signal_text:?})"))?;
        let (notify, target) = notify_text
            .split_once('/')
            .and_then(|(how, who)| {
                let (kind, number) = who.split_once('.')?;
                let base = match how {
                    "signal" => SIGEV_SIGNAL,
                    "none" => SIGEV_NONE,
                    // SIGEV_THREAD is glibc's business: the kernel never
                    // holds one, but keep its number to refuse it by name.
                    "thread" => 2,
                    _ => return None,
                };
                let notify = match kind {
                    "tid" => base | SIGEV_THREAD_ID,
                    "pid" => base,
                    _ => return None,
                };
                Some((notify, number.parse().ok()?))
            })
            .ok_or_else(|| format!("notify ({notify_text:?})"))?;
        let clock = clock_text
            .parse()
            .map_err(|_| format!("ClockID ({clock_text:?})"))?;
        timers.push(Listed {
            id,
            signal,
            value,
            notify,
            target,
            clock,
        });
    }
    Ok(timers)
}

/// Reads the settings of every listed timer through `injector` (its
/// scratch area takes the `itimerspec`). `tids` are the process's threads,
/// which a `SIGEV_THREAD_ID` timer must signal.
pub(super) fn save(
    pid: i32,
    injector: &mut Injector<'_>,
    listed: &[Listed],
    tids: &[i32],
) -> Result<Vec<PosixTimer>, CheckpointError> {
    let scratch = injector.scratch();
    let mut timers = Vec::with_capacity(listed.len());
    for timer in listed {
        let refuse = |what: String| CheckpointError::UnsupportedTimer {
            pid,
            id: timer.id,
            what,
        };
        // A CPU clock is `~pid << 3 | kind`, pid 0 for the caller itself
        // (what glibc makes of CLOCK_PROCESS_CPUTIME_ID): one of the
        // process's own threads or itself is rebuilt as it was.
        let clock_pid = !(timer.clock >> 3);
        if timer.clock < 0 && clock_pid != 0 && !tids.contains(&clock_pid) {
            return Err(refuse(format!(
                "its clock {} is the CPU clock of pid {clock_pid}, outside the process",
                timer.clock
            )));
        }
        let tid = match timer.notify {
            SIGEV_SIGNAL | SIGEV_NONE => 0,
            n if n == SIGEV_SIGNAL | SIGEV_THREAD_ID => {
                if !tids.contains(&timer.target) {
                    return Err(refuse(format!(
                        "it signals thread {}, not a thread of the process",
                        timer.target
                    )));
                }
                timer.target
            }
            other => return Err(refuse(format!("notification {other} is not supported"))),
        };
        injector.checked_syscall(
            "timer_gettime",
            libc::SYS_timer_gettime,
            &[timer.id as u64, scratch],
        )?;
        let [interval_s, interval_ns, value_s, value_ns] = injector.read_scratch_words::<4>(0)?;
        let overrun = injector.checked_syscall(
            "timer_getoverrun",
            libc::SYS_timer_getoverrun,
            &[timer.id as u64],
        )?;
        timers.push(PosixTimer {
            id: timer.id,
            clock: timer.clock,
            notify: timer.notify,
            tid,
            signal: timer.signal,
            value: timer.value,
            interval_ns: interval_s * 1_000_000_000 + interval_ns,
            remaining_ns: value_s * 1_000_000_000 + value_ns,
            overrun: overrun as i32,
        });
    }
    Ok(timers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_signal_thread_and_silent_timers() {
        let text = "ID: 0\nsignal: 34/000000000000abcd\nnotify: signal/pid.812\nClockID: 1\n\
                    ID: 3\nsignal: 14/0000000000000003\nnotify: signal/tid.813\nClockID: 0\n\
                    ID: 4\nsignal: 0/0000000000000000\nnotify: none/pid.812\nClockID: 7\n";
        let timers = parse(text).unwrap();
        assert_eq!(
            timers,
            vec![
                Listed {
                    id: 0,
                    signal: 34,
                    value: 0xabcd,
                    notify: SIGEV_SIGNAL,
                    target: 812,
                    clock: 1
                },
                Listed {
                    id: 3,
                    signal: 14,
                    value: 3,
                    notify: SIGEV_THREAD_ID,
                    target: 813,
                    clock: 0
                },
                Listed {
                    id: 4,
                    signal: 0,
                    value: 0,
                    notify: SIGEV_NONE,
                    target: 812,
                    clock: 7
                },
            ]
        );
    }

    #[test]
    fn a_malformed_record_names_its_line() {
        let err = parse("ID: 0\nsignal: x/1\nnotify: signal/pid.1\nClockID: 1\n").unwrap_err();
        assert!(err.starts_with("signal"), "{err}");
        let err = parse("ID: 0\nsignal: 14/1\n").unwrap_err();
        assert_eq!(err, "notify (missing)");
    }
}
