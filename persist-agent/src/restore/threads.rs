//! The process's threads: the ones after the first created with their
//! recorded tids, then each thread's own state. Natively, in restorer tables:
//! rseq, alternate signal stack, name, clear_child_tid, robust list, seccomp
//! filters and credentials (last), pending signals and POSIX timers; then,
//! from outside, registers, xsave area, signal mask and pending signals, and
//! the seccomp filters handed back to the kernel. Timers are armed last,
//! perhaps only at the resume ([`ResumeTable`]).

use persist_common::image::{Manifest, ThreadInfo};

use super::pager::Pager;
use super::runner::{self, TableRunner};
use super::spawn::TRACE_OPTIONS;
use super::table::{Table, TableBuilder};
use super::{RestoreError, creds, locks, seccomp, signals, timers};
use crate::sys::clone;
use crate::sys::ptrace::{self, Regs, Stop, reg};

/// Creates the threads after the first with their recorded tids; returns
/// every thread's tid in our namespace, the leader first.
/// The filters every thread shares are installed first, so that the
/// threads inherit them (see [`seccomp`]); from then on the process is
/// traced with its filters suspended until [`restore_state`]
/// is done.
pub(super) fn create(
    runner: &mut TableRunner<'_>,
    manifest: &Manifest,
) -> Result<Vec<i32>, RestoreError> {
    let mut tids = vec![runner.pid];
    let filtered = !manifest.process.seccomp_filters.is_empty();
    if filtered {
        ptrace::set_options(runner.pid, TRACE_OPTIONS | libc::PTRACE_O_SUSPEND_SECCOMP)
            .map_err(RestoreError::ptrace(runner.pid, "suspend seccomp"))?;
    }
    let shared = seccomp::shared_prefix(&manifest.threads);
    if manifest.threads.len() == 1 && shared.is_empty() {
        return Ok(tids);
    }
    let mut t = runner.table();
    seccomp::append(&mut t, &manifest.process.seccomp_filters, shared)?;
    for thread in &manifest.threads[1..] {
        let set_tid = t.data(&thread.tid.to_ne_bytes());
        let args = t.data(&clone::thread_clone_args(set_tid));
        t.call(
            format!("clone3 of thread {}", thread.tid),
            libc::SYS_clone3,
            &[args, clone::CLONE_ARGS_SIZE as u64],
        );
    }
    let created = runner.run(runner.pid, t.finish(), false)?;
    if created.len() != manifest.threads.len() - 1 {
        return Err(RestoreError::Unexpected {
            pid: runner.pid,
            what: format!(
                "{} threads created, {} expected",
                created.len(),
                manifest.threads.len() - 1
            ),
        });
    }
    for &tid in &created {
        match ptrace::wait(tid).map_err(RestoreError::ptrace(tid, "wait"))? {
            Stop::Event { .. } | Stop::Signal(libc::SIGSTOP) => {}
            other => {
                return Err(RestoreError::Unexpected {
                    pid: tid,
                    what: format!("{other:?} as a new thread's first stop"),
                });
            }
        }
        if filtered {
            // Inherited from the creator's tracing; set all the same.
            ptrace::set_options(tid, TRACE_OPTIONS | libc::PTRACE_O_SUSPEND_SECCOMP)
                .map_err(RestoreError::ptrace(tid, "suspend seccomp"))?;
        }
    }
    tids.extend(created);
    Ok(tids)
}

/// Per-thread state and credentials (natively, last), pending signals
/// queued, POSIX timers created and the restorer region unmapped, then
/// registers, xsave and signal masks set from outside; `tids` are the
/// threads in manifest order. Returns the table to run when the process
/// resumes, when it has timers to arm then (the region stays until then).
pub(super) fn restore_state(
    runner: &mut TableRunner<'_>,
    manifest: &Manifest,
    tids: &[i32],
    pager: &mut Pager,
    parent_restored: bool,
) -> Result<Option<ResumeTable>, RestoreError> {
    let pid = runner.pid;
    let current_creds = creds::own();
    let shared = seccomp::shared_prefix(&manifest.threads).len();
    for (thread, &tid) in manifest.threads.iter().zip(tids) {
        if let Some(rseq) = &thread.rseq {
            // The kernel writes the rseq area at registration.
            pager.prefill_page(rseq.address)?;
            pager.prefill_page(rseq.address + u64::from(rseq.length.max(1)) - 1)?;
        }
        let mut t = runner.table();
        per_thread(&mut t, thread);
        // Before the credentials, while the thread may still install
        // any filter; the filters are suspended until the end.
        seccomp::append(
            &mut t,
            &manifest.process.seccomp_filters,
            &thread.seccomp[shared..],
        )?;
        if let Some(current) = &current_creds {
            creds::append(&mut t, &manifest.process.credentials, current);
        }
        runner.run(tid, t.finish(), false)?;
    }
    // Last: the region goes, so the main thread faults right after the
    // munmap returns; that SIGSEGV is the expected end. Before it, with
    // every thread made and credentialed, the main thread queues the
    // recorded signals again, takes the file locks (a POSIX lock is the
    // taking process's) and creates the POSIX timers (which may signal any
    // thread). Timers on running clocks are armed, and the
    // region unmapped, only when the process resumes (see `timers.rs`).
    let mut t = runner.table();
    // After the credentials, whose change clears the parent-death signal.
    parent_death_and_subreaper(&mut t, manifest, parent_restored);
    signals::append(&mut t, manifest)?;
    locks::append(&mut t, manifest);
    timers::create(&mut t, manifest);
    let at_resume = timers::arm_at_resume(manifest);
    let resume_table = if at_resume {
        runner.run(pid, t.finish(), false)?;
        let mut t = runner.table();
        timers::arm(&mut t, manifest);
        unmap_region(&mut t, runner);
        let table = t.finish();
        runner.load(&table)?;
        Some(ResumeTable {
            table,
            sigmask: manifest.threads[0].sigmask,
            seccomp: !manifest.process.seccomp_filters.is_empty(),
        })
    } else {
        timers::arm(&mut t, manifest);
        unmap_region(&mut t, runner);
        runner.run(pid, t.finish(), true)?;
        None
    };

    for (thread, &tid) in manifest.threads.iter().zip(tids) {
        set_thread_state(tid, thread)?;
        // Every thread starts on its stack top and TLS: those pages
        // alone, so that a parked skeleton stays a few pages small
        // (their neighbours fault in on the wake).
        for hot in [thread.regs[reg::RSP], thread.regs[reg::FS_BASE]] {
            pager.prefill_page(hot)?;
        }
    }
    signals::raise_unrecorded(pid, tids, manifest)?;
    if !manifest.process.seccomp_filters.is_empty() {
        // The filters apply from the thread's first instruction on,
        // whether it resumes under ptrace or from a group stop.
        for &tid in tids {
            ptrace::set_options(tid, TRACE_OPTIONS)
                .map_err(RestoreError::ptrace(tid, "resume seccomp"))?;
        }
    }
    Ok(resume_table)
}

/// The main thread's parent-death signal and the process's child
/// subreaper bit, as recorded. The parent-death signal only when its
/// parent is restored with it (a descendant of a tree): the parent of a
/// restored root is the agent, whose exit must not kill it.
fn parent_death_and_subreaper(t: &mut TableBuilder, manifest: &Manifest, parent_restored: bool) {
    let process = &manifest.process;
    if process.pdeath_signal != 0 && parent_restored {
        t.call(
            format!("prctl(PR_SET_PDEATHSIG, {})", process.pdeath_signal),
            libc::SYS_prctl,
            &[
                libc::PR_SET_PDEATHSIG as u64,
                u64::from(process.pdeath_signal),
            ],
        );
    }
    if process.child_subreaper {
        t.call(
            "prctl(PR_SET_CHILD_SUBREAPER)",
            libc::SYS_prctl,
            &[libc::PR_SET_CHILD_SUBREAPER as u64, 1],
        );
    }
}

fn unmap_region(t: &mut TableBuilder, runner: &TableRunner<'_>) {
    t.call(
        "unmap the restorer region",
        libc::SYS_munmap,
        &[runner.region.base, runner.region.size],
    );
}

/// The last table of a restore, loaded in the restorer region and run by
/// the main thread when the process resumes: it arms the timers and
/// unmaps the region.
#[derive(Debug)]
pub(super) struct ResumeTable {
    table: Table,
    /// The main thread's own signal mask, put back after the run.
    sigmask: u64,
    /// Whether the process runs under seccomp filters, suspended for the
    /// run (they may forbid what the table calls).
    seccomp: bool,
}

impl ResumeTable {
    /// Runs the table in the stopped main thread `pid`, which is left as
    /// it was: registers, signal mask and seccomp filters.
    pub(super) fn run(&self, pid: i32) -> Result<(), RestoreError> {
        let regs = ptrace::get_regs(pid).map_err(RestoreError::ptrace(pid, "getregs"))?;
        // Pending signals stay pending: a delivery would stop the run.
        ptrace::set_sigmask(pid, u64::MAX).map_err(RestoreError::ptrace(pid, "block signals"))?;
        if self.seccomp {
            ptrace::set_options(pid, TRACE_OPTIONS | libc::PTRACE_O_SUSPEND_SECCOMP)
                .map_err(RestoreError::ptrace(pid, "suspend seccomp"))?;
        }
        runner::execute(pid, &self.table, true)?;
        if self.seccomp {
            ptrace::set_options(pid, TRACE_OPTIONS)
                .map_err(RestoreError::ptrace(pid, "resume seccomp"))?;
        }
        ptrace::set_regs(pid, &regs).map_err(RestoreError::ptrace(pid, "setregs"))?;
        ptrace::set_sigmask(pid, self.sigmask).map_err(RestoreError::ptrace(pid, "set signal mask"))
    }
}

/// rseq, alternate signal stack and clear_child_tid of one thread.
/// `sizeof(struct robust_list_head)` on x86-64: three pointer-sized words.
const ROBUST_LIST_HEAD_LEN: u64 = 24;

fn per_thread(t: &mut TableBuilder, thread: &ThreadInfo) {
    if let Some(rseq) = &thread.rseq {
        t.call(
            format!("rseq registration at {:#x}", rseq.address),
            libc::SYS_rseq,
            &[
                rseq.address,
                u64::from(rseq.length),
                0,
                u64::from(rseq.signature),
            ],
        );
    }
    let stack = thread.sigaltstack;
    let enabled = stack.flags & libc::SS_DISABLE == 0 && stack.size > 0;
    let words = if enabled {
        [stack.sp, 0, stack.size]
    } else {
        [0, libc::SS_DISABLE as u64, 0]
    };
    let address = t.words(&words);
    t.call("sigaltstack", libc::SYS_sigaltstack, &[address, 0]);
    let mut name = thread.comm.as_bytes().to_vec();
    name.truncate(15);
    name.push(0);
    let name_addr = t.data(&name);
    t.call(
        format!("set thread name {}", thread.comm),
        libc::SYS_prctl,
        &[libc::PR_SET_NAME as u64, name_addr],
    );
    t.call(
        "set_tid_address",
        libc::SYS_set_tid_address,
        &[thread.clear_child_tid],
    );
    // Always set: a thread made here has none, and the main thread has the
    // agent's forking thread's, an address meaning nothing in this process.
    // The kernel accepts only the head's own size, also to clear it.
    let (head, len) = thread
        .robust_list
        .map_or((0, ROBUST_LIST_HEAD_LEN), |list| (list.head, list.len));
    t.call(
        format!("set_robust_list at {head:#x}"),
        libc::SYS_set_robust_list,
        &[head, len],
    );
}

/// Final registers, xsave area and signal mask of a stopped thread.
fn set_thread_state(tid: i32, thread: &ThreadInfo) -> Result<(), RestoreError> {
    let mut regs: Regs = thread.regs.as_slice().try_into().map_err(|_| {
        RestoreError::Layout(format!(
            "thread {}: {} register words, expected {}",
            thread.tid,
            thread.regs.len(),
            ptrace::USER_REGS_WORDS
        ))
    })?;
    normalize_syscall_restart(&mut regs);
    ptrace::set_regs(tid, &regs).map_err(RestoreError::ptrace(tid, "setregs"))?;
    if !thread.xsave.is_empty() {
        ptrace::set_xstate(tid, &thread.xsave)
            .map_err(RestoreError::ptrace(tid, "set xsave area"))?;
    }
    ptrace::set_sigmask(tid, thread.sigmask)
        .map_err(RestoreError::ptrace(tid, "set signal mask"))?;
    Ok(())
}

/// A thread recorded inside an interrupted syscall resumes by re-entering it
/// (as the kernel would have); the checkpoint usually did this already.
fn normalize_syscall_restart(regs: &mut Regs) {
    const RESTART: [i64; 3] = [-512, -513, -514];
    let in_syscall = regs[reg::ORIG_RAX] as i64;
    if in_syscall >= 0 {
        let rax = regs[reg::RAX] as i64;
        if RESTART.contains(&rax) {
            regs[reg::RAX] = in_syscall as u64;
            regs[reg::RIP] -= 2;
        } else if rax == -516 {
            regs[reg::RAX] = (-i64::from(libc::EINTR)) as u64;
        }
    }
    regs[reg::ORIG_RAX] = u64::MAX;
}
