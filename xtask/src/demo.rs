//! `cargo xtask demo`: an unmodified `python3 -m http.server` is started once,
//! snapshotted when ready and parked on disk; connections wake it by restoring
//! the snapshot; it is parked again when idle. All in a network namespace of
//! its own, with a throwaway state directory.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use persist_tests::{Sandbox, http_server_command, wait_until};

use crate::{deps, privilege};

const PORT: u16 = 8000;

/// Runs the demo.
pub fn run() -> Result<()> {
    if privilege::rerun_as_root(|| {
        deps::ensure(deps::DEMO)?;
        deps::build_binaries("release")
    })? {
        return Ok(());
    }
    deps::ensure(deps::DEMO)?;
    deps::build_binaries("release")?;

    let sandbox = Sandbox::with_daemon()?;
    let site = tempfile::tempdir()?;
    std::fs::write(
        site.path().join("hello.txt"),
        "hello from a parked server\n",
    )?;
    let port = PORT.to_string();

    println!(
        "== persist demo, in network namespace {}",
        sandbox.netns.name()
    );
    println!(
        "$ persist-agent add web --port {PORT} --ready http:/hello.txt --idle-timeout 2s -- {}",
        http_server_command(PORT, site.path()).join(" ")
    );
    let started = Instant::now();
    let command = http_server_command(PORT, site.path());
    let mut args = vec![
        "add",
        "web",
        "--port",
        &port,
        "--ready",
        "http:/hello.txt",
        "--idle-timeout",
        "2s",
        "--",
    ];
    args.extend(command.iter().map(String::as_str));
    let added = sandbox.agent_ok(&args)?;
    println!("{}", added.trim());
    println!(
        "(started python once, waited until it answered, snapshotted it and stopped it: {:.0} ms;",
        started.elapsed().as_secs_f64() * 1e3
    );
    println!(
        " readiness asks for the file, so that the snapshot already holds what python sets up"
    );
    println!(
        " on its first file request, its MIME types from /etc/mime.types: each wake would redo it, 3-6 ms)"
    );
    wait_until(Duration::from_secs(10), || {
        sandbox
            .service("web")
            .is_ok_and(|s| s["skeleton_pid"].is_i64())
    })
    .context("the parked skeleton did not appear")?;
    print_status(&sandbox)?;
    println!("No python process runs: the agent holds the port, the process is an image on disk");
    println!(
        "and a stopped skeleton whose memory is paged in only on the wake; the starred figure"
    );
    println!("is what the host pays for it while parked (docs/parked-cost.md):");
    let cost = &sandbox.service("web")?["parked_cost"];
    let kib = |part: &str| cost[part].as_u64().unwrap_or(0) / 1024;
    println!(
        "  {} KiB private memory of the skeleton (the pages python wrote in its libraries' data,",
        kib("private_bytes")
    );
    println!("    in place before it runs, each thread's stack top) and of the port keeper,");
    println!(
        "  {} KiB page tables, {} KiB kernel objects, and {} KiB the agent grew by (all of it,",
        kib("page_table_bytes"),
        kib("kernel_bytes"),
        kib("agent_share_bytes")
    );
    println!("    with one service; `cargo xtask bench --scale N` shows it per service for N).");

    println!(
        "\n-- first connection: restores the snapshot on the SYN and serves this very connection"
    );
    println!("   (the first wake from an image also records the pages it touches, one fault each:");
    println!("   the slowest wake; later ones copy those pages in ahead)");
    let (body, ttfb) = timed_get(&sandbox, "/hello.txt")?;
    let status = sandbox.service("web")?;
    println!("GET /hello.txt -> {}", body.trim());
    println!(
        "time to first byte {:.3} ms; SYN -> agent {} µs, skeleton resume {} µs, SYN -> running {} µs",
        ttfb.as_secs_f64() * 1e3,
        status["last_event_us"],
        status["last_resume_us"],
        status["last_wake_us"]
    );

    println!("\n-- second connection: python is running now");
    let (_, ttfb) = timed_get(&sandbox, "/hello.txt")?;
    println!("time to first byte {:.3} ms", ttfb.as_secs_f64() * 1e3);
    print_status(&sandbox)?;

    println!("\n-- no connection for 2 s: parked again, the port stays open");
    wait_until(Duration::from_secs(15), || {
        sandbox
            .service("web")
            .is_ok_and(|s| s["state"] == "parked" && s["skeleton_pid"].is_i64())
    })
    .context("the service did not park")?;
    print_status(&sandbox)?;

    println!(
        "\n-- a new connection wakes it again from the image, its recorded pages copied in ahead"
    );
    let (body, ttfb) = timed_get(&sandbox, "/hello.txt")?;
    println!(
        "GET /hello.txt -> {}   time to first byte {:.3} ms",
        body.trim(),
        ttfb.as_secs_f64() * 1e3
    );
    print_status(&sandbox)?;
    Ok(())
}

fn print_status(sandbox: &Sandbox) -> Result<()> {
    println!("$ persist-agent status");
    print!("{}", sandbox.agent_ok(&["status"])?);
    Ok(())
}

/// One GET of `path` from inside the namespace: the body and the time to its
/// first byte.
fn timed_get(sandbox: &Sandbox, path: &str) -> Result<(String, Duration)> {
    sandbox.netns.enter(|| -> Result<(String, Duration)> {
        let started = Instant::now();
        let mut stream = TcpStream::connect(("127.0.0.1", PORT))?;
        // One segment, as clients send a request: `write!` would send each
        // piece of the format on its own.
        stream.set_nodelay(true)?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
        let mut first = [0u8; 1];
        stream.read_exact(&mut first)?;
        let ttfb = started.elapsed();
        let mut rest = String::new();
        stream.read_to_string(&mut rest)?;
        let body = rest
            .split_once("\r\n\r\n")
            .map_or(rest.clone(), |(_, b)| b.to_owned());
        Ok((body, ttfb))
    })?
}
