//! Root for what needs it, and nothing more.
//!
//! As root, every task runs directly. As a user (whose cargo may live in
//! their home directory, where `sudo cargo` finds no cargo because sudo
//! resets PATH), cargo builds as that user, and only what needs root runs
//! through sudo: package installs, the test binaries (as cargo's runner),
//! and the demo and bench, which run again as root on the binaries already
//! built.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Set in an xtask run again as root, whose binaries the user built.
const PREBUILT: &str = "PERSIST_XTASK_PREBUILT";

/// How this run gets root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    /// It is root.
    Root,
    /// A user with sudo.
    Sudo,
}

/// How this run gets root, or why it cannot.
pub fn current() -> Result<Privilege> {
    if nix::unistd::geteuid().is_root() {
        return Ok(Privilege::Root);
    }
    if crate::deps::find_in_path("sudo").is_some() {
        return Ok(Privilege::Sudo);
    }
    bail!("this task needs root (BPF, network namespaces, ptrace): run it as root, or install sudo")
}

/// `command` as root: itself when root, else through `sudo`.
pub fn as_root(program: &str) -> Result<Command> {
    Ok(match current()? {
        Privilege::Root => Command::new(program),
        Privilege::Sudo => {
            let mut command = Command::new("sudo");
            command.arg(program);
            command
        }
    })
}

/// Whether this run is the root half of a task a user started, its
/// binaries built already.
pub fn prebuilt() -> bool {
    std::env::var_os(PREBUILT).is_some()
}

/// For a task that runs in this process and needs root: `Ok(false)` when
/// root, to go on here. As a user, runs this xtask again as root with the
/// same arguments (after `build`, run as the user, built what it needs) and
/// returns `Ok(true)` once it succeeded.
pub fn rerun_as_root(build: impl FnOnce() -> Result<()>) -> Result<bool> {
    if current()? == Privilege::Root {
        return Ok(false);
    }
    build()?;
    let xtask = std::env::current_exe().context("finding the xtask binary")?;
    let status = Command::new("sudo")
        .arg("--preserve-env")
        .arg(xtask)
        .args(std::env::args_os().skip(1))
        .env(PREBUILT, "1")
        .status()
        .context("running sudo")?;
    if !status.success() {
        bail!("the task run as root failed ({status})");
    }
    Ok(true)
}

/// Arguments that make `cargo test` run each test binary through sudo
/// (cargo's runner), when this run is a user's.
pub fn cargo_test_runner() -> Result<Vec<String>> {
    Ok(match current()? {
        Privilege::Root => Vec::new(),
        Privilege::Sudo => vec![
            "--config".into(),
            r#"target.'cfg(all())'.runner = ["sudo", "--preserve-env"]"#.into(),
        ],
    })
}
