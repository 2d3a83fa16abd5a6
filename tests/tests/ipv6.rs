//! IPv6 listeners: a parked service bound to `::` (dual-stack) wakes for an
//! IPv4 or an IPv6 SYN alike and serves both, one bound to `::1` wakes for
//! IPv6 and, like the running server, takes no IPv4 connection, and a
//! listener the agent opens itself on `::` is dual-stack too.

use std::process::Output;
use std::time::Duration;

use persist_tests::{Sandbox, binary, output_within, web_root};

/// `curl -4` or `-6` of `url` from inside the sandbox's namespace.
fn curl(sandbox: &Sandbox, family: &str, url: &str) -> Output {
    let mut command = sandbox.netns.command("curl");
    command.args([family, "-sS", "-m", "20", url]);
    output_within(&mut command, Duration::from_secs(30)).expect("curl runs")
}

/// The body of a GET of `url`, failing with curl's error if it got none.
fn get(sandbox: &Sandbox, family: &str, url: &str) -> String {
    let out = curl(sandbox, family, url);
    assert!(
        out.status.success(),
        "curl {family} {url} failed: {}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        sandbox.daemon_log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wakes(sandbox: &Sandbox, name: &str) -> u64 {
    sandbox.service(name).unwrap()["wakes"]
        .as_u64()
        .expect("status has a wake count")
}

/// `python3 -m http.server` on `bind`, in snapshot mode, registered with `--addr bind`.
fn add_python(sandbox: &Sandbox, name: &str, port: u16, bind: &str, root: &std::path::Path) {
    let command = [
        "python3",
        "-m",
        "http.server",
        &port.to_string(),
        "--bind",
        bind,
        "--directory",
        &root.display().to_string(),
    ]
    .map(str::to_owned);
    sandbox
        .add_ok(name, port, &["--addr", bind, "--ready", "http:/"], &command)
        .expect("add of a python http.server on an IPv6 address");
}

#[test]
fn dual_stack_service_wakes_for_ipv6_and_ipv4() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let root = web_root();
    add_python(&sandbox, "dual", 8601, "::", root.path());
    let v6 = "http://[::1]:8601/persist-was-here.txt";
    let v4 = "http://127.0.0.1:8601/persist-was-here.txt";

    assert_eq!(get(&sandbox, "-6", v6), "hi", "an IPv6 SYN wakes it");
    let pid = sandbox.running_pid("dual").unwrap();
    assert_eq!(get(&sandbox, "-4", v4), "hi", "it serves IPv4 once awake");
    assert_eq!(get(&sandbox, "-6", v6), "hi", "and IPv6 again");
    assert_eq!(
        sandbox.running_pid("dual").unwrap(),
        pid,
        "one process served all"
    );
    assert_eq!(wakes(&sandbox, "dual"), 1, "woken once");

    sandbox.agent_ok(&["park", "dual"]).unwrap();
    assert_eq!(get(&sandbox, "-4", v4), "hi", "an IPv4 SYN wakes it");
    assert_eq!(
        wakes(&sandbox, "dual"),
        2,
        "the IPv4 SYN was the second wake"
    );
    assert_eq!(get(&sandbox, "-6", v6), "hi", "it serves IPv6 once awake");
    assert_eq!(wakes(&sandbox, "dual"), 2, "still woken twice");
}

#[test]
fn ipv6_loopback_service_wakes_and_takes_no_ipv4() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let root = web_root();
    add_python(&sandbox, "v6only", 8602, "::1", root.path());

    let refused = curl(&sandbox, "-4", "http://127.0.0.1:8602/");
    assert!(
        !refused.status.success(),
        "nothing listens on 127.0.0.1:8602, as when the server runs: {refused:?}"
    );
    assert_eq!(
        sandbox.service("v6only").unwrap()["state"],
        "parked",
        "an IPv4 SYN to another address does not wake it"
    );

    let url = "http://[::1]:8602/persist-was-here.txt";
    assert_eq!(get(&sandbox, "-6", url), "hi", "the first SYN wakes it");
    assert_eq!(get(&sandbox, "-6", url), "hi", "later connections");
    assert_eq!(wakes(&sandbox, "v6only"), 1, "woken once");
    sandbox.agent_ok(&["park", "v6only"]).unwrap();
    assert_eq!(get(&sandbox, "-6", url), "hi", "woken again after a park");
    assert_eq!(wakes(&sandbox, "v6only"), 2, "woken twice");
}

#[test]
fn listener_the_agent_opens_on_any_ipv6_is_dual_stack() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let server = binary("hello-server").display().to_string();
    sandbox
        .add_ok("exec6", 8603, &["--exec", "--addr", "::"], &[server])
        .expect("add of an --exec service on ::");

    let first = get(&sandbox, "-4", "http://127.0.0.1:8603/");
    assert!(
        first.starts_with("hello from pid"),
        "IPv4 wakes it: {first:?}"
    );
    let second = get(&sandbox, "-6", "http://[::1]:8603/");
    assert_eq!(second, first, "the same process serves IPv6");
    let status = sandbox.service("exec6").unwrap();
    assert_eq!(status["wakes"], 1, "woken once: {status}");
    assert_eq!(status["addr"], "::", "status shows the address: {status}");
}
