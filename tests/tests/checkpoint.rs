//! `persist-agent checkpoint` and `inspect` against real processes.
//!
//! Each test starts its own fixture (tests/src/bin/fixture-*.rs) in its own
//! temporary directory, checkpoints it, and checks both the image (through
//! persist-common's reader) and that the process still works, or is gone.
//! Fixtures are killed by pid when a test ends.
//!
//! The agent binary must be built (`cargo build -p persist-agent`) in the
//! same target directory as this test.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use persist_common::image::{Image, Manifest, MappingKind};

/// Index of `rip` in saved registers.
const RIP: usize = 16;
/// Index of `rax`.
const RAX: usize = 10;
/// Index of `fs_base`.
const FS_BASE: usize = 21;

fn agent() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/PROFILE/deps/checkpoint-HASH -> target/PROFILE/persist-agent
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/PROFILE/deps")
        .join("persist-agent");
    assert!(
        path.exists(),
        "{} is not built: run `cargo build -p persist-agent` first",
        path.display()
    );
    path
}

/// A fixture process started in its own directory; killed on drop.
struct Fixture {
    child: Child,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn start(program: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new(program)
            .arg(dir.path())
            .args(extra)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let fixture = Self { child, dir };
        fixture.wait_for_file("ready", Duration::from_secs(20));
        fixture
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn wait_for_file(&self, name: &str, timeout: Duration) -> String {
        let path = self.path(name);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(text) = fs::read_to_string(&path) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not appear within {timeout:?}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asks the fixture to check its state and returns its verdict.
    fn check(&self) -> String {
        let _ = fs::remove_file(self.path("result"));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .expect("send SIGUSR1");
        self.wait_for_file("result", Duration::from_secs(20))
    }

    fn checkpoint(&self, image: &Path, leave_running: bool) -> Output {
        let mut command = Command::new(agent());
        command
            .args(["checkpoint", "--pid", &self.pid().to_string(), "--image"])
            .arg(image);
        if leave_running {
            command.arg("--leave-running");
        }
        command.output().expect("run persist-agent")
    }
}

impl Fixture {
    /// Makes the memory fixture rewrite some pages (SIGUSR2) and waits until
    /// it says it did for the `count`th time.
    fn change_memory(&self, count: usize) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGUSR2,
        )
        .expect("send SIGUSR2");
        let deadline = Instant::now() + Duration::from_secs(20);
        while fs::read_to_string(self.path("changed"))
            .ok()
            .as_deref()
            .map(str::trim)
            != Some(count.to_string().as_str())
        {
            assert!(
                Instant::now() < deadline,
                "the fixture did not change its memory"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `checkpoint --leave-running --base BASE`: a delta image of `base`.
    fn checkpoint_delta(&self, image: &Path, base: &Path) -> Output {
        Command::new(agent())
            .args(["checkpoint", "--pid", &self.pid().to_string(), "--image"])
            .arg(image)
            .arg("--leave-running")
            .arg("--base")
            .arg(base)
            .output()
            .expect("run persist-agent")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "persist-agent failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

fn inspect(image: &Path) -> String {
    let output = Command::new(agent())
        .arg("inspect")
        .arg(image)
        .output()
        .expect("run persist-agent inspect");
    assert_success(&output);
    String::from_utf8(output.stdout).expect("inspect prints text")
}

fn manifest(image: &Path) -> Manifest {
    Image::open(image).expect("open image").manifest().clone()
}

/// State letter of every thread of `pid`.
fn thread_states(pid: i32) -> Vec<char> {
    let mut states = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/task")).expect("task dir") {
        let path = entry.expect("task entry").path().join("stat");
        let stat = fs::read_to_string(path).unwrap_or_default();
        if let Some(close) = stat.rfind(')') {
            states.extend(stat[close + 1..].trim_start().chars().next());
        }
    }
    states
}

fn tracer_of(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|line| line.strip_prefix("TracerPid:"))
        .expect("TracerPid line")
        .trim()
        .to_owned()
}

#[test]
fn memory_fixture_checkpoint_leaves_it_running() {
    persist_tests::require_root!();
    let fixture = Fixture::start(env!("CARGO_BIN_EXE_fixture-memory"), &[]);
    let image = fixture.path("image");
    assert_success(&fixture.checkpoint(&image, true));

    assert_eq!(tracer_of(fixture.pid()), "0");
    assert!(!thread_states(fixture.pid()).contains(&'t'));
    assert_eq!(fixture.check(), "OK");

    let manifest = manifest(&image);
    assert_eq!(manifest.process.pid, fixture.pid());
    assert_eq!(manifest.threads.len(), 1);
    let data_path = fs::canonicalize(fixture.path("data.bin")).unwrap();
    let file_mapping = manifest
        .mappings
        .iter()
        .find(|m| matches!(&m.kind, MappingKind::File { path, .. } if Path::new(path) == data_path))
        .expect("a mapping of data.bin");
    // Exactly the four modified pages differ from the file.
    assert_eq!(file_mapping.stored_pages(), 4);
    let stored: Vec<u64> = file_mapping
        .pages
        .iter()
        .flat_map(|run| run.first_page..run.first_page + run.count)
        .collect();
    assert_eq!(stored, vec![1, 5, 6, 15]);
    // The 1024-page anonymous mapping: half of it was touched.
    assert!(
        manifest
            .mappings
            .iter()
            .any(|m| m.kind == MappingKind::Anonymous
                && m.len() == 1024 * 4096
                && m.stored_pages() == 512),
        "no 1024-page anonymous mapping with 512 stored pages"
    );
    // The PROT_NONE mapping was read through /proc/PID/mem.
    assert!(
        manifest.mappings.iter().any(|m| !m.protection.read
            && m.kind == MappingKind::Anonymous
            && m.len() == 4 * 4096
            && m.stored_pages() == 4),
        "the PROT_NONE mapping's 4 pages are not stored"
    );
    assert!(
        manifest
            .mappings
            .iter()
            .any(|m| m.kind == MappingKind::Heap && m.stored_pages() >= 256)
    );
    assert!(
        manifest
            .mappings
            .iter()
            .any(|m| m.kind == MappingKind::Vdso && m.stored_pages() == 0)
    );

    // Page contents: the modified file page holds the fixture's pattern,
    // not the file's.
    let opened = Image::open(&image).unwrap();
    let run = file_mapping
        .pages
        .iter()
        .find(|r| r.first_page == 1)
        .unwrap();
    let bytes = opened.pages().run(run).expect("run checksum");
    let original = fs::read(fixture.path("data.bin")).unwrap();
    assert_ne!(&bytes[..4096], &original[4096..8192]);

    // Every stored page of the fixture's own mappings (which it no longer
    // writes) is byte for byte what the process holds, PROT_NONE included.
    let mem = fs::File::open(format!("/proc/{}/mem", fixture.pid())).expect("open mem");
    let fixture_mappings = opened.manifest().mappings.iter().filter(|m| {
        m.start == file_mapping.start
            || (m.kind == MappingKind::Anonymous && m.len() == 1024 * 4096)
            || (!m.protection.read && m.len() == 4 * 4096)
    });
    let mut compared = 0;
    for mapping in fixture_mappings {
        for run in &mapping.pages {
            let stored = opened.pages().run(run).expect("run checksum");
            let mut live = vec![0u8; stored.len()];
            use std::os::unix::fs::FileExt;
            mem.read_exact_at(&mut live, mapping.start + run.first_page * 4096)
                .expect("read live memory");
            assert!(
                stored == live.as_slice(),
                "mapping {:#x}: page {} differs",
                mapping.start,
                run.first_page
            );
            compared += run.count;
        }
    }
    assert_eq!(compared, 4 + 512 + 4);

    let text = inspect(&image);
    assert!(
        text.contains(&format!("process {} (fixture-memory)", fixture.pid())),
        "{text}"
    );
    assert!(text.contains("[heap]"), "{text}");
    assert!(text.contains(&data_path.display().to_string()), "{text}");
    assert!(text.contains("[vdso]"), "{text}");
    assert!(text.contains("threads (1)"), "{text}");
}

#[test]
fn threads_fixture_keeps_its_threads() {
    persist_tests::require_root!();
    let fixture = Fixture::start(env!("CARGO_BIN_EXE_fixture-threads"), &[]);
    let image = fixture.path("image");
    assert_success(&fixture.checkpoint(&image, true));
    assert_eq!(fixture.check(), "OK");

    let manifest = manifest(&image);
    assert_eq!(manifest.threads.len(), 5);
    assert_eq!(manifest.threads[0].tid, fixture.pid(), "leader first");
    let mut names: Vec<&str> = manifest.threads[1..]
        .iter()
        .map(|t| t.comm.as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["worker-0", "worker-1", "worker-2", "worker-3"]);
    let mut fs_bases: Vec<u64> = manifest.threads.iter().map(|t| t.regs[FS_BASE]).collect();
    fs_bases.sort_unstable();
    fs_bases.dedup();
    assert_eq!(fs_bases.len(), 5, "every thread has its own TLS");
    for thread in &manifest.threads {
        assert_eq!(thread.regs.len(), 27);
        assert!(
            thread.xsave.len() >= 576,
            "xsave of {} is {} bytes",
            thread.tid,
            thread.xsave.len()
        );
        assert!(
            thread.rseq.is_some(),
            "glibc registers rseq for thread {}",
            thread.tid
        );
        assert_ne!(thread.clear_child_tid, 0, "thread {}", thread.tid);
        // The image holds resumable registers: never inside a syscall.
        assert_eq!(thread.regs[15], u64::MAX, "orig_rax of {}", thread.tid);
    }
    // Threads blocked in a system call are saved rewound onto their
    // `syscall` instruction with rax = the call to make again (the workers
    // sleep in nanosleep, the leader waits in futex).
    let mem = fs::File::open(format!("/proc/{}/mem", fixture.pid())).expect("open mem");
    let rewound = manifest
        .threads
        .iter()
        .filter(|thread| {
            let mut insn = [0u8; 2];
            use std::os::unix::fs::FileExt;
            mem.read_exact_at(&mut insn, thread.regs[RIP]).is_ok()
                && insn == [0x0f, 0x05]
                && [
                    libc::SYS_nanosleep,
                    libc::SYS_futex,
                    libc::SYS_restart_syscall,
                ]
                .contains(&(thread.regs[RAX] as i64))
        })
        .count();
    assert!(rewound >= 1, "no thread was saved rewound onto its syscall");
    let text = inspect(&image);
    assert!(text.contains("threads (5)"), "{text}");
    for thread in &manifest.threads {
        assert!(text.contains(&format!("{:#x}", thread.regs[RIP])), "{text}");
    }
}

#[test]
fn process_fixture_state_is_recorded() {
    persist_tests::require_root!();
    let fixture = Fixture::start(env!("CARGO_BIN_EXE_fixture-process"), &[]);
    let image = fixture.path("image");
    assert_success(&fixture.checkpoint(&image, true));
    assert_eq!(fixture.check(), "OK");

    let manifest = manifest(&image);
    let process = &manifest.process;
    assert_eq!(process.umask, 0o027);
    assert_eq!(
        Path::new(&process.cwd),
        fs::canonicalize(fixture.dir.path()).unwrap()
    );
    let nofile = process
        .rlimits
        .iter()
        .find(|r| r.resource == libc::RLIMIT_NOFILE)
        .unwrap();
    assert_eq!((nofile.soft, nofile.hard), (1000, 2000));
    let usr2 = process
        .sigactions
        .iter()
        .find(|a| a.signal == libc::SIGUSR2 as u32)
        .expect("SIGUSR2 handler");
    let flags = (libc::SA_RESTART | libc::SA_ONSTACK) as u64;
    assert_eq!(usr2.flags & flags, flags);
    assert_ne!(usr2.mask & (1 << (libc::SIGWINCH - 1)), 0);
    let hup = process
        .sigactions
        .iter()
        .find(|a| a.signal == libc::SIGHUP as u32)
        .expect("SIGHUP disposition");
    assert_eq!(hup.handler, 1, "SIG_IGN");
    let real = process.itimers.iter().find(|t| t.which == 0).unwrap();
    assert_eq!(real.interval_us, 50_000_000);
    assert!(real.value_us > 0 && real.value_us <= 100_000_000);
    let leader = &manifest.threads[0];
    assert_eq!(leader.sigaltstack.size, 64 * 1024);
    assert_ne!(
        leader.sigmask & (1 << (libc::SIGUSR2 - 1)),
        0,
        "SIGUSR2 blocked"
    );
    assert_ne!(
        leader.pending & (1 << (libc::SIGUSR2 - 1)),
        0,
        "SIGUSR2 pending"
    );
    assert!(process.mm.brk >= process.mm.start_brk);
    assert!(!process.mm.auxv.is_empty());
    assert!(process.exe.ends_with("fixture-process"));
}

#[test]
fn checkpoint_without_leave_running_kills_the_process() {
    persist_tests::require_root!();
    let mut fixture = Fixture::start(env!("CARGO_BIN_EXE_fixture-memory"), &[]);
    let image = fixture.path("image");
    assert_success(&fixture.checkpoint(&image, false));
    // By the time the agent returns the process has exited: it is a zombie
    // for us, its parent, to reap.
    let status = fixture.child.try_wait().expect("try_wait");
    let status = status.expect("the process has exited");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert_eq!(manifest(&image).process.pid, fixture.pid());
}

#[test]
fn missing_pid_is_refused_by_name() {
    persist_tests::require_root!();
    let pid_max: i32 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pid = (2..pid_max)
        .rev()
        .find(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    let output = Command::new(agent())
        .args(["checkpoint", "--pid", &pid.to_string(), "--image"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("pid {pid}: no such process")),
        "{stderr}"
    );
    assert!(!image.exists());
}

#[test]
fn kernel_thread_is_refused() {
    persist_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    // pid 2 is kthreadd.
    let output = Command::new(agent())
        .args(["checkpoint", "--pid", "2", "--image"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("pid 2 is a kernel thread"), "{stderr}");
    assert!(!image.exists());
}

#[test]
fn a_thread_id_is_refused() {
    persist_tests::require_root!();
    let fixture = Fixture::start(env!("CARGO_BIN_EXE_fixture-threads"), &[]);
    let tid = fs::read_dir(format!("/proc/{}/task", fixture.pid()))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|&tid| tid != fixture.pid())
        .unwrap();
    let image = fixture.path("image");
    let output = Command::new(agent())
        .args(["checkpoint", "--pid", &tid.to_string(), "--image"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "pid {tid} is a thread of process {}",
            fixture.pid()
        )),
        "{stderr}"
    );
    assert_eq!(fixture.check(), "OK");
}

#[test]
fn failed_checkpoint_leaves_the_process_running() {
    persist_tests::require_root!();
    let fixture = Fixture::start(env!("CARGO_BIN_EXE_fixture-threads"), &[]);
    // The image cannot be created: its parent is a regular file. That
    // fails after every thread is frozen.
    let image = fixture.path("ready").join("image");
    let output = fixture.checkpoint(&image, false);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("pid {}", fixture.pid())),
        "{stderr}"
    );
    assert!(!image.exists());
    assert_eq!(tracer_of(fixture.pid()), "0");
    assert!(!thread_states(fixture.pid()).contains(&'t'));
    assert_eq!(fixture.check(), "OK");
}

#[test]
fn traced_process_is_refused() {
    persist_tests::require_root!();
    let fixture = Fixture::start(env!("CARGO_BIN_EXE_fixture-memory"), &[]);
    // Another tracer: this test's thread.
    let pid = nix::unistd::Pid::from_raw(fixture.pid());
    nix::sys::ptrace::seize(pid, nix::sys::ptrace::Options::empty()).expect("seize");
    let image = fixture.path("image");
    let output = fixture.checkpoint(&image, true);
    // Detaching needs a stopped tracee.
    nix::sys::ptrace::interrupt(pid).expect("interrupt");
    nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::__WALL)).expect("wait");
    nix::sys::ptrace::detach(pid, None).expect("detach");
    assert_eq!(fixture.check(), "OK");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("is already traced by pid"), "{stderr}");
}

#[test]
fn inspect_refuses_a_corrupt_image() {
    persist_tests::require_root!();
    let fixture = Fixture::start(env!("CARGO_BIN_EXE_fixture-process"), &[]);
    let image = fixture.path("image");
    assert_success(&fixture.checkpoint(&image, true));
    let manifest_path = image.join("manifest");
    let mut bytes = fs::read(&manifest_path).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x20;
    fs::write(&manifest_path, bytes).unwrap();
    let output = Command::new(agent())
        .arg("inspect")
        .arg(&image)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("checksum"), "{stderr}");
}

/// A python3 process that sets something up with ctypes, writes `ready`
/// in its directory, then sleeps; killed on drop.
fn python_fixture(setup: &str) -> Fixture {
    let script = format!(
        "import ctypes, os, sys, time\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         {setup}\n\
         open(os.path.join(sys.argv[1], 'ready'), 'w').write(str(os.getpid()))\n\
         time.sleep(600)\n"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let child = Command::new("python3")
        .args(["-c", &script])
        .arg(dir.path())
        .spawn()
        .expect("spawn python3");
    let fixture = Fixture { child, dir };
    fixture.wait_for_file("ready", Duration::from_secs(20));
    fixture
}

fn refused(fixture: &Fixture) -> String {
    let image = fixture.path("image");
    let output = fixture.checkpoint(&image, false);
    assert!(!output.status.success(), "checkpoint should have failed");
    assert!(!image.exists());
    // Refused without harm: the process goes on, untraced.
    assert_eq!(tracer_of(fixture.pid()), "0");
    assert!(!thread_states(fixture.pid()).contains(&'t'));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A System V segment of which the process unmapped a page cannot be
/// attached again as it was (`shmat` maps a segment whole).
#[test]
fn sysv_shared_memory_attached_in_part_is_refused() {
    persist_tests::require_root!();
    let fixture = python_fixture(
        "libc.shmat.restype = ctypes.c_void_p\n\
         shmid = libc.shmget(0, 8192, 0o1600)\n\
         assert shmid >= 0\n\
         address = libc.shmat(shmid, None, 0)\n\
         assert address not in (None, 2**64 - 1)\n\
         assert libc.munmap(ctypes.c_void_p(address + 4096), ctypes.c_size_t(4096)) == 0\n\
         libc.shmctl(shmid, 0, None)",
    );
    let stderr = refused(&fixture);
    assert!(
        stderr.contains("System V shared memory") && stderr.contains("attached in part"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("pid {}: mapping 0x", fixture.pid())),
        "{stderr}"
    );
}

#[test]
fn seccomp_strict_mode_is_refused_by_thread() {
    persist_tests::require_root!();
    let fixture = Fixture::start(env!("CARGO_BIN_EXE_fixture-seccomp"), &["strict"]);
    let strict: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", fixture.pid()))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|tid| {
            std::fs::read_to_string(format!("/proc/{}/task/{tid}/status", fixture.pid()))
                .unwrap()
                .contains("Seccomp:\t1")
        })
        .collect();
    assert_eq!(
        strict.len(),
        1,
        "one thread of the fixture is in strict mode"
    );
    let stderr = refused(&fixture);
    assert!(
        stderr.contains(&format!(
            "pid {}, thread {} runs in seccomp strict mode (mode 1)",
            fixture.pid(),
            strict[0]
        )),
        "{stderr}"
    );
}

#[test]
fn seccomp_user_notification_is_refused_by_filter() {
    persist_tests::require_root!();
    let fixture = Fixture::start(env!("CARGO_BIN_EXE_fixture-seccomp"), &["user-notif"]);
    let stderr = refused(&fixture);
    assert!(
        stderr.contains(&format!(
            "pid {0}, thread {0}: seccomp filter 1 of 1 (in install order) returns \
             SECCOMP_RET_USER_NOTIF",
            fixture.pid()
        )),
        "{stderr}"
    );
}

#[test]
fn process_with_children_is_refused() {
    persist_tests::require_root!();
    let fixture = python_fixture("import subprocess\nchild = subprocess.Popen(['sleep', '600'])");
    let children_path = format!("/proc/{0}/task/{0}/children", fixture.pid());
    let children: Vec<i32> = fs::read_to_string(&children_path)
        .expect("children")
        .split_whitespace()
        .map(|c| c.parse().expect("a pid"))
        .collect();
    let stderr = refused(&fixture);
    for child in &children {
        // The `sleep` this test's fixture started.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*child),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert_eq!(children.len(), 1);
    assert!(
        stderr.contains(&format!(
            "pid {} has child processes ([{}])",
            fixture.pid(),
            children[0]
        )),
        "{stderr}"
    );
}

#[test]
fn shared_memory_pages_are_stored_from_the_object() {
    persist_tests::require_root!();
    // A memfd mapped shared, with one page written through write(2) only,
    // and shared anonymous memory (python's mmap(-1) is MAP_SHARED).
    let fixture = python_fixture(
        "import mmap\n\
         fd = os.memfd_create('persist-test')\n\
         os.ftruncate(fd, 16 * 4096)\n\
         m = mmap.mmap(fd, 16 * 4096, flags=mmap.MAP_SHARED)\n\
         m[4096:4100] = b'abcd'\n\
         m[9 * 4096] = 9\n\
         os.pwrite(fd, b'written', 12 * 4096)\n\
         a = mmap.mmap(-1, 256 * 4096)\n\
         for p in (0, 100, 255): a[p * 4096] = 1",
    );
    let image = fixture.path("image");
    assert_success(&fixture.checkpoint(&image, true));
    let opened = Image::open(&image).unwrap();
    let manifest = opened.manifest();
    let stored_pages = |mapping: &persist_common::image::Mapping| -> Vec<u64> {
        mapping
            .pages
            .iter()
            .flat_map(|run| run.first_page..run.first_page + run.count)
            .collect()
    };
    let memfd = manifest
        .mappings
        .iter()
        .find(|m| matches!(&m.kind, MappingKind::Memfd { name, .. } if name == "persist-test"))
        .expect("the memfd mapping");
    assert!(memfd.shared);
    assert_eq!(stored_pages(memfd), vec![1, 9, 12]);
    let page12 = memfd
        .pages
        .iter()
        .find(|r| r.first_page <= 12 && 12 < r.first_page + r.count)
        .unwrap();
    let bytes = opened.pages().run(page12).unwrap();
    let at = ((12 - page12.first_page) * 4096) as usize;
    assert_eq!(&bytes[at..at + 7], b"written");
    let shared_anon = manifest
        .mappings
        .iter()
        .find(|m| matches!(m.kind, MappingKind::SharedAnonymous { .. }) && m.len() == 256 * 4096)
        .expect("the shared anonymous mapping");
    assert_eq!(stored_pages(shared_anon), vec![0, 100, 255]);
}

#[test]
fn threads_created_during_the_freeze_are_caught() {
    persist_tests::require_root!();
    // Two threads start and join short-lived threads as fast as they can.
    let fixture = python_fixture(
        "import threading\n\
         def short(): time.sleep(0.001)\n\
         def spawner():\n    \
             while True:\n        \
                 ts = [threading.Thread(target=short) for _ in range(8)]\n        \
                 for t in ts: t.start()\n        \
                 for t in ts: t.join()\n\
         for _ in range(2): threading.Thread(target=spawner, daemon=True).start()",
    );
    let image = fixture.path("image");
    for _ in 0..5 {
        assert_success(&fixture.checkpoint(&image, true));
        let manifest = manifest(&image);
        assert_eq!(manifest.threads[0].tid, fixture.pid());
        assert!(
            manifest.threads.len() >= 3,
            "{} threads",
            manifest.threads.len()
        );
        let mut tids: Vec<i32> = manifest.threads.iter().map(|t| t.tid).collect();
        tids.sort_unstable();
        tids.dedup();
        assert_eq!(tids.len(), manifest.threads.len(), "a thread saved twice");
    }
    assert_eq!(tracer_of(fixture.pid()), "0");
    assert!(!thread_states(fixture.pid()).contains(&'t'));
}

/// Measurement, not a check of speed: `cargo test --release -p persist-tests
/// --test checkpoint -- --ignored --nocapture throughput` prints how fast
/// 200 MiB of dirty anonymous memory is checkpointed (the agent's summary
/// line), and checks that all of it was stored and the process survived.
#[test]
#[ignore = "measurement; run explicitly"]
fn throughput_of_200_mib() {
    persist_tests::require_root!();
    let fixture = Fixture::start(env!("CARGO_BIN_EXE_fixture-memory"), &["200"]);
    let image = fixture.path("image");
    for _ in 0..3 {
        let output = fixture.checkpoint(&image, true);
        assert_success(&output);
        print!("{}", String::from_utf8_lossy(&output.stdout));
    }
    assert!(manifest(&image).page_store_bytes >= 200 << 20);
    assert_eq!(fixture.check(), "OK");
}

#[test]
fn memory_registered_with_userfaultfd_is_refused() {
    persist_tests::require_root!();
    // Pages of a range registered in missing mode are not in memory until
    // served: an image of what is present would lose them silently.
    let fixture = python_fixture(
        "import mmap\n\
         libc.syscall.restype = ctypes.c_long\n\
         uffd = libc.syscall(323, os.O_CLOEXEC | 1)\n\
         assert uffd >= 0, ctypes.get_errno()\n\
         api = (ctypes.c_uint64 * 3)(0xAA, 0, 0)\n\
         assert libc.ioctl(uffd, ctypes.c_ulong(0xc018aa3f), api) == 0\n\
         region = mmap.mmap(-1, 16 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n\
         address = ctypes.addressof(ctypes.c_char.from_buffer(region))\n\
         register = (ctypes.c_uint64 * 4)(address, 16 * 4096, 1, 0)\n\
         assert libc.ioctl(uffd, ctypes.c_ulong(0xc020aa00), register) == 0, ctypes.get_errno()",
    );
    let stderr = refused(&fixture);
    assert!(stderr.contains("registered with a userfaultfd"), "{stderr}");
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path)
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
        .ino()
}

/// Each delta links its base's stores and adds one; a base that already
/// links three gets a full image, which starts the chain over.
#[test]
fn deltas_chain_up_to_three_base_stores_then_a_full_image_starts_over() {
    persist_tests::require_root!();
    let fixture = Fixture::start(env!("CARGO_BIN_EXE_fixture-memory"), &["8"]);
    let image = |n: usize| fixture.path(&format!("image{n}"));
    assert_success(&fixture.checkpoint(&image(0), true));
    for n in 1..=4 {
        // Each delta has pages of its own to store.
        fixture.change_memory(n);
        let output = fixture.checkpoint_delta(&image(n), &image(n - 1));
        assert_success(&output);
        let stores = manifest(&image(n)).base_stores;
        let expected = if n <= 3 { n } else { 0 };
        assert_eq!(
            stores.len(),
            expected,
            "image {n} has {} base stores: {}",
            stores.len(),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    for k in 0..3 {
        assert_eq!(
            inode(&image(3).join(format!("pages.base.{k}"))),
            inode(&image(k).join("pages")),
            "base store {k} of the third delta is image {k}'s own store"
        );
    }
    let full = fs::metadata(image(4).join("pages")).unwrap().len();
    assert!(
        full >= 8 << 20,
        "the fourth image holds every page: {full} bytes"
    );
    let shown = inspect(&image(3));
    assert!(
        shown.contains("in 3 base stores") && shown.contains("pages.base.2"),
        "{shown}"
    );
    assert_eq!(fixture.check(), "OK");
}

#[test]
fn an_unreadable_base_is_refused_by_name_and_the_process_goes_on() {
    persist_tests::require_root!();
    let fixture = Fixture::start(env!("CARGO_BIN_EXE_fixture-memory"), &[]);
    let missing = fixture.path("no-such-image");
    let output = fixture.checkpoint_delta(&fixture.path("image"), &missing);
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("base image") && stderr.contains(&missing.display().to_string()),
        "{stderr}"
    );
    assert!(!fixture.path("image").exists(), "no image is written");
    assert_eq!(fixture.check(), "OK");
}
