//! Reading physical memory through ksave's identity map.

use crate::paging::identity_end;
use bootinfo::PhysRead;

/// Physical memory below [`identity_end`], read through the identity map.
pub struct IdentityMapped;

impl PhysRead for IdentityMapped {
    fn read_u64(&self, addr: u64) -> Option<u64> {
        if addr % 8 != 0 || addr.checked_add(8)? > identity_end() {
            return None;
        }
        // SAFETY: addr is aligned and inside the identity map (asm/tables.s,
        // paging.rs), so the read cannot fault; callers only pass
        // addresses they were given as RAM (a read of RAM has no effects).
        Some(unsafe { core::ptr::read_volatile(addr as *const u64) })
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
