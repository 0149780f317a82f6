//! The Multiboot 1 information structure (Multiboot Specification 0.6.96,
//! section 3.3), as QEMU `-kernel` passes it in EBX.

use crate::memmap::{MapError, MemoryMap, RegionKind};

/// EAX at a multiboot 1 entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;

/// Size of the fixed part of the information structure read here.
pub const INFO_SIZE: usize = 52;

const FLAG_MEM: u32 = 1 << 0;
const FLAG_CMDLINE: u32 = 1 << 2;
const FLAG_MMAP: u32 = 1 << 6;

/// The fields ksave uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Info {
    /// KiB of memory below 1 MiB and above 1 MiB, if given.
    pub mem_lower_upper_kib: Option<(u32, u32)>,
    /// Physical address of the NUL-terminated command line, if given.
    pub cmdline: Option<u32>,
    /// Physical address and byte length of the memory map, if given.
    pub mmap: Option<(u32, u32)>,
}

fn u32_at(bytes: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap())
}

impl Info {
    /// Parses the fixed part (at least [`INFO_SIZE`] bytes).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < INFO_SIZE {
            return None;
        }
        let flags = u32_at(bytes, 0);
        Some(Self {
            mem_lower_upper_kib: (flags & FLAG_MEM != 0).then(|| (u32_at(bytes, 4), u32_at(bytes, 8))),
            cmdline: (flags & FLAG_CMDLINE != 0).then(|| u32_at(bytes, 16)),
            mmap: (flags & FLAG_MMAP != 0).then(|| (u32_at(bytes, 48), u32_at(bytes, 44))),
        })
    }
}

/// Adds the entries of a multiboot 1 memory map buffer to `map`. Entries are
/// `size:u32, base:u64, length:u64, type:u32`, each `size + 4` bytes long.
pub fn add_mmap(bytes: &[u8], map: &mut MemoryMap) -> Result<(), MapError> {
    let mut off = 0;
    while off + 24 <= bytes.len() {
        let size = u32_at(bytes, off) as usize;
        if size < 20 {
            break; // a malformed entry would make us loop or misread: stop here
        }
        map.add(u64_at(bytes, off + 4), u64_at(bytes, off + 12), RegionKind::from_e820(u32_at(bytes, off + 20)))?;
        off += size + 4;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(base: u64, len: u64, typ: u32) -> [u8; 24] {
        let mut e = [0u8; 24];
        e[0..4].copy_from_slice(&20u32.to_le_bytes());
        e[4..12].copy_from_slice(&base.to_le_bytes());
        e[12..20].copy_from_slice(&len.to_le_bytes());
        e[20..24].copy_from_slice(&typ.to_le_bytes());
        e
    }

    #[test]
    fn parses_flags_and_fields() {
        let mut info = [0u8; INFO_SIZE];
        info[0..4].copy_from_slice(&(FLAG_MEM | FLAG_MMAP).to_le_bytes());
        info[4..8].copy_from_slice(&639u32.to_le_bytes());
        info[8..12].copy_from_slice(&523136u32.to_le_bytes());
        info[44..48].copy_from_slice(&48u32.to_le_bytes());
        info[48..52].copy_from_slice(&0x9000u32.to_le_bytes());
        let parsed = Info::parse(&info).unwrap();
        assert_eq!(parsed.mem_lower_upper_kib, Some((639, 523136)));
        assert_eq!(parsed.cmdline, None);
        assert_eq!(parsed.mmap, Some((0x9000, 48)));
        assert_eq!(Info::parse(&info[..INFO_SIZE - 1]), None);
    }

    #[test]
    fn reads_a_qemu_like_mmap() {
        let mut buf = [0u8; 72];
        buf[0..24].copy_from_slice(&entry(0, 0x9fc00, 1));
        buf[24..48].copy_from_slice(&entry(0xf0000, 0x10000, 2));
        buf[48..72].copy_from_slice(&entry(0x100000, 0x1fee0000, 1));
        let mut map = MemoryMap::new();
        add_mmap(&buf, &mut map).unwrap();
        assert_eq!(map.regions().len(), 3);
        assert_eq!(map.ram_bytes(), 0x9fc00 + 0x1fee0000);
    }

    #[test]
    fn a_malformed_entry_size_stops_the_walk() {
        let mut buf = [0u8; 48];
        buf[0..24].copy_from_slice(&entry(0, 0x1000, 1));
        buf[24..48].copy_from_slice(&entry(0x2000, 0x1000, 1));
        buf[24..28].copy_from_slice(&0u32.to_le_bytes());
        let mut map = MemoryMap::new();
        add_mmap(&buf, &mut map).unwrap();
        assert_eq!(map.ram_bytes(), 0x1000);
    }
}
