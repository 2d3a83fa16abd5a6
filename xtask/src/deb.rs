//! `cargo xtask deb`: the Debian package of the agent.
//!
//! The tree is staged under `target/debian/` and packed by `dpkg-deb`
//! (`--root-owner-group`, so no root and no fakeroot are needed). It holds
//! the binary, the systemd unit `persist.service` (`Type=notify`), the state
//! and configuration directories, man pages generated from the command line
//! (`persist-agent man-pages`, clap_mangen) and bash, zsh and fish
//! completions (`persist-agent completions`, clap_complete). Needs dpkg-deb,
//! gzip and strip (binutils), which a Debian system building Rust has.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::deps;

/// The package's name.
const PACKAGE: &str = "persist";

/// The completion scripts: shell, and where that shell's package completions live.
const COMPLETIONS: [(&str, &str); 3] = [
    (
        "bash",
        "usr/share/bash-completion/completions/persist-agent",
    ),
    ("zsh", "usr/share/zsh/vendor-completions/_persist-agent"),
    (
        "fish",
        "usr/share/fish/vendor_completions.d/persist-agent.fish",
    ),
];

const POSTINST: &str = r#"#!/bin/sh
set -e
# The unit is not enabled on install: the agent attaches a BPF program to the
# host's network namespace, which the administrator turns on explicitly
# (systemctl enable --now persist).
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null || true
fi
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
	systemctl stop persist.service >/dev/null 2>&1 || true
fi
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null || true
fi
# Images hold the memory of the parked services: only a purge deletes them.
if [ "$1" = purge ]; then
	rm -rf /var/lib/persist /etc/persist
fi
"#;

const COPYRIGHT: &str = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: persist

Files: *
License: Apache-2.0

Files: usr/bin/persist-agent
License: Apache-2.0 AND GPL-2.0
Comment: the embedded sk_lookup BPF program is GPL-2.0.
";

/// Builds the agent (release, or the dev profile with `debug`), stages the
/// package tree and packs it; returns the path of the `.deb`.
pub fn build(debug: bool) -> Result<PathBuf> {
    let profile = if debug { "debug" } else { "release" };
    let mut args = vec![
        "build",
        "--quiet",
        "-p",
        "persist-agent",
        "--bin",
        "persist-agent",
    ];
    if !debug {
        args.push("--release");
    }
    deps::cargo(&args)?;
    let binary = deps::profile_dir(profile).join("persist-agent");
    let version = env!("CARGO_PKG_VERSION");
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let out_dir = deps::profile_dir("debian");
    let stage = out_dir.join(format!("{PACKAGE}_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }

    let agent = stage.join("usr/bin/persist-agent");
    install(&binary, &agent, 0o755)?;
    // As Debian ships binaries: without debug sections (the release profile
    // keeps them, ~50 MB), with the symbol table for backtraces.
    deps::run(Command::new("strip").arg("--strip-debug").arg(&agent))?;
    install(
        &deps::workspace_root().join("dist/persist.service"),
        &stage.join("usr/lib/systemd/system/persist.service"),
        0o644,
    )?;
    directory(&stage.join("var/lib/persist"), 0o700)?;
    directory(&stage.join("etc/persist/services.d"), 0o755)?;
    man_pages(&binary, &stage.join("usr/share/man/man1"))?;
    for (shell, path) in COMPLETIONS {
        let script = output_bytes(Command::new(&binary).args(["completions", shell]))?;
        write(&stage.join(path), &script, 0o644)?;
    }
    write(
        &stage.join(format!("usr/share/doc/{PACKAGE}/copyright")),
        COPYRIGHT.as_bytes(),
        0o644,
    )?;

    let control = stage.join("DEBIAN");
    write(
        &control.join("control"),
        control_file(version, &arch, installed_kib(&stage)?).as_bytes(),
        0o644,
    )?;
    write(&control.join("postinst"), POSTINST.as_bytes(), 0o755)?;
    write(&control.join("prerm"), PRERM.as_bytes(), 0o755)?;
    write(&control.join("postrm"), POSTRM.as_bytes(), 0o755)?;

    let deb = out_dir.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    // A dev build is packed for the tests: fast gzip rather than xz.
    let compression: &[&str] = if debug { &["-Zgzip", "-z1"] } else { &[] };
    deps::run(
        Command::new("dpkg-deb")
            .arg("--root-owner-group")
            .args(compression)
            .arg("--build")
            .arg(&stage)
            .arg(&deb),
    )?;
    Ok(deb)
}

fn control_file(version: &str, arch: &str, installed_kib: u64) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: persist developers <root@localhost>\n\
         Installed-Size: {installed_kib}\n\
         Depends: libc6, libgcc-s1\n\
         Section: admin\n\
         Priority: optional\n\
         Description: park server processes on disk, wake them on their first SYN\n \
         persist checkpoints an idle server process to disk and holds its\n \
         listening port; the first connection (seen by an eBPF sk_lookup\n \
         program) restores it, its memory coming in on demand through\n \
         userfaultfd.\n"
    )
}

/// Writes `persist-agent.1` and one page per subcommand, gzipped as Debian ships them.
fn man_pages(binary: &Path, dir: &Path) -> Result<()> {
    directory(dir, 0o755)?;
    deps::run(Command::new(binary).arg("man-pages").arg(dir))?;
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let page = entry?.path();
        fs::set_permissions(&page, fs::Permissions::from_mode(0o644))?;
        // -n: no name or time stamp inside, so a rebuild packs the same bytes.
        deps::run(Command::new("gzip").args(["-9", "-n", "-f"]).arg(&page))?;
    }
    Ok(())
}

/// Total size of the staged files in KiB, for `Installed-Size`.
fn installed_kib(stage: &Path) -> Result<u64> {
    fn walk(path: &Path) -> Result<u64> {
        let meta = fs::symlink_metadata(path)?;
        if !meta.is_dir() {
            return Ok(meta.len().div_ceil(1024));
        }
        let mut total = 0;
        for entry in fs::read_dir(path)? {
            total += walk(&entry?.path())?;
        }
        Ok(total)
    }
    walk(stage).with_context(|| format!("measuring {}", stage.display()))
}

fn directory(path: &Path, mode: u32) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write(to, &bytes, mode)
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let parent = path.parent().expect("staged files live in directories");
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

fn output_bytes(command: &mut Command) -> Result<Vec<u8>> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

fn output(command: &mut Command) -> Result<String> {
    Ok(String::from_utf8(output_bytes(command)?)
        .context("non-UTF-8 output")?
        .trim()
        .to_owned())
}
