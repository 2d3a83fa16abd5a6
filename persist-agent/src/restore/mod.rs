//! Restore: rebuild a process from an image, its memory paged in lazily.
//!
//! (Being written; see `restore` in the CLI for the contract.)

use std::path::PathBuf;

/// What to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The image directory.
    pub image: PathBuf,
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Not written yet.
    #[error("restore is not implemented yet")]
    Unimplemented,
}

/// Restores the image detached from the caller and returns the pid of the
/// restored process as seen from the caller's pid namespace.
pub fn restore_detached(options: &RestoreOptions) -> Result<i32, RestoreError> {
    let _ = options;
    Err(RestoreError::Unimplemented)
}
