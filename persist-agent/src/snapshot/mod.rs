//! Building a service's image: start the command as it would run by hand,
//! wait until it is ready, warm it up, take its listening socket, and
//! checkpoint it.
//!
//! Used by `persist-agent build` (no daemon) and by the daemon when a
//! snapshot-mode service is added.

mod handover;
mod readiness;
mod warmup;

use std::fs::{File, OpenOptions};
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

pub use handover::{
    find_listener, find_listeners, listener_backlog_in_image, listener_fd_in_image,
    listener_holders_in_image, place_listeners, reuseport_group_in_image,
};
pub use readiness::{NotifySocket, send_warmup_request};

use crate::checkpoint::{CheckpointError, CheckpointOptions, CheckpointSummary, checkpoint};
use crate::launch::{self, LaunchError};
use crate::service::Readiness;
use crate::sys::pidfd::PidFd;
use crate::sys::spawn::Identity;

/// How long a ready service gets to close the connections of readiness
/// checks and warm-up requests before it is snapshotted.
const QUIET_WAIT: Duration = Duration::from_secs(2);
/// How long the processes of a ready service that forks workers must stay
/// the same before it is snapshotted.
const TREE_SETTLE: Duration = Duration::from_millis(500);

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// Command and arguments.
    pub command: Vec<String>,
    /// Address the command listens on (IPv4 or IPv6).
    pub addr: IpAddr,
    /// Port the command listens on.
    pub port: u16,
    /// User to run it as (`None`: root).
    pub user: Option<String>,
    /// When it is ready.
    pub ready: Readiness,
    /// How long to wait for readiness.
    pub ready_timeout: Duration,
    /// Warm-up requests after readiness.
    pub warmup_requests: u32,
    /// A shell command run after the warm-up requests, as the service's
    /// user, which must succeed ([`warmup`]).
    pub warmup_command: Option<String>,
    /// The image directory to write.
    pub image: PathBuf,
    /// Where the command's stdout and stderr go (it keeps the file after restore).
    pub log: PathBuf,
    /// Directory for the `NOTIFY_SOCKET` of `--ready notify`.
    pub runtime_dir: PathBuf,
    /// Start the command with address-space layout randomisation off.
    pub no_aslr: bool,
    /// The image of a sibling: another service of the same program, started
    /// the same way. A page this image would store that the sibling stored
    /// with the same contents at the same address is referred to in the
    /// sibling's page store, which the new image hard-links, instead of
    /// being written again. When the sibling's image cannot serve (removed
    /// meanwhile, another filesystem), a full image is written.
    pub sibling: Option<PathBuf>,
}

/// A built image and the listening socket taken from the process.
#[derive(Debug)]
pub struct Built {
    /// The listening socket, now held by the caller.
    pub listener: OwnedFd,
    /// Its descriptor number in the snapshotted process.
    pub listener_fd: i32,
    /// The process's other listeners on the port (the rest of the
    /// listener's `SO_REUSEPORT` group), now held by the caller too.
    pub group: Vec<OwnedFd>,
    /// What the checkpoint saved.
    pub summary: CheckpointSummary,
    /// Time from start to ready.
    pub ready_after: Duration,
}

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// No such user.
    #[error("unknown user {0}")]
    UnknownUser(String),
    /// The command could not start.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// The log file could not be opened.
    #[error("{path}: {source}")]
    Log {
        /// The log file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The command exited before it was ready.
    #[error("{command} exited before it was ready ({status}); its output is in {log}")]
    ExitedEarly {
        /// The program.
        command: String,
        /// How it ended.
        status: String,
        /// Its log.
        log: PathBuf,
    },
    /// Readiness did not come in time.
    #[error(
        "{command} was not ready within {timeout:?} ({what}); it was stopped; its output is in {log}"
    )]
    NotReady {
        /// The program.
        command: String,
        /// The timeout.
        timeout: Duration,
        /// What was awaited.
        what: String,
        /// Its log.
        log: PathBuf,
    },
    /// The ready process holds no listening socket on the port.
    #[error("pid {pid} does not listen on port {port} itself: {reason}")]
    NoListener {
        /// The process.
        pid: i32,
        /// The port.
        port: u16,
        /// Details.
        reason: String,
    },
    /// The checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Anything else, with context.
    #[error("{0}")]
    Other(String),
}

/// Starts the command, waits for readiness, warms it up, takes its listener
/// and checkpoints it to the image (which stops it). On any failure the
/// process and its session are killed: nothing is left running.
pub fn build(request: &BuildRequest) -> Result<Built, BuildError> {
    let identity = request.user.as_deref().map(resolve_user).transpose()?;
    let log = open_log(&request.log)?;
    let null = File::open("/dev/null").map_err(|source| BuildError::Log {
        path: "/dev/null".into(),
        source,
    })?;
    let notify = match request.ready {
        Readiness::Notify if identity.is_some() => Some(NotifySocket::bind_abstract()?),
        Readiness::Notify => Some(NotifySocket::bind(&request.runtime_dir)?),
        _ => None,
    };
    let mut env = Vec::new();
    if let Some(notify) = &notify {
        env.push(format!("NOTIFY_SOCKET={}", notify.address()));
    }
    let fds = vec![(null.as_fd(), 0), (log.as_fd(), 1), (log.as_fd(), 2)];
    let started = Instant::now();
    let spawned = launch::start(
        &request.command,
        &env,
        false,
        fds,
        identity.clone(),
        request.no_aslr,
    )?;
    let guard = KillOnDrop(Some(&spawned.pidfd));

    let program = request.command[0].clone();
    readiness::wait(&spawned.pidfd, request, notify.as_ref(), |status| {
        BuildError::ExitedEarly {
            command: program.clone(),
            status,
            log: request.log.clone(),
        }
    })
    .map_err(|err| match err {
        readiness::WaitError::TimedOut(what) => BuildError::NotReady {
            command: program.clone(),
            timeout: request.ready_timeout,
            what,
            log: request.log.clone(),
        },
        readiness::WaitError::Failed(err) => err,
    })?;
    let ready_after = started.elapsed();
    for _ in 0..request.warmup_requests {
        send_warmup_request(request.addr, request.port, &request.ready)
            .map_err(|err| BuildError::Other(format!("warm-up request: {err}")))?;
    }
    if let Some(command) = &request.warmup_command {
        warmup::run(command, identity.clone(), &log, request.ready_timeout)?;
    }

    let processes = readiness::settled_tree(spawned.pid, TREE_SETTLE, QUIET_WAIT);
    readiness::wait_for_quiet_sockets(&processes, QUIET_WAIT);
    let (listener_fd, listener, group) = handover::take_listeners(&spawned.pidfd, request.port)?;
    let options = CheckpointOptions {
        pid: spawned.pid,
        image: request.image.clone(),
        leave_running: false,
        exclude_fds: Vec::new(),
        base: request.sibling.clone(),
        base_is_sibling: request.sibling.is_some(),
        agent_files: vec![request.log.clone()],
        recovery_file: None,
        // A service of several processes (a master and its workers) is
        // checkpointed whole, and restored so; whichever children the root
        // has once it is frozen (it cannot fork then), none for a single
        // process, whose image is then as without `tree`.
        tree: true,
        // A warm-up client still connected would be woken into a
        // conversation it never started.
        client_ports: vec![request.port],
    };
    let summary = match checkpoint(&options) {
        // The process runs on when only the sibling stood in the way.
        Err(err)
            if err.is_base_unusable()
                && let Some(sibling) = &options.base =>
        {
            tracing::warn!(
                pid = spawned.pid,
                "sharing pages with {} is not possible, writing them all: {err}",
                sibling.display()
            );
            checkpoint(&CheckpointOptions {
                base: None,
                ..options
            })?
        }
        result => result?,
    };
    crate::sys::spawn::reap(&spawned.pidfd, true);
    guard.disarm();
    Ok(Built {
        listener,
        listener_fd,
        group,
        summary,
        ready_after,
    })
}

fn open_log(path: &std::path::Path) -> Result<File, BuildError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| BuildError::Log {
            path: parent.to_owned(),
            source,
        })?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| BuildError::Log {
            path: path.to_owned(),
            source,
        })
}

fn resolve_user(name: &str) -> Result<Identity, BuildError> {
    let user = nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .ok_or_else(|| BuildError::UnknownUser(name.to_owned()))?;
    let cname = std::ffi::CString::new(name).map_err(|_| BuildError::UnknownUser(name.into()))?;
    let groups = nix::unistd::getgrouplist(&cname, user.gid)
        .map_err(|err| BuildError::Other(format!("groups of {name}: {err}")))?;
    Ok(Identity {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        groups: groups.into_iter().map(|g| g.as_raw()).collect(),
    })
}

/// Kills a started command's session unless disarmed.
struct KillOnDrop<'a>(Option<&'a PidFd>);

impl KillOnDrop<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(pidfd) = self.0 {
            let pid = nix::unistd::Pid::from_raw(pidfd.pid());
            let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
            crate::sys::spawn::reap(pidfd, true);
        }
    }
}
