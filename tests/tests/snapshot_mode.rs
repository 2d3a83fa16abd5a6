//! The whole lifecycle of unmodified servers in snapshot mode: started once,
//! snapshotted when ready, parked with no process running, restored on the
//! first SYN, parked again when idle, surviving a daemon killed in between.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use persist_common::image::{Image, MappingKind, PAGE_SIZE};
use persist_tests::{
    Sandbox, add_http_server, binary, build_hello_image, has_unfilled_memory, memcached_command,
    nginx_command, redis_server_command, wait_until, web_root,
};

/// Whether `pid` runs no code: gone, a zombie, or a parked skeleton (which
/// has the restored process's pid but is stopped before its first instruction).
fn runs_no_code(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        let state = stat
            .rsplit(") ")
            .next()
            .and_then(|rest| rest.chars().next());
        matches!(state, Some('Z' | 't' | 'T'))
    })
}

#[test]
fn python_http_server_is_parked_restored_reparked_and_survives_a_daemon_restart() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::with_daemon().unwrap();
    let root = web_root();
    add_http_server(
        &sandbox,
        "web",
        8100,
        root.path(),
        &["--idle-timeout", "500ms"],
    );

    let parked = sandbox.service("web").unwrap();
    assert_eq!(parked["state"], "parked", "{parked}");
    assert!(
        parked["pid"].is_null(),
        "no process runs while parked: {parked}"
    );

    let listing = sandbox.http_get(8100).unwrap();
    assert!(
        listing.contains("persist-was-here.txt"),
        "restored server lists its directory: {listing}"
    );
    // Pid and RSS from one status: read apart, the idle park may come between.
    let mut running = None;
    wait_until(Duration::from_secs(5), || {
        let status = sandbox.service("web").unwrap();
        running = status["pid"]
            .as_i64()
            .zip(status["rss_bytes"].as_u64())
            .filter(|&(_, rss)| status["state"] == "running" && rss > 0);
        running.is_some()
    })
    .expect("the woken server shows as running, with its RSS");
    let (first_pid, running_rss) = running.unwrap();

    wait_until(Duration::from_secs(10), || {
        let status = sandbox.service("web").unwrap();
        // Parked, with the skeleton of the next wake prepared.
        status["state"] == "parked" && status["skeleton_pid"].is_i64()
    })
    .expect("parked again when idle");
    // The skeleton holds the pages python wrote to in its file mappings
    // (written back when it is prepared: userfaultfd cannot serve them) and
    // a few pages more, not the process's memory.
    let parked_bytes = sandbox.service("web").unwrap()["parked_bytes"]
        .as_u64()
        .unwrap();
    let image = Image::open(&sandbox.state_dir().join("images").join("web")).unwrap();
    let written_file_bytes = written_file_pages(&image) * PAGE_SIZE;
    // Its cost counts the port keeper, page tables and kernel objects too
    // (docs/parked-cost.md); the agent's share, with one service, is all
    // the agent grew by, and is left out here.
    let agent_share = sandbox.service("web").unwrap()["parked_cost"]["agent_share_bytes"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        parked_bytes.saturating_sub(agent_share) * 4 < running_rss,
        "parked {parked_bytes} bytes ({written_file_bytes} of written file pages) against \
         {running_rss} running: {}",
        sandbox.service("web").unwrap()
    );
    assert!(
        runs_no_code(first_pid),
        "the idle process {first_pid} was stopped"
    );

    sandbox.kill_daemon();
    // The parked skeleton outlives the daemon and holds the port: a client
    // connecting meanwhile waits, and is served once the daemon is back.
    let mut early = sandbox
        .netns
        .enter(|| TcpStream::connect(("127.0.0.1", 8100)))
        .unwrap()
        .expect("the port accepts connections while the daemon is away");
    early.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    sandbox.start_daemon().unwrap();
    early
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut listing = String::new();
    early.read_to_string(&mut listing).unwrap();
    assert!(
        listing.contains("persist-was-here.txt"),
        "a connection made while the daemon was away is served: {listing}"
    );
    let listing = sandbox.http_get(8100).unwrap();
    assert!(
        listing.contains("persist-was-here.txt"),
        "served after a daemon restart: {listing}"
    );
    // The supervisor hears of the resume as the process answers: running
    // shortly, not necessarily before the answer arrives.
    wait_until(Duration::from_secs(5), || {
        sandbox.service("web").unwrap()["state"] == "running"
    })
    .unwrap_or_else(|_| panic!("not running: {}", sandbox.daemon_log()));
}

/// Scheduling policy (field 41 of /proc/PID/task/TID/stat) of each thread
/// of `pid`, by thread name.
fn thread_policies(pid: i32) -> std::collections::HashMap<String, u32> {
    let mut policies = std::collections::HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_owned();
        // Fields after the name start at field 3 (state).
        let policy = stat[close + 2..]
            .split(' ')
            .nth(41 - 3)
            .and_then(|field| field.parse().ok());
        if let Some(policy) = policy {
            policies.insert(name, policy);
        }
    }
    policies
}

/// The pid of the last skeleton the daemon log says it prepared for `service`.
fn skeleton_pid(log: &str, service: &str) -> Option<i32> {
    let plain = strip_colours(log);
    plain
        .lines()
        .filter(|line| {
            line.contains("skeleton ready") && line.contains(&format!("service={service} "))
        })
        .filter_map(|line| line.split("pid=").nth(1)?.split(' ').next()?.parse().ok())
        .next_back()
}

/// `text` without the ANSI colour sequences of the daemon's log.
fn strip_colours(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            plain.push(c);
        }
    }
    plain
}

#[test]
fn a_syn_is_handed_to_the_armed_restore_thread_at_real_time_priority() {
    persist_tests::require_root!();
    const SCHED_OTHER: u32 = 0;
    const SCHED_FIFO: u32 = 1;
    let sandbox = Sandbox::with_daemon().unwrap();
    let root = web_root();
    add_http_server(&sandbox, "rt", 8112, root.path(), &[]);
    let daemon = sandbox.daemon_pid().unwrap();
    let policies = thread_policies(daemon);
    assert_eq!(
        policies.get("persist-wakes"),
        Some(&SCHED_FIFO),
        "{policies:?}"
    );
    // Armed once its first skeleton is prepared (in the background), by a
    // thread of the restore pool.
    let restore_policies = || {
        thread_policies(daemon)
            .into_iter()
            .filter(|(name, _)| name.starts_with("restore-"))
            .map(|(_, policy)| policy)
            .collect::<Vec<_>>()
    };
    wait_until(Duration::from_secs(10), || {
        restore_policies().contains(&SCHED_FIFO)
    })
    .unwrap_or_else(|_| panic!("never armed: {:?}", thread_policies(daemon)));
    // The skeleton waits in a group stop, not under ptrace, so that the
    // SYN's thread can let it run itself.
    let skeleton = skeleton_pid(&sandbox.daemon_log(), "rt").expect("a skeleton is ready");
    let status = || std::fs::read_to_string(format!("/proc/{skeleton}/status")).unwrap();
    wait_until(Duration::from_secs(5), || {
        let status = status();
        status.contains("State:\tT (stopped)") && status.contains("TracerPid:\t0\n")
    })
    .unwrap_or_else(|_| panic!("not in a group stop, untraced:\n{}", status()));

    let listing = sandbox.http_get(8112).unwrap();
    assert!(listing.contains("persist-was-here.txt"), "{listing}");
    sandbox.running_pid("rt").unwrap();
    assert!(
        sandbox
            .daemon_log()
            .lines()
            .any(|line| line.contains("woken") && line.contains("syn-thread")),
        "the SYN's thread resumed it:\n{}",
        sandbox.daemon_log()
    );
    // Serving pages never happens at real-time priority.
    wait_until(Duration::from_secs(5), || {
        let policies = restore_policies();
        !policies.is_empty() && policies.iter().all(|policy| *policy == SCHED_OTHER)
    })
    .expect("the restore thread is back to ordinary priority once resumed");
}

#[test]
fn three_hundred_first_connections_are_all_served_by_one_restore() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let root = web_root();
    add_http_server(&sandbox, "burst", 8101, root.path(), &[]);

    let responses = sandbox
        .netns
        .enter(|| {
            let mut streams: Vec<TcpStream> = (0..300)
                .map(|_| TcpStream::connect(("127.0.0.1", 8101)).expect("connect"))
                .collect();
            streams
                .iter_mut()
                .map(|stream| {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(60)))
                        .unwrap();
                    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
                    let mut response = String::new();
                    let _ = stream.read_to_string(&mut response);
                    response
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    let served = responses
        .iter()
        .filter(|r| r.contains("persist-was-here.txt"))
        .count();
    assert_eq!(served, 300, "every first connection is served");
    assert_eq!(
        sandbox.service("burst").unwrap()["wakes"],
        1,
        "one restore for the burst"
    );
}

fn redis_cli(sandbox: &Sandbox, port: u16, args: &[&str]) -> String {
    let output = sandbox
        .netns
        .command("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    assert!(output.status.success(), "redis-cli {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Parks `name` (an `--on-idle keep` service) and checks that it parked
/// with its state kept.
fn park_keeping_state(sandbox: &Sandbox, name: &str) {
    sandbox.agent_ok(&["park", name]).unwrap();
    let parked = sandbox.service(name).unwrap();
    assert_eq!(parked["state"], "parked", "{parked}");
    assert!(
        parked["error"].is_null(),
        "parking kept the state: {parked}"
    );
}

/// A daemon stopped with SIGTERM while a woken service's pager is still at
/// work (a first wake records its working set for 200 ms, holding the fill
/// back) lets the pager copy in every page first: the process then needs
/// the daemon no more, and serves on without it.
#[test]
fn a_stopping_daemon_lets_a_woken_service_have_all_its_memory() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::with_daemon().unwrap();
    let command = redis_server_command(6394);
    sandbox.add_ok("redis", 6394, &[], &command).unwrap();
    assert_eq!(redis_cli(&sandbox, 6394, &["PING"]), "PONG");
    let pid = sandbox.running_pid("redis").unwrap() as i32;
    sandbox.track_pid(pid);
    sandbox.stop_daemon();

    let log = sandbox.daemon_log();
    assert!(
        !has_unfilled_memory(pid),
        "the process still waits for pages after the daemon stopped:\n{log}"
    );
    assert!(
        !log.contains("working set recorded"),
        "a window cut short records no set:\n{log}"
    );
    assert_eq!(redis_cli(&sandbox, 6394, &["SET", "k", "v"]), "OK");
    assert_eq!(redis_cli(&sandbox, 6394, &["GET", "k"]), "v");
}

#[test]
fn redis_keeps_its_data_across_parking_with_on_idle_keep() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let command = redis_server_command(6391);
    sandbox
        .add_ok("redis", 6391, &["--on-idle", "keep"], &command)
        .unwrap();
    assert_eq!(sandbox.service("redis").unwrap()["state"], "parked");

    assert_eq!(
        redis_cli(&sandbox, 6391, &["SET", "greeting", "hello"]),
        "OK"
    );
    park_keeping_state(&sandbox, "redis");
    // Kept as generation 1, a delta of the image the wake restored: only
    // what changed is written.
    let images = sandbox.state_dir().join("images");
    let kept = persist_common::image::Image::open(&images.join("redis.gens/1")).unwrap();
    assert_eq!(
        kept.manifest().base_stores.len(),
        1,
        "the kept state links the built image's pages"
    );
    let own = std::fs::metadata(images.join("redis.gens/1/pages"))
        .unwrap()
        .len();
    let built = std::fs::metadata(images.join("redis/pages")).unwrap().len();
    eprintln!("redis kept state: {own} bytes written, built image {built} bytes");
    assert!(
        own * 4 < built,
        "the kept state wrote {own} bytes, not much less than the built image's {built}"
    );

    assert_eq!(
        redis_cli(&sandbox, 6391, &["GET", "greeting"]),
        "hello",
        "data written before parking"
    );
    assert_eq!(
        redis_cli(&sandbox, 6391, &["SET", "second", "write"]),
        "OK",
        "new writes work"
    );
    assert_eq!(redis_cli(&sandbox, 6391, &["GET", "second"]), "write");
    assert_eq!(sandbox.service("redis").unwrap()["wakes"], 2);
    drop(kept);

    // Kept again over the kept state it was restored from: a delta of a delta.
    park_keeping_state(&sandbox, "redis");
    let kept = persist_common::image::Image::open(&images.join("redis.gens/2")).unwrap();
    assert_eq!(
        kept.manifest().base_stores.len(),
        2,
        "{:?}",
        kept.manifest().base_stores
    );
    assert_eq!(redis_cli(&sandbox, 6391, &["GET", "greeting"]), "hello");
    assert_eq!(redis_cli(&sandbox, 6391, &["GET", "second"]), "write");

    // A client still connected: its connection cannot be kept, so a park
    // would lose the state. Redis runs on, untouched, and says why.
    let mut client = sandbox
        .netns
        .enter(|| TcpStream::connect(("127.0.0.1", 6391)))
        .unwrap()
        .expect("connect to redis");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut ask = |request: &[u8], answer: &str| {
        client.write_all(request).unwrap();
        let mut reply = vec![0u8; answer.len()];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(String::from_utf8_lossy(&reply), answer);
    };
    ask(b"SET third connected\r\n", "+OK\r\n");
    let pid = sandbox.running_pid("redis").unwrap();
    let refused = sandbox.agent(&["park", "redis"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "park with a client connected: {stderr}"
    );
    assert!(
        stderr.contains("cannot park with its state kept, left running")
            && stderr.contains("established TCP connection"),
        "{stderr}"
    );
    let service = sandbox.service("redis").unwrap();
    assert_eq!(service["state"], "running", "{service}");
    assert_eq!(service["pid"], pid, "{service}");
    ask(b"GET third\r\n", "$9\r\nconnected\r\n");
    drop(client);

    // Once the client has gone, the park keeps everything.
    wait_until(Duration::from_secs(10), || {
        sandbox.agent(&["park", "redis"]).status.success()
    })
    .expect("parked once the client is gone");
    assert_eq!(sandbox.service("redis").unwrap()["state"], "parked");
    assert_eq!(redis_cli(&sandbox, 6391, &["GET", "third"]), "connected");
    assert_eq!(redis_cli(&sandbox, 6391, &["GET", "greeting"]), "hello");
}

/// A daemon killed during a wake leaves a process whose pages are still
/// coming in: its faults wait. The restarted daemon adopts it (same pid)
/// and serves its pages, so the request that woke it is answered.
#[test]
fn a_process_whose_pages_were_still_coming_in_is_adopted_by_a_restarted_daemon() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::with_daemon().unwrap();
    let root = web_root();
    add_http_server(&sandbox, "web", 8108, root.path(), &[]);
    wait_until(Duration::from_secs(10), || {
        sandbox.daemon_log().contains("skeleton ready")
    })
    .unwrap();

    // The first wake from an image records its working set, and holds the
    // fill back for 200 ms after the resume: killed once the SYN is seen,
    // the daemon leaves pages missing.
    let first = sandbox
        .netns
        .command("curl")
        .args(["-s", "-m", "20", "http://127.0.0.1:8108/"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), || {
        sandbox.service("web").unwrap()["syns"].as_u64() > Some(0)
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(10));
    sandbox.kill_daemon();
    let skeleton = std::fs::read_to_string(sandbox.state_dir().join("run/web.json")).unwrap();
    sandbox.start_daemon().unwrap();

    let log = sandbox.daemon_log();
    let answered = first.wait_with_output().unwrap();
    let listing = String::from_utf8_lossy(&answered.stdout);
    assert!(
        listing.contains("persist-was-here.txt"),
        "the request that woke it was not answered: {answered:?}\n{log}"
    );
    let pid = sandbox.running_pid("web").unwrap();
    assert!(
        skeleton.contains(&format!("\"pid\":{pid},")),
        "the restarted daemon runs another process than {skeleton}:\n{log}"
    );
    assert!(
        log.contains("adopted a process whose pages were still being filled")
            && !log.contains("stopping it"),
        "the restarted daemon did not adopt the process:\n{log}"
    );
    wait_until(Duration::from_secs(10), || !has_unfilled_memory(pid as i32))
        .unwrap_or_else(|_| panic!("the adopted process never got all its pages:\n{log}"));
}

/// A tokio server (multi-threaded runtime: epoll, an eventfd waker, worker
/// threads parked on futexes): its request count survives a park with
/// `--on-idle keep`.
#[test]
fn a_tokio_server_keeps_its_count_across_parking() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let server = binary("tokio-server").display().to_string();
    sandbox
        .agent_ok(&[
            "add",
            "tokio",
            "--port",
            "8109",
            "--on-idle",
            "keep",
            "--",
            &server,
            "127.0.0.1:8109",
        ])
        .unwrap();
    assert_eq!(sandbox.service("tokio").unwrap()["state"], "parked");

    let first = sandbox.http_get(8109).unwrap();
    assert!(first.starts_with("request 1 from pid "), "{first}");
    assert!(sandbox.http_get(8109).unwrap().starts_with("request 2 "));
    park_keeping_state(&sandbox, "tokio");
    let third = sandbox.http_get(8109).unwrap();
    assert!(third.starts_with("request 3 from pid "), "{third}");
    assert_eq!(sandbox.service("tokio").unwrap()["wakes"], 2);
}

/// Redis forks for a background save. While the child runs, a park with
/// `--on-idle keep` is refused (the child cannot be checkpointed with it)
/// and Redis runs on; once the save is over the park keeps everything.
#[test]
fn redis_is_parked_only_once_its_background_save_is_over() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let rdb_dir = tempfile::tempdir().unwrap();
    let mut command = redis_server_command(6392);
    command.extend(["--dir".to_owned(), rdb_dir.path().display().to_string()]);
    sandbox
        .add_ok("r", 6392, &["--on-idle", "keep"], &command)
        .unwrap();

    for i in 0..10 {
        let key = format!("key:{i}");
        assert_eq!(redis_cli(&sandbox, 6392, &["SET", &key, "saved"]), "OK");
    }
    // 10 keys at 0.1 s each: a save of about a second.
    assert_eq!(
        redis_cli(
            &sandbox,
            6392,
            &["CONFIG", "SET", "rdb-key-save-delay", "100000"]
        ),
        "OK"
    );
    assert_eq!(
        redis_cli(&sandbox, 6392, &["BGSAVE"]),
        "Background saving started"
    );
    let pid = sandbox.running_pid("r").unwrap();
    let refused = sandbox.agent(&["park", "r"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("has child processes"),
        "park during the save: {stderr}"
    );
    assert_eq!(sandbox.service("r").unwrap()["state"], "running");
    assert_eq!(sandbox.running_pid("r").unwrap(), pid);

    wait_until(Duration::from_secs(20), || {
        redis_cli(&sandbox, 6392, &["INFO", "persistence"]).contains("rdb_bgsave_in_progress:0")
    })
    .expect("the save ends");
    park_keeping_state(&sandbox, "r");
    assert_eq!(redis_cli(&sandbox, 6392, &["GET", "key:7"]), "saved");
    assert_eq!(redis_cli(&sandbox, 6392, &["DBSIZE"]), "10");
}

/// nginx as one process (`master_process off`): parked, woken by a
/// connection, parked and woken again, the restored process appending to
/// its access log. (A master with workers: tests/tests/process_tree_daemon.rs.)
#[test]
fn nginx_is_parked_and_woken() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = web_root();
    std::fs::write(root.path().join("index.html"), "hello from nginx\n").unwrap();
    let one = dir.path().join("one");
    let command = nginx_command(&one, root.path(), 8110, false).unwrap();
    sandbox.add_ok("nginx", 8110, &[], &command).unwrap();
    assert_eq!(sandbox.service("nginx").unwrap()["state"], "parked");

    let access_lines = || {
        std::fs::read_to_string(one.join("access.log"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    let before = access_lines();
    assert_eq!(sandbox.http_get(8110).unwrap(), "hello from nginx\n");
    sandbox.agent_ok(&["park", "nginx"]).unwrap();
    assert_eq!(sandbox.service("nginx").unwrap()["state"], "parked");
    assert_eq!(sandbox.http_get(8110).unwrap(), "hello from nginx\n");
    assert_eq!(sandbox.service("nginx").unwrap()["wakes"], 2);
    wait_until(Duration::from_secs(5), || access_lines() == before + 2).unwrap_or_else(|_| {
        panic!(
            "{} access log lines after 2 requests, {before} before",
            access_lines()
        )
    });
}

/// Sends one memcached text-protocol command from the sandbox's namespace
/// and returns the answer, read up to its final line.
fn memcached(sandbox: &Sandbox, port: u16, command: &str) -> String {
    sandbox
        .netns
        .enter(|| {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to memcached");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            stream.write_all(command.as_bytes()).unwrap();
            let mut answer = Vec::new();
            let mut buf = [0u8; 4096];
            while !["END\r\n", "STORED\r\n", "ERROR\r\n"]
                .iter()
                .any(|end| answer.ends_with(end.as_bytes()))
            {
                let n = stream.read(&mut buf).expect("memcached answers");
                assert!(n > 0, "memcached closed after {answer:?}");
                answer.extend_from_slice(&buf[..n]);
            }
            String::from_utf8_lossy(&answer).into_owned()
        })
        .unwrap()
}

/// memcached: multi-threaded (libevent, a pipe and an eventfd per worker
/// thread), and it drops root for the `memcache` user on start.
#[test]
fn memcached_keeps_its_items_across_parking_with_on_idle_keep() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let command = memcached_command(8107);
    sandbox
        .add_ok("mc", 8107, &["--on-idle", "keep"], &command)
        .unwrap();
    let parked = sandbox.service("mc").unwrap();
    assert_eq!(parked["state"], "parked", "{parked}");
    assert!(parked["pid"].is_null(), "{parked}");

    assert_eq!(
        memcached(&sandbox, 8107, "set greeting 0 0 5\r\nhello\r\n"),
        "STORED\r\n"
    );
    let pid = sandbox.running_pid("mc").unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .unwrap()
        .to_owned();
    let memcache = Command::new("id")
        .args(["-u", "memcache"])
        .output()
        .unwrap();
    assert_eq!(
        uid,
        String::from_utf8_lossy(&memcache.stdout).trim(),
        "{status}"
    );

    park_keeping_state(&sandbox, "mc");
    assert_eq!(
        memcached(&sandbox, 8107, "get greeting\r\n"),
        "VALUE greeting 0 5\r\nhello\r\nEND\r\n",
        "an item stored before parking"
    );
    assert_eq!(sandbox.service("mc").unwrap()["wakes"], 2);
}

/// An HTTP server that, once it has answered a request, holds a fanotify
/// descriptor: a state persist cannot checkpoint.
const FANOTIFY_AFTER_FIRST_REQUEST: &str = r#"import ctypes, http.server, sys
held = []
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if not held:
            held.append(ctypes.CDLL(None).fanotify_init(0, 0))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"served")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

/// When the daemon logged each failed keep-state park, from its log lines'
/// RFC 3339 timestamps.
fn failed_park_times(log: &str) -> Vec<std::time::SystemTime> {
    log.lines()
        .filter(|line| line.contains("cannot park with its state kept"))
        .filter_map(|line| line.split_whitespace().next())
        .map(|stamp| {
            humantime::parse_rfc3339_weak(stamp.trim_end_matches('Z'))
                .unwrap_or_else(|err| panic!("log timestamp {stamp:?}: {err}"))
        })
        .collect()
}

#[test]
fn an_idle_service_whose_state_cannot_be_kept_runs_on() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let scripts = tempfile::tempdir().unwrap();
    let script = scripts.path().join("server.py");
    std::fs::write(&script, FANOTIFY_AFTER_FIRST_REQUEST).unwrap();
    let script = script.display().to_string();
    sandbox
        .agent_ok(&[
            "add",
            "fanotify",
            "--port",
            "8105",
            "--on-idle",
            "keep",
            "--idle-timeout",
            "300ms",
            "--",
            "python3",
            &script,
            "8105",
        ])
        .unwrap();
    assert!(sandbox.http_get(8105).unwrap().contains("served"));
    let pid = sandbox.running_pid("fanotify").unwrap();

    // Idle: the park is tried, cannot keep the fanotify instance, and leaves
    // the server running with the reason published.
    let mut service = serde_json::Value::Null;
    wait_until(Duration::from_secs(10), || {
        service = sandbox.service("fanotify").unwrap();
        !service["error"].is_null()
    })
    .unwrap_or_else(|_| panic!("no failed park published: {service}"));
    let error = service["error"].as_str().unwrap();
    assert!(
        error.contains("cannot park with its state kept, left running")
            && error.contains("fanotify is not supported"),
        "{error}"
    );
    // Tried again an idle timeout later, then after twice as long, and so
    // on: 300 ms, then 600 ms, then 1.2 s after each failure. The log's
    // timestamps show the waits growing.
    let mut tries = Vec::new();
    wait_until(Duration::from_secs(15), || {
        tries = failed_park_times(&sandbox.daemon_log());
        tries.len() >= 4
    })
    .unwrap_or_else(|_| panic!("fewer than 4 tries: {}", sandbox.daemon_log()));
    let waits: Vec<Duration> = tries
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).expect("log lines in time order"))
        .collect();
    // Each wait is at least its backoff, which doubles; a retry's own
    // checkpoint and the 75 ms checks only add to it.
    for (k, wait) in waits.iter().take(3).enumerate() {
        let backoff = Duration::from_millis(300) * 2u32.pow(k as u32);
        assert!(
            *wait >= backoff,
            "retried {waits:?} apart: wait {k} is shorter than its backoff {backoff:?}"
        );
    }
    // (Briefly "stopping" while a retry checkpoints it.)
    wait_until(Duration::from_secs(10), || {
        sandbox.service("fanotify").unwrap()["state"] == "running"
    })
    .unwrap();
    assert_eq!(sandbox.running_pid("fanotify").unwrap(), pid);
    assert!(sandbox.http_get(8105).unwrap().contains("served"));
    assert_eq!(sandbox.service("fanotify").unwrap()["wakes"], 1);
}

#[test]
fn a_prebuilt_image_is_registered_and_served() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let images = tempfile::tempdir().unwrap();
    let image = images.path().join("hello");
    let image_arg = image.display().to_string();
    build_hello_image(&sandbox, &image, 8102, &[]);
    assert!(image.join("manifest").exists(), "build wrote an image");

    sandbox
        .agent_ok(&["add", "prebuilt", "--image", &image_arg, "--port", "8102"])
        .unwrap();
    let body = sandbox.http_get(8102).unwrap();
    assert!(body.starts_with("hello from pid"), "{body:?}");
}

#[test]
fn a_prebuilt_image_of_an_unprivileged_user_gets_its_build_log_back() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let images = tempfile::tempdir().unwrap();
    let image = images.path().join("hello");
    let image_arg = image.display().to_string();
    build_hello_image(&sandbox, &image, 8103, &["--user", "nobody"]);
    // The build log is root's, 0600: nobody could never open it by path.
    let log = images.path().join("hello.log");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&log).unwrap().permissions());
    assert_eq!(
        mode & 0o077,
        0,
        "the build log {} is private",
        log.display()
    );

    sandbox
        .agent_ok(&["add", "prebuilt", "--image", &image_arg, "--port", "8103"])
        .unwrap();
    let body = sandbox.http_get(8103).unwrap();
    assert!(
        body.starts_with("hello from pid"),
        "nobody's server is restored with the log the agent gave it: {body:?}"
    );
}

#[test]
fn bad_commands_and_images_are_refused_and_leave_nothing_running() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let marker = format!("persist-never-ready-{}", std::process::id());

    // Never ready: `sleep` listens on nothing.
    let output = sandbox.agent(&[
        "add",
        "sleepy",
        "--port",
        "8103",
        "--ready-timeout",
        "1s",
        "--",
        "bash",
        "-c",
        &format!("exec -a {marker} sleep 100"),
    ]);
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        err.contains("was not ready within 1s") && err.contains("never listened on port 8103"),
        "{err}"
    );
    let leftovers = Command::new("pgrep")
        .args(["-f", &marker])
        .output()
        .unwrap();
    assert!(
        leftovers.stdout.is_empty(),
        "nothing left running: {leftovers:?}"
    );

    // Exits at once.
    let output = sandbox.agent(&["add", "quitter", "--port", "8104", "--", "false"]);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("false exited before it was ready (exit status 1)"),
        "{err}"
    );

    // Listens, but on another port than registered.
    let server = binary("hello-server").display().to_string();
    let output = sandbox.agent(&[
        "add",
        "elsewhere",
        "--port",
        "8105",
        "--ready-timeout",
        "1s",
        "--",
        &server,
        "127.0.0.1:8106",
    ]);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("never listened on port 8105"), "{err}");
    assert!(
        sandbox.status().unwrap().is_empty(),
        "refused services are not registered"
    );

    // An image that others can write is refused.
    let images = tempfile::tempdir().unwrap();
    let image = images.path().join("img");
    let image_arg = image.display().to_string();
    build_hello_image(&sandbox, &image, 8107, &[]);
    std::fs::set_permissions(&image, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let output = sandbox.agent(&["add", "open", "--image", &image_arg, "--port", "8107"]);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains(&format!(
            "{image_arg}: writable by group or others (mode 0777)"
        )),
        "{err}"
    );
}

#[test]
fn after_a_reboot_services_are_parked_from_their_images_without_running_the_command() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::with_daemon().unwrap();
    let root = web_root();
    let starts = root.path().join("starts.log");
    let command = format!(
        "echo started >> {}; exec python3 -m http.server 8108 --bind 127.0.0.1 --directory {}",
        starts.display(),
        root.path().display()
    );
    sandbox
        .agent_ok(&[
            "add", "web", "--port", "8108", "--ready", "http:/", "--", "bash", "-c", &command,
        ])
        .unwrap();
    assert!(
        sandbox
            .http_get(8108)
            .unwrap()
            .contains("persist-was-here.txt")
    );
    let pid = sandbox.running_pid("web").unwrap();

    // The reboot: the daemon and every process of the service die.
    sandbox.kill_daemon();
    persist_tests::kill_session(pid as i32);
    wait_until(Duration::from_secs(10), || runs_no_code(pid)).unwrap();

    sandbox.start_daemon().unwrap();
    let parked = sandbox.service("web").unwrap();
    assert_eq!(parked["state"], "parked", "{parked}");
    let listing = sandbox.http_get(8108).unwrap();
    assert!(
        listing.contains("persist-was-here.txt"),
        "served from the image: {listing}"
    );
    let started = std::fs::read_to_string(&starts).unwrap();
    assert_eq!(
        started.lines().count(),
        1,
        "the command ran only when the service was added"
    );
}

#[test]
fn readiness_by_notify_warmup_requests_and_user_are_honoured() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let root = web_root();

    // READY=1 on NOTIFY_SOCKET, as systemd's protocol has it.
    let script = format!(
        "import os, socket, http.server, functools\n\
         handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory={root:?})\n\
         server = http.server.HTTPServer(('127.0.0.1', 8109), handler)\n\
         with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:\n\
         \x20   notify.sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n\
         server.serve_forever()\n",
        root = root.path().display().to_string()
    );
    sandbox
        .agent_ok(&[
            "add",
            "notified",
            "--port",
            "8109",
            "--ready",
            "notify",
            "--warmup-requests",
            "3",
            "--",
            "python3",
            "-c",
            &script,
        ])
        .unwrap();
    let log = std::fs::read_to_string(sandbox.state_dir().join("logs/notified.log")).unwrap();
    // Warm-up requests for a non-HTTP readiness are plain connections; the
    // server logs nothing for them but must have survived them.
    assert!(!log.contains("Traceback"), "{log}");
    assert!(
        sandbox
            .http_get(8109)
            .unwrap()
            .contains("persist-was-here.txt")
    );

    // HTTP readiness: warm-up requests are GETs the server logs.
    add_http_server(
        &sandbox,
        "warm",
        8110,
        root.path(),
        &["--warmup-requests", "3"],
    );
    let log = std::fs::read_to_string(sandbox.state_dir().join("logs/warm.log")).unwrap();
    assert!(
        log.matches("\"GET / HTTP/1.0\" 200").count() >= 4,
        "the readiness GET and 3 warm-up GETs reached the server before the snapshot:\n{log}"
    );

    // --user: the service runs, and is restored, as that user.
    let server = binary("hello-server").display().to_string();
    sandbox
        .agent_ok(&[
            "add",
            "unprivileged",
            "--port",
            "8111",
            "--user",
            "nobody",
            "--",
            &server,
            "127.0.0.1:8111",
        ])
        .unwrap();
    let body = sandbox.http_get(8111).unwrap();
    let pid = sandbox.running_pid("unprivileged").unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_owned();
    assert!(body.starts_with("hello from pid"), "{body}");
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|uid| uid == "65534"),
        "restored as nobody: {uid_line}"
    );
}

/// A park asked for as soon as a prefetched wake has answered parks the
/// service: the daemon hears of such a resume only once the first request
/// had its CPU, and a park arriving before that news must not be lost.
#[test]
fn a_park_right_after_a_prefetched_wake_is_not_lost() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let command = redis_server_command(6393);
    sandbox.add_ok("quick", 6393, &[], &command).unwrap();
    let ping = || {
        sandbox
            .netns
            .enter(|| {
                let mut stream = TcpStream::connect(("127.0.0.1", 6393)).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                stream.write_all(b"PING\r\n").unwrap();
                let mut reply = [0u8; 7];
                stream.read_exact(&mut reply).unwrap();
                reply
            })
            .unwrap()
    };
    // Sent on the control socket the moment the answer is in: well before
    // the daemon can have heard of the resume.
    let park = || {
        let mut control =
            std::os::unix::net::UnixStream::connect(sandbox.state_dir().join("agent.sock"))
                .unwrap();
        control
            .write_all(b"{\"request\":\"park\",\"name\":\"quick\"}\n")
            .unwrap();
        let mut reply = String::new();
        control.read_to_string(&mut reply).unwrap();
        let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
        assert!(reply["error"].is_null(), "park: {reply}");
    };
    // The first wake records the working set; every later one copies it in.
    for round in 0..40 {
        assert_eq!(&ping(), b"+PONG\r\n", "round {round}");
        park();
        wait_until(Duration::from_secs(10), || {
            let status = sandbox.service("quick").unwrap();
            status["state"] == "parked" && status["skeleton_pid"].is_i64()
        })
        .unwrap_or_else(|_| {
            panic!(
                "round {round}: the park was lost: {}",
                sandbox.service("quick").unwrap()
            )
        });
    }
}

/// A server with a `SIGCONT` handler of its own: its skeleton stays under
/// ptrace and is resumed by its tracer, so that the handler never runs for
/// a signal the server was never sent.
#[test]
fn a_server_handling_sigcont_is_resumed_without_running_its_handler() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let root = web_root();
    let marker = root.path().join("continued");
    let script = root.path().join("server.py");
    std::fs::write(
        &script,
        "import http.server, signal, sys\n\
         port, marker = int(sys.argv[1]), sys.argv[2]\n\
         def on_cont(signum, frame):\n    open(marker, 'w').write('continued')\n\
         signal.signal(signal.SIGCONT, on_cont)\n\
         http.server.HTTPServer(('127.0.0.1', port), http.server.SimpleHTTPRequestHandler)\
         .serve_forever()\n",
    )
    .unwrap();
    let script = script.display().to_string();
    let marker_arg = marker.display().to_string();
    sandbox
        .agent_ok(&[
            "add",
            "cont",
            "--port",
            "8113",
            "--ready",
            "http:/",
            "--",
            "python3",
            &script,
            "8113",
            &marker_arg,
        ])
        .unwrap();
    wait_until(Duration::from_secs(10), || {
        skeleton_pid(&sandbox.daemon_log(), "cont").is_some()
    })
    .expect("a skeleton is ready");
    let skeleton = skeleton_pid(&sandbox.daemon_log(), "cont").unwrap();
    let status = std::fs::read_to_string(format!("/proc/{skeleton}/status")).unwrap();
    assert!(
        !status.contains("TracerPid:\t0\n"),
        "still under ptrace: {status}"
    );

    // The server's working directory is the agent's: ask for a path it
    // serves either way.
    let response = sandbox
        .netns
        .enter(|| {
            let mut stream = TcpStream::connect(("127.0.0.1", 8113)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            stream.write_all(b"GET /nowhere HTTP/1.0\r\n\r\n").unwrap();
            let mut response = String::new();
            let _ = stream.read_to_string(&mut response);
            response
        })
        .unwrap();
    assert!(response.starts_with("HTTP/1.0 404"), "{response}");
    // Python runs a handler between two polls of `serve_forever` (0.5 s).
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !marker.exists(),
        "the server's SIGCONT handler ran on the wake"
    );
}

/// python's http.server answering `/uname` with what `os.uname()` does:
/// `allowed`, or `blocked: ` and the error.
const UNAME_SERVER: &str = "\
import http.server, os, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.path != '/uname':
            return super().do_GET()
        try:
            os.uname()
            body = b'allowed'
        except OSError as err:
            body = f'blocked: {err.strerror}'.encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
port = int(sys.argv[1])
http.server.ThreadingHTTPServer(('127.0.0.1', port), Handler).serve_forever()
";

/// One HTTP/1.0 GET of `path` on 127.0.0.1:`port` in the sandbox: the body.
fn get(sandbox: &Sandbox, port: u16, path: &str) -> String {
    sandbox
        .netns
        .enter(|| {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            write!(stream, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            response
                .split_once("\r\n\r\n")
                .map_or(response.clone(), |(_, body)| body.to_owned())
        })
        .unwrap()
}

/// The seccomp lines of a process's status.
fn seccomp_status(pid: i64) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter(|line| line.starts_with("Seccomp") || line.starts_with("NoNewPrivs"))
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn python_http_server_under_a_seccomp_filter_is_parked_and_woken_with_it() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let port = 8130;
    let launcher = binary("fixture-seccomp").display().to_string();
    let command: Vec<String> = [
        launcher.as_str(),
        "--exec",
        "python3",
        "-c",
        UNAME_SERVER,
        &port.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    sandbox
        .add_ok(
            "guarded",
            port,
            &["--ready", "http:/", "--idle-timeout", "500ms"],
            &command,
        )
        .expect("a service under a seccomp filter is checkpointed");
    assert_eq!(sandbox.service("guarded").unwrap()["state"], "parked");

    let expected = ["NoNewPrivs: 1", "Seccomp: 2", "Seccomp_filters: 1"];
    for wake in 1..=2 {
        assert_eq!(
            get(&sandbox, port, "/uname"),
            "blocked: Operation not permitted",
            "wake {wake}: the filter no longer fails uname"
        );
        let listing = get(&sandbox, port, "/");
        assert!(
            listing.contains("Directory listing"),
            "wake {wake}: the filter blocks more than uname: {listing}"
        );
        let pid = sandbox.running_pid("guarded").unwrap();
        assert_eq!(seccomp_status(pid), expected, "wake {wake}, pid {pid}");
        wait_until(Duration::from_secs(10), || {
            sandbox.service("guarded").unwrap()["state"] == "parked"
        })
        .unwrap_or_else(|_| panic!("wake {wake}: never parked: {}", sandbox.daemon_log()));
    }
}

/// The file mappings of `pid` as /proc/PID/maps shows them: range,
/// permissions, offset, device, inode and path.
fn file_maps_lines(pid: i64) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|fields| fields.len() == 6 && fields[5].starts_with('/'))
        .map(|fields| fields.join(" "))
        .collect()
}

/// The file mappings an image recorded, as [`file_maps_lines`] shows them.
fn recorded_file_lines(image: &Image) -> Vec<String> {
    image
        .manifest()
        .mappings
        .iter()
        .filter_map(|mapping| {
            let MappingKind::File {
                path,
                device,
                inode,
                offset,
            } = &mapping.kind
            else {
                return None;
            };
            let flag = |on: bool, letter: char| if on { letter } else { '-' };
            let perms: String = [
                flag(mapping.protection.read, 'r'),
                flag(mapping.protection.write, 'w'),
                flag(mapping.protection.exec, 'x'),
                if mapping.shared { 's' } else { 'p' },
            ]
            .into_iter()
            .collect();
            Some(format!(
                "{:x}-{:x} {perms} {offset:08x} {device} {inode} {path}",
                mapping.start, mapping.end
            ))
        })
        .collect()
}

/// Pages an image stored for private file mappings: what the process wrote
/// to in them.
fn written_file_pages(image: &Image) -> u64 {
    image
        .manifest()
        .mappings
        .iter()
        .filter(|m| matches!(m.kind, MappingKind::File { .. }) && !m.shared)
        .flat_map(|m| &m.pages)
        .map(|run| run.count)
        .sum()
}

/// Python's libraries come back as the very mappings of their files, the
/// ones whose pages it wrote (`.data`, relro) too: /proc/PID/maps shows
/// every file mapping as it was before the park.
#[test]
fn python_http_server_maps_its_libraries_as_before_the_park() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let root = web_root();
    let port = 8140;
    add_http_server(
        &sandbox,
        "maps",
        port,
        root.path(),
        &["--idle-timeout", "1s"],
    );
    let image = Image::open(&sandbox.state_dir().join("images").join("maps")).unwrap();
    let recorded = recorded_file_lines(&image);
    assert!(
        written_file_pages(&image) > 0,
        "python wrote to none of its file mappings: the test checks nothing new"
    );

    for wake in 1..=2 {
        let listing = sandbox.http_get(port).unwrap();
        assert!(
            listing.contains("persist-was-here.txt"),
            "wake {wake}: not served: {listing}"
        );
        let pid = sandbox.running_pid("maps").unwrap();
        assert_eq!(
            file_maps_lines(pid),
            recorded,
            "wake {wake}, pid {pid}: the file mappings differ from those recorded before the park"
        );
        wait_until(Duration::from_secs(10), || {
            sandbox.service("maps").unwrap()["state"] == "parked"
        })
        .unwrap_or_else(|_| panic!("wake {wake}: never parked: {}", sandbox.daemon_log()));
    }
}
