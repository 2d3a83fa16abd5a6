//! Adds that run at once: the daemon builds several services' images at the
//! same time, a failing add undoes only itself, and two adds of one name or
//! one port never both register.

use std::process::Output;

use persist_tests::stderr;
use persist_tests::{Sandbox, binary};

/// Runs `persist-agent add` for every `(name, port, options, command)` at
/// once, each from its own thread, and returns their outputs in order.
fn add_at_once(sandbox: &Sandbox, adds: &[(String, u16, Vec<&str>, Vec<String>)]) -> Vec<Output> {
    std::thread::scope(|scope| {
        let threads: Vec<_> = adds
            .iter()
            .map(|(name, port, options, command)| {
                scope.spawn(move || sandbox.add(name, *port, options, command))
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| thread.join().expect("an add thread panicked"))
            .collect()
    })
}

fn hello(port: u16) -> Vec<String> {
    vec![
        binary("hello-server").display().to_string(),
        format!("127.0.0.1:{port}"),
    ]
}

#[test]
fn eight_adds_at_once_all_register_and_a_failing_one_fails_alone() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let mut adds: Vec<_> = (0..8u16)
        .map(|index| {
            let port = 8600 + index;
            (format!("hello-{index}"), port, vec![], hello(port))
        })
        .collect();
    // Never listens: its readiness times out while the others build.
    adds.push((
        "never-ready".to_owned(),
        8690,
        vec!["--ready-timeout", "3s"],
        vec!["/bin/sleep".to_owned(), "60".to_owned()],
    ));
    let outputs = add_at_once(&sandbox, &adds);

    for ((name, ..), output) in adds.iter().zip(&outputs).take(8) {
        assert!(
            output.status.success(),
            "{name}: {}\n{}",
            stderr(output),
            sandbox.daemon_log()
        );
    }
    let failed = &outputs[8];
    assert!(!failed.status.success(), "the never-ready add fails");
    assert!(
        stderr(failed).contains("not ready within"),
        "it says why: {}",
        stderr(failed)
    );

    let statuses = sandbox.status().unwrap();
    let names: Vec<&str> = statuses.iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(
        names.len(),
        8,
        "the eight, and nothing of the failed one: {names:?}"
    );
    assert!(!names.contains(&"never-ready"), "{names:?}");
    assert!(
        statuses.iter().all(|s| s["state"] == "parked"),
        "all parked: {statuses:?}"
    );
    assert!(
        !sandbox.state_dir().join("images/never-ready").exists(),
        "the failed add left no image"
    );
    // Every one wakes on its own port, answered by the process built for it.
    for index in 0..8u16 {
        let answer = sandbox.http_get(8600 + index).unwrap();
        let pid = sandbox.running_pid(&format!("hello-{index}")).unwrap();
        assert!(
            answer.contains(&format!("hello from pid {pid}")),
            "hello-{index}: {answer}"
        );
    }
    // The failed one's port is free to add again.
    sandbox
        .add_ok("late", 8690, &[], &hello(8690))
        .expect("the failed add's port is free again");
}

#[test]
fn two_adds_of_one_name_or_one_port_at_once_register_one() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let adds = vec![
        ("twin".to_owned(), 8700, vec![], hello(8700)),
        ("twin".to_owned(), 8701, vec![], hello(8701)),
        ("left".to_owned(), 8702, vec![], hello(8702)),
        ("right".to_owned(), 8702, vec![], hello(8702)),
    ];
    let outputs = add_at_once(&sandbox, &adds);
    let succeeded = |range: std::ops::Range<usize>| {
        outputs[range]
            .iter()
            .filter(|output| output.status.success())
            .count()
    };
    assert_eq!(succeeded(0..2), 1, "one twin: {outputs:?}");
    assert_eq!(succeeded(2..4), 1, "one of left and right: {outputs:?}");
    let refusals: Vec<String> = outputs
        .iter()
        .filter(|output| !output.status.success())
        .map(stderr)
        .collect();
    assert!(
        refusals
            .iter()
            .any(|text| text.contains("a service named twin already exists")),
        "{refusals:?}"
    );
    assert!(
        refusals
            .iter()
            .any(|text| text.contains("port 8702 is already taken")),
        "{refusals:?}"
    );

    let statuses = sandbox.status().unwrap();
    assert_eq!(statuses.len(), 2, "{statuses:?}");
    let twin = sandbox.service("twin").unwrap();
    let twin_port = twin["port"].as_u64().unwrap() as u16;
    assert!(
        sandbox
            .http_get(twin_port)
            .unwrap()
            .contains("hello from pid"),
        "the twin that won answers on its port"
    );
    assert!(
        sandbox.http_get(8702).unwrap().contains("hello from pid"),
        "whichever of left and right won answers"
    );
    // The losing twin left nothing listening on its port.
    let other_port = if twin_port == 8700 { 8701 } else { 8700 };
    assert!(
        sandbox.http_get(other_port).is_err(),
        "nothing answers on port {other_port}"
    );
}

/// The soft and hard limits on open files of `pid`, from /proc/PID/limits.
fn open_files_limit(pid: i64) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("a line for open files")
        .to_owned();
    let mut values = line["Max open files".len()..].split_whitespace();
    (
        values.next().expect("soft").to_owned(),
        values.next().expect("hard").to_owned(),
    )
}

/// The daemon raises its own limit on open files (it holds descriptors for
/// every service), but a service it starts, and the same service woken
/// from its image, run with the limit they would have had without it.
#[test]
fn the_daemon_raises_its_open_files_limit_but_not_its_services() {
    persist_tests::require_root!();
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    // The usual soft limit below the hard one, as a login shell or systemd
    // gives, for the daemon this test starts (the other tests of this file
    // hold few descriptors).
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(hard > 1024, "the hard limit on open files is {hard}");
    setrlimit(Resource::RLIMIT_NOFILE, 1024, hard).unwrap();
    let sandbox = Sandbox::with_daemon().unwrap();
    let ours = open_files_limit(std::process::id().into());
    assert_eq!(ours.0, "1024");
    let daemon = open_files_limit(sandbox.daemon_pid().expect("the daemon runs").into());
    assert_eq!(
        daemon,
        (hard.min(1 << 20).to_string(), ours.1.clone()),
        "the daemon's soft limit is raised to the hard one"
    );
    sandbox.add_ok("limits", 8695, &[], &hello(8695)).unwrap();
    assert!(sandbox.http_get(8695).unwrap().contains("hello from pid"));
    let pid = sandbox.running_pid("limits").unwrap();
    assert_eq!(
        open_files_limit(pid),
        ours,
        "the woken service has the limits the daemon was started with"
    );
}
