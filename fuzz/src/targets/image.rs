//! Targets of the on-disk image: the manifest, the page stores and the
//! working set.
//!
//! The image targets take a whole image directory as input: a flags byte,
//! then sections, each [`SEPARATOR`], a file name, `:` and the file's
//! bytes. Only the names an image holds are written: `manifest`, `pages`,
//! `working-set` and `pages.base.0` to `pages.base.3`.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use persist_agent::inspect::inspect;
use persist_common::image::{
    BaseStore, CpuInfo, Credentials, EpollWatch, FdInfo, FdKind, FileIdentity, FileType, ITimer,
    Image, ImageWriter, KernelInfo, MANIFEST_FILE, Manifest, Mapping, MappingKind, MmFields,
    PAGE_SIZE, PAGES_FILE, PagesByProcess, ProcessInfo, Protection, QueuedMessage, Rlimit,
    RobustList, Rseq, SeccompFilter, SigAction, SigAltStack, SocketOption, TcpSocket, ThreadInfo,
    UnixSocket, WORKING_SET_FILE, WorkingSet, WorkingSetPage, decode_manifest, manifest_crc,
};

use super::{clear_files, scratch};

/// Starts each file's section in an image input.
const SEPARATOR: &[u8] = b"\n%%persist-fuzz-file%%";
/// Flag: set the manifest header's length and checksum to its JSON's.
const FIX_MANIFEST: u8 = 1;
/// Flag: set the working set's image identity to the manifest's, and its
/// checksum to its bytes'.
const FIX_WORKING_SET: u8 = 2;
/// Names of the files an image input may hold.
const FILES: &[&str] = &[
    MANIFEST_FILE,
    PAGES_FILE,
    WORKING_SET_FILE,
    "pages.base.0",
    "pages.base.1",
    "pages.base.2",
    "pages.base.3",
];

/// The manifest, decoded from bytes: a flags byte ([`FIX_MANIFEST`]), then
/// the manifest file. A manifest that decodes must survive a round trip.
pub fn manifest(data: &[u8]) {
    let Some((&flags, file)) = data.split_first() else {
        return;
    };
    let mut file = file.to_vec();
    if flags & FIX_MANIFEST != 0 {
        fix_manifest_header(&mut file);
    }
    let Ok(manifest) = decode_manifest(&file, Path::new(MANIFEST_FILE)) else {
        return;
    };
    let again = decode_manifest(&manifest_file(&manifest), Path::new(MANIFEST_FILE))
        .expect("a decoded manifest, encoded again, decodes");
    assert_eq!(again, manifest, "a manifest survives a round trip");
}

/// An image directory, opened, checked against its own host and inspected.
pub fn image(data: &[u8]) {
    let Some(dir) = write_image(data) else {
        return;
    };
    if let Ok(image) = Image::open(&dir) {
        let manifest = image.manifest();
        image
            .check_host(&manifest.kernel, &manifest.cpu)
            .expect("an image suits the host it was taken on");
    }
    let _ = inspect(&dir);
}

/// An image directory's page stores: every run of every mapping read
/// through the store, its checksum checked.
pub fn page_store(data: &[u8]) {
    let Some(dir) = write_image(data) else {
        return;
    };
    let Ok(image) = Image::open(&dir) else {
        return;
    };
    let store = image.pages();
    assert_eq!(store.as_bytes().len() as u64, store.len());
    for mapping in &image.manifest().mappings {
        for run in &mapping.pages {
            let bytes = store
                .run_unchecked(run)
                .expect("Image::open checked that every run lies in the store");
            assert_eq!(bytes.len() as u64, run.count * PAGE_SIZE);
            let _ = store.run(run);
        }
    }
}

/// An image directory's working set: read alone, then against its image;
/// a set that opens is written back and must read the same.
pub fn working_set(data: &[u8]) {
    let Some(dir) = write_image(data) else {
        return;
    };
    let _ = WorkingSet::read(&dir);
    let Ok(crc) = manifest_crc(&dir) else {
        return;
    };
    let Ok(set) = WorkingSet::open(&dir, crc) else {
        return;
    };
    assert_eq!(
        set.extended_by(set.processes()),
        None,
        "a set extended by its own pages gains nothing"
    );
    let _ = inspect(&dir);
    let Ok(image) = Image::open(&dir) else {
        return;
    };
    if WorkingSet::write(&dir, crc, set.processes(), image.pages()).is_ok() {
        let reread = WorkingSet::open(&dir, crc).expect("a set just written reads");
        assert_eq!(
            reread.processes(),
            set.processes(),
            "a set survives a round trip"
        );
    }
}

/// Manifest inputs: each seed image's manifest, flagged to be fixed up.
pub fn manifest_seeds() -> Vec<Vec<u8>> {
    seed_images()
        .iter()
        .filter_map(|files| files.iter().find(|(name, _)| name == MANIFEST_FILE))
        .map(|(_, bytes)| [&[FIX_MANIFEST][..], bytes].concat())
        .collect()
}

/// Image inputs: the seed images.
pub fn image_seeds() -> Vec<Vec<u8>> {
    seed_images().iter().map(|files| encode(files)).collect()
}

/// Working-set inputs: the seed images that have one, their page stores
/// left out but for their size (the target reads the set, not the pages).
pub fn working_set_seeds() -> Vec<Vec<u8>> {
    seed_images()
        .iter()
        .filter(|files| files.iter().any(|(name, _)| name == WORKING_SET_FILE))
        .map(|files| encode(files))
        .collect()
}

/// Encodes image files as an input, with both fix-up flags.
fn encode(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut data = vec![FIX_MANIFEST | FIX_WORKING_SET];
    for (name, bytes) in files {
        data.extend_from_slice(SEPARATOR);
        data.extend_from_slice(name.as_bytes());
        data.push(b':');
        data.extend_from_slice(bytes);
    }
    data
}

/// Writes the image files of an input to this thread's scratch image
/// directory, replacing what was there, and returns the directory.
fn write_image(data: &[u8]) -> Option<PathBuf> {
    let (&flags, rest) = data.split_first()?;
    let mut files: Vec<(&str, Vec<u8>)> = Vec::new();
    for section in split(rest, SEPARATOR).skip(1) {
        let colon = section.iter().position(|&byte| byte == b':')?;
        let name = std::str::from_utf8(&section[..colon]).ok()?;
        let name = FILES.iter().find(|known| **known == name)?;
        files.push((name, section[colon + 1..].to_vec()));
    }
    if flags & FIX_MANIFEST != 0
        && let Some((_, manifest)) = files.iter_mut().find(|(name, _)| *name == MANIFEST_FILE)
    {
        fix_manifest_header(manifest);
    }
    if flags & FIX_WORKING_SET != 0 {
        let crc = files
            .iter()
            .find(|(name, _)| *name == MANIFEST_FILE)
            .and_then(|(_, manifest)| header_crc(manifest));
        if let Some((_, set)) = files.iter_mut().find(|(name, _)| *name == WORKING_SET_FILE) {
            fix_working_set(set, crc);
        }
    }
    let dir = scratch().join("image");
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .or_else(|err| match err.kind() {
            std::io::ErrorKind::AlreadyExists => Ok(()),
            _ => Err(err),
        })
        .expect("creating the scratch image directory");
    clear_files(&dir);
    for (name, bytes) in files {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.join(name))
            .and_then(|mut file| file.write_all(&bytes))
            .expect("writing a scratch image file");
    }
    Some(dir)
}

/// The pieces of `data` between occurrences of `separator`.
fn split<'a>(data: &'a [u8], separator: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let data = rest?;
        match data
            .windows(separator.len())
            .position(|window| window == separator)
        {
            Some(at) => {
                rest = Some(&data[at + separator.len()..]);
                Some(&data[..at])
            }
            None => {
                rest = None;
                Some(data)
            }
        }
    })
}

/// Sets the length and checksum fields of a manifest's header line to
/// those of what follows it (formats 1 to 6: four fields, the JSON alone;
/// format 7: five, the JSON and the binary section of the mappings).
fn fix_manifest_header(file: &mut Vec<u8>) {
    let Some(end) = file.iter().position(|&byte| byte == b'\n') else {
        return;
    };
    let Ok(head) = std::str::from_utf8(&file[..end]) else {
        return;
    };
    let fields: Vec<&str> = head.split(' ').collect();
    let body = &file[end + 1..];
    let head = match fields[..] {
        [magic, version, _, _] => format!(
            "{magic} {version} {} {:08x}",
            body.len(),
            crc32c::crc32c(body)
        ),
        // The binary section of the mappings keeps its length where the
        // body still holds it: an edit of the JSON changes the JSON's.
        [magic, version, _, _, binary_len] => {
            let binary_len = binary_len
                .parse()
                .map_or(0, |len: usize| len.min(body.len()));
            format!(
                "{magic} {version} {} {:08x} {binary_len}",
                body.len() - binary_len,
                crc32c::crc32c(body)
            )
        }
        _ => return,
    };
    file.splice(..end, head.into_bytes());
}

/// The checksum field of a manifest's header line.
fn header_crc(file: &[u8]) -> Option<u32> {
    let end = file.iter().position(|&byte| byte == b'\n')?;
    let head = std::str::from_utf8(&file[..end]).ok()?;
    u32::from_str_radix(head.split(' ').nth(3)?, 16).ok()
}

/// Sets a working set's image identity to `image_crc` (if known) and its
/// checksum (bytes 32..36) to that of bytes 0..32 and 40.. (see the
/// format in `persist_common::image::working_set`).
fn fix_working_set(set: &mut [u8], image_crc: Option<u32>) {
    if set.len() < 40 {
        return;
    }
    if let Some(crc) = image_crc {
        set[12..16].copy_from_slice(&crc.to_le_bytes());
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&set[..32]), &set[40..]);
    set[32..36].copy_from_slice(&crc.to_le_bytes());
}

/// A manifest file for `manifest`, as [`ImageWriter`] writes it.
fn manifest_file(manifest: &Manifest) -> Vec<u8> {
    persist_common::image::encode_manifest(&mut manifest.clone())
        .expect("a manifest always serialises")
}

/// An image's files: name and bytes.
type ImageFiles = Vec<(String, Vec<u8>)>;

/// The seed images, each as its files' names and bytes, written by
/// [`ImageWriter`] and [`WorkingSet::write`] once per process: a full image
/// of a manifest using every kind of mapping and descriptor, with a working
/// set; a delta image of it; an empty image.
fn seed_images() -> &'static [ImageFiles] {
    static SEEDS: OnceLock<Vec<ImageFiles>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let temp = tempfile::tempdir().expect("a directory for the seed images");
        let full = temp.path().join("full");
        let delta = temp.path().join("delta");
        let empty = temp.path().join("empty");

        let mut writer = ImageWriter::create(&full).expect("writing the seed image");
        let heap = writer.append_pages(1, &pages(3, 1)).expect("seed pages");
        let stack = writer.append_pages(0, &pages(1, 7)).expect("seed pages");
        writer
            .finish(&mut rich_manifest(heap, stack))
            .expect("finishing the seed image");
        let base = Image::open(&full).expect("the seed image opens");
        let crc = manifest_crc(&full).expect("the seed image has an identity");
        let touched = [
            WorkingSetPage {
                address: HEAP + PAGE_SIZE,
                store_offset: 0,
            },
            WorkingSetPage::not_stored(HEAP),
            WorkingSetPage {
                address: STACK,
                store_offset: 3 * PAGE_SIZE,
            },
        ];
        // Two processes, as a tree's set names them.
        let touched =
            PagesByProcess::from([(0, touched[..2].to_vec()), (1, touched[2..].to_vec())]);
        WorkingSet::write(&full, crc, &touched, base.pages()).expect("the seed working set");

        let mut writer = ImageWriter::create_delta(&delta, &base).expect("writing the delta");
        let reused = base.pages().as_bytes()[..2 * PAGE_SIZE as usize].to_vec();
        let mut heap = writer.reuse_pages(1, 0, &reused).expect("reused pages");
        heap.extend(writer.append_pages(3, &pages(1, 9)).expect("seed pages"));
        let stack = base.manifest().mappings[5].pages.clone();
        writer
            .finish(&mut rich_manifest(heap, stack))
            .expect("finishing the delta image");

        ImageWriter::create(&empty)
            .and_then(|writer| writer.finish(&mut Manifest::default()))
            .expect("writing the empty image");

        [full, delta, empty]
            .iter()
            .map(|dir| read_files(dir))
            .collect()
    })
}

fn read_files(dir: &Path) -> ImageFiles {
    FILES
        .iter()
        .filter_map(|name| {
            let bytes = fs::read(dir.join(name)).ok()?;
            Some(((*name).to_owned(), bytes))
        })
        .collect()
}

/// `count` pages, page `i` filled with `seed + i`.
fn pages(count: u64, seed: u8) -> Vec<u8> {
    (0..count)
        .flat_map(|page| std::iter::repeat_n(seed.wrapping_add(page as u8), PAGE_SIZE as usize))
        .collect()
}

const HEAP: u64 = 0x55_0000_0000;
const STACK: u64 = 0x7ffd_0000_0000;

/// A manifest as a checkpoint of a busy server would write it: every kind
/// of mapping and descriptor, two threads; the heap and stack stored as
/// `heap` and `stack`.
fn rich_manifest(
    heap: Vec<persist_common::image::PageRun>,
    stack: Vec<persist_common::image::PageRun>,
) -> Manifest {
    let rw = Protection {
        read: true,
        write: true,
        exec: false,
    };
    let mapping = |start: u64, pages: u64, kind: MappingKind, runs| Mapping {
        start,
        end: start + pages * PAGE_SIZE,
        protection: rw,
        shared: false,
        kind,
        pages: runs,
    };
    let thread = |tid: i32| ThreadInfo {
        seccomp: vec![0],
        tid,
        comm: "server".into(),
        regs: (0..27).map(|i| 0x1000 * i).collect(),
        xsave: vec![0x5a; 64],
        sigmask: 1 << 12,
        pending: 0,
        queue: Vec::new(),
        sigaltstack: SigAltStack {
            sp: 0,
            flags: 2,
            size: 0,
        },
        rseq: Some(Rseq {
            address: 0x7f00_0000_1000,
            length: 32,
            signature: 0x5305_3053,
        }),
        clear_child_tid: 0x7f00_0000_2000,
        robust_list: Some(RobustList {
            head: 0x7f00_0000_3000,
            len: 24,
        }),
    };
    let fd = |fd: i32, kind: FdKind| FdInfo {
        fd,
        cloexec: fd > 2,
        flags: 2,
        shared_with: None,
        kind,
    };
    Manifest {
        agent_files: vec!["/var/log/server.log".into()],
        children: Vec::new(),
        zombies: Vec::new(),
        sysv_ipc: Default::default(),
        kernel: KernelInfo {
            release: "6.1.0-fuzz".into(),
            version: "#1 SMP PREEMPT_DYNAMIC".into(),
            machine: "x86_64".into(),
        },
        cpu: CpuInfo {
            xcr0: 0x207,
            xsave_size: 2696,
        },
        created_unix_ms: 1_764_000_000_000,
        process: ProcessInfo {
            posix_timers: Vec::new(),
            file_locks: Vec::new(),
            // One filter: `ret ALLOW` (BPF_RET | BPF_K, SECCOMP_RET_ALLOW).
            seccomp_filters: vec![SeccompFilter {
                program: [0x06, 0, 0, 0, 0x00, 0x00, 0xff, 0x7f].to_vec(),
                flags: 0,
            }],
            pid: 1,
            pgid: 1,
            sid: 1,
            comm: "server".into(),
            exe: "/usr/bin/server".into(),
            argv: vec!["server".into(), "--port".into(), "8000".into()],
            environ: vec!["PATH=/usr/bin".into()],
            cwd: "/srv".into(),
            root: "/".into(),
            umask: 0o022,
            personality: 0,
            rlimits: vec![Rlimit {
                resource: 7,
                soft: 1024,
                hard: u64::MAX,
            }],
            credentials: Credentials {
                uids: [65534; 4],
                gids: [65534; 4],
                groups: vec![65534],
                cap_bounding: u64::MAX >> 23,
                ..Credentials::default()
            },
            sigactions: vec![SigAction {
                signal: 13,
                handler: 1,
                flags: 0x0400_0000,
                restorer: 0x7f00_0000_4000,
                mask: 0,
            }],
            shared_pending: 0,
            shared_queue: Vec::new(),
            pdeath_signal: 10,
            child_subreaper: true,
            itimers: vec![ITimer {
                which: 0,
                interval_us: 0,
                value_us: 0,
            }],
            mm: MmFields {
                start_brk: HEAP,
                brk: HEAP + 4 * PAGE_SIZE,
                start_stack: STACK + PAGE_SIZE,
                auxv: vec![6, 4096, 0, 0],
                ..MmFields::default()
            },
        },
        threads: vec![thread(1), thread(2)],
        mappings: vec![
            mapping(
                0x40_0000,
                2,
                MappingKind::File {
                    path: "/usr/bin/server".into(),
                    device: "08:01".into(),
                    inode: 1234,
                    offset: 0,
                },
                vec![],
            ),
            mapping(HEAP, 4, MappingKind::Heap, heap),
            mapping(0x7f00_0000_0000, 1, MappingKind::Anonymous, vec![]),
            mapping(
                0x7f00_0001_0000,
                1,
                MappingKind::SharedAnonymous { inode: 42 },
                vec![],
            ),
            mapping(
                0x7f00_0002_0000,
                1,
                MappingKind::Memfd {
                    name: "cache".into(),
                    inode: 43,
                    offset: 0,
                },
                vec![],
            ),
            mapping(
                0x7f00_0003_0000,
                1,
                MappingKind::SysvShm {
                    key: 0x0098_c353,
                    shmid: 32791,
                    size: 56,
                    uid: 101,
                    gid: 104,
                    mode: 0o600,
                    removed: false,
                },
                vec![],
            ),
            mapping(
                0x7f00_0004_0000,
                1,
                MappingKind::PosixShm {
                    path: "/dev/shm/PostgreSQL.595029520".into(),
                    inode: 44,
                    offset: 0,
                    size: 4000,
                    uid: 101,
                    gid: 104,
                    mode: 0o600,
                },
                vec![],
            ),
            mapping(STACK, 2, MappingKind::Stack, stack),
            mapping(
                0x7fff_f000_0000,
                1,
                MappingKind::Vvar {
                    name: "[vvar]".into(),
                },
                vec![],
            ),
            mapping(0x7fff_f000_4000, 2, MappingKind::Vdso, vec![]),
        ],
        fds: vec![
            fd(
                0,
                FdKind::Device {
                    path: "/dev/null".into(),
                    identity: Some(FileIdentity {
                        device: 5,
                        inode: 4,
                        file_type: FileType::CharDevice,
                    }),
                },
            ),
            fd(
                1,
                FdKind::File {
                    path: "/var/log/server.log".into(),
                    offset: 4096,
                    unlinked: false,
                    contents: vec![],
                    identity: None,
                },
            ),
            fd(
                2,
                FdKind::File {
                    path: "/tmp/gone".into(),
                    offset: 3,
                    unlinked: true,
                    contents: b"abc".to_vec(),
                    identity: None,
                },
            ),
            fd(
                3,
                FdKind::TcpListener {
                    local: "127.0.0.1:8000".into(),
                    inode: 100,
                    backlog: 128,
                    reuseaddr: true,
                    reuseport: false,
                    v6only: false,
                    options: vec![SocketOption {
                        level: 6,
                        name: 1,
                        value: 1,
                    }],
                    owner_uid: Some(33),
                },
            ),
            fd(
                4,
                FdKind::Pipe {
                    fifo_identity: None,
                    inode: 101,
                    write_end: false,
                    fifo_path: None,
                    data: b"queued".to_vec(),
                    capacity: 65536,
                },
            ),
            fd(
                5,
                FdKind::Pipe {
                    fifo_identity: None,
                    inode: 101,
                    write_end: true,
                    fifo_path: Some("/run/server.fifo".into()),
                    data: vec![],
                    capacity: 65536,
                },
            ),
            fd(
                6,
                FdKind::Eventfd {
                    count: 1,
                    semaphore: false,
                },
            ),
            fd(
                7,
                FdKind::Timerfd {
                    clock: 1,
                    settime_flags: 0,
                    interval_ns: 1_000_000,
                    value_ns: 500_000,
                    ticks: 2,
                },
            ),
            fd(8, FdKind::Signalfd { mask: 1 << 16 }),
            fd(
                9,
                FdKind::Epoll {
                    watches: vec![EpollWatch {
                        fd: 3,
                        events: 1,
                        data: 3,
                        file_fd: Some(4),
                    }],
                },
            ),
            fd(
                10,
                FdKind::Memfd {
                    name: "cache".into(),
                    inode: 43,
                    offset: 0,
                    size: 4096,
                    seals: 1,
                    contents: vec![],
                },
            ),
            fd(
                11,
                FdKind::UdpSocket {
                    local: "[::]:5353".into(),
                    peer: Some("[::1]:53".into()),
                    reuseaddr: false,
                    reuseport: false,
                    v6only: true,
                    options: vec![SocketOption {
                        level: 1,
                        name: 6,
                        value: 1,
                    }],
                },
            ),
            fd(
                12,
                FdKind::UnixListener {
                    path: "/run/server.sock".into(),
                    socket_type: 1,
                    backlog: 16,
                    mode: Some(0o660),
                    owner: Some((0, 0)),
                },
            ),
            fd(
                15,
                FdKind::TcpSocket(TcpSocket {
                    local: "127.0.0.1:9000".into(),
                    reuseaddr: true,
                    reuseport: false,
                    v6only: false,
                    options: vec![],
                    linger: Some(5),
                }),
            ),
            fd(
                16,
                FdKind::UnixSocket(UnixSocket {
                    socket_type: 2,
                    name: "/run/client.sock".into(),
                    file: None,
                    peer: Some("/dev/log".into()),
                    options: vec![],
                    shutdown: 0,
                }),
            ),
            fd(
                13,
                FdKind::UnixPair {
                    inode: 102,
                    peer_inode: 103,
                    socket_type: 2,
                    queued: vec![QueuedMessage {
                        data: b"datagram".to_vec(),
                    }],
                    shutdown: 2,
                },
            ),
            FdInfo {
                shared_with: Some(3),
                ..fd(
                    14,
                    FdKind::TcpListener {
                        local: "127.0.0.1:8000".into(),
                        inode: 100,
                        backlog: 128,
                        reuseaddr: true,
                        reuseport: false,
                        v6only: false,
                        options: vec![],
                        owner_uid: None,
                    },
                )
            },
        ],
        // Set by `ImageWriter::finish`.
        page_store_bytes: 0,
        base_stores: Vec::<BaseStore>::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_image_opens_and_its_working_set_is_current() {
        let images = seed_images();
        assert_eq!(images.len(), 3);
        for data in image_seeds() {
            let dir = write_image(&data).expect("a seed decodes");
            let image = Image::open(&dir).unwrap_or_else(|err| panic!("a seed image opens: {err}"));
            for mapping in &image.manifest().mappings {
                for run in &mapping.pages {
                    image.pages().run(run).expect("a seed's runs check out");
                }
            }
        }
        for data in working_set_seeds() {
            let dir = write_image(&data).expect("a seed decodes");
            let crc = manifest_crc(&dir).expect("a seed has an identity");
            assert_eq!(WorkingSet::open(&dir, crc).expect("its set opens").len(), 3);
        }
    }

    #[test]
    fn fixing_the_manifest_header_makes_an_edited_json_decode() {
        let seed = &manifest_seeds()[0];
        let at = seed
            .windows(8)
            .position(|window| window == b"\"server\"")
            .expect("the comm in the JSON");
        let edited = [&seed[..at + 7], b"s", &seed[at + 7..]].concat();
        assert!(decode_manifest(&edited[1..], Path::new("m")).is_err());
        let mut file = edited[1..].to_vec();
        fix_manifest_header(&mut file);
        let manifest = decode_manifest(&file, Path::new("m")).expect("fixed up, it decodes");
        assert_eq!(manifest.process.comm, "servers");
    }
}
