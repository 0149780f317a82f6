//! ksave: a tiny kexec-jump image that saves and restores the calling
//! kernel's RAM.
//!
//! Entered four ways (asm/entry.s): by a kexec jump from Linux (64-bit, the
//! ELF entry point), by a multiboot 1/2 bootloader (32-bit), or by UEFI
//! firmware as ksave.efi (efi.rs, which decides while the firmware runs).
//! All end in [`ksave_main`] on ksave's own stack, GDT and page tables with
//! SSE on.
#![no_std]
#![no_main]
// Errors here carry a `Message` (message.rs): its text in a fixed 240-byte
// buffer, deliberately, so that a failure needs no heap and no allocation
// can fail while ksave reports one. They are returned once per entry, not
// in a loop, so their size costs nothing that matters.
#![allow(clippy::result_large_err)]

extern crate alloc;

mod boot;
mod caller;
mod cmdline;
mod config;
mod console;
mod cpu;
mod disks;
mod disktest;
mod efi;
mod free;
mod heap;
mod hw;
mod jump;
mod layout;
mod paging;
mod physmem;
mod qemu;
mod resume;
mod save;
mod smp;
mod wayback;
mod work;

core::arch::global_asm!(include_str!("../asm/entry.s"), options(att_syntax));
core::arch::global_asm!(include_str!("../asm/tables.s"), options(att_syntax));
core::arch::global_asm!(include_str!("../asm/exceptions.s"), options(att_syntax));
core::arch::global_asm!(include_str!("../asm/mem.s"), options(att_syntax));
core::arch::global_asm!(include_str!("../asm/ap.s"), options(att_syntax));

/// How ksave was entered (asm/entry.s passes one of these in `kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// By `kexec -e` of an image loaded with `--load-preserve-context`.
    KexecJump { reentry: u64, caller_rsp: u64 },
    /// By a plain kexec: no caller to return to (`ksave resume` in kernel C).
    Kexec,
    /// By a multiboot 1 loader (QEMU `-kernel`).
    Multiboot1 { info: u64 },
    /// By a multiboot 2 loader (GRUB).
    Multiboot2 { info: u64 },
    /// By UEFI firmware as ksave.efi, after it left boot services (efi.rs).
    Uefi { handover: u64 },
}

/// The first Rust code to run, on every entry.
#[unsafe(no_mangle)]
extern "C" fn ksave_main(kind: u64, arg: u64, caller_rsp: u64) -> ! {
    let entry = match kind {
        // relocate_kernel_64.S pushes 0 as the return address when it does
        // not preserve context.
        0 if arg == 0 => Entry::Kexec,
        0 => Entry::KexecJump { reentry: arg, caller_rsp },
        1 => Entry::Multiboot1 { info: arg },
        2 => Entry::Multiboot2 { info: arg },
        3 => Entry::Uefi { handover: arg },
        _ => {
            console::init(false);
            println!("ksave: entered with an unknown boot protocol (magic not multiboot 1 or 2)");
            cpu::stop(qemu::ExitCode::Failure);
        }
    };
    // The caller's UART settings are kept on a kexec jump; a bootloader's
    // are replaced with ours.
    console::init(!matches!(entry, Entry::KexecJump { .. } | Entry::Kexec));
    cpu::init();
    paging::init();
    heap::init();
    match entry {
        Entry::KexecJump { reentry, caller_rsp } => caller::run(reentry, caller_rsp),
        Entry::Kexec => resume::from_kexec(),
        Entry::Multiboot1 { info } => boot::run_multiboot1(info),
        Entry::Multiboot2 { info } => boot::run_multiboot2(info),
        Entry::Uefi { handover } => boot::run_uefi(handover),
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("ksave: panic: {info}");
    // A panic is a bug in ksave, not damage to the caller: ksave writes only
    // its own pages, so a kexec caller can safely be given control back.
    wayback::bail_out(ksave_format::header::fail::PANIC, format_args!("ksave panicked: {info}"));
    cpu::stop(qemu::ExitCode::Failure)
}

/// The precompiled `core` refers to it; with `panic = "abort"` it is never called.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}
