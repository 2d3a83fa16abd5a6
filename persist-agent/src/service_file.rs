//! Services declared in files: `SERVICES_DIR/NAME.toml`, one service per
//! file, the daemon's `--services-dir` (default `/etc/persist/services.d`).
//!
//! A file holds the options of `add` as TOML keys (`docs/services.md` lists
//! them); the service is named after the file. Unknown keys are errors, so a
//! typo is caught rather than silently ignored, and every error names the
//! file, the line and the key at fault. The directory and its files are
//! trusted as the state directory is ([`persist_common::trust`]): they name
//! commands the agent runs as root.

use std::collections::BTreeMap;
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use persist_common::trust::{TrustError, read_trusted_file, trusted_dir};
use serde::Deserialize;
use toml::Spanned;

use crate::service::{
    KeepSkeleton, OnIdle, Prefetch, Readiness, ServiceError, ServiceMode, ServiceSpec, SnapshotSpec,
};

/// Where the daemon and `check` look for service files by default.
pub const DEFAULT_SERVICES_DIR: &str = "/etc/persist/services.d";

/// Extension of a service file; other files in the directory are ignored.
pub const EXTENSION: &str = "toml";

/// Largest service file read: a definition is a few hundred bytes.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Readiness timeout when a file does not set one, as for `add`.
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a service file does not declare a usable service.
#[derive(Debug, thiserror::Error)]
pub enum ServiceFileError {
    /// The file or its directory could not be read, or is not trusted.
    #[error(transparent)]
    Unreadable(#[from] TrustError),
    /// The file is not a valid service: its place and what is wrong.
    #[error("{}", located(path, *line, field.as_deref(), message))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The line at fault (1-based), when one is.
        line: Option<usize>,
        /// The key at fault, when one is.
        field: Option<String>,
        /// What is wrong.
        message: String,
    },
}

fn located(path: &Path, line: Option<usize>, field: Option<&str>, message: &str) -> String {
    let mut text = path.display().to_string();
    if let Some(line) = line {
        text.push_str(&format!(":{line}"));
    }
    text.push_str(": ");
    if let Some(field) = field {
        text.push_str(&format!("{field}: "));
    }
    text.push_str(message);
    text
}

impl ServiceFileError {
    /// The file at fault.
    pub fn path(&self) -> &Path {
        match self {
            Self::Unreadable(err) => err.path(),
            Self::Invalid { path, .. } => path,
        }
    }
}

/// One service file of a directory, as loaded.
#[derive(Debug)]
pub struct DeclaredService {
    /// The service's name: the file's name without `.toml`.
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// The service it declares, or why it declares none.
    pub spec: Result<ServiceSpec, ServiceFileError>,
}

/// The keys of a service file, each kept with its place in the file so
/// that an error found after parsing still names its line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    port: Spanned<u16>,
    addr: Option<Spanned<String>>,
    mode: Option<Spanned<ServiceMode>>,
    command: Option<Spanned<Vec<String>>>,
    idle_timeout: Option<Spanned<String>>,
    on_idle: Option<Spanned<OnIdle>>,
    image: Option<Spanned<PathBuf>>,
    prefetch: Option<Spanned<Prefetch>>,
    accept_changed_files: Option<Spanned<bool>>,
    keep_skeleton: Option<Spanned<KeepSkeleton>>,
    share_pages: Option<Spanned<bool>>,
    user: Option<Spanned<String>>,
    ready: Option<Spanned<String>>,
    ready_timeout: Option<Spanned<String>>,
    warmup_requests: Option<Spanned<u32>>,
    warmup_command: Option<Spanned<String>>,
}

/// Reads and checks every `*.toml` file of `dir`, in name order. A missing
/// directory declares no service; one that is not trusted is an error, as
/// nothing in it can be used. A file with an error is returned with it,
/// never hiding the others; two files claiming one port make the second
/// an error.
pub fn load_dir(dir: &Path) -> Result<Vec<DeclaredService>, TrustError> {
    let dir = match trusted_dir(dir) {
        Ok(dir) => dir,
        Err(err) if err.is_not_found() => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let io = |source| TrustError::Io {
        path: dir.clone(),
        source,
    };
    let mut paths = Vec::new();
    for entry in fs::read_dir(&dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let hidden = path
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with('.'));
        if !hidden && path.extension().is_some_and(|ext| ext == EXTENSION) {
            paths.push(path);
        }
    }
    paths.sort();
    let mut ports: BTreeMap<u16, String> = BTreeMap::new();
    let mut declared = Vec::new();
    for path in paths {
        let name = path
            .file_stem()
            .map_or_else(String::new, |stem| stem.to_string_lossy().into_owned());
        let mut spec = load_file(&path);
        if let Ok(service) = &spec {
            if let Some(other) = ports.get(&service.port) {
                spec = Err(ServiceFileError::Invalid {
                    line: port_line(&path),
                    path: path.clone(),
                    field: Some("port".into()),
                    message: format!("port {} is already declared by {other}", service.port),
                });
            } else {
                ports.insert(service.port, format!("{name}.{EXTENSION}"));
            }
        }
        declared.push(DeclaredService { name, path, spec });
    }
    Ok(declared)
}

/// The line of the `port` key, for an error found across files.
fn port_line(path: &Path) -> Option<usize> {
    let text = fs::read_to_string(path).ok()?;
    let file: ServiceFile = toml::from_str(&text).ok()?;
    Some(line_of(&text, file.port.span()))
}

/// Reads one service file (trusted, see [`persist_common::trust`]) and
/// checks it as `add` checks its options, the command's existence included.
pub fn load_file(path: &Path) -> Result<ServiceSpec, ServiceFileError> {
    let bytes = read_trusted_file(path, MAX_FILE_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|err| ServiceFileError::Invalid {
        path: path.to_owned(),
        line: None,
        field: None,
        message: format!("not UTF-8 text: {err}"),
    })?;
    let name = path
        .file_stem()
        .map_or_else(String::new, |stem| stem.to_string_lossy().into_owned());
    parse(&name, path, &text)
}

/// Parses the text of the service file `path`, declaring service `name`.
pub fn parse(name: &str, path: &Path, text: &str) -> Result<ServiceSpec, ServiceFileError> {
    let at = |span: Option<Range<usize>>, field: Option<&str>, message: String| {
        ServiceFileError::Invalid {
            path: path.to_owned(),
            line: span.map(|span| line_of(text, span)),
            field: field.map(str::to_owned),
            message,
        }
    };
    let file: ServiceFile = toml::from_str(text).map_err(|err| {
        let message = err.message().trim_end().to_owned();
        // A missing key has no place in the file, and its message names it.
        let span = err.span().filter(|_| !message.starts_with("missing field"));
        let field = span.clone().and_then(|span| key_at(text, span));
        at(span, field.as_deref(), message)
    })?;
    let wrong =
        |span: Range<usize>, field: &str, message: String| at(Some(span), Some(field), message);

    let mode = file
        .mode
        .as_ref()
        .map_or(ServiceMode::Snapshot, |m| *m.get_ref());
    if mode != ServiceMode::Snapshot {
        let snapshot_only = [
            ("on_idle", file.on_idle.as_ref().map(Spanned::span)),
            ("image", file.image.as_ref().map(Spanned::span)),
            ("prefetch", file.prefetch.as_ref().map(Spanned::span)),
            (
                "accept_changed_files",
                file.accept_changed_files.as_ref().map(Spanned::span),
            ),
            (
                "keep_skeleton",
                file.keep_skeleton.as_ref().map(Spanned::span),
            ),
            ("share_pages", file.share_pages.as_ref().map(Spanned::span)),
            ("user", file.user.as_ref().map(Spanned::span)),
            ("ready", file.ready.as_ref().map(Spanned::span)),
            (
                "ready_timeout",
                file.ready_timeout.as_ref().map(Spanned::span),
            ),
            (
                "warmup_requests",
                file.warmup_requests.as_ref().map(Spanned::span),
            ),
            (
                "warmup_command",
                file.warmup_command.as_ref().map(Spanned::span),
            ),
        ];
        if let Some((field, Some(span))) = snapshot_only.into_iter().find(|(_, s)| s.is_some()) {
            return Err(wrong(
                span,
                field,
                format!(
                    "applies to mode = \"snapshot\" only, and this service's mode is \"{}\"",
                    mode.as_str()
                ),
            ));
        }
    }
    let duration = |value: &Spanned<String>, field: &str| {
        humantime::parse_duration(value.get_ref()).map_err(|err| {
            let message = format!(
                "{:?} is not a duration such as 30s, 5m or 1h30m: {err}",
                value.get_ref()
            );
            wrong(value.span(), field, message)
        })
    };
    let addr = match &file.addr {
        Some(addr) => addr
            .get_ref()
            .parse()
            .map_err(|err| wrong(addr.span(), "addr", format!("{:?}: {err}", addr.get_ref())))?,
        None => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
    };
    let idle_timeout = file
        .idle_timeout
        .as_ref()
        .map(|value| duration(value, "idle_timeout"))
        .transpose()?;
    let image = match &file.image {
        Some(image) if image.get_ref().is_relative() => {
            return Err(wrong(
                image.span(),
                "image",
                format!("{}: give an absolute path", image.get_ref().display()),
            ));
        }
        image => image.as_ref().map(|image| image.get_ref().clone()),
    };
    let snapshot = match mode {
        ServiceMode::Snapshot => Some(SnapshotSpec {
            user: file.user.as_ref().map(|user| user.get_ref().clone()),
            ready: match &file.ready {
                Some(ready) => ready
                    .get_ref()
                    .parse::<Readiness>()
                    .map_err(|err| wrong(ready.span(), "ready", err))?,
                None => Readiness::Tcp,
            },
            ready_timeout: file
                .ready_timeout
                .as_ref()
                .map(|value| duration(value, "ready_timeout"))
                .transpose()?
                .unwrap_or(DEFAULT_READY_TIMEOUT),
            warmup_requests: file.warmup_requests.as_ref().map_or(0, |n| *n.get_ref()),
            warmup_command: file
                .warmup_command
                .as_ref()
                .map(|command| command.get_ref().clone()),
            on_idle: file
                .on_idle
                .as_ref()
                .map_or(OnIdle::Fresh, |o| *o.get_ref()),
            image,
            prefetch: file
                .prefetch
                .as_ref()
                .map_or(Prefetch::default(), |p| *p.get_ref()),
            accept_changed_files: file
                .accept_changed_files
                .as_ref()
                .is_some_and(|a| *a.get_ref()),
            keep_skeleton: file
                .keep_skeleton
                .as_ref()
                .map_or(KeepSkeleton::default(), |k| *k.get_ref()),
            share_pages: file.share_pages.as_ref().is_some_and(|s| *s.get_ref()),
        }),
        ServiceMode::Exec | ServiceMode::Inetd => None,
    };
    let spec = ServiceSpec {
        name: name.to_owned(),
        addr,
        port: *file.port.get_ref(),
        mode,
        idle_timeout,
        command: file
            .command
            .as_ref()
            .map(|command| command.get_ref().clone())
            .unwrap_or_default(),
        snapshot,
        declared_in: Some(path.to_owned()),
    };
    spec.validate().map_err(|err| {
        // The key an error of the checks `add` shares is about.
        let (field, span) = match &err {
            ServiceError::BadName(_) => return at(None, None, err.to_string()),
            ServiceError::BadPort => ("port", Some(file.port.span())),
            ServiceError::OutOfRange {
                setting: "idle timeout",
                ..
            } => (
                "idle_timeout",
                file.idle_timeout.as_ref().map(Spanned::span),
            ),
            ServiceError::OutOfRange { .. } => (
                "ready_timeout",
                file.ready_timeout.as_ref().map(Spanned::span),
            ),
            _ => ("command", file.command.as_ref().map(Spanned::span)),
        };
        let message = match &err {
            ServiceError::NoCommand => {
                "missing: give the command and its arguments as a list of strings, or an image"
                    .to_owned()
            }
            ServiceError::ImageWithCommand(_) => {
                "an image takes no command: the image already holds the process".to_owned()
            }
            _ => err.to_string(),
        };
        at(span, Some(field), message)
    })?;
    Ok(spec)
}

/// The 1-based line of the byte offset where `span` starts.
fn line_of(text: &str, span: Range<usize>) -> usize {
    let start = span.start.min(text.len());
    text.as_bytes()[..start]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The key of the `key = value` line where `span` starts, if it is one.
fn key_at(text: &str, span: Range<usize>) -> Option<String> {
    let line = text.lines().nth(line_of(text, span) - 1)?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty() && !key.starts_with('#')).then(|| key.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> Result<ServiceSpec, ServiceFileError> {
        parse("web", Path::new("/etc/persist/services.d/web.toml"), text)
    }

    fn error_of(text: &str) -> String {
        parse_text(text).unwrap_err().to_string()
    }

    #[test]
    fn a_snapshot_service_takes_every_option_of_add() {
        let spec = parse_text(
            r#"
port = 8000
addr = "127.0.0.2"
command = ["true", "--flag"]
idle_timeout = "30s"
on_idle = "keep"
prefetch = "all"
accept_changed_files = true
keep_skeleton = "never"
user = "nobody"
ready = "http:/health"
ready_timeout = "5s"
warmup_requests = 3
warmup_command = "curl -s http://127.0.0.2:8000/"
"#,
        )
        .unwrap();
        assert_eq!(spec.name, "web");
        assert_eq!(spec.port, 8000);
        assert_eq!(spec.addr.to_string(), "127.0.0.2");
        assert_eq!(spec.mode, ServiceMode::Snapshot);
        assert_eq!(spec.command, ["true", "--flag"]);
        assert_eq!(spec.idle_timeout, Some(Duration::from_secs(30)));
        let snapshot = spec.snapshot.unwrap();
        assert_eq!(snapshot.on_idle, OnIdle::Keep);
        assert_eq!(snapshot.prefetch, Prefetch::All);
        assert!(snapshot.accept_changed_files);
        assert_eq!(snapshot.keep_skeleton, KeepSkeleton::Never);
        assert_eq!(snapshot.user.as_deref(), Some("nobody"));
        assert_eq!(
            snapshot.warmup_command.as_deref(),
            Some("curl -s http://127.0.0.2:8000/")
        );
        assert_eq!(
            snapshot.ready,
            Readiness::Http {
                path: "/health".into()
            }
        );
        assert_eq!(snapshot.ready_timeout, Duration::from_secs(5));
        assert_eq!(snapshot.warmup_requests, 3);
    }

    #[test]
    fn defaults_are_those_of_add() {
        let spec = parse_text("port = 80\ncommand = [\"true\"]\n").unwrap();
        assert_eq!(spec.addr.to_string(), "127.0.0.1");
        assert_eq!(spec.idle_timeout, None);
        let snapshot = spec.snapshot.unwrap();
        assert_eq!(snapshot.ready, Readiness::Tcp);
        assert_eq!(snapshot.ready_timeout, DEFAULT_READY_TIMEOUT);
        assert_eq!(snapshot.on_idle, OnIdle::Fresh);
        assert_eq!(snapshot.prefetch, Prefetch::Recorded);
        let exec = parse_text("port = 80\nmode = \"inetd\"\ncommand = [\"true\"]\n").unwrap();
        assert_eq!(exec.mode, ServiceMode::Inetd);
        assert!(exec.snapshot.is_none());
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_key() {
        let file = "/etc/persist/services.d/web.toml";
        for (text, expected) in [
            (
                "port = 80\ncommand = [\"true\"]\nidel_timeout = \"3s\"\n",
                format!("{file}:3: idel_timeout: unknown field `idel_timeout`"),
            ),
            (
                "port = 80\ncommand = [\"true\"]\nidle_timeout = \"soon\"\n",
                format!("{file}:3: idle_timeout: \"soon\" is not a duration such as 30s"),
            ),
            (
                "command = [\"true\"]\n\nport = 70000\n",
                format!("{file}:3: port: "),
            ),
            (
                "port = 80\n\ncommand = [\"true\"]\nidle_timeout = \"1ms\"\n",
                format!("{file}:4: idle_timeout: idle timeout 1ms is out of range"),
            ),
            (
                "port = 80\nmode = \"exec\"\ncommand = [\"true\"]\nready = \"tcp\"\n",
                format!("{file}:4: ready: applies to mode = \"snapshot\" only"),
            ),
            (
                "port = 80\nmode = \"sometimes\"\ncommand = [\"true\"]\n",
                format!("{file}:2: mode: unknown variant `sometimes`"),
            ),
            (
                "port = 80\ncommand = [\"no-such-program-xyz\"]\n",
                format!("{file}:2: command: command not found: no-such-program-xyz"),
            ),
            (
                "port = 80\ncommand = [\"true\"]\nready = \"http:x\"\n",
                format!("{file}:3: ready: unknown readiness"),
            ),
            (
                "port = 80\nimage = \"images/web\"\n",
                format!("{file}:2: image: images/web: give an absolute path"),
            ),
            ("port = 80\n", format!("{file}: command: missing")),
            (
                "command = [\"true\"]\n",
                format!("{file}: missing field `port`"),
            ),
        ] {
            let err = error_of(text);
            assert!(
                err.starts_with(&expected),
                "for {text:?}\n  got: {err}\n want: {expected}..."
            );
        }
    }

    #[test]
    fn a_directory_reports_each_broken_file_and_a_port_declared_twice() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| fs::write(dir.path().join(name), text).unwrap();
        write("a.toml", "port = 8000\ncommand = [\"true\"]\n");
        write("b.toml", "command = [\"true\"]\nport = 8000\n");
        write("c.toml", "port = 8001\ncomand = [\"true\"]\n");
        write("d.toml", "port = 8002\ncommand = [\"true\"]\n");
        write("notes.txt", "not a service");
        write(".e.toml", "hidden: an editor's");
        let declared = load_dir(dir.path()).unwrap();
        let names: Vec<_> = declared.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        assert!(declared[0].spec.is_ok());
        let b = declared[1].spec.as_ref().unwrap_err().to_string();
        assert!(
            b.ends_with("b.toml:2: port: port 8000 is already declared by a.toml"),
            "{b}"
        );
        let c = declared[2].spec.as_ref().unwrap_err().to_string();
        assert!(c.contains("c.toml:2: comand: unknown field"), "{c}");
        assert!(declared[3].spec.is_ok());
        assert!(load_dir(&dir.path().join("missing")).unwrap().is_empty());
    }
}
