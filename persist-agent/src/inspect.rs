//! `persist-agent inspect`: a readable summary of an image.

use std::path::Path;

use persist_common::image::{Image, ImageError};

/// Renders a readable summary of the image in `dir`.
pub fn inspect(dir: &Path) -> Result<String, ImageError> {
    let image = Image::open(dir)?;
    let manifest = image.manifest();
    Ok(format!(
        "process {} ({}), {} threads, {} mappings, {} fds, {} bytes of pages, kernel {}\n",
        manifest.process.pid,
        manifest.process.comm,
        manifest.threads.len(),
        manifest.mappings.len(),
        manifest.fds.len(),
        manifest.page_store_bytes,
        manifest.kernel.release
    ))
}
