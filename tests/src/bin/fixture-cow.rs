//! Test fixture: a parent and its children sharing private memory
//! copy-on-write, as a pre-fork server's master and workers do.
//!
//! `fixture-cow DIR [CHILDREN [grandchild]]` (one child, or two; with
//! `grandchild` the first child forks one of its own) maps, in the parent:
//! - a private anonymous region of [`ANON_PAGES`] pages between two
//!   `PROT_NONE` guard pages (so that the kernel merges it with no other
//!   mapping and /proc/PID/smaps shows it alone), pages `0..FILLED` written
//!   with the [`BEFORE`] pattern, the rest never touched;
//! - `DIR/cow-file`, [`FILE_PAGES`] pages of the [`FILE_ORIGINAL`] pattern
//!   (written and synced, so that its page cache is clean), mapped
//!   `MAP_PRIVATE` readable and writable, pages 0 and 1 written with the
//!   [`FILE_BEFORE`] pattern (private copies: the file keeps its own);
//!
//! then forks its children. After the forks:
//! - the parent writes anonymous page 1 (right after the first fork: the
//!   second child has the new page), anonymous page 50 (never touched
//!   before) and file page 2 with [`PARENT_AFTER`];
//! - the first child writes anonymous page 2 and file page 1 with
//!   [`FIRST_CHILD`];
//! - the second child, if any, writes anonymous page 3 with
//!   [`SECOND_CHILD`], and drops (`MADV_DONTNEED`) anonymous page 47 (zeros
//!   then) and file page 0 (the file's page then);
//! - the grandchild, if any (forked by the first child once it wrote its
//!   pages), writes anonymous page 4 and file page 2 with [`GRANDCHILD`],
//!   and its parent then writes anonymous page 5 with [`FIRST_CHILD`].
//!
//! Every other page stays shared as the fork left it. Once the children
//! wrote theirs (they say so through a pipe), the parent writes
//! `DIR/ready`: `PARENT ANON FILE CHILD... [GRANDCHILD]` (pids, and the two
//! regions' addresses in hexadecimal as /proc/PID/smaps shows them).
//!
//! On SIGUSR1 each process checks every byte of both regions against what
//! it must hold (see [`expected_anon`], [`expected_file`]; the parent also
//! that the file itself still holds its original pages), that its heap
//! grows and holds what it puts there, and writes
//! `DIR/parent-result`, `DIR/child-result` (the first child),
//! `DIR/child2-result` (the second) or `DIR/grandchild-result`: `OK` or
//! `FAIL: what differs`.

use std::fs;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const PAGE: usize = 4096;
/// Pages of the anonymous region.
const ANON_PAGES: usize = 64;
/// Anonymous pages written before the forks.
const FILLED: usize = 48;
/// The anonymous page the parent writes after the forks, never touched
/// before.
const PARENT_NEW_PAGE: usize = 50;
/// The anonymous page the second child drops after the fork.
const DROPPED_ANON_PAGE: usize = 47;
/// Blocks of 1000 bytes each check allocates (4 MB: the heap grows).
const HEAP_BLOCKS: usize = 4000;
/// Pages of the mapped file.
const FILE_PAGES: usize = 6;

/// Pattern tags: pages written with different tags differ in every byte.
/// Anonymous pages `0..FILLED`, before the forks.
const BEFORE: u8 = 0x10;
/// The file's own contents.
const FILE_ORIGINAL: u8 = 0x33;
/// File pages 0 and 1, written through the private mapping before the forks.
const FILE_BEFORE: u8 = 0x44;
/// The parent's writes after the forks.
const PARENT_AFTER: u8 = 0x5a;
/// The first child's writes.
const FIRST_CHILD: u8 = 0xa5;
/// The second child's writes.
const SECOND_CHILD: u8 = 0xc3;
/// The grandchild's writes.
const GRANDCHILD: u8 = 0x6b;
/// The page the first child writes once it forked the grandchild.
const FIRST_CHILD_LATER_PAGE: usize = 5;

static CHECK: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    CHECK.store(true, Ordering::SeqCst);
}

/// Which process of the tree this is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Parent,
    /// The first child (0) or the second (1).
    Child(usize),
    /// The first child's child.
    Grandchild,
}

impl Role {
    fn result_file(self) -> String {
        match self {
            Role::Parent => "parent-result".into(),
            Role::Child(0) => "child-result".into(),
            Role::Child(n) => format!("child{}-result", n + 1),
            Role::Grandchild => "grandchild-result".into(),
        }
    }
}

/// Byte `index` of a page `page` written with `tag`.
fn pattern(tag: u8, page: usize, index: usize) -> u8 {
    ((page * 131 + index) % 251) as u8 ^ tag
}

fn fill(memory: &mut [u8], page: usize, tag: u8) {
    for (index, byte) in memory[page * PAGE..(page + 1) * PAGE]
        .iter_mut()
        .enumerate()
    {
        *byte = pattern(tag, page, index);
    }
}

/// Drops page `page` of `memory` (`MADV_DONTNEED`).
fn drop_page(memory: &mut [u8], page: usize) {
    // SAFETY: the page is ours; nothing refers into it across the call.
    let rc = unsafe {
        libc::madvise(
            memory[page * PAGE..].as_mut_ptr().cast(),
            PAGE,
            libc::MADV_DONTNEED,
        )
    };
    assert_eq!(rc, 0, "madvise: {}", std::io::Error::last_os_error());
}

/// The tag anonymous page `page` of `role` must hold; none for zeros.
/// `grandchild`: the first child forked one.
fn expected_anon(role: Role, grandchild: bool, page: usize) -> Option<u8> {
    match (role, page) {
        (Role::Child(0), FIRST_CHILD_LATER_PAGE) if grandchild => Some(FIRST_CHILD),
        (Role::Grandchild, 4) => Some(GRANDCHILD),
        (Role::Grandchild, 2) => Some(FIRST_CHILD),
        (Role::Parent | Role::Child(1), 1) => Some(PARENT_AFTER),
        (Role::Parent, PARENT_NEW_PAGE) => Some(PARENT_AFTER),
        (Role::Child(0), 2) => Some(FIRST_CHILD),
        (Role::Child(1), 3) => Some(SECOND_CHILD),
        (Role::Child(1), DROPPED_ANON_PAGE) => None,
        (_, page) if page < FILLED => Some(BEFORE),
        _ => None,
    }
}

/// The tag file page `page` of `role` must hold.
fn expected_file(role: Role, page: usize) -> u8 {
    match (role, page) {
        (Role::Parent, 2) => PARENT_AFTER,
        (Role::Child(0) | Role::Grandchild, 1) => FIRST_CHILD,
        (Role::Grandchild, 2) => GRANDCHILD,
        (Role::Child(1), 0) => FILE_ORIGINAL,
        (_, 0 | 1) => FILE_BEFORE,
        _ => FILE_ORIGINAL,
    }
}

/// `len` bytes of fresh memory mapped with `flags`, leaked for the
/// process's life.
fn map(len: usize, flags: libc::c_int, fd: libc::c_int) -> &'static mut [u8] {
    // SAFETY: a new mapping the kernel places; nothing else refers to it.
    unsafe {
        let address = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        );
        assert_ne!(
            address,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        std::slice::from_raw_parts_mut(address.cast::<u8>(), len)
    }
}

/// The anonymous region, between two guard pages.
fn anonymous_region() -> &'static mut [u8] {
    let whole = map(
        (ANON_PAGES + 2) * PAGE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
    );
    let (first, rest) = whole.split_at_mut(PAGE);
    let (region, last) = rest.split_at_mut(ANON_PAGES * PAGE);
    for guard in [first, last] {
        // SAFETY: the guard page is ours and nothing reads it.
        let rc = unsafe { libc::mprotect(guard.as_mut_ptr().cast(), PAGE, libc::PROT_NONE) };
        assert_eq!(rc, 0, "mprotect: {}", std::io::Error::last_os_error());
    }
    region
}

/// `DIR/cow-file` made with its original pages and mapped private.
fn file_region(dir: &Path) -> &'static mut [u8] {
    let path = dir.join("cow-file");
    let mut contents = vec![0u8; FILE_PAGES * PAGE];
    for page in 0..FILE_PAGES {
        fill(&mut contents, page, FILE_ORIGINAL);
    }
    let mut file = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .expect("create cow-file");
    file.write_all(&contents).expect("write cow-file");
    // Clean page cache: smaps then counts none of its pages dirty.
    file.sync_all().expect("sync cow-file");
    // The mapping keeps the file; the descriptor goes when `file` drops.
    map(FILE_PAGES * PAGE, libc::MAP_PRIVATE, file.as_raw_fd())
}

/// The first page of `memory` that differs from what `expected` says, with
/// the first byte that does.
fn first_difference(
    memory: &[u8],
    what: &str,
    expected: impl Fn(usize) -> Option<u8>,
) -> Result<(), String> {
    for (page, bytes) in memory.chunks(PAGE).enumerate() {
        let tag = expected(page);
        for (index, &byte) in bytes.iter().enumerate() {
            let want = tag.map_or(0, |tag| pattern(tag, page, index));
            if byte != want {
                return Err(format!(
                    "page {page} of {what} differs: byte {index} is {byte:#04x}, not {want:#04x}"
                ));
            }
        }
    }
    Ok(())
}

fn check(role: Role, grandchild: bool, dir: &Path, anon: &[u8], file: &[u8]) -> Result<(), String> {
    first_difference(anon, "the anonymous region", |page| {
        expected_anon(role, grandchild, page)
    })?;
    first_difference(file, "the private file mapping", |page| {
        Some(expected_file(role, page))
    })?;
    // The heap, which the processes share too (the allocations before the
    // forks), grows past what was restored, and holds what is put there.
    let grown: Vec<Vec<u8>> = (0..HEAP_BLOCKS).map(|n| vec![n as u8; 1000]).collect();
    if let Some(n) = (0..HEAP_BLOCKS).find(|&n| grown[n].iter().any(|&b| b != n as u8)) {
        return Err(format!("heap block {n} of {HEAP_BLOCKS} differs"));
    }
    drop(grown);
    if role == Role::Parent {
        let on_disk =
            fs::read(dir.join("cow-file")).map_err(|e| format!("reading cow-file: {e}"))?;
        if on_disk.len() != FILE_PAGES * PAGE {
            return Err(format!("cow-file is {} bytes", on_disk.len()));
        }
        first_difference(&on_disk, "cow-file itself", |_| Some(FILE_ORIGINAL))?;
    }
    Ok(())
}

fn write_atomically(dir: &Path, name: &str, text: &str) {
    let temp = dir.join(format!("{name}.tmp"));
    fs::write(&temp, text).expect("write");
    fs::rename(&temp, dir.join(name)).expect("rename");
}

/// Answers SIGUSR1s forever.
fn serve(role: Role, grandchild: bool, dir: &Path, anon: &[u8], file: &[u8]) -> ! {
    loop {
        std::thread::sleep(Duration::from_millis(5));
        if CHECK.swap(false, Ordering::SeqCst) {
            let result = match check(role, grandchild, dir, anon, file) {
                Ok(()) => "OK".to_owned(),
                Err(what) => format!("FAIL: {what}"),
            };
            write_atomically(dir, &role.result_file(), &result);
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: fixture-cow DIR [CHILDREN [grandchild]]";
    let dir = PathBuf::from(args.next().expect(usage));
    let dir = dir.canonicalize().expect("canonical DIR");
    let children: usize = args.next().map_or(1, |n| n.parse().expect(usage));
    assert!((1..=2).contains(&children), "one child or two");
    let grandchild = match args.next().as_deref() {
        None => false,
        Some("grandchild") => true,
        Some(_) => panic!("{usage}"),
    };
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        assert_ne!(
            libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t),
            libc::SIG_ERR
        );
    }
    let anon = anonymous_region();
    for page in 0..FILLED {
        fill(anon, page, BEFORE);
    }
    let file = file_region(&dir);
    fill(file, 0, FILE_BEFORE);
    fill(file, 1, FILE_BEFORE);

    // Each descendant writes a byte here once its own pages are written.
    let (done_read, done_write) = nix::unistd::pipe().expect("pipe");
    let mut pids = Vec::new();
    for index in 0..children {
        // SAFETY: the fixture has a single thread, so the child may run
        // Rust code freely.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let role = Role::Child(index);
            if index == 0 {
                fill(anon, 2, FIRST_CHILD);
                fill(file, 1, FIRST_CHILD);
                if grandchild {
                    let pid = fork_grandchild(&dir, anon, file, &done_write);
                    fill(anon, FIRST_CHILD_LATER_PAGE, FIRST_CHILD);
                    write_atomically(&dir, "grandchild", &pid.to_string());
                }
            } else {
                fill(anon, 3, SECOND_CHILD);
                // Dropped: zeros here, the file's own page there, where the
                // others keep what was written before the fork.
                drop_page(anon, DROPPED_ANON_PAGE);
                drop_page(file, 0);
            }
            nix::unistd::write(&done_write, &[1]).expect("write the pipe");
            // Nothing but the memory is shared: the pipe goes. The owners
            // are never dropped, as serve never returns.
            for fd in [done_read.as_raw_fd(), done_write.as_raw_fd()] {
                nix::unistd::close(fd).expect("close the pipe");
            }
            serve(role, grandchild, &dir, anon, file);
        }
        pids.push(pid);
        if index == 0 {
            // Before any second fork: the second child then shares the
            // new page with the parent, and no page is shared by the
            // children alone (the parent's copy differing), which a
            // restore would not share again (docs/process-trees.md).
            fill(anon, 1, PARENT_AFTER);
        }
    }
    fill(anon, PARENT_NEW_PAGE, PARENT_AFTER);
    fill(file, 2, PARENT_AFTER);
    for _ in 0..children + usize::from(grandchild) {
        let mut byte = [0u8];
        let read = nix::unistd::read(&done_read, &mut byte).expect("read the pipe");
        assert_eq!(read, 1, "a child ended before writing its pages");
    }
    drop((done_read, done_write));
    let mut children: Vec<String> = pids.iter().map(i32::to_string).collect();
    if grandchild {
        children.push(fs::read_to_string(dir.join("grandchild")).expect("the grandchild's pid"));
    }
    write_atomically(
        &dir,
        "ready",
        &format!(
            "{} {:x} {:x} {}",
            std::process::id(),
            anon.as_ptr() as usize,
            file.as_ptr() as usize,
            children.join(" ")
        ),
    );
    serve(Role::Parent, grandchild, &dir, anon, file);
}

/// Forks the grandchild from the first child; its pid.
fn fork_grandchild(
    dir: &Path,
    anon: &mut [u8],
    file: &mut [u8],
    done: &std::os::fd::OwnedFd,
) -> i32 {
    // SAFETY: the fixture has a single thread, so the child may run Rust
    // code freely.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        fill(anon, 4, GRANDCHILD);
        fill(file, 2, GRANDCHILD);
        nix::unistd::write(done, &[1]).expect("write the pipe");
        // SAFETY: closes every descriptor above stderr (the pipe's ends);
        // their owners are never dropped, as serve never returns.
        unsafe { libc::close_range(3, u32::MAX, 0) };
        serve(Role::Grandchild, true, dir, anon, file);
    }
    pid
}
