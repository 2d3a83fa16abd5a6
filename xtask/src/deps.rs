//! Debian packages persist needs, installed when missing.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::privilege;

/// Packages the demo needs: clang compiles the BPF programs against libbpf's
/// headers, and the demo runs in a network namespace made with iproute2.
pub const DEMO: &[&str] = &["clang", "libbpf-dev", "iproute2", "curl"];

/// Packages the tests and benchmarks use: the real servers and clients they
/// drive, what packs the Debian package (strip) and what checks it (man-db,
/// systemd-analyze).
pub const TEST: &[&str] = &[
    "clang",
    "libbpf-dev",
    "bpftool",
    "iproute2",
    "util-linux",
    // fincore: how much of an image's page store is in the page cache.
    "util-linux-extra",
    "curl",
    "python3",
    "redis-server",
    "redis-tools",
    "nginx",
    "memcached",
    "man-db",
    "systemd",
    "binutils",
    "gunicorn",
    "postgresql-15",
];

/// Installs whichever of `packages` are missing, saying which.
pub fn ensure(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !installed(package))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing missing Debian packages: {}",
        missing.join(" ")
    );
    run(privilege::as_root("apt-get")?.args(["update", "-qq"]))?;
    run(privilege::as_root("apt-get")?
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    // Debian starts some servers on install; our tests start their own.
    for (package, service) in [
        ("redis-server", "redis-server"),
        ("nginx", "nginx"),
        ("memcached", "memcached"),
        ("postgresql-15", "postgresql"),
    ] {
        if missing.contains(&package)
            && let Ok(mut stop) = privilege::as_root("service")
        {
            let _ = stop.args([service, "stop"]).output();
        }
    }
    Ok(())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

/// Runs cargo with `args` from the workspace root.
pub fn cargo(args: &[&str]) -> Result<()> {
    cargo_with_env(&[], args)
}

/// Runs cargo with `args` in the workspace root, with `env` set for it.
pub fn cargo_with_env(env: &[(&str, &str)], args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(workspace_root()))
}

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Where cargo puts the binaries of `profile` (`debug` or `release`).
pub fn profile_dir(profile: &str) -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), Into::into)
        .join(profile)
}

/// Builds the agent and the bundled servers in `profile` and points the
/// shared test helpers at them.
pub fn build_binaries(profile: &str) -> Result<()> {
    if privilege::prebuilt() {
        // The user who started the task built them; root may have no cargo.
        // SAFETY: called from the main thread before any other thread exists.
        unsafe { std::env::set_var("PERSIST_BIN_DIR", profile_dir(profile)) };
        return Ok(());
    }
    let mut args = vec![
        "build",
        "--quiet",
        "-p",
        "persist-agent",
        "-p",
        "persist-tests",
        "--bins",
    ];
    if profile == "release" {
        args.push("--release");
    }
    cargo(&args)?;
    // SAFETY: called from the main thread before any other thread exists.
    unsafe { std::env::set_var("PERSIST_BIN_DIR", profile_dir(profile)) };
    Ok(())
}

/// The first `name` on `PATH` that is a file.
pub fn find_in_path(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Runs a command, failing if it does not exit 0.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}
