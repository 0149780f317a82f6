//! The Multiboot 1 information structure (Multiboot Specification 0.6.96,
//! section 3.3), as QEMU `-kernel` passes it in EBX.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

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

/// The fixed part of the information structure (section 3.3), up to the
/// memory map fields.
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawInfo {
    flags: U32,
    mem_lower: U32,
    mem_upper: U32,
    boot_device: U32,
    cmdline: U32,
    mods_count: U32,
    mods_addr: U32,
    syms: [U32; 4],
    mmap_length: U32,
    mmap_addr: U32,
}

const _: () = assert!(size_of::<RawInfo>() == INFO_SIZE);

/// A memory map entry; `size` counts the bytes after itself.
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawMmapEntry {
    size: U32,
    base: U64,
    length: U64,
    kind: U32,
}

impl Info {
    /// Parses the fixed part (at least [`INFO_SIZE`] bytes).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let (raw, _) = RawInfo::ref_from_prefix(bytes).ok()?;
        let flags = raw.flags.get();
        Some(Self {
            mem_lower_upper_kib: (flags & FLAG_MEM != 0).then(|| (raw.mem_lower.get(), raw.mem_upper.get())),
            cmdline: (flags & FLAG_CMDLINE != 0).then(|| raw.cmdline.get()),
            mmap: (flags & FLAG_MMAP != 0).then(|| (raw.mmap_addr.get(), raw.mmap_length.get())),
        })
    }
}

/// Adds the entries of a multiboot 1 memory map buffer to `map`. Entries are
/// `size:u32, base:u64, length:u64, type:u32`, each `size + 4` bytes long.
pub fn add_mmap(bytes: &[u8], map: &mut MemoryMap) -> Result<(), MapError> {
    let mut off = 0;
    while let Some(Ok((e, _))) = bytes.get(off..).map(RawMmapEntry::ref_from_prefix) {
        let size = e.size.get() as usize;
        if size < 20 {
            break; // a malformed entry would make us loop or misread: stop here
        }
        map.add(e.base.get(), e.length.get(), RegionKind::from_e820(e.kind.get()))?;
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
