//! The daemon forks the processes it restores from its spawner, a small
//! helper process, rather than from itself: they are still its children
//! with its descriptors, the spawner holds next to none of the agent's
//! memory and ends with it, and a restore goes on without it.

use std::time::Duration;

use persist_tests::{
    Sandbox, binary, nginx_command_with_workers, service_pids, wait_until, web_root,
};

const METRICS_PORT: u16 = 9189;

/// How many restored processes `by` (the spawner or the agent) forked.
fn forked_by(sandbox: &Sandbox, by: &str) -> u64 {
    let metric = format!("persist_processes_forked{{by=\"{by}\"}} ");
    let text = sandbox.metrics_page(METRICS_PORT);
    text.lines()
        .find_map(|line| line.strip_prefix(&metric))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {metric} in\n{text}"))
}

/// A field of /proc/PID/status, as its text.
fn status_field(pid: i32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        line.strip_prefix(field)?
            .strip_prefix(':')
            .map(|value| value.trim().to_owned())
    })
}

/// Kibibytes of anonymous memory `pid` has resident.
fn anonymous_kib(pid: i32) -> u64 {
    status_field(pid, "RssAnon")
        .and_then(|value| value.trim_end_matches(" kB").parse().ok())
        .unwrap_or_else(|| panic!("no RssAnon for {pid}"))
}

/// The daemon's child named persist-spawner.
fn spawner_of(daemon: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{daemon}/task/{daemon}/children"))
        .ok()?
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .find(|&pid: &i32| status_field(pid, "Name").as_deref() == Some("persist-spawner"))
}

/// The descriptor numbers at which `pid` holds the socket with `inode`.
fn socket_numbers(pid: i32, inode: u64) -> Vec<i32> {
    let socket = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| target.to_str() == Some(&socket))
        })
        .filter_map(|fd| fd.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: i32) -> bool {
    status_field(pid, "State").is_some_and(|state| !state.starts_with('Z'))
}

fn add_hello(sandbox: &Sandbox, name: &str, port: u16) {
    let server = binary("hello-server").display().to_string();
    sandbox
        .add_ok(
            name,
            port,
            &["--ready", "tcp"],
            &[server, format!("127.0.0.1:{port}")],
        )
        .unwrap();
}

fn wake_and_check(sandbox: &Sandbox, name: &str, port: u16, daemon: i32) -> i32 {
    let body = sandbox.http_get(port).unwrap();
    assert!(!body.is_empty(), "{name} answered nothing");
    let status = sandbox.service(name).unwrap();
    let pid = status["pid"].as_i64().expect("a running service has a pid") as i32;
    assert_eq!(
        status_field(pid, "PPid"),
        Some(daemon.to_string()),
        "{name} (pid {pid}) is not the daemon's child"
    );
    pid
}

#[test]
fn the_daemon_forks_restored_processes_from_its_spawner() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::new().unwrap();
    sandbox
        .start_daemon_with(&["--metrics", &format!("127.0.0.1:{METRICS_PORT}")])
        .unwrap();
    let daemon = sandbox.daemon_pid().unwrap();
    let spawner = spawner_of(daemon).expect("the daemon has no spawner");

    // It holds next to nothing of the agent's memory: no heap, and a
    // fraction of the agent's anonymous memory (its stack, the data of the
    // loaded objects).
    let maps = std::fs::read_to_string(format!("/proc/{spawner}/maps")).unwrap();
    assert!(!maps.contains("[heap]"), "{maps}");
    assert!(
        anonymous_kib(spawner) * 2 < anonymous_kib(daemon),
        "spawner {} KiB, daemon {} KiB of anonymous memory",
        anonymous_kib(spawner),
        anonymous_kib(daemon)
    );

    // A parked service's skeleton is forked by it, and wakes as the
    // daemon's child.
    assert_eq!(forked_by(&sandbox, "spawner"), 0);
    add_hello(&sandbox, "hello", 8410);
    wait_for_skeleton(&sandbox);
    assert_eq!(forked_by(&sandbox, "spawner"), 1);
    assert_eq!(forked_by(&sandbox, "agent"), 0);
    wake_and_check(&sandbox, "hello", 8410, daemon);

    // The daemon holds the service's listener numbered apart, above every
    // descriptor a restore uses: a process the spawner forks takes a copy
    // of the descriptors below only, not one listener per service.
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(sandbox.state_dir().join("run/hello.keeper.json")).unwrap(),
    )
    .unwrap();
    let inode = record["listener_inode"].as_u64().unwrap();
    let numbers = socket_numbers(daemon, inode);
    assert!(
        !numbers.is_empty() && numbers.iter().all(|&fd| fd >= 64),
        "the daemon holds the listener at {numbers:?}"
    );

    // Without it, the daemon forks them itself.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(spawner),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(Duration::from_secs(5), || !alive(spawner)).unwrap();
    sandbox.agent_ok(&["park", "hello"]).unwrap();
    wait_for_skeleton(&sandbox);
    assert_eq!(forked_by(&sandbox, "agent"), 1);
    assert_eq!(forked_by(&sandbox, "spawner"), 1);
    wake_and_check(&sandbox, "hello", 8410, daemon);
}

fn wait_for_skeleton(sandbox: &Sandbox) {
    wait_for_skeleton_of(sandbox, "hello");
}

fn wait_for_skeleton_of(sandbox: &Sandbox, name: &str) {
    wait_until(Duration::from_secs(20), || {
        sandbox
            .service(name)
            .is_ok_and(|s| s["state"] == "parked" && s["skeleton_pid"].is_i64())
    })
    .unwrap_or_else(|_| panic!("no skeleton: {:?}", sandbox.service(name)));
}

/// What `pid`'s descriptors name (`/proc/PID/fd` links).
fn descriptor_targets(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| Some(std::fs::read_link(fd.path()).ok()?.display().to_string()))
        .collect()
}

/// A tree's root (nginx's master, which forks its two workers) is forked
/// by the spawner too, and every process of the tree takes only the
/// agent's descriptors it needs: none of the agent's BPF objects. Woken,
/// parked and woken again.
#[test]
fn a_trees_root_is_forked_from_the_spawner() {
    persist_tests::require_root!();
    const PORT: u16 = 8412;
    let mut sandbox = Sandbox::new().unwrap();
    sandbox
        .start_daemon_with(&["--metrics", &format!("127.0.0.1:{METRICS_PORT}")])
        .unwrap();
    let daemon = sandbox.daemon_pid().unwrap();
    let root = web_root();
    std::fs::write(root.path().join("index.html"), "tree\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let command = nginx_command_with_workers(&dir.path().join("nginx"), root.path(), PORT, 2)
        .expect("nginx configuration");
    sandbox
        .add_ok("web", PORT, &["--ready", "http:/"], &command)
        .unwrap();
    for round in 1..=2 {
        wait_for_skeleton_of(&sandbox, "web");
        assert_eq!(forked_by(&sandbox, "spawner"), round, "round {round}");
        assert_eq!(forked_by(&sandbox, "agent"), 0, "round {round}");
        assert_eq!(sandbox.http_get(PORT).unwrap(), "tree\n", "round {round}");
        let status = sandbox.service("web").unwrap();
        let pids = service_pids(&status);
        assert_eq!(pids.len(), 3, "round {round}: {status}");
        let master = status["pid"].as_i64().expect("a pid") as i32;
        assert_eq!(status_field(master, "PPid"), Some(daemon.to_string()));
        for &pid in &pids {
            let targets = descriptor_targets(pid);
            assert!(
                !targets.iter().any(|target| target.contains("bpf")),
                "round {round}: pid {pid} holds the agent's descriptors: {targets:?}"
            );
        }
        sandbox.agent_ok(&["park", "web"]).unwrap();
    }
}

#[test]
fn the_spawner_ends_with_its_daemon() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::with_daemon().unwrap();
    let daemon = sandbox.daemon_pid().unwrap();
    let spawner = spawner_of(daemon).expect("the daemon has no spawner");
    sandbox.kill_daemon();
    wait_until(Duration::from_secs(5), || !alive(spawner))
        .unwrap_or_else(|_| panic!("the spawner {spawner} outlived its daemon"));
    // The state directory's lock, which the spawner held with the agent's
    // descriptors, is free for the next daemon.
    sandbox.start_daemon().unwrap();
    let next = spawner_of(sandbox.daemon_pid().unwrap());
    assert!(next.is_some_and(|pid| pid != spawner));
}
