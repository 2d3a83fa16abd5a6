//! Process trees: `checkpoint --tree` of a parent with its children.
//!
//! The fixture (tests/src/bin/fixture-tree.rs) is a parent sharing a log
//! file, a pipe, a UNIX socket pair and shared anonymous memory with two
//! children; nginx runs as a master with two workers sharing its listener.
//! Each test starts its own processes in its own temporary directory (nginx
//! in its own network namespace) and kills them by pid when it ends.
//! Restored trees are checked by their own processes, and killed by pid.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use std::collections::HashSet;

use persist_common::image::{ChildProcess, FdKind, Image, Manifest, Mapping, MappingKind};
use persist_tests::{
    NetNs, binary, gunicorn_command, nginx_command_with_workers, require_root, wait_until,
};
use persist_tests::{children_of, restored_root, stderr, tree_of, wsgi_answering};

/// The fixture's three processes; every one is killed on drop.
struct TreeFixture {
    parent: Child,
    dir: tempfile::TempDir,
    reader: i32,
    idler: i32,
}

impl TreeFixture {
    fn start() -> Self {
        Self::start_with(&[])
    }

    fn start_with(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let parent = Command::new(binary("fixture-tree"))
            .arg(dir.path())
            .args(args)
            .spawn()
            .expect("spawn fixture-tree");
        let pids: Vec<i32> = persist_tests::ready_text(dir.path(), "fixture-tree")
            .split_whitespace()
            .map(|pid| pid.parse().expect("a pid"))
            .collect();
        let [_, reader, idler] = pids[..] else {
            panic!("ready holds {pids:?}, not three pids");
        };
        Self {
            parent,
            dir,
            reader,
            idler,
        }
    }

    fn pid(&self) -> i32 {
        self.parent.id() as i32
    }

    fn pids(&self) -> [i32; 3] {
        [self.pid(), self.reader, self.idler]
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("image")
    }

    /// Has the reader check the unread data and the shared memory.
    fn reader_check(&self) -> String {
        let result = self.dir.path().join("result");
        let _ = fs::remove_file(&result);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.reader),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .expect("signal the reader");
        wait_until(Duration::from_secs(20), || result.exists())
            .expect("the reader writes its result");
        fs::read_to_string(&result).expect("read result")
    }
}

impl Drop for TreeFixture {
    fn drop(&mut self) {
        for pid in [self.reader, self.idler] {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.parent.kill();
        let _ = self.parent.wait();
    }
}

fn agent(args: &[&str]) -> Output {
    Command::new(binary("persist-agent"))
        .args(args)
        .output()
        .expect("run persist-agent")
}

fn checkpoint(pid: i32, image: &Path, extra: &[&str]) -> Output {
    let pid = pid.to_string();
    let image = image.to_str().expect("a UTF-8 path");
    let mut args = vec!["checkpoint", "--pid", &pid, "--image", image];
    args.extend_from_slice(extra);
    agent(&args)
}

/// Whether `pid` runs (exists, and is neither stopped nor a zombie).
fn runs(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat[stat.rfind(')').expect("comm ends") + 1..]
        .trim_start()
        .chars()
        .next();
    matches!(state, Some('R' | 'S' | 'D'))
}

/// The fraction of the pages `child` stored that refer to a copy its
/// parent (the root) stored, rather than to one of its own.
fn fraction_stored_by_parent(manifest: &Manifest, child: &ChildProcess) -> f64 {
    let pages = |mappings: &[Mapping]| -> Vec<u64> {
        mappings
            .iter()
            .flat_map(|m| &m.pages)
            .flat_map(|run| (0..run.count).map(move |i| run.store_offset + i * 4096))
            .collect()
    };
    let parent: HashSet<u64> = pages(&manifest.mappings).into_iter().collect();
    let own = pages(&child.mappings);
    let shared = own.iter().filter(|offset| parent.contains(offset)).count();
    shared as f64 / own.len().max(1) as f64
}

fn manifest(image: &Path) -> Manifest {
    Image::open(image)
        .unwrap_or_else(|e| panic!("open {}: {e}", image.display()))
        .manifest()
        .clone()
}

#[test]
fn a_parent_is_refused_without_tree_and_runs_on() {
    require_root!();
    let fixture = TreeFixture::start();
    let output = checkpoint(fixture.pid(), &fixture.image(), &["--leave-running"]);
    assert!(!output.status.success(), "checkpoint of a parent succeeded");
    let message = stderr(&output);
    assert!(
        message.contains(&format!("pid {} has child processes", fixture.pid()))
            && message.contains(&fixture.reader.to_string()),
        "the refusal names neither the parent nor its children: {message}"
    );
    assert!(
        !fixture.image().exists(),
        "a refused checkpoint left an image"
    );
    for pid in fixture.pids() {
        assert!(runs(pid), "pid {pid} does not run after the refusal");
    }
    assert_eq!(
        fixture.reader_check(),
        "OK",
        "the refusal disturbed the tree"
    );
}

#[test]
fn a_tree_is_saved_with_what_its_processes_share() {
    require_root!();
    let fixture = TreeFixture::start();
    let output = checkpoint(
        fixture.pid(),
        &fixture.image(),
        &["--tree", "--leave-running"],
    );
    assert!(
        output.status.success(),
        "checkpoint --tree: {}",
        stderr(&output)
    );
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(
        summary.contains(&format!("pid {} and 2 descendants", fixture.pid())),
        "the summary does not count the tree: {summary}"
    );
    let manifest = manifest(&fixture.image());
    let parent = fixture.pid();

    // The processes, parents before children, with their own groups.
    assert_eq!(manifest.process.pid, parent);
    let children: Vec<(i32, i32)> = manifest
        .children
        .iter()
        .map(|child| (child.process.pid, child.ppid))
        .collect();
    assert_eq!(
        children,
        [(fixture.reader, parent), (fixture.idler, parent)],
        "the children and their parents"
    );
    let reader = &manifest.children[0];
    let idler = &manifest.children[1];
    assert_eq!(
        reader.process.pgid, manifest.process.pgid,
        "the reader's group"
    );
    assert_eq!(
        idler.process.pgid, fixture.idler,
        "the idler leads its own group"
    );
    assert!(!reader.threads.is_empty() && !idler.threads.is_empty());

    // The log: one description, saved with the parent, inherited by both.
    let log_fd = manifest
        .fds
        .iter()
        .find(|fd| matches!(&fd.kind, FdKind::File { path, .. } if path.ends_with("/log")))
        .expect("the parent's log is saved")
        .fd;
    for child in [reader, idler] {
        let inherited = child
            .inherited_fds
            .iter()
            .find(|fd| fd.fd == log_fd)
            .unwrap_or_else(|| panic!("pid {} does not inherit the log", child.process.pid));
        assert_eq!((inherited.from_pid, inherited.from_fd), (parent, log_fd));
        assert!(
            !child.fds.iter().any(|fd| fd.fd == log_fd),
            "pid {} saved the log again",
            child.process.pid
        );
    }

    // The pipe: the read end and its unread data with the reader, the
    // write end with the parent, one inode.
    let (pipe_inode, data) = reader
        .fds
        .iter()
        .find_map(|fd| match &fd.kind {
            FdKind::Pipe {
                inode,
                write_end: false,
                data,
                ..
            } => Some((*inode, data.clone())),
            _ => None,
        })
        .expect("the reader saved its read end");
    assert_eq!(data, b"through the pipe", "the pipe's unread data");
    assert!(
        manifest.fds.iter().any(|fd| matches!(
            fd.kind,
            FdKind::Pipe { inode, write_end: true, .. } if inode == pipe_inode
        )),
        "the parent did not save the write end of the reader's pipe"
    );

    // The socket pair: each end with its holder, naming the other.
    let pair = |fds: &[persist_common::image::FdInfo]| {
        fds.iter()
            .find_map(|fd| match &fd.kind {
                FdKind::UnixPair {
                    inode,
                    peer_inode,
                    queued,
                    ..
                } => Some((*inode, *peer_inode, queued.clone())),
                _ => None,
            })
            .expect("a socket pair end")
    };
    let (parent_end, parent_peer, _) = pair(&manifest.fds);
    let (reader_end, reader_peer, queued) = pair(&reader.fds);
    assert_eq!((parent_peer, reader_peer), (reader_end, parent_end));
    let queued: Vec<u8> = queued.into_iter().flat_map(|m| m.data).collect();
    assert_eq!(queued, b"through the socket", "the reader's unread data");

    // The shared memory: stored once, with the parent.
    let shared = |mappings: &[persist_common::image::Mapping]| {
        mappings
            .iter()
            .find(|m| matches!(m.kind, MappingKind::SharedAnonymous { .. }) && m.len() == 4 * 4096)
            .cloned()
            .expect("the shared memory is mapped")
    };
    let stored = shared(&manifest.mappings);
    assert_eq!(
        stored.stored_pages(),
        4,
        "the parent's copy holds every page"
    );
    for child in [reader, idler] {
        let mapping = shared(&child.mappings);
        assert_eq!(mapping.kind, stored.kind, "one shared object");
        assert_eq!(
            mapping.stored_pages(),
            0,
            "pid {} stored the shared pages again",
            child.process.pid
        );
    }

    // Private memory the idler shares with the parent since the fork is
    // stored once.
    let shared = fraction_stored_by_parent(&manifest, idler);
    assert!(
        shared > 0.5,
        "only {:.0} % of the idler's pages refer to the parent's copies",
        shared * 100.0
    );

    // Left running, with nothing consumed.
    for pid in fixture.pids() {
        assert!(runs(pid), "pid {pid} does not run after the checkpoint");
    }
    assert_eq!(
        fixture.reader_check(),
        "OK",
        "the checkpoint disturbed the tree"
    );

    let inspect = agent(&["inspect", fixture.image().to_str().unwrap()]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains(&format!(
            "tree      pid {parent} and 2 descendants: {} (parent {parent}), {} (parent {parent})",
            fixture.reader, fixture.idler
        )),
        "inspect does not show the tree: {text}"
    );
}

#[test]
fn a_child_sharing_its_parents_descriptor_table_is_refused_and_the_tree_runs_on() {
    require_root!();
    let fixture = TreeFixture::start_with(&["--share-fd-table"]);
    let output = checkpoint(fixture.pid(), &fixture.image(), &["--tree"]);
    assert!(
        !output.status.success(),
        "a shared descriptor table was checkpointed"
    );
    let message = stderr(&output);
    assert!(
        message.contains(&format!(
            "pid {} shares its descriptor table with its parent pid {} (clone CLONE_FILES)",
            fixture.idler,
            fixture.pid()
        )),
        "the refusal does not say what is shared: {message}"
    );
    assert!(
        !fixture.image().exists(),
        "a refused checkpoint left an image"
    );
    for pid in fixture.pids() {
        assert!(runs(pid), "pid {pid} does not run after the refusal");
    }
    assert_eq!(
        fixture.reader_check(),
        "OK",
        "the refusal disturbed the tree"
    );
}

/// A tree restored by `restore --image`; every process is killed on drop.
struct RestoredTree {
    /// The root, as this test sees it.
    root: i32,
    /// Every process, the root first.
    pids: Vec<i32>,
}

impl RestoredTree {
    fn restore(image: &Path) -> Self {
        let output = agent(&["restore", "--image", image.to_str().expect("UTF-8 path")]);
        let root = restored_root(&output, "restore of a tree image failed");
        Self {
            root,
            pids: tree_of(root),
        }
    }

    /// The process restored for recorded pid `recorded` (its pid in its
    /// own pid namespace, when it has one).
    fn process(&self, recorded: i32) -> i32 {
        *self
            .pids
            .iter()
            .find(|&&pid| status_field(pid, "NSpid") == recorded)
            .unwrap_or_else(|| panic!("no restored process has recorded pid {recorded}"))
    }
}

impl Drop for RestoredTree {
    fn drop(&mut self) {
        for &pid in self.pids.iter().rev() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The innermost value of `NSpid`, `NSpgid` or `NSsid` in
/// /proc/PID/status: as the process itself sees it.
fn status_field(pid: i32, field: &str) -> i32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|values| values.split_whitespace().last())
        .and_then(|value| value.parse().ok())
        .unwrap_or(-1)
}

/// A checkpointed tree is killed whole, and its image restored twice: the
/// same pids, parents, groups and session, and the reader, inside the
/// restored tree, finds the unread pipe and socket data and the shared
/// memory the parent wrote.
#[test]
fn a_checkpointed_tree_is_killed_whole_and_restored_twice() {
    require_root!();
    let fixture = TreeFixture::start();
    let output = checkpoint(fixture.pid(), &fixture.image(), &["--tree"]);
    assert!(
        output.status.success(),
        "checkpoint --tree: {}",
        stderr(&output)
    );
    for pid in fixture.pids() {
        assert!(
            !runs(pid),
            "pid {pid} runs on after its tree was checkpointed"
        );
    }
    for round in ["first", "second"] {
        let tree = RestoredTree::restore(&fixture.image());
        assert_eq!(
            tree.pids.len(),
            3,
            "{round} restore: the tree is {:?}, not three processes",
            tree.pids
        );
        let root = tree.root;
        let reader = tree.process(fixture.reader);
        let idler = tree.process(fixture.idler);
        assert_eq!(
            status_field(root, "NSpid"),
            fixture.pid(),
            "{round} restore: root's pid"
        );
        for (name, pid) in [("reader", reader), ("idler", idler)] {
            assert_eq!(
                status_field(pid, "PPid"),
                root,
                "{round} restore: the {name}'s parent is not the restored root"
            );
            assert_eq!(
                status_field(pid, "NSsid"),
                fixture.pid(),
                "{round} restore: the {name} is not in the root's session"
            );
        }
        assert_eq!(
            status_field(reader, "NSpgid"),
            fixture.pid(),
            "{round} restore: the reader left its parent's process group"
        );
        assert_eq!(
            status_field(idler, "NSpgid"),
            fixture.idler,
            "{round} restore: the idler is not in a process group of its own"
        );
        let result = fixture.dir.path().join("result");
        let _ = fs::remove_file(&result);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(reader),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .expect("signal the restored reader");
        wait_until(Duration::from_secs(20), || result.exists())
            .expect("the restored reader writes its result");
        assert_eq!(
            fs::read_to_string(&result).expect("read result"),
            "OK",
            "{round} restore: the reader's check inside the restored tree"
        );
    }
}

/// A server started from `command` in a namespace of its own, serving
/// `body` on `port`, checkpointed as a tree (once it runs `workers`
/// children) and left running.
struct CheckpointedServer {
    /// The root of the tree.
    pid: i32,
    /// Its children when it was checkpointed.
    children: Vec<i32>,
    manifest: Manifest,
}

impl CheckpointedServer {
    fn run(dir: &Path, command: &[String], port: u16, body: &str, workers: usize) -> Self {
        let netns = NetNs::new().expect("network namespace");
        let mut server = netns
            .command(&command[0])
            .args(&command[1..])
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
        let get = || {
            netns
                .enter(|| persist_tests::http_get(port))
                .expect("enter")
        };
        // `ip netns exec` execs the server: its pid is the root's.
        let pid = server.id() as i32;
        let children = || -> Vec<i32> {
            fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default()
                .split_whitespace()
                .map(|pid| pid.parse().expect("a pid"))
                .collect()
        };
        // Workers may be forked after the first of them serves.
        let served = wait_until(Duration::from_secs(20), || {
            children().len() >= workers && get().is_ok_and(|b| b == body)
        });
        let children = children();
        let image = dir.join("image");
        // In the server's namespace: its UNIX sockets are looked up there
        // (sock_diag).
        let output = served.map(|()| {
            netns
                .command(binary("persist-agent"))
                .args(["checkpoint", "--tree", "--leave-running", "--pid"])
                .arg(pid.to_string())
                .arg("--image")
                .arg(&image)
                .output()
                .expect("run persist-agent")
        });
        let after = get();
        let _ = server.kill();
        let _ = server.wait();
        drop(netns);

        let output = output.unwrap_or_else(|e| panic!("{command:?} does not serve {body:?}: {e}"));
        assert!(
            output.status.success(),
            "checkpoint --tree of {command:?}: {}",
            stderr(&output)
        );
        assert_eq!(
            after.expect("the server serves after the checkpoint"),
            body,
            "what the server serves after the checkpoint"
        );
        Self {
            pid,
            children,
            manifest: manifest(&image),
        }
    }

    /// Checks that the image holds the root and `workers` children, all
    /// sharing one listener on `port` saved with the root.
    fn check_one_listener(&self, port: u16, workers: usize) {
        assert_eq!(
            self.children.len(),
            workers,
            "the server runs {workers} workers: {:?}",
            self.children
        );
        let pids: Vec<i32> = self
            .manifest
            .children
            .iter()
            .map(|c| c.process.pid)
            .collect();
        assert_eq!(pids, self.children, "the image holds the root's children");
        let local = format!("127.0.0.1:{port}");
        let listener = self
            .manifest
            .fds
            .iter()
            .find(|fd| matches!(&fd.kind, FdKind::TcpListener { local: l, .. } if *l == local))
            .expect("the root's listener is saved");
        for worker in &self.manifest.children {
            let shared = fraction_stored_by_parent(&self.manifest, worker);
            assert!(
                shared > 0.5,
                "only {:.0} % of worker {}'s pages refer to the root's copies",
                shared * 100.0,
                worker.process.pid
            );
            assert!(
                worker
                    .inherited_fds
                    .iter()
                    .any(|fd| fd.fd == listener.fd && fd.from_pid == self.pid),
                "worker {} does not share the root's listener: {:?}",
                worker.process.pid,
                worker.inherited_fds
            );
            assert!(
                !worker
                    .fds
                    .iter()
                    .any(|fd| matches!(fd.kind, FdKind::TcpListener { .. })),
                "worker {} saved a listener of its own",
                worker.process.pid
            );
        }
    }
}

/// nginx's master and its two workers: the listener is saved once, with
/// the master, and the workers go on serving.
#[test]
fn nginx_master_and_workers_are_saved_with_one_listener() {
    require_root!();
    const PORT: u16 = 8190;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("www");
    fs::create_dir(&root).unwrap();
    fs::write(root.join("index.html"), "hello from the tree\n").unwrap();
    let command = nginx_command_with_workers(&dir.path().join("nginx"), &root, PORT, 2)
        .expect("nginx configuration");
    let server = CheckpointedServer::run(dir.path(), &command, PORT, "hello from the tree\n", 2);
    server.check_one_listener(PORT, 2);
}

/// gunicorn's arbiter and two sync workers serving a WSGI app.
#[test]
fn gunicorn_arbiter_and_workers_are_saved_with_one_listener() {
    require_root!();
    const PORT: u16 = 8191;
    let dir = tempfile::tempdir().expect("tempdir");
    let command = gunicorn_command(
        dir.path(),
        PORT,
        &wsgi_answering("hello from gunicorn\n"),
        &[],
    );
    let server = CheckpointedServer::run(dir.path(), &command, PORT, "hello from gunicorn\n", 2);
    server.check_one_listener(PORT, 2);
}

/// A process started with `sh -c SCRIPT`; it and every process of its
/// session are killed on drop.
struct Script(Child);

impl Script {
    fn start(script: &str) -> Self {
        let child = Command::new("setsid")
            .args(["sh", "-c", script])
            .spawn()
            .expect("spawn setsid sh");
        Self(child)
    }

    /// The `sh`: `setsid` execs it (a child of the test does not lead a
    /// process group, so setsid need not fork).
    fn shell(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        persist_tests::kill_session(self.shell());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_unsupported_descriptor_in_a_child_is_refused_by_pid_and_fd_and_the_tree_runs_on() {
    require_root!();
    let dir = tempfile::tempdir().expect("tempdir");
    // The child holds a netlink socket at fd 7, which is not supported.
    let script = Script::start(
        "/usr/bin/python3 -c 'import socket, os, time
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
os.dup2(s.fileno(), 7)
s.close()
time.sleep(1000)' & exec sleep 1000",
    );
    let mut parent = 0;
    let mut child = 0;
    wait_until(Duration::from_secs(20), || {
        parent = script.shell();
        child = children_of(parent).first().copied().unwrap_or(0);
        child != 0
            && fs::read_link(format!("/proc/{child}/fd/7")).is_ok()
            && fs::read_link(format!("/proc/{child}/fd/3")).is_err()
    })
    .expect("the child opens its netlink socket");
    let output = checkpoint(parent, &dir.path().join("image"), &["--tree"]);
    assert!(
        !output.status.success(),
        "a netlink socket was checkpointed"
    );
    let message = stderr(&output);
    assert!(
        message.contains(&format!(
            "pid {child}: saving file descriptors: fd 7: netlink socket"
        )),
        "the refusal does not name the child and its fd: {message}"
    );
    assert!(
        !dir.path().join("image").exists(),
        "a refused checkpoint left an image"
    );
    for pid in [parent, child] {
        assert!(runs(pid), "pid {pid} does not run after the refusal");
    }
}

/// The state letter of `pid` in /proc/PID/stat.
fn state_of(pid: i32) -> char {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rfind(')')
        .and_then(|end| stat[end + 1..].trim_start().chars().next())
        .unwrap_or('?')
}

/// A parent with a child that exited with 7 and one killed by SIGTERM,
/// neither reaped (tests/src/bin/fixture-zombies.rs): both are saved with
/// their statuses, listed by `inspect`, and come back as zombies of the
/// restored parent, which reaps them with their recorded pids and
/// statuses; restored twice from one image.
#[test]
fn zombies_are_saved_and_come_back_for_their_parent_to_reap() {
    require_root!();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut parent = Command::new(binary("fixture-zombies"))
        .arg(dir.path())
        .spawn()
        .expect("spawn fixture-zombies");
    let pids: Vec<i32> = persist_tests::ready_text(dir.path(), "fixture-zombies")
        .split_whitespace()
        .map(|pid| pid.parse().expect("a pid"))
        .collect();
    let [root, exited, killed] = pids[..] else {
        panic!("ready holds {pids:?}, not three pids");
    };
    for pid in [exited, killed] {
        assert_eq!(state_of(pid), 'Z', "pid {pid} is not a zombie");
    }
    let image = dir.path().join("image");
    let output = checkpoint(root, &image, &["--tree"]);
    let _ = parent.wait();
    assert!(
        output.status.success(),
        "checkpoint --tree of a parent with zombies: {}",
        stderr(&output)
    );
    let saved = manifest(&image);
    assert!(saved.children.is_empty(), "zombies saved as processes");
    let recorded: Vec<(i32, i32, i32)> = saved
        .zombies
        .iter()
        .map(|z| (z.pid, z.ppid, z.wait_status))
        .collect();
    assert_eq!(
        recorded,
        [(exited, root, 7 << 8), (killed, root, libc::SIGTERM)],
        "the zombies in the image"
    );
    let listed =
        String::from_utf8_lossy(&agent(&["inspect", image.to_str().expect("UTF-8")]).stdout)
            .into_owned();
    for line in [
        format!("zombie    pid {exited} (parent {root}, group "),
        format!("zombie    pid {killed} (parent {root}, group "),
    ] {
        assert!(
            listed.contains(&line),
            "inspect does not list {line:?}:\n{listed}"
        );
    }
    assert!(
        listed.contains("exited with 7") && listed.contains("killed by signal 15"),
        "inspect does not say how the zombies ended:\n{listed}"
    );

    for round in ["first", "second"] {
        let tree = RestoredTree::restore(&image);
        assert_eq!(
            status_field(tree.root, "NSpid"),
            root,
            "{round} restore: the root's pid"
        );
        for recorded in [exited, killed] {
            let zombie = tree.process(recorded);
            assert_eq!(
                state_of(zombie),
                'Z',
                "{round} restore: pid {recorded} is not a zombie"
            );
            assert_eq!(
                status_field(zombie, "PPid"),
                tree.root,
                "{round} restore: pid {recorded}'s parent"
            );
        }
        let result = dir.path().join("result");
        let _ = fs::remove_file(&result);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(tree.root),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .expect("signal the restored parent");
        wait_until(Duration::from_secs(20), || result.exists())
            .expect("the restored parent reaps its zombies");
        assert_eq!(
            fs::read_to_string(&result).expect("read result"),
            format!("{exited} {} {killed} {}", 7 << 8, libc::SIGTERM),
            "{round} restore: what the restored parent reaped (pid, status)"
        );
    }
}

#[test]
fn a_child_forked_by_another_thread_is_found() {
    require_root!();
    let dir = tempfile::tempdir().expect("tempdir");
    // The child is forked by a second thread of the parent, which lives
    // on, so only that thread's children file lists it. Debian's python: a shim in PATH
    // (pyenv) would run children of its own first.
    let script = Script::start(
        "exec /usr/bin/python3 -c 'import os, threading, time
def fork():
    os.fork()
    time.sleep(1000)
threading.Thread(target=fork).start()
time.sleep(1000)'",
    );
    let parent = script.shell();
    let mut child = 0;
    wait_until(Duration::from_secs(20), || {
        let Ok(tasks) = fs::read_dir(format!("/proc/{parent}/task")) else {
            return false;
        };
        child = tasks
            .flatten()
            .filter_map(|task| task.file_name().to_str()?.parse::<i32>().ok())
            .flat_map(|tid| {
                fs::read_to_string(format!("/proc/{parent}/task/{tid}/children"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|pid| pid.parse::<i32>().ok())
                    .collect::<Vec<_>>()
            })
            .next()
            .unwrap_or(0);
        child != 0
    })
    .expect("the thread forks a child");
    let image = dir.path().join("image");
    let output = checkpoint(parent, &image, &["--tree", "--leave-running"]);
    assert!(
        output.status.success(),
        "checkpoint --tree: {}",
        stderr(&output)
    );
    let manifest = manifest(&image);
    let children: Vec<(i32, i32)> = manifest
        .children
        .iter()
        .map(|c| (c.process.pid, c.ppid))
        .collect();
    assert_eq!(
        children,
        [(child, parent)],
        "the thread's child is in the tree"
    );
    for pid in [parent, child] {
        assert!(runs(pid), "pid {pid} does not run after the checkpoint");
    }
}

#[test]
fn a_tree_checkpointed_against_its_earlier_image_writes_only_what_changed() {
    require_root!();
    let fixture = TreeFixture::start();
    let first = fixture.dir.path().join("first");
    let output = checkpoint(fixture.pid(), &first, &["--tree", "--leave-running"]);
    assert!(
        output.status.success(),
        "first checkpoint: {}",
        stderr(&output)
    );
    let second = fixture.image();
    let output = checkpoint(
        fixture.pid(),
        &second,
        &[
            "--tree",
            "--leave-running",
            "--base",
            first.to_str().unwrap(),
        ],
    );
    assert!(
        output.status.success(),
        "delta checkpoint: {}",
        stderr(&output)
    );
    let manifest = manifest(&second);
    assert_eq!(manifest.children.len(), 2, "the delta holds the whole tree");
    assert!(
        !manifest.base_stores.is_empty(),
        "the delta links the first image's pages"
    );
    let own = fs::metadata(second.join("pages")).expect("pages").len();
    assert!(
        own * 2 < manifest.page_store_bytes,
        "the delta wrote {own} of {} bytes of pages: the unchanged tree should be mostly reused",
        manifest.page_store_bytes
    );
    assert_eq!(
        fixture.reader_check(),
        "OK",
        "two checkpoints disturbed the tree"
    );
}

/// A parent and its child talking over a TCP connection of the namespace:
/// the child connects to the parent's listener. Once `DIR/go` exists, the
/// parent sends `ping` and writes what comes back (the child echoes it in
/// upper case) to `DIR/result`.
const TCP_TREE: &str = r#"
import os, socket, sys, time
d = sys.argv[1]
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
child = os.fork()
if child == 0:
    conn = socket.create_connection(listener.getsockname())
    while True:
        data = conn.recv(100)
        if not data:
            os._exit(0)
        conn.sendall(data.upper())
conn, _ = listener.accept()
listener.close()
with open(d + "/ready.tmp", "w") as f:
    f.write(f"{os.getpid()} {child}")
os.rename(d + "/ready.tmp", d + "/ready")
while not os.path.exists(d + "/go"):
    time.sleep(0.05)
conn.sendall(b"ping")
reply = conn.recv(100)
with open(d + "/result.tmp", "w") as f:
    f.write(reply.decode())
os.rename(d + "/result.tmp", d + "/result")
time.sleep(3600)
"#;

/// Established connections are saved in every process of a tree, each
/// with the process holding it, and the tree goes on over them when left
/// running.
#[test]
fn established_connections_of_a_tree_are_saved_and_go_on() {
    require_root!();
    let dir = tempfile::tempdir().expect("tempdir");
    let netns = NetNs::new().expect("network namespace");
    let mut tree = netns
        .command("python3")
        .args(["-c", TCP_TREE])
        .arg(dir.path())
        .spawn()
        .expect("spawn python3");
    let ready = dir.path().join("ready");
    let up = wait_until(Duration::from_secs(20), || ready.exists());
    let pid = tree.id() as i32;
    let image = dir.path().join("image");
    let output = up.as_ref().map(|()| {
        netns
            .command(binary("persist-agent"))
            .args(["checkpoint", "--tree", "--leave-running", "--pid"])
            .arg(pid.to_string())
            .arg("--image")
            .arg(&image)
            .output()
            .expect("run persist-agent")
    });
    let result = dir.path().join("result");
    let answered = output.as_ref().ok().map(|_| {
        fs::write(dir.path().join("go"), "").expect("write go");
        wait_until(Duration::from_secs(20), || result.exists())
    });
    let child = fs::read_to_string(&ready).ok();
    if let Some(child) = child.as_deref().and_then(|r| r.split_whitespace().nth(1)) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.parse().expect("a pid")),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = tree.wait();

    up.as_ref().expect("the tree connects and writes its pids");
    let output = output.expect("checkpointed");
    assert!(
        output.status.success(),
        "checkpoint --tree of a tree holding connections failed: {}",
        stderr(&output)
    );
    answered
        .expect("answered")
        .expect("the parent writes the child's answer after the checkpoint");
    assert_eq!(
        fs::read_to_string(&result).expect("read result"),
        "PING",
        "the connection between the processes does not carry data after the checkpoint"
    );
    let manifest = manifest(&image);
    let connections = |fds: &[persist_common::image::FdInfo]| {
        fds.iter()
            .filter(|fd| matches!(fd.kind, FdKind::TcpConnection(_)))
            .count()
    };
    assert_eq!(
        connections(&manifest.fds),
        1,
        "the parent's accepted connection is not saved with the parent"
    );
    assert_eq!(manifest.children.len(), 1, "the child is not in the image");
    assert_eq!(
        connections(&manifest.children[0].fds),
        1,
        "the child's connection is not saved with the child"
    );
}

/// nginx's master and two workers, checkpointed (and killed) as a tree,
/// are restored from the image twice: the restored workers answer on the
/// listener they share, and SIGQUIT to the restored master stops the whole
/// tree, as `nginx -s quit` does.
#[test]
fn nginx_master_and_workers_are_restored_answer_and_quit_whole() {
    require_root!();
    const PORT: u16 = 8191;
    const BODY: &str = "hello from the restored tree\n";
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("www");
    fs::create_dir(&root).unwrap();
    fs::write(root.join("index.html"), BODY).unwrap();
    let command = nginx_command_with_workers(&dir.path().join("nginx"), &root, PORT, 2)
        .expect("nginx configuration");
    restore_server_twice(dir.path(), &command, PORT, BODY, 2);
}

/// gunicorn's arbiter and two sync workers, restored twice from one image:
/// they answer, and SIGQUIT to the arbiter stops them all.
#[test]
fn gunicorn_arbiter_and_workers_are_restored_answer_and_quit_whole() {
    require_root!();
    const PORT: u16 = 8192;
    let dir = tempfile::tempdir().expect("tempdir");
    let command = gunicorn_command(
        dir.path(),
        PORT,
        &wsgi_answering("hello from the restored arbiter\n"),
        &[],
    );
    restore_server_twice(
        dir.path(),
        &command,
        PORT,
        "hello from the restored arbiter\n",
        2,
    );
}

/// Runs `command` in a namespace of its own until it serves `body` on
/// `port` with `workers` children, checkpoints the tree (killing it), then
/// twice: restores it, checks the root's children are the recorded ones and
/// that it serves `body`, and sends SIGQUIT to the root, which must stop
/// every process of the tree.
fn restore_server_twice(dir: &Path, command: &[String], port: u16, body: &str, workers: usize) {
    let netns = NetNs::new().expect("network namespace");
    let get = || {
        netns
            .enter(|| persist_tests::http_get(port))
            .expect("enter")
    };
    let mut server = netns
        .command(&command[0])
        .args(&command[1..])
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    let pid = server.id() as i32;
    let served = wait_until(Duration::from_secs(30), || {
        children_of(pid).len() >= workers && get().is_ok_and(|b| b == body)
    });
    let recorded_workers = children_of(pid);
    let image = dir.join("image");
    let output = served.as_ref().ok().map(|()| {
        netns
            .command(binary("persist-agent"))
            .args(["checkpoint", "--tree", "--pid"])
            .arg(pid.to_string())
            .arg("--image")
            .arg(&image)
            .output()
            .expect("run persist-agent")
    });
    if output.is_none() {
        let _ = server.kill();
    }
    let _ = server.wait();
    served.unwrap_or_else(|e| panic!("{command:?} does not serve with {workers} workers: {e}"));
    let output = output.expect("checkpointed");
    assert!(
        output.status.success(),
        "checkpoint --tree of {command:?}: {}",
        stderr(&output)
    );
    assert!(
        get().is_err(),
        "{command:?} still answers after its tree was checkpointed and killed"
    );

    for round in ["first", "second"] {
        let output = netns
            .command(binary("persist-agent"))
            .args(["restore", "--image"])
            .arg(&image)
            .output()
            .expect("run persist-agent");
        let root = restored_root(&output, &format!("{round} restore of {command:?}"));
        let mut tree = RestoredTree {
            root,
            pids: vec![root],
        };
        tree.pids.extend(children_of(root));
        let restored: HashSet<i32> = tree.pids[1..]
            .iter()
            .map(|&worker| status_field(worker, "NSpid"))
            .collect();
        assert_eq!(
            restored,
            recorded_workers.iter().copied().collect::<HashSet<i32>>(),
            "{round} restore: the root's children are not its recorded workers"
        );
        for attempt in 0..4 {
            assert_eq!(
                get().unwrap_or_else(|e| panic!("{round} restore, request {attempt}: {e}")),
                body,
                "{round} restore: what the restored tree serves"
            );
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(tree.root),
            nix::sys::signal::Signal::SIGQUIT,
        )
        .expect("SIGQUIT to the restored root");
        let gone = wait_until(Duration::from_secs(20), || {
            tree.pids.iter().all(|&pid| !runs(pid))
        });
        let left: Vec<i32> = tree.pids.iter().copied().filter(|&p| runs(p)).collect();
        assert!(
            gone.is_ok(),
            "{round} restore: processes {left:?} of the tree run on after SIGQUIT to the root"
        );
        drop(tree);
    }
}

/// The processes whose command line names `dir` (the fixture's own
/// directory): what is left of a tree restored from its image.
fn processes_naming(dir: &Path) -> Vec<i32> {
    let dir = dir.to_str().expect("UTF-8 path").as_bytes();
    fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline.windows(dir.len()).any(|w| w == dir))
        })
        .filter(|&pid| runs(pid))
        .collect()
}

/// A tree whose last process fails once every other one is built is
/// refused naming that process, and nothing of it is left running; an
/// image whose child names a parent outside the tree is refused before
/// anything is forked.
#[test]
fn a_tree_that_fails_halfway_is_refused_by_pid_and_leaves_nothing() {
    require_root!();
    let fixture = TreeFixture::start();
    let output = checkpoint(fixture.pid(), &fixture.image(), &["--tree"]);
    assert!(
        output.status.success(),
        "checkpoint --tree: {}",
        stderr(&output)
    );
    let image = fixture.image();
    let image_arg = image.to_str().unwrap();

    // Registers are set last, once the process and its threads exist.
    edit_manifest_of(&image, |manifest| {
        let regs = manifest["children"][1]["threads"][0]["regs"]
            .as_array_mut()
            .expect("the idler's registers");
        regs.pop();
    });
    let restore = agent(&["restore", "--image", image_arg]);
    assert!(
        !restore.status.success(),
        "a tree with bad registers was restored"
    );
    let message = stderr(&restore);
    assert!(
        message.contains(&format!("pid {} of the tree", fixture.idler))
            && message.contains("register words"),
        "the refusal does not name the idler and its registers: {message}"
    );
    let left = processes_naming(fixture.dir.path());
    assert!(left.is_empty(), "a half-restored tree was left: {left:?}");

    edit_manifest_of(&image, |manifest| {
        manifest["children"][1]["ppid"] = serde_json::json!(1);
    });
    let restore = agent(&["restore", "--image", image_arg]);
    assert!(
        stderr(&restore).contains(&format!(
            "pid {}: its parent pid 1 is not restored before it",
            fixture.idler
        )),
        "a tree with a parent outside it is not refused as such: {}",
        stderr(&restore)
    );
    let left = processes_naming(fixture.dir.path());
    assert!(left.is_empty(), "a refused tree left processes: {left:?}");
}

fn edit_manifest_of(image: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    persist_tests::edit_manifest(image, edit);
}
