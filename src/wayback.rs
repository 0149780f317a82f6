//! The ways back: to the kexec caller after a save, or bailing out of one
//! (an error, a CPU exception, a panic: [`bail_out`] is the one way, which
//! puts the disk back, leaves the reason in the host tool's mailbox and
//! returns), and into a saved kernel after a resume.

use core::sync::atomic::{AtomicU64, Ordering};

use bootinfo::pagewalk;
use ksave_core::Message;
use ksave_format::PAGE;
use ksave_format::config::Config;
use zerocopy::FromBytes;

use crate::layout::image_range;
use crate::{config, disks, paging, println};

/// The caller's re-entry address on this entry, 0 when not entered by kexec.
static REENTRY: AtomicU64 = AtomicU64::new(0);

/// The GDT to leave in GDTR for the caller (base; 0 for none), found once
/// per entry by `caller::kernel_gdt`.
static RETURN_GDT: AtomicU64 = AtomicU64::new(0);

/// The caller's re-entry address, if ksave was entered by a kexec jump.
pub fn reentry() -> Option<u64> {
    match REENTRY.load(Ordering::Relaxed) {
        0 => None,
        r => Some(r),
    }
}


/// Records this entry's caller: from here on, a failure returns to it.
pub fn set_reentry(reentry: u64) {
    REENTRY.store(reentry, Ordering::Relaxed);
}

/// The kernel's own GDT (its base; the limit is Linux's), to be in GDTR
/// when it gets control back.
pub fn set_return_gdt(base: u64) {
    RETURN_GDT.store(base, Ordering::Relaxed);
}

/// Bails out of a save: puts the disk back if one is open (its guard is
/// skipped by an exception or a panic), leaves `why` in the host tool's
/// mailbox and returns to the caller. Without a caller (ksave was booted),
/// returns: the caller of this stops or resets.
pub fn bail_out(code: u32, why: core::fmt::Arguments) {
    let Some(reentry) = reentry() else {
        return;
    };
    disks::close_after_exception();
    crate::metric!(save_failed = code);
    if let Ok(config) = config::load() {
        post_to_mailbox(&config, code, why);
    }
    println!("ksave: returning to caller");
    return_to_caller(reentry)
}

/// Leaves the reason in the host tool's mailbox page: the one place it
/// can be read when the partition is what failed. Only into a page the
/// config names that is the caller's RAM, outside ksave, and stamped for
/// this attempt; and only once the attempt has failed, so no image is
/// being made of that memory.
fn post_to_mailbox(config: &Config, code: u32, why: core::fmt::Arguments) {
    let pa = config.mailbox;
    let Some(pa_end) = pa.checked_add(PAGE as u64) else {
        return;
    };
    let (start, end) = image_range();
    let in_ram = config.ram().iter().any(|r| r.start <= pa && pa_end <= r.end);
    if pa == 0 || !pa.is_multiple_of(PAGE as u64) || !in_ram || (start..end).contains(&pa) || pa_end > paging::identity_end() {
        return;
    }
    // SAFETY: a whole page of the caller's RAM inside ksave's identity map
    // (checked above), not address 0; the caller is stopped, and the host
    // tool lent this page for exactly this (it checks the stamp below too).
    let page = unsafe { &mut *(pa as *mut [u8; PAGE]) };
    let Ok((mailbox, _)) = ksave_format::mailbox::Mailbox::mut_from_prefix(page) else {
        return;
    };
    if mailbox.is_for(config.nonce) {
        mailbox.post(code, Message::format(why).as_str());
        println!("ksave: reason left in the host tool's mailbox at {pa:#x}");
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
    crate::cpu::forget_secrets();
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
    crate::cpu::forget_secrets();
    let gdtr = pseudo_descriptor(gdt.0, gdt.1);
    let gdtr = if gdt.0 == 0 { core::ptr::null() } else { &gdtr as *const _ };
    // SAFETY: upheld by the caller: the control page and everything the
    // saved kernel's return path touches is back in place.
    unsafe { ksave_return_to_caller(reentry, gdtr) }
}
