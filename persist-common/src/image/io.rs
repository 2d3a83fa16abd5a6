//! Reading and writing image directories.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::num::NonZeroUsize;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use nix::sys::mman::{MapFlags, ProtFlags};

use super::manifest_file::{
    MAX_HEADER_BYTES, MAX_MANIFEST_BYTES, decode_with_crc, encode_manifest,
};
use super::{
    BaseStore, ImageError, MANIFEST_FILE, MAX_RUN_PAGES, Manifest, Mapping, PAGE_SIZE, PAGES_FILE,
    PageRun, ProcessInfo, SECCOMP_INSN_LEN, SECCOMP_MAX_INSNS, ThreadInfo, WORKING_SET_FILE,
    base_store_file,
};
use crate::trust::{open_trusted_file, trusted_dir};

/// Writes a new image directory; nothing is visible at the destination until
/// [`ImageWriter::finish`] succeeds.
pub struct ImageWriter {
    destination: PathBuf,
    staging: PathBuf,
    pages: BufWriter<File>,
    pages_path: PathBuf,
    /// Stores of the base image linked into the staging directory.
    base_stores: Vec<BaseStore>,
    /// End of the page store so far: the base stores, then what was appended.
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
            base_stores: Vec::new(),
            store_bytes: 0,
        })
    }

    /// Starts writing a delta image of `base`: every page store of `base`
    /// (its base stores, then its own `pages`) is hard-linked into the new
    /// image as a base store, so every store offset valid in `base` is valid
    /// in the new image, and appended pages go after them.
    ///
    /// Fails with [`ImageError::BaseLink`] when a store cannot be linked
    /// (another filesystem, for one): the caller may write a full image
    /// with [`ImageWriter::create`] instead.
    pub fn create_delta(destination: &Path, base: &Image) -> Result<Self, ImageError> {
        let mut writer = Self::create(destination)?;
        // Empty stores hold no offset: linking them would only lengthen the chain.
        for store in base.pages.files.iter().filter(|file| file.len > 0) {
            let file = base_store_file(writer.base_stores.len());
            let link = writer.staging.join(&file);
            fs::hard_link(&store.path, &link).map_err(|source| ImageError::BaseLink {
                from: store.path.clone(),
                to: link.clone(),
                source,
            })?;
            // The link is made by path: make sure it is the file whose bytes
            // the caller compared pages against, not one that replaced it.
            let linked = fs::symlink_metadata(&link).map_err(ImageError::io(&link))?;
            if (linked.dev(), linked.ino()) != store.identity {
                return Err(ImageError::Inconsistent {
                    path: store.path.clone(),
                    reason:
                        "the base image's page store was replaced while a delta of it was written"
                            .into(),
                });
            }
            writer.base_stores.push(BaseStore {
                file,
                bytes: store.len,
            });
            writer.store_bytes += store.len;
        }
        Ok(writer)
    }

    /// Appends the contents of consecutive pages of one mapping, the first of
    /// which is page `first_page` of the mapping, and returns the runs that
    /// describe them.
    pub fn append_pages(
        &mut self,
        first_page: u64,
        data: &[u8],
    ) -> Result<Vec<PageRun>, ImageError> {
        self.check_whole_pages(data)?;
        self.pages
            .write_all(data)
            .map_err(ImageError::io(&self.pages_path))?;
        let runs = runs_of(first_page, self.store_bytes, data);
        self.store_bytes += data.len() as u64;
        Ok(runs)
    }

    /// Returns the runs for consecutive pages of one mapping, the first of
    /// which is page `first_page` of the mapping, whose contents are already
    /// in the page store from `store_offset` on (a base store's, usually):
    /// nothing is written. `data` is their contents, equal to the stored
    /// bytes; the runs' checksums are computed over it.
    pub fn reuse_pages(
        &self,
        first_page: u64,
        store_offset: u64,
        data: &[u8],
    ) -> Result<Vec<PageRun>, ImageError> {
        self.check_whole_pages(data)?;
        let inside = store_offset.is_multiple_of(PAGE_SIZE)
            && store_offset
                .checked_add(data.len() as u64)
                .is_some_and(|end| end <= self.store_bytes);
        if !inside {
            return Err(ImageError::Inconsistent {
                path: self.pages_path.clone(),
                reason: format!(
                    "cannot reuse {} bytes at store offset {store_offset}: the page store holds {}",
                    data.len(),
                    self.store_bytes
                ),
            });
        }
        Ok(runs_of(first_page, store_offset, data))
    }

    fn check_whole_pages(&self, data: &[u8]) -> Result<(), ImageError> {
        if (data.len() as u64).is_multiple_of(PAGE_SIZE) {
            return Ok(());
        }
        Err(ImageError::Inconsistent {
            path: self.pages_path.clone(),
            reason: format!("{} bytes is not a whole number of pages", data.len()),
        })
    }

    /// Size of the page store so far: the base stores and the bytes appended.
    pub fn store_bytes(&self) -> u64 {
        self.store_bytes
    }

    /// Base stores of the image (none unless made by [`ImageWriter::create_delta`]).
    pub fn base_stores(&self) -> &[BaseStore] {
        &self.base_stores
    }

    /// Writes the manifest, syncs everything and moves the image into place,
    /// atomically replacing any image already there.
    pub fn finish(mut self, manifest: &mut Manifest) -> Result<(), ImageError> {
        manifest.page_store_bytes = self.store_bytes;
        manifest.base_stores = self.base_stores.clone();
        self.pages
            .flush()
            .map_err(ImageError::io(&self.pages_path))?;
        self.pages
            .get_ref()
            .sync_all()
            .map_err(ImageError::io(&self.pages_path))?;

        let manifest_path = self.staging.join(MANIFEST_FILE);
        let bytes = encode_manifest(manifest).map_err(|source| ImageError::Json {
            path: manifest_path.clone(),
            source,
        })?;
        let mut file = create_private_file(&manifest_path)?;
        file.write_all(&bytes)
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

/// Runs of at most [`MAX_RUN_PAGES`] for `data`, stored from `store_offset` on.
fn runs_of(first_page: u64, store_offset: u64, data: &[u8]) -> Vec<PageRun> {
    data.chunks((MAX_RUN_PAGES * PAGE_SIZE) as usize)
        .enumerate()
        .map(|(index, chunk)| {
            let skipped = index as u64 * MAX_RUN_PAGES;
            PageRun {
                first_page: first_page + skipped,
                count: chunk.len() as u64 / PAGE_SIZE,
                store_offset: store_offset + skipped * PAGE_SIZE,
                crc32c: crc32c::crc32c(chunk),
            }
        })
        .collect()
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
    /// The checksum in the manifest's header.
    crc: u32,
    /// Shared with the images of the other processes of a tree
    /// ([`Image::process_image`]).
    pages: Arc<PageStore>,
}

impl Image {
    /// Opens the image in `dir`, checking that the directory and its path
    /// are trusted and that each of its files is a trusted regular file
    /// ([`crate::trust`]: owner, mode, type, judged on the opened file),
    /// the manifest's header, checksum and consistency, and the page
    /// stores' sizes. A `working-set`, if there is one, must be a trusted
    /// file too; its contents are judged when it is read. Page checksums
    /// are checked as pages are read ([`PageStore::run`]).
    ///
    /// The image keeps the resolved path of `dir` (see [`Image::dir`]).
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        let dir = trusted_dir(dir)?;
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest_file = open_trusted_file(&manifest_path)?;
        let pages_file = open_trusted_file(&dir.join(PAGES_FILE))?;
        match open_trusted_file(&dir.join(WORKING_SET_FILE)) {
            Err(err) if !err.is_not_found() => return Err(err.into()),
            _ => {}
        }

        let (manifest, crc) = read_manifest(manifest_file, &manifest_path)?;
        // decode_manifest checked the base stores' names.
        let mut stores = Vec::with_capacity(manifest.base_stores.len() + 1);
        for base in &manifest.base_stores {
            stores.push(open_trusted_file(&dir.join(&base.file))?);
        }
        stores.push(pages_file);
        let pages = PageStore::open(&dir, &manifest, &manifest_path, stores)?;
        check_seccomp(&manifest, &manifest_path)?;
        Ok(Self {
            dir,
            manifest,
            crc,
            pages: Arc::new(pages),
        })
    }

    /// The image of the `index`th descendant process of a tree
    /// ([`Manifest::children`]), as if it had been checkpointed alone: its
    /// process, threads, mappings and own descriptors, over the same page
    /// store (its pages may be runs its parent stored). The descriptors it
    /// inherits are not in it. `None` when there is no such process.
    pub fn process_image(&self, index: usize) -> Option<Image> {
        let child = self.manifest.children.get(index)?;
        let tree = &self.manifest;
        // Field by field: a clone of the whole manifest would copy every
        // other process's mappings too (a tree's restore takes a view of
        // each of its processes).
        let manifest = Manifest {
            kernel: tree.kernel.clone(),
            cpu: tree.cpu.clone(),
            created_unix_ms: tree.created_unix_ms,
            process: child.process.clone(),
            threads: child.threads.clone(),
            mappings: child.mappings.clone(),
            fds: child.fds.clone(),
            page_store_bytes: tree.page_store_bytes,
            base_stores: tree.base_stores.clone(),
            agent_files: tree.agent_files.clone(),
            children: Vec::new(),
            zombies: tree.zombies.clone(),
            sysv_ipc: tree.sysv_ipc.clone(),
        };
        Some(Image {
            dir: self.dir.clone(),
            manifest,
            crc: self.crc,
            pages: Arc::clone(&self.pages),
        })
    }

    /// The image's identity: the checksum in its manifest's header, as
    /// [`super::manifest_crc`] reads it from the file, taken when the
    /// image was opened.
    pub fn crc(&self) -> u32 {
        self.crc
    }

    /// The image directory, resolved: free of symbolic links.
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

/// Reads and checks the manifest from `file`, opened from `path`, and
/// gives the checksum of its header.
fn read_manifest(file: File, path: &Path) -> Result<(Manifest, u32), ImageError> {
    // One byte past the longest valid manifest, so that a longer file is
    // read no further yet still fails the length check.
    let limit = (MAX_HEADER_BYTES + 1 + 2 * MAX_MANIFEST_BYTES + 1) as u64;
    let mut bytes = Vec::new();
    file.take(limit)
        .read_to_end(&mut bytes)
        .map_err(ImageError::io(path))?;
    decode_with_crc(&bytes, path)
}

/// Checks that mappings are page-aligned, ordered and disjoint, and that every
/// page run lies inside its mapping and inside the page store.
/// The mappings of every process of a tree are checked, each process's
/// error naming its pid.
pub(super) fn check_layout(manifest: &Manifest, path: &Path) -> Result<(), ImageError> {
    check_mappings(&manifest.mappings, "", manifest.page_store_bytes, path)?;
    for child in &manifest.children {
        let process = format!("pid {}: ", child.process.pid);
        check_mappings(&child.mappings, &process, manifest.page_store_bytes, path)?;
    }
    check_zombies(manifest, path)
}

/// Checks that every zombie's parent is a process of the tree and that its
/// wait status is one an exited process can have.
fn check_zombies(manifest: &Manifest, path: &Path) -> Result<(), ImageError> {
    for zombie in &manifest.zombies {
        let parent_known = zombie.ppid == manifest.process.pid
            || manifest
                .children
                .iter()
                .any(|child| child.process.pid == zombie.ppid);
        let status_valid = match zombie.signal() {
            // Only the signals the kernel has (1 to 64) end a process.
            Some(signal) => signal <= 64 && zombie.wait_status & !0xff == 0,
            None => zombie.exit_code().is_some() && zombie.wait_status & !0xff00 == 0,
        };
        if zombie.pid <= 0 || !parent_known || !status_valid {
            return Err(ImageError::Inconsistent {
                path: path.to_owned(),
                reason: format!(
                    "zombie pid {} (parent {}, wait status {:#x}): not a child of the tree \
                     with the status of an exited process",
                    zombie.pid, zombie.ppid, zombie.wait_status
                ),
            });
        }
    }
    Ok(())
}

/// [`check_layout`] of the mappings of one process; `process` prefixes the
/// messages.
fn check_mappings(
    mappings: &[Mapping],
    process: &str,
    page_store_bytes: u64,
    path: &Path,
) -> Result<(), ImageError> {
    let inconsistent = |reason: String| ImageError::Inconsistent {
        path: path.to_owned(),
        reason,
    };
    let mut previous_end = 0;
    for mapping in mappings {
        let range = format!("{process}mapping {:#x}-{:#x}", mapping.start, mapping.end);
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
                    .count
                    .checked_mul(PAGE_SIZE)
                    .and_then(|bytes| run.store_offset.checked_add(bytes))
                    .is_some_and(|end| end <= page_store_bytes);
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

/// Checks that every seccomp filter is a whole program of a size the kernel
/// takes, and that threads name only filters the image holds.
fn check_seccomp(manifest: &Manifest, path: &Path) -> Result<(), ImageError> {
    check_process_seccomp(&manifest.process, &manifest.threads, "", path)?;
    for child in &manifest.children {
        let process = format!("pid {}: ", child.process.pid);
        check_process_seccomp(&child.process, &child.threads, &process, path)?;
    }
    Ok(())
}

/// [`check_seccomp`] of one process of a tree; `process` prefixes the
/// messages.
fn check_process_seccomp(
    info: &ProcessInfo,
    threads: &[ThreadInfo],
    process: &str,
    path: &Path,
) -> Result<(), ImageError> {
    let inconsistent = |reason: String| ImageError::Inconsistent {
        path: path.to_owned(),
        reason: format!("{process}{reason}"),
    };
    let filters = &info.seccomp_filters;
    for (index, filter) in filters.iter().enumerate() {
        let len = filter.program.len();
        if len == 0 || len % SECCOMP_INSN_LEN != 0 || len / SECCOMP_INSN_LEN > SECCOMP_MAX_INSNS {
            return Err(inconsistent(format!(
                "seccomp filter {index}: a program of {len} bytes is not 1 to {SECCOMP_MAX_INSNS} instructions of {SECCOMP_INSN_LEN} bytes"
            )));
        }
    }
    for thread in threads {
        if let Some(&index) = thread
            .seccomp
            .iter()
            .find(|&&i| i as usize >= filters.len())
        {
            return Err(inconsistent(format!(
                "thread {} runs under seccomp filter {index}, but the image holds {} filters",
                thread.tid,
                filters.len()
            )));
        }
    }
    Ok(())
}

/// The page store, mapped read-only as one contiguous range of memory: the
/// base stores, then the image's own `pages`, each at its offset.
pub struct PageStore {
    files: Vec<StoreFile>,
    map: Option<StoreMap>,
    /// The runs [`PageStore::check`] found sound, by offset, length and
    /// checksum: one thread may check the runs another will read (a cold
    /// wake checks its file pages' runs while the process lays out its
    /// memory).
    checked: Mutex<HashSet<(u64, u64, u32)>>,
}

/// One file of a page store.
struct StoreFile {
    path: PathBuf,
    /// Offset of its first byte in the page store.
    start: u64,
    len: u64,
    /// Device and inode, to recognise the file when it is linked elsewhere.
    identity: (u64, u64),
}

impl PageStore {
    /// Maps the page stores of the image in `dir` described by `manifest`,
    /// `opened` in order (its base stores, then `pages`), after checking
    /// that each file has the size the manifest gives it.
    fn open(
        dir: &Path,
        manifest: &Manifest,
        manifest_path: &Path,
        opened: Vec<File>,
    ) -> Result<Self, ImageError> {
        let total = manifest.page_store_bytes;
        let mut expected = Vec::with_capacity(manifest.base_stores.len() + 1);
        let mut start = 0u64;
        for base in &manifest.base_stores {
            expected.push((dir.join(&base.file), start, base.bytes));
            start = start
                .checked_add(base.bytes)
                .filter(|&end| end <= total)
                .ok_or_else(|| ImageError::Inconsistent {
                    path: manifest_path.to_owned(),
                    reason: format!("base stores are larger than the page store's {total} bytes"),
                })?;
        }
        expected.push((dir.join(PAGES_FILE), start, total - start));

        let mut files = Vec::with_capacity(expected.len());
        for ((path, start, len), file) in expected.into_iter().zip(&opened) {
            let meta = file.metadata().map_err(ImageError::io(&path))?;
            if meta.len() != len {
                return Err(ImageError::Inconsistent {
                    path,
                    reason: format!(
                        "page store holds {} bytes but the manifest expects {len}",
                        meta.len()
                    ),
                });
            }
            if !len.is_multiple_of(PAGE_SIZE) {
                return Err(ImageError::Inconsistent {
                    path,
                    reason: format!("page store of {len} bytes is not a whole number of pages"),
                });
            }
            files.push(StoreFile {
                path,
                start,
                len,
                identity: (meta.dev(), meta.ino()),
            });
        }
        let map = StoreMap::new(&files, &opened)?;
        Ok(Self {
            files,
            map,
            checked: Mutex::new(HashSet::new()),
        })
    }

    /// Size of the page store in bytes.
    pub fn len(&self) -> u64 {
        self.files.last().map_or(0, |file| file.start + file.len)
    }

    /// True when no page is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of a run, after checking its checksum, unless
    /// [`PageStore::check`] found it sound already.
    pub fn run(&self, run: &PageRun) -> Result<&[u8], ImageError> {
        let bytes = self.run_unchecked(run)?;
        let key = (run.store_offset, run.count, run.crc32c);
        if !self
            .checked
            .lock()
            .expect("checked runs lock")
            .contains(&key)
        {
            self.verify(run, bytes)?;
        }
        Ok(bytes)
    }

    /// Checks a run's checksum now and remembers it sound, so that
    /// [`PageStore::run`] does not check it again: for a thread checking
    /// the runs another will read. Only the runs checked here are kept.
    pub fn check(&self, run: &PageRun) -> Result<(), ImageError> {
        self.verify(run, self.run_unchecked(run)?)?;
        self.checked.lock().expect("checked runs lock").insert((
            run.store_offset,
            run.count,
            run.crc32c,
        ));
        Ok(())
    }

    fn verify(&self, run: &PageRun, bytes: &[u8]) -> Result<(), ImageError> {
        if crc32c::crc32c(bytes) == run.crc32c {
            return Ok(());
        }
        Err(ImageError::Checksum {
            path: self.file_at(run.store_offset).to_owned(),
            what: format!("{} pages at offset {}", run.count, run.store_offset),
        })
    }

    /// The bytes of a run, without checking its checksum.
    pub fn run_unchecked(&self, run: &PageRun) -> Result<&[u8], ImageError> {
        let start = run.store_offset as usize;
        let end = start.saturating_add((run.count * PAGE_SIZE) as usize);
        self.as_bytes()
            .get(start..end)
            .ok_or_else(|| ImageError::Inconsistent {
                path: self.file_at(run.store_offset).to_owned(),
                reason: format!("run at offset {start} ends past the page store"),
            })
    }

    /// The whole store as one slice (for bulk copies).
    pub fn as_bytes(&self) -> &[u8] {
        self.map.as_ref().map_or(&[], StoreMap::as_bytes)
    }

    /// The file holding store offset `offset` (the last file past the end),
    /// for error messages.
    fn file_at(&self, offset: u64) -> &Path {
        self.files
            .iter()
            .find(|file| offset < file.start + file.len)
            .or(self.files.last())
            .map_or(Path::new(PAGES_FILE), |file| &file.path)
    }
}

/// A reserved range of address space holding every file of a page store,
/// each mapped read-only at its offset; unmapped on drop.
struct StoreMap {
    addr: NonNull<std::ffi::c_void>,
    len: NonZeroUsize,
}

// SAFETY: the mapping is read-only and owned by this value alone; nothing
// writes it, so sharing or sending it between threads is as safe as a `&[u8]`.
unsafe impl Send for StoreMap {}
// SAFETY: see `Send`: shared access only ever reads.
unsafe impl Sync for StoreMap {}

impl StoreMap {
    /// Maps `opened[i]`, described by `files[i]`, at its offset. `None` for
    /// an empty store.
    fn new(files: &[StoreFile], opened: &[File]) -> Result<Option<Self>, ImageError> {
        let Some(last) = files.last() else {
            return Ok(None);
        };
        let total = last.start + last.len;
        let len = usize::try_from(total).map_err(|_| ImageError::Inconsistent {
            path: last.path.clone(),
            reason: format!("a page store of {total} bytes does not fit in memory"),
        })?;
        let Some(len) = NonZeroUsize::new(len) else {
            return Ok(None);
        };
        // One reservation first, so the files land next to each other and
        // the store reads as one slice. PROT_NONE and MAP_NORESERVE: it only
        // holds the addresses until the files are mapped over it.
        // SAFETY: a new private anonymous mapping at an address the kernel
        // picks touches no existing memory.
        let addr = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_NONE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }
        .map_err(|errno| ImageError::Io {
            path: last.path.clone(),
            source: errno.into(),
        })?;
        // From here on, dropping `map` unmaps the whole range, files included.
        let map = Self { addr, len };
        for (file, opened) in files.iter().zip(opened) {
            let Some(file_len) = NonZeroUsize::new(file.len as usize) else {
                continue;
            };
            let at = NonZeroUsize::new(addr.as_ptr() as usize + file.start as usize)
                .expect("an offset into a mapping is not null");
            // SAFETY: MAP_FIXED replaces pages only inside our own
            // reservation (`file.start + file.len <= total`, checked by the
            // caller's layout), which nothing else refers to yet. The file
            // is private to root and never written in place once its image
            // is finished: a truncation would fault, not break memory safety
            // of our data structures, and runs are checksummed before use.
            unsafe {
                nix::sys::mman::mmap(
                    Some(at),
                    file_len,
                    ProtFlags::PROT_READ,
                    MapFlags::MAP_PRIVATE | MapFlags::MAP_FIXED,
                    opened,
                    0,
                )
            }
            .map_err(|errno| ImageError::Io {
                path: file.path.clone(),
                source: errno.into(),
            })?;
        }
        Ok(Some(map))
    }

    fn as_bytes(&self) -> &[u8] {
        // SAFETY: the range is mapped, readable (every byte belongs to one
        // of the files, all mapped PROT_READ) and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.addr.as_ptr().cast::<u8>(), self.len.get()) }
    }
}

impl Drop for StoreMap {
    fn drop(&mut self) {
        // SAFETY: the range is ours alone; no slice of it outlives `self`.
        let _ = unsafe { nix::sys::mman::munmap(self.addr, self.len.get()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    use crate::image::{FORMAT_VERSION, Mapping};
    use crate::trust::TrustError;

    const START: u64 = 0x10000;
    const MAPPING_PAGES: u64 = 16;

    /// `pages` pages, page `i` filled with byte `seed + i`.
    fn pattern(seed: u8, pages: u64) -> Vec<u8> {
        (0..pages)
            .flat_map(|page| std::iter::repeat_n(seed.wrapping_add(page as u8), PAGE_SIZE as usize))
            .collect()
    }

    /// A manifest with one anonymous mapping of [`MAPPING_PAGES`] pages at
    /// [`START`], stored as `runs`.
    fn manifest_with(runs: Vec<PageRun>) -> Manifest {
        Manifest {
            mappings: vec![Mapping::anonymous(START, MAPPING_PAGES, runs)],
            ..Manifest::default()
        }
    }

    /// A full image of 4 pages of `pattern(1, 4)`, as pages 0..4 of the mapping.
    fn base_image(dir: &Path) -> Image {
        let mut writer = ImageWriter::create(dir).unwrap();
        let runs = writer.append_pages(0, &pattern(1, 4)).unwrap();
        writer.finish(&mut manifest_with(runs)).unwrap();
        Image::open(dir).unwrap()
    }

    /// A delta of `base`: pages 0..2 reused from store offset 0, pages 2..4
    /// written anew with `pattern(seed, 2)`.
    fn delta_image(dir: &Path, base: &Image, seed: u8) -> Image {
        let mut writer = ImageWriter::create_delta(dir, base).unwrap();
        let reused = base.pages().as_bytes()[..2 * PAGE_SIZE as usize].to_vec();
        let mut runs = writer.reuse_pages(0, 0, &reused).unwrap();
        runs.extend(writer.append_pages(2, &pattern(seed, 2)).unwrap());
        writer.finish(&mut manifest_with(runs)).unwrap();
        Image::open(dir).unwrap()
    }

    fn inode(path: &Path) -> u64 {
        fs::metadata(path).unwrap().ino()
    }

    /// Rewrites the manifest of the image in `dir` after `edit`, with a
    /// valid header, as a hostile or buggy writer could.
    fn rewrite_manifest(dir: &Path, edit: impl FnOnce(&mut Manifest)) {
        let path = dir.join(MANIFEST_FILE);
        // Parsed without checks: an earlier rewrite may have made it invalid.
        let text = fs::read(&path).unwrap();
        let mut manifest = super::super::manifest_file::decode_unchecked(&text);
        edit(&mut manifest);
        fs::write(&path, encode_manifest(&mut manifest).unwrap()).unwrap();
    }

    #[test]
    fn a_run_checked_ahead_is_read_without_a_second_check_and_a_damaged_one_never_is() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("image");
        let image = base_image(&dir);
        let good = image.manifest().mappings[0].pages[0];
        let damaged = PageRun {
            crc32c: good.crc32c ^ 1,
            ..good
        };
        let pages = image.pages();
        assert!(matches!(
            pages.check(&damaged),
            Err(ImageError::Checksum { .. })
        ));
        assert!(
            matches!(pages.run(&damaged), Err(ImageError::Checksum { .. })),
            "a run that failed its check is checked again, and fails again"
        );
        pages.check(&good).unwrap();
        assert_eq!(
            pages.run(&good).unwrap(),
            pages.run_unchecked(&good).unwrap()
        );
        assert_eq!(
            pages.checked.lock().unwrap().len(),
            1,
            "only the sound run is kept"
        );
    }

    #[test]
    fn an_image_knows_its_identity_as_the_file_gives_it() {
        let temp = tempfile::tempdir().unwrap();
        let base = base_image(&temp.path().join("base"));
        let delta = delta_image(&temp.path().join("delta"), &base, 100);
        for image in [&base, &delta] {
            assert_eq!(
                image.crc(),
                crate::image::manifest_crc(image.dir()).unwrap()
            );
        }
        assert_ne!(base.crc(), delta.crc());
    }

    #[test]
    fn a_delta_image_reads_its_base_pages_through_one_slice() {
        let temp = tempfile::tempdir().unwrap();
        let base = base_image(&temp.path().join("base"));
        let delta_dir = temp.path().join("delta");
        let delta = delta_image(&delta_dir, &base, 100);

        let manifest = delta.manifest();
        assert_eq!(
            manifest.base_stores,
            vec![BaseStore {
                file: "pages.base.0".into(),
                bytes: 4 * PAGE_SIZE
            }]
        );
        assert_eq!(manifest.page_store_bytes, 6 * PAGE_SIZE);
        assert_eq!(
            fs::metadata(delta_dir.join(PAGES_FILE)).unwrap().len(),
            2 * PAGE_SIZE,
            "the delta's own store holds only the new pages"
        );
        assert_eq!(
            inode(&delta_dir.join("pages.base.0")),
            inode(&base.dir().join(PAGES_FILE)),
            "the base store is a hard link, not a copy"
        );

        let bytes = delta.pages().as_bytes();
        assert_eq!(bytes.len() as u64, 6 * PAGE_SIZE);
        assert_eq!(delta.pages().len(), 6 * PAGE_SIZE);
        assert_eq!(&bytes[..4 * PAGE_SIZE as usize], &pattern(1, 4)[..]);
        assert_eq!(&bytes[4 * PAGE_SIZE as usize..], &pattern(100, 2)[..]);
        let runs = &manifest.mappings[0].pages;
        assert_eq!(
            runs[0].store_offset, 0,
            "reused pages keep their base offset"
        );
        assert_eq!(delta.pages().run(&runs[0]).unwrap(), &pattern(1, 2)[..]);
        assert_eq!(runs[1].store_offset, 4 * PAGE_SIZE);
        assert_eq!(delta.pages().run(&runs[1]).unwrap(), &pattern(100, 2)[..]);
    }

    #[test]
    fn a_delta_of_a_delta_keeps_every_offset_and_outlives_its_bases() {
        let temp = tempfile::tempdir().unwrap();
        let base = base_image(&temp.path().join("base"));
        let first = delta_image(&temp.path().join("first"), &base, 100);
        let second_dir = temp.path().join("second");
        let second = delta_image(&second_dir, &first, 200);

        let files: Vec<_> = second.manifest().base_stores.iter().collect();
        assert_eq!(files.len(), 2, "{files:?}");
        assert_eq!(
            (files[0].file.as_str(), files[0].bytes),
            ("pages.base.0", 4 * PAGE_SIZE)
        );
        assert_eq!(
            (files[1].file.as_str(), files[1].bytes),
            ("pages.base.1", 2 * PAGE_SIZE)
        );
        assert_eq!(second.manifest().page_store_bytes, 8 * PAGE_SIZE);
        // Pages 2..4 of the first delta, still at their offset.
        let earlier = first.manifest().mappings[0].pages[1];
        assert_eq!(second.pages().run(&earlier).unwrap(), &pattern(100, 2)[..]);

        drop((base, first));
        fs::remove_dir_all(temp.path().join("base")).unwrap();
        fs::remove_dir_all(temp.path().join("first")).unwrap();
        let reopened = Image::open(&second_dir).unwrap();
        let runs = &reopened.manifest().mappings[0].pages;
        assert_eq!(reopened.pages().run(&runs[0]).unwrap(), &pattern(1, 2)[..]);
        assert_eq!(
            reopened.pages().run(&runs[1]).unwrap(),
            &pattern(200, 2)[..]
        );
    }

    #[test]
    fn reused_pages_must_lie_in_the_store_so_far() {
        let temp = tempfile::tempdir().unwrap();
        let base = base_image(&temp.path().join("base"));
        let writer = ImageWriter::create_delta(&temp.path().join("delta"), &base).unwrap();
        let page = pattern(1, 1);
        assert!(writer.reuse_pages(0, 3 * PAGE_SIZE, &page).is_ok());
        for offset in [4 * PAGE_SIZE, 100] {
            let err = writer.reuse_pages(0, offset, &page).unwrap_err();
            assert!(matches!(err, ImageError::Inconsistent { .. }), "{err}");
        }
    }

    #[test]
    fn missing_resized_or_writable_base_stores_are_refused_by_name() {
        let temp = tempfile::tempdir().unwrap();
        let base = base_image(&temp.path().join("base"));
        let dir = temp.path().join("delta");
        drop(delta_image(&dir, &base, 100));
        let store = dir.join("pages.base.0");
        let names_store = |err: ImageError| {
            assert!(
                err.to_string().contains(&store.display().to_string()),
                "the error names the base store: {err}"
            );
            err
        };

        fs::set_permissions(&store, fs::Permissions::from_mode(0o666)).unwrap();
        let err = names_store(Image::open(&dir).err().unwrap());
        assert!(
            matches!(err, ImageError::Untrusted(TrustError::Mode { .. })),
            "{err}"
        );
        fs::set_permissions(&store, fs::Permissions::from_mode(0o600)).unwrap();

        let grown = OpenOptions::new().append(true).open(&store).unwrap();
        grown.set_len(5 * PAGE_SIZE).unwrap();
        let err = names_store(Image::open(&dir).err().unwrap());
        assert!(
            matches!(&err, ImageError::Inconsistent { reason, .. } if reason.contains("holds")),
            "{err}"
        );
        grown.set_len(4 * PAGE_SIZE).unwrap();
        assert!(Image::open(&dir).is_ok(), "restored to its size, it opens");

        fs::remove_file(&store).unwrap();
        let err = names_store(Image::open(&dir).err().unwrap());
        assert!(matches!(err, ImageError::Io { .. }), "{err}");
    }

    #[test]
    fn base_store_names_cannot_leave_the_image() {
        let temp = tempfile::tempdir().unwrap();
        let base = base_image(&temp.path().join("base"));
        let dir = temp.path().join("delta");
        drop(delta_image(&dir, &base, 100));
        for name in ["../base/pages", "pages.base.1", "/etc/passwd"] {
            rewrite_manifest(&dir, |manifest| manifest.base_stores[0].file = name.into());
            let err = Image::open(&dir).err().unwrap();
            assert!(
                matches!(&err, ImageError::Inconsistent { reason, .. } if reason.contains("expected \"pages.base.0\"")),
                "{name}: {err}"
            );
        }
        rewrite_manifest(&dir, |manifest| manifest.base_stores[0].bytes = 1 << 40);
        let err = Image::open(&dir).err().unwrap();
        assert!(matches!(err, ImageError::Inconsistent { .. }), "{err}");
    }

    #[test]
    fn a_run_too_long_to_count_in_bytes_is_refused() {
        // Found by the fuzzer: `count * PAGE_SIZE` overflowed (a panic in
        // debug builds) before the run's length was checked.
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("image");
        drop(base_image(&dir));
        for count in [1 << 52, u64::MAX] {
            rewrite_manifest(&dir, |manifest| manifest.mappings[0].pages[0].count = count);
            let err = Image::open(&dir).err().unwrap();
            assert!(
                matches!(&err, ImageError::Inconsistent { reason, .. } if reason.contains("outside the mapping")),
                "a run of {count} pages: {err}"
            );
        }
    }

    #[test]
    fn a_child_process_whose_pages_lie_outside_the_store_is_refused_by_pid() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("image");
        drop(base_image(&dir));
        rewrite_manifest(&dir, |manifest| {
            let mut mappings = manifest.mappings.clone();
            mappings[0].pages[0].store_offset = manifest.page_store_bytes;
            manifest.children.push(crate::image::ChildProcess {
                ppid: 1,
                process: crate::image::ProcessInfo {
                    pid: 42,
                    ..Default::default()
                },
                mappings,
                ..Default::default()
            });
        });
        let err = Image::open(&dir).err().unwrap();
        assert!(
            matches!(&err, ImageError::Inconsistent { reason, .. }
                if reason.starts_with("pid 42: mapping") && reason.contains("outside the mapping or the page store")),
            "{err}"
        );
    }

    #[test]
    fn a_child_thread_under_a_filter_its_process_lacks_is_refused_by_pid() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("image");
        drop(base_image(&dir));
        rewrite_manifest(&dir, |manifest| {
            let mut thread = crate::image::ThreadInfo {
                tid: 43,
                comm: String::new(),
                regs: Vec::new(),
                xsave: Vec::new(),
                sigmask: 0,
                pending: 0,
                queue: Vec::new(),
                sigaltstack: Default::default(),
                rseq: None,
                clear_child_tid: 0,
                robust_list: None,
                seccomp: Vec::new(),
            };
            thread.seccomp.push(0);
            manifest.children.push(crate::image::ChildProcess {
                ppid: 1,
                process: crate::image::ProcessInfo {
                    pid: 43,
                    ..Default::default()
                },
                threads: vec![thread],
                ..Default::default()
            });
        });
        let err = Image::open(&dir).err().unwrap();
        assert!(
            matches!(&err, ImageError::Inconsistent { reason, .. }
                if reason.starts_with("pid 43: thread 43 runs under seccomp filter 0")),
            "{err}"
        );
    }

    #[test]
    fn a_zombie_must_be_a_child_of_the_tree_with_an_exit_status() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("image");
        drop(base_image(&dir));
        let with_zombie = |ppid: i32, wait_status: i32| {
            rewrite_manifest(&dir, |manifest| {
                let root = manifest.process.pid;
                manifest.zombies = vec![crate::image::Zombie {
                    pid: 44,
                    ppid: if ppid == 0 { root } else { ppid },
                    pgid: root,
                    sid: root,
                    wait_status,
                }];
            });
            Image::open(&dir)
        };
        let image = with_zombie(0, 7 << 8).expect("a zombie of the root that exited with 7");
        assert_eq!(image.manifest().zombies[0].exit_code(), Some(7));
        with_zombie(0, 15).expect("a zombie of the root killed by SIGTERM");
        for (ppid, wait_status) in [(99, 7 << 8), (0, 0x7f), (0, 65), (0, 1 << 16)] {
            let err = with_zombie(ppid, wait_status).err().unwrap();
            assert!(
                matches!(&err, ImageError::Inconsistent { reason, .. } if reason.starts_with("zombie pid 44")),
                "parent {ppid}, status {wait_status:#x}: {err}"
            );
        }
    }

    /// Rewrites the version number in the header of the manifest in `dir`.
    fn set_format_version(dir: &Path, version: u32) {
        let path = dir.join(MANIFEST_FILE);
        let text = fs::read(&path).unwrap();
        let header_end = text.iter().position(|&byte| byte == b'\n').unwrap();
        let header = String::from_utf8(text[..header_end].to_vec()).unwrap();
        let mut fields: Vec<String> = header.split(' ').map(str::to_owned).collect();
        fields[1] = version.to_string();
        let mut rewritten = fields.join(" ").into_bytes();
        rewritten.extend_from_slice(&text[header_end..]);
        fs::write(&path, rewritten).unwrap();
    }

    #[test]
    fn images_of_format_1_still_read_and_unknown_versions_are_refused() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("image");
        base_image(&dir);
        let path = dir.join(MANIFEST_FILE);
        let manifest = super::super::manifest_file::decode_unchecked(&fs::read(&path).unwrap());
        fs::write(
            &path,
            super::super::manifest_file::encode_legacy(&manifest, 1),
        )
        .unwrap();
        assert_eq!(
            Image::open(&dir).unwrap().manifest(),
            &manifest,
            "a format 1 image reads"
        );
        set_format_version(&dir, FORMAT_VERSION + 1);
        let err = Image::open(&dir).err().expect("a newer format is refused");
        assert_eq!(
            err.to_string(),
            format!(
                "{}: image format version {} is not supported (this build reads 1 to {FORMAT_VERSION})",
                dir.join(MANIFEST_FILE).display(),
                FORMAT_VERSION + 1
            )
        );
    }

    #[test]
    fn manifests_without_base_stores_still_read() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("full");
        let image = base_image(&dir);
        assert!(image.manifest().base_stores.is_empty());
        let text =
            String::from_utf8_lossy(&fs::read(dir.join(MANIFEST_FILE)).unwrap()).into_owned();
        assert!(
            !text.contains("base_stores"),
            "a full image's manifest reads as before the field existed"
        );
        let mut json: serde_json::Value = serde_json::to_value(Manifest::default()).unwrap();
        json.as_object_mut().unwrap().remove("base_stores");
        let manifest: Manifest = serde_json::from_value(json).unwrap();
        assert!(manifest.base_stores.is_empty());
    }

    #[test]
    fn a_base_on_another_filesystem_is_reported_as_such() {
        let temp = tempfile::tempdir().unwrap();
        let base = base_image(&temp.path().join("base"));
        let Ok(elsewhere) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        if fs::metadata(elsewhere.path()).unwrap().dev() == fs::metadata(temp.path()).unwrap().dev()
        {
            return;
        }
        let err = ImageWriter::create_delta(&elsewhere.path().join("delta"), &base)
            .err()
            .unwrap();
        assert!(matches!(err, ImageError::BaseLink { .. }), "{err}");
        assert!(
            fs::read_dir(elsewhere.path()).unwrap().next().is_none(),
            "no staging directory is left behind"
        );
    }
}
