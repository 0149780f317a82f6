//! The kexec-jump caller, as seen from the image it jumped to (Linux 6.1 to
//! 7.3, x86_64).
//!
//! `relocate_kernel` (arch/x86/kernel/relocate_kernel_64.S) enters the image
//! with `[rsp]` = its re-entry address inside the control page, and keeps a
//! few words in that page for the way back. One of them is `image->head`,
//! the first entry of the kimage indirection list: the "backup map" telling
//! which source page now holds the caller's old contents of each
//! destination page. Where the words are is private to the kernel:
//!
//! - 6.1 to 6.13: at control page + `KEXEC_CONTROL_CODE_MAX_SIZE` (2048):
//!   saved RSP, CR0, CR3, CR4, then the identity table page, the swap page,
//!   the head.
//! - 6.14 on: in `.data..relocate_kernel`, copied into the control page at an
//!   offset that depends on the build: saved RSP, CR0, CR3, CR4, the control
//!   page's virtual address, the table page, the swap page, the head.
//!
//! Both keep the identity table page next to the swap page, and ksave knows
//! both at entry without reading the page: CR3 is the table page, and the
//! stack is in the swap page. [`CallerContext::find`] looks for that pair,
//! then accepts the head only when every neighbour is what it must be. No
//! per-version table, no guess: a layout that does not verify is refused
//! with what did not match.

use crate::PhysRead;

const PAGE: u64 = 4096;
/// KEXEC_CONTROL_CODE_MAX_SIZE on x86_64 before 6.14 (arch/x86/include/asm/kexec.h).
pub const CONTROL_DATA_OFFSET: u64 = 2048;

/// Indirection entry flags (include/linux/kexec.h: IND_*).
pub const IND_DESTINATION: u64 = 0x1;
/// Next entry is read from the page this entry points to.
pub const IND_INDIRECTION: u64 = 0x2;
/// End of the list.
pub const IND_DONE: u64 = 0x4;
/// A source page, copied (for a jump: swapped) to the current destination.
pub const IND_SOURCE: u64 = 0x8;

const CR0_PE: u64 = 1 << 0;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
/// CR4.LA57: 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;
/// The physical-address bits of a CR3 or page-table entry (bits 12-51).
pub const PHYS_MASK: u64 = 0x000f_ffff_ffff_f000;

/// What the CPU says at the kexec entry, before ksave changes anything: the
/// facts the control page's words are checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryState {
    /// `[rsp]`: where to `call` to go back.
    pub reentry: u64,
    /// RSP: inside the swap page on every kernel.
    pub rsp: u64,
    /// CR3: the identity table page the caller built for the jump.
    pub cr3: u64,
    /// CR4: PAE, and LA57 if the caller ran with 5-level paging.
    pub cr4: u64,
    /// GDTR base and limit: limit 0 up to 6.15; from 7.x a small GDT in the
    /// control page, after the data words.
    pub gdtr_base: u64,
    /// GDTR limit.
    pub gdtr_limit: u16,
}

/// Where the caller kept its words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// 6.1 to 6.13: fixed, at control page + 2048.
    Fixed,
    /// 6.14 on: the copied `.data..relocate_kernel`, with the control page's
    /// virtual address among the words.
    DataSection,
}

/// The words `relocate_kernel` keeps in its control page for the way back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallerContext {
    /// Where to `call` to return to the caller.
    pub reentry: u64,
    /// The page holding the caller's relocate_kernel copy and saved state.
    pub control_page: u64,
    /// Which layout the words were found in.
    pub layout: Layout,
    /// Byte offset of the saved RSP (the first word) in the control page.
    pub data_offset: u64,
    /// The caller's saved stack pointer (virtual).
    pub saved_rsp: u64,
    /// The caller's saved CR0.
    pub saved_cr0: u64,
    /// The caller's saved CR3 (its own page tables).
    pub saved_cr3: u64,
    /// The caller's saved CR4.
    pub saved_cr4: u64,
    /// The control page's virtual address in the caller (6.14 on), else 0.
    pub va_control_page: u64,
    /// Root of the identity page tables the caller built for the jump.
    pub table_page: u64,
    /// The scratch page relocate_kernel swaps through.
    pub swap_page: u64,
    /// `image->head`: the first indirection entry.
    pub backup_head: u64,
}

/// Why the caller's context cannot be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextError {
    /// The control page cannot be read.
    Unreadable(u64),
    /// An entry register is not what any kernel leaves.
    Entry(&'static str, u64),
    /// No word pair in the control page is (identity table, swap page).
    NotFound {
        /// CR3 at entry.
        table: u64,
        /// The page RSP was in at entry.
        swap: u64,
    },
    /// More than one place holds the pair: refuse rather than pick.
    Ambiguous(u64, u64),
    /// The pair was found at `offset`, but a neighbour is wrong.
    Mismatch {
        /// Byte offset of the table-page word in the control page.
        offset: u64,
        /// Which word, and what was wrong with it.
        what: &'static str,
        /// Its value.
        value: u64,
    },
}

impl core::fmt::Display for ContextError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Unreadable(a) => write!(f, "control page at {a:#x} unreadable"),
            Self::Entry(what, v) => write!(f, "entry state not a kexec jump's: {what} ({v:#x})"),
            Self::NotFound { table, swap } => {
                write!(f, "no word pair (identity table {table:#x}, swap page {swap:#x}) in the control page: an unknown relocate_kernel layout")
            }
            Self::Ambiguous(a, b) => write!(f, "the identity table and swap page words stand twice (at +{a:#x} and +{b:#x})"),
            Self::Mismatch { offset, what, value } => write!(f, "words at +{offset:#x}: {what} ({value:#x})"),
        }
    }
}

impl CallerContext {
    /// Finds and checks the caller's words behind `entry.reentry`.
    pub fn find(entry: &EntryState, mem: &impl PhysRead) -> Result<Self, ContextError> {
        let control_page = entry.reentry & !(PAGE - 1);
        let table = entry.cr3 & PHYS_MASK;
        let swap = entry.rsp & !(PAGE - 1);
        if table == 0 || entry.cr4 & CR4_PAE == 0 {
            return Err(ContextError::Entry("CR3 or CR4.PAE", entry.cr3));
        }
        if swap == 0 || swap == control_page {
            return Err(ContextError::Entry("stack page", entry.rsp));
        }
        let word = |i: u64| mem.read_u64(control_page + 8 * i).ok_or(ContextError::Unreadable(control_page + 8 * i));
        let mut found = None;
        for i in 0..(PAGE / 8 - 1) {
            if word(i)? == table && word(i + 1)? == swap {
                if let Some(first) = found {
                    return Err(ContextError::Ambiguous(8 * first, 8 * i));
                }
                found = Some(i);
            }
        }
        let i = found.ok_or(ContextError::NotFound { table, swap })?;
        let offset = 8 * i;
        let bad = |what, value| ContextError::Mismatch { offset, what, value };
        // The layout is told by position: 6.1-6.13 put the table page at
        // exactly +0x820; 6.14 on have the control page's VA before it.
        let (layout, first) = if offset == CONTROL_DATA_OFFSET + 0x20 {
            (Layout::Fixed, i - 4)
        } else if i >= 5 {
            (Layout::DataSection, i - 5)
        } else {
            return Err(bad("too near the page start for the saved registers", 0));
        };
        let ctx = Self {
            reentry: entry.reentry,
            control_page,
            layout,
            data_offset: 8 * first,
            saved_rsp: word(first)?,
            saved_cr0: word(first + 1)?,
            saved_cr3: word(first + 2)?,
            saved_cr4: word(first + 3)?,
            va_control_page: if layout == Layout::DataSection { word(first + 4)? } else { 0 },
            table_page: table,
            swap_page: swap,
            backup_head: word(i + 2)?,
        };
        ctx.check(entry).map_err(|(what, value)| bad(what, value))?;
        Ok(ctx)
    }

    /// Every neighbour must be what relocate_kernel saved there.
    fn check(&self, entry: &EntryState) -> Result<(), (&'static str, u64)> {
        let kernel_half = |va: u64| va >= 0xff00_0000_0000_0000;
        if !kernel_half(self.saved_rsp) {
            return Err(("saved RSP is not a kernel address", self.saved_rsp));
        }
        if self.saved_cr0 & (CR0_PE | CR0_PG) != (CR0_PE | CR0_PG) || self.saved_cr0 >> 32 != 0 {
            return Err(("saved CR0 is not paged protected mode", self.saved_cr0));
        }
        if self.saved_cr3 & PHYS_MASK == 0 || self.saved_cr3 & !(PHYS_MASK | 0xfff | 1 << 63) != 0 {
            return Err(("saved CR3 is not a page-table root", self.saved_cr3));
        }
        // (CR4's upper half is not checked: bit 32 is FRED on new CPUs.)
        if self.saved_cr4 & CR4_PAE == 0 {
            return Err(("saved CR4 lacks PAE", self.saved_cr4));
        }
        if self.saved_cr4 & CR4_LA57 != entry.cr4 & CR4_LA57 {
            return Err(("saved CR4.LA57 differs from the entry's", self.saved_cr4));
        }
        if self.layout == Layout::DataSection && (!kernel_half(self.va_control_page) || !self.va_control_page.is_multiple_of(PAGE)) {
            return Err(("control page VA is not a kernel page address", self.va_control_page));
        }
        if self.backup_head & !(PAGE - 1) == 0 || self.backup_head & (IND_DESTINATION | IND_INDIRECTION) == 0 {
            return Err(("backup map head is not a destination or indirection entry", self.backup_head));
        }
        // 7.x loads a GDT that lies in the control page after the words.
        if entry.gdtr_limit != 0 {
            let after_words = self.control_page + self.data_offset + 8 * if self.layout == Layout::DataSection { 8 } else { 7 };
            if !(after_words..self.control_page + PAGE).contains(&entry.gdtr_base) {
                return Err(("GDTR at entry is not in the control page after the words", entry.gdtr_base));
            }
        }
        Ok(())
    }
}

/// One page the jump displaced: the caller's old contents of `dest` now sit
/// in `src`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Displaced {
    /// The image's page (where the caller's data was).
    pub dest: u64,
    /// Where the caller's data is now.
    pub src: u64,
}

/// Why the backup map was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// An indirection page could not be read.
    Unreadable(u64),
    /// A source came before any destination.
    SourceWithoutDestination(u64),
    /// More entries than any image of ours has: a loop or garbage.
    TooLong,
    /// An indirection page is not accepted by the caller's `is_ram`.
    NotRam(u64),
}

/// Upper bound on entries walked; an image of a few MiB has a few thousand.
pub const MAX_ENTRIES: usize = 1 << 20;

/// Walks the indirection list from `head`, calling `visit` for each displaced
/// page in list order. `is_ram` vets every page address met before it is
/// read or reported.
pub fn walk(
    head: u64,
    mem: &impl PhysRead,
    is_ram: impl Fn(u64) -> bool,
    mut visit: impl FnMut(Displaced),
) -> Result<usize, WalkError> {
    let mut entry = head;
    let mut cursor: Option<u64> = None; // where the next entry is read from
    let mut dest: Option<u64> = None;
    let mut pairs = 0;
    for _ in 0..MAX_ENTRIES {
        let addr = entry & !(PAGE - 1);
        if entry & IND_DESTINATION != 0 {
            dest = Some(addr);
        } else if entry & IND_INDIRECTION != 0 {
            if !is_ram(addr) {
                return Err(WalkError::NotRam(addr));
            }
            cursor = Some(addr);
        } else if entry & IND_DONE != 0 {
            return Ok(pairs);
        } else if entry & IND_SOURCE != 0 {
            let d = dest.ok_or(WalkError::SourceWithoutDestination(addr))?;
            for page in [d, addr] {
                if !is_ram(page) {
                    return Err(WalkError::NotRam(page));
                }
            }
            visit(Displaced { dest: d, src: addr });
            pairs += 1;
            dest = Some(d + PAGE); // swap_pages advances the destination
        }
        // Entries with no flag are skipped, as swap_pages does.
        let at = cursor.ok_or(WalkError::Unreadable(0))?;
        entry = mem.read_u64(at).ok_or(WalkError::Unreadable(at))?;
        cursor = Some(at + 8);
    }
    Err(WalkError::TooLong)
}

/// The caller's memory as the caller sees it, while the image sits in its
/// pages: relocate_kernel swapped each destination page with its source
/// page (`swap_pages`), and swaps them back on the way home. Reading a
/// destination gives what its source holds and the other way round;
/// everything else reads through. `dests` are the image's pages in order
/// (`dests[i]` is `start + i` pages), `sources[i]` each one's source, and
/// `by_source` the indices sorted by source, for the reverse lookup.
pub struct CallerView<'a, M: PhysRead> {
    mem: &'a M,
    start: u64,
    sources: &'a [u64],
    by_source: &'a [u16],
}

impl<'a, M: PhysRead> CallerView<'a, M> {
    /// A view over `mem` of an image at `start` whose page `i` was swapped
    /// with `sources[i]`; `by_source` is scratch of the same length.
    pub fn new(mem: &'a M, start: u64, sources: &'a [u64], by_source: &'a mut [u16]) -> Self {
        assert!(by_source.len() == sources.len() && sources.len() <= u16::MAX as usize);
        for (i, slot) in by_source.iter_mut().enumerate() {
            *slot = i as u16;
        }
        by_source.sort_unstable_by_key(|&i| sources[i as usize]);
        Self { mem, start, sources, by_source }
    }

    fn swapped(&self, page: u64) -> u64 {
        if page >= self.start && ((page - self.start) / PAGE) < self.sources.len() as u64 {
            return self.sources[((page - self.start) / PAGE) as usize];
        }
        match self.by_source.binary_search_by_key(&page, |&i| self.sources[i as usize]) {
            Ok(k) => self.start + self.by_source[k] as u64 * PAGE,
            Err(_) => page,
        }
    }
}

impl<M: PhysRead> PhysRead for CallerView<'_, M> {
    fn read_u64(&self, addr: u64) -> Option<u64> {
        self.mem.read_u64(self.swapped(addr & !(PAGE - 1)) | (addr & (PAGE - 1)))
    }
}

/// How the destination pages of a backup map relate to a range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coverage {
    /// Displaced pages in the list.
    pub pairs: usize,
    /// Of those, destinations outside the range.
    pub outside: usize,
    /// Destinations listed more than once.
    pub duplicates: usize,
    /// Pages of the range no destination covers.
    pub uncovered: usize,
    /// Sources inside the range that are not their own destination: the
    /// caller's data would sit in the image.
    pub sources_inside: usize,
    /// Pages that are their own source: kexec allocated a free page that
    /// happened to be its destination (`kimage_alloc_page`, `addr ==
    /// destination`), so the jump displaced nothing there.
    pub in_place: usize,
}

impl Coverage {
    /// True when the destinations are exactly the range's pages, once each.
    pub fn is_exact(&self) -> bool {
        self.outside == 0 && self.duplicates == 0 && self.uncovered == 0 && self.sources_inside == 0
    }
}

/// Checks which pages of `[start, end)` the displaced `pairs` (from one
/// [`walk`]) cover. `seen` is scratch with a bit per page of the range.
pub fn coverage(pairs: impl IntoIterator<Item = Displaced>, start: u64, end: u64, seen: &mut [u64]) -> Coverage {
    let mut tally = Tally::new(start, end, seen);
    pairs.into_iter().for_each(|d| tally.note(d));
    tally.finish()
}

struct Tally<'s> {
    start: u64,
    end: u64,
    seen: &'s mut [u64],
    cov: Coverage,
}

impl<'s> Tally<'s> {
    fn new(start: u64, end: u64, seen: &'s mut [u64]) -> Self {
        let pages = ((end - start) / PAGE) as usize;
        assert!(seen.len() * 64 >= pages, "scratch too small for the range");
        seen.iter_mut().for_each(|w| *w = 0);
        Self { start, end, seen, cov: Coverage { pairs: 0, outside: 0, duplicates: 0, uncovered: 0, sources_inside: 0, in_place: 0 } }
    }

    fn note(&mut self, d: Displaced) {
        let cov = &mut self.cov;
        cov.pairs += 1;
        if d.src == d.dest {
            cov.in_place += 1;
        } else if (self.start..self.end).contains(&d.src) {
            cov.sources_inside += 1;
        }
        if d.dest < self.start || d.dest >= self.end {
            cov.outside += 1;
            return;
        }
        let i = ((d.dest - self.start) / PAGE) as usize;
        if self.seen[i / 64] & (1 << (i % 64)) != 0 {
            cov.duplicates += 1;
        }
        self.seen[i / 64] |= 1 << (i % 64);
    }

    fn finish(mut self) -> Coverage {
        let pages = ((self.end - self.start) / PAGE) as usize;
        self.cov.uncovered = (0..pages).filter(|i| self.seen[i / 64] & (1 << (i % 64)) == 0).count();
        self.cov
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Physical memory of `pages` pages starting at 0, all of it "RAM".
    struct Mem(std::vec::Vec<u64>);
    extern crate std;

    impl Mem {
        fn new(pages: usize) -> Self {
            Self(std::vec![0; pages * 512])
        }
        fn set(&mut self, addr: u64, v: u64) {
            self.0[(addr / 8) as usize] = v;
        }
        fn is_ram(&self) -> impl Fn(u64) -> bool + '_ {
            move |a| a < self.0.len() as u64 * 8
        }
    }

    impl PhysRead for Mem {
        fn read_u64(&self, addr: u64) -> Option<u64> {
            self.0.get((addr / 8) as usize).copied()
        }
    }

    /// One walk, then the tally, as ksave does it.
    fn walked(m: &Mem, start: u64, end: u64, bits: &mut [u64]) -> Coverage {
        let mut pairs = std::vec::Vec::new();
        walk(0x1000 | IND_INDIRECTION, m, m.is_ram(), |d| pairs.push(d)).unwrap();
        coverage(pairs, start, end, bits)
    }

    /// An image of 3 pages at 0x10000, sources at 0x20000.., list at 0x1000.
    fn three_page_image() -> Mem {
        let mut m = Mem::new(64);
        let list = 0x1000;
        let entries = [0x10000 | IND_DESTINATION, 0x20000 | IND_SOURCE, 0x21000 | IND_SOURCE, 0x22000 | IND_SOURCE, IND_DONE];
        for (i, e) in entries.iter().enumerate() {
            m.set(list + 8 * i as u64, *e);
        }
        m
    }

    const CP: u64 = 0x3000;
    const TABLE: u64 = 0x5000;
    const SWAP: u64 = 0x6000;

    /// The entry state relocate_kernel leaves (shared/KEXEC-JUMP.md).
    fn entry(rsp_below_top: u64, gdtr: (u64, u16)) -> EntryState {
        EntryState { reentry: CP + 0x1a3, rsp: SWAP + PAGE - rsp_below_top, cr3: TABLE, cr4: CR4_PAE, gdtr_base: gdtr.0, gdtr_limit: gdtr.1 }
    }

    /// A control page as 6.1-6.13 leave it: the words at +2048.
    fn fixed_layout() -> Mem {
        let mut m = Mem::new(8);
        for (i, v) in [0xffff_c900_0001_3e80u64, 0x8005_0033, 0x1234_5000, 0x20, TABLE, SWAP, 0x1002].iter().enumerate() {
            m.set(CP + CONTROL_DATA_OFFSET + 8 * i as u64, *v);
        }
        m
    }

    /// As 7.3 leaves it: `.data..relocate_kernel` at a build-dependent
    /// offset (here +0x340), then the debug GDT the entry's GDTR points at.
    fn data_section_layout(at: u64) -> Mem {
        let mut m = Mem::new(8);
        let words = [0xffff_c900_0001_3e80u64, 0x8005_0033, 0x1234_5000, 0x20, 0xffff_8880_0000_3000, TABLE, SWAP, 0x1002, 0, 0x3f8];
        for (i, v) in words.iter().enumerate() {
            m.set(CP + at + 8 * i as u64, *v);
        }
        m
    }

    #[test]
    fn finds_the_words_of_6_1_to_6_13() {
        let m = fixed_layout();
        let ctx = CallerContext::find(&entry(8, (0, 0)), &m).unwrap();
        assert_eq!((ctx.control_page, ctx.layout, ctx.data_offset), (CP, Layout::Fixed, CONTROL_DATA_OFFSET));
        assert_eq!((ctx.table_page, ctx.swap_page, ctx.backup_head, ctx.saved_cr3), (TABLE, SWAP, 0x1002, 0x1234_5000));
    }

    #[test]
    fn finds_the_words_of_6_14_on_wherever_the_build_put_them() {
        for at in [0x340, 0x5a8, 0x900] {
            let m = data_section_layout(at);
            let gdt = CP + (at + 80).next_multiple_of(16);
            let ctx = CallerContext::find(&entry(16, (gdt, 0x1f)), &m).unwrap();
            assert_eq!((ctx.layout, ctx.data_offset, ctx.va_control_page), (Layout::DataSection, at, 0xffff_8880_0000_3000));
            assert_eq!((ctx.table_page, ctx.swap_page, ctx.backup_head), (TABLE, SWAP, 0x1002));
            // 6.14 and 6.15 leave GDTR limit 0: found all the same.
            assert!(CallerContext::find(&entry(16, (0, 0)), &m).is_ok());
        }
    }

    #[test]
    fn a_layout_that_does_not_verify_is_refused_with_what_did_not_match() {
        // 7.3's reported failure: no guess, a named reason.
        let m = Mem::new(8);
        assert_eq!(CallerContext::find(&entry(16, (0, 0)), &m), Err(ContextError::NotFound { table: TABLE, swap: SWAP }));
        let mut m = data_section_layout(0x340);
        m.set(CP + 0x340 + 8, 0x33); // CR0 without PG
        let err = CallerContext::find(&entry(16, (0, 0)), &m).unwrap_err();
        assert!(matches!(err, ContextError::Mismatch { what: "saved CR0 is not paged protected mode", .. }), "{err:?}");
        let mut m = data_section_layout(0x340);
        m.set(CP + 0x340 + 8 * 7, 0x8008); // a head that is a plain source
        let err = CallerContext::find(&entry(16, (0, 0)), &m).unwrap_err();
        assert!(matches!(err, ContextError::Mismatch { what: "backup map head is not a destination or indirection entry", .. }), "{err:?}");
        let m = data_section_layout(0x340);
        let err = CallerContext::find(&entry(16, (CP + 0x10, 0x1f)), &m).unwrap_err();
        assert!(matches!(err, ContextError::Mismatch { what: "GDTR at entry is not in the control page after the words", .. }), "{err:?}");
        let mut m = fixed_layout();
        m.set(CP + 0x100, TABLE);
        m.set(CP + 0x108, SWAP);
        assert_eq!(CallerContext::find(&entry(8, (0, 0)), &m), Err(ContextError::Ambiguous(0x100, 0x820)));
        let mut e = entry(8, (0, 0));
        e.cr4 = CR4_PAE | CR4_LA57;
        let err = CallerContext::find(&e, &fixed_layout()).unwrap_err();
        assert!(matches!(err, ContextError::Mismatch { what: "saved CR4.LA57 differs from the entry's", .. }), "{err:?}");
        assert_eq!(CallerContext::find(&EntryState { reentry: 0x100_0000, ..entry(8, (0, 0)) }, &fixed_layout()), Err(ContextError::Unreadable(0x100_0000)));
    }

    #[test]
    fn walks_destinations_and_sources() {
        let m = three_page_image();
        let mut seen = std::vec::Vec::new();
        let n = walk(0x1000 | IND_INDIRECTION, &m, m.is_ram(), |d| seen.push(d)).unwrap();
        assert_eq!(n, 3);
        assert_eq!(seen[2], Displaced { dest: 0x12000, src: 0x22000 });
        let mut bits = [0u64; 1];
        let cov = walked(&m, 0x10000, 0x13000, &mut bits);
        assert!(cov.is_exact(), "{cov:?}");
        assert_eq!(coverage(seen.iter().copied(), 0x10000, 0x13000, &mut bits), cov);
        let cov = walked(&m, 0x10000, 0x14000, &mut bits);
        assert_eq!(cov.uncovered, 1);
        let cov = walked(&m, 0x11000, 0x13000, &mut bits);
        assert_eq!(cov.outside, 1);
        let cov = walked(&m, 0x10000, 0x23000, &mut bits);
        assert_eq!((cov.sources_inside, cov.uncovered), (3, 16));
        assert!(!cov.is_exact());
    }

    #[test]
    fn a_page_that_is_its_own_source_is_fine() {
        let mut m = three_page_image();
        m.set(0x1000 + 16, 0x11000 | IND_SOURCE); // page 2 of 3 is its own source
        let mut bits = [0u64; 1];
        let cov = walked(&m, 0x10000, 0x13000, &mut bits);
        assert_eq!((cov.in_place, cov.sources_inside), (1, 0));
        assert!(cov.is_exact(), "{cov:?}");
        // A source inside the range that is another page's destination is not.
        m.set(0x1000 + 16, 0x12000 | IND_SOURCE);
        let cov = walked(&m, 0x10000, 0x13000, &mut bits);
        assert_eq!(cov.sources_inside, 1);
        assert!(!cov.is_exact());
    }

    #[test]
    fn follows_indirection_pages() {
        let mut m = three_page_image();
        // Chain: first page ends with an indirection to a second list page.
        m.set(0x1000 + 8 * 4, 0x2000 | IND_INDIRECTION);
        m.set(0x2000, 0x23000 | IND_SOURCE);
        m.set(0x2008, IND_DONE);
        assert_eq!(walk(0x1000 | IND_INDIRECTION, &m, m.is_ram(), |_| {}), Ok(4));
    }

    #[test]
    fn a_looping_list_is_rejected() {
        let mut m = Mem::new(4);
        m.set(0x1000, 0x1000 | IND_INDIRECTION);
        assert_eq!(walk(0x1000 | IND_INDIRECTION, &m, m.is_ram(), |_| {}), Err(WalkError::TooLong));
    }

    #[test]
    fn pointers_outside_ram_are_rejected() {
        let mut m = three_page_image();
        m.set(0x1008, 0x8000_0000 | IND_SOURCE);
        assert_eq!(walk(0x1000 | IND_INDIRECTION, &m, m.is_ram(), |_| {}), Err(WalkError::NotRam(0x8000_0000)));
        assert_eq!(walk(0x4000_0000 | IND_INDIRECTION, &m, m.is_ram(), |_| {}), Err(WalkError::NotRam(0x4000_0000)));
    }

    #[test]
    fn the_caller_view_undoes_the_swap() {
        let mut m = Mem::new(64);
        m.set(0x11008, 0xaaaa); // ksave's bytes in the image's second page
        m.set(0x21008, 0xbbbb); // the caller's data of that page, in its source
        m.set(0x30008, 0xcccc); // untouched memory
        let sources = [0x22000, 0x21000, 0x20000];
        let mut scratch = [0u16; 3];
        let view = CallerView::new(&m, 0x10000, &sources, &mut scratch);
        assert_eq!(view.read_u64(0x11008), Some(0xbbbb), "a destination reads its source");
        assert_eq!(view.read_u64(0x21008), Some(0xaaaa), "a source reads its destination");
        assert_eq!(view.read_u64(0x30008), Some(0xcccc));
    }

    #[test]
    fn a_source_before_any_destination_is_rejected() {
        let mut m = Mem::new(4);
        m.set(0x1000, 0x2000 | IND_SOURCE);
        assert_eq!(walk(0x1000 | IND_INDIRECTION, &m, m.is_ram(), |_| {}), Err(WalkError::SourceWithoutDestination(0x2000)));
    }
}
