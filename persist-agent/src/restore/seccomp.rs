//! Seccomp filters, installed by each restored thread itself
//! (`seccomp(SECCOMP_SET_MODE_FILTER)` applies to the calling thread).
//!
//! The agent traces the process with `PTRACE_O_SUSPEND_SECCOMP` from the
//! first filter on until every thread is fully rebuilt, so no call of the
//! restore is filtered, however strict the filter: the order of the calls
//! does not matter for that, and filters are installed while the thread
//! still holds the agent's CAP_SYS_ADMIN, before its credentials are set.
//! A filter installed by a thread that has since dropped CAP_SYS_ADMIN
//! without setting no_new_privs could not be installed after them.
//!
//! The filters every thread shares (the longest common prefix of their
//! chains) are installed by the main thread before it creates the others,
//! which inherit them: they share the kernel's filter objects as the
//! originals did, so `SECCOMP_FILTER_FLAG_TSYNC` from one of them works as
//! it did. Each thread then installs the rest of its chain. Filters shared
//! by only some of the threads come back as equal copies in each: the same
//! verdicts, but a TSYNC among those threads alone would now fail.

use persist_common::image::{SECCOMP_INSN_LEN, SeccompFilter, ThreadInfo};

use super::RestoreError;
use super::table::TableBuilder;

/// `SECCOMP_SET_MODE_FILTER`.
const SET_MODE_FILTER: u64 = 1;

/// The filters at the start of every thread's chain.
pub fn shared_prefix(threads: &[ThreadInfo]) -> &[u32] {
    let Some((first, others)) = threads.split_first() else {
        return &[];
    };
    let len = others.iter().fold(first.seccomp.len(), |len, thread| {
        first.seccomp[..len]
            .iter()
            .zip(&thread.seccomp)
            .take_while(|(a, b)| a == b)
            .count()
    });
    &first.seccomp[..len]
}

/// Appends the calls that install `chain` (indices in `filters`, the first
/// installed first) in the thread running the table.
pub fn append(
    t: &mut TableBuilder,
    filters: &[SeccompFilter],
    chain: &[u32],
) -> Result<(), RestoreError> {
    for &index in chain {
        let filter = filters.get(index as usize).ok_or_else(|| {
            RestoreError::Layout(format!(
                "seccomp filter {index} is named by a thread, but the image holds {}",
                filters.len()
            ))
        })?;
        let program = t.data(&filter.program);
        let instructions = (filter.program.len() / SECCOMP_INSN_LEN) as u64;
        // struct sock_fprog: the count (an unsigned short, padded), then a
        // pointer to the instructions.
        let fprog = t.words(&[instructions, program]);
        t.call(
            format!("seccomp filter {index} ({instructions} instructions)"),
            libc::SYS_seccomp,
            &[SET_MODE_FILTER, filter.flags, fprog],
        );
    }
    Ok(())
}

/// Room the tables need for the filters, beyond the other calls.
pub fn table_room(filters: &[SeccompFilter]) -> u64 {
    filters
        .iter()
        .map(|filter| filter.program.len() as u64 + 64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread(seccomp: &[u32]) -> ThreadInfo {
        ThreadInfo {
            tid: 1,
            comm: String::new(),
            regs: Vec::new(),
            xsave: Vec::new(),
            sigmask: 0,
            pending: 0,
            queue: Vec::new(),
            sigaltstack: Default::default(),
            rseq: None,
            clear_child_tid: 0,
            robust_list: None,
            seccomp: seccomp.to_vec(),
        }
    }

    #[test]
    fn the_shared_prefix_is_what_every_thread_starts_with() {
        assert_eq!(shared_prefix(&[]), &[] as &[u32]);
        assert_eq!(shared_prefix(&[thread(&[0, 1])]), &[0, 1]);
        let threads = [thread(&[0, 1]), thread(&[0, 1, 2]), thread(&[0, 1])];
        assert_eq!(shared_prefix(&threads), &[0, 1]);
        let threads = [thread(&[0, 1, 2]), thread(&[0, 3]), thread(&[0, 1])];
        assert_eq!(shared_prefix(&threads), &[0]);
        let threads = [thread(&[0]), thread(&[])];
        assert_eq!(shared_prefix(&threads), &[] as &[u32]);
    }
}
