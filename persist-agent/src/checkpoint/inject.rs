//! Running system calls inside a stopped thread, for the state only the
//! thread itself can ask the kernel about (sigaltstack, the clear-child-tid
//! address, signal handlers, interval timers, brk, securebits).
//!
//! How: the thread's registers and signal mask are saved; every signal is
//! blocked (so a pending one cannot be delivered in between; it stays
//! pending); the registers are set to the call (`orig_rax = -1`, so the
//! kernel does not try to restart the syscall the thread was interrupted
//! in) with `rip` at a `syscall` instruction already in the process (in
//! the vDSO, or else in executable mappings), so no code is written;
//! `PTRACE_SYSCALL` runs it, from its entry stop to its exit stop. Results
//! that are written to memory go to a scratch area below the thread's red
//! zone, whose bytes are saved first. [`Injector::finish`] (or drop) puts
//! back the bytes, the registers and the mask exactly.
//!
//! The agent may die at any instant of this: what undoes it is in the
//! checkpoint's [`Journal`] before anything changes, and the process is in a
//! group stop, so it waits for [`super::recover`]. System-call stops rather
//! than single steps, because a tracer that dies before collecting a
//! single-step trap leaves a SIGTRAP to the thread, which kills it; a
//! system-call stop (`PTRACE_O_TRACESYSGOOD`) carries no real signal.

use persist_common::image::{Mapping, MappingKind};

use crate::sys::procmem::ProcMem;
use crate::sys::ptrace::{self, Regs, Stop, reg};

use super::CheckpointError;
use super::recovery::{Journal, ThreadUndo};

/// Bytes of scratch space used for syscall outputs.
pub const SCRATCH_LEN: usize = 256;

/// The x86-64 ABI's red zone below `rsp`, which leaf functions may use.
const RED_ZONE: u64 = 128;

/// The `syscall` instruction.
const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];

/// Finds the address of a `syscall` instruction (the bytes `0f 05`: the
/// CPU decodes from wherever `rip` points, so any occurrence will do) in
/// the vDSO, or failing that in the executable mappings, so that injected
/// calls need no code written into the process.
pub fn find_syscall_insn(
    mem: &ProcMem,
    mappings: &[Mapping],
    pid: i32,
) -> Result<u64, CheckpointError> {
    const CHUNK: u64 = 64 * 1024;
    let vdso = mappings.iter().filter(|m| m.kind == MappingKind::Vdso);
    let executable = mappings
        .iter()
        .filter(|m| m.protection.exec && m.kind != MappingKind::Vdso);
    for mapping in vdso.chain(executable) {
        let mut start = mapping.start;
        while start < mapping.end {
            // Overlap chunks by one byte so a pair split between two is found.
            let end = (start + CHUNK + 1).min(mapping.end);
            let mut code = vec![0u8; (end - start) as usize];
            if mem.read_exact_at(start, &mut code).is_err() {
                // An unreadable mapping (e.g. a file truncated under it).
                break;
            }
            if let Some(at) = code.windows(2).position(|w| w == SYSCALL_INSN) {
                return Ok(start + at as u64);
            }
            start += CHUNK;
        }
    }
    Err(CheckpointError::NoSyscallInsn { pid })
}

/// A stopped thread prepared for injected system calls.
pub struct Injector<'a> {
    pid: i32,
    tid: i32,
    mem: &'a ProcMem,
    syscall_at: u64,
    saved_regs: Regs,
    saved_mask: u64,
    scratch: u64,
    saved_scratch: [u8; SCRATCH_LEN],
    journal: &'a Journal,
    restored: bool,
}

impl<'a> Injector<'a> {
    /// Saves the state of stopped thread `tid`, records it in `journal`,
    /// and blocks its signals.
    pub fn new(
        pid: i32,
        tid: i32,
        mem: &'a ProcMem,
        syscall_at: u64,
        journal: &'a Journal,
    ) -> Result<Self, CheckpointError> {
        let ptrace_error = |op, source| CheckpointError::Ptrace {
            pid,
            tid,
            op,
            source,
        };
        let saved_regs = ptrace::get_regs(tid).map_err(|e| ptrace_error("PTRACE_GETREGS", e))?;
        let saved_mask =
            ptrace::get_sigmask(tid).map_err(|e| ptrace_error("PTRACE_GETSIGMASK", e))?;
        let scratch = (saved_regs[reg::RSP] - RED_ZONE - SCRATCH_LEN as u64) & !15;
        let mut saved_scratch = [0u8; SCRATCH_LEN];
        mem.read_exact_at(scratch, &mut saved_scratch)
            .map_err(|source| CheckpointError::Memory {
                pid,
                addr: scratch,
                len: SCRATCH_LEN,
                what: "scratch space below the stack pointer",
                source,
            })?;
        journal.injecting(ThreadUndo {
            tid,
            regs: saved_regs.to_vec(),
            sigmask: saved_mask,
            scratch_at: scratch,
            scratch: saved_scratch.to_vec(),
        })?;
        let injector = Self {
            pid,
            tid,
            mem,
            syscall_at,
            saved_regs,
            saved_mask,
            scratch,
            saved_scratch,
            journal,
            restored: false,
        };
        ptrace::set_sigmask(tid, u64::MAX).map_err(|e| ptrace_error("PTRACE_SETSIGMASK", e))?;
        Ok(injector)
    }

    /// Address of the scratch area ([`SCRATCH_LEN`] bytes, 16-aligned).
    pub fn scratch(&self) -> u64 {
        self.scratch
    }

    /// Runs system call `nr` with `args` in the thread and returns its raw
    /// result (a negative errno on failure).
    pub fn syscall(
        &mut self,
        name: &'static str,
        nr: i64,
        args: &[u64],
    ) -> Result<i64, CheckpointError> {
        const ARG_REGS: [usize; 6] = [reg::RDI, reg::RSI, reg::RDX, reg::R10, reg::R8, reg::R9];
        assert!(args.len() <= ARG_REGS.len());
        let mut regs = self.saved_regs;
        regs[reg::RAX] = nr as u64;
        regs[reg::ORIG_RAX] = u64::MAX;
        regs[reg::RIP] = self.syscall_at;
        for (&index, &value) in ARG_REGS.iter().zip(args) {
            regs[index] = value;
        }
        self.ptrace(ptrace::set_regs(self.tid, &regs), "PTRACE_SETREGS")?;
        // To the call's entry stop, then to its exit stop.
        self.to_syscall_stop(name)?;
        self.to_syscall_stop(name)?;
        let after = self.ptrace(ptrace::get_regs(self.tid), "PTRACE_GETREGS")?;
        self.journal.pause_for_tests();
        Ok(after[reg::RAX] as i64)
    }

    fn to_syscall_stop(&self, name: &'static str) -> Result<(), CheckpointError> {
        self.ptrace(ptrace::syscall_step(self.tid), "PTRACE_SYSCALL")?;
        let stop = self.ptrace(ptrace::wait(self.tid), "waitpid")?;
        if stop != Stop::Signal(ptrace::SYSCALL_STOP_SIGNAL) {
            return Err(CheckpointError::UnexpectedStop {
                pid: self.pid,
                tid: self.tid,
                during: name,
                stop: format!("{stop:?}"),
            });
        }
        Ok(())
    }

    /// Like [`Injector::syscall`], but a negative result is an error naming the call.
    pub fn checked_syscall(
        &mut self,
        name: &'static str,
        nr: i64,
        args: &[u64],
    ) -> Result<i64, CheckpointError> {
        let rc = self.syscall(name, nr, args)?;
        if rc < 0 {
            return Err(CheckpointError::InjectedSyscall {
                pid: self.pid,
                tid: self.tid,
                syscall: name,
                errno: -rc as i32,
            });
        }
        Ok(rc)
    }

    /// Reads `len` bytes of the scratch area at `offset`.
    pub fn read_scratch(&self, offset: usize, len: usize) -> Result<Vec<u8>, CheckpointError> {
        assert!(offset + len <= SCRATCH_LEN);
        let mut out = vec![0u8; len];
        let addr = self.scratch + offset as u64;
        self.mem
            .read_exact_at(addr, &mut out)
            .map_err(|source| CheckpointError::Memory {
                pid: self.pid,
                addr,
                len,
                what: "injected syscall output",
                source,
            })?;
        Ok(out)
    }

    /// Reads the scratch area at `offset` as native-endian u64 words.
    pub fn read_scratch_words<const N: usize>(
        &self,
        offset: usize,
    ) -> Result<[u64; N], CheckpointError> {
        let bytes = self.read_scratch(offset, N * 8)?;
        let mut words = [0u64; N];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            *word = u64::from_ne_bytes(chunk.try_into().expect("8-byte chunk"));
        }
        Ok(words)
    }

    /// Puts back the scratch bytes, the registers and the signal mask.
    pub fn finish(mut self) -> Result<(), CheckpointError> {
        self.restore()
    }

    fn restore(&mut self) -> Result<(), CheckpointError> {
        self.restored = true;
        self.mem
            .write_all_at(self.scratch, &self.saved_scratch)
            .map_err(|source| CheckpointError::Memory {
                pid: self.pid,
                addr: self.scratch,
                len: SCRATCH_LEN,
                what: "restoring scratch space",
                source,
            })?;
        self.ptrace(
            ptrace::set_regs(self.tid, &self.saved_regs),
            "PTRACE_SETREGS",
        )?;
        self.ptrace(
            ptrace::set_sigmask(self.tid, self.saved_mask),
            "PTRACE_SETSIGMASK",
        )?;
        self.journal.restored(self.tid)
    }

    fn ptrace<T>(
        &self,
        result: std::io::Result<T>,
        op: &'static str,
    ) -> Result<T, CheckpointError> {
        result.map_err(|source| CheckpointError::Ptrace {
            pid: self.pid,
            tid: self.tid,
            op,
            source,
        })
    }
}

impl Drop for Injector<'_> {
    fn drop(&mut self) {
        if !self.restored {
            let _ = self.restore();
        }
    }
}
