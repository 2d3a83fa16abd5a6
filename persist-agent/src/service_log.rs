//! Each service's own log: its stdout and stderr, in
//! `STATE_DIR/logs/NAME.log`, read by `persist-agent logs NAME [--follow]`.
//!
//! The service writes the file itself, opened for it in append mode by the
//! agent (by the build for a snapshot-mode service, by each start for the
//! exec and inetd modes): its output never goes through the daemon, so a
//! service runs on and logs while no daemon runs. A restored process gets
//! the same file back (it is one of the image's `agent_files`), so the log
//! goes on across parks and wakes.
//!
//! The log is kept under a size limit by copy and truncate, as logrotate's
//! `copytruncate` does: once `NAME.log` is larger than the limit, its
//! content replaces `NAME.log.1` and it is truncated to nothing. The file
//! stays the same inode, so the process (which cannot be asked to reopen
//! it) and an image that recorded it keep working; with `O_APPEND` its next
//! write lands at the new end. What the service writes between the last
//! copy and the truncation (a few microseconds) is lost; at most twice the
//! limit, plus what is written in one rotation interval, is kept.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The log of service `name` in the logs directory `logs_dir`.
pub fn path(logs_dir: &Path, name: &str) -> PathBuf {
    logs_dir.join(format!("{name}.log"))
}

/// The previous part of the log `path`, which rotation fills.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    name.into()
}

/// Opens the log `path` as a service's stdout and stderr: appended to,
/// created root-only if missing.
pub fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Rotates the log `path` when it is larger than `max_bytes` (see the
/// module's doc). Returns whether it did.
pub fn rotate_if_larger(path: &Path, max_bytes: u64) -> io::Result<bool> {
    let mut log = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(log) => log,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(err),
    };
    if log.metadata()?.len() <= max_bytes {
        return Ok(false);
    }
    let rotated = rotated_path(path);
    let mut tmp_name = rotated.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut copy = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    // Copy until caught up, so that the truncation right after loses as
    // little as it can of what the service goes on writing.
    loop {
        if io::copy(&mut log, &mut copy)? == 0 {
            break;
        }
    }
    // Renamed before the truncation: a crash in between keeps the lines twice
    // rather than losing them.
    fs::rename(&tmp, &rotated)?;
    log.set_len(0)?;
    Ok(true)
}

/// Rotates each of `logs` that is larger than `max_bytes` (a missing one
/// is skipped), returning the logs it rotated and the errors met, each with
/// its file.
pub fn rotate_each(
    logs: impl IntoIterator<Item = PathBuf>,
    max_bytes: u64,
) -> (Vec<PathBuf>, Vec<(PathBuf, io::Error)>) {
    let (mut rotated, mut failed) = (Vec::new(), Vec::new());
    for path in logs {
        match rotate_if_larger(&path, max_bytes) {
            Ok(true) => rotated.push(path),
            Ok(false) => {}
            Err(err) => failed.push((path, err)),
        }
    }
    (rotated, failed)
}

/// Why a log could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The service has no log (yet).
    #[error("no log for service {name}: {} does not exist (a service logs once it has started)", path.display())]
    Missing {
        /// The service.
        name: String,
        /// Its log.
        path: PathBuf,
    },
    /// Reading the log or writing it out failed.
    #[error("{}", path.display())]
    Io {
        /// The log.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// How often `--follow` looks for more output.
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);

/// Writes the log of service `name` to `out`, its rotated part first; with
/// `follow`, then goes on writing what the service adds, across rotations,
/// until writing to `out` fails (the reader went away).
pub fn show(
    logs_dir: &Path,
    name: &str,
    follow: bool,
    out: &mut impl Write,
) -> Result<(), LogError> {
    let path = path(logs_dir, name);
    let io_at = |path: &Path| {
        let path = path.to_owned();
        move |source| LogError::Io { path, source }
    };
    let rotated = rotated_path(&path);
    match File::open(&rotated) {
        Ok(mut older) => {
            io::copy(&mut older, out).map_err(io_at(&rotated))?;
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(io_at(&rotated)(err)),
    }
    let mut log = match File::open(&path) {
        Ok(log) => log,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(LogError::Missing {
                name: name.to_owned(),
                path,
            });
        }
        Err(err) => return Err(io_at(&path)(err)),
    };
    let mut offset = io::copy(&mut log, out).map_err(io_at(&path))?;
    out.flush().map_err(io_at(&path))?;
    if !follow {
        return Ok(());
    }
    let mut inode = log.metadata().map_err(io_at(&path))?.ino();
    loop {
        std::thread::sleep(FOLLOW_INTERVAL);
        // Replaced (removed and created again): follow the new file.
        if let Ok(meta) = fs::metadata(&path)
            && meta.ino() != inode
            && let Ok(reopened) = File::open(&path)
        {
            (log, inode, offset) = (reopened, meta.ino(), 0);
        }
        let len = log.metadata().map_err(io_at(&path))?.len();
        if len < offset {
            // Rotated: what was before the truncation was shown already.
            offset = 0;
        }
        log.seek(SeekFrom::Start(offset)).map_err(io_at(&path))?;
        let mut fresh = Vec::new();
        (&mut log)
            .take(len - offset)
            .read_to_end(&mut fresh)
            .map_err(io_at(&path))?;
        offset += fresh.len() as u64;
        if out.write_all(&fresh).and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_file_and_moves_its_content_to_the_previous_part() {
        let dir = tempfile::tempdir().unwrap();
        let log_path = path(dir.path(), "web");
        let mut log = open(&log_path).unwrap();
        let inode = log.metadata().unwrap().ino();
        log.write_all(b"first line\n").unwrap();
        assert!(
            !rotate_if_larger(&log_path, 100).unwrap(),
            "under the limit"
        );
        log.write_all(&[b'x'; 100]).unwrap();
        let (rotated, failed) = rotate_each([log_path.clone(), path(dir.path(), "gone")], 100);
        assert_eq!(rotated, std::slice::from_ref(&log_path));
        assert!(failed.is_empty(), "{failed:?}");
        let older = fs::read(rotated_path(&log_path)).unwrap();
        assert!(older.starts_with(b"first line\nxxx") && older.len() == 111);
        log.write_all(b"after\n").unwrap();
        assert_eq!(
            fs::read(&log_path).unwrap(),
            b"after\n",
            "an append-mode writer goes on at the start of the truncated file"
        );
        assert_eq!(fs::metadata(&log_path).unwrap().ino(), inode, "same file");

        let mut shown = Vec::new();
        show(dir.path(), "web", false, &mut shown).unwrap();
        assert_eq!(shown, [older, b"after\n".to_vec()].concat());
        let err = show(dir.path(), "db", false, &mut Vec::new()).unwrap_err();
        assert!(
            err.to_string().starts_with("no log for service db: "),
            "{err}"
        );
    }
}
