//! The recorded working set of an image: the pages a restored process touched
//! first, in the order it touched them, with copies of their contents.
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
//! | 24 | 8 | number of pages `n` |
//! | 32 | 4 | CRC32C of bytes 0..32 followed by every byte from 40 to the end |
//! | 36 | 4 | zero |
//! | 40 | 24 `n` | one entry a page, in touch order: its address in the process (8), the offset of its content in the image's page store (8), the CRC32C of its content (4), zero (4) |
//! | ... | | zeros up to the next multiple of 4096 |
//! | ... | 4096 `n` | the pages' contents, in the same order |
//!
//! The contents are copies of the image's pages, so a wake reads one
//! sequential file instead of scattered runs of the page store. The file
//! checksum is verified when the set is read, and each page's checksum again
//! right before the page is used ([`WorkingSet::verified_contents`]), as the
//! set may be read long before a wake uses it. A set whose
//! image identity differs from the image's manifest CRC was recorded for
//! another image and is stale; a reader must then ignore it (and the lazy
//! pager serves every page as if there were no set).

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{ImageError, MANIFEST_FILE, PAGE_SIZE, PageStore};

/// File name of the working set inside an image directory.
pub const WORKING_SET_FILE: &str = "working-set";

/// Version of the working-set format written by this build. Readers refuse any other.
pub const WORKING_SET_VERSION: u32 = 1;

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
    /// Offset of its content in the image's page store.
    pub store_offset: u64,
}

/// A working set read from disk, its checksum verified; the page contents
/// are mapped read-only.
pub struct WorkingSet {
    path: PathBuf,
    image_crc: u32,
    recorded_unix_ms: u64,
    pages: Vec<WorkingSetPage>,
    crcs: Vec<u32>,
    data_offset: usize,
    map: memmap2::Mmap,
}

impl std::fmt::Debug for WorkingSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkingSet")
            .field("path", &self.path)
            .field("image_crc", &self.image_crc)
            .field("pages", &self.pages.len())
            .finish()
    }
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
        let file = File::open(&path).map_err(ImageError::io(&path))?;
        let meta = file.metadata().map_err(ImageError::io(&path))?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0
            || !(meta.uid() == 0 || meta.uid() == nix::unistd::geteuid().as_raw())
            || !meta.is_file()
        {
            return Err(ImageError::Insecure { path, mode });
        }
        // SAFETY: the file is private to root (checked above) and replaced
        // only by rename, never rewritten in place; its checksum is verified
        // below before any content is used.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(ImageError::io(&path))?;
        let bad = |reason: String| ImageError::BadHeader {
            path: path.clone(),
            reason,
        };
        if map.len() < HEADER_BYTES || &map[..8] != MAGIC {
            return Err(bad("not a persist working set (bad magic)".into()));
        }
        let version = le_u32(&map[8..12]);
        if version != WORKING_SET_VERSION {
            return Err(ImageError::Version {
                path,
                found: version,
                expected: WORKING_SET_VERSION,
            });
        }
        let image_crc = le_u32(&map[12..16]);
        let recorded_unix_ms = le_u64(&map[16..24]);
        let count = le_u64(&map[24..32]);
        let stored_crc = le_u32(&map[32..36]);
        if count > MAX_PAGES {
            return Err(bad(format!("{count} pages is implausibly many")));
        }
        let data_offset = data_offset(count as usize);
        let expected_len = data_offset as u64 + count * PAGE_SIZE;
        if map.len() as u64 != expected_len {
            return Err(ImageError::Inconsistent {
                path,
                reason: format!(
                    "working set holds {} bytes, its header implies {expected_len}: truncated?",
                    map.len()
                ),
            });
        }
        if checksum(&map) != stored_crc {
            return Err(ImageError::Checksum {
                path,
                what: "the working set".into(),
            });
        }
        let entries = &map[HEADER_BYTES..HEADER_BYTES + count as usize * ENTRY_BYTES];
        let pages = entries
            .chunks_exact(ENTRY_BYTES)
            .map(|entry| WorkingSetPage {
                address: le_u64(&entry[..8]),
                store_offset: le_u64(&entry[8..16]),
            })
            .collect::<Vec<_>>();
        let crcs = entries
            .chunks_exact(ENTRY_BYTES)
            .map(|entry| le_u32(&entry[16..20]))
            .collect();
        if let Some(page) = pages
            .iter()
            .find(|p| p.address % PAGE_SIZE != 0 || p.store_offset % PAGE_SIZE != 0)
        {
            return Err(ImageError::Inconsistent {
                path,
                reason: format!(
                    "page {:#x} (store offset {}) is not page-aligned",
                    page.address, page.store_offset
                ),
            });
        }
        Ok(Self {
            path,
            image_crc,
            recorded_unix_ms,
            pages,
            crcs,
            data_offset,
            map,
        })
    }

    /// Records the working set of the image in `dir`: `pages` in touch order,
    /// their contents copied from the image's page store `store`. Replaces
    /// any set already there, atomically.
    pub fn write(
        dir: &Path,
        image_crc: u32,
        pages: &[WorkingSetPage],
        store: &PageStore,
    ) -> Result<(), ImageError> {
        let path = dir.join(WORKING_SET_FILE);
        let temp = dir.join(format!(".{WORKING_SET_FILE}.tmp-{}", std::process::id()));
        let _ = fs::remove_file(&temp);
        let result = write_file(&temp, image_crc, pages, store).and_then(|()| {
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

    /// Its pages, in touch order.
    pub fn pages(&self) -> &[WorkingSetPage] {
        &self.pages
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// True when it holds no page.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Contents of `count` pages from the `index`th on, consecutive in the
    /// file, after checking each page's checksum.
    pub fn verified_contents(&self, index: usize, count: usize) -> Result<&[u8], ImageError> {
        let start = self.data_offset + index * PAGE_SIZE as usize;
        let bytes = self
            .map
            .get(start..start + count * PAGE_SIZE as usize)
            .ok_or_else(|| ImageError::Inconsistent {
                path: self.path.clone(),
                reason: format!("pages {index}..{} lie past the end", index + count),
            })?;
        for (offset, page) in bytes.chunks_exact(PAGE_SIZE as usize).enumerate() {
            if crc32c::crc32c(page) != self.crcs[index + offset] {
                return Err(ImageError::Checksum {
                    path: self.path.clone(),
                    what: format!(
                        "working-set page {} ({:#x})",
                        index + offset,
                        self.pages[index + offset].address
                    ),
                });
            }
        }
        Ok(bytes)
    }
}

/// The identity of the image in `dir`: the CRC32C of its manifest, read from
/// the manifest's header line.
pub fn manifest_crc(dir: &Path) -> Result<u32, ImageError> {
    let path = dir.join(MANIFEST_FILE);
    let mut head = [0u8; 64];
    let mut file = File::open(&path).map_err(ImageError::io(&path))?;
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

fn write_file(
    path: &Path,
    image_crc: u32,
    pages: &[WorkingSetPage],
    store: &PageStore,
) -> Result<(), ImageError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(ImageError::io(path))?;
    let recorded_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut head = Vec::with_capacity(data_offset(pages.len()));
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&WORKING_SET_VERSION.to_le_bytes());
    head.extend_from_slice(&image_crc.to_le_bytes());
    head.extend_from_slice(&recorded_unix_ms.to_le_bytes());
    head.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    head.extend_from_slice(&[0u8; 8]);
    let store_bytes = store.as_bytes();
    let mut contents = Vec::with_capacity(pages.len());
    for page in pages {
        let start = page.store_offset as usize;
        let content = store_bytes
            .get(start..start + PAGE_SIZE as usize)
            .ok_or_else(|| ImageError::Inconsistent {
                path: path.to_owned(),
                reason: format!(
                    "page {:#x}: store offset {start} lies outside the page store",
                    page.address
                ),
            })?;
        contents.push(content);
        head.extend_from_slice(&page.address.to_le_bytes());
        head.extend_from_slice(&page.store_offset.to_le_bytes());
        head.extend_from_slice(&crc32c::crc32c(content).to_le_bytes());
        head.extend_from_slice(&[0u8; 4]);
    }
    head.resize(data_offset(pages.len()), 0);
    let mut crc = crc32c::crc32c(&head[..32]);
    crc = crc32c::crc32c_append(crc, &head[40..]);
    for content in &contents {
        crc = crc32c::crc32c_append(crc, content);
    }
    head[32..36].copy_from_slice(&crc.to_le_bytes());
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(&head).map_err(ImageError::io(path))?;
    for content in contents {
        out.write_all(content).map_err(ImageError::io(path))?;
    }
    out.flush().map_err(ImageError::io(path))?;
    out.get_ref().sync_all().map_err(ImageError::io(path))
}

/// Where page contents start: after the header and entries, page-aligned.
fn data_offset(pages: usize) -> usize {
    (HEADER_BYTES + pages * ENTRY_BYTES).next_multiple_of(PAGE_SIZE as usize)
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

    fn image_with_pages(dir: &Path, pages: u64) -> Image {
        let mut writer = ImageWriter::create(dir).unwrap();
        let mut data = Vec::new();
        for page in 0..pages {
            data.extend(std::iter::repeat_n(page as u8 + 1, PAGE_SIZE as usize));
        }
        writer.append_pages(0, &data).unwrap();
        let mut manifest = Manifest::default();
        writer.finish(&mut manifest).unwrap();
        Image::open(dir).unwrap()
    }

    #[test]
    fn round_trips_in_touch_order_and_refuses_stale_or_corrupt_sets() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("image");
        let image = image_with_pages(&dir, 8);
        let crc = manifest_crc(&dir).unwrap();
        let pages = [5u64, 2, 3].map(|page| WorkingSetPage {
            address: 0x10000 + page * PAGE_SIZE,
            store_offset: page * PAGE_SIZE,
        });
        WorkingSet::write(&dir, crc, &pages, image.pages()).unwrap();
        let path = dir.join(WORKING_SET_FILE);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);

        let set = WorkingSet::open(&dir, crc).unwrap();
        assert_eq!(set.pages(), &pages);
        assert!(set.verified_contents(0, 1).unwrap().iter().all(|&b| b == 6));
        let two = set.verified_contents(1, 2).unwrap();
        assert!(two[..PAGE_SIZE as usize].iter().all(|&b| b == 3));
        assert!(two[PAGE_SIZE as usize..].iter().all(|&b| b == 4));

        assert!(matches!(
            WorkingSet::open(&dir, crc ^ 1),
            Err(ImageError::Inconsistent { .. })
        ));

        // Corrupted after it was read: the page check catches it.
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        assert!(set.verified_contents(0, 2).is_ok());
        assert!(matches!(
            set.verified_contents(2, 1),
            Err(ImageError::Checksum { .. })
        ));
        assert!(matches!(
            WorkingSet::open(&dir, crc),
            Err(ImageError::Checksum { .. })
        ));
        bytes.truncate(last);
        fs::write(&path, &bytes).unwrap();
        assert!(WorkingSet::open(&dir, crc).is_err());
    }
}
