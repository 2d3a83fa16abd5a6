//! Registering owned descriptors with tokio's reactor.

use std::io;
use std::os::fd::AsRawFd;

use tokio::io::unix::AsyncFd;

/// Wraps a descriptor-owning value so that tokio can await its readiness.
pub fn watch<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: the AsyncFd takes ownership of `inner`, which owns its
    // descriptor, so the descriptor stays open for as long as it is
    // registered and is deregistered before `inner` closes it.
    unsafe { AsyncFd::register(inner) }.map_err(|err| err.into_parts().1)
}
