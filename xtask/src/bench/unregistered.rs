//! What the agent's SYN watcher costs connections it does not care about:
//! the rate of short connections to a plain server on a port no service is
//! registered on, in a namespace where the agent's `sk_lookup` program is
//! attached (with every bench service registered) and in one where nothing
//! is attached.
//!
//! The two namespaces are measured in turns, several rounds each after one
//! warm-up round of each, so that whatever else loads the machine weighs on
//! both alike. Besides connections per second of wall time, each round
//! counts the CPU time the bench process spent (user and system: the
//! loopback handshake, the `sk_lookup` program included, runs in the
//! connecting and accepting threads), which other load on the machine
//! disturbs far less than the wall-time rate. Each connection is
//! a full handshake, one byte from the server, its close, and the client's
//! close by reset (`SO_LINGER` 0), so that no socket lingers in TIME_WAIT
//! and the run never runs out of local ports.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use persist_tests::NetNs;
use serde::Serialize;

/// The port of the plain server: below the scale bench's services.
pub const PORT: u16 = 19999;

/// Rounds per namespace, after one warm-up round each.
const ROUNDS: usize = 8;

/// How long each round makes connections.
const ROUND: Duration = Duration::from_secs(1);

/// Client threads making connections at once.
const CLIENTS: usize = 2;

/// Connections per second to a port no service is registered on.
#[derive(Debug, Clone, Serialize)]
pub struct UnregisteredRate {
    /// The port.
    pub port: u16,
    /// Each round with no agent attached to the namespace.
    pub without_agent: Vec<Round>,
    /// Each round with the agent's program attached and the scale bench's
    /// services registered.
    pub with_agent: Vec<Round>,
}

/// One round of connections.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Round {
    /// Connections made.
    pub connections: u64,
    /// Wall time, in seconds.
    pub wall_s: f64,
    /// CPU time the bench process spent, user and system, in seconds.
    pub cpu_s: f64,
}

impl Round {
    /// Connections per second of wall time.
    pub fn rate(&self) -> f64 {
        self.connections as f64 / self.wall_s
    }

    /// CPU time per connection, in microseconds.
    pub fn cpu_us(&self) -> f64 {
        self.cpu_s * 1e6 / self.connections.max(1) as f64
    }
}

impl UnregisteredRate {
    /// The median rate without the agent, connections per second.
    pub fn rate_without(&self) -> f64 {
        median(self.without_agent.iter().map(Round::rate))
    }

    /// The median rate with the agent.
    pub fn rate_with(&self) -> f64 {
        median(self.with_agent.iter().map(Round::rate))
    }

    /// The median CPU time per connection without the agent, in µs.
    pub fn cpu_us_without(&self) -> f64 {
        median(self.without_agent.iter().map(Round::cpu_us))
    }

    /// The median CPU time per connection with the agent, in µs.
    pub fn cpu_us_with(&self) -> f64 {
        median(self.with_agent.iter().map(Round::cpu_us))
    }
}

/// Measures the rate in `with_agent` (a namespace the agent watches) and in
/// a fresh namespace of its own, in turns.
pub fn measure(with_agent: &NetNs) -> Result<UnregisteredRate> {
    let plain = NetNs::new()?;
    let mut rate = UnregisteredRate {
        port: PORT,
        without_agent: Vec::new(),
        with_agent: Vec::new(),
    };
    for round in 0..=ROUNDS {
        // Alternate which goes first, so neither always follows the other.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for agent in order {
            let (netns, rates) = if agent {
                (with_agent, &mut rate.with_agent)
            } else {
                (&plain, &mut rate.without_agent)
            };
            let measured = netns.enter(|| connection_round(PORT, ROUND))??;
            eprintln!(
                "bench --scale: unregistered port, {} agent{}: {:.0} connections/s, {:.1} µs CPU each",
                if agent { "with" } else { "without" },
                if round == 0 { " (warm-up)" } else { "" },
                measured.rate(),
                measured.cpu_us(),
            );
            if round > 0 {
                rates.push(measured);
            }
        }
    }
    Ok(rate)
}

/// Runs a plain accept loop on `127.0.0.1:port` and `CLIENTS` clients
/// against it for `duration`, in the calling thread's namespace.
fn connection_round(port: u16, duration: Duration) -> Result<Round> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .with_context(|| format!("binding 127.0.0.1:{port}"))?;
    let address = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || serve(&listener, &stop))
    };
    let cpu_before = process_cpu_s()?;
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| std::thread::spawn(move || connect_until(address, started + duration)))
        .collect();
    let mut connections = 0u64;
    let mut failure = None;
    for client in clients {
        match client.join() {
            Ok(Ok(count)) => connections += count,
            Ok(Err(err)) => failure = Some(err),
            Err(_) => failure = Some(anyhow::anyhow!("a client panicked")),
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    let cpu_s = process_cpu_s()? - cpu_before;
    stop.store(true, Ordering::SeqCst);
    // Wakes the accept loop so that it sees the stop.
    let _ = TcpStream::connect(address);
    let served = server
        .join()
        .map_err(|_| anyhow::anyhow!("the server panicked"))??;
    if let Some(err) = failure {
        return Err(err);
    }
    if served < connections {
        bail!("the server accepted {served} connections, the clients made {connections}");
    }
    Ok(Round {
        connections,
        wall_s,
        cpu_s,
    })
}

/// User and system CPU time of this process so far, in seconds.
fn process_cpu_s() -> Result<f64> {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .context("getrusage")?;
    let seconds =
        |time: nix::sys::time::TimeVal| time.tv_sec() as f64 + time.tv_usec() as f64 / 1e6;
    Ok(seconds(usage.user_time()) + seconds(usage.system_time()))
}

/// Accepts, writes one byte and closes, until told to stop; returns how
/// many connections it served.
fn serve(listener: &TcpListener, stop: &AtomicBool) -> Result<u64> {
    let mut served = 0;
    loop {
        let (mut stream, _) = listener.accept().context("accept")?;
        if stop.load(Ordering::SeqCst) {
            return Ok(served);
        }
        // The client may have reset already; that is its business.
        let _ = stream.write_all(b"x");
        served += 1;
    }
}

/// Connects, reads the server's byte and its close, and resets the
/// connection, until `deadline`; returns how many connections it made.
fn connect_until(address: SocketAddr, deadline: Instant) -> Result<u64> {
    let mut count = 0;
    let mut byte = Vec::with_capacity(1);
    while Instant::now() < deadline {
        let mut stream =
            TcpStream::connect(address).with_context(|| format!("connecting to {address}"))?;
        byte.clear();
        stream
            .read_to_end(&mut byte)
            .with_context(|| format!("reading from {address}"))?;
        if byte != b"x" {
            bail!("{address} answered {byte:?}, not one byte x");
        }
        nix::sys::socket::setsockopt(
            &stream,
            nix::sys::socket::sockopt::Linger,
            &libc_linger_zero(),
        )
        .context("SO_LINGER")?;
        count += 1;
    }
    Ok(count)
}

/// `SO_LINGER` on with a zero timeout: close() resets the connection.
fn libc_linger_zero() -> nix::libc::linger {
    nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut sorted: Vec<f64> = values.collect();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}
