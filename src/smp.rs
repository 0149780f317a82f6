//! The application processors (APs): started to share a resume's load or
//! a save's coding ([`ksave_core::helpers`]), then put back to wait for a
//! start-up IPI, the state the resumed or saved kernel brings its CPUs up
//! from: it sends INIT and start-up IPIs itself
//! (arch/x86/kernel/smpboot.c, `wakeup_secondary_cpu_via_init`), to CPUs
//! it had taken offline before the kexec jump (`kernel_kexec`,
//! `suspend_disable_secondary_cpus`).
//!
//! Started as the MP initialization protocol does (Intel SDM vol. 3A
//! 9.4.4.1): INIT, 10 ms, a start-up IPI, 200 us, another, each to all
//! CPUs but this one; they run asm/ap.s from a start-up page below 1 MiB
//! and count themselves in. No ACPI table is needed, so every way in
//! (bootloader, ksave.efi, kernel C) starts them alike.

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};

use ksave_core::helpers::{Queue, startup_page};
use ksave_format::{PAGE, Range};
use ksave_core::resume::{Helpers, Machine, Started};

use crate::physmem::IdentityMapped;
use crate::work::Exclusive;
use crate::{cpu, hw, println};

/// Most helpers: the queue's slots keep about this many busy.
const MAX_HELPERS: usize = 3;
/// A helper's stack: a job is a hash, an LZ4 decode or code into its slot,
/// or a chunk's AES-GCM. Measured at parking (no guard page below): 13 KiB
/// coding LZ4 (lz4_flex keeps its hash table on the stack), 14 KiB
/// sealing; twice that.
const AP_STACK: usize = 32 * 1024;

#[repr(C, align(16))]
struct Stacks([[u8; AP_STACK]; MAX_HELPERS]);

// What asm/ap.s reads and counts (.bss, cleared on every entry, but the
// constants).
#[unsafe(no_mangle)]
static mut KSAVE_AP_STACKS: Stacks = Stacks([[0; AP_STACK]; MAX_HELPERS]);
#[unsafe(no_mangle)]
static KSAVE_AP_STACK_COUNT: u32 = MAX_HELPERS as u32;
#[unsafe(no_mangle)]
static KSAVE_AP_STACK_SIZE: u64 = AP_STACK as u64;
#[unsafe(no_mangle)]
static KSAVE_AP_ARRIVED: AtomicU32 = AtomicU32::new(0);
#[unsafe(no_mangle)]
static KSAVE_AP_CR3: AtomicU32 = AtomicU32::new(0);
#[unsafe(no_mangle)]
static KSAVE_AP_CR4: AtomicU32 = AtomicU32::new(0);
#[unsafe(no_mangle)]
static KSAVE_AP_EFER: AtomicU32 = AtomicU32::new(0);

unsafe extern "C" {
    static ksave_ap_startup: [u8; 0];
    static ksave_ap_startup_end: [u8; 0];
}

/// `ksave.helpers=0` on a bootloader's command line, or `ksave hibernate
/// --one-cpu`: no other CPU is started (a way round firmware that
/// mishandles them; `make bench`'s one-CPU figures). In .bss: every entry
/// starts with it off.
static ONE_CPU: AtomicBool = AtomicBool::new(false);

/// Keeps this entry's resume or save to this CPU.
pub fn keep_to_one_cpu() {
    ONE_CPU.store(true, Ordering::Relaxed);
}

/// Helpers that left the queue with their registers cleared.
static LEFT: AtomicU32 = AtomicU32::new(0);

/// The queue the helpers serve, once they may.
static SERVING: AtomicPtr<Queue> = AtomicPtr::new(core::ptr::null_mut());
static QUEUE: Exclusive<Queue> = Exclusive::new(Queue::new());

const IA32_APIC_BASE: u32 = 0x1B;
/// IA32_APIC_BASE: the APIC is on (bit 11), in x2APIC mode (bit 10)
/// (Intel SDM vol. 3A 11.4.4, 11.12.1); its registers' base (bits 12+).
const APIC_GLOBAL_ENABLE: u64 = 1 << 11;
const APIC_X2: u64 = 1 << 10;
const MSR_EFER: u32 = 0xC000_0080;
const EFER_LME: u64 = 1 << 8;
const EFER_NXE: u64 = 1 << 11;
/// CR4 bits the APs take from this CPU: PAE, LA57, OSFXSR, OSXMMEXCPT
/// (no PCIDE and the like, which 32-bit code may not set).
const CR4_FOR_APS: u64 = (1 << 5) | (1 << 12) | (1 << 9) | (1 << 10);

/// ICR, low word (Intel SDM vol. 3A 11.6.1, figure 11-12): to all but
/// this CPU; INIT asserted, level triggered; or a start-up IPI.
const ICR_ALL_BUT_SELF: u32 = 0b11 << 18;
const ICR_INIT: u32 = ICR_ALL_BUT_SELF | 1 << 15 | 1 << 14 | 0b101 << 8;
const ICR_STARTUP: u32 = ICR_ALL_BUT_SELF | 0b110 << 8;
const ICR_PENDING: u32 = 1 << 12;
/// Spurious-interrupt vector register: APIC software enable (bit 8).
const SVR_ENABLE: u32 = 1 << 8;

/// This CPU's local APIC, in the mode the firmware or kernel left it.
#[derive(Clone, Copy)]
enum Lapic {
    /// xAPIC: registers in MMIO at this base (identity-mapped below 4 GiB).
    Mmio(u64),
    /// x2APIC: registers as MSRs 0x800 + offset / 16.
    X2,
}

impl Lapic {
    /// The local APIC, or why ksave cannot use it.
    fn this_cpu() -> Result<Self, &'static str> {
        // CPUID.01h:EDX bit 9: an on-chip APIC (Intel SDM vol. 2A, CPUID).
        if core::arch::x86_64::__cpuid(1).edx & (1 << 9) == 0 {
            return Err("no local APIC");
        }
        // SAFETY: IA32_APIC_BASE exists where CPUID says there is an APIC.
        let base = unsafe { x86::msr::rdmsr(IA32_APIC_BASE) };
        match (base & APIC_GLOBAL_ENABLE != 0, base & APIC_X2 != 0, base & 0xf_ffff_f000) {
            (false, _, _) => Err("the local APIC is off"),
            (true, true, _) => Ok(Self::X2),
            (true, false, at) if at < 1 << 32 && at != 0 => Ok(Self::Mmio(at)),
            (true, false, _) => Err("the local APIC's registers lie above 4 GiB"),
        }
    }

    /// What [`PARK_APIC`] keeps of it.
    fn code(self) -> u64 {
        match self {
            Self::X2 => 1,
            Self::Mmio(base) => base,
        }
    }

    fn svr(self) -> u32 {
        match self {
            // SAFETY: the SVR at offset 0xF0 of the APIC's MMIO page (SDM
            // vol. 3A table 11-1), mapped by ksave's identity map.
            Self::Mmio(base) => unsafe { core::ptr::read_volatile((base + 0xF0) as *const u32) },
            // SAFETY: MSR 0x80F is the SVR in x2APIC mode (table 11-6).
            Self::X2 => unsafe { x86::msr::rdmsr(0x80F) as u32 },
        }
    }

    fn set_svr(self, value: u32) {
        match self {
            // SAFETY: as in `svr`; the enable bit and vector only.
            Self::Mmio(base) => unsafe { core::ptr::write_volatile((base + 0xF0) as *mut u32, value) },
            // SAFETY: as in `svr`.
            Self::X2 => unsafe { x86::msr::wrmsr(0x80F, value as u64) },
        }
    }

    /// Sends the IPI `icr` (to all but this CPU) and waits until it is sent.
    ///
    /// # Safety
    /// INIT resets every other CPU; a start-up IPI runs the start-up page
    /// on every one waiting for it, which must hold asm/ap.s's code.
    unsafe fn send(self, icr: u32) {
        match self {
            Self::Mmio(base) => {
                let low = (base + 0x300) as *mut u32;
                // SAFETY: ICR high (0x310) and low (0x300) of the APIC's
                // MMIO page (table 11-1); the shorthand makes the
                // destination field moot; the write of the low word sends
                // (uncached MMIO: after every earlier store).
                unsafe {
                    core::ptr::write_volatile((base + 0x310) as *mut u32, 0);
                    core::ptr::write_volatile(low, icr);
                }
                // Delivered within microseconds; not waited on for ever.
                let end = hw::now_us() + 10_000;
                // SAFETY: as above; reading the ICR has no effects.
                while unsafe { core::ptr::read_volatile(low) } & ICR_PENDING != 0 && hw::now_us() < end {
                    core::hint::spin_loop();
                }
            }
            // SAFETY: MSR 0x830 is the 64-bit ICR in x2APIC mode (11.12.9);
            // one write sends. That WRMSR is not serializing (11.12.3): the
            // fences make every earlier store visible first, as Linux's
            // weak_wrmsr_fence does.
            Self::X2 => unsafe {
                core::arch::asm!("mfence", "lfence", options(nostack, preserves_flags));
                x86::msr::wrmsr(0x830, icr as u64)
            },
        }
    }
}

/// The other CPUs, as a resume's [`Helpers`]. Dropping it parks them
/// ([`park`]).
pub struct Cpus(());

/// What [`park`] needs once the others were sent start-up IPIs: the APIC
/// (0: none; 1: x2APIC; else the xAPIC's base), the SVR to put back (bit
/// 32 set if ksave changed it), and the start-up page whose contents the
/// load put in [`STAND_IN`] (0: none).
static PARK_APIC: AtomicU64 = AtomicU64::new(0);
static PARK_SVR: AtomicU64 = AtomicU64::new(0);
static HELD_PAGE: AtomicU64 = AtomicU64::new(0);

/// The start-up page's stand-in while the others run (a late one may still
/// run the start-up code): a resume's load fills it, a save copies the
/// page's contents into it first; [`park`] copies it into place.
#[repr(C, align(4096))]
struct Page([u8; PAGE]);
static mut STAND_IN: Page = Page([0; PAGE]);

impl Cpus {
    /// None started yet.
    pub fn new() -> Self {
        Self(())
    }

    /// Jobs run by the helpers and by the loading CPU, if any were started.
    pub fn jobs_run(&self) -> Option<(u32, u32)> {
        let queue = SERVING.load(Ordering::Acquire);
        // SAFETY: SERVING points at QUEUE, a static, once set.
        (!queue.is_null()).then(|| unsafe { (*queue).jobs_run() })
    }

    /// Starts the APs; how many serve the queue and the start-up page, or
    /// why none do (then every other CPU is parked again at once). With
    /// `keep`, the start-up page's contents are put in the stand-in first.
    ///
    /// # Safety
    /// `ram` is RAM, and its pages below 1 MiB outside ksave's image are
    /// the caller's to overwrite, or (with `keep`) to overwrite until
    /// [`park`] puts them back.
    unsafe fn bring_up(&mut self, ram: &[Range], queue: &'static Queue, keep: bool) -> Result<(u32, u64), &'static str> {
        if ONE_CPU.load(Ordering::Relaxed) {
            return Err("kept to one CPU (ksave.helpers=0, or --one-cpu for a save)");
        }
        let lapic = Lapic::this_cpu()?;
        let (image_start, image_end) = crate::layout::image_range();
        let page = startup_page(ram, Range { start: image_start, end: image_end }).ok_or("no page of RAM below 1 MiB to start them in")?;
        // SAFETY: reading control registers and EFER has no side effects.
        let (cr3, cr4, efer) = unsafe { (x86::controlregs::cr3(), x86::controlregs::cr4().bits() as u64, x86::msr::rdmsr(MSR_EFER)) };
        if cr3 >= 1 << 32 {
            return Err("ksave's page tables lie above 4 GiB");
        }
        if keep {
            // SAFETY: `page` is a whole page of RAM below 1 MiB
            // (identity-mapped), the stand-in ksave's; only this CPU runs.
            unsafe { core::ptr::copy_nonoverlapping(page as *const u8, (&raw mut STAND_IN).cast::<u8>(), PAGE) };
            HELD_PAGE.store(page, Ordering::Relaxed);
        }
        // SAFETY: the linker places both symbols around the start-up code.
        let code = unsafe { ksave_ap_startup.as_ptr()..ksave_ap_startup_end.as_ptr() };
        // SAFETY: `page` is a whole page of RAM below 1 MiB (identity-mapped),
        // the caller's to overwrite (its contents kept with `keep`); the
        // code is shorter.
        unsafe { core::ptr::copy_nonoverlapping(code.start, page as *mut u8, code.end as usize - code.start as usize) };
        KSAVE_AP_CR3.store(cr3 as u32, Ordering::Relaxed);
        KSAVE_AP_CR4.store((cr4 & CR4_FOR_APS) as u32, Ordering::Relaxed);
        KSAVE_AP_EFER.store((EFER_LME | (efer & EFER_NXE)) as u32, Ordering::Relaxed);
        SERVING.store(queue as *const Queue as *mut Queue, Ordering::Release);
        let svr = lapic.svr();
        if svr & SVR_ENABLE == 0 {
            PARK_SVR.store(1 << 32 | svr as u64, Ordering::Relaxed);
            lapic.set_svr(svr | SVR_ENABLE);
        }
        PARK_APIC.store(lapic.code(), Ordering::Release);
        // SAFETY: the other CPUs are the firmware's, kernel C's or parked by
        // an earlier ksave: none holds anything this boot still needs
        // (every page of it but ksave's was given up); the start-up page
        // holds asm/ap.s's code, and the stores above are visible before
        // the IPIs (`send` fences them).
        unsafe {
            lapic.send(ICR_INIT);
            wait_us(10_000);
            for _ in 0..2 {
                lapic.send(ICR_STARTUP | (page >> 12) as u32);
                wait_us(200);
            }
        }
        // Each counts itself in from its own code in ksave's image. One
        // slower than 10 ms still finds the start-up code: the load fills
        // a stand-in for that page until they are parked.
        wait_us(10_000);
        match KSAVE_AP_ARRIVED.load(Ordering::Acquire) {
            0 => {
                // None to wait for: back to wait-for-SIPI at once, before
                // the load overwrites the start-up page (or a save's
                // contents go back into it).
                park();
                Err("no other CPU answered")
            }
            n => {
                HELD_PAGE.store(page, Ordering::Relaxed);
                Ok((n.min(MAX_HELPERS as u32), page))
            }
        }
    }
}

impl Helpers for Cpus {
    unsafe fn start(&mut self, machine: &Machine) -> Option<Started<'_>> {
        let queue: &'static Queue = QUEUE.take();
        // SAFETY: Helpers::start's contract, passed on.
        match unsafe { self.bring_up(machine.ram, queue, false) } {
            Ok((n, page)) => {
                println!("ksave: resume: {n} more CPU(s) check and decode");
                crate::metric!(helpers = n);
                let stand_in = &raw const STAND_IN as u64;
                Some(Started { queue, mem: &IdentityMapped, held: Some((page / PAGE as u64, stand_in / PAGE as u64)) })
            }
            Err(why) => {
                println!("ksave: resume: on this CPU alone: {why}");
                crate::metric!(helpers = 0);
                None
            }
        }
    }
}

impl Cpus {
    /// The queue a save codes its pages on, with the other CPUs started to
    /// serve it if they answer (else this CPU runs every job itself), and
    /// the start-up page they hold meanwhile with the physical address of
    /// its contents (the stand-in), which the image takes instead.
    ///
    /// # Safety
    /// `ram` is the caller's RAM: below 1 MiB outside ksave's image, the
    /// start-up page is overwritten until the others are parked
    /// (`Drop`, or [`park`] on any way out), which puts its contents back.
    pub unsafe fn for_save(&mut self, ram: &[Range]) -> (&'static Queue, Option<(u64, u64)>) {
        let queue: &'static Queue = QUEUE.take();
        // SAFETY: this function's contract, passed on, with `keep`.
        match unsafe { self.bring_up(ram, queue, true) } {
            Ok((n, page)) => {
                println!("ksave: {n} more CPU(s) share the save (LZ4 coding, sealing)");
                crate::metric!(helpers = n);
                (queue, Some((page / PAGE as u64, &raw const STAND_IN as u64)))
            }
            Err(why) => {
                println!("ksave: saving on this CPU alone: {why}");
                crate::metric!(helpers = 0);
                (queue, None)
            }
        }
    }
}

impl Drop for Cpus {
    fn drop(&mut self) {
        park();
    }
}

/// Puts every other CPU back to wait for a start-up IPI, as the saved
/// kernel expects them, if ksave started them; then the APIC as it was,
/// the start-up page from its stand-in, and nothing of their work left in
/// ksave's memory. Called when the load is over, and on any way out
/// (`cpu::forget_secrets`).
pub fn park() {
    let lapic = match PARK_APIC.swap(0, Ordering::AcqRel) {
        0 => return,
        1 => Lapic::X2,
        base => Lapic::Mmio(base),
    };
    // The helpers leave the queue and clear their vector registers (a
    // sealed image's key schedule and plaintext pass through them, and
    // INIT keeps them) once their job is done; 100 ms at most (a job is
    // one chunk at most: sealing 260 KiB in software AES took 13 ms under
    // TCG), then INIT whatever they do.
    let queue = SERVING.load(Ordering::Acquire);
    if !queue.is_null() {
        // SAFETY: SERVING points at QUEUE, a static, once set.
        unsafe { (*queue).stop() };
    }
    let serving = KSAVE_AP_ARRIVED.load(Ordering::Acquire).min(MAX_HELPERS as u32);
    let end = hw::now_us() + 100_000;
    while LEFT.load(Ordering::Acquire) < serving && hw::now_us() < end {
        core::hint::spin_loop();
    }
    // SAFETY: the load is over or abandoned: the APs only spin or halt in
    // ksave's image (or run the start-up code, which the stand-in kept):
    // INIT resets every one to wait for a start-up IPI.
    unsafe { lapic.send(ICR_INIT) };
    let svr = PARK_SVR.swap(0, Ordering::Relaxed);
    if svr >> 32 != 0 {
        lapic.set_svr(svr as u32);
    }
    // How deep the helpers' stacks went (they start zeroed, and there is no
    // guard page below them): the deepest byte written, of any helper.
    let stacks: *const Stacks = &raw const KSAVE_AP_STACKS;
    // SAFETY: no other CPU runs any more (INIT above); read only.
    let stacks = unsafe { &(*stacks).0 };
    let deepest = stacks[..serving as usize].iter().map(|s| AP_STACK - s.iter().position(|&b| b != 0).unwrap_or(AP_STACK)).max().unwrap_or(0);
    println!("ksave: the other CPUs' stacks: {} KiB of {} used at most", deepest.div_ceil(1024), AP_STACK / 1024);
    crate::metric!(helper_stack_kib = deepest.div_ceil(1024));
    let page = HELD_PAGE.swap(0, Ordering::Relaxed);
    // SAFETY: no other CPU runs any more (INIT above). The start-up page is
    // RAM the load gave up, whose contents the load put in the stand-in;
    // the stacks, the stand-in and the queue are ksave's, and zeros are
    // what every entry starts them with.
    unsafe {
        if page != 0 {
            core::ptr::copy_nonoverlapping((&raw const STAND_IN).cast::<u8>(), page as *mut u8, PAGE);
        }
        core::ptr::write_bytes(&raw mut STAND_IN, 0, 1);
        core::ptr::write_bytes(&raw mut KSAVE_AP_STACKS, 0, 1);
    }
    QUEUE.wipe();
}

/// Waits `us` microseconds on the TSC.
fn wait_us(us: u64) {
    let end = hw::now_us() + us;
    while hw::now_us() < end {
        core::hint::spin_loop();
    }
}

/// Whether this code runs on a helper (on one of their stacks).
pub fn on_helper() -> bool {
    let here = &raw const KSAVE_AP_STACKS as u64;
    let sp: u64;
    // SAFETY: reads the stack pointer only.
    unsafe { core::arch::asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags)) };
    (here..here + size_of::<Stacks>() as u64).contains(&sp)
}

/// A helper took a CPU exception: the load must not wait for its job.
pub fn helper_lost() {
    let queue = SERVING.load(Ordering::Acquire);
    if !queue.is_null() {
        // SAFETY: SERVING points at QUEUE, a static, once set.
        unsafe { (*queue).helper_lost() };
    }
}

/// A helper's life, from asm/ap.s on its own stack: ksave's IDT for
/// helpers, then the queue's jobs until INIT.
#[unsafe(no_mangle)]
extern "C" fn ksave_ap_main(_index: u32) -> ! {
    cpu::init_helper();
    let queue = SERVING.load(Ordering::Acquire);
    if !queue.is_null() {
        // SAFETY: SERVING points at QUEUE, a static; the loading CPU
        // submits only jobs whose memory is given up (Queue::submit's
        // contract), which IdentityMapped reaches on this CPU too (the same
        // page tables).
        unsafe { (*queue).serve(&IdentityMapped) };
    }
    cpu::clear_vector_registers();
    LEFT.fetch_add(1, Ordering::Release);
    loop {
        // SAFETY: interrupts are off; hlt waits for INIT.
        unsafe { x86::halt() };
    }
}
