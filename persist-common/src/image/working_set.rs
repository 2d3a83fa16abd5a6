//! The recorded working set of an image: the pages each restored process
//! touched first, in the order it touched them.
//!
//! # Layout
//!
//! The file `working-set` ([`WORKING_SET_FILE`]) sits inside the image
//! directory it belongs to, mode 0600, written to a temporary name, fsynced
//! and renamed into place like the rest of the image. All integers are
//! little-endian.
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `PERSISTW` |
//! | 8 | 4 | format version ([`WORKING_SET_VERSION`]) |
//! | 12 | 4 | identity of the image: the CRC32C of its manifest, as in the manifest header |
//! | 16 | 8 | when it was recorded, milliseconds since the Unix epoch |
//! | 24 | 8 | number of pages `n`, at most 2^22 |
//! | 32 | 4 | CRC32C of bytes 0..32 followed by every byte from 40 to the end |
//! | 36 | 4 | zero |
//! | 40 | 24 `n` | one entry a page: its address in the process (8), the offset of its content in the image's page store (8), both multiples of 4096, the process (4) and zero (4); or, for a page the image does not store (memory the process had never touched before the checkpoint), the offset 2^64 − 1 ([`WorkingSetPage::NOT_STORED`]): a wake maps a zero page there |
//!
//! The process of an entry is its index in the image's tree order: 0 for the
//! manifest's own process (a tree's root), `i` for the manifest's `i`-th
//! child (from 1). The entries of one process are in the order it touched
//! them; the processes come in ascending order, though a reader does not
//! depend on that. The file ends after the last entry: it is exactly
//! `40 + 24 n` bytes long.
//!
//! The set holds no page contents. A wake copies the pages it names from the
//! image's page store, whose runs carry their own checksums, so a copy here
//! would only cost disk space and time when the set is written. Version 1
//! held such copies, and version 2 named the pages of one process only (a
//! tree's root); both are refused like any other version, and a reader
//! records the set again.
//!
//! A set whose image identity differs from the image's manifest CRC was
//! recorded for another image and is stale; a reader must then ignore it
//! (and the lazy pager serves every page as if there were no set).

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{ImageError, MANIFEST_FILE, PAGE_SIZE, PageStore};
use crate::trust::open_trusted_file;

/// File name of the working set inside an image directory.
pub const WORKING_SET_FILE: &str = "working-set";

/// Version of the working-set format written by this build. Readers refuse any other.
pub const WORKING_SET_VERSION: u32 = 3;

const MAGIC: &[u8; 8] = b"PERSISTW";
const HEADER_BYTES: usize = 40;
const ENTRY_BYTES: usize = 24;
/// Most pages accepted in a set (16 GiB of memory), so a hostile header
/// cannot make us allocate without bound.
const MAX_PAGES: u64 = 1 << 22;

/// One page of a working set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkingSetPage {
    /// Address of the page in the restored process.
    pub address: u64,
    /// Offset of its content in the image's page store, or
    /// [`WorkingSetPage::NOT_STORED`].
    pub store_offset: u64,
}

impl WorkingSetPage {
    /// The store offset of a page the image does not store: the process
    /// touched memory it had never used, which reads as zeros.
    pub const NOT_STORED: u64 = u64::MAX;

    /// A page the image does not store, at `address`.
    pub fn not_stored(address: u64) -> Self {
        Self {
            address,
            store_offset: Self::NOT_STORED,
        }
    }

    /// True for a page the image does not store.
    pub fn is_stored(&self) -> bool {
        self.store_offset != Self::NOT_STORED
    }
}

/// The pages of a working set by process: the index of a process in the
/// image's tree order (0 for the manifest's own process, `i` for its `i`-th
/// child) to the pages it touched, in touch order.
pub type PagesByProcess = BTreeMap<u32, Vec<WorkingSetPage>>;

/// A working set read from disk, its checksum verified.
#[derive(Debug)]
pub struct WorkingSet {
    path: PathBuf,
    image_crc: u32,
    recorded_unix_ms: u64,
    /// No process maps to an empty list.
    processes: PagesByProcess,
}

impl WorkingSet {
    /// Reads and verifies the working set of the image in `dir`, and checks
    /// that it was recorded for the image whose manifest CRC is `image_crc`.
    /// A set recorded for another image is reported as
    /// [`ImageError::Inconsistent`].
    pub fn open(dir: &Path, image_crc: u32) -> Result<Self, ImageError> {
        let set = Self::read(dir)?;
        if set.image_crc != image_crc {
            return Err(ImageError::Inconsistent {
                path: set.path,
                reason: format!(
                    "working set is stale: recorded for image {:08x}, this image is {image_crc:08x}",
                    set.image_crc
                ),
            });
        }
        Ok(set)
    }

    /// Reads and verifies the working set in `dir` (format, checksum,
    /// ownership and mode) without checking which image it belongs to.
    pub fn read(dir: &Path) -> Result<Self, ImageError> {
        let path = dir.join(WORKING_SET_FILE);
        let file = open_trusted_file(&path)?;
        // One byte more than the largest valid set, so that a longer file
        // is read no further yet still fails the length check below.
        let limit = file_len(MAX_PAGES as usize) as u64 + 1;
        let mut bytes = Vec::new();
        file.take(limit)
            .read_to_end(&mut bytes)
            .map_err(ImageError::io(&path))?;
        let bad = |reason: String| ImageError::BadHeader {
            path: path.clone(),
            reason,
        };
        if bytes.len() < HEADER_BYTES || &bytes[..8] != MAGIC {
            return Err(bad("not a persist working set (bad magic)".into()));
        }
        let version = le_u32(&bytes[8..12]);
        if version != WORKING_SET_VERSION {
            return Err(ImageError::Version {
                path,
                found: version,
                expected: WORKING_SET_VERSION,
            });
        }
        let image_crc = le_u32(&bytes[12..16]);
        let recorded_unix_ms = le_u64(&bytes[16..24]);
        let count = le_u64(&bytes[24..32]);
        let stored_crc = le_u32(&bytes[32..36]);
        if count > MAX_PAGES {
            return Err(bad(format!("{count} pages is implausibly many")));
        }
        let expected_len = file_len(count as usize);
        if bytes.len() != expected_len {
            return Err(ImageError::Inconsistent {
                path,
                reason: format!(
                    "working set holds {} bytes, its header implies {expected_len}: truncated?",
                    bytes.len()
                ),
            });
        }
        if checksum(&bytes) != stored_crc {
            return Err(ImageError::Checksum {
                path,
                what: "the working set".into(),
            });
        }
        let mut processes = PagesByProcess::new();
        for entry in bytes[HEADER_BYTES..].chunks_exact(ENTRY_BYTES) {
            let page = WorkingSetPage {
                address: le_u64(&entry[..8]),
                store_offset: le_u64(&entry[8..16]),
            };
            let process = le_u32(&entry[16..20]);
            let reason = if !is_aligned(&page) {
                "is not page-aligned"
            } else if le_u32(&entry[20..24]) != 0 {
                "has an entry whose last 4 bytes are not zero"
            } else {
                ""
            };
            if !reason.is_empty() {
                return Err(ImageError::Inconsistent {
                    path,
                    reason: format!(
                        "page {:#x} (store offset {}) of process {process} {reason}",
                        page.address, page.store_offset
                    ),
                });
            }
            processes.entry(process).or_default().push(page);
        }
        Ok(Self {
            path,
            image_crc,
            recorded_unix_ms,
            processes,
        })
    }

    /// Records the working set of the image in `dir`: for each process (by
    /// its index in tree order), its pages in touch order, each of which must
    /// be stored in the image's page store `store`, or marked as not stored.
    /// Replaces any set already there, atomically.
    pub fn write(
        dir: &Path,
        image_crc: u32,
        processes: &PagesByProcess,
        store: &PageStore,
    ) -> Result<(), ImageError> {
        let path = dir.join(WORKING_SET_FILE);
        // Checked here, not only when the set is used: a set naming pages
        // the image does not hold would be refused by every wake, and the
        // mistake is easier to find where it is made.
        if let Some(page) = processes.values().flatten().find(|page| {
            !is_aligned(page)
                || (page.is_stored()
                    && page
                        .store_offset
                        .checked_add(PAGE_SIZE)
                        .is_none_or(|end| end > store.len()))
        }) {
            return Err(ImageError::Inconsistent {
                path,
                reason: format!(
                    "page {:#x}: store offset {} is not a page of the {}-byte page store",
                    page.address,
                    page.store_offset,
                    store.len()
                ),
            });
        }
        let temp = dir.join(format!(".{WORKING_SET_FILE}.tmp-{}", std::process::id()));
        let _ = fs::remove_file(&temp);
        let result = write_file(&temp, image_crc, processes).and_then(|()| {
            fs::rename(&temp, &path).map_err(ImageError::io(&path))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(ImageError::io(dir))
        });
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// CRC32C of the manifest of the image it was recorded for.
    pub fn image_crc(&self) -> u32 {
        self.image_crc
    }

    /// When it was recorded, in milliseconds since the Unix epoch.
    pub fn recorded_unix_ms(&self) -> u64 {
        self.recorded_unix_ms
    }

    /// The pages of every process it names, none with an empty list.
    pub fn processes(&self) -> &PagesByProcess {
        &self.processes
    }

    /// The pages of the process at `index` in tree order (0 for the root),
    /// in touch order; empty when the set names none of its pages.
    pub fn pages_of(&self, index: u32) -> &[WorkingSetPage] {
        self.processes.get(&index).map_or(&[], Vec::as_slice)
    }

    /// Number of pages, of every process.
    pub fn len(&self) -> usize {
        self.processes.values().map(Vec::len).sum()
    }

    /// True when it holds no page.
    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
    }

    /// For each process, the set's pages followed by those of `more` at an
    /// address the set does not name yet for that process, in their order:
    /// a later wake's faults extend the set with what it lacked. `None` when
    /// `more` adds nothing.
    pub fn extended_by(&self, more: &PagesByProcess) -> Option<PagesByProcess> {
        let mut extended = self.processes.clone();
        let mut added_any = false;
        for (&process, pages) in more {
            let known = extended.entry(process).or_default();
            let mut named: HashSet<u64> = known.iter().map(|page| page.address).collect();
            let before = known.len();
            known.extend(pages.iter().filter(|page| named.insert(page.address)));
            added_any |= known.len() > before;
        }
        extended.retain(|_, pages| !pages.is_empty());
        added_any.then_some(extended)
    }
}

/// The identity of the image in `dir`: the CRC32C of its manifest, read from
/// the manifest's header line.
pub fn manifest_crc(dir: &Path) -> Result<u32, ImageError> {
    let path = dir.join(MANIFEST_FILE);
    let mut head = [0u8; 64];
    let mut file = open_trusted_file(&path)?;
    let mut len = 0;
    while len < head.len() {
        let read = file.read(&mut head[len..]).map_err(ImageError::io(&path))?;
        if read == 0 {
            break;
        }
        len += read;
    }
    let line = head[..len].split(|&b| b == b'\n').next().unwrap_or(&[]);
    std::str::from_utf8(line)
        .ok()
        .and_then(|line| line.split(' ').nth(3))
        .and_then(|crc| u32::from_str_radix(crc, 16).ok())
        .ok_or_else(|| ImageError::BadHeader {
            path,
            reason: "expected `persist-image VERSION LEN CRC`".into(),
        })
}

fn write_file(path: &Path, image_crc: u32, processes: &PagesByProcess) -> Result<(), ImageError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(ImageError::io(path))?;
    let recorded_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let count: usize = processes.values().map(Vec::len).sum();
    let mut bytes = Vec::with_capacity(file_len(count));
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&WORKING_SET_VERSION.to_le_bytes());
    bytes.extend_from_slice(&image_crc.to_le_bytes());
    bytes.extend_from_slice(&recorded_unix_ms.to_le_bytes());
    bytes.extend_from_slice(&(count as u64).to_le_bytes());
    bytes.extend_from_slice(&[0u8; 8]);
    for (process, pages) in processes {
        for page in pages {
            bytes.extend_from_slice(&page.address.to_le_bytes());
            bytes.extend_from_slice(&page.store_offset.to_le_bytes());
            bytes.extend_from_slice(&process.to_le_bytes());
            bytes.extend_from_slice(&[0u8; 4]);
        }
    }
    let crc = checksum(&bytes);
    bytes[32..36].copy_from_slice(&crc.to_le_bytes());
    file.write_all(&bytes).map_err(ImageError::io(path))?;
    file.sync_all().map_err(ImageError::io(path))
}

/// Length of a set of `pages` pages: the header and one entry a page.
fn file_len(pages: usize) -> usize {
    HEADER_BYTES + pages * ENTRY_BYTES
}

fn is_aligned(page: &WorkingSetPage) -> bool {
    page.address.is_multiple_of(PAGE_SIZE)
        && (!page.is_stored() || page.store_offset.is_multiple_of(PAGE_SIZE))
}

fn checksum(bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&bytes[..32]), &bytes[40..])
}

fn le_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes.try_into().expect("4 bytes"))
}

fn le_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{Image, ImageWriter, Manifest};
    use std::os::unix::fs::MetadataExt;

    /// An image of `pages` stored pages, and its identity.
    fn image_with_pages(dir: &Path, pages: u64) -> (Image, u32) {
        let mut writer = ImageWriter::create(dir).unwrap();
        let mut data = Vec::new();
        for page in 0..pages {
            data.extend(std::iter::repeat_n(page as u8 + 1, PAGE_SIZE as usize));
        }
        writer.append_pages(0, &data).unwrap();
        let mut manifest = Manifest::default();
        writer.finish(&mut manifest).unwrap();
        let crc = manifest_crc(dir).unwrap();
        (Image::open(dir).unwrap(), crc)
    }

    /// Pages touched in the order 5, 2, 3, each stored at its own index.
    fn touched() -> [WorkingSetPage; 3] {
        [5u64, 2, 3].map(|page| WorkingSetPage {
            address: 0x10000 + page * PAGE_SIZE,
            store_offset: page * PAGE_SIZE,
        })
    }

    /// `pages` as the pages of the root alone.
    fn of_root(pages: &[WorkingSetPage]) -> PagesByProcess {
        PagesByProcess::from([(0, pages.to_vec())])
    }

    /// A set of [`touched`] by the root, written for an image of 8 pages.
    fn recorded() -> (tempfile::TempDir, PathBuf, u32) {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("image");
        let (image, crc) = image_with_pages(&dir, 8);
        WorkingSet::write(&dir, crc, &of_root(&touched()), image.pages()).unwrap();
        (temp, dir, crc)
    }

    /// Rewrites the set in `dir` with `change` applied to its bytes.
    fn tamper(dir: &Path, change: impl FnOnce(&mut Vec<u8>)) {
        let path = dir.join(WORKING_SET_FILE);
        let mut bytes = fs::read(&path).unwrap();
        change(&mut bytes);
        fs::write(&path, &bytes).unwrap();
    }

    /// As [`tamper`], with the checksum made right again afterwards: the
    /// change must be caught by what the set says, not by its checksum.
    fn tamper_resealed(dir: &Path, change: impl FnOnce(&mut Vec<u8>)) {
        tamper(dir, |bytes| {
            change(bytes);
            let crc = checksum(bytes);
            bytes[32..36].copy_from_slice(&crc.to_le_bytes());
        });
    }

    #[test]
    fn pages_the_image_does_not_store_round_trip_as_such() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("image");
        let (image, crc) = image_with_pages(&dir, 2);
        let pages = [
            WorkingSetPage::not_stored(0x40000),
            touched()[1],
            WorkingSetPage::not_stored(0x41000),
        ];
        WorkingSet::write(&dir, crc, &of_root(&pages[..2]), image.pages()).unwrap_err();
        let pages = [
            pages[0],
            WorkingSetPage {
                address: 0x10000,
                store_offset: PAGE_SIZE,
            },
            pages[2],
        ];
        WorkingSet::write(&dir, crc, &of_root(&pages), image.pages()).unwrap();
        let set = WorkingSet::open(&dir, crc).unwrap();
        assert_eq!(set.pages_of(0), &pages);
        assert!(!set.pages_of(0)[0].is_stored() && set.pages_of(0)[1].is_stored());
    }

    #[test]
    fn round_trips_the_pages_in_touch_order_without_their_contents() {
        let (_temp, dir, crc) = recorded();
        let path = dir.join(WORKING_SET_FILE);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600, "the set is private");
        assert_eq!(
            meta.len(),
            (HEADER_BYTES + 3 * ENTRY_BYTES) as u64,
            "the set holds the header and one entry a page, no contents"
        );

        let set = WorkingSet::open(&dir, crc).unwrap();
        assert_eq!(
            set.pages_of(0),
            &touched(),
            "pages come back in touch order"
        );
        assert_eq!(set.len(), 3);
        assert!(set.pages_of(1).is_empty(), "no other process is named");
        assert_eq!(set.image_crc(), crc);
        assert_eq!(set.path(), path);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(
            now.abs_diff(set.recorded_unix_ms()) < 60_000,
            "recorded just now, not at {}",
            set.recorded_unix_ms()
        );
    }

    #[test]
    fn a_set_is_extended_by_the_pages_it_does_not_name() {
        let (_temp, dir, crc) = recorded();
        let set = WorkingSet::open(&dir, crc).unwrap();
        let [five, two, _] = touched();
        assert_eq!(set.extended_by(&of_root(&[two, five])), None, "nothing new");
        assert_eq!(
            set.extended_by(&PagesByProcess::from([(0, vec![two]), (1, vec![])])),
            None,
            "an empty list adds nothing"
        );
        let zero = WorkingSetPage::not_stored(0x90000);
        let seven = WorkingSetPage {
            address: 0x10000 + 7 * PAGE_SIZE,
            store_offset: 7 * PAGE_SIZE,
        };
        let extended = set
            .extended_by(&of_root(&[zero, two, seven, zero]))
            .unwrap();
        let mut expected = touched().to_vec();
        expected.extend([zero, seven]);
        assert_eq!(
            extended,
            of_root(&expected),
            "the set first, then new pages once each"
        );

        // The same address in another process is another page.
        let extended = set
            .extended_by(&PagesByProcess::from([(2, vec![five, five, zero])]))
            .unwrap();
        assert_eq!(
            extended,
            PagesByProcess::from([(0, touched().to_vec()), (2, vec![five, zero])]),
            "a process the set lacked gets its pages, once each"
        );
    }

    #[test]
    fn an_empty_set_round_trips() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("image");
        let (image, crc) = image_with_pages(&dir, 1);
        WorkingSet::write(&dir, crc, &PagesByProcess::new(), image.pages()).unwrap();
        assert!(WorkingSet::open(&dir, crc).unwrap().is_empty());
        let nothing = PagesByProcess::from([(0, vec![]), (1, vec![])]);
        WorkingSet::write(&dir, crc, &nothing, image.pages()).unwrap();
        let set = WorkingSet::open(&dir, crc).unwrap();
        assert!(set.is_empty() && set.processes().is_empty(), "{set:?}");
    }

    #[test]
    fn a_set_recorded_for_another_image_is_stale() {
        let (_temp, dir, crc) = recorded();
        let err = WorkingSet::open(&dir, crc ^ 1).unwrap_err();
        assert!(
            matches!(&err, ImageError::Inconsistent { reason, .. } if reason.contains("stale")),
            "a set for another image is refused as stale: {err}"
        );
        assert!(WorkingSet::read(&dir).is_ok(), "read alone does not judge");
    }

    #[test]
    fn a_corrupt_byte_anywhere_is_refused() {
        // The recording time, the first entry's address, its process and
        // the last entry's store offset.
        for offset in [16, HEADER_BYTES, HEADER_BYTES + 16, file_len(3) - 9] {
            let (_temp, dir, crc) = recorded();
            tamper(&dir, |bytes| bytes[offset] ^= 0x40);
            let err = WorkingSet::open(&dir, crc).unwrap_err();
            assert!(
                matches!(err, ImageError::Checksum { .. }),
                "a flipped bit at byte {offset} fails the checksum: {err}"
            );
        }
    }

    #[test]
    fn a_truncated_or_extended_set_is_refused() {
        let (_temp, dir, crc) = recorded();
        tamper(&dir, |bytes| bytes.truncate(bytes.len() - ENTRY_BYTES));
        let err = WorkingSet::open(&dir, crc).unwrap_err();
        assert!(
            matches!(&err, ImageError::Inconsistent { reason, .. } if reason.contains("truncated")),
            "a set missing its last entry is refused: {err}"
        );

        let (_temp, dir, crc) = recorded();
        tamper(&dir, |bytes| bytes.truncate(HEADER_BYTES - 1));
        let err = WorkingSet::open(&dir, crc).unwrap_err();
        assert!(
            matches!(err, ImageError::BadHeader { .. }),
            "a set shorter than its header is refused: {err}"
        );

        let (_temp, dir, crc) = recorded();
        tamper(&dir, |bytes| {
            bytes.extend_from_slice(&[0; PAGE_SIZE as usize])
        });
        let err = WorkingSet::open(&dir, crc).unwrap_err();
        assert!(
            matches!(err, ImageError::Inconsistent { .. }),
            "a set with trailing bytes (say, version 1 contents) is refused: {err}"
        );
    }

    #[test]
    fn an_older_set_is_refused_by_its_version() {
        // Version 2 named the root's pages only, in 16-byte entries; its
        // length never passes for this version's, but the version is
        // what refuses it.
        for old in [1u32, 2] {
            let (_temp, dir, crc) = recorded();
            tamper(&dir, |bytes| {
                bytes[8..12].copy_from_slice(&old.to_le_bytes())
            });
            let err = WorkingSet::open(&dir, crc).unwrap_err();
            assert!(
                matches!(
                    err,
                    ImageError::Version {
                        found,
                        expected: WORKING_SET_VERSION,
                        ..
                    } if found == old
                ),
                "a version-{old} set is refused before anything else is read: {err}"
            );
        }
    }

    #[test]
    fn the_pages_of_every_process_of_a_tree_round_trip() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("image");
        let (image, crc) = image_with_pages(&dir, 8);
        let [five, two, three] = touched();
        // The workers share addresses with the root (they are its forks),
        // and each has its own touch order.
        let processes = PagesByProcess::from([
            (0, vec![five, two]),
            (1, vec![three, five, WorkingSetPage::not_stored(0x90000)]),
            (2, vec![two]),
        ]);
        WorkingSet::write(&dir, crc, &processes, image.pages()).unwrap();
        assert_eq!(
            fs::metadata(dir.join(WORKING_SET_FILE)).unwrap().len(),
            file_len(6) as u64
        );
        let set = WorkingSet::open(&dir, crc).unwrap();
        assert_eq!(set.processes(), &processes);
        assert_eq!(set.len(), 6);
        assert_eq!(set.pages_of(1), &processes[&1]);
        assert!(set.pages_of(3).is_empty(), "a process it does not name");

        // Entries out of process order (another writer's) read the same.
        tamper_resealed(&dir, |bytes| {
            let (first, rest) = bytes[HEADER_BYTES..].split_at_mut(ENTRY_BYTES);
            first.swap_with_slice(&mut rest[4 * ENTRY_BYTES..]);
        });
        let set = WorkingSet::open(&dir, crc).unwrap();
        assert_eq!(
            set.processes(),
            &PagesByProcess::from([
                (0, vec![two, five]),
                (1, processes[&1].clone()),
                (2, vec![two]),
            ]),
            "grouped by process, each in file order"
        );
    }

    #[test]
    fn an_entry_with_its_reserved_bytes_set_is_refused() {
        let (_temp, dir, crc) = recorded();
        tamper_resealed(&dir, |bytes| bytes[HEADER_BYTES + 20] = 1);
        let err = WorkingSet::open(&dir, crc).unwrap_err();
        assert!(
            matches!(&err, ImageError::Inconsistent { reason, .. } if reason.contains("not zero")),
            "{err}"
        );
    }

    #[test]
    fn writing_a_page_outside_the_store_is_refused_and_leaves_no_file() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("image");
        let (image, crc) = image_with_pages(&dir, 8);
        for store_offset in [8 * PAGE_SIZE, u64::MAX - PAGE_SIZE + 1, PAGE_SIZE + 1] {
            let pages = PagesByProcess::from([(
                1,
                vec![WorkingSetPage {
                    address: 0x10000,
                    store_offset,
                }],
            )]);
            let err = WorkingSet::write(&dir, crc, &pages, image.pages()).unwrap_err();
            assert!(
                matches!(err, ImageError::Inconsistent { .. }),
                "store offset {store_offset} is not a page of an 8-page store: {err}"
            );
        }
        let left: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .filter(|name| name.to_string_lossy().contains(WORKING_SET_FILE))
            .collect();
        assert!(left.is_empty(), "a refused write leaves nothing: {left:?}");
    }

    #[test]
    fn a_group_or_world_writable_set_is_refused() {
        let (_temp, dir, crc) = recorded();
        let path = dir.join(WORKING_SET_FILE);
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o622)).unwrap();
        let err = WorkingSet::open(&dir, crc).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::Untrusted(crate::trust::TrustError::Mode { mode: 0o622, .. })
            ),
            "{err}"
        );
    }
}
