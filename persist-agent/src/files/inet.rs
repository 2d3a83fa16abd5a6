//! IP sockets: TCP listeners and UDP sockets, both directions; closed TCP
//! sockets (created or bound, not listening) are in `tcp_socket.rs`.
//!
//! Saved: address, backlog and the options that matter of a TCP listener;
//! address, connected peer and options of a UDP socket. A TCP connection is
//! refused, naming its state and peer. Restored: bound again to the same
//! address (and listening, or connected to the same peer).

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage};
use persist_common::image::{FdKind, SocketOption};

use super::FilesError;
use super::sockopts::{self, Protocol};
use super::tcp_socket;
use crate::sys::kobjects;

/// `TCP_ESTABLISHED` .. `TCP_CLOSING` names, indexed by `tcpi_state`.
const TCP_STATES: [&str; 13] = [
    "unknown",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

/// `tcpi_state` of a socket neither listening nor connected.
const TCP_CLOSE: u8 = 7;

/// Integer options of a TCP listener worth keeping: accepted connections
/// inherit the first five; the last two change how it accepts.
const LISTENER_OPTIONS: [(i32, i32, &str); 7] = [
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE, "SO_KEEPALIVE"),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY, "TCP_NODELAY"),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, "TCP_KEEPIDLE"),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, "TCP_KEEPINTVL"),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, "TCP_KEEPCNT"),
    (
        libc::IPPROTO_TCP,
        libc::TCP_DEFER_ACCEPT,
        "TCP_DEFER_ACCEPT",
    ),
    (libc::IPPROTO_TCP, libc::TCP_FASTOPEN, "TCP_FASTOPEN"),
];

pub(super) fn inet_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6((*v6).into()))
}

pub(super) fn save(
    fd: i32,
    sock: BorrowedFd<'_>,
    domain: i32,
    socket_type: i32,
    protocol: i32,
    listening: bool,
    inode: u64,
) -> Result<FdKind, FilesError> {
    let local = nix::sys::socket::getsockname::<SockaddrStorage>(sock.as_raw_fd())
        .map_err(FilesError::io(fd, "getsockname"))?;
    let local_addr = inet_addr(&local);
    let local = local_addr.map_or_else(|| "?".to_owned(), |a| a.to_string());
    let flag = |level, name, what: &str| {
        kobjects::sockopt_int(sock, level, name)
            .map(|v| v != 0)
            .map_err(FilesError::io(fd, format!("getsockopt {what}")))
    };
    let v6only =
        domain == libc::AF_INET6 && flag(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, "IPV6_V6ONLY")?;
    match (socket_type, protocol) {
        (libc::SOCK_STREAM, libc::IPPROTO_TCP) => {}
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => {
            let peer = nix::sys::socket::getpeername::<SockaddrStorage>(sock.as_raw_fd())
                .ok()
                .and_then(|p| inet_addr(&p))
                .map(|p| p.to_string());
            return Ok(FdKind::UdpSocket {
                local,
                peer,
                reuseaddr: flag(libc::SOL_SOCKET, libc::SO_REUSEADDR, "SO_REUSEADDR")?,
                reuseport: flag(libc::SOL_SOCKET, libc::SO_REUSEPORT, "SO_REUSEPORT")?,
                v6only,
                options: sockopts::save(fd, sock, Protocol::Udp)?,
            });
        }
        (libc::SOCK_RAW, _) => {
            return Err(FilesError::unsupported(
                fd,
                format!("raw IP socket {local} is not supported"),
            ));
        }
        _ => {
            return Err(FilesError::unsupported(
                fd,
                format!(
                    "IP socket {local} of type {socket_type}, protocol {protocol} is not supported"
                ),
            ));
        }
    }
    let (state, max_backlog) =
        kobjects::tcp_state(sock).map_err(FilesError::io(fd, "getsockopt TCP_INFO"))?;
    if !listening {
        if state == TCP_CLOSE
            && let Some(local) = local_addr
        {
            return tcp_socket::save(fd, sock, local);
        }
        let state_name = TCP_STATES
            .get(usize::from(state))
            .copied()
            .unwrap_or("unknown");
        let peer = nix::sys::socket::getpeername::<SockaddrStorage>(sock.as_raw_fd())
            .ok()
            .and_then(|p| inet_addr(&p));
        return Err(FilesError::unsupported(
            fd,
            match (state_name, peer) {
                ("ESTABLISHED", Some(peer)) => {
                    format!("established TCP connection {local} -> {peer} cannot be checkpointed")
                }
                (_, Some(peer)) => format!(
                    "TCP connection {local} -> {peer} in state {state_name} cannot be checkpointed"
                ),
                (_, None) => {
                    format!("TCP socket {local} in state {state_name} cannot be checkpointed")
                }
            },
        ));
    }
    let reuseaddr = flag(libc::SOL_SOCKET, libc::SO_REUSEADDR, "SO_REUSEADDR")?;
    let reuseport = flag(libc::SOL_SOCKET, libc::SO_REUSEPORT, "SO_REUSEPORT")?;
    // TCP_INFO reports sk_max_ack_backlog for listeners; 0 would be odd but
    // harmless, so fall back to the system maximum.
    let backlog = if max_backlog == 0 {
        libc::SOMAXCONN as u32
    } else {
        max_backlog
    };
    let mut options = Vec::new();
    for (level, name, what) in LISTENER_OPTIONS {
        let value = kobjects::sockopt_int(sock, level, name)
            .map_err(FilesError::io(fd, format!("getsockopt {what}")))?;
        if value != 0 {
            options.push(SocketOption { level, name, value });
        }
    }
    // The owner decides which SO_REUSEPORT group the listener can join.
    let owner_uid = nix::sys::stat::fstat(sock)
        .map_err(FilesError::io(fd, "fstat of the TCP listener"))?
        .st_uid;
    Ok(FdKind::TcpListener {
        local,
        inode,
        backlog,
        reuseaddr,
        reuseport,
        v6only,
        options,
        owner_uid: Some(owner_uid),
    })
}

/// A TCP listener bound again to `local` and listening, owned by
/// `owner_uid` (root when the image did not say): with `reuseport`, it
/// joins the `SO_REUSEPORT` group of the other listeners of that port and
/// owner, which the kernel forms at `bind`.
pub(super) fn tcp_listener(
    fd: i32,
    local: &str,
    backlog: u32,
    reuseport: bool,
    v6only: bool,
    options: &[SocketOption],
    owner_uid: Option<u32>,
) -> Result<OwnedFd, FilesError> {
    let addr: SocketAddr = local
        .parse()
        .map_err(|_| FilesError::invalid(fd, format!("bad TCP listener address {local:?}")))?;
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let action = |what: &str| format!("{what} for TCP listener {local}");
    let sock = nix::sys::socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(FilesError::io(fd, action("socket")))?;
    let set = |level, name, value: bool, what: &str| {
        kobjects::set_sockopt_int(sock.as_fd(), level, name, i32::from(value))
            .map_err(FilesError::io(fd, action(what)))
    };
    set(libc::SOL_SOCKET, libc::SO_REUSEADDR, true, "SO_REUSEADDR")?;
    if reuseport {
        set(libc::SOL_SOCKET, libc::SO_REUSEPORT, true, "SO_REUSEPORT")?;
    }
    if addr.is_ipv6() {
        set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, v6only, "IPV6_V6ONLY")?;
    }
    // Before the bind, which puts a SO_REUSEPORT listener in the group of
    // its owner's: the socket's owner is its creator's (the agent's) until
    // changed, and fchown of a socket changes the owner the kernel groups by.
    if let Some(uid) = owner_uid {
        nix::unistd::fchown(&sock, Some(nix::unistd::Uid::from_raw(uid)), None).map_err(
            FilesError::io(fd, action(&format!("giving it to its owner uid {uid}"))),
        )?;
    }
    nix::sys::socket::bind(sock.as_raw_fd(), &SockaddrStorage::from(addr))
        .map_err(FilesError::io(fd, format!("binding TCP listener {local}")))?;
    for option in options {
        kobjects::set_sockopt_int(sock.as_fd(), option.level, option.name, option.value).map_err(
            FilesError::io(
                fd,
                format!(
                    "setsockopt {}/{} for TCP listener {local}",
                    option.level, option.name
                ),
            ),
        )?;
    }
    listen(fd, &sock, backlog, local)?;
    Ok(sock)
}

/// A UDP socket bound again to its address (if it had one) and connected
/// again to its peer (if it had one).
pub(super) fn udp_socket(
    fd: i32,
    local: &str,
    peer: Option<&str>,
    reuseaddr: bool,
    reuseport: bool,
    v6only: bool,
    options: &[SocketOption],
) -> Result<OwnedFd, FilesError> {
    let parse = |text: &str| {
        text.parse::<SocketAddr>()
            .map_err(|_| FilesError::invalid(fd, format!("bad UDP address {text:?}")))
    };
    let addr = parse(local)?;
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let sock = nix::sys::socket::socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(FilesError::io(fd, format!("socket for UDP socket {local}")))?;
    let set = |level, name, value: bool, what: &str| {
        kobjects::set_sockopt_int(sock.as_fd(), level, name, i32::from(value))
            .map_err(FilesError::io(fd, format!("{what} for UDP socket {local}")))
    };
    set(
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        reuseaddr,
        "SO_REUSEADDR",
    )?;
    set(
        libc::SOL_SOCKET,
        libc::SO_REUSEPORT,
        reuseport,
        "SO_REUSEPORT",
    )?;
    if addr.is_ipv6() {
        set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, v6only, "IPV6_V6ONLY")?;
    }
    sockopts::restore(
        fd,
        sock.as_fd(),
        options,
        None,
        &format!("UDP socket {local}"),
    )?;
    // Port 0: the socket was never bound (or only implicitly, by connect).
    if addr.port() != 0 {
        nix::sys::socket::bind(sock.as_raw_fd(), &SockaddrStorage::from(addr))
            .map_err(FilesError::io(fd, format!("binding UDP socket {local}")))?;
    }
    if let Some(peer) = peer {
        let peer_addr = parse(peer)?;
        nix::sys::socket::connect(sock.as_raw_fd(), &SockaddrStorage::from(peer_addr)).map_err(
            FilesError::io(fd, format!("connecting UDP socket {local} to {peer}")),
        )?;
    }
    Ok(sock)
}

pub(super) fn listen(fd: i32, sock: &OwnedFd, backlog: u32, name: &str) -> Result<(), FilesError> {
    let backlog = i32::try_from(backlog)
        .unwrap_or(i32::MAX)
        .min(libc::SOMAXCONN);
    let backlog = Backlog::new(backlog).unwrap_or(Backlog::MAXCONN);
    nix::sys::socket::listen(sock, backlog).map_err(FilesError::io(fd, format!("listen on {name}")))
}
