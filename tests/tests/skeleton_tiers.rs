//! Tiers of parking: a parked snapshot service keeps a prepared skeleton
//! (`--keep-skeleton always`, or `auto` within the daemon's
//! `--skeleton-budget`) or only its image on disk (`never`, or an `auto`
//! one released for the budget), in which case its wake prepares the
//! skeleton on the SYN's path (a cold wake). Every one of them answers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use persist_tests::{Sandbox, binary, build_hello_image, edit_manifest, wait_until};

fn hello_command(port: u16) -> Vec<String> {
    vec![
        binary("hello-server").display().to_string(),
        format!("127.0.0.1:{port}"),
    ]
}

/// Waits until every named service is parked with its next wake `prepared`
/// or `on disk`, as given.
fn wait_for_tiers(sandbox: &Sandbox, tiers: &[(&str, &str)]) {
    let mut last = Vec::new();
    let reached = wait_until(Duration::from_secs(20), || {
        let Ok(status) = sandbox.status() else {
            return false;
        };
        last = status.clone();
        tiers.iter().all(|(name, tier)| {
            status.iter().any(|s| {
                s["name"] == *name
                    && s["state"] == "parked"
                    && s["skeleton"] == *tier
                    && s["skeleton_pid"].is_i64() == (*tier == "prepared")
            })
        })
    });
    assert!(
        reached.is_ok(),
        "expected {tiers:?}; status: {last:#?}\ndaemon log:\n{}",
        sandbox.daemon_log()
    );
}

fn answers(sandbox: &Sandbox, port: u16) {
    let body = sandbox
        .http_get(port)
        .unwrap_or_else(|err| panic!("GET on port {port}: {err:#}\n{}", sandbox.daemon_log()));
    assert!(
        body.contains("hello from pid"),
        "port {port} answered {body:?}"
    );
}

#[test]
fn a_service_that_never_keeps_a_skeleton_wakes_cold_and_parks_without_one() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::new().unwrap();
    sandbox.start_daemon().unwrap();
    sandbox
        .add_ok(
            "cold",
            8611,
            &["--keep-skeleton", "never"],
            &hello_command(8611),
        )
        .unwrap();
    sandbox
        .add_ok("warm", 8612, &[], &hello_command(8612))
        .unwrap();
    wait_for_tiers(&sandbox, &[("cold", "on disk"), ("warm", "prepared")]);
    let cold = sandbox.service("cold").unwrap();
    let warm = sandbox.service("warm").unwrap();
    assert_eq!(cold["keep_skeleton"], "never", "{cold}");
    assert!(cold["skeleton_bytes"].is_null(), "{cold}");
    let cost = |s: &serde_json::Value| s["parked_bytes"].as_u64().unwrap();
    // The same keeper and agent share, without the skeleton.
    assert!(
        cost(&cold) + warm["skeleton_bytes"].as_u64().unwrap() / 2 < cost(&warm),
        "parked without a skeleton costs less: cold {cold}\nwarm {warm}"
    );

    // Several clients at once: the first SYN's cold wake answers them all.
    let bodies = sandbox
        .netns
        .enter(|| {
            let clients: Vec<_> = (0..4)
                .map(|_| std::thread::spawn(|| persist_tests::http_get(8611)))
                .collect();
            clients
                .into_iter()
                .map(|client| client.join().expect("client thread"))
                .collect::<Vec<_>>()
        })
        .unwrap();
    for body in bodies {
        let body = body.unwrap_or_else(|err| panic!("{err:#}\n{}", sandbox.daemon_log()));
        assert!(body.contains("hello from pid"), "{body:?}");
    }
    let pid = sandbox.running_pid("cold").unwrap();
    assert_eq!(sandbox.service("cold").unwrap()["wakes"], 1);
    // Prepared at real-time priority, it runs with the ordinary one.
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit(") ").next().unwrap().split(' ').collect();
        // `policy`, field 41 of stat(5), 39th after the name.
        assert_eq!(
            fields[38],
            "0",
            "thread {:?} of {pid}: {stat}",
            task.file_name()
        );
    }
    sandbox.agent_ok(&["park", "cold"]).unwrap();
    wait_for_tiers(&sandbox, &[("cold", "on disk")]);

    for wake in 2..=3 {
        answers(&sandbox, 8611);
        sandbox.running_pid("cold").unwrap();
        let status = sandbox.service("cold").unwrap();
        assert_eq!(status["wakes"], wake, "{status}");
        sandbox.agent_ok(&["park", "cold"]).unwrap();
        wait_for_tiers(&sandbox, &[("cold", "on disk")]);
    }
    let log = sandbox.daemon_log();
    assert!(
        log.contains("by=\"syn-thread\"") || log.contains("by=syn-thread"),
        "the SYN's own thread prepared and resumed the cold wakes: {log}"
    );
}

#[test]
fn a_budget_releases_the_least_recently_woken_auto_skeletons_and_keeps_always_ones() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::new().unwrap();
    // First without a budget, to learn what one skeleton costs here.
    sandbox.start_daemon().unwrap();
    sandbox
        .add_ok(
            "a",
            8621,
            &["--keep-skeleton", "always"],
            &hello_command(8621),
        )
        .unwrap();
    sandbox
        .add_ok("b", 8622, &[], &hello_command(8622))
        .unwrap();
    sandbox
        .add_ok("c", 8623, &[], &hello_command(8623))
        .unwrap();
    wait_for_tiers(
        &sandbox,
        &[("a", "prepared"), ("b", "prepared"), ("c", "prepared")],
    );
    let costs: Vec<u64> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            sandbox.service(name).unwrap()["skeleton_bytes"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let largest = *costs.iter().max().unwrap();
    // Room for two skeletons: the `always` one and one `auto` one.
    let budget = 2 * largest + largest / 2;
    sandbox.stop_daemon();

    sandbox
        .start_daemon_with(&["--skeleton-budget", &budget.to_string()])
        .unwrap();
    // None woken yet: by name, b goes first.
    wait_for_tiers(
        &sandbox,
        &[("a", "prepared"), ("b", "on disk"), ("c", "prepared")],
    );
    assert_eq!(sandbox.service("a").unwrap()["keep_skeleton"], "always");
    assert_eq!(sandbox.service("b").unwrap()["keep_skeleton"], "auto");

    // b wakes cold, and once parked keeps its skeleton: c, never woken,
    // loses its own.
    answers(&sandbox, 8622);
    sandbox.running_pid("b").unwrap();
    sandbox.agent_ok(&["park", "b"]).unwrap();
    wait_for_tiers(
        &sandbox,
        &[("a", "prepared"), ("b", "prepared"), ("c", "on disk")],
    );

    // Then c: b is now the least recently woken.
    answers(&sandbox, 8623);
    sandbox.running_pid("c").unwrap();
    sandbox.agent_ok(&["park", "c"]).unwrap();
    wait_for_tiers(
        &sandbox,
        &[("a", "prepared"), ("b", "on disk"), ("c", "prepared")],
    );

    for port in [8621, 8622, 8623] {
        answers(&sandbox, port);
    }
    let table = sandbox.agent_ok(&["status"]).unwrap();
    assert!(
        table.contains(&format!("of a {} KiB budget", budget / 1024)),
        "status shows the budget: {table}"
    );
}

#[test]
fn the_tiers_survive_a_daemon_restart() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::new().unwrap();
    sandbox.start_daemon().unwrap();
    sandbox
        .add_ok(
            "cold",
            8631,
            &["--keep-skeleton", "never"],
            &hello_command(8631),
        )
        .unwrap();
    sandbox
        .add_ok(
            "pinned",
            8632,
            &["--keep-skeleton", "always"],
            &hello_command(8632),
        )
        .unwrap();
    wait_for_tiers(&sandbox, &[("cold", "on disk"), ("pinned", "prepared")]);
    sandbox.stop_daemon();

    // A budget too small for any skeleton: the `always` one stays anyway.
    sandbox
        .start_daemon_with(&["--skeleton-budget", "1KiB", "--metrics", "127.0.0.1:9633"])
        .unwrap();
    wait_for_tiers(&sandbox, &[("cold", "on disk"), ("pinned", "prepared")]);
    let metrics = sandbox.metrics_page(9633);
    let held = sandbox.service("pinned").unwrap()["skeleton_bytes"]
        .as_u64()
        .unwrap();
    for (metric, expected) in [
        ("persist_skeletons_held", 1),
        ("persist_skeleton_budget_bytes", 1024),
        ("persist_skeleton_bytes", held),
    ] {
        let line = format!("{metric} {expected}");
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in {metrics}"
        );
    }
    assert_eq!(sandbox.service("cold").unwrap()["keep_skeleton"], "never");
    assert_eq!(
        sandbox.service("pinned").unwrap()["keep_skeleton"],
        "always"
    );
    answers(&sandbox, 8631);
    answers(&sandbox, 8632);
}

#[test]
fn a_cold_wake_that_cannot_prepare_closes_its_client_and_says_why() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let images = tempfile::tempdir().unwrap();
    let image = images.path().join("hello");
    build_hello_image(&sandbox, &image, 8641, &[]);
    let image_text = image.display().to_string();
    sandbox
        .agent_ok(&[
            "add",
            "cold",
            "--image",
            &image_text,
            "--port",
            "8641",
            "--keep-skeleton",
            "never",
        ])
        .unwrap();
    wait_for_tiers(&sandbox, &[("cold", "on disk")]);
    // Replaced while parked on disk by an image of another kernel build.
    edit_manifest(&image, |manifest| {
        manifest["kernel"]["release"] = "5.10.0-ancient".into();
    });

    let got = sandbox
        .netns
        .enter(|| -> std::io::Result<String> {
            let mut stream = TcpStream::connect(("127.0.0.1", 8641))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .unwrap();
    match got {
        Ok(response) => assert!(response.is_empty(), "answered: {response:?}"),
        Err(err) => assert!(
            !matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the client of a cold wake that failed hangs: {err}"
        ),
    }
    let mut status = serde_json::Value::Null;
    wait_until(Duration::from_secs(10), || {
        status = sandbox.service("cold").unwrap();
        status["state"] == "stale"
    })
    .unwrap_or_else(|_| panic!("not shown stale: {status}\n{}", sandbox.daemon_log()));
    let error = status["error"].as_str().unwrap_or_default();
    assert!(error.contains("5.10.0-ancient"), "{status}");
    assert!(status["pid"].is_null(), "{status}");
}
