//! ksave's working memory, in its own image: statics handed out once per
//! entry, and the buffers a save or a restore works in.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use ksave_core::helpers::CHUNKS_SEALING;
use ksave_core::resume::READ_AHEAD;
use ksave_format::PAGE;
use ksave_format::chunk::{LZ4_GROUP, LZ4_OUT, SealedChunk};

/// A static that one entry may borrow mutably once. It must start all zero,
/// so that it lives in .bss, which every entry clears: each entry then gets
/// it afresh (a re-entry by `kexec -e` reloads nothing).
pub struct Exclusive<T> {
    taken: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the flag hands out at most one reference per entry, on the CPU
// ksave entered on; the other CPUs of a resume (smp.rs) reach only the
// helpers' queue, which is Sync itself, through a shared reference.
unsafe impl<T> Sync for Exclusive<T> {}

impl<T> Exclusive<T> {
    /// Wraps `value`.
    pub const fn new(value: T) -> Self {
        Self { taken: AtomicBool::new(false), value: UnsafeCell::new(value) }
    }

    /// The value; panics if this entry already took it.
    // clippy::mut_from_ref: deliberate, a checked once-cell (as
    // static_cell's StaticCell::init): the `taken` flag, tested below,
    // makes the returned reference the only one to the value this entry.
    #[allow(clippy::mut_from_ref)]
    pub fn take(&'static self) -> &'static mut T {
        assert!(crate::layout::in_bss(self as *const Self as u64), "a once-per-entry static must be zero-initialised");
        assert!(!self.taken.swap(true, Ordering::Relaxed), "a once-per-entry buffer was taken twice");
        // SAFETY: the flag above makes this the only reference this entry.
        unsafe { &mut *self.value.get() }
    }

    /// Overwrites the value with zeros where it lies (secrets, on ksave's
    /// way out). All zeros must be a valid `T` (it is what every entry
    /// starts with), and no reference the value was taken by may be used
    /// after this.
    pub fn wipe(&'static self) {
        let at = self.value.get().cast::<u8>();
        for i in 0..size_of::<T>() {
            // SAFETY: inside the value; zeros are its initial (valid) state;
            // the caller uses no reference to it afterwards, and ksave runs
            // on one CPU.
            unsafe { core::ptr::write_volatile(at.add(i), 0) };
        }
    }
}

/// The buffers of a save or a restore (one entry does one or the other, so
/// they share them). Page aligned, so every one of them can take DMA.
#[repr(C, align(4096))]
pub struct Work {
    /// One header block.
    pub block: [u8; PAGE],
    /// A copy of physical page 0 (save), or one page being read (restore).
    pub page0: [u8; PAGE],
    /// A raw chunk header.
    pub raw_header: [u8; PAGE],
    /// Coded chunks read ahead (restore).
    pub read_ahead: [u8; READ_AHEAD],
    /// Pages of an LZ4 group.
    pub lz4_in: [u8; LZ4_GROUP * PAGE],
    /// An LZ4 chunk.
    pub lz4_out: [u8; LZ4_OUT],
    /// A sealed image's raw chunks, encrypted (a save seals
    /// [`CHUNKS_SEALING`] at once, on every CPU) or opened in place.
    pub sealed_chunks: [SealedChunk; CHUNKS_SEALING],
}

static WORK: Exclusive<Work> = Exclusive::new(Work {
    block: [0; PAGE],
    page0: [0; PAGE],
    raw_header: [0; PAGE],
    read_ahead: [0; READ_AHEAD],
    lz4_in: [0; LZ4_GROUP * PAGE],
    lz4_out: [0; LZ4_OUT],
    sealed_chunks: [[0; size_of::<SealedChunk>()]; CHUNKS_SEALING],
});

/// The work buffers; once per entry.
pub fn take() -> &'static mut Work {
    WORK.take()
}
