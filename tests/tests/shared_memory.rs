//! System V and POSIX shared memory of a process tree, and its
//! parent-death signal and child subreaper bit, through `checkpoint --tree`
//! and `restore` (tests/src/bin/fixture-shm.rs: a parent and a child sharing
//! both kinds, which check them from inside once restored).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use persist_tests::{binary, require_root, wait_until};
use persist_tests::{children_of, restored_root, stderr};

/// The fixture's two processes, its System V segment and its POSIX object;
/// all killed or removed on drop.
struct ShmFixture {
    parent: Child,
    child: i32,
    shmid: i32,
    key: i32,
    path: String,
    dir: tempfile::TempDir,
}

impl ShmFixture {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // A key of this test run's own.
        let key = 0x7e57_0000 | (std::process::id() as i32 & 0xffff);
        let parent = Command::new(binary("fixture-shm"))
            .arg(dir.path())
            .arg(format!("{key:x}"))
            .spawn()
            .expect("spawn fixture-shm");
        let text = persist_tests::ready_text(dir.path(), "fixture-shm");
        let fields: Vec<&str> = text.split_whitespace().collect();
        let [_, child, shmid, path] = fields[..] else {
            panic!("ready holds {text:?}");
        };
        Self {
            parent,
            child: child.parse().expect("a pid"),
            shmid: shmid.parse().expect("a shmid"),
            key,
            path: path.to_owned(),
            dir,
        }
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("image")
    }

    /// Has the restored child, then the restored parent, check what they
    /// share; their results.
    fn check(&self, parent: i32, child: i32) -> (String, String) {
        persist_tests::results_of(self.dir.path(), parent, child)
    }
}

impl Drop for ShmFixture {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.parent.kill();
        let _ = self.parent.wait();
        // SAFETY: removes the segment this fixture made (in our namespace).
        unsafe { libc::shmctl(self.shmid, libc::IPC_RMID, std::ptr::null_mut()) };
        let _ = fs::remove_file(&self.path);
    }
}

fn agent(args: &[&str]) -> Output {
    Command::new(binary("persist-agent"))
        .args(args)
        .output()
        .expect("run persist-agent")
}

/// A restored tree (root and its children); killed on drop.
struct Restored {
    root: i32,
    child: i32,
}

impl Restored {
    fn from(output: &Output, when: &str) -> Self {
        let root = restored_root(output, &format!("{when}: restore"));
        let children = children_of(root);
        let [child] = children[..] else {
            panic!("{when}: the restored root has children {children:?}, not one");
        };
        Self { root, child }
    }

    fn pids(&self) -> [i32; 2] {
        [self.root, self.child]
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        for pid in [self.child, self.root] {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The inode /proc/PID/maps shows for the mapping named `name`, if any.
fn mapped_inode(pid: i32, name: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/maps"))
        .ok()?
        .lines()
        .find(|line| line.ends_with(name) || line.contains(&format!("{name} ")))
        .and_then(|line| line.split_whitespace().nth(4)?.parse().ok())
}

/// Whether System V segment `shmid` exists in our IPC namespace.
fn segment_exists(shmid: i32) -> bool {
    // SAFETY: shmid_ds is plain data; IPC_STAT fills it.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes into the valid struct we pass.
    unsafe { libc::shmctl(shmid, libc::IPC_STAT, &mut ds) == 0 }
}

fn wait_gone(pids: &[i32]) {
    let gone = wait_until(Duration::from_secs(20), || {
        pids.iter()
            .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    });
    assert!(gone.is_ok(), "the killed processes {pids:?} are not reaped");
}

/// The tree is checkpointed (and killed) and its POSIX object removed; its
/// image is restored twice in turn: both processes attach the System V
/// segment with its key and id, and check from inside both objects'
/// contents and attributes, that they share them, and the parent-death
/// signal and subreaper bit. While the first restored tree runs, a second
/// restore of the image is refused, naming the POSIX object it uses.
#[test]
fn system_v_and_posix_shared_memory_are_restored_twice_and_shared() {
    require_root!();
    let mut fixture = ShmFixture::start();
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
    assert!(
        !Path::new(&fixture.path).exists(),
        "{} is left after the checkpoint killed its processes",
        fixture.path
    );
    assert!(
        !segment_exists(fixture.shmid),
        "System V segment shmid {} is left after the checkpoint killed its processes",
        fixture.shmid
    );
    let inspect = agent(&["inspect", image_arg]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains(&format!(
            "System V shm shmid {} key {:#x}",
            fixture.shmid, fixture.key
        )) && text.contains("death signal 12")
            && text.contains("child subreaper yes"),
        "inspect does not show the segment, the parent-death signal or the subreaper:\n{text}"
    );
    let _ = fixture.parent.wait();
    wait_gone(&pids);

    let sysv_name = format!("/SYSV{:08x}", fixture.key);
    for round in ["first", "second"] {
        let restored = Restored::from(&agent(&["restore", "--image", image_arg]), round);
        for pid in restored.pids() {
            assert_eq!(
                mapped_inode(pid, &sysv_name),
                Some(fixture.shmid as u64),
                "{round} restore: pid {pid} does not attach {sysv_name} with shmid {}",
                fixture.shmid
            );
        }
        assert!(
            Path::new(&fixture.path).exists(),
            "{round} restore: {} was not made again",
            fixture.path
        );
        let (child, parent) = fixture.check(restored.root, restored.child);
        assert_eq!(child, "OK 1", "{round} restore: the child's check");
        assert_eq!(parent, "OK 1", "{round} restore: the parent's check");

        if round == "first" {
            let refused = agent(&["restore", "--image", image_arg]);
            assert!(
                !refused.status.success(),
                "a second restore while the first runs succeeded"
            );
            let message = stderr(&refused);
            assert!(
                message.contains(&fixture.path) && message.contains("uses it"),
                "the refusal does not name the object in use: {message}"
            );
            let (child, parent) = fixture.check(restored.root, restored.child);
            assert_eq!(
                (child.as_str(), parent.as_str()),
                ("OK 2", "OK 2"),
                "the refused restore disturbed the running tree"
            );
        }
        let pids = restored.pids();
        drop(restored);
        wait_gone(&pids);
    }
}

/// A single process (not a tree) with a System V segment it marked for
/// removal, as programs that only share it with their children do: the
/// restored process finds its contents, and the segment is its own, marked
/// for removal again (`/proc/sysvipc/shm` read inside it: mode 1600, one
/// attachment), twice from one image.
#[test]
fn a_segment_marked_for_removal_is_restored_marked() {
    require_root!();
    let dir = tempfile::tempdir().expect("tempdir");
    let script = "import ctypes, os, signal, sys, time\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         libc.shmat.restype = ctypes.c_void_p\n\
         shmid = libc.shmget(0, 8192, 0o1600)\n\
         assert shmid >= 0\n\
         address = libc.shmat(shmid, None, 0)\n\
         assert address not in (None, 2**64 - 1)\n\
         ctypes.memmove(address + 5000, b'kept in the segment', 19)\n\
         assert libc.shmctl(shmid, 0, None) == 0\n\
         check = []\n\
         signal.signal(signal.SIGUSR1, lambda *_: check.append(1))\n\
         open(os.path.join(sys.argv[1], 'ready'), 'w').write(str(shmid))\n\
         while True:\n\
         \x20   time.sleep(0.01)\n\
         \x20   if check:\n\
         \x20       check.clear()\n\
         \x20       data = ctypes.string_at(address + 5000, 19)\n\
         \x20       line = [l.split() for l in open('/proc/sysvipc/shm') if l.split()[1] == str(shmid)]\n\
         \x20       seen = (data.decode(), line[0][2], line[0][3], line[0][6]) if line else (data.decode(),)\n\
         \x20       open(os.path.join(sys.argv[1], 'result'), 'w').write(' '.join(seen))\n";
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .arg(dir.path())
        .spawn()
        .expect("spawn python3");
    let ready = dir.path().join("ready");
    let started = wait_until(Duration::from_secs(20), || ready.exists());
    let pid = child.id() as i32;
    let image = dir.path().join("image");
    let image_arg = image.to_str().expect("a UTF-8 path");
    let output = started.as_ref().ok().map(|()| {
        agent(&[
            "checkpoint",
            "--pid",
            &pid.to_string(),
            "--image",
            image_arg,
        ])
    });
    let _ = child.kill();
    let _ = child.wait();
    started.expect("the python process is ready");
    let output = output.expect("checkpointed");
    assert!(output.status.success(), "checkpoint: {}", stderr(&output));
    let shmid: u64 = fs::read_to_string(&ready)
        .expect("read ready")
        .trim()
        .parse()
        .expect("a shmid");
    let inspect = String::from_utf8_lossy(&agent(&["inspect", image_arg]).stdout).into_owned();
    assert!(
        inspect.contains(&format!("shmid {shmid} key 0x0"))
            && inspect.contains("marked for removal"),
        "inspect does not show the removed segment:\n{inspect}"
    );
    for round in ["first", "second"] {
        let output = agent(&["restore", "--image", image_arg]);
        assert!(
            output.status.success(),
            "{round} restore: {}",
            stderr(&output)
        );
        let restored: i32 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("restore prints the pid");
        let result = dir.path().join("result");
        let _ = fs::remove_file(&result);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(restored),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .expect("signal the restored process");
        let answered = wait_until(Duration::from_secs(20), || result.exists());
        let seen = fs::read_to_string(&result).unwrap_or_default();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(restored),
            nix::sys::signal::Signal::SIGKILL,
        );
        answered.unwrap_or_else(|e| panic!("{round} restore: no answer: {e}"));
        assert_eq!(
            seen, "kept in the segment 1600 8192 1",
            "{round} restore: contents, mode, size and attachments of shmid {shmid}"
        );
        wait_gone(&[restored]);
    }
}
