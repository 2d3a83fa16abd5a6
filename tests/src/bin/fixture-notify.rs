//! Test fixture: an inotify instance with a gap in its watch descriptors,
//! and an epoll instance watching a pipe through a descriptor it closed.
//!
//! `fixture-notify DIR` sets up the descriptors below, writes `DIR/ready`,
//! and on each SIGUSR1 checks them from inside (after a restore, that is
//! the restored process) and writes `DIR/result`: `OK` or `FAIL: what`.
//!
//! | fd | what |
//! | -- | ---- |
//! | 10 | inotify, non-blocking, close-on-exec: wd 1 on `DIR/watched` (create, moved-to), wd 2 removed, wd 3 on `DIR/second` (create, one-shot); nothing queued |
//! | 20 | epoll: watch added as fd 21 on the pipe's read end (data 0x2100), which 21 no longer is; watch added as fd 21 on the eventfd (data 0x2101) |
//! | 21 | eventfd, count 0 |
//! | 22 | the pipe's read end (the `dup` that keeps it open), non-blocking |
//! | 23 | the pipe's write end |

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs;
use std::path::Path;

const INOTIFY: i32 = 10;
const EPOLL: i32 = 20;
const REUSED: i32 = 21;
const PIPE_READ: i32 = 22;
const PIPE_WRITE: i32 = 23;

const WATCHED_MASK: u32 = libc::IN_CREATE | libc::IN_MOVED_TO;
const SECOND_MASK: u32 = libc::IN_CREATE | libc::IN_ONESHOT;
const PIPE_DATA: u64 = 0x2100;
const EVENTFD_DATA: u64 = 0x2101;

type Check = Result<(), String>;

/// Turns a -1 return into an error naming the call.
fn ok(rc: libc::c_long, what: &str) -> Result<libc::c_long, String> {
    if rc < 0 {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    } else {
        Ok(rc)
    }
}

fn cpath(path: &Path) -> CString {
    CString::new(path.to_str().expect("UTF-8 fixture paths")).expect("no NUL in fixture paths")
}

/// Moves `fd` to number `target` and closes `fd`.
fn place(fd: libc::c_long, target: i32, cloexec: bool, what: &str) -> Check {
    let fd = ok(fd, what)? as i32;
    let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
    // SAFETY: dup3 and close take integers; the fixture owns these numbers.
    unsafe {
        ok(libc::dup3(fd, target, flags).into(), what)?;
        libc::close(fd);
    }
    Ok(())
}

fn same<T: std::fmt::Debug + PartialEq>(what: &str, got: T, want: T) -> Check {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

fn add_watch(dir: &Path, mask: u32) -> Result<i32, String> {
    let path = cpath(dir);
    // SAFETY: `path` is NUL-terminated and outlives the call.
    let wd = unsafe { libc::inotify_add_watch(INOTIFY, path.as_ptr(), mask) };
    Ok(ok(wd.into(), &format!("inotify_add_watch {}", dir.display()))? as i32)
}

fn epoll_add(fd: i32, data: u64) -> Check {
    let mut event = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: data,
    };
    // SAFETY: `event` is a valid epoll_event for the call.
    let rc = unsafe { libc::epoll_ctl(EPOLL, libc::EPOLL_CTL_ADD, fd, &mut event) };
    ok(rc.into(), &format!("epoll_ctl add {fd}")).map(drop)
}

/// One inotify event: watch descriptor, mask and name.
#[derive(Debug, PartialEq)]
struct Event {
    wd: i32,
    mask: u32,
    name: String,
}

/// Every event queued on the inotify instance (it is non-blocking).
fn read_events() -> Result<Vec<Event>, String> {
    let mut buf = [0u8; 4096];
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::read(INOTIFY, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EAGAIN) {
            return Ok(Vec::new());
        }
        return Err(format!("read inotify: {err}"));
    }
    let mut events = Vec::new();
    let mut at = 0;
    let header = std::mem::size_of::<libc::inotify_event>();
    while at + header <= n as usize {
        let word = |offset: usize| {
            u32::from_ne_bytes(
                buf[at + offset..at + offset + 4]
                    .try_into()
                    .expect("4 bytes"),
            )
        };
        let len = word(12) as usize;
        let name = &buf[at + header..at + header + len];
        let name = name.split(|&b| b == 0).next().unwrap_or_default();
        events.push(Event {
            wd: word(0) as i32,
            mask: word(4),
            name: String::from_utf8_lossy(name).into_owned(),
        });
        at += header + len;
    }
    Ok(events)
}

fn setup(dir: &Path) -> Check {
    let set = sigset(libc::SIGUSR1);
    // SAFETY: `set` is a valid sigset; the old mask may be null.
    let blocked = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    ok(blocked.into(), "sigprocmask")?;
    for name in ["watched", "gap", "second"] {
        fs::create_dir(dir.join(name)).map_err(|e| format!("mkdir {name}: {e}"))?;
    }
    // SAFETY: inotify_init1 takes flags only.
    let instance = unsafe { libc::inotify_init1(libc::IN_NONBLOCK) };
    place(instance.into(), INOTIFY, true, "inotify_init1")?;
    same(
        "wd of watched",
        add_watch(&dir.join("watched"), WATCHED_MASK)?,
        1,
    )?;
    let gap = add_watch(&dir.join("gap"), libc::IN_CREATE)?;
    same("wd of gap", gap, 2)?;
    // SAFETY: inotify_rm_watch takes integers.
    let removed = unsafe { libc::inotify_rm_watch(INOTIFY, gap) };
    ok(removed.into(), "inotify_rm_watch")?;
    same(
        "wd of second",
        add_watch(&dir.join("second"), SECOND_MASK)?,
        3,
    )?;
    // The removal queued IN_IGNORED: read it, so nothing is queued.
    same(
        "events after the removal",
        read_events()?,
        vec![Event {
            wd: 2,
            mask: libc::IN_IGNORED,
            name: String::new(),
        }],
    )?;

    // SAFETY: epoll_create1, pipe2, dup2, close and eventfd take integers
    // or a writable array of two ints.
    unsafe {
        place(libc::epoll_create1(0).into(), EPOLL, false, "epoll_create1")?;
        let mut fds = [0i32; 2];
        ok(
            libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK).into(),
            "pipe2",
        )?;
        place(fds[0].into(), REUSED, false, "pipe read end")?;
        place(fds[1].into(), PIPE_WRITE, false, "pipe write end")?;
        epoll_add(REUSED, PIPE_DATA)?;
        ok(libc::dup2(REUSED, PIPE_READ).into(), "dup2")?;
        libc::close(REUSED);
        place(libc::eventfd(0, 0).into(), REUSED, false, "eventfd")?;
    }
    epoll_add(REUSED, EVENTFD_DATA)
}

fn sigset(signal: i32) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset adds a valid signal.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        set
    }
}

/// `(key, value)` words of the lines of `/proc/self/fdinfo/FD` that start
/// with `prefix`, values as hex.
fn fdinfo_lines(fd: i32, prefix: &str) -> Result<Vec<Vec<(String, u64)>>, String> {
    let text = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).map_err(|e| e.to_string())?;
    Ok(text
        .lines()
        .filter_map(|line| line.strip_prefix(prefix))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|word| {
                    let (key, value) = word.split_once(':')?;
                    Some((key.to_owned(), u64::from_str_radix(value, 16).ok()?))
                })
                .collect()
        })
        .collect())
}

fn field(words: &[(String, u64)], key: &str) -> Option<u64> {
    words.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
}

fn verify_inotify(dir: &Path) -> Check {
    // SAFETY: F_GETFL and F_GETFD take no argument.
    let (status, fd_flags) = unsafe {
        (
            libc::fcntl(INOTIFY, libc::F_GETFL),
            libc::fcntl(INOTIFY, libc::F_GETFD),
        )
    };
    same(
        "fd 10 O_NONBLOCK",
        status & libc::O_NONBLOCK,
        libc::O_NONBLOCK,
    )?;
    same("fd 10 close-on-exec", fd_flags, libc::FD_CLOEXEC)?;
    let watches: BTreeSet<(u64, u64)> = fdinfo_lines(INOTIFY, "inotify ")?
        .iter()
        .map(|words| {
            (
                field(words, "wd").unwrap_or(0),
                field(words, "mask").unwrap_or(0),
            )
        })
        .collect();
    same(
        "inotify watches (wd, mask)",
        watches,
        [(1, u64::from(WATCHED_MASK)), (3, u64::from(SECOND_MASK))].into(),
    )?;
    same("events queued before any change", read_events()?, vec![])?;

    // Each restore has the same pid: the entries go again below, leaving
    // the directories as they were for the next.
    let name = format!("created-by-{}", std::process::id());
    let created = [
        dir.join("watched").join(&name),
        dir.join("gap").join(&name),
        dir.join("second").join(&name),
    ];
    for path in &created {
        fs::write(path, "").map_err(|e| format!("creating {}: {e}", path.display()))?;
    }
    let seen = read_events();
    for path in &created {
        fs::remove_file(path).map_err(|e| format!("removing {}: {e}", path.display()))?;
    }
    same(
        "events after creating a file in watched, gap and second",
        seen?,
        vec![
            Event {
                wd: 1,
                mask: libc::IN_CREATE,
                name: name.clone(),
            },
            Event {
                wd: 3,
                mask: libc::IN_CREATE,
                name,
            },
            // One-shot: the watch goes once it fired.
            Event {
                wd: 3,
                mask: libc::IN_IGNORED,
                name: String::new(),
            },
        ],
    )
}

fn epoll_ready() -> Result<BTreeSet<u64>, String> {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
    // SAFETY: `events` is writable for 8 entries.
    let n = unsafe { libc::epoll_wait(EPOLL, events.as_mut_ptr(), 8, 0) };
    let n = ok(n.into(), "epoll_wait")?;
    Ok(events[..n as usize].iter().map(|e| e.u64).collect())
}

fn verify_epoll() -> Check {
    same(
        "fd 21",
        fs::read_link("/proc/self/fd/21")
            .map_err(|e| e.to_string())?
            .to_string_lossy()
            .into_owned(),
        "anon_inode:[eventfd]".to_owned(),
    )?;
    // Lines read "tfd:       21 events:       19 data:             2100  pos:0 ...".
    let text = fs::read_to_string("/proc/self/fdinfo/20").map_err(|e| e.to_string())?;
    let watches: BTreeSet<(String, String)> = text
        .lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.strip_prefix("tfd:")?.split_whitespace().collect();
            let data = words.iter().position(|w| *w == "data:")? + 1;
            Some((words.first()?.to_string(), words.get(data)?.to_string()))
        })
        .collect();
    same(
        "epoll watches (number, data)",
        watches,
        [
            ("21".to_owned(), format!("{PIPE_DATA:x}")),
            ("21".to_owned(), format!("{EVENTFD_DATA:x}")),
        ]
        .into(),
    )?;
    same("ready before any write", epoll_ready()?, BTreeSet::new())?;
    let one = 1u64.to_ne_bytes();
    // SAFETY: `one` is readable for 8 bytes.
    unsafe {
        ok(
            libc::write(PIPE_WRITE, one.as_ptr().cast(), 1) as libc::c_long,
            "write pipe",
        )?;
        ok(
            libc::write(REUSED, one.as_ptr().cast(), 8) as libc::c_long,
            "write eventfd",
        )?;
    }
    same(
        "ready after writing the pipe and the eventfd",
        epoll_ready()?,
        [PIPE_DATA, EVENTFD_DATA].into(),
    )
}

fn verify(dir: &Path) -> Check {
    verify_inotify(dir)?;
    verify_epoll()
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
    let [_, dir] = args.as_slice() else {
        eprintln!("usage: fixture-notify DIR");
        std::process::exit(2);
    };
    let dir = Path::new(dir);
    // Descriptors leaked by whoever started us would be saved too.
    // SAFETY: close_range takes integers; nothing in this process owns a
    // descriptor above 2 yet.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if let Err(what) = setup(dir) {
        write_result(dir, &Err(format!("setup: {what}")));
        std::process::exit(1);
    }
    fs::write(dir.join("ready"), "").expect("write ready");
    let set = sigset(libc::SIGUSR1);
    loop {
        let mut signal = 0;
        // SAFETY: `set` is valid and SIGUSR1 is blocked; `signal` is writable.
        unsafe { libc::sigwait(&set, &mut signal) };
        write_result(dir, &verify(dir));
    }
}
