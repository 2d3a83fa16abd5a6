//! `SO_REUSEPORT` groups: several listening sockets on one port, which the
//! kernel groups by owner uid and network namespace and spreads connections
//! over. `fixture-reuseport` serves a group of two from one process and
//! names the member that accepted each connection; nginx with
//! `listen PORT reuseport;` gives each worker a socket of its own.
//!
//! Each test runs in its own network namespace and kills the pids it
//! started (and restored) when it ends.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use persist_agent::sys::pidfd::PidFd;
use persist_tests::{NetNs, Sandbox, binary, require_root, wait_until};
use persist_tests::{children_of, own_pid, restored_root, stderr};

/// The unprivileged user the fixture runs as: the group is owned by its uid.
const NOBODY: u32 = 65534;

/// Connections each round sends: the kernel hashes each one's addresses to
/// a member, so both members get some with a chance of 1 - 2^-39.
const CONNECTIONS: usize = 40;

/// A process a test started, killed and reaped on drop.
struct Started(Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A restored process, killed on drop; gone before the next restore binds
/// its port again.
struct Restored(i32);

impl Drop for Restored {
    fn drop(&mut self) {
        let process = PidFd::open(self.0).ok();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
        if let Some(process) = process {
            process.wait_exit(Duration::from_secs(10));
        }
    }
}

fn agent(netns: &NetNs, args: &[&str]) -> Output {
    netns
        .command(binary("persist-agent"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run persist-agent")
}

/// Starts the fixture as `nobody` in `netns` on 127.0.0.1:`port` and waits
/// until it answers.
fn start_fixture(netns: &NetNs, port: u16) -> Started {
    let child = netns
        .command("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
        ])
        .arg(binary("fixture-reuseport"))
        .arg(format!("127.0.0.1:{port}"))
        // Not the test's own output: the restore reopens it as `nobody`.
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fixture-reuseport");
    let started = Started(child);
    wait_until(Duration::from_secs(20), || {
        netns.enter(|| ask(port)).ok().flatten().is_some()
    })
    .expect("fixture-reuseport answers");
    started
}

/// One connection's answer: `member INDEX fd FD pid PID`, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Answer {
    member: u32,
    fd: i32,
    pid: i32,
}

fn parse(line: &str) -> Option<Answer> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words[..] {
        ["member", member, "fd", fd, "pid", pid] => Some(Answer {
            member: member.parse().ok()?,
            fd: fd.parse().ok()?,
            pid: pid.parse().ok()?,
        }),
        _ => None,
    }
}

/// Connects once to 127.0.0.1:`port` (from the caller's namespace) and
/// reads the answer; `None` if nothing answers.
fn ask(port: u16) -> Option<Answer> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .ok()?;
    stream.write_all(b"hi\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    parse(&text)
}

/// Opens `count` connections at once, then reads every answer: the
/// connections queue in the group's accept queues before any is served.
fn ask_many(port: u16, count: usize) -> Vec<Option<Answer>> {
    let streams: Vec<Option<TcpStream>> = (0..count)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    streams
        .into_iter()
        .map(|stream| {
            let mut stream = stream?;
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .ok()?;
            stream.write_all(b"hi\n").ok()?;
            let mut text = String::new();
            stream.read_to_string(&mut text).ok()?;
            parse(&text)
        })
        .collect()
}

/// The TCP sockets listening on `port` in the namespace the calling thread
/// is in, as `(inode, owner uid)`.
fn listening_sockets(port: u16) -> Vec<(u64, u32)> {
    listening_sockets_queued(port)
        .into_iter()
        .map(|(inode, uid, _)| (inode, uid))
        .collect()
}

/// [`listening_sockets`] with the connections each has queued to be
/// accepted (`/proc/net/tcp`'s `rx_queue` of a listener).
fn listening_sockets_queued(port: u16) -> Vec<(u64, u32, u32)> {
    let port_hex = format!(":{port:04X}");
    ["tcp", "tcp6"]
        .iter()
        .map(|file| fs::read_to_string(format!("/proc/thread-self/net/{file}")).unwrap_or_default())
        .flat_map(|text| text.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address, st = 0A (LISTEN), tx_queue:rx_queue, uid, inode
            if !fields.get(1)?.ends_with(&port_hex) || *fields.get(3)? != "0A" {
                return None;
            }
            let queued = u32::from_str_radix(fields.get(4)?.split_once(':')?.1, 16).ok()?;
            Some((
                fields.get(9)?.parse().ok()?,
                fields.get(7)?.parse().ok()?,
                queued,
            ))
        })
        .collect()
}

/// Which member (and fd) answered how often.
fn members(answers: &[Option<Answer>]) -> BTreeMap<(u32, i32), usize> {
    let mut seen = BTreeMap::new();
    for answer in answers.iter().flatten() {
        *seen.entry((answer.member, answer.fd)).or_insert(0) += 1;
    }
    seen
}

/// The fixture's group of two, checkpointed (and killed), is restored twice
/// from one image: each time both members are back at their descriptors,
/// owned by the fixture's uid and listening as one group (both accept, the
/// kernel spreading the connections over them).
#[test]
fn a_reuseport_group_comes_back_whole_twice_from_one_image() {
    require_root!();
    const PORT: u16 = 8271;
    let netns = NetNs::new().expect("network namespace");
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("image");
    let fixture = start_fixture(&netns, PORT);
    let pid = fixture.0.id() as i32;

    let before = netns.enter(|| ask_many(PORT, CONNECTIONS)).unwrap();
    let running_members: BTreeSet<(u32, i32)> = members(&before).into_keys().collect();
    assert_eq!(
        running_members.len(),
        2,
        "the running fixture's members did not both accept: {before:?}"
    );
    let sockets = netns.enter(|| listening_sockets(PORT)).unwrap();
    assert_eq!(
        sockets.iter().map(|&(_, uid)| uid).collect::<Vec<_>>(),
        [NOBODY, NOBODY],
        "the running fixture's listeners: {sockets:?}"
    );

    let output = agent(
        &netns,
        &[
            "checkpoint",
            "--pid",
            &pid.to_string(),
            "--image",
            image.to_str().unwrap(),
        ],
    );
    assert!(output.status.success(), "checkpoint: {}", stderr(&output));
    drop(fixture);
    assert!(
        netns.enter(|| ask(PORT)).unwrap().is_none(),
        "the checkpointed fixture still answers"
    );

    for round in ["first", "second"] {
        let output = agent(&netns, &["restore", "--image", image.to_str().unwrap()]);
        assert!(
            output.status.success(),
            "{round} restore: {}",
            stderr(&output)
        );
        let restored = Restored(
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .last()
                .and_then(|l| l.trim().parse().ok())
                .expect("restore prints the pid"),
        );
        let answers = netns.enter(|| ask_many(PORT, CONNECTIONS)).unwrap();
        assert!(
            answers.iter().all(Option::is_some),
            "{round} restore: connections went unanswered: {answers:?}"
        );
        assert!(
            answers.iter().flatten().all(|a| a.pid == pid),
            "{round} restore: answered by another pid than the restored {pid}: {answers:?}"
        );
        let restored_members: BTreeSet<(u32, i32)> = members(&answers).into_keys().collect();
        assert_eq!(
            restored_members, running_members,
            "{round} restore: members and descriptors that accepted"
        );
        let sockets = netns.enter(|| listening_sockets(PORT)).unwrap();
        assert_eq!(
            sockets.iter().map(|&(_, uid)| uid).collect::<Vec<_>>(),
            [NOBODY, NOBODY],
            "{round} restore: the listeners on the port and their owners: {sockets:?}"
        );
        drop(restored);
    }
}

/// The inodes of the sockets `pid` holds.
fn sockets_of(pid: i32) -> BTreeSet<u64> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let target = fs::read_link(entry.path()).ok()?;
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// One GET of `/` on 127.0.0.1:`port`: the worker named by the answer's
/// `X-Worker-Pid`, if it answered 200 with `body`.
fn nginx_worker_answering(port: u16, body: &str) -> Option<i32> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .ok()?;
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, served) = response.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") || served != body {
        return None;
    }
    head.lines()
        .find_map(|line| line.strip_prefix("X-Worker-Pid: "))?
        .trim()
        .parse()
        .ok()
}

/// Processes killed on drop, whatever is left of them.
struct Killed(Vec<i32>);

impl Drop for Killed {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Checks nginx's tree in `netns` (master `root`): two workers, two
/// listeners on the port, owned by root (the master made them), held by
/// every process, and both workers answering (each accepts on its own
/// listener only). Returns the two listeners.
fn check_nginx_group(netns: &NetNs, root: i32, port: u16, body: &str, when: &str) -> Vec<u64> {
    let workers = children_of(root);
    assert_eq!(workers.len(), 2, "{when}: nginx's workers: {workers:?}");
    let listening = netns.enter(|| listening_sockets(port)).unwrap();
    assert_eq!(
        listening.iter().map(|&(_, uid)| uid).collect::<Vec<_>>(),
        [0, 0],
        "{when}: the listeners on port {port} and their owners: {listening:?}"
    );
    let inodes: BTreeSet<u64> = listening.iter().map(|&(inode, _)| inode).collect();
    // Debian's nginx leaves every worker the whole group (inherited from
    // the master), and each polls only its own: both answering shows both
    // sockets accept.
    for pid in workers.iter().chain([&root]) {
        assert!(
            sockets_of(*pid).is_superset(&inodes),
            "{when}: pid {pid} does not hold the group's listeners {inodes:?}"
        );
    }
    let answered: BTreeSet<Option<i32>> = netns
        .enter(|| {
            (0..CONNECTIONS)
                .map(|_| nginx_worker_answering(port, body))
                .collect()
        })
        .unwrap();
    let expected: BTreeSet<Option<i32>> = workers.iter().map(|&w| Some(own_pid(w))).collect();
    assert_eq!(
        answered, expected,
        "{when}: the workers that answered {CONNECTIONS} requests"
    );
    inodes.into_iter().collect()
}

/// nginx, a master with two workers and `listen PORT reuseport;` (one
/// socket per worker, one group), checkpointed as a tree and killed, is
/// restored twice from its image: each time the group's two listeners are
/// back in every process, in one group, and both workers answer.
#[test]
fn nginx_workers_with_reuseport_are_restored_each_with_its_listener() {
    require_root!();
    const PORT: u16 = 8272;
    const BODY: &str = "hello from a reuseport worker\n";
    let netns = NetNs::new().expect("network namespace");
    let dir = tempfile::tempdir().expect("tempdir");
    let www = dir.path().join("www");
    fs::create_dir(&www).unwrap();
    fs::write(www.join("index.html"), BODY).unwrap();
    let command = persist_tests::nginx_command_reuseport(&dir.path().join("nginx"), &www, PORT, 2)
        .expect("nginx configuration");
    let server = Started(
        netns
            .command(&command[0])
            .args(&command[1..])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn nginx"),
    );
    let master = server.0.id() as i32;
    let mut started = Killed(vec![master]);
    wait_until(Duration::from_secs(30), || {
        children_of(master).len() == 2
            && netns
                .enter(|| nginx_worker_answering(PORT, BODY))
                .unwrap()
                .is_some()
    })
    .expect("nginx serves with two workers");
    started.0.extend(children_of(master));
    check_nginx_group(&netns, master, PORT, BODY, "running");

    let image = dir.path().join("image");
    let output = agent(
        &netns,
        &[
            "checkpoint",
            "--tree",
            "--pid",
            &master.to_string(),
            "--image",
            image.to_str().unwrap(),
        ],
    );
    assert!(
        output.status.success(),
        "checkpoint --tree: {}",
        stderr(&output)
    );
    drop(server);
    drop(started);

    for round in ["first", "second"] {
        let output = agent(&netns, &["restore", "--image", image.to_str().unwrap()]);
        let root = restored_root(&output, &format!("{round} restore"));
        let mut restored = Killed(vec![root]);
        restored.0.extend(children_of(root));
        check_nginx_group(&netns, root, PORT, BODY, &format!("{round} restore"));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(root),
            nix::sys::signal::Signal::SIGQUIT,
        )
        .expect("SIGQUIT to the restored master");
        let gone = wait_until(Duration::from_secs(20), || {
            restored
                .0
                .iter()
                .all(|&pid| PidFd::open(pid).is_err() || is_zombie(pid))
        });
        assert!(gone.is_ok(), "{round} restore: nginx did not quit whole");
        drop(restored);
    }
}

fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit(") ")
            .next()
            .is_some_and(|rest| rest.starts_with('Z') || rest.starts_with('X'))
    })
}

/// Asks `port` in the sandbox's namespace `CONNECTIONS` times at once and
/// checks every connection is answered by one process, through both members
/// of its group, at the descriptors `fds` (when given); returns that
/// process's pid and the members' descriptors.
fn all_answered_by_both(
    sandbox: &Sandbox,
    port: u16,
    fds: Option<&BTreeSet<i32>>,
    when: &str,
) -> (i32, BTreeSet<i32>) {
    let answers = sandbox.netns.enter(|| ask_many(port, CONNECTIONS)).unwrap();
    assert!(
        answers.iter().all(Option::is_some),
        "{when}: connections went unanswered: {answers:?}\n{}",
        sandbox.daemon_log()
    );
    let pids: BTreeSet<i32> = answers.iter().flatten().map(|a| a.pid).collect();
    assert_eq!(
        pids.len(),
        1,
        "{when}: answered by several processes: {answers:?}"
    );
    let seen = members(&answers);
    eprintln!("{when}: connections accepted by (member, fd): {seen:?}");
    let indices: BTreeSet<u32> = seen.keys().map(|&(member, _)| member).collect();
    assert_eq!(
        indices,
        BTreeSet::from([0, 1]),
        "{when}: both members of the group accept: {seen:?}"
    );
    let seen_fds: BTreeSet<i32> = seen.keys().map(|&(_, fd)| fd).collect();
    if let Some(fds) = fds {
        assert_eq!(&seen_fds, fds, "{when}: the members' descriptors");
    }
    (pids.into_iter().next().unwrap(), seen_fds)
}

/// The fixture's group of two, as `nobody`, in snapshot mode: while parked
/// the agent holds both members (two listeners on the port, still
/// `nobody`'s), the connections made at once while it is parked queue in
/// both and are all answered after the wake, by both members at their
/// descriptors; the same after a park, and after the daemon was killed
/// while the service was parked.
#[test]
fn connections_queued_in_a_parked_group_are_all_answered_by_both_members() {
    require_root!();
    const PORT: u16 = 8273;
    let mut sandbox = Sandbox::with_daemon().unwrap();
    let command = vec![
        binary("fixture-reuseport").display().to_string(),
        format!("127.0.0.1:{PORT}"),
    ];
    sandbox
        .add_ok("group", PORT, &["--user", "nobody"], &command)
        .unwrap();
    let check_parked = |sandbox: &Sandbox, when: &str| {
        let status = sandbox.service("group").unwrap();
        assert_eq!(status["state"], "parked", "{when}: {status}");
        let sockets = sandbox.netns.enter(|| listening_sockets(PORT)).unwrap();
        assert_eq!(
            sockets.iter().map(|&(_, uid)| uid).collect::<Vec<_>>(),
            [NOBODY, NOBODY],
            "{when}: the listeners held on the port and their owners: {sockets:?}"
        );
    };

    check_parked(&sandbox, "added");
    let (first, fds) = all_answered_by_both(&sandbox, PORT, None, "first wake");
    assert_eq!(sandbox.service("group").unwrap()["wakes"], 1);

    // The agent's program assigns every SYN of the port to the listener it
    // holds; the kernel then picks the member of that listener's group.
    // With the process stopped, connections stay queued where they landed.
    let stopped = nix::unistd::Pid::from_raw(first);
    nix::sys::signal::kill(stopped, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let streams: Vec<TcpStream> = sandbox
        .netns
        .enter(|| {
            (0..CONNECTIONS)
                .map(|_| TcpStream::connect(("127.0.0.1", PORT)).expect("connect"))
                .collect()
        })
        .unwrap();
    let mut queued = Vec::new();
    let all_queued = wait_until(Duration::from_secs(10), || {
        queued = sandbox
            .netns
            .enter(|| listening_sockets_queued(PORT))
            .unwrap();
        queued.iter().map(|&(_, _, n)| n as usize).sum::<usize>() == CONNECTIONS
    });
    nix::sys::signal::kill(stopped, nix::sys::signal::Signal::SIGCONT).unwrap();
    all_queued.unwrap_or_else(|_| panic!("not all {CONNECTIONS} connections queued: {queued:?}"));
    eprintln!("queued by the stopped process's listeners (inode, uid, queued): {queued:?}");
    assert!(
        queued.len() == 2 && queued.iter().all(|&(_, _, n)| n > 0),
        "the connections steered to the agent's listener queued in both members: {queued:?}"
    );
    for mut stream in streams {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream.write_all(b"hi\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        assert!(parse(&text).is_some(), "a queued connection got {text:?}");
    }

    sandbox.agent_ok(&["park", "group"]).unwrap();
    // The next skeleton has the restored pid again, stopped before it runs.
    wait_until(Duration::from_secs(10), || {
        sandbox.service("group").unwrap()["skeleton_pid"] == first
    })
    .expect("the next skeleton is prepared");
    check_parked(&sandbox, "parked again");
    all_answered_by_both(&sandbox, PORT, Some(&fds), "second wake");

    sandbox.agent_ok(&["park", "group"]).unwrap();
    wait_until(Duration::from_secs(10), || {
        sandbox.service("group").unwrap()["skeleton_pid"].is_i64()
    })
    .expect("a skeleton is prepared");
    sandbox.kill_daemon();
    sandbox.start_daemon().unwrap();
    wait_until(Duration::from_secs(10), || {
        sandbox
            .service("group")
            .is_ok_and(|s| s["state"] == "parked")
    })
    .expect("parked under the restarted daemon");
    check_parked(&sandbox, "daemon restarted");
    all_answered_by_both(
        &sandbox,
        PORT,
        Some(&fds),
        "wake under the restarted daemon",
    );
}

/// With `--on-idle keep`, a park checkpoints the running restored process:
/// its image records the members the agent handed it, which the next wake
/// hands back at the same descriptors, both accepting.
#[test]
fn a_group_kept_at_park_comes_back_whole() {
    require_root!();
    const PORT: u16 = 8274;
    let sandbox = Sandbox::with_daemon().unwrap();
    let command = vec![
        binary("fixture-reuseport").display().to_string(),
        format!("127.0.0.1:{PORT}"),
    ];
    sandbox
        .add_ok(
            "kept",
            PORT,
            &["--user", "nobody", "--on-idle", "keep"],
            &command,
        )
        .unwrap();
    let (pid, fds) = all_answered_by_both(&sandbox, PORT, None, "first wake");
    sandbox.agent_ok(&["park", "kept"]).unwrap();
    let parked = sandbox.service("kept").unwrap();
    assert!(
        parked["state"] == "parked" && parked["error"].is_null(),
        "parked with its state kept: {parked}"
    );
    let (again, _) = all_answered_by_both(&sandbox, PORT, Some(&fds), "wake of the kept state");
    assert_eq!(again, pid, "the kept state is restored with its pid");
}

/// An image built apart (`persist-agent build`, no daemon held its
/// sockets) and `add`ed with `--image`: the agent opens a group of as many
/// listeners as the image has, owned by its owner, and each wake hands
/// them to the members' descriptors, both accepting.
#[test]
fn a_prebuilt_image_of_a_group_gets_a_group_from_the_agent() {
    require_root!();
    const PORT: u16 = 8275;
    let sandbox = Sandbox::with_daemon().unwrap();
    let images = tempfile::tempdir().unwrap();
    let image = images.path().join("group");
    let image_arg = image.display().to_string();
    let built = sandbox
        .netns
        .command(binary("persist-agent"))
        .args(["build", "--image", &image_arg, "--user", "nobody"])
        .args(["--port", &PORT.to_string(), "--"])
        .arg(binary("fixture-reuseport"))
        .arg(format!("127.0.0.1:{PORT}"))
        .stdin(Stdio::null())
        .output()
        .expect("running persist-agent build");
    assert!(built.status.success(), "build: {}", stderr(&built));
    sandbox
        .agent_ok(&[
            "add",
            "prebuilt",
            "--image",
            &image_arg,
            "--port",
            &PORT.to_string(),
        ])
        .unwrap();
    let sockets = sandbox.netns.enter(|| listening_sockets(PORT)).unwrap();
    assert_eq!(
        sockets.iter().map(|&(_, uid)| uid).collect::<Vec<_>>(),
        [NOBODY, NOBODY],
        "the agent's listeners on the port and their owners: {sockets:?}"
    );
    all_answered_by_both(&sandbox, PORT, None, "wake of the prebuilt image");
}

/// The same nginx under the daemon: added (built as a tree, its group's
/// two listeners held by the agent), woken by requests that both workers
/// answer, parked, and woken again with both workers answering on the
/// group's same two sockets.
#[test]
fn nginx_with_reuseport_workers_is_parked_and_woken_by_the_daemon() {
    require_root!();
    const PORT: u16 = 8273;
    const BODY: &str = "hello from a parked reuseport group\n";
    let sandbox = Sandbox::with_daemon().expect("sandbox with a daemon");
    let dir = tempfile::tempdir().expect("tempdir");
    let www = dir.path().join("www");
    fs::create_dir(&www).unwrap();
    fs::write(www.join("index.html"), BODY).unwrap();
    let command = persist_tests::nginx_command_reuseport(&dir.path().join("nginx"), &www, PORT, 2)
        .expect("nginx configuration");
    sandbox
        .add_ok("nginx", PORT, &["--ready", "http:/"], &command)
        .unwrap();

    let mut groups = Vec::new();
    for round in ["first wake", "second wake"] {
        let answered = sandbox
            .netns
            .enter(|| nginx_worker_answering(PORT, BODY))
            .unwrap();
        assert!(
            answered.is_some(),
            "{round}: nginx answers\n{}",
            sandbox.daemon_log()
        );
        let root = sandbox.running_pid("nginx").unwrap() as i32;
        groups.push(check_nginx_group(&sandbox.netns, root, PORT, BODY, round));
        sandbox.agent_ok(&["park", "nginx"]).unwrap();
        wait_until(Duration::from_secs(20), || {
            sandbox
                .service("nginx")
                .is_ok_and(|status| status["state"] == "parked" && status["pid"].is_null())
        })
        .unwrap_or_else(|_| panic!("{round}: not parked\n{}", sandbox.daemon_log()));
    }
    assert_eq!(
        groups[0], groups[1],
        "the second wake listens through the group's same sockets"
    );
}
