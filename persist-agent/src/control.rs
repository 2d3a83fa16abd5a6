//! The control protocol between the CLI and the daemon.
//!
//! One JSON [`Request`] per connection to `STATE_DIR/agent.sock`, terminated
//! by a newline; the daemon answers with one JSON [`Reply`] line and closes.
//! The socket is mode 0600 inside a 0700 directory: only root talks to it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::service::ServiceSpec;

/// File name of the control socket inside the state directory.
pub const SOCKET_FILE: &str = "agent.sock";

/// Longest request line the daemon reads, its newline included: an `add`
/// with a long command fits many times over, and a client cannot make the
/// daemon hold more.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// Path of the control socket of a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_FILE)
}

/// A command for the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Register a service.
    Add {
        /// Its definition.
        spec: ServiceSpec,
    },
    /// Unregister a service.
    Remove {
        /// Its name.
        name: String,
    },
    /// Report the services named, or every service when none is.
    Status {
        /// The services to report; empty: all of them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        names: Vec<String>,
    },
    /// Stop a service now and park it.
    Park {
        /// Its name.
        name: String,
    },
    /// Start a parked service now.
    Wake {
        /// Its name.
        name: String,
    },
    /// List the generations of a service's kept state.
    History {
        /// Its name.
        name: String,
    },
    /// Make the next wake restore an older generation.
    Rollback {
        /// Its name.
        name: String,
        /// A generation number or `pristine`; the good one before the
        /// current when absent.
        to: Option<String>,
    },
    /// Keep a running service's state as a new generation without parking it.
    Snapshot {
        /// Its name.
        name: String,
        /// A name that keeps the generation from ever being pruned.
        tag: Option<String>,
    },
    /// Apply the services directory again.
    Reload,
}

impl Request {
    /// Decodes one request line as the daemon reads it (the newline, if
    /// any, included).
    pub fn decode(line: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(line)
    }
}

/// The daemon's answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reply {
    /// Human-readable outcome.
    #[serde(default)]
    pub message: String,
    /// Set when the request failed: one line saying why.
    #[serde(default)]
    pub error: Option<String>,
    /// Service states, for `status`.
    #[serde(default)]
    pub services: Vec<ServiceStatus>,
    /// A service's generations, for `history`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryEntry>,
    /// The prepared skeletons and the budget, for `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skeletons: Option<SkeletonSummary>,
}

/// The skeletons the daemon holds for parked services, and its budget
/// (docs/parked-cost.md, Tiers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkeletonSummary {
    /// Prepared skeletons.
    pub held: u64,
    /// What they cost together: memory, page tables and kernel objects.
    pub held_bytes: u64,
    /// The daemon's `--skeleton-budget`, if it has one.
    #[serde(default)]
    pub budget_bytes: Option<u64>,
}

impl std::fmt::Display for SkeletonSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "skeletons: {} prepared, {} KiB",
            self.held,
            self.held_bytes / 1024
        )?;
        match self.budget_bytes {
            Some(budget) => write!(f, " of a {} KiB budget", budget / 1024),
            None => write!(f, " (no budget)"),
        }
    }
}

/// One generation of a service's state, as `history` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// `pristine` or the generation's number.
    pub generation: String,
    /// When it was kept, milliseconds since the Unix epoch (none for the
    /// pristine image).
    pub created_unix_ms: Option<u64>,
    /// Bytes of pages it stored itself; the others are shared with older ones.
    pub new_bytes: Option<u64>,
    /// Wakes that restored it.
    pub wakes: Option<u64>,
    /// Why no wake restores it any more.
    pub bad: Option<String>,
    /// Its tag, if it has one (never pruned).
    pub tag: Option<String>,
    /// The running process was restored from it.
    pub running: bool,
    /// The next wake restores it.
    pub next: bool,
}

impl Reply {
    /// A successful reply with a message.
    pub fn ok(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            ..Self::default()
        }
    }

    /// A failed reply.
    pub fn error(error: impl Into<String>) -> Self {
        Self {
            error: Some(error.into()),
            ..Self::default()
        }
    }
}

impl Reply {
    /// Decodes the daemon's answer line as the CLI reads it.
    pub fn decode(line: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(line)
    }
}

/// One service as `status --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// Listen address.
    pub addr: String,
    /// Listen port.
    pub port: u16,
    /// `exec` or `inetd`.
    pub mode: String,
    /// `parked`, `waking`, `running`, `stopping`, `failed` (its last wake
    /// or the preparation of its next one failed, `error` says why) or
    /// `stale` (its image was taken on another kernel build or CPU).
    pub state: String,
    /// Pid of the service process, if one runs.
    pub pid: Option<i32>,
    /// SYNs counted by the BPF program.
    pub syns: u64,
    /// Times the service was woken.
    pub wakes: u64,
    /// Microseconds from the waking SYN to the service running, for the last wake.
    pub last_wake_us: Option<u64>,
    /// Microseconds from the waking SYN to the daemon reading its wake event.
    #[serde(default)]
    pub last_event_us: Option<u64>,
    /// Microseconds the last skeleton resume took (snapshot mode's critical path).
    #[serde(default)]
    pub last_resume_us: Option<u64>,
    /// Page faults the pager served during the last wake (snapshot mode);
    /// of a tree, the root's pager (each descendant's logs its own).
    #[serde(default)]
    pub last_faults: Option<u64>,
    /// Pages copied in to serve those faults.
    #[serde(default)]
    pub last_fault_pages: Option<u64>,
    /// Pages copied in the background, ahead of any fault, after the last wake (the root's).
    #[serde(default)]
    pub last_filled_pages: Option<u64>,
    /// Pages copied in ahead of faults (recorded working set, or every page) on the last wake;
    /// of a tree, into every one of its processes before it ran.
    #[serde(default)]
    pub last_prefetch_pages: Option<u64>,
    /// Resident memory of the service's processes (of its prepared skeleton while parked).
    pub rss_bytes: u64,
    /// Every process of the running service: its root (`pid`) first, then
    /// the processes under it (a master's workers), parents first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pids: Vec<i32>,
    /// The proportional set size of those processes summed (`Pss:` of
    /// each `/proc/PID/smaps_rollup`): a page they share counts once, where
    /// `rss_bytes` counts it in each. 0 while no process runs.
    #[serde(default)]
    pub pss_bytes: u64,
    /// What a parked service costs the host, [`ParkedCost::total`]. 0 while
    /// running.
    #[serde(default)]
    pub parked_bytes: u64,
    /// Pid of the prepared skeleton of its next wake, while parked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skeleton_pid: Option<i32>,
    /// A parked snapshot service's next wake: `prepared` (a skeleton
    /// waits) or `on disk` (the wake prepares it from the image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skeleton: Option<String>,
    /// Its `--keep-skeleton` setting (snapshot mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_skeleton: Option<String>,
    /// What its prepared skeleton costs, as the skeleton budget counts it
    /// (the skeleton's memory, page tables and kernel objects only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skeleton_bytes: Option<u64>,
    /// What [`ServiceStatus::parked_bytes`] is made of, while parked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked_cost: Option<ParkedCost>,
    /// Why the service failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The generation of its kept state that runs, or that the next wake
    /// restores: `pristine` or a number (snapshot mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<String>,
    /// Something the daemon did to the service on its own that its owner
    /// should know (it was rebuilt from its command, or rolled back past a
    /// generation that crashed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What the host pays for one parked service, in bytes
/// (docs/parked-cost.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedCost {
    /// Anonymous pages of the processes that wait for its wake (its
    /// prepared skeleton, the init of the skeleton's pid namespace, its
    /// port keeper), and the pages held by the shared memory objects they
    /// map, each object once, mapped or not.
    pub private_bytes: u64,
    /// Their page tables.
    pub page_table_bytes: u64,
    /// Their kernel objects (tasks, kernel stacks, mappings, open files),
    /// estimated from the object sizes in /proc/slabinfo.
    pub kernel_bytes: u64,
    /// Its share of the agent's own memory: what the agent grew by since it
    /// started, divided by the services it holds.
    pub agent_share_bytes: u64,
}

impl ParkedCost {
    /// Everything together.
    pub fn total(&self) -> u64 {
        self.private_bytes + self.page_table_bytes + self.kernel_bytes + self.agent_share_bytes
    }
}

/// Why the CLI could not get an answer from the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No daemon listens on the socket.
    #[error(
        "the persist daemon is not running (no answer on {0}); start it with `persist-agent daemon`"
    )]
    NotRunning(PathBuf),
    /// The connection failed midway.
    #[error("talking to the daemon on {path}: {source}")]
    Io {
        /// The control socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The daemon's answer was not understood.
    #[error("bad answer from the daemon: {0}")]
    BadReply(#[from] serde_json::Error),
    /// The daemon refused the request.
    #[error("{0}")]
    Refused(String),
}

/// Sends one request to the daemon of `state_dir` and waits for its reply.
pub fn call(state_dir: &Path, request: &Request) -> Result<Reply, ControlError> {
    let path = socket_path(state_dir);
    let mut stream =
        UnixStream::connect(&path).map_err(|_| ControlError::NotRunning(path.clone()))?;
    let io = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(io)?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = Vec::new();
    BufReader::new(&stream)
        .read_until(b'\n', &mut answer)
        .map_err(io)?;
    let reply = Reply::decode(&answer)?;
    match reply.error {
        Some(error) => Err(ControlError::Refused(error)),
        None => Ok(reply),
    }
}

/// `addr:port`, an IPv6 address in brackets (`[::1]:8000`).
fn endpoint(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// Renders services as a fixed-width table for people.
pub fn status_table(services: &[ServiceStatus]) -> String {
    let mut out = format!(
        "{:<16} {:<21} {:<6} {:<9} {:>8} {:>8} {:>6} {:>12} {:>10}\n",
        "NAME", "LISTEN", "MODE", "STATE", "PID", "SYNS", "WAKES", "LAST WAKE", "RSS"
    );
    let mut parked_note = false;
    for service in services {
        parked_note |= service.state != "running" && service.parked_bytes != 0;
        let pid = service.pid.map_or("-".to_owned(), |pid| pid.to_string());
        let wake = service
            .last_wake_us
            .map_or("-".to_owned(), |us| format!("{:.3} ms", us as f64 / 1000.0));
        out.push_str(&format!(
            "{:<16} {:<21} {:<6} {:<9} {:>8} {:>8} {:>6} {:>12} {:>10}\n",
            service.name,
            endpoint(&service.addr, service.port),
            service.mode,
            service.state,
            pid,
            service.syns,
            service.wakes,
            wake,
            if service.state == "running" || service.parked_bytes == 0 {
                format!("{} KiB", service.rss_bytes / 1024)
            } else {
                format!("{} KiB*", service.parked_bytes / 1024)
            },
        ));
        if let Some(error) = &service.error {
            out.push_str(&format!("  {}: {error}\n", service.name));
        }
        if let Some(note) = &service.note {
            out.push_str(&format!("  {}: {note}\n", service.name));
        }
        if service.state == "parked" && service.skeleton.as_deref() == Some("on disk") {
            out.push_str(&format!(
                "  {}: no skeleton prepared, the next wake prepares it (cold)\n",
                service.name
            ));
        }
        if let Some(generation) = service.generation.as_ref().filter(|g| *g != "pristine") {
            let verb = if service.state == "running" {
                "runs"
            } else {
                "wakes from"
            };
            out.push_str(&format!(
                "  {}: {verb} kept generation {generation}\n",
                service.name
            ));
        }
    }
    if parked_note {
        out.push_str(
            "* parked cost: memory, page tables and kernel objects of the prepared skeleton \
             if any, and a share of the agent, its port keeper and its spawner\n",
        );
    }
    out
}

/// The `history` table: one line per generation, oldest first.
pub fn history_table(entries: &[HistoryEntry]) -> String {
    let mut out = format!(
        "{:<10} {:<20} {:>10} {:>6}  {}\n",
        "GEN", "KEPT AT", "NEW BYTES", "WAKES", "STATUS"
    );
    for entry in entries {
        let kept_at = entry.created_unix_ms.map_or("-".to_owned(), kept_at);
        let mut status = Vec::new();
        if entry.running {
            status.push("running".to_owned());
        }
        if entry.next {
            status.push("next wake".to_owned());
        }
        if let Some(tag) = &entry.tag {
            status.push(format!("tag {tag:?}"));
        }
        if let Some(bad) = &entry.bad {
            status.push(format!("bad: {bad}"));
        }
        out.push_str(&format!(
            "{:<10} {:<20} {:>10} {:>6}  {}\n",
            entry.generation,
            kept_at,
            entry.new_bytes.map_or("-".to_owned(), |b| b.to_string()),
            entry.wakes.map_or("-".to_owned(), |w| w.to_string()),
            status.join(", ")
        ));
    }
    out
}

/// A generation's time as `history` shows it, UTC to the second; a time
/// past what RFC 3339 can write (year 9999) as its raw number.
fn kept_at(unix_ms: u64) -> String {
    const YEAR_10000_MS: u64 = 253_402_300_800_000;
    if unix_ms >= YEAR_10000_MS {
        return format!("{unix_ms} ms");
    }
    let time = std::time::UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_seconds(time)
        .to_string()
        .trim_end_matches('Z')
        .replace('T', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_times_print_as_utc_seconds_and_absurd_ones_as_numbers() {
        assert_eq!(kept_at(1_764_820_800_000), "2025-12-04 04:00:00");
        assert_eq!(kept_at(u64::MAX), format!("{} ms", u64::MAX));
    }
}
