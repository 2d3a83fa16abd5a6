//! A cold wake (a service parked with its image only) of python's
//! http.server that prefetches its recorded working set: the set is loaded
//! and its page runs checked on a second thread while the skeleton is
//! built, then copied by two threads. It must answer right when the image's
//! page store has left the page cache (read back from disk while the
//! skeleton is built) as when it is there.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use persist_tests::{Sandbox, add_http_server, wait_until, web_root};

/// Bytes of `file` in the page cache, as `fincore` counts them.
fn resident_bytes(file: &Path) -> u64 {
    let output = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
        .arg(file)
        .output()
        .expect("running fincore (util-linux-extra)");
    assert!(
        output.status.success(),
        "fincore {}: {output:?}",
        file.display()
    );
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|err| panic!("fincore {}: {err}: {output:?}", file.display()))
}

/// Asks the kernel to drop the clean pages of `file` from the page cache.
fn drop_from_page_cache(file: &Path) {
    let opened = std::fs::File::open(file).expect("opening the page store");
    nix::fcntl::posix_fadvise(
        &opened,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .expect("posix_fadvise(DONTNEED)");
}

/// Waits until `name` is parked with its image only.
fn wait_on_disk(sandbox: &Sandbox, name: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let parked = wait_until(Duration::from_secs(20), || {
        last = sandbox.service(name).unwrap_or_default();
        last["state"] == "parked" && last["skeleton"] == "on disk"
    });
    assert!(
        parked.is_ok(),
        "{name} not parked on disk: {last:#}\n{}",
        sandbox.daemon_log()
    );
    last
}

/// Waits until the pager of the last wake of `name` is done, and returns
/// the status then.
fn wait_pager_done(sandbox: &Sandbox, name: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let done = wait_until(Duration::from_secs(10), || {
        last = sandbox.service(name).unwrap_or_default();
        !last["last_faults"].is_null()
    });
    assert!(done.is_ok(), "pager of {name} not done: {last:#}");
    last
}

#[test]
fn a_cold_wake_prefetches_its_working_set_from_an_image_out_of_the_page_cache() {
    persist_tests::require_root!();
    let root = web_root();
    let mut sandbox = Sandbox::new().unwrap();
    sandbox.start_daemon().unwrap();
    add_http_server(
        &sandbox,
        "pycold",
        8711,
        root.path(),
        &["--keep-skeleton", "never", "--prefetch", "recorded"],
    );
    let store = sandbox.state_dir().join("images/pycold/pages");
    wait_on_disk(&sandbox, "pycold");

    // The first wake records the working set.
    let body = sandbox.http_get(8711).unwrap();
    assert!(body.contains("persist-was-here.txt"), "{body:?}");
    wait_pager_done(&sandbox, "pycold");
    // Written once the pager is done, a moment after `status` says so.
    let working_set = sandbox.state_dir().join("images/pycold/working-set");
    assert!(
        wait_until(Duration::from_secs(10), || working_set.exists()).is_ok(),
        "the first wake recorded a working set:\n{}",
        sandbox.daemon_log()
    );
    sandbox.agent_ok(&["park", "pycold"]).unwrap();
    wait_on_disk(&sandbox, "pycold");

    for (wake, dropped) in [(2, true), (3, false), (4, true)] {
        if dropped {
            let before = resident_bytes(&store);
            drop_from_page_cache(&store);
            let after = resident_bytes(&store);
            assert!(
                after < before || before == 0,
                "the page store left the page cache: {before} bytes resident before, {after} after"
            );
        }
        let body = sandbox
            .http_get(8711)
            .unwrap_or_else(|err| panic!("wake {wake}: {err:#}\n{}", sandbox.daemon_log()));
        assert!(
            body.contains("persist-was-here.txt"),
            "wake {wake} answered {body:?}"
        );
        let status = wait_pager_done(&sandbox, "pycold");
        assert_eq!(status["wakes"], wake, "{status:#}");
        assert!(
            status["last_prefetch_pages"].as_u64().unwrap_or(0) > 0,
            "wake {wake} copied its working set in before the resume: {status:#}"
        );
        // The process runs on: a second request is served by it alone.
        let pid = sandbox.running_pid("pycold").unwrap();
        let again = sandbox.http_get(8711).unwrap();
        assert!(again.contains("persist-was-here.txt"), "{again:?}");
        assert_eq!(sandbox.running_pid("pycold").unwrap(), pid);
        sandbox.agent_ok(&["park", "pycold"]).unwrap();
        wait_on_disk(&sandbox, "pycold");
    }
    let log = sandbox.daemon_log();
    assert!(
        log.contains("cold wake: skeleton prepared for the waiting wake"),
        "the wakes were cold: {log}"
    );
    assert!(
        !log.contains("no working set loaded ahead"),
        "the working set was loaded beside the build: {log}"
    );
    assert_eq!(
        log.matches("copy_begun=true").count(),
        3,
        "each prefetched cold wake began copying its set before its threads were made: {log}"
    );
}
