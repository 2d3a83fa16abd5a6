//! Each service's stdout and stderr in its log, shown by `persist-agent
//! logs NAME [--follow]`: kept across parks and wakes, rotated at a size
//! limit without the process losing its file.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use persist_tests::{Sandbox, add_http_server, binary, wait_until, web_root};

/// GETs `path` from python's http.server on `port`, which logs the request
/// line to its stderr.
fn get(sandbox: &Sandbox, port: u16, path: &str) {
    let answered = sandbox
        .netns
        .enter(|| -> std::io::Result<String> {
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
            stream.set_read_timeout(Some(Duration::from_secs(20)))?;
            stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .unwrap();
    let response = answered.unwrap_or_else(|err| panic!("GET {path}: {err}"));
    assert!(
        response.starts_with("HTTP/1.0 "),
        "GET {path}: {response:?}"
    );
}

fn logs(sandbox: &Sandbox, name: &str) -> String {
    sandbox.agent_ok(&["logs", name]).unwrap()
}

fn log_file(sandbox: &Sandbox, name: &str) -> std::path::PathBuf {
    sandbox.state_dir().join("logs").join(format!("{name}.log"))
}

#[test]
fn a_snapshot_services_log_goes_on_across_parks_and_wakes() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let root = web_root();
    add_http_server(&sandbox, "web", 8000, root.path(), &[]);

    get(&sandbox, 8000, "/first-wake");
    sandbox.agent_ok(&["park", "web"]).unwrap();
    get(&sandbox, 8000, "/second-wake");
    wait_until(Duration::from_secs(5), || {
        logs(&sandbox, "web").contains("/second-wake")
    })
    .unwrap_or_else(|_| {
        panic!(
            "the second wake's request never reached the log:\n{}",
            logs(&sandbox, "web")
        )
    });
    let text = logs(&sandbox, "web");
    let first = text
        .find("GET /first-wake")
        .expect("the first wake's request is logged");
    let second = text
        .find("GET /second-wake")
        .expect("the second wake's request is logged");
    assert!(
        first < second,
        "one log, in order, across the park:\n{text}"
    );

    let missing = sandbox.agent(&["logs", "nothing-here"]);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success() && stderr.contains("no log for service nothing-here"),
        "logs of an unknown service: {stderr}"
    );
}

#[test]
fn logs_follow_shows_what_the_service_writes_as_it_writes_it() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let root = web_root();
    add_http_server(&sandbox, "web", 8000, root.path(), &[]);
    get(&sandbox, 8000, "/before-follow");

    let mut follower = std::process::Command::new(binary("persist-agent"))
        .arg("--state-dir")
        .arg(sandbox.state_dir())
        .args(["logs", "web", "--follow"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (lines, seen) = mpsc::channel();
    let stdout = follower.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |marker: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while let Ok(line) =
            seen.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
        {
            if line.contains(marker) {
                return true;
            }
        }
        false
    };
    assert!(
        wait_for("/before-follow"),
        "--follow first prints the log so far"
    );
    get(&sandbox, 8000, "/while-following");
    let followed = wait_for("/while-following");
    let _ = follower.kill();
    let _ = follower.wait();
    reader.join().unwrap();
    assert!(
        followed,
        "--follow printed a line the service wrote after it started"
    );
}

/// The size limit of the rotation tests' logs.
const LOG_LIMIT: u64 = 2048;

/// A daemon rotating logs past [`LOG_LIMIT`], with python's http.server
/// added as `web` on port 8000 (the web root is kept with it).
fn web_with_small_log_limit() -> (Sandbox, tempfile::TempDir) {
    let mut sandbox = Sandbox::new().unwrap();
    sandbox
        .start_daemon_with(&["--log-max-bytes", &LOG_LIMIT.to_string()])
        .unwrap();
    let root = web_root();
    add_http_server(&sandbox, "web", 8000, root.path(), &[]);
    (sandbox, root)
}

/// GETs `count` paths padded with 100 bytes: `/request-N-xxx…`.
fn padded_requests(sandbox: &Sandbox, count: usize) {
    let padding = "x".repeat(100);
    for n in 0..count {
        get(sandbox, 8000, &format!("/request-{n}-{padding}"));
    }
}

/// Waits until `web.log` was rotated to `web.log.1` and is under the limit
/// again; returns the rotated part.
fn wait_for_rotation(sandbox: &Sandbox) -> std::path::PathBuf {
    let log = log_file(sandbox, "web");
    let rotated = sandbox.state_dir().join("logs/web.log.1");
    wait_until(Duration::from_secs(10), || {
        rotated.exists() && std::fs::metadata(&log).is_ok_and(|m| m.len() <= LOG_LIMIT)
    })
    .unwrap_or_else(|_| {
        panic!(
            "web.log ({:?} bytes) was not rotated to web.log.1 under {LOG_LIMIT} bytes\ndaemon log:\n{}",
            std::fs::metadata(&log).map(|m| m.len()),
            sandbox.daemon_log()
        )
    });
    rotated
}

#[test]
fn a_log_past_its_size_limit_is_rotated_and_the_service_writes_on() {
    persist_tests::require_root!();
    let (sandbox, _root) = web_with_small_log_limit();
    get(&sandbox, 8000, "/wake");
    let log = log_file(&sandbox, "web");
    let inode = std::fs::metadata(&log).unwrap().ino();

    padded_requests(&sandbox, 40);
    let rotated = wait_for_rotation(&sandbox);
    assert_eq!(
        std::fs::metadata(&log).unwrap().ino(),
        inode,
        "rotation keeps the file the running process (and its image) holds"
    );
    let kept = std::fs::metadata(&rotated).unwrap().len();
    assert!(
        kept <= 2 * LOG_LIMIT + 40 * 200,
        "web.log.1 holds one rotation's worth, not everything: {kept} bytes"
    );

    get(&sandbox, 8000, "/after-rotation");
    wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("/after-rotation"))
    })
    .expect("the running service writes on into its rotated log");
    assert!(
        logs(&sandbox, "web").contains("/request-39-"),
        "`logs` shows the rotated part too"
    );
}

#[test]
fn a_log_that_grew_until_its_service_parked_is_rotated_while_parked() {
    persist_tests::require_root!();
    let (sandbox, _root) = web_with_small_log_limit();
    // Past the limit and parked at once: the daemon looks at the logs of
    // services that run, or ran since its last look, and a parked one's
    // log must not be forgotten.
    padded_requests(&sandbox, 30);
    sandbox.agent_ok(&["park", "web"]).unwrap();
    wait_for_rotation(&sandbox);
    let status = sandbox.service("web").unwrap();
    assert_eq!(status["state"], "parked", "{status}");
    assert!(
        logs(&sandbox, "web").contains("/request-29-"),
        "`logs` shows the rotated part"
    );
}

#[test]
fn exec_and_inetd_output_goes_to_the_services_log() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let exec = "import socket; print('exec-stdout-line', flush=True); \
                s = socket.socket(fileno=3); c, _ = s.accept(); c.recv(4096); \
                c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nexec'); c.close()";
    sandbox
        .add_ok(
            "exec",
            8080,
            &["--exec"],
            &["python3".into(), "-c".into(), exec.into()],
        )
        .unwrap();
    // The request is read whole first: closing on unread bytes would reset
    // the connection.
    let inetd = "echo inetd-stderr-line >&2; \
                 while read -r line && [ \"$line\" != \"$(printf '\\r')\" ]; do :; done; \
                 printf 'HTTP/1.0 200 OK\\r\\n\\r\\ninetd'";
    sandbox
        .add_ok(
            "inetd",
            8081,
            &["--inetd"],
            &["sh".into(), "-c".into(), inetd.into()],
        )
        .unwrap();
    assert_eq!(sandbox.http_get(8080).unwrap(), "exec");
    assert_eq!(sandbox.http_get(8081).unwrap(), "inetd");
    for (name, line) in [("exec", "exec-stdout-line"), ("inetd", "inetd-stderr-line")] {
        wait_until(Duration::from_secs(5), || {
            logs(&sandbox, name).contains(line)
        })
        .unwrap_or_else(|_| {
            panic!(
                "{name}'s output is not in its log: {:?}\ndaemon log:\n{}",
                logs(&sandbox, name),
                sandbox.daemon_log()
            )
        });
        assert!(
            !sandbox.daemon_log().contains(line),
            "{name}'s output is in its own log, not the daemon's"
        );
    }
}

#[test]
fn a_log_removed_while_its_service_is_parked_is_started_anew_at_the_next_wake() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let root = web_root();
    add_http_server(&sandbox, "web", 8000, root.path(), &[]);
    get(&sandbox, 8000, "/before-removal");
    sandbox.agent_ok(&["park", "web"]).unwrap();
    std::fs::remove_file(log_file(&sandbox, "web")).unwrap();
    // The skeleton prepared at the park already holds the removed file; the
    // one after the next park must find the log again.
    get(&sandbox, 8000, "/after-removal");
    sandbox.agent_ok(&["park", "web"]).unwrap();
    get(&sandbox, 8000, "/second-wake-after-removal");
    wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(log_file(&sandbox, "web"))
            .is_ok_and(|text| text.contains("/second-wake-after-removal"))
    })
    .unwrap_or_else(|_| {
        panic!(
            "no new log after the old one was removed: {:?}\nstatus: {:?}\ndaemon log:\n{}",
            std::fs::read_to_string(log_file(&sandbox, "web")),
            sandbox.status(),
            sandbox.daemon_log()
        )
    });
}
