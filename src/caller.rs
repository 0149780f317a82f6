//! The kexec caller: ksave entered by `kexec -e` of an image loaded with
//! `--load-preserve-context`. Who called and what the jump left (read once
//! into a [`Caller`]), the save, and the way back.

use core::sync::atomic::{AtomicU32, Ordering};

use bootinfo::kexec::{self, CallerContext, EntryState};
use bootinfo::pagewalk;
use freepages::buddy::Scanner;
use freepages::vmcoreinfo::Info;
use ksave_core::Message;
use ksave_format::header::fail;
use ksave_format::{PAGE, Range};

use crate::jump::{BackupMap, Caller, Displacement, KernelView};
use crate::layout::image_range;
use crate::physmem::IdentityMapped;
use crate::wayback::{self, bail_out, return_to_caller};
use crate::{config, heap, paging, println};

/// Kexec-jump entries since the image was loaded. In .data, not .bss, so it
/// survives the bss clearing of a re-entry.
#[unsafe(link_section = ".data.persistent")]
static ENTRIES: AtomicU32 = AtomicU32::new(0);

/// Reports the caller, saves it if ksave.elf is configured, and jumps back.
pub fn run(reentry: u64, caller_rsp: u64) -> ! {
    wayback::set_reentry(reentry);
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
            // Unconfigured, ksave has no RAM map from the host; a kernel that
            // needs its GDT found gets one from the identity tables it built
            // for the jump, which map its RAM and firmware tables, memory all
            // of it (pagewalk::identity_ranges).
            let mut identity = [Range::default(); 64];
            let ram = match &config {
                Ok(config) => Some(config.ram()),
                Err(_) if !reloads_own_gdt(&ctx) => identity_ram(&ctx, &mut identity),
                Err(_) => None,
            };
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
            let caller = Caller { ctx: &ctx, backup: &backup, return_gdt, view: view.as_ref(), kernel };
            match &config {
                Ok(config) => {
                    if let Err(f) = crate::save::run(config, &caller) {
                        bail_out(f.code, format_args!("{}", f.message.as_str()));
                    }
                }
                Err(e) => println!("ksave: not saving: {e}"),
            }
        }
        Err(e) => {
            // The config's host info names the kernel (hostname, release).
            let kernel = config.as_ref().map_or("an unknown kernel", |c| c.info());
            println!("ksave:   control page not usable, not saving: {e} (caller: {kernel})");
            // The host tool reads the reason from the partition, or else
            // from its mailbox.
            if let Ok(config) = &config {
                let why = format_args!("the control page of {kernel} is not usable: {e}");
                crate::save::record_refusal(config, fail::CONTEXT, why);
                bail_out(fail::CONTEXT, why);
            }
        }
    }
    println!("ksave: returning to caller");
    return_to_caller(reentry)
}

/// The ranges the caller's identity tables for the jump map to themselves,
/// into `out`, as its RAM map (see [`pagewalk::identity_ranges`]); `None`
/// if they map nothing.
fn identity_ram<'a>(ctx: &CallerContext, out: &'a mut [Range; 64]) -> Option<&'a [Range]> {
    let mut pairs = [(0u64, 0u64); 64];
    let la57 = ctx.saved_cr4 & kexec::CR4_LA57 != 0;
    let found = pagewalk::identity_ranges(ctx.table_page, la57, &IdentityMapped, &mut pairs);
    // Without the legacy VGA and ROM hole (0xa0000-0x100000), which the
    // kernel maps with the first MiB but which is no RAM.
    const HOLE: Range = Range { start: 0xa_0000, end: 0x10_0000 };
    let mut n = 0;
    for &(start, end) in &pairs[..found] {
        for piece in [Range { start, end: end.min(HOLE.start) }, Range { start: start.max(HOLE.end), end }] {
            if piece.start < piece.end && n < out.len() {
                out[n] = piece;
                n += 1;
            }
        }
    }
    let ram = &out[..n];
    if let (Some(first), Some(last)) = (ram.first(), ram.last()) {
        println!("ksave:   RAM map from the kernel's identity tables for the jump: {n} ranges, {:#x}-{:#x} (ksave.elf is not configured)", first.start, last.end);
    }
    (n > 0).then_some(ram)
}

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
            wayback::set_return_gdt(va);
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

