//! ksave's CPU tables (IDT, TSS) and what happens on a CPU exception: a
//! report on the console, then a stop. Never a silent triple fault.

use core::mem::size_of;

use x86::bits64::task::TaskStateSegment;
use x86::dtables::{DescriptorTablePointer, lidt};
use x86::segmentation::SegmentSelector;

use crate::layout::image_range;
use crate::println;
use crate::qemu::{self, ExitCode};

/// Selector of the TSS in asm/tables.s's GDT (index 4).
const TSS_SELECTOR: u16 = 0x20;
const KERNEL_CS: u16 = 0x10;
/// IST slot used by double faults and NMIs, so a blown stack still reports.
const IST_FAULT: u8 = 1;

#[repr(C, align(16))]
struct IdtEntry([u64; 2]);

static mut IDT: [IdtEntry; 32] = [const { IdtEntry([0; 2]) }; 32];
/// The helpers' (smp.rs): the same handlers, on the stack they fault on
/// (they load no TSS, so no IST).
static mut HELPER_IDT: [IdtEntry; 32] = [const { IdtEntry([0; 2]) }; 32];
static mut TSS: TaskStateSegment = TaskStateSegment::new();

#[repr(align(16))]
struct FaultStack(#[expect(dead_code, reason = "only its address is used")] [u8; 8192]);
static mut FAULT_STACK: FaultStack = FaultStack([0; 8192]);

unsafe extern "C" {
    static ksave_exception_stubs: [u64; 32];
    static mut ksave_gdt: [u64; 6];
}

/// Loads ksave's IDT and TSS. Runs on every entry: the kexec caller left
/// both descriptor tables with limit 0, a bootloader left its own.
pub fn init() {
    // SAFETY: single CPU with interrupts off; the statics are ksave's own and
    // nothing else references them while they are rebuilt.
    unsafe {
        let tss = &raw mut TSS;
        (*tss).ist[(IST_FAULT - 1) as usize] = (&raw mut FAULT_STACK) as u64 + size_of::<FaultStack>() as u64;
        (*tss).iomap_base = size_of::<TaskStateSegment>() as u16;
        let (low, high) = tss_descriptor(tss as u64, size_of::<TaskStateSegment>() as u64 - 1);
        let gdt = &raw mut ksave_gdt;
        (*gdt)[4] = low; // type "available": a re-entry finds it busy, ltr needs it not
        (*gdt)[5] = high;
        x86::task::load_tr(SegmentSelector::from_raw(TSS_SELECTOR));

        let (idt, helper_idt) = (&raw mut IDT, &raw mut HELPER_IDT);
        for (vector, stub) in ksave_exception_stubs.iter().enumerate() {
            let ist = if vector == 2 || vector == 8 { IST_FAULT } else { 0 };
            (*idt)[vector] = interrupt_gate(*stub, ist);
            (*helper_idt)[vector] = interrupt_gate(*stub, 0);
        }
        lidt(&DescriptorTablePointer { limit: (size_of::<[IdtEntry; 32]>() - 1) as u16, base: idt as *const IdtEntry });
    }
}

/// Loads the helpers' IDT on a helper CPU (smp.rs), which [`init`] built.
pub fn init_helper() {
    // SAFETY: HELPER_IDT was filled by init() on the loading CPU before the
    // helpers were started, and is only read since.
    unsafe { lidt(&DescriptorTablePointer { limit: (size_of::<[IdtEntry; 32]>() - 1) as u16, base: &raw const HELPER_IDT as *const IdtEntry }) };
}

/// A 64-bit TSS descriptor (Intel SDM vol. 3A 8.2.3, figure 8-4): type 9
/// (available 64-bit TSS), present.
fn tss_descriptor(base: u64, limit: u64) -> (u64, u64) {
    let low = (limit & 0xffff) | (base & 0xff_ffff) << 16 | 0x9 << 40 | 1 << 47 | ((limit >> 16) & 0xf) << 48 | ((base >> 24) & 0xff) << 56;
    (low, base >> 32)
}

/// A 64-bit interrupt gate (Intel SDM vol. 3A 6.14.1, figure 6-8): type 0xE,
/// present, DPL 0, interrupts stay off inside the handler.
fn interrupt_gate(handler: u64, ist: u8) -> IdtEntry {
    let low = (handler & 0xffff) | (KERNEL_CS as u64) << 16 | (ist as u64) << 32 | 0xE << 40 | 1 << 47 | ((handler >> 16) & 0xffff) << 48;
    IdtEntry([low, handler >> 32])
}

/// What asm/exceptions.s pushed, lowest address first.
#[repr(C)]
pub struct ExceptionFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

const NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor overrun",
    "invalid TSS",
    "segment not present",
    "stack fault",
    "general protection",
    "page fault",
    "reserved",
    "x87 FP",
    "alignment check",
    "machine check",
    "SIMD FP",
    "virtualization",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection",
    "VMM communication",
    "security",
    "reserved",
];

#[unsafe(no_mangle)]
extern "C" fn ksave_exception(frame: &ExceptionFrame) -> ! {
    // SAFETY: reading CR2 has no side effects.
    let cr2 = unsafe { x86::controlregs::cr2() };
    let name = NAMES.get(frame.vector as usize).copied().unwrap_or("?");
    println!(
        "ksave: CPU exception {} ({name}), error code {:#x}, RIP {:#x}, CR2 {:#x}, RSP {:#x}, RFLAGS {:#x}",
        frame.vector, frame.error_code, frame.rip, cr2, frame.rsp, frame.rflags
    );
    println!(
        "ksave:   rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x}",
        frame.rax, frame.rbx, frame.rcx, frame.rdx, frame.rsi, frame.rdi, frame.rbp
    );
    println!(
        "ksave:   r8 {:#x} r9 {:#x} r10 {:#x} r11 {:#x} r12 {:#x} r13 {:#x} r14 {:#x} r15 {:#x}",
        frame.r8, frame.r9, frame.r10, frame.r11, frame.r12, frame.r13, frame.r14, frame.r15
    );
    // SAFETY: reading control registers and EFER has no side effects.
    let (cr0, cr3, cr4, efer) =
        unsafe { (x86::controlregs::cr0().bits(), x86::controlregs::cr3(), x86::controlregs::cr4().bits(), x86::msr::rdmsr(0xC000_0080)) };
    println!("ksave:   cr0 {cr0:#x} cr3 {cr3:#x} cr4 {cr4:#x} efer {efer:#x}");
    print_call_chain(frame.rbp);
    if crate::smp::on_helper() {
        // A helper: the loading CPU fails the load rather than wait for it.
        println!("ksave: the CPU exception was on a helper CPU; the load fails");
        crate::smp::helper_lost();
        loop {
            // SAFETY: interrupts are off; hlt waits for the INIT that parks it.
            unsafe { x86::halt() };
        }
    }
    // Saving: ksave wrote nothing of the caller's, so the caller can go on;
    // halting would lose it. The header on disk still says *writing*.
    if crate::wayback::reentry().is_some() {
        println!("ksave: save FAILED: CPU exception {} ({name}); returning to the caller", frame.vector);
        let why = format_args!("CPU exception {} ({name}) at RIP {:#x}, CR2 {cr2:#x} during the save", frame.vector, frame.rip);
        crate::wayback::bail_out(ksave_format::header::fail::EXCEPTION, why);
    }
    stop(ExitCode::Exception)
}

/// The stack hint: return addresses along the frame-pointer chain (the image
/// is built with frame pointers), followed only inside ksave's own memory.
fn print_call_chain(mut rbp: u64) {
    let (start, end) = image_range();
    crate::print!("ksave:   call chain:");
    for _ in 0..16 {
        if !rbp.is_multiple_of(8) || rbp < start || rbp + 16 > end {
            break;
        }
        // SAFETY: rbp was just checked to be an aligned address inside
        // ksave's own identity-mapped image.
        let (next, ret) = unsafe { (*(rbp as *const u64), *((rbp + 8) as *const u64)) };
        crate::print!(" {ret:#x}");
        rbp = next;
    }
    println!();
}

/// Ends ksave when there is no caller to return to: QEMU exits with `code`
/// when its debug-exit device is there; otherwise the CPU halts for good.
pub fn stop(code: ExitCode) -> ! {
    forget_secrets();
    qemu::exit(code);
    loop {
        // SAFETY: interrupts are off; hlt only waits (for an NMI at most).
        unsafe { x86::halt() };
    }
}

/// Resets the machine: the 8042 keyboard controller's CPU reset line (port
/// 0x64, command 0xFE), then a triple fault if that did nothing.
pub fn reset() -> ! {
    forget_secrets();
    // SAFETY: 0xFE to the 8042 command port pulses the reset line (IBM PC/AT
    // technical reference); the machine restarts, nothing returns.
    unsafe { x86::io::outb(0x64, 0xFE) };
    for _ in 0..1_000_000 {
        core::hint::spin_loop();
    }
    // SAFETY: an empty IDT turns the next exception into a triple fault,
    // which resets the CPU: the intent here.
    unsafe {
        x86::dtables::lidt(&x86::dtables::DescriptorTablePointer::<u64> { limit: 0, base: core::ptr::null() });
        core::arch::asm!("int3", options(noreturn));
    }
}

unsafe extern "C" {
    // asm/entry.s: ksave's stack, in .bss (zeroed on every entry).
    static ksave_stack: [u64; 0];
    static ksave_stack_top: [u64; 0];
}

/// Wipes what a sealed image's key may have left behind on ksave's way
/// out: the key in the config block, every stack word below the live
/// frames (the cipher's frames are gone by now), and the vector registers
/// (AES-NI and the GHASH multiply work in them). The caller gets ksave's
/// pages back as its own after the jump (kexec's swap pages), and a reset
/// keeps RAM: neither may find the key.
pub fn forget_secrets() {
    crate::smp::park();
    crate::config::forget();
    // SAFETY: only the addresses of the linker-placed symbols are taken.
    let bottom = unsafe { ksave_stack.as_ptr() } as u64;
    // SAFETY: zeroes ksave's own stack from its bottom to the stack pointer:
    // nothing below the stack pointer is live (the block may use the
    // stack, no `nostack`, so the compiler keeps nothing in a red zone),
    // and rep stos itself touches no stack.
    unsafe {
        core::arch::asm!(
            "mov rcx, rsp",
            "sub rcx, rdi",
            "shr rcx, 3",
            "xor eax, eax",
            "rep stosq",
            inout("rdi") bottom => _, out("rcx") _, out("rax") _,
        );
    }
    clear_vector_registers();
}

/// Zeroes this CPU's vector registers (AES-NI and the GHASH multiply work
/// in them; INIT leaves them as they are: Intel SDM vol. 3A table 10-1).
pub fn clear_vector_registers() {
    // SAFETY: clobbers only the xmm registers it declares.
    unsafe {
        core::arch::asm!(
            "pxor xmm0, xmm0", "pxor xmm1, xmm1", "pxor xmm2, xmm2", "pxor xmm3, xmm3",
            "pxor xmm4, xmm4", "pxor xmm5, xmm5", "pxor xmm6, xmm6", "pxor xmm7, xmm7",
            "pxor xmm8, xmm8", "pxor xmm9, xmm9", "pxor xmm10, xmm10", "pxor xmm11, xmm11",
            "pxor xmm12, xmm12", "pxor xmm13, xmm13", "pxor xmm14, xmm14", "pxor xmm15, xmm15",
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
            out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _, out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
            options(nomem, nostack),
        );
    }
}

/// Bytes of ksave's stack used so far on this entry: the stack is zeroed
/// with the rest of .bss at entry, so the deepest non-zero word marks the
/// high water (a measurement for sizing it: `make bench` reports it).
pub fn stack_used() -> usize {
    // SAFETY: only the addresses of the linker-placed symbols are taken.
    let (bottom, top) = unsafe { (ksave_stack.as_ptr(), ksave_stack_top.as_ptr()) };
    let words = (top as usize - bottom as usize) / 8;
    // SAFETY: the stack region is ksave's own, mapped and readable; words
    // below the live stack pointer are not being written while we read.
    let first_used = (0..words).find(|&i| unsafe { core::ptr::read_volatile(bottom.add(i)) } != 0).unwrap_or(words);
    (words - first_used) * 8
}
