//! Seccomp filters of a frozen process, thread by thread.
//!
//! A thread's filters are read with `PTRACE_SECCOMP_GET_FILTER` (index 0 is
//! the one installed first, ENOENT past the last; ptrace(2) says the
//! opposite, the kernel's `get_nth_filter` and a test here agree on this)
//! and their flags
//! with `PTRACE_SECCOMP_GET_METADATA`. Threads made after a filter was
//! installed share it with their creator, so most threads of a process hold
//! the same chain: each distinct filter (program and flags) is stored once
//! and threads name theirs by index. The kernel gives no identity of a
//! filter object (kcmp has no seccomp type), so two threads that installed
//! the same program each are taken as sharing it.
//!
//! Refused by name: strict mode (mode 1), and filters that can return
//! `SECCOMP_RET_USER_NOTIF`, whose listener descriptor (perhaps in another
//! process) cannot come back with the filter.

use persist_common::image::{SECCOMP_INSN_LEN, SeccompFilter};

use super::{CheckpointError, status};
use crate::sys::ptrace;

/// `SECCOMP_MODE_STRICT` in /proc/PID/status.
pub const MODE_STRICT: u32 = 1;

/// `BPF_RET`, the instruction class of a filter's verdicts.
const BPF_RET: u16 = 0x06;
/// `BPF_K`: the verdict is the instruction's constant.
const BPF_K: u16 = 0x00;

/// The distinct filters of a process and each thread's chain of them.
#[derive(Debug, Default)]
pub struct SavedFilters {
    /// Each distinct filter once, in the order first met.
    pub filters: Vec<SeccompFilter>,
    /// For each thread (in the order given), indices in `filters`, the
    /// first installed first.
    pub chains: Vec<Vec<u32>>,
}

/// Reads the filters of the stopped threads `tids` of `pid`.
pub fn save(pid: i32, tids: &[i32]) -> Result<SavedFilters, CheckpointError> {
    let mut saved = SavedFilters::default();
    for &tid in tids {
        let mode = status::read(pid, Some(tid))?.seccomp.unwrap_or(0);
        if mode == MODE_STRICT {
            return Err(CheckpointError::SeccompStrict { pid, tid });
        }
        let mut chain = Vec::new();
        if mode != 0 {
            let installed = read_chain(pid, tid)?;
            let count = installed.len();
            for (position, filter) in installed.into_iter().enumerate() {
                if returns_user_notif(&filter.program) {
                    return Err(CheckpointError::SeccompUserNotif {
                        pid,
                        tid,
                        filter: position + 1,
                        count,
                    });
                }
                chain.push(saved.index_of(filter));
            }
        }
        saved.chains.push(chain);
    }
    Ok(saved)
}

impl SavedFilters {
    fn index_of(&mut self, filter: SeccompFilter) -> u32 {
        let index = match self.filters.iter().position(|known| *known == filter) {
            Some(index) => index,
            None => {
                self.filters.push(filter);
                self.filters.len() - 1
            }
        };
        index as u32
    }
}

/// Every filter of `tid`, the first installed first.
fn read_chain(pid: i32, tid: i32) -> Result<Vec<SeccompFilter>, CheckpointError> {
    let ptrace_error = |op, source| CheckpointError::Ptrace {
        pid,
        tid,
        op,
        source,
    };
    let mut chain = Vec::new();
    while let Some(program) = ptrace::seccomp_filter(tid, chain.len())
        .map_err(|e| ptrace_error("PTRACE_SECCOMP_GET_FILTER", e))?
    {
        let flags = ptrace::seccomp_filter_flags(tid, chain.len())
            .map_err(|e| ptrace_error("PTRACE_SECCOMP_GET_METADATA", e))?;
        chain.push(SeccompFilter {
            program,
            flags: flags & libc::SECCOMP_FILTER_FLAG_LOG,
        });
    }
    Ok(chain)
}

/// Whether a program has a `return SECCOMP_RET_USER_NOTIF` instruction. A
/// verdict computed at run time (`BPF_RET | BPF_A`) is not followed: no
/// filter generator emits one for this action.
fn returns_user_notif(program: &[u8]) -> bool {
    program.chunks_exact(SECCOMP_INSN_LEN).any(|insn| {
        let code = u16::from_le_bytes([insn[0], insn[1]]);
        let k = u32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
        code == BPF_RET | BPF_K && k & libc::SECCOMP_RET_ACTION_FULL == libc::SECCOMP_RET_USER_NOTIF
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insn(code: u16, k: u32) -> Vec<u8> {
        let mut bytes = code.to_le_bytes().to_vec();
        bytes.extend([0, 0]);
        bytes.extend(k.to_le_bytes());
        bytes
    }

    #[test]
    fn user_notif_verdicts_are_found() {
        let load_nr = insn(0x20, 0);
        let allow = insn(BPF_RET | BPF_K, libc::SECCOMP_RET_ALLOW);
        let notify = insn(BPF_RET | BPF_K, libc::SECCOMP_RET_USER_NOTIF | 7);
        assert!(!returns_user_notif(
            &[load_nr.clone(), allow.clone()].concat()
        ));
        assert!(returns_user_notif(&[load_nr, notify, allow].concat()));
        // A load of the constant is not a verdict.
        assert!(!returns_user_notif(&insn(
            0x00,
            libc::SECCOMP_RET_USER_NOTIF
        )));
    }

    #[test]
    fn equal_filters_are_stored_once() {
        let mut saved = SavedFilters::default();
        let filter = |k, flags| SeccompFilter {
            program: insn(BPF_RET | BPF_K, k),
            flags,
        };
        assert_eq!(saved.index_of(filter(1, 0)), 0);
        assert_eq!(saved.index_of(filter(2, 0)), 1);
        assert_eq!(saved.index_of(filter(1, 0)), 0);
        // The same program logging is another filter.
        assert_eq!(saved.index_of(filter(1, 2)), 2);
        assert_eq!(saved.filters.len(), 3);
    }
}
