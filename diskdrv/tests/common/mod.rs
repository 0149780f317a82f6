//! Helpers shared by the driver tests: page-aligned memory and patterns.
#![allow(dead_code)]

use diskdrv::Segment;

/// A page of memory a fake device can DMA into.
#[repr(C, align(4096))]
#[derive(Clone)]
pub struct Page(pub [u8; 4096]);

/// `n` zeroed, contiguous, page-aligned pages below 2 GiB, where 32-bit
/// DMA (IDE PRDs, AHCI without S64A) can reach them. Leaked: tests are short.
pub fn pages(n: usize) -> &'static mut [Page] {
    // SAFETY: an anonymous private mapping; MAP_32BIT places it in the low
    // 2 GiB (Linux x86_64). Zero-filled memory is a valid [Page].
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            n * 4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap MAP_32BIT");
        std::slice::from_raw_parts_mut(p.cast::<Page>(), n)
    }
}

/// `value` moved to memory below 2 GiB (see [`pages`]).
pub fn low<T>(value: T) -> &'static mut T {
    assert!(std::mem::align_of::<T>() <= 4096);
    let mem = pages(std::mem::size_of::<T>().div_ceil(4096));
    let ptr = mem.as_mut_ptr().cast::<T>();
    // SAFETY: fresh, aligned, large enough, and never used for anything else.
    unsafe {
        ptr.write(value);
        &mut *ptr
    }
}

/// The segment covering `bytes` of `pages` from byte `offset`.
pub fn segment(pages: &[Page], offset: usize, bytes: usize) -> Segment {
    let base = pages.as_ptr() as u64 + offset as u64;
    assert!(offset + bytes <= pages.len() * 4096);
    // SAFETY: inside `pages`, which the test owns and keeps for the transfer.
    unsafe { Segment::new(base, bytes as u64) }
}

/// Every other page of `pages`, as scattered segments.
pub fn scattered(pages: &[Page]) -> Vec<Segment> {
    // SAFETY: whole pages of `pages`, which the test owns and keeps for the transfer.
    pages.iter().step_by(2).map(|p| unsafe { Segment::new(p.0.as_ptr() as u64, 4096) }).collect()
}

/// The self-test pattern of `len / 512` sectors from `lba`.
pub fn pattern(lba: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (i, sector) in out.chunks_mut(512).enumerate() {
        diskdrv::testpattern::sector(lba + i as u64, sector);
    }
    out
}

/// Copies `data` into the memory the segments describe.
pub fn fill(segments: &[Segment], data: &[u8]) {
    let mut at = 0;
    for s in segments {
        // SAFETY: test memory from `pages`, alive for the test.
        let mem = unsafe { std::slice::from_raw_parts_mut(s.addr() as *mut u8, s.len() as usize) };
        mem.copy_from_slice(&data[at..at + s.len() as usize]);
        at += s.len() as usize;
    }
}

/// Gathers the memory the segments describe.
pub fn gather(segments: &[Segment]) -> Vec<u8> {
    segments
        .iter()
        // SAFETY: as in `fill`.
        .flat_map(|s| unsafe { std::slice::from_raw_parts(s.addr() as *const u8, s.len() as usize) }.to_vec())
        .collect()
}
