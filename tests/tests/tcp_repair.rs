//! Established TCP connections checkpointed and restored with TCP_REPAIR:
//! both ends of a connection holding unread data, each restored twice from
//! one image, a redis replica that keeps its link to its master, and an
//! `--on-idle keep` service that keeps its outbound connection across parks.

use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use persist_tests::{NetNs, Sandbox, binary, redis_server_command, run_ok, wait_until};

/// Processes a test started (or restored), SIGKILLed on drop.
#[derive(Default)]
struct Pids(Vec<i32>);

impl Drop for Pids {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A network namespace and what the test runs in it.
struct Ns {
    netns: NetNs,
    pids: Pids,
}

impl Ns {
    fn new() -> Result<Self> {
        Ok(Self {
            netns: NetNs::new()?,
            pids: Pids::default(),
        })
    }

    /// Starts `program ARGS` in the namespace (`ip netns exec` execs it in
    /// place, so the child's pid is the program's).
    fn spawn(&mut self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Result<Child> {
        let child = self
            .netns
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        self.pids.0.push(child.id() as i32);
        Ok(child)
    }

    fn agent(&self, args: &[&str]) -> Result<Output> {
        run_ok(self.netns.command(binary("persist-agent")).args(args))
    }

    fn checkpoint(&self, child: &mut Child, image: &Path) -> Result<()> {
        let pid = child.id().to_string();
        let image = image.to_str().context("image path")?;
        let output = self.agent(&["checkpoint", "--pid", &pid, "--image", image])?;
        eprintln!("{}", String::from_utf8_lossy(&output.stdout).trim());
        child.wait()?;
        Ok(())
    }

    fn restore(&mut self, image: &Path) -> Result<i32> {
        let output = self.agent(&["restore", "--image", image.to_str().context("image path")?])?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let pid: i32 = stdout
            .lines()
            .last()
            .and_then(|line| line.trim().parse().ok())
            .with_context(|| format!("restore printed no pid: {stdout:?}"))?;
        self.pids.0.push(pid);
        Ok(pid)
    }

    fn cli(&self, port: u16, args: &[&str]) -> String {
        let output = self
            .netns
            .command("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output();
        output.map_or_else(
            |_| String::new(),
            |output| String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        )
    }
}

fn signal(pid: i32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
}

/// SIGKILLs a restored process and waits until it is gone.
fn kill_and_wait_dead(pid: i32) {
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let dead = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        })
    };
    wait_until(Duration::from_secs(10), dead).expect("a killed process dies");
}

/// Waits for `DIR/NAME` and returns what it holds.
fn read_when_written(dir: &Path, name: &str) -> Result<String> {
    let path = dir.join(name);
    wait_until(Duration::from_secs(30), || {
        std::fs::metadata(&path).is_ok_and(|meta| meta.len() > 0)
    })
    .with_context(|| format!("{} never written", path.display()))?;
    Ok(std::fs::read_to_string(&path)?.trim().to_owned())
}

/// The line a `redis-cli INFO` output has for `field`.
fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .map(|value| value.trim().to_owned())
}

/// Both ends of a connection with unread data in both directions (and
/// unsent data on the client, the server's window being full) are
/// checkpointed, the client first: nothing is then sent to it, and the
/// server has nothing to send. Each round restores both from their images
/// and lets them exchange the rest of their streams, checked byte for byte
/// inside each process, then kills them with a reset.
#[test]
fn both_ends_of_a_connection_restore_twice_from_one_image() {
    persist_tests::require_root!();
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    let dir_arg = dir.to_str().unwrap();
    let mut ns = Ns::new().unwrap();
    let fixture = binary("fixture-tcp");
    let mut server = ns.spawn(&fixture, &["server", dir_arg, "17001"]).unwrap();
    let mut client = ns.spawn(&fixture, &["client", dir_arg, "17001"]).unwrap();
    let client_ready = read_when_written(&dir, "client-ready").unwrap();
    let server_ready = read_when_written(&dir, "server-ready").unwrap();
    let sent: usize = client_ready
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        sent < 600_000,
        "the client's writes must stop at a full window ({client_ready})"
    );

    let client_image = temp.path().join("client-image");
    let server_image = temp.path().join("server-image");
    ns.checkpoint(&mut client, &client_image).unwrap();
    ns.checkpoint(&mut server, &server_image).unwrap();
    let manifest = persist_common::image::Image::open(&client_image).unwrap();
    let queued = manifest
        .manifest()
        .fds
        .iter()
        .find_map(|fd| match &fd.kind {
            persist_common::image::FdKind::TcpConnection(connection) => Some(connection.clone()),
            _ => None,
        })
        .expect("the client's image has its connection");
    eprintln!(
        "client image: {} bytes received unread, {} to send ({} never sent)",
        queued.recv_queue.len(),
        queued.send_queue.len(),
        queued.send_unsent
    );
    assert!(
        !queued.recv_queue.is_empty() && !queued.send_queue.is_empty(),
        "the client's image holds data in both queues: {} received, {} to send",
        queued.recv_queue.len(),
        queued.send_queue.len()
    );

    for round in 1..=2 {
        for name in ["server-result", "client-result"] {
            let _ = std::fs::remove_file(dir.join(name));
        }
        let server = ns.restore(&server_image).unwrap();
        let client = ns.restore(&client_image).unwrap();
        signal(server, nix::sys::signal::Signal::SIGUSR1);
        signal(client, nix::sys::signal::Signal::SIGUSR1);
        let server_result = read_when_written(&dir, "server-result").unwrap();
        let client_result = read_when_written(&dir, "client-result").unwrap();
        assert_eq!(
            server_result, "OK",
            "server, round {round} ({server_ready})"
        );
        assert_eq!(
            client_result, "OK",
            "client, round {round} ({client_ready})"
        );
        kill_and_wait_dead(client);
        kill_and_wait_dead(server);
    }
}

/// A replica checkpointed and restored keeps its link to the master: the
/// same connection (same local port on the master's list of replicas), no
/// full resync, and writes to the master reach it.
#[test]
fn redis_replica_keeps_its_master_link_across_a_restore() {
    persist_tests::require_root!();
    let temp = tempfile::tempdir().unwrap();
    let image = temp.path().join("replica-image");
    let mut ns = Ns::new().unwrap();
    let (master_port, replica_port) = (16391, 16392);
    let start = |ns: &mut Ns, command: Vec<String>, extra: &[&str]| {
        let args: Vec<&str> = command[1..]
            .iter()
            .map(String::as_str)
            .chain(extra.iter().copied())
            .chain(["--daemonize", "no", "--dir", temp.path().to_str().unwrap()])
            .collect();
        ns.spawn(&command[0], &args).unwrap()
    };
    // The master pings its replicas every 10 s by default: a ping that
    // arrives while no socket holds the replica's end is answered with a
    // reset. Rare pings keep the test about the restore.
    let mut master = start(
        &mut ns,
        redis_server_command(master_port),
        &["--repl-ping-replica-period", "3600"],
    );
    wait_until(Duration::from_secs(20), || {
        ns.cli(master_port, &["PING"]) == "PONG"
    })
    .unwrap();
    assert_eq!(ns.cli(master_port, &["SET", "before", "1"]), "OK");
    let mut replica = start(
        &mut ns,
        redis_server_command(replica_port),
        &[
            "--replicaof",
            "127.0.0.1",
            &master_port.to_string(),
            "--dbfilename",
            "replica.rdb",
        ],
    );
    let link_up = |ns: &Ns| {
        info_field(
            &ns.cli(replica_port, &["INFO", "replication"]),
            "master_link_status",
        )
        .as_deref()
            == Some("up")
    };
    wait_until(Duration::from_secs(30), || link_up(&ns)).unwrap();
    wait_until(Duration::from_secs(10), || {
        ns.cli(replica_port, &["GET", "before"]) == "1"
    })
    .unwrap();
    let replica_addr = |ns: &Ns| -> Result<String> {
        let info = ns.cli(master_port, &["INFO", "replication"]);
        let slave = info_field(&info, "slave0").context("the master lists no replica")?;
        let port = slave
            .split(',')
            .find_map(|part| part.strip_prefix("port="))
            .context("no port")?;
        let list = ns.cli(master_port, &["CLIENT", "LIST", "TYPE", "replica"]);
        let addr = list
            .split_whitespace()
            .find_map(|part| part.strip_prefix("addr="))
            .with_context(|| format!("no replica client: {list}"))?;
        if port != replica_port.to_string() {
            bail!("replica listed with port {port}");
        }
        Ok(addr.to_owned())
    };
    let full_syncs = |ns: &Ns| info_field(&ns.cli(master_port, &["INFO", "stats"]), "sync_full");
    let addr_before = replica_addr(&ns).unwrap();
    let syncs_before = full_syncs(&ns);
    assert!(syncs_before.is_some(), "the master reports sync_full");

    ns.checkpoint(&mut replica, &image).unwrap();
    let restored = ns.restore(&image).unwrap();

    wait_until(Duration::from_secs(10), || link_up(&ns))
        .expect("the restored replica's master link is up");
    assert_eq!(ns.cli(master_port, &["SET", "after", "2"]), "OK");
    wait_until(Duration::from_secs(10), || {
        ns.cli(replica_port, &["GET", "after"]) == "2"
    })
    .expect("a key set on the master after the restore reaches the replica");
    assert_eq!(
        replica_addr(&ns).unwrap(),
        addr_before,
        "the master still talks to the replica over the same connection"
    );
    assert_eq!(
        full_syncs(&ns),
        syncs_before,
        "the restored replica did not need a full resync"
    );
    assert_eq!(ns.cli(replica_port, &["GET", "before"]), "1");
    kill_and_wait_dead(restored);
    let _ = master.kill();
    master.wait().unwrap();
}

/// Echoes every line back on each connection (one thread a connection).
const ECHO_SERVER: &str = r#"import socketserver, sys
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)
            self.wfile.flush()
socketserver.ThreadingTCPServer(('127.0.0.1', int(sys.argv[1])), Echo).serve_forever()
"#;

/// An HTTP server with one outbound connection, opened at start, to the
/// echo server: each GET sends `ping N` over it (N counts requests) and
/// answers with the echo and the connection's local port.
const PROXY_SERVICE: &str = r#"import http.server, socket, sys
port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
upstream = socket.create_connection(('127.0.0.1', upstream_port))
count = 0
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global count
        count += 1
        upstream.sendall(f'ping {count}\n'.encode())
        reply = b''
        while not reply.endswith(b'\n'):
            chunk = upstream.recv(100)
            if not chunk:
                raise SystemExit('the upstream connection closed')
            reply += chunk
        body = f'{reply.decode().strip()} via {upstream.getsockname()[1]}'.encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(('127.0.0.1', port), Handler).serve_forever()
"#;

/// `(N, local port)` of a proxy answer `ping N via PORT`.
fn proxy_answer(body: &str) -> (u32, u16) {
    let parsed = body
        .strip_prefix("ping ")
        .and_then(|rest| rest.split_once(" via "))
        .and_then(|(count, port)| Some((count.parse().ok()?, port.trim().parse().ok()?)));
    parsed.unwrap_or_else(|| panic!("not a proxy answer: {body:?}"))
}

/// An `--on-idle keep` service with an outbound connection parks with it
/// kept, twice, and every wake goes on over the same connection: the
/// request count goes on and the local port stays. (Before TCP_REPAIR, the
/// park was refused: the connection could not be checkpointed.)
#[test]
fn a_kept_service_goes_on_over_its_outbound_connection_after_each_wake() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::with_daemon().unwrap();
    let (port, echo_port) = (18431, 18432);
    let mut echo = sandbox
        .netns
        .command("python3")
        .args(["-c", ECHO_SERVER, &echo_port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    sandbox.track_pid(echo.id() as i32);
    let listening = || {
        sandbox
            .netns
            .enter(|| std::net::TcpStream::connect(("127.0.0.1", echo_port)).is_ok())
            .unwrap_or(false)
    };
    wait_until(Duration::from_secs(20), listening).unwrap();

    let command: Vec<String> = [
        "python3",
        "-c",
        PROXY_SERVICE,
        &port.to_string(),
        &echo_port.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    sandbox
        .add_ok(
            "proxy",
            port,
            &["--on-idle", "keep", "--ready", "http:/"],
            &command,
        )
        .unwrap();
    let (first, upstream_port) = proxy_answer(&sandbox.http_get(port).unwrap());

    let mut expected = first;
    for park in 1..=2 {
        let parked = sandbox.agent(&["park", "proxy"]);
        assert!(
            parked.status.success(),
            "park {park} keeps the outbound connection: {}\n{}",
            String::from_utf8_lossy(&parked.stderr),
            sandbox.daemon_log()
        );
        let service = sandbox.service("proxy").unwrap();
        assert_eq!(service["state"], "parked", "{service}");
        assert!(service["error"].is_null(), "{service}");

        expected += 1;
        let body = sandbox.http_get(port).unwrap();
        assert_eq!(
            proxy_answer(&body),
            (expected, upstream_port),
            "after wake {park}, the request count goes on over the same connection"
        );
    }
    drop(sandbox);
    let _ = echo.kill();
    echo.wait().unwrap();
}
