//! The map of a file store: where a file's blocks lie in its partition,
//! written by `ksave setup --file` into the file's first pages, so that
//! ksave can find the image's blocks from the partition and one offset
//! alone (docs/FORMAT.md, "File stores").
//!
//! The map is read a page at a time: page 0 lies at the offset the config
//! or the command line names, and every later page is found through the
//! extents read before it (page 0 holds 252 entries, each later page 256,
//! and every extent is whole pages, so the extent holding page `k` is among
//! the first `k + 1` entries). The entries' CRC-32C is checked at the end;
//! until then nothing read is trusted but to find the next page of the map.

use core::fmt;

use crate::store::Extent;
use crate::{CRC32C, PAGE};

/// "KSAVEMAP".
pub const MAGIC: [u8; 8] = *b"KSAVEMAP";
/// Map layout version: 2 added the flags (version 1 reads as flags 0).
pub const VERSION: u32 = 2;
/// Flag: the file lies on an encrypted volume (dm-crypt): the page after
/// the map is its key block (docs/ENCRYPTION.md), written only through the
/// volume's encryption, and every image in it must be sealed.
pub const ENCRYPTED: u32 = 1 << 0;
/// Most extents a file store may have, after merging neighbours: ksave
/// keeps them in a fixed table (16 bytes each). An ext4 file of 256 GiB
/// has at least 2048 (128 MiB extents), far larger than any store.
pub const MAX_EXTENTS: usize = 2048;
/// Bytes before the first entry.
const HEAD: usize = 64;
/// Bytes per entry: partition offset u64, length u64.
const ENTRY: usize = 16;

/// One piece of the file, in bytes from the partition's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileExtent {
    /// Where it starts in the partition.
    pub offset: u64,
    /// Its length.
    pub bytes: u64,
}

/// Pages the map of `extents` extents takes at the file's start.
pub fn pages_for(extents: usize) -> u64 {
    (HEAD + ENTRY * extents).div_ceil(PAGE) as u64
}

/// The map's head, as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// Pages the map takes at the file's start; the image begins after.
    pub pages: u64,
    /// Entries.
    pub extents: usize,
    /// The claim id of the setup that wrote it (the image header carries
    /// the same).
    pub claim_id: [u8; 16],
    /// The file's size: the entries add up to it.
    pub bytes: u64,
    /// CRC-32C of the entries: the config names it, so that ksave uses
    /// only the map the host checked just before the jump.
    pub crc: u32,
    /// The file lies on an encrypted volume ([`ENCRYPTED`]).
    pub encrypted: bool,
}

impl Head {
    /// Pages before the image: the map's, and an encrypted store's key block.
    pub fn image_starts_at_page(&self) -> u64 {
        self.pages + self.encrypted as u64
    }

    /// Where the key block is, in bytes from the file's start (an
    /// encrypted store's).
    pub fn key_block_at(&self) -> Option<u64> {
        self.encrypted.then_some(self.pages * PAGE as u64)
    }
}

/// Why a map is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError<E> {
    /// Reading a page failed.
    Read(E),
    /// No map magic where the map should begin.
    BadMagic,
    /// Another layout version.
    Version(u32),
    /// The head's own CRC fails.
    HeadChecksum,
    /// The entries' CRC fails.
    Checksum,
    /// More extents than ksave keeps.
    TooMany(usize),
    /// An entry is empty, not whole pages, or the entries do not add up.
    BadEntry(usize),
    /// An extent lies beyond the partition.
    OutsidePartition(usize),
    /// The first extent does not begin where the map was read.
    Elsewhere,
    /// The map's own pages are not inside the file, or leave no room.
    Size,
    /// The CRC is not the expected one (the config's).
    Unexpected {
        /// The map's.
        found: u32,
        /// The expected.
        expected: u32,
    },
}

impl<E: fmt::Display> fmt::Display for MapError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read(e) => write!(f, "reading the file map: {e}"),
            Self::BadMagic => write!(f, "no ksave file map there"),
            Self::Version(v) => write!(f, "file map version {v}, this ksave reads {VERSION}"),
            Self::HeadChecksum => write!(f, "the file map's head is damaged"),
            Self::Checksum => write!(f, "the file map's entries are damaged"),
            Self::TooMany(n) => write!(f, "the file has {n} extents, ksave keeps at most {MAX_EXTENTS}"),
            Self::BadEntry(i) => write!(f, "file map entry {i} is empty, not whole pages, or the entries do not add up"),
            Self::OutsidePartition(i) => write!(f, "file map entry {i} lies beyond the partition"),
            Self::Elsewhere => write!(f, "the file map does not begin where it was looked for"),
            Self::Size => write!(f, "the file map does not fit its file"),
            Self::Unexpected { found, expected } => write!(f, "the file map (CRC {found:#010x}) is not the one the host checked ({expected:#010x}): the file moved"),
        }
    }
}

/// Writes the map of `extents` with `claim_id` into `out`, which must be
/// exactly [`pages_for`] pages; `encrypted`: the file lies on an encrypted
/// volume ([`ENCRYPTED`]). Returns the entries' CRC.
pub fn encode(extents: &[FileExtent], claim_id: [u8; 16], encrypted: bool, out: &mut [u8]) -> u32 {
    assert_eq!(out.len() as u64, pages_for(extents.len()) * PAGE as u64, "map buffer size");
    out.fill(0);
    for (i, e) in extents.iter().enumerate() {
        let at = HEAD + ENTRY * i;
        out[at..at + 8].copy_from_slice(&e.offset.to_le_bytes());
        out[at + 8..at + 16].copy_from_slice(&e.bytes.to_le_bytes());
    }
    let flags = if encrypted { ENCRYPTED } else { 0 };
    let crc = entries_crc(flags, &out[HEAD..HEAD + ENTRY * extents.len()]);
    out[..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&(extents.len() as u32).to_le_bytes());
    out[16..24].copy_from_slice(&pages_for(extents.len()).to_le_bytes());
    out[24..40].copy_from_slice(&claim_id);
    out[40..48].copy_from_slice(&extents.iter().map(|e| e.bytes).sum::<u64>().to_le_bytes());
    out[48..52].copy_from_slice(&crc.to_le_bytes());
    out[52..56].copy_from_slice(&flags.to_le_bytes());
    let head_crc = CRC32C.checksum(&out[..60]);
    out[60..64].copy_from_slice(&head_crc.to_le_bytes());
    crc
}

/// The map's CRC: of its flags and its entries, so that the CRC the host
/// pins (the config's, the setup's) pins whether the store is encrypted
/// too (version 1, without flags: of the entries alone).
fn entries_crc(flags: u32, entries: &[u8]) -> u32 {
    let mut digest = CRC32C.digest();
    if flags != 0 {
        digest.update(&flags.to_le_bytes());
    }
    digest.update(entries);
    digest.finalize()
}

/// Whether `first` (a partition's first bytes) begins with a LUKS header
/// (LUKS1 and LUKS2: "LUKS\xba\xbe", cryptsetup's luks1/luks2 on-disk
/// formats): its file systems are encrypted, and so must a store in it be,
/// whatever a (plaintext, rewritable) map says.
pub fn is_luks(first: &[u8]) -> bool {
    first.starts_with(b"LUKS\xba\xbe")
}

/// The partition a map is read from, in the disk's logical blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Its first block.
    pub first_lba: u64,
    /// Its length in blocks.
    pub blocks: u64,
    /// The disk's logical block size (512 or 4096).
    pub block_size: u32,
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

/// Reads the map whose first page lies `first` bytes into `part`, with
/// `read_page(lba, page)` (one page at disk block `lba`, into `page`: the
/// caller's buffer, which its disk can reach), into `out` as the disk's
/// extents (LBAs); returns its head. Each entry is checked to be whole
/// pages inside the partition as it is read, the whole against its CRC at
/// the end.
pub fn read<E>(
    part: Partition,
    first: u64,
    mut read_page: impl FnMut(u64, &mut [u8; PAGE]) -> Result<(), E>,
    page: &mut [u8; PAGE],
    out: &mut [Extent],
) -> Result<Head, MapError<E>> {
    let bs = part.block_size as u64;
    let part_bytes = part.blocks.saturating_mul(bs);
    if !first.is_multiple_of(PAGE as u64) || first >= part_bytes {
        return Err(MapError::Elsewhere);
    }
    read_page(part.first_lba + first / bs, page).map_err(MapError::Read)?;
    if page[..8] != MAGIC {
        return Err(MapError::BadMagic);
    }
    if CRC32C.checksum(&page[..60]) != le32(&page[60..]) {
        return Err(MapError::HeadChecksum);
    }
    let version = le32(&page[8..]);
    if version != VERSION && version != 1 {
        return Err(MapError::Version(version));
    }
    let flags = le32(&page[52..]);
    if flags & !ENCRYPTED != 0 {
        return Err(MapError::Version(version));
    }
    let count = le32(&page[12..]) as usize;
    let head = Head {
        pages: le64(&page[16..]),
        extents: count,
        claim_id: page[24..40].try_into().expect("16 bytes"),
        bytes: le64(&page[40..]),
        crc: le32(&page[48..]),
        encrypted: flags & ENCRYPTED != 0,
    };
    if count > out.len().min(MAX_EXTENTS) {
        return Err(MapError::TooMany(count));
    }
    if count == 0 || head.pages != pages_for(count) {
        return Err(MapError::Size);
    }
    let mut digest = CRC32C.digest();
    if flags != 0 {
        digest.update(&flags.to_le_bytes());
    }
    let (mut at, mut page_index, mut total) = (HEAD, 0u64, 0u64);
    for i in 0..count {
        if at == PAGE {
            page_index += 1;
            let lba = lba_of(&out[..i], page_index * PAGE as u64, bs).ok_or(MapError::Size)?;
            read_page(lba, page).map_err(MapError::Read)?;
            at = 0;
        }
        let entry = &page[at..at + ENTRY];
        digest.update(entry);
        let (offset, bytes) = (le64(entry), le64(&entry[8..]));
        if bytes == 0 || !offset.is_multiple_of(PAGE as u64) || !bytes.is_multiple_of(PAGE as u64) {
            return Err(MapError::BadEntry(i));
        }
        if offset.checked_add(bytes).is_none_or(|end| end > part_bytes) {
            return Err(MapError::OutsidePartition(i));
        }
        if i == 0 && offset != first {
            return Err(MapError::Elsewhere);
        }
        total = total.checked_add(bytes).ok_or(MapError::BadEntry(i))?;
        out[i] = Extent { lba: part.first_lba + offset / bs, blocks: bytes / bs };
        at += ENTRY;
    }
    if digest.finalize() != head.crc {
        return Err(MapError::Checksum);
    }
    if total != head.bytes {
        return Err(MapError::BadEntry(count - 1));
    }
    if head.image_starts_at_page() * PAGE as u64 >= total {
        return Err(MapError::Size);
    }
    Ok(head)
}

/// The disk block holding byte `offset` of the file, from its first
/// extents `known`; none if they do not reach it.
fn lba_of(known: &[Extent], mut offset: u64, bs: u64) -> Option<u64> {
    for e in known {
        let len = e.blocks * bs;
        if offset < len {
            return Some(e.lba + offset / bs);
        }
        offset -= len;
    }
    None
}

/// Turns the file's extents (as [`read`] left them) into the image's: the
/// map's `pages` pages at the file's start dropped. Returns the image's
/// extents, a tail of `extents`.
pub fn image_extents(extents: &mut [Extent], pages: u64, block_size: u32) -> &mut [Extent] {
    let mut skip = pages * PAGE as u64 / block_size as u64;
    let mut first = 0;
    while first < extents.len() && skip >= extents[first].blocks {
        skip -= extents[first].blocks;
        first += 1;
    }
    let rest = &mut extents[first..];
    if let Some(e) = rest.first_mut() {
        e.lba += skip;
        e.blocks -= skip;
    }
    rest
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;
    use std::vec::Vec;

    /// A partition of `blocks` blocks at LBA 2048, with the file's pages
    /// written where `extents` say.
    fn disk(extents: &[FileExtent], claim: [u8; 16], bs: u32) -> (Partition, Vec<u8>, u32) {
        let part = Partition { first_lba: 2048, blocks: (64 << 20) / bs as u64, block_size: bs };
        let mut bytes = vec![0u8; ((part.first_lba + part.blocks) * bs as u64) as usize];
        let mut map = vec![0u8; pages_for(extents.len()) as usize * PAGE];
        let crc = encode(extents, claim, false, &mut map);
        // Lay the map's pages into the file's extents, in file order.
        let mut left = &map[..];
        for e in extents {
            let n = (e.bytes as usize).min(left.len());
            let at = (part.first_lba * bs as u64 + e.offset) as usize;
            bytes[at..at + n].copy_from_slice(&left[..n]);
            left = &left[n..];
        }
        (part, bytes, crc)
    }

    fn reader(bytes: &[u8], bs: u32) -> impl FnMut(u64, &mut [u8; PAGE]) -> Result<(), &'static str> + '_ {
        move |lba, page| {
            let at = (lba * bs as u64) as usize;
            page.copy_from_slice(bytes.get(at..at + PAGE).ok_or("past the disk")?);
            Ok(())
        }
    }

    #[test]
    fn a_fragmented_map_is_read_through_its_own_extents() {
        // 600 one-page extents in reverse disk order: the map's 3 pages
        // each lie in another extent, found through the entries before.
        for bs in [512u32, 4096] {
            let extents: Vec<FileExtent> = (0..600u64).map(|i| FileExtent { offset: (4000 - 2 * i) * PAGE as u64, bytes: PAGE as u64 }).collect();
            let (part, bytes, crc) = disk(&extents, [5; 16], bs);
            let mut out = vec![Extent::default(); MAX_EXTENTS];
            let head = read(part, extents[0].offset, reader(&bytes, bs), &mut [0; PAGE], &mut out).unwrap();
            assert_eq!(head, Head { pages: 3, extents: 600, claim_id: [5; 16], bytes: 600 * PAGE as u64, crc, encrypted: false });
            let per = PAGE as u64 / bs as u64;
            assert_eq!(out[599], Extent { lba: 2048 + (4000 - 1198) * per, blocks: per });
            // The image begins after the map's 3 pages: at extent 3.
            let image = image_extents(&mut out[..600], head.pages, bs);
            assert_eq!(image.len(), 597);
            assert_eq!(image[0], Extent { lba: 2048 + (4000 - 6) * per, blocks: per });
        }
    }

    #[test]
    fn the_image_starts_inside_an_extent_after_the_map() {
        let extents = [FileExtent { offset: 1 << 20, bytes: 16 * PAGE as u64 }, FileExtent { offset: 8 << 20, bytes: 4 << 20 }];
        let (part, bytes, _) = disk(&extents, [1; 16], 512);
        let mut out = [Extent::default(); 4];
        let head = read(part, 1 << 20, reader(&bytes, 512), &mut [0; PAGE], &mut out).unwrap();
        assert_eq!(head.pages, 1);
        let image = image_extents(&mut out[..2], head.pages, 512);
        assert_eq!(image, [Extent { lba: 2048 + 2048 + 8, blocks: 15 * 8 }, Extent { lba: 2048 + 16384, blocks: 8192 }]);
    }

    #[test]
    fn the_encrypted_flag_is_pinned_by_the_maps_crc() {
        let extents = [FileExtent { offset: 4 << 20, bytes: 8 << 20 }];
        let mut map = vec![0u8; PAGE];
        let sealed = encode(&extents, [1; 16], true, &mut map);
        let plain = encode(&extents, [1; 16], false, &mut vec![0u8; PAGE]);
        assert_ne!(sealed, plain, "the CRC the config pins tells an encrypted store from a plain one");
        // The flag cleared, the head's CRC made good: the map reads as
        // another one (the entries' CRC no longer matches).
        map[52] = 0;
        let head_crc = CRC32C.checksum(&map[..60]);
        map[60..64].copy_from_slice(&head_crc.to_le_bytes());
        let mut disk = vec![0u8; 16 << 20];
        disk[4 << 20..(4 << 20) + PAGE].copy_from_slice(&map);
        let part = Partition { first_lba: 0, blocks: (16 << 20) / 512, block_size: 512 };
        let mut out = [Extent { lba: 0, blocks: 0 }; 4];
        assert_eq!(read(part, 4 << 20, reader(&disk, 512), &mut [0; PAGE], &mut out).err(), Some(MapError::Checksum));
        assert!(is_luks(b"LUKS\xba\xbe\x00\x02") && !is_luks(b"KSAVEMAP"));
    }

    #[test]
    fn damaged_or_foreign_maps_are_refused() {
        let extents = [FileExtent { offset: 1 << 20, bytes: 1 << 20 }];
        let (part, bytes, _) = disk(&extents, [1; 16], 512);
        let mut out = [Extent::default(); 4];
        let at = (2048 * 512 + (1 << 20)) as usize;
        assert_eq!(read(part, 2 << 20, reader(&bytes, 512), &mut [0; PAGE], &mut out), Err(MapError::BadMagic));
        assert_eq!(read(part, (1 << 20) + 512, reader(&bytes, 512), &mut [0; PAGE], &mut out), Err(MapError::Elsewhere));
        let mut bad = bytes.clone();
        bad[at + 12] = 9; // the count
        assert_eq!(read(part, 1 << 20, reader(&bad, 512), &mut [0; PAGE], &mut out), Err(MapError::HeadChecksum));
        let mut bad = bytes.clone();
        bad[at + HEAD + 10] ^= 1; // the entry's length, by 64 KiB
        assert_eq!(read(part, 1 << 20, reader(&bad, 512), &mut [0; PAGE], &mut out), Err(MapError::Checksum));
        // A map naming blocks past its partition.
        let far = [FileExtent { offset: 1 << 20, bytes: 1 << 20 }, FileExtent { offset: 63 << 20, bytes: 2 << 20 }];
        let (part, bytes, _) = disk(&far, [1; 16], 512);
        assert_eq!(read(part, 1 << 20, reader(&bytes, 512), &mut [0; PAGE], &mut out), Err(MapError::OutsidePartition(1)));
        // More extents than the table holds.
        let many: Vec<FileExtent> = (0..5u64).map(|i| FileExtent { offset: (10 + 2 * i) * PAGE as u64, bytes: PAGE as u64 }).collect();
        let (part, bytes, _) = disk(&many, [1; 16], 512);
        assert_eq!(read(part, 10 * PAGE as u64, reader(&bytes, 512), &mut [0; PAGE], &mut out), Err(MapError::TooMany(5)));
        // A file that is only its map: no room for an image.
        let tiny = [FileExtent { offset: 1 << 20, bytes: PAGE as u64 }];
        let (part, bytes, _) = disk(&tiny, [1; 16], 512);
        assert_eq!(read(part, 1 << 20, reader(&bytes, 512), &mut [0; PAGE], &mut out), Err(MapError::Size));
    }
}
