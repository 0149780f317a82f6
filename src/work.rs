//! ksave's working memory for a save or a restore, in its own image. One
//! entry does one or the other, so they share it.

use core::sync::atomic::{AtomicBool, Ordering};

use ksave_format::PAGE;
use ksave_format::header::META_BLOCKS;
use ksave_format::writer::{LZ4_GROUP, LZ4_OUT};

/// The buffers. Page aligned, so every one of them can take DMA.
#[repr(C, align(4096))]
pub struct Work {
    /// One header block.
    pub block: [u8; PAGE],
    /// A copy of physical page 0 (save), or one page being read (restore).
    pub page0: [u8; PAGE],
    /// The metadata blocks.
    pub meta: [u8; META_BLOCKS as usize * PAGE],
    /// A raw chunk header.
    pub raw_header: [u8; PAGE],
    /// Pages of an LZ4 group.
    pub lz4_in: [u8; LZ4_GROUP * PAGE],
    /// An LZ4 chunk.
    pub lz4_out: [u8; LZ4_OUT],
}

static mut WORK: Work = Work {
    block: [0; PAGE],
    page0: [0; PAGE],
    meta: [0; META_BLOCKS as usize * PAGE],
    raw_header: [0; PAGE],
    lz4_in: [0; LZ4_GROUP * PAGE],
    lz4_out: [0; LZ4_OUT],
};
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The work buffers; once per entry.
pub fn take() -> &'static mut Work {
    assert!(!TAKEN.swap(true, Ordering::Relaxed), "work buffers taken twice");
    // SAFETY: the flag hands out the one reference per entry (bss, and so
    // the flag, is cleared on every entry).
    unsafe { &mut *(&raw mut WORK) }
}
