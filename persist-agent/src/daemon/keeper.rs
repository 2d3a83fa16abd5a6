//! The port keeper: one small process that holds a duplicate of every
//! registered service's listening socket.
//!
//! The daemon, the service's process and its parked skeleton all hold the
//! same socket, but none of them is there at every instant: between a park
//! and the next skeleton only the daemon holds it, and a daemon killed then
//! closed the port (clients refused or reset). The keeper outlives the
//! daemon, so the socket keeps listening and SYNs queue in its backlog (the
//! kernel's own lookup finds it without the BPF program, which dies with the
//! daemon); the restarted daemon takes the socket back from it (pidfd_getfd,
//! by the socket's inode, recorded per service) and serves what queued.
//!
//! One keeper serves every service, so 10,000 services cost one process,
//! not 10,000 (a `sleep infinity` per service, as earlier agents ran, cost
//! about 108 KiB of private memory and 40 KiB of page tables each). It is
//! `persist-agent keep-ports`, named `persist-port-keeper` in `ps`, in a
//! process group of its own; its standard input is a Unix socket listening
//! at `STATE_DIR/run/keeper.sock`. A daemon connects there (a restarted one
//! to the keeper its predecessor started) and sends each listener with
//! `SCM_RIGHTS` (with the other members of its `SO_REUSEPORT` group, if the
//! service listens through one); the keeper answers once it holds it, so that a daemon killed
//! right after finds it there. Asked to drop a socket (the service is
//! removed, or binds its port itself), the keeper closes it and answers
//! once it is closed. The keeper accepts only connections of its own user.
//! It exits when a daemon goes and it holds no socket (every service was
//! removed): the next daemon starts one when it needs it.
//!
//! Records of a keeper per service, which earlier agents left, are honoured:
//! the socket is taken from such a keeper, handed to the shared one, and the
//! old keeper stopped.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::sockopt;
use tracing::{info, warn};

use super::run_state::{self, RunRecord, RunStateDir};
use crate::sys::fd_passing;

/// How the keeper is named in `ps`.
const KEEPER_NAME: &str = "persist-port-keeper";

/// The subcommand of the agent's binary that runs the keeper.
pub const KEEPER_SUBCOMMAND: &str = "keep-ports";

/// How long the daemon waits for the keeper's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Bytes of one request: its kind, then an argument.
const REQUEST_LEN: usize = 9;
/// Hold the socket sent with the request.
const HOLD: u8 = b'H';
/// Close the held socket whose inode is the argument.
const DROP: u8 = b'D';
/// The keeper's answer to either.
const DONE: u8 = b'k';

/// What the daemon found of the keeper of a service.
pub struct Found {
    /// The recorded keeper.
    pub record: RunRecord,
    /// Its socket, taken back.
    pub listener: OwnedFd,
    /// The other members of the socket's group it holds, taken back.
    pub group: Vec<OwnedFd>,
}

/// The daemon's side of the port keeper, started or found on first use.
pub struct PortKeeper {
    socket: PathBuf,
    connection: Mutex<Option<Connection>>,
}

struct Connection {
    stream: UnixStream,
    /// The keeper's pid.
    pid: i32,
}

impl PortKeeper {
    /// The keeper listening at `run_state`'s keeper socket.
    pub fn new(run_state: &RunStateDir) -> Self {
        Self {
            socket: run_state.keeper_socket_path(),
            connection: Mutex::new(None),
        }
    }

    /// The pid of the keeper this daemon talks to, if it has one yet.
    pub fn pid(&self) -> Option<i32> {
        self.connection
            .lock()
            .expect("keeper lock")
            .as_ref()
            .map(|connection| connection.pid)
    }

    /// The live keeper of `name` recorded in `run_state`, with its socket;
    /// a record of a keeper that is gone or holds no socket is forgotten.
    pub fn find(&self, run_state: &RunStateDir, name: &str) -> Option<Found> {
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

    /// Makes sure the keeper holds `listener` for `name`, and the other
    /// members of its group `group`: nothing to do if
    /// `found` says it does, else the socket is handed to it (and a keeper of
    /// `name` alone, from an earlier agent, stopped). A keeper that cannot
    /// be reached is a warning: the service works, with the port closed
    /// while no daemon and no process of it hold the socket.
    pub fn ensure(
        &self,
        run_state: &RunStateDir,
        name: &str,
        listener: &OwnedFd,
        group: &[OwnedFd],
        found: Option<Found>,
    ) {
        let inode = super::listener::inode(listener).ok();
        let group_inodes: Vec<u64> = group
            .iter()
            .filter_map(|member| super::listener::inode(member).ok())
            .collect();
        if let Some(found) = &found
            && Some(found.record.listener_inode) == inode
            && found.record.group_inodes == group_inodes
            && self.is_ours(&found.record)
        {
            // A restarted daemon finds its predecessor's keeper holding it.
            return;
        }
        match self.hold(listener, group) {
            Ok(pid) => {
                run_state.record_keeper(name, pid, listener, group);
                info!(service = %name, pid, "the port keeper holds the listener");
            }
            Err(err) => {
                warn!(service = %name, "the port keeper cannot hold the listener, the port closes while no daemon runs: {err}");
                run_state.clear_keeper(name);
            }
        }
        // Only once the shared keeper holds it: never a moment without.
        if let Some(found) = found
            && Some(found.record.pid) != self.pid()
        {
            stop_recorded(&found.record);
        }
    }

    /// Has the keeper let go of the socket of `name`, if it holds one (the
    /// service is removed, or binds its port itself); returns once it did.
    pub fn stop(&self, run_state: &RunStateDir, name: &str) {
        if let Some(record) = run_state.load_keeper(name) {
            if self.is_ours(&record) {
                for &inode in std::iter::once(&record.listener_inode).chain(&record.group_inodes) {
                    if let Err(err) = self.request(DROP, inode, &[]) {
                        warn!(service = %name, pid = record.pid, inode, "the port keeper did not let go of the listener: {err}");
                    }
                }
            } else {
                stop_recorded(&record);
            }
        }
        run_state.clear_keeper(name);
    }

    /// Whether `record` names the shared keeper (connected to it first, if
    /// it is the one a previous daemon started).
    fn is_ours(&self, record: &RunRecord) -> bool {
        if self.pid() != Some(record.pid) && run_state::is_alive(record) {
            // Perhaps the shared keeper, not yet connected to.
            let mut connection = self.connection.lock().expect("keeper lock");
            if connection.is_none() {
                *connection = connect(&self.socket).ok();
            }
        }
        self.pid() == Some(record.pid) && run_state::is_alive(record)
    }

    /// Hands `listener` and its group's other members to the keeper;
    /// returns the keeper's pid.
    fn hold(&self, listener: &OwnedFd, group: &[OwnedFd]) -> std::io::Result<i32> {
        if group.len() >= fd_passing::MAX_FDS {
            return Err(std::io::Error::other(format!(
                "a group of {} sockets is more than one message carries",
                group.len() + 1
            )));
        }
        let fds: Vec<BorrowedFd<'_>> = std::iter::once(listener)
            .chain(group)
            .map(AsFd::as_fd)
            .collect();
        self.request(HOLD, 0, &fds)
    }

    /// Sends one request and waits for its answer; (re)connects, or starts
    /// the keeper, first if needed. Returns the keeper's pid.
    fn request(&self, kind: u8, argument: u64, fds: &[BorrowedFd<'_>]) -> std::io::Result<i32> {
        let mut connection = self.connection.lock().expect("keeper lock");
        // A connection to a keeper that died meanwhile fails once: the
        // request is sent again to a keeper found or started anew.
        for attempt in 0..2 {
            if connection.is_none() {
                *connection = Some(match connect(&self.socket) {
                    Ok(found) => found,
                    Err(err) => {
                        if attempt > 0 || kind == DROP {
                            return Err(err);
                        }
                        start(&self.socket)?
                    }
                });
            }
            let live = connection.as_ref().expect("connected just above");
            match exchange(&live.stream, kind, argument, fds) {
                Ok(()) => return Ok(live.pid),
                Err(err) if attempt == 0 => {
                    warn!(
                        pid = live.pid,
                        "the port keeper stopped answering, trying again: {err}"
                    );
                    *connection = None;
                }
                Err(err) => return Err(err),
            }
        }
        unreachable!("the second attempt returns")
    }
}

/// Connects to the keeper listening at `socket`, which greets with its pid
/// (the socket's peer credentials name the daemon that bound it).
fn connect(socket: &Path) -> std::io::Result<Connection> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let mut greeting = [0u8; 4];
    std::io::Read::read_exact(&mut &stream, &mut greeting)?;
    Ok(Connection {
        stream,
        pid: i32::from_le_bytes(greeting),
    })
}

/// Starts a keeper listening at `socket` (whatever was left there removed)
/// and connects to it. The daemon's reaper collects it once it dies.
fn start(socket: &Path) -> std::io::Result<Connection> {
    use std::os::unix::process::CommandExt;
    let _ = std::fs::remove_file(socket);
    // Bound here, before the keeper runs, so the connection below never
    // races its start; connections queue until it accepts them.
    let listener = UnixListener::bind(socket)?;
    let program = std::env::current_exe()?;
    let child = Command::new(&program)
        .arg0(KEEPER_NAME)
        .arg(KEEPER_SUBCOMMAND)
        .stdin(Stdio::from(OwnedFd::from(listener)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Out of the daemon's process group: a signal to that group (a
        // terminal's ^C) does not reach it.
        .process_group(0)
        .spawn()
        .map_err(|err| {
            std::io::Error::new(err.kind(), format!("starting {}: {err}", program.display()))
        })?;
    info!(pid = child.id(), "port keeper started");
    connect(socket)
}

/// Sends one request (with `fd`, if any) on `stream` and reads the answer.
fn exchange(
    stream: &UnixStream,
    kind: u8,
    argument: u64,
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    let mut request = [0u8; REQUEST_LEN];
    request[0] = kind;
    request[1..].copy_from_slice(&argument.to_le_bytes());
    if fd_passing::send_with_fds(stream, &request, fds)? != REQUEST_LEN {
        return Err(std::io::Error::other("short request to the port keeper"));
    }
    let mut answer = [0u8; 1];
    std::io::Read::read_exact(&mut &*stream, &mut answer)?;
    if answer[0] != DONE {
        return Err(std::io::Error::other(
            "unexpected answer from the port keeper",
        ));
    }
    Ok(())
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
        if !pidfd.wait_exit(Duration::from_secs(1)) {
            warn!(pid = record.pid, "the port keeper did not exit within 1 s");
        }
    }
}

/// Runs the keeper: holds the sockets daemons send to the listening socket
/// on its standard input, for as long as it holds any. Daemons are served
/// one at a time; once one goes and none is held, the keeper exits.
pub fn run_keeper() -> std::io::Result<()> {
    // Its name in `ps -e` and /proc/PID/comm too, not only its command line.
    let _ = nix::sys::prctl::set_name(c"persist-keeper");
    let listener = UnixListener::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let own_uid = nix::unistd::geteuid().as_raw();
    let mut held: Vec<OwnedFd> = Vec::new();
    let greeting = (std::process::id() as i32).to_le_bytes();
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) if err.raw_os_error() == Some(libc::ECONNABORTED) => continue,
            // Not a listening socket: there is nothing to keep.
            Err(err) => return Err(err),
        };
        let trusted = nix::sys::socket::getsockopt(&stream, sockopt::PeerCredentials)
            .is_ok_and(|credentials| credentials.uid() == own_uid);
        if trusted && std::io::Write::write_all(&mut &stream, &greeting).is_ok() {
            // Until the daemon goes: its requests are all in order.
            while serve_request(&stream, &mut held).is_ok() {}
            // Nothing to keep for a next daemon, which starts a keeper of
            // its own when it needs one: left running, a keeper of a state
            // directory since deleted would never be reached again.
            if held.is_empty() {
                return Ok(());
            }
        }
    }
}

/// Reads one request from a daemon and carries it out, then answers.
fn serve_request(stream: &UnixStream, held: &mut Vec<OwnedFd>) -> std::io::Result<()> {
    let mut request = [0u8; REQUEST_LEN];
    let mut filled = 0;
    while filled < REQUEST_LEN {
        let (read, fds) = fd_passing::recv_with_fds(stream, &mut request[filled..])?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        filled += read;
        held.extend(fds);
    }
    if request[0] == DROP {
        let mut inode = [0u8; 8];
        inode.copy_from_slice(&request[1..]);
        let inode = u64::from_le_bytes(inode);
        held.retain(|fd| !matches!(super::listener::inode(fd), Ok(held) if held == inode));
    }
    std::io::Write::write_all(&mut &*stream, &[DONE])
}
