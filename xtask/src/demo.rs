//! `cargo xtask demo`: a bundled server parked behind its port, woken by a
//! connection, parked again when idle, in a network namespace of its own.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use persist_tests::{Sandbox, binary, wait_until};

use crate::deps;

const PORT: u16 = 8080;

/// Runs the demo.
pub fn run() -> Result<()> {
    deps::require_root()?;
    deps::ensure(deps::DEMO)?;
    deps::build_binaries("debug")?;

    let sandbox = Sandbox::with_daemon()?;
    println!(
        "== persist demo, in network namespace {}",
        sandbox.netns.name()
    );
    let server = binary("hello-server").display().to_string();
    println!("$ persist-agent add hello --port {PORT} --exec --idle-timeout 1s -- hello-server");
    println!(
        "{}",
        sandbox
            .agent_ok(&[
                "add",
                "hello",
                "--port",
                &PORT.to_string(),
                "--exec",
                "--idle-timeout",
                "1s",
                "--",
                &server,
            ])?
            .trim()
    );
    print_status(&sandbox)?;

    println!("\n-- first connection: the service is parked, no process runs");
    let (body, ttfb) = timed_get(&sandbox)?;
    let status = sandbox.service("hello")?;
    println!("answer: {}", body.trim());
    println!(
        "time to first byte: {:.3} ms   (SYN -> wake event in the agent: {} µs, SYN -> service running: {} µs)",
        ttfb.as_secs_f64() * 1e3,
        status["last_event_us"],
        status["last_wake_us"]
    );

    println!("\n-- second connection: the service is running now");
    let (body, ttfb) = timed_get(&sandbox)?;
    println!(
        "answer: {}   time to first byte: {:.3} ms",
        body.trim(),
        ttfb.as_secs_f64() * 1e3
    );
    print_status(&sandbox)?;

    println!("\n-- no connection for 1 s: the agent parks it again, keeping the port");
    wait_until(Duration::from_secs(10), || {
        sandbox
            .service("hello")
            .is_ok_and(|s| s["state"] == "parked")
    })
    .context("the service did not park")?;
    print_status(&sandbox)?;

    println!("\n-- a new connection wakes it again");
    let (body, ttfb) = timed_get(&sandbox)?;
    println!(
        "answer: {}   time to first byte: {:.3} ms",
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

/// One GET from inside the namespace: the body and the time to its first byte.
pub fn timed_get(sandbox: &Sandbox) -> Result<(String, Duration)> {
    sandbox.netns.enter(|| -> Result<(String, Duration)> {
        let started = Instant::now();
        let mut stream = TcpStream::connect(("127.0.0.1", PORT))?;
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
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
