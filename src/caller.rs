//! The kexec caller: ksave entered by `kexec -e` of an image loaded with
//! `--load-preserve-context`. Who called, what the jump displaced (the
//! backup map, walked and proven once here), the save, and the way back.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use bootinfo::kexec::{self, CallerContext, CallerView, Coverage, Displaced, EntryState, WalkError};
use bootinfo::pagewalk;
use freepages::buddy::Scanner;
use freepages::vmcoreinfo::Info;
use ksave_format::header::MAX_BACKUP_PAIRS;
use ksave_format::header::fail;
use ksave_format::{BackupPair, PAGE, Range};

use crate::layout::image_range;
use crate::message::Message;
use crate::physmem::{IdentityMapped, RamOnly};
use crate::work::Exclusive;
use crate::{config, heap, paging, println};

/// Kexec-jump entries since the image was loaded. In .data, not .bss, so it
/// survives the bss clearing of a re-entry.
#[unsafe(link_section = ".data.persistent")]
static ENTRIES: AtomicU32 = AtomicU32::new(0);

/// The caller's re-entry address on this entry, 0 when not entered by kexec.
static REENTRY: AtomicU64 = AtomicU64::new(0);

/// The GDT to leave in GDTR for the caller (base; 0 for none), found once
/// per entry by [`kernel_gdt`].
static RETURN_GDT: AtomicU64 = AtomicU64::new(0);

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
    let config = config::load();
    if let Ok(config) = &config {
        map_caller_memory(config);
    }
    match CallerContext::find(&entry_state(reentry, caller_rsp), &IdentityMapped) {
        Ok(ctx) => {
            println!(
                "ksave:   control page {:#x} ({:?} layout, words at +{:#x}): saved cr3 {:#x}, identity table {:#x}, swap page {:#x}, backup map head {:#x}",
                ctx.control_page, ctx.layout, ctx.data_offset, ctx.saved_cr3, ctx.table_page, ctx.swap_page, ctx.backup_head
            );
            let ram = config.as_ref().ok().map(|c| c.ram());
            let backup = BackupMap::walk(&ctx, ram, Range { start, end });
            backup.report();
            // The caller's memory as it sees it, and the kernel's own
            // description of itself (for its free pages): read once here.
            let mut displaced = Displacement::new(&backup, start, ram);
            let view = displaced.as_mut().map(Displacement::view);
            let kernel = match (&config, &view) {
                (Ok(config), Some(view)) => crate::free::kernel_info(config, &ctx, view),
                (Err(_), _) => Err(Message::format(format_args!("ksave.elf is not configured"))),
                (Ok(_), None) => Err(Message::format(format_args!("the backup map is not exactly ksave's pages"))),
            };
            let return_gdt = kernel_gdt(&ctx, ram, view.as_ref(), kernel.as_ref().ok());
            match &config {
                Ok(config) => crate::save::run(config, &ctx, &backup, return_gdt, view.as_ref(), kernel),
                Err(e) => println!("ksave: not saving: {e}"),
            }
        }
        Err(e) => {
            // The config's host info names the kernel (hostname, release).
            let kernel = config.as_ref().map_or("an unknown kernel", |c| c.info());
            println!("ksave:   control page not usable, not saving: {e} (caller: {kernel})");
            // The host tool reads the reason from the partition.
            if let Ok(config) = &config {
                crate::save::record_refusal(config, fail::CONTEXT, format_args!("the control page of {kernel} is not usable: {e}"));
            }
        }
    }
    println!("ksave: returning to caller");
    return_to_caller(reentry)
}

/// Most displaced pages recorded: an exact map lists only ksave's own pages,
/// so a longer one is refused anyway (1 MiB of image; the image is half that).
pub const MAX_PAIRS: usize = 256;
const _: () = assert!(MAX_PAIRS <= MAX_BACKUP_PAIRS);

/// Maps the caller's RAM and NVS into ksave's identity map where the CPU
/// needs that (no 1 GiB pages, RAM above 4 GiB); what stays unmapped is
/// refused by the save's reachability stage.
fn map_caller_memory(config: &ksave_format::config::Config) {
    if let Some(end) = config.ram().iter().chain(config.nvs()).map(|r| r.end).max()
        && let Err(e) = paging::map_ram_to(end)
    {
        println!("ksave:   {e}");
    }
}

unsafe extern "C" {
    // asm/entry.s keeps these at the kexec entry, before changing anything.
    static ksave_entry_cr3: u64;
    static ksave_entry_cr4: u64;
    static ksave_entry_gdtr: [u8; 16];
}

/// The kernel's own per-CPU GDT, to be in GDTR when it gets control back.
/// 6.1 (and every kernel without upstream's "Restore GDT on return from
/// ::preserve_context kexec") loads SS, DS and ES and then does `ltr` from
/// whatever GDTR holds before it reloads its GDT (arch/x86/power/cpu.c:
/// `__restore_processor_state`, `fix_processor_context`); ksave's own GDT is
/// swapped out by then. Fixed kernels load this same GDT themselves
/// (`saved_context.gdt_desc` is `get_cpu_gdt_rw`), so it is left for every
/// kernel. Found in the caller's RAM (`ram`, the config's map: no other
/// memory is scanned) and addressed through the kernel's direct map.
///
/// Its page tables and GDT are read as the caller will see them once the
/// swap is undone (`CallerView`): pages under ksave hold ksave now, and
/// the caller's page tables may well have been among them.
#[inline(never)] // entry-time work: its frame is gone before the save
fn kernel_gdt(ctx: &CallerContext, ram: Option<&[Range]>, view: Option<&KernelView>, kernel: Option<&Info>) -> Option<(u64, u16)> {
    let reloads = reloads_own_gdt(ctx);
    let found = match (ram, view) {
        (Some(ram), Some(view)) => {
            let la57 = ctx.saved_cr4 & kexec::CR4_LA57 != 0;
            let ram = ram.iter().map(|r| (r.start, r.end.min(paging::identity_end())));
            // Pages the kernel holds free may hold stale copies of a GDT.
            let mut scanner = kernel.and_then(|info| Scanner::new(info, view, info.la57).ok());
            let is_free = |pa: u64| scanner.as_mut().is_some_and(|s| s.is_free(pa / PAGE as u64));
            pagewalk::find_kernel_gdt(ram, ctx.saved_cr3, la57, &[ctx.control_page], view, is_free).map_err(|e| Message::format(format_args!("{e}")))
        }
        (None, _) => Err(Message::format(format_args!("no RAM map to search (ksave.elf is not configured)"))),
        (Some(_), None) => Err(Message::format(format_args!("the backup map is not exactly ksave's pages, so the caller's memory cannot be read as it is"))),
    };
    match found {
        Ok(va) => {
            println!("ksave:   return GDT: the kernel's own at {va:#x} (the kernel {} it itself)", if reloads { "also reloads" } else { "does not reload" });
            RETURN_GDT.store(va, Ordering::Relaxed);
            Some((va, pagewalk::LINUX_GDT_LIMIT))
        }
        Err(why) if reloads => {
            println!("ksave:   return GDT: not found ({}); the kernel reloads its own", why.as_str());
            None
        }
        Err(why) => {
            println!(
                "ksave:   WARNING: this kernel does not reload its GDT after a jump back, and ksave did not find it ({}): the kernel may not survive",
                why.as_str()
            );
            None
        }
    }
}

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

/// Whether the caller reloads its GDT on the way back: 6.14 on always (the
/// data-section layout); before, if the relocate_kernel copy in the control
/// page has `movq $saved_context, %rax; lgdt disp(%rax)` (6.6.y and 6.12.y
/// with the fix).
fn reloads_own_gdt(ctx: &CallerContext) -> bool {
    if ctx.layout == kexec::Layout::DataSection {
        return true;
    }
    // SAFETY: the control page is identity-mapped RAM the caller left us to
    // read (CallerContext::find read it already); nothing writes it now.
    let code = unsafe { crate::physmem::bytes(ctx.control_page, kexec::CONTROL_DATA_OFFSET as usize) };
    code.windows(10).any(|w| w[..3] == [0x48, 0xc7, 0xc0] && w[7..9] == [0x0f, 0x01] && (w[9] == 0x50 || w[9] == 0x90))
}

/// What the CPU said at this kexec entry.
fn entry_state(reentry: u64, rsp: u64) -> EntryState {
    // SAFETY: written by asm/entry.s before Rust runs, never after.
    let (cr3, cr4, gdtr) = unsafe { (ksave_entry_cr3, ksave_entry_cr4, ksave_entry_gdtr) };
    let gdtr_limit = u16::from_le_bytes([gdtr[0], gdtr[1]]);
    let gdtr_base = u64::from_le_bytes(gdtr[2..10].try_into().unwrap());
    EntryState { reentry, rsp, cr3, cr4, gdtr_base, gdtr_limit }
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
            Ok(_) if too_long => Err(MapError::TooLong),
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
    fn report(&self) {
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
            Err(MapError::TooLong) => {
                println!("ksave:   backup map rejected: more than {MAX_PAIRS} pages")
            }
        }
    }
}

unsafe extern "C" {
    /// asm/entry.s: loads `gdtr` (if not null), then `call`s `reentry` on
    /// ksave's stack, the way a kexec jump returns; the caller's next
    /// `kexec -e` comes in at the entry.
    fn ksave_return_to_caller(reentry: u64, gdtr: *const [u8; 10]) -> !;
}

/// A GDTR pseudo-descriptor (Intel SDM vol. 3A 3.5.1): limit, then base.
fn pseudo_descriptor(base: u64, limit: u16) -> [u8; 10] {
    let mut d = [0u8; 10];
    d[..2].copy_from_slice(&limit.to_le_bytes());
    d[2..].copy_from_slice(&base.to_le_bytes());
    d
}

/// Returns to the kexec caller, with the kernel's GDT in GDTR if it was
/// found. Never returns here: the next `kexec -e` comes in through the
/// entry point again.
pub fn return_to_caller(reentry: u64) -> ! {
    let gdtr = match RETURN_GDT.load(Ordering::Relaxed) {
        0 => None,
        base => Some(pseudo_descriptor(base, pagewalk::LINUX_GDT_LIMIT)),
    };
    // SAFETY: reentry is the address the caller's relocate_kernel left at
    // [rsp] on entry; it lies in the caller's control page, which our
    // identity map covers and which we never wrote. The caller switches to
    // its own stack and tables. The GDT, if any, is the caller's own,
    // translated through its page tables (kernel_gdt); from the lgdt on,
    // ksave takes no exception.
    unsafe { ksave_return_to_caller(reentry, gdtr.as_ref().map_or(core::ptr::null(), |d| d as *const _)) }
}

/// Goes into a saved kernel the way its kexec jump would have come back:
/// a `call` of its re-entry address (resume, after the image is loaded),
/// with the GDT the image recorded (base 0: none).
///
/// # Safety
/// `reentry` and `gdt` must be what a complete image recorded, and that
/// image must be loaded, identity-mapped, into this machine's RAM.
pub unsafe fn enter_saved_kernel(reentry: u64, gdt: (u64, u16)) -> ! {
    let gdtr = pseudo_descriptor(gdt.0, gdt.1);
    let gdtr = if gdt.0 == 0 { core::ptr::null() } else { &gdtr as *const _ };
    // SAFETY: upheld by the caller: the control page and everything the
    // saved kernel's return path touches is back in place.
    unsafe { ksave_return_to_caller(reentry, gdtr) }
}
