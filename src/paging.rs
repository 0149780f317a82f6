//! ksave's identity map. asm/tables.s maps 0-4 GiB with 2 MiB pages, enough
//! for both entry paths; here, where the CPU has 1 GiB pages, the rest of the
//! first PDPT is filled so that RAM and 64-bit BARs up to 512 GiB are mapped.

use core::sync::atomic::{AtomicU64, Ordering};

unsafe extern "C" {
    static mut boot_pdpt: [u64; 512];
    static mut boot_pd: [u64; 2048];
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

/// Page-level write-through and cache-disable (Intel SDM vol. 3A 4.9,
/// 11.12.3): with either MTRR type, PWT|PCD makes the page UC.
const PWT_PCD: u64 = (1 << 3) | (1 << 4);

/// Makes `[addr, addr + len)` reachable for MMIO: inside the identity map
/// and uncacheable. Below 4 GiB this marks the 2 MiB pages holding it UC (PCI
/// MMIO shares no 2 MiB page with RAM on the machines ksave runs on: the
/// PCI hole is 2 MiB aligned in practice); above, 1 GiB pages are left to
/// the MTRRs, which firmware sets to UC for MMIO windows.
pub fn map_mmio(addr: u64, len: u64) -> Result<(), &'static str> {
    let end = addr.checked_add(len).ok_or("MMIO range overflows")?;
    if end > identity_end() {
        return Err("MMIO range beyond ksave's identity map");
    }
    let first = addr >> 21;
    let last = (end - 1) >> 21;
    if last < 2048 {
        // SAFETY: boot_pd is ksave's own table; only the cache bits of the
        // MMIO pages change, and invlpg drops their stale translations.
        unsafe {
            let pd = &raw mut boot_pd;
            for page in first..=last {
                (*pd)[page as usize] |= PWT_PCD;
                x86::tlb::flush((page << 21) as usize);
            }
        }
    }
    Ok(())
}
