//! A server listening through an `SO_REUSEPORT` group of two sockets on one
//! port, for checkpoint, restore and daemon tests.
//!
//! `fixture-reuseport ADDR:PORT` binds two TCP listeners to the address,
//! both with `SO_REUSEPORT` (the kernel makes them one group), and serves
//! both from one thread: each connection gets one line naming the member
//! that accepted it, `member INDEX fd FD pid PID`, and is closed. The
//! kernel spreads connections over the group's members by a hash of the
//! addresses, so a few dozen connections reach both.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};

/// Members of the group.
const MEMBERS: usize = 2;

fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into())
        .parse()
        .expect("an address and port");
    let listeners: Vec<TcpListener> = (0..MEMBERS).map(|_| member(addr)).collect();
    loop {
        let mut fds: Vec<PollFd> = listeners
            .iter()
            .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN))
            .collect();
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => panic!("poll: {err}"),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|fd| fd.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
            .collect();
        for (index, listener) in listeners.iter().enumerate() {
            if !ready[index] {
                continue;
            }
            // Non-blocking: another process of the group may have taken it.
            while let Ok((stream, _)) = listener.accept() {
                answer(stream, index, listener.as_raw_fd());
            }
        }
    }
}

/// One listener of the group, non-blocking.
fn member(addr: SocketAddr) -> TcpListener {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let sock = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).expect("socket");
    setsockopt(&sock, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    setsockopt(&sock, sockopt::ReusePort, &true).expect("SO_REUSEPORT");
    bind(sock.as_raw_fd(), &SockaddrStorage::from(addr))
        .unwrap_or_else(|err| panic!("binding {addr}: {err}"));
    listen(&sock, Backlog::new(128).expect("a backlog")).expect("listen");
    let listener = TcpListener::from(sock);
    listener.set_nonblocking(true).expect("non-blocking");
    listener
}

/// Reads what the client sent (a request line, or nothing) and answers
/// with the member that accepted it.
fn answer(mut stream: TcpStream, index: usize, fd: i32) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut request = [0u8; 512];
    let _ = stream.read(&mut request);
    let line = format!("member {index} fd {fd} pid {}\n", std::process::id());
    let _ = stream.write_all(line.as_bytes());
}
