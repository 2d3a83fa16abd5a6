//! The memory layout of a restored process: where the restorer region goes
//! and the table that turns a forked agent into the recorded layout.

use std::os::fd::RawFd;

use persist_common::image::{Manifest, Mapping, MappingKind, PAGE_SIZE};

use super::RestoreError;
use super::inherited_memory::{ProcessPart, StagedUse};
use super::table::{Label, Table, TableBuilder};
use crate::sys::uffd;

/// One past the highest user address with 4-level paging.
pub const TASK_SIZE: u64 = 0x7fff_ffff_f000;

/// Lowest address we consider for the restorer region.
const REGION_FLOOR: u64 = 0x10_0000;

/// Largest read-only file mapping populated at prepare (bigger ones, such as
/// locale archives, are mostly never touched).
const POPULATE_MAX: u64 = 16 << 20;

/// Room after the layout table for the later, smaller tables.
const LATER_TABLES_ROOM: u64 = 64 << 10;

/// A mapping of the agent itself that must move: vdso and vvar pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Special {
    /// Name in /proc/self/maps (`[vdso]`, `[vvar]`, `[vvar_vclock]`).
    pub name: String,
    /// Start.
    pub start: u64,
    /// End.
    pub end: u64,
}

/// The agent's own address space, as the forked child inherits it.
#[derive(Debug, Clone, Default)]
pub struct OwnLayout {
    /// Every mapping's range.
    pub ranges: Vec<(u64, u64)>,
    /// vdso and vvar mappings.
    pub specials: Vec<Special>,
}

impl OwnLayout {
    /// Reads /proc/self/maps.
    pub fn read() -> Result<Self, RestoreError> {
        let text = std::fs::read_to_string("/proc/self/maps")
            .map_err(|source| RestoreError::io("/proc/self/maps", source))?;
        let mut layout = Self::default();
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let Some(range) = fields.next() else { continue };
            let Some((start, end)) = range.split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            else {
                continue;
            };
            let name = fields.nth(4).unwrap_or("");
            if name == "[vsyscall]" {
                continue;
            }
            if matches!(name, "[vdso]" | "[vvar]" | "[vvar_vclock]") {
                layout.specials.push(Special {
                    name: name.to_owned(),
                    start,
                    end,
                });
            }
            layout.ranges.push((start, end));
        }
        Ok(layout)
    }

    /// The same, with `ranges` counted as mapped too.
    pub fn and(mut self, ranges: &[(u64, u64)]) -> Self {
        self.ranges.extend_from_slice(ranges);
        self
    }
}

/// Name a special mapping of the image has in /proc/PID/maps.
pub fn special_name(mapping: &Mapping) -> Option<&str> {
    match &mapping.kind {
        MappingKind::Vdso => Some("[vdso]"),
        MappingKind::Vvar { name } => Some(name.as_str()),
        _ => None,
    }
}

/// Finds `size` bytes free both in the image's layout and in ours, and
/// apart from `also_busy` (a tree's staging area).
pub fn choose_region(
    manifest: &Manifest,
    own: &OwnLayout,
    also_busy: Option<(u64, u64)>,
    size: u64,
) -> Option<u64> {
    let mut busy: Vec<(u64, u64)> = manifest
        .mappings
        .iter()
        .map(|m| (m.start, m.end))
        .chain(own.ranges.iter().copied())
        .chain(also_busy)
        .collect();
    busy.sort_unstable();
    first_free(&busy, size)
}

/// The lowest address from [`REGION_FLOOR`] on with `size` bytes free of
/// `busy` (sorted by start), a page of distance from each of its ranges.
pub fn first_free(busy: &[(u64, u64)], size: u64) -> Option<u64> {
    let mut candidate = REGION_FLOOR;
    for &(start, end) in busy {
        // Keep a page of distance from everything, so no mapping merges or
        // a growsdown stack guard gap ever touches the region.
        if start >= candidate + size + PAGE_SIZE {
            return Some(candidate);
        }
        candidate = candidate.max(end + PAGE_SIZE);
    }
    (candidate + size < TASK_SIZE).then_some(candidate)
}

/// Descriptors the layout table uses, all placed by the agent before the
/// fork above the restored process's own descriptor numbers.
#[derive(Debug, Clone, Default)]
pub struct LayoutFds {
    /// The fd to map each mapping from (file, memfd, shared anonymous), by
    /// index in the manifest.
    pub mapping_fds: Vec<Option<RawFd>>,
    /// The executable, for `PR_SET_MM_MAP`.
    pub exe: Option<RawFd>,
    /// The working directory.
    pub cwd: Option<RawFd>,
    /// The restored process's own userfaultfd.
    pub uffd: RawFd,
    /// Every descriptor of ours to close at the end of the table.
    pub close: Vec<RawFd>,
    /// Shared memory mappings registered with the userfaultfd too, whose
    /// objects' pages are served lazily (`shared_pages.rs`).
    pub lazy_shared: Vec<(u64, u64)>,
}

/// The region, with the layout table in it.
#[derive(Debug, Clone)]
pub struct Region {
    /// Start address.
    pub base: u64,
    /// Size in bytes.
    pub size: u64,
    /// Room usable by later tables (from `base`).
    pub table_room: u64,
    /// The layout table.
    pub layout: Table,
    /// The read-only file mappings whose pages go into the page tables
    /// after the layout (see [`populate_ranges`]).
    pub populate: Vec<(u64, u64)>,
}

/// Ranges the pager must serve: private anonymous memory with stored pages.
pub fn lazy_mappings(manifest: &Manifest) -> impl Iterator<Item = &Mapping> {
    manifest.mappings.iter().filter(|m| is_lazy(m))
}

/// True for mappings whose pages the pager serves through userfaultfd:
/// private anonymous memory (heap, stacks) with stored pages. A private file
/// mapping is mapped from its file, as the process had it, since userfaultfd
/// registers on none (docs/kernel-facts.md): the pages the process wrote to
/// are written into it before it runs (`file_pages.rs`).
pub fn is_lazy(mapping: &Mapping) -> bool {
    !mapping.shared
        && !mapping.pages.is_empty()
        && matches!(
            mapping.kind,
            MappingKind::Anonymous | MappingKind::Heap | MappingKind::Stack
        )
}

/// Process attributes set natively by the layout table.
#[derive(Debug, Clone, Default)]
pub struct Attributes {
    /// Resource limits to set, clamped to what we may set.
    pub rlimits: Vec<(u32, u64, u64)>,
    /// The session and process group were set when the process was forked
    /// (a process of a tree); otherwise the table makes it a session leader.
    pub session_set: bool,
}

/// Builds the region and its layout table; `inherited` says which of its
/// mappings it takes from a tree's staging area (`inherited_memory.rs`).
pub fn build(
    manifest: &Manifest,
    own: &OwnLayout,
    fds: &LayoutFds,
    attributes: &Attributes,
    inherited: &ProcessPart,
) -> Result<Region, RestoreError> {
    // The table's size does not depend on where it goes: build once to
    // measure, then again at the chosen address.
    let scratch: u64 = own.specials.iter().map(|s| s.end - s.start).sum();
    let probe = layout_table(manifest, own, fds, attributes, inherited, REGION_FLOOR, 0)?;
    let later = LATER_TABLES_ROOM
        + super::seccomp::table_room(&manifest.process.seccomp_filters)
        + super::signals::table_room(manifest)
        + super::timers::table_room(manifest)
        + super::locks::table_room(manifest);
    let table_room = (probe.bytes.len() as u64 + later).next_multiple_of(PAGE_SIZE);
    let size = table_room + scratch;
    let base = choose_region(manifest, own, inherited.area, size).ok_or_else(|| {
        RestoreError::Layout(format!(
            "no free range of {size} bytes for the restorer in both address spaces"
        ))
    })?;
    let layout = layout_table(manifest, own, fds, attributes, inherited, base, table_room)?;
    Ok(Region {
        base,
        size,
        table_room,
        layout,
        populate: populate_ranges(manifest, inherited),
    })
}

fn layout_table(
    manifest: &Manifest,
    own: &OwnLayout,
    fds: &LayoutFds,
    attributes: &Attributes,
    inherited: &ProcessPart,
    base: u64,
    table_room: u64,
) -> Result<Table, RestoreError> {
    let mut t = TableBuilder::new(base);
    let region_end = base + table_room + own.specials.iter().map(|s| s.end - s.start).sum::<u64>();

    // 1. Park vdso and vvar in the region's scratch space, so that neither
    //    the big unmap nor the moves to their final places can collide.
    let mut parked = Vec::new();
    let mut scratch = base + table_room;
    for special in &own.specials {
        let len = special.end - special.start;
        let target = manifest
            .mappings
            .iter()
            .find(|m| special_name(m) == Some(special.name.as_str()));
        if let Some(target) = target
            && target.len() != len
        {
            return Err(RestoreError::Layout(format!(
                "{} is {} bytes here but {} in the image: not the same kernel build",
                special.name,
                len,
                target.len()
            )));
        }
        t.call(
            format!("park {} {:#x}", special.name, special.start),
            libc::SYS_mremap,
            &[
                special.start,
                len,
                len,
                (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                scratch,
            ],
        );
        if let Some(target) = target {
            parked.push((scratch, len, target.start, special.name.clone()));
        }
        scratch += len;
    }
    for mapping in &manifest.mappings {
        if let Some(name) = special_name(mapping)
            && !own.specials.iter().any(|s| s.name == name)
        {
            return Err(RestoreError::Layout(format!(
                "mapping {:#x}: the image has {name} but this kernel does not",
                mapping.start
            )));
        }
    }

    // 2. Unmap the agent: everything but the region and a tree's staging
    //    area.
    let mut kept: Vec<(u64, u64)> = std::iter::once((base, region_end))
        .chain(inherited.area)
        .collect();
    kept.sort_unstable();
    let mut from = 0;
    for (start, end) in kept.into_iter().chain([(TASK_SIZE, TASK_SIZE)]) {
        if start > from {
            t.call(
                format!("unmap {from:#x}-{start:#x}, around the restorer"),
                libc::SYS_munmap,
                &[from, start - from],
            );
        }
        from = from.max(end);
    }

    // 3. vdso and vvar to their recorded addresses.
    for (from, len, to, name) in &parked {
        t.call(
            format!("move {name} to {to:#x}"),
            libc::SYS_mremap,
            &[
                *from,
                *len,
                *len,
                (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                *to,
            ],
        );
    }

    // 4. Every other mapping.
    for (index, mapping) in manifest.mappings.iter().enumerate() {
        if special_name(mapping).is_some() {
            continue;
        }
        let prot = protection_bits(mapping);
        if let Some(staged) = inherited.uses.iter().find(|u| u.mapping == index) {
            take_staged(&mut t, mapping, staged, prot);
            continue;
        }
        let mut flags = libc::MAP_FIXED
            | if mapping.shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            };
        let (fd, offset) = match &mapping.kind {
            MappingKind::Anonymous | MappingKind::Heap => {
                flags |= libc::MAP_ANONYMOUS;
                (-1i64, 0)
            }
            MappingKind::Stack => {
                flags |= libc::MAP_ANONYMOUS | libc::MAP_GROWSDOWN;
                (-1, 0)
            }
            MappingKind::File { offset, .. } => (mapping_fd(fds, index, mapping)? as i64, *offset),
            MappingKind::Memfd { offset, .. } => (mapping_fd(fds, index, mapping)? as i64, *offset),
            MappingKind::SharedAnonymous { .. } => (mapping_fd(fds, index, mapping)? as i64, 0),
            MappingKind::PosixShm { offset, .. } => {
                (mapping_fd(fds, index, mapping)? as i64, *offset)
            }
            MappingKind::SysvShm { shmid, removed, .. } => {
                // Attached again, in the tree's IPC namespace where the
                // segment has its recorded id (`sysv_shm.rs`).
                let mut shm_flags = libc::SHM_REMAP;
                if !mapping.protection.write {
                    shm_flags |= libc::SHM_RDONLY;
                }
                if mapping.protection.exec {
                    shm_flags |= libc::SHM_EXEC;
                }
                t.call(
                    format!(
                        "shmat of mapping {:#x}-{:#x} ({})",
                        mapping.start,
                        mapping.end,
                        describe(mapping)
                    ),
                    libc::SYS_shmat,
                    &[*shmid as u64, mapping.start, shm_flags as u64],
                );
                if *removed {
                    // Once attached: Linux lets the others attach a
                    // segment marked for removal, and it lives while one
                    // of them is attached.
                    t.call(
                        format!("shmctl(IPC_RMID) of shmid {shmid}"),
                        libc::SYS_shmctl,
                        &[*shmid as u64, libc::IPC_RMID as u64, 0],
                    );
                }
                continue;
            }
            MappingKind::Vdso | MappingKind::Vvar { .. } => unreachable!("handled above"),
        };
        t.call(
            Label::Range {
                op: "mmap of mapping",
                start: mapping.start,
                end: mapping.end,
                what: Some(describe(mapping)),
            },
            libc::SYS_mmap,
            &[
                mapping.start,
                mapping.len(),
                prot as u64,
                flags as u64,
                fd as u64,
                offset,
            ],
        );
    }

    // What no process took of the staging area.
    if let Some((start, end)) = inherited.area {
        t.call(
            format!("unmap the staging area {start:#x}-{end:#x}"),
            libc::SYS_munmap,
            &[start, end - start],
        );
    }

    // 5. The kernel's mm fields: brk, args, env, auxv, exe.
    let mm = &manifest.process.mm;
    let auxv_addr = t.words(&mm.auxv);
    let exe_fd = fds.exe.map_or(u32::MAX, |fd| fd as u32);
    let mut map_words = vec![
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        auxv_addr,
    ];
    map_words.push(u64::from((mm.auxv.len() * 8) as u32) | (u64::from(exe_fd) << 32));
    let map_addr = t.words(&map_words);
    t.call(
        "prctl(PR_SET_MM_MAP)",
        libc::SYS_prctl,
        &[
            libc::PR_SET_MM as u64,
            libc::PR_SET_MM_MAP as u64,
            map_addr,
            (map_words.len() * 8) as u64,
            0,
        ],
    );

    // 6. Process attributes.
    let process = &manifest.process;
    t.call("umask", libc::SYS_umask, &[u64::from(process.umask)]);
    if let Some(cwd) = fds.cwd {
        t.call(
            format!("fchdir to {}", process.cwd),
            libc::SYS_fchdir,
            &[cwd as u64],
        );
    }
    if !attributes.session_set {
        t.call("setsid", libc::SYS_setsid, &[]);
    }
    t.call(
        "personality",
        libc::SYS_personality,
        &[u64::from(process.personality)],
    );
    for signal in 1..=64u32 {
        if signal == libc::SIGKILL as u32 || signal == libc::SIGSTOP as u32 {
            continue;
        }
        let action = process.sigactions.iter().find(|a| a.signal == signal);
        let words = match action {
            Some(a) => [a.handler, a.flags, a.restorer, a.mask],
            None => [0, 0, 0, 0],
        };
        let address = t.words(&words);
        t.call(
            Label::Numbered {
                op: "sigaction of signal",
                n: i64::from(signal),
            },
            libc::SYS_rt_sigaction,
            &[u64::from(signal), address, 0, 8],
        );
    }
    for &(resource, soft, hard) in &attributes.rlimits {
        let address = t.words(&[soft, hard]);
        t.call(
            Label::Numbered {
                op: "rlimit",
                n: i64::from(resource),
            },
            libc::SYS_prlimit64,
            &[0, u64::from(resource), address, 0],
        );
    }

    // 7. Our own descriptors are not the process's.
    for &fd in &fds.close {
        let label = Label::Numbered {
            op: "close fd",
            n: i64::from(fd),
        };
        t.call(label, libc::SYS_close, &[fd as u64]);
    }

    // 8. Lazy memory: register for MISSING faults.
    let ranges = lazy_mappings(manifest)
        .map(|mapping| (mapping.start, mapping.end))
        .chain(fds.lazy_shared.iter().copied());
    for (start, end) in ranges {
        let address = t.data(&uffd::register_args(start, end - start));
        t.call(
            Label::Range {
                op: "userfaultfd registration of mapping",
                start,
                end,
                what: None,
            },
            libc::SYS_ioctl,
            &[fds.uffd as u64, uffd::UFFDIO_REGISTER, address],
        );
    }
    Ok(t.finish())
}

/// The read-only private file mappings (code, rodata) whose pages are put
/// in the page tables before the wake, so that no minor fault is on the
/// critical path. Not in the layout table: populated by a table of their
/// own while the agent writes the file pages (`Setup::finish`), on the
/// other CPU. Writable private mappings are left to fault: populating
/// them would copy every page.
fn populate_ranges(manifest: &Manifest, inherited: &ProcessPart) -> Vec<(u64, u64)> {
    manifest
        .mappings
        .iter()
        .enumerate()
        .filter(|&(index, mapping)| {
            matches!(mapping.kind, MappingKind::File { .. })
                && !mapping.shared
                && !mapping.protection.write
                && mapping.len() <= POPULATE_MAX
                && !inherited.uses.iter().any(|u| u.mapping == index)
        })
        .map(|(_, mapping)| (mapping.start, mapping.len()))
        .collect()
}

/// The `PROT_*` bits of `mapping`'s recorded protection.
fn protection_bits(mapping: &Mapping) -> i32 {
    let mut prot = 0;
    if mapping.protection.read {
        prot |= libc::PROT_READ;
    }
    if mapping.protection.write {
        prot |= libc::PROT_WRITE;
    }
    if mapping.protection.exec {
        prot |= libc::PROT_EXEC;
    }
    prot
}

/// Moves `mapping`'s slot to its place, with its protection, and drops the
/// staged pages the process does not share.
fn take_staged(t: &mut TableBuilder, mapping: &Mapping, staged: &StagedUse, prot: i32) {
    let what = describe(mapping);
    t.call(
        format!(
            "move of staged mapping {:#x}-{:#x} ({what}) from {:#x}",
            mapping.start, mapping.end, staged.slot
        ),
        libc::SYS_mremap,
        &[
            staged.slot,
            mapping.len(),
            mapping.len(),
            (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
            mapping.start,
        ],
    );
    t.call(
        Label::Range {
            op: "mprotect of mapping",
            start: mapping.start,
            end: mapping.end,
            what: Some(what.clone()),
        },
        libc::SYS_mprotect,
        &[mapping.start, mapping.len(), prot as u64],
    );
    for &(start, end) in &staged.discard {
        t.call(
            format!("drop of staged pages {start:#x}-{end:#x} not shared ({what})"),
            libc::SYS_madvise,
            &[start, end - start, libc::MADV_DONTNEED as u64],
        );
    }
}

fn mapping_fd(fds: &LayoutFds, index: usize, mapping: &Mapping) -> Result<RawFd, RestoreError> {
    fds.mapping_fds
        .get(index)
        .copied()
        .flatten()
        .ok_or_else(|| {
            RestoreError::Layout(format!(
                "mapping {:#x}: no file opened for it",
                mapping.start
            ))
        })
}

/// A short description of what backs a mapping, for messages.
pub fn describe(mapping: &Mapping) -> String {
    match &mapping.kind {
        MappingKind::Anonymous => "anonymous".into(),
        MappingKind::Heap => "[heap]".into(),
        MappingKind::Stack => "[stack]".into(),
        MappingKind::File { path, .. } => path.clone(),
        MappingKind::SharedAnonymous { .. } => "shared anonymous".into(),
        MappingKind::Memfd { name, .. } => format!("memfd:{name}"),
        MappingKind::SysvShm { key, shmid, .. } => {
            format!("System V shared memory shmid {shmid}, key {key:#x}")
        }
        MappingKind::PosixShm { path, .. } => path.clone(),
        MappingKind::Vdso => "[vdso]".into(),
        MappingKind::Vvar { name } => name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_avoids_both_layouts() {
        let own = OwnLayout {
            ranges: vec![(0x10_0000, 0x20_0000), (0x40_0000, 0x50_0000)],
            specials: Vec::new(),
        };
        let manifest_ranges = [(0x20_2000u64, 0x30_0000u64)];
        let mut busy: Vec<(u64, u64)> = own.ranges.clone();
        busy.extend(manifest_ranges);
        // Without a manifest at hand, reuse the search on a synthetic one.
        let region = choose_region_in(&busy, 0x1_0000);
        assert_eq!(region, Some(0x30_1000));
    }

    fn choose_region_in(busy: &[(u64, u64)], size: u64) -> Option<u64> {
        let own = OwnLayout {
            ranges: busy.to_vec(),
            specials: Vec::new(),
        };
        let manifest = Manifest::default();
        choose_region(&manifest, &own, None, size)
    }
}
