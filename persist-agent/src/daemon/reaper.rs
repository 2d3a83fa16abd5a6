//! Reaps orphans reparented to the daemon (it is a child subreaper).
//!
//! Only zombies are collected, by pid: a blanket `waitpid(-1)` would also
//! swallow the ptrace stops of processes being restored. Children whose
//! owner collects their exit status itself are left to it.

use tokio::signal::unix::{SignalKind, signal};

/// Collects every zombie child of the daemon each time SIGCHLD arrives.
pub async fn reap_orphans() {
    let Ok(mut sigchld) = signal(SignalKind::child()) else {
        return;
    };
    // Stops and continues of parked skeletons leave no zombie to collect.
    if let Err(err) = crate::sys::sigchld::ignore_child_stops() {
        tracing::debug!("SIGCHLD stays raised for stopped children: {err}");
    }
    while sigchld.recv().await.is_some() {
        for pid in zombie_children() {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
    }
}

fn zombie_children() -> Vec<i32> {
    let Ok(me) = procfs::process::Process::myself() else {
        return Vec::new();
    };
    let Ok(tasks) = me.tasks() else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| task.children().ok())
        .flatten()
        .filter(|&pid| !crate::sys::spawn::is_claimed(pid as i32))
        .filter(|&pid| {
            procfs::process::Process::new(pid as i32)
                .and_then(|p| p.stat())
                .is_ok_and(|stat| stat.state == 'Z')
        })
        .map(|pid| pid as i32)
        .collect()
}
