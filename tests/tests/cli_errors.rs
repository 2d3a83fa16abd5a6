//! Every bad input gets exit code 1 and one clear line.

use std::process::Output;

use persist_tests::{Sandbox, binary};

fn failure(output: &Output) -> String {
    assert_eq!(
        output.status.code(),
        Some(1),
        "exit code 1 expected: {output:?}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

#[test]
fn unknown_service_is_named() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let err = failure(&sandbox.agent(&["remove", "nope"]));
    assert!(err.ends_with("unknown service: nope"), "{err}");
    let err = failure(&sandbox.agent(&["status", "nope"]));
    assert!(err.ends_with("unknown service: nope"), "{err}");
}

#[test]
fn status_shows_the_services_named_and_only_them() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let server = binary("hello-server").display().to_string();
    for (name, port) in [("a", "9000"), ("b", "9001")] {
        sandbox
            .agent_ok(&["add", name, "--port", port, "--exec", "--", &server])
            .unwrap();
    }
    let names = |asked: &[&str]| -> Vec<String> {
        let services = sandbox.status_of(asked).unwrap();
        services
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&[]), ["a", "b"]);
    assert_eq!(names(&["b"]), ["b"]);
    assert_eq!(names(&["b", "a"]), ["a", "b"]);
    let table = sandbox.agent_ok(&["status", "a"]).unwrap();
    assert!(table.contains("9000") && !table.contains("9001"), "{table}");
    let err = failure(&sandbox.agent(&["status", "a", "nope"]));
    assert!(err.ends_with("unknown service: nope"), "{err}");
}

#[test]
fn port_taken_by_a_service_or_another_process_is_refused() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let server = binary("hello-server").display().to_string();
    sandbox
        .agent_ok(&["add", "a", "--port", "9000", "--exec", "--", &server])
        .unwrap();
    let err = failure(&sandbox.agent(&["add", "b", "--port", "9000", "--exec", "--", &server]));
    assert!(
        err.ends_with("port 9000 is already taken by service a"),
        "{err}"
    );

    let _holder = sandbox
        .netns
        .enter(|| std::net::TcpListener::bind("127.0.0.1:9001").unwrap())
        .unwrap();
    let err = failure(&sandbox.agent(&["add", "c", "--port", "9001", "--exec", "--", &server]));
    assert!(
        err.ends_with("port 9001 on 127.0.0.1 is already in use"),
        "{err}"
    );
    assert_eq!(
        sandbox.status().unwrap().len(),
        1,
        "refused services are not registered"
    );
}

#[test]
fn missing_daemon_is_explained() {
    persist_tests::require_root!();
    let sandbox = Sandbox::new().unwrap();
    let err = failure(&sandbox.agent(&["status"]));
    assert!(err.contains("the persist daemon is not running"), "{err}");
}

#[test]
fn missing_command_is_named() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let err = failure(&sandbox.agent(&[
        "add",
        "x",
        "--port",
        "9002",
        "--exec",
        "--",
        "/no/such/server",
    ]));
    assert!(err.ends_with("command not found: /no/such/server"), "{err}");
}

#[test]
fn running_without_root_is_refused() {
    persist_tests::require_root!();
    let sandbox = Sandbox::new().unwrap();
    let output = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(binary("persist-agent"))
        .arg("--state-dir")
        .arg(sandbox.state_dir())
        .arg("status")
        .output()
        .unwrap();
    let err = failure(&output);
    assert!(err.contains("must run as root"), "{err}");
}

#[test]
fn a_service_file_with_a_typo_is_reported_and_the_others_still_run() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::new().unwrap();
    let services = sandbox.state_dir().join("services");
    std::fs::create_dir_all(&services).unwrap();
    std::fs::write(
        services.join("typo.json"),
        b"{\"name\": \"typo\", \"port\": 80,",
    )
    .unwrap();
    let server = binary("hello-server").display().to_string();
    let good = serde_json::json!({
        "name": "good", "addr": "127.0.0.1", "port": 9003, "mode": "exec",
        "idle_timeout": null, "command": [server],
    });
    std::fs::write(services.join("good.json"), good.to_string()).unwrap();
    sandbox.start_daemon().unwrap();

    let typo = sandbox.service("typo").unwrap();
    assert_eq!(typo["state"], "failed");
    assert!(
        typo["error"]
            .as_str()
            .unwrap()
            .contains("invalid service file"),
        "{typo}"
    );
    assert!(
        sandbox
            .http_get(9003)
            .unwrap()
            .starts_with("hello from pid")
    );
}

#[test]
fn an_os_error_is_named_once() {
    persist_tests::require_root!();
    let sandbox = Sandbox::new().unwrap();
    let err = failure(&sandbox.agent(&["inspect", "/nonexistent"]));
    assert_eq!(
        err,
        "persist-agent: error: /nonexistent: No such file or directory (os error 2)"
    );
    let err = failure(&sandbox.agent(&["restore", "--image", "/nonexistent"]));
    assert_eq!(
        err,
        "persist-agent: error: restore of /nonexistent: /nonexistent: No such file or directory (os error 2)"
    );
}

#[test]
fn idle_timeouts_out_of_range_and_an_image_with_a_command_are_refused() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let server = binary("hello-server").display().to_string();
    for (timeout, shown) in [("0s", "0s"), ("1000000000y", "1000000000years")] {
        let err = failure(&sandbox.agent(&[
            "add",
            "x",
            "--port",
            "9004",
            "--idle-timeout",
            timeout,
            "--exec",
            "--",
            &server,
        ]));
        assert!(
            err.ends_with(&format!(
                "idle timeout {shown} is out of range: use 100ms to 1year"
            )),
            "{timeout}: {err}"
        );
    }
    let images = tempfile::tempdir().unwrap();
    let image = images.path().display().to_string();
    let err = failure(&sandbox.agent(&[
        "add", "x", "--port", "9004", "--image", &image, "--", &server,
    ]));
    assert!(err.contains("--image takes no command"), "{err}");
    assert!(
        sandbox.status().unwrap().is_empty(),
        "refused services are not registered"
    );
}

#[test]
fn a_stored_service_with_settings_out_of_range_is_refused_by_the_daemon() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::new().unwrap();
    let services = sandbox.state_dir().join("services");
    std::fs::create_dir_all(&services).unwrap();
    let server = binary("hello-server").display().to_string();
    let quick = serde_json::json!({
        "name": "quick", "addr": "127.0.0.1", "port": 9005, "mode": "exec",
        "idle_timeout": "0s", "command": [server],
    });
    std::fs::write(services.join("quick.json"), quick.to_string()).unwrap();
    let prebuilt = serde_json::json!({
        "name": "prebuilt", "addr": "127.0.0.1", "port": 9006, "mode": "snapshot",
        "idle_timeout": null, "command": [server],
        "snapshot": {
            "ready": {"kind": "tcp"}, "ready_timeout": "30s", "on_idle": "fresh",
            "image": sandbox.state_dir().join("images/prebuilt"),
        },
    });
    std::fs::write(services.join("prebuilt.json"), prebuilt.to_string()).unwrap();
    sandbox.start_daemon().unwrap();

    for (name, expected) in [
        ("quick", "idle timeout 0s is out of range"),
        ("prebuilt", "--image takes no command"),
    ] {
        let service = sandbox.service(name).unwrap();
        assert_eq!(service["state"], "failed", "{service}");
        assert!(
            service["error"]
                .as_str()
                .is_some_and(|error| error.contains(expected)),
            "{service}"
        );
    }
}
/// Sends `request` on the daemon's control socket (from a thread, as the
/// daemon may stop reading it) and returns the reply line.
fn raw_request(sandbox: &Sandbox, request: Vec<u8>) -> String {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;

    let stream = UnixStream::connect(sandbox.state_dir().join("agent.sock")).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    // The daemon answers a request it refuses without reading it all, and
    // closes: the write's error is expected then.
    let sending = std::thread::spawn(move || {
        let _ = writer.write_all(&request);
    });
    let mut reply = String::new();
    let read = BufReader::new(&stream).read_line(&mut reply);
    drop(stream);
    sending.join().unwrap();
    read.unwrap_or_else(|err| panic!("no reply from the daemon: {err}"));
    reply
}

#[test]
fn an_endless_or_binary_request_is_refused_with_a_reply() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();

    // 2 MiB with no newline and a connection left open: the daemon must
    // not wait for the end of the line, nor hold all of it.
    let reply = raw_request(&sandbox, vec![b'a'; 2 << 20]);
    assert!(
        reply.contains("request longer than 1048576 bytes refused"),
        "an overlong request is refused by its length: {reply}"
    );

    let reply = raw_request(&sandbox, b"\xff\xfe{\n".to_vec());
    assert!(
        reply.contains("malformed request"),
        "a request that is not text is refused as malformed: {reply}"
    );
    assert!(
        sandbox.status().is_ok(),
        "the daemon answers status after both; log:\n{}",
        sandbox.daemon_log()
    );
}
