//! `sock_diag` netlink queries about UNIX sockets.
//!
//! The socket API cannot tell which socket is the peer of a connected UNIX
//! socket, nor the backlog a UNIX listener was given, nor the file a socket
//! is bound to; the kernel's `NETLINK_SOCK_DIAG` interface can (what `ss -x`
//! uses).

use std::io;
use std::os::fd::AsRawFd;

use linux_raw_sys::netlink::{NLM_F_REQUEST, NLMSG_ERROR, nlmsghdr};
use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};

const NLMSG_HDRLEN: usize = size_of::<nlmsghdr>();

// By hand: neither libc nor linux-raw-sys carries <linux/sock_diag.h> and
// <linux/unix_diag.h>.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const UDIAG_SHOW_VFS: u32 = 0x02;
const UDIAG_SHOW_PEER: u32 = 0x04;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_VFS: u16 = 1;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_SHUTDOWN: u16 = 6;
/// Size of `struct unix_diag_msg`, which the attributes follow.
const UNIX_DIAG_MSG_LEN: usize = 16;

/// What `sock_diag` reports about one UNIX socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixDiag {
    /// Device (as `stat` reports it) and inode of the file the socket is
    /// bound to, if it is bound to a path.
    pub file: Option<(u64, u64)>,
    /// Directions shut down: 1 receiving, 2 sending (`sk_shutdown`).
    pub shutdown: u8,
    /// Inode of the connected peer, if any (0 once the peer is closed).
    pub peer: Option<u64>,
    /// For a listener: connections waiting to be accepted; otherwise bytes
    /// (stream) or size of the first message queued for reading.
    pub rqueue: u32,
    /// For a listener: its maximum backlog; otherwise bytes queued for sending.
    pub wqueue: u32,
}

/// Asks the kernel about the UNIX socket with inode `inode`.
pub fn unix_socket(inode: u64) -> io::Result<UnixDiag> {
    let ino = u32::try_from(inode).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let sock = nix::sys::socket::socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;

    // struct nlmsghdr + struct unix_diag_req
    let mut req = Vec::with_capacity(NLMSG_HDRLEN + 24);
    req.extend_from_slice(&((NLMSG_HDRLEN + 24) as u32).to_ne_bytes()); // nlmsg_len
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes()); // nlmsg_type
    req.extend_from_slice(&(NLM_F_REQUEST as u16).to_ne_bytes()); // nlmsg_flags
    req.extend_from_slice(&1u32.to_ne_bytes()); // nlmsg_seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
    req.push(libc::AF_UNIX as u8); // sdiag_family
    req.push(0); // sdiag_protocol
    req.extend_from_slice(&0u16.to_ne_bytes()); // pad
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_states: all
    req.extend_from_slice(&ino.to_ne_bytes()); // udiag_ino
    req.extend_from_slice(&(UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN).to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_cookie: none
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    nix::sys::socket::send(sock.as_raw_fd(), &req, MsgFlags::empty())?;

    let mut buf = vec![0u8; 8192];
    let n = nix::sys::socket::recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    parse_reply(&buf[..n])
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn parse_reply(buf: &[u8]) -> io::Result<UnixDiag> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed sock_diag reply");
    let len = u32_at(buf, 0).ok_or_else(bad)? as usize;
    let kind = u16_at(buf, 4).ok_or_else(bad)?;
    let msg = buf.get(..len).ok_or_else(bad)?;
    if u32::from(kind) == NLMSG_ERROR {
        let errno = u32_at(msg, NLMSG_HDRLEN).ok_or_else(bad)? as i32;
        return Err(io::Error::from_raw_os_error(-errno));
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return Err(bad());
    }
    let mut diag = UnixDiag {
        shutdown: 0,
        file: None,
        peer: None,
        rqueue: 0,
        wqueue: 0,
    };
    // Attributes follow struct unix_diag_msg, each 4-byte aligned.
    let mut at = NLMSG_HDRLEN + UNIX_DIAG_MSG_LEN;
    while at + 4 <= msg.len() {
        let attr_len = u16_at(msg, at).ok_or_else(bad)? as usize;
        let attr_type = u16_at(msg, at + 2).ok_or_else(bad)?;
        if attr_len < 4 {
            return Err(bad());
        }
        match attr_type {
            UNIX_DIAG_VFS => {
                let ino = u32_at(msg, at + 4).ok_or_else(bad)?;
                let dev = u32_at(msg, at + 8).ok_or_else(bad)?;
                // The kernel's own dev_t: 12 bits of major, 20 of minor.
                let dev = libc::makedev(dev >> 20, dev & 0xf_ffff);
                diag.file = Some((dev, ino.into()));
            }
            UNIX_DIAG_SHUTDOWN => diag.shutdown = *msg.get(at + 4).ok_or_else(bad)?,
            UNIX_DIAG_PEER => diag.peer = Some(u32_at(msg, at + 4).ok_or_else(bad)?.into()),
            UNIX_DIAG_RQLEN => {
                diag.rqueue = u32_at(msg, at + 4).ok_or_else(bad)?;
                diag.wqueue = u32_at(msg, at + 8).ok_or_else(bad)?;
            }
            _ => {}
        }
        at += (attr_len + 3) & !3;
    }
    Ok(diag)
}
