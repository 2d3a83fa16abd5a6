//! Generations of a `--on-idle keep` service's state: every park keeps a new
//! one, a generation whose process crashes right after its wake is rolled
//! back past on its own, and the owner can list, tag and roll back by hand.

use std::path::Path;
use std::time::Duration;

use persist_tests::{Sandbox, wait_until};

/// A server with a state that can be poisoned: it counts requests, and
/// once `/poison` was asked for, the next request makes it kill itself
/// (SIGTERM, whose default action ends python without a core dump).
/// Started with `poisoned` as its second argument, it is poisoned at once.
const POISONABLE_SERVER: &str = r#"
import http.server, os, signal, sys
count = 0
poisoned = len(sys.argv) > 2 and sys.argv[2] == "poisoned"
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global count, poisoned
        if poisoned:
            os.kill(os.getpid(), signal.SIGTERM)
        if self.path == "/poison":
            poisoned = True
        count += 1
        body = f"count {count}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

const PORT: u16 = 8140;

/// Adds the poisonable server as `web`, `--on-idle keep`, readiness by HTTP.
fn add_poisonable(sandbox: &Sandbox, script_dir: &Path, extra: &[&str]) {
    let script = script_dir.join("poisonable.py");
    std::fs::write(&script, POISONABLE_SERVER).unwrap();
    let mut command = vec![
        "python3".to_owned(),
        script.display().to_string(),
        PORT.to_string(),
    ];
    command.extend(extra.iter().map(|s| s.to_string()));
    sandbox
        .add_ok(
            "web",
            PORT,
            &["--on-idle", "keep", "--ready", "tcp"],
            &command,
        )
        .unwrap();
}

/// GET `path` with curl inside the sandbox: the body, or None when the
/// connection failed (curl has 10 s: a client left hanging fails the test).
fn get(sandbox: &Sandbox, path: &str) -> Option<String> {
    let output = sandbox
        .netns
        .command("curl")
        .args(["-s", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{PORT}{path}"))
        .output()
        .expect("curl runs");
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn history(sandbox: &Sandbox) -> Vec<serde_json::Value> {
    let text = sandbox.agent_ok(&["history", "web", "--json"]).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn entry<'a>(history: &'a [serde_json::Value], generation: &str) -> &'a serde_json::Value {
    history
        .iter()
        .find(|entry| entry["generation"] == generation)
        .unwrap_or_else(|| panic!("generation {generation} missing from {history:?}"))
}

fn park(sandbox: &Sandbox) {
    sandbox.agent_ok(&["park", "web"]).unwrap();
    let parked = sandbox.service("web").unwrap();
    assert_eq!(parked["state"], "parked", "{parked}");
    assert!(parked["error"].is_null(), "the state was kept: {parked}");
}

/// The issue's scenario: a kept state is poisoned, parked, and its next
/// wake crashes; the connection after that is answered by the previous
/// good generation, with no step by hand, and `history` shows the bad one.
#[test]
fn a_generation_that_crashes_after_its_wake_is_rolled_back_past() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let scripts = tempfile::tempdir().unwrap();
    add_poisonable(&sandbox, scripts.path(), &[]);

    assert_eq!(get(&sandbox, "/").as_deref(), Some("count 1"));
    assert_eq!(get(&sandbox, "/").as_deref(), Some("count 2"));
    park(&sandbox);
    assert_eq!(get(&sandbox, "/").as_deref(), Some("count 3"));
    assert_eq!(get(&sandbox, "/poison").as_deref(), Some("count 4"));
    park(&sandbox);
    assert_eq!(sandbox.service("web").unwrap()["generation"], "2");

    // Generation 2 is poisoned: the request that wakes it kills it.
    assert_eq!(get(&sandbox, "/"), None, "the poisoned state cannot answer");
    let mut answer = None;
    wait_until(Duration::from_secs(15), || {
        answer = get(&sandbox, "/");
        answer.is_some()
    })
    .unwrap_or_else(|_| panic!("no answer after the crash:\n{}", sandbox.daemon_log()));
    assert_eq!(
        answer.as_deref(),
        Some("count 3"),
        "answered by generation 1, whose count was 2"
    );

    let status = sandbox.service("web").unwrap();
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["generation"], "1", "{status}");
    let note = status["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("generation 2 killed by SIGTERM")
            && note.contains("rolled back to generation 1"),
        "status says why it rolled back: {status}"
    );
    let history = history(&sandbox);
    let bad = entry(&history, "2")["bad"].as_str().unwrap_or_default();
    assert!(bad.starts_with("killed by SIGTERM"), "{history:?}");
    assert_eq!(entry(&history, "1")["running"], true, "{history:?}");
    assert_eq!(entry(&history, "2")["wakes"], 1, "{history:?}");
    let metrics_text = sandbox.agent_ok(&["status"]).unwrap();
    assert!(
        metrics_text.contains("runs kept generation 1"),
        "{metrics_text}"
    );
}

/// A server whose pristine image crashes on every request ends `failed`
/// with the reason, and each client is closed, not left waiting.
#[test]
fn a_pristine_image_that_crashes_ends_failed_and_closes_its_clients() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let scripts = tempfile::tempdir().unwrap();
    add_poisonable(&sandbox, scripts.path(), &["poisoned"]);

    for _ in 0..5 {
        // curl's own 10 s limit fails a client left hanging.
        assert_eq!(get(&sandbox, "/"), None);
        if sandbox.service("web").unwrap()["state"] == "failed" {
            break;
        }
    }
    let status = sandbox.service("web").unwrap();
    assert_eq!(status["state"], "failed", "{status}");
    let error = status["error"].as_str().unwrap_or_default();
    assert!(error.contains("exited within"), "{status}");
    assert_eq!(status["generation"], "pristine", "{status}");
}

/// Tags, pruning, rollback by hand, and generations that outlive the daemon.
#[test]
fn generations_are_tagged_pruned_rolled_back_by_hand_and_survive_a_restart() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::new().unwrap();
    sandbox
        .start_daemon_with(&["--keep-generations", "2"])
        .unwrap();
    let scripts = tempfile::tempdir().unwrap();
    add_poisonable(&sandbox, scripts.path(), &[]);

    assert_eq!(get(&sandbox, "/").as_deref(), Some("count 1"));
    park(&sandbox); // generation 1: count 1
    assert_eq!(get(&sandbox, "/").as_deref(), Some("count 2"));
    let kept = sandbox
        .agent_ok(&["snapshot", "web", "--tag", "two"])
        .unwrap();
    assert!(kept.contains("generation 2"), "{kept}");
    assert_eq!(
        sandbox.service("web").unwrap()["state"],
        "running",
        "a snapshot does not park"
    );
    assert_eq!(get(&sandbox, "/").as_deref(), Some("count 3"));
    park(&sandbox); // generation 3: count 3
    assert_eq!(get(&sandbox, "/").as_deref(), Some("count 4"));
    park(&sandbox); // generation 4: count 4; 1 is pruned, 2 is tagged

    let kept: Vec<String> = history(&sandbox)
        .iter()
        .map(|e| e["generation"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kept, ["pristine", "2", "3", "4"], "pruned past 2, tag kept");
    let images = sandbox.state_dir().join("images/web.gens");
    assert!(!images.join("1").exists(), "generation 1 removed from disk");
    assert_eq!(entry(&history(&sandbox), "2")["tag"], "two");

    let done = sandbox.agent_ok(&["rollback", "web", "--to", "2"]).unwrap();
    assert!(done.contains("generation 2"), "{done}");
    sandbox.stop_daemon();
    sandbox
        .start_daemon_with(&["--keep-generations", "2"])
        .unwrap();
    let history = history(&sandbox);
    assert_eq!(entry(&history, "2")["next"], true, "{history:?}");
    assert!(
        entry(&history, "4")["bad"]
            .as_str()
            .is_some_and(|bad| bad.contains("rolled back by hand")),
        "{history:?}"
    );
    assert_eq!(
        get(&sandbox, "/").as_deref(),
        Some("count 3"),
        "generation 2 had counted 2"
    );

    // Without --to: the good generation before the running one, here the
    // pristine image (1 was pruned).
    let done = sandbox.agent_ok(&["rollback", "web"]).unwrap();
    assert!(done.contains("pristine"), "{done}");
    assert_eq!(sandbox.service("web").unwrap()["state"], "parked");
    assert_eq!(get(&sandbox, "/").as_deref(), Some("count 1"));

    let unknown = sandbox.agent(&["rollback", "web", "--to", "9"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("generation 9 is not kept"),
        "{unknown:?}"
    );
}

/// A tmpfs of `size` mounted over `dir` for the test's length (lazily
/// unmounted at the end, as the daemon may still hold files in it).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0700"))
            .arg("tmpfs")
            .arg(dir)
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a tmpfs on {}", dir.display());
        Self(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the file system of `path` until a write fails for lack of space.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0xa5u8; 1 << 20];
    loop {
        if let Err(err) = file.write_all(&block).and_then(|()| file.sync_all()) {
            assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
            break;
        }
    }
}

/// A park on a full disk cannot write its generation: the service runs on
/// with its state, the generations before it are untouched, and the park
/// succeeds once there is room again.
#[test]
fn a_full_disk_keeps_the_running_service_and_its_last_good_generation() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::new().unwrap();
    let _tmpfs = Tmpfs::mount(sandbox.state_dir(), "128m");
    sandbox.start_daemon().unwrap();
    let scripts = tempfile::tempdir().unwrap();
    add_poisonable(&sandbox, scripts.path(), &[]);
    assert_eq!(get(&sandbox, "/").as_deref(), Some("count 1"));
    park(&sandbox); // generation 1
    assert_eq!(get(&sandbox, "/").as_deref(), Some("count 2"));

    let filler = sandbox.state_dir().join("filler");
    fill(&filler);
    let refused = sandbox.agent(&["park", "web"]);
    assert!(!refused.status.success(), "a park with no room fails");
    let status = sandbox.service("web").unwrap();
    assert_eq!(status["state"], "running", "{status}");
    assert!(
        status["error"]
            .as_str()
            .is_some_and(|e| e.contains("left running")),
        "{status}"
    );
    let kept: Vec<String> = history(&sandbox)
        .iter()
        .map(|e| e["generation"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kept, ["pristine", "1"], "nothing half-written is recorded");
    assert!(
        !sandbox.state_dir().join("images/web.gens/2").exists(),
        "what the failed park wrote is removed"
    );

    std::fs::remove_file(&filler).unwrap();
    assert_eq!(
        get(&sandbox, "/").as_deref(),
        Some("count 3"),
        "state intact"
    );
    park(&sandbox);
    assert_eq!(get(&sandbox, "/").as_deref(), Some("count 4"));
    assert_eq!(entry(&history(&sandbox), "2")["wakes"], 1);
}
