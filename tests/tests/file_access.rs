//! Restore opens the files an image recorded as the restored process would:
//! with its credentials, never through a symbolic link, and only if the path
//! still names the file recorded at checkpoint (issue 11, item 1).

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use persist_tests::{Sandbox, run_ok, wait_until};

const NOBODY: u32 = 65534;
/// The system's python, which nobody may run (a user's pyenv shim is not).
const PYTHON: &str = "/usr/bin/python3";
const SECRET: &str = "TOPSECRET root-only contents\n";

/// A server that holds its log open from the start, appends a line to it
/// for each request and answers with the whole log.
const LOG_SERVER: &str = r#"import os, socket, sys
log = os.open(sys.argv[1], os.O_RDWR | os.O_APPEND)
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', int(sys.argv[2])))
s.listen(64)
while True:
    c, _ = s.accept()
    c.recv(4096)
    os.write(log, b'served\n')
    os.lseek(log, 0, os.SEEK_SET)
    body = os.read(log, 65536)
    c.sendall(b'HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n' % len(body) + body)
    c.close()
"#;

/// A process that holds `argv[1]` open read-only at fd 7 and waits.
const HOLDER: &str = r#"import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
os.dup2(fd, 7)
os.close(fd)
open(sys.argv[2], 'w').close()
while True:
    time.sleep(1)
"#;

/// A directory tree for one test: `root` (0755, root's), `root/data`
/// (nobody's) and `root/secret` (root's, 0600).
struct Tree {
    _temp: tempfile::TempDir,
    root: PathBuf,
}

impl Tree {
    fn new() -> Self {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().to_owned();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let data = root.join("data");
        fs::create_dir(&data).unwrap();
        chown_nobody(&data);
        fs::write(root.join("secret"), SECRET).unwrap();
        fs::set_permissions(root.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
        Self { _temp: temp, root }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn secret(&self) -> String {
        fs::read_to_string(self.path("secret")).unwrap()
    }

    /// Writes the script `name` and returns its path.
    fn script(&self, name: &str, text: &str) -> String {
        let path = self.path(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        path.display().to_string()
    }
}

fn chown_nobody(path: &Path) {
    std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).unwrap();
}

/// Runs `program ARGS` as nobody, as the service's user would.
fn as_nobody(program: &str, args: &[&str]) {
    run_ok(Command::new(program).args(args).uid(NOBODY).gid(NOBODY))
        .unwrap_or_else(|err| panic!("{program} {args:?} as nobody: {err}"));
}

/// A service running as nobody, parked, whose log nobody replaces with a
/// symlink to a root-only file: no later wake may read or write that file,
/// and status says why.
#[test]
fn a_symlink_planted_while_parked_does_not_reach_root_files() {
    persist_tests::require_root!();
    let tree = Tree::new();
    let log = tree.path("data/app.log");
    fs::write(&log, "started\n").unwrap();
    chown_nobody(&log);
    let script = tree.script("app.py", LOG_SERVER);
    let sandbox = Sandbox::with_daemon().unwrap();
    let port = 8231u16;
    let command = [
        PYTHON.to_owned(),
        script,
        log.display().to_string(),
        port.to_string(),
    ];
    sandbox
        .add_ok("leak", port, &["--user", "nobody"], &command)
        .unwrap();
    let first = sandbox
        .http_get(port)
        .unwrap_or_else(|err| panic!("first wake: {err}\n{}", sandbox.daemon_log()));
    assert!(first.contains("served"), "the service answers: {first:?}");
    sandbox.agent_ok(&["park", "leak"]).unwrap();

    // As nobody, who owns the directory: the log becomes a symlink to the secret.
    let secret = tree.path("secret").display().to_string();
    let log_arg = log.display().to_string();
    as_nobody("rm", &[&log_arg]);
    as_nobody("ln", &["-s", &secret, &log_arg]);

    // The skeleton ready at the park may hold the old file; the one the
    // next park prepares must open the path anew.
    let mut answers = Vec::new();
    for _ in 0..2 {
        answers.push(
            sandbox
                .netns
                .enter(|| get_within(port, Duration::from_secs(3)))
                .unwrap(),
        );
        let _ = sandbox.agent(&["park", "leak"]);
    }
    for answer in answers.iter().flatten() {
        assert!(
            !answer.contains("TOPSECRET"),
            "a wake served root's secret to the client: {answer:?}"
        );
    }
    assert_eq!(tree.secret(), SECRET, "a wake wrote to root's 0600 file");
    let mut error = String::new();
    wait_until(Duration::from_secs(10), || {
        error = sandbox
            .service("leak")
            .ok()
            .and_then(|s| s["error"].as_str().map(str::to_owned))
            .unwrap_or_default();
        error.contains("symbolic link")
    })
    .unwrap_or_else(|_| {
        panic!(
            "status gives no error naming the symlink: {error:?}\ndaemon log:\n{}",
            sandbox.daemon_log()
        )
    });
    assert!(
        error.contains(&log_arg),
        "the error names the path: {error}"
    );
    assert_eq!(tree.secret(), SECRET, "a wake wrote to root's 0600 file");
}

/// One request to the log server; what it answered, if it did within `timeout`.
fn get_within(port: u16, timeout: Duration) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    Some(answer)
}

/// Starts HOLDER on `file` in the sandbox's namespace (as nobody when
/// asked) and waits until it holds the file.
fn start_holder(sandbox: &Sandbox, tree: &Tree, file: &Path, nobody: bool) -> Child {
    let script = tree.script("holder.py", HOLDER);
    let ready = tree.path("data/ready");
    let _ = fs::remove_file(&ready);
    // `ip netns exec` must run as root: setpriv drops to nobody inside.
    let mut command = if nobody {
        let mut command = sandbox.netns.command("setpriv");
        command.args(["--reuid=65534", "--regid=65534", "--clear-groups", PYTHON]);
        command
    } else {
        sandbox.netns.command(PYTHON)
    };
    command
        .arg(script)
        .arg(file)
        .arg(&ready)
        .current_dir(&tree.root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = command.spawn().unwrap();
    wait_until(Duration::from_secs(10), || ready.exists()).expect("the holder never got ready");
    child
}

/// Checkpoints `child` (killed by the checkpoint) into `image`.
fn checkpoint(sandbox: &Sandbox, mut child: Child, image: &Path) -> i32 {
    let pid = child.id() as i32;
    sandbox
        .agent_ok(&[
            "checkpoint",
            "--pid",
            &pid.to_string(),
            "--image",
            image.to_str().unwrap(),
        ])
        .unwrap();
    let _ = child.wait();
    pid
}

/// Restores `image` with `extra` options; the pid on success, else stderr.
fn restore(sandbox: &mut Sandbox, image: &Path, extra: &[&str]) -> Result<i32, String> {
    let mut args = vec!["restore", "--image", image.to_str().unwrap()];
    args.extend_from_slice(extra);
    let output = sandbox.agent(&args);
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let pid: i32 = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .and_then(|line| line.trim().parse().ok())
        .expect("restore prints the pid");
    sandbox.track_pid(pid);
    Ok(pid)
}

#[test]
fn a_file_replaced_by_another_is_refused_unless_accepted() {
    persist_tests::require_root!();
    let tree = Tree::new();
    let file = tree.path("data/held.txt");
    fs::write(&file, "original\n").unwrap();
    let mut sandbox = Sandbox::new().unwrap();
    let holder = start_holder(&sandbox, &tree, &file, false);
    let image = sandbox.state_dir().join("image");
    let pid = checkpoint(&sandbox, holder, &image);

    // Another file (another inode) under the same name.
    let replacement = tree.path("data/held.txt.new");
    fs::write(&replacement, "replacement\n").unwrap();
    fs::rename(&replacement, &file).unwrap();
    let err = restore(&mut sandbox, &image, &[]).expect_err("a replaced file must be refused");
    let path = file.display().to_string();
    assert!(
        err.contains("fd 7") && err.contains(&path) && err.contains("inode"),
        "the error names the fd, the path and the inode: {err}"
    );

    wait_until(Duration::from_secs(5), || {
        !Path::new(&format!("/proc/{pid}")).exists()
    })
    .unwrap();
    let restored = restore(&mut sandbox, &image, &["--accept-changed-files"])
        .unwrap_or_else(|err| panic!("--accept-changed-files restores: {err}"));
    let held = fs::read_to_string(format!("/proc/{restored}/fd/7")).unwrap();
    assert_eq!(held, "replacement\n", "fd 7 is the file now at the path");
}

#[test]
fn restore_gives_nobody_no_file_it_could_not_open_itself() {
    persist_tests::require_root!();
    let tree = Tree::new();
    let file = tree.path("data/readable.txt");
    fs::write(&file, "readable by all\n").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    let mut sandbox = Sandbox::new().unwrap();
    let holder = start_holder(&sandbox, &tree, &file, true);
    let image = sandbox.state_dir().join("image");
    checkpoint(&sandbox, holder, &image);

    // The same file (same inode), made root's and 0600 while parked.
    std::os::unix::fs::chown(&file, Some(0), Some(0)).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    for options in [&[][..], &["--accept-changed-files"][..]] {
        let err = restore(&mut sandbox, &image, options)
            .err()
            .unwrap_or_else(|| panic!("nobody got root's 0600 file through restore {options:?}"));
        assert!(
            err.contains("fd 7")
                && err.contains(&file.display().to_string())
                && err.contains("Permission denied"),
            "the error names the fd, the path and the permission: {err}"
        );
    }
}

/// A symlink under the path of a file held by a root service is refused
/// too: recorded paths are resolved, never followed through a link.
#[test]
fn a_symlink_in_a_recorded_path_is_refused_even_for_root() {
    persist_tests::require_root!();
    let tree = Tree::new();
    let real = tree.path("data/real");
    fs::create_dir(&real).unwrap();
    let file = real.join("held.txt");
    fs::write(&file, "held\n").unwrap();
    let mut sandbox = Sandbox::new().unwrap();
    let holder = start_holder(&sandbox, &tree, &file, false);
    let image = sandbox.state_dir().join("image");
    checkpoint(&sandbox, holder, &image);

    // The directory moves and a symlink takes its place: same file, reached
    // through a link the original never followed.
    fs::rename(&real, tree.path("data/moved")).unwrap();
    symlink(tree.path("data/moved"), &real).unwrap();
    let err = restore(&mut sandbox, &image, &["--accept-changed-files"])
        .expect_err("a path through a symlink must be refused");
    assert!(
        err.contains("fd 7") && err.contains("symbolic link"),
        "the error names the fd and the symlink: {err}"
    );
}
