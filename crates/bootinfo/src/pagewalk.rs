//! Reading the saved kernel's memory through its own page tables (x86-64,
//! 4- and 5-level; Intel SDM vol. 3A 4.5), and finding its per-CPU GDT.

use crate::PhysRead;
use crate::kexec::PHYS_MASK;

const PRESENT: u64 = 1 << 0;
const PAGE_SIZE_BIT: u64 = 1 << 7;

/// The physical address `va` maps to under the root `cr3`, with 5-level
/// paging if `la57`; `None` where any level is absent or unreadable.
pub fn translate(cr3: u64, la57: bool, va: u64, mem: &impl PhysRead) -> Option<u64> {
    let levels: &[u32] = if la57 { &[48, 39, 30, 21, 12] } else { &[39, 30, 21, 12] };
    let mut table = cr3 & PHYS_MASK;
    for &shift in levels {
        let entry = mem.read_u64(table + 8 * ((va >> shift) & 511))?;
        if entry & PRESENT == 0 {
            return None;
        }
        let leaf = shift == 12 || (entry & PAGE_SIZE_BIT != 0 && (shift == 21 || shift == 30));
        if leaf {
            let size = 1u64 << shift;
            return Some((entry & PHYS_MASK & !(size - 1)) | (va & (size - 1)));
        }
        table = entry & PHYS_MASK;
    }
    None
}

/// The physical ranges the identity page tables under `root` map to
/// themselves (VA = PA, in the lower half), merged, into `out`; returns how
/// many. The tables a kernel builds for a kexec jump map its RAM (the
/// direct-mapped `pfn_mapped` ranges) and the ACPI tables, ACPI NVS and EFI
/// system table (arch/x86/kernel/machine_kexec_64.c, init_pgtable): memory
/// all of it, the RAM map an unconfigured ksave can read its caller's GDT
/// from. The one mapping that is not an identity (relocate_kernel's, in
/// the upper half) is left out; ranges past `out`'s capacity are dropped.
pub fn identity_ranges(root: u64, la57: bool, mem: &impl PhysRead, out: &mut [(u64, u64)]) -> usize {
    let top: u32 = if la57 { 48 } else { 39 };
    let mut n: usize = 0;
    walk_identity(root & PHYS_MASK, top, 0, mem, &mut |start, size| {
        if n > 0 && out[n - 1].1 == start {
            out[n - 1].1 = start + size;
        } else if n < out.len() {
            out[n] = (start, start + size);
            n += 1;
        }
    });
    n
}

/// Visits the identity leaves of the table at `table` (level `shift`),
/// which maps virtual addresses from `va_base`, in address order.
fn walk_identity(table: u64, shift: u32, va_base: u64, mem: &impl PhysRead, leaf: &mut impl FnMut(u64, u64)) {
    // The lower half only: at the root, entries 0-255.
    let entries = if va_base == 0 && (shift == 39 || shift == 48) { 256 } else { 512 };
    for i in 0..entries {
        let Some(entry) = mem.read_u64(table + 8 * i) else { return };
        if entry & PRESENT == 0 {
            continue;
        }
        let va = va_base + (i << shift);
        let is_leaf = shift == 12 || (entry & PAGE_SIZE_BIT != 0 && (shift == 21 || shift == 30));
        if is_leaf {
            let size = 1u64 << shift;
            if entry & PHYS_MASK & !(size - 1) == va {
                leaf(va, size);
            }
        } else if shift > 12 {
            walk_identity(entry & PHYS_MASK, shift - 9, va, mem, leaf);
        }
    }
}

/// Linux's x86-64 GDT entries 1 to 6 (arch/x86/kernel/cpu/common.c,
/// `gdt_page`): KERNEL32_CS, KERNEL_CS, KERNEL_DS, USER32_CS, USER_DS,
/// USER_CS, each flat with the accessed bit set.
pub const LINUX_GDT: [u64; 6] =
    [0x00cf_9b00_0000_ffff, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x00cf_fb00_0000_ffff, 0x00cf_f300_0000_ffff, 0x00af_fb00_0000_ffff];
/// GDT_ENTRY_TSS: a 16-byte system descriptor at entries 8 and 9.
const TSS_ENTRY: u64 = 8;
/// GDT_SIZE - 1: 16 entries (arch/x86/include/asm/segment.h).
pub const LINUX_GDT_LIMIT: u16 = 16 * 8 - 1;
/// GDT_ENTRY_CPUNODE: its limit holds the CPU number (low 12 bits) and
/// node (arch/x86/include/asm/segment.h, `setup_getcpu`).
const CPUNODE_ENTRY: u64 = 15;
const GIB: u64 = 1 << 30;
/// CPU_ENTRY_AREA_BASE: the direct map ends below it in both paging modes.
const DIRECT_MAP_END: u64 = 0xffff_fe00_0000_0000;

/// Why the GDT was not found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GdtError {
    /// No RAM page holds CPU 0's live GDT.
    NotFound,
    /// More than one does: refuse rather than pick.
    Ambiguous(u64, u64),
    /// The kernel's page tables map it nowhere in the direct map.
    NotMapped(u64),
}

impl core::fmt::Display for GdtError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotFound => write!(f, "no RAM page holds CPU 0's GDT"),
            Self::Ambiguous(a, b) => write!(f, "two pages look like CPU 0's GDT ({a:#x}, {b:#x})"),
            Self::NotMapped(pa) => write!(f, "the GDT at {pa:#x} is not in the kernel's direct map"),
        }
    }
}

/// Whether the page at `pa` is a CPU's live Linux GDT for CPU `cpu`:
/// entry 0 null, entries 1-6 [`LINUX_GDT`], entry 8 a present 64-bit TSS
/// (available or busy), entry 15 naming `cpu`.
pub fn is_linux_gdt(pa: u64, cpu: u64, mem: &impl PhysRead) -> bool {
    let read = |i: u64| mem.read_u64(pa + 8 * i);
    read(0) == Some(0)
        && LINUX_GDT.iter().enumerate().all(|(i, d)| read(i as u64 + 1) == Some(*d))
        // Type 9 (available) or 11 (busy) 64-bit TSS, S = 0, present.
        && read(TSS_ENTRY).is_some_and(|d| (d >> 40) & 0x9d == 0x89)
        && read(CPUNODE_ENTRY).is_some_and(|d| d & 0xfff == cpu)
}

/// The physical page of CPU 0's read-write GDT (`gdt_page`, page aligned
/// per-CPU data): the one page in `ram` (start, end) for which
/// [`is_linux_gdt`] holds. The kexec jump runs on CPU 0: the others are
/// offline (`suspend_disable_secondary_cpus` keeps CPU 0), and the boot-time
/// template has no TSS.
///
/// `is_free` says which pages the kernel holds free: a stale copy of a GDT
/// can linger in one (seen on 6.1 after an earlier jump), the live one
/// never does.
pub fn find_gdt_page(ram: impl Iterator<Item = (u64, u64)>, mem: &impl PhysRead, mut is_free: impl FnMut(u64) -> bool) -> Result<u64, GdtError> {
    let mut found = None;
    for (start, end) in ram {
        let mut pa = start.next_multiple_of(0x1000);
        while pa + 0x1000 <= end {
            if is_linux_gdt(pa, 0, mem) && !is_free(pa) {
                if let Some(first) = found {
                    return Err(GdtError::Ambiguous(first, pa));
                }
                found = Some(pa);
            }
            pa += 0x1000;
        }
    }
    found.ok_or(GdtError::NotFound)
}

/// The kernel's direct-map base (`page_offset_base`, 1 GiB aligned under
/// KASLR): the `b` for which `b + pa` translates to `pa` under `cr3` for
/// `pa` and every page of `also`. Only 1 GiB slots the tables populate are
/// tried (every present entry one level above the 1 GiB level, in the
/// kernel half).
pub fn direct_map_base(cr3: u64, la57: bool, pa: u64, also: &[u64], mem: &impl PhysRead) -> Option<u64> {
    // The direct map starts at __PAGE_OFFSET_BASE_L4/L5 and, under KASLR,
    // stays below the CPU entry area (Documentation/arch/x86/x86_64/mm.rst).
    let lowest = if la57 { 0xff11_0000_0000_0000 } else { 0xffff_8880_0000_0000 };
    let maps_all = |b: u64| core::iter::once(pa).chain(also.iter().copied()).all(|p| translate(cr3, la57, b.wrapping_add(p), mem) == Some(p));
    let root = cr3 & PHYS_MASK;
    let try_pud_table = |pud_table: u64, va_base: u64| -> Option<u64> {
        (0..512u64).find_map(|j| {
            let present = mem.read_u64(pud_table + 8 * j).is_some_and(|e| e & PRESENT != 0);
            let slot = va_base + j * GIB;
            let b = slot.wrapping_sub(pa & !(GIB - 1));
            (present && (lowest..DIRECT_MAP_END).contains(&b) && maps_all(b)).then_some(b)
        })
    };
    let sign = |va: u64| if la57 { va | 0xfe00_0000_0000_0000 } else { va | 0xffff_0000_0000_0000 };
    for i in 256..512u64 {
        let Some(e) = mem.read_u64(root + 8 * i).filter(|e| e & PRESENT != 0) else { continue };
        if la57 {
            for k in 0..512u64 {
                let Some(e4) = mem.read_u64((e & PHYS_MASK) + 8 * k).filter(|e| e & PRESENT != 0) else { continue };
                if let Some(b) = try_pud_table(e4 & PHYS_MASK, sign((i << 48) | (k << 39))) {
                    return Some(b);
                }
            }
        } else if let Some(b) = try_pud_table(e & PHYS_MASK, sign(i << 39)) {
            return Some(b);
        }
    }
    None
}

/// CPU 0's GDT by its direct-map virtual address, ready for GDTR: found in
/// `ram`, translated through the kernel's tables (`cr3`, `la57`), and the
/// translation checked on the `also` pages too.
pub fn find_kernel_gdt(
    ram: impl Iterator<Item = (u64, u64)>,
    cr3: u64,
    la57: bool,
    also: &[u64],
    mem: &impl PhysRead,
    is_free: impl FnMut(u64) -> bool,
) -> Result<u64, GdtError> {
    let pa = find_gdt_page(ram, mem, is_free)?;
    let base = direct_map_base(cr3, la57, pa, also, mem).ok_or(GdtError::NotMapped(pa))?;
    Ok(base.wrapping_add(pa))
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;

    /// Sparse physical memory.
    struct Mem(std::collections::BTreeMap<u64, u64>);

    impl PhysRead for Mem {
        fn read_u64(&self, addr: u64) -> Option<u64> {
            Some(self.0.get(&addr).copied().unwrap_or(0))
        }
    }

    const VA: u64 = 0xffff_8880_0123_4000;

    #[test]
    fn identity_tables_give_the_ranges_they_map_to_themselves() {
        let mut m = std::collections::BTreeMap::new();
        // PML4 at 0x1000 -> PDPT 0x2000: GiB 0 through a PD at 0x3000
        // (2 MiB pages 0-3 identity, page 5 identity), GiB 4 as a 1 GiB
        // page; entry 2 of the PDPT maps GiB 2 to GiB 7 (not an identity).
        m.insert(0x1000, 0x2000 | PRESENT);
        m.insert(0x2000, 0x3000 | PRESENT);
        for i in [0u64, 1, 2, 3, 5] {
            m.insert(0x3000 + 8 * i, (i << 21) | PRESENT | PAGE_SIZE_BIT);
        }
        m.insert(0x2000 + 8 * 4, (4 << 30) | PRESENT | PAGE_SIZE_BIT);
        m.insert(0x2000 + 8 * 2, (7 << 30) | PRESENT | PAGE_SIZE_BIT);
        // The upper half (relocate_kernel's text) is never an identity.
        m.insert(0x1000 + 8 * 511, 0x2000 | PRESENT);
        let mem = Mem(m);
        let mut out = [(0, 0); 8];
        let n = identity_ranges(0x1000, false, &mem, &mut out);
        assert_eq!(&out[..n], &[(0, 8 << 20), (10 << 20, 12 << 20), (4 << 30, 5 << 30)]);
        // A full list keeps what fits.
        let mut one = [(0, 0); 1];
        assert_eq!(identity_ranges(0x1000, false, &mem, &mut one), 1);
    }

    /// 4-level tables at 0x1000.. mapping VA (4 KiB page) to 0x9000 and
    /// VA + 2 MiB through a 2 MiB leaf at 0x4000_0000.
    fn tables() -> Mem {
        let mut m = std::collections::BTreeMap::new();
        let idx = |va: u64, shift: u32| 8 * ((va >> shift) & 511);
        m.insert(0x1000 + idx(VA, 39), 0x2000 | PRESENT);
        m.insert(0x2000 + idx(VA, 30), 0x3000 | PRESENT);
        m.insert(0x3000 + idx(VA, 21), 0x4000 | PRESENT);
        m.insert(0x4000 + idx(VA, 12), 0x9000 | PRESENT);
        m.insert(0x3000 + idx(VA + 0x20_0000, 21), 0x4000_0000 | PRESENT | PAGE_SIZE_BIT);
        Mem(m)
    }

    #[test]
    fn walks_4_and_5_levels_and_large_pages() {
        let mut m = tables();
        assert_eq!(translate(0x1000, false, VA + 0x18, &m), Some(0x9018));
        assert_eq!(translate(0x1000, false, VA + 0x20_0000, &m), Some(0x4003_4000));
        assert_eq!(translate(0x1000, false, VA + 0x1000, &m), None);
        // A PML5 whose entry leads to the same PML4.
        m.0.insert(0x8000 + 8 * ((VA >> 48) & 511), 0x1000 | PRESENT);
        assert_eq!(translate(0x8000, true, VA + 0x18, &m), Some(0x9018));
    }

    /// A direct map at `BASE` in the tables of `tables()`'s style: PML4 at
    /// 0x1000, one PUD table at 0x2000 whose slot for PA 0-1 GiB is a 1 GiB
    /// leaf at physical 0.
    const BASE: u64 = 0xffff_8880_0000_0000;

    fn direct_map() -> Mem {
        let mut m = std::collections::BTreeMap::new();
        m.insert(0x1000 + 8 * ((BASE >> 39) & 511), 0x2000 | PRESENT);
        m.insert(0x2000 + 8 * ((BASE >> 30) & 511), PRESENT | PAGE_SIZE_BIT);
        // A second, unrelated slot (say vmalloc) that maps other memory.
        m.insert(0x2000 + 8 * (((BASE >> 30) + 7) & 511), 0x4000_0000 | PRESENT | PAGE_SIZE_BIT);
        Mem(m)
    }

    fn put_gdt(m: &mut Mem, pa: u64, cpu: u64, tss_type: u64) {
        for (i, d) in LINUX_GDT.iter().enumerate() {
            m.0.insert(pa + 8 * (i as u64 + 1), *d);
        }
        m.0.insert(pa + 8 * TSS_ENTRY, 0x0000_8000_0000_206f | tss_type << 40);
        m.0.insert(pa + 8 * CPUNODE_ENTRY, 0x0040_f500_0000_0000 | cpu);
    }

    #[test]
    fn finds_cpu_0s_gdt_and_its_direct_map_address() {
        let mut m = direct_map();
        put_gdt(&mut m, 0x0123_4000, 0, 0xb);
        put_gdt(&mut m, 0x0223_4000, 1, 0xb); // CPU 1's: not ours
        put_gdt(&mut m, 0x0323_4000, 0, 0x0); // the template: no TSS
        let ram = || [(0x10_0000u64, 0x400_0000u64)].into_iter();
        assert_eq!(find_gdt_page(ram(), &m, |_| false), Ok(0x0123_4000));
        assert_eq!(find_kernel_gdt(ram(), 0x1000, false, &[0x5000], &m, |_| false), Ok(BASE + 0x0123_4000));
        put_gdt(&mut m, 0x0333_4000, 0, 0x9);
        assert_eq!(find_gdt_page(ram(), &m, |_| false), Err(GdtError::Ambiguous(0x0123_4000, 0x0333_4000)));
        // A stale copy in a free page is not the live one.
        assert_eq!(find_gdt_page(ram(), &m, |pa| pa == 0x0333_4000), Ok(0x0123_4000));
    }

    /// What failed once in CI: the caller's PUD table lay under ksave's
    /// image, whose page there held an identity page directory. Read raw,
    /// the walk finds a bogus "direct map"; read as the caller sees it
    /// (CallerView), the right one.
    #[test]
    fn page_tables_under_the_image_are_read_from_their_sources() {
        let mut m = direct_map();
        put_gdt(&mut m, 0x0123_4000, 0, 0xb);
        // Move the PUD table from 0x2000 to 0x7000, a page of the image at
        // 0x6000..0x8000; its contents now sit in the source page 0x9000.
        let pud: std::vec::Vec<(u64, u64)> = m.0.range(0x2000..0x3000).map(|(a, v)| (*a, *v)).collect();
        for (a, v) in pud {
            m.0.remove(&a);
            m.0.insert(a - 0x2000 + 0x9000, v);
        }
        m.0.insert(0x1000 + 8 * ((BASE >> 39) & 511), 0x7000 | PRESENT);
        // KASLR put the direct map 3 GiB higher: slot 3 maps physical 0.
        let slot0 = 0x9000 + 8 * ((BASE >> 30) & 511);
        m.0.remove(&slot0);
        m.0.insert(slot0 + 8 * 3, PRESENT | PAGE_SIZE_BIT);
        let base = BASE + 3 * GIB;
        // At 0x7000 itself, ksave's bytes: identity 1 GiB pages everywhere.
        for j in 0..512u64 {
            m.0.insert(0x7000 + 8 * j, (j << 30) | PRESENT | PAGE_SIZE_BIT);
        }
        let ram = || [(0x10_0000u64, 0x400_0000u64)].into_iter();
        let raw = find_kernel_gdt(ram(), 0x1000, false, &[0x5000], &m, |_| false);
        assert_ne!(raw, Ok(base + 0x0123_4000), "read raw, the walk goes wrong");
        let sources = [0x1_0000, 0x9000]; // image pages 0x6000 and 0x7000
        let mut scratch = [0u16; 2];
        let view = crate::kexec::CallerView::new(&m, 0x6000, &sources, &mut scratch);
        assert_eq!(find_kernel_gdt(ram(), 0x1000, false, &[0x5000], &view, |_| false), Ok(base + 0x0123_4000));
    }

    #[test]
    fn a_gdt_outside_the_direct_map_is_not_used() {
        let mut m = tables(); // maps VA only, no direct map
        put_gdt(&mut m, 0x9000, 0, 0xb);
        assert_eq!(find_kernel_gdt([(0, 0x10000)].into_iter(), 0x1000, false, &[], &m, |_| false), Err(GdtError::NotMapped(0x9000)));
    }
}
