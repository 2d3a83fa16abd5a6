//! A checkpoint whose agent is SIGKILLed in the middle of its injected
//! system calls: the process stays stopped instead of running on with the
//! injected registers, and `recover` lets it go on as if nothing happened.
//! The same once everything is saved, its TCP connection held in repair
//! mode: `recover` takes it out of repair mode.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use persist_tests::{binary, run_ok, wait_until};

/// A python process that counts in a file every 10 ms, with a signal
/// handler (so that its handlers are asked about by injected calls).
struct Counter {
    child: Child,
}

impl Counter {
    fn start(file: &Path) -> Self {
        // Each count replaces the file whole, so a reader never sees it
        // truncated and empty.
        let script = "import os, signal, sys, time\n\
                      signal.signal(signal.SIGUSR1, lambda *_: None)\n\
                      n = 0\n\
                      while True:\n\
                      \x20   n += 1\n\
                      \x20   open(sys.argv[1] + '.tmp', 'w').write(str(n))\n\
                      \x20   os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n\
                      \x20   time.sleep(0.01)\n";
        let child = Command::new("python3")
            .args(["-c", script])
            .arg(file)
            .stdin(Stdio::null())
            .spawn()
            .expect("python3 starts");
        wait_until(Duration::from_secs(10), || count(file).is_some())
            .expect("the counter starts counting");
        Self { child }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn count(file: &Path) -> Option<u64> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// The state letter of `pid` (`T` when stopped), if it exists.
fn state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

#[test]
fn a_checkpoint_killed_mid_injection_leaves_the_process_stopped_and_recover_lets_it_go_on() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let counter_file = dir.path().join("count");
    let counter = Counter::start(&counter_file);
    let pid = counter.pid();
    let recovery = dir.path().join("recovery");

    // Paused after its first injected call, registers still changed.
    let mut agent = Command::new(binary("persist-agent"))
        .args(["checkpoint", "--leave-running", "--pid", &pid.to_string()])
        .arg("--image")
        .arg(dir.path().join("image"))
        .arg("--recovery-file")
        .arg(&recovery)
        .env("PERSIST_DEBUG_CHECKPOINT_PAUSE_MS", "30000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let injecting = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&recovery).is_ok_and(|text| text.contains("\"tid\""))
    });
    std::thread::sleep(Duration::from_millis(100));
    agent.kill().unwrap();
    agent.wait().unwrap();
    injecting.expect("the checkpoint never recorded an injection");

    // Left stopped, not running with the injected registers (it would crash).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        state(pid),
        Some('T'),
        "the process is not stopped after its tracer died"
    );
    let stopped_at = count(&counter_file).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        count(&counter_file),
        Some(stopped_at),
        "the process ran while the checkpoint was left undone"
    );

    let output = run_ok(
        Command::new(binary("persist-agent"))
            .arg("recover")
            .arg(&recovery),
    )
    .unwrap();
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("runs again"), "recover said: {said}");
    assert!(
        !recovery.exists(),
        "the recovery file is left after recover"
    );
    wait_until(Duration::from_secs(5), || {
        count(&counter_file).is_some_and(|n| n > stopped_at + 5)
    })
    .expect("the recovered process does not count on");
    assert!(
        matches!(state(pid), Some('S' | 'R')),
        "the recovered process is not running: {:?}",
        state(pid)
    );
}

#[test]
fn a_finished_checkpoint_leaves_no_recovery_file_and_the_process_running() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let counter_file = dir.path().join("count");
    let counter = Counter::start(&counter_file);
    let recovery = dir.path().join("recovery");
    run_ok(
        Command::new(binary("persist-agent"))
            .args(["checkpoint", "--leave-running", "--pid"])
            .arg(counter.pid().to_string())
            .arg("--image")
            .arg(dir.path().join("image"))
            .arg("--recovery-file")
            .arg(&recovery),
    )
    .unwrap();
    assert!(
        !recovery.exists(),
        "a finished checkpoint left its recovery file"
    );
    let after = count(&counter_file).unwrap();
    wait_until(Duration::from_secs(5), || {
        count(&counter_file).is_some_and(|n| n > after + 5)
    })
    .expect("the process does not count on after a checkpoint that let it run");
}

/// `TCP_REPAIR` of descriptor `fd` of `pid` (1 in repair mode).
fn tcp_repair_mode(pid: i32, fd: i32) -> i32 {
    let sock = persist_agent::sys::pidfd::PidFd::open(pid)
        .unwrap()
        .get_fd(fd)
        .unwrap();
    persist_agent::sys::kobjects::sockopt_int(
        std::os::fd::AsFd::as_fd(&sock),
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR,
    )
    .unwrap()
}

#[test]
fn an_agent_killed_while_holding_a_connection_in_repair_mode_is_recovered_from() {
    persist_tests::require_root!();
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Echoes what it receives on fd 41; ends if the connection fails.
    let script = format!(
        "import os, socket\n\
         s = socket.create_connection(('127.0.0.1', {port}))\n\
         os.dup2(s.fileno(), 41); s.close()\n\
         s = socket.socket(fileno=41)\n\
         while True:\n\
         \x20   data = s.recv(100)\n\
         \x20   if not data: break\n\
         \x20   s.sendall(data)\n"
    );
    let mut python = Command::new("python3")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = python.id() as i32;
    let (mut peer, _) = listener.accept().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut echo = |text: &[u8]| {
        peer.write_all(text).unwrap();
        let mut back = vec![0u8; text.len()];
        peer.read_exact(&mut back).map(|_| back)
    };
    assert_eq!(echo(b"before").unwrap(), b"before");
    wait_until(Duration::from_secs(10), || {
        std::fs::read_link(format!("/proc/{pid}/fd/41")).is_ok()
    })
    .unwrap();

    let recovery = dir.path().join("recovery");
    let mut agent = Command::new(binary("persist-agent"))
        .args(["checkpoint", "--leave-running", "--pid", &pid.to_string()])
        .arg("--image")
        .arg(dir.path().join("image"))
        .arg("--recovery-file")
        .arg(&recovery)
        .env(persist_agent::checkpoint::PAUSE_AFTER_SAVE_ENV, "30000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let held = wait_until(Duration::from_secs(10), || tcp_repair_mode(pid, 41) == 1);
    agent.kill().unwrap();
    agent.wait().unwrap();
    held.expect("the checkpoint never held the connection in repair mode");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        tcp_repair_mode(pid, 41),
        1,
        "the connection left repair mode with the agent gone"
    );

    run_ok(
        Command::new(binary("persist-agent"))
            .arg("recover")
            .arg(&recovery),
    )
    .unwrap();
    assert_eq!(
        tcp_repair_mode(pid, 41),
        0,
        "the recovered process's connection is still in repair mode"
    );
    assert_eq!(
        echo(b"after").expect("the recovered process echoes again"),
        b"after"
    );
    let _ = python.kill();
    python.wait().unwrap();
}
