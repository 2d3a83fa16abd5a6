//! The binary section of a manifest: every process's memory mappings and
//! their page runs.
//!
//! Mappings are nine tenths of a manifest (python's http.server: 147
//! mappings and 600 page runs, 62 of its 65 KB as JSON), and a cold wake
//! reads them on its critical path: as JSON that took 450–500 µs of a
//! 4 ms prepare in the daemon (docs/kernel-facts.md, Costs that shaped the
//! cold wake). This fixed layout reads in a few tens of µs.
//!
//! # Layout
//!
//! All integers little-endian. The section is one list of mappings per
//! process, in tree order: the manifest's own process, then each of its
//! `children`. A list is a `u32` count, then each mapping:
//!
//! | size | field |
//! | --- | --- |
//! | 8 | start |
//! | 8 | end |
//! | 1 | protection: bit 0 read, bit 1 write, bit 2 exec |
//! | 1 | 1 if shared, 0 if private |
//! | 1 | kind (below) |
//! | … | the kind's fields, in the order of [`MappingKind`] |
//! | 4 | number of page runs |
//! | 28 each | a run: first page (8), count (8), store offset (8), CRC32C (4) |
//!
//! Kinds: 0 anonymous, 1 heap, 2 stack, 3 file, 4 shared anonymous,
//! 5 memfd, 6 System V segment, 7 POSIX shared memory, 8 vDSO, 9 vvar.
//! A string is a `u32` byte length and its UTF-8 bytes; `i32`, `u32` and
//! `u64` fields take 4, 4 and 8 bytes, a flag one byte (0 or 1).
//!
//! The section is covered by the manifest header's checksum, so a damaged
//! one is refused before it is read; the reader still checks every length
//! against what is left, so that no input makes it allocate without bound
//! or read past the end.

use super::manifest::{Mapping, MappingKind, PageRun, Protection};

/// Why a binary section could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mapping section, byte {offset}: {reason}")]
pub struct CodecError {
    /// Where in the section reading stopped.
    pub offset: usize,
    /// What was wrong there.
    pub reason: String,
}

/// The smallest encoded mapping (no kind fields, no runs), bounding how
/// many mappings a count may announce.
const MIN_MAPPING_BYTES: usize = 8 + 8 + 3 + 4;
const RUN_BYTES: usize = 28;

/// Appends the mappings of one process to `out`.
pub fn encode_mappings(mappings: &[Mapping], out: &mut Vec<u8>) {
    put_len(out, mappings.len());
    for mapping in mappings {
        out.extend_from_slice(&mapping.start.to_le_bytes());
        out.extend_from_slice(&mapping.end.to_le_bytes());
        let protection = &mapping.protection;
        out.push(
            u8::from(protection.read)
                | u8::from(protection.write) << 1
                | u8::from(protection.exec) << 2,
        );
        out.push(u8::from(mapping.shared));
        encode_kind(&mapping.kind, out);
        put_len(out, mapping.pages.len());
        for run in &mapping.pages {
            out.extend_from_slice(&run.first_page.to_le_bytes());
            out.extend_from_slice(&run.count.to_le_bytes());
            out.extend_from_slice(&run.store_offset.to_le_bytes());
            out.extend_from_slice(&run.crc32c.to_le_bytes());
        }
    }
}

fn encode_kind(kind: &MappingKind, out: &mut Vec<u8>) {
    match kind {
        MappingKind::Anonymous => out.push(0),
        MappingKind::Heap => out.push(1),
        MappingKind::Stack => out.push(2),
        MappingKind::File {
            path,
            device,
            inode,
            offset,
        } => {
            out.push(3);
            put_str(out, path);
            put_str(out, device);
            out.extend_from_slice(&inode.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        MappingKind::SharedAnonymous { inode } => {
            out.push(4);
            out.extend_from_slice(&inode.to_le_bytes());
        }
        MappingKind::Memfd {
            name,
            inode,
            offset,
        } => {
            out.push(5);
            put_str(out, name);
            out.extend_from_slice(&inode.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        MappingKind::SysvShm {
            key,
            shmid,
            size,
            uid,
            gid,
            mode,
            removed,
        } => {
            out.push(6);
            out.extend_from_slice(&key.to_le_bytes());
            out.extend_from_slice(&shmid.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&uid.to_le_bytes());
            out.extend_from_slice(&gid.to_le_bytes());
            out.extend_from_slice(&mode.to_le_bytes());
            out.push(u8::from(*removed));
        }
        MappingKind::PosixShm {
            path,
            inode,
            offset,
            size,
            uid,
            gid,
            mode,
        } => {
            out.push(7);
            put_str(out, path);
            out.extend_from_slice(&inode.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&uid.to_le_bytes());
            out.extend_from_slice(&gid.to_le_bytes());
            out.extend_from_slice(&mode.to_le_bytes());
        }
        MappingKind::Vdso => out.push(8),
        MappingKind::Vvar { name } => {
            out.push(9);
            put_str(out, name);
        }
    }
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    let len = u32::try_from(len).expect("fewer than 2^32 mappings, runs and string bytes");
    out.extend_from_slice(&len.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    put_len(out, text.len());
    out.extend_from_slice(text.as_bytes());
}

/// Reads a section written by [`encode_mappings`], one list at a time.
pub struct MappingReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> MappingReader<'a> {
    /// A reader of `bytes`, from its start.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    /// Reads the next process's mappings.
    pub fn next_list(&mut self) -> Result<Vec<Mapping>, CodecError> {
        let count = self.len(MIN_MAPPING_BYTES, "mappings")?;
        let mut mappings = Vec::with_capacity(count);
        for _ in 0..count {
            mappings.push(self.mapping()?);
        }
        Ok(mappings)
    }

    /// Fails unless every byte was read.
    pub fn finish(self) -> Result<(), CodecError> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(self.error(format!(
                "{} bytes follow the last list",
                self.bytes.len() - self.at
            )))
        }
    }

    fn mapping(&mut self) -> Result<Mapping, CodecError> {
        let start = self.u64()?;
        let end = self.u64()?;
        let bits = self.u8()?;
        if bits & !0b111 != 0 {
            return Err(self.error(format!("protection bits {bits:#x}")));
        }
        let protection = Protection {
            read: bits & 1 != 0,
            write: bits & 2 != 0,
            exec: bits & 4 != 0,
        };
        let shared = self.flag()?;
        let kind = self.kind()?;
        let count = self.len(RUN_BYTES, "page runs")?;
        let mut pages = Vec::with_capacity(count);
        for _ in 0..count {
            pages.push(PageRun {
                first_page: self.u64()?,
                count: self.u64()?,
                store_offset: self.u64()?,
                crc32c: self.u32()?,
            });
        }
        Ok(Mapping {
            start,
            end,
            protection,
            shared,
            kind,
            pages,
        })
    }

    fn kind(&mut self) -> Result<MappingKind, CodecError> {
        Ok(match self.u8()? {
            0 => MappingKind::Anonymous,
            1 => MappingKind::Heap,
            2 => MappingKind::Stack,
            3 => MappingKind::File {
                path: self.string()?,
                device: self.string()?,
                inode: self.u64()?,
                offset: self.u64()?,
            },
            4 => MappingKind::SharedAnonymous { inode: self.u64()? },
            5 => MappingKind::Memfd {
                name: self.string()?,
                inode: self.u64()?,
                offset: self.u64()?,
            },
            6 => MappingKind::SysvShm {
                key: self.u32()? as i32,
                shmid: self.u32()? as i32,
                size: self.u64()?,
                uid: self.u32()?,
                gid: self.u32()?,
                mode: self.u32()?,
                removed: self.flag()?,
            },
            7 => MappingKind::PosixShm {
                path: self.string()?,
                inode: self.u64()?,
                offset: self.u64()?,
                size: self.u64()?,
                uid: self.u32()?,
                gid: self.u32()?,
                mode: self.u32()?,
            },
            8 => MappingKind::Vdso,
            9 => MappingKind::Vvar {
                name: self.string()?,
            },
            other => return Err(self.error(format!("unknown mapping kind {other}"))),
        })
    }

    fn error(&self, reason: String) -> CodecError {
        CodecError {
            offset: self.at,
            reason,
        }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let bytes = self
            .bytes
            .get(self.at..self.at + N)
            .ok_or_else(|| self.error("truncated".into()))?;
        self.at += N;
        Ok(bytes.try_into().expect("N bytes"))
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        self.take().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, CodecError> {
        self.take().map(u64::from_le_bytes)
    }

    fn flag(&mut self) -> Result<bool, CodecError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(self.error(format!("flag byte {other}"))),
        }
    }

    /// A count of items of at least `item_bytes` each, no more than what is
    /// left could hold.
    fn len(&mut self, item_bytes: usize, what: &str) -> Result<usize, CodecError> {
        let count = self.u32()? as usize;
        let left = self.bytes.len() - self.at;
        if count > left / item_bytes {
            return Err(self.error(format!("{count} {what} cannot fit in {left} bytes")));
        }
        Ok(count)
    }

    fn string(&mut self) -> Result<String, CodecError> {
        let len = self.len(1, "string bytes")?;
        let bytes = &self.bytes[self.at..self.at + len];
        let text =
            std::str::from_utf8(bytes).map_err(|_| self.error("a string is not UTF-8".into()))?;
        self.at += len;
        Ok(text.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(start: u64, kind: MappingKind, runs: u64) -> Mapping {
        Mapping {
            start,
            end: start + 0x4000,
            protection: Protection {
                read: true,
                write: start.is_multiple_of(0x2000),
                exec: start.is_multiple_of(0x3000),
            },
            shared: matches!(kind, MappingKind::SharedAnonymous { .. }),
            kind,
            pages: (0..runs)
                .map(|index| PageRun {
                    first_page: index,
                    count: 1,
                    store_offset: (start >> 4) + index * 4096,
                    crc32c: 0xdead_beef ^ index as u32,
                })
                .collect(),
        }
    }

    fn every_kind() -> Vec<Mapping> {
        let kinds = [
            MappingKind::Anonymous,
            MappingKind::Heap,
            MappingKind::Stack,
            MappingKind::File {
                path: "/usr/lib/x86_64-linux-gnu/libc.so.6 é".into(),
                device: "fe:00".into(),
                inode: 42,
                offset: 4096,
            },
            MappingKind::SharedAnonymous { inode: 7 },
            MappingKind::Memfd {
                name: "buffers".into(),
                inode: 9,
                offset: 8192,
            },
            MappingKind::SysvShm {
                key: -5,
                shmid: 3,
                size: 56,
                uid: 1,
                gid: 2,
                mode: 0o600,
                removed: true,
            },
            MappingKind::PosixShm {
                path: "/dev/shm/PostgreSQL.1".into(),
                inode: 11,
                offset: 0,
                size: 16384,
                uid: 105,
                gid: 110,
                mode: 0o640,
            },
            MappingKind::Vdso,
            MappingKind::Vvar {
                name: "[vvar_vclock]".into(),
            },
        ];
        kinds
            .into_iter()
            .enumerate()
            .map(|(index, kind)| mapping(0x1000 * (index as u64 + 1), kind, index as u64 % 3))
            .collect()
    }

    #[test]
    fn reads_back_every_kind_and_list() {
        let lists = [every_kind(), Vec::new(), every_kind()[3..5].to_vec()];
        let mut bytes = Vec::new();
        for list in &lists {
            encode_mappings(list, &mut bytes);
        }
        let mut reader = MappingReader::new(&bytes);
        for list in &lists {
            assert_eq!(&reader.next_list().unwrap(), list);
        }
        reader.finish().unwrap();
    }

    #[test]
    fn refuses_every_truncation_and_trailing_bytes() {
        let mut bytes = Vec::new();
        encode_mappings(&every_kind(), &mut bytes);
        for len in 0..bytes.len() {
            let mut reader = MappingReader::new(&bytes[..len]);
            assert!(
                reader.next_list().is_err(),
                "{len} of {} bytes",
                bytes.len()
            );
        }
        bytes.push(0);
        let mut reader = MappingReader::new(&bytes);
        reader.next_list().unwrap();
        let err = reader.finish().unwrap_err();
        assert!(err.reason.contains("1 bytes follow"), "{err}");
    }

    #[test]
    fn refuses_hostile_counts_kinds_and_flags() {
        let mut bytes = Vec::new();
        encode_mappings(&[mapping(0x1000, MappingKind::Heap, 1)], &mut bytes);
        let cases: [(usize, &[u8], &str); 5] = [
            (0, &u32::MAX.to_le_bytes(), "mappings cannot fit"),
            (4 + 16, &[0x8], "protection bits"),
            (4 + 17, &[2], "flag byte 2"),
            (4 + 18, &[10], "unknown mapping kind 10"),
            (4 + 19, &u32::MAX.to_le_bytes(), "page runs cannot fit"),
        ];
        for (at, patch, expected) in cases {
            let mut hostile = bytes.clone();
            hostile[at..at + patch.len()].copy_from_slice(patch);
            let err = MappingReader::new(&hostile).next_list().unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
        }

        let mut bad_text = Vec::new();
        let vvar = mapping(
            0x1000,
            MappingKind::Vvar {
                name: "[vvar]".into(),
            },
            0,
        );
        encode_mappings(&[vvar], &mut bad_text);
        let name_at = bad_text.len() - 4 - "[vvar]".len();
        bad_text[name_at] = 0xff;
        let err = MappingReader::new(&bad_text).next_list().unwrap_err();
        assert!(err.reason.contains("not UTF-8"), "{err}");
    }
}
