//! CPU facts an image depends on: XCR0 (`xgetbv`) and the xsave area size
//! (`cpuid` leaf 0xD).

use std::arch::x86_64::{__cpuid, __cpuid_count};

/// Bit 27 of `cpuid(1).ecx`: the OS has enabled xsave (`OSXSAVE`), so
/// `xgetbv` may be executed.
const CPUID1_ECX_OSXSAVE: u32 = 1 << 27;

/// XCR0, the state components the kernel enabled; 0 if xsave is off.
pub fn xcr0() -> u64 {
    let leaf1 = __cpuid(1);
    if leaf1.ecx & CPUID1_ECX_OSXSAVE == 0 {
        return 0;
    }
    let (low, high): (u32, u32);
    // SAFETY: OSXSAVE is set, so xgetbv with ecx = 0 (XCR0) is a valid,
    // side-effect-free instruction at any privilege level.
    unsafe {
        std::arch::asm!(
            "xgetbv",
            in("ecx") 0u32,
            out("eax") low,
            out("edx") high,
            options(nomem, nostack, preserves_flags),
        );
    }
    (u64::from(high) << 32) | u64::from(low)
}

/// Size in bytes of the xsave area for the components enabled in XCR0
/// (`cpuid(0xD, 0).ebx`).
pub fn xsave_size() -> u32 {
    __cpuid_count(0xD, 0).ebx
}

/// Size in bytes of the xsave area for every component the CPU supports
/// (`cpuid(0xD, 0).ecx`): an upper bound for the `NT_X86_XSTATE` regset.
pub fn xsave_max_size() -> u32 {
    __cpuid_count(0xD, 0).ecx
}
