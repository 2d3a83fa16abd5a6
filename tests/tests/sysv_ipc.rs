//! System V semaphore sets and message queues of a process tree, through
//! `checkpoint --tree` and `restore` (tests/src/bin/fixture-sysvipc.rs: a
//! parent and a child sharing a set and a queue, which check them from
//! inside once restored).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use persist_tests::{binary, gunicorn_command, require_root, wait_until};
use persist_tests::{children_of, restored_root, stderr};

/// The fixture's two processes, its set and its queue; all killed or
/// removed on drop.
struct IpcFixture {
    parent: Child,
    child: i32,
    key: i32,
    semid: i32,
    msqid: i32,
    dir: tempfile::TempDir,
}

impl IpcFixture {
    /// Starts the fixture with keys of this test run's own (`base` tells
    /// the tests apart), using `SEM_UNDO` when `undo`.
    fn start(base: i32, undo: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = base | ((std::process::id() as i32 & 0x7fff) << 1);
        let mut command = Command::new(binary("fixture-sysvipc"));
        command.arg(dir.path()).arg(format!("{key:x}"));
        if undo {
            command.arg("undo");
        }
        let parent = command.spawn().expect("spawn fixture-sysvipc");
        let text = persist_tests::ready_text(dir.path(), "fixture-sysvipc");
        let fields: Vec<i32> = text
            .split_whitespace()
            .map(|field| field.parse().expect("a number"))
            .collect();
        let [_, child, semid, msqid] = fields[..] else {
            panic!("ready holds {text:?}");
        };
        Self {
            parent,
            child,
            key,
            semid,
            msqid,
            dir,
        }
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("image")
    }

    /// Has the child, then the parent, check the set and queue; their
    /// results.
    fn check(&self, parent: i32, child: i32) -> (String, String) {
        persist_tests::results_of(self.dir.path(), parent, child)
    }
}

impl Drop for IpcFixture {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.parent.kill();
        let _ = self.parent.wait();
        // Only the objects this fixture made, if the checkpoint left them.
        if named(self.key) == (Some(self.semid), Some(self.msqid)) {
            // SAFETY: IPC_RMID of our own set and queue.
            unsafe {
                libc::semctl(self.semid, 0, libc::IPC_RMID);
                libc::msgctl(self.msqid, libc::IPC_RMID, std::ptr::null_mut());
            }
        }
    }
}

/// The ids of the set with `key` and of the queue with `key + 1` in our
/// IPC namespace, if there are such.
fn named(key: i32) -> (Option<i32>, Option<i32>) {
    // SAFETY: plain integers; looks up only.
    let (semid, msqid) = unsafe { (libc::semget(key, 0, 0), libc::msgget(key + 1, 0)) };
    ((semid >= 0).then_some(semid), (msqid >= 0).then_some(msqid))
}

fn agent(args: &[&str]) -> Output {
    Command::new(binary("persist-agent"))
        .args(args)
        .output()
        .expect("run persist-agent")
}

fn ipc_namespace(pid: &str) -> u64 {
    fs::metadata(format!("/proc/{pid}/ns/ipc"))
        .expect("stat an IPC namespace")
        .ino()
}

fn wait_gone(pids: &[i32]) {
    let gone = wait_until(Duration::from_secs(20), || {
        pids.iter()
            .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    });
    assert!(gone.is_ok(), "the killed processes {pids:?} are not reaped");
}

/// The tree is checkpointed (and killed), and its set and queue removed
/// from our namespace; its image is restored twice in turn, each time in an
/// IPC namespace of its own, where the child finds the set and the queue
/// under their keys with their ids, owners, creators, modes, values and
/// messages, and receives one message; the parent receives the others in
/// order and takes from a semaphore. A restored tree checkpointed again
/// (from its own namespace) and restored does the same.
#[test]
fn semaphores_and_message_queues_are_restored_twice_with_their_ids() {
    require_root!();
    let mut fixture = IpcFixture::start(0x5e41_0000, false);
    let pids = [fixture.parent.id() as i32, fixture.child];
    let image = fixture.image();
    let image_arg = image.to_str().expect("a UTF-8 path");
    let output = agent(&[
        "checkpoint",
        "--tree",
        "--pid",
        &pids[0].to_string(),
        "--image",
        image_arg,
    ]);
    assert!(
        output.status.success(),
        "checkpoint --tree: {}",
        stderr(&output)
    );
    let _ = fixture.parent.wait();
    wait_gone(&pids);
    assert_eq!(
        named(fixture.key),
        (None, None),
        "the set and queue are left in our namespace after the checkpoint killed their users"
    );
    let inspect = agent(&["inspect", image_arg]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains(&format!(
            "semaphores semid {} key {:#x}: values 5 1 42",
            fixture.semid, fixture.key
        )) && text.contains(&format!(
            "msg queue  msqid {} key {:#x}: 4 messages",
            fixture.msqid,
            fixture.key + 1
        )),
        "inspect does not show the set and the queue:\n{text}"
    );

    for round in ["first", "second", "checkpointed again"] {
        let (mut root, mut child) = restore(image_arg, round);
        if round == "checkpointed again" {
            // The restored tree, in an IPC namespace of its own, is
            // checkpointed in turn: everything in that namespace is its.
            let again = fixture.dir.path().join("again");
            let again_arg = again.to_str().expect("a UTF-8 path");
            let output = agent(&[
                "checkpoint",
                "--tree",
                "--pid",
                &root.to_string(),
                "--image",
                again_arg,
            ]);
            if !output.status.success() {
                kill(&[child, root]);
                panic!("checkpoint of the restored tree: {}", stderr(&output));
            }
            wait_gone(&[child, root]);
            (root, child) = restore(again_arg, round);
        }
        let own_namespace = ipc_namespace(&root.to_string()) != ipc_namespace("self");
        let (child_result, parent_result) = fixture.check(root, child);
        kill(&[child, root]);
        wait_gone(&[child, root]);
        assert!(
            own_namespace,
            "{round} restore: the tree is in our IPC namespace"
        );
        assert_eq!(child_result, "OK", "{round} restore: the child's check");
        assert_eq!(
            parent_result, "OK values 4,1,42",
            "{round} restore: the parent's check"
        );
    }
}

/// SIGKILLs `pids`.
fn kill(pids: &[i32]) {
    for &pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Restores the fixture's tree from `image`: its root and child.
fn restore(image: &str, round: &str) -> (i32, i32) {
    let output = agent(&["restore", "--image", image]);
    let root = restored_root(&output, &format!("{round} restore"));
    let children = children_of(root);
    let [child] = children[..] else {
        kill(&[root]);
        panic!("{round} restore: the root has children {children:?}, not one");
    };
    (root, child)
}

/// A child that changed a semaphore with `SEM_UNDO` has an undo list,
/// which cannot be read: the checkpoint is refused, naming the child and
/// the set, and the tree runs on with its set and queue as they were.
#[test]
fn a_semaphore_undo_list_is_refused_naming_the_process_and_set() {
    require_root!();
    let fixture = IpcFixture::start(0x5e42_0000, true);
    let pids = [fixture.parent.id() as i32, fixture.child];
    let image = fixture.image();
    let output = agent(&[
        "checkpoint",
        "--tree",
        "--pid",
        &pids[0].to_string(),
        "--image",
        image.to_str().expect("a UTF-8 path"),
    ]);
    assert!(!output.status.success(), "the checkpoint succeeded");
    let message = stderr(&output);
    assert!(
        message.contains(&format!(
            "pid {} has System V semaphore undo",
            fixture.child
        )) && message.contains(&format!("semid {}", fixture.semid)),
        "the refusal does not name the child and the set: {message}"
    );
    assert!(!image.exists(), "a refused checkpoint left an image");
    let (child, parent) = fixture.check(pids[0], pids[1]);
    assert_eq!(child, "OK", "the child's check after the refusal");
    assert_eq!(
        parent, "OK values 4,1,42",
        "the parent's check after the refusal"
    );
}

/// gunicorn with `--preload`: the arbiter makes a semaphore set (value 10)
/// and a message queue holding five messages as it loads the app; each
/// request takes one from the semaphore and receives one message, in
/// whichever worker answers. Added (checkpointed as a tree from the host's
/// IPC namespace), woken, parked with its state kept (checkpointed from the
/// restored tree's own namespace, where the daemon made the objects) and
/// woken again: the requests count on, with the same ids.
#[test]
fn a_gunicorn_tree_keeps_its_semaphores_and_messages_across_parks() {
    require_root!();
    const PORT: u16 = 8171;
    let sandbox = persist_tests::Sandbox::with_daemon().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let command = gunicorn_command(
        dir.path(),
        PORT,
        "import ctypes\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         semid = libc.semget(0, 1, 0o600)\n\
         msqid = libc.msgget(0, 0o600)\n\
         assert semid >= 0 and msqid >= 0\n\
         assert libc.semctl(semid, 0, 16, 10) == 0  # SETVAL\n\
         class Message(ctypes.Structure):\n\
         \x20   _fields_ = [('mtype', ctypes.c_long), ('text', ctypes.c_char * 64)]\n\
         for n in range(5):\n\
         \x20   body = f'message {n}'.encode()\n\
         \x20   assert libc.msgsnd(msqid, ctypes.byref(Message(1, body)), len(body), 0o4000) == 0\n\
         class Sembuf(ctypes.Structure):\n\
         \x20   _fields_ = [('num', ctypes.c_ushort), ('op', ctypes.c_short), ('flg', ctypes.c_short)]\n\
         def app(environ, start_response):\n\
         \x20   assert libc.semop(semid, ctypes.byref(Sembuf(0, -1, 0o4000)), 1) == 0\n\
         \x20   value = libc.semctl(semid, 0, 12)  # GETVAL\n\
         \x20   message = Message()\n\
         \x20   got = libc.msgrcv(msqid, ctypes.byref(message), 64, 0, 0o4000)\n\
         \x20   text = message.text[:got].decode() if got >= 0 else 'none'\n\
         \x20   start_response('200 OK', [('Content-Type', 'text/plain')])\n\
         \x20   return [f'{semid} {msqid} {value} {text}'.encode()]\n",
        &["--preload"],
    );
    sandbox
        .add_ok(
            "ipc",
            PORT,
            &["--ready", "http:/", "--on-idle", "keep"],
            &command,
        )
        .unwrap();
    // `semid msqid value message N`: the readiness request took one.
    let answer = |sandbox: &persist_tests::Sandbox| -> (String, u64, u64) {
        let body = sandbox.http_get(PORT).unwrap();
        let fields: Vec<&str> = body.split_whitespace().collect();
        let [semid, msqid, value, "message", n] = fields[..] else {
            panic!("not an answer: {body:?}");
        };
        (
            format!("{semid} {msqid}"),
            value.parse().unwrap(),
            n.parse().unwrap(),
        )
    };
    let (ids, value, n) = answer(&sandbox);
    assert!(
        value < 10 && value + n == 9,
        "the first request after the first wake: value {value}, message {n}"
    );
    assert_eq!(
        answer(&sandbox),
        (ids.clone(), value - 1, n + 1),
        "the second request"
    );
    sandbox.agent_ok(&["park", "ipc"]).unwrap();
    let parked = sandbox.service("ipc").unwrap();
    assert_eq!(parked["state"], "parked", "{parked}");
    assert!(
        parked["error"].is_null(),
        "the park kept the state: {parked}\n{}",
        sandbox.daemon_log()
    );
    assert_eq!(
        answer(&sandbox),
        (ids, value - 2, n + 2),
        "the first request after the second wake"
    );
}
