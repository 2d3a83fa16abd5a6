//! The daemon parks and wakes whole process trees: nginx's master and two
//! workers, gunicorn's arbiter and two sync workers, added in snapshot
//! mode (built, checkpointed as a tree), woken by a connection, parked and
//! woken again, stopped whole. Each test runs its own daemon in its own
//! network namespace and state directory.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use persist_agent::process_tree::children as children_of;
use persist_tests::{
    Sandbox, gunicorn_command, nginx_command_with_workers, service_pids, wait_until, web_root,
    wsgi_answering,
};

/// The state letter of `pid` (`/proc/PID/stat`), `None` once it is gone.
fn state_of(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(") ").next()?.chars().next()
}

/// The start time of `pid` (`/proc/PID/stat` field 22), which tells it
/// apart from a later process given the same pid.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(") ")
        .next()?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Whether `pid` runs no code: gone, a zombie, or stopped.
fn runs_no_code(pid: i32) -> bool {
    matches!(state_of(pid), None | Some('Z' | 'X' | 't' | 'T'))
}

/// The pids `status` lists for a running `name`, once its tree has
/// `processes` processes, with the PSS and RSS of that one status.
fn running_tree(sandbox: &Sandbox, name: &str, processes: usize) -> (Vec<i32>, u64, u64) {
    let mut seen = None;
    wait_until(Duration::from_secs(10), || {
        let Ok(status) = sandbox.service(name) else {
            return false;
        };
        let pids = service_pids(&status);
        let ok = status["state"] == "running"
            && pids.len() == processes
            && status["pid"].as_i64() == Some(i64::from(pids[0]));
        if ok {
            seen = Some((
                pids,
                status["pss_bytes"].as_u64().unwrap_or(0),
                status["rss_bytes"].as_u64().unwrap_or(0),
            ));
        }
        ok
    })
    .unwrap_or_else(|_| {
        panic!(
            "{name} never ran as {processes} processes: {:?}\n{}",
            sandbox.service(name),
            sandbox.daemon_log()
        )
    });
    seen.expect("seen once the wait succeeded")
}

/// Waits until `name` is parked with a skeleton prepared; its pid.
fn parked_skeleton(sandbox: &Sandbox, name: &str) -> i32 {
    let mut skeleton = None;
    wait_until(Duration::from_secs(20), || {
        let status = sandbox.service(name).unwrap();
        skeleton = status["skeleton_pid"].as_i64().map(|pid| pid as i32);
        status["state"] == "parked" && skeleton.is_some()
    })
    .unwrap_or_else(|_| {
        panic!(
            "{name} is not parked with a skeleton: {:?}\n{}",
            sandbox.service(name),
            sandbox.daemon_log()
        )
    });
    skeleton.expect("seen once the wait succeeded")
}

/// Ready once a worker answers: the master forked its workers by then, and
/// the build waits until they are all there.
const NGINX_READY: &[&str] = &["--ready", "http:/"];

/// An nginx configuration of a master and two workers serving `body`.
fn nginx_tree(dir: &Path, port: u16, body: &str) -> (tempfile::TempDir, Vec<String>) {
    let root = web_root();
    std::fs::write(root.path().join("index.html"), body).unwrap();
    let command = nginx_command_with_workers(&dir.join("nginx"), root.path(), port, 2)
        .expect("nginx configuration");
    (root, command)
}

/// nginx with `master_process on; worker_processes 2;`: added (built and
/// checkpointed as a tree), woken by a request, its workers' memory served
/// lazily (a worker killed and respawned by the restored master answers
/// too), parked and woken again; `status` shows its three pids and a PSS
/// below their summed RSS; SIGQUIT to the restored master stops the whole
/// tree and the daemon sees the service exit.
#[test]
fn nginx_master_and_two_workers_are_parked_woken_and_stopped_whole() {
    persist_tests::require_root!();
    const PORT: u16 = 8150;
    const BODY: &str = "hello from the parked tree\n";
    let sandbox = Sandbox::with_daemon().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_root, command) = nginx_tree(dir.path(), PORT, BODY);
    sandbox
        .add_ok("nginx", PORT, NGINX_READY, &command)
        .unwrap();

    // Parked: the skeleton is the whole tree, and its cost covers it.
    let skeleton = parked_skeleton(&sandbox, "nginx");
    assert_eq!(
        children_of(skeleton).len(),
        2,
        "the skeleton's master holds its two workers"
    );
    assert!(
        children_of(skeleton).into_iter().all(runs_no_code),
        "the skeleton's workers wait stopped"
    );

    assert_eq!(sandbox.http_get(PORT).unwrap(), BODY);
    let (pids, pss, rss) = running_tree(&sandbox, "nginx", 3);
    assert_eq!(pids[0], skeleton, "the woken master is the skeleton's");
    assert!(
        pss > 0 && pss < rss,
        "the tree's PSS {pss} counts the pages its processes share once, its RSS {rss} in each"
    );

    // A worker killed: the restored master forks a new one, whose memory
    // (inherited from a master whose pages may still be coming in) is
    // served as well.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[1]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(Duration::from_secs(10), || {
        let workers = children_of(pids[0]);
        workers.len() == 2 && !workers.contains(&pids[1])
    })
    .expect("the master respawns its worker");
    for _ in 0..4 {
        assert_eq!(sandbox.http_get(PORT).unwrap(), BODY);
    }

    sandbox.agent_ok(&["park", "nginx"]).unwrap();
    let old: Vec<i32> = std::iter::once(pids[0])
        .chain(children_of(pids[0]))
        .collect();
    let skeleton = parked_skeleton(&sandbox, "nginx");
    wait_until(Duration::from_secs(5), || {
        old.iter()
            .all(|&pid| pid == skeleton || state_of(pid).is_none())
    })
    .unwrap_or_else(|_| panic!("a process of the parked tree {old:?} outlived its park"));

    assert_eq!(sandbox.http_get(PORT).unwrap(), BODY);
    let (pids, _, _) = running_tree(&sandbox, "nginx", 3);
    assert_eq!(sandbox.service("nginx").unwrap()["wakes"], 2);

    // `nginx -s quit`: the master stops its workers, then itself.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0]),
        nix::sys::signal::Signal::SIGQUIT,
    )
    .unwrap();
    wait_until(Duration::from_secs(10), || {
        let status = sandbox.service("nginx").unwrap();
        status["state"] == "parked" && status["pid"].is_null()
    })
    .unwrap_or_else(|_| {
        panic!(
            "the daemon did not see nginx exit: {:?}\n{}",
            sandbox.service("nginx"),
            sandbox.daemon_log()
        )
    });
    wait_until(Duration::from_secs(5), || {
        pids.iter().all(|&pid| runs_no_code(pid))
    })
    .unwrap_or_else(|_| panic!("a process of the quit tree {pids:?} runs on"));
    assert_eq!(
        sandbox.http_get(PORT).unwrap(),
        BODY,
        "woken again after its exit"
    );
}

/// A client connected to a worker keeps the tree running past its idle
/// timeout; once it leaves, the tree is parked.
#[test]
fn a_tree_with_a_client_connected_to_a_worker_is_not_idle() {
    persist_tests::require_root!();
    const PORT: u16 = 8151;
    const BODY: &str = "hello from a busy tree\n";
    let sandbox = Sandbox::with_daemon().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_root, command) = nginx_tree(dir.path(), PORT, BODY);
    sandbox
        .add_ok(
            "nginx",
            PORT,
            &["--ready", "http:/", "--idle-timeout", "300ms"],
            &command,
        )
        .unwrap();
    parked_skeleton(&sandbox, "nginx");

    // A keep-alive request: a worker answers and holds the connection.
    let mut client = sandbox
        .netns
        .enter(|| TcpStream::connect(("127.0.0.1", PORT)))
        .unwrap()
        .expect("connecting to nginx");
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&answer).contains(BODY) {
        let n = client.read(&mut buf).expect("nginx answers");
        assert!(n > 0, "nginx closed after {answer:?}");
        answer.extend_from_slice(&buf[..n]);
    }
    let (pids, _, _) = running_tree(&sandbox, "nginx", 3);
    // Ten idle timeouts with the client connected.
    std::thread::sleep(Duration::from_secs(3));
    let status = sandbox.service("nginx").unwrap();
    assert_eq!(
        status["state"], "running",
        "parked with a client connected: {status}"
    );
    assert_eq!(status["pid"].as_i64(), Some(i64::from(pids[0])));

    drop(client);
    parked_skeleton(&sandbox, "nginx");
    assert!(
        pids[1..].iter().all(|&pid| runs_no_code(pid)),
        "a worker of the parked tree runs on"
    );
}

/// A daemon killed while a tree is parked: the tree's skeleton it left
/// (stopped, holding the port) is killed whole by the restarted daemon,
/// which prepares its own; the next request wakes the tree.
#[test]
fn a_parked_tree_is_woken_after_a_daemon_restart() {
    persist_tests::require_root!();
    const PORT: u16 = 8152;
    const BODY: &str = "hello after a restart\n";
    let mut sandbox = Sandbox::with_daemon().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_root, command) = nginx_tree(dir.path(), PORT, BODY);
    sandbox
        .add_ok("nginx", PORT, NGINX_READY, &command)
        .unwrap();
    let skeleton = parked_skeleton(&sandbox, "nginx");
    let left: Vec<(i32, Option<u64>)> = std::iter::once(skeleton)
        .chain(children_of(skeleton))
        .map(|pid| (pid, start_time(pid)))
        .collect();
    assert_eq!(left.len(), 3, "the skeleton is the tree");

    sandbox.kill_daemon();
    sandbox.start_daemon().unwrap();
    // The next skeleton may have the same (recorded) pids: told apart by
    // their start times.
    wait_until(Duration::from_secs(10), || {
        left.iter()
            .all(|&(pid, started)| start_time(pid) != started)
    })
    .unwrap_or_else(|_| panic!("the old skeleton's processes {left:?} were left behind"));
    assert_eq!(sandbox.http_get(PORT).unwrap(), BODY);
    running_tree(&sandbox, "nginx", 3);
}

/// A tree parked with `--on-idle keep` wakes where it stopped: each
/// gunicorn worker counts the requests it served, and a worker answering
/// after the wake counts on from its count before the park (a pristine
/// restore would count from its count at `add`).
#[test]
fn a_tree_parked_with_its_state_kept_counts_on() {
    persist_tests::require_root!();
    const PORT: u16 = 8154;
    let sandbox = Sandbox::with_daemon().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let command = gunicorn_command(
        dir.path(),
        PORT,
        "import os\n\
         served = 0\n\
         def app(environ, start_response):\n\
         \x20   global served\n\
         \x20   served += 1\n\
         \x20   start_response('200 OK', [('Content-Type', 'text/plain')])\n\
         \x20   return [f'{os.getpid()} {served}\\n'.encode()]\n",
        &[],
    );
    sandbox
        .add_ok(
            "counter",
            PORT,
            &["--ready", "http:/", "--on-idle", "keep"],
            &command,
        )
        .unwrap();
    let answer = |sandbox: &Sandbox| -> (i32, u64) {
        let body = sandbox.http_get(PORT).unwrap();
        let (pid, served) = body
            .trim()
            .split_once(' ')
            .unwrap_or_else(|| panic!("not a count: {body:?}"));
        (pid.parse().unwrap(), served.parse().unwrap())
    };
    let mut before = std::collections::HashMap::new();
    for _ in 0..12 {
        let (pid, served) = answer(&sandbox);
        let max = before.entry(pid).or_insert(0);
        *max = served.max(*max);
    }
    running_tree(&sandbox, "counter", 3);
    sandbox.agent_ok(&["park", "counter"]).unwrap();
    let parked = sandbox.service("counter").unwrap();
    assert_eq!(parked["state"], "parked", "{parked}");
    assert!(
        parked["error"].is_null(),
        "the park kept the state: {parked}"
    );
    assert_ne!(parked["generation"], "pristine", "{parked}");

    let mut compared = 0;
    for _ in 0..12 {
        let (pid, served) = answer(&sandbox);
        if let Some(&max) = before.get(&pid) {
            assert!(
                served > max,
                "worker {pid} answered {served} after the wake, {max} before the park"
            );
            compared += 1;
        }
    }
    assert!(
        compared > 0,
        "no worker of before the park ({before:?}) answered after the wake"
    );
}

/// gunicorn's arbiter and two sync workers serving a WSGI app: added,
/// woken by a request, parked and woken again, three processes each time.
#[test]
fn gunicorn_arbiter_and_two_workers_are_parked_and_woken() {
    persist_tests::require_root!();
    const PORT: u16 = 8153;
    const BODY: &str = "hello from the parked arbiter\n";
    let sandbox = Sandbox::with_daemon().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let command = gunicorn_command(dir.path(), PORT, &wsgi_answering(BODY), &[]);
    sandbox
        .add_ok("gunicorn", PORT, &["--ready", "http:/"], &command)
        .unwrap();
    let skeleton = parked_skeleton(&sandbox, "gunicorn");
    assert_eq!(
        children_of(skeleton).len(),
        2,
        "the arbiter holds its workers"
    );

    assert_eq!(sandbox.http_get(PORT).unwrap(), BODY);
    let (pids, pss, rss) = running_tree(&sandbox, "gunicorn", 3);
    assert_eq!(pids[0], skeleton, "the woken arbiter is the skeleton's");
    assert!(pss > 0 && pss < rss, "PSS {pss}, RSS {rss}");

    sandbox.agent_ok(&["park", "gunicorn"]).unwrap();
    parked_skeleton(&sandbox, "gunicorn");
    assert!(
        pids[1..].iter().all(|&pid| runs_no_code(pid)),
        "a worker of the parked arbiter runs on"
    );
    for _ in 0..3 {
        assert_eq!(sandbox.http_get(PORT).unwrap(), BODY);
    }
    running_tree(&sandbox, "gunicorn", 3);
    assert_eq!(sandbox.service("gunicorn").unwrap()["wakes"], 2);
}

/// A daemon killed while a woken tree runs with all its memory in: the
/// restarted daemon adopts it by its root's pid, and parks it whole.
#[test]
fn a_running_tree_is_adopted_by_a_restarted_daemon() {
    persist_tests::require_root!();
    const PORT: u16 = 8155;
    const BODY: &str = "hello from an adopted tree\n";
    let mut sandbox = Sandbox::with_daemon().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_root, command) = nginx_tree(dir.path(), PORT, BODY);
    sandbox
        .add_ok("nginx", PORT, NGINX_READY, &command)
        .unwrap();
    parked_skeleton(&sandbox, "nginx");
    assert_eq!(sandbox.http_get(PORT).unwrap(), BODY);
    let (pids, _, _) = running_tree(&sandbox, "nginx", 3);
    wait_until(Duration::from_secs(20), || {
        pids.iter()
            .all(|&pid| !persist_tests::has_unfilled_memory(pid))
    })
    .expect("every process of the tree has all its memory");

    sandbox.kill_daemon();
    sandbox.start_daemon().unwrap();
    let (adopted, _, _) = running_tree(&sandbox, "nginx", 3);
    assert_eq!(adopted, pids, "the same tree is adopted");
    assert_eq!(sandbox.http_get(PORT).unwrap(), BODY);

    // The next skeleton has the recorded pids again: told apart by their
    // start times.
    let started: Vec<Option<u64>> = pids.iter().map(|&pid| start_time(pid)).collect();
    sandbox.agent_ok(&["park", "nginx"]).unwrap();
    parked_skeleton(&sandbox, "nginx");
    assert!(
        pids.iter()
            .zip(&started)
            .all(|(&pid, &was)| start_time(pid) != was),
        "a process of the adopted tree {pids:?} outlived its park"
    );
}

/// A daemon killed while it checkpoints a tree for an `--on-idle keep`
/// park (held in the checkpoint by a debug pause): no process of the tree
/// runs on, stopped or on memory it was not saved with; the restarted
/// daemon kills what is left and wakes the service from its last kept
/// state.
#[test]
fn a_daemon_killed_while_it_keeps_a_trees_state_leaves_nothing_running() {
    persist_tests::require_root!();
    const PORT: u16 = 8156;
    const BODY: &str = "hello from a tree cut short\n";
    let mut sandbox = Sandbox::with_daemon().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_root, command) = nginx_tree(dir.path(), PORT, BODY);
    sandbox
        .add_ok(
            "nginx",
            PORT,
            &["--ready", "http:/", "--on-idle", "keep"],
            &command,
        )
        .unwrap();
    // Its checkpoints pause after the save from now on (the add's did not).
    sandbox.kill_daemon();
    sandbox
        .start_daemon_with_env(
            &[],
            &[(persist_agent::checkpoint::PAUSE_AFTER_SAVE_ENV, "30000")],
        )
        .unwrap();
    parked_skeleton(&sandbox, "nginx");
    assert_eq!(sandbox.http_get(PORT).unwrap(), BODY);
    let (pids, _, _) = running_tree(&sandbox, "nginx", 3);
    let started: Vec<Option<u64>> = pids.iter().map(|&pid| start_time(pid)).collect();

    let mut park = sandbox
        .netns
        .command(persist_tests::binary("persist-agent"))
        .arg("--state-dir")
        .arg(sandbox.state_dir())
        .args(["park", "nginx"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let began = wait_until(Duration::from_secs(10), || {
        sandbox
            .service("nginx")
            .is_ok_and(|s| s["state"] == "stopping")
    });
    if began.is_err() || park.try_wait().unwrap().is_some() {
        let _ = park.kill();
        let output = park.wait_with_output().unwrap();
        panic!(
            "the park never held in its checkpoint ({}): {:?}\n{}",
            String::from_utf8_lossy(&output.stderr),
            sandbox.service("nginx"),
            sandbox.daemon_log()
        );
    }
    // Killed during the save or in the pause after it: either way the tree
    // is frozen, not yet killed.
    std::thread::sleep(Duration::from_secs(1));
    sandbox.kill_daemon();
    let _ = park.wait();
    assert!(
        pids.iter().all(|&pid| runs_no_code(pid)),
        "a process of the tree ran on while its state was being saved"
    );

    sandbox.start_daemon().unwrap();
    wait_until(Duration::from_secs(10), || {
        pids.iter()
            .zip(&started)
            .all(|(&pid, &was)| start_time(pid) != was)
    })
    .unwrap_or_else(|_| {
        panic!(
            "the stopped tree {pids:?} was left behind:\n{}",
            sandbox.daemon_log()
        )
    });
    assert_eq!(sandbox.http_get(PORT).unwrap(), BODY);
    running_tree(&sandbox, "nginx", 3);
}

/// Every prefetch mode wakes a tree: `all` copies every process's pages
/// before it runs, `recorded` records every process's working set on the
/// first wake and prefetches it on the next, `none` pages every process
/// lazily.
#[test]
fn a_tree_is_woken_in_every_prefetch_mode() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (mode, port) in [("all", 8157), ("recorded", 8158), ("none", 8159)] {
        let body = format!("hello with --prefetch {mode}\n");
        let (root, command) = nginx_tree(&dir.path().join(mode), port, &body);
        sandbox
            .add_ok(
                mode,
                port,
                &["--ready", "http:/", "--prefetch", mode],
                &command,
            )
            .unwrap();
        for wake in 1..=2 {
            parked_skeleton(&sandbox, mode);
            assert_eq!(
                sandbox.http_get(port).unwrap(),
                body,
                "wake {wake} of --prefetch {mode}"
            );
            running_tree(&sandbox, mode, 3);
            sandbox.agent_ok(&["park", mode]).unwrap();
        }
        assert_eq!(sandbox.service(mode).unwrap()["wakes"], 2);
        drop(root);
    }
}

/// The working set of `name`'s image, once a wake's recording is written.
fn working_set_of(sandbox: &Sandbox, name: &str) -> persist_common::image::WorkingSet {
    use persist_common::image::{WorkingSet, manifest_crc};
    let dir = sandbox.state_dir().join("images").join(name);
    let mut set = None;
    wait_until(Duration::from_secs(20), || {
        set = manifest_crc(&dir)
            .and_then(|crc| WorkingSet::open(&dir, crc))
            .ok();
        set.is_some()
    })
    .unwrap_or_else(|_| {
        panic!(
            "no working set recorded for {name}:\n{}",
            sandbox.daemon_log()
        )
    });
    set.expect("seen once the wait succeeded")
}

/// The pages the `wake`-th wake of the only service of `sandbox` copied
/// ahead of faults, once its root's pager is done (it logs so while it
/// holds the lock under which it publishes its counters).
fn prefetched_by_wake(sandbox: &Sandbox, name: &str, wake: usize) -> u64 {
    wait_until(Duration::from_secs(20), || {
        sandbox.daemon_log().matches("all pages in").count() >= wake
    })
    .unwrap_or_else(|_| {
        panic!(
            "the pager of wake {wake} never finished:\n{}",
            sandbox.daemon_log()
        )
    });
    sandbox.service(name).unwrap()["last_prefetch_pages"]
        .as_u64()
        .expect("a finished wake's counters")
}

/// The faults each wake's workers' pagers served, summed, from the
/// daemon's log once every pager of `wakes` wakes of a tree of a master and
/// two workers is done.
fn worker_faults_by_wake(sandbox: &Sandbox, wakes: usize) -> Vec<u64> {
    const WORKER_DONE: &str = "all pages of a process of the tree in";
    let mut log = String::new();
    wait_until(Duration::from_secs(20), || {
        log = sandbox.daemon_log();
        log.matches(WORKER_DONE).count() >= 2 * wakes
    })
    .unwrap_or_else(|_| panic!("the workers' pagers of {wakes} wakes never finished:\n{log}"));
    let faults: Vec<u64> = log
        .lines()
        .filter(|line| line.contains(WORKER_DONE))
        .map(|line| {
            line.split_whitespace()
                .find_map(|field| field.strip_prefix("faults="))
                .and_then(|count| count.parse().ok())
                .unwrap_or_else(|| panic!("no fault count in {line:?}"))
        })
        .collect();
    // A wake's lines all come before the next wake: each test step waits
    // for the set, written once they are all done.
    faults.chunks(2).map(|wake| wake.iter().sum()).collect()
}

/// The number of pages `set` names for the workers (processes 1 and 2).
fn worker_pages(set: &persist_common::image::WorkingSet) -> usize {
    set.pages_of(1).len() + set.pages_of(2).len()
}

/// `--prefetch recorded` on nginx's master and two workers: a recording
/// wake records the pages of every process, the workers' included (each
/// under its index in tree order), and the next wake copies each process's
/// pages into it before the tree runs, which `last_prefetch_pages` counts.
/// A set of the older format (the root's pages only) is ignored and
/// recorded again.
#[test]
fn a_trees_working_set_covers_its_workers() {
    persist_tests::require_root!();
    const PORT: u16 = 8160;
    const BODY: &str = "hello from every process's working set\n";
    let sandbox = Sandbox::with_daemon().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_root, command) = nginx_tree(dir.path(), PORT, BODY);
    sandbox
        .add_ok(
            "nginx",
            PORT,
            &["--ready", "http:/", "--prefetch", "recorded"],
            &command,
        )
        .unwrap();
    let sizes = |set: &persist_common::image::WorkingSet| -> Vec<(u32, usize)> {
        set.processes()
            .iter()
            .map(|(&index, pages)| (index, pages.len()))
            .collect()
    };

    // A recording wake. Its set is written once, after every pager of the
    // tree is done, and by no later step until the next wake.
    parked_skeleton(&sandbox, "nginx");
    assert_eq!(sandbox.http_get(PORT).unwrap(), BODY);
    running_tree(&sandbox, "nginx", 3);
    prefetched_by_wake(&sandbox, "nginx", 1);
    let set = working_set_of(&sandbox, "nginx");
    assert!(
        set.processes().keys().all(|&index| index < 3),
        "only the tree's three processes: {:?}",
        sizes(&set)
    );
    // The worker that accepted the connection faulted its pages in; the
    // other may have slept through the wake.
    assert!(
        worker_pages(&set) > 0,
        "the set names the workers' pages: {:?}\n{}",
        sizes(&set),
        sandbox.daemon_log()
    );

    // Of the older format: ignored when the next skeleton is prepared, and
    // that wake records the set again in the current one.
    let path = sandbox
        .state_dir()
        .join("images")
        .join("nginx")
        .join("working-set");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    sandbox.agent_ok(&["park", "nginx"]).unwrap();
    parked_skeleton(&sandbox, "nginx");
    let log = sandbox.daemon_log();
    assert!(
        log.contains("working set ignored, the next wake records it again"),
        "{log}"
    );
    assert_eq!(sandbox.http_get(PORT).unwrap(), BODY);
    running_tree(&sandbox, "nginx", 3);
    // Nothing was copied ahead but the pages the skeletons bring in while
    // prepared (each thread's stack top and TLS).
    let baseline = prefetched_by_wake(&sandbox, "nginx", 2);
    let set = working_set_of(&sandbox, "nginx");
    assert!(
        worker_pages(&set) > 0,
        "recorded again with the workers' pages: {:?}",
        sizes(&set)
    );

    // A prefetching wake: each process's pages are copied into it before it
    // runs (a page of the set copied from the image or, never stored,
    // mapped as zeros), on top of what the recording wake copied.
    sandbox.agent_ok(&["park", "nginx"]).unwrap();
    parked_skeleton(&sandbox, "nginx");
    assert_eq!(sandbox.http_get(PORT).unwrap(), BODY);
    running_tree(&sandbox, "nginx", 3);
    let prefetched = prefetched_by_wake(&sandbox, "nginx", 3);
    assert!(
        prefetched >= baseline + set.len() as u64,
        "the wake copied every process's pages ahead: {prefetched} pages, against {baseline} \
         on the recording wake and {:?} in the set\n{}",
        sizes(&set),
        sandbox.daemon_log()
    );
    // Each worker faults only on what its set lacked, where the
    // recording wake faulted on every page it touched.
    let faults = worker_faults_by_wake(&sandbox, 3);
    assert!(
        faults[2] < faults[1],
        "the workers faulted less with their pages prefetched: {faults:?} by wake"
    );
    // The last worker, which holds the listener, ran alone before the
    // others were copied and let run, on the prefetching wake only (the
    // root's line of each wake says how long, when it did).
    let log = sandbox.daemon_log();
    let alone: Vec<bool> = log
        .lines()
        .filter(|line| line.contains("all pages in"))
        .map(|line| line.contains(" alone_us="))
        .collect();
    assert_eq!(alone, [false, false, true], "{log}");
    assert_eq!(sandbox.service("nginx").unwrap()["wakes"], 3);
}

/// A service whose root holds a zombie (a child that exited with 7, not
/// reaped) is added as a tree, and each wake brings the zombie back for
/// the root to reap: the first request after a wake reaps it with its
/// recorded pid and status, the next finds no child. Parked and woken
/// again, the same.
#[test]
fn a_tree_holding_a_zombie_is_parked_and_woken_and_the_zombie_reaped() {
    persist_tests::require_root!();
    const PORT: u16 = 8172;
    let sandbox = Sandbox::with_daemon().unwrap();
    let script = "import os, socket, sys\n\
         child = os.fork()\n\
         if child == 0:\n\
         \x20   os._exit(7)\n\
         os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)\n\
         server = socket.socket()\n\
         server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         server.bind(('127.0.0.1', int(sys.argv[1])))\n\
         server.listen(16)\n\
         while True:\n\
         \x20   client, _ = server.accept()\n\
         \x20   client.recv(4096)\n\
         \x20   try:\n\
         \x20       pid, status = os.waitpid(child, os.WNOHANG)\n\
         \x20       body = f'{pid} {status}'\n\
         \x20   except ChildProcessError:\n\
         \x20       body = 'none'\n\
         \x20   client.sendall(f'HTTP/1.0 200 OK\\r\\nContent-Length: {len(body)}\\r\\n\\r\\n{body}'.encode())\n\
         \x20   client.close()\n";
    let command: Vec<String> = ["/usr/bin/python3", "-c", script, &PORT.to_string()]
        .map(str::to_owned)
        .to_vec();
    sandbox
        .add_ok("zombie", PORT, &["--ready", "tcp"], &command)
        .unwrap();
    let mut reaped = Vec::new();
    for wake in ["first", "second"] {
        let body = sandbox.http_get(PORT).unwrap();
        let (pid, status) = body
            .split_once(' ')
            .unwrap_or_else(|| panic!("{wake} wake: not a reaped child: {body:?}"));
        assert_eq!(
            status,
            (7 << 8).to_string(),
            "{wake} wake: the zombie's wait status"
        );
        reaped.push(pid.to_owned());
        assert_eq!(
            sandbox.http_get(PORT).unwrap(),
            "none",
            "{wake} wake: a child left after the reap"
        );
        sandbox.agent_ok(&["park", "zombie"]).unwrap();
        parked_skeleton(&sandbox, "zombie");
    }
    assert_eq!(
        reaped[0], reaped[1],
        "the zombie reaped after each wake has its recorded pid"
    );
}
