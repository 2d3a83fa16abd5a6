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
//! input (and the other members of its `SO_REUSEPORT` group, if the service
//! listens through one, from descriptor 3 on), in a process group of its
//! own, named `persist-port-keeper` in `ps`. It costs the host about 108 KiB
//! of private memory and 40 KiB of page tables; `persist-agent hold-port`,
//! which earlier agents started, cost 484 KiB and 60 KiB, the relocated data
//! of a much larger binary, and was the larger part of a parked service's
//! cost.

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
    /// The other members of the socket's group it holds, taken back.
    pub group: Vec<OwnedFd>,
}

/// The live keeper of `name`, recorded in `run_state`, with its socket; a
/// record of a keeper that is gone or holds no socket is forgotten.
pub fn find(run_state: &RunStateDir, name: &str) -> Option<Found> {
    let record = run_state.load_keeper(name)?;
    match run_state::take_listener(&record) {
        Some(taken) => Some(Found {
            record,
            listener: taken.listener,
            group: taken.group,
        }),
        None => {
            run_state.clear_keeper(name);
            None
        }
    }
}

/// Most members of a group a keeper holds besides the listener: the
/// spawn places 16 descriptors at most, three of them stdio.
const MAX_GROUP: usize = 13;

/// Makes sure a keeper of `name` holds `listener` and the other members of
/// its group `group`: keeps `found` if it holds those very sockets, else
/// stops it and starts a new one. A keeper that cannot be started is a
/// warning: the service works, with the port closed while no daemon and no
/// process of it hold the socket.
pub fn ensure(
    run_state: &RunStateDir,
    name: &str,
    listener: &OwnedFd,
    group: &[OwnedFd],
    found: Option<Found>,
) {
    let inode = super::listener::inode(listener).ok();
    let group = if group.len() > MAX_GROUP {
        warn!(service = %name, members = group.len() + 1, "the port keeper holds {} members of the listener's group only", MAX_GROUP + 1);
        &group[..MAX_GROUP]
    } else {
        group
    };
    let group_inodes: Vec<u64> = group
        .iter()
        .filter_map(|member| super::listener::inode(member).ok())
        .collect();
    if let Some(found) = found {
        if Some(found.record.listener_inode) == inode && found.record.group_inodes == group_inodes {
            return;
        }
        stop_recorded(&found.record);
    }
    match spawn(listener, group) {
        Ok(pid) => {
            run_state.record_keeper(name, pid, listener, group);
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

/// Starts a keeper holding `listener`, and `group` from descriptor 3 on;
/// returns its pid. The daemon's reaper collects it once it dies.
fn spawn(listener: &impl AsFd, group: &[OwnedFd]) -> std::io::Result<i32> {
    use std::os::unix::process::CommandExt;
    if !group.is_empty() {
        return spawn_with_group(listener, group);
    }
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

/// [`spawn`] of a keeper that holds the other members of the listener's
/// group too, at descriptors 3 and up: `std::process::Command` places only
/// the standard three, and a descriptor left inheritable would leak into
/// whatever else the daemon starts meanwhile.
fn spawn_with_group(listener: &impl AsFd, group: &[OwnedFd]) -> std::io::Result<i32> {
    use std::ffi::CString;
    let program = crate::service::find_program(KEEPER_PROGRAM).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{KEEPER_PROGRAM} is not on PATH"),
        )
    })?;
    let null = std::fs::File::options().write(true).open("/dev/null")?;
    let mut fds = vec![(listener.as_fd(), 0), (null.as_fd(), 1), (null.as_fd(), 2)];
    fds.extend(
        group
            .iter()
            .zip(3..)
            .map(|(member, at)| (member.as_fd(), at)),
    );
    let cstring = |text: &str| CString::new(text).map_err(std::io::Error::other);
    let spawned = crate::sys::spawn::spawn(&crate::sys::spawn::SpawnRequest {
        program: CString::new(program.into_os_string().into_encoded_bytes())
            .map_err(std::io::Error::other)?,
        argv: vec![cstring("persist-port-keeper")?, cstring("infinity")?],
        env: Vec::new(),
        listen_pid: false,
        fds,
        identity: None,
    })?;
    // Nobody waits on its pidfd: the orphan reaper collects it.
    crate::sys::spawn::unclaim(spawned.pid);
    Ok(spawned.pid)
}
