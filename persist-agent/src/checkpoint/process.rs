//! Process-wide state: identity, command line, directories, limits,
//! credentials, signal handlers, interval and POSIX timers and the mm
//! fields.
//!
//! Most comes from /proc; what /proc does not show (handlers, timers, the
//! exact brk, securebits) is asked by system calls injected into the
//! stopped thread-group leader.

use std::fs;

use persist_common::image::{ITimer, MmFields, ProcessInfo, Rlimit, SigAction};

use crate::sys::procmem::ProcMem;
use crate::sys::rlimit;

use super::CheckpointError;
use super::inject::Injector;
use super::posix_timers;
use super::recovery::Journal;
use super::status;

/// `RLIM_NLIMITS`: resource limits 0 to 15.
const RLIMIT_COUNT: u32 = 16;
/// `PR_GET_SECUREBITS`.
const PR_GET_SECUREBITS: u64 = 27;
/// Highest signal number.
const MAX_SIGNAL: u64 = 64;
/// `SIG_DFL`.
const SIG_DFL: u64 = 0;

/// Saves the process-wide state of stopped process `pid`, injecting calls
/// into its leader thread through the `syscall` instruction at `syscall_at`
/// (recorded in `journal`); `tids` are its threads.
pub fn save_process(
    pid: i32,
    mem: &ProcMem,
    syscall_at: u64,
    tids: &[i32],
    journal: &Journal,
) -> Result<ProcessInfo, CheckpointError> {
    let procfs_error = |what, source| CheckpointError::ProcFs { pid, what, source };
    let process = procfs::process::Process::new(pid).map_err(|e| procfs_error("process", e))?;
    let stat = process.stat().map_err(|e| procfs_error("stat", e))?;
    let status = status::read(pid, None)?;
    let listed_timers = posix_timers::list(pid)?;

    let mut injector = Injector::new(pid, pid, mem, syscall_at, journal)?;
    let scratch = injector.scratch();
    // Only signals ignored or caught have a disposition other than the
    // default worth asking about.
    let non_default = status.sigign | status.sigcgt;
    let mut sigactions = Vec::new();
    for signal in (1..=MAX_SIGNAL).filter(|s| non_default & (1 << (s - 1)) != 0) {
        injector.checked_syscall(
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            &[signal, 0, scratch, 8],
        )?;
        let [handler, flags, restorer, mask] = injector.read_scratch_words::<4>(0)?;
        if handler != SIG_DFL {
            sigactions.push(SigAction {
                signal: signal as u32,
                handler,
                flags,
                restorer,
                mask,
            });
        }
    }
    let mut itimers = Vec::new();
    for which in [libc::ITIMER_REAL, libc::ITIMER_VIRTUAL, libc::ITIMER_PROF] {
        injector.checked_syscall("getitimer", libc::SYS_getitimer, &[which as u64, scratch])?;
        let [interval_s, interval_us, value_s, value_us] = injector.read_scratch_words::<4>(0)?;
        itimers.push(ITimer {
            which: which as u32,
            interval_us: interval_s * 1_000_000 + interval_us,
            value_us: value_s * 1_000_000 + value_us,
        });
    }
    let posix_timers = posix_timers::save(pid, &mut injector, &listed_timers, tids)?;
    let brk = injector.checked_syscall("brk", libc::SYS_brk, &[0])? as u64;
    let securebits = injector.checked_syscall(
        "prctl(PR_GET_SECUREBITS)",
        libc::SYS_prctl,
        &[PR_GET_SECUREBITS],
    )? as u32;
    // Both write an int at the address given; /proc shows neither.
    injector.checked_syscall(
        "prctl(PR_GET_PDEATHSIG)",
        libc::SYS_prctl,
        &[libc::PR_GET_PDEATHSIG as u64, scratch],
    )?;
    let [pdeath_word] = injector.read_scratch_words::<1>(0)?;
    injector.checked_syscall(
        "prctl(PR_GET_CHILD_SUBREAPER)",
        libc::SYS_prctl,
        &[libc::PR_GET_CHILD_SUBREAPER as u64, scratch],
    )?;
    let [subreaper_word] = injector.read_scratch_words::<1>(0)?;
    injector.finish()?;

    let rlimits = read_rlimits(pid)?;

    let credentials =
        crate::restore::credentials_from_status(&status, securebits).ok_or_else(|| {
            CheckpointError::ProcField {
                pid,
                path: format!("/proc/{pid}/status"),
                field: "CapBnd, CapAmb or NoNewPrivs".into(),
            }
        })?;

    let auxv_bytes = read_proc(pid, "auxv")?;
    let auxv = auxv_bytes
        .chunks_exact(8)
        .map(|chunk| u64::from_ne_bytes(chunk.try_into().expect("8-byte chunk")))
        .collect();
    let mm = MmFields {
        start_code: stat.startcode,
        end_code: stat.endcode,
        start_data: stat.start_data.unwrap_or(0),
        end_data: stat.end_data.unwrap_or(0),
        start_brk: stat.start_brk.unwrap_or(0),
        brk,
        start_stack: stat.startstack,
        arg_start: stat.arg_start.unwrap_or(0),
        arg_end: stat.arg_end.unwrap_or(0),
        env_start: stat.env_start.unwrap_or(0),
        env_end: stat.env_end.unwrap_or(0),
        auxv,
    };

    let personality_text = String::from_utf8_lossy(&read_proc(pid, "personality")?).into_owned();
    let personality = u32::from_str_radix(personality_text.trim(), 16).map_err(|_| {
        CheckpointError::ProcField {
            pid,
            path: format!("/proc/{pid}/personality"),
            field: "personality".into(),
        }
    })?;

    Ok(ProcessInfo {
        pid,
        pgid: stat.pgrp,
        sid: stat.session,
        comm: stat.comm.clone(),
        exe: read_link(pid, "exe")?,
        argv: split_nul(&read_proc(pid, "cmdline")?),
        environ: split_nul(&read_proc(pid, "environ")?),
        cwd: read_link(pid, "cwd")?,
        root: read_link(pid, "root")?,
        umask: status::required(pid, "Umask", status.umask)?,
        personality,
        pdeath_signal: pdeath_word as u32,
        child_subreaper: subreaper_word as u32 != 0,
        rlimits,
        credentials,
        sigactions,
        shared_pending: status.shdpnd,
        shared_queue: super::threads::queued_signals(pid, true).map_err(|source| {
            CheckpointError::Ptrace {
                pid,
                tid: pid,
                op: "PTRACE_PEEKSIGINFO_SHARED",
                source,
            }
        })?,
        itimers,
        posix_timers,
        // Filled in by the caller, with the descriptors.
        file_locks: Vec::new(),
        mm,
        // Filled in by the caller, from every thread's filters.
        seccomp_filters: Vec::new(),
    })
}

fn read_proc(pid: i32, name: &str) -> Result<Vec<u8>, CheckpointError> {
    let path = format!("/proc/{pid}/{name}");
    fs::read(&path).map_err(|source| CheckpointError::Proc { pid, path, source })
}

fn read_link(pid: i32, name: &str) -> Result<String, CheckpointError> {
    let path = format!("/proc/{pid}/{name}");
    fs::read_link(&path)
        .map(|target| target.to_string_lossy().into_owned())
        .map_err(|source| CheckpointError::Proc { pid, path, source })
}

/// Splits NUL-terminated strings (cmdline, environ).
fn split_nul(bytes: &[u8]) -> Vec<String> {
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes
        .split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// Every resource limit of `pid`. prlimit(2) on a process of another user
/// needs CAP_SYS_RESOURCE, which the agent may lack; /proc/PID/limits shows
/// the same values to root, in `RLIMIT_*` order.
fn read_rlimits(pid: i32) -> Result<Vec<Rlimit>, CheckpointError> {
    let direct: Result<Vec<Rlimit>, _> = (0..RLIMIT_COUNT)
        .map(|resource| {
            rlimit::get(pid, resource).map(|(soft, hard)| Rlimit {
                resource,
                soft,
                hard,
            })
        })
        .collect();
    match direct {
        Ok(rlimits) => Ok(rlimits),
        Err(err) if err.raw_os_error() == Some(libc::EPERM) => rlimits_from_proc(pid),
        Err(source) => Err(CheckpointError::Proc {
            pid,
            path: "prlimit".into(),
            source,
        }),
    }
}

fn rlimits_from_proc(pid: i32) -> Result<Vec<Rlimit>, CheckpointError> {
    let limits = procfs::process::Process::new(pid)
        .and_then(|process| process.limits())
        .map_err(|source| CheckpointError::ProcFs {
            pid,
            what: "limits",
            source,
        })?;
    let value = |value: &procfs::process::LimitValue| match value {
        procfs::process::LimitValue::Unlimited => u64::MAX,
        procfs::process::LimitValue::Value(value) => *value,
    };
    // In `RLIMIT_*` order, as the kernel prints them.
    let ordered = [
        &limits.max_cpu_time,
        &limits.max_file_size,
        &limits.max_data_size,
        &limits.max_stack_size,
        &limits.max_core_file_size,
        &limits.max_resident_set,
        &limits.max_processes,
        &limits.max_open_files,
        &limits.max_locked_memory,
        &limits.max_address_space,
        &limits.max_file_locks,
        &limits.max_pending_signals,
        &limits.max_msgqueue_size,
        &limits.max_nice_priority,
        &limits.max_realtime_priority,
        &limits.max_realtime_timeout,
    ];
    Ok(ordered
        .iter()
        .zip(0..RLIMIT_COUNT)
        .map(|(limit, resource)| Rlimit {
            resource,
            soft: value(&limit.soft_limit),
            hard: value(&limit.hard_limit),
        })
        .collect())
}
