//! Test fixture: a parent and a child sharing a System V semaphore set and
//! a System V message queue.
//!
//! `fixture-sysvipc DIR KEY [undo]`: the parent makes a set of three
//! semaphores with key KEY (mode 0640, then owned by 65534:65534), sets them
//! to [`INITIAL`], and, with its effective ids 65534:65534 for the call, a
//! queue with key KEY+1 (mode 0620, room for [`QUEUE_BYTES`]), into which it
//! sends [`PARENT_MESSAGES`]. It then forks a child, which adds one to
//! semaphore 1 (with `SEM_UNDO` when `undo` is given) and sends
//! [`CHILD_MESSAGE`]. It writes `DIR/ready`: `PARENT CHILD SEMID MSQID`.
//!
//! On SIGUSR1 the child checks both objects (that KEY and KEY+1 name them,
//! their owners, creators, modes, the values, the queue's room, message
//! count and bytes), receives the message of type 2 and checks it, and
//! writes `DIR/child-result`: `OK` or `FAIL: what differs`. On SIGUSR1 the
//! parent receives the rest in order and checks them (the child's last),
//! takes one from semaphore 0, and writes `DIR/parent-result`: `OK values
//! V0,V1,V2` or `FAIL: ...`. Each runs its check once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The values the parent sets.
const INITIAL: [u16; 3] = [5, 0, 42];
/// The owner the parent gives both objects, and the queue's creator.
const NOBODY: u32 = 65534;
/// The queue's room, less than the default (16384; more needs
/// `CAP_SYS_RESOURCE`).
const QUEUE_BYTES: u64 = 12_000;
/// The type and length of each message the parent sends, in order.
const PARENT_MESSAGES: [(i64, usize); 3] = [(1, 5), (2, 11), (1, 8000)];
/// The type and length of the child's.
const CHILD_MESSAGE: (i64, usize) = (3, 17);

static CHECK: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    CHECK.store(true, Ordering::SeqCst);
}

/// The body of a message of type `mtype` and `len` bytes.
fn body(mtype: i64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as i64 * 13 + mtype) as u8).collect()
}

fn last_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn send(msqid: i32, mtype: i64, len: usize) {
    let mut buffer = mtype.to_ne_bytes().to_vec();
    buffer.extend(body(mtype, len));
    // SAFETY: msgsnd reads the type and `len` bytes after it.
    let rc = unsafe { libc::msgsnd(msqid, buffer.as_ptr().cast(), len, libc::IPC_NOWAIT) };
    assert_eq!(rc, 0, "{}", last_error("msgsnd"));
}

/// Receives the first message of type `mtype` (0: any), without waiting.
fn receive(msqid: i32, mtype: i64) -> Result<(i64, Vec<u8>), String> {
    let mut buffer = vec![0u8; 8 + 65536];
    // SAFETY: msgrcv writes the type and at most 65536 bytes after it.
    let len = unsafe {
        libc::msgrcv(
            msqid,
            buffer.as_mut_ptr().cast(),
            65536,
            mtype,
            libc::IPC_NOWAIT,
        )
    };
    if len < 0 {
        return Err(last_error(&format!("msgrcv type {mtype} from {msqid}")));
    }
    let got = i64::from_ne_bytes(buffer[..8].try_into().unwrap());
    Ok((got, buffer[8..8 + len as usize].to_vec()))
}

fn expect_message(msqid: i32, mtype: i64, (want_type, len): (i64, usize)) -> Result<(), String> {
    let (got, data) = receive(msqid, mtype)?;
    if got != want_type || data != body(want_type, len) {
        return Err(format!(
            "received type {got} of {} bytes, not type {want_type} of {len}",
            data.len()
        ));
    }
    Ok(())
}

fn values(semid: i32) -> Result<[u16; 3], String> {
    let mut values = [0u16; 3];
    // SAFETY: GETALL writes the set's three values.
    if unsafe { libc::semctl(semid, 0, libc::GETALL, values.as_mut_ptr()) } < 0 {
        return Err(last_error("semctl GETALL"));
    }
    Ok(values)
}

fn semop(semid: i32, semnum: u16, op: i16, flags: i32) -> Result<(), String> {
    let mut operation = libc::sembuf {
        sem_num: semnum,
        sem_op: op,
        sem_flg: (flags | libc::IPC_NOWAIT) as i16,
    };
    // SAFETY: one sembuf.
    if unsafe { libc::semop(semid, &raw mut operation, 1) } < 0 {
        return Err(last_error("semop"));
    }
    Ok(())
}

struct Ids {
    key: i32,
    semid: i32,
    msqid: i32,
}

impl Ids {
    fn create(key: i32) -> Self {
        // SAFETY: plain integers.
        let semid = unsafe { libc::semget(key, 3, libc::IPC_CREAT | libc::IPC_EXCL | 0o640) };
        assert!(semid >= 0, "{}", last_error("semget"));
        let mut initial = INITIAL;
        // SAFETY: SETALL reads the set's three values.
        let rc = unsafe { libc::semctl(semid, 0, libc::SETALL, initial.as_mut_ptr()) };
        assert_eq!(rc, 0, "{}", last_error("SETALL"));
        // SAFETY: semid_ds is plain data; IPC_STAT fills it, IPC_SET reads it.
        unsafe {
            let mut ds: libc::semid_ds = std::mem::zeroed();
            assert_eq!(libc::semctl(semid, 0, libc::IPC_STAT, &raw mut ds), 0);
            ds.sem_perm.uid = NOBODY;
            ds.sem_perm.gid = NOBODY;
            assert_eq!(libc::semctl(semid, 0, libc::IPC_SET, &raw mut ds), 0);
        }
        // Made with nobody's effective ids: its creator (single-threaded
        // here, so these change the whole process).
        // SAFETY: plain integers; the saved ids stay root's.
        let msqid = unsafe {
            assert_eq!(libc::setegid(NOBODY), 0);
            assert_eq!(libc::seteuid(NOBODY), 0);
            let msqid = libc::msgget(key + 1, libc::IPC_CREAT | libc::IPC_EXCL | 0o620);
            assert_eq!(libc::seteuid(0), 0);
            assert_eq!(libc::setegid(0), 0);
            msqid
        };
        assert!(msqid >= 0, "{}", last_error("msgget"));
        // SAFETY: msqid_ds is plain data; IPC_STAT fills it, IPC_SET reads it.
        unsafe {
            let mut ds: libc::msqid_ds = std::mem::zeroed();
            assert_eq!(libc::msgctl(msqid, libc::IPC_STAT, &raw mut ds), 0);
            ds.msg_qbytes = QUEUE_BYTES;
            assert_eq!(libc::msgctl(msqid, libc::IPC_SET, &raw mut ds), 0);
        }
        for (mtype, len) in PARENT_MESSAGES {
            send(msqid, mtype, len);
        }
        Self { key, semid, msqid }
    }

    /// The child's check, before it receives its message.
    fn child_check(&self) -> Result<(), String> {
        // SAFETY: plain integers.
        let (semid, msqid) =
            unsafe { (libc::semget(self.key, 0, 0), libc::msgget(self.key + 1, 0)) };
        if (semid, msqid) != (self.semid, self.msqid) {
            return Err(format!(
                "keys {:#x} and {:#x} name ids {semid} and {msqid}, not {} and {}",
                self.key,
                self.key + 1,
                self.semid,
                self.msqid
            ));
        }
        // SAFETY: plain data, filled by IPC_STAT.
        let (sem, msg) = unsafe {
            let mut sem: libc::semid_ds = std::mem::zeroed();
            let mut msg: libc::msqid_ds = std::mem::zeroed();
            if libc::semctl(semid, 0, libc::IPC_STAT, &raw mut sem) < 0
                || libc::msgctl(msqid, libc::IPC_STAT, &raw mut msg) < 0
            {
                return Err(last_error("IPC_STAT"));
            }
            (sem, msg)
        };
        let perm = |p: &libc::ipc_perm| (p.uid, p.gid, p.cuid, p.cgid, p.mode & 0o777);
        let seen = (perm(&sem.sem_perm), sem.sem_nsems);
        if seen != ((NOBODY, NOBODY, 0, 0, 0o640), 3) {
            return Err(format!(
                "the set's (owner, creator, mode) and size are {seen:?}"
            ));
        }
        let bytes: usize = PARENT_MESSAGES.iter().map(|m| m.1).sum::<usize>() + CHILD_MESSAGE.1;
        let seen = (
            perm(&msg.msg_perm),
            msg.msg_qbytes,
            msg.msg_qnum,
            msg.__msg_cbytes,
        );
        let want = (
            (NOBODY, NOBODY, NOBODY, NOBODY, 0o620),
            QUEUE_BYTES,
            4,
            bytes as u64,
        );
        if seen != want {
            return Err(format!(
                "the queue's (owner, creator, mode), room, messages and bytes are {seen:?}, \
                 not {want:?}"
            ));
        }
        let values = values(semid)?;
        if values != [INITIAL[0], INITIAL[1] + 1, INITIAL[2]] {
            return Err(format!("the values are {values:?}"));
        }
        expect_message(msqid, 2, PARENT_MESSAGES[1])
    }

    /// The parent's check, after the child's.
    fn parent_check(&self) -> Result<[u16; 3], String> {
        expect_message(self.msqid, 0, PARENT_MESSAGES[0])?;
        expect_message(self.msqid, 0, PARENT_MESSAGES[2])?;
        expect_message(self.msqid, 0, CHILD_MESSAGE)?;
        if let Ok((mtype, _)) = receive(self.msqid, 0) {
            return Err(format!("a message of type {mtype} more"));
        }
        semop(self.semid, 0, -1, 0)?;
        values(self.semid)
    }
}

fn write_result(dir: &Path, name: &str, text: String) {
    let temp = dir.join(format!("{name}.tmp"));
    std::fs::write(&temp, text).expect("write result");
    std::fs::rename(&temp, dir.join(name)).expect("rename result");
}

/// Waits for a SIGUSR1, then runs `check` once, then waits forever.
fn serve(check: impl FnOnce()) -> ! {
    while !CHECK.swap(false, Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    check();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: fixture-sysvipc DIR KEY [undo]";
    let dir = PathBuf::from(args.next().expect(usage));
    let key = i32::from_str_radix(args.next().expect(usage).trim_start_matches("0x"), 16)
        .expect("KEY in hexadecimal");
    let undo = args.next().as_deref() == Some("undo");
    // SAFETY: installs an async-signal-safe handler.
    unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t) };
    let ids = Ids::create(key);
    // SAFETY: single-threaded: the child may run Rust code.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork");
    if child == 0 {
        let flags = if undo { libc::SEM_UNDO } else { 0 };
        semop(ids.semid, 1, 1, flags).expect("the child's semop");
        send(ids.msqid, CHILD_MESSAGE.0, CHILD_MESSAGE.1);
        write_result(&dir, "child-ready", String::new());
        serve(|| {
            let text = match ids.child_check() {
                Ok(()) => "OK".to_owned(),
                Err(why) => format!("FAIL: {why}"),
            };
            write_result(&dir, "child-result", text);
        });
    }
    while !dir.join("child-ready").exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    write_result(
        &dir,
        "ready",
        format!("{} {child} {} {}", std::process::id(), ids.semid, ids.msqid),
    );
    serve(|| {
        let text = match ids.parent_check() {
            Ok(values) => format!("OK values {},{},{}", values[0], values[1], values[2]),
            Err(why) => format!("FAIL: {why}"),
        };
        write_result(&dir, "parent-result", text);
    });
}
