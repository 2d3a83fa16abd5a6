//! Fuzzing of every parser of untrusted input in persist, on stable Rust.
//!
//! `cargo fuzz` needs a nightly toolchain; this crate is its equivalent for
//! a stable one. Each [`Target`] is a plain `fn(&[u8])` that feeds its input
//! to one parser (the image manifest, page store and working set, service
//! files, control-protocol messages) and must never panic, hang or allocate
//! without bound. The [`engine`] mutates a corpus of valid inputs that the
//! code itself generates and runs a target on each mutant in-process,
//! catching panics, with a time limit per input.
//!
//! `cargo xtask fuzz [TARGET] [--time 60s]` runs it; the crate's tests run
//! every target for a bounded number of executions from a fixed seed, and
//! every input under `regressions/`. See `docs/fuzzing.md`.

pub mod engine;
pub mod mutate;
pub mod targets;

pub use engine::{Config, Finding, Report, fuzz, run_one};
pub use targets::{TARGETS, Target, target};
