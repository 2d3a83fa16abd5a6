//! The bench's client: one request, timed from the start of connect() to the
//! first byte of the answer (for PostgreSQL: to the row of `SELECT 1`), and
//! checked to be a real answer.

mod postgres;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long a request may take before the bench gives up on it.
const TIMEOUT: Duration = Duration::from_secs(30);

/// How often a client retries connect() while a freshly started server has
/// not yet bound its port.
const CONNECT_RETRY: Duration = Duration::from_micros(100);

/// What a server is asked and how its answer must begin.
#[derive(Debug, Clone, Copy)]
pub enum Probe {
    /// `GET /` over HTTP/1.0; the server answers and closes.
    Http,
    /// Redis `PING`, answered by `+PONG`.
    RedisPing,
    /// PostgreSQL over the wire as user and database `postgres` (trusted):
    /// the startup, then `SELECT 1`, answered by a row holding `1`. The
    /// time is taken when the row arrives, a backend's start included.
    PostgresSelect,
}

impl Probe {
    fn request(self) -> Vec<u8> {
        match self {
            Self::Http => b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n".to_vec(),
            Self::RedisPing => b"PING\r\n".to_vec(),
            Self::PostgresSelect => postgres::startup_message("postgres", "postgres"),
        }
    }

    fn expected(self) -> &'static [u8] {
        match self {
            Self::Http => b"HTTP/1.",
            Self::RedisPing => b"+PONG\r\n",
            // Checked by the protocol's own reading.
            Self::PostgresSelect => b"",
        }
    }
}

/// One request on `127.0.0.1:port`: the time from connect() to the first byte.
pub fn request(port: u16, probe: Probe) -> Result<Duration> {
    let started = Instant::now();
    let stream = connect(port)?;
    exchange(stream, probe, started, || Ok(()))
}

/// Like [`request`], but runs `before_read` between sending the request and
/// reading the answer (the frozen mode's SIGCONT).
pub fn request_with(
    port: u16,
    probe: Probe,
    before_read: impl FnOnce() -> Result<()>,
) -> Result<Duration> {
    let started = Instant::now();
    let stream = connect(port)?;
    exchange(stream, probe, started, before_read)
}

/// One request to a server started at `started`: connect() is retried every
/// 100 µs while nothing listens yet (and, for PostgreSQL, while it answers
/// that it is starting up); the time is counted from `started`.
pub fn request_when_up(port: u16, probe: Probe, started: Instant) -> Result<Duration> {
    loop {
        let stream = connect_when_up(port, started)?;
        match exchange(stream, probe, started, || Ok(())) {
            Err(err) if starting_up(&err) && started.elapsed() < TIMEOUT => {
                std::thread::sleep(CONNECT_RETRY);
            }
            answer => return answer,
        }
    }
}

/// Whether `err` is a PostgreSQL server saying it cannot serve yet.
fn starting_up(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<postgres::ServerError>()
            .is_some_and(|server| server.code == postgres::CANNOT_CONNECT_NOW)
    })
}

/// A connection to `port`, retried every 100 µs while nothing listens.
fn connect_when_up(port: u16, started: Instant) -> Result<TcpStream> {
    let stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => break stream,
            Err(err) if err.kind() == ErrorKind::ConnectionRefused => {
                if started.elapsed() > TIMEOUT {
                    bail!("nothing listened on 127.0.0.1:{port} within {TIMEOUT:?}");
                }
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(err) => return Err(err).with_context(|| format!("connecting to 127.0.0.1:{port}")),
        }
    };
    Ok(stream)
}

fn connect(port: u16) -> Result<TcpStream> {
    TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))
}

fn exchange(
    mut stream: TcpStream,
    probe: Probe,
    started: Instant,
    before_read: impl FnOnce() -> Result<()>,
) -> Result<Duration> {
    let port = stream.peer_addr()?.port();
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_nodelay(true)?;
    stream
        .write_all(&probe.request())
        .with_context(|| format!("sending to port {port}"))?;
    before_read()?;
    if let Probe::PostgresSelect = probe {
        let mut answered = None;
        postgres::select_one(&mut stream, || answered = Some(started.elapsed()))
            .with_context(|| format!("PostgreSQL on port {port}"))?;
        return answered.context("no row came");
    }
    let mut answer = vec![0u8; 1];
    stream
        .read_exact(&mut answer)
        .with_context(|| format!("waiting for the first byte from port {port}"))?;
    let first_byte = started.elapsed();
    read_rest(&mut stream, probe, &mut answer)
        .with_context(|| format!("reading the answer from port {port}"))?;
    if !answer.starts_with(probe.expected()) {
        bail!(
            "port {port} answered {:?}, expected it to begin with {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(80)]),
            String::from_utf8_lossy(probe.expected())
        );
    }
    Ok(first_byte)
}

/// Reads the rest of the answer: to the end for HTTP/1.0, one line for Redis.
fn read_rest(stream: &mut TcpStream, probe: Probe, answer: &mut Vec<u8>) -> std::io::Result<()> {
    match probe {
        Probe::Http => stream.read_to_end(answer).map(drop),
        Probe::PostgresSelect => Ok(()),
        Probe::RedisPing => {
            let mut byte = [0u8; 1];
            while !answer.ends_with(b"\r\n") {
                if stream.read(&mut byte)? == 0 {
                    break;
                }
                answer.push(byte[0]);
            }
            Ok(())
        }
    }
}
