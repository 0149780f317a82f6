//! Telling QEMU how ksave ended, and only QEMU.

use core::sync::atomic::{AtomicU8, Ordering};
use x86::io::{inb, outb, outw};

/// Codes written to QEMU's isa-debug-exit device; QEMU exits with
/// `(code << 1) | 1`, so none of them can look like a plain exit 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// Finished what it was asked to do: QEMU exits 33.
    Success = 0x10,
    /// Refused or failed, and said why: QEMU exits 35.
    Failure = 0x11,
    /// A CPU exception: QEMU exits 37.
    Exception = 0x12,
    /// Started to resume, but no image may be resumed: QEMU exits 39 (a
    /// machine would boot normally).
    NoImage = 0x13,
}

const DEBUG_EXIT_PORT: u16 = 0xf4;
const FW_CFG_SELECTOR: u16 = 0x510;
const FW_CFG_DATA: u16 = 0x511;

const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;
static IS_QEMU: AtomicU8 = AtomicU8::new(UNKNOWN);

/// True on QEMU. Ports are only probed once CPUID says a hypervisor is
/// present, so real hardware never sees the probe.
pub fn is_qemu() -> bool {
    match IS_QEMU.load(Ordering::Relaxed) {
        YES => return true,
        NO => return false,
        _ => {}
    }
    // Leaf 1 ECX bit 31 is "hypervisor present" (Intel SDM vol. 2A, CPUID,
    // table 3-10: reserved for VMMs to report themselves).
    let hypervisor = core::arch::x86_64::__cpuid(1).ecx & (1 << 31) != 0;
    let qemu = hypervisor && {
        // SAFETY: a hypervisor is present, and QEMU's fw_cfg lives at
        // 0x510/0x511 (QEMU docs/specs/fw_cfg.rst): selecting key 0
        // (signature) and reading 4 bytes has no other effect.
        unsafe {
            outw(FW_CFG_SELECTOR, 0);
            [inb(FW_CFG_DATA), inb(FW_CFG_DATA), inb(FW_CFG_DATA), inb(FW_CFG_DATA)] == *b"QEMU"
        }
    };
    IS_QEMU.store(if qemu { YES } else { NO }, Ordering::Relaxed);
    qemu
}

/// Exits QEMU with `code` if this is QEMU with an isa-debug-exit device;
/// returns otherwise.
pub fn exit(code: ExitCode) {
    if is_qemu() {
        // SAFETY: on QEMU, port 0xf4 is isa-debug-exit when the harness adds
        // it (`-device isa-debug-exit,iobase=0xf4`), and unassigned (writes
        // ignored) when it does not.
        unsafe { outb(DEBUG_EXIT_PORT, code as u8) };
    }
}
