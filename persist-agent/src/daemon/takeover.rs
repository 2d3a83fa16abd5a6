//! What a previous daemon left of a service, found again at start-up: its
//! process (adopted, recovered from a checkpoint cut short, or stopped),
//! its listener, its port keeper.

use std::os::fd::OwnedFd;
use std::path::Path;

use tracing::{info, warn};

use super::run_state::{self, Adopted, RunRecord, RunStateDir};
use crate::checkpoint::Recovered;
use crate::error_text::error_line;
use crate::service::{ServiceMode, ServiceSpec};

/// Undoes the checkpoint of a `--on-idle keep` park that a killed daemon
/// left under way (its recovery file is there): the process it had stopped
/// runs on as before, to be adopted as running; its park is tried again
/// once it is idle again. Never fatal: a process that cannot be put back is
/// a warning.
pub(super) fn recover_checkpoint(run_state: &RunStateDir, name: &str) {
    let file = run_state.checkpoint_path(name);
    if std::fs::symlink_metadata(&file).is_err() {
        return;
    }
    match crate::checkpoint::recover(&file) {
        Ok(Recovered::Resumed { pid, threads }) => {
            info!(service = %name, pid, threads, "recovered the process whose park the daemon was checkpointing when it stopped: it runs on");
        }
        Ok(Recovered::Gone { pid }) => {
            info!(service = %name, pid, "the process whose park the daemon was checkpointing when it stopped is gone");
        }
        Err(err) => {
            warn!(service = %name, "cannot undo the checkpoint a park left under way: {}", error_line(&err));
        }
    }
}

/// What a previous daemon left of the service `spec` recorded in `record`:
/// its process, adopted when it runs on its own with its listener (a
/// restored process whose pages were still coming in gets a pager that
/// takes over, with the journal at `events`); or only the listener, taken
/// from a process that must not go on (a stopped skeleton, or a restored
/// process whose pages cannot be served any more), which is killed. A
/// process that runs without its listener is stopped.
pub(super) fn take_over(
    spec: &ServiceSpec,
    record: &RunRecord,
    events: &Path,
) -> (Option<Adopted>, Option<(OwnedFd, Vec<OwnedFd>)>) {
    let name = &spec.name;
    if let Some(mut adopted) = run_state::adopt(record) {
        // Only a restored process has pages a pager of ours should serve.
        let restored = spec.mode == ServiceMode::Snapshot;
        let tree = crate::process_tree::tree_of(record.pid);
        if tree.len() > 1
            && let Some(why) = unfit_tree(&tree[1..], restored)
        {
            // Only the root's pages can be taken over: a tree is adopted
            // whole, all its memory in and every process running, or
            // killed and parked again from its image.
            warn!(service = %name, pid = record.pid, "a process of its tree {why}; stopping the tree and parking the service");
            crate::process_tree::kill_tree(record.pid);
            adopted.pidfd.wait_exit(std::time::Duration::from_secs(1));
            return (None, Some((adopted.listener, adopted.group)));
        }
        if !restored || !run_state::has_pages_nobody_serves(record.pid) {
            return (Some(adopted), None);
        }
        // Restored, and its pages were still coming in when the daemon
        // died: its faults wait for a pager.
        match run_state::take_pager(&adopted, events) {
            Ok(pager) => {
                info!(service = %name, pid = record.pid, pending_pages = pager.pending_pages(), "adopted a process whose pages were still being filled; serving them");
                adopted.pager = Some(pager);
                return (Some(adopted), None);
            }
            Err(err) => {
                // Parked again from its image, its queued connections kept.
                warn!(service = %name, pid = record.pid, "its pages were still being filled when the daemon stopped and cannot be served ({err}); stopping it and parking the service");
                kill_and_wait(&adopted.pidfd);
                return (None, Some((adopted.listener, adopted.group)));
            }
        }
    }
    if run_state::is_stopped(record.pid) {
        // A skeleton a killed daemon left: it held the port meanwhile, and
        // its queued connections are kept.
        if let Some(left) = run_state::take_listener(record) {
            info!(service = %name, pid = record.pid, "took the listener back from a stopped skeleton");
            // A tree's skeleton (or a tree stopped by a park's checkpoint
            // cut short): every process, children first.
            crate::process_tree::kill_tree(record.pid);
            kill_and_wait(&left.pidfd);
            return (None, Some((left.listener, left.group)));
        }
    }
    if run_state::is_alive(record) && !run_state::is_dying(record.pid) {
        // It runs but no longer holds the port we gave it: stop it rather
        // than run the service twice.
        warn!(service = %name, pid = record.pid, "running without its listener; stopping it");
        stop_stray(record.pid);
    }
    (None, None)
}

/// Why the processes under an adopted root (`descendants`) cannot be
/// adopted with it: one is stopped or traced (left so by a checkpoint a
/// killed daemon cut short), or, `restored`, still has pages nobody serves.
fn unfit_tree(descendants: &[i32], restored: bool) -> Option<String> {
    descendants.iter().find_map(|&pid| {
        if !run_state::is_running(pid) && !run_state::is_dying(pid) {
            Some(format!("(pid {pid}) does not run on its own"))
        } else if restored && run_state::has_pages_nobody_serves(pid) {
            Some(format!("(pid {pid}) was still having its pages filled"))
        } else {
            None
        }
    })
}

/// Kills the process of `pidfd` and waits (a second at most) until it is
/// gone, so that what it held (its port) is free again.
fn kill_and_wait(pidfd: &crate::sys::pidfd::PidFd) {
    let _ = pidfd.send_signal(nix::sys::signal::Signal::SIGKILL);
    pidfd.wait_exit(std::time::Duration::from_secs(1));
}

/// Stops a process a previous daemon started, by pid: SIGTERM then SIGKILL,
/// or SIGKILL at once when it is stopped.
fn stop_stray(pid: i32) {
    let Ok(pidfd) = crate::sys::pidfd::PidFd::open(pid) else {
        return;
    };
    // A stopped process would only see SIGTERM once continued.
    if run_state::is_stopped(pid) {
        crate::process_tree::kill_tree(pid);
        kill_and_wait(&pidfd);
        return;
    }
    let _ = pidfd.send_signal(nix::sys::signal::Signal::SIGTERM);
    if !pidfd.wait_exit(std::time::Duration::from_secs(5)) {
        crate::process_tree::kill_tree(pid);
        let _ = pidfd.send_signal(nix::sys::signal::Signal::SIGKILL);
    }
}
