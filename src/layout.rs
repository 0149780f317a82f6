//! The image's own memory, as the linker script laid it out.

unsafe extern "C" {
    static __image_start: u8;
    static __image_end: u8;
    static __bss_start: u8;
    static __bss_end: u8;
}

/// ksave's load range `[start, end)`: the only memory it may write while the
/// caller's RAM is live.
pub fn image_range() -> (u64, u64) {
    // Linker-script symbols: only their addresses mean anything.
    (&raw const __image_start as u64, &raw const __image_end as u64)
}

/// True if `addr` lies in .bss, which every entry clears (asm/entry.s).
pub fn in_bss(addr: u64) -> bool {
    // Linker-script symbols: only their addresses mean anything.
    (&raw const __bss_start as u64..&raw const __bss_end as u64).contains(&addr)
}
