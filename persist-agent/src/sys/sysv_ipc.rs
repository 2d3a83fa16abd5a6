//! System V semaphore sets and message queues: listing them, reading them
//! (`semctl(IPC_STAT / GETALL / GETPID / GETNCNT / GETZCNT)`, `msgctl`,
//! `msgrcv` with `MSG_COPY`, which leaves the message in its queue), and
//! making them again with a recorded id, creator and contents in a fresh
//! IPC namespace (`sys/ipc.rs` makes the namespace).
//!
//! Everything here acts in the calling thread's IPC namespace.

use std::fs::File;
use std::io::{self, Write};

/// `msgrcv` flag: copy the message at the position given as its type,
/// leaving it queued (linux/msg.h; needs `CONFIG_CHECKPOINT_RESTORE`).
const MSG_COPY: libc::c_int = 0o40000;
/// The `kcmp` type comparing two processes' semaphore undo lists.
const KCMP_SYSVSEM: libc::c_int = 6;

/// Owner, creator and mode of an object (`struct ipc_perm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Owner {
    /// Owner.
    pub uid: u32,
    /// Owner's group.
    pub gid: u32,
    /// Creator.
    pub cuid: u32,
    /// Creator's group.
    pub cgid: u32,
    /// Permission bits.
    pub mode: u32,
}

impl Owner {
    fn of(perm: &libc::ipc_perm) -> Self {
        Self {
            uid: perm.uid,
            gid: perm.gid,
            cuid: perm.cuid,
            cgid: perm.cgid,
            mode: u32::from(perm.mode) & 0o777,
        }
    }
}

/// What `semctl(IPC_STAT)` says of a semaphore set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SemStat {
    /// The key it was made with.
    pub key: i32,
    /// Owner, creator and mode.
    pub owner: Owner,
    /// How many semaphores it has.
    pub count: usize,
    /// Time of the last `semop`.
    pub otime: i64,
    /// Time of the last change (`semctl`, creation).
    pub ctime: i64,
}

/// What `msgctl(IPC_STAT)` says of a message queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgStat {
    /// The key it was made with.
    pub key: i32,
    /// Owner, creator and mode.
    pub owner: Owner,
    /// Messages queued.
    pub messages: u64,
    /// Bytes queued (bodies only).
    pub bytes: u64,
    /// The most bytes it holds.
    pub max_bytes: u64,
    /// Last sender (in the caller's pid namespace; 0 if none).
    pub last_sender: i32,
    /// Last receiver (in the caller's pid namespace; 0 if none).
    pub last_receiver: i32,
    /// Times of the last send, receive and change.
    pub times: [i64; 3],
}

/// Which kind of object [`ids`] lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Semaphore sets (`/proc/sysvipc/sem`).
    Semaphores,
    /// Message queues (`/proc/sysvipc/msg`).
    Queues,
}

/// The ids of every object of `kind` in the caller's IPC namespace (the
/// /proc/sysvipc files show the reading thread's namespace).
pub fn ids(kind: Kind) -> io::Result<Vec<i32>> {
    let path = match kind {
        Kind::Semaphores => "/proc/sysvipc/sem",
        Kind::Queues => "/proc/sysvipc/msg",
    };
    let text = std::fs::read_to_string(path)?;
    // The header, then `key id perms ...` per object.
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(1)?.parse().ok())
        .collect())
}

/// Turns a `-1`/value return into an `io::Result`.
fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn sem_ds(semid: i32) -> io::Result<libc::semid_ds> {
    // SAFETY: semid_ds is plain data; zero is a valid value for every field.
    let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes one semid_ds into the valid struct we pass.
    check(unsafe { libc::semctl(semid, 0, libc::IPC_STAT, &raw mut ds) })?;
    Ok(ds)
}

/// Reads semaphore set `semid`.
pub fn sem_stat(semid: i32) -> io::Result<SemStat> {
    let ds = sem_ds(semid)?;
    Ok(SemStat {
        key: ds.sem_perm.__key,
        owner: Owner::of(&ds.sem_perm),
        count: ds.sem_nsems as usize,
        otime: ds.sem_otime,
        ctime: ds.sem_ctime,
    })
}

/// The values of the `count` semaphores of set `semid` (`GETALL`).
pub fn sem_values(semid: i32, count: usize) -> io::Result<Vec<u16>> {
    let mut values = vec![0u16; count];
    // SAFETY: GETALL writes the set's `count` values (its sem_nsems) into
    // the array we pass, which holds that many.
    check(unsafe { libc::semctl(semid, 0, libc::GETALL, values.as_mut_ptr()) })?;
    Ok(values)
}

/// For each of the `count` semaphores of set `semid`: the pid of the last
/// process that changed it (`GETPID`, 0 if none or not in the caller's
/// pid namespace), and how many wait on it (`GETNCNT` + `GETZCNT`).
pub fn sem_users(semid: i32, count: usize) -> io::Result<Vec<(i32, u32)>> {
    (0..count as i32)
        .map(|semnum| {
            // SAFETY: these commands take no argument and return an int.
            let pid = check(unsafe { libc::semctl(semid, semnum, libc::GETPID) })?;
            // SAFETY: as above.
            let more = check(unsafe { libc::semctl(semid, semnum, libc::GETNCNT) })?;
            // SAFETY: as above.
            let zero = check(unsafe { libc::semctl(semid, semnum, libc::GETZCNT) })?;
            Ok((pid, (more + zero) as u32))
        })
        .collect()
}

/// Removes semaphore set `semid` (`IPC_RMID`).
pub fn sem_remove(semid: i32) -> io::Result<()> {
    // SAFETY: IPC_RMID takes no argument.
    check(unsafe { libc::semctl(semid, 0, libc::IPC_RMID) })?;
    Ok(())
}

fn msg_ds(msqid: i32) -> io::Result<libc::msqid_ds> {
    // SAFETY: msqid_ds is plain data; zero is a valid value for every field.
    let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes one msqid_ds into the valid struct we pass.
    check(unsafe { libc::msgctl(msqid, libc::IPC_STAT, &raw mut ds) })?;
    Ok(ds)
}

/// Reads message queue `msqid`.
pub fn msg_stat(msqid: i32) -> io::Result<MsgStat> {
    let ds = msg_ds(msqid)?;
    Ok(MsgStat {
        key: ds.msg_perm.__key,
        owner: Owner::of(&ds.msg_perm),
        messages: ds.msg_qnum,
        bytes: ds.__msg_cbytes,
        max_bytes: ds.msg_qbytes,
        last_sender: ds.msg_lspid,
        last_receiver: ds.msg_lrpid,
        times: [ds.msg_stime, ds.msg_rtime, ds.msg_ctime],
    })
}

/// A copy of the message at position `index` (from 0) of queue `msqid`,
/// left queued (`MSG_COPY`): its type and body. `max` is the most bytes
/// its body may have; `E2BIG` if it has more, `ENOMSG` if there is no such
/// message.
pub fn msg_copy(msqid: i32, index: u64, max: usize) -> io::Result<(i64, Vec<u8>)> {
    // `struct msgbuf`: the type, then the body.
    let mut buffer = vec![0u8; std::mem::size_of::<libc::c_long>() + max];
    // SAFETY: msgrcv writes at most `max` body bytes after the type into
    // the buffer, which holds both.
    let len = unsafe {
        libc::msgrcv(
            msqid,
            buffer.as_mut_ptr().cast(),
            max,
            index as libc::c_long,
            libc::IPC_NOWAIT | MSG_COPY,
        )
    };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    let (mtype, body) = buffer.split_at(std::mem::size_of::<libc::c_long>());
    let mtype = libc::c_long::from_ne_bytes(mtype.try_into().expect("a long's bytes"));
    Ok((mtype, body[..len as usize].to_vec()))
}

/// Removes message queue `msqid` (`IPC_RMID`).
pub fn msg_remove(msqid: i32) -> io::Result<()> {
    // SAFETY: IPC_RMID takes no buffer.
    check(unsafe { libc::msgctl(msqid, libc::IPC_RMID, std::ptr::null_mut()) })?;
    Ok(())
}

/// Whether process `pid` has a semaphore undo list: `kcmp(KCMP_SYSVSEM)`
/// against kthreadd (pid 2), a kernel thread, which never has one. `None`
/// when pid 2 is not kthreadd (the agent in a pid namespace of its own).
///
/// A list is made by the first `semop` with `SEM_UNDO`, but also, empty,
/// for a process that made a thread: `clone(CLONE_SYSVSEM)`, which
/// pthread_create uses, gives the creator one to share. The adjustments
/// in it cannot be read.
pub fn has_undo_list(pid: i32) -> io::Result<Option<bool>> {
    const KTHREADD: libc::pid_t = 2;
    let comm = std::fs::read_to_string("/proc/2/comm").unwrap_or_default();
    if comm.trim_end() != "kthreadd" {
        return Ok(None);
    }
    // SAFETY: kcmp takes integers only; this type ignores the last two.
    let rc = unsafe { libc::syscall(libc::SYS_kcmp, pid, KTHREADD, KCMP_SYSVSEM, 0, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(rc != 0))
}

/// Reads the caller's namespace's `/proc/sys/kernel/NAME`.
pub fn read_limit(name: &str) -> io::Result<u64> {
    let path = format!("/proc/sys/kernel/{name}");
    std::fs::read_to_string(&path)?
        .trim()
        .parse()
        .map_err(|_| io::Error::other(format!("{path} is not a number")))
}

/// Writes the caller's namespace's `/proc/sys/kernel/NAME`.
fn write_limit(name: &str, value: u64) -> io::Result<()> {
    std::fs::write(format!("/proc/sys/kernel/{name}"), value.to_string())
        .map_err(|err| io::Error::new(err.kind(), format!("writing {value} to {name}: {err}")))
}

/// Writes `id` to `/proc/sys/kernel/NAME_next_id`: the next object of
/// that kind made in the caller's namespace gets that id.
fn set_next_id(name: &str, id: i32) -> io::Result<()> {
    File::options()
        .write(true)
        .open(format!("/proc/sys/kernel/{name}_next_id"))?
        .write_all(id.to_string().as_bytes())
}

/// Runs `make` with the calling thread's effective uid and gid those of
/// `owner`'s creator, so that the object it makes records them as its
/// creator; then takes root's back. Thread credentials are per thread in
/// the kernel: the raw calls change this thread only (glibc's would change
/// every thread of the agent). The caller is a thread of its own that ends
/// right after.
fn as_creator(owner: &Owner, make: impl FnOnce() -> io::Result<i32>) -> io::Result<i32> {
    let set = |call: libc::c_long, id: u32| -> io::Result<()> {
        // SAFETY: setresuid/setresgid take integers; -1 keeps a value.
        let rc = unsafe { libc::syscall(call, -1 as libc::c_long, id as libc::c_long, -1) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: geteuid and getegid take nothing and read the calling
    // thread's credentials.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    set(libc::SYS_setresgid, owner.cgid)?;
    let made = set(libc::SYS_setresuid, owner.cuid).and_then(|()| make());
    // The real and saved ids stayed root's: these give everything back,
    // whatever failed above.
    let back = set(libc::SYS_setresuid, euid).and(set(libc::SYS_setresgid, egid));
    back?;
    made
}

/// Makes semaphore set `semid` with `key`, `owner` and `values`, in the
/// calling thread's fresh IPC namespace.
pub fn make_semaphore_set(semid: i32, key: i32, owner: &Owner, values: &[u16]) -> io::Result<()> {
    if values.is_empty() {
        return Err(io::Error::other("a set of no semaphores"));
    }
    set_next_id("sem", semid)?;
    let made = as_creator(owner, || {
        // SAFETY: semget takes plain integers.
        check(unsafe {
            libc::semget(
                key,
                values.len() as libc::c_int,
                libc::IPC_CREAT | libc::IPC_EXCL | 0o600,
            )
        })
    })?;
    if made != semid {
        return Err(io::Error::other(format!(
            "the kernel gave it id {made} instead"
        )));
    }
    let mut values = values.to_vec();
    // SAFETY: SETALL reads as many values as the set has from the array,
    // which holds that many.
    check(unsafe { libc::semctl(semid, 0, libc::SETALL, values.as_mut_ptr()) })?;
    let mut ds = sem_ds(semid)?;
    ds.sem_perm.uid = owner.uid;
    ds.sem_perm.gid = owner.gid;
    ds.sem_perm.mode = (owner.mode & 0o777) as _;
    // SAFETY: IPC_SET reads the owner and mode from the struct we pass.
    check(unsafe { libc::semctl(semid, 0, libc::IPC_SET, &raw mut ds) })?;
    Ok(())
}

/// Makes queue `msqid` with `key`, `owner` and room for `max_bytes`, which
/// the namespace's msgmnb allows.
fn make_empty_queue(msqid: i32, key: i32, owner: &Owner, max_bytes: u64) -> io::Result<()> {
    set_next_id("msg", msqid)?;
    let made = as_creator(owner, || {
        // SAFETY: msgget takes plain integers.
        check(unsafe { libc::msgget(key, libc::IPC_CREAT | libc::IPC_EXCL | 0o600) })
    })?;
    if made != msqid {
        return Err(io::Error::other(format!(
            "the kernel gave it id {made} instead"
        )));
    }
    let mut ds = msg_ds(msqid)?;
    ds.msg_perm.uid = owner.uid;
    ds.msg_perm.gid = owner.gid;
    ds.msg_perm.mode = (owner.mode & 0o777) as _;
    ds.msg_qbytes = max_bytes as _;
    // SAFETY: IPC_SET reads the owner, mode and room from the struct we pass.
    check(unsafe { libc::msgctl(msqid, libc::IPC_SET, &raw mut ds) })?;
    Ok(())
}

/// Makes message queue `msqid` with `key`, `owner`, room for `max_bytes`
/// and `messages` (type and body) queued in order, in the calling thread's
/// fresh IPC namespace. The namespace's `msgmax` is raised to the longest
/// body if it is shorter (a fresh namespace has the kernel's default).
pub fn make_queue(
    msqid: i32,
    key: i32,
    owner: &Owner,
    max_bytes: u64,
    messages: &[(i64, &[u8])],
) -> io::Result<()> {
    // A queue gets the namespace's msgmnb as its room, and only
    // CAP_SYS_RESOURCE may set a room above msgmnb (checked at every
    // IPC_SET): msgmnb is raised while the queue is made and set, then set
    // back.
    let msgmnb = read_limit("msgmnb")?;
    if max_bytes > msgmnb {
        write_limit("msgmnb", max_bytes)?;
    }
    let made = make_empty_queue(msqid, key, owner, max_bytes);
    if max_bytes > msgmnb {
        write_limit("msgmnb", msgmnb)?;
    }
    made?;
    let longest = messages.iter().map(|(_, body)| body.len() as u64).max();
    if let Some(longest) = longest
        && longest > read_limit("msgmax")?
    {
        write_limit("msgmax", longest)?;
    }
    for (index, (mtype, body)) in messages.iter().enumerate() {
        let mut buffer = mtype.to_ne_bytes().to_vec();
        buffer.extend_from_slice(body);
        // SAFETY: msgsnd reads the type and `body.len()` bytes after it
        // from the buffer, which holds both.
        let rc =
            unsafe { libc::msgsnd(msqid, buffer.as_ptr().cast(), body.len(), libc::IPC_NOWAIT) };
        check(rc).map_err(|err| {
            io::Error::new(
                err.kind(),
                format!(
                    "message {index} (type {mtype}, {} bytes): {err}",
                    body.len()
                ),
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    /// Runs `work` on a thread that joins the IPC namespace `namespace`.
    fn in_namespace<T: Send>(
        namespace: &std::os::fd::OwnedFd,
        work: impl FnOnce() -> T + Send,
    ) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::setns(namespace.as_fd(), nix::sched::CloneFlags::CLONE_NEWIPC)
                        .expect("join the IPC namespace");
                    work()
                })
                .join()
                .expect("the namespace thread")
        })
    }

    /// A set and a queue made in a fresh namespace read back as made: ids,
    /// keys, creator (made with its effective ids), owner, mode, values;
    /// the queue's room above the default msgmnb (which only msgmnb's
    /// raise allows without CAP_SYS_RESOURCE) and a message longer than
    /// the default msgmax, copied in order and left queued.
    #[test]
    fn objects_made_in_a_fresh_namespace_read_back_as_made() {
        crate::test_support::require_root!();
        let owner = Owner {
            uid: 1,
            gid: 2,
            cuid: 65534,
            cgid: 65533,
            mode: 0o640,
        };
        let long = vec![7u8; 9000];
        let messages: [(i64, &[u8]); 3] = [(5, b"first"), (1, &long), (5, b"")];
        let namespace = crate::sys::ipc::namespace_with(&[], || {
            make_semaphore_set(32770, 0x1234, &owner, &[3, 0, 32767])?;
            make_queue(98305, 0x1235, &owner, 20_000, &messages)
        })
        .expect("a namespace with a set and a queue");
        let (sets, set, values, queues, queue, copied, limits) = in_namespace(&namespace, || {
            let stat = msg_stat(98305).unwrap();
            let copied: Vec<(i64, Vec<u8>)> = (0..stat.messages)
                .map(|index| msg_copy(98305, index, 10_000).unwrap())
                .collect();
            (
                ids(Kind::Semaphores).unwrap(),
                sem_stat(32770).unwrap(),
                sem_values(32770, 3).unwrap(),
                ids(Kind::Queues).unwrap(),
                msg_stat(98305).unwrap(),
                copied,
                (read_limit("msgmnb").unwrap(), read_limit("msgmax").unwrap()),
            )
        });
        assert_eq!((sets, queues), (vec![32770], vec![98305]));
        assert_eq!((set.key, set.owner, set.count), (0x1234, owner, 3));
        assert_eq!(values, [3, 0, 32767]);
        assert_eq!(
            (queue.key, queue.owner, queue.max_bytes, queue.messages),
            (0x1235, owner, 20_000, 3)
        );
        let expected: Vec<(i64, Vec<u8>)> = messages
            .iter()
            .map(|(mtype, body)| (*mtype, body.to_vec()))
            .collect();
        assert_eq!(copied, expected, "the messages, in order, still queued");
        assert_eq!(limits, (16384, 9000), "msgmnb set back, msgmax raised");
    }
}
