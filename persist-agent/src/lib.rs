//! persist: park server processes on disk and wake them on their first SYN.
//!
//! The library does the work; `main.rs` is a thin command-line layer over it.
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
pub mod daemon;
pub mod files;
pub mod host;
pub mod inspect;
pub mod launch;
pub mod restore;
pub mod service;
pub mod snapshot;
pub mod sys;
