//! Checking stored pages against their checksums before they are used.

use persist_common::image::{Image, Mapping, PAGE_SIZE, PageRun};

use super::RestoreError;

/// Checks every page run of `image` against its checksum.
pub(super) fn all_pages(image: &Image) -> Result<(), RestoreError> {
    for mapping in &image.manifest().mappings {
        for (index, run) in mapping.pages.iter().enumerate() {
            image
                .pages()
                .run(run)
                .map_err(|err| RestoreError::CorruptImage {
                    address: mapping.start + run.first_page * PAGE_SIZE,
                    reason: format!("page run {index} of mapping {:#x}: {err}", mapping.start),
                })?;
        }
    }
    Ok(())
}

/// The address and checksum-verified contents of one stored run of `mapping`.
pub(super) fn stored_run<'a>(
    image: &'a Image,
    mapping: &Mapping,
    run: &PageRun,
) -> Result<(u64, &'a [u8]), RestoreError> {
    let address = mapping.start + run.first_page * PAGE_SIZE;
    let bytes = image
        .pages()
        .run(run)
        .map_err(|err| RestoreError::CorruptImage {
            address,
            reason: err.to_string(),
        })?;
    Ok((address, bytes))
}
