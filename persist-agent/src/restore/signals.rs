//! Pending signals. The recorded queues go back with their siginfo, queued
//! natively by the process's main thread to its own threads: the kernel
//! takes a siginfo claiming to come from the kernel or from `kill`/`tgkill`
//! (`si_code >= 0` or `SI_TKILL`) only from the thread whose tid is the
//! target's tgid, and from an ancestor pid namespace it would clear the
//! sender's pid. They are queued while every thread still blocks every
//! signal, so nothing is delivered before the process resumes with its own
//! masks. A pending bit no record is for (images written before queues were
//! recorded) is raised from outside by number, as a `kill` would.

use persist_common::image::{Manifest, QueuedSignal};

use super::RestoreError;
use super::table::TableBuilder;
use crate::sys::clone;

/// Room the table of [`append`] takes in the restorer region.
pub(super) fn table_room(manifest: &Manifest) -> u64 {
    let records = manifest.process.shared_queue.len()
        + manifest
            .threads
            .iter()
            .map(|t| t.queue.len())
            .sum::<usize>();
    records as u64 * (QueuedSignal::LEN as u64 + 64)
}

/// Appends the calls that queue every recorded signal again, to a table
/// run by the main thread after every thread exists.
pub(super) fn append(t: &mut TableBuilder, manifest: &Manifest) -> Result<(), RestoreError> {
    let pid = manifest.process.pid;
    for thread in &manifest.threads {
        for record in &thread.queue {
            let signo = checked(record, pid)?;
            let info = t.data(&record.0);
            t.call(
                format!(
                    "rt_tgsigqueueinfo of signal {signo} to thread {}",
                    thread.tid
                ),
                libc::SYS_rt_tgsigqueueinfo,
                &[pid as u64, thread.tid as u64, signo as u64, info],
            );
        }
    }
    for record in &manifest.process.shared_queue {
        let signo = checked(record, pid)?;
        let info = t.data(&record.0);
        t.call(
            format!("rt_sigqueueinfo of signal {signo}"),
            libc::SYS_rt_sigqueueinfo,
            &[pid as u64, signo as u64, info],
        );
    }
    Ok(())
}

/// Raises, from outside, the pending signals of a pending mask that no
/// recorded siginfo is for; `tids` are the threads in manifest order, in
/// our namespace, the main thread (`pid`) first.
pub(super) fn raise_unrecorded(
    pid: i32,
    tids: &[i32],
    manifest: &Manifest,
) -> Result<(), RestoreError> {
    for (thread, &tid) in manifest.threads.iter().zip(tids) {
        for signal in unrecorded(thread.pending, &thread.queue) {
            clone::tgkill(pid, tid, signal)
                .map_err(RestoreError::ptrace(tid, "queue a pending signal"))?;
        }
    }
    let process = &manifest.process;
    for signal in unrecorded(process.shared_pending, &process.shared_queue) {
        clone::kill(pid, signal).map_err(RestoreError::ptrace(pid, "queue a pending signal"))?;
    }
    Ok(())
}

/// The signal number of `record`, refused when it is not one that can be
/// queued (a damaged image).
fn checked(record: &QueuedSignal, pid: i32) -> Result<i32, RestoreError> {
    let signo = record.signo();
    if record.0.len() != QueuedSignal::LEN || !queueable(signo) {
        return Err(RestoreError::Unexpected {
            pid,
            what: format!(
                "a queued signal record of {} bytes for signal {signo}",
                record.0.len()
            ),
        });
    }
    Ok(signo)
}

fn queueable(signal: i32) -> bool {
    (1..=64).contains(&signal) && signal != libc::SIGKILL && signal != libc::SIGSTOP
}

/// The signals of `mask` that are queueable and that no record is for.
fn unrecorded(mask: u64, queue: &[QueuedSignal]) -> impl Iterator<Item = i32> {
    let recorded: u64 = queue
        .iter()
        .map(QueuedSignal::signo)
        .filter(|&s| queueable(s))
        .fold(0, |bits, s| bits | 1 << (s - 1));
    (1..=64).filter(move |&s| {
        queueable(s) && mask & (1u64 << (s - 1)) != 0 && recorded & (1u64 << (s - 1)) == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(signo: i32) -> QueuedSignal {
        let mut raw = vec![0u8; QueuedSignal::LEN];
        raw[..4].copy_from_slice(&signo.to_le_bytes());
        QueuedSignal(raw)
    }

    #[test]
    fn only_signals_without_a_record_are_raised_by_number() {
        let mask = 1 << (libc::SIGUSR1 - 1) | 1 << (libc::SIGUSR2 - 1) | 1 << (35 - 1);
        let raised: Vec<i32> =
            unrecorded(mask, &[record(35), record(35), record(libc::SIGUSR2)]).collect();
        assert_eq!(raised, vec![libc::SIGUSR1], "only SIGUSR1 has no record");
    }

    #[test]
    fn sigkill_and_sigstop_are_never_raised() {
        let mask = 1 << (libc::SIGKILL - 1) | 1 << (libc::SIGSTOP - 1);
        assert_eq!(unrecorded(mask, &[]).count(), 0);
    }
}
