//! The processes of a service that is a tree (nginx's master and workers,
//! gunicorn's arbiter and workers), found from its root pid in /proc: for
//! `status`, the parked cost, and to stop every one of them.

use std::collections::BTreeSet;

use nix::sys::signal::Signal;

use crate::sys::pidfd::PidFd;

/// `root` and every process below it, parents before their children
/// (`/proc/PID/task/TID/children` of every thread, since any may fork).
pub fn tree_of(root: i32) -> Vec<i32> {
    let mut tree = vec![root];
    let mut next = 0;
    while next < tree.len() {
        let pid = tree[next];
        next += 1;
        for child in children(pid) {
            if !tree.contains(&child) {
                tree.push(child);
            }
        }
    }
    tree
}

/// `roots` and every process below them, each once.
pub fn with_descendants(roots: &[i32]) -> BTreeSet<i32> {
    roots.iter().flat_map(|&root| tree_of(root)).collect()
}

/// The children of every thread of `pid`.
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .flat_map(|task| {
            std::fs::read_to_string(task.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|child| child.parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Kills `root` and every process below it: the descendants first (the
/// deepest first), so that no worker outlives its service, then the root.
/// Each is signalled through a pidfd opened while it is listed, so a pid
/// recycled since is never hit.
pub fn kill_tree(root: i32) {
    let pidfds: Vec<PidFd> = tree_of(root)
        .into_iter()
        .filter_map(|pid| PidFd::open(pid).ok())
        .collect();
    for pidfd in pidfds.iter().rev() {
        let _ = pidfd.send_signal(Signal::SIGKILL);
    }
}

/// True when process `pid` is on its way out: killed (`SIGKILL` pending,
/// for the process or its main thread) or already exiting (`PF_EXITING`,
/// set when `do_exit` starts, before its memory goes). A process killed on
/// a busy machine may not have run since: it still maps what it mapped.
pub fn is_dying(pid: i32) -> bool {
    const PF_EXITING: u32 = 0x4;
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    let Ok(process) = procfs::process::Process::new(pid) else {
        return false;
    };
    let exiting = process
        .stat()
        .is_ok_and(|stat| stat.flags & PF_EXITING != 0);
    exiting
        || process
            .status()
            .is_ok_and(|status| (status.sigpnd | status.shdpnd) & SIGKILL_BIT != 0)
}

/// The proportional set size of `pids` summed (`Pss:` of
/// `/proc/PID/smaps_rollup`): a page the processes share counts once
/// across them, where their RSS counts it in each.
pub fn pss_bytes(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .filter_map(|rollup| rollup_kib(&rollup, "Pss:"))
        .sum::<u64>()
        * 1024
}

/// The anonymous memory of `pid` in proportion (`Pss_Anon:` of its
/// smaps_rollup): a page it shares copy-on-write with N processes counts
/// 1/N, so that summed over them it counts once.
pub fn pss_anon_bytes(pid: i32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    rollup_kib(&rollup, "Pss_Anon:").map(|kib| kib * 1024)
}

/// The `field` line (`Pss:`, `Pss_Anon:`) of a smaps_rollup, in KiB.
fn rollup_kib(rollup: &str, field: &str) -> Option<u64> {
    rollup
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pss_line_is_read_in_kib() {
        let rollup = "55e0-7ffd ---p 00000000 00:00 0   [rollup]\n\
            Rss:                4200 kB\n\
            Pss:                1234 kB\n\
            Pss_Dirty:           100 kB\n";
        assert_eq!(rollup_kib(rollup, "Pss:"), Some(1234));
        assert_eq!(rollup_kib(rollup, "Pss_Dirty:"), Some(100));
        assert_eq!(rollup_kib("Rss: 1 kB\n", "Pss:"), None);
    }

    #[test]
    fn a_tree_lists_its_root_then_its_children_and_their_memory() {
        let me = std::process::id() as i32;
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let tree = tree_of(me);
        assert_eq!(tree[0], me);
        assert!(tree.contains(&pid), "{tree:?}");
        assert!(pss_bytes(&[me]) > 0);
        assert!(!is_dying(pid), "sleep {pid} is not dying before the kill");
        kill_tree(pid);
        let status = child.wait().unwrap();
        assert!(!status.success(), "sleep was not killed: {status:?}");
    }
}
