//! The number a restored process keeps its userfaultfd at is chosen above
//! its own descriptors, but it is a number the agent may use for something
//! else: here, for the very socket it hands the process. The process must
//! get the socket at the socket's number, and the userfaultfd (still
//! non-blocking, as the pager needs it) at its own.
//!
//! One test in its own binary: it places a descriptor at a chosen number
//! of the test process, which no other test thread may be using.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::Arc;

use persist_agent::files::InheritedFds;
use persist_agent::restore::{RestoreConfig, Skeleton};
use persist_common::image::Image;
use persist_tests::{NetNs, binary};

/// The number the restore gives a process's userfaultfd: above its
/// descriptors, and at least 100 (restore/setup.rs).
fn uffd_number(image: &Image) -> i32 {
    let highest = image
        .manifest()
        .fds
        .iter()
        .map(|fd| fd.fd)
        .max()
        .unwrap_or(0);
    (highest + 1).max(100)
}

fn link(pid: i32, fd: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|target| target.display().to_string())
        .unwrap_or_else(|err| format!("({err})"))
}

#[test]
fn a_handed_socket_at_the_userfaultfd_number_stays_a_socket() {
    persist_tests::require_root!();
    const PORT: u16 = 8801;
    let netns = NetNs::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    let mut server = netns
        .command(binary("hello-server"))
        .arg(format!("127.0.0.1:{PORT}"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    persist_tests::wait_until(std::time::Duration::from_secs(10), || {
        netns
            .enter(|| std::net::TcpStream::connect(("127.0.0.1", PORT)).is_ok())
            .unwrap()
    })
    .expect("hello-server listens");
    let checkpoint = netns
        .command(binary("persist-agent"))
        .args(["checkpoint", "--pid", &server.id().to_string(), "--image"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        checkpoint.status.success(),
        "checkpoint: {}",
        String::from_utf8_lossy(&checkpoint.stderr)
    );
    let _ = server.kill();
    let _ = server.wait();

    let image = Arc::new(Image::open(&image).unwrap());
    let listener_fd = persist_agent::snapshot::listener_fd_in_image(image.manifest(), PORT)
        .expect("the image records the listener");
    let uffd_at = uffd_number(&image);
    // The socket the agent hands over, held at the number the process's
    // userfaultfd takes.
    let socket = netns
        .enter(|| std::net::TcpListener::bind(("127.0.0.1", PORT)))
        .unwrap()
        .unwrap();
    // SAFETY: F_DUPFD on a descriptor we own; the new one is owned below.
    let at = unsafe { libc::fcntl(socket.as_raw_fd(), libc::F_DUPFD_CLOEXEC, uffd_at) };
    assert_eq!(at, uffd_at, "fd {uffd_at} of this test process is free");
    // SAFETY: `at` was just made by F_DUPFD and nothing else owns it.
    let held = unsafe { OwnedFd::from_raw_fd(at) };
    drop(socket);
    let inode = nix::sys::stat::fstat(&held).unwrap().st_ino;
    let mut inherited = InheritedFds::new();
    inherited.insert(listener_fd, held);

    let skeleton = Skeleton::prepare(
        image,
        RestoreConfig {
            inherited,
            ..RestoreConfig::default()
        },
    )
    .expect("prepare");
    let pid = skeleton.pid();
    let listener = link(pid, listener_fd);
    let uffd = link(pid, uffd_at);
    let flags = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{uffd_at}")).unwrap();
    drop(skeleton);

    assert_eq!(
        listener,
        format!("socket:[{inode}]"),
        "fd {listener_fd} of the restored process is the socket handed to it"
    );
    assert_eq!(uffd, "anon_inode:[userfaultfd]");
    let flags = flags
        .lines()
        .find_map(|line| line.strip_prefix("flags:"))
        .and_then(|value| i32::from_str_radix(value.trim(), 8).ok())
        .expect("fdinfo flags");
    assert_ne!(
        flags & libc::O_NONBLOCK,
        0,
        "the userfaultfd is still non-blocking (flags {flags:o})"
    );
}
