//! Test fixture: memory of every kind filled with known patterns.
//!
//! `fixture-memory DIR [MIB]` fills heap memory (small allocations), a
//! private anonymous mapping with some pages never touched, a private file
//! mapping of `DIR/data.bin` with some pages modified, and a mapping made
//! PROT_NONE after being filled. With `MIB`, it also fills that many MiB of
//! anonymous memory (for throughput measurements). Then it writes
//! `DIR/ready` and waits; on SIGUSR1 it checks every byte and writes
//! `DIR/result`: `OK` or `FAIL: what differs`. On SIGUSR2 it rewrites one
//! page in every [`CHANGE_STRIDE`] of that memory with a new pattern (for
//! delta images) and writes `DIR/changed`: how many times it did so.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static CHECK: AtomicBool = AtomicBool::new(false);
static CHANGE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    CHECK.store(true, Ordering::SeqCst);
}

extern "C" fn on_usr2(_: libc::c_int) {
    CHANGE.store(true, Ordering::SeqCst);
}

const PAGE: usize = 4096;
const ANON_PAGES: usize = 1024;
const FILE_PAGES: usize = 16;
const HIDDEN_PAGES: usize = 4;
const HEAP_CHUNKS: usize = 64;
const HEAP_CHUNK: usize = 16 * 1024;
/// SIGUSR2 rewrites the first page of every this many of the `MIB` region.
const CHANGE_STRIDE: usize = 256;
const BIG_SEED: u64 = 4242;

/// The byte expected at `index` of a region seeded with `seed`.
fn pattern(seed: u64, index: usize) -> u8 {
    let x = (index as u64 / 8)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(seed);
    (x >> ((index % 8) * 8)) as u8 ^ (x >> 56) as u8
}

fn fill(region: &mut [u8], seed: u64) {
    for (i, byte) in region.iter_mut().enumerate() {
        *byte = pattern(seed, i);
    }
}

fn check(what: &str, region: &[u8], seed: u64) -> Result<(), String> {
    match region
        .iter()
        .enumerate()
        .find(|&(i, &b)| b != pattern(seed, i))
    {
        Some((i, &b)) => Err(format!(
            "{what}: byte {i} is {b:#x}, expected {:#x}",
            pattern(seed, i)
        )),
        None => Ok(()),
    }
}

/// The byte expected at `index` of the `MIB` region after `changes` SIGUSR2s.
fn big_pattern(changes: u64, index: usize) -> u8 {
    let changed = changes > 0 && (index / PAGE).is_multiple_of(CHANGE_STRIDE);
    pattern(
        if changed {
            BIG_SEED + changes
        } else {
            BIG_SEED
        },
        index,
    )
}

fn map(len: usize, prot: i32, flags: i32, fd: i32) -> &'static mut [u8] {
    // SAFETY: a fresh mapping of `len` bytes at an address the kernel picks;
    // it is never unmapped, so the 'static slice stays valid.
    unsafe {
        let addr = libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0);
        assert_ne!(addr, libc::MAP_FAILED, "mmap failed");
        std::slice::from_raw_parts_mut(addr.cast::<u8>(), len)
    }
}

/// A private anonymous mapping of `len` bytes that no other mapping can
/// merge with, whatever the kernel places beside it: a page with no access
/// and no commit charge (`MAP_NORESERVE`) on each side, so the checkpoint
/// finds it as one mapping of exactly `len` bytes.
fn map_apart(len: usize, prot: i32) -> &'static mut [u8] {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let whole = map(len + 2 * PAGE, libc::PROT_NONE, flags, -1);
    let inner = &mut whole[PAGE..PAGE + len];
    protect(inner, prot);
    // SAFETY: the inner part of a mapping never unmapped, as in `map`.
    unsafe { std::slice::from_raw_parts_mut(inner.as_mut_ptr(), len) }
}

fn protect(region: &mut [u8], prot: i32) {
    // SAFETY: the region is a whole mapping of ours, or part of one.
    let rc = unsafe { libc::mprotect(region.as_mut_ptr().cast(), region.len(), prot) };
    assert_eq!(rc, 0, "mprotect failed");
}

struct Memory {
    heap: Vec<Vec<u8>>,
    anon: &'static mut [u8],
    file: &'static mut [u8],
    file_original: Vec<u8>,
    hidden: &'static mut [u8],
    big: Option<&'static mut [u8]>,
    /// SIGUSR2s handled so far.
    changes: u64,
}

fn setup(dir: &Path, big_mib: usize) -> Memory {
    let heap: Vec<Vec<u8>> = (0..HEAP_CHUNKS)
        .map(|i| {
            let mut chunk = vec![0u8; HEAP_CHUNK];
            fill(&mut chunk, 100 + i as u64);
            chunk
        })
        .collect();

    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let private_anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    let anon = map_apart(ANON_PAGES * PAGE, rw);
    // Every other 16-page block stays untouched: it must read back as zeros.
    for block in (0..ANON_PAGES / 16).step_by(2) {
        let range = block * 16 * PAGE..(block + 1) * 16 * PAGE;
        fill(&mut anon[range], 7 + block as u64);
    }

    let file_original: Vec<u8> = (0..FILE_PAGES * PAGE).map(|i| pattern(1, i)).collect();
    let path = dir.join("data.bin");
    fs::write(&path, &file_original).expect("write data.bin");
    let data = fs::File::open(&path).expect("open data.bin");
    let file = map(FILE_PAGES * PAGE, rw, libc::MAP_PRIVATE, data.as_raw_fd());
    for page in [1, 5, 6, 15] {
        fill(&mut file[page * PAGE..(page + 1) * PAGE], 50 + page as u64);
    }

    let hidden = map(HIDDEN_PAGES * PAGE, rw, private_anon, -1);
    fill(hidden, 99);
    protect(hidden, libc::PROT_NONE);

    let big = (big_mib > 0).then(|| {
        let big = map(big_mib << 20, rw, private_anon, -1);
        fill(big, BIG_SEED);
        big
    });
    Memory {
        heap,
        anon,
        file,
        file_original,
        hidden,
        big,
        changes: 0,
    }
}

/// Rewrites the changed pages of the `MIB` region for one more change.
fn change(memory: &mut Memory) {
    memory.changes += 1;
    let changes = memory.changes;
    if let Some(big) = &mut memory.big {
        for start in (0..big.len()).step_by(CHANGE_STRIDE * PAGE) {
            for (index, byte) in big[start..start + PAGE].iter_mut().enumerate() {
                *byte = big_pattern(changes, start + index);
            }
        }
    }
}

fn verify(memory: &mut Memory) -> Result<(), String> {
    for (i, chunk) in memory.heap.iter().enumerate() {
        check(&format!("heap chunk {i}"), chunk, 100 + i as u64)?;
    }
    for block in 0..ANON_PAGES / 16 {
        let range = block * 16 * PAGE..(block + 1) * 16 * PAGE;
        if block % 2 == 0 {
            check(
                &format!("anon block {block}"),
                &memory.anon[range],
                7 + block as u64,
            )?;
        } else if memory.anon[range].iter().any(|&b| b != 0) {
            return Err(format!("anon block {block} should be zero"));
        }
    }
    for page in 0..FILE_PAGES {
        let range = page * PAGE..(page + 1) * PAGE;
        if [1, 5, 6, 15].contains(&page) {
            check(
                &format!("file page {page}"),
                &memory.file[range],
                50 + page as u64,
            )?;
        } else if memory.file[range.clone()] != memory.file_original[range] {
            return Err(format!("file page {page} differs from the file"));
        }
    }
    protect(memory.hidden, libc::PROT_READ);
    check("PROT_NONE region", memory.hidden, 99)?;
    protect(memory.hidden, libc::PROT_NONE);
    if let Some(big) = &memory.big
        && let Some((i, &b)) = big
            .iter()
            .enumerate()
            .find(|&(i, &b)| b != big_pattern(memory.changes, i))
    {
        return Err(format!(
            "big region after {} changes: byte {i} is {b:#x}, expected {:#x}",
            memory.changes,
            big_pattern(memory.changes, i)
        ));
    }
    Ok(())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: fixture-memory DIR [MIB]"));
    let big_mib = args
        .next()
        .map_or(0, |s| s.parse().expect("MIB is a number"));
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t) };
    // SAFETY: likewise.
    unsafe { libc::signal(libc::SIGUSR2, on_usr2 as *const () as libc::sighandler_t) };
    let mut memory = setup(&dir, big_mib);
    publish(&dir, "ready", &std::process::id().to_string());
    loop {
        if CHANGE.swap(false, Ordering::SeqCst) {
            change(&mut memory);
            publish(&dir, "changed", &memory.changes.to_string());
        }
        if CHECK.swap(false, Ordering::SeqCst) {
            let result = match verify(&mut memory) {
                Ok(()) => "OK".to_owned(),
                Err(what) => format!("FAIL: {what}"),
            };
            publish(&dir, "result", &result);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Writes `DIR/name` whole or not at all (the tests poll for it).
fn publish(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!("{name}.tmp"));
    fs::write(&tmp, text).unwrap_or_else(|err| panic!("write {name}: {err}"));
    fs::rename(&tmp, dir.join(name)).unwrap_or_else(|err| panic!("rename {name}: {err}"));
}
