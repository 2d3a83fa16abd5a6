//! Helpers for the crate's unit tests.

/// Returns from the calling test, saying so on stderr, unless it runs as
/// root: tests that trace processes or use userfaultfd on another process
/// need it, and a plain `cargo test` by another user skips them.
macro_rules! require_root {
    () => {
        if !nix::unistd::geteuid().is_root() {
            eprintln!(
                "skipped {}: needs root (run `cargo xtask test` as root)",
                std::thread::current().name().unwrap_or("this test")
            );
            return;
        }
    };
}

pub(crate) use require_root;
