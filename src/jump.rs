//! What a kexec jump left ksave, read once at entry: the pages it
//! displaced (the backup map, walked and proven here), the caller's memory
//! as the caller sees it, and the [`Caller`] the save works from, built
//! once by `caller::run`.

use bootinfo::kexec::{self, CallerContext, CallerView, Coverage, Displaced};
use freepages::vmcoreinfo::Info;
use ksave_core::Message;
use ksave_core::save::MapError;
use ksave_format::header::MAX_BACKUP_PAIRS;
use ksave_format::{BackupPair, PAGE, Range};

use crate::physmem::{IdentityMapped, RamOnly};
use crate::println;
use crate::work::Exclusive;

/// What ksave learned about its kexec caller at entry.
pub struct Caller<'a> {
    /// Its control page's words.
    pub ctx: &'a CallerContext,
    /// The pages the jump displaced.
    pub backup: &'a BackupMap,
    /// The GDT to leave in GDTR for it (base, limit), if found.
    pub return_gdt: Option<(u64, u16)>,
    /// Its memory as it sees it (only with an exact backup map).
    pub view: Option<&'a KernelView<'a>>,
    /// Its own description (vmcoreinfo), or why there is none.
    pub kernel: Result<Info, Message>,
}

/// Most displaced pages recorded: an exact map lists only ksave's own pages,
/// so a longer one is refused anyway (2 MiB of image; the image is about
/// 1.3 MiB, of which the helpers' queue takes 0.3).
pub const MAX_PAIRS: usize = 512;
const _: () = assert!(MAX_PAIRS <= MAX_BACKUP_PAIRS);

/// What the jump swapped, for reading the caller's memory as the caller
/// sees it ([`kexec::CallerView`]); only from a backup map that is exactly
/// ksave's pages.
pub struct Displacement<'r> {
    /// The caller's RAM, the only memory the view reads.
    ram: RamOnly<'r>,
    start: u64,
    count: usize,
    /// `sources[i]`: where the caller's page `start + i` pages is now.
    sources: [u64; MAX_PAIRS],
    scratch: [u16; MAX_PAIRS],
}

/// The caller's memory as it sees it, reading only its RAM.
pub type KernelView<'v> = CallerView<'v, RamOnly<'v>>;

impl<'r> Displacement<'r> {
    /// The displacement `backup` describes, if it is exactly ksave's pages
    /// from `own_start` on, over the caller's RAM map `ram`.
    pub fn new(backup: &BackupMap, own_start: u64, ram: Option<&'r [Range]>) -> Option<Self> {
        if !backup.outcome().is_ok_and(|cov| cov.is_exact()) {
            return None;
        }
        let mut d = Self { ram: RamOnly(ram), start: own_start, count: backup.pairs().len(), sources: [0; MAX_PAIRS], scratch: [0; MAX_PAIRS] };
        for p in backup.pairs() {
            d.sources[((p.dest - own_start) / PAGE as u64) as usize] = p.src;
        }
        Some(d)
    }

    /// The caller's memory as it will be once the swap is undone.
    pub fn view(&mut self) -> KernelView<'_> {
        let n = self.count;
        kexec::CallerView::new(&self.ram, self.start, &self.sources[..n], &mut self.scratch[..n])
    }
}

static PAIRS: Exclusive<[BackupPair; MAX_PAIRS]> = Exclusive::new([BackupPair { dest: 0, src: 0 }; MAX_PAIRS]);

/// The pages the jump displaced, walked once from the caller's indirection
/// list, and how they cover ksave's own range.
pub struct BackupMap {
    pairs: &'static [BackupPair],
    outcome: Result<Coverage, MapError>,
    /// Whether every page address was checked against a RAM map.
    ram_checked: bool,
}

impl BackupMap {
    /// Walks the list behind `ctx`. Every page address it names must be in
    /// `ram`, the caller's RAM map; without one (ksave.elf not configured,
    /// so nothing will be saved) addresses are only checked to be readable.
    #[inline(never)] // entry-time work: its frame is gone before the save
    pub fn walk(ctx: &CallerContext, ram: Option<&[Range]>, own: Range) -> Self {
        let storage = PAIRS.take();
        let is_ram = |addr: u64| ram.is_none_or(|ram| ram.iter().any(|r| r.contains(addr)));
        let mut n = 0;
        let mut too_long = false;
        let walked = kexec::walk(ctx.backup_head, &IdentityMapped, is_ram, |d| match storage.get_mut(n) {
            Some(slot) => {
                *slot = BackupPair { dest: d.dest, src: d.src };
                n += 1;
            }
            None => too_long = true,
        });
        let pairs = &storage[..n];
        let outcome = match walked {
            Err(e) => Err(MapError::Walk(e)),
            Ok(_) if too_long => Err(MapError::TooLong { limit: MAX_PAIRS }),
            Ok(_) => {
                let mut seen = [0u64; 64]; // one bit a page: 16 MiB of image at most
                let displaced = pairs.iter().map(|p| Displaced { dest: p.dest, src: p.src });
                Ok(kexec::coverage(displaced, own.start, own.end, &mut seen))
            }
        };
        Self { pairs, outcome, ram_checked: ram.is_some() }
    }

    /// The displaced pages, in list order.
    pub fn pairs(&self) -> &[BackupPair] {
        self.pairs
    }

    /// Whether any page in `[start, end)` is where the jump moved a caller
    /// page to (a page kexec allocated: never free).
    pub fn has_source_in(&self, start: u64, end: u64) -> bool {
        self.pairs.iter().any(|p| start <= p.src && p.src < end)
    }

    /// How the map covers ksave's range, or why it is unusable.
    pub fn outcome(&self) -> Result<Coverage, MapError> {
        self.outcome
    }

    /// One banner line: whether the displaced pages are exactly ksave's own.
    pub fn report(&self) {
        let unchecked = if self.ram_checked { "" } else { " (not checked against a RAM map: ksave.elf is not configured)" };
        match self.outcome {
            Ok(cov) if cov.is_exact() => {
                println!("ksave:   backup map: {} pages displaced ({} in place), exactly ksave's own range{unchecked}", cov.pairs, cov.in_place)
            }
            Ok(cov) => println!(
                "ksave:   backup map: {} pages displaced, NOT exactly ksave's range: {} outside, {} twice, {} uncovered, {} sources inside",
                cov.pairs, cov.outside, cov.duplicates, cov.uncovered, cov.sources_inside
            ),
            Err(MapError::Walk(e)) => println!("ksave:   backup map rejected: {e:?}"),
            Err(MapError::TooLong { .. }) => {
                println!("ksave:   backup map rejected: more than {MAX_PAIRS} pages")
            }
        }
    }
}

