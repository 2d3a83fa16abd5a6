//! File locks, taken again by the restored process itself, so that their
//! owner is right: a POSIX lock belongs to the process that takes it, a
//! flock or OFD lock to the open file it is taken through (which the
//! process holds). Each is tried without waiting: a lock someone else took
//! meanwhile fails the restore, naming the descriptor and the range.

use persist_common::image::{FileLock, LockKind, Manifest};

use super::table::TableBuilder;

/// `sizeof(struct flock)` on x86-64.
const FLOCK_LEN: usize = 32;
/// `F_OFD_SETLK` (linux/fcntl.h; not in every libc).
const F_OFD_SETLK: u64 = 37;

/// Room the calls of [`append`] take in the restorer region.
pub(super) fn table_room(manifest: &Manifest) -> u64 {
    manifest.process.file_locks.len() as u64 * (FLOCK_LEN as u64 + 64)
}

/// Appends the calls that take every recorded lock again.
pub(super) fn append(t: &mut TableBuilder, manifest: &Manifest) {
    for lock in &manifest.process.file_locks {
        let label = describe(lock);
        let fd = lock.fd as u64;
        match lock.kind {
            LockKind::Flock => {
                let op = if lock.write {
                    libc::LOCK_EX
                } else {
                    libc::LOCK_SH
                };
                t.call(label, libc::SYS_flock, &[fd, (op | libc::LOCK_NB) as u64]);
            }
            LockKind::Posix | LockKind::Ofd => {
                let command = if lock.kind == LockKind::Posix {
                    libc::F_SETLK as u64
                } else {
                    F_OFD_SETLK
                };
                let record = t.data(&flock_record(lock));
                t.call(label, libc::SYS_fcntl, &[fd, command, record]);
            }
        }
    }
}

/// The `struct flock` for a POSIX or OFD lock: type, `SEEK_SET`, start,
/// length (0 up to the end of the file), pid 0 (what an OFD lock needs).
fn flock_record(lock: &FileLock) -> [u8; FLOCK_LEN] {
    let kind = if lock.write {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    } as i16;
    let length = lock
        .end
        .map_or(0, |end| end.saturating_sub(lock.start).saturating_add(1));
    let mut record = [0u8; FLOCK_LEN];
    record[0..2].copy_from_slice(&kind.to_ne_bytes());
    record[2..4].copy_from_slice(&(libc::SEEK_SET as i16).to_ne_bytes());
    record[8..16].copy_from_slice(&lock.start.to_ne_bytes());
    record[16..24].copy_from_slice(&length.to_ne_bytes());
    record
}

fn describe(lock: &FileLock) -> String {
    let kind = match lock.kind {
        LockKind::Flock => "flock",
        LockKind::Posix => "POSIX lock",
        LockKind::Ofd => "OFD lock",
    };
    let access = if lock.write { "write" } else { "read" };
    let range = match (lock.kind, lock.end) {
        (LockKind::Flock, _) => String::new(),
        (_, Some(end)) => format!(" on bytes {}-{end}", lock.start),
        (_, None) => format!(" on bytes {}-EOF", lock.start),
    };
    format!("taking the {access} {kind} of fd {}{range}", lock.fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_posix_range_becomes_start_and_length() {
        let lock = FileLock {
            fd: 4,
            kind: LockKind::Posix,
            write: true,
            start: 10,
            end: Some(14),
        };
        let record = flock_record(&lock);
        assert_eq!(&record[0..2], &(libc::F_WRLCK as i16).to_ne_bytes());
        assert_eq!(&record[8..16], &10u64.to_ne_bytes());
        assert_eq!(&record[16..24], &5u64.to_ne_bytes());
        let to_eof = flock_record(&FileLock { end: None, ..lock });
        assert_eq!(&to_eof[16..24], &0u64.to_ne_bytes(), "0: up to the end");
    }
}
