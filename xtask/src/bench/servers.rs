//! The servers the bench measures and how each is started on a given port.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use persist_tests::{binary, nginx_command, nginx_command_with_workers, redis_server_command};
use serde::Serialize;

use super::client::Probe;

/// Which server program, and how it is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// The bundled `hello-server` fixture.
    Hello,
    /// `python3 -m http.server`.
    Python,
    /// `redis-server` with persistence off.
    Redis,
    /// nginx as one process (`master_process off`).
    Nginx,
    /// nginx as Debian runs it on two cores: a master and two workers.
    NginxMaster,
    /// PostgreSQL 15 (Debian's): the postmaster and its five helpers, a
    /// cluster of its own per port, run as user `postgres`.
    Postgres,
}

/// Debian's PostgreSQL 15 programs.
const POSTGRES_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The user PostgreSQL runs as (it refuses root).
const POSTGRES_USER: &str = "postgres";

/// One server under test.
#[derive(Debug)]
pub struct Server {
    /// What it is.
    pub kind: Kind,
    /// Name in the tables, the JSON and the plot.
    pub label: &'static str,
    /// Name of its persist service.
    pub service: &'static str,
    /// First port of the range its modes use (one port per mode).
    pub base_port: u16,
    /// What it is asked.
    pub probe: Probe,
    /// Files it serves and its configuration.
    dir: PathBuf,
    /// The Python interpreter `python3` runs.
    python: PathBuf,
}

impl Server {
    /// Every server the bench runs, their files under `dir`.
    pub fn all(dir: &Path) -> Result<Vec<Self>> {
        // PostgreSQL, run as its own user, must reach its cluster under here.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        let www = dir.join("www");
        std::fs::create_dir_all(&www)?;
        std::fs::write(www.join("index.html"), "hello from a file\n")?;
        let python = python_interpreter()?;
        let server = |kind, label, service, base_port, probe| Server {
            kind,
            label,
            service,
            base_port,
            probe,
            dir: dir.to_owned(),
            python: python.clone(),
        };
        Ok(vec![
            server(Kind::Hello, "hello-server", "hello", 8100, Probe::Http),
            server(
                Kind::Python,
                "python3 http.server",
                "python",
                8200,
                Probe::Http,
            ),
            server(Kind::Redis, "redis-server", "redis", 8300, Probe::RedisPing),
            server(Kind::Nginx, "nginx (1 process)", "nginx", 8400, Probe::Http),
            server(
                Kind::NginxMaster,
                "nginx (master + 2 workers)",
                "nginx-mw",
                8500,
                Probe::Http,
            ),
            server(
                Kind::Postgres,
                "PostgreSQL 15",
                "postgres",
                8600,
                Probe::PostgresSelect,
            ),
        ])
    }

    /// The command that runs it listening on `127.0.0.1:port`.
    pub fn command(&self, port: u16) -> Result<Vec<String>> {
        let port_text = port.to_string();
        let argv: Vec<String> = match self.kind {
            Kind::Hello => vec![
                binary("hello-server").display().to_string(),
                format!("127.0.0.1:{port}"),
            ],
            Kind::Python => vec![
                self.python.display().to_string(),
                "-m".into(),
                "http.server".into(),
                port_text,
                "--bind".into(),
                "127.0.0.1".into(),
                "--directory".into(),
                self.dir.join("www").display().to_string(),
            ],
            Kind::Redis => redis_server_command(port),
            Kind::Nginx => nginx_command(
                &self.dir.join(format!("nginx-{port}")),
                &self.dir.join("www"),
                port,
                false,
            )?,
            Kind::NginxMaster => nginx_command_with_workers(
                &self.dir.join(format!("nginx-{port}")),
                &self.dir.join("www"),
                port,
                2,
            )?,
            Kind::Postgres => {
                let cluster = self.postgres_cluster(port)?;
                vec![
                    format!("{POSTGRES_BIN}/postgres"),
                    "-D".into(),
                    cluster.join("data").display().to_string(),
                    "-k".into(),
                    cluster.display().to_string(),
                    "-p".into(),
                    port_text,
                    "-c".into(),
                    "listen_addresses=127.0.0.1".into(),
                ]
            }
        };
        Ok(argv)
    }

    /// The command the bench itself starts (warm, fresh, CRIU): [`Self::command`],
    /// as the user the server runs as.
    pub fn spawn_command(&self, port: u16) -> Result<Vec<String>> {
        let argv = self.command(port)?;
        Ok(match self.kind {
            Kind::Postgres => [
                "setpriv",
                "--reuid",
                POSTGRES_USER,
                "--regid",
                POSTGRES_USER,
                "--init-groups",
                "--",
            ]
            .into_iter()
            .map(str::to_owned)
            .chain(argv)
            .collect(),
            _ => argv,
        })
    }

    /// The `persist-agent add` options of the service on `port` that say
    /// when it is ready, as whom it runs and how it is warmed up.
    pub fn add_args(&self, port: u16) -> Vec<String> {
        let args: &[&str] = match self.kind {
            // http.server listens before it serves: wait for an answer.
            Kind::Python => &["--ready", "http:/"],
            // The postmaster listens before it serves, and says READY=1
            // once it does (sd_notify); the build then waits for its tree
            // to settle.
            Kind::Postgres => &["--ready", "notify", "--user", POSTGRES_USER],
            _ => &["--ready", "tcp"],
        };
        let mut args: Vec<String> = args.iter().map(|&arg| arg.to_owned()).collect();
        if self.kind == Kind::Postgres {
            // A query before the snapshot: the catalog pages a backend
            // reads come in the image's shared buffers, not from disk at
            // every wake's first query.
            let cluster = self.dir.join(format!("postgres-{port}"));
            args.push("--warmup-command".into());
            args.push(format!(
                "{POSTGRES_BIN}/psql -h {} -p {port} -U {POSTGRES_USER} -d postgres -qAt -c 'SELECT 1'",
                cluster.display()
            ));
        }
        args
    }

    /// The signal that stops it cleanly, where a SIGKILL would leave
    /// something behind: a PostgreSQL cluster killed recovers at its next
    /// start (the fresh mode would time crash recovery) and leaves its
    /// shared memory.
    pub fn stop_signal(&self) -> Option<nix::sys::signal::Signal> {
        // SIGINT is PostgreSQL's fast shutdown.
        (self.kind == Kind::Postgres).then_some(nix::sys::signal::Signal::SIGINT)
    }

    /// The cluster of `port` (its data directory `data` and the socket
    /// directory), copied from one `initdb` per bench run: the modes run at
    /// once, and two postmasters cannot share a data directory.
    fn postgres_cluster(&self, port: u16) -> Result<PathBuf> {
        let cluster = self.dir.join(format!("postgres-{port}"));
        if cluster.join("data").exists() {
            return Ok(cluster);
        }
        let template = self.dir.join("postgres-template");
        if !template.join("data").exists() {
            std::fs::create_dir_all(&template)?;
            chown_to_postgres(&template)?;
            let initdb = format!("{POSTGRES_BIN}/initdb");
            persist_tests::run_ok(
                Command::new("setpriv")
                    .args(["--reuid", POSTGRES_USER, "--regid", POSTGRES_USER])
                    .args(["--init-groups", "--", &initdb, "--auth=trust", "-D"])
                    .arg(template.join("data"))
                    .env_clear()
                    .env("PATH", "/usr/bin:/bin")
                    .env("LANG", "C.UTF-8"),
            )
            .with_context(|| {
                format!("{initdb} (cargo xtask deps installs postgresql-15 if missing)")
            })?;
        }
        // cp -a keeps the owner and the data directory's 0700.
        persist_tests::run_ok(Command::new("cp").arg("-a").arg(&template).arg(&cluster))?;
        Ok(cluster)
    }
}

/// Gives `path` to user postgres.
fn chown_to_postgres(path: &Path) -> Result<()> {
    let user = nix::unistd::User::from_name(POSTGRES_USER)?
        .with_context(|| format!("no user {POSTGRES_USER} (package postgresql-15)"))?;
    std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
        .with_context(|| format!("chown {}", path.display()))
}

/// The interpreter behind `python3`, resolved once: a version manager's shim
/// (pyenv's is a shell script) would add a few hundred ms to every fresh start.
fn python_interpreter() -> Result<PathBuf> {
    let output = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .context("running python3")?;
    let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() || path.is_empty() {
        bail!("python3 did not say where its interpreter is: {output:?}");
    }
    Ok(path.into())
}
