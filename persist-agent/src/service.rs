//! Service definitions as registered by `add` and kept in the state directory.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use persist_common::trust::{TrustError, read_trusted_file, trusted_dir};
use serde::{Deserialize, Serialize};

/// Largest service file read: a definition is a few hundred bytes.
const MAX_SERVICE_FILE_BYTES: u64 = 1 << 20;

/// How a service is started when it wakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceMode {
    /// Start the command with the listener passed as fd 3 (systemd socket activation).
    Exec,
    /// Start the command once per connection, the connection on stdin and stdout.
    Inetd,
    /// Start the command once, snapshot it when ready, restore it on each wake.
    Snapshot,
}

impl ServiceMode {
    /// The name `status` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exec => "exec",
            Self::Inetd => "inetd",
            Self::Snapshot => "snapshot",
        }
    }
}

/// A registered service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Unique name.
    pub name: String,
    /// Local address of the listener, IPv4 or IPv6 (`::` is dual-stack).
    pub addr: IpAddr,
    /// TCP port of the listener.
    pub port: u16,
    /// How the service starts.
    pub mode: ServiceMode,
    /// Park the service after this long with no connection.
    #[serde(default, with = "humantime_serde_opt")]
    pub idle_timeout: Option<Duration>,
    /// Command and arguments (empty for a service registered from a prebuilt image).
    pub command: Vec<String>,
    /// Settings of the snapshot mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotSpec>,
    /// The file of the services directory that declares the service
    /// ([`crate::service_file`]); `None` for one registered by `add`. A
    /// reload of the directory manages only the services it declares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declared_in: Option<PathBuf>,
}

/// How a snapshot-mode service is built, woken and parked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSpec {
    /// User to run the command as (default: root, who runs the agent).
    #[serde(default)]
    pub user: Option<String>,
    /// When the freshly started command counts as ready to snapshot.
    pub ready: Readiness,
    /// How long to wait for readiness.
    #[serde(with = "humantime_serde")]
    pub ready_timeout: Duration,
    /// Requests sent after readiness and before the snapshot, to warm caches.
    #[serde(default)]
    pub warmup_requests: u32,
    /// A shell command run as the service's user once it is ready, before
    /// the snapshot, to warm its caches with real work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_command: Option<String>,
    /// What parking an idle service keeps.
    pub on_idle: OnIdle,
    /// A prebuilt image to register instead of running the command.
    #[serde(default)]
    pub image: Option<PathBuf>,
    /// Which pages a wake copies in before they are touched.
    #[serde(default)]
    pub prefetch: Prefetch,
    /// Reopen a file the image recorded when its path names another file
    /// now (other inode or device, same type), instead of failing the wake.
    /// Files are still opened with the process's credentials and never
    /// through a symbolic link.
    #[serde(default)]
    pub accept_changed_files: bool,
    /// Whether a skeleton is kept prepared while the service is parked
    /// (docs/parked-cost.md, Tiers).
    #[serde(default)]
    pub keep_skeleton: KeepSkeleton,
    /// Run the command with address-space layout randomisation off, so that
    /// services of one program (same command but for the port, same user
    /// and readiness) lay out their memory alike and their images store
    /// once the pages they have in common (docs/scale.md).
    #[serde(default)]
    pub share_pages: bool,
}

/// Whether a parked snapshot-mode service keeps a prepared skeleton (the
/// fastest wake, at its parked cost) or only its image on disk (no memory;
/// the wake prepares the skeleton first).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "daemon", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum KeepSkeleton {
    /// Always, whatever the daemon's skeleton budget.
    Always,
    /// While the daemon's skeleton budget allows it: the least recently
    /// woken services lose theirs first.
    #[default]
    Auto,
    /// Never: the image stays on disk and every wake is a cold one.
    Never,
}

impl KeepSkeleton {
    /// The name the command line and service files use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::Auto => "auto",
            Self::Never => "never",
        }
    }
}

/// Which pages a snapshot-mode wake copies in ahead of the process's faults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "daemon", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Prefetch {
    /// None: every page comes in on its first touch or by the background fill.
    None,
    /// The working set the first wake recorded, copied in bulk just before
    /// the resume; the first wake (and any wake whose set is stale) records it.
    #[default]
    Recorded,
    /// Every stored page, before the process resumes.
    All,
}

/// When a freshly started service is ready to be snapshotted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Readiness {
    /// Its process listens on the port.
    Tcp,
    /// An HTTP GET of `path` answers with a 2xx or 3xx status.
    Http {
        /// The path to GET, starting with `/`.
        path: String,
    },
    /// It sends `READY=1` on `NOTIFY_SOCKET` (systemd's protocol).
    Notify,
}

impl std::str::FromStr for Readiness {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "tcp" => Ok(Self::Tcp),
            "notify" => Ok(Self::Notify),
            _ => match text.strip_prefix("http:") {
                Some(path) if path.starts_with('/') => Ok(Self::Http { path: path.into() }),
                _ => Err(format!(
                    "unknown readiness {text:?}: use tcp, http:/PATH or notify"
                )),
            },
        }
    }
}

impl std::fmt::Display for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp => f.write_str("tcp"),
            Self::Http { path } => write!(f, "http:{path}"),
            Self::Notify => f.write_str("notify"),
        }
    }
}

/// What parking an idle snapshot-mode service keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "daemon", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum OnIdle {
    /// Discard what it did: the next wake starts from the pristine image.
    Fresh,
    /// Checkpoint it first: the next wake goes on where it stopped. When its
    /// state cannot be checkpointed, it is not parked but runs on.
    Keep,
}

/// Why a service definition was refused or could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The name cannot be used as a file name.
    #[error("invalid service name {0:?}: use letters, digits, '-', '_' and '.', at most 64")]
    BadName(String),
    /// Port 0 cannot be held.
    #[error("port 0 is not a port a service can own")]
    BadPort,
    /// No command was given.
    #[error("no command given after `--`")]
    NoCommand,
    /// The command is neither an existing path nor found on PATH.
    #[error("command not found: {0}")]
    CommandNotFound(String),
    /// A service registered from a prebuilt image was given a command too.
    #[error("--image takes no command: the image already holds the process (got {0:?})")]
    ImageWithCommand(Vec<String>),
    /// A duration is outside the range that setting accepts.
    #[error("{setting} {value} is out of range: use {min} to {max}")]
    OutOfRange {
        /// The setting, as the command line names it.
        setting: &'static str,
        /// The value given.
        value: String,
        /// The shortest accepted.
        min: String,
        /// The longest accepted.
        max: String,
    },
    /// A file or directory of the state directory is not to be trusted.
    #[error(transparent)]
    Untrusted(#[from] TrustError),
    /// A file in the state directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A stored service definition is not valid JSON for a service.
    #[error("{path}: invalid service file: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: serde_json::Error,
    },
}

/// Shortest idle timeout: a service parked sooner would be parked between
/// the requests of one client.
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_millis(100);
/// Longest idle timeout: a year (of 365.25 days, humantime's `1y`). A
/// service that should never be parked has no idle timeout.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(31_557_600);
/// Shortest time a snapshot-mode command is given to become ready.
pub const MIN_READY_TIMEOUT: Duration = Duration::from_millis(100);
/// Longest time a snapshot-mode command is given to become ready: a day.
pub const MAX_READY_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

impl ServiceSpec {
    /// Checks that `name` can name a service (and its files): letters,
    /// digits, `-`, `_` and `.`, not first, at most 64.
    pub fn check_name(name: &str) -> Result<(), ServiceError> {
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if name_ok {
            Ok(())
        } else {
            Err(ServiceError::BadName(name.to_owned()))
        }
    }

    /// Checks the settings ([`ServiceSpec::check_settings`]) and that the
    /// command exists.
    pub fn validate(&self) -> Result<(), ServiceError> {
        self.check_settings()?;
        let prebuilt = self.snapshot.as_ref().is_some_and(|s| s.image.is_some());
        if prebuilt {
            return Ok(());
        }
        let program = self.command.first().ok_or(ServiceError::NoCommand)?;
        if find_program(program).is_none() {
            return Err(ServiceError::CommandNotFound(program.clone()));
        }
        Ok(())
    }

    /// Checks the name, the port, the timeouts' ranges, and that a service
    /// from a prebuilt image has no command: everything a stored service
    /// must satisfy, whatever wrote it. Whether the command still exists is
    /// left to [`ServiceSpec::validate`], since an image may outlive it.
    pub fn check_settings(&self) -> Result<(), ServiceError> {
        Self::check_name(&self.name)?;
        if self.port == 0 {
            return Err(ServiceError::BadPort);
        }
        if let Some(timeout) = self.idle_timeout {
            check_range("idle timeout", timeout, MIN_IDLE_TIMEOUT, MAX_IDLE_TIMEOUT)?;
        }
        if let Some(snapshot) = &self.snapshot {
            check_range(
                "ready timeout",
                snapshot.ready_timeout,
                MIN_READY_TIMEOUT,
                MAX_READY_TIMEOUT,
            )?;
            if snapshot.image.is_some() && !self.command.is_empty() {
                return Err(ServiceError::ImageWithCommand(self.command.clone()));
            }
        }
        Ok(())
    }
}

fn check_range(
    setting: &'static str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ServiceError> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    let human = |duration| humantime::format_duration(duration).to_string();
    Err(ServiceError::OutOfRange {
        setting,
        value: human(value),
        min: human(min),
        max: human(max),
    })
}

/// Resolves a program name the way `execvp` would.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let is_executable = |path: &Path| {
        path.is_file() && nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_ok()
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        return is_executable(&path).then_some(path);
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&search)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

/// A stored service as loaded: the name of its file (without `.json`) and
/// the service, or why it cannot be used.
pub type LoadedService = (String, Result<ServiceSpec, ServiceError>);

/// The services directory of a state directory, where each service is `NAME.json`.
pub struct ServiceStore {
    dir: PathBuf,
}

impl ServiceStore {
    /// Opens `STATE_DIR/services`, creating it (mode 0700) if missing. The
    /// directory must be trusted ([`persist_common::trust`]): one that
    /// others could write is refused, never repaired, as whoever wrote to
    /// it could have registered commands to run as root.
    pub fn open(state_dir: &Path) -> Result<Self, ServiceError> {
        let dir = create_trusted_dir(&state_dir.join("services"))?;
        Ok(Self { dir })
    }

    /// Loads every stored service, each with the name of its file (without
    /// `.json`); a file that cannot be read, is not trusted or is not a
    /// valid service is reported alongside the others rather than hiding them.
    #[allow(clippy::type_complexity)]
    pub fn load_all(
        &self,
    ) -> Result<Vec<(String, Result<ServiceSpec, ServiceError>)>, ServiceError> {
        let io = |source| ServiceError::Io {
            path: self.dir.clone(),
            source,
        };
        let mut specs = Vec::new();
        let mut entries: Vec<_> = fs::read_dir(&self.dir)
            .map_err(io)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .collect();
        entries.sort();
        for path in entries {
            let stem = path
                .file_stem()
                .map_or_else(String::new, |stem| stem.to_string_lossy().into_owned());
            specs.push((stem, Self::load(&path)));
        }
        Ok(specs)
    }

    fn load(path: &Path) -> Result<ServiceSpec, ServiceError> {
        let text = read_trusted_file(path, MAX_SERVICE_FILE_BYTES)?;
        let spec: ServiceSpec =
            serde_json::from_slice(&text).map_err(|source| ServiceError::Parse {
                path: path.to_owned(),
                source,
            })?;
        spec.check_settings()?;
        Ok(spec)
    }

    /// Stores a service atomically (temp file, fsync, rename).
    pub fn save(&self, spec: &ServiceSpec) -> Result<(), ServiceError> {
        let path = self.path(&spec.name);
        let json = serde_json::to_vec_pretty(spec).expect("a service always serialises");
        write_atomically(&path, &json).map_err(|source| ServiceError::Io { path, source })
    }

    /// Deletes a stored service.
    pub fn delete(&self, name: &str) -> Result<(), ServiceError> {
        let path = self.path(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ServiceError::Io { path, source }),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }
}

/// Creates `dir` (mode 0700, with any missing parent) unless it exists, and
/// checks that it is trusted ([`persist_common::trust::trusted_dir`]).
/// Returns its resolved path.
pub fn create_trusted_dir(dir: &Path) -> Result<PathBuf, TrustError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| TrustError::Io {
            path: dir.to_owned(),
            source,
        })?;
    trusted_dir(dir)
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename, mode 0600.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_through_temp(path, bytes, true)
}

/// Writes `bytes` to `path` through a temporary file and a rename, mode
/// 0600, without waiting for the disk: a reader (a daemon restarted after a
/// crash) sees the old file or the new one, never part of one, but a host
/// crash may lose the write. For records of processes, which do not outlive
/// the host either; it spares a wake the two `fsync`s (about a millisecond
/// here: docs/parked-cost.md, Cold wakes).
pub fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_through_temp(path, bytes, false)
}

fn write_through_temp(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        if durable {
            file.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if durable && let Some(parent) = path.parent() {
            fs::File::open(parent)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

mod humantime_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        humantime::parse_duration(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => s.serialize_some(&humantime::format_duration(*duration).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| humantime::parse_duration(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, command: &str) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            addr: std::net::Ipv4Addr::LOCALHOST.into(),
            port: 8080,
            mode: ServiceMode::Exec,
            idle_timeout: Some(Duration::from_secs(30)),
            command: vec![command.into()],
            snapshot: None,
            declared_in: None,
        }
    }

    #[test]
    fn validation_names_what_is_wrong() {
        assert!(spec("web", "true").validate().is_ok());
        let err = spec("../etc", "true").validate().unwrap_err();
        assert!(err.to_string().contains("invalid service name"), "{err}");
        let err = spec("web", "no-such-program-xyz").validate().unwrap_err();
        assert_eq!(err.to_string(), "command not found: no-such-program-xyz");
    }

    #[test]
    fn readiness_parses_the_documented_forms() {
        assert_eq!("tcp".parse::<Readiness>(), Ok(Readiness::Tcp));
        assert_eq!("notify".parse::<Readiness>(), Ok(Readiness::Notify));
        assert_eq!(
            "http:/health".parse::<Readiness>(),
            Ok(Readiness::Http {
                path: "/health".into()
            })
        );
        assert!(
            "http:health"
                .parse::<Readiness>()
                .unwrap_err()
                .contains("use tcp")
        );
        assert_eq!(Readiness::Http { path: "/x".into() }.to_string(), "http:/x");
    }

    #[test]
    fn addresses_are_stored_as_text_of_either_family() {
        let mut dual = spec("web", "true");
        dual.addr = "::".parse().unwrap();
        let text = serde_json::to_string(&dual).unwrap();
        assert!(text.contains(r#""addr":"::""#), "{text}");
        assert_eq!(serde_json::from_str::<ServiceSpec>(&text).unwrap(), dual);
        // A file written when only IPv4 was accepted reads as before.
        let old = serde_json::to_string(&spec("web", "true")).unwrap();
        assert!(old.contains(r#""addr":"127.0.0.1""#), "{old}");
        assert_eq!(
            serde_json::from_str::<ServiceSpec>(&old).unwrap(),
            spec("web", "true")
        );
    }

    #[test]
    fn store_round_trips_and_reports_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = ServiceStore::open(dir.path()).unwrap();
        store.save(&spec("web", "true")).unwrap();
        fs::write(dir.path().join("services/broken.json"), b"{not json").unwrap();
        let loaded = store.load_all().unwrap();
        assert_eq!(loaded.len(), 2);
        assert!(
            matches!(&loaded[0], (name, Err(ServiceError::Parse { .. })) if name == "broken"),
            "broken.json sorts first"
        );
        assert_eq!(loaded[1].1.as_ref().unwrap(), &spec("web", "true"));
        store.delete("web").unwrap();
        assert_eq!(store.load_all().unwrap().len(), 1);
    }

    #[test]
    fn timeouts_out_of_range_and_an_image_with_a_command_are_refused() {
        let mut idle = spec("web", "true");
        for (timeout, accepted) in [
            (Duration::ZERO, false),
            (Duration::from_millis(99), false),
            (MIN_IDLE_TIMEOUT, true),
            (MAX_IDLE_TIMEOUT, true),
            (MAX_IDLE_TIMEOUT + Duration::from_secs(1), false),
            (Duration::from_secs(1_000_000_000 * 31_557_600), false),
        ] {
            idle.idle_timeout = Some(timeout);
            let result = idle.check_settings();
            assert_eq!(result.is_ok(), accepted, "{timeout:?}: {result:?}");
            if let Err(err) = result {
                assert!(err.to_string().starts_with("idle timeout "), "{err}");
                assert!(err.to_string().contains("use 100ms to 1year"), "{err}");
            }
        }

        let mut prebuilt = spec("web", "true");
        prebuilt.mode = ServiceMode::Snapshot;
        prebuilt.snapshot = Some(SnapshotSpec {
            user: None,
            ready: Readiness::Tcp,
            ready_timeout: Duration::from_secs(30),
            warmup_requests: 0,
            warmup_command: None,
            on_idle: OnIdle::Fresh,
            image: Some("/var/lib/persist/images/web".into()),
            prefetch: Prefetch::Recorded,
            accept_changed_files: false,
            keep_skeleton: KeepSkeleton::Auto,
            share_pages: false,
        });
        let err = prebuilt.validate().unwrap_err();
        assert!(
            err.to_string().starts_with("--image takes no command"),
            "{err}"
        );
        prebuilt.command.clear();
        assert!(prebuilt.validate().is_ok());
        prebuilt.snapshot.as_mut().unwrap().ready_timeout = Duration::ZERO;
        let err = prebuilt.validate().unwrap_err();
        assert!(
            err.to_string()
                .starts_with("ready timeout 0s is out of range"),
            "{err}"
        );
    }

    #[test]
    fn a_stored_service_is_checked_like_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = ServiceStore::open(dir.path()).unwrap();
        let mut quick = spec("quick", "true");
        quick.idle_timeout = Some(Duration::ZERO);
        store.save(&quick).unwrap();
        let loaded = store.load_all().unwrap();
        assert!(
            matches!(&loaded[0].1, Err(ServiceError::OutOfRange { .. })),
            "{loaded:?}"
        );
    }

    #[test]
    fn a_service_file_or_directory_others_own_or_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = ServiceStore::open(dir.path()).unwrap();
        store.save(&spec("web", "true")).unwrap();
        let file = dir.path().join("services/web.json");
        std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
        let loaded = store.load_all().unwrap();
        let err = loaded[0].1.as_ref().unwrap_err().to_string();
        assert!(err.contains("web.json: owned by uid 65534"), "{err}");

        let services = dir.path().join("services");
        fs::set_permissions(&services, fs::Permissions::from_mode(0o777)).unwrap();
        let err = ServiceStore::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("services: writable by group or others (mode 0777)"),
            "{err}"
        );
    }
}
