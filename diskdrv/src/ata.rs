//! ATA commands and IDENTIFY DEVICE data (ATA/ATAPI-8 ACS, T13/1699-D).

use crate::heapless_str::Str40;
use crate::{DiskError, DiskInfo};

/// IDENTIFY DEVICE.
pub const IDENTIFY: u8 = 0xEC;
/// READ DMA EXT (48-bit).
pub const READ_DMA_EXT: u8 = 0x25;
/// WRITE DMA EXT (48-bit).
pub const WRITE_DMA_EXT: u8 = 0x35;
/// READ DMA (28-bit).
pub const READ_DMA: u8 = 0xC8;
/// WRITE DMA (28-bit).
pub const WRITE_DMA: u8 = 0xCA;
/// READ SECTORS EXT (48-bit PIO).
pub const READ_SECTORS_EXT: u8 = 0x24;
/// WRITE SECTORS EXT (48-bit PIO).
pub const WRITE_SECTORS_EXT: u8 = 0x34;
/// READ SECTORS (28-bit PIO).
pub const READ_SECTORS: u8 = 0x20;
/// WRITE SECTORS (28-bit PIO).
pub const WRITE_SECTORS: u8 = 0x30;
/// FLUSH CACHE EXT.
pub const FLUSH_CACHE_EXT: u8 = 0xEA;
/// FLUSH CACHE.
pub const FLUSH_CACHE: u8 = 0xE7;

/// Status register bits (ACS-2 6.1.9 / ATA8-ACS).
pub mod status {
    /// Busy.
    pub const BSY: u8 = 0x80;
    /// Device ready.
    pub const DRDY: u8 = 0x40;
    /// Device fault.
    pub const DF: u8 = 0x20;
    /// Data request.
    pub const DRQ: u8 = 0x08;
    /// Error.
    pub const ERR: u8 = 0x01;
}

/// Largest sector count of one 48-bit command (count 0 means 65536).
pub const MAX_SECTORS_LBA48: u64 = 65536;
/// Largest sector count of one 28-bit command (count 0 means 256).
pub const MAX_SECTORS_LBA28: u64 = 256;
/// First LBA a 28-bit command cannot address.
pub const LBA28_LIMIT: u64 = 1 << 28;

/// The read or write command for a transfer.
pub fn dma_command(write: bool, lba48: bool) -> u8 {
    match (write, lba48) {
        (false, true) => READ_DMA_EXT,
        (true, true) => WRITE_DMA_EXT,
        (false, false) => READ_DMA,
        (true, false) => WRITE_DMA,
    }
}

/// Interprets the 256 words of IDENTIFY DEVICE data.
pub fn parse_identify(words: &[u16; 256]) -> Result<DiskInfo, DiskError> {
    // Word 0 bit 15: 1 = ATAPI (not a disk).
    if words[0] & 0x8000 != 0 {
        return Err(DiskError::Unsupported("ATAPI device"));
    }
    // Word 49 bit 9: LBA supported.
    if words[49] & (1 << 9) == 0 {
        return Err(DiskError::Unsupported("no LBA addressing"));
    }
    // Word 106: valid if bit 14 set and bit 15 clear; bit 12 = logical
    // sectors longer than 256 words.
    if words[106] & 0xC000 == 0x4000 && words[106] & (1 << 12) != 0 {
        return Err(DiskError::Unsupported("logical sectors larger than 512 bytes"));
    }
    let lba48 = words[83] & (1 << 10) != 0;
    let sectors = if lba48 {
        (words[100] as u64) | (words[101] as u64) << 16 | (words[102] as u64) << 32 | (words[103] as u64) << 48
    } else {
        (words[60] as u64) | (words[61] as u64) << 16
    };
    Ok(DiskInfo {
        model: ata_string(&words[27..47]),
        serial: ata_string(&words[10..20]),
        blocks: sectors,
        block_size: 512,
        lba48,
        // Word 49 bit 8: DMA supported.
        dma: words[49] & (1 << 8) != 0,
    })
}

/// ATA strings hold two characters a word, first in the high byte.
fn ata_string(words: &[u16]) -> Str40 {
    let mut bytes = [0u8; 40];
    for (i, w) in words.iter().take(20).enumerate() {
        bytes[2 * i] = (w >> 8) as u8;
        bytes[2 * i + 1] = *w as u8;
    }
    Str40::from_ascii_trimmed(&bytes[..2 * words.len().min(20)])
}

/// IDENTIFY data for a disk of `sectors` sectors, for fakes and tests.
pub fn identify_data(model: &str, serial: &str, sectors: u64, lba48: bool) -> [u16; 256] {
    let mut w = [0u16; 256];
    let put = |w: &mut [u16; 256], at: usize, n: usize, s: &str| {
        let mut b = [b' '; 40];
        b[..s.len().min(2 * n)].copy_from_slice(&s.as_bytes()[..s.len().min(2 * n)]);
        for i in 0..n {
            w[at + i] = (b[2 * i] as u16) << 8 | b[2 * i + 1] as u16;
        }
    };
    put(&mut w, 10, 10, serial);
    put(&mut w, 27, 20, model);
    w[49] = (1 << 9) | (1 << 8);
    let lba28 = sectors.min(LBA28_LIMIT - 1);
    w[60] = lba28 as u16;
    w[61] = (lba28 >> 16) as u16;
    if lba48 {
        w[83] = 1 << 10;
        for i in 0..4 {
            w[100 + i] = (sectors >> (16 * i)) as u16;
        }
    }
    w[106] = 0x4000;
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_builds() {
        let info = parse_identify(&identify_data("QEMU HARDDISK", "QM00001", 1 << 30, true)).unwrap();
        assert_eq!(info.model.as_str(), "QEMU HARDDISK");
        assert_eq!(info.serial.as_str(), "QM00001");
        assert_eq!(info.blocks, 1 << 30);
        assert!(info.lba48 && info.dma);
        let info = parse_identify(&identify_data("OLD", "1", 1000, false)).unwrap();
        assert_eq!((info.blocks, info.lba48), (1000, false));
    }

    #[test]
    fn refuses_atapi_and_4k_logical_sectors() {
        let mut w = identify_data("CD", "1", 0, false);
        w[0] = 0x8580;
        assert_eq!(parse_identify(&w), Err(DiskError::Unsupported("ATAPI device")));
        let mut w = identify_data("4K", "1", 100, true);
        w[106] = 0x4000 | (1 << 12);
        assert!(matches!(parse_identify(&w), Err(DiskError::Unsupported(_))));
    }
}
