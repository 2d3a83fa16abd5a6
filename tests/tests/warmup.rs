//! The warm-up command of a snapshot-mode service: run once the service is
//! ready and before its snapshot, as the service's user, its output in the
//! service's log; a failing one fails the add and registers nothing.

use std::os::unix::fs::PermissionsExt;

use persist_tests::{Sandbox, binary};

fn hello(port: u16) -> Vec<String> {
    vec![
        binary("hello-server").display().to_string(),
        format!("127.0.0.1:{port}"),
    ]
}

#[test]
fn the_warmup_command_runs_as_the_service_user_against_the_ready_service() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let answer = dir.path().join("answer");
    let command = format!(
        "curl -s http://127.0.0.1:8701/ > {}.$(id -u) && echo warm-up done",
        answer.display()
    );
    sandbox
        .add_ok(
            "warm",
            8701,
            &["--user", "nobody", "--warmup-command", &command],
            &hello(8701),
        )
        .unwrap();
    let seen = std::fs::read_to_string(format!("{}.65534", answer.display()))
        .expect("the warm-up ran as nobody (uid 65534)");
    assert!(
        seen.contains("hello from pid"),
        "the warm-up reached the ready service: {seen:?}"
    );
    let log = sandbox.agent_ok(&["logs", "warm"]).unwrap();
    assert!(
        log.contains("warm-up done"),
        "its output is in the service's log: {log:?}"
    );
    assert!(sandbox.http_get(8701).unwrap().contains("hello from pid"));
}

#[test]
fn a_failing_warmup_command_fails_the_add_and_registers_nothing() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let output = sandbox.add("cold", 8702, &["--warmup-command", "exit 3"], &hello(8702));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the add fails");
    assert!(
        stderr.contains("warm-up command `exit 3`: exit status 3"),
        "it says why: {stderr}"
    );
    assert!(
        sandbox.status().unwrap().is_empty(),
        "nothing is registered"
    );
    // The port is free again for another add.
    sandbox.add_ok("cold", 8702, &[], &hello(8702)).unwrap();
}
