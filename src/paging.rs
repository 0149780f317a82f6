//! ksave's identity map. asm/tables.s maps 0-4 GiB with 2 MiB pages, enough
//! for both entry paths; here, where the CPU has 1 GiB pages, the rest of the
//! first PDPT is filled so that RAM and 64-bit BARs up to 512 GiB are mapped.
//! Without them, [`map_ram_to`] maps RAM above 4 GiB with 2 MiB pages from a
//! small pool of page directories, up to [`END_WITHOUT_1G_PAGES`].

use core::sync::atomic::{AtomicU64, Ordering};

unsafe extern "C" {
    static mut boot_pml4: [u64; 512];
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

/// Page tables for device registers beyond the identity map (a 64-bit BAR
/// the firmware put high: OVMF puts a PCIe root port's 64-bit prefetchable
/// window at 896 GiB): page directory pointer tables for PML4 entries past
/// the first, and page directories for CPUs without 1 GiB pages. Each BAR
/// takes one GiB of address space at most, and a disk path a few BARs.
const MMIO_PDPTS: usize = 2;
const MMIO_PDS: usize = 4;

#[repr(C, align(4096))]
struct MmioTables {
    pdpts: [[u64; 512]; MMIO_PDPTS],
    pds: [[u64; 512]; MMIO_PDS],
    pdpts_used: usize,
    pds_used: usize,
}

/// In .bss: cleared on every entry; [`init`] drops the PML4 entries that
/// pointed into it on an earlier one.
static mut MMIO: MmioTables = MmioTables { pdpts: [[0; 512]; MMIO_PDPTS], pds: [[0; 512]; MMIO_PDS], pdpts_used: 0, pds_used: 0 };

/// Extends the identity map as far as the CPU allows; returns its end.
pub fn init() -> u64 {
    // SAFETY: boot_pml4 is ksave's own table; its entries past the first
    // are only ever MMIO mappings of an earlier entry into ksave, whose
    // tables (MMIO, in .bss) are cleared now. Nothing uses them yet; the
    // CR3 reload below or in map_mmio drops stale translations.
    unsafe {
        let pml4 = &raw mut boot_pml4;
        (&mut *pml4)[1..].fill(0);
        // boot_pdpt's entries past 4 GiB pointed into EXTRA and MMIO on an
        // earlier entry (cleared now) when the CPU has no 1 GiB pages; with
        // them they are refilled below.
        let pdpt = &raw mut boot_pdpt;
        (&mut *pdpt)[4..].fill(0);
        x86::controlregs::cr3_write(x86::controlregs::cr3());
    }
    IDENTITY_END.store(4 * GIB, Ordering::Relaxed);
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

/// What [`identity_end`] will be once [`init`] and [`map_ram_to`]`(end)`
/// have run, without running them: ksave.efi decides on it while the
/// firmware's page tables are in use (efi.rs).
pub fn identity_end_once_mapped(end: u64) -> u64 {
    // CPUID.80000001h:EDX bit 26: 1-GByte pages, as init() asks.
    if core::arch::x86_64::__cpuid(0x8000_0001).edx & (1 << 26) != 0 {
        512 * GIB
    } else if end <= END_WITHOUT_1G_PAGES {
        end.div_ceil(GIB).max(4) * GIB
    } else {
        4 * GIB
    }
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

/// Makes `[addr, addr + len)` reachable for MMIO, uncacheable. Inside the
/// identity map below 4 GiB this marks the 2 MiB pages holding it UC (PCI
/// MMIO shares no 2 MiB page with RAM on the machines ksave runs on: the
/// PCI hole is 2 MiB aligned in practice); above 4 GiB inside it, 1 GiB
/// pages are left to the MTRRs, which firmware sets to UC for MMIO
/// windows. Beyond the identity map, the GiBs holding it are mapped here,
/// UC by their page attributes.
pub fn map_mmio(addr: u64, len: u64) -> Result<(), &'static str> {
    let end = addr.checked_add(len).ok_or("MMIO range overflows")?;
    if end > identity_end() {
        return map_mmio_beyond(addr, end);
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

/// Lowest address [`map_mmio_beyond`] does not map: the lower canonical
/// half under 4-level paging (PML4 entries 0-255).
const MMIO_END: u64 = 256 * 512 * GIB;

/// Maps each GiB of `[addr, end)` beyond the identity map, identity and
/// uncacheable: a 1 GiB page where the CPU has them, else a page directory
/// of 2 MiB pages, from [`MMIO`]'s tables.
fn map_mmio_beyond(addr: u64, end: u64) -> Result<(), &'static str> {
    if end > MMIO_END {
        return Err("MMIO range beyond the lower half of the address space");
    }
    let has_1g_pages = core::arch::x86_64::__cpuid(0x8000_0001).edx & (1 << 26) != 0;
    // SAFETY: boot_pml4, boot_pdpt and MMIO are ksave's own tables. Each new
    // table is filled before the entry that makes it reachable is written;
    // existing entries are only ever replaced by the same identity mapping
    // (an entry already present is kept). Interrupts are off and one CPU
    // runs; the CR3 reload drops stale translations. The range is device
    // registers (a BAR the firmware assigned), mapped uncacheable. Entry
    // formats: Intel SDM vol. 3A 4.5, tables 4-15 (PML4E: P|RW and the next
    // table), 4-16 (1 GiB PDPTE: PS) and 4-18 (2 MiB PDE: PS); PWT|PCD make
    // the page UC (11.12.3).
    unsafe {
        let mmio = &raw mut MMIO;
        let pml4 = &raw mut boot_pml4;
        for gib in addr.max(identity_end()) / GIB..end.div_ceil(GIB) {
            let pml4_index = (gib / 512) as usize;
            let pdpt: *mut [u64; 512] = if pml4_index == 0 {
                &raw mut boot_pdpt
            } else if (*pml4)[pml4_index] & 1 != 0 {
                ((*pml4)[pml4_index] & !0xfff) as *mut [u64; 512]
            } else {
                let used = (*mmio).pdpts_used;
                let table = (*mmio).pdpts.get_mut(used).ok_or("no page table left for device registers this far up")?;
                table.fill(0);
                (*mmio).pdpts_used += 1;
                (*pml4)[pml4_index] = table.as_ptr() as u64 | 0x3;
                table
            };
            let slot = &mut (*pdpt)[(gib % 512) as usize];
            if *slot & 1 != 0 {
                continue;
            }
            if has_1g_pages {
                *slot = (gib * GIB) | HUGE_PAGE | PWT_PCD;
            } else {
                let used = (*mmio).pds_used;
                let pd = (*mmio).pds.get_mut(used).ok_or("no page directory left for device registers this far up")?;
                for (i, entry) in pd.iter_mut().enumerate() {
                    *entry = (gib * GIB + ((i as u64) << 21)) | HUGE_PAGE | PWT_PCD;
                }
                (*mmio).pds_used += 1;
                *slot = pd.as_ptr() as u64 | 0x3;
            }
        }
        x86::controlregs::cr3_write(x86::controlregs::cr3());
    }
    Ok(())
}
