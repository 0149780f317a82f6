//! The memory test's data: what page `i` of a memtest run holds, so that
//! the program in the VM and the checks on the host agree byte for byte.

/// Page size.
pub const PAGE: usize = 4096;

/// Every eighth page is left all zero, to exercise zero-page elision.
pub fn is_zero_page(index: u64) -> bool {
    index % 8 == 3
}

/// Fills `out` with page `index`'s contents for `seed`.
pub fn fill_page(seed: u64, index: u64, out: &mut [u8; PAGE]) {
    if is_zero_page(index) {
        out.fill(0);
        return;
    }
    let mut x = (seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
}

/// The manifest memtest writes: magic, seed, page count, then each page's
/// physical frame number.
pub const MANIFEST_MAGIC: [u8; 8] = *b"KSMEMT01";

/// A parsed manifest.
pub struct Manifest {
    /// The data seed.
    pub seed: u64,
    /// Physical frame of page `i`.
    pub pfns: Vec<u64>,
}

impl Manifest {
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MANIFEST_MAGIC.to_vec();
        out.extend(self.seed.to_le_bytes());
        out.extend((self.pfns.len() as u64).to_le_bytes());
        for p in &self.pfns {
            out.extend(p.to_le_bytes());
        }
        out
    }

    /// Decodes (trailing bytes are ignored).
    pub fn decode(bytes: &[u8]) -> anyhow::Result<Self> {
        anyhow::ensure!(bytes.len() >= 24 && bytes[..8] == MANIFEST_MAGIC, "no memtest manifest");
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        let (seed, n) = (u64_at(8), u64_at(16) as usize);
        anyhow::ensure!(bytes.len() >= 24 + 8 * n, "manifest truncated");
        Ok(Self { seed, pfns: (0..n).map(|i| u64_at(24 + 8 * i)).collect() })
    }
}
