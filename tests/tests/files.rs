//! File descriptors: `persist_agent::files::save_fds` on a live fixture, and
//! `prepare` + `install_in_child` in a forked child of this (multi-threaded)
//! test process, which then execs the fixture's checks on what it got.

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use persist_agent::files::{
    FilesError, InheritedFds, PathAccess, PreparedFds, prepare, save_fds, save_fds_excluding,
    save_locks,
};
use persist_agent::sys::pidfd::PidFd;
use persist_common::image::{EpollWatch, FdInfo, FdKind, FileIdentity, FileType, QueuedMessage};

const FIXTURE: &str = env!("CARGO_BIN_EXE_fixture-files");

/// A process a test started, killed and reaped on drop.
struct Started {
    child: Child,
}

impl Started {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_for(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} ({})",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A TCP port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_fixture(dir: &Path, port: u16) -> Started {
    let child = Command::new(FIXTURE)
        .arg(dir)
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fixture-files");
    let started = Started { child };
    wait_until_ready(&started, dir, "fixture-files");
    started
}

/// Starts `python3 -c script dir`, waiting for it to write `dir/ready`.
fn start_python(dir: &Path, script: &str) -> Started {
    let started = start_python_without_waiting(dir, script);
    wait_until_ready(&started, dir, "python3");
    started
}

/// Starts `python3 -c script dir`.
fn start_python_without_waiting(dir: &Path, script: &str) -> Started {
    let child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start python3");
    Started { child }
}

/// Waits until `started` has written `dir/ready` and closed it again: its
/// descriptors are saved while it runs, and one that closes meanwhile
/// vanishes between the listing and the look at it.
fn wait_until_ready(started: &Started, dir: &Path, what: &str) {
    let marker = dir.join("ready");
    wait_for(&marker, &format!("{what} to be ready"));
    let fds = PathBuf::from(format!("/proc/{}/fd", started.pid()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let holds_marker = || {
        fs::read_dir(&fds)
            .into_iter()
            .flatten()
            .flatten()
            .any(|entry| fs::read_link(entry.path()).is_ok_and(|target| target == marker))
    };
    while holds_marker() {
        assert!(
            Instant::now() < deadline,
            "{what} kept {} open",
            marker.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn save(pid: i32) -> Result<Vec<FdInfo>, FilesError> {
    let pidfd = PidFd::open(pid).expect("pidfd_open");
    save_fds(pid, &pidfd)
}

/// Starts `script`, which forks a helper process holding the other ends of
/// its descriptors and writes the helper's pid to `DIR/helper`; saves the
/// script's descriptors, then kills both (the helper, our grandchild, by pid).
fn save_with_helper(dir: &Path, script: &str) -> Vec<FdInfo> {
    let mut python = start_python(dir, script);
    let helper: i32 = fs::read_to_string(dir.join("helper"))
        .unwrap()
        .parse()
        .unwrap();
    let fds = save(python.pid());
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helper),
        nix::sys::signal::Signal::SIGKILL,
    );
    python.kill();
    fds.expect("save_fds")
}

/// The fixture's result, once written: it creates the file before writing
/// to it, and no result is empty.
fn result(dir: &Path) -> String {
    let path = dir.join("result");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fs::read_to_string(&path) {
            Ok(text) if !text.is_empty() => return text,
            _ => {
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for the fixture's result ({})",
                    path.display()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// The identity checkpoint records for `path` (a file of type `file_type`).
fn identity(path: impl AsRef<Path>, file_type: FileType) -> Option<FileIdentity> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).expect("stat");
    Some(FileIdentity {
        device: meta.dev(),
        inode: meta.ino(),
        file_type,
    })
}

fn by_fd(fds: &[FdInfo], fd: i32) -> &FdInfo {
    fds.iter()
        .find(|f| f.fd == fd)
        .unwrap_or_else(|| panic!("fd {fd} not saved: {fds:#?}"))
}

fn accmode(info: &FdInfo) -> i32 {
    info.flags as i32 & libc::O_ACCMODE
}

/// Forks; the child installs `prepared` and execs `fixture-files --verify`.
/// Returns the child's exit status.
fn install_and_verify(prepared: PreparedFds, dir: &Path, port: u16) -> i32 {
    let port = port.to_string();
    install_and_exec(
        prepared,
        FIXTURE,
        &["--verify", dir.to_str().unwrap(), &port],
    )
}

/// Forks; the child installs `prepared` and execs `program` with `args`.
/// Returns the child's exit status. The timerfds, which `prepare` leaves
/// unarmed for the resume, are armed first.
fn install_and_exec(mut prepared: PreparedFds, program: &str, args: &[&str]) -> i32 {
    for timerfd in prepared.take_timerfds() {
        timerfd.arm().expect("arm a timerfd");
    }
    let path = CString::new(program).unwrap();
    let args: Vec<CString> = std::iter::once(program)
        .chain(args.iter().copied())
        .map(|a| CString::new(a).unwrap())
        .collect();
    let argv: Vec<*const libc::c_char> = args
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    // SAFETY: the child only calls the async-signal-safe install_in_child,
    // execv with pointers prepared before the fork, and _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = match prepared.child_fds().install_in_child(&[]) {
            // SAFETY: `path` and `argv` are NUL-terminated and outlive the call.
            Ok(()) => unsafe {
                libc::execv(path.as_ptr(), argv.as_ptr());
                126
            },
            Err(errno) => 100 + (errno as i32 % 20),
        };
        // SAFETY: leaving the forked child without running destructors.
        unsafe { libc::_exit(code) };
    }
    // The parent's copies would keep pipes open and sockets held.
    drop(prepared);
    let mut status = 0;
    // SAFETY: waiting for the child we just forked; `status` is writable.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid);
    assert!(
        libc::WIFEXITED(status),
        "child did not exit normally: {status:#x}"
    );
    libc::WEXITSTATUS(status)
}

#[test]
fn saves_every_supported_kind_without_consuming_anything() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut fixture = start_fixture(dir.path(), port);
    let fds = save(fixture.pid()).expect("save_fds");

    let numbers: Vec<i32> = fds.iter().map(|f| f.fd).collect();
    let expected: Vec<i32> = [0, 1, 2].into_iter().chain(10..=29).collect();
    assert_eq!(numbers, expected);
    let dir_path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();

    let regular = by_fd(&fds, 10);
    assert_eq!(accmode(regular), libc::O_RDWR);
    assert!(!regular.cloexec);
    assert_eq!(
        regular.kind,
        FdKind::File {
            path: dir_path("data.txt"),
            offset: 5,
            unlinked: false,
            contents: vec![],
            identity: identity(dir_path("data.txt"), FileType::Regular),
        }
    );
    assert_eq!(by_fd(&fds, 22).shared_with, Some(10));
    assert_eq!(by_fd(&fds, 22).kind, regular.kind);

    assert_eq!(
        by_fd(&fds, 11).kind,
        FdKind::File {
            path: dir_path("gone.txt"),
            offset: 3,
            unlinked: true,
            contents: b"unlinked contents".to_vec(),
            identity: None,
        }
    );

    let FdKind::Pipe {
        inode,
        write_end: false,
        fifo_path: None,
        data,
        capacity: 131072,
        fifo_identity: None,
    } = &by_fd(&fds, 12).kind
    else {
        panic!("fd 12: {:?}", by_fd(&fds, 12));
    };
    assert_eq!(data, b"pipe data");
    assert_ne!(by_fd(&fds, 12).flags as i32 & libc::O_NONBLOCK, 0);
    assert_eq!(
        by_fd(&fds, 13).kind,
        FdKind::Pipe {
            inode: *inode,
            write_end: true,
            fifo_path: None,
            data: vec![],
            capacity: 0,
            fifo_identity: None,
        }
    );
    let FdKind::Pipe {
        write_end: false,
        fifo_path: Some(fifo),
        data,
        fifo_identity,
        ..
    } = &by_fd(&fds, 14).kind
    else {
        panic!("fd 14: {:?}", by_fd(&fds, 14));
    };
    assert_eq!(
        *fifo_identity,
        identity(fifo, FileType::Fifo),
        "the FIFO's identity"
    );
    assert_eq!(
        (fifo.as_str(), data.as_slice()),
        (dir_path("fifo").as_str(), b"fifo data".as_slice())
    );
    assert!(
        matches!(&by_fd(&fds, 15).kind, FdKind::Pipe { write_end: true, data, .. } if data.is_empty())
    );

    let null = by_fd(&fds, 16);
    assert_eq!(
        null.kind,
        FdKind::Device {
            path: "/dev/null".into(),
            identity: identity("/dev/null", FileType::CharDevice),
        }
    );
    assert_eq!(
        null.flags as i32 & (libc::O_ACCMODE | libc::O_APPEND),
        libc::O_WRONLY | libc::O_APPEND
    );

    assert_eq!(
        by_fd(&fds, 17).kind,
        FdKind::Eventfd {
            count: 7,
            semaphore: false
        }
    );
    let FdKind::Timerfd {
        clock,
        interval_ns,
        value_ns,
        settime_flags,
        ..
    } = by_fd(&fds, 18).kind
    else {
        panic!("fd 18: {:?}", by_fd(&fds, 18));
    };
    assert_eq!(
        (clock, interval_ns, settime_flags),
        (libc::CLOCK_MONOTONIC, 50_000_000, 0)
    );
    assert!(value_ns <= 50_000_000);
    assert_eq!(
        by_fd(&fds, 19).kind,
        FdKind::Signalfd {
            mask: 1 << (libc::SIGUSR2 - 1)
        }
    );

    let FdKind::Epoll { watches } = &by_fd(&fds, 20).kind else {
        panic!("fd 20: {:?}", by_fd(&fds, 20))
    };
    let mut watches = watches.clone();
    watches.sort_by_key(|w| w.fd);
    // The kernel adds EPOLLERR and EPOLLHUP to every watch.
    let input = (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP) as u32;
    assert_eq!(
        watches,
        vec![
            EpollWatch {
                fd: 12,
                events: input,
                data: 0x1200,
                file_fd: None,
            },
            EpollWatch {
                fd: 17,
                events: input | libc::EPOLLET as u32,
                data: 0x1700,
                file_fd: None,
            },
            EpollWatch {
                fd: 18,
                events: input,
                data: 0x1800,
                file_fd: None,
            },
            EpollWatch {
                fd: 23,
                events: input,
                data: 0x2300,
                file_fd: None,
            },
        ]
    );

    let FdKind::Memfd {
        name,
        offset,
        size,
        contents,
        ..
    } = &by_fd(&fds, 21).kind
    else {
        panic!("fd 21: {:?}", by_fd(&fds, 21));
    };
    assert_eq!((name.as_str(), *offset, *size), ("fixture-memfd", 2, 10));
    assert_eq!(contents, b"memfd data");

    let FdKind::TcpListener {
        local,
        backlog,
        reuseaddr,
        reuseport,
        v6only,
        options,
        ..
    } = &by_fd(&fds, 23).kind
    else {
        panic!("fd 23: {:?}", by_fd(&fds, 23));
    };
    assert_eq!(local, &format!("127.0.0.1:{port}"));
    assert_eq!(
        (*backlog, *reuseaddr, *reuseport, *v6only),
        (16, true, false, false)
    );
    let option = |level, name| {
        options
            .iter()
            .find(|o| (o.level, o.name) == (level, name))
            .map(|o| o.value)
    };
    assert_eq!(option(libc::SOL_SOCKET, libc::SO_KEEPALIVE), Some(1));
    assert_eq!(option(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), Some(77));
    assert_eq!(option(libc::IPPROTO_TCP, libc::TCP_NODELAY), None);
    assert_eq!(
        by_fd(&fds, 24).kind,
        FdKind::UnixListener {
            path: dir_path("sock"),
            socket_type: libc::SOCK_STREAM,
            backlog: 8,
            mode: Some(0o666),
            owner: Some((0, 0)),
        }
    );

    let pair = |fd| match &by_fd(&fds, fd).kind {
        FdKind::UnixPair {
            inode,
            peer_inode,
            socket_type,
            queued,
            ..
        } => (*inode, *peer_inode, *socket_type, queued.clone()),
        other => panic!("fd {fd}: {other:?}"),
    };
    let message = |data: &[u8]| QueuedMessage {
        data: data.to_vec(),
    };
    let (a, a_peer, a_type, a_queued) = pair(25);
    let (b, b_peer, _, b_queued) = pair(26);
    assert_eq!((a_peer, b_peer, a_type), (b, a, libc::SOCK_STREAM));
    assert_eq!(
        (a_queued, b_queued),
        (vec![message(b"to-25")], vec![message(b"to-26")])
    );
    let (_, _, seq_type, seq_queued) = pair(27);
    assert_eq!(seq_type, libc::SOCK_SEQPACKET);
    assert_eq!(seq_queued, vec![message(b"m1"), message(b"m2")]);
    assert!(pair(28).3.is_empty());

    let cloexec = by_fd(&fds, 29);
    assert!(cloexec.cloexec);
    assert_eq!(
        cloexec.kind,
        FdKind::Device {
            path: "/dev/null".into(),
            identity: identity("/dev/null", FileType::CharDevice),
        }
    );

    // The manifest form round-trips.
    let json = serde_json::to_string(&fds).unwrap();
    let back: Vec<FdInfo> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, fds);

    // Saving consumed nothing: the fixture still finds all its data.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fixture.pid()),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    assert_eq!(result(dir.path()), "OK");
    fixture.kill();
}

#[test]
fn prepared_fds_install_in_a_forked_child() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut fixture = start_fixture(dir.path(), port);
    let started = Instant::now();
    let fds = save(fixture.pid()).expect("save_fds");
    eprintln!(
        "save_fds of {} descriptors: {:?}",
        fds.len(),
        started.elapsed()
    );
    // As after a checkpoint: the original is gone, its port and socket path free.
    fixture.kill();

    let started = Instant::now();
    let prepared = prepare(&fds, InheritedFds::default(), &PathAccess::default()).expect("prepare");
    eprintln!("prepare: {:?}", started.elapsed());
    assert_eq!(prepared.max_target_fd(), 29);
    let status = install_and_verify(prepared, dir.path(), port);
    assert_eq!(status, 0, "fixture --verify exited with {status}");
    assert_eq!(result(dir.path()), "OK");
}

#[test]
fn inherited_listener_is_installed_as_is() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut fixture = start_fixture(dir.path(), port);
    let fds = save(fixture.pid()).expect("save_fds");
    fixture.kill();

    // The daemon's listener: a client connects while the service is parked.
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    listener.set_nonblocking(true).unwrap();
    // The original socket had these; the fixture checks them.
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(&listener, sockopt::KeepAlive, &true).unwrap();
    setsockopt(&listener, sockopt::TcpKeepIdle, &77).unwrap();
    let mut parked_client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut inherited = InheritedFds::new();
    inherited.insert(23, OwnedFd::from(listener.try_clone().unwrap()));

    let prepared = prepare(&fds, inherited, &PathAccess::default()).expect("prepare");
    assert_eq!(install_and_verify(prepared, dir.path(), port), 0);
    // The fixture's checks pass only if they accept their own connection,
    // which queued behind ours: so ours was accepted by the restored process,
    // and closed when it exited.
    assert_eq!(result(dir.path()), "OK");
    parked_client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        parked_client.read(&mut buf).unwrap(),
        0,
        "parked connection was not accepted"
    );
    drop(listener);
}

#[test]
fn inherited_listener_on_another_address_is_refused() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut fixture = start_fixture(dir.path(), port);
    let fds = save(fixture.pid()).expect("save_fds");
    fixture.kill();

    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let other_addr = other.local_addr().unwrap();
    let mut inherited = InheritedFds::new();
    inherited.insert(23, OwnedFd::from(other));
    let err = prepare(&fds, inherited, &PathAccess::default())
        .expect_err("a listener on the wrong port must be refused");
    assert_eq!(
        err.to_string(),
        format!(
            "fd 23: invalid image: inherited socket is bound to {other_addr}, the image has 127.0.0.1:{port}"
        )
    );
}

#[test]
fn missing_file_is_reported_with_fd_and_path() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut fixture = start_fixture(dir.path(), port);
    let fds = save(fixture.pid()).expect("save_fds");
    fixture.kill();
    fs::remove_file(dir.path().join("data.txt")).unwrap();
    let err = prepare(&fds, InheritedFds::default(), &PathAccess::default())
        .expect_err("data.txt is gone");
    let path: PathBuf = dir.path().join("data.txt");
    assert_eq!(
        err.to_string(),
        format!(
            "fd 10: reopening {}: No such file or directory (os error 2)",
            path.display()
        )
    );
}

/// A flock taken by another live process on an open file it shares with
/// the one checkpointed cannot be attributed: it is refused by descriptor,
/// naming the file and the taker, rather than restored as the process's.
#[test]
fn a_flock_shared_with_its_live_taker_is_refused() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let script = "import fcntl, os, sys, time\n\
        fd = os.open(sys.argv[1] + '/locked', os.O_WRONLY | os.O_CREAT)\n\
        os.dup2(fd, 40); os.close(fd)\n\
        fcntl.flock(40, fcntl.LOCK_EX)\n\
        if os.fork() == 0:\n\
        \x20   open(sys.argv[1] + '/ready', 'w').close()\n\
        \x20   time.sleep(60)\n\
        time.sleep(60)\n";
    let python = start_python(dir.path(), script);
    let taker = python.pid();
    let sharer = persist_tests::wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(format!("/proc/{taker}/task/{taker}/children"))
            .is_ok_and(|c| !c.trim().is_empty())
    })
    .map(|()| {
        std::fs::read_to_string(format!("/proc/{taker}/task/{taker}/children"))
            .unwrap()
            .trim()
            .parse::<i32>()
            .unwrap()
    })
    .expect("the forked sharer");
    let fds = save(sharer).expect("its descriptors are supported");
    let err = save_locks(sharer, &fds).expect_err("the lock is its parent's");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sharer),
        nix::sys::signal::Signal::SIGKILL,
    );
    let locked = dir.path().join("locked");
    assert_eq!(
        err.to_string(),
        format!(
            "fd 40: {}: the FLOCK lock was taken by pid {taker}, which shares its open file: \
             it cannot be attributed to pid {sharer}",
            locked.display()
        )
    );
}

#[test]
fn excluded_descriptors_are_left_out() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let script = "import ctypes, os, sys, time\n\
        fd = ctypes.CDLL(None).fanotify_init(0, 0)\n\
        os.dup2(fd, 40); os.close(fd)\n\
        open(sys.argv[1] + '/ready', 'w').close()\n\
        time.sleep(60)\n";
    let python = start_python(dir.path(), script);
    let err = save(python.pid()).expect_err("fanotify must be refused");
    assert_eq!(err.to_string(), "fd 40: fanotify is not supported");
    // A descriptor persist itself placed can be left out.
    let pidfd = PidFd::open(python.pid()).unwrap();
    let fds = save_fds_excluding(python.pid(), &pidfd, &[40]).expect("fd 40 left out");
    assert!(fds.iter().all(|f| f.fd != 40));
}

/// Saving the descriptors of a running process takes its connection out of
/// repair mode again, untouched: its queues are read, not consumed, and it
/// goes on working. A connection that is no longer established (here in
/// CLOSE_WAIT, its peer gone) is refused by name.
#[test]
fn established_tcp_connection_is_saved_and_left_working() {
    persist_tests::require_root!();
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        "import os, socket, sys, time\n\
         s = socket.create_connection(('127.0.0.1', {port}))\n\
         s.sendall(b'to-server')\n\
         os.dup2(s.fileno(), 41); s.close()\n\
         time.sleep(0.2)\n\
         open(sys.argv[1] + '/ready', 'w').close()\n\
         time.sleep(60)\n"
    );
    let python = start_python_without_waiting(dir.path(), &script);
    let (mut server_side, client) = listener.accept().unwrap();
    server_side.write_all(b"unread").unwrap();
    wait_until_ready(&python, dir.path(), "python3");

    let fds = save(python.pid()).expect("an established connection is saved");
    let FdKind::TcpConnection(saved) = &by_fd(&fds, 41).kind else {
        panic!("fd 41 saved as {:?}", by_fd(&fds, 41).kind);
    };
    assert_eq!(saved.local, client.to_string(), "local address");
    assert_eq!(saved.peer, format!("127.0.0.1:{port}"), "peer address");
    assert_eq!(saved.recv_queue, b"unread", "the unread bytes are saved");
    assert!(
        saved.send_queue.is_empty(),
        "the peer acknowledged everything"
    );

    let sock = PidFd::open(python.pid()).unwrap().get_fd(41).unwrap();
    let repair = persist_agent::sys::kobjects::sockopt_int(
        std::os::fd::AsFd::as_fd(&sock),
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR,
    )
    .unwrap();
    assert_eq!(repair, 0, "the connection left repair mode");
    let mut buf = [0u8; 9];
    server_side.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"to-server", "the connection still carries its data");

    drop(server_side);
    drop(sock);
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match save(python.pid()) {
            Err(err) => break err,
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(_) => panic!("a connection whose peer closed must be refused"),
        }
    };
    assert_eq!(
        err.to_string(),
        format!(
            "fd 41: TCP connection {client} -> 127.0.0.1:{port} in state CLOSE_WAIT cannot be \
             checkpointed"
        )
    );
}

/// Runs `persist-agent ARGS` and returns its stdout, failing with its stderr.
fn agent(args: &[&str]) -> String {
    let output = Command::new(persist_tests::binary("persist-agent"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run persist-agent");
    assert!(
        output.status.success(),
        "persist-agent {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn fixture_files_restores_twice_from_one_image() {
    persist_tests::require_root!();
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("state");
    fs::create_dir(&dir).unwrap();
    let image = temp.path().join("image");
    let image_arg = image.to_str().unwrap();
    let port = free_port();
    let mut fixture = start_fixture(&dir, port);
    agent(&[
        "checkpoint",
        "--pid",
        &fixture.pid().to_string(),
        "--image",
        image_arg,
    ]);
    fixture.kill();

    for round in 1..=2 {
        let _ = fs::remove_file(dir.join("result"));
        let (pid, outcome) = restore_and_ask(image_arg, &dir);
        assert_eq!(outcome, "OK", "restore {round} (pid {pid})");
    }
}

/// Restores the image, sends the process SIGUSR1 and returns its pid and
/// what it then wrote to `DIR/result`; the process is killed either way.
fn restore_and_ask(image_arg: &str, dir: &Path) -> (i32, String) {
    let stdout = agent(&["restore", "--image", image_arg]);
    let pid: i32 = stdout
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("restore prints the pid");
    let restored = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(restored, nix::sys::signal::Signal::SIGUSR1).unwrap();
    let outcome = std::panic::catch_unwind(|| result(dir));
    // Gone, its listening port closed, before the next restore binds it.
    let process = persist_agent::sys::pidfd::PidFd::open(pid).ok();
    let _ = nix::sys::signal::kill(restored, nix::sys::signal::Signal::SIGKILL);
    if let Some(process) = process {
        assert!(
            process.wait_exit(std::time::Duration::from_secs(10)),
            "restored pid {pid} did not die of SIGKILL"
        );
    }
    (pid, outcome.expect("a result").trim().to_owned())
}

/// Holds its own stat file (twice, sharing one offset) and its main
/// thread's comm (read up to offset 3); on SIGUSR1 writes `OK` to
/// `DIR/result` if they describe the process it is then.
const OWN_PROC_FILES_SCRIPT: &str = r#"import os, signal, sys
def hold(path, fd):
    opened = os.open(path, os.O_RDONLY)
    os.dup2(opened, fd)
    os.close(opened)
hold(f'/proc/{os.getpid()}/stat', 42)
os.dup2(42, 43)
hold('/proc/thread-self/comm', 44)
os.read(44, 3)
def report(*_):
    os.lseek(42, 0, os.SEEK_SET)
    stat_pid = int(os.read(43, 4096).split()[0])
    rest = os.read(44, 100).decode().strip()
    ok = stat_pid == os.getpid() and rest == 'hon3'
    with open(sys.argv[1] + '/result', 'w') as f:
        f.write('OK' if ok else f'stat of {stat_pid} in {os.getpid()}, comm rest {rest!r}')
signal.signal(signal.SIGUSR1, report)
open(sys.argv[1] + '/ready', 'w').close()
while True:
    signal.pause()
"#;

/// Holds a stat file of a thread other than the main one at fd 45.
const THREAD_PROC_FILE_SCRIPT: &str = r#"import os, sys, threading, time
def hold():
    opened = os.open('/proc/thread-self/stat', os.O_RDONLY)
    os.dup2(opened, 45)
    os.close(opened)
    open(sys.argv[1] + '/ready', 'w').close()
    time.sleep(60)
threading.Thread(target=hold, daemon=True).start()
time.sleep(60)
"#;

/// A server holding its own `/proc/PID/stat` open (as Redis does for a moment
/// in every `serverCron`) gets, after a restore, that file of the restored
/// process: the agent cannot open it for a process that does not exist yet,
/// and a file of any other process would report the wrong statistics.
#[test]
fn own_proc_files_name_the_restored_process() {
    persist_tests::require_root!();
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("state");
    fs::create_dir(&dir).unwrap();
    let image = temp.path().join("image");
    let image_arg = image.to_str().unwrap();
    let mut python = start_python(&dir, OWN_PROC_FILES_SCRIPT);
    let fds = save(python.pid()).expect("save_fds");
    for (fd, path) in [
        (42, "/proc/self/stat"),
        (43, "/proc/self/stat"),
        (44, "/proc/thread-self/comm"),
    ] {
        assert!(
            matches!(&by_fd(&fds, fd).kind, FdKind::File { path: saved, .. } if saved == path),
            "fd {fd}: {:?}",
            by_fd(&fds, fd).kind
        );
    }
    assert_eq!(by_fd(&fds, 43).shared_with, Some(42));
    agent(&[
        "checkpoint",
        "--pid",
        &python.pid().to_string(),
        "--image",
        image_arg,
    ]);
    python.kill();

    assert_eq!(restore_and_ask(image_arg, &dir).1, "OK");
}

#[test]
fn another_threads_proc_file_is_refused() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let python = start_python(dir.path(), THREAD_PROC_FILE_SCRIPT);
    let message = save(python.pid()).expect_err("must be refused").to_string();
    assert!(
        message.starts_with("fd 45: /proc/") && message.contains("is a /proc file of thread"),
        "{message}"
    );
}

/// Saves a python3 process holding listeners, kills it, and re-creates them
/// with `prepare`, which binds and listens in this process: they accept
/// connections before any child exists.
#[test]
fn ipv6_and_abstract_listeners_come_back() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let abstract_name = format!("persist-files-test-{}", std::process::id());
    let script = format!(
        "import os, socket, sys, time\n\
         t = socket.socket(socket.AF_INET6)\n\
         t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)\n\
         t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n\
         t.bind(('::1', {port})); t.listen(5)\n\
         os.dup2(t.fileno(), 50); t.close()\n\
         u = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n\
         u.bind('\\0{abstract_name}'); u.listen(3)\n\
         os.dup2(u.fileno(), 51); u.close()\n\
         open(sys.argv[1] + '/ready', 'w').close()\n\
         time.sleep(60)\n"
    );
    let mut python = start_python(dir.path(), &script);
    let fds = save(python.pid()).expect("save_fds");
    let mut tcp = by_fd(&fds, 50).kind.clone();
    if let FdKind::TcpListener { inode, options, .. } = &mut tcp {
        *inode = 0;
        options.clear(); // keepalive timing defaults, checked elsewhere
    }
    assert_eq!(
        tcp,
        FdKind::TcpListener {
            local: format!("[::1]:{port}"),
            inode: 0,
            backlog: 5,
            reuseaddr: false,
            reuseport: true,
            v6only: true,
            options: vec![],
            // python runs as root here: its socket is root's.
            owner_uid: Some(0),
        }
    );
    assert_eq!(
        by_fd(&fds, 51).kind,
        FdKind::UnixListener {
            path: format!("@{abstract_name}"),
            socket_type: libc::SOCK_SEQPACKET,
            backlog: 3,
            mode: None,
            owner: None,
        }
    );
    python.kill();

    let prepared = prepare(&fds, InheritedFds::default(), &PathAccess::default()).expect("prepare");
    TcpStream::connect(("::1", port)).expect("the re-created IPv6 listener accepts");
    let addr = nix::sys::socket::UnixAddr::new_abstract(abstract_name.as_bytes()).unwrap();
    let client = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&client), &addr)
        .expect("the re-created abstract listener accepts");
    drop(prepared);
}

/// A pipe read end whose writer was another process comes back holding the
/// saved data, then end-of-file; a write end whose reader was another
/// process comes back as /dev/null, so writes neither fail nor kill.
#[test]
fn pipe_ends_with_the_other_end_outside() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let script = "import os, subprocess, sys, time\n\
        r, w = os.pipe(); os.write(w, b'lonely')\n\
        r2, w2 = os.pipe()\n\
        p = subprocess.Popen(['sleep', '60'], pass_fds=[w, r2])\n\
        open(sys.argv[1] + '/helper', 'w').write(str(p.pid))\n\
        os.dup2(r, 52); os.dup2(w2, 53)\n\
        [os.close(fd) for fd in (r, w, r2, w2)]\n\
        open(sys.argv[1] + '/ready', 'w').close()\n\
        time.sleep(60)\n";
    let fds = save_with_helper(dir.path(), script);

    assert!(
        matches!(&by_fd(&fds, 52).kind, FdKind::Pipe { write_end: false, fifo_path: None, data, .. } if data == b"lonely")
    );
    assert!(
        matches!(&by_fd(&fds, 53).kind, FdKind::Pipe { write_end: true, fifo_path: None, data, .. } if data.is_empty())
    );

    let prepared = prepare(&fds, InheritedFds::default(), &PathAccess::default()).expect("prepare");
    let check = "import os, stat, sys\n\
        ok = os.read(52, 100) == b'lonely' and os.read(52, 100) == b''\n\
        ok = ok and stat.S_ISCHR(os.fstat(53).st_mode) and os.write(53, b'x') == 1\n\
        open(sys.argv[1] + '/result', 'w').write('OK' if ok else 'FAIL')\n";
    let status = install_and_exec(
        prepared,
        "/usr/bin/python3",
        &["-c", check, dir.path().to_str().unwrap()],
    );
    assert_eq!(status, 0);
    assert_eq!(result(dir.path()), "OK");
}

/// The watch stays while the pipe is still open through the dup, keyed by
/// the number it was added with: it is saved with the dup as its holder.
#[test]
fn epoll_watch_of_a_closed_descriptor_is_saved_with_its_holder() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let script = "import os, select, sys, time\n\
        r, w = os.pipe()\n\
        os.dup2(r, 60); os.close(r)\n\
        ep = select.epoll(); os.dup2(ep.fileno(), 61); ep.close()\n\
        ep = select.epoll.fromfd(61); ep.register(60, select.EPOLLIN)\n\
        os.dup2(60, 62); os.close(60)\n\
        open(sys.argv[1] + '/ready', 'w').close()\n\
        time.sleep(60)\n";
    let python = start_python(dir.path(), script);
    let fds = save(python.pid()).expect("save_fds");
    let FdKind::Epoll { watches } = &by_fd(&fds, 61).kind else {
        panic!("fd 61: {:?}", by_fd(&fds, 61));
    };
    assert_eq!(
        watches
            .iter()
            .map(|w| (w.fd, w.file_fd))
            .collect::<Vec<_>>(),
        vec![(60, Some(62))],
        "the watch added as fd 60, held through fd 62"
    );
}

#[test]
fn udp_sockets_are_bound_and_connected_again() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let script = format!(
        "import os, socket, sys, time\n\
         a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); a.bind(('127.0.0.1', {port}))\n\
         b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); b.connect(('127.0.0.1', {port}))\n\
         os.dup2(a.fileno(), 55); os.dup2(b.fileno(), 56); a.close(); b.close()\n\
         open(sys.argv[1] + '/ready', 'w').close()\n\
         time.sleep(60)\n"
    );
    let mut python = start_python(dir.path(), &script);
    let fds = save(python.pid()).expect("save_fds");
    python.kill();
    assert_eq!(
        by_fd(&fds, 55).kind,
        FdKind::UdpSocket {
            local: format!("127.0.0.1:{port}"),
            peer: None,
            reuseaddr: false,
            reuseport: false,
            v6only: false,
            options: vec![],
        }
    );
    let FdKind::UdpSocket { peer, .. } = &by_fd(&fds, 56).kind else {
        panic!("fd 56: {:?}", by_fd(&fds, 56));
    };
    assert_eq!(peer.as_deref(), Some(format!("127.0.0.1:{port}").as_str()));

    let prepared = prepare(&fds, InheritedFds::default(), &PathAccess::default()).expect("prepare");
    let check = "import socket, sys\n\
        port = int(sys.argv[2])\n\
        a = socket.socket(fileno=55); b = socket.socket(fileno=56)\n\
        ok = a.getsockname() == ('127.0.0.1', port) and b.getpeername() == ('127.0.0.1', port)\n\
        b.send(b'u'); ok = ok and a.recv(10) == b'u'\n\
        open(sys.argv[1] + '/result', 'w').write('OK' if ok else 'FAIL')\n";
    let port = port.to_string();
    let status = install_and_exec(
        prepared,
        "/usr/bin/python3",
        &["-c", check, dir.path().to_str().unwrap(), &port],
    );
    assert_eq!(status, 0);
    assert_eq!(result(dir.path()), "OK");
}

/// A terminal is saved by path; once it is gone, /dev/null takes its place.
#[test]
fn vanished_terminal_becomes_dev_null() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let script = "import os, subprocess, sys, time\n\
        m, s = os.openpty()\n\
        p = subprocess.Popen(['sleep', '60'], pass_fds=[m])\n\
        open(sys.argv[1] + '/helper', 'w').write(str(p.pid))\n\
        open(sys.argv[1] + '/tty', 'w').write(os.ttyname(s))\n\
        os.dup2(s, 57); os.close(s); os.close(m)\n\
        open(sys.argv[1] + '/ready', 'w').close()\n\
        time.sleep(60)\n";
    let fds = save_with_helper(dir.path(), script);
    let tty = fs::read_to_string(dir.path().join("tty")).unwrap();
    assert!(
        matches!(&by_fd(&fds, 57).kind, FdKind::Device { path, identity: Some(id) } if *path == tty && id.file_type == FileType::CharDevice),
        "fd 57: {:?}",
        by_fd(&fds, 57).kind
    );

    // The pty goes away once its master (held by the helper) is closed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&tty).exists() {
        assert!(Instant::now() < deadline, "{tty} did not go away");
        std::thread::sleep(Duration::from_millis(10));
    }
    let prepared = prepare(&fds, InheritedFds::default(), &PathAccess::default()).expect("prepare");
    let check = "import os, sys\n\
        ok = os.fstat(57).st_rdev == os.makedev(1, 3)\n\
        open(sys.argv[1] + '/result', 'w').write('OK' if ok else 'FAIL')\n";
    let status = install_and_exec(
        prepared,
        "/usr/bin/python3",
        &["-c", check, dir.path().to_str().unwrap()],
    );
    assert_eq!(status, 0);
    assert_eq!(result(dir.path()), "OK");
}

/// Saves a python3 process whose fd 44 is set up by `setup` (a Python
/// expression giving a descriptor) and returns the error.
fn refusal(setup: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "import ctypes, os, sys, time\n\
         fd = {setup}\n\
         os.dup2(fd, 44); os.close(fd)\n\
         open(sys.argv[1] + '/ready', 'w').close()\n\
         time.sleep(60)\n"
    );
    let python = start_python(dir.path(), &script);
    save(python.pid()).expect_err("must be refused").to_string()
}

#[test]
fn other_kernel_objects_are_refused_by_name() {
    persist_tests::require_root!();
    assert_eq!(
        refusal("os.pidfd_open(os.getpid())"),
        "fd 44: pidfd is not supported"
    );
    assert_eq!(
        refusal("ctypes.CDLL(None, use_errno=True).syscall(323, 0)"),
        "fd 44: userfaultfd is not supported"
    );
    assert_eq!(
        refusal("os.open('/dev/ptmx', os.O_RDWR | os.O_NOCTTY)"),
        "fd 44: device /dev/ptmx (5:2) is not supported"
    );
    assert_eq!(
        refusal("ctypes.CDLL(None).fanotify_init(0, 0)"),
        "fd 44: fanotify is not supported"
    );
}

/// How long `install_in_child` takes for the fixture's 23 descriptors,
/// measured in the child with raw calls only and reported through a pipe it
/// keeps.
#[test]
fn install_in_child_timing() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut fixture = start_fixture(dir.path(), port);
    let fds = save(fixture.pid()).expect("save_fds");
    fixture.kill();
    let prepared = prepare(&fds, InheritedFds::default(), &PathAccess::default()).expect("prepare");

    let (report_read, report_write) = nix::unistd::pipe().unwrap();
    // Numbered above every target, as the restore does with what it keeps.
    let above = nix::fcntl::fcntl(
        &report_write,
        nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(prepared.max_target_fd() + 1),
    )
    .unwrap();
    // SAFETY: fcntl just returned this new descriptor; nothing else owns it.
    let report_write = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(above) };
    let keep = [std::os::fd::AsRawFd::as_raw_fd(&report_write)];
    // SAFETY: the child only reads the clock, calls the async-signal-safe
    // install_in_child, writes to a pipe and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let now = || {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `ts` is writable.
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
            ts.tv_sec * 1_000_000_000 + ts.tv_nsec
        };
        let started = now();
        let outcome = prepared.child_fds().install_in_child(&keep);
        let report: [i64; 2] = [now() - started, outcome.map_or_else(|e| e as i64, |()| 0)];
        // SAFETY: `report` is 16 readable bytes; then leaving without destructors.
        unsafe {
            libc::write(keep[0], report.as_ptr().cast(), 16);
            libc::_exit(0);
        }
    }
    drop(prepared);
    drop(report_write);
    let mut bytes = [0u8; 16];
    std::fs::File::from(report_read)
        .read_exact(&mut bytes)
        .unwrap();
    let mut status = 0;
    // SAFETY: waiting for the child we forked; `status` is writable.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    let elapsed_ns = i64::from_ne_bytes(bytes[..8].try_into().unwrap());
    let errno = i64::from_ne_bytes(bytes[8..].try_into().unwrap());
    assert_eq!(errno, 0, "install_in_child failed");
    eprintln!(
        "install_in_child of {} descriptors: {} µs",
        fds.len(),
        elapsed_ns / 1000
    );
}

#[test]
fn unix_listener_on_a_relative_path_is_saved_absolute() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let script = "import os, socket, sys, time\n\
        os.chdir(sys.argv[1])\n\
        u = socket.socket(socket.AF_UNIX); u.bind('rel.sock'); u.listen(4)\n\
        os.dup2(u.fileno(), 45); u.close()\n\
        open('ready', 'w').close()\n\
        time.sleep(60)\n";
    let python = start_python(dir.path(), script);
    let fds = save(python.pid()).expect("save_fds");
    let FdKind::UnixListener { path, .. } = &by_fd(&fds, 45).kind else {
        panic!("fd 45: {:?}", by_fd(&fds, 45));
    };
    assert_eq!(Path::new(path), dir.path().join("rel.sock"));
}

/// A FIFO read end whose writer was another process: reopened by path,
/// refilled, then end-of-file.
#[test]
fn fifo_read_end_alone() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let script = "import os, select, subprocess, sys, time\n\
        fifo = sys.argv[1] + '/fifo'; os.mkfifo(fifo)\n\
        r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)\n\
        p = subprocess.Popen(['sh', '-c', 'printf fifo-lonely > \"$0\"; exec sleep 60', fifo])\n\
        open(sys.argv[1] + '/helper', 'w').write(str(p.pid))\n\
        select.select([r], [], [], 5)\n\
        os.dup2(r, 46); os.close(r)\n\
        open(sys.argv[1] + '/ready', 'w').close()\n\
        time.sleep(60)\n";
    let fds = save_with_helper(dir.path(), script);
    let fifo = dir.path().join("fifo").to_string_lossy().into_owned();
    assert!(
        matches!(
            &by_fd(&fds, 46).kind,
            FdKind::Pipe { write_end: false, fifo_path: Some(path), data, .. } if *path == fifo && data == b"fifo-lonely"
        ),
        "{:?}",
        by_fd(&fds, 46)
    );

    let prepared = prepare(&fds, InheritedFds::default(), &PathAccess::default()).expect("prepare");
    let check = "import os, sys\n\
        os.set_blocking(46, True)\n\
        ok = os.read(46, 100) == b'fifo-lonely' and os.read(46, 100) == b''\n\
        open(sys.argv[1] + '/result', 'w').write('OK' if ok else 'FAIL')\n";
    let status = install_and_exec(
        prepared,
        "/usr/bin/python3",
        &["-c", check, dir.path().to_str().unwrap()],
    );
    assert_eq!(status, 0);
    assert_eq!(result(dir.path()), "OK");
}
