//! System V and POSIX shared memory of a process tree, and its
//! parent-death signal and child subreaper bit, through `checkpoint --tree`
//! and `restore` (tests/src/bin/fixture-shm.rs: a parent and a child sharing
//! both kinds, which check them from inside once restored).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use persist_tests::{binary, require_root, wait_until};

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
        let ready = dir.path().join("ready");
        wait_until(Duration::from_secs(20), || ready.exists()).expect("fixture-shm is ready");
        let text = fs::read_to_string(&ready).expect("read ready");
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
        let mut results = Vec::new();
        for (pid, name) in [(child, "child-result"), (parent, "parent-result")] {
            let result = self.dir.path().join(name);
            let _ = fs::remove_file(&result);
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGUSR1,
            )
            .expect("signal a restored process");
            wait_until(Duration::from_secs(20), || result.exists())
                .unwrap_or_else(|e| panic!("pid {pid} writes {name}: {e}"));
            results.push(fs::read_to_string(&result).expect("read a result"));
        }
        (results.remove(0), results.remove(0))
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

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A restored tree (root and its children); killed on drop.
struct Restored {
    root: i32,
    child: i32,
}

impl Restored {
    fn from(output: &Output, when: &str) -> Self {
        assert!(
            output.status.success(),
            "{when}: restore: {}",
            stderr(output)
        );
        let root: i32 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("restore prints the root's pid");
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

fn children_of(pid: i32) -> Vec<i32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

/// The inode /proc/PID/maps shows for the mapping named `name`, if any.
fn mapped_inode(pid: i32, name: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/maps"))
        .ok()?
        .lines()
        .find(|line| line.ends_with(name) || line.contains(&format!("{name} ")))
        .and_then(|line| line.split_whitespace().nth(4)?.parse().ok())
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
