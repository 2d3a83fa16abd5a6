//! Facts about this machine that an image depends on: kernel build and CPU state size.

use persist_common::image::{CpuInfo, KernelInfo};

use crate::sys::cpu;

/// The running kernel, as `uname` reports it.
pub fn kernel_info() -> KernelInfo {
    let uts = nix::sys::utsname::uname().expect("uname cannot fail");
    KernelInfo {
        release: uts.release().to_string_lossy().into_owned(),
        version: uts.version().to_string_lossy().into_owned(),
        machine: uts.machine().to_string_lossy().into_owned(),
    }
}

/// The xsave state of this CPU: XCR0 and the size of the xsave area.
pub fn cpu_info() -> CpuInfo {
    CpuInfo {
        xcr0: cpu::xcr0(),
        xsave_size: cpu::xsave_size(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_and_cpu_are_plausible() {
        let kernel = kernel_info();
        assert!(!kernel.release.is_empty());
        assert_eq!(kernel.machine, "x86_64");
        let cpu = cpu_info();
        // x87 and SSE state are always enabled on x86-64 with xsave.
        assert_eq!(cpu.xcr0 & 0b11, 0b11, "xcr0 {:#x}", cpu.xcr0);
        // The legacy area (512) plus the xsave header (64) at least.
        assert!(cpu.xsave_size >= 576, "xsave size {}", cpu.xsave_size);
    }
}
