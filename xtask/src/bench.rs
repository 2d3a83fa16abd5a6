//! `cargo xtask bench`: wake latencies and time to first byte, in one run, on
//! this machine. Timings on a 2-core VM are noisy: read the ratios between
//! rows measured together, not the absolute numbers.

use std::time::Duration;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use anyhow::{Context, Result};
use persist_tests::{Sandbox, binary};
use serde::Serialize;

use crate::deps;

/// Latency samples of one measured quantity, in microseconds.
#[derive(Debug, Serialize)]
struct Series {
    name: String,
    samples_us: Vec<f64>,
}

impl Series {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            samples_us: Vec::new(),
        }
    }

    fn push(&mut self, duration: Duration) {
        self.samples_us.push(duration.as_secs_f64() * 1e6);
    }

    fn percentile(&self, fraction: f64) -> f64 {
        let mut sorted = self.samples_us.clone();
        sorted.sort_by(f64::total_cmp);
        if sorted.is_empty() {
            return f64::NAN;
        }
        let rank = ((sorted.len() - 1) as f64 * fraction).round() as usize;
        sorted[rank]
    }
}

/// Runs the benchmark and prints a Markdown table.
pub fn run(quick: bool) -> Result<()> {
    deps::require_root()?;
    deps::ensure(deps::TEST)?;
    deps::build_binaries("release")?;
    let runs = if quick { 30 } else { 200 };

    let sandbox = Sandbox::with_daemon()?;
    let server = binary("hello-server").display().to_string();
    sandbox.agent_ok(&["add", "hello", "--port", "8080", "--exec", "--", &server])?;

    let mut event = Series::new("SYN -> wake event read by the agent");
    let mut running = Series::new("SYN -> service process running (--exec)");
    let mut cold = Series::new("time to first byte, parked (--exec fresh start)");
    let mut warm = Series::new("time to first byte, already running");
    eprintln!("bench: {runs} cold starts of hello-server");
    for run in 0..runs {
        sandbox.agent_ok(&["park", "hello"])?;
        let (_, ttfb) = timed_get(&sandbox)?;
        cold.push(ttfb);
        let status = sandbox.service("hello")?;
        let micros = |key: &str| {
            status[key]
                .as_u64()
                .map(Duration::from_micros)
                .with_context(|| format!("status lacks {key}: {status}"))
        };
        event.push(micros("last_event_us")?);
        running.push(micros("last_wake_us")?);
        if run % 20 == 19 {
            eprintln!("bench: {}/{runs}", run + 1);
        }
    }
    eprintln!("bench: {runs} requests to the running service");
    for _ in 0..runs {
        let (_, ttfb) = timed_get(&sandbox)?;
        warm.push(ttfb);
    }

    let series = [event, running, warm, cold];
    println!("| measurement | median | p99 | runs |");
    println!("|---|---:|---:|---:|");
    for s in &series {
        println!(
            "| {} | {:.1} µs | {:.1} µs | {} |",
            s.name,
            s.percentile(0.5),
            s.percentile(0.99),
            s.samples_us.len()
        );
    }
    let out_dir = deps::workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join("socket-activation.json");
    std::fs::write(&out, serde_json::to_vec_pretty(&series)?)?;
    eprintln!("bench: raw samples in {}", out.display());
    Ok(())
}

/// One `GET /` to port 8080 from inside the namespace: the time to the first byte.
fn timed_get(sandbox: &Sandbox) -> Result<((), Duration)> {
    sandbox.netns.enter(|| -> Result<((), Duration)> {
        let started = Instant::now();
        let mut stream = TcpStream::connect(("127.0.0.1", 8080))?;
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let mut first = [0u8; 1];
        stream.read_exact(&mut first)?;
        let ttfb = started.elapsed();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest)?;
        Ok(((), ttfb))
    })?
}
