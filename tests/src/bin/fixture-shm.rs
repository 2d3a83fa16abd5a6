//! Test fixture: a parent and a child sharing System V and POSIX shared
//! memory, as PostgreSQL's postmaster and its helpers do.
//!
//! `fixture-shm DIR KEY` makes the parent a child subreaper, creates a
//! System V segment with key KEY of [`SYSV_SIZE`] bytes (mode 0640) and a
//! POSIX shared memory object `/persist-fixture-PID` of [`POSIX_SIZE`]
//! bytes (mode 0640) under /dev/shm, maps both shared and fills them with
//! [`pattern`] (byte 0, a counter, is 0), then forks a child that sets its
//! parent-death signal to SIGUSR2. It writes `DIR/ready`:
//! `PARENT CHILD SHMID /dev/shm/NAME`.
//!
//! On SIGUSR1 the child checks both objects (contents, and what the kernel
//! says of them: key, size, mode, two attachments; size and mode of the
//! file, opened again by name, which must be the object it maps) and its
//! parent-death signal, adds one to byte 0 of both and writes
//! `DIR/child-result`: `OK N` (N the counter) or `FAIL: what differs`. On
//! SIGUSR1 the parent checks that it sees the child's counter in both and
//! that it is still a child subreaper, and writes `DIR/parent-result`: `OK N`
//! or `FAIL: ...`.

use std::ffi::CString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Bytes of the System V segment (not a whole number of pages).
const SYSV_SIZE: usize = 10_000;
/// Bytes of the POSIX object (not a whole number of pages).
const POSIX_SIZE: usize = 5_000;
/// The child's parent-death signal.
const PDEATH_SIGNAL: i32 = libc::SIGUSR2;

static CHECK: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    CHECK.store(true, Ordering::SeqCst);
}

/// What byte `index` holds (byte 0 is the counter).
fn pattern(index: usize) -> u8 {
    (index * 7 % 251) as u8 + 1
}

/// The memory at `address`, `len` bytes.
fn bytes(address: *mut libc::c_void, len: usize) -> &'static mut [u8] {
    // SAFETY: `address` maps at least `len` bytes, shared, for the
    // process's life.
    unsafe { std::slice::from_raw_parts_mut(address.cast::<u8>(), len) }
}

fn fill(memory: &mut [u8]) {
    for (index, byte) in memory.iter_mut().enumerate() {
        *byte = pattern(index);
    }
    memory[0] = 0;
}

/// The first byte (after the counter) that is not the pattern, if any.
fn first_wrong(memory: &[u8]) -> Option<usize> {
    (1..memory.len()).find(|&index| memory[index] != pattern(index))
}

fn shm_stat(shmid: i32) -> Result<libc::shmid_ds, String> {
    // SAFETY: shmid_ds is plain data; IPC_STAT fills it.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes into the valid struct we pass.
    if unsafe { libc::shmctl(shmid, libc::IPC_STAT, &mut ds) } < 0 {
        return Err(format!(
            "shmctl({shmid}, IPC_STAT): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(ds)
}

struct Objects {
    key: i32,
    shmid: i32,
    sysv: &'static mut [u8],
    name: CString,
    posix: &'static mut [u8],
}

impl Objects {
    fn create(key: i32) -> Self {
        // SAFETY: plain integers.
        let shmid =
            unsafe { libc::shmget(key, SYSV_SIZE, libc::IPC_CREAT | libc::IPC_EXCL | 0o640) };
        assert!(
            shmid >= 0,
            "shmget key {key:#x}: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: attaches the segment where the kernel chooses.
        let address = unsafe { libc::shmat(shmid, std::ptr::null(), 0) };
        assert_ne!(address as isize, -1, "shmat");
        let sysv = bytes(address, SYSV_SIZE);
        fill(sysv);

        let name = CString::new(format!("/persist-fixture-{}", std::process::id())).unwrap();
        // SAFETY: a valid NUL-terminated name.
        let fd = unsafe {
            libc::shm_open(
                name.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
                0o640,
            )
        };
        assert!(fd >= 0, "shm_open: {}", std::io::Error::last_os_error());
        // shm_open applies the umask.
        // SAFETY: fd is ours.
        unsafe {
            assert_eq!(libc::fchmod(fd, 0o640), 0, "fchmod");
            assert_eq!(libc::ftruncate(fd, POSIX_SIZE as i64), 0, "ftruncate");
        }
        // SAFETY: maps the object shared; kept for the process's life.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                POSIX_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(address, libc::MAP_FAILED, "mmap of the POSIX object");
        // SAFETY: fd is ours; the mapping keeps the object.
        unsafe { libc::close(fd) };
        let posix = bytes(address, POSIX_SIZE);
        fill(posix);
        Self {
            key,
            shmid,
            sysv,
            name,
            posix,
        }
    }

    fn path(&self) -> String {
        format!("/dev/shm{}", self.name.to_str().unwrap())
    }

    /// The child's check; the counter it wrote.
    fn child_check(&mut self) -> Result<u8, String> {
        if let Some(at) = first_wrong(self.sysv) {
            return Err(format!("System V segment byte {at} differs"));
        }
        if let Some(at) = first_wrong(self.posix) {
            return Err(format!("POSIX object byte {at} differs"));
        }
        let ds = shm_stat(self.shmid)?;
        let seen = (
            ds.shm_perm.__key,
            ds.shm_segsz,
            ds.shm_perm.mode & 0o777,
            ds.shm_nattch,
        );
        if seen != (self.key, SYSV_SIZE, 0o640, 2) {
            return Err(format!(
                "shmid {} is (key, size, mode, attachments) {seen:?}",
                self.shmid
            ));
        }
        // SAFETY: a valid name; the fd is closed below.
        let fd = unsafe { libc::shm_open(self.name.as_ptr(), libc::O_RDWR, 0) };
        if fd < 0 {
            return Err(format!(
                "shm_open {}: {}",
                self.path(),
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: stat is plain data; fstat fills it.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fd is open, stat is valid.
        let rc = unsafe { libc::fstat(fd, &mut stat) };
        let mut first = [0u8; 2];
        self.posix[1] = 0xee;
        // SAFETY: reads 2 bytes into our buffer from the fd we opened.
        let read = unsafe { libc::pread(fd, first.as_mut_ptr().cast(), 2, 0) };
        self.posix[1] = pattern(1);
        // SAFETY: ours.
        unsafe { libc::close(fd) };
        if rc < 0 || (stat.st_size as usize, stat.st_mode & 0o777) != (POSIX_SIZE, 0o640) {
            return Err(format!(
                "{} is {} bytes, mode {:o}",
                self.path(),
                stat.st_size,
                stat.st_mode & 0o777
            ));
        }
        if read != 2 || first[1] != 0xee {
            return Err(format!("{} is not the object it maps", self.path()));
        }
        let mut signal: libc::c_int = 0;
        // SAFETY: PR_GET_PDEATHSIG writes an int at the address given.
        unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut signal as *mut libc::c_int) };
        if signal != PDEATH_SIGNAL {
            return Err(format!("parent-death signal {signal}, not {PDEATH_SIGNAL}"));
        }
        self.sysv[0] = self.sysv[0].wrapping_add(1);
        self.posix[0] = self.posix[0].wrapping_add(1);
        Ok(self.sysv[0])
    }

    /// The parent's check: the child's counter, in both objects.
    fn parent_check(&self, dir: &Path) -> Result<u8, String> {
        let result = fs::read_to_string(dir.join("child-result")).unwrap_or_default();
        let counter: u8 = result
            .strip_prefix("OK ")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("the child's result is {result:?}"))?;
        if (self.sysv[0], self.posix[0]) != (counter, counter) {
            return Err(format!(
                "the counters are {} and {}, the child wrote {counter}",
                self.sysv[0], self.posix[0]
            ));
        }
        let mut subreaper: libc::c_int = 0;
        // SAFETY: PR_GET_CHILD_SUBREAPER writes an int at the address given.
        unsafe {
            libc::prctl(
                libc::PR_GET_CHILD_SUBREAPER,
                &mut subreaper as *mut libc::c_int,
            )
        };
        if subreaper != 1 {
            return Err("not a child subreaper".into());
        }
        Ok(counter)
    }
}

fn write_result(dir: &Path, name: &str, result: Result<u8, String>) {
    let text = match result {
        Ok(counter) => format!("OK {counter}"),
        Err(why) => format!("FAIL: {why}"),
    };
    let temp = dir.join(format!("{name}.tmp"));
    fs::write(&temp, text).expect("write result");
    fs::rename(&temp, dir.join(name)).expect("rename result");
}

/// Waits for SIGUSR1s forever, running `check` on each.
fn serve(mut check: impl FnMut()) -> ! {
    loop {
        std::thread::sleep(Duration::from_millis(5));
        if CHECK.swap(false, Ordering::SeqCst) {
            check();
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: fixture-shm DIR KEY"));
    let key = i32::from_str_radix(
        args.next()
            .expect("usage: fixture-shm DIR KEY")
            .trim_start_matches("0x"),
        16,
    )
    .expect("KEY in hexadecimal");
    // SAFETY: installs an async-signal-safe handler.
    unsafe {
        libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
        assert_eq!(
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1),
            0,
            "PR_SET_CHILD_SUBREAPER"
        );
    }
    let mut objects = Objects::create(key);
    let path = objects.path();
    let shmid = objects.shmid;
    // SAFETY: single-threaded: the child may run Rust code.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork");
    if child == 0 {
        // SAFETY: plain integers.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, PDEATH_SIGNAL) };
        let dir = dir.clone();
        serve(move || {
            let result = objects.child_check();
            write_result(&dir, "child-result", result);
        });
    }
    fs::write(
        dir.join("ready.tmp"),
        format!("{} {child} {shmid} {path}", std::process::id()),
    )
    .expect("write ready");
    fs::rename(dir.join("ready.tmp"), dir.join("ready")).expect("rename ready");
    serve(|| write_result(&dir, "parent-result", objects.parent_check(&dir)));
}
