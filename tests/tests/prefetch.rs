//! Working-set record and prefetch in snapshot mode: the first wake from an
//! image records the pages it faulted in, later wakes copy them in bulk just
//! before the resume, and a missing, stale or corrupt set only costs faults.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use persist_tests::{Sandbox, add_http_server, redis_server_command, wait_until, web_root};

fn add_redis(sandbox: &Sandbox, name: &str, port: u16, extra: &[&str]) {
    sandbox
        .add_ok(name, port, extra, &redis_server_command(port))
        .expect("snapshot-mode add of redis succeeds");
}

fn working_set(sandbox: &Sandbox, name: &str) -> PathBuf {
    sandbox
        .state_dir()
        .join("images")
        .join(name)
        .join("working-set")
}

/// Waits until the pager of the current wake has every page in, and returns
/// the service's status then.
fn pager_done(sandbox: &Sandbox, name: &str) -> serde_json::Value {
    let mut status = serde_json::Value::Null;
    wait_until(Duration::from_secs(20), || {
        status = sandbox.service(name).unwrap();
        !status["last_faults"].is_null()
    })
    .unwrap_or_else(|_| {
        panic!(
            "pager of {name} never finished: {status}\n{}",
            sandbox.daemon_log()
        )
    });
    status
}

/// Parks `name` and waits until the skeleton of its next wake is prepared.
fn park(sandbox: &Sandbox, name: &str) {
    sandbox.agent_ok(&["park", name]).unwrap();
    wait_until(Duration::from_secs(20), || {
        let status = sandbox.service(name).unwrap();
        status["state"] == "parked" && status["skeleton_pid"].is_i64()
    })
    .unwrap_or_else(|_| {
        panic!(
            "{name} not parked with a skeleton:\n{}",
            sandbox.daemon_log()
        )
    });
}

fn inspect(sandbox: &Sandbox, name: &str) -> String {
    let dir = sandbox.state_dir().join("images").join(name);
    sandbox
        .agent_ok(&["inspect", &dir.display().to_string()])
        .unwrap()
}

/// One request on a fresh connection from inside the namespace; returns the
/// whole response and the time from connect to its first byte.
fn request(sandbox: &Sandbox, port: u16, payload: &[u8]) -> (String, Duration) {
    sandbox
        .netns
        .enter(|| {
            let started = Instant::now();
            let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            stream.write_all(payload).unwrap();
            let mut first = [0u8; 1];
            stream.read_exact(&mut first).expect("a first byte");
            let ttfb = started.elapsed();
            let mut rest = Vec::new();
            if payload.starts_with(b"GET") {
                let _ = stream.read_to_end(&mut rest);
            } else {
                // RESP: the reply of one command ends with its first CRLF
                // for the simple replies used here.
                let mut byte = [0u8; 1];
                while !rest.ends_with(b"\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                    rest.push(byte[0]);
                }
            }
            let mut response = vec![first[0]];
            response.extend(rest);
            (String::from_utf8_lossy(&response).into_owned(), ttfb)
        })
        .unwrap()
}

const HTTP_GET: &[u8] = b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n";
const REDIS_PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

fn u64_field(status: &serde_json::Value, field: &str) -> u64 {
    status[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing: {status}"))
}

/// First wake records, second wake prefetches with fewer faults; both answer
/// correctly. Returns the second wake's status.
fn record_then_prefetch(
    sandbox: &Sandbox,
    name: &str,
    port: u16,
    payload: &[u8],
    expected: &str,
) -> serde_json::Value {
    assert!(
        !working_set(sandbox, name).exists(),
        "no set before any wake"
    );
    let (response, _) = request(sandbox, port, payload);
    assert!(
        response.contains(expected),
        "first wake answers: {response:?}"
    );
    let first = pager_done(sandbox, name);
    // Without a set, a wake copies ahead only the few pages the skeleton
    // brings in while prepared (each thread's stack top and TLS).
    let baseline = u64_field(&first, "last_prefetch_pages");
    wait_until(Duration::from_secs(10), || {
        working_set(sandbox, name).exists()
    })
    .expect("the first wake records a working set");
    let shown = inspect(sandbox, name);
    assert!(
        shown.contains("working set") && shown.contains("pages") && shown.contains("valid"),
        "inspect shows the set: {shown}"
    );
    assert!(!shown.contains("stale"), "{shown}");

    park(sandbox, name);
    let (response, _) = request(sandbox, port, payload);
    assert!(
        response.contains(expected),
        "second wake answers: {response:?}"
    );
    let second = pager_done(sandbox, name);
    assert!(
        u64_field(&second, "last_prefetch_pages") > baseline,
        "the second wake prefetched its set: first {first}, second {second}"
    );
    assert!(
        u64_field(&second, "last_faults") < u64_field(&first, "last_faults"),
        "prefetching saves faults: first {first}, second {second}"
    );
    second
}

#[test]
fn python_http_server_records_its_working_set_then_prefetches_it() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let root = web_root();
    add_http_server(&sandbox, "web", 8140, root.path(), &[]);
    record_then_prefetch(&sandbox, "web", 8140, HTTP_GET, "persist-was-here.txt");
}

#[test]
fn redis_records_its_working_set_then_prefetches_it() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    add_redis(&sandbox, "redis", 6440, &[]);
    record_then_prefetch(&sandbox, "redis", 6440, REDIS_PING, "+PONG");
    let (response, _) = request(
        &sandbox,
        6440,
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\n",
    );
    assert_eq!(response, "+OK\r\n");
    let (response, _) = request(&sandbox, 6440, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
    assert!(response.starts_with("$5"), "{response:?}");
}

/// A set that lacks pages the wake needs is extended by the pages the next
/// prefetched wake faults on, so that the wake after it does not fault there.
#[test]
fn a_prefetched_wake_extends_a_set_that_lacks_pages() {
    persist_tests::require_root!();
    use persist_common::image::{Image, PagesByProcess, WorkingSet, manifest_crc};
    let sandbox = Sandbox::with_daemon().unwrap();
    add_redis(&sandbox, "redis", 6441, &[]);
    let (response, _) = request(&sandbox, 6441, REDIS_PING);
    assert_eq!(response, "+PONG\r\n");
    pager_done(&sandbox, "redis");
    let path = working_set(&sandbox, "redis");
    wait_until(Duration::from_secs(10), || path.exists()).expect("a working set is recorded");

    // Keep the first half of the recorded set only.
    let dir = sandbox.state_dir().join("images").join("redis");
    let crc = manifest_crc(&dir).unwrap();
    let recorded = WorkingSet::open(&dir, crc).unwrap();
    let half = &recorded.pages_of(0)[..recorded.len() / 2];
    let image = Image::open(&dir).unwrap();
    WorkingSet::write(
        &dir,
        crc,
        &PagesByProcess::from([(0, half.to_vec())]),
        image.pages(),
    )
    .unwrap();

    park(&sandbox, "redis");
    let (response, _) = request(&sandbox, 6441, REDIS_PING);
    assert_eq!(response, "+PONG\r\n");
    let status = pager_done(&sandbox, "redis");
    assert!(
        u64_field(&status, "last_faults") > 0,
        "the halved set lacked pages: {status}"
    );
    wait_until(Duration::from_secs(10), || {
        WorkingSet::open(&dir, crc).is_ok_and(|set| set.len() > half.len())
    })
    .expect("the wake extended the set with the pages it faulted on");
    let extended = WorkingSet::open(&dir, crc).unwrap();
    assert_eq!(
        &extended.pages_of(0)[..half.len()],
        half,
        "the set it prefetched comes first, unchanged"
    );

    park(&sandbox, "redis");
    let (response, _) = request(&sandbox, 6441, REDIS_PING);
    assert_eq!(response, "+PONG\r\n");
    let third = pager_done(&sandbox, "redis");
    assert_eq!(
        u64_field(&third, "last_faults"),
        0,
        "the extended set holds every page a wake needs: second wake {status}, third {third}"
    );
}

#[test]
fn a_corrupt_working_set_is_ignored_and_recorded_again() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let root = web_root();
    add_http_server(&sandbox, "web", 8141, root.path(), &[]);
    let (response, _) = request(&sandbox, 8141, HTTP_GET);
    assert!(response.contains("persist-was-here.txt"), "{response:?}");
    let baseline = u64_field(&pager_done(&sandbox, "web"), "last_prefetch_pages");
    let path = working_set(&sandbox, "web");
    wait_until(Duration::from_secs(10), || path.exists()).expect("a working set is recorded");

    // The set is checked when the skeleton is prepared (the wake copies its
    // pages from the image, whose runs carry their own checksums): a corrupt
    // set is refused then, and the next wake records it again.
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    park(&sandbox, "web");
    let log = sandbox.daemon_log();
    assert!(
        log.contains("working set ignored, the next wake records it again"),
        "{log}"
    );
    let (response, _) = request(&sandbox, 8141, HTTP_GET);
    assert!(response.contains("persist-was-here.txt"), "{response:?}");
    let status = pager_done(&sandbox, "web");
    assert_eq!(
        u64_field(&status, "last_prefetch_pages"),
        baseline,
        "{status}"
    );
    wait_until(Duration::from_secs(10), || {
        inspect(&sandbox, "web").contains("valid") && !inspect(&sandbox, "web").contains("invalid")
    })
    .expect("the wake recorded a fresh, valid set");
}

#[test]
fn prefetch_none_never_records_and_all_copies_everything() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let root = web_root();
    add_http_server(&sandbox, "lazy", 8142, root.path(), &["--prefetch", "none"]);
    add_http_server(&sandbox, "eager", 8143, root.path(), &["--prefetch", "all"]);
    let mut copied_ahead = Vec::new();
    for _ in 0..2 {
        let (response, _) = request(&sandbox, 8142, HTTP_GET);
        assert!(response.contains("persist-was-here.txt"), "{response:?}");
        let status = pager_done(&sandbox, "lazy");
        copied_ahead.push(u64_field(&status, "last_prefetch_pages"));
        park(&sandbox, "lazy");
    }
    assert_eq!(
        copied_ahead[0], copied_ahead[1],
        "the second lazy wake copies no more ahead than the first"
    );
    assert!(
        !working_set(&sandbox, "lazy").exists(),
        "--prefetch none records nothing"
    );
    assert!(inspect(&sandbox, "lazy").contains("working set none recorded"));

    let (response, _) = request(&sandbox, 8143, HTTP_GET);
    assert!(response.contains("persist-was-here.txt"), "{response:?}");
    let status = pager_done(&sandbox, "eager");
    assert!(
        u64_field(&status, "last_prefetch_pages") > copied_ahead[0],
        "{status}"
    );
    assert_eq!(
        u64_field(&status, "last_fault_pages") + u64_field(&status, "last_filled_pages"),
        0,
        "every stored page was in before the resume: {status}"
    );
    assert!(
        !working_set(&sandbox, "eager").exists(),
        "--prefetch all records nothing"
    );
}

fn median(values: &mut [u128]) -> u128 {
    values.sort_unstable();
    values[values.len() / 2]
}

/// Faults and time to first byte of lazy wakes against prefetching wakes.
/// Run with `cargo test -p persist-tests --test prefetch -- --ignored --nocapture`.
#[test]
#[ignore = "measurement, prints a table"]
fn measure_lazy_against_prefetch() {
    persist_tests::require_root!();
    let runs: usize = std::env::var("PERSIST_MEASURE_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(7);
    let sandbox = Sandbox::with_daemon().unwrap();
    let root = web_root();
    let services: [(&str, u16, &[u8], &str); 6] = [
        ("web-none", 8150, HTTP_GET, "none"),
        ("web-recorded", 8151, HTTP_GET, "recorded"),
        ("web-all", 8152, HTTP_GET, "all"),
        ("redis-none", 6450, REDIS_PING, "none"),
        ("redis-recorded", 6451, REDIS_PING, "recorded"),
        ("redis-all", 6452, REDIS_PING, "all"),
    ];
    let only = std::env::var("PERSIST_MEASURE_ONLY").unwrap_or_default();
    let services: Vec<_> = services
        .into_iter()
        .filter(|(name, ..)| name.contains(&only))
        .collect();
    for &(name, port, payload, mode) in &services {
        if payload == HTTP_GET {
            add_http_server(&sandbox, name, port, root.path(), &["--prefetch", mode]);
        } else {
            add_redis(&sandbox, name, port, &["--prefetch", mode]);
        }
        // The first wake (the recording one, with `recorded`) is shown apart.
        let (_, took) = request(&sandbox, port, payload);
        let status = pager_done(&sandbox, name);
        println!(
            "first wake of {name}: ttfb {} us, {} faults",
            took.as_micros(),
            u64_field(&status, "last_faults")
        );
        park(&sandbox, name);
    }
    println!(
        "{:<16} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "service", "ttfb_us", "faults", "prefetch", "wake_us", "warm_us"
    );
    for &(name, port, payload, _) in &services {
        let (mut ttfb, mut faults, mut prefetched, mut resume, mut warm) =
            (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            std::thread::sleep(Duration::from_millis(300));
            let (_, took) = request(&sandbox, port, payload);
            let status = pager_done(&sandbox, name);
            ttfb.push(took.as_micros());
            faults.push(u128::from(u64_field(&status, "last_faults")));
            prefetched.push(u128::from(u64_field(&status, "last_prefetch_pages")));
            resume.push(u128::from(status["last_wake_us"].as_u64().unwrap_or(0)));
            warm.push(request(&sandbox, port, payload).1.as_micros());
            park(&sandbox, name);
        }
        eprintln!("{name} ttfb_us {ttfb:?}");
        println!(
            "{:<16} {:>10} {:>10} {:>10} {:>10} {:>10}",
            name,
            median(&mut ttfb),
            median(&mut faults),
            median(&mut prefetched),
            median(&mut resume),
            median(&mut warm)
        );
    }
}
