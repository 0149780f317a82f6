//! The one door between the drivers and the machine.

/// Hardware access for the drivers.
///
/// # Safety
///
/// Implementors promise that:
/// - port and MMIO accesses reach the device at that address with exactly
///   the width asked for, in program order, never merged, split or cached
///   (MMIO must be mapped uncacheable or the accesses made volatile on
///   memory typed UC by the MTRRs);
/// - [`Hal::virt_to_phys`] returns the address a bus-master device must use
///   to reach the byte at that pointer, for any memory the driver was given
///   (ksave identity-maps all of it, so this is the identity);
/// - [`Hal::phys_to_virt`] is its inverse for any physical range a caller
///   passes in a [`crate::Segment`];
/// - [`Hal::now_us`] never goes backwards.
///
/// Callers (the drivers) in turn only touch the registers of controllers
/// they were handed at construction, which is what makes these methods
/// safe to call.
pub unsafe trait Hal {
    /// Reads an 8-bit I/O port.
    fn inb(&self, port: u16) -> u8;
    /// Reads a 16-bit I/O port.
    fn inw(&self, port: u16) -> u16;
    /// Reads a 32-bit I/O port.
    fn inl(&self, port: u16) -> u32;
    /// Writes an 8-bit I/O port.
    fn outb(&self, port: u16, value: u8);
    /// Writes a 16-bit I/O port.
    fn outw(&self, port: u16, value: u16);
    /// Writes a 32-bit I/O port.
    fn outl(&self, port: u16, value: u32);
    /// Reads an 8-bit memory-mapped register.
    fn mmio_read8(&self, addr: u64) -> u8;
    /// Writes an 8-bit memory-mapped register.
    fn mmio_write8(&self, addr: u64, value: u8);
    /// Reads a 16-bit memory-mapped register.
    fn mmio_read16(&self, addr: u64) -> u16;
    /// Writes a 16-bit memory-mapped register.
    fn mmio_write16(&self, addr: u64, value: u16);
    /// Reads a 32-bit memory-mapped register.
    fn mmio_read32(&self, addr: u64) -> u32;
    /// Writes a 32-bit memory-mapped register.
    fn mmio_write32(&self, addr: u64, value: u32);
    /// The bus address of a byte the driver owns.
    fn virt_to_phys(&self, ptr: *const u8) -> u64;
    /// Where the CPU reaches physical address `addr` (for PIO, which moves
    /// data through the CPU).
    fn phys_to_virt(&self, addr: u64) -> *mut u8;
    /// Microseconds since some fixed point.
    fn now_us(&self) -> u64;

    /// Reads `words.len()` 16-bit words from one port (PIO data).
    fn inw_repeat(&self, port: u16, words: &mut [u16]) {
        for w in words {
            *w = self.inw(port);
        }
    }

    /// Writes 16-bit words to one port (PIO data).
    fn outw_repeat(&self, port: u16, words: &[u16]) {
        for &w in words {
            self.outw(port, w);
        }
    }
}

/// Reads a 64-bit register as two dwords, low first: how NVMe (1.4, 3.1)
/// and virtio (1.1, 4.1.3.1) allow their 64-bit registers to be read.
pub(crate) fn mmio_read64(hal: &impl Hal, addr: u64) -> u64 {
    hal.mmio_read32(addr) as u64 | (hal.mmio_read32(addr + 4) as u64) << 32
}

/// Writes a 64-bit register as two dwords, low first (see [`mmio_read64`]).
pub(crate) fn mmio_write64(hal: &impl Hal, addr: u64, value: u64) {
    hal.mmio_write32(addr, value as u32);
    hal.mmio_write32(addr + 4, (value >> 32) as u32);
}

/// A deadline on the HAL's clock.
pub(crate) struct Deadline {
    at: u64,
}

impl Deadline {
    pub(crate) fn after(hal: &impl Hal, us: u64) -> Self {
        Self { at: hal.now_us().saturating_add(us) }
    }

    pub(crate) fn passed(&self, hal: &impl Hal) -> bool {
        hal.now_us() >= self.at
    }
}

/// Polls `done` until it returns true or `us` microseconds pass; returns
/// whether it became true.
pub(crate) fn poll(hal: &impl Hal, us: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Deadline::after(hal, us);
    loop {
        if done() {
            return true;
        }
        if deadline.passed(hal) {
            return done();
        }
        core::hint::spin_loop();
    }
}
