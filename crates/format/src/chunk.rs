//! The chunk layout (docs/FORMAT.md), shared by the [`writer`](crate::writer)
//! and the [`reader`](crate::reader).
//!
//! A chunk is a header of one block (raw chunks, up to [`MAX_RAW_PAGES`]
//! pages; free-run chunks, up to [`MAX_FREE_RUNS`] runs and no payload) or
//! one sector (LZ4 chunks, up to [`LZ4_GROUP`] pages), then the payload,
//! padded to the image's alignment. The header is a fixed [`ChunkHead`], the
//! page frame numbers, and a CRC-32C of everything before it in its last
//! four bytes.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{CRC32C, MAX_ALIGN, PAGE, SECTOR};

/// "KSCHUNK1".
pub const CHUNK_MAGIC: [u8; 8] = *b"KSCHUNK1";
/// Pages in a full raw chunk (its pfn list fills one block).
pub const MAX_RAW_PAGES: usize = 500;
/// Pages compressed together in one LZ4 chunk.
pub const LZ4_GROUP: usize = 8;
/// Header bytes of an LZ4 chunk.
pub const LZ4_HEADER: usize = SECTOR as usize;
/// Buffer for one LZ4 chunk: header plus worst-case compressed payload.
pub const LZ4_OUT: usize = (LZ4_HEADER + lz4_flex::block::get_maximum_output_size(LZ4_GROUP * PAGE)).next_multiple_of(MAX_ALIGN as usize);
/// How a chunk's payload holds its pages: the byte after the page count
/// in its header (docs/FORMAT.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    /// The pages themselves, one after the other.
    Raw = 0,
    /// The pages compressed together in one LZ4 block ([`LZ4_GROUP`] at most).
    Lz4 = 1,
    /// No payload: the header lists runs of pages the saved kernel held
    /// free, as (first pfn, pages) pairs of words; they read back as zeros.
    Free = 2,
}

impl Encoding {
    /// The encoding a header's byte names, if any.
    pub fn from_u8(byte: u8) -> Option<Self> {
        [Self::Raw, Self::Lz4, Self::Free].into_iter().find(|e| *e as u8 == byte)
    }

    /// The header bytes of a chunk of this encoding.
    pub fn header_len(self) -> usize {
        match self {
            Self::Lz4 => LZ4_HEADER,
            Self::Raw | Self::Free => PAGE,
        }
    }

    /// Most words (pfns, or run pairs) a chunk of this encoding lists.
    pub fn max_words(self) -> usize {
        match self {
            Self::Lz4 => LZ4_GROUP,
            Self::Raw | Self::Free => MAX_RAW_PAGES,
        }
    }

    /// Bytes a chunk takes on disk, header included, padded to the image's
    /// alignment `align` (the disk's block size).
    pub fn bytes_on_disk(self, payload_len: usize, align: u32) -> u64 {
        (self.header_len() + payload_len).next_multiple_of(align as usize) as u64
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Lz4 => "lz4",
            Self::Free => "free",
        }
    }
}

/// Pages in a full raw chunk of a sealed image: they are encrypted in a
/// buffer of this many pages and a header ([`SealedChunk`]), 1.5% of
/// header per chunk.
pub const SEALED_RAW_PAGES: usize = 64;
/// A sealed raw chunk as it goes out or comes in: header block, then the
/// pages.
pub type SealedChunk = [u8; PAGE * (1 + SEALED_RAW_PAGES)];

/// Runs in a full free-run chunk (its words fill one block, as a raw
/// chunk's pfns do).
pub const MAX_FREE_RUNS: usize = MAX_RAW_PAGES / 2;

/// The fixed start of every chunk header; the pfns follow it.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ChunkHead {
    magic: [u8; 8],
    index: U64,
    nonce: U64,
    count: U16,
    encoding: u8,
    header_sectors: u8,
    payload_len: U32,
    payload_hash: U64,
}

const PFNS_AT: usize = size_of::<ChunkHead>();
// The pfns end before the tag (sealed images), which is right before the CRC.
const _: () = assert!(
    PFNS_AT == 40 && PFNS_AT + 8 * MAX_RAW_PAGES <= crate::seal::chunk_tag_at(PAGE) && PFNS_AT + 8 * LZ4_GROUP <= crate::seal::chunk_tag_at(LZ4_HEADER)
);

/// Puts a sealed chunk's `tag` into its encoded header `h` and returns the
/// header's new CRC.
pub fn set_tag(h: &mut [u8], tag: &[u8; crate::seal::TAG_LEN]) -> [u8; 4] {
    let len = h.len();
    let at = crate::seal::chunk_tag_at(len);
    h[at..at + tag.len()].copy_from_slice(tag);
    let crc = CRC32C.checksum(&h[..len - 4]).to_le_bytes();
    h[len - 4..].copy_from_slice(&crc);
    crc
}

/// An encoded chunk header's CRC (its last four bytes).
pub fn header_crc(h: &[u8]) -> [u8; 4] {
    h[h.len() - 4..].try_into().unwrap()
}

/// A sealed chunk header's tag.
pub fn tag(h: &[u8]) -> [u8; crate::seal::TAG_LEN] {
    let at = crate::seal::chunk_tag_at(h.len());
    h[at..at + crate::seal::TAG_LEN].try_into().unwrap()
}

/// A chunk header's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Position in the image, from 0.
    pub index: u64,
    /// The save attempt's nonce.
    pub nonce: u64,
    /// How the payload holds the pages.
    pub encoding: Encoding,
    /// Payload bytes before padding.
    pub payload_len: u32,
    /// [`payload_hash`](crate::payload_hash) of the payload.
    pub payload_hash: u64,
}

/// Encodes a header for `pfns` into `h` (its whole length, one sector or
/// one block); returns its CRC, which ties the chunk into the image's set.
pub fn encode(h: &mut [u8], fields: &ChunkHeader, pfns: &[u64]) -> [u8; 4] {
    h.fill(0);
    let len = h.len();
    let (head, rest) = ChunkHead::mut_from_prefix(h).expect("a chunk header holds its fixed part");
    *head = ChunkHead {
        magic: CHUNK_MAGIC,
        index: fields.index.into(),
        nonce: fields.nonce.into(),
        count: (pfns.len() as u16).into(),
        encoding: fields.encoding as u8,
        header_sectors: (len / SECTOR as usize) as u8,
        payload_len: fields.payload_len.into(),
        payload_hash: fields.payload_hash.into(),
    };
    let slots = <[U64]>::mut_from_bytes(&mut rest[..8 * pfns.len()]).expect("pfns fit the header");
    for (slot, pfn) in slots.iter_mut().zip(pfns) {
        *slot = (*pfn).into();
    }
    let crc = CRC32C.checksum(&h[..len - 4]).to_le_bytes();
    h[len - 4..].copy_from_slice(&crc);
    crc
}

/// The header length a chunk's first sector announces, if it is a chunk.
pub fn announced_len(first_sector: &[u8]) -> Result<usize, &'static str> {
    let (head, _) = ChunkHead::ref_from_prefix(first_sector).map_err(|_| "short chunk header")?;
    if head.magic != CHUNK_MAGIC {
        return Err("no chunk magic");
    }
    match head.header_sectors as usize * SECTOR as usize {
        n @ (LZ4_HEADER | PAGE) => Ok(n),
        _ => Err("header length"),
    }
}

/// A checked chunk header and its pfns.
pub struct Decoded<'h> {
    /// The fields.
    pub fields: ChunkHeader,
    pfns: &'h [U64],
}

impl Decoded<'_> {
    /// The page frame numbers, in payload order (a free-run chunk: its
    /// words).
    pub fn pfns(&self) -> impl Iterator<Item = u64> + '_ {
        self.pfns.iter().map(|p| p.get())
    }

    /// How many pages (a free-run chunk: words).
    pub fn count(&self) -> usize {
        self.pfns.len()
    }

    /// A free-run chunk's runs: (first pfn, pages).
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.pfns.chunks_exact(2).map(|w| (w[0].get(), w[1].get()))
    }
}

/// Decodes a whole header (as long as [`announced_len`] said): its CRC,
/// encoding, page count and length must agree.
pub fn decode(h: &[u8]) -> Result<Decoded<'_>, &'static str> {
    let len = h.len();
    if len < PFNS_AT + 4 || CRC32C.checksum(&h[..len - 4]).to_le_bytes() != h[len - 4..] {
        return Err("header checksum");
    }
    let (head, rest) = ChunkHead::ref_from_prefix(h).map_err(|_| "short chunk header")?;
    let encoding = Encoding::from_u8(head.encoding).ok_or("unknown encoding")?;
    let count = head.count.get() as usize;
    if count == 0 || count > encoding.max_words() || len != encoding.header_len() || (encoding == Encoding::Free && !count.is_multiple_of(2)) {
        return Err("page count");
    }
    let pfns = <[U64]>::ref_from_bytes(&rest[..8 * count]).map_err(|_| "page count")?;
    let fields =
        ChunkHeader { index: head.index.get(), nonce: head.nonce.get(), encoding, payload_len: head.payload_len.get(), payload_hash: head.payload_hash.get() };
    Ok(Decoded { fields, pfns })
}

/// What a chunk held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Its index.
    pub index: u64,
    /// Its offset.
    pub offset: u64,
    /// Pages in it.
    pub pages: u16,
    /// How its payload holds its pages.
    pub encoding: Encoding,
    /// Bytes on disk, header included.
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_keeps_the_documented_offsets() {
        let mut h = [0u8; PAGE];
        let fields = ChunkHeader { index: 7, nonce: 0xabcd, encoding: Encoding::Raw, payload_len: 2 * PAGE as u32, payload_hash: 99 };
        let crc = encode(&mut h, &fields, &[0x10, 0x11]);
        // docs/FORMAT.md: count at 24, encoding 26, header sectors 27, pfns from 40.
        assert_eq!((&h[24..28], &h[40..48]), (&[2, 0, 0, 8][..], &0x10u64.to_le_bytes()[..]));
        assert_eq!(crc, h[PAGE - 4..]);
        assert_eq!(announced_len(&h[..512]), Ok(PAGE));
        let d = decode(&h).unwrap();
        assert_eq!(d.fields, fields);
        assert_eq!(d.pfns().collect::<std::vec::Vec<_>>(), [0x10, 0x11]);
        h[100] ^= 1;
        assert_eq!(decode(&h).err(), Some("header checksum"));
    }
}
