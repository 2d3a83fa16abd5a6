//! Test fixture: one of every kind of file descriptor persist can restore,
//! each at a fixed number.
//!
//! `fixture-files DIR PORT` sets up the descriptors below, writes
//! `DIR/ready`, and on each SIGUSR1 checks them all and writes `DIR/result`:
//! `OK` or `FAIL: what differs`.
//!
//! `fixture-files --verify DIR PORT` runs the same checks on descriptors it
//! inherited (a test installs restored descriptors, then execs this), writes
//! `DIR/result` and exits; there, fd 29 (close-on-exec) must be closed and
//! nothing but the listed descriptors may be open.
//!
//! | fd | what |
//! | -- | ---- |
//! | 10 | `DIR/data.txt` read-write at offset 5 (22 is its `dup`) |
//! | 11 | `DIR/gone.txt`, unlinked, "unlinked contents" at offset 3 |
//! | 12, 13 | a non-blocking 128 KiB pipe holding "pipe data" |
//! | 14, 15 | FIFO `DIR/fifo` (read end non-blocking) holding "fifo data" |
//! | 16 | /dev/null write-only, `O_APPEND` |
//! | 17 | eventfd with count 7 |
//! | 18 | timerfd, CLOCK_MONOTONIC, every 50 ms |
//! | 19 | signalfd for SIGUSR2 (blocked) |
//! | 20 | epoll: 12 (data 0x1200), 17 (edge-triggered, 0x1700), 18 (0x1800), 23 (0x2300) |
//! | 21 | memfd "fixture-memfd" holding "memfd data", offset 2 |
//! | 23 | TCP listener 127.0.0.1:PORT, backlog 16, non-blocking, keepalive after 77 s |
//! | 24 | UNIX listener `DIR/sock` (mode 0666), backlog 8 |
//! | 25, 26 | stream socket pair, "to-25" queued on 25 and "to-26" on 26 |
//! | 27, 28 | seqpacket socket pair, "m1" and "m2" queued on 27 |
//! | 29 | /dev/null, close-on-exec |

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

const REGULAR: i32 = 10;
const UNLINKED: i32 = 11;
const PIPE_READ: i32 = 12;
const PIPE_WRITE: i32 = 13;
const FIFO_READ: i32 = 14;
const FIFO_WRITE: i32 = 15;
const NULL: i32 = 16;
const EVENTFD: i32 = 17;
const TIMERFD: i32 = 18;
const SIGNALFD: i32 = 19;
const EPOLL: i32 = 20;
const MEMFD: i32 = 21;
const REGULAR_DUP: i32 = 22;
const TCP: i32 = 23;
const UNIX_LISTENER: i32 = 24;
const PAIR_A: i32 = 25;
const PAIR_B: i32 = 26;
const SEQ_A: i32 = 27;
const SEQ_B: i32 = 28;
const CLOEXEC: i32 = 29;

const TIMER_NS: i64 = 50_000_000;
const PIPE_SIZE: i32 = 128 * 1024;
const KEEPIDLE: i32 = 77;

type Check = Result<(), String>;

/// Turns a -1 return into an error naming the call.
fn ok(rc: libc::c_long, what: &str) -> Result<libc::c_long, String> {
    if rc < 0 {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    } else {
        Ok(rc)
    }
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in fixture paths")
}

/// Moves `fd` to number `target` (not close-on-exec) and closes `fd`.
fn place(fd: libc::c_long, target: i32, what: &str) -> Check {
    let fd = ok(fd, what)? as i32;
    // SAFETY: dup2 and close take integers; the fixture owns these numbers.
    unsafe {
        ok(libc::dup2(fd, target).into(), what)?;
        libc::close(fd);
    }
    Ok(())
}

fn write_fd(fd: i32, data: &[u8], what: &str) -> Check {
    // SAFETY: `data` is readable for its length.
    let n = ok(
        unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) } as libc::c_long,
        what,
    )?;
    if n as usize != data.len() {
        Err(format!("{what}: short write"))
    } else {
        Ok(())
    }
}

fn read_fd(fd: i32, len: usize, what: &str) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len];
    // SAFETY: `buf` is writable for its length.
    let n = ok(
        unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } as libc::c_long,
        what,
    )?;
    buf.truncate(n as usize);
    Ok(buf)
}

fn getfl(fd: i32) -> Result<i32, String> {
    // SAFETY: F_GETFL takes no argument.
    Ok(ok(
        unsafe { libc::fcntl(fd, libc::F_GETFL) }.into(),
        &format!("F_GETFL {fd}"),
    )? as i32)
}

fn offset(fd: i32) -> Result<i64, String> {
    // SAFETY: lseek takes integers only.
    let rc = unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) };
    ok(rc, &format!("lseek {fd}"))
}

fn fstat(fd: i32) -> Result<libc::stat, String> {
    // SAFETY: all-zero is a valid stat; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is writable.
    let rc = unsafe { libc::fstat(fd, &mut st) };
    ok(rc.into(), &format!("fstat {fd}"))?;
    Ok(st)
}

fn sockopt(fd: i32, level: i32, name: i32) -> Result<i32, String> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are writable for their sizes.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &mut len) };
    ok(rc.into(), &format!("getsockopt {level}/{name} on {fd}"))?;
    Ok(value)
}

fn same<T: std::fmt::Debug + PartialEq>(what: &str, got: T, want: T) -> Check {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset adds valid signals.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn block(signals: &[i32]) -> Check {
    let set = sigset(signals);
    // SAFETY: `set` is a valid sigset; the old mask may be null.
    ok(
        unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) }.into(),
        "sigprocmask",
    )
    .map(drop)
}

fn setup(dir: &Path, port: u16) -> Check {
    block(&[libc::SIGUSR1, libc::SIGUSR2])?;
    let path = |name: &str| cstr(&dir.join(name).to_string_lossy());

    // SAFETY: every call in this block takes integers, or NUL-terminated
    // strings and buffers that live across the call.
    unsafe {
        fs::write(dir.join("data.txt"), "0123456789abcdef").map_err(|e| e.to_string())?;
        place(
            libc::open(path("data.txt").as_ptr(), libc::O_RDWR).into(),
            REGULAR,
            "open data.txt",
        )?;
        ok(libc::lseek(REGULAR, 5, libc::SEEK_SET), "lseek")?;
        place(libc::dup(REGULAR).into(), REGULAR_DUP, "dup")?;

        place(
            libc::open(
                path("gone.txt").as_ptr(),
                libc::O_RDWR | libc::O_CREAT,
                0o600,
            )
            .into(),
            UNLINKED,
            "open gone.txt",
        )?;
        write_fd(UNLINKED, b"unlinked contents", "write gone.txt")?;
        ok(libc::lseek(UNLINKED, 3, libc::SEEK_SET), "lseek")?;
        fs::remove_file(dir.join("gone.txt")).map_err(|e| e.to_string())?;

        let mut fds = [0i32; 2];
        ok(
            libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK).into(),
            "pipe2",
        )?;
        place(fds[0].into(), PIPE_READ, "pipe")?;
        place(fds[1].into(), PIPE_WRITE, "pipe")?;
        ok(
            libc::fcntl(PIPE_WRITE, libc::F_SETPIPE_SZ, PIPE_SIZE).into(),
            "F_SETPIPE_SZ",
        )?;
        write_fd(PIPE_WRITE, b"pipe data", "write pipe")?;

        ok(libc::mkfifo(path("fifo").as_ptr(), 0o600).into(), "mkfifo")?;
        place(
            libc::open(path("fifo").as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK).into(),
            FIFO_READ,
            "open fifo",
        )?;
        place(
            libc::open(path("fifo").as_ptr(), libc::O_WRONLY).into(),
            FIFO_WRITE,
            "open fifo",
        )?;
        write_fd(FIFO_WRITE, b"fifo data", "write fifo")?;

        place(
            libc::open(cstr("/dev/null").as_ptr(), libc::O_WRONLY | libc::O_APPEND).into(),
            NULL,
            "open /dev/null",
        )?;
        place(
            libc::eventfd(7, libc::EFD_NONBLOCK).into(),
            EVENTFD,
            "eventfd",
        )?;

        place(
            libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK).into(),
            TIMERFD,
            "timerfd",
        )?;
        let every = libc::timespec {
            tv_sec: 0,
            tv_nsec: TIMER_NS,
        };
        let spec = libc::itimerspec {
            it_interval: every,
            it_value: every,
        };
        ok(
            libc::timerfd_settime(TIMERFD, 0, &spec, std::ptr::null_mut()).into(),
            "timerfd_settime",
        )?;

        let mask = sigset(&[libc::SIGUSR2]);
        place(
            libc::signalfd(-1, &mask, libc::SFD_NONBLOCK).into(),
            SIGNALFD,
            "signalfd",
        )?;

        place(
            libc::memfd_create(cstr("fixture-memfd").as_ptr(), 0).into(),
            MEMFD,
            "memfd_create",
        )?;
        write_fd(MEMFD, b"memfd data", "write memfd")?;
        ok(libc::lseek(MEMFD, 2, libc::SEEK_SET), "lseek")?;

        let tcp = ok(
            libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0).into(),
            "socket",
        )? as i32;
        let one: libc::c_int = 1;
        let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        ok(
            libc::setsockopt(
                tcp,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&raw const one).cast(),
                len,
            )
            .into(),
            "SO_REUSEADDR",
        )?;
        for (level, name, value) in [
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
            (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPIDLE),
        ] {
            ok(
                libc::setsockopt(tcp, level, name, (&raw const value).cast(), len).into(),
                "setsockopt",
            )?;
        }
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let addr_len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        ok(
            libc::bind(tcp, (&raw const addr).cast(), addr_len).into(),
            "bind tcp",
        )?;
        ok(libc::listen(tcp, 16).into(), "listen tcp")?;
        place(tcp.into(), TCP, "tcp")?;

        let unix = std::os::unix::net::UnixListener::bind(dir.join("sock"))
            .map_err(|e| format!("bind sock: {e}"))?;
        fs::set_permissions(dir.join("sock"), fs::Permissions::from_mode(0o666))
            .map_err(|e| format!("chmod sock: {e}"))?;
        let raw = std::os::fd::IntoRawFd::into_raw_fd(unix);
        ok(libc::listen(raw, 8).into(), "listen unix")?;
        place(raw.into(), UNIX_LISTENER, "unix listener")?;

        ok(
            libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()).into(),
            "socketpair",
        )?;
        place(fds[0].into(), PAIR_A, "pair")?;
        place(fds[1].into(), PAIR_B, "pair")?;
        write_fd(PAIR_B, b"to-25", "send to 25")?;
        write_fd(PAIR_A, b"to-26", "send to 26")?;

        ok(
            libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()).into(),
            "socketpair",
        )?;
        place(fds[0].into(), SEQ_A, "seqpacket")?;
        place(fds[1].into(), SEQ_B, "seqpacket")?;
        write_fd(SEQ_B, b"m1", "send m1")?;
        write_fd(SEQ_B, b"m2", "send m2")?;

        let null = ok(
            libc::open(cstr("/dev/null").as_ptr(), libc::O_RDONLY).into(),
            "open /dev/null",
        )? as i32;
        ok(libc::dup3(null, CLOEXEC, libc::O_CLOEXEC).into(), "dup3")?;
        libc::close(null);

        place(libc::epoll_create1(0).into(), EPOLL, "epoll_create1")?;
        for (fd, events, data) in [
            (PIPE_READ, libc::EPOLLIN, 0x1200u64),
            (EVENTFD, libc::EPOLLIN | libc::EPOLLET, 0x1700),
            (TIMERFD, libc::EPOLLIN, 0x1800),
            (TCP, libc::EPOLLIN, 0x2300),
        ] {
            let mut event = libc::epoll_event {
                events: events as u32,
                u64: data,
            };
            ok(
                libc::epoll_ctl(EPOLL, libc::EPOLL_CTL_ADD, fd, &mut event).into(),
                "epoll_ctl",
            )?;
        }
    }
    Ok(())
}

fn verify(dir: &Path, port: u16, after_exec: bool) -> Check {
    if after_exec {
        // Before this process opens anything itself: only the installed
        // descriptors may be open (fd 29 was close-on-exec).
        let listing = format!("/proc/{}/fd", std::process::id());
        let open: BTreeSet<i32> = fs::read_dir("/proc/self/fd")
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|fd| {
                fs::read_link(format!("/proc/self/fd/{fd}")).is_ok_and(|t| t != Path::new(&listing))
            })
            .collect();
        let expected: BTreeSet<i32> = [0, 1, 2].into_iter().chain(REGULAR..=SEQ_B).collect();
        same("open descriptors", open, expected)?;
    }
    // Regular file and its dup share one offset.
    same("fd 10 offset", offset(REGULAR)?, 5)?;
    same(
        "fd 10 access mode",
        getfl(REGULAR)? & libc::O_ACCMODE,
        libc::O_RDWR,
    )?;
    same(
        "fd 10 data",
        read_fd(REGULAR, 3, "read fd 10")?,
        b"567".to_vec(),
    )?;
    same("fd 22 offset (shared with 10)", offset(REGULAR_DUP)?, 8)?;

    same("fd 11 links", fstat(UNLINKED)?.st_nlink, 0)?;
    let mut deleted = dir.join("gone.txt").into_os_string();
    deleted.push(" (deleted)");
    same(
        "fd 11 name",
        fs::read_link("/proc/self/fd/11").map_err(|e| e.to_string())?,
        deleted.into(),
    )?;
    same("fd 11 offset", offset(UNLINKED)?, 3)?;
    same(
        "fd 11 data",
        read_fd(UNLINKED, 100, "read fd 11")?,
        b"inked contents".to_vec(),
    )?;

    // SAFETY: F_GETPIPE_SZ takes no argument.
    let pipe_size = unsafe { libc::fcntl(PIPE_READ, libc::F_GETPIPE_SZ) };
    same("fd 12 pipe size", pipe_size, PIPE_SIZE)?;
    let sock_mode = fs::metadata(dir.join("sock"))
        .map_err(|e| e.to_string())?
        .mode();
    same("socket file mode", sock_mode & 0o777, 0o666)?;
    same(
        "fd 12 O_NONBLOCK",
        getfl(PIPE_READ)? & libc::O_NONBLOCK,
        libc::O_NONBLOCK,
    )?;
    same(
        "fd 14 is the FIFO",
        fs::read_link("/proc/self/fd/14").map_err(|e| e.to_string())?,
        dir.join("fifo"),
    )?;
    same(
        "fd 14 data",
        read_fd(FIFO_READ, 100, "read fd 14")?,
        b"fifo data".to_vec(),
    )?;
    write_fd(FIFO_WRITE, b"f", "write fd 15")?;
    same(
        "fd 14 after write on 15",
        read_fd(FIFO_READ, 100, "read fd 14")?,
        b"f".to_vec(),
    )?;

    same(
        "fd 16 flags",
        getfl(NULL)? & (libc::O_ACCMODE | libc::O_APPEND),
        libc::O_WRONLY | libc::O_APPEND,
    )?;
    same("fd 16 device", fstat(NULL)?.st_rdev, libc::makedev(1, 3))?;

    // Epoll: a connection makes the listener ready; the pipe and eventfd
    // hold data and the timer ticks.
    let client = TcpStream::connect(("127.0.0.1", port))
        .map_err(|e| format!("connect to port {port}: {e}"))?;
    let want: BTreeSet<u64> = [0x1200, 0x1700, 0x1800, 0x2300].into();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while !want.is_subset(&seen) && Instant::now() < deadline {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
        // SAFETY: `events` is writable for 8 entries.
        let n = ok(
            unsafe { libc::epoll_wait(EPOLL, events.as_mut_ptr(), 8, 100) }.into(),
            "epoll_wait",
        )?;
        seen.extend(events[..n as usize].iter().map(|e| e.u64));
    }
    same("epoll data seen", &seen, &want)?;

    same(
        "fd 12 data",
        read_fd(PIPE_READ, 100, "read fd 12")?,
        b"pipe data".to_vec(),
    )?;
    write_fd(PIPE_WRITE, b"p", "write fd 13")?;
    same(
        "fd 12 after write on 13",
        read_fd(PIPE_READ, 100, "read fd 12")?,
        b"p".to_vec(),
    )?;

    same(
        "eventfd count",
        read_fd(EVENTFD, 8, "read eventfd")?,
        7u64.to_ne_bytes().to_vec(),
    )?;
    let ticks = read_fd(TIMERFD, 8, "read timerfd")?;
    let ticks = u64::from_ne_bytes(ticks.try_into().map_err(|_| "short timerfd read")?);
    if ticks == 0 {
        return Err("timerfd: no ticks".into());
    }
    // SAFETY: all-zero is a valid itimerspec; timerfd_gettime fills it.
    let mut spec: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: `spec` is writable.
    let rc = unsafe { libc::timerfd_gettime(TIMERFD, &mut spec) };
    ok(rc.into(), "timerfd_gettime")?;
    same(
        "timerfd interval",
        (spec.it_interval.tv_sec, spec.it_interval.tv_nsec),
        (0, TIMER_NS),
    )?;

    block(&[libc::SIGUSR2])?;
    // SAFETY: raise takes a signal number.
    ok(unsafe { libc::raise(libc::SIGUSR2) }.into(), "raise")?;
    let info = read_fd(
        SIGNALFD,
        std::mem::size_of::<libc::signalfd_siginfo>(),
        "read signalfd",
    )?;
    let signo = u32::from_ne_bytes(
        info.get(..4)
            .ok_or("short signalfd read")?
            .try_into()
            .map_err(|_| "?")?,
    );
    same("signalfd signal", signo, libc::SIGUSR2 as u32)?;

    let memfd_link = fs::read_link("/proc/self/fd/21").map_err(|e| e.to_string())?;
    if !memfd_link
        .to_string_lossy()
        .starts_with("/memfd:fixture-memfd")
    {
        return Err(format!("fd 21 is {}", memfd_link.display()));
    }
    same("memfd size", fstat(MEMFD)?.st_size, 10)?;
    same("memfd offset", offset(MEMFD)?, 2)?;
    same(
        "memfd data",
        read_fd(MEMFD, 100, "read memfd")?,
        b"mfd data".to_vec(),
    )?;

    // The TCP listener accepts our connection. Connections queued before
    // ours (a client that came while the process was parked) are accepted
    // and closed.
    let client_port = client.local_addr().map_err(|e| e.to_string())?.port();
    let mut accepted = None;
    for _ in 0..16 {
        let mut peer: libc::sockaddr_in = zeroed_sockaddr_in();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: `peer` and `len` are writable.
        let fd = ok(
            unsafe { libc::accept4(TCP, (&raw mut peer).cast(), &mut len, libc::SOCK_CLOEXEC) }
                .into(),
            "accept tcp",
        )? as i32;
        if u16::from_be(peer.sin_port) == client_port {
            accepted = Some(fd);
            break;
        }
        // SAFETY: closing the descriptor accept just gave us.
        unsafe { libc::close(fd) };
    }
    let accepted = accepted.ok_or("fd 23 never accepted our connection")?;
    let mut client = client;
    client.write_all(b"hello").map_err(|e| e.to_string())?;
    same(
        "tcp data",
        read_fd(accepted, 5, "read accepted")?,
        b"hello".to_vec(),
    )?;
    // Accepted connections inherit the listener's keepalive settings.
    same(
        "accepted SO_KEEPALIVE",
        sockopt(accepted, libc::SOL_SOCKET, libc::SO_KEEPALIVE)?,
        1,
    )?;
    same(
        "accepted TCP_KEEPIDLE",
        sockopt(accepted, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)?,
        KEEPIDLE,
    )?;
    // SAFETY: closing the descriptor accept just gave us.
    unsafe { libc::close(accepted) };

    let mut unix_client =
        UnixStream::connect(dir.join("sock")).map_err(|e| format!("connect sock: {e}"))?;
    // SAFETY: accept4 with null address pointers.
    let accepted = ok(
        unsafe {
            libc::accept4(
                UNIX_LISTENER,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        }
        .into(),
        "accept unix",
    )? as i32;
    unix_client.write_all(b"u").map_err(|e| e.to_string())?;
    same(
        "unix data",
        read_fd(accepted, 1, "read accepted unix")?,
        b"u".to_vec(),
    )?;
    // SAFETY: closing the descriptor accept just gave us.
    unsafe { libc::close(accepted) };

    same(
        "fd 25 queued",
        read_fd(PAIR_A, 100, "read fd 25")?,
        b"to-25".to_vec(),
    )?;
    same(
        "fd 26 queued",
        read_fd(PAIR_B, 100, "read fd 26")?,
        b"to-26".to_vec(),
    )?;
    write_fd(PAIR_A, b"ping", "write fd 25")?;
    same(
        "fd 26 after write on 25",
        read_fd(PAIR_B, 100, "read fd 26")?,
        b"ping".to_vec(),
    )?;
    same(
        "fd 27 first message",
        read_fd(SEQ_A, 100, "read fd 27")?,
        b"m1".to_vec(),
    )?;
    same(
        "fd 27 second message",
        read_fd(SEQ_A, 100, "read fd 27")?,
        b"m2".to_vec(),
    )?;

    // SAFETY: F_GETFD takes no argument.
    let cloexec = unsafe { libc::fcntl(CLOEXEC, libc::F_GETFD) };
    if after_exec {
        same("fd 29 closed by exec", cloexec, -1)?;
    } else {
        same("fd 29 close-on-exec", cloexec, libc::FD_CLOEXEC)?;
    }
    Ok(())
}

fn zeroed_sockaddr_in() -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is valid.
    unsafe { std::mem::zeroed() }
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

fn wait_for_usr1() {
    let set = sigset(&[libc::SIGUSR1]);
    let mut signal = 0;
    // SAFETY: `set` is valid and SIGUSR1 is blocked; `signal` is writable.
    unsafe { libc::sigwait(&set, &mut signal) };
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (verify_only, rest) = match args.get(1).map(String::as_str) {
        Some("--verify") => (true, &args[2..]),
        _ => (false, &args[1..]),
    };
    let [dir, port] = rest else {
        eprintln!("usage: fixture-files [--verify] DIR PORT");
        std::process::exit(2);
    };
    let dir = Path::new(dir);
    let port: u16 = port.parse().expect("PORT is a number");

    if verify_only {
        write_result(dir, &verify(dir, port, true));
        return;
    }
    // Descriptors leaked by whoever started us would be saved too.
    // SAFETY: close_range takes integers; nothing in this process owns a
    // descriptor above 2 yet.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if let Err(what) = setup(dir, port) {
        write_result(dir, &Err(format!("setup: {what}")));
        std::process::exit(1);
    }
    fs::write(dir.join("ready"), "").expect("write ready");
    loop {
        wait_for_usr1();
        write_result(dir, &verify(dir, port, false));
    }
}
