//! Where the pager's pages come from: the image's page store, whose offsets
//! name them. (Pages of private file mappings are not the pager's: they come
//! from the file, and the written ones are written before the process runs,
//! see `file_pages.rs`.)

use std::io;
use std::sync::Arc;

use persist_common::image::Image;

/// The page store of an image.
pub(crate) struct Sources {
    image: Arc<Image>,
}

impl Sources {
    /// The page store of `image`.
    pub(crate) fn new(image: Arc<Image>) -> Self {
        Self { image }
    }

    /// The image.
    pub(crate) fn image(&self) -> &Arc<Image> {
        &self.image
    }

    /// The `len` bytes of the store at `offset`.
    pub(crate) fn read(&self, offset: u64, len: usize) -> io::Result<&[u8]> {
        let start = offset as usize;
        self.image
            .pages()
            .as_bytes()
            .get(start..start + len)
            .ok_or_else(|| io::Error::other(format!("offset {offset} past the page store")))
    }
}
