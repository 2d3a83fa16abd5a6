//! Starting a service's command: with the listener as fd 3 (systemd socket
//! activation), with one connection on stdin and stdout (inetd), or as it
//! would run by hand, to be snapshotted.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

use crate::service::{ServiceSpec, find_program};
use crate::sys::spawn::{Identity, SpawnRequest, Spawned, spawn};

/// Why a service's command could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The program is not there any more.
    #[error("command not found: {0}")]
    NotFound(String),
    /// An argument or environment entry holds a NUL byte.
    #[error("argument {0:?} contains a NUL byte")]
    Nul(String),
    /// The service's log could not be opened.
    #[error("opening the log {}", path.display())]
    Log {
        /// The log.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// fork or exec failed.
    #[error("starting {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Starts the service with `listener` as fd 3 and `LISTEN_FDS=1`, its
/// stdout and stderr on `log`.
pub fn exec_with_listener(
    spec: &ServiceSpec,
    listener: BorrowedFd<'_>,
    log: BorrowedFd<'_>,
) -> Result<Spawned, LaunchError> {
    let null = File::open("/dev/null").map_err(|source| LaunchError::Spawn {
        program: "/dev/null".into(),
        source,
    })?;
    let extra_env = [
        "LISTEN_FDS=1".to_owned(),
        format!("LISTEN_FDNAMES={}", spec.name),
    ];
    let fds = vec![(null.as_fd(), 0), (log, 1), (log, 2), (listener, 3)];
    start(&spec.command, &extra_env, true, fds, None, false)
}

/// Starts one instance of the service for a single accepted connection,
/// its stderr on `log`.
pub fn exec_for_connection(
    spec: &ServiceSpec,
    connection: BorrowedFd<'_>,
    log: BorrowedFd<'_>,
) -> Result<Spawned, LaunchError> {
    let fds = vec![(connection, 0), (connection, 1), (log, 2)];
    start(&spec.command, &[], false, fds, None, false)
}

/// Starts `command` in a new session with the given stdio, extra
/// environment and identity; with `no_aslr`, its address-space layout is
/// not randomised.
pub fn start(
    command: &[String],
    extra_env: &[String],
    listen_pid: bool,
    fds: Vec<(BorrowedFd<'_>, i32)>,
    identity: Option<Identity>,
    no_aslr: bool,
) -> Result<Spawned, LaunchError> {
    let program_name = command
        .first()
        .ok_or_else(|| LaunchError::NotFound(String::new()))?;
    let program =
        find_program(program_name).ok_or_else(|| LaunchError::NotFound(program_name.clone()))?;
    let cstring = |text: &[u8]| {
        CString::new(text).map_err(|_| LaunchError::Nul(String::from_utf8_lossy(text).into_owned()))
    };
    let argv = command
        .iter()
        .map(|arg| cstring(arg.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut env = Vec::new();
    for (key, value) in std::env::vars_os() {
        // The daemon's own service-manager socket is not the service's: a
        // `--ready notify` service gets one of its own in `extra_env`.
        if key.as_bytes().starts_with(b"LISTEN_")
            || key.as_bytes().starts_with(b"PERSIST_")
            || key == "NOTIFY_SOCKET"
        {
            continue;
        }
        let mut entry = key.as_bytes().to_vec();
        entry.push(b'=');
        entry.extend_from_slice(value.as_bytes());
        env.push(cstring(&entry)?);
    }
    for entry in extra_env {
        env.push(cstring(entry.as_bytes())?);
    }
    let request = SpawnRequest {
        program: cstring(program.as_os_str().as_bytes())?,
        argv,
        env,
        listen_pid,
        fds,
        identity,
        no_aslr,
    };
    spawn(&request).map_err(|source| LaunchError::Spawn {
        program: program.display().to_string(),
        source,
    })
}
