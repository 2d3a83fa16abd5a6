//! Taking over the pages of a restored process whose pager died with its
//! daemon.
//!
//! The process keeps a duplicate of its userfaultfd, so a dead pager means
//! faults that wait, and everything the process did since is still queued
//! on that userfaultfd: faults, `madvise`, `munmap`, `mremap`, `fork`. A new
//! pager takes the descriptor back (pidfd_getfd) and rebuilds what the old
//! one knew:
//!
//! - the pages the image stores for the lazy mappings (as at the restore);
//! - minus the pages the process already has (`/proc/PID/pagemap`: present
//!   or swapped), whether the old pager copied them or the process was
//!   given a zero page;
//! - with the address-space events the old pager had read applied, from its
//!   journal: a range the process discarded reads zeros, not the image, and
//!   pages moved by `mremap` are served at their new address.
//!
//! Then it wakes every thread waiting in a fault (the old pager may have
//! read a fault it never served: its thread waits for a wake-up and retries)
//! and goes on as any pager.
//!
//! The journal is appended right after each event is read: an event read by
//! a pager killed before its line was written (a few microseconds) is the
//! one thing a new pager cannot know.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use persist_common::image::{Image, PAGE_SIZE};

use super::Pager;
use crate::restore::RestoreError;
use crate::restore::shared_pages::SharedPages;
use crate::sys::pidfd::PidFd;
use crate::sys::uffd::Userfault;

/// An address-space change of a restored process, as its pager read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressEvent {
    /// `madvise(MADV_DONTNEED/REMOVE)`: the range reads zeros from then on.
    Removed {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// `munmap` of the range.
    Unmapped {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// `mremap` moved `len` bytes from `from` to `to`.
    Moved {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
}

impl AddressEvent {
    fn line(self) -> String {
        match self {
            Self::Removed { start, end } => format!("removed {start:#x} {end:#x}\n"),
            Self::Unmapped { start, end } => format!("unmapped {start:#x} {end:#x}\n"),
            Self::Moved { from, to, len } => format!("moved {from:#x} {to:#x} {len:#x}\n"),
        }
    }

    fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_whitespace();
        let kind = words.next()?;
        let mut number = || {
            words
                .next()
                .and_then(|word| word.strip_prefix("0x"))
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        };
        match kind {
            "removed" => Some(Self::Removed {
                start: number()?,
                end: number()?,
            }),
            "unmapped" => Some(Self::Unmapped {
                start: number()?,
                end: number()?,
            }),
            "moved" => Some(Self::Moved {
                from: number()?,
                to: number()?,
                len: number()?,
            }),
            _ => None,
        }
    }
}

/// Why a journal of address-space events cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// It cannot be created, written or read.
    #[error("event journal {path}")]
    Io {
        /// The journal.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A line is not an event.
    #[error("event journal {path}, line {line}: not an address-space event")]
    Corrupt {
        /// The journal.
        path: PathBuf,
        /// Its number, from 1.
        line: usize,
    },
}

/// The address-space events a pager read, appended one line each, for a
/// pager that may take over after it (see the module's documentation).
#[derive(Debug)]
pub struct EventJournal {
    file: File,
    path: PathBuf,
}

impl EventJournal {
    /// Creates the journal at `path` (mode 0600), emptying an older one.
    pub fn create(path: &Path) -> Result<Self, JournalError> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|source| JournalError::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    /// Appends `event` (one `write`, no buffering: a killed daemon loses
    /// nothing it wrote).
    pub fn append(&mut self, event: AddressEvent) -> Result<(), JournalError> {
        self.file
            .write_all(event.line().as_bytes())
            .map_err(|source| JournalError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// The events of the journal at `path`, in order; none when it does not
    /// exist (nothing was journaled).
    pub fn read(path: &Path) -> Result<Vec<AddressEvent>, JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_owned(),
            source,
        };
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(io(err)),
        };
        let mut events = Vec::new();
        for (index, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(io)?;
            // One `write` a line: a killed writer leaves none half written.
            if !line.is_empty() {
                let event = AddressEvent::parse(&line).ok_or_else(|| JournalError::Corrupt {
                    path: path.to_owned(),
                    line: index + 1,
                })?;
                events.push(event);
            }
        }
        Ok(events)
    }
}

impl Pager {
    /// A pager taking over the restored process of `pidfd`, restored from
    /// `image`, whose previous pager died: `uffd` is the process's own
    /// userfaultfd (taken with pidfd_getfd), and `events` what the previous
    /// pager journaled.
    pub fn adopt(
        uffd: OwnedFd,
        pidfd: PidFd,
        image: Arc<Image>,
        events: &[AddressEvent],
    ) -> Result<Self, RestoreError> {
        let pid = pidfd.pid();
        let shared = Arc::new(SharedPages::of_tree(image.manifest()));
        let mut pager = Self::new(Userfault::new(uffd), Arc::new(pidfd), image, &shared);
        for &event in events {
            pager.apply(event);
        }
        pager.forget_present()?;
        for &(start, end) in &pager.registered {
            // Gone ranges are fine: only waiting threads matter.
            let _ = pager.uffd.wake(start, end - start);
        }
        tracing::info!(
            pid,
            pending_pages = pager.pending_pages(),
            journaled_events = events.len(),
            "pager taken over"
        );
        Ok(pager)
    }

    /// Applies an address-space event the previous pager read.
    fn apply(&mut self, event: AddressEvent) {
        match event {
            AddressEvent::Removed { start, end } => self.discard_range(start, end),
            AddressEvent::Unmapped { start, end } => {
                self.drop_range(start, end);
                self.unregistered(start, end);
            }
            AddressEvent::Moved { from, to, len } => self.remap(from, to, len),
        }
    }

    /// Forgets the pending pages the process already has.
    fn forget_present(&mut self) -> Result<(), RestoreError> {
        let pid = self.pid();
        let io = |source: procfs::ProcError| RestoreError::Io {
            path: format!("/proc/{pid}/pagemap"),
            source: std::io::Error::other(source),
        };
        let mut pagemap = procfs::process::Process::new(pid)
            .and_then(|process| process.pagemap())
            .map_err(io)?;
        for &(start, end) in &self.registered.clone() {
            let first = (start / PAGE_SIZE) as usize;
            let infos = pagemap
                .get_range_info(first..(end / PAGE_SIZE) as usize)
                .map_err(io)?;
            for (index, info) in infos.into_iter().enumerate() {
                let there = match info {
                    procfs::process::PageInfo::MemoryPage(flags) => {
                        flags.contains(procfs::process::MemoryPageFlags::PRESENT)
                    }
                    procfs::process::PageInfo::SwapPage(flags) => {
                        flags.contains(procfs::process::SwapPageFlags::SWAP)
                    }
                };
                if there {
                    self.pending.remove(&(start + index as u64 * PAGE_SIZE));
                }
            }
        }
        Ok(())
    }

    /// Journals the address-space events this pager reads from now on.
    pub(crate) fn journal_to(&mut self, journal: EventJournal) {
        self.journal = Some(journal);
    }

    /// Appends `event` to the journal, if any; a journal that fails is
    /// dropped (a pager taking over would then only miss what follows).
    pub(super) fn journal(&mut self, event: AddressEvent) {
        if let Some(journal) = self.journal.as_mut()
            && let Err(err) = journal.append(event)
        {
            tracing::warn!(pid = self.pidfd.pid(), %err, "address-space events no longer journaled");
            self.journal = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_survive_the_journal_and_a_bad_line_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events");
        let events = [
            AddressEvent::Removed {
                start: 0x1000,
                end: 0x3000,
            },
            AddressEvent::Moved {
                from: 0x7000,
                to: 0x9000,
                len: 0x2000,
            },
            AddressEvent::Unmapped {
                start: 0x4000,
                end: 0x5000,
            },
        ];
        let mut journal = EventJournal::create(&path).unwrap();
        for event in events {
            journal.append(event).unwrap();
        }
        assert_eq!(EventJournal::read(&path).unwrap(), events);
        assert!(
            EventJournal::read(&dir.path().join("none"))
                .unwrap()
                .is_empty(),
            "no journal means no events"
        );
        std::fs::write(&path, "removed 0x1000 0x3000\nmoved 0x7\n").unwrap();
        assert!(matches!(
            EventJournal::read(&path),
            Err(JournalError::Corrupt { line: 2, .. })
        ));
    }
}
