//! systemd's `Type=notify`: the daemon sends `READY=1` on `NOTIFY_SOCKET`
//! once its BPF program is attached and the services it found are back (a
//! SYN then wakes them), `STOPPING=1` when it stops, and its services do not
//! inherit its notification socket.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use persist_tests::{Sandbox, binary};

/// The next notification on `socket`, as text.
fn next_message(socket: &UnixDatagram) -> String {
    let mut buffer = [0u8; 4096];
    let len = socket
        .recv(&mut buffer)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buffer[..len]).into_owned()
}

#[test]
fn daemon_is_ready_once_its_services_are_back_and_says_when_it_stops() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::with_daemon().unwrap();
    let server = binary("hello-server").display().to_string();
    sandbox
        .add_ok("hello", 8701, &["--exec"], &[server])
        .expect("add of an --exec service");
    sandbox.stop_daemon();

    let path = sandbox.state_dir().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    sandbox
        .start_daemon_with_env(&[], &[("NOTIFY_SOCKET", path.to_str().unwrap())])
        .unwrap();
    let ready = next_message(&socket);
    assert!(
        ready.lines().any(|line| line == "READY=1"),
        "the daemon says READY=1: {ready:?}"
    );
    assert_eq!(
        sandbox.service("hello").unwrap()["state"],
        "parked",
        "the service it found again is registered by then"
    );

    let body = sandbox.http_get(8701).unwrap();
    assert!(
        body.starts_with("hello from pid"),
        "a SYN wakes it: {body:?}"
    );
    let pid = sandbox.running_pid("hello").unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        !environ
            .split(|byte| *byte == 0)
            .any(|entry| entry.starts_with(b"NOTIFY_SOCKET=")),
        "the service does not inherit the daemon's NOTIFY_SOCKET"
    );

    sandbox.stop_daemon();
    let stopping = next_message(&socket);
    assert!(
        stopping.lines().any(|line| line == "STOPPING=1"),
        "the daemon says STOPPING=1 on SIGTERM: {stopping:?}"
    );
}
