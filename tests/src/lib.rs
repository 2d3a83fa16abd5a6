//! Helpers shared by the integration tests: private network namespaces,
//! temporary state directories, a daemon started and killed by pid, and
//! clients that connect from inside a namespace.
//!
//! Every test builds its own [`Sandbox`]; dropping it kills exactly the
//! processes it started and deletes its namespace and directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Builds an image of the bundled hello-server listening on `port` with
/// `persist-agent build` (plus `options`, e.g. `--user nobody`), in the
/// sandbox's namespace; panics with the command's output if it fails.
pub fn build_hello_image(sandbox: &Sandbox, image: &Path, port: u16, options: &[&str]) {
    let server = binary("hello-server").display().to_string();
    let built = sandbox
        .netns
        .command(binary("persist-agent"))
        .arg("build")
        .arg("--image")
        .arg(image)
        .args(options)
        .args(["--port", &port.to_string(), "--", &server])
        .arg(format!("127.0.0.1:{port}"))
        .output()
        .expect("running persist-agent build");
    assert!(built.status.success(), "build: {built:?}");
}

/// Returns from the calling test, saying so on stderr, unless it runs as
/// root: these tests drive the real kernel (network namespaces, BPF,
/// ptrace), so a plain `cargo test` by another user skips them rather than
/// failing. `cargo xtask test` runs them as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!(
                "skipped {}: needs root (run `cargo xtask test` as root)",
                std::thread::current().name().unwrap_or("this test")
            );
            return;
        }
    };
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Directory holding the workspace's built binaries: `PERSIST_BIN_DIR` if
/// set, else the profile directory the running binary was built into
/// (`target/debug` for a test in `target/debug/deps`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PERSIST_BIN_DIR") {
        return dir.into();
    }
    let exe = std::env::current_exe().expect("own binary path");
    let dir = exe.parent().expect("a binary lives in a directory");
    if dir.ends_with("deps") {
        dir.parent().expect("deps has a parent").to_owned()
    } else {
        dir.to_owned()
    }
}

/// Path of a workspace binary, which must have been built.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (cargo xtask test does)",
        path.display()
    );
    path
}

/// A network namespace of its own, deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a namespace with loopback up.
    pub fn new() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "persist-t{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// The namespace's name for `ip netns`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Inode of the namespace, as `bpftool link` shows it (`netns_ino`).
    pub fn inode(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(std::fs::metadata(format!("/run/netns/{}", self.name))?.ino())
    }

    /// Runs `work` on a thread that has entered the namespace.
    pub fn enter<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T> {
        let ns = File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("opening namespace {}", self.name))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .context("setns into the test namespace")?;
                    Ok(work())
                })
                .join()
                .expect("namespace thread panicked")
        })
    }
}

impl NetNs {
    /// Pids of the processes that live in the namespace: only what a test
    /// started there (its daemon, services, parked skeletons).
    pub fn processes(&self) -> Vec<i32> {
        use std::os::unix::fs::MetadataExt;
        let Ok(inode) = self.inode() else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| pid != std::process::id() as i32)
            .filter(|pid| {
                std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|ns| ns.ino() == inode)
            })
            .collect()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // What outlives a killed daemon (a parked skeleton waits stopped,
        // holding its port, for the next daemon) dies with the namespace.
        for pid in self.processes() {
            kill_session(pid);
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// A namespace, a state directory and the processes a test started in them.
pub struct Sandbox {
    /// The namespace.
    pub netns: NetNs,
    /// The state directory.
    pub state: tempfile::TempDir,
    daemon: Option<Child>,
    extra_pids: Vec<i32>,
    agent: PathBuf,
}

impl Sandbox {
    /// A fresh namespace and state directory, no daemon yet.
    pub fn new() -> Result<Self> {
        Self::with_agent_binary(binary("persist-agent"))
    }

    /// Like [`Sandbox::new`], its daemon and commands run from `agent`
    /// (an installed `persist-agent`) instead of the workspace's build.
    pub fn with_agent_binary(agent: PathBuf) -> Result<Self> {
        Ok(Self {
            netns: NetNs::new()?,
            state: tempfile::Builder::new().prefix("persist-test-").tempdir()?,
            daemon: None,
            extra_pids: Vec::new(),
            agent,
        })
    }

    /// A fresh sandbox with a daemon running.
    pub fn with_daemon() -> Result<Self> {
        let mut sandbox = Self::new()?;
        sandbox.start_daemon()?;
        Ok(sandbox)
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// The daemon's services directory (`--services-dir`): `services.d` in
    /// the state directory, never the host's `/etc/persist/services.d`. Not
    /// created: a test that declares services creates it.
    pub fn services_dir(&self) -> PathBuf {
        self.state_dir().join("services.d")
    }

    /// Writes the service file `NAME.toml` into the services directory,
    /// creating the directory if needed.
    pub fn declare(&self, name: &str, toml: &str) {
        std::fs::create_dir_all(self.services_dir()).expect("creating the services directory");
        let path = self.services_dir().join(format!("{name}.toml"));
        std::fs::write(&path, toml)
            .unwrap_or_else(|err| panic!("writing {}: {err}", path.display()));
    }

    /// Starts the daemon in the namespace and waits for its control socket.
    pub fn start_daemon(&mut self) -> Result<()> {
        self.start_daemon_with(&[])
    }

    /// Starts the daemon with extra `daemon` options.
    pub fn start_daemon_with(&mut self, options: &[&str]) -> Result<()> {
        self.start_daemon_with_env(options, &[])
    }

    /// Starts the daemon with extra `daemon` options and environment
    /// variables (its debug hooks).
    pub fn start_daemon_with_env(&mut self, options: &[&str], env: &[(&str, &str)]) -> Result<()> {
        let socket = self.state_dir().join("agent.sock");
        let _ = std::fs::remove_file(&socket);
        let log = File::create(self.state_dir().join("daemon.log"))?;
        let child = self
            .netns
            .command(&self.agent)
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("daemon")
            .arg("--services-dir")
            .arg(self.services_dir())
            .args(options)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the daemon")?;
        self.daemon = Some(child);
        wait_until(Duration::from_secs(10), || socket.exists())
            .with_context(|| format!("daemon did not start; log:\n{}", self.daemon_log()))?;
        Ok(())
    }

    /// Starts the daemon as [`Sandbox::start_daemon`] does and waits up to
    /// `timeout` for it to exit, as a daemon refusing its state directory
    /// does: its exit status and log if it exited, `None` if it still runs
    /// (it is then this sandbox's daemon, killed on drop).
    pub fn start_daemon_expecting_exit(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<(std::process::ExitStatus, String)>> {
        let log = File::create(self.state_dir().join("daemon.log"))?;
        let mut child = self
            .netns
            .command(&self.agent)
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("daemon")
            .arg("--services-dir")
            .arg(self.services_dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the daemon")?;
        let mut exited = None;
        let _ = wait_until(timeout, || {
            exited = child.try_wait().ok().flatten();
            exited.is_some()
        });
        match exited {
            Some(status) => Ok(Some((status, self.daemon_log()))),
            None => {
                self.daemon = Some(child);
                Ok(None)
            }
        }
    }

    /// Stops the daemon with SIGTERM (by pid) and waits up to `timeout` for
    /// it to exit; SIGKILLs it if it does not. True when it exited on its own.
    pub fn stop_daemon_within(&mut self, timeout: Duration) -> bool {
        let Some(mut child) = self.daemon.take() else {
            return true;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let exited = wait_until(timeout, || child.try_wait().ok().flatten().is_some()).is_ok();
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
        }
        exited
    }

    /// The daemon's pid, while it runs.
    pub fn daemon_pid(&self) -> Option<i32> {
        self.daemon.as_ref().map(|child| child.id() as i32)
    }

    /// Kills the daemon with SIGKILL (by pid) and reaps it.
    pub fn kill_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The daemon's metrics page, from `--metrics 127.0.0.1:PORT`, fetched
    /// inside the namespace (the HTTP answer, headers included).
    pub fn metrics_page(&self, port: u16) -> String {
        use std::io::{Read, Write};
        self.netns
            .enter(|| {
                let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
                let mut text = String::new();
                stream.read_to_string(&mut text).unwrap();
                text
            })
            .expect("entering the test namespace")
    }

    /// Kills the port keeper of the state directory, which outlives its
    /// daemon while it holds a listening socket, by the pid it greets its
    /// connections with. Call with no daemon running: the keeper serves one
    /// connection at a time.
    pub fn kill_port_keeper(&self) {
        let socket = self.state_dir().join("run").join("keeper.sock");
        let Ok(stream) = std::os::unix::net::UnixStream::connect(&socket) else {
            return;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut greeting = [0u8; 4];
        if std::io::Read::read_exact(&mut &stream, &mut greeting).is_ok() {
            let pid = nix::unistd::Pid::from_raw(i32::from_le_bytes(greeting));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Stops the daemon with SIGTERM (by pid), as a service manager does,
    /// and reaps it.
    pub fn stop_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
    }

    /// The daemon's log so far.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.state_dir().join("daemon.log")).unwrap_or_default()
    }

    /// Runs `persist-agent --state-dir DIR ARGS...` in the namespace.
    pub fn agent(&self, args: &[&str]) -> Output {
        self.netns
            .command(&self.agent)
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running persist-agent")
    }

    /// Runs `persist-agent --state-dir DIR ARGS...` in the namespace, failing
    /// (after killing it) if it has not exited within `timeout`.
    pub fn agent_within(&self, timeout: Duration, args: &[&str]) -> Result<Output> {
        let mut command = self.netns.command(&self.agent);
        command.arg("--state-dir").arg(self.state_dir()).args(args);
        output_within(&mut command, timeout)
            .with_context(|| format!("persist-agent {}", args.join(" ")))
    }

    /// Runs `persist-agent add NAME --port PORT OPTIONS... -- COMMAND...`.
    pub fn add(&self, name: &str, port: u16, options: &[&str], command: &[String]) -> Output {
        let port = port.to_string();
        let mut args = vec!["add", name, "--port", &port];
        args.extend_from_slice(options);
        args.push("--");
        args.extend(command.iter().map(String::as_str));
        self.agent(&args)
    }

    /// Like [`Sandbox::add`], failing with its stderr unless it exits 0.
    pub fn add_ok(
        &self,
        name: &str,
        port: u16,
        options: &[&str],
        command: &[String],
    ) -> Result<String> {
        let output = self.add(name, port, options, command);
        if !output.status.success() {
            bail!(
                "adding {name}: {}\ndaemon log:\n{}",
                String::from_utf8_lossy(&output.stderr),
                self.daemon_log()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Like [`Sandbox::agent`], failing with its stderr unless it exits 0.
    pub fn agent_ok(&self, args: &[&str]) -> Result<String> {
        let output = self.agent(args);
        if !output.status.success() {
            bail!(
                "persist-agent {} failed: {}\ndaemon log:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr),
                self.daemon_log()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `status --json`, parsed.
    pub fn status(&self) -> Result<Vec<serde_json::Value>> {
        self.status_of(&[])
    }

    /// `status --json NAME...`, parsed: the services named (all of them
    /// when none is).
    pub fn status_of(&self, names: &[&str]) -> Result<Vec<serde_json::Value>> {
        let mut args = vec!["status", "--json"];
        args.extend(names);
        let text = self.agent_ok(&args)?;
        Ok(serde_json::from_str(&text)?)
    }

    /// The status object of one service (`status --json NAME`).
    pub fn service(&self, name: &str) -> Result<serde_json::Value> {
        self.status_of(&[name])?
            .into_iter()
            .find(|s| s["name"] == name)
            .with_context(|| format!("service {name} missing from status"))
    }

    /// The pid of `name` once the daemon shows it running. A SYN resumes a
    /// snapshot service before the daemon's supervisor hears of it, so the
    /// first answer may come a moment before `status` says so.
    pub fn running_pid(&self, name: &str) -> Result<i64> {
        let mut pid = None;
        wait_until(Duration::from_secs(5), || {
            pid = self
                .service(name)
                .ok()
                .filter(|s| s["state"] == "running")
                .and_then(|s| s["pid"].as_i64());
            pid.is_some()
        })
        .with_context(|| format!("{name} never showed as running"))?;
        pid.context("a running service has a pid")
    }

    /// Remembers a pid to kill when the sandbox is dropped.
    pub fn track_pid(&mut self, pid: i32) {
        self.extra_pids.push(pid);
    }

    /// Sends one HTTP GET to `127.0.0.1:port` from inside the namespace.
    pub fn http_get(&self, port: u16) -> Result<String> {
        self.netns.enter(|| http_get(port))?
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Services the daemon started: kill them by the pids it reported.
        if self.daemon.is_some()
            && let Ok(statuses) = self.status()
        {
            for pid in statuses.iter().filter_map(|s| s["pid"].as_i64()) {
                kill_session(pid as i32);
            }
        }
        self.kill_daemon();
        self.kill_port_keeper();
        for pid in self.extra_pids.drain(..) {
            kill_session(pid);
        }
    }
}

/// A directory for python's http.server holding one recognisable file,
/// `persist-was-here.txt`, which every directory listing of it shows.
pub fn web_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temporary directory");
    std::fs::write(dir.path().join("persist-was-here.txt"), b"hi").expect("writing the marker");
    dir
}

/// The command line of `python3 -m http.server` serving `root` on
/// 127.0.0.1:`port`.
pub fn http_server_command(port: u16, root: &Path) -> Vec<String> {
    let port = port.to_string();
    let root = root.display().to_string();
    [
        "python3",
        "-m",
        "http.server",
        &port,
        "--bind",
        "127.0.0.1",
        "--directory",
        &root,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A WSGI application answering every request with `body`, for
/// [`gunicorn_command`].
pub fn wsgi_answering(body: &str) -> String {
    format!(
        "def app(environ, start_response):\n\
         \x20   start_response('200 OK', [('Content-Type', 'text/plain')])\n\
         \x20   return [{body:?}.encode()]\n"
    )
}

/// The command line of gunicorn serving `app:app` on 127.0.0.1:`port`
/// from `dir`, where `app` is written first as `app.py`: an arbiter and
/// two sync workers, with `extra` options before the others.
pub fn gunicorn_command(dir: &Path, port: u16, app: &str, extra: &[&str]) -> Vec<String> {
    std::fs::write(dir.join("app.py"), app).expect("write app.py");
    let bind = format!("127.0.0.1:{port}");
    let dir = dir.to_str().expect("a UTF-8 path");
    let options = [
        "--workers",
        "2",
        "--worker-class",
        "sync",
        "--bind",
        &bind,
        "--chdir",
        dir,
        "app:app",
    ];
    std::iter::once("gunicorn")
        .chain(extra.iter().copied())
        .chain(options)
        .map(str::to_owned)
        .collect()
}

/// What a fixture that writes `DIR/ready` once it is set up wrote there:
/// waits for the file (20 s at most, or panics naming `fixture`).
pub fn ready_text(dir: &Path, fixture: &str) -> String {
    let ready = dir.join("ready");
    wait_until(Duration::from_secs(20), || ready.exists())
        .unwrap_or_else(|e| panic!("{fixture} is ready: {e}"));
    std::fs::read_to_string(&ready).expect("read ready")
}

/// What a command wrote on its standard error, as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The root pid a `persist-agent restore` printed, once it succeeded;
/// panics with `what` and the command's stderr when it failed.
pub fn restored_root(output: &Output, what: &str) -> i32 {
    assert!(output.status.success(), "{what}: {}", stderr(output));
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("restore prints the root's pid")
}

/// `root` and every process under it, each parent before its children.
pub fn tree_of(root: i32) -> Vec<i32> {
    let mut tree = vec![root];
    let mut index = 0;
    while index < tree.len() {
        tree.extend(children_of(tree[index]));
        index += 1;
    }
    tree
}

/// The innermost pid of `pid`'s `NSpid` (/proc/PID/status): the pid the
/// process sees as its own, its recorded one when it was restored in a pid
/// namespace of its own; -1 when it is gone.
pub fn own_pid(pid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))
        .and_then(|values| values.split_whitespace().last()?.parse().ok())
        .unwrap_or(-1)
}

/// The pids a service's `status --json` entry lists, the root first.
pub fn service_pids(status: &serde_json::Value) -> Vec<i32> {
    status["pids"]
        .as_array()
        .map(|pids| {
            pids.iter()
                .filter_map(|pid| pid.as_i64().map(|pid| pid as i32))
                .collect()
        })
        .unwrap_or_default()
}

/// The children of `pid`, as its main thread lists them.
pub fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

/// Has the child, then the parent, of a fixture report: each is sent
/// SIGUSR1 and writes `child-result` or `parent-result` in `dir`; their
/// contents, in that order.
pub fn results_of(dir: &Path, parent: i32, child: i32) -> (String, String) {
    (
        result_of(dir, child, "child-result"),
        result_of(dir, parent, "parent-result"),
    )
}

/// Has one process of a fixture report: it is sent SIGUSR1 and writes
/// `name` in `dir`; its contents.
pub fn result_of(dir: &Path, pid: i32, name: &str) -> String {
    let result = dir.join(name);
    let _ = std::fs::remove_file(&result);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .expect("signal a fixture process");
    wait_until(Duration::from_secs(20), || result.exists())
        .unwrap_or_else(|e| panic!("pid {pid} writes {name}: {e}"));
    std::fs::read_to_string(&result).expect("read a result")
}

/// The command line of `redis-server` on 127.0.0.1:`port`, with no
/// persistence of its own (no RDB snapshots, no append-only file).
pub fn redis_server_command(port: u16) -> Vec<String> {
    let port = port.to_string();
    [
        "redis-server",
        "--port",
        &port,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The command line of nginx in the foreground on 127.0.0.1:`port`, serving
/// `root`, with its configuration, pid file, logs and temporary files under
/// `prefix` (written here): one process with `master_process off`, else a
/// master and one worker.
pub fn nginx_command(
    prefix: &Path,
    root: &Path,
    port: u16,
    master_process: bool,
) -> std::io::Result<Vec<String>> {
    nginx_config(prefix, root, port, master_process, 1)
}

/// [`nginx_command`] of a master with `workers` worker processes, the
/// shape of Debian's configuration (one worker per core).
pub fn nginx_command_with_workers(
    prefix: &Path,
    root: &Path,
    port: u16,
    workers: u32,
) -> std::io::Result<Vec<String>> {
    nginx_config(prefix, root, port, true, workers)
}

/// [`nginx_command_with_workers`] with `listen ... reuseport;`: nginx then
/// opens one listening socket per worker, all in one `SO_REUSEPORT` group,
/// and each worker accepts on its own (closing the others' copies). Each
/// answer names the worker that served it in its `X-Worker-Pid` header.
pub fn nginx_command_reuseport(
    prefix: &Path,
    root: &Path,
    port: u16,
    workers: u32,
) -> std::io::Result<Vec<String>> {
    nginx_config_listen(
        prefix,
        root,
        port,
        true,
        workers,
        " reuseport",
        "add_header X-Worker-Pid $pid;",
    )
}

fn nginx_config(
    prefix: &Path,
    root: &Path,
    port: u16,
    master_process: bool,
    workers: u32,
) -> std::io::Result<Vec<String>> {
    nginx_config_listen(prefix, root, port, master_process, workers, "", "")
}

/// The configuration, with `listen_options` after the `listen` address
/// and `server_extra` in the server block.
fn nginx_config_listen(
    prefix: &Path,
    root: &Path,
    port: u16,
    master_process: bool,
    workers: u32,
    listen_options: &str,
    server_extra: &str,
) -> std::io::Result<Vec<String>> {
    std::fs::create_dir_all(prefix.join("tmp"))?;
    let config = prefix.join("nginx.conf");
    let master = if master_process { "on" } else { "off" };
    let p = prefix.display();
    let root = root.display();
    std::fs::write(
        &config,
        format!(
            "daemon off;
master_process {master};
worker_processes {workers};
pid {p}/nginx.pid;
error_log {p}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log {p}/access.log;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port}{listen_options};
        root {root};
        {server_extra}
    }}
}}
"
        ),
    )?;
    Ok(vec![
        "nginx".into(),
        "-p".into(),
        prefix.display().to_string(),
        "-c".into(),
        config.display().to_string(),
        "-e".into(),
        prefix.join("error.log").display().to_string(),
    ])
}

/// The command line of `memcached` on 127.0.0.1:`port` (TCP only), running
/// as Debian's `memcache` user, as memcached refuses to run as root.
pub fn memcached_command(port: u16) -> Vec<String> {
    let port = port.to_string();
    [
        "memcached",
        "-l",
        "127.0.0.1",
        "-p",
        &port,
        "-U",
        "0",
        "-u",
        "memcache",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Registers `python3 -m http.server` on `port`, serving `root`, in snapshot
/// mode with HTTP readiness; `extra` are more `add` options.
pub fn add_http_server(sandbox: &Sandbox, name: &str, port: u16, root: &Path, extra: &[&str]) {
    let mut options = vec!["--ready", "http:/"];
    options.extend_from_slice(extra);
    sandbox
        .add_ok(name, port, &options, &http_server_command(port, root))
        .expect("snapshot-mode add of python's http.server succeeds");
}

/// SIGKILLs a process and its session (services run as session leaders).
pub fn kill_session(pid: i32) {
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
}

/// One HTTP/1.0 GET of `/` on `127.0.0.1:port`, returning the body.
pub fn http_get(port: u16) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .with_context(|| format!("no HTTP response: {response:?}"))?;
    Ok(body)
}

/// Whether any memory of `pid` is still registered with a userfaultfd
/// (VmFlags `um`): its pager has not filled it yet, and a checkpoint would
/// be refused.
pub fn has_unfilled_memory(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.strip_prefix("VmFlags:"))
        .any(|flags| flags.split_whitespace().any(|flag| flag == "um"))
}

/// Polls `ready` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Runs `command` with no input and its output captured, failing (after
/// killing it by pid) if it has not exited within `timeout`. Its output must
/// fit the pipes' buffers until it exits: meant for short answers.
pub fn output_within(command: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {command:?}"))?;
    if wait_until(timeout, || child.try_wait().ok().flatten().is_some()).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        bail!("still running after {timeout:?}: it hangs");
    }
    Ok(child.wait_with_output()?)
}

/// Runs `command` with no input and its output captured; fails, with its
/// stderr, unless it exits 0.
pub fn run_ok(command: &mut Command) -> Result<Output> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// Rewrites an image's manifest JSON with `edit` and re-seals its header
/// (lengths and CRC32C), as an image written elsewhere would be: an image
/// from another kernel, or a hostile one. The binary section of its
/// mappings (format 7 on) is kept as it is.
pub fn edit_manifest(image: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = image.join("manifest");
    let text = std::fs::read(&path).expect("reading the manifest");
    let newline = text
        .iter()
        .position(|&b| b == b'\n')
        .expect("a manifest header line");
    let header = String::from_utf8(text[..newline].to_vec()).expect("a text header");
    let fields: Vec<&str> = header.split(' ').collect();
    let (version, len) = (fields[1], fields[2].parse::<usize>().expect("a length"));
    let (json, binary) = text[newline + 1..].split_at(len);
    let mut manifest: serde_json::Value = serde_json::from_slice(json).expect("manifest JSON");
    edit(&mut manifest);
    let json = serde_json::to_vec(&manifest).expect("manifest JSON");
    let crc = crc32c::crc32c_append(crc32c::crc32c(&json), binary);
    let binary_len = if fields.len() > 4 {
        format!(" {}", binary.len())
    } else {
        String::new()
    };
    let mut out = format!(
        "persist-image {version} {} {crc:08x}{binary_len}\n",
        json.len()
    )
    .into_bytes();
    out.extend_from_slice(&json);
    out.extend_from_slice(binary);
    std::fs::write(&path, out).expect("writing the manifest");
}

#[cfg(test)]
mod tests {
    /// Every integration test starts with `require_root!()`, so that a
    /// plain `cargo test` by a user skips it instead of failing.
    #[test]
    fn every_integration_test_starts_by_requiring_root() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
        let mut missing = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            for (index, line) in lines.iter().enumerate() {
                if line.trim() != "#[test]" {
                    continue;
                }
                let Some(body) = lines[index + 1..]
                    .iter()
                    .position(|l| l.trim_start().starts_with("fn "))
                    .map(|at| index + 1 + at + 1)
                else {
                    continue;
                };
                if !lines
                    .get(body)
                    .is_some_and(|l| l.contains("require_root!()"))
                {
                    missing.push(format!("{}:{}", path.display(), body));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "tests without `persist_tests::require_root!();` first: {missing:?}"
        );
    }
}
