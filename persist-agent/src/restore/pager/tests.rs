//! The pager against real userfaultfds over mappings of the test process.

use std::os::fd::FromRawFd;

use persist_common::image::{ImageWriter, Manifest, Mapping};

use super::*;
use crate::sys::uffd;
use persist_common::image::MappingKind;

fn manifest(mappings: Vec<Mapping>) -> Manifest {
    Manifest {
        mappings,
        ..Manifest::default()
    }
}

/// An anonymous mapping of our own, registered with a fresh userfaultfd,
/// and an image whose pages for it hold `page index + 1` in every byte.
#[test]
fn serves_image_pages_and_zeros_after_dontneed() {
    crate::test_support::require_root!();
    const PAGES: u64 = 64;
    let len = (PAGES * PAGE_SIZE) as usize;
    let (area, mut pager, _temp) = patterned_pager(PAGES);
    let start = area as u64;

    // Discard pages 8..16 before anything is filled: the madvise waits
    // for the pager to read the event, so it runs on its own thread.
    let (tids, waiting) = std::sync::mpsc::channel();
    let discard = std::thread::spawn(move || {
        tids.send(nix::unistd::gettid()).unwrap();
        // SAFETY: the range lies inside our own anonymous mapping.
        unsafe {
            libc::madvise(
                (start + 8 * PAGE_SIZE) as *mut libc::c_void,
                (8 * PAGE_SIZE) as usize,
                libc::MADV_DONTNEED,
            )
        }
    });
    wait_for_userfault_event_wait(waiting.recv().unwrap());
    let serving = std::thread::spawn(move || pager.run_until_filled().unwrap());
    assert_eq!(discard.join().unwrap(), 0);
    // SAFETY: reading our own mapping; missing pages are served by the
    // pager thread.
    let bytes = unsafe { std::slice::from_raw_parts(area.cast::<u8>(), len) };
    for page in 0..PAGES as usize {
        let expected = if (8..16).contains(&page) {
            0
        } else {
            page as u8 + 1
        };
        let chunk = &bytes[page * PAGE_SIZE as usize..(page + 1) * PAGE_SIZE as usize];
        assert!(chunk.iter().all(|&b| b == expected), "page {page}");
    }
    let stats = serving.join().unwrap();
    assert_eq!(stats.dropped_pages, 8);
    assert_eq!(stats.fault_pages + stats.filled_pages, PAGES - 8);
    // Unregistered at the end: a later DONTNEED reads zeros without help.
    // SAFETY: as above.
    unsafe { libc::madvise(area, len, libc::MADV_DONTNEED) };
    assert!(bytes.iter().all(|&b| b == 0));
}

/// Two mappings of one memfd, registered with a fresh userfaultfd: the
/// second, at page 4 of the object, stores nothing (as a later process of
/// a tree), and its faults get the pages stored with the first. Discarding
/// pages of shared memory keeps them: the object still holds them.
#[test]
fn serves_a_shared_object_from_the_pages_stored_with_another_mapping() {
    crate::test_support::require_root!();
    const PAGES: u64 = 16;
    let len = (PAGES * PAGE_SIZE) as usize;
    // SAFETY: a new memfd, owned here; mapped twice, both leaked.
    let (first, second) = unsafe {
        let fd = libc::memfd_create(c"shared".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, len as i64), 0);
        let map = |len: usize, offset: i64| {
            let area = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset,
            );
            assert_ne!(area, libc::MAP_FAILED);
            area as u64
        };
        let areas = (map(len, 0), map(len / 2, (4 * PAGE_SIZE) as i64));
        libc::close(fd);
        areas
    };
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("image");
    let mut writer = ImageWriter::create(&dir).unwrap();
    let data: Vec<u8> = (0..PAGES)
        .flat_map(|page| std::iter::repeat_n(page as u8 + 1, PAGE_SIZE as usize))
        .collect();
    let runs = writer.append_pages(0, &data).unwrap();
    let memfd = |offset| MappingKind::Memfd {
        name: "shared".into(),
        inode: 1,
        offset,
    };
    let mut mappings = vec![
        Mapping {
            shared: true,
            kind: memfd(0),
            ..Mapping::anonymous(first, PAGES, runs)
        },
        Mapping {
            shared: true,
            kind: memfd(4 * PAGE_SIZE),
            ..Mapping::anonymous(second, PAGES / 2, Vec::new())
        },
    ];
    // An image lists its mappings by address.
    mappings.sort_by_key(|mapping| mapping.start);
    let mut manifest = manifest(mappings);
    writer.finish(&mut manifest).unwrap();
    let image = Arc::new(Image::open(&dir).unwrap());
    let shared = Arc::new(SharedPages::of_tree(image.manifest()));
    let raw = uffd::create_raw().unwrap();
    // SAFETY: create_raw returned a new fd that nothing else owns.
    let fault = unsafe { Userfault::from_raw_fd(raw) };
    fault.register(first, PAGES * PAGE_SIZE).unwrap();
    fault.register(second, PAGES / 2 * PAGE_SIZE).unwrap();
    let pidfd = PidFd::open(std::process::id() as i32).unwrap();
    let mut pager = Pager::new(fault, Arc::new(pidfd), image, &shared);
    assert_eq!(pager.pending_pages(), (PAGES + PAGES / 2) as usize);

    // Pages 0..4 discarded before anything is in: the madvise waits for
    // the pager to read its event, so it runs on its own thread.
    let (tids, waiting) = std::sync::mpsc::channel();
    let discard = std::thread::spawn(move || {
        tids.send(nix::unistd::gettid()).unwrap();
        // SAFETY: the range lies inside our own shared mapping.
        unsafe {
            libc::madvise(
                first as *mut libc::c_void,
                (4 * PAGE_SIZE) as usize,
                libc::MADV_DONTNEED,
            )
        }
    });
    wait_for_userfault_event_wait(waiting.recv().unwrap());
    let serving = std::thread::spawn(move || pager.run_until_filled().unwrap());
    assert_eq!(discard.join().unwrap(), 0);
    // SAFETY: reading our own mappings; missing pages are served by the
    // pager thread.
    let (first_bytes, second_bytes) = unsafe {
        (
            std::slice::from_raw_parts(first as *const u8, len),
            std::slice::from_raw_parts(second as *const u8, len / 2),
        )
    };
    for (page, chunk) in second_bytes.chunks(PAGE_SIZE as usize).enumerate() {
        assert!(
            chunk.iter().all(|&b| b == page as u8 + 5),
            "page {page} of the second"
        );
    }
    for (page, chunk) in first_bytes.chunks(PAGE_SIZE as usize).enumerate() {
        assert!(
            chunk.iter().all(|&b| b == page as u8 + 1),
            "page {page} of the first"
        );
    }
    let stats = serving.join().unwrap();
    assert_eq!(stats.dropped_pages, 0, "shared pages are never dropped");
}

/// A never-written page of a lazily served shared object that a working
/// set names is put in the object ahead, as zeros: a process forked later
/// (PostgreSQL's backend) finds it there instead of faulting. Only that
/// page: a page of the object costs the parked skeleton memory.
#[test]
fn a_never_written_shared_page_of_the_set_is_zeroed_ahead_alone() {
    crate::test_support::require_root!();
    const PAGES: u64 = 16;
    let len = (PAGES * PAGE_SIZE) as usize;
    // SAFETY: a new memfd, owned here; mapped once, leaked.
    let area = unsafe {
        let fd = libc::memfd_create(c"shared".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, len as i64), 0);
        let area = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        assert_ne!(area, libc::MAP_FAILED);
        libc::close(fd);
        area as u64
    };
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("image");
    let mut writer = ImageWriter::create(&dir).unwrap();
    // Pages 0..8 written before the checkpoint, 8..16 never.
    let data: Vec<u8> = (0..PAGES / 2)
        .flat_map(|page| std::iter::repeat_n(page as u8 + 1, PAGE_SIZE as usize))
        .collect();
    let runs = writer.append_pages(0, &data).unwrap();
    let mut manifest = manifest(vec![Mapping {
        shared: true,
        kind: MappingKind::Memfd {
            name: "shared".into(),
            inode: 1,
            offset: 0,
        },
        ..Mapping::anonymous(area, PAGES, runs)
    }]);
    writer.finish(&mut manifest).unwrap();
    let image = Arc::new(Image::open(&dir).unwrap());
    let shared = Arc::new(SharedPages::of_tree(image.manifest()));
    let raw = uffd::create_raw().unwrap();
    // SAFETY: create_raw returned a new fd that nothing else owns.
    let fault = unsafe { Userfault::from_raw_fd(raw) };
    fault.register(area, PAGES * PAGE_SIZE).unwrap();
    let pidfd = PidFd::open(std::process::id() as i32).unwrap();
    let mut pager = Pager::new(fault, Arc::new(pidfd), image, &shared);

    let named = area + 12 * PAGE_SIZE;
    let set = [WorkingSetPage::not_stored(named)];
    assert_eq!(pager.zero_ahead(&set), 1);
    let mut resident = [0u8; PAGES as usize];
    // SAFETY: mincore writes one byte a page of our own mapping into `resident`.
    let rc = unsafe { libc::mincore(area as *mut libc::c_void, len, resident.as_mut_ptr()) };
    assert_eq!(rc, 0);
    assert_eq!(
        resident[12] & 1,
        1,
        "the page the set names is in the object"
    );
    for page in [11, 13] {
        assert_eq!(resident[page] & 1, 0, "page {page} beside it is not");
    }
    // SAFETY: page 12 is in (checked above): reading it needs no pager.
    let byte = unsafe { *((named + 7) as *const u8) };
    assert_eq!(byte, 0);
}

/// A mapping split in three by mprotect: copies of spans that cross the
/// splits fall back to single pages, and no page is lost or zeroed.
#[test]
fn spans_across_split_mappings_are_copied_page_by_page() {
    crate::test_support::require_root!();
    const PAGES: u64 = 32;
    let (area, mut pager, _temp) = patterned_pager(PAGES);
    let start = area as u64;
    // SAFETY: pages 8..10 lie inside our own mapping; reading them stays allowed.
    let rc = unsafe {
        libc::mprotect(
            (start + 8 * PAGE_SIZE) as *mut libc::c_void,
            (2 * PAGE_SIZE) as usize,
            libc::PROT_READ,
        )
    };
    assert_eq!(rc, 0);
    pager.prefetch_all().unwrap();
    assert_eq!(pager.pending_pages(), 0);
    // SAFETY: every page of our own mapping is present now.
    let bytes =
        unsafe { std::slice::from_raw_parts(area.cast::<u8>(), (PAGES * PAGE_SIZE) as usize) };
    for (page, chunk) in bytes.chunks(PAGE_SIZE as usize).enumerate() {
        assert!(chunk.iter().all(|&b| b == page as u8 + 1), "page {page}");
    }
}

/// Enough pages for several copy threads: each page arrives with its own
/// content and nothing is left to fault.
#[test]
fn prefetch_all_copies_on_several_threads() {
    crate::test_support::require_root!();
    const PAGES: u64 = 1024;
    let (area, mut pager, _temp) = patterned_pager(PAGES);
    pager.prefetch_all().unwrap();
    assert_eq!(pager.pending_pages(), 0);
    // SAFETY: every page of our own mapping is present now.
    let bytes =
        unsafe { std::slice::from_raw_parts(area.cast::<u8>(), (PAGES * PAGE_SIZE) as usize) };
    for (page, chunk) in bytes.chunks(PAGE_SIZE as usize).enumerate() {
        assert!(
            chunk.iter().all(|&b| b == (page % 251) as u8 + 1),
            "page {page}"
        );
    }
    assert_eq!(pager.stats.prefetched_pages, PAGES);
}

/// A pager for an anonymous mapping of our own of `pages` pages,
/// registered with a fresh userfaultfd, whose image holds `page index + 1`
/// (modulo 251) in every byte of each page.
fn patterned_pager(pages: u64) -> (*mut libc::c_void, Pager, tempfile::TempDir) {
    let len = (pages * PAGE_SIZE) as usize;
    let area = nix_mmap(len);
    let start = area as u64;
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("image");
    let mut writer = ImageWriter::create(&dir).unwrap();
    let mut data = Vec::with_capacity(len);
    for page in 0..pages {
        data.extend(std::iter::repeat_n(
            (page % 251) as u8 + 1,
            PAGE_SIZE as usize,
        ));
    }
    let runs = writer.append_pages(0, &data).unwrap();
    let mut manifest = manifest(vec![Mapping::anonymous(start, pages, runs)]);
    writer.finish(&mut manifest).unwrap();
    let image = Arc::new(Image::open(&dir).unwrap());
    let raw = uffd::create_raw().unwrap();
    // SAFETY: create_raw returned a new fd that nothing else owns.
    let fault = unsafe { Userfault::from_raw_fd(raw) };
    fault.register(start, pages * PAGE_SIZE).unwrap();
    let pidfd = PidFd::open(std::process::id() as i32).unwrap();
    (
        area,
        Pager::new(fault, Arc::new(pidfd), image, &Arc::default()),
        temp,
    )
}

/// mremap moves missing pages (they must arrive at their new address
/// with their own content) and munmap drops them.
#[test]
fn follows_mremap_and_munmap_of_missing_pages() {
    crate::test_support::require_root!();
    const PAGES: u64 = 64;
    let (area, mut pager, _temp) = patterned_pager(PAGES);
    let start = area as u64;
    let target = nix_mmap((16 * PAGE_SIZE) as usize) as u64;
    // Each call waits for the pager to read its event. Both are made from
    // threads of their own and are waiting before the pager starts: were the
    // munmap made after the pager read the mremap's event, the pager's fill
    // could reach the unmapped pages first and find nothing to drop.
    let (tids, waiting) = std::sync::mpsc::channel();
    let mover = {
        let tids = tids.clone();
        std::thread::spawn(move || {
            tids.send(nix::unistd::gettid()).unwrap();
            // SAFETY: moving pages 32..48 of our own mapping over a mapping
            // reserved for them.
            unsafe {
                libc::mremap(
                    (start + 32 * PAGE_SIZE) as *mut libc::c_void,
                    (16 * PAGE_SIZE) as usize,
                    (16 * PAGE_SIZE) as usize,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    target as *mut libc::c_void,
                ) as u64
            }
        })
    };
    let unmapper = std::thread::spawn(move || {
        tids.send(nix::unistd::gettid()).unwrap();
        // SAFETY: unmapping pages 48..56 of our own mapping.
        unsafe {
            libc::munmap(
                (start + 48 * PAGE_SIZE) as *mut libc::c_void,
                (8 * PAGE_SIZE) as usize,
            )
        }
    });
    for tid in waiting.iter().take(2) {
        wait_for_userfault_event_wait(tid);
    }
    let serving = std::thread::spawn(move || pager.run_until_filled().unwrap());
    let changes = (mover.join().unwrap(), unmapper.join().unwrap());
    assert_eq!(changes, (target, 0));
    // SAFETY: the moved pages now live at `target`, served by the pager.
    let moved =
        unsafe { std::slice::from_raw_parts(target as *const u8, (16 * PAGE_SIZE) as usize) };
    for page in 0..16usize {
        let chunk = &moved[page * PAGE_SIZE as usize..(page + 1) * PAGE_SIZE as usize];
        assert!(
            chunk.iter().all(|&b| b == 32 + page as u8 + 1),
            "moved page {page}"
        );
    }
    // SAFETY: pages 0..32 and 56..64 are still mapped where they were.
    let kept =
        unsafe { std::slice::from_raw_parts(area.cast::<u8>(), (PAGES * PAGE_SIZE) as usize) };
    for page in (0..32usize).chain(56..64) {
        let chunk = &kept[page * PAGE_SIZE as usize..(page + 1) * PAGE_SIZE as usize];
        assert!(chunk.iter().all(|&b| b == page as u8 + 1), "page {page}");
    }
    let stats = serving.join().unwrap();
    assert_eq!(stats.dropped_pages, 8, "the unmapped pages are dropped");
    assert_eq!(stats.fault_pages + stats.filled_pages, PAGES - 8);
}

/// Waits until thread `tid` of this process sleeps until a userfaultfd reader
/// takes its event (mremap, munmap, fork...).
fn wait_for_userfault_event_wait(tid: nix::unistd::Pid) {
    let wchan = format!("/proc/self/task/{tid}/wchan");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&wchan).unwrap_or_default() != "userfaultfd_event_wait_completion"
    {
        assert!(
            Instant::now() < deadline,
            "thread {tid} never waited for its userfaultfd event"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A fresh private anonymous mapping of `len` bytes, leaked for the test.
pub(crate) fn nix_mmap(len: usize) -> *mut libc::c_void {
    // SAFETY: a fresh private anonymous mapping, leaked for the test.
    let area = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(area, libc::MAP_FAILED);
    area
}

/// A pager whose fill waits for a tree's gate serves faults (the faulting
/// page and pages of its run), fills nothing of another run until the gate opens (here, the
/// daemon stopping: a gate that never opens by itself), then fills the rest.
#[test]
fn the_fill_waits_for_the_gate_while_faults_are_served() {
    crate::test_support::require_root!();
    const PAGES: u64 = 64;
    const HALF: u64 = PAGES / 2;
    let len = (PAGES * PAGE_SIZE) as usize;
    let area = nix_mmap(len);
    let start = area as u64;
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("image");
    let mut writer = ImageWriter::create(&dir).unwrap();
    let pattern = |pages: std::ops::Range<u64>| -> Vec<u8> {
        pages
            .flat_map(|page| std::iter::repeat_n(page as u8 + 1, PAGE_SIZE as usize))
            .collect()
    };
    // Two runs: a fault brings in its own run only.
    let mut runs = writer.append_pages(0, &pattern(0..HALF)).unwrap();
    runs.extend(writer.append_pages(HALF, &pattern(HALF..PAGES)).unwrap());
    let mut manifest = manifest(vec![Mapping::anonymous(start, PAGES, runs)]);
    writer.finish(&mut manifest).unwrap();
    let image = Arc::new(Image::open(&dir).unwrap());
    let raw = uffd::create_raw().unwrap();
    // SAFETY: create_raw returned a new fd that nothing else owns.
    let fault = unsafe { Userfault::from_raw_fd(raw) };
    fault.register(start, PAGES * PAGE_SIZE).unwrap();
    let pidfd = PidFd::open(std::process::id() as i32).unwrap();
    let mut pager = Pager::new(fault, Arc::new(pidfd), image, &Arc::default());

    let gate = Arc::new(FillGate::new(
        Duration::from_secs(3600),
        Duration::from_secs(3600),
    ));
    pager.hold_fill_until(Arc::clone(&gate));
    let stopping = Arc::new(AtomicBool::new(false));
    pager.hurry_when(Arc::clone(&stopping));
    let serving = std::thread::spawn(move || pager.run_until_filled().unwrap());

    // SAFETY: reading our own mapping; a missing page is served by the
    // pager thread.
    let bytes = unsafe { std::slice::from_raw_parts(area.cast::<u8>(), len) };
    let page = |index: u64| &bytes[(index * PAGE_SIZE) as usize..][..PAGE_SIZE as usize];
    assert!(page(3).iter().all(|&b| b == 4), "the faulting page");
    let resident = |index: u64| {
        let mut vec = [0u8; 1];
        // SAFETY: one page of our own mapping, one byte of result.
        let rc = unsafe {
            libc::mincore(
                (start + index * PAGE_SIZE) as *mut libc::c_void,
                PAGE_SIZE as usize,
                vec.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        vec[0] & 1 == 1
    };
    assert!(resident(3));
    // The pager loops meanwhile (it would have filled by now without the gate:
    // it fills between polls).
    std::thread::sleep(Duration::from_millis(50));
    assert!(!gate.is_open());
    assert!(
        (HALF..PAGES).all(|index| !resident(index)),
        "nothing of the other run is filled while the gate is closed"
    );

    stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    let stats = serving.join().unwrap();
    assert_eq!(stats.faults, 1);
    assert_eq!(stats.fault_pages + stats.filled_pages, PAGES);
    assert!(stats.filled_pages >= HALF, "{stats:?}");
    for index in 0..PAGES {
        assert!(
            page(index).iter().all(|&b| b == index as u8 + 1),
            "page {index}"
        );
    }
}
