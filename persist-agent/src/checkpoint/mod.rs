//! Checkpoint: take a live process to an image on disk.
//!
//! (Being written; see `checkpoint` in the CLI for the contract.)

use std::path::PathBuf;

/// What to checkpoint and where.
#[derive(Debug, Clone)]
pub struct CheckpointOptions {
    /// The process to checkpoint.
    pub pid: i32,
    /// The image directory to write.
    pub image: PathBuf,
    /// Let the process go on after the checkpoint instead of killing it.
    pub leave_running: bool,
}

/// Why a checkpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Not written yet.
    #[error("checkpoint is not implemented yet")]
    Unimplemented,
}

/// Checkpoints the process named by `options`.
pub fn checkpoint(options: &CheckpointOptions) -> Result<(), CheckpointError> {
    let _ = options;
    Err(CheckpointError::Unimplemented)
}
