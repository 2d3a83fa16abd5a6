//! Test fixture: a file mapped privately, some of its pages written.
//!
//! `fixture-mapped-files DIR` writes `DIR/data` (16 pages, page `i` filled
//! with byte `i`) and maps it twice, privately: pages 0..8 read-write, of
//! which it writes pages 1, 4 and 5; pages 8..16 read-write too, of which it
//! writes page 9 before making that mapping read-only (as the dynamic loader
//! does with relro). It records the two lines of /proc/self/maps and writes
//! `DIR/ready`. On SIGUSR1 it checks that the lines are the same, every page
//! holds what it wrote or the file's byte, and that a written page dropped
//! with `MADV_DONTNEED` reads back as the file's (a file mapping, not
//! anonymous memory, which would read zeros), writes it again, checks that
//! the file itself is unchanged, and writes `DIR/result`: `OK` or
//! `FAIL: what differs`.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Incremented by each SIGUSR1.
static ROUND: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_usr1(_: libc::c_int) {
    ROUND.fetch_add(1, Ordering::SeqCst);
}

const PAGE: usize = 4096;
const PAGES: usize = 16;
/// Pages written in the first mapping, by index in the file.
const WRITTEN: [usize; 3] = [1, 4, 5];
/// The page written in the second mapping, by index in the file.
const WRITTEN_RELRO: usize = 9;

/// What the fixture writes over page `page` of the file.
fn written_byte(page: usize) -> u8 {
    0xa0 + page as u8
}

fn expected_byte(page: usize) -> u8 {
    if WRITTEN.contains(&page) || page == WRITTEN_RELRO {
        written_byte(page)
    } else {
        page as u8
    }
}

/// Maps `pages` pages of `file` from page `first` on, privately, read-write.
fn map_private(file: &fs::File, first: usize, pages: usize) -> *mut u8 {
    // SAFETY: a fresh private mapping of an open file, at an address the
    // kernel picks; the fixture never unmaps it.
    let address = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            (first * PAGE) as libc::off_t,
        )
    };
    assert_ne!(
        address,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    address.cast()
}

/// The line of /proc/self/maps of the mapping starting at `address`.
fn maps_line(address: *mut u8) -> Result<String, String> {
    let maps = fs::read_to_string("/proc/self/maps").map_err(|e| format!("maps: {e}"))?;
    let start = format!("{:x}-", address as usize);
    maps.lines()
        .find(|line| line.starts_with(&start))
        .map(str::to_owned)
        .ok_or_else(|| format!("no mapping starts at {start} in /proc/self/maps:\n{maps}"))
}

/// Page `page` of the file, as mapped at `base` (which maps the file from
/// page `first` on).
fn page_at(base: *mut u8, first: usize, page: usize) -> &'static mut [u8] {
    // SAFETY: `page` lies in the mapping at `base`, which is never unmapped;
    // the fixture is single-threaded and holds one slice at a time.
    unsafe { std::slice::from_raw_parts_mut(base.add((page - first) * PAGE), PAGE) }
}

fn check_page(base: *mut u8, first: usize, page: usize) -> Result<(), String> {
    let expected = expected_byte(page);
    match page_at(base, first, page)
        .iter()
        .position(|&b| b != expected)
    {
        None => Ok(()),
        Some(at) => Err(format!(
            "page {page} holds {:#x} at byte {at}, expected {expected:#x}",
            page_at(base, first, page)[at]
        )),
    }
}

fn file_contents() -> Vec<u8> {
    (0..PAGES).flat_map(|page| [page as u8; PAGE]).collect()
}

fn check(dir: &Path, low: *mut u8, high: *mut u8, recorded: &[String; 2]) -> Result<(), String> {
    for (address, line) in [low, high].into_iter().zip(recorded) {
        let now = maps_line(address)?;
        if &now != line {
            return Err(format!("maps line was\n{line}\nis now\n{now}"));
        }
    }
    for page in 0..PAGES / 2 {
        check_page(low, 0, page)?;
    }
    for page in PAGES / 2..PAGES {
        check_page(high, PAGES / 2, page)?;
    }
    if fs::read(dir.join("data")).map_err(|e| format!("reading data: {e}"))? != file_contents() {
        return Err("the pages written privately reached the file".into());
    }
    // A written page dropped reads back as the file's page.
    let dropped = WRITTEN[0];
    let slice = page_at(low, 0, dropped);
    // SAFETY: one page of our own private mapping; its contents are
    // written again below.
    let rc = unsafe { libc::madvise(slice.as_mut_ptr().cast(), PAGE, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(format!("madvise: {}", std::io::Error::last_os_error()));
    }
    let after = slice[0];
    slice.fill(written_byte(dropped));
    if after != dropped as u8 {
        return Err(format!(
            "page {dropped} dropped reads {after:#x}, not the file's {dropped:#x}: \
             not a mapping of the file"
        ));
    }
    Ok(())
}

fn write_atomically(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!("{name}.tmp"));
    fs::write(&tmp, text).expect("write");
    fs::rename(&tmp, dir.join(name)).expect("rename");
}

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: fixture-mapped-files DIR"),
    );
    // SAFETY: the handler only touches an atomic.
    unsafe {
        libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
    }
    fs::write(dir.join("data"), file_contents()).expect("write the data file");
    let file = fs::File::open(dir.join("data")).expect("open the data file");
    let low = map_private(&file, 0, PAGES / 2);
    let high = map_private(&file, PAGES / 2, PAGES / 2);
    drop(file);
    for page in WRITTEN {
        page_at(low, 0, page).fill(written_byte(page));
    }
    page_at(high, PAGES / 2, WRITTEN_RELRO).fill(written_byte(WRITTEN_RELRO));
    // SAFETY: our own mapping, made read-only.
    let rc = unsafe { libc::mprotect(high.cast(), PAGES / 2 * PAGE, libc::PROT_READ) };
    assert_eq!(rc, 0, "mprotect: {}", std::io::Error::last_os_error());
    let recorded = [
        maps_line(low).expect("the first mapping"),
        maps_line(high).expect("the second mapping"),
    ];
    write_atomically(&dir, "ready", &recorded.join("\n"));

    let mut seen_round = 0;
    loop {
        std::thread::sleep(Duration::from_millis(2));
        let round = ROUND.load(Ordering::SeqCst);
        if round == seen_round {
            continue;
        }
        seen_round = round;
        let text = match check(&dir, low, high, &recorded) {
            Ok(()) => "OK".to_owned(),
            Err(what) => format!("FAIL: {what}"),
        };
        write_atomically(&dir, "result", &text);
    }
}
