//! The servers the bench measures and how each is started on a given port.

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
}

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
        };
        Ok(argv)
    }

    /// The `persist-agent add` options that say when it is ready.
    pub fn ready_args(&self) -> &'static [&'static str] {
        match self.kind {
            // http.server listens before it serves: wait for an answer.
            Kind::Python => &["--ready", "http:/"],
            _ => &["--ready", "tcp"],
        }
    }

    /// Whether only the persist modes are measured (the variant exists to
    /// show what persist does with a multi-process server).
    pub fn persist_only(&self) -> bool {
        self.kind == Kind::NginxMaster
    }
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
