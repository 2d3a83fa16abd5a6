//! What a cold wake (a SYN for a service parked with its image only) does
//! on a second CPU while the restore thread builds the skeleton: load the
//! recorded working set and check the checksums of the page runs it needs,
//! and those of the pages the process wrote in its private file mappings.
//!
//! On the wake's critical path these cost about a millisecond for python's
//! http.server (900 pages), after a build of about five; done alongside
//! the build, the copy that follows it finds them checked. Reading the runs
//! also brings the image's pages into the page cache, should they have been
//! dropped, while the build still runs (docs/kernel-facts.md, Costs that
//! shaped the cold wake). Once the skeleton's memory is laid out, the
//! copy of the set starts there too, while its threads are still made.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use persist_common::image::{Image, PAGE_SIZE, PageRun, WorkingSet};

use crate::restore::{OnPager, Pager, PlannedCopy};

/// The working set of the image, loaded, the runs its stored pages come
/// from checked (the image's page store remembers those found sound).
pub(super) struct SetAhead {
    /// The set, for the image whose manifest has CRC `image_crc`.
    pub set: WorkingSet,
    /// The image's identity (its manifest's CRC).
    pub image_crc: u32,
}

/// What the thread loading the working set gave.
pub(super) type Loaded = std::thread::Result<Result<SetAhead, String>>;

/// A cold wake's working set, loaded and checked on a thread of its own
/// while the skeleton is built, and the copy of the root's pages started
/// as soon as its memory is laid out ([`ColdAhead::on_pager`]): the copy
/// then runs beside the rest of the prepare (its threads and their state,
/// the run state recorded) instead of after it.
pub(super) struct ColdAhead {
    loading: Mutex<Option<JoinHandle<Result<SetAhead, String>>>>,
    started: Mutex<Option<(Loaded, Option<PlannedCopy>)>>,
}

impl ColdAhead {
    /// Starts loading and checking the working set of `image`. `None` when
    /// no thread could be started (the caller does it all itself).
    pub(super) fn start(image: Arc<Image>) -> Option<Arc<Self>> {
        let loading = std::thread::Builder::new()
            .name("persist-cold".into())
            .spawn(move || load_and_check(&image))
            .ok()?;
        Some(Arc::new(Self {
            loading: Mutex::new(Some(loading)),
            started: Mutex::new(None),
        }))
    }

    /// The prepare's hook: once the root's memory is laid out, takes the set
    /// (waiting for its thread) and starts copying the root's pages of it
    /// on a thread of its own.
    pub(super) fn on_pager(self: &Arc<Self>) -> OnPager {
        let this = Arc::clone(self);
        OnPager(Box::new(move |pager| this.start_copy(pager)))
    }

    fn start_copy(&self, pager: &mut Pager) {
        let Some(loading) = self.loading.lock().expect("cold lock").take() else {
            return;
        };
        let loaded = loading.join();
        let copy = match &loaded {
            Ok(Ok(ahead)) => start_copy_of(ahead, pager),
            _ => None,
        };
        *self.started.lock().expect("cold lock") = Some((loaded, copy));
    }

    /// The loaded set, and the copy of the root's pages started into the
    /// skeleton, if the prepare got that far for a single process.
    pub(super) fn finish(&self) -> (Loaded, Option<PlannedCopy>) {
        if let Some(started) = self.started.lock().expect("cold lock").take() {
            return started;
        }
        match self.loading.lock().expect("cold lock").take() {
            Some(loading) => (loading.join(), None),
            None => (Ok(Err("the working set was taken already".into())), None),
        }
    }
}

/// Plans the copy of the root's pages of `ahead` and starts it on a thread
/// that copies spans until none is left unclaimed; the resume finishes it.
/// `None` when the set names none of its pages, or a run fails its check:
/// the wake then plans its copies again, and reports the damage.
fn start_copy_of(ahead: &SetAhead, pager: &mut Pager) -> Option<PlannedCopy> {
    let pages = ahead.set.pages_of(0);
    if pages.is_empty() {
        return None;
    }
    pager.verify_ahead(pages).ok()?;
    pager.zero_ahead(pages);
    let copy = pager.plan_set(pages);
    let helping = copy.clone();
    // Without the thread, the resume copies it all, as for a skeleton.
    let _ = std::thread::Builder::new()
        .name("persist-copy".into())
        .spawn(move || helping.help());
    Some(copy)
}

/// Loads the working set of `image` and checks the runs its pages come from.
/// The page store remembers the runs found sound (`PageStore::check`), and
/// the pager's and the file pages' reads do not check those again; one
/// that fails is checked again before it is copied, and fails the wake then.
fn load_and_check(image: &Image) -> Result<SetAhead, String> {
    // First, as the file pages are written first, once the process's
    // memory is laid out: the writes then find their runs checked. One
    // that fails is checked again by its write, which reports it.
    let _ = crate::restore::check_file_page_runs(image);
    let dir = image.dir();
    let image_crc = image.crc();
    let set = WorkingSet::open(dir, image_crc).map_err(|err| err.to_string())?;
    let manifest = image.manifest();
    // Every run of every process, by where it starts in the store.
    let mut runs: Vec<PageRun> = manifest
        .every_mapping()
        .flat_map(|mapping| mapping.pages.iter().copied())
        .collect();
    runs.sort_unstable_by_key(|run| run.store_offset);
    runs.dedup();
    let mut needed: Vec<PageRun> = set
        .processes()
        .values()
        .flatten()
        .filter(|page| page.is_stored())
        .filter_map(|page| run_holding(&runs, page.store_offset))
        .collect();
    needed.sort_unstable_by_key(|run| run.store_offset);
    needed.dedup();
    for run in &needed {
        let _ = image.pages().check(run);
    }
    Ok(SetAhead { set, image_crc })
}

/// The run of `runs` (sorted by store offset) holding the page stored at
/// `store_offset`.
fn run_holding(runs: &[PageRun], store_offset: u64) -> Option<PageRun> {
    let after = runs.partition_point(|run| run.store_offset <= store_offset);
    let run = *runs.get(after.checked_sub(1)?)?;
    (store_offset < run.store_offset + run.count * PAGE_SIZE).then_some(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(store_offset: u64, count: u64) -> PageRun {
        PageRun {
            first_page: 0,
            count,
            store_offset,
            crc32c: 0,
        }
    }

    #[test]
    fn finds_the_run_holding_a_stored_page() {
        let runs = [run(0, 2), run(2 * PAGE_SIZE, 1), run(5 * PAGE_SIZE, 3)];
        assert_eq!(run_holding(&runs, 0), Some(runs[0]));
        assert_eq!(run_holding(&runs, PAGE_SIZE), Some(runs[0]));
        assert_eq!(run_holding(&runs, 2 * PAGE_SIZE), Some(runs[1]));
        assert_eq!(run_holding(&runs, 3 * PAGE_SIZE), None, "between runs");
        assert_eq!(run_holding(&runs, 7 * PAGE_SIZE), Some(runs[2]));
        assert_eq!(run_holding(&runs, 8 * PAGE_SIZE), None, "past the last");
        assert_eq!(run_holding(&[], 0), None);
    }
}
