//! Services declared in files of the daemon's services directory: applied
//! at start, by `persist-agent reload` and on SIGHUP, checked by
//! `persist-agent check`, a broken file failing its own service alone.

use std::time::Duration;

use persist_tests::{Sandbox, binary, wait_until};

fn hello_server() -> String {
    binary("hello-server").display().to_string()
}

/// A service file for the bundled hello-server, started fresh on each wake
/// with its listener passed as fd 3.
fn exec_service(port: u16) -> String {
    format!(
        "port = {port}\nmode = \"exec\"\ncommand = [\"{}\"]\n",
        hello_server()
    )
}

/// A service file for the bundled hello-server in snapshot mode.
fn snapshot_service(port: u16) -> String {
    format!(
        "port = {port}\ncommand = [\"{}\", \"127.0.0.1:{port}\"]\nready = \"tcp\"\nidle_timeout = \"1h\"\n",
        hello_server()
    )
}

fn names(sandbox: &Sandbox) -> Vec<String> {
    let mut names: Vec<String> = sandbox
        .status()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    names.sort();
    names
}

fn assert_serves(sandbox: &Sandbox, port: u16, who: &str) {
    let body = sandbox.http_get(port).unwrap_or_else(|err| {
        panic!(
            "{who} on port {port} does not answer: {err:#}\ndaemon log:\n{}",
            sandbox.daemon_log()
        )
    });
    assert!(
        body.starts_with("hello from pid"),
        "{who} on port {port} answered {body:?}"
    );
}

fn refuses(sandbox: &Sandbox, port: u16) -> bool {
    sandbox
        .netns
        .enter(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_err())
        .unwrap()
}

#[test]
fn services_follow_their_files_on_reload_and_sighup() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::new().unwrap();
    sandbox.declare("first", &exec_service(8080));
    sandbox.start_daemon().unwrap();
    assert_eq!(
        sandbox.service("first").unwrap()["state"],
        "parked",
        "a file present at start declares its service before the daemon answers"
    );
    assert_serves(&sandbox, 8080, "first");
    sandbox
        .add_ok("by-hand", 8090, &["--exec"], &[hello_server()])
        .unwrap();

    sandbox.declare("second", &snapshot_service(8081));
    let reloaded = sandbox.agent_ok(&["reload"]).unwrap();
    assert!(
        reloaded.contains("added second") && reloaded.contains("unchanged first"),
        "reload says what it did: {reloaded}"
    );
    assert_eq!(sandbox.service("second").unwrap()["mode"], "snapshot");
    assert_serves(&sandbox, 8081, "second, added by reload");

    // Changed and removed files, applied on SIGHUP.
    sandbox.declare("first", &exec_service(8082));
    std::fs::remove_file(sandbox.services_dir().join("second.toml")).unwrap();
    let daemon = nix::unistd::Pid::from_raw(sandbox.daemon_pid().unwrap());
    nix::sys::signal::kill(daemon, nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_until(Duration::from_secs(10), || {
        names(&sandbox) == ["by-hand", "first"]
            && sandbox
                .service("first")
                .is_ok_and(|first| first["port"] == 8082)
    })
    .unwrap_or_else(|_| {
        panic!(
            "SIGHUP did not rebuild first on 8082 and remove second: {:?}\ndaemon log:\n{}",
            sandbox.status(),
            sandbox.daemon_log()
        )
    });
    assert_serves(&sandbox, 8082, "first, rebuilt on its new port");
    // A stopped service's process may take a moment to die and drop its socket.
    wait_until(Duration::from_secs(5), || {
        refuses(&sandbox, 8080) && refuses(&sandbox, 8081)
    })
    .expect("the ports of rebuilt first (8080) and of removed second (8081) are released");
    assert_serves(&sandbox, 8090, "the service added by hand, untouched");

    let removed = sandbox.agent(&["remove", "first"]);
    let stderr = String::from_utf8_lossy(&removed.stderr);
    assert!(
        !removed.status.success()
            && stderr.contains("first is declared in")
            && stderr.contains("first.toml"),
        "`remove` of a declared service points at its file: {stderr}"
    );
    assert_eq!(names(&sandbox), ["by-hand", "first"]);
}

#[test]
fn a_broken_file_is_named_by_check_and_fails_only_its_own_service() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::new().unwrap();
    sandbox.declare("good", &exec_service(8080));
    sandbox.declare(
        "typo",
        &format!("{}idel_timeout = \"30s\"\n", exec_service(8081)),
    );
    sandbox.declare(
        "badvalue",
        &format!("{}idle_timeout = \"soon\"\n", exec_service(8082)),
    );

    let dir = sandbox.services_dir();
    let checked = sandbox.agent(&["check", dir.to_str().unwrap()]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr),
    );
    assert!(
        !checked.status.success(),
        "check fails on broken files: {stdout}{stderr}"
    );
    assert!(
        stderr.contains("typo.toml:4: idel_timeout: unknown field `idel_timeout`"),
        "check names file, line and key of the typo: {stderr}"
    );
    assert!(
        stderr.contains("badvalue.toml:4: idle_timeout: \"soon\" is not a duration"),
        "check names file, line and key of the bad value: {stderr}"
    );
    assert!(
        stdout.contains("good.toml: ok"),
        "the good file passes: {stdout}"
    );

    sandbox.start_daemon().unwrap();
    for (name, line) in [
        ("typo", "typo.toml:4: idel_timeout"),
        ("badvalue", "badvalue.toml:4: idle_timeout"),
    ] {
        let failed = sandbox.service(name).unwrap();
        assert_eq!(failed["state"], "failed", "{name}: {failed}");
        let error = failed["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(line),
            "status names the file and line: {error}"
        );
    }
    assert_serves(&sandbox, 8080, "good, beside two broken files");

    // Fixed, the typo'd service comes up; broken, a running service runs on.
    sandbox.declare(
        "typo",
        &format!("{}idle_timeout = \"30s\"\n", exec_service(8081)),
    );
    sandbox.declare("good", &format!("{}port = 9000\n", exec_service(8080)));
    let reloaded = sandbox.agent(&["reload"]);
    let stderr = String::from_utf8_lossy(&reloaded.stderr);
    assert!(
        !reloaded.status.success(),
        "a reload with a broken file fails"
    );
    assert!(
        stderr.contains("added typo") && stderr.contains("good.toml:4: port: duplicate key"),
        "the reload says what it applied and what is broken: {stderr}"
    );
    assert_serves(&sandbox, 8081, "typo, fixed");
    assert_serves(&sandbox, 8080, "good, running on its earlier definition");
    let good = sandbox.service("good").unwrap();
    assert_ne!(good["state"], "failed");
    assert!(
        good["error"]
            .as_str()
            .unwrap_or_default()
            .contains("good.toml:4"),
        "status shows the broken file beside the running service: {good}"
    );
}

#[test]
fn a_restarted_daemon_keeps_running_declared_services_and_applies_what_changed_meanwhile() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::new().unwrap();
    sandbox.declare("kept", &exec_service(8080));
    sandbox.declare("dropped", &exec_service(8081));
    sandbox.start_daemon().unwrap();
    assert_serves(&sandbox, 8080, "kept");
    let pid = sandbox.running_pid("kept").unwrap();

    sandbox.stop_daemon();
    std::fs::remove_file(sandbox.services_dir().join("dropped.toml")).unwrap();
    sandbox.start_daemon().unwrap();
    assert_eq!(
        names(&sandbox),
        ["kept"],
        "a file removed while the daemon was down removes its service at the next start"
    );
    assert_eq!(
        sandbox.running_pid("kept").unwrap(),
        pid,
        "an unchanged declared service is found running again, not restarted"
    );
    assert_serves(&sandbox, 8080, "kept, after the restart");
    wait_until(Duration::from_secs(5), || refuses(&sandbox, 8081))
        .expect("the port of the service whose file went is released");
}
