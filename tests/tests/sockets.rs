//! Sockets besides listeners and pairs: TCP and UDP sockets created or
//! bound but not listening, UNIX sockets unbound, bound (to a path or an
//! abstract name) or connected to a named socket outside the process. The
//! fixture `fixture-sockets` checks them from inside the restored process;
//! the refusals name the descriptor and the peer.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use persist_agent::files::save_fds;
use persist_agent::sys::pidfd::PidFd;
use persist_common::image::{FdInfo, FdKind, UnixSocket};
use persist_tests::NetNs;

const FIXTURE: &str = env!("CARGO_BIN_EXE_fixture-sockets");

/// The fixture's port: its namespace is fresh, so any port is free.
const PORT: u16 = 7131;

/// A process a test started, killed and reaped on drop.
struct Started(Child);

impl Started {
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A stream listener outside the process that echoes what each connection
/// sends, counting connections; stopped on drop.
struct EchoServer {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn start(path: &Path) -> Self {
        let listener = UnixListener::bind(path).expect("bind the echo server");
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            stream.set_nonblocking(false).unwrap();
                            std::thread::spawn(move || echo(stream));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => panic!("echo server accept: {e}"),
                    }
                }
            })
        };
        Self {
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// Echoes until the client goes away.
fn echo(mut stream: UnixStream) {
    let mut buf = [0u8; 256];
    while let Ok(n @ 1..) = stream.read(&mut buf) {
        if stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn wait_for(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} ({})",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `persist-agent ARGS` in `netns`.
fn agent(netns: &NetNs, args: &[&str]) -> Output {
    netns
        .command(persist_tests::binary("persist-agent"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run persist-agent")
}

/// Restores `image` in `netns`, sends the process SIGUSR1 and returns its
/// pid and what it then wrote to `DIR/result`; the process is killed and
/// gone either way.
fn restore_and_ask(netns: &NetNs, image: &str, dir: &Path) -> (i32, String) {
    let _ = fs::remove_file(dir.join("result"));
    let output = agent(netns, &["restore", "--image", image]);
    assert!(
        output.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pid: i32 = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("restore prints the pid");
    let restored = nix::unistd::Pid::from_raw(pid);
    let process = PidFd::open(pid).ok();
    nix::sys::signal::kill(restored, nix::sys::signal::Signal::SIGUSR1).unwrap();
    let result = dir.join("result");
    let deadline = Instant::now() + Duration::from_secs(10);
    let outcome = loop {
        match fs::read_to_string(&result) {
            Ok(text) if !text.is_empty() => break text,
            _ if Instant::now() > deadline => break "no result within 10 s".to_owned(),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    // Gone, its port and names free, before the next restore binds them.
    let _ = nix::sys::signal::kill(restored, nix::sys::signal::Signal::SIGKILL);
    if let Some(process) = process {
        assert!(
            process.wait_exit(Duration::from_secs(10)),
            "restored pid {pid} did not die of SIGKILL"
        );
    }
    (pid, outcome.trim().to_owned())
}

/// Restores `image` in `netns`, which must fail; returns the error.
fn restore_refused(netns: &NetNs, image: &str) -> String {
    let output = agent(netns, &["restore", "--image", image]);
    assert!(
        !output.status.success(),
        "restore should have been refused; it printed {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn idle_sockets_come_back_twice_from_one_image() {
    persist_tests::require_root!();
    let netns = NetNs::new().expect("network namespace");
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("state");
    fs::create_dir(&dir).unwrap();
    let image = temp.path().join("image");
    let image = image.to_str().unwrap();
    let log_path = dir.join("log");
    let log = UnixDatagram::bind(&log_path).expect("bind the log socket");
    log.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let echo = EchoServer::start(&dir.join("daemon.sock"));

    let fixture = netns
        .command(FIXTURE)
        .arg(&dir)
        .arg(PORT.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fixture-sockets");
    let fixture = Started(fixture);
    wait_for(&dir.join("ready"), "fixture-sockets to be ready");
    let output = agent(
        &netns,
        &[
            "checkpoint",
            "--pid",
            &fixture.pid().to_string(),
            "--image",
            image,
        ],
    );
    assert!(
        output.status.success(),
        "checkpoint failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let original_pid = fixture.pid();
    drop(fixture);

    for round in 1..=2 {
        let (pid, outcome) = restore_and_ask(&netns, image, &dir);
        assert_eq!(outcome, "OK", "restore {round} (pid {pid})");
        let mut buf = [0u8; 128];
        let n = log
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("restore {round}: nothing came to the log socket: {e}"));
        assert_eq!(
            String::from_utf8_lossy(&buf[..n]),
            format!("log from {original_pid}"),
            "restore {round} (pid {pid}): what the restored process logged, with its own pid"
        );
    }
    assert_eq!(
        echo.connections(),
        3,
        "the outside daemon sees the original connection, then one new connection per restore"
    );

    // A stale socket file at the bound path that the process did not make
    // (another owner, another inode) is left alone.
    let dgram = dir.join("dgram.sock");
    fs::remove_file(&dgram).unwrap();
    drop(UnixDatagram::bind(&dgram).unwrap());
    std::os::unix::fs::chown(&dgram, Some(1234), Some(1234)).unwrap();
    let err = restore_refused(&netns, image);
    assert!(
        err.contains(&format!(
            "fd 35: {}: a socket file of uid 1234 gid 1234 is there, which the process did not make",
            dgram.display()
        )),
        "{err}"
    );
    assert_eq!(
        fs::symlink_metadata(&dgram).map(|m| m.uid()).ok(),
        Some(1234),
        "the foreign socket file must stay"
    );
    fs::remove_file(&dgram).unwrap();

    // A socket file some open socket is bound to is never taken over.
    let holder = netns.enter(|| UnixDatagram::bind(&dgram).unwrap()).unwrap();
    let err = restore_refused(&netns, image);
    assert!(
        err.contains(&format!(
            "fd 35: {}: a socket that is still open is bound to it",
            dgram.display()
        )),
        "{err}"
    );
    drop(holder);
    fs::remove_file(&dgram).unwrap();

    // The log socket gone for good: the restore names the descriptor and
    // the peer it could not reach.
    drop(log);
    fs::remove_file(&log_path).unwrap();
    let err = restore_refused(&netns, image);
    assert!(
        err.contains(&format!(
            "fd 37: connecting again to {}, the UNIX socket's peer at checkpoint",
            log_path.display()
        )),
        "{err}"
    );
}

/// Starts `python3 -c script dir`, waiting for it to write `dir/ready`.
fn start_python(dir: &Path, script: &str) -> Started {
    let child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start python3");
    wait_for(&dir.join("ready"), "python3 to be ready");
    Started(child)
}

fn save(pid: i32) -> Result<Vec<FdInfo>, persist_agent::files::FilesError> {
    let pidfd = PidFd::open(pid).expect("pidfd_open");
    save_fds(pid, &pidfd)
}

fn unix_socket(fds: &[FdInfo], fd: i32) -> UnixSocket {
    match &fds.iter().find(|f| f.fd == fd).map(|f| &f.kind) {
        Some(FdKind::UnixSocket(socket)) => socket.clone(),
        other => panic!("fd {fd}: {other:?}"),
    }
}

/// What checkpoint records: the bound file (its mode and owner),
/// a bound name whose file was removed, and the peer to connect to again.
#[test]
fn unix_sockets_are_saved_with_their_file_and_peer() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let peer = dir.path().join("peer.sock");
    let _peer = UnixDatagram::bind(&peer).unwrap();
    let script = "import os, socket, sys, time\n\
        d = sys.argv[1]\n\
        a = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); a.bind(d + '/kept.sock')\n\
        b = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); b.bind(d + '/removed.sock')\n\
        os.unlink(d + '/removed.sock'); b.connect(d + '/peer.sock')\n\
        os.dup2(a.fileno(), 40); os.dup2(b.fileno(), 41); a.close(); b.close()\n\
        open(d + '/ready', 'w').close()\n\
        time.sleep(60)\n";
    let python = start_python(dir.path(), script);
    let fds = save(python.pid()).expect("save_fds");

    let kept = unix_socket(&fds, 40);
    let path = dir.path().join("kept.sock");
    let meta = fs::symlink_metadata(&path).unwrap();
    assert_eq!(kept.name, path.to_str().unwrap());
    let file = kept.file.expect("the bound file is recorded");
    assert_eq!((file.mode, file.owner), (meta.mode() & 0o7777, (0, 0)));
    assert_eq!(kept.peer, None);

    let removed = unix_socket(&fds, 41);
    assert_eq!(
        removed.name,
        dir.path().join("removed.sock").to_str().unwrap()
    );
    assert_eq!(
        removed.file, None,
        "its file was removed before the checkpoint"
    );
    assert_eq!(removed.peer.as_deref(), peer.to_str());
}

#[test]
fn unix_socket_whose_outside_peer_is_gone_is_refused() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outside.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let script = "import os, socket, sys, time\n\
        s = socket.socket(socket.AF_UNIX)\n\
        s.connect(sys.argv[1] + '/outside.sock')\n\
        os.dup2(s.fileno(), 42); s.close()\n\
        open(sys.argv[1] + '/ready', 'w').close()\n\
        time.sleep(60)\n";
    let python = start_python(dir.path(), script);
    let (_server_side, _) = listener.accept().unwrap();
    // The connection lives on, but nothing answers at that name any more.
    fs::remove_file(&path).unwrap();
    let text = save(python.pid())
        .expect_err("a connection whose peer is gone must be refused")
        .to_string();
    let prefix = format!(
        "fd 42: UNIX stream socket is connected to {}, which is gone (socket inode ",
        path.display()
    );
    assert!(
        text.starts_with(&prefix) && text.ends_with("): there is nothing to connect to again"),
        "{text}"
    );
}

#[test]
fn unix_socket_with_an_unnamed_outside_peer_is_refused() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let script = "import os, socket, subprocess, sys, time\n\
        a, b = socket.socketpair()\n\
        p = subprocess.Popen(['sleep', '60'], pass_fds=[b.fileno()])\n\
        open(sys.argv[1] + '/helper', 'w').write(str(p.pid))\n\
        os.dup2(a.fileno(), 43); a.close(); b.close()\n\
        open(sys.argv[1] + '/ready', 'w').close()\n\
        time.sleep(60)\n";
    let python = start_python(dir.path(), script);
    let helper = dir.path().join("helper");
    let helper: i32 = fs::read_to_string(helper).unwrap().parse().unwrap();
    let result = save(python.pid());
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helper),
        nix::sys::signal::Signal::SIGKILL,
    );
    let text = result
        .expect_err("a connection to an unnamed outside socket must be refused")
        .to_string();
    assert!(
        text.starts_with(
            "fd 43: UNIX stream socket is connected to an unnamed socket outside the process (socket inode "
        ) && text.ends_with("): there is nothing to connect to again"),
        "{text}"
    );
}

#[test]
fn unix_datagram_socket_with_queued_messages_is_refused() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let script = "import os, socket, sys, time\n\
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(sys.argv[1] + '/in.sock')\n\
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'x', sys.argv[1] + '/in.sock')\n\
        os.dup2(s.fileno(), 44); s.close()\n\
        open(sys.argv[1] + '/ready', 'w').close()\n\
        time.sleep(60)\n";
    let python = start_python(dir.path(), script);
    let text = save(python.pid())
        .expect_err("a message that cannot be sent again must not be dropped")
        .to_string();
    assert_eq!(
        text,
        format!(
            "fd 44: UNIX datagram socket {}/in.sock has data queued for reading, which a new \
             socket cannot get back",
            dir.path().display()
        )
    );
}

/// Binds a datagram socket at fd 45 and connects fd 46 to it (fd 45 is not
/// connected back); on SIGUSR1, sends through fd 46 and writes `OK` to
/// `DIR/result` if fd 45 got it.
const ONE_WAY_DATAGRAM_SCRIPT: &str = r#"import os, signal, socket, sys
d = sys.argv[1]
a = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); a.bind(d + '/inbox.sock')
b = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); b.connect(d + '/inbox.sock')
os.dup2(a.fileno(), 45); os.dup2(b.fileno(), 46); a.close(); b.close()
def report(*_):
    os.write(46, b'one way')
    got = os.read(45, 100)
    with open(d + '/result', 'w') as f:
        f.write('OK' if got == b'one way' else f'got {got!r}')
signal.signal(signal.SIGUSR1, report)
open(d + '/ready', 'w').close()
while True:
    signal.pause()
"#;

/// A datagram socket connected to another socket of the process that is
/// not connected back is not a pair: each is restored on its own, and the
/// connect waits until the other is bound.
#[test]
fn datagram_socket_connected_one_way_inside_the_process() {
    persist_tests::require_root!();
    restore_python_and_ask(ONE_WAY_DATAGRAM_SCRIPT);
}

/// A stream pair whose fd 50 end was shut down for writing after sending
/// `last`; on SIGUSR1 writes `OK` to `DIR/result` if fd 51 reads `last`
/// then end-of-file and fd 50 can no longer send.
const HALF_CLOSED_PAIR_SCRIPT: &str = r#"import os, signal, socket, sys
d = sys.argv[1]
a, b = socket.socketpair()
a.sendall(b'last'); a.shutdown(socket.SHUT_WR)
os.dup2(a.fileno(), 50); os.dup2(b.fileno(), 51); a.close(); b.close()
def report(*_):
    got = [os.read(51, 100), os.read(51, 100)]
    try:
        os.write(50, b'more'); sent = 'sent'
    except BrokenPipeError:
        sent = 'EPIPE'
    with open(d + '/result', 'w') as f:
        f.write('OK' if got == [b'last', b''] and sent == 'EPIPE' else f'{got!r} {sent}')
signal.signal(signal.SIGUSR1, report)
open(d + '/ready', 'w').close()
while True:
    signal.pause()
"#;

/// A half-closed pair comes back half-closed: the queued data, then
/// end-of-file, and no more sending on the closed side.
#[test]
fn a_half_closed_pair_stays_half_closed() {
    persist_tests::require_root!();
    restore_python_and_ask(HALF_CLOSED_PAIR_SCRIPT);
}

/// Runs the python `script` (given DIR) in a namespace until it is ready,
/// checkpoints and kills it, restores it and asserts that it answers `OK`.
fn restore_python_and_ask(script: &str) {
    let netns = NetNs::new().expect("network namespace");
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("state");
    fs::create_dir(&dir).unwrap();
    let image = temp.path().join("image");
    let image = image.to_str().unwrap();
    let python = netns
        .command("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start python3");
    let python = Started(python);
    wait_for(&dir.join("ready"), "python3 to be ready");
    let output = agent(
        &netns,
        &[
            "checkpoint",
            "--pid",
            &python.pid().to_string(),
            "--image",
            image,
        ],
    );
    assert!(
        output.status.success(),
        "checkpoint failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    drop(python);
    let (pid, outcome) = restore_and_ask(&netns, image, &dir);
    assert_eq!(outcome, "OK", "restored pid {pid}");
}

/// Clients waiting in a UNIX listener's queue cannot be put back in it:
/// the listener is refused rather than lose them.
#[test]
fn unix_listener_with_clients_waiting_is_refused() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let script = "import os, socket, sys, time\n\
        s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1] + '/busy.sock'); s.listen(4)\n\
        os.dup2(s.fileno(), 47); s.close()\n\
        open(sys.argv[1] + '/ready', 'w').close()\n\
        time.sleep(60)\n";
    let python = start_python(dir.path(), script);
    let path = dir.path().join("busy.sock");
    let _waiting = UnixStream::connect(&path).expect("connect to the listener");
    let text = save(python.pid())
        .expect_err("a client waiting to be accepted must not be dropped")
        .to_string();
    assert_eq!(
        text,
        format!(
            "fd 47: UNIX listener {} has clients waiting to be accepted (1), who would be lost",
            path.display()
        )
    );
}

/// A small server holding, besides its listener on PORT, a datagram socket
/// bound to `DIR/ctl.sock` and one connected to the log socket `DIR/log`.
/// For each connection it logs `request` and answers `ok` if its sockets
/// are still what it made, else what differs.
const LOGGING_SERVER_SCRIPT: &str = r#"import os, socket, sys
d, port = sys.argv[1], int(sys.argv[2])
ctl = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); ctl.bind(d + '/ctl.sock')
log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); log.connect(d + '/log')
spare = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
spare.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(('127.0.0.1', port)); server.listen(16)
while True:
    conn, _ = server.accept()
    wrong = []
    if ctl.getsockname() != d + '/ctl.sock': wrong.append(f'ctl {ctl.getsockname()!r}')
    if log.getpeername() != d + '/log': wrong.append(f'log {log.getpeername()!r}')
    if spare.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0: wrong.append('spare nodelay')
    try:
        log.send(b'request')
    except OSError as e:
        wrong.append(f'log send: {e}')
    conn.sendall(b'ok' if not wrong else ', '.join(wrong).encode())
    conn.close()
"#;

/// Asks the logging server once, from inside the namespace.
fn ask(sandbox: &persist_tests::Sandbox, port: u16) -> String {
    sandbox
        .netns
        .enter(|| {
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
            stream.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            std::io::Result::Ok(answer)
        })
        .unwrap()
        .expect("the server answers")
}

/// Through the daemon: a service holding a bound UNIX datagram socket, one
/// connected to an outside log socket and an unbound TCP socket is parked
/// and woken twice; each wake it still logs through the outside socket, and
/// its bound socket's file (left by the process parked before) is replaced.
#[test]
fn a_service_with_idle_sockets_is_parked_and_woken() {
    persist_tests::require_root!();
    let sandbox = persist_tests::Sandbox::with_daemon().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = UnixDatagram::bind(dir.path().join("log")).unwrap();
    log.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let port = 8131;
    let command = [
        "/usr/bin/python3",
        "-c",
        LOGGING_SERVER_SCRIPT,
        dir.path().to_str().unwrap(),
        &port.to_string(),
    ]
    .map(str::to_owned);
    sandbox
        .add_ok("logger", port, &["--ready", "tcp"], &command)
        .expect("a service holding idle sockets is added");
    let mut buf = [0u8; 64];
    for wake in 1..=2 {
        drain(&log); // what readiness checks and earlier wakes logged
        assert_eq!(ask(&sandbox, port), "ok", "wake {wake}");
        let n = log
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("wake {wake}: nothing logged: {e}"));
        assert_eq!(&buf[..n], b"request", "wake {wake}");
        sandbox
            .agent_ok(&["park", "logger"])
            .unwrap_or_else(|e| panic!("park after wake {wake}: {e}"));
    }
}

/// Reads away every message waiting on `log`.
fn drain(log: &UnixDatagram) {
    log.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    while log.recv(&mut buf).is_ok() {}
    log.set_nonblocking(false).unwrap();
}

/// A name the kernel gave a socket by itself (autobind, here because it
/// passes credentials) may be taken by the time of the restore: the
/// socket then gets another name the kernel picks, as the first was.
#[test]
fn an_autobound_name_taken_meanwhile_is_picked_again() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let peer = dir.path().join("peer.sock");
    let _peer = UnixDatagram::bind(&peer).unwrap();
    let script = "import os, socket, sys, time\n\
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
        s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)\n\
        s.connect(sys.argv[1] + '/peer.sock')\n\
        os.dup2(s.fileno(), 48); s.close()\n\
        open(sys.argv[1] + '/ready', 'w').close()\n\
        time.sleep(60)\n";
    let python = start_python(dir.path(), script);
    let fds = save(python.pid()).expect("save_fds");
    drop(python);
    let name = unix_socket(&fds, 48).name;
    let autobound = name.strip_prefix('@').expect("an abstract name");
    assert_eq!(autobound.len(), 5, "the kernel's autobind name: {name}");

    // Another socket takes the name before the restore.
    let taken = nix::sys::socket::UnixAddr::new_abstract(autobound.as_bytes()).unwrap();
    let thief = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    nix::sys::socket::bind(std::os::fd::AsRawFd::as_raw_fd(&thief), &taken).unwrap();

    let prepared = persist_agent::files::prepare(
        &fds,
        persist_agent::files::InheritedFds::default(),
        &persist_agent::files::PathAccess::default(),
    )
    .expect("the socket gets another name the kernel picks");
    drop(prepared);
}

const NOBODY: u32 = 65534;

/// The socket file is made as the restored process: a process running as
/// nobody gets its stale socket file replaced only where nobody may do it.
#[test]
fn a_socket_file_is_made_with_the_process_credentials() {
    persist_tests::require_root!();
    let mut sandbox = persist_tests::Sandbox::new().unwrap();
    let temp = tempfile::tempdir().unwrap();
    fs::set_permissions(
        temp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let run = temp.path().join("run");
    fs::create_dir(&run).unwrap();
    std::os::unix::fs::chown(&run, Some(NOBODY), Some(NOBODY)).unwrap();
    let image = temp.path().join("image");
    let script = "import os, socket, sys, time\n\
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(sys.argv[1] + '/app.sock')\n\
        os.dup2(s.fileno(), 49); s.close()\n\
        open(sys.argv[1] + '/ready', 'w').close()\n\
        time.sleep(60)\n";
    // `ip netns exec` must run as root: setpriv drops to nobody inside.
    let mut python = sandbox
        .netns
        .command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["/usr/bin/python3", "-c", script])
        .arg(&run)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&run.join("ready"), "python3 as nobody to be ready");
    fs::remove_file(run.join("ready")).unwrap();
    sandbox
        .agent_ok(&[
            "checkpoint",
            "--pid",
            &python.id().to_string(),
            "--image",
            image.to_str().unwrap(),
        ])
        .unwrap();
    let _ = python.wait();

    // nobody may no longer write the directory: its stale file stays.
    std::os::unix::fs::chown(&run, Some(0), Some(0)).unwrap();
    let refused = sandbox.agent(&["restore", "--image", image.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&refused.stderr);
    let socket = run.join("app.sock");
    assert!(
        !refused.status.success()
            && err.contains(&format!(
                "fd 49: removing stale socket {}: Permission denied",
                socket.display()
            )),
        "restore as nobody must not remove a file nobody cannot: {err}"
    );
    assert!(socket.exists(), "the stale socket file stays");

    std::os::unix::fs::chown(&run, Some(NOBODY), Some(NOBODY)).unwrap();
    let output = sandbox.agent(&["restore", "--image", image.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "restore as nobody in nobody's directory: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pid: i32 = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("restore prints the pid");
    sandbox.track_pid(pid);
    let owner = fs::symlink_metadata(&socket).map(|m| (m.uid(), m.gid()));
    assert_eq!(
        owner.ok(),
        Some((NOBODY, NOBODY)),
        "the new socket file is nobody's, made by the restore"
    );
}
