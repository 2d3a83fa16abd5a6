//! Types shared by the persist agent and its BPF programs, and the on-disk
//! image format of a checkpointed process.
#![deny(missing_docs)]

pub mod bpf;
pub mod image;
pub mod trust;
