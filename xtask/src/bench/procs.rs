//! Server processes the bench starts itself, killed by pid when dropped
//! (also when the bench fails halfway).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// A started server; dropping it SIGKILLs its process group and reaps it.
pub struct ServerProcess {
    child: Child,
}

impl ServerProcess {
    /// Starts `argv` in a process group of its own, output discarded. The
    /// caller's thread decides the network namespace the server runs in.
    pub fn spawn(argv: &[String]) -> Result<Self> {
        let (program, args) = argv.split_first().context("empty server command")?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", argv.join(" ")))?;
        Ok(Self { child })
    }

    /// The server's pid.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Sends `signal` to the server.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        kill(self.pid(), signal).with_context(|| format!("{signal} to pid {}", self.pid()))
    }

    /// Stops the server with SIGSTOP and waits until the kernel shows it stopped.
    pub fn freeze(&self) -> Result<()> {
        self.signal(Signal::SIGSTOP)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while process_state(self.pid())? != 'T' {
            if Instant::now() > deadline {
                bail!("pid {} did not stop after SIGSTOP", self.pid());
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(())
    }

    /// Resident memory of the server, from `/proc/PID/status`.
    pub fn rss_bytes(&self) -> Result<u64> {
        let status = procfs::process::Process::new(self.pid().as_raw())
            .and_then(|process| process.status())
            .with_context(|| format!("/proc/{}/status", self.pid()))?;
        let kib = status
            .vmrss
            .with_context(|| format!("no VmRSS for pid {}", self.pid()))?;
        Ok(kib * 1024)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = killpg(self.pid(), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGKILLs `pid` (and its session), an orphan reparented to us as child
/// subreaper, and reaps it, so that its pid is free again when this returns.
pub fn kill_and_reap_orphan(pid: i32) -> Result<()> {
    persist_tests::kill_session(pid);
    match nix::sys::wait::waitpid(Pid::from_raw(pid), None) {
        Ok(_) | Err(nix::errno::Errno::ECHILD) => {}
        Err(err) => bail!("reaping pid {pid}: {err}"),
    }
    // Not ours after all (ECHILD): wait until whoever reaps it has.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            bail!("pid {pid} was killed but is still not reaped after 5 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// The one-letter state of `pid` from `/proc/PID/stat`.
fn process_state(pid: Pid) -> Result<char> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| path.clone())?;
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .with_context(|| format!("unreadable {path}: {stat:?}"))
}
