//! Reading physical memory through ksave's identity map.

use crate::paging::identity_end;
use bootinfo::PhysRead;
use ksave_core::helpers::SharedMemory;
use ksave_core::resume::PhysMemory;

/// Physical memory below [`identity_end`], read through the identity map.
pub struct IdentityMapped;

impl PhysRead for IdentityMapped {
    fn read_u64(&self, addr: u64) -> Option<u64> {
        if !addr.is_multiple_of(8) || addr.checked_add(8)? > identity_end() {
            return None;
        }
        // SAFETY: addr is aligned and inside the identity map (asm/tables.s,
        // paging.rs), so the read cannot fault; callers only pass
        // addresses they were given as RAM (a read of RAM has no effects).
        Some(unsafe { core::ptr::read_volatile(addr as *const u64) })
    }
}

/// What a resume loads into: [`zero`], [`write`] and [`read`].
impl PhysMemory for IdentityMapped {
    unsafe fn zero(&mut self, addr: u64, len: u64) {
        // SAFETY: the trait's contract is `zero`'s: memory of this machine
        // below the identity map's end that nothing of ksave uses.
        unsafe { zero(addr, len as usize) }
    }

    unsafe fn write(&mut self, addr: u64, data: &[u8]) {
        // SAFETY: as for `zero` above.
        unsafe { write(addr, data) }
    }

    unsafe fn read(&self, addr: u64, buf: &mut [u8]) {
        // SAFETY: the trait's contract is `read`'s: RAM or NVS inside the
        // identity map.
        unsafe { read(addr, buf) }
    }
}

/// The same, from any CPU (the helpers share ksave's page tables).
impl SharedMemory for IdentityMapped {
    unsafe fn zero(&self, addr: u64, len: u64) {
        // SAFETY: the trait's contract is `zero`'s, and no other CPU or
        // device touches the bytes meanwhile.
        unsafe { zero(addr, len as usize) }
    }

    unsafe fn write(&self, addr: u64, data: &[u8]) {
        // SAFETY: as for `zero` above.
        unsafe { write(addr, data) }
    }

    unsafe fn read(&self, addr: u64, buf: &mut [u8]) {
        // SAFETY: the trait's contract is `read`'s.
        unsafe { read(addr, buf) }
    }
}

/// The caller's RAM only, through the identity map: what ksave reads while
/// following the caller's own pointers and page tables. An address outside
/// the RAM map (a stale or wrong pointer, which could name a device's
/// registers, where a read can have effects) reads as `None`. Without a
/// map (ksave.elf not configured) nothing is read.
pub struct RamOnly<'a>(pub Option<&'a [ksave_format::Range]>);

impl PhysRead for RamOnly<'_> {
    fn read_u64(&self, addr: u64) -> Option<u64> {
        let end = addr.checked_add(8)?;
        self.0?.iter().any(|r| r.start <= addr && end <= r.end).then(|| IdentityMapped.read_u64(addr))?
    }
}

/// Borrows `len` bytes of physical memory at `addr`.
///
/// # Safety
/// The range must be RAM below [`identity_end`] that nothing writes
/// while the slice lives.
pub unsafe fn bytes<'a>(addr: u64, len: usize) -> &'a [u8] {
    // SAFETY: upheld by the caller.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

/// Zeroes `len` bytes at physical `addr`. In asm: address 0 is RAM, but no
/// Rust pointer may be null.
///
/// # Safety
/// `[addr, addr+len)` must be identity-mapped RAM that nothing of ksave uses.
pub unsafe fn zero(addr: u64, len: usize) {
    debug_assert!(len.is_multiple_of(8));
    // SAFETY: upheld by the caller; DF is clear (entry code). Quadwords:
    // under TCG each rep iteration costs the same whatever its width.
    unsafe { core::arch::asm!("rep stosq", inout("rdi") addr => _, inout("rcx") len / 8 => _, in("rax") 0u64, options(nostack, preserves_flags)) };
}

/// Copies `src` to physical `addr` (see [`zero`] for why asm).
///
/// # Safety
/// As for [`zero`].
pub unsafe fn write(addr: u64, src: &[u8]) {
    debug_assert!(src.len().is_multiple_of(8));
    // SAFETY: upheld by the caller; src is a live slice; DF is clear.
    unsafe {
        core::arch::asm!("rep movsq", inout("rdi") addr => _, inout("rsi") src.as_ptr() => _, inout("rcx") src.len() / 8 => _, options(nostack, preserves_flags));
    }
}

/// Copies physical `addr` into `dst` (see [`zero`] for why asm).
///
/// # Safety
/// `[addr, addr + dst.len())` must be identity-mapped RAM.
pub unsafe fn read(addr: u64, dst: &mut [u8]) {
    debug_assert!(dst.len().is_multiple_of(8));
    // SAFETY: upheld by the caller; dst is a live slice; DF is clear.
    unsafe {
        core::arch::asm!("rep movsq", inout("rdi") dst.as_mut_ptr() => _, inout("rsi") addr => _, inout("rcx") dst.len() / 8 => _, options(nostack, preserves_flags));
    }
}
