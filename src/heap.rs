//! ksave's heap: a fixed arena in its own bss, so allocations never touch the
//! caller's memory.

use linked_list_allocator::LockedHeap;

/// Heap size; the image footprint budget is 512 KiB in all.
pub const HEAP_SIZE: usize = 16 * 1024;

#[repr(align(4096))]
struct Arena(#[expect(dead_code, reason = "only its address is used")] [u8; HEAP_SIZE]);

static mut ARENA: Arena = Arena([0; HEAP_SIZE]);

#[global_allocator]
static ALLOCATOR: LockedHeap = LockedHeap::empty();

/// Hands the arena to the allocator. Called once per entry, after bss (and
/// so the allocator's state) was zeroed.
pub fn init() {
    // SAFETY: ARENA is used by nothing else, and init runs once per entry
    // before any allocation (a re-entry starts over with zeroed bss).
    unsafe { ALLOCATOR.lock().init((&raw mut ARENA).cast::<u8>(), HEAP_SIZE) };
}
