//! A daemon killed with SIGKILL at the worst instants: its services neither
//! hang nor die, and no client is refused while it is down.
//!
//! The crash test kills the daemon at random instants of many park/wake
//! cycles of redis with `--on-idle keep`; `PERSIST_CRASH_CYCLES` sets how
//! many (25 by default; `cargo xtask crash-test` runs 200).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use persist_tests::{Sandbox, has_unfilled_memory, redis_server_command, wait_until};

/// A connection to redis inside the sandbox's namespace.
struct Redis {
    reader: BufReader<TcpStream>,
}

impl Redis {
    fn connect(sandbox: &Sandbox, port: u16) -> std::io::Result<Self> {
        let stream = sandbox
            .netns
            .enter(|| TcpStream::connect(("127.0.0.1", port)))
            .expect("entering the test namespace")?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    fn ask(&mut self, command: &str) -> std::io::Result<String> {
        ask(&mut self.reader, command)
    }
}

/// Sends one command (inline protocol) and returns its reply line (the
/// value, for a bulk reply).
fn ask(reader: &mut BufReader<TcpStream>, command: &str) -> std::io::Result<String> {
    reader
        .get_mut()
        .write_all(format!("{command}\r\n").as_bytes())?;
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    if line.starts_with('$') && !line.starts_with("$-1") {
        line.clear();
        reader.read_line(&mut line)?;
    }
    Ok(line.trim_end().to_owned())
}

/// Adds redis-server on `port` as a `--on-idle keep` service with `options`
/// and sends it `set` (a SET command), which must answer +OK.
fn add_keep_redis(sandbox: &Sandbox, port: u16, options: &[&str], set: &str) {
    let options: Vec<&str> = ["--on-idle", "keep"]
        .into_iter()
        .chain(options.iter().copied())
        .collect();
    sandbox
        .add_ok("redis", port, &options, &redis_server_command(port))
        .unwrap();
    let mut client = Redis::connect(sandbox, port).unwrap();
    assert_eq!(client.ask(set).unwrap(), "+OK", "redis took {set:?}");
}

/// Killed inside a wake's 200 ms logging window (the fill is held back, so
/// pages are still missing), the daemon is restarted: the new one adopts
/// the process (same pid) and serves its pages, so a request the process
/// took while no daemon ran is answered, over the same connection, and
/// every key is still there.
#[test]
fn a_process_woken_just_before_the_daemon_died_is_adopted_by_the_next_one() {
    persist_tests::require_root!();
    adopted_after_the_daemon_died(6420, &[]);
}

/// The same after a cold wake: the skeleton prepared on the SYN's path is
/// recorded for the next daemon before it is resumed.
#[test]
fn a_process_woken_cold_just_before_the_daemon_died_is_adopted_by_the_next_one() {
    persist_tests::require_root!();
    adopted_after_the_daemon_died(6424, &["--keep-skeleton", "never"]);
}

fn adopted_after_the_daemon_died(port: u16, options: &[&str]) {
    let mut sandbox = Sandbox::with_daemon().unwrap();
    add_keep_redis(&sandbox, port, options, "SET before park");
    wait_until(Duration::from_secs(10), || {
        sandbox.agent(&["park", "redis"]).status.success()
    })
    .expect("parked with its state kept");

    let mut client = Redis::connect(&sandbox, port).unwrap();
    assert_eq!(client.ask("SET woken yes").unwrap(), "+OK");
    let pid = sandbox.running_pid("redis").unwrap() as i32;
    let before = sandbox.daemon_log();
    if options.contains(&"never") {
        assert!(
            before.contains("cold wake: skeleton prepared"),
            "the wake was not a cold one: {before}"
        );
    }
    sandbox.kill_daemon();
    sandbox.track_pid(pid);
    assert!(
        has_unfilled_memory(pid),
        "the daemon was killed after its pager filled every page: the test missed its window"
    );

    // No daemon: a request whose pages are missing waits in its fault.
    let asked = std::thread::spawn(move || {
        let answers = [
            client.ask("SET during outage"),
            client.ask("GET before"),
            client.ask("GET woken"),
        ];
        (client, answers)
    });
    std::thread::sleep(Duration::from_millis(300));
    sandbox.start_daemon().unwrap();
    let (_client, answers) = asked.join().unwrap();
    let log = sandbox.daemon_log();
    let answers: Vec<String> = answers
        .into_iter()
        .map(|answer| answer.unwrap_or_else(|err| panic!("request lost: {err}\n{log}")))
        .collect();
    assert_eq!(answers, ["+OK", "park", "yes"], "{log}");

    let service = sandbox.service("redis").unwrap();
    assert_eq!(service["state"], "running", "{service}\n{log}");
    assert_eq!(service["pid"], pid, "adopted, not restarted: {service}");
    wait_until(Duration::from_secs(10), || !has_unfilled_memory(pid))
        .unwrap_or_else(|_| panic!("the adopted process never got all its pages:\n{log}"));
    let mut again = Redis::connect(&sandbox, port).unwrap();
    assert_eq!(again.ask("GET during").unwrap(), "outage");
}

/// Killed right after a park, before the next skeleton is ready, the
/// daemon leaves the port held: a client that connects while no daemon
/// runs is queued, not refused, and served once the daemon is back.
#[test]
fn a_client_connecting_while_the_daemon_is_down_after_a_park_is_queued() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::with_daemon().unwrap();
    let port = 6421;
    add_keep_redis(&sandbox, port, &[], "SET kept yes");
    wait_until(Duration::from_secs(10), || {
        sandbox.agent(&["park", "redis"]).status.success()
    })
    .expect("parked with its state kept");
    sandbox.kill_daemon();

    let mut client = Redis::connect(&sandbox, port)
        .unwrap_or_else(|err| panic!("refused while the daemon is down: {err}"));
    let asked = std::thread::spawn(move || client.ask("GET kept"));
    std::thread::sleep(Duration::from_secs(1));
    sandbox.start_daemon().unwrap();
    let answer = asked.join().unwrap();
    let log = sandbox.daemon_log();
    assert_eq!(
        answer.unwrap_or_else(|err| panic!("queued request lost: {err}\n{log}")),
        "yes",
        "{log}"
    );
}

/// Killed while a `--on-idle keep` park checkpoints redis (held in the
/// middle of its injected system calls by the debug hook), the daemon leaves
/// redis stopped with a recovery file; the restarted daemon puts it back and
/// adopts it as running (same pid, never killed), with every key written
/// before the park.
#[test]
fn a_daemon_killed_during_a_keep_checkpoint_leaves_the_process_to_the_next_one() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::new().unwrap();
    sandbox
        .start_daemon_with_env(&[], &[("PERSIST_DEBUG_CHECKPOINT_PAUSE_MS", "30000")])
        .unwrap();
    let port = 6423;
    add_keep_redis(&sandbox, port, &[], "SET before park");
    let pid = sandbox.running_pid("redis").unwrap() as i32;

    let recovery = sandbox.state_dir().join("run/redis.checkpoint");
    let park = std::thread::spawn({
        let state_dir = sandbox.state_dir().to_owned();
        let netns = sandbox.netns.name().to_owned();
        move || {
            std::process::Command::new("ip")
                .args(["netns", "exec", &netns])
                .arg(persist_tests::binary("persist-agent"))
                .arg("--state-dir")
                .arg(state_dir)
                .args(["park", "redis"])
                .output()
        }
    });
    wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&recovery).is_ok_and(|text| text.contains("\"tid\""))
    })
    .unwrap_or_else(|_| panic!("the park never injected a call:\n{}", sandbox.daemon_log()));
    std::thread::sleep(Duration::from_millis(100));
    sandbox.kill_daemon();
    sandbox.track_pid(pid);
    let _ = park.join();
    std::thread::sleep(Duration::from_millis(200));
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        state.contains(") T "),
        "redis is not left stopped by the killed daemon: {state}"
    );

    sandbox.start_daemon().unwrap();
    let log = sandbox.daemon_log();
    let service = sandbox.service("redis").unwrap();
    assert_eq!(service["state"], "running", "{service}\n{log}");
    assert_eq!(
        service["pid"], pid,
        "recovered and adopted, not restarted: {service}\n{log}"
    );
    assert!(!recovery.exists(), "the recovery file is left:\n{log}");
    let mut again = Redis::connect(&sandbox, port).unwrap();
    assert_eq!(again.ask("GET before").unwrap(), "park", "{log}");
    assert_eq!(again.ask("SET after recovery").unwrap(), "+OK");
    assert!(
        killed_by_agent(&log).is_empty(),
        "the agent killed a process:\n{log}"
    );
}

/// A small deterministic random source (xorshift), seeded from the clock
/// and printed, so that a failing run can be told apart.
struct Random(u64);

impl Random {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

/// What the crash test saw.
#[derive(Debug, Default)]
struct CrashReport {
    cycles: u32,
    kills: u32,
    keys_written: u32,
    keys_verified: u32,
    adoptions: u32,
    /// Processes put back after a kill during a keep park's checkpoint.
    recoveries: u32,
    /// Keys found missing, and the cycle whose kill lost them.
    lost: Vec<(u32, u32)>,
    /// Errors of connections opened while no kill was under way.
    client_errors: Vec<String>,
    /// Errors of the connection that was open at the instant of a kill.
    errors_at_kill: u32,
}

/// The daemon SIGKILLed at random instants across park/wake cycles of redis
/// with `--on-idle keep`, restarted within a second each time, while a
/// client writes and reads keys throughout: no key is lost, no process is
/// killed by the agent, and no client sees an error but on a connection
/// open at the instant of a kill.
#[test]
fn redis_loses_nothing_when_the_daemon_is_killed_at_random_instants() {
    persist_tests::require_root!();
    let cycles: u32 = std::env::var("PERSIST_CRASH_CYCLES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(25);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash test: {cycles} cycles, seed {seed}");
    let mut random = Random(seed);
    let mut sandbox = Sandbox::with_daemon().unwrap();
    let port = 6422;
    sandbox
        .add_ok(
            "redis",
            port,
            &["--on-idle", "keep", "--idle-timeout", "200ms"],
            &redis_server_command(port),
        )
        .unwrap();
    let mut report = CrashReport::default();
    let mut next_key = 0u32;
    let mut killed_pids = Vec::new();
    for cycle in 0..cycles {
        report.cycles += 1;
        // Wait until it parks (or, now and then, wake it early).
        let park_wait = Duration::from_millis(random.below(700));
        let started = Instant::now();
        while started.elapsed() < park_wait
            && sandbox
                .service("redis")
                .is_ok_and(|service| service["state"] != "parked")
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        // A client writes and reads keys on one connection, while the
        // daemon is killed at a random instant of the wake, the park or
        // the idle time between.
        let kill_after = Duration::from_millis(random.below(600));
        let client_keys = 5 + random.below(10) as u32;
        let first = next_key;
        next_key += client_keys;
        let client_sandbox_port = port;
        let netns = sandbox.netns.name().to_owned();
        let writer = std::thread::spawn(move || {
            write_and_read_keys(&netns, client_sandbox_port, first, client_keys)
        });
        std::thread::sleep(kill_after);
        sandbox.kill_daemon();
        report.kills += 1;
        let before_kill = strip_colours(&sandbox.daemon_log());
        let down_for = Duration::from_millis(random.below(1000));
        std::thread::sleep(down_for);
        sandbox.start_daemon().unwrap();
        let (written, errors) = writer.join().unwrap();
        report.keys_written += written;
        if !errors.is_empty() {
            // Only the connection open at the kill may fail.
            report.errors_at_kill += 1;
            if errors.len() > 1 {
                report.client_errors.extend(errors);
            }
        }
        // Every key written so far is there (but those already found
        // lost), read on a fresh connection.
        let mut missing = Vec::new();
        report.keys_verified = verify_keys(
            &sandbox,
            port,
            next_key,
            &mut missing,
            &mut report.client_errors,
        );
        let log = strip_colours(&sandbox.daemon_log());
        for key in missing {
            if !report.lost.iter().any(|&(lost, _)| lost == key) {
                eprintln!(
                    "cycle {cycle}: key-{key} lost\nbefore the kill:\n{before_kill}\nafter:\n{log}"
                );
                report.lost.push((key, cycle));
            }
        }
        if log.contains("adopted a process") {
            report.adoptions += 1;
        }
        if log.contains("recovered the process") {
            report.recoveries += 1;
        }
        killed_pids.extend(killed_by_agent(&log));
        assert!(
            report.client_errors.is_empty(),
            "cycle {cycle}: client errors {:?}\nbefore the kill:\n{before_kill}\nafter:\n{log}",
            report.client_errors
        );
    }
    eprintln!(
        "crash test report: {report:?}, processes killed by the agent: {}",
        killed_pids.len()
    );
    assert!(report.lost.is_empty(), "keys lost: {:?}", report.lost);
    assert!(
        killed_pids.is_empty(),
        "the agent killed processes: {killed_pids:?}"
    );
}

/// Log lines of the agent killing a process that ran (a parked skeleton
/// never ran: killing it loses nothing).
fn killed_by_agent(log: &str) -> Vec<String> {
    log.lines()
        .filter(|line| line.contains("stopping it") || line.contains("killed"))
        .map(str::to_owned)
        .collect()
}

/// Writes keys `first..first + count` on one connection, reading each back;
/// a connection that fails is opened again and the key written again.
/// Returns how many keys were written and the errors seen.
fn write_and_read_keys(netns: &str, port: u16, first: u32, count: u32) -> (u32, Vec<String>) {
    let ns = std::fs::File::open(format!("/run/netns/{netns}")).expect("the test namespace");
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    let mut errors = Vec::new();
    let mut connection: Option<BufReader<TcpStream>> = None;
    for key in first..first + count {
        let value = format!("value-{key}");
        loop {
            let attempt = (|| -> std::io::Result<()> {
                if connection.is_none() {
                    let stream = TcpStream::connect(("127.0.0.1", port))?;
                    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                    connection = Some(BufReader::new(stream));
                }
                let reader = connection.as_mut().expect("connected");
                let set = ask(reader, &format!("SET key-{key} {value}"))?;
                let get = ask(reader, &format!("GET key-{key}"))?;
                if set != "+OK" || get != value {
                    return Err(std::io::Error::other(format!(
                        "key-{key}: SET {set:?}, GET {get:?}"
                    )));
                }
                Ok(())
            })();
            match attempt {
                Ok(()) => break,
                Err(err) => {
                    errors.push(format!("key-{key}: {err}"));
                    connection = None;
                    if errors.len() > 3 {
                        return (key - first, errors);
                    }
                }
            }
        }
        // Some keys on the same connection, some on fresh ones.
        if key % 3 == 0 {
            connection = None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (count, errors)
}

/// Reads keys `0..count` on one fresh connection; returns how many hold
/// their value, puts those that do not in `missing`, and records errors.
fn verify_keys(
    sandbox: &Sandbox,
    port: u16,
    count: u32,
    missing: &mut Vec<u32>,
    errors: &mut Vec<String>,
) -> u32 {
    let mut redis = match Redis::connect(sandbox, port) {
        Ok(redis) => redis,
        Err(err) => {
            errors.push(format!("verifying: connect: {err}"));
            return 0;
        }
    };
    let mut verified = 0;
    for key in 0..count {
        match redis.ask(&format!("GET key-{key}")) {
            Ok(value) if value == format!("value-{key}") => verified += 1,
            Ok(_) => missing.push(key),
            Err(err) => {
                errors.push(format!("verifying key-{key}: {err}"));
                return verified;
            }
        }
    }
    verified
}

/// `text` without ANSI colour sequences (the daemon's log has them).
fn strip_colours(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}
