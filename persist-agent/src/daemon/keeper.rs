//! Port keepers: one small process per service that holds a duplicate of
//! its listening socket for as long as the service is registered.
//!
//! The daemon, the service's process and its parked skeleton all hold the
//! same socket, but none of them is there at every instant: between a park
//! and the next skeleton only the daemon holds it, and a daemon killed then
//! closed the port (clients refused or reset). A keeper outlives the daemon,
//! so the socket keeps listening and SYNs queue in its backlog (the kernel's
//! own lookup finds it without the BPF program, which dies with the daemon);
//! the restarted daemon takes the socket back from it (pidfd_getfd) and
//! serves what queued.
//!
//! A keeper is coreutils' `sleep infinity` with the socket as its standard
//! input, in a process group of its own, named `persist-port-keeper` in
//! `ps`. It costs the host about 108 KiB of private memory and 40 KiB of
//! page tables; `persist-agent hold-port`, which earlier agents started,
//! cost 484 KiB and 60 KiB, the relocated data of a much
//! larger binary, and was the larger part of a parked service's cost.

use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, Stdio};

use tracing::{info, warn};

use super::run_state::{self, RunRecord, RunStateDir};

/// What a keeper runs: it holds its standard input and sleeps, for as
/// little memory as a process can cost.
const KEEPER_PROGRAM: &str = "sleep";

/// What the daemon found of the keeper of a service.
pub struct Found {
    /// The recorded keeper.
    pub record: RunRecord,
    /// Its socket, taken back.
    pub listener: OwnedFd,
}

/// The live keeper of `name`, recorded in `run_state`, with its socket; a
/// record of a keeper that is gone or holds no socket is forgotten.
pub fn find(run_state: &RunStateDir, name: &str) -> Option<Found> {
    let record = run_state.load_keeper(name)?;
    match run_state::take_listener(&record) {
        Some(taken) => Some(Found {
            record,
            listener: taken.listener,
        }),
        None => {
            run_state.clear_keeper(name);
            None
        }
    }
}

/// Makes sure a keeper of `name` holds `listener`: keeps `found` if it holds
/// that very socket, else stops it and starts a new one. A keeper that
/// cannot be started is a warning: the service works, with the port closed
/// while no daemon and no process of it hold the socket.
pub fn ensure(run_state: &RunStateDir, name: &str, listener: &OwnedFd, found: Option<Found>) {
    let inode = super::listener::inode(listener).ok();
    if let Some(found) = found {
        if Some(found.record.listener_inode) == inode {
            return;
        }
        stop_recorded(&found.record);
    }
    match spawn(listener) {
        Ok(pid) => {
            run_state.record_keeper(name, pid, listener);
            info!(service = %name, pid, "port keeper started");
        }
        Err(err) => {
            warn!(service = %name, "cannot start a port keeper, the port closes while no daemon runs: {err}");
            run_state.clear_keeper(name);
        }
    }
}

/// Stops the keeper of `name`, if any (the service is removed, or rebuilt).
pub fn stop(run_state: &RunStateDir, name: &str) {
    if let Some(record) = run_state.load_keeper(name) {
        stop_recorded(&record);
    }
    run_state.clear_keeper(name);
}

fn stop_recorded(record: &RunRecord) {
    if !run_state::is_alive(record) {
        return;
    }
    if let Ok(pidfd) = crate::sys::pidfd::PidFd::open(record.pid)
        && run_state::is_alive(record)
    {
        let _ = pidfd.send_signal(nix::sys::signal::Signal::SIGKILL);
        // Gone, and its socket closed, before the port is used again.
        if !pidfd.wait_exit(std::time::Duration::from_secs(1)) {
            tracing::warn!(pid = record.pid, "the port keeper did not exit within 1 s");
        }
    }
}

/// Starts a keeper holding `listener`; returns its pid. The daemon's reaper
/// collects it once it dies.
fn spawn(listener: &impl AsFd) -> std::io::Result<i32> {
    use std::os::unix::process::CommandExt;
    let socket = listener.as_fd().try_clone_to_owned()?;
    let child = Command::new(KEEPER_PROGRAM)
        .arg0("persist-port-keeper")
        .arg("infinity")
        .stdin(Stdio::from(socket))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Out of the daemon's process group: a signal to that group (a
        // terminal's ^C) does not reach it.
        .process_group(0)
        .spawn()?;
    Ok(child.id() as i32)
}
