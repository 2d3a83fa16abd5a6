//! A small HTTP server on tokio's multi-threaded runtime, for tests: a
//! server written the way most Rust services are (epoll, an eventfd waker,
//! worker threads parked on futexes, tasks spawned per connection).
//!
//! It answers every request with `request N from pid PID`, counting the
//! requests it has served, and closes the connection. It binds the address
//! in its first argument (`127.0.0.1:8080` by default).

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Requests served since the process started: state a park with
/// `--on-idle keep` must carry over.
static SERVED: AtomicU64 = AtomicU64::new(0);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let listener = TcpListener::bind(&addr).await.unwrap_or_else(|err| {
        eprintln!("tokio-server: cannot listen on {addr}: {err}");
        std::process::exit(1)
    });
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream));
            }
            Err(err) => eprintln!("tokio-server: accept: {err}"),
        }
    }
}

async fn answer(mut stream: TcpStream) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let served = SERVED.fetch_add(1, Ordering::Relaxed) + 1;
    let body = format!("request {served} from pid {}\n", std::process::id());
    let reply = format!(
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
}
