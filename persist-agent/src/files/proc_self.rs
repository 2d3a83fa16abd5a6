//! Descriptors on the process's own `/proc` directory.
//!
//! A server that reads its own statistics holds `/proc/PID/stat` open for a
//! moment (Redis does so in every `serverCron`). The link names the pid, and
//! the file is bound to that process when it is opened, so neither reopening
//! the path nor opening it from the agent gives the restored process its own
//! file. Checkpoint saves such paths as `/proc/self/...` (or
//! `/proc/thread-self/...` for the main thread's task directory); restore
//! has the forked child open them itself, once it is the restored process.

use std::ffi::CString;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;

use persist_common::image::FdInfo;

use super::FilesError;
use super::install::{ProcSelfFile, ProcSelfPosition};
use super::open::reopen_flags;
use crate::sys::pidfd::PidFd;

/// Files of `/proc/PID` that programs commonly read about themselves
/// (memory and CPU use).
const COMMONLY_READ: [&str; 3] = ["stat", "statm", "status"];

/// Opens and reads the `/proc` files process `pid` most likely reads about
/// itself, before it runs, so that the kernel's entries for its new task exist
/// by then: a process's first open of `/proc/self/stat` is much slower than one
/// after another process opened it (docs/kernel-facts.md, Restore and wake),
/// and redis reads it in every `serverCron`, the first one on a wake's critical
/// path. Nothing fails on an error: this only saves time.
pub fn warm_own_proc_entries(pid: i32) {
    for name in COMMONLY_READ {
        let _ = std::fs::read(format!("/proc/{pid}/{name}"));
    }
}

/// Prefixes of paths that name the opening process's own `/proc` entries.
const SELF_PREFIXES: [&str; 2] = ["/proc/self", "/proc/thread-self"];

/// The path to save for descriptor `fd` of process `pid`, whose link reads
/// `path`: `/proc/PID/...` becomes `/proc/self/...`, and
/// `/proc/PID/task/PID/...` becomes `/proc/thread-self/...`. A file of one
/// of the process's other threads is refused (the threads do not exist yet
/// when the descriptors are installed); every other path is kept.
pub(super) fn saved_path(pid: i32, fd: i32, path: &str) -> Result<String, FilesError> {
    let Some((owner, below)) = proc_entry(path) else {
        return Ok(path.to_owned());
    };
    if owner != pid {
        return if is_thread_of(pid, owner) {
            Err(other_thread(fd, path, owner))
        } else {
            Ok(path.to_owned())
        };
    }
    let Some(task) = below.strip_prefix("/task/") else {
        return Ok(format!("/proc/self{below}"));
    };
    let (tid, in_task) = task.split_at(task.find('/').unwrap_or(task.len()));
    match tid.parse::<i32>() {
        Ok(tid) if tid == pid => Ok(format!("/proc/thread-self{in_task}")),
        Ok(tid) => Err(other_thread(fd, path, tid)),
        Err(_) => Ok(format!("/proc/self{below}")),
    }
}

/// For a saved file that names the process's own `/proc` entries, what the
/// child must open; `None` for every other file.
pub(super) fn child_open(
    info: &FdInfo,
    path: &str,
    offset: u64,
) -> Result<Option<ProcSelfFile>, FilesError> {
    let own = SELF_PREFIXES.iter().any(|prefix| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    });
    if !own {
        return Ok(None);
    }
    let c_path = CString::new(path)
        .map_err(|_| FilesError::invalid(info.fd, format!("path {path:?} holds a NUL byte")))?;
    Ok(Some(ProcSelfFile {
        path: c_path,
        flags: reopen_flags(info.flags) | libc::O_CLOEXEC,
        offset,
        targets: vec![(info.fd, info.cloexec)],
    }))
}

/// Moves the process's own `/proc` files to their saved positions, through
/// duplicates taken with `pidfd_getfd` (a position belongs to the open file,
/// which the duplicate shares). Call it once the process has its threads,
/// names and credentials, since seeking makes the file's text.
pub fn restore_proc_self_positions(
    pidfd: &PidFd,
    positions: &[ProcSelfPosition],
) -> Result<(), FilesError> {
    for position in positions {
        let fd = position.fd;
        let mut file = File::from(pidfd.get_fd(fd).map_err(FilesError::io(
            fd,
            format!("pidfd_getfd of {}", position.path),
        ))?);
        file.seek(SeekFrom::Start(position.offset))
            .map_err(FilesError::io(
                fd,
                format!("seeking {} to {}", position.path, position.offset),
            ))?;
    }
    Ok(())
}

/// Splits `/proc/N/REST` into `N` and `/REST` (empty for `/proc/N` itself).
fn proc_entry(path: &str) -> Option<(i32, &str)> {
    let rest = path.strip_prefix("/proc/")?;
    let (number, below) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    Some((number.parse().ok()?, below))
}

fn is_thread_of(pid: i32, tid: i32) -> bool {
    Path::new(&format!("/proc/{pid}/task/{tid}")).exists()
}

fn other_thread(fd: i32, path: &str, tid: i32) -> FilesError {
    FilesError::unsupported(
        fd,
        format!(
            "{path} is a /proc file of thread {tid}, which is not the main thread; \
             only the process's own and its main thread's /proc files can be restored"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_entries_are_saved_relative_to_self() {
        let me = std::process::id() as i32;
        let saved = |path: &str| saved_path(me, 3, path).unwrap();
        assert_eq!(saved(&format!("/proc/{me}/stat")), "/proc/self/stat");
        assert_eq!(saved(&format!("/proc/{me}")), "/proc/self");
        assert_eq!(saved(&format!("/proc/{me}/task")), "/proc/self/task");
        assert_eq!(
            saved(&format!("/proc/{me}/task/{me}/comm")),
            "/proc/thread-self/comm"
        );
        assert_eq!(saved("/proc/1/stat"), "/proc/1/stat");
        assert_eq!(saved("/proc/meminfo"), "/proc/meminfo");
        assert_eq!(saved("/etc/hosts"), "/etc/hosts");
        assert_eq!(saved(&format!("/proc/{me}0")), format!("/proc/{me}0"));
    }

    #[test]
    fn another_threads_entries_are_refused() {
        let me = std::process::id() as i32;
        let (sender, receiver) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            sender.send(nix::unistd::gettid().as_raw()).unwrap();
            let _ = stopped.recv();
        });
        let tid = receiver.recv().unwrap();
        let in_task = saved_path(me, 7, &format!("/proc/{me}/task/{tid}/stat"));
        let direct = saved_path(me, 7, &format!("/proc/{tid}/stat"));
        stop.send(()).unwrap();
        thread.join().unwrap();
        for refused in [in_task, direct] {
            let message = refused.unwrap_err().to_string();
            assert!(
                message.starts_with("fd 7: /proc/")
                    && message.contains(&format!("of thread {tid},")),
                "{message}"
            );
        }
    }

    #[test]
    fn only_self_paths_are_opened_by_the_child() {
        let info = |path: &str| FdInfo {
            fd: 9,
            flags: libc::O_RDONLY as u32,
            cloexec: true,
            shared_with: None,
            kind: persist_common::image::FdKind::File {
                path: path.to_owned(),
                offset: 0,
                unlinked: false,
                contents: Vec::new(),
                identity: None,
            },
        };
        for own in ["/proc/self/stat", "/proc/self", "/proc/thread-self/comm"] {
            let file = child_open(&info(own), own, 5).unwrap().expect(own);
            assert_eq!(file.path.to_str().unwrap(), own);
            assert_eq!(file.offset, 5);
            assert_eq!(file.targets, vec![(9, true)]);
        }
        for other in ["/proc/selfish", "/proc/1/stat", "/etc/hosts"] {
            assert!(
                child_open(&info(other), other, 0).unwrap().is_none(),
                "{other}"
            );
        }
    }
}
