//! ksave's identity map. asm/tables.s maps 0-4 GiB with 2 MiB pages, enough
//! for both entry paths; here, where the CPU has 1 GiB pages, the rest of the
//! first PDPT is filled so that RAM and 64-bit BARs up to 512 GiB are mapped.
//! Without them, [`map_ram_to`] maps RAM above 4 GiB with 2 MiB pages from a
//! small pool of page directories, up to [`END_WITHOUT_1G_PAGES`].

use core::sync::atomic::{AtomicU64, Ordering};

unsafe extern "C" {
    static boot_pml4: [u64; 512];
    static boot_pml5: [u64; 512];
    static mut boot_pdpt: [u64; 512];
    static mut boot_pd: [u64; 2048];
    /// asm/entry.s: switches paging mode with paging briefly off.
    fn ksave_set_paging(la57: u64, root: u64);
}

/// CR4.LA57: 5-level paging (Intel SDM vol. 3A 2.5).
pub const CR4_LA57: u64 = 1 << 12;

pub use ksave_format::cpu_has_la57;

/// Whether ksave runs with 5-level paging now.
pub fn la57_active() -> bool {
    // SAFETY: reading CR4 has no side effects.
    unsafe { x86::controlregs::cr4().bits() as u64 & CR4_LA57 != 0 }
}

/// Puts ksave's identity map under a 4- or 5-level root, as `la57` asks
/// (the same map either way: boot_pml5 holds boot_pml4).
///
/// # Safety
/// With `la57`, the CPU must have LA57 ([`cpu_has_la57`]). Interrupts off;
/// the caller's stack and code must be in ksave's image (identity-mapped
/// below 4 GiB under both roots).
pub unsafe fn set_la57(la57: bool) {
    if la57 == la57_active() {
        return;
    }
    let root = if la57 { &raw const boot_pml5 as u64 } else { &raw const boot_pml4 as u64 };
    // SAFETY: upheld by the caller; both roots identity-map ksave's image,
    // which is below 4 GiB (linker.ld), as 32-bit code needs.
    unsafe { ksave_set_paging(if la57 { CR4_LA57 } else { 0 }, root) }
}

const GIB: u64 = 1 << 30;
/// Present | writable | page size (Intel SDM vol. 3A 4.5, table 4-16).
const HUGE_PAGE: u64 = 0x83;

static IDENTITY_END: AtomicU64 = AtomicU64::new(4 * GIB);

/// Page directories for RAM above 4 GiB on CPUs without 1 GiB pages: one a
/// GiB. Four cost 16 KiB of image and reach 8 GiB; such CPUs (before about
/// 2010) rarely have more, and a save refuses what stays unmapped.
const EXTRA_PDS: usize = 4;
/// How far [`map_ram_to`] reaches without 1 GiB pages.
pub const END_WITHOUT_1G_PAGES: u64 = (4 + EXTRA_PDS as u64) * GIB;

#[repr(C, align(4096))]
struct PageDirectories([[u64; 512]; EXTRA_PDS]);

/// In .bss: cleared on every entry, filled by map_ram_to.
static mut EXTRA: PageDirectories = PageDirectories([[0; 512]; EXTRA_PDS]);

/// Maps RAM up to `end` if it is above the identity map; fails when the CPU
/// has no 1 GiB pages and `end` is beyond [`END_WITHOUT_1G_PAGES`].
pub fn map_ram_to(end: u64) -> Result<(), &'static str> {
    let mapped = identity_end();
    if end <= mapped {
        return Ok(());
    }
    if end > END_WITHOUT_1G_PAGES {
        return Err("RAM beyond what ksave maps on a CPU without 1 GiB pages");
    }
    // SAFETY: EXTRA and boot_pdpt are ksave's own tables; each directory gets
    // 512 identity 2 MiB pages of its GiB before the PDPT entry that makes it
    // reachable is written, and the CR3 reload then drops stale
    // translations. Interrupts are off, one CPU runs.
    unsafe {
        let extra = &raw mut EXTRA;
        let pdpt = &raw mut boot_pdpt;
        for gib in mapped / GIB..end.div_ceil(GIB) {
            let pd = &mut (*extra).0[(gib - 4) as usize];
            for (i, entry) in pd.iter_mut().enumerate() {
                *entry = (gib * GIB + ((i as u64) << 21)) | HUGE_PAGE;
            }
            (*pdpt)[gib as usize] = pd.as_ptr() as u64 | 0x3;
        }
        x86::controlregs::cr3_write(x86::controlregs::cr3());
    }
    IDENTITY_END.store(end.div_ceil(GIB) * GIB, Ordering::Relaxed);
    Ok(())
}

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
                (*pdpt)[gib as usize] = (gib * GIB) | HUGE_PAGE;
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
            4 => write!(f, "identity map 0-4 GiB (2 MiB pages; this CPU has no 1 GiB pages: RAM above is mapped as needed)"),
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
