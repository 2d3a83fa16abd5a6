//! PostgreSQL 15 (Debian's) checkpointed and restored as a tree: the
//! postmaster with its checkpointer, background writer, WAL writer,
//! autovacuum launcher and logical replication launcher, sharing a System V
//! segment, POSIX shared memory under /dev/shm and the anonymous shared
//! main segment.
//!
//! Each test runs its own cluster as user postgres (it refuses root), in a
//! temporary directory and a network namespace of its own; the processes it
//! started or restored are killed by pid when it ends.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use persist_tests::{
    NetNs, Sandbox, binary, output_within, require_root, restored_root, wait_until,
};

const BIN: &str = "/usr/lib/postgresql/15/bin";

/// The processes of a running cluster: the postmaster and its five.
const HELPERS: usize = 5;

/// User postgres's uid and gid.
fn postgres_ids() -> (u32, u32) {
    let meta = fs::metadata("/var/lib/postgresql")
        .ok()
        .filter(|m| m.uid() != 0);
    let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let line = passwd
        .lines()
        .find(|line| line.starts_with("postgres:"))
        .expect("user postgres exists (package postgresql-15)");
    let fields: Vec<&str> = line.split(':').collect();
    let ids = (
        fields[2].parse().expect("a uid"),
        fields[3].parse().expect("a gid"),
    );
    if let Some(meta) = meta {
        assert_eq!(meta.uid(), ids.0, "/var/lib/postgresql belongs to postgres");
    }
    ids
}

/// A command run as user postgres, with a plain environment.
fn as_postgres(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let (uid, gid) = postgres_ids();
    let mut command = Command::new(program);
    command
        .uid(uid)
        .gid(gid)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .env("HOME", "/var/lib/postgresql");
    command
}

/// A cluster's directory: the data directory, the socket directory and the
/// server's log, in a temporary directory root owns (where images go too).
struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
    netns: NetNs,
    /// The POSIX shared memory files its postmasters mapped: removed at
    /// the end if no process uses them (a killed cluster leaves them).
    shm_files: std::cell::RefCell<Vec<String>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for file in self.shm_files.borrow().iter() {
            let used = fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .any(|entry| {
                    fs::read_to_string(entry.path().join("maps"))
                        .is_ok_and(|maps| maps.contains(file))
                });
            if !used {
                let _ = fs::remove_file(file);
            }
        }
    }
}

impl Cluster {
    /// Makes a cluster with `initdb` (as postgres).
    fn init(port: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let (uid, gid) = postgres_ids();
        let home = dir.path().join("pg");
        fs::create_dir(&home).expect("mkdir pg");
        std::os::unix::fs::chown(&home, Some(uid), Some(gid)).expect("chown pg");
        let cluster = Self {
            dir,
            port,
            netns: NetNs::new().expect("network namespace"),
            shm_files: Default::default(),
        };
        let output = as_postgres(format!("{BIN}/initdb"))
            .args(["--auth=trust", "-D"])
            .arg(cluster.data())
            .output()
            .expect("run initdb");
        assert!(
            output.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("pg/data")
    }

    fn sockets(&self) -> PathBuf {
        self.dir.path().join("pg")
    }

    fn image(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the postmaster in the namespace, its output in `log` (under
    /// the cluster's directory), and waits until it answers with its five
    /// helpers running.
    fn start(&self, log: &str) -> Child {
        let (uid, gid) = postgres_ids();
        let log = self.sockets().join(log);
        let file = fs::File::create(&log).expect("create the log");
        std::os::unix::fs::chown(&log, Some(uid), Some(gid)).expect("chown the log");
        let server = self
            .netns
            .command("setpriv")
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
                &format!("{BIN}/postgres"),
                "-D",
            ])
            .arg(self.data())
            .arg("-k")
            .arg(self.sockets())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup the log"))
            .stderr(file)
            .spawn()
            .expect("start postgres");
        let pid = server.id() as i32;
        let ready = wait_until(Duration::from_secs(60), || {
            children_of(pid).len() >= HELPERS && self.query("SELECT 1").is_ok_and(|a| a == "1")
        });
        self.note_shm_files(pid);
        if let Err(err) = ready {
            panic!(
                "postgres did not start with its {HELPERS} helpers: {err}; its log:\n{}",
                fs::read_to_string(self.sockets().join(log)).unwrap_or_default()
            );
        }
        server
    }

    /// Remembers the POSIX shared memory files `pid` maps.
    /// Adds its postmaster to `sandbox`'s daemon as service `pg` on its
    /// port, as postgres, ready when it says so (sd_notify), with `options`
    /// besides.
    fn add_to_daemon(&self, sandbox: &Sandbox, options: &[&str]) {
        let command: Vec<String> = vec![
            format!("{BIN}/postgres"),
            "-D".into(),
            self.data().display().to_string(),
            "-k".into(),
            self.sockets().display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
        ];
        let mut args = vec!["--user", "postgres", "--ready", "notify"];
        args.extend_from_slice(options);
        sandbox
            .add_ok("pg", self.port, &args, &command)
            .expect("add postgres");
    }

    fn note_shm_files(&self, pid: i32) {
        self.shm_files.borrow_mut().extend(posix_shm_of(pid));
    }

    /// Runs `sql` with psql over the UNIX socket; its unaligned output.
    fn query(&self, sql: &str) -> Result<String, String> {
        let output = output_within(
            as_postgres(format!("{BIN}/psql"))
                .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", "postgres"])
                .arg("-h")
                .arg(self.sockets())
                .args(["-p", &self.port.to_string(), "-c", sql]),
            Duration::from_secs(30),
        )
        .map_err(|e| e.to_string())?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Runs `query`, panicking with psql's error.
    fn query_ok(&self, sql: &str, when: &str) -> String {
        self.query(sql)
            .unwrap_or_else(|e| panic!("{when}: psql -c {sql:?}: {e}"))
    }

    /// `checkpoint --tree` of `pid` in the namespace, killing the tree.
    /// A backend that just served psql may not be reaped yet (a zombie,
    /// which a checkpoint refuses): tried again until the tree is only the
    /// postmaster and its helpers.
    fn checkpoint(&self, pid: i32, image: &Path) -> Output {
        let mut attempt = 0;
        loop {
            let _ = wait_until(Duration::from_secs(10), || {
                children_of(pid).len() == HELPERS && children_of(pid).iter().all(|&c| runs(c))
            });
            let output = self
                .netns
                .command(binary("persist-agent"))
                .args(["checkpoint", "--tree", "--pid", &pid.to_string(), "--image"])
                .arg(image)
                .output()
                .expect("run persist-agent");
            attempt += 1;
            if output.status.success()
                || attempt == 5
                || !String::from_utf8_lossy(&output.stderr).contains("was not reaped")
            {
                return output;
            }
        }
    }

    /// `restore --image` in the namespace; the restored tree.
    fn restore(&self, image: &Path, when: &str) -> RestoredCluster {
        let output = self
            .netns
            .command(binary("persist-agent"))
            .args(["restore", "--image"])
            .arg(image)
            .output()
            .expect("run persist-agent");
        let root = restored_root(&output, &format!("{when}: restore of {}", image.display()));
        let mut pids = vec![root];
        pids.extend(children_of(root));
        self.note_shm_files(root);
        RestoredCluster { root, pids }
    }

    /// `pg_ctl stop -m fast` for the cluster whose postmaster is `root`,
    /// run in its pid and mount namespaces (a restored one may have its own:
    /// pg_ctl signals the pid postmaster.pid names).
    fn stop(&self, root: i32) -> Output {
        let (uid, gid) = postgres_ids();
        Command::new("nsenter")
            .args(["--target", &root.to_string(), "--pid", "--mount"])
            .arg(format!("--setuid={uid}"))
            .arg(format!("--setgid={gid}"))
            .args([
                "--",
                &format!("{BIN}/pg_ctl"),
                "stop",
                "-m",
                "fast",
                "-w",
                "-D",
            ])
            .arg(self.data())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .output()
            .expect("run pg_ctl")
    }

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.sockets().join(name)).unwrap_or_default()
    }
}

/// A restored cluster's processes; all killed on drop.
struct RestoredCluster {
    root: i32,
    pids: Vec<i32>,
}

impl Drop for RestoredCluster {
    /// Stops them all before killing any: a postmaster that sees a child
    /// die starts a crash restart, making new shared memory and writing it
    /// into postmaster.pid.
    fn drop(&mut self) {
        for signal in [
            nix::sys::signal::Signal::SIGSTOP,
            nix::sys::signal::Signal::SIGKILL,
        ] {
            for &pid in &self.pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
            }
        }
    }
}

/// A postmaster this test started; killed on drop.
struct Started(Child);

impl Drop for Started {
    fn drop(&mut self) {
        for pid in children_of(self.0.id() as i32) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn children_of(pid: i32) -> Vec<i32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|task| fs::read_to_string(task.path().join("children")).unwrap_or_default())
        .collect::<Vec<String>>()
        .join(" ")
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

/// Whether `pid` runs (exists and is not a zombie).
fn runs(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat[stat.rfind(')').map_or(0, |at| at + 1)..].trim_start();
        !state.starts_with('Z') && !state.starts_with('X')
    })
}

/// Waits until no process has any of `pids`: the killed tree is reaped,
/// so that its image is restored with its own pids, not in a pid (and
/// mount) namespace of its own, which could not be checkpointed again from
/// here (docs/process-trees.md).
fn wait_gone(pids: &[i32]) {
    let gone = wait_until(Duration::from_secs(30), || {
        pids.iter()
            .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    });
    assert!(gone.is_ok(), "the killed processes {pids:?} are not reaped");
}

/// The `(key, shmid)` of the System V segment postmaster.pid names.
fn segment_of(data: &Path) -> (String, u64) {
    let text = fs::read_to_string(data.join("postmaster.pid")).expect("read postmaster.pid");
    let line = text
        .lines()
        .nth(6)
        .expect("postmaster.pid has a shared memory line");
    let mut fields = line.split_whitespace();
    let key: i64 = fields.next().and_then(|k| k.parse().ok()).expect("a key");
    let shmid = fields.next().and_then(|i| i.parse().ok()).expect("a shmid");
    (format!("/SYSV{key:08x}"), shmid)
}

/// The inode /proc/PID/maps shows for the mapping named `name`, if any.
fn mapped_inode(pid: i32, name: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/maps"))
        .ok()?
        .lines()
        .find(|line| line.contains(name))
        .and_then(|line| line.split_whitespace().nth(4)?.parse().ok())
}

/// The files under /dev/shm that `pid` maps.
fn posix_shm_of(pid: i32) -> Vec<String> {
    let mut files: Vec<String> = fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|path| path.starts_with("/dev/shm/"))
        .map(str::to_owned)
        .collect();
    files.sort();
    files.dedup();
    files
}

/// Checks that the restored cluster is the tree it was, with its System V
/// segment (same key and id, in every process) and its POSIX shared memory
/// (owned by postgres, mode 0600).
fn check_restored(cluster: &Cluster, restored: &RestoredCluster, when: &str) {
    assert_eq!(
        restored.pids.len(),
        1 + HELPERS,
        "{when}: the restored tree is {:?}",
        restored.pids
    );
    let (name, shmid) = segment_of(&cluster.data());
    for &pid in &restored.pids {
        assert_eq!(
            mapped_inode(pid, &name),
            Some(shmid),
            "{when}: pid {pid} does not attach {name} with shmid {shmid}, as postmaster.pid \
             says; the server's log:\n{}",
            cluster.log("first.log")
        );
    }
    let files = posix_shm_of(restored.root);
    assert!(
        !files.is_empty(),
        "{when}: the restored postmaster maps no POSIX shared memory:\n{}",
        fs::read_to_string(format!("/proc/{}/maps", restored.root)).unwrap_or_default()
    );
    let (uid, gid) = postgres_ids();
    for file in files {
        let meta = fs::metadata(&file).unwrap_or_else(|e| panic!("{when}: {file}: {e}"));
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o777),
            (uid, gid, 0o600),
            "{when}: owner and mode of {file}"
        );
    }
}

/// The cluster is checkpointed as a tree and restored; a table is made and
/// filled in the restored cluster, which is checkpointed again; that image
/// is restored twice in turn, returning the rows each time (the first
/// restored cluster killed, as a crash would); the second runs a CHECKPOINT
/// and stops cleanly with `pg_ctl stop -m fast`, after which a fresh
/// postmaster starts on the data directory without any recovery.
#[test]
fn postgres_is_restored_as_a_tree_keeps_its_rows_and_stops_cleanly() {
    require_root!();
    const PORT: u16 = 8291;
    let cluster = Cluster::init(PORT);
    let mut server = Started(cluster.start("first.log"));
    let pid = server.0.id() as i32;
    let (name, shmid) = segment_of(&cluster.data());
    assert_eq!(
        mapped_inode(pid, &name),
        Some(shmid),
        "the postmaster attaches its System V segment"
    );

    let first = cluster.image("first");
    let mut tree = vec![pid];
    tree.extend(children_of(pid));
    let output = cluster.checkpoint(pid, &first);
    assert!(
        output.status.success(),
        "checkpoint --tree of the postmaster: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = server.0.wait();
    wait_gone(&tree);
    // SAFETY: shmid_ds is plain data; IPC_STAT fills it.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes into the valid struct we pass.
    let left = unsafe { libc::shmctl(shmid as i32, libc::IPC_STAT, &mut ds) } == 0;
    assert!(
        !left,
        "the postmaster's System V segment {shmid} is left after its tree was checkpointed"
    );
    assert!(
        cluster.query("SELECT 1").is_err(),
        "the cluster answers after its tree was checkpointed and killed"
    );

    let restored = cluster.restore(&first, "first image");
    check_restored(&cluster, &restored, "first image");
    cluster.query_ok(
        "CREATE TABLE parked (id int, name text); \
         INSERT INTO parked VALUES (1, 'one'), (2, 'two'), (3, 'three')",
        "first image",
    );
    let rows = "1|one\n2|two\n3|three";
    assert_eq!(
        cluster.query_ok("SELECT * FROM parked ORDER BY id", "first image"),
        rows
    );

    let second = cluster.image("second");
    let output = cluster.checkpoint(restored.root, &second);
    assert!(
        output.status.success(),
        "checkpoint --tree of the restored postmaster: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    wait_gone(&restored.pids);
    drop(restored);

    for round in ["first", "second"] {
        let when = format!("{round} restore of the second image");
        let restored = cluster.restore(&second, &when);
        check_restored(&cluster, &restored, &when);
        assert_eq!(
            cluster.query_ok("SELECT * FROM parked ORDER BY id", &when),
            rows,
            "{when}: the rows"
        );
        if round == "first" {
            // Killed, as a crash would: its POSIX shared memory is left
            // behind, stale, for the next restore to replace.
            let pids = restored.pids.clone();
            drop(restored);
            wait_gone(&pids);
            continue;
        }
        cluster.query_ok("CHECKPOINT", &when);
        let stopped = cluster.stop(restored.root);
        assert!(
            stopped.status.success(),
            "{when}: pg_ctl stop -m fast: {}{}",
            String::from_utf8_lossy(&stopped.stdout),
            String::from_utf8_lossy(&stopped.stderr)
        );
        let gone = wait_until(Duration::from_secs(30), || {
            restored.pids.iter().all(|&pid| !runs(pid))
        });
        assert!(
            gone.is_ok(),
            "{when}: processes {:?} run on after pg_ctl stop",
            restored
                .pids
                .iter()
                .filter(|&&p| runs(p))
                .collect::<Vec<_>>()
        );
    }

    // A fresh postmaster on the same data directory: no recovery.
    let fresh = Started(cluster.start("fresh.log"));
    let log = cluster.log("fresh.log");
    for sign in [
        "was not properly shut down",
        "database system was interrupted",
        "automatic recovery",
    ] {
        assert!(
            !log.contains(sign),
            "the fresh start recovered ({sign:?}):\n{log}"
        );
    }
    assert!(
        log.contains("database system was shut down at"),
        "the fresh start does not find a clean shutdown:\n{log}"
    );
    assert_eq!(
        cluster.query_ok("SELECT * FROM parked ORDER BY id", "fresh start"),
        rows,
        "the rows after a fresh start"
    );
    let stopped = cluster.stop(fresh.0.id() as i32);
    assert!(
        stopped.status.success(),
        "pg_ctl stop of the fresh postmaster: {}",
        String::from_utf8_lossy(&stopped.stderr)
    );
}

/// psql over TCP to 127.0.0.1:`port` inside `netns` (a SYN the daemon's
/// sk_lookup program sees), as postgres.
fn psql_tcp(netns: &NetNs, port: u16, sql: &str) -> Result<String, String> {
    let output = output_within(
        netns
            .command("setpriv")
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
                &format!("{BIN}/psql"),
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                "postgres",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-c",
                sql,
            ])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LANG", "C.UTF-8"),
        Duration::from_secs(60),
    )
    .map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// psql's answer to `sql` from the daemon's service on `port`, which a
/// SYN wakes: a cluster snapshotted while its startup process ran says so
/// until it has finished starting up. Panics on an error, naming `when`.
fn psql_woken(sandbox: &Sandbox, port: u16, sql: &str, when: &str) -> String {
    let mut answer = psql_tcp(&sandbox.netns, port, sql);
    let _ = wait_until(Duration::from_secs(30), || {
        if !answer.as_ref().is_err_and(|e| e.contains("starting up")) {
            return true;
        }
        answer = psql_tcp(&sandbox.netns, port, sql);
        false
    });
    answer.unwrap_or_else(|e| panic!("{when}: psql -c {sql:?}: {e}\n{}", sandbox.daemon_log()))
}

/// The daemon's status of `name` once `check` holds for it.
fn status_when(
    sandbox: &Sandbox,
    name: &str,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let seen = wait_until(Duration::from_secs(60), || {
        last = sandbox.service(name).unwrap_or_default();
        check(&last)
    });
    assert!(
        seen.is_ok(),
        "{name} is not {what}: {last}\n{}",
        sandbox.daemon_log()
    );
    last
}

/// PostgreSQL under the daemon with `--on-idle keep`, ready when it says
/// so (sd_notify): woken by psql, a table made and filled, parked with its
/// state, woken by psql again, which finds the rows; a CHECKPOINT, `pg_ctl
/// stop -m fast`, the daemon sees it exit, and a fresh postmaster starts on
/// the data directory without recovery and finds the rows.
#[test]
fn postgres_parked_by_the_daemon_keeps_its_rows() {
    require_root!();
    const PORT: u16 = 8292;
    let cluster = Cluster::init(PORT);
    let sandbox = Sandbox::with_daemon().expect("sandbox with a daemon");
    cluster.add_to_daemon(&sandbox, &["--on-idle", "keep"]);
    status_when(&sandbox, "pg", "parked with a skeleton", |s| {
        s["state"] == "parked" && s["skeleton_pid"].is_i64()
    });

    let rows = "1|one\n2|two\n3|three";
    let query = |sql: &str, when: &str| psql_woken(&sandbox, PORT, sql, when);
    query(
        "CREATE TABLE parked (id int, name text); \
         INSERT INTO parked VALUES (1, 'one'), (2, 'two'), (3, 'three')",
        "first wake",
    );
    let running = status_when(&sandbox, "pg", "running as six processes", |s| {
        s["state"] == "running" && s["pids"].as_array().is_some_and(|p| p.len() == 1 + HELPERS)
    });
    assert_eq!(running["wakes"], 1, "{running}");
    // No client: the tree is parked with its state.
    let parked = wait_until(Duration::from_secs(30), || {
        sandbox.agent(&["park", "pg"]).status.success()
            && sandbox.service("pg").is_ok_and(|s| s["state"] == "parked")
    });
    let status = sandbox.service("pg").unwrap_or_default();
    assert!(
        parked.is_ok() && status["error"].is_null() && status["generation"] != "pristine",
        "postgres was not parked with its state: {status}\n{}",
        sandbox.daemon_log()
    );

    assert_eq!(
        query("SELECT * FROM parked ORDER BY id", "second wake"),
        rows,
        "the rows after the wake"
    );
    let running = status_when(&sandbox, "pg", "running again", |s| {
        s["state"] == "running" && s["pids"].as_array().is_some_and(|p| p.len() == 1 + HELPERS)
    });
    assert_eq!(running["wakes"], 2, "{running}");
    let root = running["pid"].as_i64().expect("a pid") as i32;
    // The daemon's skeletons map the same files, left when they are killed.
    cluster.note_shm_files(root);
    query("CHECKPOINT", "second wake");
    let stopped = cluster.stop(root);
    assert!(
        stopped.status.success(),
        "pg_ctl stop -m fast: {}{}",
        String::from_utf8_lossy(&stopped.stdout),
        String::from_utf8_lossy(&stopped.stderr)
    );
    status_when(&sandbox, "pg", "seen to exit", |s| s["pid"].is_null());
    sandbox.agent_ok(&["remove", "pg"]).expect("remove pg");

    // A fresh postmaster, in the cluster's own namespace: no recovery.
    let fresh = Started(cluster.start("fresh.log"));
    let log = cluster.log("fresh.log");
    for sign in [
        "was not properly shut down",
        "database system was interrupted",
        "automatic recovery",
    ] {
        assert!(
            !log.contains(sign),
            "the fresh start recovered ({sign:?}):\n{log}"
        );
    }
    assert_eq!(
        cluster.query_ok("SELECT * FROM parked ORDER BY id", "fresh start"),
        rows
    );
    let stopped = cluster.stop(fresh.0.id() as i32);
    assert!(
        stopped.status.success(),
        "pg_ctl stop of the fresh postmaster"
    );
}

/// PostgreSQL under the daemon parked with its image only (`--keep-skeleton
/// never`): each park removes the POSIX shared memory files its killed
/// tree mapped (the postmaster would have on a clean exit), so that the
/// parked service holds nothing in the host's memory; the next wake makes
/// them again from the image and answers.
#[test]
fn postgres_parked_without_a_skeleton_leaves_no_shared_memory_file() {
    require_root!();
    const PORT: u16 = 8294;
    let cluster = Cluster::init(PORT);
    let sandbox = Sandbox::with_daemon().expect("sandbox with a daemon");
    cluster.add_to_daemon(&sandbox, &["--keep-skeleton", "never"]);
    status_when(&sandbox, "pg", "parked on disk", |s| {
        s["state"] == "parked" && s["skeleton"] == "on disk"
    });

    for wake in ["first", "second"] {
        assert_eq!(
            psql_woken(&sandbox, PORT, "SELECT 1", wake),
            "1",
            "{wake} wake"
        );
        let running = status_when(&sandbox, "pg", "running", |s| {
            s["state"] == "running" && s["pid"].is_i64()
        });
        let root = running["pid"].as_i64().expect("a pid") as i32;
        let files = posix_shm_of(root);
        cluster.note_shm_files(root);
        assert!(
            !files.is_empty(),
            "{wake} wake: the postmaster maps no POSIX shared memory"
        );
        let parked = wait_until(Duration::from_secs(30), || {
            sandbox.agent(&["park", "pg"]).status.success()
                && sandbox.service("pg").is_ok_and(|s| s["state"] == "parked")
        });
        assert!(
            parked.is_ok(),
            "{wake} wake: not parked\n{}",
            sandbox.daemon_log()
        );
        let gone = wait_until(Duration::from_secs(10), || {
            files.iter().all(|file| !Path::new(file).exists())
        });
        assert!(
            gone.is_ok(),
            "{wake} wake: left after the park: {:?}\n{}",
            files
                .iter()
                .filter(|file| Path::new(file).exists())
                .collect::<Vec<_>>(),
            sandbox.daemon_log()
        );
    }
}
