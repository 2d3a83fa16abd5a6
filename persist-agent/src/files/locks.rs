//! File locks: flock, POSIX and OFD locks the process holds, from the
//! `lock:` lines of `/proc/PID/fdinfo/N` (the `/proc/locks` format). fdinfo
//! shows a flock or OFD lock on every descriptor of its open file
//! description, a POSIX lock on the descriptor it was taken through when
//! the process owns it. A lock that cannot be attributed to the process
//! (a flock another live process took on an open file it shares, a lease)
//! is refused by descriptor.

use std::fs;

use persist_common::image::{FdInfo, FdKind, FileLock, LockKind};

use super::FilesError;
use super::fdinfo::FdInfoText;

/// A `lock:` line: `1: POSIX  ADVISORY  WRITE 812 fe:00:1038 10 14`.
#[derive(Debug, PartialEq, Eq)]
struct Line<'a> {
    kind: &'a str,
    mode: &'a str,
    access: &'a str,
    pid: i64,
    start: u64,
    end: Option<u64>,
}

fn parse(value: &str) -> Option<Line<'_>> {
    let mut words = value.split_whitespace().skip(1);
    let kind = words.next()?;
    let mode = words.next()?;
    let access = words.next()?;
    let pid = words.next()?.parse().ok()?;
    let _file = words.next()?;
    let start = words.next()?.parse().ok()?;
    let end = match words.next()? {
        "EOF" => None,
        end => Some(end.parse().ok()?),
    };
    Some(Line {
        kind,
        mode,
        access,
        pid,
        start,
        end,
    })
}

/// The locks process `pid` holds through the descriptors of `fds` (as
/// [`super::save_fds`] saved them; the process must still be stopped).
pub fn save_locks(pid: i32, fds: &[FdInfo]) -> Result<Vec<FileLock>, FilesError> {
    let mut locks = Vec::new();
    // A duplicate shows its primary's flock and OFD locks again.
    for info in fds.iter().filter(|info| info.shared_with.is_none()) {
        let fd = info.fd;
        let path = format!("/proc/{pid}/fdinfo/{fd}");
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(source) => return Err(FilesError::Proc { pid, path, source }),
        };
        let Some(fdinfo) = FdInfoText::parse(&text) else {
            continue;
        };
        for value in fdinfo.values("lock") {
            locks.push(attribute(pid, info, value)?);
        }
    }
    Ok(locks)
}

/// The lock of `value` on `info`, or why it cannot be restored.
fn attribute(pid: i32, info: &FdInfo, value: &str) -> Result<FileLock, FilesError> {
    let file = match &info.kind {
        FdKind::File { path, .. } => path.as_str(),
        _ => "the file",
    };
    let refuse = |what: String| FilesError::unsupported(info.fd, format!("{file}: {what}"));
    let line = parse(value).ok_or_else(|| refuse(format!("unreadable lock line {value:?}")))?;
    let kind = match line.kind {
        "FLOCK" => LockKind::Flock,
        "POSIX" => LockKind::Posix,
        "OFDLCK" => LockKind::Ofd,
        other => return Err(refuse(format!("a {other} lock cannot be checkpointed"))),
    };
    if line.mode != "ADVISORY" {
        return Err(refuse(format!(
            "a {} {} lock cannot be checkpointed",
            line.mode, line.kind
        )));
    }
    let write = match line.access {
        "WRITE" => true,
        "READ" => false,
        other => return Err(refuse(format!("a lock for {other} cannot be checkpointed"))),
    };
    let taker = line.pid;
    let foreign = match kind {
        LockKind::Posix => taker != i64::from(pid),
        // The open file may be shared with the process that took it: the
        // lock would then be that process's as much as ours.
        LockKind::Flock => {
            taker != i64::from(pid) && fs::metadata(format!("/proc/{taker}")).is_ok()
        }
        // An OFD lock names no process.
        LockKind::Ofd => false,
    };
    if foreign {
        return Err(refuse(format!(
            "the {} lock was taken by pid {taker}, which shares its open file: \
             it cannot be attributed to pid {pid}",
            line.kind
        )));
    }
    Ok(FileLock {
        fd: info.fd,
        kind,
        write,
        start: line.start,
        end: line.end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_kinds() {
        assert_eq!(
            parse("1: POSIX  ADVISORY  WRITE 812 fe:00:1038 10 14"),
            Some(Line {
                kind: "POSIX",
                mode: "ADVISORY",
                access: "WRITE",
                pid: 812,
                start: 10,
                end: Some(14)
            })
        );
        assert_eq!(
            parse("1: OFDLCK ADVISORY  READ -1 fe:00:1038 0 EOF").map(|l| (l.pid, l.end)),
            Some((-1, None))
        );
        assert_eq!(parse("1: FLOCK  ADVISORY  WRITE 812 fe:00:1038 0"), None);
    }

    #[test]
    fn a_lease_is_refused_by_descriptor() {
        let info = FdInfo {
            fd: 7,
            cloexec: false,
            flags: 0,
            shared_with: None,
            kind: FdKind::Eventfd {
                count: 0,
                semaphore: false,
            },
        };
        let err = attribute(1, &info, "1: LEASE  ACTIVE    READ 1 fe:00:1038 0 EOF").unwrap_err();
        assert_eq!(
            err.to_string(),
            "fd 7: the file: a LEASE lock cannot be checkpointed"
        );
    }
}
