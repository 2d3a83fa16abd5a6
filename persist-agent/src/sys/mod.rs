//! Raw system calls behind safe functions.
//!
//! Every `unsafe` block of the agent lives below this module, each with a
//! `// SAFETY:` comment; the rest of the crate calls the safe wrappers, whose
//! errors name the call that failed.

pub mod alloc;
#[cfg(feature = "daemon")]
pub mod async_fd;
pub mod blob;
pub mod clone;
pub mod cpu;
pub mod fd_passing;
pub mod fdops;
pub mod fscreds;
pub mod ipc;
pub mod kobjects;
pub mod lease;
pub mod notify;
pub mod pidfd;
pub mod procmem;
pub mod ptrace;
pub mod rlimit;
pub mod sched;
pub mod sigchld;
pub mod sockdiag;
pub mod spawn;
pub mod spawner;
pub mod sysv_ipc;
pub mod tcp_repair;
pub mod uffd;
