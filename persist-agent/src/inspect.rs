//! `persist-agent inspect`: a readable summary of an image.
//!
//! The image is opened with every check [`Image::open`] makes, so a bad
//! image is reported as the [`ImageError`] that describes what is wrong.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use persist_common::image::{
    FdInfo, Image, ImageError, MANIFEST_FILE, Mapping, MappingKind, PAGE_SIZE, PAGES_FILE,
    ProcessInfo, ThreadInfo, WORKING_SET_FILE, WorkingSet, manifest_crc,
};

/// Index of `rip` in a thread's saved registers.
const RIP: usize = 16;
/// Index of `rsp`.
const RSP: usize = 19;
/// Index of `fs_base`.
const FS_BASE: usize = 21;

/// Renders a readable summary of the image in `dir`.
pub fn inspect(dir: &Path) -> Result<String, ImageError> {
    let image = Image::open(dir)?;
    let manifest = image.manifest();
    let mut out = String::new();
    // Base stores are shared with other images: not counted as this one's.
    let own_store = file_size(&dir.join(PAGES_FILE));
    let on_disk = file_size(&dir.join(MANIFEST_FILE)) + own_store;

    let p = &manifest.process;
    let _ = writeln!(out, "image {}", dir.display());
    let _ = writeln!(
        out,
        "  taken     {} on {} {} ({})",
        unix_ms_line(manifest.created_unix_ms),
        manifest.kernel.machine,
        manifest.kernel.release,
        manifest.kernel.version
    );
    let _ = writeln!(
        out,
        "  cpu       xcr0 {:#x}, xsave area {} bytes",
        manifest.cpu.xcr0, manifest.cpu.xsave_size
    );
    if manifest.base_stores.is_empty() {
        let _ = writeln!(
            out,
            "  size      {} on disk ({} of pages)",
            human_bytes(on_disk),
            human_bytes(manifest.page_store_bytes)
        );
    } else {
        let _ = writeln!(
            out,
            "  size      {} on disk ({} of pages: {} in its own store, the rest in {} base stores)",
            human_bytes(on_disk),
            human_bytes(manifest.page_store_bytes),
            human_bytes(own_store),
            manifest.base_stores.len()
        );
    }
    let mut offset = 0;
    for base in &manifest.base_stores {
        let links = std::fs::metadata(dir.join(&base.file)).map_or(0, |m| m.nlink());
        let _ = writeln!(
            out,
            "  base      {} {} at store offset {offset} ({links} links)",
            base.file,
            human_bytes(base.bytes)
        );
        offset += base.bytes;
    }
    let _ = writeln!(out, "  working set {}", working_set_line(dir));
    if !manifest.children.is_empty() {
        let children: Vec<String> = manifest
            .children
            .iter()
            .map(|child| format!("{} (parent {})", child.process.pid, child.ppid))
            .collect();
        let _ = writeln!(
            out,
            "  tree      pid {} and {} descendants: {}",
            p.pid,
            children.len(),
            children.join(", ")
        );
    }
    for zombie in &manifest.zombies {
        let _ = writeln!(out, "  zombie    {}", zombie_line(zombie));
    }
    for set in &manifest.sysv_ipc.semaphores {
        let values: Vec<String> = set.values.iter().map(u16::to_string).collect();
        let _ = writeln!(
            out,
            "  semaphores semid {} key {:#x}: values {}, {}",
            set.semid,
            set.key,
            values.join(" "),
            owner_line(&set.owner)
        );
    }
    for queue in &manifest.sysv_ipc.queues {
        let bytes: usize = queue.messages.iter().map(|m| m.body.len()).sum();
        let _ = writeln!(
            out,
            "  msg queue  msqid {} key {:#x}: {} messages, {bytes} bytes (room {}), {}",
            queue.msqid,
            queue.key,
            queue.messages.len(),
            queue.max_bytes,
            owner_line(&queue.owner)
        );
    }
    let _ = writeln!(out, "process {} ({})", p.pid, p.comm);
    process_sections(
        &mut out,
        p,
        &manifest.threads,
        &manifest.mappings,
        &manifest.fds,
    );
    for child in &manifest.children {
        let p = &child.process;
        let _ = writeln!(
            out,
            "process {} ({}), child of {}",
            p.pid, p.comm, child.ppid
        );
        process_sections(&mut out, p, &child.threads, &child.mappings, &child.fds);
        if !child.inherited_fds.is_empty() {
            let _ = writeln!(
                out,
                "fds shared with an earlier process ({})",
                child.inherited_fds.len()
            );
            for fd in &child.inherited_fds {
                let _ = writeln!(
                    out,
                    "  {:>4}{} = pid {} fd {}",
                    fd.fd,
                    if fd.cloexec { " (cloexec)" } else { "" },
                    fd.from_pid,
                    fd.from_fd
                );
            }
        }
    }
    Ok(out)
}

/// What [`inspect`] shows of each process: its state, threads, mappings
/// and descriptors.
fn process_sections(
    out: &mut String,
    p: &ProcessInfo,
    threads: &[ThreadInfo],
    mappings: &[Mapping],
    fds: &[FdInfo],
) {
    let _ = writeln!(out, "  exe       {}", p.exe);
    let _ = writeln!(out, "  argv      {}", p.argv.join(" "));
    let _ = writeln!(out, "  cwd       {} (root {})", p.cwd, p.root);
    let _ = writeln!(
        out,
        "  ids       pgid {} sid {} uid {:?} gid {:?} groups {:?}",
        p.pgid, p.sid, p.credentials.uids, p.credentials.gids, p.credentials.groups
    );
    let _ = writeln!(
        out,
        "  umask     {:03o}, {} signal handlers, {} environment variables",
        p.umask,
        p.sigactions.len(),
        p.environ.len()
    );
    let _ = writeln!(
        out,
        "  timers    {} interval timers armed, {} POSIX timers; {} file locks",
        p.itimers
            .iter()
            .filter(|t| t.value_us > 0 || t.interval_us > 0)
            .count(),
        p.posix_timers.len(),
        p.file_locks.len()
    );
    if p.pdeath_signal != 0 || p.child_subreaper {
        let _ = writeln!(
            out,
            "  parent    death signal {}, child subreaper {}",
            p.pdeath_signal,
            if p.child_subreaper { "yes" } else { "no" }
        );
    }

    let _ = writeln!(out, "threads ({})", threads.len());
    let _ = writeln!(
        out,
        "  {:>8}  {:<16} {:>18} {:>18} {:>18}",
        "TID", "COMM", "RIP", "RSP", "FS_BASE"
    );
    for thread in threads {
        let _ = writeln!(out, "{}", thread_line(thread));
    }

    let _ = writeln!(out, "mappings ({})", mappings.len());
    let _ = writeln!(
        out,
        "  {:<33} {:>10} {:<5} {:>8}  KIND",
        "RANGE", "SIZE", "PROT", "STORED"
    );
    for mapping in mappings {
        let _ = writeln!(out, "{}", mapping_line(mapping));
    }

    let _ = writeln!(out, "fds ({})", fds.len());
    for fd in fds {
        let _ = writeln!(out, "{}", fd_line(fd));
    }
}

/// The recorded working set: size, when, and whether a wake would use it.
fn working_set_line(dir: &Path) -> String {
    if !dir.join(WORKING_SET_FILE).exists() {
        return "none recorded".to_owned();
    }
    let set = match WorkingSet::read(dir) {
        Ok(set) => set,
        Err(err) => return format!("invalid (ignored on wake): {err}"),
    };
    let validity = match manifest_crc(dir) {
        Ok(crc) if crc == set.image_crc() => "valid".to_owned(),
        Ok(crc) => format!(
            "stale (recorded for image {:08x}, this is {crc:08x})",
            set.image_crc()
        ),
        Err(err) => format!("unknown: {err}"),
    };
    // A tree's set names the pages of each of its processes.
    let processes = match set.processes().len() {
        0 | 1 => String::new(),
        count => format!(" of {count} processes"),
    };
    format!(
        "{} pages ({}){processes}, recorded {}, {validity}",
        set.len(),
        human_bytes(set.len() as u64 * PAGE_SIZE),
        unix_ms_line(set.recorded_unix_ms())
    )
}

/// First instant RFC 3339 cannot write: year 10000, in ms since the epoch.
const YEAR_10000_UNIX_MS: u64 = 253_402_300_800_000;

/// A time read from an image, in ms since the Unix epoch, as RFC 3339; a
/// value past year 9999 (which RFC 3339 cannot write) as the number itself.
fn unix_ms_line(unix_ms: u64) -> String {
    if unix_ms >= YEAR_10000_UNIX_MS {
        return format!("{unix_ms} ms after 1970 (past year 9999: not a real date)");
    }
    let time = UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_seconds(time).to_string()
}

fn thread_line(thread: &ThreadInfo) -> String {
    let reg = |index: usize| thread.regs.get(index).copied().unwrap_or(0);
    format!(
        "  {:>8}  {:<16} {:>#18x} {:>#18x} {:>#18x}",
        thread.tid,
        thread.comm,
        reg(RIP),
        reg(RSP),
        reg(FS_BASE)
    )
}

fn mapping_line(mapping: &Mapping) -> String {
    let prot = format!(
        "{}{}{}{}",
        if mapping.protection.read { 'r' } else { '-' },
        if mapping.protection.write { 'w' } else { '-' },
        if mapping.protection.exec { 'x' } else { '-' },
        if mapping.shared { 's' } else { 'p' },
    );
    let kind = match &mapping.kind {
        MappingKind::Anonymous => "anonymous".to_owned(),
        MappingKind::Heap => "[heap]".to_owned(),
        MappingKind::Stack => "[stack]".to_owned(),
        MappingKind::File { path, offset, .. } => format!("{path} @ {offset:#x}"),
        MappingKind::SharedAnonymous { inode } => format!("shared anonymous (inode {inode})"),
        MappingKind::Memfd {
            name,
            inode,
            offset,
        } => format!("memfd:{name} (inode {inode}) @ {offset:#x}"),
        MappingKind::SysvShm {
            key,
            shmid,
            size,
            uid,
            gid,
            mode,
            removed,
        } => format!(
            "System V shm shmid {shmid} key {key:#x}, {size} bytes, owner {uid}:{gid} mode \
             {mode:o}{}",
            if *removed { ", marked for removal" } else { "" }
        ),
        MappingKind::PosixShm {
            path,
            offset,
            size,
            uid,
            gid,
            mode,
            ..
        } => format!(
            "{path} @ {offset:#x} (POSIX shm, {size} bytes, owner {uid}:{gid} mode {mode:o})"
        ),
        MappingKind::Vdso => "[vdso]".to_owned(),
        MappingKind::Vvar { name } => name.clone(),
    };
    format!(
        "  {:>#14x}-{:<#16x} {:>10} {:<5} {:>8}  {}",
        mapping.start,
        mapping.end,
        human_bytes(mapping.len()),
        prot,
        mapping.stored_pages(),
        kind
    )
}

/// One line per descriptor: number, kind, and its scalar fields. Rendered
/// from the JSON form so that every kind the files module records shows up
/// without this function knowing them all; contents are left out.
fn fd_line(fd: &FdInfo) -> String {
    let value = serde_json::to_value(fd).unwrap_or_default();
    let mut line = format!("  {:>4}  ", fd.fd);
    let Some(object) = value.as_object() else {
        return line;
    };
    if let Some(kind) = object.get("kind").and_then(|k| k.as_str()) {
        line.push_str(kind);
    }
    for (key, field) in object {
        if matches!(key.as_str(), "fd" | "kind") {
            continue;
        }
        let rendered = match field {
            serde_json::Value::String(s) if s.len() <= 80 => format!("{s:?}"),
            serde_json::Value::String(s) => format!("<{} base64 chars>", s.len()),
            serde_json::Value::Array(items) => format!("[{} items]", items.len()),
            serde_json::Value::Null => continue,
            other => other.to_string(),
        };
        let _ = write!(line, " {key}={rendered}");
    }
    line
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn human_bytes(bytes: u64) -> String {
    const KIB: u64 = 1024;
    if bytes >= KIB * KIB * KIB {
        format!("{:.1}G", bytes as f64 / (KIB * KIB * KIB) as f64)
    } else if bytes >= KIB * KIB {
        format!("{:.1}M", bytes as f64 / (KIB * KIB) as f64)
    } else if bytes >= KIB {
        format!("{}K", bytes / KIB)
    } else {
        format!("{bytes}B")
    }
}

/// Owner, creator and mode of a System V IPC object.
fn owner_line(owner: &persist_common::image::IpcOwner) -> String {
    format!(
        "owner {}:{} (creator {}:{}) mode {:o}",
        owner.uid, owner.gid, owner.cuid, owner.cgid, owner.mode
    )
}

/// A zombie of a tree: pid, parent, group, session and how it ended.
fn zombie_line(zombie: &persist_common::image::Zombie) -> String {
    let ended = match (zombie.exit_code(), zombie.signal()) {
        (Some(code), _) => format!("exited with {code}"),
        (None, Some(signal)) => format!(
            "killed by signal {signal}{}",
            if zombie.core_dumped() {
                " (core dumped)"
            } else {
                ""
            }
        ),
        (None, None) => format!("wait status {:#x}", zombie.wait_status),
    };
    format!(
        "pid {} (parent {}, group {}, session {}) {ended}, not reaped",
        zombie.pid, zombie.ppid, zombie.pgid, zombie.sid
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_past_year_9999_are_shown_as_numbers() {
        assert_eq!(unix_ms_line(0), "1970-01-01T00:00:00Z");
        assert_eq!(unix_ms_line(YEAR_10000_UNIX_MS - 1), "9999-12-31T23:59:59Z");
        for ms in [YEAR_10000_UNIX_MS, u64::MAX] {
            assert!(
                unix_ms_line(ms).starts_with(&format!("{ms} ms after 1970")),
                "{}",
                unix_ms_line(ms)
            );
        }
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(PAGE_SIZE), "4K");
        assert_eq!(human_bytes(3 << 20), "3.0M");
        assert_eq!(human_bytes(12), "12B");
    }
}
