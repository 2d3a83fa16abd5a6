//! The wake path with services started fresh on their first SYN: a parked
//! service owns its port, bursts wake it once, idle parks it, and the daemon
//! can die and come back without losing services.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use persist_tests::{Sandbox, binary, wait_until};

fn hello_server() -> String {
    binary("hello-server").display().to_string()
}

fn add_hello(sandbox: &Sandbox, name: &str, port: u16, extra: &[&str]) {
    let mut options = vec!["--exec"];
    options.extend_from_slice(extra);
    sandbox
        .add_ok(name, port, &options, &[hello_server()])
        .expect("add succeeds");
}

#[test]
fn parked_service_owns_its_port_and_wakes_on_connect() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    add_hello(&sandbox, "hello", 8080, &[]);

    let parked = sandbox.service("hello").unwrap();
    assert_eq!(parked["state"], "parked", "a new service starts parked");
    assert!(parked["pid"].is_null(), "no process runs while parked");

    let body = sandbox.http_get(8080).unwrap();
    assert!(
        body.starts_with("hello from pid"),
        "served by the woken service: {body:?}"
    );

    let running = sandbox.service("hello").unwrap();
    assert_eq!(running["state"], "running");
    assert_eq!(running["wakes"], 1);
    assert!(
        running["syns"].as_u64().unwrap() >= 1,
        "BPF counted the SYN: {running}"
    );
    assert!(
        running["last_wake_us"].as_u64().is_some(),
        "wake latency recorded: {running}"
    );
    let pid = running["pid"].as_i64().unwrap();
    assert_eq!(body.trim(), format!("hello from pid {pid}"));
    assert!(
        running["rss_bytes"].as_u64().unwrap() > 0,
        "RSS of a running service"
    );

    let links = std::process::Command::new("bpftool")
        .args(["link", "show"])
        .output()
        .expect("bpftool runs");
    let links = String::from_utf8_lossy(&links.stdout);
    let ino = sandbox.netns.inode().unwrap();
    assert!(
        links.contains(&format!("netns_ino {ino}")) && links.contains("sk_lookup"),
        "bpftool shows our sk_lookup link on namespace {ino}:\n{links}"
    );
}

#[test]
fn burst_of_300_connections_is_served_with_one_wake() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    add_hello(&sandbox, "burst", 8081, &[]);

    let bodies = sandbox
        .netns
        .enter(|| {
            // Every connection is open before the service even exists: the
            // agent's listener queues them all.
            let mut streams: Vec<TcpStream> = (0..300)
                .map(|i| {
                    TcpStream::connect(("127.0.0.1", 8081))
                        .unwrap_or_else(|err| panic!("connection {i} refused: {err}"))
                })
                .collect();
            streams
                .iter_mut()
                .map(|stream| {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(30)))
                        .unwrap();
                    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
                    let mut response = String::new();
                    stream.read_to_string(&mut response).unwrap();
                    response
                })
                .collect::<Vec<_>>()
        })
        .unwrap();

    let served = bodies
        .iter()
        .filter(|b| b.contains("hello from pid"))
        .count();
    assert_eq!(served, 300, "every queued connection is served");
    let status = sandbox.service("burst").unwrap();
    assert_eq!(status["wakes"], 1, "300 SYNs give one wake: {status}");
    assert_eq!(status["syns"], 300, "BPF counted every SYN: {status}");
}

#[test]
fn idle_timeout_parks_and_the_next_connection_wakes_again() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    add_hello(&sandbox, "idle", 8082, &["--idle-timeout", "300ms"]);

    let first = sandbox.http_get(8082).unwrap();
    let first_pid = sandbox.service("idle").unwrap()["pid"].as_i64();
    wait_until(Duration::from_secs(10), || {
        sandbox.service("idle").unwrap()["state"] == "parked"
    })
    .expect("parked again after the idle timeout");
    let parked = sandbox.service("idle").unwrap();
    assert!(parked["pid"].is_null());
    assert_eq!(
        parked["rss_bytes"], 0,
        "a parked exec service costs no memory"
    );
    let stopped = first_pid.unwrap() as i32;
    assert!(
        !std::path::Path::new(&format!("/proc/{stopped}/cmdline")).exists()
            || std::fs::read_to_string(format!("/proc/{stopped}/stat"))
                .unwrap_or_default()
                .contains(") Z"),
        "the idle process {stopped} was stopped"
    );

    let second = sandbox.http_get(8082).unwrap();
    assert_ne!(first, second, "a new process served the second wake");
    // The new process can answer before the supervisor, which forked it,
    // runs again and counts the wake.
    wait_until(Duration::from_secs(5), || {
        sandbox.service("idle").unwrap()["wakes"] == 2
    })
    .unwrap_or_else(|_| panic!("{}", sandbox.service("idle").unwrap()));
}

#[test]
fn services_survive_a_daemon_killed_with_sigkill() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::with_daemon().unwrap();
    add_hello(&sandbox, "running", 8083, &[]);
    add_hello(&sandbox, "parked", 8084, &[]);
    let body = sandbox.http_get(8083).unwrap();
    let pid = sandbox.service("running").unwrap()["pid"].as_i64().unwrap();

    sandbox.kill_daemon();
    // The running service still holds its socket while no daemon is there.
    assert_eq!(sandbox.http_get(8083).unwrap(), body);

    sandbox.start_daemon().unwrap();
    let running = sandbox.service("running").unwrap();
    assert_eq!(running["state"], "running", "found again: {running}");
    assert_eq!(
        running["pid"].as_i64(),
        Some(pid),
        "the same process, not a second one"
    );
    assert_eq!(sandbox.http_get(8083).unwrap(), body);

    let parked = sandbox.service("parked").unwrap();
    assert_eq!(parked["state"], "parked");
    let woken = sandbox.http_get(8084).unwrap();
    assert!(woken.starts_with("hello from pid"), "{woken:?}");
}

#[test]
fn inetd_mode_starts_one_process_per_connection() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    sandbox
        .agent_ok(&[
            "add",
            "echo",
            "--port",
            "8085",
            "--inetd",
            "--",
            "/bin/sh",
            "-c",
            "read line; echo \"got $line from $$\"",
        ])
        .unwrap();
    let replies = sandbox
        .netns
        .enter(|| {
            (0..2)
                .map(|i| {
                    let mut stream = TcpStream::connect(("127.0.0.1", 8085)).unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    writeln!(stream, "ping{i}").unwrap();
                    let mut reply = String::new();
                    stream.read_to_string(&mut reply).unwrap();
                    reply
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    assert!(replies[0].starts_with("got ping0 from "), "{replies:?}");
    assert!(replies[1].starts_with("got ping1 from "), "{replies:?}");
    assert_ne!(
        replies[0].rsplit(' ').next(),
        replies[1].rsplit(' ').next(),
        "each connection had its own process"
    );
    wait_until(Duration::from_secs(10), || {
        sandbox.service("echo").unwrap()["state"] == "parked"
    })
    .expect("parked once the last connection's process exits");
    assert!(sandbox.service("echo").unwrap()["wakes"].as_u64().unwrap() >= 1);
}

#[test]
fn a_service_that_exits_at_once_is_marked_failed_and_its_clients_are_not_left_hanging() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    sandbox
        .agent_ok(&[
            "add",
            "crash",
            "--port",
            "8086",
            "--exec",
            "--",
            "/bin/false",
        ])
        .unwrap();
    let reply = sandbox
        .netns
        .enter(|| {
            let mut stream = TcpStream::connect(("127.0.0.1", 8086)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let _ = stream.write_all(b"GET / HTTP/1.0\r\n\r\n");
            let mut reply = Vec::new();
            stream.read_to_end(&mut reply).map(|_| reply)
        })
        .unwrap();
    assert!(
        reply.as_ref().is_ok_and(Vec::is_empty) || reply.is_err(),
        "the queued client is closed, not served and not left hanging: {reply:?}"
    );
    let status = sandbox.service("crash").unwrap();
    assert_eq!(status["state"], "failed", "{status}");
    assert!(
        status["error"].as_str().unwrap().contains("exited within"),
        "{status}"
    );
}

#[test]
fn a_daemon_logging_to_a_file_writes_no_colour_codes() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    add_hello(&sandbox, "plain", 8096, &[]);
    sandbox.http_get(8096).unwrap();

    let log = sandbox.daemon_log();
    assert!(
        log.contains("sk_lookup program attached"),
        "the daemon logged its start: {log}"
    );
    assert!(
        !log.contains('\x1b'),
        "a log that is not a terminal holds no ANSI escape codes: {log:?}"
    );
}
