//! The config section of ksave.elf (`.ksave_config`, one block): what the
//! host tool tells ksave before loading it. ksave ships it unconfigured.

use crate::{CRC32C, PAGE, Range, le32, le64, put32, put64};

/// "KSAVECFG".
pub const MAGIC: [u8; 8] = *b"KSAVECFG";
/// Config layout version.
pub const VERSION: u32 = 1;
/// Most RAM ranges the config carries.
pub const MAX_RANGES: usize = 128;
/// Bytes of the host info text.
pub const INFO_LEN: usize = 256;
const STATE_CONFIGURED: u32 = 1;
const RANGES_AT: usize = 72;
const INFO_AT: usize = RANGES_AT + 16 * MAX_RANGES;

/// The block as built into ksave.elf: magic, version, not configured.
pub const SHIPPED: [u8; PAGE] = {
    let mut b = [0u8; PAGE];
    let mut i = 0;
    while i < 8 {
        b[i] = MAGIC[i];
        i += 1;
    }
    b[8] = VERSION as u8;
    b
};

/// What ksave needs to know to save.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// This save attempt's nonce.
    pub nonce: u64,
    /// When the host tool wrote the config (seconds since the epoch).
    pub created_unix: u64,
    /// The target partition's unique GUID, on-disk byte order.
    pub partition_guid: [u8; 16],
    /// Its first LBA, as the host sees it (cross-checked by ksave).
    pub partition_first_lba: u64,
    /// Its size in sectors, as the host sees it.
    pub partition_sectors: u64,
    /// Compress with LZ4 where it pays.
    pub lz4: bool,
    /// The caller's RAM.
    pub ram: [Range; MAX_RANGES],
    /// How many of `ram` are used.
    pub ram_count: usize,
    /// Host info for the image header (hostname, kernel release).
    pub info: [u8; INFO_LEN],
}

/// Why a config block was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// No config section magic: not a ksave image.
    BadMagic,
    /// The image was never configured (`ksave load` does that).
    NotConfigured,
    /// Another layout version.
    Version(u32),
    /// Checksum mismatch: damaged.
    Checksum,
    /// A field makes no sense.
    Field(&'static str),
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadMagic => write!(f, "no ksave config section"),
            Self::NotConfigured => write!(f, "ksave.elf is not configured: load it with `ksave load`"),
            Self::Version(v) => write!(f, "config version {v}, this ksave reads {VERSION}"),
            Self::Checksum => write!(f, "config checksum mismatch"),
            Self::Field(what) => write!(f, "config field invalid: {what}"),
        }
    }
}

impl Config {
    /// An empty config (no RAM, no partition).
    pub fn new() -> Self {
        Self {
            nonce: 0,
            created_unix: 0,
            partition_guid: [0; 16],
            partition_first_lba: 0,
            partition_sectors: 0,
            lz4: false,
            ram: [Range::default(); MAX_RANGES],
            ram_count: 0,
            info: [0; INFO_LEN],
        }
    }

    /// The RAM ranges in use.
    pub fn ram(&self) -> &[Range] {
        &self.ram[..self.ram_count]
    }

    /// The info text.
    pub fn info(&self) -> &str {
        let end = self.info.iter().position(|&b| b == 0).unwrap_or(INFO_LEN);
        core::str::from_utf8(&self.info[..end]).unwrap_or("")
    }

    /// Encodes into the section's block.
    pub fn encode(&self, b: &mut [u8; PAGE]) {
        b.fill(0);
        b[0..8].copy_from_slice(&MAGIC);
        put32(b, 8, VERSION);
        put32(b, 12, STATE_CONFIGURED);
        put64(b, 16, self.nonce);
        put64(b, 24, self.created_unix);
        b[32..48].copy_from_slice(&self.partition_guid);
        put64(b, 48, self.partition_first_lba);
        put64(b, 56, self.partition_sectors);
        put32(b, 64, self.lz4 as u32);
        put32(b, 68, self.ram_count as u32);
        for (i, r) in self.ram().iter().enumerate() {
            put64(b, RANGES_AT + 16 * i, r.start);
            put64(b, RANGES_AT + 16 * i + 8, r.end);
        }
        b[INFO_AT..INFO_AT + INFO_LEN].copy_from_slice(&self.info);
        let crc = CRC32C.checksum(&b[..PAGE - 4]);
        put32(b, PAGE - 4, crc);
    }

    /// Decodes and checks the section's block.
    pub fn decode(b: &[u8; PAGE]) -> Result<Self, ConfigError> {
        if b[0..8] != MAGIC {
            return Err(ConfigError::BadMagic);
        }
        if le32(b, 12) != STATE_CONFIGURED {
            return Err(ConfigError::NotConfigured);
        }
        if CRC32C.checksum(&b[..PAGE - 4]) != le32(b, PAGE - 4) {
            return Err(ConfigError::Checksum);
        }
        let version = le32(b, 8);
        if version != VERSION {
            return Err(ConfigError::Version(version));
        }
        let mut c = Self::new();
        c.nonce = le64(b, 16);
        c.created_unix = le64(b, 24);
        c.partition_guid.copy_from_slice(&b[32..48]);
        c.partition_first_lba = le64(b, 48);
        c.partition_sectors = le64(b, 56);
        c.lz4 = le32(b, 64) & 1 != 0;
        c.ram_count = le32(b, 68) as usize;
        if c.ram_count == 0 || c.ram_count > MAX_RANGES {
            return Err(ConfigError::Field("RAM range count"));
        }
        for i in 0..c.ram_count {
            let r = Range { start: le64(b, RANGES_AT + 16 * i), end: le64(b, RANGES_AT + 16 * i + 8) };
            if r.start >= r.end || r.start % PAGE as u64 != 0 || r.end % PAGE as u64 != 0 {
                return Err(ConfigError::Field("RAM range"));
            }
            if i > 0 && r.start < c.ram[i - 1].end {
                return Err(ConfigError::Field("RAM ranges unsorted or overlapping"));
            }
            c.ram[i] = r;
        }
        if c.partition_guid == [0; 16] || c.partition_sectors == 0 {
            return Err(ConfigError::Field("partition"));
        }
        c.info.copy_from_slice(&b[INFO_AT..INFO_AT + INFO_LEN]);
        Ok(c)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::new()
    }
}
