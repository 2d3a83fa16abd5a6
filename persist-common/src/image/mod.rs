//! The on-disk image of a checkpointed process.
//!
//! # Layout
//!
//! An image is a directory, mode 0700, holding files of mode 0600:
//!
//! - `manifest`: one header line, a JSON document, then the binary section
//!   of the mappings. The header is ASCII:
//!   `persist-image <version> <len> <crc> <binary len>\n`, where
//!   `<version>` is the decimal format version ([`FORMAT_VERSION`]), `<len>`
//!   the decimal byte length of the JSON that follows, `<binary len>` that
//!   of the binary section after it, and `<crc>` the CRC32C of both as eight
//!   lowercase hex digits. The JSON is a [`Manifest`]: process, threads,
//!   file descriptors, the kernel and CPU it was taken on; its `mappings`
//!   lists are empty. The binary section holds every process's memory
//!   mappings and where each stored page lives in the page store (its
//!   layout is in `mapping_codec.rs`). Formats before 7 have no binary
//!   section and no `<binary len>`: their mappings are in the JSON.
//! - `pages`: the image's own page store. Raw page contents, 4096 bytes
//!   each, packed with no header.
//! - `pages.base.0`, `pages.base.1`, ...: only in a *delta* image, the page
//!   stores of earlier images, hard links to their files, listed in order in
//!   the manifest's `base_stores` (file name and size in bytes, a multiple
//!   of 4096). A name other than exactly `pages.base.N` for the `N`th entry
//!   is refused.
//!
//! The *page store* is one space of byte offsets: the base stores in the
//! order listed, then `pages`; a file of `n` bytes starting at offset `o`
//! holds offsets `o..o + n`. The manifest's `page_store_bytes` is the size
//! of the whole space, so `pages` holds `page_store_bytes` minus the sum of
//! the base sizes. Each [`PageRun`] of a mapping names `count` consecutive
//! pages of that mapping stored from `store_offset` on in that space, with
//! the CRC32C of those `count * 4096` bytes. Runs never exceed
//! [`MAX_RUN_PAGES`], so a lazy reader verifies at most that much to serve
//! one fault. A delta image writes to `pages` only the pages that differ
//! from its base image and refers to the others where the base stored them;
//! its base stores are the base image's base stores followed by the base
//! image's own `pages`, so offsets that were valid in the base stay valid.
//! Base stores are never written in place, only linked, so an image stays
//! whole when its base image is replaced or deleted.
//!
//! Pages never touched by the process are not stored; a mapping with no run
//! covering a page restores it as the kernel would: zero for anonymous
//! memory, the file's content for a file mapping.
//!
//! The image is written in a temporary directory, every file fsynced, and
//! the directory renamed into place, the manifest written last: an image
//! without a valid manifest is not an image. Everything in an image is
//! checked before use; see [`ImageError`]. The directory, its path and every file in it must be trusted
//! ([`crate::trust`]): owned by root, not writable by group or others, and
//! each file a regular file, judged on the opened descriptor.
//!
//! A file descriptor on a path (`FdKind::File`, `FdKind::Device`, a FIFO's
//! `FdKind::Pipe`) records, besides the path, the identity of the file it
//! named at checkpoint ([`FileIdentity`]: `device`, the kernel's `st_dev`;
//! `inode`; `file_type`, one of `regular`, `directory`, `char_device`,
//! `block_device`, `fifo`, `socket`, `symlink`) in `identity` (`fifo_identity`
//! for a FIFO). Restore refuses a path whose file differs unless told to
//! accept changed files (a different type is always refused). The fields are
//! optional: images written before they existed have none and are checked for
//! type only. Unlinked files record none.
//!
//! Seccomp filters (format 2): each
//! distinct filter of the process's threads is stored once in the
//! manifest's `process.seccomp_filters` (its classic BPF program and the
//! `SECCOMP_FILTER_FLAG_LOG` flag), and each thread lists the filters it
//! runs under in `threads[].seccomp`, by index there, the first installed
//! first. A thread that inherited filters and added its own lists the
//! shared ones first, then its own. Both fields are absent when no thread
//! runs under seccomp; an index past the filters, or a program that is not
//! 1 to 4096 whole 8-byte instructions, is refused when the image is
//! opened. Agents that read only format 1 refuse these images rather than
//! restore a process without its filters.
//!
//! Queued signals (optional within format 2): `process.shared_queue` and
//! each `threads[].queue` hold the process-wide and the thread's signal
//! queue, one raw 128-byte `siginfo_t` (base64) per queued signal in queue
//! order, so that several instances of one realtime signal keep their
//! `sigqueue` values, `si_code` and sender. Restore queues them again; a bit
//! of `shared_pending` or `threads[].pending` that no record is for (every
//! bit, in images written before the queues were saved) is raised by
//! number. An older reader ignores the queues and raises every pending
//! signal by number, as it always did, so the format is not bumped.
//!
//! An image may also hold `working-set`: the addresses and store offsets of
//! the pages its first wake touched, in touch order, for later wakes to copy
//! from the page store in bulk before the process resumes. It holds no page
//! contents. Its layout is specified in `working_set.rs`; it is optional and
//! never needed to restore.

mod error;
mod file_lock;
mod inotify;
mod io;
mod manifest;
mod manifest_file;
mod mapping_codec;
mod posix_timer;
mod sockets;
mod sysv_ipc;
mod tcp_connection;
mod tree;
mod working_set;

pub use error::ImageError;
pub use file_lock::{FileLock, LockKind};
pub use inotify::InotifyWatch;
pub use io::{Image, ImageWriter, PageStore};
pub use manifest::*;
pub use manifest_file::{decode_manifest, encode_manifest};
pub use mapping_codec::{CodecError, MappingReader, encode_mappings};
pub use posix_timer::{PosixTimer, SIGEV_NONE, SIGEV_SIGNAL, SIGEV_THREAD_ID, is_cpu_clock};
pub use sockets::{SocketFile, TcpSocket, UnixSocket};
pub use sysv_ipc::{IpcMessage, IpcOwner, MessageQueue, SemaphoreSet, SysvIpc};
pub use tcp_connection::{TcpConnection, TcpWindow};
pub use tree::{ChildProcess, InheritedFd, Zombie};
pub use working_set::{
    PagesByProcess, WORKING_SET_FILE, WORKING_SET_VERSION, WorkingSet, WorkingSetPage, manifest_crc,
};

/// Version of the format written by this build.
///
/// Version 2 adds fields that restrict what a restored process may do
/// (seccomp filters) or whose files it may open (file identities, the
/// agent's files): a reader that ignored them would give the process more
/// than it had, so readers of version 1 must refuse these images.
///
/// Version 3 adds state a reader must not drop without a word: the other
/// processes of a tree (`children`), POSIX timers, file locks, inotify
/// watches, established TCP connections, idle sockets of every kind, and
/// file mappings whose written pages are stored apart from the file's. A
/// reader of version 2 would restore the root alone, or the process without
/// them. Every version from 1 is read here; an older image simply has none
/// of them.
///
/// Version 4 adds System V and POSIX shared memory mappings with their
/// objects' contents, the parent-death signal and child-subreaper bit of
/// each process, and the owner of each listening socket (an `SO_REUSEPORT`
/// group's members are restored as one group). A reader of version 3 would
/// restore a PostgreSQL tree without its shared memory, or a group's
/// members as strangers to each other; it refuses the image by its version
/// rather than by a parse error.
///
/// Version 5 adds the zombies of a tree (`zombies`): children that exited
/// and were not reaped, with their wait status. A reader of version 4
/// would ignore them, and a restored parent would then wait for a child it
/// no longer has (`waitpid` failing with `ECHILD`, a count of children
/// never falling to zero); it refuses the image by its version instead.
///
/// Version 6 adds System V semaphore sets and message queues
/// (`sysv_ipc`): their ids, keys, owners, values and queued messages. A
/// reader of version 5 would restore the tree without them, and its
/// processes' `semop` or `msgrcv` on the recorded ids would fail or reach
/// whatever holds those ids on the host.
///
/// Version 7 moves every process's mappings out of the JSON into a binary
/// section after it (`manifest_file.rs`, `mapping_codec.rs`): a cold wake
/// reads python's in 25 µs instead of 200. A reader of version 6 would find
/// no mappings.
pub const FORMAT_VERSION: u32 = 7;

/// The oldest format version this build reads.
pub const OLDEST_READABLE_VERSION: u32 = 1;

/// Size of a page in the page store.
pub const PAGE_SIZE: u64 = 4096;

/// Longest run of pages sharing one checksum.
pub const MAX_RUN_PAGES: u64 = 16;

/// File name of the manifest inside an image directory.
pub const MANIFEST_FILE: &str = "manifest";

/// File name of the image's own page store inside an image directory.
pub const PAGES_FILE: &str = "pages";

/// File name of the `index`th base store of a delta image: `pages.base.N`.
pub fn base_store_file(index: usize) -> String {
    format!("{PAGES_FILE}.base.{index}")
}
