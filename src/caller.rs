//! ksave entered by a kexec jump: who called, what the jump displaced, and
//! the way back.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use bootinfo::kexec::{self, CallerContext};

use crate::layout::image_range;
use crate::paging;
use crate::physmem::IdentityMapped;
use crate::{heap, println};

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

/// Reports the caller and jumps back to it; or, started by a plain kexec
/// (no caller), resumes the image its config names.
pub fn run(reentry: u64, caller_rsp: u64) -> ! {
    if reentry == 0 {
        // relocate_kernel_64.S pushes 0 as the return address when it does
        // not preserve context: `ksave resume` kexec'd us from kernel C.
        resume_from_config();
    }
    REENTRY.store(reentry, Ordering::Relaxed);
    let entry = ENTRIES.fetch_add(1, Ordering::Relaxed) + 1;
    let (start, end) = image_range();
    println!("ksave {}: entered by kexec jump (entry {entry})", env!("CARGO_PKG_VERSION"));
    println!("ksave:   caller re-entry {reentry:#x}, stack {caller_rsp:#x}");
    println!("ksave:   own load range {start:#x}-{end:#x} ({} KiB, heap {} KiB)", (end - start) / 1024, heap::HEAP_SIZE / 1024);
    println!("ksave:   memory visible: {}", paging::Describe);
    let mem = IdentityMapped;
    match CallerContext::read(reentry, &mem) {
        Ok(ctx) => {
            println!(
                "ksave:   control page {:#x}: saved cr3 {:#x}, identity table {:#x}, swap page {:#x}, backup map head {:#x}",
                ctx.control_page, ctx.saved_cr3, ctx.table_page, ctx.swap_page, ctx.backup_head
            );
            report_backup_map(&ctx, start, end);
            crate::save::run(&ctx);
        }
        Err(e) => println!("ksave:   control page not usable, not saving: {e:?}"),
    }
    println!("ksave: returning to caller");
    return_to_caller(reentry)
}

/// Resumes the image the config names, in the RAM map it carries (kernel
/// C's). C is gone, so a refusal invalidates the image (so that the next
/// boot does not try it again) and resets the machine into a normal boot.
fn resume_from_config() -> ! {
    println!("ksave {}: started by kexec with no caller to return to: resuming", env!("CARGO_PKG_VERSION"));
    match crate::config::load() {
        Ok(config) => {
            let refusal = crate::restore::run(diskdrv::part::Guid(config.partition_guid), config.ram(), true);
            println!("ksave: not resuming: {}", refusal.0.as_str());
        }
        Err(e) => println!("ksave: not resuming: {e}"),
    }
    println!("ksave: resetting into a normal boot");
    crate::cpu::reset()
}

/// Checks that the pages the jump displaced are exactly ksave's own.
fn report_backup_map(ctx: &CallerContext, start: u64, end: u64) {
    // Until the RAM map comes with the config, "RAM" is what is mapped.
    let mapped_end = paging::identity_end();
    let is_ram = |a: u64| a < mapped_end;
    let mut seen = [0u64; 64]; // one bit a page: 16 MiB of image at most
    match kexec::coverage(ctx.backup_head, &IdentityMapped, is_ram, start, end, &mut seen) {
        Ok(cov) if cov.is_exact() => {
            println!("ksave:   backup map: {} pages displaced ({} in place), exactly ksave's own range", cov.pairs, cov.in_place)
        }
        Ok(cov) => println!(
            "ksave:   backup map: {} pages displaced, NOT exactly ksave's range: {} outside, {} twice, {} uncovered, {} sources inside",
            cov.pairs, cov.outside, cov.duplicates, cov.uncovered, cov.sources_inside
        ),
        Err(e) => println!("ksave:   backup map rejected: {e:?}"),
    }
}

unsafe extern "C" {
    fn ksave_return_to_caller(reentry: u64) -> !;
}

/// Returns to the kexec caller (see asm/entry.s). Never returns here: the
/// next `kexec -e` comes in through the entry point again.
pub fn return_to_caller(reentry: u64) -> ! {
    // SAFETY: reentry is the address the caller's relocate_kernel left at
    // [rsp] on entry; it lies in the caller's control page, which our
    // identity map covers (it is RAM below 4 GiB on the machines we map) and
    // which we never wrote. The caller switches to its own stack and tables.
    unsafe { ksave_return_to_caller(reentry) }
}
