//! Established TCP connections, saved and re-created with `TCP_REPAIR`.
//!
//! Checkpoint ([`save`]): the agent's copy of the socket (`pidfd_getfd`) is
//! put in repair mode, where the kernel lets us read the sequence numbers
//! (`TCP_QUEUE_SEQ` of each queue), the data of both queues (`MSG_PEEK`),
//! the windows (`TCP_REPAIR_WINDOW`), the timestamp clock (`TCP_TIMESTAMP`)
//! and the segment size (`TCP_MAXSEG` answers `mss_clamp`); `TCP_INFO`
//! gives the options negotiated at the handshake. The socket stays in
//! repair mode, held in [`RepairedConnections`], until the checkpoint ends:
//! closed in repair mode once the process is killed (the kernel then drops
//! the connection without a FIN or RST reaching the peer), or taken out of
//! repair mode if the process goes on.
//!
//! Restore ([`create`], then [`finish`]): a new socket in repair mode is
//! bound to the same address (repair mode forces address reuse), given the
//! sequence numbers, "connected" (in repair mode this only sets the state,
//! nothing is sent), given the negotiated options and timestamp clock, its
//! queues refilled and its windows set. [`finish`] then takes it out of
//! repair mode without the window probe CRIU lets the kernel send (a probe
//! to a peer restored after us would be answered with a reset), sends what
//! was never sent and sets the ordinary options.
//!
//! docs/tcp-repair.md has the kernel's rules and what CRIU does differently.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, SockaddrStorage};
use persist_common::image::{FdKind, TcpConnection, TcpWindow};

use super::FilesError;
use super::inet::inet_addr;
use super::sockopts::{self, Protocol};
use crate::sys::kobjects;
use crate::sys::pidfd::PidFd;
use crate::sys::tcp_repair::{self as repair, RepairWindow};

/// `tcpi_state` of an established connection.
pub(super) const TCP_ESTABLISHED: u8 = 1;

/// Reads of the receive queue's end and size before giving up on a peer
/// that keeps sending.
const READ_TRIES: usize = 100;

/// Largest window scale shift TCP allows (RFC 7323).
const MAX_WINDOW_SCALE: u8 = 14;

/// `TCP_REPAIR` value that turns repair mode on.
const REPAIR_ON: i32 = 1;
/// `TCP_REPAIR_QUEUE` value selecting no queue.
const NO_QUEUE: i32 = 0;

/// Established connections of a frozen process, held by the agent in repair
/// mode from [`save`] until the checkpoint ends.
///
/// Call [`Self::close_silently`] once the process is gone, or
/// [`Self::resume`] when it goes on; dropped otherwise, the sockets leave
/// repair mode (a failed checkpoint leaves the process running as it was).
#[derive(Debug, Default)]
pub struct RepairedConnections {
    held: Vec<Held>,
}

/// One socket in repair mode.
#[derive(Debug)]
struct Held {
    /// Its number in the process.
    fd: i32,
    /// The agent's copy.
    sock: OwnedFd,
    /// `SO_REUSEADDR` before repair mode forced reuse.
    reuseaddr: bool,
}

impl RepairedConnections {
    /// No connections held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Adds the connections `other` holds (those of another process of a
    /// tree) to these.
    pub fn extend(&mut self, mut other: RepairedConnections) {
        self.held.append(&mut other.held);
    }

    /// The descriptor numbers, in the process, of the connections held.
    pub fn fds(&self) -> Vec<i32> {
        self.held.iter().map(|held| held.fd).collect()
    }

    /// Closes the agent's copies while still in repair mode: called once the
    /// process is gone, this ends each connection here without a FIN or RST
    /// reaching the peer, which keeps its side for the restored process.
    pub fn close_silently(mut self) {
        self.held.clear();
    }

    /// Takes every socket out of repair mode again, for a process that goes
    /// on: no window probe is sent, and `SO_REUSEADDR` is put back (leaving
    /// repair mode clears it). Every socket is tried; the first error is
    /// returned.
    pub fn resume(mut self) -> Result<(), FilesError> {
        let mut first_error = None;
        for held in std::mem::take(&mut self.held) {
            if let Err(err) = leave_repair(&held)
                && first_error.is_none()
            {
                first_error = Some(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for RepairedConnections {
    fn drop(&mut self) {
        for held in std::mem::take(&mut self.held) {
            if let Err(err) = leave_repair(&held) {
                tracing::warn!("{err}");
            }
        }
    }
}

/// Takes every TCP socket of process `pid` that is in repair mode out of
/// it: after an agent died while it held the process's connections so,
/// before the process runs again. `SO_REUSEADDR`, which leaving repair mode
/// clears, cannot be put back (the dead agent knew it); an established
/// connection only needs it to share its port with a new bind. Returns how
/// many sockets were in repair mode.
pub fn leave_repair_mode_of(pid: i32, pidfd: &PidFd) -> Result<usize, FilesError> {
    let fds = procfs::process::Process::new(pid)
        .and_then(|process| process.fd())
        .map_err(|source| FilesError::Proc {
            pid,
            path: format!("/proc/{pid}/fd"),
            source: std::io::Error::other(source),
        })?;
    let mut repaired = 0;
    for entry in fds.flatten() {
        if !matches!(entry.target, procfs::process::FDTarget::Socket(_)) {
            continue;
        }
        let fd = entry.fd;
        let Ok(sock) = pidfd.get_fd(fd) else {
            continue; // closed since the listing
        };
        let int = |level, name| kobjects::sockopt_int(sock.as_fd(), level, name).ok();
        let tcp = matches!(
            int(libc::SOL_SOCKET, libc::SO_DOMAIN),
            Some(libc::AF_INET | libc::AF_INET6)
        ) && int(libc::SOL_SOCKET, libc::SO_PROTOCOL) == Some(libc::IPPROTO_TCP);
        if tcp && int(libc::IPPROTO_TCP, libc::TCP_REPAIR) == Some(REPAIR_ON) {
            kobjects::set_sockopt_int(
                sock.as_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_REPAIR,
                repair::REPAIR_OFF_NO_WINDOW_PROBE,
            )
            .map_err(FilesError::io(fd, "leaving TCP repair mode"))?;
            repaired += 1;
        }
    }
    Ok(repaired)
}

fn leave_repair(held: &Held) -> Result<(), FilesError> {
    let sock = held.sock.as_fd();
    kobjects::set_sockopt_int(
        sock,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR,
        repair::REPAIR_OFF_NO_WINDOW_PROBE,
    )
    .map_err(FilesError::io(held.fd, "leaving TCP repair mode"))?;
    kobjects::set_sockopt_int(
        sock,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        i32::from(held.reuseaddr),
    )
    .map_err(FilesError::io(held.fd, "setting SO_REUSEADDR back"))
}

/// Saves the established connection `sock` (descriptor `fd` of a frozen
/// process), leaving it in repair mode in `held`.
pub(super) fn save(
    fd: i32,
    sock: BorrowedFd<'_>,
    domain: i32,
    held: &mut RepairedConnections,
) -> Result<FdKind, FilesError> {
    let address = |name: Result<SockaddrStorage, nix::Error>, what: &str| {
        name.map_err(FilesError::io(fd, what.to_owned()))
            .and_then(|addr| {
                inet_addr(&addr).ok_or_else(|| {
                    FilesError::unsupported(fd, format!("{what}: not an IP address"))
                })
            })
    };
    let local = address(
        nix::sys::socket::getsockname(sock.as_raw_fd()),
        "getsockname",
    )?;
    let peer = address(
        nix::sys::socket::getpeername(sock.as_raw_fd()),
        "getpeername",
    )?;
    let what = |action: &str| format!("{action} of TCP connection {local} -> {peer}");
    let int = |level, name, option: &str| {
        kobjects::sockopt_int(sock, level, name)
            .map_err(FilesError::io(fd, what(&format!("getsockopt {option}"))))
    };
    // Read before repair mode, which forces address reuse.
    let reuseaddr = int(libc::SOL_SOCKET, libc::SO_REUSEADDR, "SO_REUSEADDR")? != 0;
    let copy = sock
        .try_clone_to_owned()
        .map_err(FilesError::io(fd, what("duplicating")))?;
    kobjects::set_sockopt_int(sock, libc::IPPROTO_TCP, libc::TCP_REPAIR, REPAIR_ON)
        .map_err(FilesError::io(fd, what("entering repair mode")))?;
    held.held.push(Held {
        fd,
        sock: copy,
        reuseaddr,
    });

    let negotiated = repair::negotiated(sock).map_err(FilesError::io(fd, what("TCP_INFO")))?;
    if negotiated.state != TCP_ESTABLISHED {
        return Err(FilesError::unsupported(
            fd,
            format!("TCP connection {local} -> {peer} closed while it was saved"),
        ));
    }
    let set_queue = |queue: i32| {
        kobjects::set_sockopt_int(sock, libc::IPPROTO_TCP, libc::TCP_REPAIR_QUEUE, queue)
            .map_err(FilesError::io(fd, what("selecting a repair queue")))
    };
    let queue_seq = || int(libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ");

    // The process is frozen: only the network changes the socket now. Data
    // arriving moves the end of the receive queue, so its size and end are
    // read until they agree.
    set_queue(repair::RECV_QUEUE)?;
    let mut agreed = None;
    for _ in 0..READ_TRIES {
        let before = queue_seq()?;
        let sizes = repair::queue_sizes(sock).map_err(FilesError::io(fd, what("queue sizes")))?;
        if queue_seq()? == before {
            agreed = Some((before as u32, sizes));
            break;
        }
    }
    let (recv_end, sizes) = agreed.ok_or_else(|| {
        FilesError::unsupported(
            fd,
            format!(
                "{}: data kept arriving while it was read",
                what("receive queue")
            ),
        )
    })?;
    let recv_queue = peek_queue(fd, sock, sizes.inq as usize, &what)?;
    if recv_queue.len() != sizes.inq as usize {
        return Err(FilesError::unsupported(
            fd,
            format!(
                "{}: {} bytes queued, {} read",
                what("receive queue"),
                sizes.inq,
                recv_queue.len()
            ),
        ));
    }
    // Acknowledgements can only shrink the send queue from its start; its
    // end (`write_seq`) stays, so the bytes read end there.
    set_queue(repair::SEND_QUEUE)?;
    let send_end = queue_seq()? as u32;
    let send_queue = peek_queue(fd, sock, sizes.outq as usize, &what)?;
    set_queue(NO_QUEUE)?;
    let send_unsent = sizes.outq_unsent.min(send_queue.len() as u32);

    let mss = int(libc::IPPROTO_TCP, libc::TCP_MAXSEG, "TCP_MAXSEG")? as u32;
    let timestamp = if negotiated.options & repair::TCPI_OPT_TIMESTAMPS != 0 {
        Some(int(libc::IPPROTO_TCP, libc::TCP_TIMESTAMP, "TCP_TIMESTAMP")? as u32)
    } else {
        None
    };
    let window = repair::window(sock).map_err(FilesError::io(fd, what("TCP_REPAIR_WINDOW")))?;
    let buffers = (
        int(libc::SOL_SOCKET, libc::SO_SNDBUF, "SO_SNDBUF")? as u32,
        int(libc::SOL_SOCKET, libc::SO_RCVBUF, "SO_RCVBUF")? as u32,
    );
    let v6only =
        domain == libc::AF_INET6 && int(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, "IPV6_V6ONLY")? != 0;
    // The options any TCP socket keeps (timeouts included), set again once
    // the connection leaves repair mode. Its buffer sizes are its own
    // (`buffers`), set before its queues are refilled: a locked size from
    // the common options would shrink them under the refilled data.
    let options: Vec<_> = sockopts::save(fd, sock, Protocol::Tcp)?
        .into_iter()
        .filter(|option| {
            option.level != libc::SOL_SOCKET
                || !matches!(option.name, libc::SO_SNDBUFFORCE | libc::SO_RCVBUFFORCE)
        })
        .collect();
    Ok(FdKind::TcpConnection(TcpConnection {
        local: local.to_string(),
        peer: peer.to_string(),
        send_seq: send_end.wrapping_sub(send_queue.len() as u32),
        recv_seq: recv_end.wrapping_sub(recv_queue.len() as u32),
        send_unsent,
        send_queue,
        recv_queue,
        mss,
        window_scale: (negotiated.options & repair::TCPI_OPT_WSCALE != 0)
            .then_some((negotiated.snd_wscale, negotiated.rcv_wscale)),
        sack: negotiated.options & repair::TCPI_OPT_SACK != 0,
        timestamp,
        window: TcpWindow {
            snd_wl1: window.snd_wl1,
            snd_wnd: window.snd_wnd,
            max_window: window.max_window,
            rcv_wnd: window.rcv_wnd,
            rcv_wup: window.rcv_wup,
        },
        buffers,
        reuseaddr,
        v6only,
        options,
    }))
}

/// Up to `len` bytes of the selected queue, without consuming them.
fn peek_queue(
    fd: i32,
    sock: BorrowedFd<'_>,
    len: usize,
    what: &impl Fn(&str) -> String,
) -> Result<Vec<u8>, FilesError> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let mut data = vec![0u8; len];
    let read = kobjects::peek(sock, &mut data, 0)
        .map_err(FilesError::io(fd, what("reading a queue")))?
        .unwrap_or(0);
    data.truncate(read);
    Ok(data)
}

/// Checks a saved connection before anything is created for it: addresses
/// of one family, and numbers the kernel would take but that no real
/// connection has.
fn parse(fd: i32, saved: &TcpConnection) -> Result<(SocketAddr, SocketAddr), FilesError> {
    let parse = |text: &str| {
        text.parse::<SocketAddr>()
            .map_err(|_| FilesError::invalid(fd, format!("bad TCP connection address {text:?}")))
    };
    let local = parse(&saved.local)?;
    let peer = parse(&saved.peer)?;
    let invalid =
        |what: &str| FilesError::invalid(fd, format!("TCP connection {local} -> {peer}: {what}"));
    if local.is_ipv4() != peer.is_ipv4() || local.port() == 0 || peer.port() == 0 {
        return Err(invalid("addresses of different families, or port 0"));
    }
    if saved.send_unsent as usize > saved.send_queue.len() {
        return Err(invalid("more unsent bytes than queued"));
    }
    if saved.mss == 0 || saved.mss > u32::from(u16::MAX) {
        return Err(invalid("segment size out of range"));
    }
    if saved
        .window_scale
        .is_some_and(|(snd, rcv)| snd > MAX_WINDOW_SCALE || rcv > MAX_WINDOW_SCALE)
    {
        return Err(invalid("window scale above 14"));
    }
    Ok((local, peer))
}

/// Re-creates a saved connection in repair mode: bound, connected, queues
/// and windows as saved. [`finish`] takes it out of repair mode; dropped
/// before that, it closes without a word to the peer.
pub(super) fn create(fd: i32, saved: &TcpConnection) -> Result<OwnedFd, FilesError> {
    let (local, peer) = parse(fd, saved)?;
    let what = |action: &str| format!("{action} for TCP connection {local} -> {peer}");
    let family = if local.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let sock = nix::sys::socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(FilesError::io(fd, what("socket")))?;
    let set = |level, name, value: i32, option: &str| {
        kobjects::set_sockopt_int(sock.as_fd(), level, name, value)
            .map_err(FilesError::io(fd, what(&format!("setsockopt {option}"))))
    };
    set(libc::IPPROTO_TCP, libc::TCP_REPAIR, REPAIR_ON, "TCP_REPAIR")?;
    if local.is_ipv6() {
        set(
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            i32::from(saved.v6only),
            "IPV6_V6ONLY",
        )?;
    }
    // Room for the queues whatever the saved sizes (the kernel doubles the
    // value given, and counts its own overhead per buffer against it).
    let room = |saved: u32, queued: usize| {
        let needed = u32::try_from(queued.saturating_mul(2) + (64 << 10)).unwrap_or(u32::MAX);
        i32::try_from(saved.max(needed) / 2).unwrap_or(i32::MAX)
    };
    let (sndbuf, rcvbuf) = saved.buffers;
    set(
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        room(sndbuf, saved.send_queue.len()),
        "SO_SNDBUFFORCE",
    )?;
    set(
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        room(rcvbuf, saved.recv_queue.len()),
        "SO_RCVBUFFORCE",
    )?;
    nix::sys::socket::bind(sock.as_raw_fd(), &SockaddrStorage::from(local))
        .map_err(FilesError::io(fd, what("bind")))?;
    set(
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR_QUEUE,
        repair::SEND_QUEUE,
        "TCP_REPAIR_QUEUE",
    )?;
    set(
        libc::IPPROTO_TCP,
        libc::TCP_QUEUE_SEQ,
        saved.send_seq as i32,
        "TCP_QUEUE_SEQ (send)",
    )?;
    set(
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR_QUEUE,
        repair::RECV_QUEUE,
        "TCP_REPAIR_QUEUE",
    )?;
    set(
        libc::IPPROTO_TCP,
        libc::TCP_QUEUE_SEQ,
        saved.recv_seq as i32,
        "TCP_QUEUE_SEQ (receive)",
    )?;
    // In repair mode this only moves the socket to ESTABLISHED.
    nix::sys::socket::connect(sock.as_raw_fd(), &SockaddrStorage::from(peer))
        .map_err(FilesError::io(fd, what("connect in repair mode")))?;

    // Accepted only while nothing has been sent on the socket.
    let mut options = vec![(repair::OPT_MAXSEG, saved.mss)];
    if let Some((snd, rcv)) = saved.window_scale {
        options.push((repair::OPT_WINDOW, u32::from(snd) | u32::from(rcv) << 16));
    }
    if saved.sack {
        options.push((repair::OPT_SACK_PERM, 0));
    }
    if saved.timestamp.is_some() {
        options.push((repair::OPT_TIMESTAMP, 0));
    }
    repair::set_options(sock.as_fd(), &options)
        .map_err(FilesError::io(fd, what("TCP_REPAIR_OPTIONS")))?;
    if let Some(timestamp) = saved.timestamp {
        set(
            libc::IPPROTO_TCP,
            libc::TCP_TIMESTAMP,
            timestamp as i32,
            "TCP_TIMESTAMP",
        )?;
    }

    // The receive queue, then the part of the send queue the peer may
    // already have: written in repair mode, it counts as sent, to be
    // retransmitted if the peer does not acknowledge it.
    write_queue(
        fd,
        sock.as_fd(),
        &saved.recv_queue,
        &what("refilling the receive queue"),
    )?;
    set(
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR_QUEUE,
        repair::SEND_QUEUE,
        "TCP_REPAIR_QUEUE",
    )?;
    let sent = saved.send_queue.len() - saved.send_unsent as usize;
    write_queue(
        fd,
        sock.as_fd(),
        &saved.send_queue[..sent],
        &what("refilling the send queue"),
    )?;
    set(
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR_QUEUE,
        NO_QUEUE,
        "TCP_REPAIR_QUEUE",
    )?;
    let window = RepairWindow {
        snd_wl1: saved.window.snd_wl1,
        snd_wnd: saved.window.snd_wnd,
        max_window: saved.window.max_window,
        rcv_wnd: saved.window.rcv_wnd,
        rcv_wup: saved.window.rcv_wup,
    };
    repair::set_window(sock.as_fd(), &window)
        .map_err(FilesError::io(fd, what("TCP_REPAIR_WINDOW")))?;
    Ok(sock)
}

/// Writes `data` into the queue selected on a socket in repair mode; the
/// kernel takes at most a few pages a call.
fn write_queue(
    fd: i32,
    sock: BorrowedFd<'_>,
    mut data: &[u8],
    what: &str,
) -> Result<(), FilesError> {
    while !data.is_empty() {
        let written = nix::sys::socket::send(
            sock.as_raw_fd(),
            data,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        )
        .map_err(FilesError::io(fd, what.to_owned()))?;
        if written == 0 {
            return Err(FilesError::io(fd, what.to_owned())(std::io::Error::from(
                std::io::ErrorKind::WriteZero,
            )));
        }
        data = &data[written..];
    }
    Ok(())
}

/// Takes a connection made by [`create`] out of repair mode, silently: TCP
/// goes on with the next segment either side sends (a retransmission, a
/// zero-window probe, new data). Then the saved options are set and what
/// the process wrote but TCP never sent is written as ordinary data.
pub(super) fn finish(
    fd: i32,
    sock: BorrowedFd<'_>,
    saved: &TcpConnection,
) -> Result<(), FilesError> {
    let what = |action: &str| {
        format!(
            "{action} for TCP connection {} -> {}",
            saved.local, saved.peer
        )
    };
    let set = |level, name, value: i32, option: &str| {
        kobjects::set_sockopt_int(sock, level, name, value)
            .map_err(FilesError::io(fd, what(&format!("setsockopt {option}"))))
    };
    set(
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR,
        repair::REPAIR_OFF_NO_WINDOW_PROBE,
        "TCP_REPAIR",
    )?;
    set(
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        i32::from(saved.reuseaddr),
        "SO_REUSEADDR",
    )?;
    let shown = format!("TCP connection {} -> {}", saved.local, saved.peer);
    sockopts::restore(fd, sock, &saved.options, None, &shown)?;
    let sent = saved.send_queue.len() - saved.send_unsent as usize;
    write_queue(
        fd,
        sock,
        &saved.send_queue[sent..],
        &what("sending the unsent data"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection() -> TcpConnection {
        TcpConnection {
            local: "127.0.0.1:41234".to_owned(),
            peer: "127.0.0.1:6379".to_owned(),
            send_seq: 1,
            recv_seq: 2,
            send_queue: b"abc".to_vec(),
            send_unsent: 1,
            recv_queue: Vec::new(),
            mss: 1460,
            window_scale: Some((7, 7)),
            sack: true,
            timestamp: None,
            window: TcpWindow::default(),
            buffers: (0, 0),
            reuseaddr: false,
            v6only: false,
            options: Vec::new(),
        }
    }

    #[test]
    fn impossible_saved_connections_are_refused_before_any_socket_exists() {
        assert!(parse(3, &connection()).is_ok());
        for (what, bad) in [
            (
                "different families",
                TcpConnection {
                    peer: "[::1]:6379".to_owned(),
                    ..connection()
                },
            ),
            (
                "port 0",
                TcpConnection {
                    local: "127.0.0.1:0".to_owned(),
                    ..connection()
                },
            ),
            (
                "more unsent bytes than queued",
                TcpConnection {
                    send_unsent: 4,
                    ..connection()
                },
            ),
            (
                "segment size out of range",
                TcpConnection {
                    mss: 0,
                    ..connection()
                },
            ),
            (
                "window scale above 14",
                TcpConnection {
                    window_scale: Some((15, 0)),
                    ..connection()
                },
            ),
            (
                "bad TCP connection address",
                TcpConnection {
                    local: "nowhere".to_owned(),
                    ..connection()
                },
            ),
        ] {
            let err = parse(3, &bad).expect_err(what).to_string();
            assert!(
                err.starts_with("fd 3: invalid image: ")
                    && err.contains(what.split(' ').next().unwrap()),
                "{what}: {err}"
            );
        }
    }
}
