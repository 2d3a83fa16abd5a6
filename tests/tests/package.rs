//! The Debian package built by `cargo xtask deb`, installed with dpkg on
//! this machine as an administrator would: its binary runs a daemon (on a
//! temporary state directory, in a namespace of its own) that reports
//! READY=1, parks a service and wakes it; its man pages render and its
//! completions are there; `dpkg -r` leaves none of its files behind, and
//! `dpkg --purge` then clears dpkg's record of it (kept after a remove for
//! the postrm script's purge step).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use persist_tests::{Sandbox, add_http_server, bin_dir, run_ok, web_root};

const PACKAGE: &str = "persist";
const AGENT: &str = "/usr/bin/persist-agent";

/// The package to install: `PERSIST_DEB` (set by `cargo xtask test`), else
/// the newest `.deb` in `target/debian/`.
fn package_file() -> PathBuf {
    if let Some(deb) = std::env::var_os("PERSIST_DEB") {
        return deb.into();
    }
    let dir = bin_dir()
        .parent()
        .expect("the profile directory is in target/")
        .join("debian");
    std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .max_by_key(|path| path.metadata().and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| {
            panic!(
                "no package in {}: build it with `cargo xtask deb` (cargo xtask test does)",
                dir.display()
            )
        })
}

/// dpkg's status of the package (`install ok installed`, `deinstall ok
/// config-files`), empty when dpkg knows nothing of it.
fn package_status() -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", PACKAGE])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}

fn is_installed() -> bool {
    package_status().contains("install ok installed")
}

/// Every path the package holds, as installed (`/usr/bin/persist-agent`, ...).
fn package_paths(deb: &Path) -> BTreeSet<PathBuf> {
    let listing = run_ok(Command::new("dpkg-deb").arg("--contents").arg(deb)).unwrap();
    String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter_map(|path| path.strip_prefix('.'))
        .map(|path| PathBuf::from(path.trim_end_matches('/')))
        .filter(|path| !path.as_os_str().is_empty())
        .collect()
}

/// Purges the package if the test stops before it does.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", PACKAGE]).output();
    }
}

/// A man page as `man` renders it to a pipe.
fn rendered_man_page(page: &str) -> String {
    let out = run_ok(
        Command::new("man")
            .arg("-l")
            .arg(format!("/usr/share/man/man1/{page}.1.gz"))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100"),
    )
    .unwrap_or_else(|err| panic!("man -l {page}: {err:#}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn package_installs_parks_and_wakes_and_removes_cleanly() {
    persist_tests::require_root!();
    let deb = package_file();
    assert!(
        !is_installed(),
        "package {PACKAGE} is installed on this machine already; this test would remove it \
         (dpkg -r {PACKAGE} first)"
    );
    let paths = package_paths(&deb);
    assert!(
        paths.contains(Path::new(AGENT)),
        "{} holds {AGENT}: {paths:?}",
        deb.display()
    );
    let existing_before: BTreeSet<&PathBuf> = paths.iter().filter(|p| p.exists()).collect();
    assert!(
        !Path::new(AGENT).exists(),
        "{AGENT} exists without the package; the test would remove it"
    );

    run_ok(Command::new("dpkg").arg("-i").arg(&deb)).expect("dpkg -i of the package");
    let installed = Installed;
    assert!(is_installed(), "dpkg lists {PACKAGE} as installed");

    let unit = std::fs::read_to_string("/usr/lib/systemd/system/persist.service")
        .expect("the package installs persist.service");
    assert!(
        unit.contains("\nType=notify\n"),
        "the unit is Type=notify:\n{unit}"
    );
    assert!(
        unit.contains(&format!("\nExecStart={AGENT} daemon")),
        "the unit runs the installed daemon:\n{unit}"
    );
    // systemd's own check of the unit: its keys, its command, its man pages.
    run_ok(
        Command::new("systemd-analyze").args(["verify", "/usr/lib/systemd/system/persist.service"]),
    )
    .expect("systemd-analyze verify accepts the installed unit");
    let state_mode = std::fs::metadata("/var/lib/persist")
        .expect("the package creates /var/lib/persist")
        .permissions()
        .mode();
    assert_eq!(
        state_mode & 0o777,
        0o700,
        "the state directory is root-only"
    );
    assert!(
        Path::new("/etc/persist/services.d").is_dir(),
        "the package creates the configuration directory"
    );

    let top = rendered_man_page("persist-agent");
    assert!(
        top.contains("persist-agent") && top.contains("daemon") && top.contains("park"),
        "persist-agent(1) names the subcommands:\n{top}"
    );
    let add = rendered_man_page("persist-agent-add");
    assert!(
        add.contains("--addr") && add.contains("--idle-timeout"),
        "persist-agent-add(1) documents its options:\n{add}"
    );
    let bash = "/usr/share/bash-completion/completions/persist-agent";
    run_ok(Command::new("bash").arg("-n").arg(bash)).expect("the bash completion parses");
    for script in [
        bash,
        "/usr/share/zsh/vendor-completions/_persist-agent",
        "/usr/share/fish/vendor_completions.d/persist-agent.fish",
    ] {
        let text = std::fs::read_to_string(script)
            .unwrap_or_else(|err| panic!("completion {script}: {err}"));
        assert!(
            text.contains("idle-timeout"),
            "{script} completes add's options"
        );
    }

    park_and_wake_with_the_installed_binary();

    run_ok(Command::new("dpkg").args(["-r", PACKAGE])).expect("dpkg -r of the package");
    assert!(
        !is_installed(),
        "dpkg no longer lists {PACKAGE} as installed"
    );
    let left: Vec<&PathBuf> = paths
        .iter()
        .filter(|path| path.exists() && !existing_before.contains(path))
        .collect();
    assert!(left.is_empty(), "dpkg -r left these behind: {left:?}");
    run_ok(Command::new("dpkg").args(["--purge", PACKAGE])).expect("dpkg --purge");
    std::mem::forget(installed);
    assert_eq!(package_status(), "", "dpkg keeps no record of {PACKAGE}");
}

/// The installed daemon, on a temporary state directory in a namespace of
/// its own, says READY=1 on a socket of ours, then parks and wakes python's
/// http.server through the installed command line.
fn park_and_wake_with_the_installed_binary() {
    let mut sandbox = Sandbox::with_agent_binary(AGENT.into()).unwrap();
    let notify_path = sandbox.state_dir().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    sandbox
        .start_daemon_with_env(&[], &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())])
        .unwrap();
    let mut message = [0u8; 4096];
    let len = notify.recv(&mut message).expect("READY=1 from the daemon");
    assert_eq!(
        String::from_utf8_lossy(&message[..len]).trim(),
        "READY=1",
        "the installed daemon reports ready"
    );

    let root = web_root();
    add_http_server(&sandbox, "web", 8801, root.path(), &[]);
    let listing = sandbox.http_get(8801).unwrap();
    assert!(
        listing.contains("persist-was-here.txt"),
        "the first connection wakes the parked server: {listing:?}"
    );
    assert_eq!(sandbox.service("web").unwrap()["wakes"], 1, "one wake");
    sandbox.agent_ok(&["park", "web"]).unwrap();
    assert_eq!(sandbox.service("web").unwrap()["state"], "parked");
    let listing = sandbox.http_get(8801).unwrap();
    assert!(
        listing.contains("persist-was-here.txt"),
        "it wakes again after a park: {listing:?}"
    );
    assert_eq!(sandbox.service("web").unwrap()["wakes"], 2, "two wakes");
}
