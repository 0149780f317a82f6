//! The VMCOREINFO note: `KEY=value` lines a kernel writes about itself at
//! boot (kernel/vmcore_info.c, kernel/crash_core.c before 6.9, and
//! arch/x86/kernel/vmcore_info_64.c), for dump tools. ksave reads the same
//! keys makedumpfile reads to find `struct page` and the buddy marker.

use crate::Doubt;

/// The note's name (`VMCOREINFO_NOTE_NAME`).
const NOTE_NAME: &[u8] = b"VMCOREINFO\0";

/// How a free buddy block's first page is marked. The marker lives in
/// `page_type`, which shares its word with `_mapcount`
/// (`OFFSET(page._mapcount)`); its order is in `page.private`
/// (mm/internal.h, `buddy_order`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// 6.1 (include/linux/page-flags.h, `PageType`): a typed page has the
    /// top nibble `PAGE_TYPE_BASE` (0xf0000000) set and its type bit
    /// *clear*; vmcoreinfo gives `PAGE_BUDDY_MAPCOUNT_VALUE = ~PG_buddy`.
    TypeBitClear {
        /// `PG_buddy` (0x80).
        pg_buddy: u32,
    },
    /// 6.12 to 7.3 (`PAGE_TYPE_OPS`): the top byte is the type,
    /// `PGTY_buddy` (0xf0); vmcoreinfo gives `PGTY_buddy << 24`.
    TypeByte {
        /// `PGTY_buddy`.
        pgty_buddy: u8,
    },
}

impl Rule {
    /// The code an image header records for this rule (0: none used).
    pub fn code(self) -> u32 {
        match self {
            Self::TypeBitClear { .. } => 1,
            Self::TypeByte { .. } => 2,
        }
    }

    /// What a code names, for `ksave inspect`.
    pub fn describe(code: u32) -> &'static str {
        match code {
            0 => "none: every page saved",
            1 => "6.1 page_type bit (PAGE_TYPE_BASE, PG_buddy clear)",
            2 => "6.12+ page_type byte (PGTY_buddy)",
            _ => "unknown",
        }
    }

    /// Whether `page_type` (the 32-bit word at `OFFSET(page._mapcount)`)
    /// marks a free buddy block.
    pub fn is_buddy(self, page_type: u32) -> bool {
        const PAGE_TYPE_BASE: u32 = 0xf000_0000;
        match self {
            Self::TypeBitClear { pg_buddy } => page_type & (PAGE_TYPE_BASE | pg_buddy) == PAGE_TYPE_BASE,
            Self::TypeByte { pgty_buddy } => page_type >> 24 == pgty_buddy as u32,
        }
    }
}

/// The kernel versions whose marker ksave knows, read from their sources:
/// the rule, and the `PAGE_BUDDY_MAPCOUNT_VALUE` they print (as `%ld` of
/// an int: sign-extended). Any other version is saved whole.
fn rule_for(major: u32, minor: u32, value: u64) -> Result<Rule, Doubt> {
    let value32 = value as u32;
    let rule = match (major, minor) {
        (6, 1) => Rule::TypeBitClear { pg_buddy: 0x80 },
        (6, 12..) | (7, 0..=3) => Rule::TypeByte { pgty_buddy: 0xf0 },
        _ => return Err(Doubt::Kernel(major, minor)),
    };
    let expected = match rule {
        Rule::TypeBitClear { pg_buddy } => !pg_buddy,
        Rule::TypeByte { pgty_buddy } => (pgty_buddy as u32) << 24,
    };
    // An int printed as a long: the upper half is the sign extension.
    let sign_ok = value >> 32 == 0 || value >> 32 == 0xffff_ffff;
    if value32 != expected || !sign_ok {
        return Err(Doubt::Marker(value));
    }
    Ok(rule)
}

/// What ksave needs from the note, checked for range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Info {
    /// `OSRELEASE` major and minor.
    pub version: (u32, u32),
    /// The buddy marker rule of this version.
    pub rule: Rule,
    /// `SYMBOL(init_top_pgt)`: the kernel's top page table, virtual.
    pub init_top_pgt: u64,
    /// `NUMBER(phys_base)`: where the kernel image's physical base moved.
    pub phys_base: u64,
    /// `NUMBER(pgtable_l5_enabled)`.
    pub la57: bool,
    /// `SYMBOL(mem_section)`: the section root array, virtual.
    pub mem_section: u64,
    /// `LENGTH(mem_section)`: its entries (`NR_SECTION_ROOTS`).
    pub section_roots: u64,
    /// `SIZE(mem_section)`.
    pub section_size: u64,
    /// `OFFSET(mem_section.section_mem_map)`.
    pub section_mem_map: u64,
    /// `NUMBER(SECTION_SIZE_BITS)`.
    pub section_size_bits: u32,
    /// `SIZE(page)`.
    pub page_size: u64,
    /// `OFFSET(page._mapcount)`: where `page_type` is.
    pub page_type: u64,
    /// `OFFSET(page.private)`: a free block's order.
    pub page_private: u64,
    /// `LENGTH(zone.free_area)`: the number of orders.
    pub orders: u32,
    /// `SYMBOL(vmemmap)` (6.12 on): the `struct page` array, virtual.
    pub vmemmap: Option<u64>,
}

/// The text of a VMCOREINFO ELF note (`Elf64_Nhdr`, name, descriptor).
pub fn note_text(note: &[u8]) -> Result<&str, Doubt> {
    let word = |at: usize| note.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize);
    let (namesz, descsz) = (word(0).ok_or(Doubt::Note("short"))?, word(4).ok_or(Doubt::Note("short"))?);
    if note.get(12..12 + namesz) != Some(NOTE_NAME) {
        return Err(Doubt::Note("not named VMCOREINFO"));
    }
    let desc_at = 12 + namesz.next_multiple_of(4);
    let desc = note.get(desc_at..desc_at + descsz).ok_or(Doubt::Note("descriptor beyond the note"))?;
    core::str::from_utf8(desc).map_err(|_| Doubt::Note("not text"))
}

/// The value of `key` (e.g. `"SIZE(page)"`), if the text has it. A key
/// given twice must agree.
fn value<'t>(text: &'t str, key: &'static str) -> Result<Option<&'t str>, Doubt> {
    let mut found = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')) {
            if found.is_some_and(|f| f != v) {
                return Err(Doubt::Twice(key));
            }
            found = Some(v);
        }
    }
    Ok(found)
}

fn required<'t>(text: &'t str, key: &'static str) -> Result<&'t str, Doubt> {
    value(text, key)?.ok_or(Doubt::Missing(key))
}

/// A `SYMBOL()` value: `%lx`.
fn hex(text: &str, key: &'static str) -> Result<u64, Doubt> {
    u64::from_str_radix(required(text, key)?, 16).map_err(|_| Doubt::Value(key))
}

/// A `SIZE()`, `OFFSET()`, `LENGTH()` (`%lu`) or `NUMBER()` (`%ld`) value,
/// as the bits of a 64-bit word, inside `range`.
fn dec(text: &str, key: &'static str, range: core::ops::RangeInclusive<u64>) -> Result<u64, Doubt> {
    let s = required(text, key)?;
    let v = match s.strip_prefix('-') {
        Some(abs) => abs.parse::<u64>().ok().filter(|&a| a <= 1 << 63).map(u64::wrapping_neg),
        None => s.parse::<u64>().ok(),
    };
    v.filter(|v| range.contains(v)).ok_or(Doubt::Value(key))
}

/// `OSRELEASE`'s major and minor ("6.12.57", "7.3.4+deb13-amd64").
fn version(text: &str) -> Result<(u32, u32), Doubt> {
    let release = required(text, "OSRELEASE")?;
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let mut next = || parts.next().and_then(|p| p.parse::<u32>().ok()).ok_or(Doubt::Value("OSRELEASE"));
    Ok((next()?, next()?))
}

impl Info {
    /// Reads and checks the note's text. Every value ksave relies on must be
    /// present and in range, or the answer is a [`Doubt`].
    pub fn parse(text: &str) -> Result<Self, Doubt> {
        let version = version(text)?;
        let rule = rule_for(version.0, version.1, dec(text, "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)", 0..=u64::MAX)?)?;
        if dec(text, "PAGESIZE", 0..=u64::MAX)? != 4096 {
            return Err(Doubt::Value("PAGESIZE"));
        }
        let page_size = dec(text, "SIZE(page)", 32..=512)?;
        let word_in_page = 0..=page_size - 8;
        let info = Self {
            version,
            rule,
            init_top_pgt: hex(text, "SYMBOL(init_top_pgt)")?,
            // Signed (`%ld`): where the kernel ran minus where it was linked
            // to run; checked by the page-table walk it must agree with.
            phys_base: dec(text, "NUMBER(phys_base)", 0..=u64::MAX)?,
            la57: dec(text, "NUMBER(pgtable_l5_enabled)", 0..=1)? == 1,
            mem_section: hex(text, "SYMBOL(mem_section)")?,
            section_roots: dec(text, "LENGTH(mem_section)", 1..=1 << 24)?,
            section_size: dec(text, "SIZE(mem_section)", 8..=4096)?,
            section_mem_map: dec(text, "OFFSET(mem_section.section_mem_map)", 0..=4088)?,
            section_size_bits: dec(text, "NUMBER(SECTION_SIZE_BITS)", 15..=40)? as u32,
            page_size,
            page_type: dec(text, "OFFSET(page._mapcount)", word_in_page.clone())?,
            page_private: dec(text, "OFFSET(page.private)", word_in_page)?,
            orders: dec(text, "LENGTH(zone.free_area)", 1..=20)? as u32,
            vmemmap: value(text, "SYMBOL(vmemmap)")?.map(|v| u64::from_str_radix(v, 16).map_err(|_| Doubt::Value("SYMBOL(vmemmap)"))).transpose()?,
        };
        let max_physmem_bits = dec(text, "NUMBER(MAX_PHYSMEM_BITS)", 36..=57)?;
        // struct page is word aligned; page_type is a 32-bit word.
        if !info.page_size.is_multiple_of(8) || !info.page_private.is_multiple_of(8) || !info.page_type.is_multiple_of(4) {
            return Err(Doubt::Value("SIZE(page)"));
        }
        if !info.section_size.is_power_of_two() || info.section_mem_map + 8 > info.section_size {
            return Err(Doubt::Value("SIZE(mem_section)"));
        }
        // SPARSEMEM_EXTREME (every x86-64 distribution kernel): the roots
        // are pointers to pages of sections, NR_SECTION_ROOTS of them
        // (include/linux/mmzone.h). A static array would be another length.
        let sections = 1u64 << (max_physmem_bits - info.section_size_bits as u64);
        if info.section_roots != sections.div_ceil(4096 / info.section_size) {
            return Err(Doubt::Value("LENGTH(mem_section)"));
        }
        Ok(info)
    }

    /// Sections per root pointer (`SECTIONS_PER_ROOT`).
    pub fn sections_per_root(&self) -> u64 {
        4096 / self.section_size
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The keys of a 6.12 x86-64 kernel's note, as it prints them (values
    /// from the test kernel, KASLR off).
    pub const TEXT_6_12: &str = "OSRELEASE=6.12.57\nBUILD-ID=0123\nPAGESIZE=4096\nSYMBOL(init_uts_ns)=ffffffff82a0c4e0\n\
SYMBOL(vmemmap)=ffffea0000000000\nSYMBOL(mem_section)=ffff88803ffd5000\nLENGTH(mem_section)=2048\nSIZE(mem_section)=16\n\
OFFSET(mem_section.section_mem_map)=0\nNUMBER(SECTION_SIZE_BITS)=27\nNUMBER(MAX_PHYSMEM_BITS)=46\nSIZE(page)=64\n\
OFFSET(page.flags)=0\nOFFSET(page._mapcount)=48\nOFFSET(page.private)=40\nLENGTH(zone.free_area)=11\n\
NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-268435456\nNUMBER(phys_base)=0\nSYMBOL(init_top_pgt)=ffffffff82a18000\n\
NUMBER(pgtable_l5_enabled)=0\nKERNELOFFSET=0\n";

    /// The same for 6.1: no vmemmap symbol, the old marker.
    pub fn text_6_1() -> std::string::String {
        TEXT_6_12.replace("OSRELEASE=6.12.57", "OSRELEASE=6.1.158").replace("SYMBOL(vmemmap)=ffffea0000000000\n", "").replace("=-268435456", "=-129")
    }

    #[test]
    fn reads_each_generation_with_its_rule() {
        let i = Info::parse(TEXT_6_12).unwrap();
        assert_eq!((i.version, i.rule, i.vmemmap), ((6, 12), Rule::TypeByte { pgty_buddy: 0xf0 }, Some(0xffff_ea00_0000_0000)));
        assert_eq!((i.page_size, i.page_type, i.page_private, i.orders, i.sections_per_root()), (64, 48, 40, 11, 256));
        let i = Info::parse(&text_6_1()).unwrap();
        assert_eq!((i.version, i.rule, i.vmemmap), ((6, 1), Rule::TypeBitClear { pg_buddy: 0x80 }, None));
        let t = TEXT_6_12.replace("6.12.57", "7.3.4+deb13-amd64");
        assert_eq!(Info::parse(&t).unwrap().version, (7, 3));
    }

    #[test]
    fn the_rules_match_the_kernels_markers() {
        let new = Rule::TypeByte { pgty_buddy: 0xf0 };
        // 6.12 page-flags.h: a buddy page's page_type is PGTY_buddy << 24
        // (the low 24 bits are type-private, 0 for buddy); an untyped page
        // is -1 (mapcount) or a mapcount.
        assert!(new.is_buddy(0xf000_0000) && !new.is_buddy(0xffff_ffff) && !new.is_buddy(0) && !new.is_buddy(0xf300_0000));
        let old = Rule::TypeBitClear { pg_buddy: 0x80 };
        // 6.1: page_type starts at -1 and __SetPageBuddy clears PG_buddy.
        assert!(old.is_buddy(0xffff_ff7f) && !old.is_buddy(0xffff_ffff) && !old.is_buddy(0) && !old.is_buddy(0xffff_fbff));
    }

    #[test]
    fn any_doubt_is_refused() {
        let cases: &[(&str, &str, Doubt)] = &[
            ("OSRELEASE=6.12.57", "OSRELEASE=6.8.0", Doubt::Kernel(6, 8)),
            ("OSRELEASE=6.12.57", "OSRELEASE=7.4.1", Doubt::Kernel(7, 4)),
            ("=-268435456", "=-129", Doubt::Marker(0xffff_ffff_ffff_ff7f)),
            ("=-268435456", "=-268435455", Doubt::Marker(0xffff_ffff_f000_0001)),
            ("PAGESIZE=4096", "PAGESIZE=16384", Doubt::Value("PAGESIZE")),
            ("SIZE(page)=64", "SIZE(page)=6x", Doubt::Value("SIZE(page)")),
            ("OFFSET(page.private)=40", "OFFSET(page.private)=64", Doubt::Value("OFFSET(page.private)")),
            ("LENGTH(mem_section)=2048", "LENGTH(mem_section)=524288", Doubt::Value("LENGTH(mem_section)")),
            ("SYMBOL(init_top_pgt)=ffffffff82a18000\n", "", Doubt::Missing("SYMBOL(init_top_pgt)")),
            ("NUMBER(pgtable_l5_enabled)=0", "NUMBER(pgtable_l5_enabled)=2", Doubt::Value("NUMBER(pgtable_l5_enabled)")),
            ("SIZE(page)=64\n", "SIZE(page)=64\nSIZE(page)=72\n", Doubt::Twice("SIZE(page)")),
        ];
        for (from, to, doubt) in cases {
            let t = TEXT_6_12.replace(from, to);
            assert_eq!(Info::parse(&t), Err(*doubt), "{to}");
        }
    }

    #[test]
    fn finds_the_text_in_the_note() {
        let text = b"OSRELEASE=6.12.57\n";
        let mut note = std::vec::Vec::new();
        for w in [11u32, text.len() as u32, 0] {
            note.extend_from_slice(&w.to_le_bytes());
        }
        note.extend_from_slice(b"VMCOREINFO\0\0");
        note.extend_from_slice(text);
        assert_eq!(note_text(&note), Ok("OSRELEASE=6.12.57\n"));
        assert_eq!(note_text(&note[..note.len() - 1]), Err(Doubt::Note("descriptor beyond the note")));
        note[12] = b'X';
        assert_eq!(note_text(&note), Err(Doubt::Note("not named VMCOREINFO")));
    }
}
