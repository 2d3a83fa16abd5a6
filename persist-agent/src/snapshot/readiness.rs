//! Waiting until a freshly started service is ready, and warming it up.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{BuildError, BuildRequest};
use crate::service::Readiness;
use crate::sys::pidfd::PidFd;

/// How often readiness is polled.
const POLL: Duration = Duration::from_millis(10);

/// Why waiting ended without readiness.
pub(super) enum WaitError {
    /// The deadline passed; says what was awaited.
    TimedOut(String),
    /// Another failure.
    Failed(BuildError),
}

/// The `NOTIFY_SOCKET` a service reports `READY=1` on: a file in the
/// runtime directory, or for a service run as another user, which could
/// neither reach nor write to that root-owned socket, a name in the
/// abstract namespace (`@name`, as sd_notify takes it: PostgreSQL run as
/// user postgres).
pub struct NotifySocket {
    socket: UnixDatagram,
    /// The socket file, or `None` for an abstract name.
    path: Option<PathBuf>,
    /// What `NOTIFY_SOCKET` says.
    address: String,
}

impl NotifySocket {
    /// Binds a datagram socket with a name of its own in the abstract
    /// namespace, which any user of the network namespace (the daemon's,
    /// where services run) can send to. The name is unguessable, so that no
    /// other process binds it first.
    pub fn bind_abstract() -> Result<Self, BuildError> {
        use std::os::linux::net::SocketAddrExt;
        let mut random = [0u8; 8];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut urandom| urandom.read_exact(&mut random))
            .map_err(|err| BuildError::Other(format!("/dev/urandom: {err}")))?;
        let name = format!(
            "persist-notify-{}-{}-{:016x}",
            std::process::id(),
            unique(),
            u64::from_ne_bytes(random)
        );
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(|err| BuildError::Other(format!("notify socket @{name}: {err}")))?;
        let socket = UnixDatagram::bind_addr(&address)
            .map_err(|err| BuildError::Other(format!("binding @{name}: {err}")))?;
        socket
            .set_nonblocking(true)
            .map_err(|err| BuildError::Other(err.to_string()))?;
        Ok(Self {
            socket,
            path: None,
            address: format!("@{name}"),
        })
    }

    /// Binds a fresh datagram socket in `dir`.
    pub fn bind(dir: &Path) -> Result<Self, BuildError> {
        std::fs::create_dir_all(dir)
            .map_err(|err| BuildError::Other(format!("{}: {err}", dir.display())))?;
        let path = dir.join(format!("notify-{}-{}.sock", std::process::id(), unique()));
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path)
            .map_err(|err| BuildError::Other(format!("binding {}: {err}", path.display())))?;
        socket
            .set_nonblocking(true)
            .map_err(|err| BuildError::Other(err.to_string()))?;
        Ok(Self {
            socket,
            address: path.display().to_string(),
            path: Some(path),
        })
    }

    /// The `NOTIFY_SOCKET` value to give the service.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// True once a `READY=1` message has arrived.
    fn ready(&self) -> bool {
        let mut buffer = [0u8; 4096];
        while let Ok(len) = self.socket.recv(&mut buffer) {
            if String::from_utf8_lossy(&buffer[..len])
                .lines()
                .any(|line| line == "READY=1")
            {
                return true;
            }
        }
        false
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Polls until the service is ready, has exited, or the timeout passes.
pub(super) fn wait(
    pidfd: &PidFd,
    request: &BuildRequest,
    notify: Option<&NotifySocket>,
    exited: impl Fn(String) -> BuildError,
) -> Result<(), WaitError> {
    let deadline = Instant::now() + request.ready_timeout;
    loop {
        if pidfd.has_exited() {
            return Err(WaitError::Failed(exited(exit_status(pidfd))));
        }
        let listening = super::find_listener(pidfd, request.port).is_ok();
        let ready = match &request.ready {
            Readiness::Tcp => listening,
            Readiness::Http { path } => {
                listening
                    && http_status(request.addr, request.port, path)
                        .is_some_and(|s| (200..400).contains(&s))
            }
            Readiness::Notify => notify.is_some_and(NotifySocket::ready),
        };
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let what = match &request.ready {
                Readiness::Tcp => format!("it never listened on port {}", request.port),
                Readiness::Http { path } => {
                    format!("GET {path} on port {} never succeeded", request.port)
                }
                Readiness::Notify => "it never sent READY=1".to_owned(),
            };
            return Err(WaitError::TimedOut(what));
        }
        std::thread::sleep(POLL);
    }
}

fn exit_status(pidfd: &PidFd) -> String {
    match crate::sys::spawn::reap(pidfd, true) {
        Some(nix::sys::wait::WaitStatus::Exited(_, code)) => format!("exit status {code}"),
        Some(nix::sys::wait::WaitStatus::Signaled(_, signal, _)) => format!("killed by {signal}"),
        _ => "exited".to_owned(),
    }
}

/// Where a client reaches a server listening on `addr:port`: a server on
/// every address (`0.0.0.0` or `::`) is reached on the loopback address of
/// its family.
fn client_target(addr: IpAddr, port: u16) -> SocketAddr {
    let addr = match addr {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    };
    SocketAddr::new(addr, port)
}

/// The status code of `GET path`, if the server answered one.
fn http_status(addr: IpAddr, port: u16, path: &str) -> Option<u16> {
    let target = client_target(addr, port);
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {target}\r\n\r\n").ok()?;
    // Read the whole answer: the server is done with the connection only
    // once it has sent all of it, and it must be done before the snapshot.
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let head = String::from_utf8_lossy(&response[..response.len().min(32)]).into_owned();
    head.split(' ').nth(1)?.parse().ok()
}

/// One warm-up request: a GET for HTTP readiness, else a connect and close.
pub fn send_warmup_request(addr: IpAddr, port: u16, ready: &Readiness) -> std::io::Result<()> {
    match ready {
        Readiness::Http { path } => {
            http_status(addr, port, path).ok_or_else(|| std::io::Error::other("no HTTP answer"))?;
        }
        _ => {
            TcpStream::connect(client_target(addr, port))?;
        }
    }
    Ok(())
}

/// The processes of the tree under `pid` once it stopped changing: a
/// master that forks its workers one after the other (gunicorn sleeps up
/// to 0.1 s between two) may be ready before the last is forked. Waits
/// until the same processes were seen for `settle`, `limit` at most. A
/// process with no children is waited for only until it sleeps: nginx's
/// master binds its listener, which makes it look ready, and forks its
/// workers a moment later, still running.
pub(super) fn settled_tree(pid: i32, settle: Duration, limit: Duration) -> Vec<i32> {
    let deadline = Instant::now() + limit;
    let mut tree = lone_until_asleep(pid, deadline);
    if tree.len() == 1 {
        return tree;
    }
    let mut since = Instant::now();
    while since.elapsed() < settle && Instant::now() < deadline {
        std::thread::sleep(POLL);
        let now = crate::process_tree::tree_of(pid);
        if now != tree {
            tree = now;
            since = Instant::now();
        }
    }
    tree
}

/// The tree under `pid` once it has children or, while it has none, once
/// its process was seen asleep on two polls in a row (`deadline` at most).
fn lone_until_asleep(pid: i32, deadline: Instant) -> Vec<i32> {
    let mut asleep_polls = 0;
    loop {
        let tree = crate::process_tree::tree_of(pid);
        if tree.len() > 1 || Instant::now() >= deadline {
            return tree;
        }
        let sleeping = procfs::process::Process::new(pid)
            .and_then(|process| process.stat())
            // A process gone or a zombie will fork nothing more.
            .map_or(true, |stat| matches!(stat.state, 'S' | 'Z' | 'X'));
        asleep_polls = if sleeping { asleep_polls + 1 } else { 0 };
        if asleep_polls == 2 {
            return tree;
        }
        std::thread::sleep(POLL);
    }
}

/// Waits (up to `limit`) until none of `pids` holds a TCP socket but
/// listeners: the connections of readiness checks and warm-up requests must
/// be closed on their side too before the snapshot, since live connections
/// cannot be saved. A process that is gone holds none.
pub(super) fn wait_for_quiet_sockets(pids: &[i32], limit: Duration) {
    let pidfds: Vec<PidFd> = pids
        .iter()
        .filter_map(|&pid| PidFd::open(pid).ok())
        .collect();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline && pidfds.iter().any(has_connections) {
        std::thread::sleep(POLL);
    }
}

/// Whether the process holds a TCP socket that is not a listener (one the
/// peer already closed included).
fn has_connections(pidfd: &PidFd) -> bool {
    super::handover::sockets(pidfd)
        .iter()
        .any(|(_, _, role)| *role == super::handover::SocketRole::TcpOther)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kill_all(pids: &[i32]) {
        for &pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    #[test]
    fn a_lone_process_still_running_is_waited_for_until_it_forks() {
        let mut shell = std::process::Command::new("sh")
            .args([
                "-c",
                "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; sleep 30 & wait",
            ])
            .spawn()
            .unwrap();
        let tree = settled_tree(
            shell.id() as i32,
            Duration::from_millis(100),
            Duration::from_secs(20),
        );
        kill_all(&tree);
        shell.wait().unwrap();
        assert_eq!(tree.len(), 2, "the shell and the sleep it forked: {tree:?}");
    }

    #[test]
    fn a_lone_process_asleep_is_taken_alone() {
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let tree = settled_tree(
            sleeper.id() as i32,
            Duration::from_millis(100),
            Duration::from_secs(20),
        );
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        assert_eq!(tree, vec![sleeper.id() as i32]);
    }
}
