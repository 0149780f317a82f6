//! ksave's identity map. asm/tables.s maps 0-4 GiB with 2 MiB pages, enough
//! for both entry paths; here, where the CPU has 1 GiB pages, the rest of the
//! first PDPT is filled so that RAM and 64-bit BARs up to 512 GiB are mapped.

use core::sync::atomic::{AtomicU64, Ordering};

unsafe extern "C" {
    static mut boot_pdpt: [u64; 512];
}

const GIB: u64 = 1 << 30;
/// Present | writable | page size (Intel SDM vol. 3A 4.5, table 4-16).
const HUGE_PAGE: u64 = 0x83;

static IDENTITY_END: AtomicU64 = AtomicU64::new(4 * GIB);

/// Extends the identity map as far as the CPU allows; returns its end.
pub fn init() -> u64 {
    // CPUID.80000001h:EDX bit 26: 1-GByte pages (Intel SDM vol. 2A, CPUID).
    let has_1g_pages = core::arch::x86_64::__cpuid(0x8000_0001).edx & (1 << 26) != 0;
    if has_1g_pages {
        // SAFETY: boot_pdpt is ksave's own table; entries 4..512 are unused by
        // the boot map and get identity 1 GiB pages. Interrupts are off and
        // this CPU is the only one running, so reloading CR3 flushes every
        // stale translation.
        unsafe {
            let pdpt = &raw mut boot_pdpt;
            for gib in 4..512u64 {
                (*pdpt)[gib as usize] = gib * GIB | HUGE_PAGE;
            }
            x86::controlregs::cr3_write(x86::controlregs::cr3());
        }
        IDENTITY_END.store(512 * GIB, Ordering::Relaxed);
    }
    identity_end()
}

/// One past the highest identity-mapped physical address.
pub fn identity_end() -> u64 {
    IDENTITY_END.load(Ordering::Relaxed)
}

/// Describes the identity map for banners.
pub struct Describe;

impl core::fmt::Display for Describe {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match identity_end() >> 30 {
            4 => write!(f, "identity map 0-4 GiB (2 MiB pages; this CPU has no 1 GiB pages)"),
            end => write!(f, "identity map 0-{end} GiB (2 MiB pages to 4 GiB, 1 GiB pages above)"),
        }
    }
}
