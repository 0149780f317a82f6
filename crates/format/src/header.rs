//! The image header (block 0 of the partition) and the metadata blocks.
//!
//! The header is written twice: first with state [`State::Writing`] before
//! any data, last with [`State::Complete`] after every chunk is written and
//! flushed. Its CRC covers the whole block, so a torn rewrite reads as
//! invalid, never as complete.

use crate::{BackupPair, CRC32C, PAGE, Range, le32, le64, put32, put64};

/// "KSAVEIMG".
pub const MAGIC: [u8; 8] = *b"KSAVEIMG";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Blocks (4 KiB) of metadata after the header.
pub const META_BLOCKS: u64 = 4;
/// Byte offset of the metadata.
pub const META_OFFSET: u64 = PAGE as u64;
/// Byte offset of the first chunk.
pub const DATA_OFFSET: u64 = PAGE as u64 * (1 + META_BLOCKS);
/// Most RAM ranges an image can hold.
pub const MAX_RAM_RANGES: usize = 128;
/// Most backup pairs an image can hold (ksave's footprint in pages, with room).
pub const MAX_BACKUP_PAIRS: usize = (META_BLOCKS as usize * PAGE - MAX_RAM_RANGES * 16) / 16;
/// Bytes of the message field.
pub const MESSAGE_LEN: usize = 256;

/// Where an image stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum State {
    /// A save has begun and not finished: never restorable.
    Writing = 1,
    /// Every chunk is on disk and flushed.
    Complete = 2,
    /// Resumed once, or invalidated by the user: never restorable again.
    Invalidated = 3,
    /// The save failed; the message says why. Not an image.
    Failed = 4,
}

impl State {
    fn from_u32(v: u32) -> Option<Self> {
        [Self::Writing, Self::Complete, Self::Invalidated, Self::Failed].into_iter().find(|s| *s as u32 == v)
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Writing => "writing",
            Self::Complete => "complete",
            Self::Invalidated => "invalidated",
            Self::Failed => "failed",
        }
    }
}

/// The header's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Where the image stands.
    pub state: State,
    /// The save attempt's nonce (from the config the host tool wrote).
    pub nonce: u64,
    /// When the host tool loaded ksave (seconds since the epoch).
    pub created_unix: u64,
    /// The caller's re-entry address.
    pub reentry: u64,
    /// ksave's own load range.
    pub image: Range,
    /// Image flags (`FLAG_*`).
    pub flags: u32,
    /// RAM ranges and backup pairs in the metadata blocks.
    pub ram_ranges: u32,
    /// Backup pairs in the metadata blocks.
    pub backup_pairs: u32,
    /// CRC-32C of the metadata bytes in use.
    pub meta_crc: u32,
    /// Chunks written.
    pub chunks: u64,
    /// Bytes of chunk data after [`DATA_OFFSET`].
    pub data_bytes: u64,
    /// Non-zero pages stored.
    pub pages_stored: u64,
    /// All-zero pages left out.
    pub pages_zero: u64,
    /// CRC-32C over every chunk header's CRC, in order: ties the set.
    pub chunks_crc: u32,
    /// Microseconds the save took.
    pub save_us: u64,
    /// Failure code for [`State::Failed`] (`FAIL_*`), else 0.
    pub fail_code: u32,
    /// Creation info, or what went wrong (NUL-padded UTF-8).
    pub message: [u8; MESSAGE_LEN],
    /// CPUID leaf 0 vendor string of the CPU that saved: restore refuses
    /// another vendor.
    pub cpu_vendor: [u8; 12],
}

/// Some chunks are LZ4-compressed.
pub const FLAG_LZ4: u32 = 1 << 0;

/// Why a header was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Not a ksave header at all.
    BadMagic,
    /// Made by another format version.
    Version(u32),
    /// The CRC does not match: torn or corrupted.
    Checksum,
    /// A field is out of range.
    Field(&'static str),
}

impl core::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadMagic => write!(f, "no ksave image header"),
            Self::Version(v) => write!(f, "image format version {v}, this ksave reads {VERSION}"),
            Self::Checksum => write!(f, "header checksum mismatch (torn or corrupted)"),
            Self::Field(what) => write!(f, "header field out of range: {what}"),
        }
    }
}

impl Header {
    /// A header with everything zero but `state` and `nonce`.
    pub fn new(state: State, nonce: u64) -> Self {
        Self {
            state,
            nonce,
            created_unix: 0,
            reentry: 0,
            image: Range::default(),
            flags: 0,
            ram_ranges: 0,
            backup_pairs: 0,
            meta_crc: 0,
            chunks: 0,
            data_bytes: 0,
            pages_stored: 0,
            pages_zero: 0,
            chunks_crc: 0,
            save_us: 0,
            fail_code: 0,
            message: [0; MESSAGE_LEN],
            cpu_vendor: [0; 12],
        }
    }

    /// Records what the writer wrote (chunks, sizes, counts, flags).
    pub fn record(&mut self, totals: &crate::writer::Totals) {
        self.chunks = totals.chunks;
        self.data_bytes = totals.data_bytes;
        self.pages_stored = totals.pages_stored;
        self.pages_zero = totals.pages_zero;
        self.chunks_crc = totals.chunks_crc;
        self.flags = totals.flags;
    }

    /// Sets the message (cut at [`MESSAGE_LEN`] bytes on a char boundary).
    pub fn set_message(&mut self, text: &str) {
        self.message = [0; MESSAGE_LEN];
        let mut n = text.len().min(MESSAGE_LEN);
        while !text.is_char_boundary(n) {
            n -= 1;
        }
        self.message[..n].copy_from_slice(&text.as_bytes()[..n]);
    }

    /// The message text.
    pub fn message(&self) -> &str {
        let end = self.message.iter().position(|&b| b == 0).unwrap_or(MESSAGE_LEN);
        core::str::from_utf8(&self.message[..end]).unwrap_or("(not UTF-8)")
    }

    /// Encodes into one block.
    pub fn encode(&self, b: &mut [u8; PAGE]) {
        b.fill(0);
        b[0..8].copy_from_slice(&MAGIC);
        put32(b, 8, VERSION);
        put32(b, 12, self.state as u32);
        put64(b, 16, self.nonce);
        put64(b, 24, self.created_unix);
        put64(b, 32, self.reentry);
        put64(b, 40, self.image.start);
        put64(b, 48, self.image.end);
        put32(b, 56, PAGE as u32);
        put32(b, 60, self.flags);
        put32(b, 64, self.ram_ranges);
        put32(b, 68, self.backup_pairs);
        put32(b, 72, self.meta_crc);
        put32(b, 76, self.chunks_crc);
        put64(b, 80, self.chunks);
        put64(b, 88, self.data_bytes);
        put64(b, 96, self.pages_stored);
        put64(b, 104, self.pages_zero);
        put64(b, 112, self.save_us);
        put32(b, 120, self.fail_code);
        b[128..128 + MESSAGE_LEN].copy_from_slice(&self.message);
        b[384..396].copy_from_slice(&self.cpu_vendor);
        let crc = CRC32C.checksum(&b[..PAGE - 4]);
        put32(b, PAGE - 4, crc);
    }

    /// Decodes and checks one block.
    pub fn decode(b: &[u8; PAGE]) -> Result<Self, HeaderError> {
        if b[0..8] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if CRC32C.checksum(&b[..PAGE - 4]) != le32(b, PAGE - 4) {
            return Err(HeaderError::Checksum);
        }
        let version = le32(b, 8);
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        let state = State::from_u32(le32(b, 12)).ok_or(HeaderError::Field("state"))?;
        if le32(b, 56) != PAGE as u32 {
            return Err(HeaderError::Field("page size"));
        }
        let mut message = [0; MESSAGE_LEN];
        message.copy_from_slice(&b[128..128 + MESSAGE_LEN]);
        let mut cpu_vendor = [0; 12];
        cpu_vendor.copy_from_slice(&b[384..396]);
        let h = Self {
            state,
            nonce: le64(b, 16),
            created_unix: le64(b, 24),
            reentry: le64(b, 32),
            image: Range { start: le64(b, 40), end: le64(b, 48) },
            flags: le32(b, 60),
            ram_ranges: le32(b, 64),
            backup_pairs: le32(b, 68),
            meta_crc: le32(b, 72),
            chunks_crc: le32(b, 76),
            chunks: le64(b, 80),
            data_bytes: le64(b, 88),
            pages_stored: le64(b, 96),
            pages_zero: le64(b, 104),
            save_us: le64(b, 112),
            fail_code: le32(b, 120),
            message,
            cpu_vendor,
        };
        if h.ram_ranges as usize > MAX_RAM_RANGES {
            return Err(HeaderError::Field("RAM range count"));
        }
        if h.backup_pairs as usize > MAX_BACKUP_PAIRS {
            return Err(HeaderError::Field("backup pair count"));
        }
        if h.image.start > h.image.end {
            return Err(HeaderError::Field("ksave range"));
        }
        Ok(h)
    }
}

/// Failure codes of a [`State::Failed`] record.
pub mod fail {
    /// The config section is missing or invalid.
    pub const CONFIG: u32 = 1;
    /// The backup map could not be proven right.
    pub const BACKUP_MAP: u32 = 2;
    /// The partition is smaller than the worst case.
    pub const TOO_SMALL: u32 = 3;
    /// A disk error.
    pub const IO: u32 = 4;
    /// The partition does not match what the host recorded.
    pub const PARTITION: u32 = 5;
    /// RAM the config lists is not reachable.
    pub const MEMORY: u32 = 6;
}

/// Bytes of metadata for `ram` ranges and `backup` pairs.
pub fn meta_len(ram: usize, backup: usize) -> usize {
    16 * (ram + backup)
}

/// Writes the RAM ranges then the backup pairs into `out` (the metadata
/// blocks); returns the bytes used and their CRC.
pub fn encode_meta(ram: &[Range], backup: &[BackupPair], out: &mut [u8]) -> (usize, u32) {
    assert!(ram.len() <= MAX_RAM_RANGES && backup.len() <= MAX_BACKUP_PAIRS);
    let mut at = 0;
    for r in ram {
        put64(out, at, r.start);
        put64(out, at + 8, r.end);
        at += 16;
    }
    for p in backup {
        put64(out, at, p.dest);
        put64(out, at + 8, p.src);
        at += 16;
    }
    (at, CRC32C.checksum(&out[..at]))
}

/// The metadata, checked against its header.
pub struct Meta<'a> {
    bytes: &'a [u8],
    ram: usize,
    backup: usize,
}

impl<'a> Meta<'a> {
    /// Checks `bytes` (the metadata blocks) against the header's counts and CRC.
    pub fn parse(header: &Header, bytes: &'a [u8]) -> Result<Self, HeaderError> {
        let (ram, backup) = (header.ram_ranges as usize, header.backup_pairs as usize);
        let len = meta_len(ram, backup);
        if bytes.len() < len {
            return Err(HeaderError::Field("metadata length"));
        }
        if CRC32C.checksum(&bytes[..len]) != header.meta_crc {
            return Err(HeaderError::Checksum);
        }
        let meta = Self { bytes, ram, backup };
        if meta.ram_ranges().any(|r| r.start > r.end || r.start % PAGE as u64 != 0) {
            return Err(HeaderError::Field("RAM range"));
        }
        Ok(meta)
    }

    /// The RAM ranges saved.
    pub fn ram_ranges(&self) -> impl Iterator<Item = Range> + '_ {
        (0..self.ram).map(|i| Range { start: le64(self.bytes, 16 * i), end: le64(self.bytes, 16 * i + 8) })
    }

    /// The backup pairs.
    pub fn backup_pairs(&self) -> impl Iterator<Item = BackupPair> + '_ {
        let base = 16 * self.ram;
        (0..self.backup).map(move |i| BackupPair { dest: le64(self.bytes, base + 16 * i), src: le64(self.bytes, base + 16 * i + 8) })
    }
}
