//! Tests of the pager's working-set record and prefetch, on a mapping of the
//! test process itself registered with a real userfaultfd.

use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::time::Duration;

use persist_common::image::{
    Image, ImageWriter, Manifest, Mapping, PAGE_SIZE, PagesByProcess, WorkingSet, WorkingSetPage,
    manifest_crc,
};

use super::pager::Pager;
use crate::sys::pidfd::PidFd;
use crate::sys::uffd::{self, Userfault};

const PAGES: u64 = 32;

/// A private anonymous mapping of our own, an image of it whose page `n`
/// holds `n + 1` in every byte, and a pager for it.
struct Fixture {
    _temp: tempfile::TempDir,
    dir: std::path::PathBuf,
    area: *mut libc::c_void,
    start: u64,
    image: Arc<Image>,
}

impl Fixture {
    fn new() -> Self {
        Self::with_stored_pages(PAGES)
    }

    /// The fixture with only its first `stored` pages in the image.
    fn with_stored_pages(stored: u64) -> Self {
        let len = (PAGES * PAGE_SIZE) as usize;
        let area = super::pager::tests::nix_mmap(len);
        let start = area as u64;
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("image");
        let mut writer = ImageWriter::create(&dir).unwrap();
        let mut data = Vec::with_capacity(len);
        for page in 0..stored {
            data.extend(std::iter::repeat_n(page as u8 + 1, PAGE_SIZE as usize));
        }
        let runs = writer.append_pages(0, &data).unwrap();
        let mut manifest = Manifest {
            mappings: vec![Mapping::anonymous(start, PAGES, runs)],
            ..Manifest::default()
        };
        writer.finish(&mut manifest).unwrap();
        let image = Arc::new(Image::open(&dir).unwrap());
        Self {
            _temp: temp,
            dir,
            area,
            start,
            image,
        }
    }

    fn pager(&self) -> Pager {
        let raw = uffd::create_raw().unwrap();
        // SAFETY: create_raw returned a new fd that nothing else owns.
        let fault = unsafe { Userfault::from_raw_fd(raw) };
        fault.register(self.start, PAGES * PAGE_SIZE).unwrap();
        let pidfd = PidFd::open(std::process::id() as i32).unwrap();
        Pager::new(
            fault,
            Arc::new(pidfd),
            Arc::clone(&self.image),
            &Arc::default(),
        )
    }

    fn page(&self, index: u64) -> WorkingSetPage {
        WorkingSetPage {
            address: self.start + index * PAGE_SIZE,
            store_offset: index * PAGE_SIZE,
        }
    }

    /// Byte `index` of every page, read through the mapping (faulting as needed).
    fn first_bytes(&self) -> Vec<u8> {
        (0..PAGES)
            .map(|page| {
                // SAFETY: reading inside our own mapping; a missing page is
                // served by the pager thread.
                unsafe { *(self.area.cast::<u8>()).add((page * PAGE_SIZE) as usize) }
            })
            .collect()
    }

    /// Byte 0 of each page in `pages`, which must be present already.
    fn first_bytes_of(&self, pages: &[u64]) -> Vec<u8> {
        pages
            .iter()
            .map(|&page| {
                assert!(page < PAGES);
                // SAFETY: reading inside our own mapping, a page the test
                // copied in (or it would wait for a pager).
                unsafe { *(self.area.cast::<u8>()).add((page * PAGE_SIZE) as usize) }
            })
            .collect()
    }
}

/// `pages` as the working set of a single process (a tree's root).
fn of_root(pages: &[WorkingSetPage]) -> PagesByProcess {
    PagesByProcess::from([(0, pages.to_vec())])
}

/// Addresses of the pages of `pager` still missing, as page indexes.
fn missing(fixture: &Fixture, pager: &Pager) -> Vec<u64> {
    (0..PAGES)
        .filter(|&page| pager.is_pending(fixture.start + page * PAGE_SIZE))
        .collect()
}

#[test]
fn a_recorded_set_is_copied_in_bulk_bridging_short_gaps() {
    crate::test_support::require_root!();
    let fixture = Fixture::new();
    let crc = manifest_crc(&fixture.dir).unwrap();
    // Touch order: 20, 21, 3, 5, 7, 30. Pages 4 and 6 bridge 3..=7 into one
    // copy; 20..=21 and 30 are too far apart.
    let pages: Vec<WorkingSetPage> = [20, 21, 3, 5, 7, 30].map(|p| fixture.page(p)).into();
    WorkingSet::write(&fixture.dir, crc, &of_root(&pages), fixture.image.pages()).unwrap();
    let set = WorkingSet::open(&fixture.dir, crc).unwrap();

    let mut pager = fixture.pager();
    assert_eq!(pager.prefetch_set(set.pages_of(0)).unwrap(), 8);
    let copied: Vec<u64> = (0..PAGES)
        .filter(|page| !missing(&fixture, &pager).contains(page))
        .collect();
    assert_eq!(copied, [3, 4, 5, 6, 7, 20, 21, 30]);
    // A second pass finds nothing left to copy.
    assert_eq!(pager.prefetch_set(set.pages_of(0)).unwrap(), 0);

    let serving = std::thread::spawn(move || pager.run_until_filled().unwrap());
    let bytes = fixture.first_bytes();
    let stats = serving.join().unwrap();
    for (page, &byte) in bytes.iter().enumerate() {
        assert_eq!(byte, page as u8 + 1, "page {page}");
    }
    assert_eq!(stats.prefetched_pages, 8);
    assert_eq!(stats.fault_pages + stats.filled_pages, PAGES - 8);
}

#[test]
fn prefetching_everything_leaves_nothing_to_fault() {
    crate::test_support::require_root!();
    let fixture = Fixture::new();
    let mut pager = fixture.pager();
    pager.prefetch_all().unwrap();
    assert!(missing(&fixture, &pager).is_empty());
    let serving = std::thread::spawn(move || pager.run_until_filled().unwrap());
    let bytes = fixture.first_bytes();
    let stats = serving.join().unwrap();
    assert!(bytes.iter().enumerate().all(|(p, &b)| b == p as u8 + 1));
    assert_eq!(stats.prefetched_pages, PAGES);
    assert_eq!(stats.faults + stats.filled_pages, 0, "{stats:?}");
}

#[test]
fn the_fault_log_holds_faulted_pages_in_touch_order() {
    crate::test_support::require_root!();
    let fixture = Fixture::new();
    let mut pager = fixture.pager();
    pager.record_faults(Duration::from_secs(60));
    let serving = std::thread::spawn(move || {
        pager.run_until_filled().unwrap();
        pager.take_fault_log()
    });
    // While recording, nothing is filled in the background: touches fault.
    let touch = |page: u64| {
        // SAFETY: reading inside our own mapping, served by the pager.
        unsafe { *(fixture.area.cast::<u8>()).add((page * PAGE_SIZE) as usize) }
    };
    assert_eq!(touch(30), 31);
    assert_eq!(touch(2), 3);
    // Recording lasts 60 s, so the pager only returns once the test has
    // touched every page itself.
    let bytes = fixture.first_bytes();
    assert!(bytes.iter().enumerate().all(|(p, &b)| b == p as u8 + 1));
    let log = serving.join().unwrap();
    let addresses: Vec<u64> = log
        .iter()
        .map(|p| (p.address - fixture.start) / PAGE_SIZE)
        .collect();
    // While recording, each fault brings in the touched page alone: the log
    // is the touch order, 30 and 2, then the test's own pass over the rest.
    let rest: Vec<u64> = (0..PAGES).filter(|p| ![30, 2].contains(p)).collect();
    assert_eq!(&addresses[..2], &[30, 2]);
    assert_eq!(&addresses[2..], &rest[..]);
    assert!(
        log.iter()
            .all(|p| p.store_offset == p.address - fixture.start)
    );
}

#[test]
fn pages_the_image_never_stored_are_mapped_as_zeros_ahead() {
    crate::test_support::require_root!();
    let fixture = Fixture::with_stored_pages(16);
    let crc = manifest_crc(&fixture.dir).unwrap();
    let pages = [
        WorkingSetPage::not_stored(fixture.start + 20 * PAGE_SIZE),
        fixture.page(3),
    ];
    WorkingSet::write(&fixture.dir, crc, &of_root(&pages), fixture.image.pages()).unwrap();
    let set = WorkingSet::open(&fixture.dir, crc).unwrap();
    let mut pager = fixture.pager();
    // Page 3, and page 20 with the never-stored pages 4 on each side.
    assert_eq!(pager.prefetch_set(set.pages_of(0)).unwrap(), 1 + 9);
    // Those pages are mapped now: reading them needs no pager.
    let mut resident = [0u8; PAGES as usize];
    // SAFETY: mincore writes one byte a page of our own mapping into `resident`.
    let rc = unsafe {
        libc::mincore(
            fixture.area,
            (PAGES * PAGE_SIZE) as usize,
            resident.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0);
    assert_eq!(resident[3] & 1, 1, "the stored page is in");
    for (page, &state) in resident.iter().enumerate().take(25).skip(16) {
        assert_eq!(state & 1, 1, "never-stored page {page} is mapped");
    }
    assert_eq!(resident[15] & 1, 0, "a stored page outside the set is not");
    assert_eq!(resident[25] & 1, 0, "nor a page further away");
    // SAFETY: page 20 is mapped (checked above).
    let byte = unsafe { *(fixture.area.cast::<u8>()).add((20 * PAGE_SIZE) as usize) };
    assert_eq!(byte, 0);
    let serving = std::thread::spawn(move || pager.run_until_filled().unwrap());
    let bytes = fixture.first_bytes();
    serving.join().unwrap();
    for (page, &byte) in bytes.iter().enumerate() {
        let expected = if page < 16 { page as u8 + 1 } else { 0 };
        assert_eq!(byte, expected, "page {page}");
    }
}

#[test]
fn a_prefetched_wake_logs_the_pages_its_set_lacked() {
    crate::test_support::require_root!();
    let fixture = Fixture::with_stored_pages(16);
    let crc = manifest_crc(&fixture.dir).unwrap();
    WorkingSet::write(
        &fixture.dir,
        crc,
        &of_root(&[fixture.page(3)]),
        fixture.image.pages(),
    )
    .unwrap();
    let set = WorkingSet::open(&fixture.dir, crc).unwrap();
    let mut pager = fixture.pager();
    pager.prefetch_set(set.pages_of(0)).unwrap();
    // The fill waits for the window's end: every touch below faults.
    pager.log_faults(Duration::from_secs(60));
    let serving = std::thread::spawn(move || {
        pager.run_until_filled().unwrap();
        pager.take_fault_log()
    });
    let touch = |page: u64| {
        // SAFETY: reading inside our own mapping, served by the pager.
        unsafe { *(fixture.area.cast::<u8>()).add((page * PAGE_SIZE) as usize) }
    };
    assert_eq!(touch(3), 4, "prefetched");
    assert_eq!(touch(9), 10, "faulted, and served alone");
    assert_eq!(touch(10), 11, "faulted too");
    assert_eq!(touch(28), 0, "never stored");
    let bytes = fixture.first_bytes();
    let log = serving.join().unwrap();
    for (page, &byte) in bytes.iter().enumerate() {
        let expected = if page < 16 { page as u8 + 1 } else { 0 };
        assert_eq!(byte, expected, "page {page}");
    }
    assert_eq!(
        log[..3],
        [
            fixture.page(9),
            fixture.page(10),
            WorkingSetPage::not_stored(fixture.start + 28 * PAGE_SIZE)
        ],
        "every page touched that the set lacked, page 10 included"
    );
    let extended = set.extended_by(&of_root(&log)).unwrap();
    assert_eq!(extended[&0][..4], [fixture.page(3), log[0], log[1], log[2]]);
}

/// The pages `pages` of the fixture as a working set, and the pager's
/// copy of them planned (with their runs still to verify).
fn planned(fixture: &Fixture, pages: &[u64]) -> (Pager, super::pager::PlannedCopy) {
    let crc = manifest_crc(&fixture.dir).unwrap();
    let pages: Vec<WorkingSetPage> = pages.iter().map(|&page| fixture.page(page)).collect();
    WorkingSet::write(&fixture.dir, crc, &of_root(&pages), fixture.image.pages()).unwrap();
    let set = WorkingSet::open(&fixture.dir, crc).unwrap();
    let pager = fixture.pager();
    let copy = pager.plan_set(set.pages_of(0));
    (pager, copy)
}

/// Runs `help_then` on a thread of its own; the receiver hears from the
/// thread that called `then`, if any did.
fn help_on_a_thread(
    copy: super::pager::PlannedCopy,
) -> std::sync::mpsc::Receiver<std::thread::ThreadId> {
    let (done, called) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        copy.help_then(Box::new(move || {
            let _ = done.send(std::thread::current().id());
        }))
    });
    called
}

#[test]
fn a_helper_arriving_after_the_copy_is_finished_continues_at_once() {
    crate::test_support::require_root!();
    let fixture = Fixture::new();
    let (mut pager, copy) = planned(&fixture, &[1, 2, 9]);
    assert_eq!(pager.finish_planned(&copy).unwrap(), 3);
    // The daemon's wake thread may get to the copy only now.
    let called = help_on_a_thread(copy);
    assert!(
        called.recv_timeout(Duration::from_secs(10)).is_ok(),
        "the late helper must not wait for outcomes already taken"
    );
}

#[test]
fn the_thread_that_copies_the_last_span_continues() {
    crate::test_support::require_root!();
    let fixture = Fixture::new();
    let (mut pager, copy) = planned(&fixture, &[1, 2, 9, 20, 30]);
    // The helper comes first and, alone, copies everything.
    let called = help_on_a_thread(copy.clone());
    let caller = called.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_ne!(caller, std::thread::current().id());
    assert_eq!(pager.finish_planned(&copy).unwrap(), 5, "nothing retried");
    let bytes = fixture.first_bytes_of(&[1, 2, 9, 20, 30]);
    assert_eq!(bytes, [2, 3, 10, 21, 31]);
}

#[test]
fn a_trees_copies_are_all_in_before_it_continues() {
    crate::test_support::require_root!();
    // Two processes of a tree, each with its own mapping and pager.
    let (root, worker) = (Fixture::new(), Fixture::new());
    let (mut root_pager, mut worker_pager) = (root.pager(), worker.pager());
    let root_copy = root_pager.plan_set(&[root.page(1), root.page(9)]);
    let worker_copy = worker_pager.plan_set(&[worker.page(4), worker.page(20), worker.page(30)]);
    let (done, called) = std::sync::mpsc::channel();
    let copies = vec![root_copy.clone(), worker_copy.clone()];
    std::thread::spawn(move || {
        let steps = copies
            .into_iter()
            .map(|copy| (Some(copy), Box::new(|| {}) as super::WhenCopied))
            .chain(std::iter::once((
                None,
                Box::new(move || {
                    let _ = done.send(());
                }) as super::WhenCopied,
            )))
            .collect();
        super::help_each_then(steps)
    });
    called
        .recv_timeout(Duration::from_secs(10))
        .expect("the tree continues once every copy is done");
    assert_eq!(root.first_bytes_of(&[1, 9]), [2, 10]);
    assert_eq!(worker.first_bytes_of(&[4, 20, 30]), [5, 21, 31]);
    assert_eq!(root_pager.finish_planned(&root_copy).unwrap(), 2);
    assert_eq!(worker_pager.finish_planned(&worker_copy).unwrap(), 3);
}

#[test]
fn each_step_runs_once_its_own_copy_is_in_and_in_order() {
    crate::test_support::require_root!();
    // A worker let run before the root: each step's action runs once its
    // own pages are in, the worker's before the root's copy.
    let (root, worker) = (Fixture::new(), Fixture::new());
    let (mut root_pager, mut worker_pager) = (root.pager(), worker.pager());
    let worker_copy = worker_pager.plan_set(&[worker.page(4), worker.page(20)]);
    let root_copy = root_pager.plan_set(&[root.page(1), root.page(9)]);
    let (done, called) = std::sync::mpsc::channel();
    let worker_done = done.clone();
    let (worker_start, root_start) = (worker.start, root.start);
    let steps: Vec<(Option<super::PlannedCopy>, super::WhenCopied)> = vec![
        (
            Some(worker_copy.clone()),
            Box::new(move || {
                // SAFETY: the page was copied in by the step's copy.
                let byte = unsafe { *((worker_start + 4 * PAGE_SIZE) as *const u8) };
                let _ = worker_done.send(("worker", byte));
            }),
        ),
        (None, Box::new(|| {})),
        (
            Some(root_copy.clone()),
            Box::new(move || {
                // SAFETY: the page was copied in by the step's copy.
                let byte = unsafe { *((root_start + 9 * PAGE_SIZE) as *const u8) };
                let _ = done.send(("root", byte));
            }),
        ),
    ];
    std::thread::spawn(move || super::help_each_then(steps));
    let order: Vec<_> = (0..2)
        .map(|_| called.recv_timeout(Duration::from_secs(10)).unwrap())
        .collect();
    assert_eq!(order, [("worker", 5), ("root", 10)]);
    // The restore thread finds both copies done by the other thread, and
    // only waits for them.
    assert!(worker_copy.copied_whole() && root_copy.copied_whole());
    assert_eq!(worker_pager.finish_planned_behind(&worker_copy).unwrap(), 2);
    assert_eq!(root_pager.finish_planned(&root_copy).unwrap(), 2);
}

#[test]
fn pages_of_another_process_are_never_copied() {
    crate::test_support::require_root!();
    let (root, worker) = (Fixture::new(), Fixture::new());
    let mut root_pager = root.pager();
    // The worker's pages, stored or not, are at addresses outside the
    // root's registered ranges: nothing is copied, nor mapped as zeros.
    let foreign = [
        worker.page(3),
        worker.page(4),
        WorkingSetPage::not_stored(worker.start + 5 * PAGE_SIZE),
    ];
    assert_eq!(root_pager.prefetch_set(&foreign).unwrap(), 0);
    assert_eq!(root_pager.pending_pages(), PAGES as usize);
    assert_eq!(root_pager.stats().prefetched_pages, 0);
}
