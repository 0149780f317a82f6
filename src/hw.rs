//! ksave's [`diskdrv::Hal`]: port I/O, MMIO through the identity map, and a
//! microsecond clock from the TSC.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use volatile::VolatilePtr;
use x86::io::{inb, inl, inw, outb, outl, outw};

use crate::paging;

/// The machine, as the disk drivers see it.
#[derive(Clone, Copy)]
pub struct KsaveHal;

/// TSC ticks a microsecond, measured by [`calibrate_tsc`].
static TSC_PER_US: AtomicU64 = AtomicU64::new(0);

fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks a microsecond (its MHz), measured once per entry.
pub fn calibrate_tsc() -> u64 {
    match TSC_PER_US.load(Ordering::Relaxed) {
        0 => measure_tsc(),
        per_us => per_us,
    }
}

/// Measures the TSC against PIT channel 2 over 10 ms. PIT channel 2 is the
/// speaker channel: nobody else needs it, and its gate is put back.
fn measure_tsc() -> u64 {
    const PIT_HZ: u64 = 1_193_182;
    const TICKS: u16 = (PIT_HZ / 100) as u16; // 10 ms
    // SAFETY: ports 0x42/0x43 (PIT channel 2, mode register) and 0x61 (gate
    // and output of channel 2, speaker off) per the 8254 datasheet and the
    // PC/AT layout; ksave runs alone, interrupts off.
    let ticks = unsafe {
        let port61 = inb(0x61);
        outb(0x61, (port61 & !0x02) | 0x01); // gate on, speaker off
        outb(0x43, 0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
        outb(0x42, TICKS as u8);
        outb(0x42, (TICKS >> 8) as u8);
        let start = rdtsc();
        let mut spins = 0u64;
        while inb(0x61) & 0x20 == 0 && spins < 100_000_000 {
            spins += 1;
        }
        let end = rdtsc();
        outb(0x61, port61);
        end - start
    };
    let per_us = (ticks / 10_000).max(1);
    TSC_PER_US.store(per_us, Ordering::Relaxed);
    per_us
}

/// Microseconds since the TSC started counting.
pub fn now_us() -> u64 {
    rdtsc() / TSC_PER_US.load(Ordering::Relaxed).max(1)
}

// SAFETY: ports and MMIO go straight to the hardware with the width asked
// for (x86 in/out; volatile 32-bit loads and stores on the identity map,
// made uncacheable for MMIO by paging::map_mmio); ksave identity-maps all
// memory it hands to DMA, so virt_to_phys and phys_to_virt are the identity;
// the TSC only counts up.
unsafe impl diskdrv::Hal for KsaveHal {
    fn inb(&self, port: u16) -> u8 {
        // SAFETY: see the impl's contract; drivers only name their own ports.
        unsafe { inb(port) }
    }
    fn inw(&self, port: u16) -> u16 {
        // SAFETY: as for inb.
        unsafe { inw(port) }
    }
    fn inl(&self, port: u16) -> u32 {
        // SAFETY: as for inb.
        unsafe { inl(port) }
    }
    fn outb(&self, port: u16, value: u8) {
        // SAFETY: as for inb.
        unsafe { outb(port, value) }
    }
    fn outw(&self, port: u16, value: u16) {
        // SAFETY: as for inb.
        unsafe { outw(port, value) }
    }
    fn outl(&self, port: u16, value: u32) {
        // SAFETY: as for inb.
        unsafe { outl(port, value) }
    }
    fn mmio_read8(&self, addr: u64) -> u8 {
        // SAFETY: as for mmio_read32, one byte.
        unsafe { VolatilePtr::new(NonNull::new_unchecked(addr as *mut u8)).read() }
    }
    fn mmio_write8(&self, addr: u64, value: u8) {
        // SAFETY: as for mmio_read32, one byte.
        unsafe { VolatilePtr::new(NonNull::new_unchecked(addr as *mut u8)).write(value) }
    }
    fn mmio_read16(&self, addr: u64) -> u16 {
        // SAFETY: as for mmio_read32; the address is 2-byte aligned.
        unsafe { VolatilePtr::new(NonNull::new_unchecked(addr as *mut u16)).read() }
    }
    fn mmio_write16(&self, addr: u64, value: u16) {
        // SAFETY: as for mmio_read16.
        unsafe { VolatilePtr::new(NonNull::new_unchecked(addr as *mut u16)).write(value) }
    }
    fn mmio_read32(&self, addr: u64) -> u32 {
        // SAFETY: drivers only read registers of BARs that map_mmio made
        // reachable; the address is 4-byte aligned and non-null.
        unsafe { VolatilePtr::new(NonNull::new_unchecked(addr as *mut u32)).read() }
    }
    fn mmio_write32(&self, addr: u64, value: u32) {
        // SAFETY: as for mmio_read32.
        unsafe { VolatilePtr::new(NonNull::new_unchecked(addr as *mut u32)).write(value) }
    }
    fn virt_to_phys(&self, ptr: *const u8) -> u64 {
        ptr as u64
    }
    fn phys_to_virt(&self, addr: u64) -> *mut u8 {
        debug_assert!(addr < paging::identity_end());
        addr as *mut u8
    }
    fn now_us(&self) -> u64 {
        now_us()
    }

    fn inw_repeat(&self, port: u16, words: &mut [u16]) {
        // SAFETY: `rep insw` reads words.len() words from the port into the
        // buffer, which is exactly that long; DF is clear (entry code).
        unsafe {
            core::arch::asm!("rep insw", in("dx") port, inout("rdi") words.as_mut_ptr() => _, inout("rcx") words.len() => _, options(nostack, preserves_flags));
        }
    }

    fn outw_repeat(&self, port: u16, words: &[u16]) {
        // SAFETY: `rep outsw` writes words.len() words from the buffer to the
        // port; DF is clear (entry code).
        unsafe {
            core::arch::asm!("rep outsw", in("dx") port, inout("rsi") words.as_ptr() => _, inout("rcx") words.len() => _, options(nostack, preserves_flags, readonly));
        }
    }
}
