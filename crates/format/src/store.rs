//! The image store: where an image's bytes live on its disk, as an ordered
//! list of extents. A partition is one extent; a file on a file system is
//! as many as it has pieces. Image offsets become disk LBAs here and
//! nowhere else: ksave's disk store and the host tool's image file both
//! read, write and invalidate through a [`StoreMap`].

use core::fmt;

use crate::PAGE;

/// The claim `ksave setup` writes into a store's header: these blocks are
/// ksave's, set up on this disk. ksave writes a store only when its header
/// carries the claim its config names ([`Claimed::check`]); every header
/// written after keeps it (docs/FORMAT.md, "The store's claim").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Claim {
    /// Drawn at random by `ksave setup`; all zero: unclaimed.
    pub id: [u8; 16],
    /// The GPT disk GUID (on-disk byte order) of the disk the store is on.
    pub disk: [u8; 16],
}

impl Claim {
    /// Whether this is a claim at all (headers from before claims read as
    /// zero).
    pub fn is_claimed(&self) -> bool {
        self.id != [0; 16]
    }
}

/// Why a store is not ksave's to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimError {
    /// Its first block is no ksave header: something else lies there (a
    /// file system made since setup, another tool's data).
    NoHeader(crate::header::HeaderError),
    /// A ksave header without a claim (written before claims existed).
    Unclaimed,
    /// Another setup's claim (a store set up again, or another machine's).
    Other,
    /// The claim names another disk than the one the store was found on
    /// (a disk cloned, or a partition GUID on two disks).
    Disk,
}

impl fmt::Display for ClaimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoHeader(e) => write!(f, "the store does not carry ksave's claim ({e}): written over since setup, or a save cut off mid-header (then run `ksave setup` again)"),
            Self::Unclaimed => write!(f, "the store carries no claim (set up by an older ksave): run `ksave setup` again"),
            Self::Other => write!(f, "the store carries another setup's claim: run `ksave setup` again"),
            Self::Disk => write!(f, "the store's claim names another disk than the one it was found on"),
        }
    }
}

/// Proof that a store carries the expected claim: the only way to write a
/// header there ([`crate::commit::save`], [`crate::commit::record_failure`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claimed(Claim);

impl Claimed {
    /// Checks the store's header block `block`, read from a store found on
    /// the disk whose GPT disk GUID is `disk`, against the claim `expected`
    /// (the config's).
    pub fn check(block: &[u8; PAGE], disk: [u8; 16], expected: &Claim) -> Result<Self, ClaimError> {
        let found = crate::header::Header::decode(block).map_err(ClaimError::NoHeader)?.claim;
        if !found.is_claimed() || !expected.is_claimed() {
            return Err(ClaimError::Unclaimed);
        }
        if found.id != expected.id {
            return Err(ClaimError::Other);
        }
        if found.disk != expected.disk || disk != expected.disk {
            return Err(ClaimError::Disk);
        }
        Ok(Self(found))
    }

    /// The claim itself.
    pub fn claim(&self) -> Claim {
        self.0
    }
}

/// A run of consecutive blocks of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Extent {
    /// The first block (the disk's logical blocks).
    pub lba: u64,
    /// How many blocks.
    pub blocks: u64,
}

/// One contiguous stretch of a transfer: `bytes` at disk block `lba`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// The disk block it starts at.
    pub lba: u64,
    /// Its length, whole blocks.
    pub bytes: u64,
}

/// Why a store map or an access to it is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// The block size is not 512 or 4096.
    BlockSize(u32),
    /// No extents, or an empty one.
    Empty,
    /// An extent runs past the end of the disk's block numbers.
    Overflow,
    /// An extent other than the last is not whole pages: an image's chunks
    /// would straddle it mid-page (the drivers' DMA pieces are pages).
    Unaligned {
        /// Which extent.
        index: usize,
    },
    /// Bytes not on block boundaries.
    Misaligned {
        /// The offset asked.
        offset: u64,
        /// The length asked.
        len: u64,
    },
    /// Bytes past the store's end.
    OutOfStore {
        /// The offset asked.
        offset: u64,
        /// The length asked.
        len: u64,
        /// The store's size.
        size: u64,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BlockSize(b) => write!(f, "block size {b} (512 or 4096 only)"),
            Self::Empty => write!(f, "the store has no blocks"),
            Self::Overflow => write!(f, "an extent runs past the disk's last block number"),
            Self::Unaligned { index } => write!(f, "extent {index} is not whole pages"),
            Self::Misaligned { offset, len } => write!(f, "{len} bytes at {offset} are not whole blocks"),
            Self::OutOfStore { offset, len, size } => write!(f, "{len} bytes at {offset} are past the store's {size} bytes"),
        }
    }
}

impl core::error::Error for StoreError {}

/// Where an image lives: `extents`, in image order, on a disk of
/// `block_size`-byte blocks.
#[derive(Clone, Copy, Debug)]
pub struct StoreMap<'a> {
    block_size: u32,
    extents: &'a [Extent],
    bytes: u64,
}

impl<'a> StoreMap<'a> {
    /// Checks the extents: the block size is the disk's (512 or 4096), none
    /// is empty or wraps, and every one but the last is whole pages.
    pub fn new(block_size: u32, extents: &'a [Extent]) -> Result<Self, StoreError> {
        if block_size != 512 && block_size != 4096 {
            return Err(StoreError::BlockSize(block_size));
        }
        let mut bytes = 0u64;
        for (index, e) in extents.iter().enumerate() {
            if e.blocks == 0 {
                return Err(StoreError::Empty);
            }
            let len = e.blocks.checked_mul(block_size as u64).ok_or(StoreError::Overflow)?;
            e.lba.checked_add(e.blocks).ok_or(StoreError::Overflow)?;
            if index + 1 < extents.len() && !len.is_multiple_of(PAGE as u64) {
                return Err(StoreError::Unaligned { index });
            }
            bytes = bytes.checked_add(len).ok_or(StoreError::Overflow)?;
        }
        if bytes == 0 {
            return Err(StoreError::Empty);
        }
        Ok(Self { block_size, extents, bytes })
    }

    /// The disk's block size.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The store's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The extents, in image order.
    pub fn extents(&self) -> &'a [Extent] {
        self.extents
    }

    /// The disk pieces that hold image bytes `[offset, offset + len)`, in
    /// order: one per extent crossed.
    pub fn pieces(&self, offset: u64, len: u64) -> Result<impl Iterator<Item = Piece> + 'a, StoreError> {
        let block = self.block_size as u64;
        if !offset.is_multiple_of(block) || !len.is_multiple_of(block) {
            return Err(StoreError::Misaligned { offset, len });
        }
        if offset.checked_add(len).is_none_or(|end| end > self.bytes) {
            return Err(StoreError::OutOfStore { offset, len, size: self.bytes });
        }
        let (mut skip, mut left) = (offset, len);
        Ok(self.extents.iter().filter_map(move |e| {
            let size = e.blocks * block;
            if left == 0 {
                return None;
            }
            if skip >= size {
                skip -= size;
                return None;
            }
            let bytes = (size - skip).min(left);
            let piece = Piece { lba: e.lba + skip / block, bytes };
            (skip, left) = (0, left - bytes);
            Some(piece)
        }))
    }

    /// Moves `len` bytes at image `offset` between the disk and the memory
    /// pieces `mem` ((address, length) in transfer order, adding up to
    /// `len`): calls `transfer(lba, pieces)` once per disk piece, with the
    /// memory pieces that belong to it (a memory piece that straddles two
    /// extents is split between them).
    pub fn split<E: From<StoreError>>(
        &self,
        offset: u64,
        len: u64,
        mem: impl Iterator<Item = (u64, u64)>,
        mut transfer: impl FnMut(u64, &mut dyn Iterator<Item = (u64, u64)>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut mem = mem.peekable();
        let mut carry: Option<(u64, u64)> = None;
        for piece in self.pieces(offset, len)? {
            let mut left = piece.bytes;
            let mut within = core::iter::from_fn(|| {
                if left == 0 {
                    return None;
                }
                let (addr, n) = carry.take().or_else(|| mem.next())?;
                let take = n.min(left);
                left -= take;
                if take < n {
                    carry = Some((addr + take, n - take));
                }
                Some((addr, take))
            });
            transfer(piece.lba, &mut within)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_expected_claim_on_the_expected_disk_is_ksaves() {
        use crate::header::{Header, HeaderError};
        let claim = Claim { id: [7; 16], disk: [9; 16] };
        let mut block = [0u8; PAGE];
        Header::claiming(claim, "claimed").encode(&mut block);
        assert_eq!(Claimed::check(&block, claim.disk, &claim).map(|c| c.claim()), Ok(claim));
        // Invalidating an image keeps the claim.
        crate::verdict::invalidate(&mut block, Some("resumed")).unwrap();
        assert!(Claimed::check(&block, claim.disk, &claim).is_ok());
        assert_eq!(Claimed::check(&block, [1; 16], &claim), Err(ClaimError::Disk));
        assert_eq!(Claimed::check(&block, claim.disk, &Claim { id: [8; 16], ..claim }), Err(ClaimError::Other));
        assert_eq!(Claimed::check(&block, claim.disk, &Claim::default()), Err(ClaimError::Unclaimed));
        // A file system made on the store since: its superblock (ext4's at
        // byte 1024) breaks the header's CRC.
        let mut reformatted = block;
        reformatted[1024 + 0x38..1024 + 0x3a].copy_from_slice(&0xef53u16.to_le_bytes());
        assert_eq!(Claimed::check(&reformatted, claim.disk, &claim), Err(ClaimError::NoHeader(HeaderError::Checksum)));
        assert!(matches!(Claimed::check(&[0; PAGE], claim.disk, &claim), Err(ClaimError::NoHeader(HeaderError::BadMagic))));
        // A header from before claims.
        let mut old = [0u8; PAGE];
        Header::new(crate::header::State::Invalidated, 0).encode(&mut old);
        assert_eq!(Claimed::check(&old, claim.disk, &claim), Err(ClaimError::Unclaimed));
    }
    use std::vec;
    use std::vec::Vec;

    #[test]
    fn one_extent_is_an_offset() {
        let extents = [Extent { lba: 2048, blocks: 1000 }];
        let map = StoreMap::new(512, &extents).unwrap();
        assert_eq!(map.bytes(), 512_000);
        assert_eq!(map.pieces(4096, 1024).unwrap().collect::<Vec<_>>(), [Piece { lba: 2056, bytes: 1024 }]);
        assert_eq!(map.pieces(512_000 - 512, 1024).err(), Some(StoreError::OutOfStore { offset: 511_488, len: 1024, size: 512_000 }));
        assert_eq!(map.pieces(100, 512).err(), Some(StoreError::Misaligned { offset: 100, len: 512 }));
    }

    #[test]
    fn a_transfer_crosses_extents_in_image_order() {
        let extents = [Extent { lba: 100, blocks: 8 }, Extent { lba: 50, blocks: 16 }, Extent { lba: 900, blocks: 8 }];
        let map = StoreMap::new(512, &extents).unwrap();
        let pieces: Vec<_> = map.pieces(3072, 4096 + 8192 + 512).unwrap().collect();
        assert_eq!(pieces, [Piece { lba: 106, bytes: 1024 }, Piece { lba: 50, bytes: 8192 }, Piece { lba: 900, bytes: 3584 }]);
    }

    #[test]
    fn memory_pieces_are_split_at_extent_boundaries() {
        let extents = [Extent { lba: 10, blocks: 3 }, Extent { lba: 40, blocks: 8 }];
        // Extent 0 is 1536 bytes: not whole pages, refused unless last.
        assert_eq!(StoreMap::new(512, &extents).err(), Some(StoreError::Unaligned { index: 0 }));
        let extents = [Extent { lba: 10, blocks: 8 }, Extent { lba: 40, blocks: 16 }];
        let map = StoreMap::new(512, &extents).unwrap();
        let mut calls = Vec::new();
        // A header of 512 bytes at offset 1024, then two pages.
        let mem = [(0x9000, 512), (0x10000, 4096), (0x20000, 4096)];
        let r = map.split(1024, 512 + 8192, mem.into_iter(), |lba, pieces| {
            calls.push((lba, pieces.collect::<Vec<_>>()));
            Ok::<(), StoreError>(())
        });
        assert_eq!(r, Ok(()));
        assert_eq!(calls, [(12, vec![(0x9000, 512), (0x10000, 2560)]), (40, vec![(0x10000 + 2560, 1536), (0x20000, 4096)])]);
    }

    #[test]
    fn bad_maps_are_refused() {
        assert_eq!(StoreMap::new(1024, &[Extent { lba: 0, blocks: 1 }]).err(), Some(StoreError::BlockSize(1024)));
        assert_eq!(StoreMap::new(512, &[]).err(), Some(StoreError::Empty));
        assert_eq!(StoreMap::new(512, &[Extent { lba: 0, blocks: 0 }]).err(), Some(StoreError::Empty));
        assert_eq!(StoreMap::new(4096, &[Extent { lba: u64::MAX, blocks: 2 }]).err(), Some(StoreError::Overflow));
    }
}
