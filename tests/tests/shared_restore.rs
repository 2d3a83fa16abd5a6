//! Parked services share the agent's restore threads and one port keeper:
//! the agent does not grow a thread, nor the host a process, per service.

use std::collections::{BTreeSet, HashMap};
use std::net::TcpStream;
use std::time::Duration;

use persist_tests::{Sandbox, binary, wait_until};

const FIRST_PORT: u16 = 8300;
const SERVICES: u16 = 20;
const POOL: usize = 2;

/// The names of `pid`'s threads but tokio's: its blocking pool starts
/// threads for builds that linger a while, whatever the services.
fn threads(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.starts_with("tokio-"))
        .collect()
}

/// The socket inodes `pid` holds, each as often as it holds it.
fn socket_inodes(pid: i32) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Each service's recorded keeper: its pid and the listener's inode.
fn keeper_records(sandbox: &Sandbox) -> HashMap<String, (i32, u64)> {
    std::fs::read_dir(sandbox.state_dir().join("run"))
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let name = entry
                .file_name()
                .to_str()?
                .strip_suffix(".keeper.json")?
                .to_owned();
            let record: serde_json::Value =
                serde_json::from_slice(&std::fs::read(entry.path()).ok()?).ok()?;
            Some((
                name,
                (
                    record["pid"].as_i64()? as i32,
                    record["listener_inode"].as_u64()?,
                ),
            ))
        })
        .collect()
}

#[test]
fn twenty_parked_services_add_no_thread_beyond_the_pool_and_one_keeper() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::new().unwrap();
    sandbox
        .start_daemon_with(&["--restore-threads", &POOL.to_string()])
        .unwrap();
    let daemon = sandbox.daemon_pid().unwrap();
    let threads_before = threads(daemon);

    let server = binary("hello-server").display().to_string();
    for index in 0..SERVICES {
        let port = FIRST_PORT + index;
        sandbox
            .add_ok(
                &format!("hello-{index}"),
                port,
                &["--ready", "tcp"],
                &[server.clone(), format!("127.0.0.1:{port}")],
            )
            .unwrap();
    }
    // Every one parked with its skeleton prepared.
    wait_until(Duration::from_secs(60), || {
        let statuses = sandbox.status().unwrap();
        statuses.len() == usize::from(SERVICES)
            && statuses
                .iter()
                .all(|s| s["state"] == "parked" && s["skeleton_pid"].is_i64())
    })
    .unwrap_or_else(|_| panic!("not all parked: {:?}", sandbox.status()));

    let threads_after = threads(daemon);
    assert!(
        threads_after.len() <= threads_before.len() + POOL,
        "{SERVICES} parked services took the agent from {threads_before:?} to {threads_after:?} (pool of {POOL})"
    );

    // One keeper, holding every service's listener.
    let records = keeper_records(&sandbox);
    assert_eq!(records.len(), usize::from(SERVICES), "{records:?}");
    let keepers: BTreeSet<i32> = records.values().map(|(pid, _)| *pid).collect();
    assert_eq!(keepers.len(), 1, "{records:?}");
    let keeper = *keepers.first().unwrap();
    let held = socket_inodes(keeper);
    for (name, (_, inode)) in &records {
        assert!(
            held.contains(inode),
            "the keeper does not hold {name}'s listener"
        );
    }
    let held_once = |held: &[u64]| {
        records
            .values()
            .all(|(_, inode)| held.iter().filter(|h| *h == inode).count() == 1)
    };
    assert!(held_once(&held), "{held:?}");

    // Services still wake, on whichever pool thread.
    for index in [0, SERVICES - 1] {
        let port = FIRST_PORT + index;
        let body = sandbox.http_get(port).unwrap();
        assert!(!body.is_empty(), "hello-{index} answered nothing");
    }

    // With the daemon killed, the keeper alone keeps every port listening.
    sandbox.kill_daemon();
    for index in 0..SERVICES {
        let port = FIRST_PORT + index;
        sandbox
            .netns
            .enter(|| TcpStream::connect(("127.0.0.1", port)))
            .expect("entering the test namespace")
            .unwrap_or_else(|err| panic!("port {port} refused with the daemon down: {err}"));
    }

    // The restarted daemon takes the sockets back from the same keeper,
    // which goes on holding each once.
    sandbox.start_daemon().unwrap();
    wait_until(Duration::from_secs(60), || {
        sandbox
            .status()
            .is_ok_and(|statuses| statuses.len() == usize::from(SERVICES))
    })
    .unwrap();
    let records_after = keeper_records(&sandbox);
    assert_eq!(records_after, records, "the keeper changed");
    let held = socket_inodes(keeper);
    assert!(held_once(&held), "{held:?}");
    assert_eq!(
        sandbox
            .http_get(FIRST_PORT)
            .map(|body| body.is_empty())
            .ok(),
        Some(false)
    );
}

#[test]
fn the_port_keeper_exits_with_its_daemon_once_it_holds_no_socket() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::with_daemon().unwrap();
    let server = binary("hello-server").display().to_string();
    let port = FIRST_PORT + SERVICES + 1;
    sandbox
        .add_ok(
            "hello",
            port,
            &["--ready", "tcp"],
            &[server, format!("127.0.0.1:{port}")],
        )
        .unwrap();
    let (keeper, _) = keeper_records(&sandbox)["hello"];
    // A zombie waiting for its new parent to reap it counts as gone.
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
    };

    // Removed, the service's socket is dropped, but the keeper waits for
    // its daemon: a service added next is handed to it.
    let removed = sandbox.agent(&["remove", "hello"]);
    assert!(removed.status.success(), "{removed:?}");
    assert!(keeper_records(&sandbox).is_empty());
    assert!(alive(keeper), "the keeper exited with its daemon running");

    // With its daemon gone and nothing held, nothing is left running.
    sandbox.stop_daemon();
    wait_until(Duration::from_secs(5), || !alive(keeper)).unwrap_or_else(|_| {
        panic!("the port keeper {keeper} outlived its daemon holding no socket")
    });
}
