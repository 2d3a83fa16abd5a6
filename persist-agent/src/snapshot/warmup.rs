//! The warm-up command: real work done by a client of the administrator's
//! choosing (`psql -c 'SELECT 1'`, a script of requests) once the service
//! is ready and before its snapshot, so that the image holds the caches
//! that work fills (a database's catalog pages in its shared buffers, a
//! JIT's compiled code) and every wake starts with them.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::sys::wait::WaitStatus;

use super::BuildError;
use crate::launch;
use crate::sys::spawn::Identity;

/// Runs `command` with `/bin/sh -c`, as `identity` (the service's user),
/// its output appended to the service's `log`; fails unless it exits 0
/// within `timeout` (it is killed then).
pub(super) fn run(
    command: &str,
    identity: Option<Identity>,
    log: &std::fs::File,
    timeout: Duration,
) -> Result<(), BuildError> {
    let failed = |what: String| BuildError::Other(format!("warm-up command `{command}`: {what}"));
    let null = std::fs::File::open("/dev/null").map_err(|err| failed(err.to_string()))?;
    let argv = ["/bin/sh".to_owned(), "-c".to_owned(), command.to_owned()];
    let fds = vec![(null.as_fd(), 0), (log.as_fd(), 1), (log.as_fd(), 2)];
    let spawned = launch::start(&argv, &[], false, fds, identity, false)
        .map_err(|err| failed(err.to_string()))?;
    let deadline = Instant::now() + timeout;
    if !spawned
        .pidfd
        .wait_exit(deadline.saturating_duration_since(Instant::now()))
    {
        // Its session: whatever the shell started goes with it.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(spawned.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        crate::sys::spawn::reap(&spawned.pidfd, true);
        return Err(failed(format!("did not finish within {timeout:?}")));
    }
    match crate::sys::spawn::reap(&spawned.pidfd, true) {
        Some(WaitStatus::Exited(_, 0)) => Ok(()),
        Some(WaitStatus::Exited(_, code)) => Err(failed(format!("exit status {code}"))),
        Some(WaitStatus::Signaled(_, signal, _)) => Err(failed(format!("killed by {signal}"))),
        other => Err(failed(format!("ended as {other:?}"))),
    }
}
