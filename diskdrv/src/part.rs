//! Finding a partition: GPT (UEFI 2.10, chapter 5.3) by unique partition
//! GUID, with both header and entry-array CRC32s checked and the backup
//! header used when the primary is damaged; MBR by index as a fallback.

use crc::{CRC_32_ISO_HDLC, Crc};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{BlockDevice, DiskError, Hal, MAX_BLOCK};

/// GPT's CRC32 (the ISO-HDLC/zlib one).
const CRC32: Crc<u32> = Crc::<u32>::new(&CRC_32_ISO_HDLC);

/// A GUID in its on-disk byte order (first three fields little-endian).
pub use uguid::Guid;

/// The partition type of a ksave image store (its own, drawn at random
/// for ksave): `ksave setup` takes no partition of another type, and
/// `ksave setup --claim` sets it (`sfdisk --part-type`).
pub const KSAVE_STORE_TYPE: Guid = Guid::parse_or_panic("173DB3CF-DE7F-42FC-B307-BAA2FE510158");

/// The EFI system partition's type (UEFI 2.10, table 5.8).
pub const ESP_TYPE: Guid = Guid::parse_or_panic("C12A7328-F81F-11D2-BA4B-00A0C93EC93B");

/// A partition's place on the disk, in the disk's logical blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    /// First block.
    pub first_lba: u64,
    /// Last block, inclusive.
    pub last_lba: u64,
    /// Which table it came from.
    pub source: Source,
    /// The disk's GUID from its GPT header (zero for an MBR partition):
    /// the disk's identity in a store's claim.
    pub disk: Guid,
    /// Its GPT partition type ([`KSAVE_STORE_TYPE`] for ksave's store);
    /// zero for an MBR partition.
    pub type_guid: Guid,
}

impl Partition {
    /// Size in blocks.
    pub fn blocks(&self) -> u64 {
        self.last_lba - self.first_lba + 1
    }
}

/// Where a partition was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The primary GPT.
    GptPrimary,
    /// The backup GPT, because the primary was damaged.
    GptBackup,
    /// The MBR.
    Mbr,
}

/// Why no partition was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartError {
    /// Reading the disk failed.
    Disk(DiskError),
    /// Neither GPT header is valid.
    NoValidGpt,
    /// The GPT is valid but has no partition with that GUID.
    NotFound,
    /// No valid MBR, or no such MBR entry.
    NoMbrPartition,
}

impl From<DiskError> for PartError {
    fn from(e: DiskError) -> Self {
        Self::Disk(e)
    }
}

/// A GPT header's fields that matter here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptHeader {
    /// LBA of this header.
    pub my_lba: u64,
    /// LBA of the other header.
    pub alternate_lba: u64,
    /// First LBA of the entry array.
    pub entries_lba: u64,
    /// Number of entries.
    pub entry_count: u32,
    /// Bytes per entry (a multiple of 128).
    pub entry_size: u32,
    /// CRC32 of the entry array.
    pub entries_crc: u32,
    /// First and last LBA partitions may use.
    pub usable: (u64, u64),
    /// The disk's GUID.
    pub disk_guid: Guid,
}

/// The GPT header as it lies on disk (UEFI 2.10, table 5.5).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawGptHeader {
    signature: [u8; 8],
    revision: U32,
    header_size: U32,
    header_crc: U32,
    reserved: U32,
    my_lba: U64,
    alternate_lba: U64,
    first_usable_lba: U64,
    last_usable_lba: U64,
    disk_guid: [u8; 16],
    entries_lba: U64,
    entry_count: U32,
    entry_size: U32,
    entries_crc: U32,
}

/// The part of a GPT entry read here (UEFI 2.10, table 5.6).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawGptEntry {
    type_guid: [u8; 16],
    unique_guid: [u8; 16],
    first_lba: U64,
    last_lba: U64,
}

/// An MBR partition entry (the 16 bytes at 446 + 16 * index).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawMbrEntry {
    status: u8,
    chs_first: [u8; 3],
    kind: u8,
    chs_last: [u8; 3],
    first_lba: U32,
    sectors: U32,
}

/// Checks and reads a GPT header sector read from `lba`.
pub fn parse_gpt_header(sector: &[u8; 512], lba: u64) -> Option<GptHeader> {
    let (raw, _) = RawGptHeader::ref_from_prefix(sector).ok()?;
    if &raw.signature != b"EFI PART" {
        return None;
    }
    let size = raw.header_size.get() as usize;
    if !(92..=512).contains(&size) {
        return None;
    }
    let mut copy = [0u8; 512];
    copy[..size].copy_from_slice(&sector[..size]);
    copy[16..20].fill(0); // the CRC is computed with its own field zeroed
    if CRC32.checksum(&copy[..size]) != raw.header_crc.get() {
        return None;
    }
    let header = GptHeader {
        my_lba: raw.my_lba.get(),
        alternate_lba: raw.alternate_lba.get(),
        usable: (raw.first_usable_lba.get(), raw.last_usable_lba.get()),
        entries_lba: raw.entries_lba.get(),
        entry_count: raw.entry_count.get(),
        entry_size: raw.entry_size.get(),
        entries_crc: raw.entries_crc.get(),
        disk_guid: Guid::from_bytes(raw.disk_guid),
    };
    let sane = header.my_lba == lba
        && header.entry_size >= 128
        && header.entry_size.is_multiple_of(128)
        && header.entry_count <= 16384
        && header.usable.0 <= header.usable.1;
    sane.then_some(header)
}

/// One GPT partition entry's fields (UEFI 2.10, table 5.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Partition type GUID.
    pub type_guid: Guid,
    /// Unique partition GUID (Linux's PARTUUID).
    pub unique: Guid,
    /// First LBA.
    pub first_lba: u64,
    /// Last LBA, inclusive.
    pub last_lba: u64,
}

/// Reads an entry (at least 48 bytes); `None` for an unused one.
pub fn parse_entry(e: &[u8]) -> Option<Entry> {
    let (raw, _) = RawGptEntry::ref_from_prefix(e).ok()?;
    if raw.type_guid == [0; 16] {
        return None;
    }
    Some(Entry {
        type_guid: Guid::from_bytes(raw.type_guid),
        unique: Guid::from_bytes(raw.unique_guid),
        first_lba: raw.first_lba.get(),
        last_lba: raw.last_lba.get(),
    })
}

/// True if `entries` (the whole entry array) matches the header's CRC.
pub fn entries_crc_ok(header: &GptHeader, entries: &[u8]) -> bool {
    let len = header.entry_count as usize * header.entry_size as usize;
    entries.len() >= len && CRC32.checksum(&entries[..len]) == header.entries_crc
}

/// Finds the GPT partition whose unique GUID is `guid`, using `buf` (a
/// block of the largest size, in memory the disk can DMA into) for reads;
/// LBAs are the disk's logical blocks (UEFI 2.10, 5.3). The backup GPT is
/// used when the primary header or its entry array fails its CRC.
pub fn find_gpt_partition(
    disk: &mut impl BlockDevice,
    hal: &impl Hal,
    guid: Guid,
    buf: &mut [u8; MAX_BLOCK],
) -> Result<Partition, PartError> {
    let last = disk.info().blocks - 1;
    let block = disk.info().block_size as usize;
    let buf = &mut buf[..block];
    let mut backup_lba = last;
    disk.read(hal, 1, buf)?;
    let head = |b: &[u8]| -> [u8; 512] { b[..512].try_into().expect("a block holds a GPT header") };
    if let Some(primary) = parse_gpt_header(&head(buf), 1) {
        if let Some(found) = search_entries(disk, hal, &primary, guid, buf)? {
            return found_in(found, &primary, Source::GptPrimary, last);
        }
        if (2..=last).contains(&primary.alternate_lba) {
            backup_lba = primary.alternate_lba;
        }
    }
    disk.read(hal, backup_lba, buf)?;
    let backup = parse_gpt_header(&head(buf), backup_lba).ok_or(PartError::NoValidGpt)?;
    match search_entries(disk, hal, &backup, guid, buf)? {
        Some(found) => found_in(found, &backup, Source::GptBackup, last),
        None => Err(PartError::NoValidGpt),
    }
}

/// An entry found: its first and last LBA and its type.
type FoundEntry = (u64, u64, Guid);

/// The partition an entry describes, if it lies in the header's usable
/// range and on the disk (whose last block is `disk_last`: a GPT copied
/// from a larger disk describes blocks this one does not have).
fn found_in(found: Option<FoundEntry>, header: &GptHeader, source: Source, disk_last: u64) -> Result<Partition, PartError> {
    match found {
        Some((first, last, type_guid)) if first >= header.usable.0 && last <= header.usable.1 && first <= last && last <= disk_last => {
            Ok(Partition { first_lba: first, last_lba: last, source, disk: header.disk_guid, type_guid })
        }
        _ => Err(PartError::NotFound),
    }
}

/// Streams the entry array through `buf`, checking its CRC. `None` if the
/// CRC is wrong; otherwise the first and last LBA of the entry with `guid`,
/// if there is one.
fn search_entries(
    disk: &mut impl BlockDevice,
    hal: &impl Hal,
    header: &GptHeader,
    guid: Guid,
    buf: &mut [u8],
) -> Result<Option<Option<FoundEntry>>, PartError> {
    let total = header.entry_count as u64 * header.entry_size as u64;
    let block = buf.len() as u64;
    let mut digest = CRC32.digest();
    let mut found = None;
    let mut offset = 0u64;
    while offset < total {
        disk.read(hal, header.entries_lba + offset / block, buf)?;
        let take = (total - offset).min(block) as usize;
        digest.update(&buf[..take]);
        // Entry sizes are multiples of 128, so an entry's GUIDs and LBAs
        // (its first 48 bytes) never straddle a block.
        for at in (0..take).step_by(128) {
            let starts_entry = (offset + at as u64).is_multiple_of(header.entry_size as u64);
            if let (true, None, Some(e)) = (starts_entry, found, parse_entry(&buf[at..at + 128]))
                && e.unique == guid
            {
                found = Some((e.first_lba, e.last_lba, e.type_guid));
            }
        }
        offset += block;
    }
    Ok((digest.finalize() == header.entries_crc).then_some(found))
}

/// MBR partition `index` (0-3), from block 0 read into `buf` (the MBR is
/// its first 512 bytes).
pub fn find_mbr_partition(disk: &mut impl BlockDevice, hal: &impl Hal, index: usize, buf: &mut [u8; MAX_BLOCK]) -> Result<Partition, PartError> {
    let block = disk.info().block_size as usize;
    disk.read(hal, 0, &mut buf[..block])?;
    let mbr: &[u8; 512] = buf[..512].try_into().expect("a block holds the MBR");
    parse_mbr(mbr, index, disk.info().blocks).ok_or(PartError::NoMbrPartition)
}

/// Reads entry `index` of an MBR sector.
pub fn parse_mbr(sector: &[u8; 512], index: usize, disk_sectors: u64) -> Option<Partition> {
    if index > 3 || sector[510..512] != [0x55, 0xAA] {
        return None;
    }
    let e = RawMbrEntry::ref_from_bytes(&sector[446 + 16 * index..446 + 16 * (index + 1)]).ok()?;
    let (kind, first, count) = (e.kind, e.first_lba.get() as u64, e.sectors.get() as u64);
    if kind == 0 || kind == 0xEE || count == 0 || first + count > disk_sectors {
        return None; // empty, or the GPT protective entry
    }
    Some(Partition { first_lba: first, last_lba: first + count - 1, source: Source::Mbr, disk: Guid::ZERO, type_guid: Guid::ZERO })
}

/// Entries a GPT made by [`build_gpt`] has, of 128 bytes each.
const BUILT_ENTRIES: usize = 128;

/// Bytes [`build_gpt`] writes at the start of a disk of `block_size`
/// blocks: protective MBR block, header block, entry array.
pub const fn gpt_head_len(block_size: usize) -> usize {
    2 * block_size + BUILT_ENTRIES * 128
}

/// Bytes [`build_gpt`] writes at the end of the disk: the backup entry
/// array, then the backup header block.
pub const fn gpt_tail_len(block_size: usize) -> usize {
    BUILT_ENTRIES * 128 + block_size
}

/// Writes a GPT (UEFI 2.10, 5.3) for a disk of `blocks` blocks of
/// `block_size` bytes holding `parts` into `head` ([`gpt_head_len`]
/// bytes, for the disk's start) and `tail` ([`gpt_tail_len`], for its
/// end): what `sgdisk` makes, for any block size (sgdisk takes 512 for an
/// image file). Test disks only: names and attributes stay zero.
pub fn build_gpt(block_size: usize, blocks: u64, disk_guid: Guid, parts: &[Entry], head: &mut [u8], tail: &mut [u8]) {
    let b = block_size as u64;
    let entry_blocks = (BUILT_ENTRIES * 128) as u64 / b;
    assert!(head.len() == gpt_head_len(block_size) && tail.len() == gpt_tail_len(block_size) && parts.len() <= BUILT_ENTRIES);
    head.fill(0);
    tail.fill(0);
    // Protective MBR: one partition of type EE over the disk.
    let mbr = &mut head[..512];
    mbr[446 + 4] = 0xEE;
    mbr[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&((blocks - 1).min(u32::MAX as u64) as u32).to_le_bytes());
    mbr[510..512].copy_from_slice(&[0x55, 0xAA]);
    let entries = &mut head[2 * block_size..];
    for (slot, p) in entries.chunks_mut(128).zip(parts) {
        slot[..16].copy_from_slice(&p.type_guid.to_bytes());
        slot[16..32].copy_from_slice(&p.unique.to_bytes());
        slot[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
        slot[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
    }
    let entries_crc = CRC32.checksum(entries);
    tail[..entries.len()].copy_from_slice(entries);
    let header = |my_lba: u64, alternate_lba: u64, entries_lba: u64| {
        let mut h = RawGptHeader {
            signature: *b"EFI PART",
            revision: 0x0001_0000.into(),
            header_size: 92.into(),
            header_crc: 0.into(),
            reserved: 0.into(),
            my_lba: my_lba.into(),
            alternate_lba: alternate_lba.into(),
            first_usable_lba: (2 + entry_blocks).into(),
            last_usable_lba: (blocks - 2 - entry_blocks).into(),
            disk_guid: disk_guid.to_bytes(),
            entries_lba: entries_lba.into(),
            entry_count: (BUILT_ENTRIES as u32).into(),
            entry_size: 128.into(),
            entries_crc: entries_crc.into(),
        };
        h.header_crc = CRC32.checksum(h.as_bytes()).into();
        h
    };
    head[block_size..block_size + 92].copy_from_slice(header(1, blocks - 1, 2).as_bytes());
    let at = BUILT_ENTRIES * 128;
    tail[at..at + 92].copy_from_slice(header(blocks - 1, 1, blocks - 1 - entry_blocks).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::string::ToString;

    #[test]
    fn guid_text_round_trips_in_mixed_endian() {
        let g = Guid::try_parse("0FC63DAF-8483-4772-8E79-3D69D8477DE4").unwrap();
        assert_eq!(g.to_bytes()[0..4], [0xAF, 0x3D, 0xC6, 0x0F]);
        assert_eq!(g.to_bytes()[8..10], [0x8E, 0x79]);
        assert_eq!(g.to_string(), "0fc63daf-8483-4772-8e79-3d69d8477de4");
        assert!(Guid::try_parse("0FC63DAF-8483-4772-8E79-3D69D8477DE").is_err());
        assert!(Guid::try_parse("0FC63DAF-8483-4772-8E79_3D69D8477DE4").is_err());
        assert!(Guid::try_parse("0FC63DAF-8483-4772-8E79-3D69D8477DEG").is_err());
    }

    #[test]
    fn mbr_entries() {
        let mut s = [0u8; 512];
        s[510] = 0x55;
        s[511] = 0xAA;
        s[446 + 16 + 4] = 0x83;
        s[446 + 16 + 8..446 + 16 + 12].copy_from_slice(&2048u32.to_le_bytes());
        s[446 + 16 + 12..446 + 16 + 16].copy_from_slice(&4096u32.to_le_bytes());
        assert_eq!(parse_mbr(&s, 1, 100_000), Some(Partition { first_lba: 2048, last_lba: 6143, source: Source::Mbr, disk: Guid::ZERO, type_guid: Guid::ZERO }));
        assert_eq!(parse_mbr(&s, 0, 100_000), None);
        assert_eq!(parse_mbr(&s, 1, 5000), None, "entry past the end of the disk");
        s[510] = 0;
        assert_eq!(parse_mbr(&s, 1, 100_000), None);
    }
}
