//! What ksave learns when it is entered, as pure, allocation-free logic that
//! builds for the bare-metal image and is tested on the host.
//!
//! - [`acpi`]: the FACS hardware signature, through the ACPI tables.
//! - [`memmap`]: a normalized physical memory map, whatever the source.
//! - [`multiboot1`]: the multiboot 1 information structure and its mmap.
//! - [`kexec`]: the kexec-jump caller's control page and its backup map.
//! - [`pagewalk`]: the caller's memory through its own page tables; its GDT.
//! - [`uefi`]: the UEFI memory map as Linux's EFI stub turns it into e820.
#![no_std]
#![deny(missing_docs)]

pub mod acpi;
pub mod kexec;
pub mod memmap;
pub mod multiboot1;
pub mod pagewalk;
pub mod uefi;

/// Physical memory as the parsers see it. The image implements it over its
/// identity map; tests implement it over a byte buffer.
pub trait PhysRead {
    /// Reads the little-endian u64 at physical address `addr`, or `None` if
    /// the address is not readable memory.
    fn read_u64(&self, addr: u64) -> Option<u64>;
}
