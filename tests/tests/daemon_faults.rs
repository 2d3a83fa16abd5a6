//! What the daemon says and does when a service's image is unusable, when a
//! wake fails, when the kernel changed under an image, and when a burst of
//! connections arrives at a parked server with a small backlog.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use persist_tests::{
    Sandbox, add_http_server, binary, build_hello_image, edit_manifest, kill_session, wait_until,
    web_root,
};

/// The hello-server command line for `port`.
fn hello_command(port: u16) -> Vec<String> {
    vec![
        binary("hello-server").display().to_string(),
        format!("127.0.0.1:{port}"),
    ]
}

/// Flips one byte in the middle of an image's own page store.
fn corrupt_page_store(image: &Path) {
    let path = image.join("pages");
    let mut pages = std::fs::read(&path).unwrap();
    assert!(!pages.is_empty(), "the image stores pages");
    let middle = pages.len() / 2;
    pages[middle] ^= 0xff;
    std::fs::write(&path, pages).unwrap();
}

/// Simulates an image taken on another kernel build.
fn from_another_kernel(image: &Path) {
    edit_manifest(image, |manifest| {
        manifest["kernel"]["release"] = "5.10.0-ancient".into();
    });
}

/// What one HTTP GET of `/` on the sandbox's `port` got within `timeout`:
/// `Ok(response)`, or `Err` with what went wrong. A timeout is its own error
/// kind, so a test tells a hanging connection from a closed one.
fn try_get(sandbox: &Sandbox, port: u16, timeout: Duration) -> std::io::Result<String> {
    sandbox
        .netns
        .enter(|| {
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
            stream.set_read_timeout(Some(timeout))?;
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .unwrap()
}

/// Asserts that a connection to `port` is answered or closed, never left hanging.
fn assert_not_hanging(sandbox: &Sandbox, port: u16) {
    if let Err(err) = try_get(sandbox, port, Duration::from_secs(10)) {
        assert!(
            !matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "a connection to a service that cannot wake hangs: {err}"
        );
    }
}

/// Kills the daemon and every process of the service `name` (what a reboot
/// does), after noting the service's pid.
fn reboot(sandbox: &mut Sandbox, name: &str) {
    let pid = sandbox.running_pid(name).unwrap() as i32;
    sandbox.kill_daemon();
    kill_session(pid);
    wait_until(Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{pid}")).exists()
    })
    .unwrap();
}

#[test]
fn an_image_with_a_corrupt_page_store_is_not_added() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let images = tempfile::tempdir().unwrap();
    let image = images.path().join("hello");
    build_hello_image(&sandbox, &image, 8601, &[]);
    corrupt_page_store(&image);

    let output = sandbox.agent(&[
        "add",
        "corrupt",
        "--image",
        &image.display().to_string(),
        "--port",
        "8601",
    ]);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "an image with a corrupt page store was added: {output:?}"
    );
    let pages = image.join("pages").display().to_string();
    assert!(
        err.contains(&pages) && err.contains("checksum"),
        "the error names neither the page store nor its checksum: {err}"
    );
    let statuses = sandbox.status().unwrap();
    assert!(
        statuses.is_empty(),
        "a refused image left a service registered: {statuses:?}"
    );
}

#[test]
fn a_service_whose_wake_fails_shows_failed_with_the_reason() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let images = tempfile::tempdir().unwrap();
    let image = images.path().join("hello");
    build_hello_image(&sandbox, &image, 8602, &[]);
    sandbox
        .agent_ok(&[
            "add",
            "breaks",
            "--image",
            &image.display().to_string(),
            "--port",
            "8602",
        ])
        .unwrap();
    let body = sandbox.http_get(8602).unwrap();
    assert!(body.starts_with("hello from pid"), "{body:?}");
    sandbox.agent_ok(&["park", "breaks"]).unwrap();

    // Broken after it was added: the next wake cannot have its pages.
    corrupt_page_store(&image);
    assert_not_hanging(&sandbox, 8602);
    wait_until(Duration::from_secs(10), || {
        sandbox.service("breaks").unwrap()["state"] == "failed"
    })
    .unwrap_or_else(|_| {
        panic!(
            "the failed wake is not shown as failed: {}\n{}",
            sandbox.service("breaks").unwrap(),
            sandbox.daemon_log()
        )
    });
    // It stays failed (with its reason) rather than looking parked again.
    std::thread::sleep(Duration::from_millis(1500));
    let failed = sandbox.service("breaks").unwrap();
    assert_eq!(
        failed["state"], "failed",
        "a failed wake shows as parked again: {failed}"
    );
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("checksum") || error.contains("corrupt"),
        "the status does not say why the wake failed: {failed}"
    );
    assert_not_hanging(&sandbox, 8602);
}

#[test]
fn a_command_service_whose_image_is_from_another_kernel_is_rebuilt() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::with_daemon().unwrap();
    sandbox
        .add_ok("hello", 8603, &[], &hello_command(8603))
        .unwrap();
    let first = sandbox.http_get(8603).unwrap();
    assert!(first.starts_with("hello from pid"), "{first:?}");

    reboot(&mut sandbox, "hello");
    let image = sandbox.state_dir().join("images/hello");
    from_another_kernel(&image);
    sandbox.start_daemon().unwrap();

    let rebuilt = sandbox.service("hello").unwrap();
    let note = rebuilt["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("rebuilt: image was taken on kernel 5.10.0-ancient"),
        "status does not say the service was rebuilt: {rebuilt}"
    );
    assert!(
        sandbox
            .daemon_log()
            .contains("rebuilt: image was taken on kernel"),
        "the log does not say the service was rebuilt:\n{}",
        sandbox.daemon_log()
    );
    let body = sandbox.http_get(8603).unwrap();
    assert!(
        body.starts_with("hello from pid"),
        "the rebuilt service does not answer: {body:?}"
    );
    let running = nix::sys::utsname::uname().unwrap();
    let release = running.release().to_string_lossy().into_owned();
    let manifest =
        String::from_utf8_lossy(&std::fs::read(image.join("manifest")).unwrap()).into_owned();
    assert!(
        manifest.contains(&format!("\"release\":\"{release}\"")),
        "the new image was not taken on this kernel"
    );
}

#[test]
fn a_prebuilt_image_from_another_kernel_shows_stale_with_the_reason() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::with_daemon().unwrap();
    let images = tempfile::tempdir().unwrap();
    let image = images.path().join("hello");
    build_hello_image(&sandbox, &image, 8604, &[]);
    sandbox
        .agent_ok(&[
            "add",
            "prebuilt",
            "--image",
            &image.display().to_string(),
            "--port",
            "8604",
        ])
        .unwrap();
    let body = sandbox.http_get(8604).unwrap();
    assert!(body.starts_with("hello from pid"), "{body:?}");

    reboot(&mut sandbox, "prebuilt");
    from_another_kernel(&image);
    sandbox.start_daemon().unwrap();

    let stale = |sandbox: &Sandbox| {
        let status = sandbox.service("prebuilt").unwrap();
        let reason = status["error"].as_str().unwrap_or_default().to_owned();
        (
            status["state"] == "stale" && reason.contains("5.10.0-ancient"),
            status,
        )
    };
    wait_until(Duration::from_secs(5), || stale(&sandbox).0).unwrap_or_else(|_| {
        panic!(
            "a prebuilt image from another kernel is not shown stale: {}",
            stale(&sandbox).1
        )
    });
    // A client is told at once, and the service stays stale.
    assert_not_hanging(&sandbox, 8604);
    std::thread::sleep(Duration::from_millis(1500));
    let (still_stale, status) = stale(&sandbox);
    assert!(still_stale, "the stale service changed state: {status}");
}

/// Opens `count` connections to 127.0.0.1:`port` at once, each sending one
/// HTTP GET and reading the answer within `timeout`. Returns how many were
/// answered with 200 and how long the whole burst took.
fn burst(port: u16, count: usize, timeout: Duration) -> (usize, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let started = Instant::now();
        let clients: Vec<_> = (0..count)
            .map(|_| {
                tokio::spawn(tokio::time::timeout(timeout, async move {
                    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
                    let mut response = Vec::new();
                    stream.read_to_end(&mut response).await?;
                    Ok::<bool, std::io::Error>(response.starts_with(b"HTTP/1.0 200"))
                }))
            })
            .collect();
        let mut served = 0;
        for client in clients {
            if matches!(client.await, Ok(Ok(Ok(true)))) {
                served += 1;
            }
        }
        (served, started.elapsed())
    })
}

#[test]
fn a_burst_of_a_thousand_connections_at_a_parked_http_server_is_all_served() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let root = web_root();
    add_http_server(&sandbox, "burst", 8605, root.path(), &[]);
    assert_eq!(sandbox.service("burst").unwrap()["state"], "parked");
    let held = listen_backlog(&sandbox, 8605);
    assert!(
        held >= 1000,
        "the parked server's queue holds only {held} connections"
    );

    let (served, took) = sandbox
        .netns
        .enter(|| burst(8605, 1000, Duration::from_secs(20)))
        .unwrap();
    eprintln!("burst at a parked python http.server: {served}/1000 served in {took:?}");
    assert_eq!(
        served, 1000,
        "connections of a burst at a parked server were lost"
    );

    // Running, once the burst is over, the server has its own backlog back.
    sandbox.running_pid("burst").unwrap();
    wait_until(Duration::from_secs(10), || {
        listen_backlog(&sandbox, 8605) == 5
    })
    .unwrap_or_else(|_| {
        panic!(
            "the running server listens with a backlog of {}, not its own 5",
            listen_backlog(&sandbox, 8605)
        )
    });
}

/// The backlog of the socket listening on `port` in the sandbox (`ss`
/// shows it as the Send-Q of a listener).
fn listen_backlog(sandbox: &Sandbox, port: u16) -> u32 {
    let output = sandbox
        .netns
        .command("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .nth(2)
        .and_then(|field| field.parse().ok())
        .unwrap_or_else(|| panic!("no listener on port {port}: {text:?}"))
}
