//! The kexec caller: ksave entered by `kexec -e` of an image loaded with
//! `--load-preserve-context`. Who called, what the jump displaced (the
//! backup map, walked and proven once here), the save, and the way back.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use bootinfo::kexec::{self, CallerContext, Coverage, Displaced, WalkError};
use ksave_format::header::MAX_BACKUP_PAIRS;
use ksave_format::{BackupPair, Range};

use crate::layout::image_range;
use crate::physmem::IdentityMapped;
use crate::work::Exclusive;
use crate::{config, heap, paging, println};

/// Kexec-jump entries since the image was loaded. In .data, not .bss, so it
/// survives the bss clearing of a re-entry.
#[unsafe(link_section = ".data.persistent")]
static ENTRIES: AtomicU32 = AtomicU32::new(0);

/// The caller's re-entry address on this entry, 0 when not entered by kexec.
static REENTRY: AtomicU64 = AtomicU64::new(0);

/// The caller's re-entry address, if ksave was entered by a kexec jump.
pub fn reentry() -> Option<u64> {
    match REENTRY.load(Ordering::Relaxed) {
        0 => None,
        r => Some(r),
    }
}

/// Reports the caller, saves it if ksave.elf is configured, and jumps back.
pub fn run(reentry: u64, caller_rsp: u64) -> ! {
    REENTRY.store(reentry, Ordering::Relaxed);
    let entry = ENTRIES.fetch_add(1, Ordering::Relaxed) + 1;
    let (start, end) = image_range();
    println!("ksave {}: entered by kexec jump (entry {entry})", env!("CARGO_PKG_VERSION"));
    println!("ksave:   caller re-entry {reentry:#x}, stack {caller_rsp:#x}");
    println!("ksave:   own load range {start:#x}-{end:#x} ({} KiB, heap {} KiB)", (end - start) / 1024, heap::HEAP_SIZE / 1024);
    println!("ksave:   memory visible: {}", paging::Describe);
    match CallerContext::read(reentry, &IdentityMapped) {
        Ok(ctx) => {
            println!(
                "ksave:   control page {:#x}: saved cr3 {:#x}, identity table {:#x}, swap page {:#x}, backup map head {:#x}",
                ctx.control_page, ctx.saved_cr3, ctx.table_page, ctx.swap_page, ctx.backup_head
            );
            let config = config::load();
            let ram = config.as_ref().ok().map(|c| c.ram());
            let backup = BackupMap::walk(&ctx, ram, Range { start, end });
            backup.report();
            match config {
                Ok(config) => crate::save::run(&config, &ctx, &backup),
                Err(e) => println!("ksave: not saving: {e}"),
            }
        }
        Err(e) => println!("ksave:   control page not usable, not saving: {e:?}"),
    }
    println!("ksave: returning to caller");
    return_to_caller(reentry)
}

/// Most displaced pages recorded: an exact map lists only ksave's own pages,
/// so a longer one is refused anyway (1 MiB of image; the image is half that).
pub const MAX_PAIRS: usize = 256;
const _: () = assert!(MAX_PAIRS <= MAX_BACKUP_PAIRS);

static PAIRS: Exclusive<[BackupPair; MAX_PAIRS]> = Exclusive::new([BackupPair { dest: 0, src: 0 }; MAX_PAIRS]);

/// The pages the jump displaced, walked once from the caller's indirection
/// list, and how they cover ksave's own range.
pub struct BackupMap {
    pairs: &'static [BackupPair],
    outcome: Result<Coverage, MapError>,
    /// Whether every page address was checked against a RAM map.
    ram_checked: bool,
}

/// Why the backup map cannot be used.
#[derive(Clone, Copy, Debug)]
pub enum MapError {
    /// The list itself is broken.
    Walk(WalkError),
    /// It lists more pages than ksave has ([`MAX_PAIRS`]).
    TooLong,
}

impl BackupMap {
    /// Walks the list behind `ctx`. Every page address it names must be in
    /// `ram`, the caller's RAM map; without one (ksave.elf not configured,
    /// so nothing will be saved) addresses are only checked to be readable.
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
            Ok(_) if too_long => Err(MapError::TooLong),
            Ok(_) => {
                let mut seen = [0u64; 64]; // one bit a page: 16 MiB of image at most
                let displaced = pairs.iter().map(|p| Displaced { dest: p.dest, src: p.src });
                Ok(kexec::coverage_of(displaced, own.start, own.end, &mut seen))
            }
        };
        Self { pairs, outcome, ram_checked: ram.is_some() }
    }

    /// The displaced pages, in list order.
    pub fn pairs(&self) -> &[BackupPair] {
        self.pairs
    }

    /// How the map covers ksave's range, or why it is unusable.
    pub fn outcome(&self) -> Result<Coverage, MapError> {
        self.outcome
    }

    /// One banner line: whether the displaced pages are exactly ksave's own.
    fn report(&self) {
        let unchecked = if self.ram_checked { "" } else { " (not checked against a RAM map: ksave.elf is not configured)" };
        match self.outcome {
            Ok(cov) if cov.is_exact() => println!(
                "ksave:   backup map: {} pages displaced ({} in place), exactly ksave's own range{unchecked}",
                cov.pairs, cov.in_place
            ),
            Ok(cov) => println!(
                "ksave:   backup map: {} pages displaced, NOT exactly ksave's range: {} outside, {} twice, {} uncovered, {} sources inside",
                cov.pairs, cov.outside, cov.duplicates, cov.uncovered, cov.sources_inside
            ),
            Err(MapError::Walk(e)) => println!("ksave:   backup map rejected: {e:?}"),
            Err(MapError::TooLong) => println!("ksave:   backup map rejected: more than {MAX_PAIRS} pages"),
        }
    }
}

unsafe extern "C" {
    /// asm/entry.s: `call`s `reentry` on ksave's stack, the way a kexec
    /// jump returns; the caller's next `kexec -e` comes in at the entry.
    fn ksave_return_to_caller(reentry: u64) -> !;
}

/// Returns to the kexec caller. Never returns here: the next `kexec -e`
/// comes in through the entry point again.
pub fn return_to_caller(reentry: u64) -> ! {
    // SAFETY: reentry is the address the caller's relocate_kernel left at
    // [rsp] on entry; it lies in the caller's control page, which our
    // identity map covers (it is RAM below 4 GiB on the machines we map) and
    // which we never wrote. The caller switches to its own stack and tables.
    unsafe { ksave_return_to_caller(reentry) }
}

/// Goes into a saved kernel the way its kexec jump would have come back:
/// a `call` of its re-entry address (resume, after the image is loaded).
///
/// # Safety
/// `reentry` must be the re-entry address a complete image recorded, and
/// that image must be loaded, identity-mapped, into this machine's RAM.
pub unsafe fn enter_saved_kernel(reentry: u64) -> ! {
    // SAFETY: upheld by the caller: the control page and everything the
    // saved kernel's return path touches is back in place.
    unsafe { ksave_return_to_caller(reentry) }
}
