//! A checkpoint whose agent is SIGKILLed in the middle of its injected
//! system calls: the process stays stopped instead of running on with the
//! injected registers, and `recover` lets it go on as if nothing happened.

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
