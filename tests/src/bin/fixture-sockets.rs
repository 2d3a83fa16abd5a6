//! Test fixture: sockets in the states an idle server holds besides its
//! listeners, each at a fixed number.
//!
//! `fixture-sockets DIR PORT` expects two sockets of the test outside it:
//! a datagram socket bound to `DIR/log` (as `/dev/log` is) and a stream
//! listener on `DIR/daemon.sock` that echoes what it reads. It sets up the
//! descriptors below, writes `DIR/ready`, and on each SIGUSR1 checks them
//! all from inside (options, names, and that each can still do what it is
//! for) and writes `DIR/result`: `OK` or `FAIL: what differs`.
//!
//! | fd | what |
//! | -- | ---- |
//! | 30 | TCP IPv4, unbound: keepalive, no delay, linger 5 s, receive buffer set |
//! | 31 | TCP bound to 127.0.0.1:PORT, not listening, `SO_REUSEADDR`, keepalive idle 99 s |
//! | 32 | TCP bound to [::1]:PORT, not listening, `IPV6_V6ONLY`, `SO_REUSEPORT` |
//! | 33 | UDP IPv4, unbound, `SO_BROADCAST`, send buffer set, send timeout 250 ms |
//! | 34 | UNIX stream, unbound, unconnected |
//! | 35 | UNIX datagram bound to `DIR/dgram.sock` (mode 0640) |
//! | 36 | UNIX seqpacket bound to the abstract name `persist-fixture-sockets-PORT` |
//! | 37 | UNIX datagram connected to `DIR/log`, `SO_PASSCRED` |
//! | 38 | UNIX stream connected to `DIR/daemon.sock`, receive timeout 1.5 s |

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::sys::socket::{
    AddressFamily, Backlog, MsgFlags, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrStorage,
    UnixAddr, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};

const TCP_UNBOUND: RawFd = 30;
const TCP_BOUND: RawFd = 31;
const TCP_BOUND_V6: RawFd = 32;
const UDP_UNBOUND: RawFd = 33;
const UNIX_UNBOUND: RawFd = 34;
const UNIX_DGRAM_NAMED: RawFd = 35;
const UNIX_SEQPACKET_ABSTRACT: RawFd = 36;
const UNIX_TO_LOG: RawFd = 37;
const UNIX_TO_DAEMON: RawFd = 38;

const KEEPIDLE: i32 = 99;
const LINGER: i32 = 5;

type Check = Result<(), String>;

fn same<T: std::fmt::Debug + PartialEq>(what: &str, got: T, want: T) -> Check {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

fn fd(raw: RawFd) -> BorrowedFd<'static> {
    // SAFETY: the fixture's descriptors stay open for the whole process.
    unsafe { BorrowedFd::borrow_raw(raw) }
}

fn get_int(raw: RawFd, level: i32, name: i32) -> Result<i32, String> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are writable for their sizes.
    let rc = unsafe { libc::getsockopt(raw, level, name, (&raw mut value).cast(), &mut len) };
    if rc < 0 {
        return Err(format!(
            "getsockopt {level}/{name} on fd {raw}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(value)
}

fn set_int(sock: &OwnedFd, level: i32, name: i32, value: i32) -> Check {
    let len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` is a readable int for the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(format!(
            "setsockopt {level}/{name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Moves `sock` to number `target`.
fn place(sock: OwnedFd, target: RawFd) -> Check {
    let raw = sock.into_raw_fd();
    // SAFETY: dup2 and close take integers; the fixture owns these numbers.
    unsafe {
        if libc::dup2(raw, target) < 0 {
            return Err(format!(
                "dup2 to {target}: {}",
                std::io::Error::last_os_error()
            ));
        }
        libc::close(raw);
    }
    Ok(())
}

fn socket(family: AddressFamily, ty: SockType) -> Result<OwnedFd, String> {
    nix::sys::socket::socket(family, ty, SockFlag::empty(), None)
        .map_err(|e| format!("socket {family:?} {ty:?}: {e}"))
}

fn abstract_name(port: u16) -> String {
    format!("persist-fixture-sockets-{port}")
}

fn local(raw: RawFd) -> Result<SockaddrStorage, String> {
    nix::sys::socket::getsockname(raw).map_err(|e| format!("getsockname {raw}: {e}"))
}

fn unix_local(raw: RawFd) -> Result<UnixAddr, String> {
    nix::sys::socket::getsockname(raw).map_err(|e| format!("getsockname {raw}: {e}"))
}

fn unix_peer(raw: RawFd) -> Result<UnixAddr, String> {
    nix::sys::socket::getpeername(raw).map_err(|e| format!("getpeername {raw}: {e}"))
}

fn setup(dir: &Path, port: u16) -> Check {
    let tcp = socket(AddressFamily::Inet, SockType::Stream)?;
    set_int(&tcp, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set_int(&tcp, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    set_int(&tcp, libc::SOL_SOCKET, libc::SO_RCVBUF, 65536)?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: LINGER,
    };
    nix::sys::socket::setsockopt(&tcp, nix::sys::socket::sockopt::Linger, &linger)
        .map_err(|e| format!("SO_LINGER: {e}"))?;
    place(tcp, TCP_UNBOUND)?;

    let tcp = socket(AddressFamily::Inet, SockType::Stream)?;
    set_int(&tcp, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    set_int(&tcp, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPIDLE)?;
    let addr = SockaddrIn::new(127, 0, 0, 1, port);
    nix::sys::socket::bind(tcp.as_raw_fd(), &addr).map_err(|e| format!("bind {addr}: {e}"))?;
    place(tcp, TCP_BOUND)?;

    let tcp = socket(AddressFamily::Inet6, SockType::Stream)?;
    set_int(&tcp, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    set_int(&tcp, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    let addr = SockaddrIn6::from(std::net::SocketAddrV6::new(
        std::net::Ipv6Addr::LOCALHOST,
        port,
        0,
        0,
    ));
    nix::sys::socket::bind(tcp.as_raw_fd(), &addr).map_err(|e| format!("bind {addr}: {e}"))?;
    place(tcp, TCP_BOUND_V6)?;

    let udp = socket(AddressFamily::Inet, SockType::Datagram)?;
    set_int(&udp, libc::SOL_SOCKET, libc::SO_BROADCAST, 1)?;
    set_int(&udp, libc::SOL_SOCKET, libc::SO_SNDBUF, 32768)?;
    nix::sys::socket::setsockopt(&udp, sockopt::SendTimeout, &TimeVal::milliseconds(250))
        .map_err(|e| format!("SO_SNDTIMEO: {e}"))?;
    place(udp, UDP_UNBOUND)?;

    place(socket(AddressFamily::Unix, SockType::Stream)?, UNIX_UNBOUND)?;

    let dgram = socket(AddressFamily::Unix, SockType::Datagram)?;
    let path = dir.join("dgram.sock");
    let addr = UnixAddr::new(&path).map_err(|e| e.to_string())?;
    nix::sys::socket::bind(dgram.as_raw_fd(), &addr).map_err(|e| format!("bind {addr}: {e}"))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    place(dgram, UNIX_DGRAM_NAMED)?;

    let seqpacket = socket(AddressFamily::Unix, SockType::SeqPacket)?;
    let addr = UnixAddr::new_abstract(abstract_name(port).as_bytes()).map_err(|e| e.to_string())?;
    nix::sys::socket::bind(seqpacket.as_raw_fd(), &addr)
        .map_err(|e| format!("bind {addr}: {e}"))?;
    place(seqpacket, UNIX_SEQPACKET_ABSTRACT)?;

    let log = socket(AddressFamily::Unix, SockType::Datagram)?;
    set_int(&log, libc::SOL_SOCKET, libc::SO_PASSCRED, 1)?;
    let addr = UnixAddr::new(&dir.join("log")).map_err(|e| e.to_string())?;
    nix::sys::socket::connect(log.as_raw_fd(), &addr)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    place(log, UNIX_TO_LOG)?;

    let daemon = socket(AddressFamily::Unix, SockType::Stream)?;
    let addr = UnixAddr::new(&dir.join("daemon.sock")).map_err(|e| e.to_string())?;
    nix::sys::socket::connect(daemon.as_raw_fd(), &addr)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    nix::sys::socket::setsockopt(
        &daemon,
        sockopt::ReceiveTimeout,
        &TimeVal::milliseconds(1500),
    )
    .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
    place(daemon, UNIX_TO_DAEMON)?;
    Ok(())
}

/// Buffer sizes and timeouts (milliseconds) as the kernel reports them
/// (rounded to its clock ticks), recorded at setup for the checks after a
/// restore.
fn buffer_sizes(dir: &Path) -> Check {
    let rcv = get_int(TCP_UNBOUND, libc::SOL_SOCKET, libc::SO_RCVBUF)?;
    let snd = get_int(UDP_UNBOUND, libc::SOL_SOCKET, libc::SO_SNDBUF)?;
    let [snd_timeo, rcv_timeo] = timeouts()?;
    fs::write(
        dir.join("buffers"),
        format!("{rcv} {snd} {snd_timeo} {rcv_timeo}"),
    )
    .map_err(|e| e.to_string())
}

/// The send timeout of fd 33 and the receive timeout of fd 38.
fn timeouts() -> Result<[i64; 2], String> {
    let snd = nix::sys::socket::getsockopt(&fd(UDP_UNBOUND), sockopt::SendTimeout)
        .map_err(|e| format!("fd 33 SO_SNDTIMEO: {e}"))?;
    let rcv = nix::sys::socket::getsockopt(&fd(UNIX_TO_DAEMON), sockopt::ReceiveTimeout)
        .map_err(|e| format!("fd 38 SO_RCVTIMEO: {e}"))?;
    Ok([snd.num_milliseconds(), rcv.num_milliseconds()])
}

fn verify(dir: &Path, port: u16) -> Check {
    let recorded = fs::read_to_string(dir.join("buffers")).map_err(|e| e.to_string())?;
    let recorded: Vec<i32> = recorded.split(' ').filter_map(|n| n.parse().ok()).collect();
    verify_tcp(port, &recorded)?;
    verify_unix(dir, port)?;
    let recorded_timeouts = [i64::from(recorded[2]), i64::from(recorded[3])];
    same(
        "fds 33 and 38 timeouts (ms)",
        timeouts()?,
        recorded_timeouts,
    )?;
    same(
        "timeouts set",
        recorded_timeouts.map(|t| t > 0),
        [true, true],
    )
}

fn verify_tcp(port: u16, recorded: &[i32]) -> Check {
    let int = |raw, level, name| get_int(raw, level, name);
    let inet = |addr: SockaddrStorage| {
        addr.as_sockaddr_in()
            .map(|a| SocketAddr::V4((*a).into()))
            .or_else(|| addr.as_sockaddr_in6().map(|a| SocketAddr::V6((*a).into())))
    };

    // fd 30: unbound, options kept, and still usable as a server.
    same(
        "fd 30 address",
        inet(local(TCP_UNBOUND)?),
        Some("0.0.0.0:0".parse().unwrap()),
    )?;
    same(
        "fd 30 SO_KEEPALIVE",
        int(TCP_UNBOUND, libc::SOL_SOCKET, libc::SO_KEEPALIVE)?,
        1,
    )?;
    same(
        "fd 30 TCP_NODELAY",
        int(TCP_UNBOUND, libc::IPPROTO_TCP, libc::TCP_NODELAY)?,
        1,
    )?;
    same(
        "fd 30 SO_RCVBUF",
        int(TCP_UNBOUND, libc::SOL_SOCKET, libc::SO_RCVBUF)?,
        recorded[0],
    )?;
    let linger = nix::sys::socket::getsockopt(&fd(TCP_UNBOUND), nix::sys::socket::sockopt::Linger)
        .map_err(|e| format!("fd 30 SO_LINGER: {e}"))?;
    same(
        "fd 30 SO_LINGER",
        (linger.l_onoff, linger.l_linger),
        (1, LINGER),
    )?;
    nix::sys::socket::bind(TCP_UNBOUND, &SockaddrIn::new(127, 0, 0, 1, 0))
        .map_err(|e| format!("fd 30 bind: {e}"))?;
    nix::sys::socket::listen(&fd(TCP_UNBOUND), Backlog::new(4).unwrap())
        .map_err(|e| format!("fd 30 listen: {e}"))?;
    let bound = inet(local(TCP_UNBOUND)?).ok_or("fd 30 not an IP socket")?;
    TcpStream::connect(bound).map_err(|e| format!("connect to fd 30 at {bound}: {e}"))?;

    // fd 31: bound to its port, listens when asked.
    same(
        "fd 31 address",
        inet(local(TCP_BOUND)?),
        Some(SocketAddr::from(([127, 0, 0, 1], port))),
    )?;
    same(
        "fd 31 SO_REUSEADDR",
        int(TCP_BOUND, libc::SOL_SOCKET, libc::SO_REUSEADDR)?,
        1,
    )?;
    same(
        "fd 31 TCP_KEEPIDLE",
        int(TCP_BOUND, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)?,
        KEEPIDLE,
    )?;
    nix::sys::socket::listen(&fd(TCP_BOUND), Backlog::new(4).unwrap())
        .map_err(|e| format!("fd 31 listen: {e}"))?;
    TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect to fd 31: {e}"))?;

    // fd 32: IPv6 only, reuseport.
    same(
        "fd 32 address",
        inet(local(TCP_BOUND_V6)?),
        Some(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))),
    )?;
    same(
        "fd 32 IPV6_V6ONLY",
        int(TCP_BOUND_V6, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)?,
        1,
    )?;
    same(
        "fd 32 SO_REUSEPORT",
        int(TCP_BOUND_V6, libc::SOL_SOCKET, libc::SO_REUSEPORT)?,
        1,
    )?;

    // fd 33: unbound UDP with its options.
    same(
        "fd 33 address",
        inet(local(UDP_UNBOUND)?),
        Some("0.0.0.0:0".parse().unwrap()),
    )?;
    same(
        "fd 33 type",
        int(UDP_UNBOUND, libc::SOL_SOCKET, libc::SO_TYPE)?,
        libc::SOCK_DGRAM,
    )?;
    same(
        "fd 33 SO_BROADCAST",
        int(UDP_UNBOUND, libc::SOL_SOCKET, libc::SO_BROADCAST)?,
        1,
    )?;
    same(
        "fd 33 SO_SNDBUF",
        int(UDP_UNBOUND, libc::SOL_SOCKET, libc::SO_SNDBUF)?,
        recorded[1],
    )
}

fn verify_unix(dir: &Path, port: u16) -> Check {
    let int = |raw, name| get_int(raw, libc::SOL_SOCKET, name);

    // fd 34: unbound, unconnected stream.
    same(
        "fd 34 domain",
        int(UNIX_UNBOUND, libc::SO_DOMAIN)?,
        libc::AF_UNIX,
    )?;
    same(
        "fd 34 type",
        int(UNIX_UNBOUND, libc::SO_TYPE)?,
        libc::SOCK_STREAM,
    )?;
    same("fd 34 name", unix_local(UNIX_UNBOUND)?.path_len(), 0)?;
    same(
        "fd 34 peer",
        nix::sys::socket::getpeername::<UnixAddr>(UNIX_UNBOUND).err(),
        Some(nix::errno::Errno::ENOTCONN),
    )?;

    // fd 35: bound datagram socket, its file with its mode, and it receives.
    let path = dir.join("dgram.sock");
    same(
        "fd 35 name",
        unix_local(UNIX_DGRAM_NAMED)?.path().map(Path::to_path_buf),
        Some(path.clone()),
    )?;
    same(
        "fd 35 type",
        int(UNIX_DGRAM_NAMED, libc::SO_TYPE)?,
        libc::SOCK_DGRAM,
    )?;
    let mode = fs::symlink_metadata(&path)
        .map_err(|e| format!("stat {}: {e}", path.display()))?
        .mode();
    same("fd 35 socket file mode", mode & 0o7777, 0o640)?;
    let sender = std::os::unix::net::UnixDatagram::unbound().map_err(|e| e.to_string())?;
    sender
        .send_to(b"to-35", &path)
        .map_err(|e| format!("send to {}: {e}", path.display()))?;
    let mut buf = [0u8; 64];
    let n = nix::sys::socket::recv(UNIX_DGRAM_NAMED, &mut buf, MsgFlags::MSG_DONTWAIT)
        .map_err(|e| format!("fd 35 recv: {e}"))?;
    same("fd 35 received", &buf[..n], b"to-35")?;

    // fd 36: abstract seqpacket, not listening yet; listens when asked.
    let name = abstract_name(port);
    same(
        "fd 36 name",
        unix_local(UNIX_SEQPACKET_ABSTRACT)?
            .as_abstract()
            .map(<[u8]>::to_vec),
        Some(name.clone().into_bytes()),
    )?;
    same(
        "fd 36 SO_ACCEPTCONN",
        int(UNIX_SEQPACKET_ABSTRACT, libc::SO_ACCEPTCONN)?,
        0,
    )?;
    nix::sys::socket::listen(&fd(UNIX_SEQPACKET_ABSTRACT), Backlog::new(2).unwrap())
        .map_err(|e| format!("fd 36 listen: {e}"))?;
    let client = socket(AddressFamily::Unix, SockType::SeqPacket)?;
    let addr = UnixAddr::new_abstract(name.as_bytes()).map_err(|e| e.to_string())?;
    nix::sys::socket::connect(client.as_raw_fd(), &addr)
        .map_err(|e| format!("connect to fd 36: {e}"))?;

    // fd 37: connected to the outside log socket, which gets what we send.
    let log = dir.join("log");
    same(
        "fd 37 peer",
        unix_peer(UNIX_TO_LOG)?.path().map(Path::to_path_buf),
        Some(log),
    )?;
    same("fd 37 SO_PASSCRED", int(UNIX_TO_LOG, libc::SO_PASSCRED)?, 1)?;
    let line = format!("log from {}", std::process::id());
    nix::sys::socket::send(UNIX_TO_LOG, line.as_bytes(), MsgFlags::empty())
        .map_err(|e| format!("fd 37 send: {e}"))?;

    // fd 38: connected to the outside daemon, which echoes.
    let daemon = dir.join("daemon.sock");
    same(
        "fd 38 peer",
        unix_peer(UNIX_TO_DAEMON)?.path().map(Path::to_path_buf),
        Some(daemon),
    )?;
    nix::sys::socket::send(UNIX_TO_DAEMON, b"ping", MsgFlags::empty())
        .map_err(|e| format!("fd 38 send: {e}"))?;
    let n = nix::sys::socket::recv(UNIX_TO_DAEMON, &mut buf, MsgFlags::empty())
        .map_err(|e| format!("fd 38 recv: {e}"))?;
    same("fd 38 echo", &buf[..n], b"ping")
}

fn write_result(dir: &Path, result: &Check) {
    let text = match result {
        Ok(()) => "OK".to_owned(),
        Err(what) => format!("FAIL: {what}"),
    };
    let tmp = dir.join("result.tmp");
    if fs::write(&tmp, text).is_ok() {
        let _ = fs::rename(&tmp, dir.join("result"));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, port] = args.as_slice() else {
        eprintln!("usage: fixture-sockets DIR PORT");
        std::process::exit(2);
    };
    let dir = Path::new(dir);
    let port: u16 = port.parse().expect("PORT is a number");

    let mut usr1 = nix::sys::signal::SigSet::empty();
    usr1.add(nix::sys::signal::Signal::SIGUSR1);
    usr1.thread_block().expect("block SIGUSR1");
    // Descriptors leaked by whoever started us would be saved too.
    // SAFETY: close_range takes integers; nothing in this process owns a
    // descriptor above 2 yet.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if let Err(what) = setup(dir, port).and_then(|()| buffer_sizes(dir)) {
        write_result(dir, &Err(format!("setup: {what}")));
        std::process::exit(1);
    }
    fs::write(dir.join("ready"), "").expect("write ready");
    loop {
        usr1.wait().expect("sigwait");
        write_result(dir, &verify(dir, port));
    }
}
