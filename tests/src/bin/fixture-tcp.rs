//! Both ends of an established TCP connection holding unread data, for
//! checkpoint and restore tests.
//!
//! `fixture-tcp server DIR PORT` listens on 127.0.0.1:PORT with a small
//! receive buffer, accepts one connection, closes the listener and sends
//! [`TO_CLIENT`] bytes, which the client leaves unread. `fixture-tcp client
//! DIR PORT` connects and writes as much of [`TO_SERVER`] bytes as the
//! connection takes without blocking: the server does not read, so they
//! fill its receive queue and, past its window, the client's send queue.
//! Each writes `DIR/ROLE-ready` then waits for SIGUSR1.
//!
//! On SIGUSR1 each checks that its socket has the same addresses as before,
//! writes the rest of its bytes (on a thread) and reads every byte the
//! other side sends, checking their order. It writes `OK` or what went
//! wrong to `DIR/ROLE-result`, and sets `SO_LINGER` to zero so that a kill
//! then resets the connection instead of leaving it in TIME_WAIT.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{setsockopt, sockopt};

/// Bytes the server sends: they fit in the client's receive window.
const TO_CLIENT: usize = 20_000;
/// Bytes the client sends: more than the server's window takes.
const TO_SERVER: usize = 600_000;

/// The `index`th byte of the stream a side sends.
fn byte(seed: u8, index: usize) -> u8 {
    ((index * 7 + usize::from(seed)) % 251) as u8
}

fn stream(seed: u8, range: std::ops::Range<usize>) -> Vec<u8> {
    range.map(|index| byte(seed, index)).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, role, dir, port] = args.as_slice() else {
        eprintln!("usage: fixture-tcp server|client DIR PORT");
        std::process::exit(2);
    };
    let dir = PathBuf::from(dir);
    let port: u16 = port.parse().expect("a port number");
    // Blocked before anything else: SIGUSR1 is taken by sigwait below.
    let mut usr1 = SigSet::empty();
    usr1.add(Signal::SIGUSR1);
    usr1.thread_block().expect("blocking SIGUSR1");

    let (sock, seed, sends, receives) = match role.as_str() {
        "server" => (serve(port), b'S', TO_CLIENT, TO_SERVER),
        "client" => (connect(port), b'C', TO_SERVER, TO_CLIENT),
        other => panic!("unknown role {other}"),
    };
    sock.set_nonblocking(true).expect("non-blocking");
    let sent = send_what_fits(&sock, &stream(seed, 0..sends));
    let local = sock.local_addr().expect("local address");
    let peer = sock.peer_addr().expect("peer address");
    fs::write(
        dir.join(format!("{role}-ready")),
        format!("{local} {peer} {sent}\n"),
    )
    .expect("writing ready");

    usr1.wait().expect("waiting for SIGUSR1");
    let outcome = check(&sock, (local, peer), seed, sent..sends, receives);
    let result = outcome.err().unwrap_or_else(|| "OK".to_owned());
    let _ = setsockopt(
        &sock.as_fd(),
        sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
    write_result(&dir, role, &result);
    loop {
        std::thread::park();
    }
}

fn serve(port: u16) -> TcpStream {
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("binding the server");
    // Accepted connections inherit it: a small window fills fast.
    setsockopt(&listener.as_fd(), sockopt::RcvBuf, &16_384).expect("SO_RCVBUF");
    let (sock, _) = listener.accept().expect("accepting the client");
    sock
}

fn connect(port: u16) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(sock) => {
                // Small, so that the writes stop at a full window.
                setsockopt(&sock.as_fd(), sockopt::SndBuf, &32_768).expect("SO_SNDBUF");
                return sock;
            }
            Err(err) if Instant::now() < deadline => {
                eprintln!("fixture-tcp: connect: {err}, retrying");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(err) => panic!("connecting to port {port}: {err}"),
        }
    }
}

/// Writes `data` until the socket takes no more; returns how much it took.
fn send_what_fits(mut sock: &TcpStream, data: &[u8]) -> usize {
    let mut sent = 0;
    // A few tries: the peer's kernel acknowledges in the meantime.
    for _ in 0..50 {
        match sock.write(&data[sent..]) {
            Ok(0) => break,
            Ok(n) => sent += n,
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(err) => panic!("writing: {err}"),
        }
        if sent == data.len() {
            break;
        }
    }
    sent
}

/// The checks after a restore (or on a process never checkpointed).
fn check(
    sock: &TcpStream,
    addresses: (std::net::SocketAddr, std::net::SocketAddr),
    seed: u8,
    to_send: std::ops::Range<usize>,
    receives: usize,
) -> Result<(), String> {
    let now = (
        sock.local_addr()
            .map_err(|err| format!("getsockname: {err}"))?,
        sock.peer_addr()
            .map_err(|err| format!("getpeername: {err}"))?,
    );
    if now != addresses {
        return Err(format!("addresses {now:?}, were {addresses:?}"));
    }
    sock.set_nonblocking(false).map_err(|err| err.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|err| err.to_string())?;
    let mut writer = sock.try_clone().map_err(|err| err.to_string())?;
    let rest = stream(seed, to_send);
    let writing = std::thread::spawn(move || writer.write_all(&rest));

    let peer_seed = if seed == b'S' { b'C' } else { b'S' };
    let mut received = 0;
    let mut buf = vec![0u8; 65536];
    let mut reader = sock;
    while received < receives {
        let n = reader
            .read(&mut buf)
            .map_err(|err| format!("reading after {received} of {receives} bytes: {err}"))?;
        if n == 0 {
            return Err(format!(
                "end of stream after {received} of {receives} bytes"
            ));
        }
        for (offset, &got) in buf[..n].iter().enumerate() {
            let expected = byte(peer_seed, received + offset);
            if got != expected {
                return Err(format!(
                    "byte {} is {got}, expected {expected}",
                    received + offset
                ));
            }
        }
        received += n;
    }
    writing
        .join()
        .map_err(|_| "the writer panicked".to_owned())?
        .map_err(|err| format!("writing the rest: {err}"))
}

fn write_result(dir: &Path, role: &str, result: &str) {
    let path = dir.join(format!("{role}-result"));
    let temp = dir.join(format!("{role}-result.tmp"));
    fs::write(&temp, result).expect("writing the result");
    fs::rename(&temp, &path).expect("renaming the result");
}
