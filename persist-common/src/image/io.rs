//! Reading and writing image directories.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{
    FORMAT_VERSION, ImageError, MANIFEST_FILE, MAX_RUN_PAGES, Manifest, PAGE_SIZE, PAGES_FILE,
    PageRun,
};

/// Longest manifest accepted, so a hostile header cannot make us allocate without bound.
const MAX_MANIFEST_BYTES: usize = 256 << 20;

/// Writes a new image directory; nothing is visible at the destination until
/// [`ImageWriter::finish`] succeeds.
pub struct ImageWriter {
    destination: PathBuf,
    staging: PathBuf,
    pages: BufWriter<File>,
    pages_path: PathBuf,
    store_bytes: u64,
}

impl ImageWriter {
    /// Starts writing an image that will replace `destination` when finished.
    pub fn create(destination: &Path) -> Result<Self, ImageError> {
        let name = destination
            .file_name()
            .ok_or_else(|| ImageError::Inconsistent {
                path: destination.to_owned(),
                reason: "an image path needs a final component".into(),
            })?
            .to_string_lossy()
            .into_owned();
        let parent = match destination.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)
            .map_err(ImageError::io(&parent))?;
        let staging = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(ImageError::io(&staging))?;
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(ImageError::io(&staging))?;
        let pages_path = staging.join(PAGES_FILE);
        let pages = create_private_file(&pages_path)?;
        Ok(Self {
            destination: destination.to_owned(),
            staging,
            pages: BufWriter::with_capacity(1 << 20, pages),
            pages_path,
            store_bytes: 0,
        })
    }

    /// Appends the contents of consecutive pages of one mapping, the first of
    /// which is page `first_page` of the mapping, and returns the runs that
    /// describe them.
    pub fn append_pages(
        &mut self,
        first_page: u64,
        data: &[u8],
    ) -> Result<Vec<PageRun>, ImageError> {
        if !(data.len() as u64).is_multiple_of(PAGE_SIZE) {
            return Err(ImageError::Inconsistent {
                path: self.pages_path.clone(),
                reason: format!("{} bytes is not a whole number of pages", data.len()),
            });
        }
        let mut runs = Vec::with_capacity(data.len() / (MAX_RUN_PAGES * PAGE_SIZE) as usize + 1);
        for (index, chunk) in data
            .chunks((MAX_RUN_PAGES * PAGE_SIZE) as usize)
            .enumerate()
        {
            self.pages
                .write_all(chunk)
                .map_err(ImageError::io(&self.pages_path))?;
            runs.push(PageRun {
                first_page: first_page + index as u64 * MAX_RUN_PAGES,
                count: chunk.len() as u64 / PAGE_SIZE,
                store_offset: self.store_bytes,
                crc32c: crc32c::crc32c(chunk),
            });
            self.store_bytes += chunk.len() as u64;
        }
        Ok(runs)
    }

    /// Bytes written to the page store so far.
    pub fn store_bytes(&self) -> u64 {
        self.store_bytes
    }

    /// Writes the manifest, syncs everything and moves the image into place,
    /// atomically replacing any image already there.
    pub fn finish(mut self, manifest: &mut Manifest) -> Result<(), ImageError> {
        manifest.page_store_bytes = self.store_bytes;
        self.pages
            .flush()
            .map_err(ImageError::io(&self.pages_path))?;
        self.pages
            .get_ref()
            .sync_all()
            .map_err(ImageError::io(&self.pages_path))?;

        let manifest_path = self.staging.join(MANIFEST_FILE);
        let json = serde_json::to_vec(manifest).map_err(|source| ImageError::Json {
            path: manifest_path.clone(),
            source,
        })?;
        let mut file = create_private_file(&manifest_path)?;
        let header = format!(
            "persist-image {FORMAT_VERSION} {} {:08x}\n",
            json.len(),
            crc32c::crc32c(&json)
        );
        file.write_all(header.as_bytes())
            .and_then(|()| file.write_all(&json))
            .and_then(|()| file.sync_all())
            .map_err(ImageError::io(&manifest_path))?;
        sync_dir(&self.staging)?;
        replace_dir(&self.staging, &self.destination)?;
        Ok(())
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        // After a successful finish the staging directory no longer exists.
        let _ = fs::remove_dir_all(&self.staging);
    }
}

fn create_private_file(path: &Path) -> Result<File, ImageError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(ImageError::io(path))
}

fn sync_dir(path: &Path) -> Result<(), ImageError> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(ImageError::io(path))
}

/// Moves `staging` to `destination`, swapping atomically with an existing image.
fn replace_dir(staging: &Path, destination: &Path) -> Result<(), ImageError> {
    if destination.exists() {
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            staging,
            nix::fcntl::AT_FDCWD,
            destination,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .map_err(|errno| ImageError::Io {
            path: destination.to_owned(),
            source: errno.into(),
        })?;
        // `staging` now holds the old image.
        fs::remove_dir_all(staging).map_err(ImageError::io(staging))?;
    } else {
        fs::rename(staging, destination).map_err(ImageError::io(destination))?;
    }
    if let Some(parent) = destination.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(())
}

/// An image directory, opened and checked.
pub struct Image {
    dir: PathBuf,
    manifest: Manifest,
    pages: PageStore,
}

impl Image {
    /// Opens the image in `dir`, checking ownership and modes, the manifest's
    /// header, checksum and consistency, and the page store's size. Page
    /// checksums are checked as pages are read ([`PageStore::run`]).
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        check_private(dir)?;
        let manifest_path = dir.join(MANIFEST_FILE);
        let pages_path = dir.join(PAGES_FILE);
        check_private(&manifest_path)?;
        check_private(&pages_path)?;

        let manifest = read_manifest(&manifest_path)?;
        let pages = PageStore::open(&pages_path)?;
        if pages.len() != manifest.page_store_bytes {
            return Err(ImageError::Inconsistent {
                path: pages_path,
                reason: format!(
                    "page store holds {} bytes but the manifest expects {}",
                    pages.len(),
                    manifest.page_store_bytes
                ),
            });
        }
        check_layout(&manifest, &manifest_path)?;
        Ok(Self {
            dir: dir.to_owned(),
            manifest,
            pages,
        })
    }

    /// The image directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The page store.
    pub fn pages(&self) -> &PageStore {
        &self.pages
    }

    /// Refuses an image taken on another kernel build or a CPU with state
    /// components this one lacks.
    pub fn check_host(
        &self,
        kernel: &super::KernelInfo,
        cpu: &super::CpuInfo,
    ) -> Result<(), ImageError> {
        let recorded = &self.manifest.kernel;
        if recorded.release != kernel.release
            || recorded.version != kernel.version
            || recorded.machine != kernel.machine
        {
            return Err(ImageError::KernelMismatch {
                image: format!("{} {}", recorded.release, recorded.version),
                running: format!("{} {}", kernel.release, kernel.version),
            });
        }
        let missing = self.manifest.cpu.xcr0 & !cpu.xcr0;
        if missing != 0 {
            return Err(ImageError::CpuMismatch { missing });
        }
        Ok(())
    }
}

fn read_manifest(path: &Path) -> Result<Manifest, ImageError> {
    let mut file = File::open(path).map_err(ImageError::io(path))?;
    let mut head = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    while head.len() < 64 {
        if file.read(&mut byte).map_err(ImageError::io(path))? == 0 {
            break;
        }
        if byte[0] == b'\n' {
            break;
        }
        head.push(byte[0]);
    }
    let bad = |reason: &str| ImageError::BadHeader {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let head = std::str::from_utf8(&head).map_err(|_| bad("header is not text"))?;
    let fields: Vec<&str> = head.split(' ').collect();
    let [magic, version, len, crc] = fields[..] else {
        return Err(bad("expected `persist-image VERSION LEN CRC`"));
    };
    if magic != "persist-image" {
        return Err(bad("missing `persist-image` magic"));
    }
    let version: u32 = version
        .parse()
        .map_err(|_| bad("version is not a number"))?;
    if version != FORMAT_VERSION {
        return Err(ImageError::Version {
            path: path.to_owned(),
            found: version,
            expected: FORMAT_VERSION,
        });
    }
    let len: usize = len.parse().map_err(|_| bad("length is not a number"))?;
    if len > MAX_MANIFEST_BYTES {
        return Err(bad("manifest length is implausibly large"));
    }
    let crc = u32::from_str_radix(crc, 16).map_err(|_| bad("checksum is not hex"))?;
    let mut json = Vec::with_capacity(len);
    file.read_to_end(&mut json).map_err(ImageError::io(path))?;
    if json.len() != len {
        return Err(ImageError::Inconsistent {
            path: path.to_owned(),
            reason: format!(
                "manifest holds {} bytes, header says {len}: truncated?",
                json.len()
            ),
        });
    }
    if crc32c::crc32c(&json) != crc {
        return Err(ImageError::Checksum {
            path: path.to_owned(),
            what: "the manifest".into(),
        });
    }
    serde_json::from_slice(&json).map_err(|source| ImageError::Json {
        path: path.to_owned(),
        source,
    })
}

/// Checks that mappings are page-aligned, ordered and disjoint, and that every
/// page run lies inside its mapping and inside the page store.
fn check_layout(manifest: &Manifest, path: &Path) -> Result<(), ImageError> {
    let inconsistent = |reason: String| ImageError::Inconsistent {
        path: path.to_owned(),
        reason,
    };
    let mut previous_end = 0;
    for mapping in &manifest.mappings {
        let range = format!("mapping {:#x}-{:#x}", mapping.start, mapping.end);
        if mapping.start % PAGE_SIZE != 0
            || mapping.end % PAGE_SIZE != 0
            || mapping.is_empty()
            || mapping.end < mapping.start
        {
            return Err(inconsistent(format!(
                "{range} is not a non-empty page-aligned range"
            )));
        }
        if mapping.start < previous_end {
            return Err(inconsistent(format!(
                "{range} overlaps the mapping before it"
            )));
        }
        previous_end = mapping.end;
        let pages_in_mapping = mapping.len() / PAGE_SIZE;
        for run in &mapping.pages {
            let fits_mapping = run.count > 0
                && run.count <= MAX_RUN_PAGES
                && run
                    .first_page
                    .checked_add(run.count)
                    .is_some_and(|end| end <= pages_in_mapping);
            let fits_store = run.store_offset % PAGE_SIZE == 0
                && run
                    .store_offset
                    .checked_add(run.count * PAGE_SIZE)
                    .is_some_and(|end| end <= manifest.page_store_bytes);
            if !fits_mapping || !fits_store {
                return Err(inconsistent(format!(
                    "{range}: page run at page {} ({} pages, store offset {}) lies outside the mapping or the page store",
                    run.first_page, run.count, run.store_offset
                )));
            }
        }
    }
    Ok(())
}

/// Refuses a file or directory that anyone but its owner can write, or whose
/// owner is neither root nor us.
fn check_private(path: &Path) -> Result<(), ImageError> {
    let meta = fs::symlink_metadata(path).map_err(ImageError::io(path))?;
    let mode = meta.mode() & 0o7777;
    let owner_ok = meta.uid() == 0 || meta.uid() == nix::unistd::geteuid().as_raw();
    if mode & 0o022 != 0 || !owner_ok || meta.file_type().is_symlink() {
        return Err(ImageError::Insecure {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// The page store, mapped read-only.
pub struct PageStore {
    path: PathBuf,
    map: Option<memmap2::Mmap>,
}

impl PageStore {
    fn open(path: &Path) -> Result<Self, ImageError> {
        let file = File::open(path).map_err(ImageError::io(path))?;
        let len = file.metadata().map_err(ImageError::io(path))?.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the page store is a private, root-owned file that
            // nothing writes once the image is finished; a concurrent
            // truncation would fault, not corrupt memory safety of our data
            // structures, and runs are verified by checksum before use.
            Some(unsafe { memmap2::Mmap::map(&file) }.map_err(ImageError::io(path))?)
        };
        Ok(Self {
            path: path.to_owned(),
            map,
        })
    }

    /// Size of the page store in bytes.
    pub fn len(&self) -> u64 {
        self.map.as_ref().map_or(0, |map| map.len() as u64)
    }

    /// True when no page is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of a run, after checking its checksum.
    pub fn run(&self, run: &PageRun) -> Result<&[u8], ImageError> {
        let bytes = self.run_unchecked(run)?;
        if crc32c::crc32c(bytes) != run.crc32c {
            return Err(ImageError::Checksum {
                path: self.path.clone(),
                what: format!("{} pages at offset {}", run.count, run.store_offset),
            });
        }
        Ok(bytes)
    }

    /// The bytes of a run, without checking its checksum.
    pub fn run_unchecked(&self, run: &PageRun) -> Result<&[u8], ImageError> {
        let start = run.store_offset as usize;
        let end = start + (run.count * PAGE_SIZE) as usize;
        self.map
            .as_ref()
            .and_then(|map| map.get(start..end))
            .ok_or_else(|| ImageError::Inconsistent {
                path: self.path.clone(),
                reason: format!("run at offset {start} ends past the page store"),
            })
    }

    /// The whole store as one slice (for bulk copies).
    pub fn as_bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}
