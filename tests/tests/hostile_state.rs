//! Files others planted or tampered with: a state directory others can
//! write, service files and images owned by another user, FIFOs in place of
//! an image's files. None may run a command, wedge the daemon or hang a
//! command; every refusal names the file and which check failed.

use std::net::TcpStream;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use persist_tests::stderr;
use persist_tests::{Sandbox, binary, build_hello_image, edit_manifest, wait_until};

/// uid and gid of Debian's `nobody`.
const NOBODY: u32 = 65534;

/// Long enough for any of these commands to answer on a loaded machine;
/// a command still running then hangs.
const PROMPTLY: Duration = Duration::from_secs(15);

/// An exec-mode service whose command records who ran it in `out`.
fn id_service(name: &str, port: u16, out: &Path) -> serde_json::Value {
    serde_json::json!({
        "name": name, "addr": "127.0.0.1", "port": port, "mode": "exec",
        "idle_timeout": null,
        "command": ["sh", "-c", format!("id > {}", out.display())],
    })
}

/// Sends a SYN to `port` from inside the sandbox's namespace, and fails if
/// `out` appears within a second: the planted command ran.
fn assert_syn_runs_nothing(sandbox: &Sandbox, port: u16, out: &Path) {
    let _ = sandbox.netns.enter(|| {
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1))
    });
    let ran = wait_until(Duration::from_secs(1), || out.exists()).is_ok();
    assert!(
        !ran,
        "the planted command ran: {}",
        std::fs::read_to_string(out).unwrap_or_default()
    );
}

#[test]
fn a_services_directory_others_can_write_stops_the_daemon_from_starting() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::new().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("id");
    let services = sandbox.state_dir().join("services");
    std::fs::create_dir(&services).unwrap();
    std::fs::set_permissions(&services, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(
        services.join("planted.json"),
        id_service("planted", 9401, &out).to_string(),
    )
    .unwrap();

    let exited = sandbox
        .start_daemon_expecting_exit(Duration::from_secs(10))
        .unwrap();
    assert_syn_runs_nothing(&sandbox, 9401, &out);
    let (status, log) = exited.expect("the daemon refuses to start, it does not run");
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "{}: writable by group or others (mode 0777)",
            services.display()
        )),
        "the error names services/ and its mode: {log}"
    );
}

#[test]
fn a_service_file_another_user_owns_never_runs() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::new().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("id");
    let services = sandbox.state_dir().join("services");
    std::fs::create_dir(&services).unwrap();
    std::fs::set_permissions(&services, std::fs::Permissions::from_mode(0o700)).unwrap();
    let planted = services.join("planted.json");
    std::fs::write(&planted, id_service("planted", 9402, &out).to_string()).unwrap();
    std::os::unix::fs::chown(&planted, Some(NOBODY), Some(NOBODY)).unwrap();

    sandbox.start_daemon().unwrap();
    assert_syn_runs_nothing(&sandbox, 9402, &out);
    let service = sandbox.service("planted").unwrap();
    assert_eq!(service["state"], "failed", "{service}");
    let error = service["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("{}: owned by uid {NOBODY}", planted.display())),
        "status names the file and its owner: {service}"
    );
}

#[test]
fn an_image_file_another_user_owns_is_refused_for_its_owner() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let images = tempfile::tempdir().unwrap();
    let image = images.path().join("hello");
    build_hello_image(&sandbox, &image, 9410, &[]);
    let manifest = image.join("manifest");
    std::os::unix::fs::chown(&manifest, Some(NOBODY), None).unwrap();
    let image_arg = image.display().to_string();

    let expected = format!("{}: owned by uid {NOBODY}", manifest.display());
    for args in [
        vec!["inspect", &image_arg],
        vec!["add", "foreign", "--port", "9410", "--image", &image_arg],
    ] {
        let output = sandbox.agent_within(PROMPTLY, &args).unwrap();
        let err = stderr(&output);
        assert!(!output.status.success(), "{args:?} accepted the image");
        assert!(
            err.contains(&expected),
            "{args:?}: the error names the owner: {err}"
        );
        assert!(!err.contains("mode"), "{args:?}: not a mode problem: {err}");
    }
}

#[test]
fn a_fifo_in_an_image_is_refused_at_once_and_the_daemon_answers_on() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::with_daemon().unwrap();
    let server = binary("hello-server").display().to_string();
    sandbox
        .agent_ok(&["add", "other", "--port", "9421", "--exec", "--", &server])
        .unwrap();
    let images = tempfile::tempdir().unwrap();
    let image = images.path().join("hello");
    build_hello_image(&sandbox, &image, 9420, &[]);
    let image_arg = image.display().to_string();

    for name in ["manifest", "pages", "working-set"] {
        let path = image.join(name);
        let saved = images.path().join(name);
        if path.exists() {
            std::fs::rename(&path, &saved).unwrap();
        }
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();

        let expected = format!("{}: a FIFO, not a regular file", path.display());
        let service = format!("fifo-{name}");
        for args in [
            vec!["inspect", &image_arg],
            vec!["restore", "--image", &image_arg],
            vec!["add", &service, "--port", "9420", "--image", &image_arg],
        ] {
            let output = sandbox
                .agent_within(PROMPTLY, &args)
                .unwrap_or_else(|err| panic!("{name} a FIFO: {err:#}"));
            let err = stderr(&output);
            assert!(
                !output.status.success(),
                "{name} a FIFO: {args:?} succeeded"
            );
            assert!(err.contains(&expected), "{name} a FIFO: {args:?}: {err}");
        }
        let status = sandbox
            .agent_within(PROMPTLY, &["status"])
            .unwrap_or_else(|err| panic!("{name} a FIFO: {err:#}"));
        assert!(status.status.success(), "status: {}", stderr(&status));

        std::fs::remove_file(&path).unwrap();
        if saved.exists() {
            std::fs::rename(&saved, &path).unwrap();
        }
    }

    let removed = sandbox
        .agent_within(PROMPTLY, &["remove", "other"])
        .unwrap();
    assert!(removed.status.success(), "remove: {}", stderr(&removed));
    assert!(
        sandbox.stop_daemon_within(PROMPTLY),
        "the daemon exits on SIGTERM; log:\n{}",
        sandbox.daemon_log()
    );
}

/// Writes an empty working set recorded at `recorded_unix_ms`, sealed with
/// a valid checksum, for the image in `image`.
fn write_working_set(image: &Path, recorded_unix_ms: u64) {
    use persist_common::image::{WORKING_SET_FILE, WORKING_SET_VERSION, manifest_crc};
    let mut bytes = b"PERSISTW".to_vec();
    bytes.extend_from_slice(&WORKING_SET_VERSION.to_le_bytes());
    bytes.extend_from_slice(&manifest_crc(image).unwrap().to_le_bytes());
    bytes.extend_from_slice(&recorded_unix_ms.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes.extend_from_slice(&[0; 4]);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(image.join(WORKING_SET_FILE))
        .unwrap();
    std::io::Write::write_all(&mut file, &bytes).unwrap();
}

#[test]
fn inspect_shows_times_past_year_9999_without_panicking() {
    persist_tests::require_root!();
    let sandbox = Sandbox::new().unwrap();
    let images = tempfile::tempdir().unwrap();
    let image = images.path().join("hello");
    build_hello_image(&sandbox, &image, 9430, &[]);
    edit_manifest(&image, |manifest| {
        manifest["created_unix_ms"] = u64::MAX.into();
    });
    write_working_set(&image, 300_000_000_000_000);

    let output = sandbox
        .agent_within(PROMPTLY, &["inspect", &image.display().to_string()])
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "inspect prints the image: {}",
        stderr(&output)
    );
    assert!(
        stdout.contains(&format!("taken     {} ms after 1970", u64::MAX)),
        "{stdout}"
    );
    assert!(
        stdout.contains("recorded 300000000000000 ms after 1970 (past year 9999"),
        "{stdout}"
    );
}
