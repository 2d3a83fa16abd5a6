//! inotify instances and epoll watches on closed descriptors: saved from a
//! live process, restored, and checked from inside the restored process by
//! `fixture-notify`; and the states that are refused, by name.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use persist_agent::files::{FilesError, InheritedFds, PathAccess, prepare, save_fds};
use persist_agent::sys::pidfd::PidFd;
use persist_common::image::{EpollWatch, FdInfo, FdKind, FileType, InotifyWatch};

const FIXTURE: &str = env!("CARGO_BIN_EXE_fixture-notify");

/// A process a test started, killed and reaped on drop.
struct Started {
    child: Child,
}

impl Started {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_for(path: &Path, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = fs::read_to_string(path) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} ({})",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts `program args`, which writes `dir/ready` once set up.
fn start(dir: &Path, program: &str, args: &[&str]) -> Started {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|err| panic!("start {program}: {err}"));
    let started = Started { child };
    wait_for(&dir.join("ready"), program);
    // It closes the marker right after creating it; let it.
    std::thread::sleep(Duration::from_millis(50));
    started
}

fn start_fixture(dir: &Path) -> Started {
    start(dir, FIXTURE, &[dir.to_str().unwrap()])
}

/// Starts `python3 -c script DIR`.
fn start_python(dir: &Path, script: &str) -> Started {
    start(dir, "python3", &["-c", script, dir.to_str().unwrap()])
}

fn save(pid: i32) -> Result<Vec<FdInfo>, FilesError> {
    let pidfd = PidFd::open(pid).expect("pidfd_open");
    save_fds(pid, &pidfd)
}

fn by_fd(fds: &[FdInfo], fd: i32) -> &FdInfo {
    fds.iter()
        .find(|f| f.fd == fd)
        .unwrap_or_else(|| panic!("fd {fd} not saved: {fds:#?}"))
}

/// Runs `persist-agent ARGS` and returns its stdout, failing with its stderr.
fn agent(args: &[&str]) -> String {
    let output = Command::new(persist_tests::binary("persist-agent"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run persist-agent");
    assert!(
        output.status.success(),
        "persist-agent {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Restores the image, sends the process SIGUSR1 and returns what it then
/// wrote to `DIR/result`; the process is killed either way.
fn restore_and_ask(image: &str, dir: &Path) -> String {
    let _ = fs::remove_file(dir.join("result"));
    let stdout = agent(&["restore", "--image", image]);
    let pid: i32 = stdout
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("restore prints the pid");
    let restored = nix::unistd::Pid::from_raw(pid);
    let process = PidFd::open(pid).expect("pidfd of the restored process");
    nix::sys::signal::kill(restored, nix::sys::signal::Signal::SIGUSR1).unwrap();
    let outcome = std::panic::catch_unwind(|| wait_for(&dir.join("result"), "the result"));
    let _ = nix::sys::signal::kill(restored, nix::sys::signal::Signal::SIGKILL);
    assert!(
        process.wait_exit(Duration::from_secs(10)),
        "restored pid {pid} did not die of SIGKILL"
    );
    outcome.expect("a result").trim().to_owned()
}

/// A fresh directory for one fixture, and an image path beside it.
fn workspace() -> (tempfile::TempDir, std::path::PathBuf, String) {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("state");
    fs::create_dir(&dir).unwrap();
    let image = temp.path().join("image").to_str().unwrap().to_owned();
    (temp, dir, image)
}

/// The fixture's checks pass in each of two processes restored from one
/// image: its inotify instance has watches 1 and 3 (not the removed 2), no
/// event queued, and reports files created after the restore; its epoll
/// instance still watches the pipe it added as fd 21, which is now an
/// eventfd watched too, and reports both ready.
#[test]
fn inotify_and_stale_epoll_watches_come_back_twice_from_one_image() {
    persist_tests::require_root!();
    let (_temp, dir, image) = workspace();
    let mut fixture = start_fixture(&dir);
    agent(&[
        "checkpoint",
        "--pid",
        &fixture.pid().to_string(),
        "--image",
        &image,
    ]);
    fixture.kill();
    for round in 1..=2 {
        assert_eq!(restore_and_ask(&image, &dir), "OK", "restore {round}");
    }
}

/// The same, for a fixture running as nobody: its watches are added with
/// nobody's credentials and its instance is made as nobody's.
#[test]
fn a_fixture_running_as_nobody_gets_its_watches_back() {
    persist_tests::require_root!();
    use std::os::unix::fs::PermissionsExt;
    let (temp, dir, image) = workspace();
    fs::set_permissions(temp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    let mut fixture = start(
        &dir,
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            FIXTURE,
            dir.to_str().unwrap(),
        ],
    );
    let status = fs::read_to_string(format!("/proc/{}/status", fixture.pid())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains("65534")),
        "the fixture runs as nobody: {status}"
    );
    agent(&[
        "checkpoint",
        "--pid",
        &fixture.pid().to_string(),
        "--image",
        &image,
    ]);
    fixture.kill();
    assert_eq!(restore_and_ask(&image, &dir), "OK");
}

#[test]
fn inotify_watches_are_saved_by_path_and_epoll_watches_by_holder() {
    persist_tests::require_root!();
    let (_temp, dir, _) = workspace();
    let fixture = start_fixture(&dir);
    let fds = save(fixture.pid()).expect("save_fds");
    let identity = |name: &str| {
        persist_agent::files::identity_of(std::os::fd::AsFd::as_fd(
            &fs::File::open(dir.join(name)).unwrap(),
        ))
        .unwrap()
    };
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    assert_eq!(
        by_fd(&fds, 10).kind,
        FdKind::Inotify {
            watches: vec![
                InotifyWatch {
                    wd: 1,
                    mask: libc::IN_CREATE | libc::IN_MOVED_TO,
                    path: path("watched"),
                    identity: identity("watched"),
                },
                InotifyWatch {
                    wd: 3,
                    mask: libc::IN_CREATE | libc::IN_ONESHOT,
                    path: path("second"),
                    identity: identity("second"),
                },
            ]
        }
    );
    assert_eq!(identity("watched").file_type, FileType::Directory);
    let inotify = by_fd(&fds, 10);
    assert!(
        inotify.cloexec && inotify.flags as i32 & libc::O_NONBLOCK != 0,
        "inotify flags: {inotify:?}"
    );
    let FdKind::Epoll { watches } = &by_fd(&fds, 20).kind else {
        panic!("fd 20: {:?}", by_fd(&fds, 20));
    };
    let mut watches = watches.clone();
    watches.sort_by_key(|w| w.data);
    let watch = |data, file_fd| EpollWatch {
        fd: 21,
        // The kernel always adds EPOLLERR and EPOLLHUP.
        events: (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP) as u32,
        data,
        file_fd,
    };
    assert_eq!(
        watches,
        vec![watch(0x2100, Some(22)), watch(0x2101, None)],
        "the pipe's watch is held through fd 22, the eventfd's through 21 itself"
    );
}

/// The path of a watch is gone by the restore: refused, naming it.
#[test]
fn an_inotify_watch_whose_path_is_gone_is_refused_at_restore() {
    persist_tests::require_root!();
    let (_temp, dir, _) = workspace();
    let mut fixture = start_fixture(&dir);
    let fds = save(fixture.pid()).expect("save_fds");
    fixture.kill();
    let watched = dir.join("watched");
    fs::remove_dir(&watched).unwrap();
    let err = prepare(&fds, InheritedFds::default(), &PathAccess::default())
        .expect_err("a watch on a removed directory must be refused");
    assert_eq!(
        err.to_string(),
        format!(
            "fd 10: inotify watch 1: reopening {}: No such file or directory (os error 2)",
            watched.display()
        )
    );
}

/// The path now names another directory: refused like any changed file.
#[test]
fn an_inotify_watch_whose_path_names_another_directory_is_refused() {
    persist_tests::require_root!();
    let (_temp, dir, _) = workspace();
    let mut fixture = start_fixture(&dir);
    let fds = save(fixture.pid()).expect("save_fds");
    fixture.kill();
    // Moved aside, not removed: ext4 would give the new one the freed inode.
    let second = dir.join("second");
    fs::rename(&second, dir.join("second.old")).unwrap();
    fs::create_dir(&second).unwrap();
    let message = prepare(&fds, InheritedFds::default(), &PathAccess::default())
        .expect_err("a watch on a replaced directory must be refused")
        .to_string();
    let expected = format!(
        "fd 10: {}: inotify watch 3: not the file the image recorded: its inode was ",
        second.display()
    );
    assert!(message.starts_with(&expected), "{message}");
}

/// Saves a python3 process whose fd 44 is set up by `setup` (Python
/// statements leaving a descriptor in `fd`) and returns the error.
fn refusal(setup: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "import ctypes, os, sys, time\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         {setup}\n\
         os.dup2(fd, 44); os.close(fd)\n\
         open(sys.argv[1] + '/ready', 'w').close()\n\
         time.sleep(60)\n"
    );
    let python = start_python(dir.path(), &script);
    save(python.pid()).expect_err("must be refused").to_string()
}

#[test]
fn an_inotify_watch_on_a_deleted_file_is_refused_at_checkpoint() {
    persist_tests::require_root!();
    let message = refusal(
        "fd = libc.inotify_init1(0)\n\
         path = sys.argv[1] + '/doomed'\n\
         held = open(path, 'w')\n\
         assert libc.inotify_add_watch(fd, path.encode(), 2) == 1\n\
         os.unlink(path)",
    );
    assert!(
        message.starts_with("fd 44: inotify watch 1 (inode ")
            && message
                .ends_with("/doomed was deleted, and a watch on a deleted file cannot be restored"),
        "{message}"
    );
}

#[test]
fn an_inotify_watch_on_a_file_system_without_handles_is_refused() {
    persist_tests::require_root!();
    let message = refusal(
        "fd = libc.inotify_init1(0)\n\
         assert libc.inotify_add_watch(fd, b'/proc/self', 2) == 1",
    );
    assert!(
        message.starts_with("fd 44: inotify watch 1 (inode ")
            && message.contains("opening it by its file handle on /proc: "),
        "{message}"
    );
}

#[test]
fn fanotify_stays_refused() {
    persist_tests::require_root!();
    assert_eq!(
        refusal("fd = libc.fanotify_init(0, 0)"),
        "fd 44: fanotify is not supported"
    );
}

/// The watched pipe end is closed in the process and open only in another
/// process: nothing in the process holds the file to re-add the watch to.
#[test]
fn an_epoll_watch_on_a_file_open_nowhere_in_the_process_is_refused() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let script = "import os, select, subprocess, sys, time\n\
        r, w = os.pipe()\n\
        os.dup2(r, 60); os.close(r)\n\
        ep = select.epoll(); os.dup2(ep.fileno(), 61); ep.close()\n\
        ep = select.epoll.fromfd(61); ep.register(60, select.EPOLLIN)\n\
        p = subprocess.Popen(['sleep', '60'], pass_fds=[60])\n\
        open(sys.argv[1] + '/helper', 'w').write(str(p.pid))\n\
        os.close(60)\n\
        open(sys.argv[1] + '/ready', 'w').close()\n\
        time.sleep(60)\n";
    let python = start_python(dir.path(), script);
    let helper: i32 = fs::read_to_string(dir.path().join("helper"))
        .unwrap()
        .parse()
        .unwrap();
    let result = save(python.pid());
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helper),
        nix::sys::signal::Signal::SIGKILL,
    );
    let message = result
        .expect_err("a watch on a file held only elsewhere must be refused")
        .to_string();
    assert!(
        message.starts_with(
            "fd 61: epoll watches fd 60, which was closed after being added, and its file (inode "
        ) && message.ends_with(") is open nowhere else in the process"),
        "{message}"
    );
}

/// Watches an image could hold but a checkpoint never writes: refused
/// before anything is watched.
#[test]
fn inconsistent_inotify_watches_in_an_image_are_refused() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let identity = persist_agent::files::identity_of(std::os::fd::AsFd::as_fd(
        &fs::File::open(dir.path()).unwrap(),
    ))
    .unwrap();
    let path = dir.path().to_str().unwrap().to_owned();
    let watch = |wd, mask, path: &str| InotifyWatch {
        wd,
        mask,
        path: path.to_owned(),
        identity,
    };
    let other = dir.path().join("other");
    fs::create_dir(&other).unwrap();
    let other = other.to_str().unwrap();
    for (watches, expected) in [
        (
            vec![
                watch(2, libc::IN_CREATE, &path),
                watch(1, libc::IN_CREATE, other),
            ],
            "fd 7: invalid image: inotify watch 1 is not above the one before (2)".to_owned(),
        ),
        (
            vec![watch(1, libc::IN_CREATE, "relative/dir")],
            "fd 7: invalid image: inotify watch 1: relative/dir is not an absolute path".to_owned(),
        ),
        (
            vec![watch(1, libc::IN_MASK_ADD | libc::IN_CREATE, &path)],
            format!(
                "fd 7: invalid image: inotify watch 1: mask {:#x} is not a watch's",
                libc::IN_MASK_ADD | libc::IN_CREATE
            ),
        ),
    ] {
        let fds = [FdInfo {
            fd: 7,
            cloexec: true,
            flags: 0,
            shared_with: None,
            kind: FdKind::Inotify { watches },
        }];
        let err =
            prepare(&fds, InheritedFds::default(), &PathAccess::default()).expect_err(&expected);
        assert_eq!(err.to_string(), expected);
    }
}

/// An HTTP server holding an inotify watch (IN_CREATE) on a directory; each
/// response lists every event it has read so far, as `wd:name`, or `-`.
const WATCHING_SERVER: &str = r#"import ctypes, http.server, os, struct, sys
libc = ctypes.CDLL(None)
fd = libc.inotify_init1(os.O_NONBLOCK)
assert libc.inotify_add_watch(fd, sys.argv[2].encode(), 0x100) == 1
seen = []
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            data = b''
        at = 0
        while at < len(data):
            wd, mask, cookie, size = struct.unpack_from('iIII', data, at)
            name = data[at + 16:at + 16 + size].rstrip(b'\0').decode()
            seen.append(f'{wd}:{name}')
            at += 16 + size
        self.send_response(200)
        self.end_headers()
        self.wfile.write((' '.join(seen) or '-').encode())
    def log_message(self, *args):
        pass
http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), Handler).serve_forever()
"#;

/// A service parked by the daemon and woken twice from its image sees, each
/// time, the files created in its watched directory after the wake.
#[test]
fn a_parked_service_keeps_its_inotify_watch_across_wakes() {
    persist_tests::require_root!();
    let sandbox = persist_tests::Sandbox::with_daemon().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let script = scratch.path().join("server.py");
    fs::write(&script, WATCHING_SERVER).unwrap();
    let watched = scratch.path().join("watched");
    fs::create_dir(&watched).unwrap();
    let command: Vec<String> = [
        "python3",
        script.to_str().unwrap(),
        "8131",
        watched.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    sandbox.add_ok("watcher", 8131, &[], &command).unwrap();
    for wake in 1..=2 {
        // The wake itself; events queued while parked are not the point.
        sandbox.http_get(8131).unwrap();
        let name = format!("made-after-wake-{wake}");
        fs::write(watched.join(&name), "").unwrap();
        let body = sandbox.http_get(8131).unwrap();
        assert!(
            body.split_whitespace()
                .any(|event| event == format!("1:{name}")),
            "wake {wake}: the server did not see {name} created: {body:?}\n{}",
            sandbox.daemon_log()
        );
        sandbox.agent_ok(&["park", "watcher"]).unwrap();
    }
    assert_eq!(sandbox.service("watcher").unwrap()["wakes"], 2);
}
