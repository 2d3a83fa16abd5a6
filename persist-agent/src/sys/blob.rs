//! The restorer blob: a tiny position-independent routine that runs a table
//! of system calls natively inside a process being restored.
//!
//! Injecting syscalls one by one with ptrace is slow (docs/kernel-facts.md,
//! Costs that shaped the restore); a restore needs hundreds (one mmap per
//! mapping). Instead the forked child copies this routine and a prepared table
//! into a scratch region that is free in the target layout, and jumps there.
//! The routine can then unmap the agent's memory from under itself, build the
//! target layout, and stop with `int3` so that the tracer can inspect the
//! results.
//!
//! Calling convention: `rdi` = address of the first [`SyscallEntry`],
//! `rsi` = number of entries. The routine uses no stack. It stops (`int3`)
//! after the last entry, or right after the first entry whose result is an
//! error (`-4095..=-1`), with `r12` pointing at that entry and `r13` holding
//! the number of entries not yet completed (0 on success). A thread created
//! by a `clone3` entry (result 0 in the new thread) parks at an `int3` of its
//! own and never runs the rest of the table.

use std::io;

/// One system call of a table: number, six arguments and the result the
/// routine stores back.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyscallEntry {
    /// System call number.
    pub nr: u64,
    /// Arguments, in `rdi, rsi, rdx, r10, r8, r9` order.
    pub args: [u64; 6],
    /// Result (`rax`) once executed.
    pub result: u64,
}

/// Size of one table entry in bytes.
pub const ENTRY_SIZE: usize = std::mem::size_of::<SyscallEntry>();

impl SyscallEntry {
    /// An entry for system call `nr` with up to six arguments.
    pub fn new(nr: i64, args: &[u64]) -> Self {
        let mut all = [0u64; 6];
        all[..args.len()].copy_from_slice(args);
        Self {
            nr: nr as u64,
            args: all,
            result: 0,
        }
    }

    /// The entry as bytes, for copying into the region.
    pub fn to_bytes(&self) -> [u8; ENTRY_SIZE] {
        let mut out = [0u8; ENTRY_SIZE];
        let words = [
            self.nr,
            self.args[0],
            self.args[1],
            self.args[2],
            self.args[3],
            self.args[4],
            self.args[5],
            self.result,
        ];
        for (chunk, word) in out.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        out
    }

    /// Reads the result word from an entry's bytes.
    pub fn result_from_bytes(bytes: &[u8]) -> u64 {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[56..64]);
        u64::from_ne_bytes(word)
    }
}

core::arch::global_asm!(
    ".pushsection .text.persist_restorer,\"ax\",@progbits",
    ".balign 16",
    ".globl persist_restorer_start",
    "persist_restorer_start:",
    "    mov r12, rdi",
    "    mov r13, rsi",
    "2:",
    "    test r13, r13",
    "    jz 5f",
    "    mov rax, [r12]",
    "    mov rdi, [r12 + 8]",
    "    mov rsi, [r12 + 16]",
    "    mov rdx, [r12 + 24]",
    "    mov r10, [r12 + 32]",
    "    mov r8, [r12 + 40]",
    "    mov r9, [r12 + 48]",
    "    syscall",
    "    mov [r12 + 56], rax",
    // A new thread from clone3 returns 0: park it before it runs the table.
    "    cmp qword ptr [r12], 435",
    "    jne 3f",
    "    test rax, rax",
    "    jz 6f",
    "3:",
    "    cmp rax, -4095",
    "    jae 5f",
    "    add r12, 64",
    "    dec r13",
    "    jmp 2b",
    "5:",
    "    int3",
    "    jmp 5b",
    "6:",
    "    int3",
    "    jmp 6b",
    ".globl persist_restorer_end",
    "persist_restorer_end:",
    ".popsection",
);

unsafe extern "C" {
    static persist_restorer_start: u8;
    static persist_restorer_end: u8;
}

/// The machine code of the routine; execution starts at its first byte.
pub fn code() -> &'static [u8] {
    // SAFETY: both symbols are defined by the global_asm! above, in one
    // section, start before end; the bytes between them are the routine's
    // code, which is never written.
    unsafe {
        let start = &raw const persist_restorer_start;
        let end = &raw const persist_restorer_end;
        std::slice::from_raw_parts(start, end.offset_from(start) as usize)
    }
}

/// Maps `bytes` read-write-execute at exactly `address` (which must be free:
/// `MAP_FIXED_NOREPLACE`) in the calling process and copies them there.
/// Async-signal-safe: no allocation, raw system calls only.
pub fn map_region(address: u64, size: usize, bytes: &[u8]) -> io::Result<()> {
    if bytes.len() > size {
        return Err(io::Error::from_raw_os_error(libc::E2BIG));
    }
    // SAFETY: mmap with MAP_FIXED_NOREPLACE never replaces an existing
    // mapping, so no memory in use can be affected.
    let mapped = unsafe {
        libc::mmap(
            address as *mut libc::c_void,
            size,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    if mapped as u64 != address {
        return Err(io::Error::from_raw_os_error(libc::EEXIST));
    }
    // SAFETY: the destination is the fresh mapping of `size >= bytes.len()`
    // bytes just created; the source is a live slice; they cannot overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), mapped.cast::<u8>(), bytes.len());
    }
    Ok(())
}

/// Jumps to the routine at `entry` with a table of `count` entries at
/// `table`. Never returns: the routine stops the process with `int3` for its
/// tracer, which takes it from there.
///
/// # Safety
///
/// `entry` must hold a copy of [`code`] and `table` `count` valid entries,
/// both in memory that the table itself does not unmap; the calling process
/// must be a forked child that is traced (or the `int3` kills it), because
/// the table will typically destroy the memory this Rust code runs from.
pub unsafe fn jump(entry: u64, table: u64, count: u64) -> ! {
    // SAFETY: per the contract above; the routine needs no stack and takes
    // its arguments in rdi and rsi.
    unsafe {
        core::arch::asm!(
            "jmp {entry}",
            entry = in(reg) entry,
            in("rdi") table,
            in("rsi") count,
            options(noreturn)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_is_small_and_ends_in_int3_loops() {
        let code = code();
        assert!(code.len() > 40 && code.len() < 200, "{} bytes", code.len());
        assert!(code.contains(&0xcc));
    }

    #[test]
    fn entry_bytes_round_trip_result() {
        let mut entry = SyscallEntry::new(libc::SYS_getpid, &[1, 2]);
        entry.result = 77;
        let bytes = entry.to_bytes();
        assert_eq!(SyscallEntry::result_from_bytes(&bytes), 77);
        assert_eq!(&bytes[8..16], &1u64.to_ne_bytes());
    }
}
