//! ksave's on-disk image format (docs/FORMAT.md) and the config section the
//! host tool writes into ksave.elf.
//!
//! Both sides of every interface live here: the [`writer`] that ksave drives
//! while saving and the [`reader`] that the host tool (and restore) use, so
//! the host tests run the real encoder against the real decoder.
#![no_std]
#![deny(missing_docs)]

#[cfg(test)]
extern crate std;

pub mod chunk;
pub mod codec;
pub mod commit;
pub mod config;
pub mod filemap;
pub mod header;
pub mod mailbox;
pub mod reader;
pub mod seal;
pub mod store;
pub mod verdict;
pub mod writer;

use crc::{CRC_32_ISCSI, Crc, Table};

/// Page size of everything saved.
pub const PAGE: usize = 4096;
/// The smallest unit the format aligns to, and the unit chunk headers
/// count their length in.
pub const SECTOR: u64 = 512;
/// The largest alignment an image may have: chunks are padded to the
/// disk's logical block size, 512 or 4096 bytes ([`header::Header::align`]).
pub const MAX_ALIGN: u32 = 4096;

/// CRC-32C (Castagnoli): the check of every small structure (headers,
/// metadata, config), where it detects every burst up to 32 bits. Chunk
/// payloads, which are nearly all the bytes, are checked with XXH64 instead
/// ([`payload_hash`]): see docs/FORMAT.md. One 1 KiB table: the structures
/// are a few KiB a chunk, and slice-by-16's 16 KiB would be 3% of ksave's
/// footprint.
pub static CRC32C: Crc<u32, Table<1>> = Crc::<u32, Table<1>>::new(&CRC_32_ISCSI);

/// The payload check: XXH64. A 64-bit check (collision 2^-64) in plain
/// 64-bit arithmetic: measured under QEMU TCG it beats table CRC-32C and
/// XXH3 (whose x86_64 path is SSE2, which TCG runs through helpers).
pub fn payload_hash(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(bytes, 0)
}

/// Streaming [`payload_hash`].
pub struct PayloadHasher(xxhash_rust::xxh64::Xxh64);

impl PayloadHasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self(xxhash_rust::xxh64::Xxh64::new(0))
    }
    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes)
    }
    /// The hash so far.
    pub fn digest(&self) -> u64 {
        self.0.digest()
    }
    /// Starts over.
    pub fn reset(&mut self) {
        self.0.reset(0)
    }
}

impl Default for PayloadHasher {
    fn default() -> Self {
        Self::new()
    }
}

/// True if the page is all zeros (such pages are not stored).
pub fn is_zero_page(page: &[u8; PAGE]) -> bool {
    // u64 words: eight bytes a compare, and an early exit on the first
    // non-zero word, which is where most data pages leave.
    page.chunks_exact(8).all(|w| u64::from_ne_bytes(w.try_into().unwrap()) == 0)
}

/// A physical range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Range {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl Range {
    /// Pages wholly inside the range.
    pub fn pages(&self) -> core::ops::Range<u64> {
        let first = self.start.div_ceil(PAGE as u64);
        let last = self.end / PAGE as u64;
        first..last.max(first)
    }

    /// True if `addr` lies inside.
    pub fn contains(&self, addr: u64) -> bool {
        (self.start..self.end).contains(&addr)
    }

    /// The whole pages inside, or `None` if there are none. Image and host
    /// both round firmware RAM ranges this way, so that their RAM maps
    /// compare equal.
    pub fn page_aligned(&self) -> Option<Self> {
        let r = Self { start: self.start.next_multiple_of(PAGE as u64), end: self.end / PAGE as u64 * PAGE as u64 };
        (r.start < r.end).then_some(r)
    }
}

/// CPUID leaf 0's vendor string ("GenuineIntel", "AuthenticAMD"), which an
/// image records and restore checks.
pub fn cpu_vendor() -> [u8; 12] {
    let r = core::arch::x86_64::__cpuid(0);
    let mut v = [0u8; 12];
    v[0..4].copy_from_slice(&r.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&r.edx.to_le_bytes());
    v[8..12].copy_from_slice(&r.ecx.to_le_bytes());
    v
}

/// Whether the CPU can run 5-level paging: CPUID.(EAX=07H,ECX=0):ECX[16]
/// (Intel SDM vol. 2A, CPUID). An image of a kernel that ran with it is
/// resumed only on such a CPU.
pub fn cpu_has_la57() -> bool {
    core::arch::x86_64::__cpuid_count(7, 0).ecx & (1 << 16) != 0
}

/// One page the kexec jump displaced: the caller's data of `dest` sits in `src`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackupPair {
    /// The page under ksave.
    pub dest: u64,
    /// Where its contents are now.
    pub src: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_round_inwards_to_whole_pages() {
        assert_eq!(Range { start: 0, end: 0x9fc00 }.page_aligned(), Some(Range { start: 0, end: 0x9f000 }));
        assert_eq!(Range { start: 0x100001, end: 0x200000 }.page_aligned(), Some(Range { start: 0x101000, end: 0x200000 }));
        assert_eq!(Range { start: 0x1001, end: 0x1fff }.page_aligned(), None);
    }
}
