//! The image store on its disk: every read, write, flush and invalidation
//! (`ksave_core::resume::invalidate`) of an image goes through a
//! [`DiskStore`], which turns image offsets into the disk's LBAs by the
//! store's extents ([`StoreMap`]) and nowhere else.

use core::fmt;

use diskdrv::{BlockDevice, Direction, DiskError};
use ksave_core::resume::DmaSource;
use ksave_format::PAGE;
use ksave_format::commit::Device;
use ksave_format::reader::Source;
use ksave_format::store::{StoreError, StoreMap};
use ksave_format::writer::Sink;

use crate::disks::{self, AnyDisk};
use crate::hw::KsaveHal;
use diskdrv::Hal as _;

/// Why a store access failed.
#[derive(Debug)]
pub enum StoreIoError {
    /// The disk said so.
    Disk(DiskError),
    /// The bytes are not in the store (or not whole blocks).
    Store(StoreError),
}

impl From<DiskError> for StoreIoError {
    fn from(e: DiskError) -> Self {
        Self::Disk(e)
    }
}

impl From<StoreError> for StoreIoError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl fmt::Display for StoreIoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Disk(e) => write!(f, "{e}"),
            Self::Store(e) => write!(f, "{e}"),
        }
    }
}

/// An image store open on its disk.
pub struct DiskStore<'d, 'm> {
    disk: &'d mut AnyDisk<'m>,
    map: StoreMap<'d>,
}

impl<'d, 'm> DiskStore<'d, 'm> {
    /// The store `map` on `disk`, whose block size it must have.
    pub fn new(disk: &'d mut AnyDisk<'m>, map: StoreMap<'d>) -> Self {
        debug_assert_eq!(map.block_size(), disk.info().block_size);
        Self { disk, map }
    }

    /// Its size in bytes.
    pub fn bytes(&self) -> u64 {
        self.map.bytes()
    }

    /// Moves `len` bytes at image `offset` between the disk and the memory
    /// `pieces` ((physical address, length), adding up to `len`) by DMA.
    ///
    /// # Safety
    /// Every piece must be memory the device may access in `dir` for the
    /// whole call: read it (a write to the disk) or write it (a read).
    pub unsafe fn transfer(&mut self, dir: Direction, offset: u64, len: u64, pieces: impl Iterator<Item = (u64, u64)>) -> Result<(), StoreIoError> {
        let disk = &mut *self.disk;
        self.map.split(offset, len, pieces, |lba, within| {
            // SAFETY: each piece is one of the caller's (or a part of one),
            // lent under this function's contract.
            unsafe { disks::transfer_pieces(disk, dir, lba, within) }.map_err(StoreIoError::Disk)
        })
    }
}

impl Source for DiskStore<'_, '_> {
    type Error = StoreIoError;

    /// Reads are whole blocks: the image aligns everything to them.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), StoreIoError> {
        let mut at = 0;
        for piece in self.map.pieces(offset, buf.len() as u64)? {
            let part = &mut buf[at..at + piece.bytes as usize];
            self.disk.read(&KsaveHal, piece.lba, part)?;
            at += piece.bytes as usize;
        }
        Ok(())
    }
}

impl DmaSource for DiskStore<'_, '_> {
    unsafe fn read_into_pages(&mut self, offset: u64, pfns: &[u64]) -> Result<(), StoreIoError> {
        let pages = pfns.iter().map(|pfn| (pfn * PAGE as u64, PAGE as u64));
        // SAFETY: the device writes these pages (a disk read), which the
        // caller lends it for the call (the trait's contract).
        unsafe { self.transfer(Direction::Read, offset, (pfns.len() * PAGE) as u64, pages) }
    }
}

impl Sink for DiskStore<'_, '_> {
    type Error = StoreIoError;

    fn write_raw(&mut self, offset: u64, header: &[u8], pfns: &[u64]) -> Result<(), StoreIoError> {
        let len = (header.len() + pfns.len() * PAGE) as u64;
        let header = (KsaveHal.virt_to_phys(header.as_ptr()), header.len() as u64);
        let pages = pfns.iter().map(|pfn| (pfn * PAGE as u64, PAGE as u64));
        // SAFETY: every piece is read by the device (a write to the disk),
        // never written: the header is the writer's buffer in ksave's own
        // image, borrowed for this call; each page is caller RAM or NVS that
        // Plan::pages listed, and the caller is stopped while ksave runs.
        unsafe { self.transfer(Direction::Write, offset, len, core::iter::once(header).chain(pages)) }
    }

    fn write_bytes(&mut self, offset: u64, bytes: &[u8]) -> Result<(), StoreIoError> {
        let mut at = 0;
        for piece in self.map.pieces(offset, bytes.len() as u64)? {
            self.disk.write(&KsaveHal, piece.lba, &bytes[at..at + piece.bytes as usize])?;
            at += piece.bytes as usize;
        }
        Ok(())
    }
}

impl Device for DiskStore<'_, '_> {
    fn flush(&mut self) -> Result<(), StoreIoError> {
        Ok(self.disk.flush()?)
    }
}
