//! Memory: the mappings of /proc/PID/maps and the pages worth storing.
//!
//! Which pages are stored depends on what backs the mapping:
//!
//! - private mappings (anonymous, heap, stacks, private file mappings):
//!   pages present and private-anonymous (pagemap bit 61 clear: never
//!   written pages of a file mapping still are the file's page-cache
//!   pages), or swapped out;
//! - shared anonymous memory and memfds: every page holding data in the
//!   shmem object (`SEEK_DATA` on `/proc/PID/map_files/...`), as other
//!   processes or `write(2)` may have filled pages this one never touched;
//! - shared file mappings: nothing, the file holds the data;
//! - vdso and vvar: nothing, the kernel provides them.
//!
//! Pages are read with `process_vm_readv` in large batches (or through
//! `/proc/PID/mem` where protection forbids reading) and appended to the
//! page store. With a base image (a delta checkpoint), a page whose contents
//! equal the page the base stored at the same address is not written: its
//! run refers to the base's copy, which the new image links. Comparing
//! address and contents is all it takes to be correct, even if mappings
//! moved or appeared since the base was taken: a reused run only ever names
//! bytes equal to the page. A child process of a tree refers the same way
//! to the pages its parent stored in the image (`inherited_pages.rs`).

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::mpsc;

use nix::unistd::Whence;
use persist_common::image::{
    Image, ImageError, ImageWriter, Mapping, MappingKind, PAGE_SIZE, PageRun, Protection,
};
use procfs::process::{MMPermissions, MMapPath};

use crate::sys::procmem::{self, Pagemap, PagemapEntry, ProcMem, RemoteRange, category};

use super::CheckpointError;

/// Bytes read from the target per batch.
const BATCH_BYTES: usize = 4 << 20;

/// Batch buffers in flight between the reader thread and the writer.
const BUFFERS: usize = 3;

/// Regions returned per `PAGEMAP_SCAN` call.
const SCAN_REGIONS: usize = 4096;

/// Pagemap entries read per call.
const PAGEMAP_CHUNK: usize = 64 * 1024;

/// Which pages of a mapping go to the page store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StorePolicy {
    /// Private memory: pages this process wrote or owns.
    PrivatePages,
    /// Shared memory objects: every page with data in the object.
    ShmemData,
    /// Nothing.
    Nothing,
}

/// Parses /proc/PID/maps into mappings without pages, refusing what cannot
/// be restored. `[vsyscall]` is left out: every process has it, fixed.
pub fn read_mappings(pid: i32) -> Result<Vec<Mapping>, CheckpointError> {
    let process = procfs::process::Process::new(pid).map_err(|source| CheckpointError::ProcFs {
        pid,
        what: "maps",
        source,
    })?;
    let maps = process.maps().map_err(|source| CheckpointError::ProcFs {
        pid,
        what: "maps",
        source,
    })?;
    let mut mappings = Vec::new();
    for map in maps {
        let (start, end) = map.address;
        let shared = map.perms.contains(MMPermissions::SHARED);
        let unsupported = |what: String| CheckpointError::UnsupportedMapping {
            pid,
            start,
            end,
            what,
        };
        let kind = match &map.pathname {
            MMapPath::Anonymous | MMapPath::TStack(_) if shared => {
                MappingKind::SharedAnonymous { inode: map.inode }
            }
            MMapPath::Anonymous | MMapPath::TStack(_) => MappingKind::Anonymous,
            MMapPath::Heap => MappingKind::Heap,
            MMapPath::Stack => MappingKind::Stack,
            MMapPath::Vdso => MappingKind::Vdso,
            MMapPath::Vvar => MappingKind::Vvar {
                name: "[vvar]".into(),
            },
            MMapPath::Vsyscall => continue,
            MMapPath::Vsys(_) => super::sysv_shm::describe(pid, start, end, map.inode)?,
            MMapPath::Other(name) if name.starts_with("vvar") => MappingKind::Vvar {
                name: format!("[{name}]"),
            },
            // Named anonymous memory (PR_SET_VMA_ANON_NAME); the name is
            // not kept.
            MMapPath::Other(name) if name.starts_with("anon:") && !shared => MappingKind::Anonymous,
            MMapPath::Other(name) if name.starts_with("anon_shmem:") => {
                MappingKind::SharedAnonymous { inode: map.inode }
            }
            MMapPath::Other(name) => return Err(unsupported(format!("special mapping [{name}]"))),
            MMapPath::Rollup => return Err(unsupported("[rollup]".into())),
            MMapPath::Path(path) => {
                let path = path.to_string_lossy();
                if let Some(name) = path
                    .strip_prefix("/memfd:")
                    .and_then(|rest| rest.strip_suffix(" (deleted)"))
                {
                    MappingKind::Memfd {
                        name: name.to_owned(),
                        inode: map.inode,
                        offset: map.offset,
                    }
                } else if path == "/dev/zero (deleted)" && shared {
                    MappingKind::SharedAnonymous { inode: map.inode }
                } else if shared
                    && path.starts_with(super::posix_shm::DIRECTORY)
                    && !path.ends_with(" (deleted)")
                {
                    super::posix_shm::describe(pid, start, end, &path, map.inode, map.offset)?
                } else if path.ends_with(" (deleted)") {
                    return Err(unsupported(format!("mapped file {path} was deleted")));
                } else {
                    MappingKind::File {
                        path: path.into_owned(),
                        device: format!("{:02x}:{:02x}", map.dev.0, map.dev.1),
                        inode: map.inode,
                        offset: map.offset,
                    }
                }
            }
        };
        mappings.push(Mapping {
            start,
            end,
            protection: Protection {
                read: map.perms.contains(MMPermissions::READ),
                write: map.perms.contains(MMPermissions::WRITE),
                exec: map.perms.contains(MMPermissions::EXECUTE),
            },
            shared,
            kind,
            pages: Vec::new(),
        });
    }
    refuse_userfaultfd_ranges(pid)?;
    Ok(mappings)
}

/// Refuses a process with memory still registered with a userfaultfd in
/// missing or minor mode (VmFlags `um`, `ui` in /proc/PID/smaps): pages not
/// yet served are not in memory, so an image of what is would silently lose
/// them (a restored process whose pager has not finished filling it).
fn refuse_userfaultfd_ranges(pid: i32) -> Result<(), CheckpointError> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).map_err(|source| CheckpointError::Proc {
        pid,
        path: path.clone(),
        source,
    })?;
    let mut range = None;
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            let registered = flags.split_whitespace().any(|f| f == "um" || f == "ui");
            if let (true, Some((start, end))) = (registered, range) {
                return Err(CheckpointError::UserfaultfdPending { pid, start, end });
            }
        } else if let Some(parsed) = parse_range(line) {
            range = Some(parsed);
        }
    }
    Ok(())
}

/// The `start-end` range at the head of a smaps mapping line.
fn parse_range(line: &str) -> Option<(u64, u64)> {
    let head = line.split_whitespace().next()?;
    let (start, end) = head.split_once('-')?;
    Some((
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()?,
    ))
}

fn policy(mapping: &Mapping) -> StorePolicy {
    match (&mapping.kind, mapping.shared) {
        (MappingKind::Vdso | MappingKind::Vvar { .. }, _) => StorePolicy::Nothing,
        (MappingKind::File { .. }, true) => StorePolicy::Nothing,
        (
            MappingKind::SharedAnonymous { .. }
            | MappingKind::Memfd { .. }
            | MappingKind::SysvShm { .. }
            | MappingKind::PosixShm { .. },
            true,
        ) => StorePolicy::ShmemData,
        _ => StorePolicy::PrivatePages,
    }
}

/// Totals of a memory dump.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DumpStats {
    /// Pages stored, written or reused.
    pub pages: u64,
    /// Pages referred to in the base image instead of written.
    pub pages_reused: u64,
    /// Bytes read from the process.
    pub bytes: u64,
}

/// Where a base image stored each page, by address: what a delta image need
/// not write again.
pub struct BasePages<'a> {
    image: &'a Image,
    /// Stored address ranges, sorted by start.
    ranges: Vec<StoredRange>,
}

/// Consecutive pages an image stored consecutively.
#[derive(Debug, Clone, Copy)]
pub(super) struct StoredRange {
    start: u64,
    end: u64,
    store_offset: u64,
}

impl<'a> BasePages<'a> {
    /// Indexes the stored pages of `image`.
    pub fn new(image: &'a Image) -> Self {
        Self {
            image,
            ranges: stored_ranges(&image.manifest().mappings),
        }
    }

    /// The base image.
    pub fn image(&self) -> &'a Image {
        self.image
    }
}

impl KnownPages for BasePages<'_> {
    fn find(&self, address: u64, page: &[u8]) -> Option<u64> {
        let offset = stored_offset(&self.ranges, address)?;
        let stored = self
            .image
            .pages()
            .as_bytes()
            .get(offset as usize..(offset + PAGE_SIZE) as usize)?;
        (stored == page).then_some(offset)
    }
}

/// Pages stored already, which a page with the same contents at the same
/// address refers to instead of being written again: those of a base image
/// ([`BasePages`]), or those a parent process stored in the same image.
pub trait KnownPages {
    /// The store offset of a stored copy of the page at `address`, if its
    /// contents are exactly `page`.
    fn find(&self, address: u64, page: &[u8]) -> Option<u64>;
}

/// Where the runs of `mappings` stored their pages, sorted by address.
pub(super) fn stored_ranges(mappings: &[Mapping]) -> Vec<StoredRange> {
    let mut ranges: Vec<StoredRange> = mappings
        .iter()
        .flat_map(|mapping| {
            mapping.pages.iter().map(|run| {
                let start = mapping.start + run.first_page * PAGE_SIZE;
                StoredRange {
                    start,
                    end: start + run.count * PAGE_SIZE,
                    store_offset: run.store_offset,
                }
            })
        })
        .collect();
    ranges.sort_unstable_by_key(|range| range.start);
    ranges
}

/// The store offset of the page at `address` in `ranges`, if stored.
pub(super) fn stored_offset(ranges: &[StoredRange], address: u64) -> Option<u64> {
    let index = ranges
        .partition_point(|range| range.start <= address)
        .checked_sub(1)?;
    let range = ranges[index];
    (address < range.end).then(|| range.store_offset + (address - range.start))
}

/// One contiguous piece of a mapping to store.
#[derive(Debug, Clone, Copy)]
struct Segment {
    mapping: usize,
    first_page: u64,
    pages: u64,
}

/// Reads the pages worth storing of every mapping and appends them to the
/// page store, filling each mapping's `pages`; pages `known` stored with
/// the same contents at the same address are referred to there instead.
///
/// A reader thread fills batch buffers with `process_vm_readv` while this
/// thread checksums and writes the previous batch, so reading the target
/// and writing the image overlap.
pub fn dump(
    pid: i32,
    mappings: &mut [Mapping],
    writer: &mut ImageWriter,
    mem: &ProcMem,
    known: Option<&dyn KnownPages>,
) -> Result<DumpStats, CheckpointError> {
    let pagemap = Pagemap::open(pid).map_err(|source| CheckpointError::Proc {
        pid,
        path: format!("/proc/{pid}/pagemap"),
        source,
    })?;
    let mut segments = Vec::new();
    for (index, mapping) in mappings.iter().enumerate() {
        match policy(mapping) {
            StorePolicy::Nothing => {}
            StorePolicy::PrivatePages => {
                segments.extend(private_segments(pid, &pagemap, mapping, index)?);
            }
            StorePolicy::ShmemData => segments.extend(shmem_segments(pid, mapping, index)?),
        }
    }
    let batches = plan_batches(&segments, mappings);
    let mut stats = DumpStats::default();
    std::thread::scope(|scope| -> Result<(), CheckpointError> {
        let (full_tx, full_rx) = mpsc::sync_channel::<Filled>(BUFFERS);
        let (empty_tx, empty_rx) = mpsc::sync_channel::<Vec<u8>>(BUFFERS);
        for _ in 0..BUFFERS.min(batches.len()) {
            empty_tx.send(Vec::new()).expect("the receiver is alive");
        }
        let batches = &batches;
        scope.spawn(move || {
            for batch in batches {
                let Ok(mut buffer) = empty_rx.recv() else {
                    return;
                };
                let read = read_batch(pid, mem, batch, &mut buffer);
                if full_tx.send(Filled { buffer, read }).is_err() {
                    return;
                }
            }
        });
        for batch in batches {
            let filled = full_rx
                .recv()
                .expect("the reader sends one buffer per batch");
            filled.read?;
            let mut offset = 0;
            for segment in &batch.segments {
                let len = (segment.pages * PAGE_SIZE) as usize;
                let data = &filled.buffer[offset..offset + len];
                let mapping = &mut mappings[segment.mapping];
                let stored = match known {
                    Some(known) => {
                        let address = mapping.start + segment.first_page * PAGE_SIZE;
                        store_against_known(writer, known, address, segment.first_page, data)
                    }
                    None => writer
                        .append_pages(segment.first_page, data)
                        .map(|runs| (runs, 0)),
                };
                let (runs, reused) =
                    stored.map_err(|source| CheckpointError::Image { pid, source })?;
                mapping.pages.extend(runs);
                stats.pages_reused += reused;
                offset += len;
            }
            stats.pages += batch.bytes as u64 / PAGE_SIZE;
            stats.bytes += batch.bytes as u64;
            // The reader may be done already: then the buffer is not needed.
            let _ = empty_tx.send(filled.buffer);
        }
        Ok(())
    })?;
    Ok(stats)
}

/// Stores consecutive pages of a mapping, the first of which is page
/// `first_page` at `address`: each one equal to the base's page at its
/// address is referred to where the base stored it, the others are
/// appended. Returns their runs and how many pages were reused.
fn store_against_known(
    writer: &mut ImageWriter,
    known: &dyn KnownPages,
    address: u64,
    first_page: u64,
    data: &[u8],
) -> Result<(Vec<PageRun>, u64), ImageError> {
    let page_size = PAGE_SIZE as usize;
    let sources: Vec<Option<u64>> = data
        .chunks_exact(page_size)
        .enumerate()
        .map(|(index, page)| known.find(address + index as u64 * PAGE_SIZE, page))
        .collect();
    // Pages whose sources continue each other (all new, or reused from
    // consecutive offsets) are stored as one piece.
    let continues = |previous: Option<u64>, next: Option<u64>| match (previous, next) {
        (None, None) => true,
        (Some(previous), Some(next)) => next == previous + PAGE_SIZE,
        _ => false,
    };
    let mut runs = Vec::new();
    let mut reused = 0;
    let mut start = 0;
    while start < sources.len() {
        let mut end = start + 1;
        while end < sources.len() && continues(sources[end - 1], sources[end]) {
            end += 1;
        }
        let bytes = &data[start * page_size..end * page_size];
        let first = first_page + start as u64;
        match sources[start] {
            Some(offset) => {
                runs.extend(writer.reuse_pages(first, offset, bytes)?);
                reused += (end - start) as u64;
            }
            None => runs.extend(writer.append_pages(first, bytes)?),
        }
        start = end;
    }
    Ok((runs, reused))
}

/// Runs of pages of a private mapping that are present and anonymous (but
/// not the shared zero page), or swapped. Uses `PAGEMAP_SCAN`, which skips
/// empty page tables, so that huge sparse reservations cost nothing; falls
/// back to reading pagemap entries on kernels without it.
fn private_segments(
    pid: i32,
    pagemap: &Pagemap,
    mapping: &Mapping,
    index: usize,
) -> Result<Vec<Segment>, CheckpointError> {
    let mut segments: Vec<Segment> = Vec::new();
    let mut add = |first_page: u64, pages: u64| match segments.last_mut() {
        Some(last) if last.first_page + last.pages == first_page => last.pages += pages,
        _ => segments.push(Segment {
            mapping: index,
            first_page,
            pages,
        }),
    };
    let mut regions = Vec::with_capacity(SCAN_REGIONS);
    let mut cursor = mapping.start;
    while cursor < mapping.end {
        let scanned = pagemap.scan(
            cursor,
            mapping.end,
            category::PRESENT | category::SWAPPED,
            category::PRESENT | category::SWAPPED | category::FILE | category::PFNZERO,
            &mut regions,
        );
        let walk_end = match scanned {
            Ok(walk_end) => walk_end,
            Err(err) if matches!(err.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {
                return private_segments_by_entries(pid, pagemap, mapping, index);
            }
            Err(source) => {
                return Err(CheckpointError::Memory {
                    pid,
                    addr: cursor,
                    len: (mapping.end - cursor) as usize,
                    what: "PAGEMAP_SCAN",
                    source,
                });
            }
        };
        for region in &regions {
            let cats = region.categories;
            let private =
                cats & category::PRESENT != 0 && cats & (category::FILE | category::PFNZERO) == 0;
            if private || cats & category::SWAPPED != 0 {
                let first = (region.start - mapping.start) / PAGE_SIZE;
                add(first, (region.end - region.start) / PAGE_SIZE);
            }
        }
        if walk_end <= cursor {
            break;
        }
        cursor = walk_end;
    }
    Ok(segments)
}

/// [`private_segments`] by reading one pagemap entry per page.
fn private_segments_by_entries(
    pid: i32,
    pagemap: &Pagemap,
    mapping: &Mapping,
    index: usize,
) -> Result<Vec<Segment>, CheckpointError> {
    let total = mapping.len() / PAGE_SIZE;
    let mut segments: Vec<Segment> = Vec::new();
    let mut entries = vec![PagemapEntry(0); PAGEMAP_CHUNK.min(total as usize)];
    let mut page = 0;
    while page < total {
        let count = (total - page).min(PAGEMAP_CHUNK as u64) as usize;
        let chunk = &mut entries[..count];
        pagemap
            .read(mapping.start + page * PAGE_SIZE, chunk)
            .map_err(|source| CheckpointError::Memory {
                pid,
                addr: mapping.start + page * PAGE_SIZE,
                len: count * PAGE_SIZE as usize,
                what: "pagemap",
                source,
            })?;
        for (offset, entry) in chunk.iter().enumerate() {
            let wanted = (entry.present() && !entry.file_or_shared()) || entry.swapped();
            if !wanted {
                continue;
            }
            let this = page + offset as u64;
            match segments.last_mut() {
                Some(last) if last.first_page + last.pages == this => last.pages += 1,
                _ => segments.push(Segment {
                    mapping: index,
                    first_page: this,
                    pages: 1,
                }),
            }
        }
        page += count as u64;
    }
    Ok(segments)
}

/// Runs of pages of a shared memory mapping whose object holds data there.
fn shmem_segments(
    pid: i32,
    mapping: &Mapping,
    index: usize,
) -> Result<Vec<Segment>, CheckpointError> {
    let path = format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        mapping.start, mapping.end
    );
    let file = File::open(&path).map_err(|source| CheckpointError::Proc {
        pid,
        path: path.clone(),
        source,
    })?;
    let offset = match mapping.kind {
        MappingKind::Memfd { offset, .. } | MappingKind::PosixShm { offset, .. } => offset,
        _ => 0,
    };
    let start = offset as i64;
    let end = start + mapping.len() as i64;
    let mut segments = Vec::new();
    let mut cursor = start;
    while cursor < end {
        let data = match nix::unistd::lseek(file.as_fd(), cursor, Whence::SeekData) {
            Ok(data) => data,
            // No data from `cursor` to the end of the object.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(errno) => {
                return Err(CheckpointError::Proc {
                    pid,
                    path,
                    source: errno.into(),
                });
            }
        };
        if data >= end {
            break;
        }
        let hole = nix::unistd::lseek(file.as_fd(), data, Whence::SeekHole)
            .map_err(|errno| CheckpointError::Proc {
                pid,
                path: path.clone(),
                source: errno.into(),
            })?
            .min(end);
        let first = (data - start) as u64 / PAGE_SIZE;
        let last = ((hole - start) as u64).div_ceil(PAGE_SIZE);
        segments.push(Segment {
            mapping: index,
            first_page: first,
            pages: last - first,
        });
        cursor = hole;
    }
    Ok(segments)
}

/// Segments read with one `process_vm_readv`.
#[derive(Debug, Default)]
struct Batch {
    segments: Vec<Segment>,
    ranges: Vec<RemoteRange>,
    bytes: usize,
}

/// A batch buffer, filled by the reader.
struct Filled {
    buffer: Vec<u8>,
    read: Result<(), CheckpointError>,
}

/// Groups segments into batches of at most [`BATCH_BYTES`] and
/// [`procmem::MAX_IOVECS`] ranges, splitting segments where needed.
fn plan_batches(segments: &[Segment], mappings: &[Mapping]) -> Vec<Batch> {
    let max_pages = BATCH_BYTES as u64 / PAGE_SIZE;
    let mut batches = Vec::new();
    let mut current = Batch::default();
    for &segment in segments {
        let mut rest = segment;
        while rest.pages > 0 {
            if current.ranges.len() == procmem::MAX_IOVECS || current.bytes == BATCH_BYTES {
                batches.push(std::mem::take(&mut current));
            }
            let room = max_pages - current.bytes as u64 / PAGE_SIZE;
            let take = rest.pages.min(room);
            let start = mappings[rest.mapping].start + rest.first_page * PAGE_SIZE;
            current.ranges.push(RemoteRange {
                addr: start,
                len: (take * PAGE_SIZE) as usize,
            });
            current.segments.push(Segment {
                pages: take,
                ..rest
            });
            current.bytes += (take * PAGE_SIZE) as usize;
            rest.first_page += take;
            rest.pages -= take;
        }
    }
    if !current.segments.is_empty() {
        batches.push(current);
    }
    batches
}

/// Reads a batch into `buffer`: `process_vm_readv` for all of it, then
/// `/proc/PID/mem` for whatever that could not read (protection, a mapping
/// changed under us).
fn read_batch(
    pid: i32,
    mem: &ProcMem,
    batch: &Batch,
    buffer: &mut Vec<u8>,
) -> Result<(), CheckpointError> {
    if buffer.len() < batch.bytes {
        // A fresh zeroed allocation (calloc: pages are zeroed by the kernel
        // as they are first written) rather than `resize`, which would
        // memset the whole buffer first.
        *buffer = vec![0u8; batch.bytes];
    }
    let buffer = &mut buffer[..batch.bytes];
    // `first`: the first range not read yet, which starts at `offset`.
    let mut first = 0;
    let mut offset = 0;
    while first < batch.ranges.len() {
        let ranges = &batch.ranges[first..];
        // The kernel stops at the first range it cannot read (PROT_NONE).
        let mut read = procmem::read_vectored(pid, &mut buffer[offset..], ranges).unwrap_or(0);
        for range in ranges {
            if read >= range.len {
                read -= range.len;
                offset += range.len;
                first += 1;
                continue;
            }
            // This range is (partly) unreadable that way: /proc/PID/mem
            // ignores protection. Then go on with the next ones.
            let addr = range.addr + read as u64;
            let end = offset + range.len;
            mem.read_exact_at(addr, &mut buffer[offset + read..end])
                .map_err(|source| CheckpointError::Memory {
                    pid,
                    addr,
                    len: range.len - read,
                    what: "/proc/PID/mem",
                    source,
                })?;
            offset = end;
            first += 1;
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use persist_common::image::Manifest;

    use super::*;

    const START: u64 = 0x40_0000;

    fn page(byte: u8) -> Vec<u8> {
        vec![byte; PAGE_SIZE as usize]
    }

    /// An image whose one mapping at `START` stores pages 0..8, page `i`
    /// filled with byte `i + 1`, in two runs written in reverse order so
    /// that store order differs from address order.
    fn base_image(dir: &std::path::Path) -> Image {
        let mut writer = ImageWriter::create(dir).unwrap();
        let high: Vec<u8> = (5..9).flat_map(page).collect();
        let low: Vec<u8> = (1..5).flat_map(page).collect();
        let mut runs = writer.append_pages(4, &high).unwrap();
        runs.splice(0..0, writer.append_pages(0, &low).unwrap());
        let mut manifest = Manifest {
            mappings: vec![Mapping {
                start: START,
                end: START + 16 * PAGE_SIZE,
                protection: Protection::default(),
                shared: false,
                kind: MappingKind::Anonymous,
                pages: runs,
            }],
            ..Manifest::default()
        };
        writer.finish(&mut manifest).unwrap();
        Image::open(dir).unwrap()
    }

    #[test]
    fn equal_pages_at_the_same_address_are_reused_and_others_written() {
        let temp = tempfile::tempdir().unwrap();
        let base = base_image(&temp.path().join("base"));
        let pages = BasePages::new(&base);
        let mut writer = ImageWriter::create_delta(&temp.path().join("delta"), &base).unwrap();

        // Pages 2..10: 2 and 3 as stored, 4 changed, 5..8 as stored (the
        // store has 4 and 5 apart: pages 3 and 4 are not consecutive there),
        // 8 and 9 never stored.
        let contents = [3, 4, 0xaa, 6, 7, 8, 0, 0xbb];
        let data: Vec<u8> = contents.into_iter().flat_map(page).collect();
        let (runs, reused) =
            store_against_known(&mut writer, &pages, START + 2 * PAGE_SIZE, 2, &data).unwrap();

        assert_eq!(reused, 5);
        let base_end = 8 * PAGE_SIZE;
        let summary: Vec<(u64, u64, u64)> = runs
            .iter()
            .map(|run| (run.first_page, run.count, run.store_offset))
            .collect();
        assert_eq!(
            summary,
            vec![
                (2, 2, 6 * PAGE_SIZE),
                (4, 1, base_end),
                (5, 3, PAGE_SIZE),
                (8, 2, base_end + PAGE_SIZE),
            ]
        );
        assert_eq!(writer.store_bytes(), base_end + 3 * PAGE_SIZE);
        for run in &runs {
            let start = ((run.first_page - 2) * PAGE_SIZE) as usize;
            let end = start + (run.count * PAGE_SIZE) as usize;
            assert_eq!(run.crc32c, crc32c::crc32c(&data[start..end]), "{run:?}");
        }
    }
}
