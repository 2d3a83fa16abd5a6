//! Where the pager's pages come from.
//!
//! Most pages are in the image's page store. A private file mapping the
//! process wrote to (a library's `.data`, its relocated `.got`) is restored as
//! anonymous memory the pager serves, so that a parked skeleton holds none of
//! it: its written pages come from the store, the others from the file
//! itself, read when needed.
//!
//! Every page has one offset in a single space: the store's bytes first,
//! then each such file mapping's pages after a one-page gap, so that pages
//! with consecutive offsets always come from one place and can be copied
//! with one ioctl.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use persist_common::image::{Image, PAGE_SIZE};

/// The pages of one file mapping served from the file.
struct FileRange {
    /// First offset of the range in the page space.
    start: u64,
    /// One past its last offset.
    end: u64,
    /// The file, opened (and checked) when the skeleton was prepared.
    file: Arc<File>,
    /// Offset in the file of the range's first page.
    file_offset: u64,
}

/// The page store of an image and the files of its written file mappings.
pub(crate) struct Sources {
    image: Arc<Image>,
    files: Vec<FileRange>,
}

impl Sources {
    /// Sources with only the image's page store.
    pub(crate) fn new(image: Arc<Image>) -> Self {
        Self {
            image,
            files: Vec::new(),
        }
    }

    /// The image.
    pub(crate) fn image(&self) -> &Arc<Image> {
        &self.image
    }

    /// Adds `pages` pages of `file` from `file_offset` on, and returns the
    /// offset of the first in the page space.
    pub(crate) fn add_file(&mut self, file: Arc<File>, file_offset: u64, pages: u64) -> u64 {
        let after = self
            .files
            .last()
            .map_or(self.image.pages().len().next_multiple_of(PAGE_SIZE), |r| {
                r.end
            });
        let start = after + PAGE_SIZE;
        self.files.push(FileRange {
            start,
            end: start + pages * PAGE_SIZE,
            file,
            file_offset,
        });
        start
    }

    /// True when `offset` lies in the page store (whose runs carry checksums).
    pub(crate) fn in_store(&self, offset: u64) -> bool {
        offset < self.image.pages().len()
    }

    /// The `len` bytes at `offset`, which lie in one source: a slice of the
    /// store, or read from the file into `scratch` (zeros past its end).
    pub(crate) fn read<'a>(
        &'a self,
        offset: u64,
        len: usize,
        scratch: &'a mut Vec<u8>,
    ) -> io::Result<&'a [u8]> {
        if self.in_store(offset) {
            let start = offset as usize;
            return self
                .image
                .pages()
                .as_bytes()
                .get(start..start + len)
                .ok_or_else(|| io::Error::other(format!("offset {offset} past the page store")));
        }
        let range = self
            .files
            .iter()
            .find(|r| r.start <= offset && offset + len as u64 <= r.end)
            .ok_or_else(|| io::Error::other(format!("no source for page offset {offset}")))?;
        scratch.clear();
        scratch.resize(len, 0);
        let mut position = range.file_offset + (offset - range.start);
        let mut filled = 0;
        while filled < len {
            match range.file.read_at(&mut scratch[filled..], position) {
                Ok(0) => break,
                Ok(read) => {
                    filled += read;
                    position += read as u64;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(&scratch[..])
    }
}
