//! Per-thread state: registers, xsave area, signal mask and pending
//! signals, alternate signal stack, rseq registration, clear-child-tid.
//!
//! # Interrupted system calls
//!
//! A thread stopped by `PTRACE_INTERRUPT` while blocked in a system call is
//! on its way out of it with `rax` holding an internal restart code, which
//! the kernel would turn into a restart when the thread resumes. The image
//! holds *ready-to-resume* registers instead, as CRIU does:
//!
//! - `-ERESTARTSYS`, `-ERESTARTNOINTR`, `-ERESTARTNOHAND`: `rip` is moved
//!   back over the 2-byte `syscall` instruction and `rax` set to the system
//!   call number, so the call is made again;
//! - `-ERESTART_RESTARTBLOCK`: the same with `rax = __NR_restart_syscall`
//!   (the restored thread has no restart block, so the kernel completes that
//!   with `-EINTR`, which callers of `nanosleep` and the like handle).
//!
//! In every case the image's `orig_rax` is -1: the thread is not in a
//! system call, so restoring the registers never triggers a second restart.

use std::fs;

use persist_common::image::{QueuedSignal, RobustList, Rseq, SigAltStack, ThreadInfo};

use crate::sys::procmem::ProcMem;
use crate::sys::ptrace::{self, Regs, reg};

use super::CheckpointError;
use super::inject::Injector;
use super::recovery::Journal;
use super::status;

const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;
/// `PR_GET_TID_ADDRESS`: reads the clear-child-tid address.
const PR_GET_TID_ADDRESS: u64 = 40;

/// Saves the state of stopped thread `tid` of process `pid`. `syscall_at`
/// is the address of a `syscall` instruction for injected calls (recorded
/// in `journal`), `xsave_len` an upper bound of the xsave area's size and
/// `seccomp` the thread's chain of filters, read before.
pub fn save_thread(
    pid: i32,
    tid: i32,
    mem: &ProcMem,
    syscall_at: u64,
    xsave_len: usize,
    seccomp: Vec<u32>,
    journal: &Journal,
) -> Result<ThreadInfo, CheckpointError> {
    let ptrace_error = |op, source| CheckpointError::Ptrace {
        pid,
        tid,
        op,
        source,
    };
    let regs = ptrace::get_regs(tid).map_err(|e| ptrace_error("PTRACE_GETREGS", e))?;
    let xsave = ptrace::get_xstate(tid, xsave_len)
        .map_err(|e| ptrace_error("PTRACE_GETREGSET NT_X86_XSTATE", e))?;
    let sigmask = ptrace::get_sigmask(tid).map_err(|e| ptrace_error("PTRACE_GETSIGMASK", e))?;
    let rseq_config = ptrace::get_rseq_configuration(tid)
        .map_err(|e| ptrace_error("PTRACE_GET_RSEQ_CONFIGURATION", e))?;
    let rseq = (rseq_config.rseq_abi_pointer != 0).then_some(Rseq {
        address: rseq_config.rseq_abi_pointer,
        length: rseq_config.rseq_abi_size,
        signature: rseq_config.signature,
    });
    let (robust_head, robust_len) =
        ptrace::get_robust_list(tid).map_err(|e| ptrace_error("get_robust_list", e))?;
    let robust_list = (robust_head != 0).then_some(RobustList {
        head: robust_head,
        len: robust_len,
    });
    let pending = status::read(pid, Some(tid))?.sigpnd;
    let queue = queued_signals(tid, false).map_err(|e| ptrace_error("PTRACE_PEEKSIGINFO", e))?;
    let comm_path = format!("/proc/{pid}/task/{tid}/comm");
    let comm = fs::read_to_string(&comm_path)
        .map_err(|source| CheckpointError::Proc {
            pid,
            path: comm_path,
            source,
        })?
        .trim_end_matches('\n')
        .to_owned();

    let mut injector = Injector::new(pid, tid, mem, syscall_at, journal)?;
    let scratch = injector.scratch();
    injector.checked_syscall("sigaltstack", libc::SYS_sigaltstack, &[0, scratch])?;
    let [sp, flags, size] = injector.read_scratch_words::<3>(0)?;
    injector.checked_syscall(
        "prctl(PR_GET_TID_ADDRESS)",
        libc::SYS_prctl,
        &[PR_GET_TID_ADDRESS, scratch + 32],
    )?;
    let [clear_child_tid] = injector.read_scratch_words::<1>(32)?;
    injector.finish()?;

    Ok(ThreadInfo {
        tid,
        comm,
        regs: resume_registers(regs).to_vec(),
        xsave,
        sigmask,
        pending,
        queue,
        sigaltstack: SigAltStack {
            sp,
            flags: flags as u32 as i32,
            size,
        },
        rseq,
        clear_child_tid,
        robust_list,
        seccomp,
    })
}

/// The signals queued for stopped thread `tid`, or for its whole process
/// when `shared`, in queue order.
pub fn queued_signals(tid: i32, shared: bool) -> std::io::Result<Vec<QueuedSignal>> {
    Ok(ptrace::queued_siginfo(tid, shared)?
        .into_iter()
        .map(|record| QueuedSignal(record.to_vec()))
        .collect())
}

/// The registers with which the thread resumes correctly: see the module doc.
pub fn resume_registers(mut regs: Regs) -> Regs {
    let in_syscall = regs[reg::ORIG_RAX] as i64;
    if in_syscall >= 0 {
        match -(regs[reg::RAX] as i64) {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                regs[reg::RAX] = in_syscall as u64;
                regs[reg::RIP] -= 2;
            }
            ERESTART_RESTARTBLOCK => {
                regs[reg::RAX] = libc::SYS_restart_syscall as u64;
                regs[reg::RIP] -= 2;
            }
            _ => {}
        }
    }
    regs[reg::ORIG_RAX] = u64::MAX;
    regs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs_with(orig_rax: i64, rax: i64, rip: u64) -> Regs {
        let mut regs = [0; ptrace::USER_REGS_WORDS];
        regs[reg::ORIG_RAX] = orig_rax as u64;
        regs[reg::RAX] = rax as u64;
        regs[reg::RIP] = rip;
        regs
    }

    #[test]
    fn restartable_syscalls_are_rewound() {
        for code in [ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND] {
            let regs = resume_registers(regs_with(7, -code, 0x1002));
            assert_eq!(regs[reg::RAX], 7);
            assert_eq!(regs[reg::RIP], 0x1000);
            assert_eq!(regs[reg::ORIG_RAX], u64::MAX);
        }
        let regs = resume_registers(regs_with(35, -ERESTART_RESTARTBLOCK, 0x1002));
        assert_eq!(regs[reg::RAX], libc::SYS_restart_syscall as u64);
        assert_eq!(regs[reg::RIP], 0x1000);
    }

    #[test]
    fn completed_syscalls_and_user_code_are_kept() {
        let regs = resume_registers(regs_with(0, -libc::EINTR as i64, 0x1002));
        assert_eq!(regs[reg::RAX], -libc::EINTR as i64 as u64);
        assert_eq!(regs[reg::RIP], 0x1002);
        let regs = resume_registers(regs_with(-1, 42, 0x2000));
        assert_eq!(regs[reg::RAX], 42);
        assert_eq!(regs[reg::RIP], 0x2000);
    }
}
