//! The daemon's `SIGCHLD` disposition.

use std::io;

/// Adds `SA_NOCLDSTOP` to the installed `SIGCHLD` handler: children that
/// stop or continue no longer signal the daemon, only children that exit.
///
/// Parked skeletons stop (`SIGSTOP`) when prepared and continue (`SIGCONT`) on
/// their SYN; each `SIGCHLD` made the daemon scan /proc for zombies
/// (docs/kernel-facts.md, Costs that shaped the wake path) and ran a signal
/// handler on one of its threads, right when the woken process wants that CPU.
/// Tracers are still woken in `waitpid` for their tracees' stops: the flag only
/// silences the signal.
pub fn ignore_child_stops() -> io::Result<()> {
    // SAFETY: an all-zero sigaction is valid, and sigaction only reads and
    // writes the two structs we pass, which live for the calls. The handler
    // installed (tokio's) is kept as it is; only its flags change.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut action) < 0 {
            return Err(io::Error::last_os_error());
        }
        action.sa_flags |= libc::SA_NOCLDSTOP;
        if libc::sigaction(libc::SIGCHLD, &action, std::ptr::null_mut()) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_is_added_and_the_handler_kept() {
        // SAFETY: as above; reading the disposition only.
        let read = || unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            assert_eq!(
                libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut action),
                0
            );
            action
        };
        let before = read();
        ignore_child_stops().unwrap();
        let after = read();
        assert_ne!(after.sa_flags & libc::SA_NOCLDSTOP, 0);
        assert_eq!(after.sa_sigaction, before.sa_sigaction);
    }
}
