//! What a service's processes hold in memory, read from /proc for `status`.

/// Resident memory of every process in the given sessions.
pub(super) fn rss_of_sessions(
    processes: &std::cell::OnceCell<Vec<ProcessRss>>,
    sessions: &[i32],
) -> u64 {
    if sessions.is_empty() {
        return 0;
    }
    processes
        .get_or_init(all_process_rss)
        .iter()
        .filter(|p| sessions.contains(&p.session) || sessions.contains(&p.pid))
        .map(|p| p.rss_bytes)
        .sum()
}

/// One process's session and resident memory.
pub(super) struct ProcessRss {
    pid: i32,
    session: i32,
    rss_bytes: u64,
}

/// Every process's session and resident memory, read in one walk of /proc
/// for all services.
pub(super) fn all_process_rss() -> Vec<ProcessRss> {
    let page = procfs::page_size();
    let Ok(processes) = procfs::process::all_processes() else {
        return Vec::new();
    };
    processes
        .flatten()
        .filter_map(|process| process.stat().ok())
        .map(|stat| ProcessRss {
            pid: stat.pid,
            session: stat.session,
            rss_bytes: stat.rss * page,
        })
        .collect()
}
