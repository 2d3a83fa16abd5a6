//! Restore from images made by `persist-agent checkpoint`: fixtures restored
//! twice from one image, real servers (python3 http.server, redis) in
//! private network namespaces, and bad images refused before anything runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use persist_tests::{
    NetNs, binary, edit_manifest, has_unfilled_memory, redis_server_command, run_ok, wait_until,
};

/// SIGKILLs every tracked pid on drop (only processes this test started).
#[derive(Default)]
struct Pids(Vec<i32>);

impl Pids {
    fn track(&mut self, pid: i32) {
        self.0.push(pid);
    }
}

impl Drop for Pids {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn agent() -> Command {
    Command::new(binary("persist-agent"))
}

/// Runs fixture-memory with `mib` MiB in `dir` until it is ready, and
/// checkpoints it (killing it) into `image`.
fn checkpoint_memory_fixture(dir: &Path, mib: u32, image: &Path) -> Pids {
    let mut fixture = Command::new(binary("fixture-memory"))
        .arg(dir)
        .arg(mib.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pids = Pids(vec![fixture.id() as i32]);
    wait_until(Duration::from_secs(30), || dir.join("ready").exists()).unwrap();
    checkpoint(agent(), fixture.id() as i32, image).unwrap();
    fixture.wait().unwrap();
    pids
}

/// Pid printed on the last stdout line of a restore.
fn restored_pid(output: &Output) -> Result<i32> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().context("restore printed nothing")?;
    last.trim()
        .parse()
        .with_context(|| format!("restore's last line is not a pid: {last:?}"))
}

fn checkpoint(command: Command, pid: i32, image: &Path) -> Result<()> {
    let mut command = command;
    command
        .args(["checkpoint", "--pid", &pid.to_string(), "--image"])
        .arg(image);
    run_ok(&mut command).map(drop)
}

fn start_fixture(name: &str, dir: &Path) -> Result<Child> {
    start_fixture_with_stderr(name, dir, Stdio::inherit())
}

/// Like [`start_fixture`], with the fixture's stderr going to `stderr`.
fn start_fixture_with_stderr(name: &str, dir: &Path, stderr: Stdio) -> Result<Child> {
    let child = Command::new(binary(name))
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    wait_until(Duration::from_secs(20), || dir.join("ready").exists())
        .with_context(|| format!("{name} never became ready"))?;
    Ok(child)
}

fn signal(pid: i32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
}

/// SIGKILLs a restored process (not our child) and waits until it is dead,
/// so that its sockets are closed before the next restore binds them.
fn kill_and_wait_dead(pid: i32) {
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let dead = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        })
    };
    wait_until(Duration::from_secs(10), dead).expect("a killed process dies");
}

/// SIGUSR1 makes a fixture check its state and write `result`.
fn fixture_result(pid: i32, dir: &Path) -> Result<String> {
    let result = dir.join("result");
    let _ = std::fs::remove_file(&result);
    signal(pid, nix::sys::signal::Signal::SIGUSR1);
    // Created before it is written to; no result is empty.
    wait_until(Duration::from_secs(20), || {
        std::fs::metadata(&result).is_ok_and(|meta| meta.len() > 0)
    })
    .with_context(|| format!("pid {pid} wrote no result"))?;
    Ok(std::fs::read_to_string(result)?.trim().to_owned())
}

/// Checkpoints a fixture (which kills it), then restores it twice, one
/// after the other, checking its state each time.
fn restore_fixture_twice(name: &str) -> Result<()> {
    let temp = tempfile::tempdir()?;
    let dir = temp.path().join("state");
    std::fs::create_dir(&dir)?;
    let image = temp.path().join("image");
    let mut fixture = start_fixture(name, &dir)?;
    let mut pids = Pids::default();
    pids.track(fixture.id() as i32);
    checkpoint(agent(), fixture.id() as i32, &image)?;
    fixture.wait()?;
    for round in 1..=2 {
        let output = run_ok(agent().arg("restore").arg("--image").arg(&image))?;
        let pid = restored_pid(&output)?;
        pids.track(pid);
        let result = fixture_result(pid, &dir)?;
        assert_eq!(result, "OK", "{name}, restore {round} (pid {pid})");
        kill_and_wait_dead(pid);
    }
    Ok(())
}

#[test]
fn memory_fixture_restores_twice_from_one_image() {
    persist_tests::require_root!();
    restore_fixture_twice("fixture-memory").unwrap();
}

#[test]
fn process_fixture_restores_twice_from_one_image() {
    persist_tests::require_root!();
    restore_fixture_twice("fixture-process").unwrap();
}

#[test]
fn threads_fixture_restores_twice_from_one_image() {
    persist_tests::require_root!();
    restore_fixture_twice("fixture-threads").unwrap();
}

/// A file mapped privately comes back as a mapping of that file (the same
/// /proc/self/maps line) holding the pages the process wrote, the others
/// the file's, and a written page it drops reads the file again.
#[test]
fn mapped_files_fixture_restores_twice_from_one_image() {
    persist_tests::require_root!();
    restore_fixture_twice("fixture-mapped-files").unwrap();
}

/// Queued signals come back with their siginfo (sigqueue values, si_code,
/// sender), several instances of one realtime signal in their order, and a
/// signal queued for one thread still for that thread.
#[test]
fn signals_fixture_restores_twice_from_one_image() {
    persist_tests::require_root!();
    restore_fixture_twice("fixture-signals").unwrap();
}

/// A pending mask (`ShdPnd` or `SigPnd`) from `/proc/PID[/task/TID]/status`.
fn pending_mask(status_path: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(status_path).unwrap();
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in {status_path}"));
    u64::from_str_radix(line.trim(), 16).unwrap()
}

/// An image written before signal queues were saved has its pending
/// signals raised by number: every one still pending after the restore,
/// realtime process-wide ones included.
#[test]
fn image_without_signal_queues_still_restores_every_pending_signal() {
    persist_tests::require_root!();
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    let image = temp.path().join("image");
    let mut fixture = start_fixture("fixture-signals", &dir).unwrap();
    let mut pids = Pids::default();
    pids.track(fixture.id() as i32);
    checkpoint(agent(), fixture.id() as i32, &image).unwrap();
    fixture.wait().unwrap();
    edit_manifest(&image, |manifest| {
        manifest["process"]
            .as_object_mut()
            .unwrap()
            .remove("shared_queue");
        for thread in manifest["threads"].as_array_mut().unwrap() {
            thread.as_object_mut().unwrap().remove("queue");
        }
    });
    let output = run_ok(agent().arg("restore").arg("--image").arg(&image)).unwrap();
    let pid = restored_pid(&output).unwrap();
    pids.track(pid);

    let bit = |signal: i32| 1u64 << (signal - 1);
    let realtime = libc::SIGRTMIN() + 1;
    let shared = pending_mask(&format!("/proc/{pid}/status"), "ShdPnd");
    assert_eq!(
        shared,
        bit(libc::SIGUSR2) | bit(realtime),
        "process-wide pending signals after restore: {shared:#x}"
    );
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|entry| {
            entry
                .unwrap()
                .file_name()
                .to_string_lossy()
                .parse()
                .unwrap()
        })
        .collect();
    tids.sort_unstable();
    let second = pending_mask(&format!("/proc/{pid}/task/{}/status", tids[1]), "SigPnd");
    assert_eq!(
        second,
        bit(realtime),
        "the second thread's pending signals after restore: {second:#x}"
    );
    kill_and_wait_dead(pid);
}

/// POSIX timers come back with their ids (sparse), clocks, notifications
/// (process, thread, none), values and intervals, armed with no more time
/// left than they had; an interval timer and a timerfd too.
#[test]
fn timers_fixture_restores_twice_from_one_image() {
    persist_tests::require_root!();
    restore_fixture_twice("fixture-timers").unwrap();
}

#[test]
fn seccomp_fixture_restores_twice_from_one_image() {
    persist_tests::require_root!();
    restore_fixture_twice("fixture-seccomp").unwrap();
}

#[test]
fn image_naming_a_missing_seccomp_filter_is_refused() {
    persist_tests::require_root!();
    let temp = tempfile::tempdir().unwrap();
    let (recorded, image) = fixture_image(temp.path()).unwrap();
    edit_manifest(&image, |manifest| {
        manifest["threads"][0]["seccomp"] = serde_json::json!([7]);
    });
    let err = failed_restore(&image);
    assert!(
        err.contains(&format!(
            "thread {recorded} runs under seccomp filter 7, but the image holds 0 filters"
        )),
        "{err}"
    );
}

/// Each thread's filters, resolved from indices to (program's CRC32C, flags).
fn seccomp_chains(image: &Path) -> Vec<Vec<(u32, u64)>> {
    let image = persist_common::image::Image::open(image).unwrap();
    let manifest = image.manifest();
    let filters = &manifest.process.seccomp_filters;
    manifest
        .threads
        .iter()
        .map(|thread| {
            thread
                .seccomp
                .iter()
                .map(|&i| {
                    let filter = &filters[i as usize];
                    (crc32c::crc32c(&filter.program), filter.flags)
                })
                .collect()
        })
        .collect()
}

#[test]
fn restored_seccomp_filters_read_back_as_checkpointed() {
    persist_tests::require_root!();
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    let image = temp.path().join("image");
    let mut fixture = start_fixture("fixture-seccomp", &dir).unwrap();
    let mut pids = Pids(vec![fixture.id() as i32]);
    checkpoint(agent(), fixture.id() as i32, &image).unwrap();
    fixture.wait().unwrap();
    let output = run_ok(agent().arg("restore").arg("--image").arg(&image)).unwrap();
    let pid = restored_pid(&output).unwrap();
    pids.track(pid);
    let again = temp.path().join("again");
    run_ok(
        agent()
            .args([
                "checkpoint",
                "--leave-running",
                "--pid",
                &pid.to_string(),
                "--image",
            ])
            .arg(&again),
    )
    .unwrap();

    let before = seccomp_chains(&image);
    let lengths: Vec<usize> = before.iter().map(Vec::len).collect();
    assert_eq!(lengths, [2, 2, 3], "filters per thread of the fixture");
    assert_eq!(
        before[0][1].1,
        libc::SECCOMP_FILTER_FLAG_LOG,
        "the fixture's second filter logs"
    );
    assert_eq!(
        seccomp_chains(&again),
        before,
        "the restored threads run under other filters, flags or order"
    );
    assert_eq!(
        fixture_result(pid, &dir).unwrap(),
        "OK",
        "after the second checkpoint"
    );
}

/// A checkpointed fixture's image, the fixture gone; with its pid.
fn fixture_image(temp: &Path) -> Result<(i32, PathBuf)> {
    named_fixture_image("fixture-memory", temp)
}

/// The image of fixture `name`, run in `temp/state`, the fixture gone; with
/// its pid.
fn named_fixture_image(name: &str, temp: &Path) -> Result<(i32, PathBuf)> {
    let dir = temp.join("state");
    std::fs::create_dir(&dir)?;
    let image = temp.join("image");
    let mut fixture = start_fixture(name, &dir)?;
    let _pids = Pids(vec![fixture.id() as i32]);
    checkpoint(agent(), fixture.id() as i32, &image)?;
    fixture.wait()?;
    Ok((fixture.id() as i32, image))
}

/// Runs a restore that must fail; returns its stderr.
fn failed_restore(image: &Path) -> String {
    let output = agent()
        .arg("restore")
        .arg("--image")
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .expect("running the agent");
    assert!(
        !output.status.success(),
        "restore of a bad image succeeded: {output:?}"
    );
    assert!(
        output.stdout.is_empty(),
        "a failed restore prints no pid: {output:?}"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Live processes whose pid in their own namespace is `recorded`: copies of
/// a checkpointed process restored (or half-restored) from its image.
fn restored_copies(recorded: i32) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .unwrap_or("")
                .trim()
                .to_owned()
        };
        let innermost = field("NSpid:")
            .split_whitespace()
            .last()
            .and_then(|p| p.parse::<i32>().ok());
        if innermost == Some(recorded) && !field("State:").starts_with('Z') {
            found.push(pid);
        }
    }
    found
}

/// A privately mapped file cut shorter since the checkpoint cannot take
/// back a page the process wrote past its new end: the restore fails,
/// naming the file and the address, and leaves nothing running.
#[test]
fn a_mapped_file_cut_shorter_is_refused_and_nothing_runs() {
    persist_tests::require_root!();
    let temp = tempfile::tempdir().unwrap();
    let (recorded, image) = named_fixture_image("fixture-mapped-files", temp.path()).unwrap();
    let data = temp.path().join("state").join("data");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let err = failed_restore(&image);
    assert!(
        err.contains("writing back the 1 written page(s) at 0x")
            && err.contains(&*data.to_string_lossy()),
        "the error names the written page and the file: {err}"
    );
    let left = restored_copies(recorded);
    assert!(
        left.is_empty(),
        "a half-restored process was left: {left:?}"
    );
}

#[test]
fn corrupt_page_is_refused_and_nothing_runs() {
    persist_tests::require_root!();
    let temp = tempfile::tempdir().unwrap();
    let (recorded, image) = fixture_image(temp.path()).unwrap();
    let pages = image.join("pages");
    let mut bytes = std::fs::read(&pages).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&pages, &bytes).unwrap();
    let err = failed_restore(&image);
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(
        err.contains("page at 0x"),
        "the error names the page: {err}"
    );
    let left = restored_copies(recorded);
    assert!(
        left.is_empty(),
        "a half-restored process was left: {left:?}"
    );
}

#[test]
fn truncated_page_store_is_refused() {
    persist_tests::require_root!();
    let temp = tempfile::tempdir().unwrap();
    let (_, image) = fixture_image(temp.path()).unwrap();
    let pages = std::fs::OpenOptions::new()
        .write(true)
        .open(image.join("pages"))
        .unwrap();
    let len = pages.metadata().unwrap().len();
    pages.set_len(len - 4096).unwrap();
    let err = failed_restore(&image);
    assert!(err.contains("page store holds"), "{err}");
}

#[test]
fn image_from_another_kernel_is_refused() {
    persist_tests::require_root!();
    let temp = tempfile::tempdir().unwrap();
    let (_, image) = fixture_image(temp.path()).unwrap();
    edit_manifest(&image, |manifest| {
        manifest["kernel"]["release"] = "5.10.0-ancient".into();
    });
    let err = failed_restore(&image);
    assert!(err.contains("5.10.0-ancient"), "{err}");
    assert!(err.contains("same kernel build"), "{err}");
}

#[test]
fn failure_after_the_fork_kills_the_half_restored_process() {
    persist_tests::require_root!();
    let temp = tempfile::tempdir().unwrap();
    let (recorded, image) = fixture_image(temp.path()).unwrap();
    // Registers are set last, long after the process exists.
    edit_manifest(&image, |manifest| {
        let regs = manifest["threads"][0]["regs"].as_array_mut().unwrap();
        regs.pop();
    });
    let err = failed_restore(&image);
    assert!(err.contains("register words"), "{err}");
    let left = restored_copies(recorded);
    assert!(
        left.is_empty(),
        "a half-restored process was left: {left:?}"
    );
}

#[test]
fn failure_after_the_threads_are_made_kills_them_all_without_hanging() {
    persist_tests::require_root!();
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    let image = temp.path().join("image");
    let mut fixture = start_fixture("fixture-threads", &dir).unwrap();
    let _pids = Pids(vec![fixture.id() as i32]);
    let recorded = fixture.id() as i32;
    checkpoint(agent(), recorded, &image).unwrap();
    fixture.wait().unwrap();
    // The last thread's registers are set after every thread exists.
    edit_manifest(&image, |manifest| {
        let threads = manifest["threads"].as_array_mut().unwrap();
        let regs = threads.last_mut().unwrap()["regs"].as_array_mut().unwrap();
        regs.pop();
    });
    let output = persist_tests::output_within(
        agent()
            .arg("restore")
            .arg("--image")
            .arg(&image)
            .stdin(Stdio::null()),
        Duration::from_secs(30),
    )
    .expect("a failed restore of a threaded process returns");
    assert!(!output.status.success(), "restore of a bad image succeeded");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("register words"), "{err}");
    let left = restored_copies(recorded);
    assert!(
        left.is_empty(),
        "a half-restored process was left: {left:?}"
    );
}

/// Capability number of CAP_SYS_ADMIN.
const CAP_SYS_ADMIN: u64 = 21;

#[test]
fn credentials_are_restored_last() {
    persist_tests::require_root!();
    use std::os::unix::fs::PermissionsExt;
    let temp = tempfile::tempdir().unwrap();
    // The restored process runs as nobody and must reach its directory.
    std::fs::set_permissions(temp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = temp.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let image = temp.path().join("image");
    // Restore reopens the fixture's files as nobody: the test's own stderr
    // (a root-owned file, perhaps) would be refused.
    let mut fixture = start_fixture_with_stderr("fixture-process", &dir, Stdio::null()).unwrap();
    let mut pids = Pids(vec![fixture.id() as i32]);
    checkpoint(agent(), fixture.id() as i32, &image).unwrap();
    fixture.wait().unwrap();
    edit_manifest(&image, |manifest| {
        let creds = &mut manifest["process"]["credentials"];
        creds["uids"] = serde_json::json!([65534, 65534, 65534, 65534]);
        creds["gids"] = serde_json::json!([65534, 65534, 65534, 65534]);
        creds["groups"] = serde_json::json!([]);
        for set in [
            "cap_inheritable",
            "cap_permitted",
            "cap_effective",
            "cap_ambient",
        ] {
            creds[set] = 0.into();
        }
        let bounding = creds["cap_bounding"].as_u64().unwrap();
        creds["cap_bounding"] = (bounding & !(1 << CAP_SYS_ADMIN)).into();
        creds["no_new_privs"] = true.into();
    });
    let output = run_ok(agent().arg("restore").arg("--image").arg(&image)).unwrap();
    let pid = restored_pid(&output).unwrap();
    pids.track(pid);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(field("Uid:"), "65534 65534 65534 65534");
    assert_eq!(field("Gid:"), "65534 65534 65534 65534");
    assert_eq!(field("Groups:"), "");
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("CapPrm:"), "0000000000000000");
    let bounding = u64::from_str_radix(&field("CapBnd:"), 16).unwrap();
    assert_eq!(bounding & (1 << CAP_SYS_ADMIN), 0);
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(fixture_result(pid, &dir).unwrap(), "OK");
    kill_and_wait_dead(pid);
}

#[test]
fn image_writable_by_others_is_refused() {
    persist_tests::require_root!();
    use std::os::unix::fs::PermissionsExt;
    let temp = tempfile::tempdir().unwrap();
    let (_, image) = fixture_image(temp.path()).unwrap();
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = failed_restore(&image);
    assert!(
        err.contains(&format!(
            "{}: writable by group or others (mode 0777)",
            image.display()
        )),
        "{err}"
    );
}

/// A server in its own network namespace, started by `ip netns exec`.
struct NsServer {
    netns: NetNs,
    pids: Pids,
}

impl NsServer {
    fn new() -> Result<Self> {
        Ok(Self {
            netns: NetNs::new()?,
            pids: Pids::default(),
        })
    }

    fn in_ns(&self, program: &str) -> Command {
        self.netns.command(program)
    }

    fn agent(&self) -> Command {
        self.netns.command(binary("persist-agent"))
    }

    fn restore(&mut self, image: &Path) -> Result<i32> {
        let mut command = self.agent();
        command.arg("restore").arg("--image").arg(image);
        let output = run_ok(&mut command)?;
        let pid = restored_pid(&output)?;
        self.pids.track(pid);
        Ok(pid)
    }
}

fn output_text(command: &mut Command) -> Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[test]
fn python_http_server_serves_its_directory_after_restore() {
    persist_tests::require_root!();
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("www");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("restored-marker.txt"), "hi").unwrap();
    let image = temp.path().join("image");
    let mut server = NsServer::new().unwrap();
    let port = "18123";
    let url = format!("http://127.0.0.1:{port}/");
    let mut python = server
        .in_ns("python3")
        .args(["-m", "http.server", port, "--bind", "127.0.0.1"])
        .current_dir(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let listing = |server: &NsServer| {
        output_text(server.in_ns("curl").args(["-s", "-m", "5", &url])).unwrap_or_default()
    };
    wait_until(Duration::from_secs(20), || {
        listing(&server).contains("restored-marker.txt")
    })
    .unwrap();
    // `ip netns exec` execs python in place, so the child's pid is python's.
    let pid = python.id() as i32;
    server.pids.track(pid);
    checkpoint(server.agent(), pid, &image).unwrap();
    python.wait().unwrap();
    for _ in 0..2 {
        let pid = server.restore(&image).unwrap();
        let started = Instant::now();
        let body = listing(&server);
        eprintln!("first request after restore: {:?}", started.elapsed());
        assert!(body.contains("restored-marker.txt"), "listing: {body}");
        kill_and_wait_dead(pid);
    }
}

#[test]
fn redis_keeps_its_keys_and_takes_writes_after_restore() {
    persist_tests::require_root!();
    let temp = tempfile::tempdir().unwrap();
    let image = temp.path().join("image");
    let mut server = NsServer::new().unwrap();
    let port = "16379";
    let command = redis_server_command(16379);
    let mut redis = server
        .in_ns(&command[0])
        .args(&command[1..])
        .args(["--daemonize", "no"])
        .current_dir(temp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = redis.id() as i32;
    server.pids.track(pid);
    let cli = |server: &NsServer, args: &[&str]| {
        output_text(server.in_ns("redis-cli").args(["-p", port]).args(args))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    wait_until(Duration::from_secs(20), || {
        cli(&server, &["PING"]) == "PONG"
    })
    .unwrap();
    for index in 0..100 {
        let key = format!("key{index}");
        let value = format!("value-{index}-{}", "x".repeat(index * 10));
        assert_eq!(cli(&server, &["SET", &key, &value]), "OK");
    }
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    assert!(threads > 1, "redis runs several threads ({threads})");
    checkpoint(server.agent(), pid, &image).unwrap();
    redis.wait().unwrap();
    for round in 0..2 {
        let pid = server.restore(&image).unwrap();
        for index in [0usize, 42, 99] {
            let expected = format!("value-{index}-{}", "x".repeat(index * 10));
            assert_eq!(
                cli(&server, &["GET", &format!("key{index}")]),
                expected,
                "round {round}"
            );
        }
        assert_eq!(cli(&server, &["SET", "fresh", "write"]), "OK");
        assert_eq!(cli(&server, &["GET", "fresh"]), "write");
        assert_eq!(cli(&server, &["DBSIZE"]), "101");
        kill_and_wait_dead(pid);
    }
}

/// Kills a process restored in this test process and reaps it (and the init
/// of its pid namespace, if any).
fn kill_and_reap(pid: i32, init: Option<i32>) {
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(
        nix::unistd::Pid::from_raw(pid),
        Some(nix::sys::wait::WaitPidFlag::__WALL),
    );
    if let Some(init) = init {
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(init), None);
    }
}

/// The daemon's path, measured: prepare the skeleton, queue a request on
/// the restored listener, then resume and time until the response arrives,
/// with the pager on a thread.
#[test]
fn python_wake_from_a_prepared_skeleton_is_timed() {
    persist_tests::require_root!();
    use std::io::{Read, Write};
    use std::sync::Arc;

    use persist_agent::restore::{RestoreConfig, Skeleton};
    use persist_common::image::Image;

    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("www");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("woken-marker.txt"), "hi").unwrap();
    let image = temp.path().join("image");
    let mut server = NsServer::new().unwrap();
    let port = 18124u16;
    let mut python = server
        .in_ns("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = python.id() as i32;
    server.pids.track(pid);
    let url = format!("http://127.0.0.1:{port}/");
    wait_until(Duration::from_secs(20), || {
        output_text(server.in_ns("curl").args(["-s", "-m", "5", &url]))
            .unwrap_or_default()
            .contains("woken-marker.txt")
    })
    .unwrap();
    checkpoint(server.agent(), pid, &image).unwrap();
    python.wait().unwrap();

    let report = server
        .netns
        .enter(|| {
            let image = Arc::new(Image::open(&image).unwrap());
            let skeleton = Skeleton::prepare(image, RestoreConfig::default()).unwrap();
            let prepare = skeleton.timings();
            // The listener exists (re-created by prepare): the SYN and the
            // request wait in its queue, as they would on a wake.
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            stream
                .write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .unwrap();
            let woken = Instant::now();
            let mut restored = skeleton.resume().unwrap();
            let resume = restored.timings.resume;
            let pid = restored.pid;
            let init = restored.init_pid;
            let pager = std::thread::spawn(move || restored.pager.run_until_filled().unwrap());
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            let wake_to_response = woken.elapsed();
            let stats = pager.join().unwrap();
            kill_and_reap(pid, init);
            (prepare, resume, wake_to_response, stats, response)
        })
        .unwrap();
    let (prepare, resume, wake_to_response, stats, response) = report;
    assert!(response.contains("woken-marker.txt"), "{response}");
    assert!(stats.faults > 0, "the first request faulted memory in");
    eprintln!(
        "python3 http.server: prepare {:?} (setup {:?}, layout {:?}, finish {:?}); resume {:?}; \
         resume to response {:?}; first fault served {:?} after resume; {} faults ({} pages), \
         {} pages filled in the background in {:?}; {:.0} faults/s",
        prepare.prepare,
        prepare.setup,
        prepare.layout,
        prepare.finish,
        resume,
        wake_to_response,
        stats.first_fault_after_resume,
        stats.faults,
        stats.fault_pages,
        stats.filled_pages,
        stats.total_time,
        stats.faults_per_second()
    );
}

/// A big anonymous heap restored through the library: fixture check
/// passes, and the pager's throughput is reported.
#[test]
fn memory_fixture_with_64_mib_is_paged_in_correctly() {
    persist_tests::require_root!();
    use std::sync::Arc;

    use persist_agent::restore::{RestoreConfig, Skeleton};
    use persist_common::image::Image;

    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    let image = temp.path().join("image");
    let _pids = checkpoint_memory_fixture(&dir, 64, &image);

    let image = Arc::new(Image::open(&image).unwrap());
    let skeleton = Skeleton::prepare(image, RestoreConfig::default()).unwrap();
    let prepare = skeleton.timings();
    let mut restored = skeleton.resume().unwrap();
    let pid = restored.pid;
    let init = restored.init_pid;
    let resume = restored.timings.resume;
    let pager = std::thread::spawn(move || restored.pager.run_until_filled().unwrap());
    let result = fixture_result(pid, &dir);
    let stats = pager.join().unwrap();
    kill_and_reap(pid, init);
    assert_eq!(result.unwrap(), "OK");
    let pages = stats.fault_pages + stats.filled_pages;
    assert!(pages >= 64 * 256, "{pages} pages paged in");
    eprintln!(
        "fixture-memory 64 MiB: prepare {:?} (setup {:?}, layout {:?}, finish {:?}); resume {:?}; \
         {} faults ({} pages, {:.0} faults/s), {} pages filled; all {} pages in after {:?} ({:.0} MB/s)",
        prepare.prepare,
        prepare.setup,
        prepare.layout,
        prepare.finish,
        resume,
        stats.faults,
        stats.fault_pages,
        stats.faults_per_second(),
        stats.filled_pages,
        pages,
        stats.total_time,
        pages as f64 * 4096.0 / stats.total_time.as_secs_f64() / 1e6
    );
}

/// The restored process keeps its own userfaultfd: with no pager at all,
/// its first touch of lazy memory blocks (killable) instead of reading zeros.
#[test]
fn without_a_pager_faults_block_instead_of_reading_zeros() {
    persist_tests::require_root!();
    use std::sync::Arc;

    use persist_agent::restore::{RestoreConfig, Skeleton};
    use persist_common::image::Image;

    let temp = tempfile::tempdir().unwrap();
    let (_, image) = fixture_image(temp.path()).unwrap();
    let dir = temp.path().join("state");
    let image = Arc::new(Image::open(&image).unwrap());
    let skeleton = Skeleton::prepare(image, RestoreConfig::default()).unwrap();
    let restored = skeleton.resume().unwrap();
    let (pid, init) = (restored.pid, restored.init_pid);
    drop(restored.pager);
    signal(pid, nix::sys::signal::Signal::SIGUSR1);
    let blocked = wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default()
            == "handle_userfault"
    });
    std::thread::sleep(Duration::from_millis(200));
    let wrote_result = dir.join("result").exists();
    kill_and_reap(pid, init);
    blocked.expect("the process waits in handle_userfault");
    assert!(!wrote_result, "the fixture ran on memory nobody served");
}

/// A process that forks while much of its memory is still missing: the
/// child's copies are missing too and must be served (userfaultfd fork
/// events), never read as zeros.
const FORKING_SCRIPT: &str = r#"
import os, signal, sys, time
d = sys.argv[1]
N = 64 << 20
data = bytearray(bytes(range(256)) * (N // 256))
go = []
signal.signal(signal.SIGUSR1, lambda s, f: go.append(1))
open(d + "/ready.tmp", "w").close()
os.rename(d + "/ready.tmp", d + "/ready")
while not go:
    time.sleep(0.005)
pid = os.fork()
if pid == 0:
    ok = data == bytes(range(256)) * (N // 256)
    with open(d + "/result.tmp", "w") as f:
        f.write("OK" if ok else "FAIL: the forked child's memory differs")
    os.rename(d + "/result.tmp", d + "/result")
    os._exit(0)
os.waitpid(pid, 0)
while True:
    time.sleep(1)
"#;

#[test]
fn a_child_forked_while_pages_are_missing_sees_the_image() {
    persist_tests::require_root!();
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    let script = temp.path().join("forker.py");
    std::fs::write(&script, FORKING_SCRIPT).unwrap();
    let image = temp.path().join("image");
    let mut python = Command::new("python3")
        .arg(&script)
        .arg(&dir)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut pids = Pids(vec![python.id() as i32]);
    wait_until(Duration::from_secs(30), || dir.join("ready").exists()).unwrap();
    checkpoint(agent(), python.id() as i32, &image).unwrap();
    python.wait().unwrap();
    let output = run_ok(agent().arg("restore").arg("--image").arg(&image)).unwrap();
    let pid = restored_pid(&output).unwrap();
    pids.track(pid);
    // At once: 64 MiB take the pager tens of milliseconds to fill.
    let result = fixture_result(pid, &dir).unwrap();
    kill_and_wait_dead(pid);
    assert_eq!(result, "OK");
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
        .ino()
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
        .len()
}

/// Restored, changed in a few pages, checkpointed again with `--base` the
/// image it came from: the new image writes only what changed, links the
/// rest, and restores both the changed and the unchanged memory.
#[test]
fn a_delta_image_stores_only_the_changed_pages_and_restores_all() {
    persist_tests::require_root!();
    use persist_common::image::Image;

    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    let base = temp.path().join("base");
    let delta = temp.path().join("delta");
    let mut pids = checkpoint_memory_fixture(&dir, 32, &base);

    let output = run_ok(agent().arg("restore").arg("--image").arg(&base)).unwrap();
    let pid = restored_pid(&output).unwrap();
    pids.track(pid);
    let changed = dir.join("changed");
    signal(pid, nix::sys::signal::Signal::SIGUSR2);
    wait_until(Duration::from_secs(20), || changed.exists()).expect("the fixture changed pages");
    assert_eq!(fixture_result(pid, &dir).unwrap(), "OK", "before the delta");
    wait_until(Duration::from_secs(10), || !has_unfilled_memory(pid))
        .expect("the pager fills the restored process");
    let summary = run_ok(
        agent()
            .args(["checkpoint", "--pid", &pid.to_string(), "--image"])
            .arg(&delta)
            .arg("--base")
            .arg(&base),
    )
    .unwrap();
    let summary = String::from_utf8_lossy(&summary.stdout).into_owned();
    kill_and_wait_dead(pid);

    let opened = Image::open(&delta).unwrap();
    let stores = &opened.manifest().base_stores;
    assert_eq!(stores.len(), 1, "one base store: {stores:?}");
    assert_eq!(
        inode(&delta.join("pages.base.0")),
        inode(&base.join("pages")),
        "the base store is a hard link to the base's pages"
    );
    let (own, full) = (
        file_len(&delta.join("pages")),
        file_len(&base.join("pages")),
    );
    eprintln!("delta: {own} bytes written, base: {full} bytes; {summary}");
    assert!(
        own * 4 < full,
        "the delta's own store ({own} bytes) is not much smaller than the base's ({full}): {summary}"
    );
    assert!(summary.contains("reused"), "{summary}");
    drop(opened);

    let output = run_ok(agent().arg("restore").arg("--image").arg(&delta)).unwrap();
    let pid = restored_pid(&output).unwrap();
    pids.track(pid);
    assert_eq!(
        fixture_result(pid, &dir).unwrap(),
        "OK",
        "the delta restores the changed and the unchanged pages"
    );
    kill_and_wait_dead(pid);
}

/// Timers count their time left from the wake, not from the prepare: a
/// skeleton that waits before it resumes finds its POSIX timers, its
/// `ITIMER_REAL` and its timerfd with about the time left the image
/// recorded, not that much less (nor expired, for a short wait).
#[test]
fn timers_count_their_time_left_from_the_resume() {
    persist_tests::require_root!();
    use std::collections::HashMap;
    use std::sync::Arc;

    use persist_agent::restore::{RestoreConfig, Skeleton};
    use persist_common::image::{FdKind, Image};

    const WAIT: Duration = Duration::from_secs(3);
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    let image = temp.path().join("image");
    let mut fixture = start_fixture("fixture-timers", &dir).unwrap();
    let mut pids = Pids::default();
    pids.track(fixture.id() as i32);
    checkpoint(agent(), fixture.id() as i32, &image).unwrap();
    fixture.wait().unwrap();

    let image = Arc::new(Image::open(&image).unwrap());
    let process = &image.manifest().process;
    let mut saved: HashMap<String, u64> = process
        .posix_timers
        .iter()
        .filter(|t| t.remaining_ns > 0)
        .map(|t| (format!("posix-{}", t.id), t.remaining_ns))
        .collect();
    let real = process.itimers.iter().find(|t| t.which == 0).unwrap();
    saved.insert("itimer-real".into(), real.value_us * 1000);
    let timerfd = image
        .manifest()
        .fds
        .iter()
        .find_map(|fd| match fd.kind {
            FdKind::Timerfd { value_ns, .. } => Some(value_ns),
            _ => None,
        })
        .expect("the image holds the fixture's timerfd");
    saved.insert("timerfd".into(), timerfd);

    let skeleton = Skeleton::prepare(Arc::clone(&image), RestoreConfig::default()).unwrap();
    std::thread::sleep(WAIT);
    let mut restored = skeleton.resume().unwrap();
    eprintln!(
        "fixture-timers: resume (timers armed, then detached) took {:?}",
        restored.timings.resume
    );
    let (pid, init) = (restored.pid, restored.init_pid);
    let pager = std::thread::spawn(move || restored.pager.run_until_filled().unwrap());
    let result = fixture_result(pid, &dir);
    let remaining = std::fs::read_to_string(dir.join("remaining")).unwrap_or_default();
    pager.join().unwrap();
    kill_and_reap(pid, init);
    assert_eq!(result.unwrap(), "OK", "the restored fixture's own checks");

    let mut checked = 0;
    for line in remaining.lines() {
        let (name, left) = line.split_once(' ').unwrap();
        let left: u64 = left.parse().unwrap();
        let recorded = saved[name];
        let lost = Duration::from_nanos(recorded.saturating_sub(left));
        assert!(
            lost < WAIT / 2,
            "{name}: {left} ns left right after the wake, the image recorded {recorded} ns: \
             it lost {lost:?}, so it counted during the {WAIT:?} before the wake"
        );
        checked += 1;
    }
    assert_eq!(
        checked,
        saved.len(),
        "every armed timer reported: {remaining:?}, saved {saved:?}"
    );
}

/// What another process finds of `file`'s POSIX locks on `len` bytes from
/// `start` (`F_GETLK` for a write lock): the conflicting lock's type,
/// start, length and owner, or `F_UNLCK`.
fn posix_lock_on(file: &std::fs::File, start: i64, len: i64) -> (i32, i64, i64, i32) {
    let mut probe = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: start,
        l_len: len,
        l_pid: 0,
    };
    nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_GETLK(&mut probe)).unwrap();
    (
        i32::from(probe.l_type),
        probe.l_start,
        probe.l_len,
        probe.l_pid,
    )
}

/// Whether another open file description of `path` can take a flock.
fn flock_free(path: &Path, exclusive: bool) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    let file = std::fs::File::open(path).unwrap();
    let arg = if exclusive {
        FlockArg::LockExclusiveNonblock
    } else {
        FlockArg::LockSharedNonblock
    };
    Flock::lock(file, arg).is_ok()
}

/// flock, POSIX and OFD locks come back held by the restored process (its
/// own checks see the flock and OFD lock, this test, another process, sees
/// all of them with their ranges and owner), restored twice from one image;
/// and an `O_APPEND` file keeps its flag and offset.
#[test]
fn file_locks_come_back_held_by_the_restored_process() {
    persist_tests::require_root!();
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    let image = temp.path().join("image");
    let mut fixture = start_fixture("fixture-locks", &dir).unwrap();
    let mut pids = Pids::default();
    pids.track(fixture.id() as i32);
    checkpoint(agent(), fixture.id() as i32, &image).unwrap();
    fixture.wait().unwrap();
    assert!(
        flock_free(&dir.join("flock"), true),
        "the checkpointed fixture is gone with its locks"
    );

    let posix = std::fs::File::open(dir.join("posix")).unwrap();
    let ofd = std::fs::File::open(dir.join("ofd")).unwrap();
    for round in 1..=2 {
        let output = run_ok(agent().arg("restore").arg("--image").arg(&image)).unwrap();
        let pid = restored_pid(&output).unwrap();
        pids.track(pid);
        let result = fixture_result(pid, &dir).unwrap();
        assert_eq!(result, "OK", "fixture-locks, restore {round} (pid {pid})");

        let write = libc::F_WRLCK;
        let read = libc::F_RDLCK;
        assert_eq!(
            posix_lock_on(&posix, 0, 50),
            (write, 10, 5, pid),
            "restore {round}: the POSIX write lock on bytes 10-14, owned by pid {pid}"
        );
        assert_eq!(
            posix_lock_on(&posix, 60, 1000),
            (read, 100, 0, pid),
            "restore {round}: the POSIX read lock from byte 100 on, owned by pid {pid}"
        );
        assert_eq!(
            posix_lock_on(&posix, 15, 85).0,
            libc::F_UNLCK,
            "restore {round}: bytes 15-99 are not locked"
        );
        let mut probe = libc::flock {
            l_type: libc::F_RDLCK as i16,
            l_whence: libc::SEEK_SET as i16,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        nix::fcntl::fcntl(&ofd, nix::fcntl::FcntlArg::F_OFD_GETLK(&mut probe)).unwrap();
        assert_eq!(
            i32::from(probe.l_type),
            write,
            "restore {round}: the OFD write lock is held"
        );
        assert!(
            !flock_free(&dir.join("flock"), false),
            "restore {round}: the write flock is held"
        );
        assert!(
            flock_free(&dir.join("shared"), false) && !flock_free(&dir.join("shared"), true),
            "restore {round}: the read flock is held, and only for reading"
        );
        kill_and_wait_dead(pid);
    }

    // A lock someone else took meanwhile: the restore fails naming it.
    let taken = nix::fcntl::Flock::lock(
        std::fs::File::open(dir.join("flock")).unwrap(),
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    )
    .map_err(|(_, e)| e)
    .unwrap();
    let err = failed_restore(&image);
    assert!(
        err.contains("taking the write flock of fd")
            && err.contains("Resource temporarily unavailable"),
        "a restore whose flock is taken by another: {err}"
    );
    drop(taken);
}

/// Resident kilobytes of `pid`'s executable file mappings (its code).
fn code_resident_kib(pid: i32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut code = false;
    let mut total = 0;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields
            .first()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            code = fields.get(1).is_some_and(|perms| perms.contains('x'))
                && fields.get(5).is_some_and(|path| path.starts_with('/'));
        } else if code && fields.first() == Some(&"Rss:") {
            total += fields[1].parse::<u64>().unwrap();
        }
    }
    total
}

/// A skeleton prepared ahead has its code in its page tables before it
/// runs; one prepared for a waiting (cold) wake leaves it to fault in,
/// which costs the wake less than putting it all there first.
#[test]
fn a_cold_prepare_leaves_the_code_to_fault_in() {
    persist_tests::require_root!();
    use std::sync::Arc;

    use persist_agent::restore::{RestoreConfig, Skeleton};
    use persist_common::image::Image;

    let temp = tempfile::tempdir().unwrap();
    let (_, image) = fixture_image(temp.path()).unwrap();
    let image = Arc::new(Image::open(&image).unwrap());

    let ahead = Skeleton::prepare(Arc::clone(&image), RestoreConfig::default()).unwrap();
    let populated = code_resident_kib(ahead.pid());
    drop(ahead);
    let cold = Skeleton::prepare(
        image,
        RestoreConfig {
            cold: true,
            ..RestoreConfig::default()
        },
    )
    .unwrap();
    let left = code_resident_kib(cold.pid());
    eprintln!("code resident: {populated} KiB prepared ahead, {left} KiB cold");
    drop(cold);
    assert!(
        populated > 0,
        "a skeleton prepared ahead has its code resident"
    );
    assert_eq!(left, 0, "a cold skeleton has none of its code resident yet");
}
