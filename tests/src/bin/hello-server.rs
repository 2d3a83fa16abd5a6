//! A tiny HTTP server for demos, tests and benchmarks.
//!
//! It answers every request with `hello from pid PID` and closes the
//! connection. It takes its listening socket from systemd socket activation
//! (`LISTEN_FDS`/`LISTEN_PID`, fd 3) when given one, else binds the address in
//! its first argument (`127.0.0.1:8080` by default).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::FromRawFd;

fn main() {
    let listener = activated_listener().unwrap_or_else(|| {
        let addr = std::env::args()
            .nth(1)
            .unwrap_or_else(|| "127.0.0.1:8080".into());
        TcpListener::bind(&addr).unwrap_or_else(|err| {
            eprintln!("hello-server: cannot listen on {addr}: {err}");
            std::process::exit(1)
        })
    });
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => answer(stream),
            Err(err) => eprintln!("hello-server: accept: {err}"),
        }
    }
}

/// The socket passed by the systemd protocol, if this process was given one.
fn activated_listener() -> Option<TcpListener> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let fds: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if pid != std::process::id() || fds < 1 {
        return None;
    }
    // SAFETY: by the socket-activation protocol fd 3 is a listening socket
    // handed to this process, which nothing else in it owns.
    Some(unsafe { TcpListener::from_raw_fd(3) })
}

fn answer(mut stream: TcpStream) {
    let mut request = [0u8; 4096];
    let mut len = 0;
    // Read until the end of the request head (or the client stops sending).
    while len < request.len() {
        match stream.read(&mut request[len..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                len += n;
                if request[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    let body = format!("hello from pid {}\n", std::process::id());
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}
