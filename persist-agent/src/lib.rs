//! persist: park server processes on disk and wake them on their first SYN.
//!
//! The library does the work; `main.rs` is a thin command-line layer over it.
//! Without the default `daemon` feature the crate is the checkpoint/restore
//! engine alone (no tokio, aya, metrics or argument parsing): see
//! `examples/checkpoint_and_restore.rs` for checkpointing a process and
//! restoring it from Rust.
//!
//! - [`daemon`]: the agent: loads the BPF side, holds listeners, wakes and
//!   parks services, serves the control socket.
//! - [`checkpoint`]: takes a live process to an image on disk.
//! - [`restore`]: rebuilds a process from an image, its memory paged in lazily.
//! - [`files`]: saving and recreating file descriptors, shared by both.
//! - [`sys`]: the raw system calls, behind safe functions.
#![deny(missing_docs)]

pub mod checkpoint;
pub mod control;
#[cfg(feature = "daemon")]
pub mod daemon;
pub mod error_text;
pub mod files;
pub mod host;
pub mod inspect;
pub mod launch;
pub mod process_tree;
// The bulk copy and the fault log are driven by the daemon's wake path only.
#[cfg_attr(not(feature = "daemon"), allow(dead_code, unused_imports))]
pub mod restore;
pub mod service;
pub mod service_file;
pub mod service_log;
pub mod snapshot;
pub mod sys;
#[cfg(test)]
mod test_support;
