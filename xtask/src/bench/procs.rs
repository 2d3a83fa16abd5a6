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

    /// Sends `signal` to every process of the server, by pid: PostgreSQL's
    /// children each make a process group of their own, so the root's
    /// group does not reach them.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        kill(self.pid(), signal).with_context(|| format!("{signal} to pid {}", self.pid()))?;
        for pid in self.tree().into_iter().skip(1) {
            // One that exited meanwhile needs no signal.
            let _ = kill(pid, signal);
        }
        Ok(())
    }

    /// Stops the server (every process of it) with SIGSTOP and waits until
    /// the kernel shows them all stopped.
    pub fn freeze(&self) -> Result<()> {
        self.signal(Signal::SIGSTOP)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        for pid in self.tree() {
            // A process that exited meanwhile (a PostgreSQL backend that
            // served the last probe, a zombie until reaped) has nothing left
            // to stop.
            while process_state(pid).is_ok_and(|state| !matches!(state, 'T' | 'Z' | 'X')) {
                if Instant::now() > deadline {
                    bail!("pid {pid} did not stop after SIGSTOP");
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        Ok(())
    }

    /// The server's pid and its descendants', parents first.
    fn tree(&self) -> Vec<Pid> {
        let mut pids = vec![self.pid()];
        let mut next = 0;
        while let Some(&pid) = pids.get(next) {
            next += 1;
            pids.extend(children(pid));
        }
        pids
    }

    /// The proportional set size of the server's processes summed (`Pss:`
    /// of each `/proc/PID/smaps_rollup`): the pages its processes share
    /// (a master's and its workers', PostgreSQL's shared buffers) count once.
    pub fn pss_bytes(&self) -> Result<u64> {
        let mut kib = 0;
        for pid in self.tree() {
            let path = format!("/proc/{pid}/smaps_rollup");
            let rollup = match std::fs::read_to_string(&path) {
                Ok(rollup) => rollup,
                // A child that exited since it was listed (a PostgreSQL
                // backend that served the last request) holds nothing.
                Err(_) if pid != self.pid() => continue,
                Err(err) => return Err(err).with_context(|| path.clone()),
            };
            kib += rollup
                .lines()
                .find_map(|line| line.strip_prefix("Pss:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .with_context(|| format!("no Pss line in {path}"))?;
        }
        Ok(kib * 1024)
    }

    /// Stops the server with `signal` (its clean shutdown) and waits up to
    /// 10 s for it to exit; dropping it then kills what is left.
    pub fn stop(self, signal: Signal) -> Result<()> {
        kill(self.pid(), signal).with_context(|| format!("{signal} to pid {}", self.pid()))?;
        let mut this = self;
        let deadline = Instant::now() + Duration::from_secs(10);
        while this.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("pid {} did not exit within 10 s of {signal}", this.pid());
            }
            std::thread::sleep(Duration::from_millis(1));
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
        let children: Vec<Pid> = self.tree().into_iter().skip(1).collect();
        for &pid in &children {
            let _ = kill(pid, Signal::SIGKILL);
        }
        let _ = killpg(self.pid(), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A killed worker holds the listener until it has exited: the next
        // start's first connection could reach it and be reset.
        let deadline = Instant::now() + Duration::from_secs(2);
        for pid in children {
            while process_state(pid).is_ok_and(|state| state != 'Z') && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        // Workers the root forked after `tree()` looked, or that outlived
        // it (nginx's master, told to quit right after it started, forked
        // two more workers and exited before them): gone once the group is.
        // The next fresh start's first connection was reset by such a
        // worker's listener, closed as it died.
        while killpg(self.pid(), None).is_ok()
            && live_in_group(self.pid())
            && Instant::now() < deadline
        {
            let _ = killpg(self.pid(), Signal::SIGKILL);
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// Whether a process of group `pgid` has not exited yet (a zombie has closed
/// its descriptors; an orphan's may wait long for init to reap it).
fn live_in_group(pgid: Pid) -> bool {
    let Ok(processes) = procfs::process::all_processes() else {
        return false;
    };
    processes
        .filter_map(|process| process.ok()?.stat().ok())
        .any(|stat| stat.pgrp == pgid.as_raw() && stat.state != 'Z')
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

/// The children of `pid`, from each of its threads' `children` file.
fn children(pid: Pid) -> Vec<Pid> {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    threads
        .flatten()
        .filter_map(|thread| std::fs::read_to_string(thread.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .map(Pid::from_raw)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The one-letter state of `pid` from `/proc/PID/stat`.
fn process_state(pid: Pid) -> Result<char> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| path.clone())?;
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .with_context(|| format!("unreadable {path}: {stat:?}"))
}

/// The POSIX shared memory files (under /dev/shm) that `pids` map.
pub fn posix_shm_files(pids: &[i32]) -> Vec<String> {
    let mut files: Vec<String> = pids
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/maps")).ok())
        .flat_map(|maps| {
            maps.lines()
                .filter_map(|line| line.split_whitespace().nth(5))
                .filter(|path| path.starts_with("/dev/shm/"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    files.sort();
    files.dedup();
    files
}

/// Removes those of `files` that no process maps any more (their owner
/// was killed); waits up to 1 s for the killed processes to be gone.
pub fn remove_unused_shm_files(files: &[String]) {
    if files.is_empty() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut left: Vec<&String> = files.iter().collect();
    while !left.is_empty() {
        let mapped = mapped_anywhere(&left);
        left.retain(|file| {
            if mapped.contains(file.as_str()) {
                true
            } else {
                let _ = std::fs::remove_file(file);
                false
            }
        });
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Which of `files` some process on the host maps.
fn mapped_anywhere(files: &[&String]) -> std::collections::HashSet<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return std::collections::HashSet::new();
    };
    entries
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("maps")).ok())
        .flat_map(|maps| {
            files
                .iter()
                .filter(|file| maps.contains(file.as_str()))
                .map(|file| (*file).clone())
                .collect::<Vec<_>>()
        })
        .collect()
}
