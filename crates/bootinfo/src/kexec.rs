//! The kexec-jump caller, as seen from the image it jumped to (Linux 6.1 to
//! 6.13, x86_64).
//!
//! `relocate_kernel` (arch/x86/kernel/relocate_kernel_64.S) enters the image
//! with `[rsp]` = its re-entry address inside the control page, and keeps a
//! few words at control page + `KEXEC_CONTROL_CODE_MAX_SIZE` (2048). One of
//! them is `image->head`, the first entry of the kimage indirection list: the
//! "backup map" telling which source page now holds the caller's old contents
//! of each destination page. This layout is private to the kernel, so every
//! value is checked before it is trusted.

use crate::PhysRead;

const PAGE: u64 = 4096;
/// KEXEC_CONTROL_CODE_MAX_SIZE on x86_64 (arch/x86/include/asm/kexec.h).
pub const CONTROL_DATA_OFFSET: u64 = 2048;

/// Indirection entry flags (include/linux/kexec.h: IND_*).
pub const IND_DESTINATION: u64 = 0x1;
/// Next entry is read from the page this entry points to.
pub const IND_INDIRECTION: u64 = 0x2;
/// End of the list.
pub const IND_DONE: u64 = 0x4;
/// A source page, copied (for a jump: swapped) to the current destination.
pub const IND_SOURCE: u64 = 0x8;

/// The words `relocate_kernel` keeps in its control page for the way back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallerContext {
    /// Where to `call` to return to the caller.
    pub reentry: u64,
    /// The page holding the caller's relocate_kernel copy and saved state.
    pub control_page: u64,
    /// The caller's saved stack pointer (virtual).
    pub saved_rsp: u64,
    /// The caller's saved CR0.
    pub saved_cr0: u64,
    /// The caller's saved CR3 (its own page tables).
    pub saved_cr3: u64,
    /// The caller's saved CR4.
    pub saved_cr4: u64,
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
    /// A page address that must be page aligned is not.
    Misaligned(&'static str, u64),
}

impl CallerContext {
    /// Reads the context behind the re-entry address found at `[rsp]`.
    pub fn read(reentry: u64, mem: &impl PhysRead) -> Result<Self, ContextError> {
        let control_page = reentry & !(PAGE - 1);
        let data = control_page + CONTROL_DATA_OFFSET;
        let word = |i: u64| mem.read_u64(data + 8 * i).ok_or(ContextError::Unreadable(data + 8 * i));
        let ctx = Self {
            reentry,
            control_page,
            saved_rsp: word(0)?,
            saved_cr0: word(1)?,
            saved_cr3: word(2)?,
            saved_cr4: word(3)?,
            table_page: word(4)?,
            swap_page: word(5)?,
            backup_head: word(6)?,
        };
        for (name, addr) in [("table page", ctx.table_page), ("swap page", ctx.swap_page)] {
            if addr % PAGE != 0 || addr == 0 {
                return Err(ContextError::Misaligned(name, addr));
            }
        }
        Ok(ctx)
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

/// Checks which pages of `[start, end)` the backup map displaces. `seen` is
/// scratch with a bit per page of the range.
pub fn coverage(
    head: u64,
    mem: &impl PhysRead,
    is_ram: impl Fn(u64) -> bool,
    start: u64,
    end: u64,
    seen: &mut [u64],
) -> Result<Coverage, WalkError> {
    let mut tally = Tally::new(start, end, seen);
    walk(head, mem, is_ram, |d| tally.note(d))?;
    Ok(tally.finish())
}

/// [`coverage`] of pairs already walked.
pub fn coverage_of(pairs: impl IntoIterator<Item = Displaced>, start: u64, end: u64, seen: &mut [u64]) -> Coverage {
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

    #[test]
    fn reads_the_control_page_words() {
        let mut m = Mem::new(8);
        let cp = 0x3000;
        for (i, v) in [0xffff_8000_0000_1000u64, 0x8005_0033, 0x1234_5000, 0x20, 0x5000, 0x6000, 0x1002].iter().enumerate() {
            m.set(cp + CONTROL_DATA_OFFSET + 8 * i as u64, *v);
        }
        let ctx = CallerContext::read(cp + 0x1a3, &m).unwrap();
        assert_eq!(ctx.control_page, cp);
        assert_eq!(ctx.table_page, 0x5000);
        assert_eq!(ctx.swap_page, 0x6000);
        assert_eq!(ctx.backup_head, 0x1002);
        m.set(cp + CONTROL_DATA_OFFSET + 0x28, 0x6008);
        assert_eq!(CallerContext::read(cp + 0x1a3, &m), Err(ContextError::Misaligned("swap page", 0x6008)));
        assert_eq!(CallerContext::read(0x100_0000, &m), Err(ContextError::Unreadable(0x100_0000 + CONTROL_DATA_OFFSET)));
    }

    #[test]
    fn walks_destinations_and_sources() {
        let m = three_page_image();
        let mut seen = std::vec::Vec::new();
        let n = walk(0x1000 | IND_INDIRECTION, &m, m.is_ram(), |d| seen.push(d)).unwrap();
        assert_eq!(n, 3);
        assert_eq!(seen[2], Displaced { dest: 0x12000, src: 0x22000 });
        let mut bits = [0u64; 1];
        let cov = coverage(0x1000 | IND_INDIRECTION, &m, m.is_ram(), 0x10000, 0x13000, &mut bits).unwrap();
        assert!(cov.is_exact(), "{cov:?}");
        assert_eq!(coverage_of(seen.iter().copied(), 0x10000, 0x13000, &mut bits), cov);
        let cov = coverage(0x1000 | IND_INDIRECTION, &m, m.is_ram(), 0x10000, 0x14000, &mut bits).unwrap();
        assert_eq!(cov.uncovered, 1);
        let cov = coverage(0x1000 | IND_INDIRECTION, &m, m.is_ram(), 0x11000, 0x13000, &mut bits).unwrap();
        assert_eq!(cov.outside, 1);
        let cov = coverage(0x1000 | IND_INDIRECTION, &m, m.is_ram(), 0x10000, 0x23000, &mut bits).unwrap();
        assert_eq!((cov.sources_inside, cov.uncovered), (3, 16));
        assert!(!cov.is_exact());
    }

    #[test]
    fn a_page_that_is_its_own_source_is_fine() {
        let mut m = three_page_image();
        m.set(0x1000 + 16, 0x11000 | IND_SOURCE); // page 2 of 3 is its own source
        let mut bits = [0u64; 1];
        let cov = coverage(0x1000 | IND_INDIRECTION, &m, m.is_ram(), 0x10000, 0x13000, &mut bits).unwrap();
        assert_eq!((cov.in_place, cov.sources_inside), (1, 0));
        assert!(cov.is_exact(), "{cov:?}");
        // A source inside the range that is another page's destination is not.
        m.set(0x1000 + 16, 0x12000 | IND_SOURCE);
        let cov = coverage(0x1000 | IND_INDIRECTION, &m, m.is_ram(), 0x10000, 0x13000, &mut bits).unwrap();
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
    fn a_source_before_any_destination_is_rejected() {
        let mut m = Mem::new(4);
        m.set(0x1000, 0x2000 | IND_SOURCE);
        assert_eq!(walk(0x1000 | IND_INDIRECTION, &m, m.is_ram(), |_| {}), Err(WalkError::SourceWithoutDestination(0x2000)));
    }
}
