//! A page frame's `struct page`, and whether it heads a free buddy block.
//!
//! x86-64 kernels are SPARSEMEM_VMEMMAP: the `struct page` of frame `pfn`
//! is at `vmemmap + pfn * SIZE(page)`. Where vmemmap is comes from the
//! sections (include/linux/mmzone.h, `__section_mem_map_addr`): each
//! present section's `section_mem_map` is `mem_map - section_start_pfn`
//! with flag bits below `SECTION_MAP_LAST_BIT`, which for vmemmap is
//! vmemmap itself. Every virtual address is read through the kernel's own
//! `init_top_pgt`, found in its image (`__pa_symbol`).

use bootinfo::PhysRead;
use bootinfo::pagewalk::translate;

use crate::Doubt;
use crate::vmcoreinfo::Info;

/// `__START_KERNEL_map` (arch/x86/include/asm/page_64_types.h): the kernel
/// image's virtual base; `__pa_symbol(x) = x - __START_KERNEL_map + phys_base`.
const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// `SECTION_MARKED_PRESENT | SECTION_HAS_MEM_MAP` (bits 0 and 1 in 6.1 to 7.3).
const SECTION_USABLE: u64 = 0b11;
/// Flag bits of `section_mem_map`: `SECTION_MAP_LAST_BIT` is 5 to 7 by
/// config (6.1 to 7.3), so the low 8 bits are masked; vmemmap itself is
/// 1 GiB aligned (PUD, arch/x86/mm/kaslr.c), so that loses nothing.
const SECTION_FLAG_BITS: u64 = 0xff;
/// vmemmap's alignment at the least (a PMD: 2 MiB); a decoded base that is
/// not so aligned is not vmemmap.
const VMEMMAP_ALIGN: u64 = 1 << 21;

/// Reads a stopped kernel's `struct page`s. Caches the last translated
/// page and section, since frames are asked for in order.
pub struct Scanner<'m, M: PhysRead> {
    info: Info,
    mem: &'m M,
    /// Physical address of `init_top_pgt`.
    top: u64,
    /// Last virtual page translated, and its physical page.
    cached: Option<(u64, Option<u64>)>,
    /// Last section looked up, and its decoded vmemmap base.
    section: Option<(u64, Option<u64>)>,
}

impl<'m, M: PhysRead> Scanner<'m, M> {
    /// A scanner for the kernel `info` describes, in memory `mem`, whose CPU
    /// ran with 5-level paging if `la57_now` (CR4.LA57 at the jump). The
    /// kernel's top table must map its own symbol to where `phys_base`
    /// says it is: otherwise the note is not this kernel's.
    pub fn new(info: &Info, mem: &'m M, la57_now: bool) -> Result<Self, Doubt> {
        if info.la57 != la57_now {
            return Err(Doubt::Tables("NUMBER(pgtable_l5_enabled) differs from the CPU's CR4.LA57"));
        }
        if info.init_top_pgt < START_KERNEL_MAP || !info.init_top_pgt.is_multiple_of(4096) {
            return Err(Doubt::Value("SYMBOL(init_top_pgt)"));
        }
        let top = (info.init_top_pgt - START_KERNEL_MAP).wrapping_add(info.phys_base);
        if translate(top, info.la57, info.init_top_pgt, mem) != Some(top) {
            return Err(Doubt::Tables("init_top_pgt does not map itself"));
        }
        Ok(Self { info: *info, mem, top, cached: None, section: None })
    }

    fn read_virt(&mut self, va: u64) -> Option<u64> {
        if !va.is_multiple_of(8) {
            return None;
        }
        let page = va & !0xfff;
        let pa = match self.cached {
            Some((v, pa)) if v == page => pa,
            _ => {
                let pa = translate(self.top, self.info.la57, page, self.mem);
                self.cached = Some((page, pa));
                pa
            }
        };
        self.mem.read_u64(pa? | (va & 0xfff))
    }

    /// The vmemmap base section `nr` decodes to, if it is present and has
    /// a memory map.
    fn section_base(&mut self, nr: u64) -> Option<u64> {
        if let Some((n, base)) = self.section
            && n == nr
        {
            return base;
        }
        let base = self.decode_section(nr);
        self.section = Some((nr, base));
        base
    }

    fn decode_section(&mut self, nr: u64) -> Option<u64> {
        let i = &self.info;
        let root = nr / i.sections_per_root();
        if root >= i.section_roots {
            return None;
        }
        let (per_root, size, at) = (i.sections_per_root(), i.section_size, i.section_mem_map);
        let sections = self.read_virt(i.mem_section.checked_add(8 * root)?)?;
        if sections == 0 {
            return None;
        }
        let coded = self.read_virt(sections.checked_add((nr % per_root) * size + at)?)?;
        if coded & SECTION_USABLE != SECTION_USABLE {
            return None;
        }
        let base = coded & !SECTION_FLAG_BITS;
        if !base.is_multiple_of(VMEMMAP_ALIGN) || self.info.vmemmap.is_some_and(|v| v != base) {
            return None;
        }
        Some(base)
    }

    /// The order of the free buddy block frame `pfn` heads, or `None` if it
    /// heads none or anything is in doubt: its section, its `struct page`
    /// unreadable, a marker other than the rule's, an order out of range or
    /// a block not aligned to its order.
    pub fn free_order(&mut self, pfn: u64) -> Option<u32> {
        let nr = pfn >> (self.info.section_size_bits - 12);
        let base = self.section_base(nr)?;
        let page = base.checked_add(pfn.checked_mul(self.info.page_size)?)?;
        let type_at = page + self.info.page_type;
        let word = self.read_virt(type_at & !7)?;
        let page_type = (word >> (8 * (type_at & 4))) as u32;
        if !self.info.rule.is_buddy(page_type) {
            return None;
        }
        let order = self.read_virt(page + self.info.page_private)?;
        if order >= self.info.orders as u64 || !pfn.is_multiple_of(1 << order) {
            return None;
        }
        Some(order as u32)
    }
}

impl<M: PhysRead> Scanner<'_, M> {
    /// Whether frame `pfn` lies in a free buddy block: the head of the
    /// aligned block of some order holding it is free with at least that
    /// order. Same doubts as [`Self::free_order`].
    pub fn is_free(&mut self, pfn: u64) -> bool {
        (0..self.info.orders).any(|order| {
            let head = pfn & !((1u64 << order) - 1);
            self.free_order(head).is_some_and(|o| o >= order)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmcoreinfo::tests::{TEXT_6_12, text_6_1};
    use std::collections::BTreeMap;
    use std::string::ToString;

    const PRESENT: u64 = 1;
    const HUGE: u64 = 1 << 7;
    const VMEMMAP: u64 = 0xffff_ea00_0000_0000;
    const MEM_SECTION: u64 = 0xffff_8880_3ffd_5000;
    const TOP_VA: u64 = 0xffff_ffff_82a1_8000;

    /// Sparse physical memory holding a kernel's tables and struct pages.
    #[derive(Default)]
    struct Mem {
        words: BTreeMap<u64, u64>,
        next_table: u64,
    }

    impl PhysRead for Mem {
        fn read_u64(&self, addr: u64) -> Option<u64> {
            Some(self.words.get(&addr).copied().unwrap_or(0))
        }
    }

    impl Mem {
        fn table(&mut self) -> u64 {
            self.next_table += 0x1000;
            0x10_0000 + self.next_table
        }

        /// Maps `va` to `pa` with a leaf at `leaf_shift` (12, 21 or 30).
        fn map(&mut self, top: u64, la57: bool, va: u64, pa: u64, leaf_shift: u32) {
            let levels: &[u32] = if la57 { &[48, 39, 30, 21, 12] } else { &[39, 30, 21, 12] };
            let mut table = top;
            for &shift in levels {
                let slot = table + 8 * ((va >> shift) & 511);
                if shift == leaf_shift {
                    self.words.insert(slot, pa | PRESENT | if shift > 12 { HUGE } else { 0 });
                    return;
                }
                let e = self.words.get(&slot).copied().unwrap_or(0);
                table = if e & PRESENT != 0 {
                    e & !0xfff
                } else {
                    let t = self.table();
                    self.words.insert(slot, t | PRESENT);
                    t
                };
            }
        }
    }

    /// A kernel with RAM pfns 0..0x8000 in section 0 (SECTION_SIZE_BITS 27),
    /// its struct pages at physical 0x4000_0000 by 2 MiB pages, the
    /// top table at `top` (from phys_base 0x100_0000).
    fn kernel(text: &str, la57: bool) -> (Info, Mem) {
        let mut info = Info::parse(text).unwrap();
        info.la57 = la57;
        info.phys_base = 0x100_0000;
        let mut m = Mem::default();
        let top = TOP_VA - START_KERNEL_MAP + info.phys_base;
        m.map(top, la57, TOP_VA, top, 12);
        // mem_section root array, and one page of sections at 0x20_0000.
        m.map(top, la57, MEM_SECTION & !0xfff, 0x30_0000, 12);
        m.words.insert(0x30_0000 + (MEM_SECTION & 0xfff), 0xffff_8880_0020_0000);
        m.map(top, la57, 0xffff_8880_0020_0000, 0x20_0000, 12);
        m.words.insert(0x20_0000, VMEMMAP | SECTION_USABLE | 0x20);
        // 0x8000 struct pages of 64 bytes = 2 MiB.
        m.map(top, la57, VMEMMAP, 0x4000_0000, 21);
        (info, m)
    }

    fn set_page(m: &mut Mem, pfn: u64, page_type: u32, private: u64) {
        let at = 0x4000_0000 + 64 * pfn;
        m.words.insert(at + 48, page_type as u64 | 0xdead_0000_0000_0000);
        m.words.insert(at + 40, private);
    }

    fn untyped(m: &mut Mem, pfn: u64) {
        set_page(m, pfn, 0xffff_ffff, 0);
    }

    #[test]
    fn finds_free_blocks_on_each_generation_and_paging_mode() {
        for (text, buddy) in [(TEXT_6_12.to_string(), 0xf000_0000u32), (text_6_1(), 0xffff_ff7f)] {
            for la57 in [false, true] {
                let (info, mut m) = kernel(&text, la57);
                set_page(&mut m, 0x100, buddy, 3); // 8 pages free
                untyped(&mut m, 0x108);
                set_page(&mut m, 0x400, buddy, 10); // 4 MiB free
                set_page(&mut m, 0x300, 0xffff_fffe, 3); // a mapped page with private data
                let mut s = Scanner::new(&info, &m, la57).unwrap();
                assert_eq!((s.free_order(0x100), s.free_order(0x108), s.free_order(0x400), s.free_order(0x300)), (Some(3), None, Some(10), None));
                // Inside a block: its tail pages are free too.
                assert!(s.is_free(0x107) && s.is_free(0x7ff) && !s.is_free(0x108) && !s.is_free(0x300));
            }
        }
    }

    #[test]
    fn doubt_answers_not_free() {
        let (info, mut m) = kernel(TEXT_6_12, false);
        set_page(&mut m, 0x101, 0xf000_0000, 1); // odd frame, order 1: not aligned
        set_page(&mut m, 0x104, 0xf000_0000, 11); // order beyond LENGTH(zone.free_area)
        set_page(&mut m, 0x108, 0xffff_ff7f, 0); // 6.1's marker on a 6.12 kernel
        let mut s = Scanner::new(&info, &m, false).unwrap();
        assert_eq!((s.free_order(0x101), s.free_order(0x104), s.free_order(0x108)), (None, None, None));
        // A frame in a section that is absent, or past the roots.
        assert_eq!((s.free_order(0x8000), s.free_order(1 << 40)), (None, None));
        // A vmemmap base other than SYMBOL(vmemmap).
        let mut other = info;
        other.vmemmap = Some(VMEMMAP + (1 << 30));
        set_page(&mut m, 0x100, 0xf000_0000, 0);
        assert_eq!(Scanner::new(&other, &m, false).unwrap().free_order(0x100), None);
        // Struct pages whose vmemmap page is unmapped.
        m.words.retain(|_, v| *v != 0x4000_0000 | PRESENT | HUGE);
        assert_eq!(Scanner::new(&info, &m, false).unwrap().free_order(0x100), None);
    }

    #[test]
    fn a_note_that_is_not_this_kernels_is_refused() {
        let (info, m) = kernel(TEXT_6_12, false);
        assert!(matches!(Scanner::new(&info, &m, true), Err(Doubt::Tables(_))));
        let mut moved = info;
        moved.phys_base += 0x20_0000;
        assert_eq!(Scanner::new(&moved, &m, false).err(), Some(Doubt::Tables("init_top_pgt does not map itself")));
    }
}
