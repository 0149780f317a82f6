//! The image store on its disk: every read, write, flush and invalidation
//! ([`crate::resume::invalidate`]) of an image goes through a
//! [`DiskStore`], which turns image offsets into the disk's LBAs by the
//! store's extents ([`StoreMap`]) and nowhere else.
//!
//! Generic over the disk ([`BlockDevice`]) and the drivers' [`Hal`], so
//! that ksave drives its disks through it and host tests drive whole saves
//! and resumes through the same code against the drivers' register-level
//! fakes.

use core::fmt;

use diskdrv::{BlockDevice, Direction, DiskError, Hal, Segment};
use ksave_format::PAGE;
use ksave_format::commit::Device;
use ksave_format::reader::Source;
use ksave_format::store::{StoreError, StoreMap};
use ksave_format::writer::Sink;

use crate::resume::DmaSource;

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

/// An image store open on its disk `D`, whose driver reaches memory
/// through `H`.
pub struct DiskStore<'d, D: BlockDevice, H: Hal> {
    disk: &'d mut D,
    hal: H,
    map: StoreMap<'d>,
    /// A page whose contents a raw chunk takes from elsewhere: (its frame,
    /// the physical address of its stand-in).
    stand_in: Option<(u64, u64)>,
}

impl<'d, D: BlockDevice, H: Hal> DiskStore<'d, D, H> {
    /// The store `map` on `disk`, whose block size it must have; `hal`
    /// gives the bus addresses of the buffers handed to the disk.
    pub fn new(disk: &'d mut D, hal: H, map: StoreMap<'d>) -> Self {
        debug_assert_eq!(map.block_size(), disk.info().block_size);
        Self { disk, hal, map, stand_in: None }
    }

    /// Raw chunks take page `pfn`'s contents from the page at physical
    /// address `at` (a save while that page holds the other CPUs'
    /// start-up code).
    ///
    /// # Safety
    /// The device reads the page at `at` by DMA whenever a raw chunk names
    /// `pfn`: it must stay memory the device may read while this store is.
    pub unsafe fn take_page_from(&mut self, pfn: u64, at: u64) {
        self.stand_in = Some((pfn, at));
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
            unsafe { transfer_pieces(disk, dir, lba, within) }.map_err(StoreIoError::Disk)
        })
    }
}

/// Segments handed to the driver in one [`BlockDevice::transfer`] by
/// [`transfer_pieces`]: enough for a raw chunk of contiguous pages in one
/// call, and 1 KiB of stack where a whole chunk's worth would be 8.
pub const SEGMENT_BATCH: usize = 64;

/// Transfers `pieces` (physical address, bytes: whole blocks each), in
/// order, from LBA `lba` on: contiguous pieces are merged into one segment,
/// and [`SEGMENT_BATCH`] segments go to the driver at a time.
///
/// # Safety
/// Every piece must be memory the device may access in `dir` for the whole
/// call: read it (a write to the disk) or write it (a read).
pub unsafe fn transfer_pieces<D: BlockDevice + ?Sized>(disk: &mut D, dir: Direction, lba: u64, pieces: impl Iterator<Item = (u64, u64)>) -> Result<(), DiskError> {
    let block = disk.info().block_size as u64;
    // SAFETY: empty placeholders, never handed to the driver (only segs[..n]).
    let mut segs = [unsafe { Segment::new(0, 0) }; SEGMENT_BATCH];
    let (mut n, mut at, mut bytes) = (0, lba, 0u64);
    for (addr, len) in pieces {
        let last = segs[n.max(1) - 1];
        if n > 0 && last.addr() + last.len() == addr {
            // SAFETY: the last piece and this one, contiguous; both are the
            // caller's to lend (this function's contract).
            segs[n - 1] = unsafe { Segment::new(last.addr(), last.len() + len) };
        } else {
            if n == SEGMENT_BATCH {
                disk.transfer(dir, at, &segs[..n])?;
                at += bytes / block;
                (n, bytes) = (0, 0);
            }
            // SAFETY: a piece the caller lends (this function's contract).
            segs[n] = unsafe { Segment::new(addr, len) };
            n += 1;
        }
        bytes += len;
    }
    if n > 0 {
        disk.transfer(dir, at, &segs[..n])?;
    }
    Ok(())
}

impl<D: BlockDevice, H: Hal> Source for DiskStore<'_, D, H> {
    type Error = StoreIoError;

    /// Reads are whole blocks: the image aligns everything to them.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), StoreIoError> {
        let mut at = 0;
        for piece in self.map.pieces(offset, buf.len() as u64)? {
            let part = &mut buf[at..at + piece.bytes as usize];
            self.disk.read(&self.hal, piece.lba, part)?;
            at += piece.bytes as usize;
        }
        Ok(())
    }
}

impl<D: BlockDevice, H: Hal> DmaSource for DiskStore<'_, D, H> {
    unsafe fn read_into_pages(&mut self, offset: u64, pfns: &[u64]) -> Result<(), StoreIoError> {
        let pages = pfns.iter().map(|pfn| (pfn * PAGE as u64, PAGE as u64));
        // SAFETY: the device writes these pages (a disk read), which the
        // caller lends it for the call (the trait's contract).
        unsafe { self.transfer(Direction::Read, offset, (pfns.len() * PAGE) as u64, pages) }
    }
}

impl<D: BlockDevice, H: Hal> Sink for DiskStore<'_, D, H> {
    type Error = StoreIoError;

    fn write_raw(&mut self, offset: u64, header: &[u8], pfns: &[u64]) -> Result<(), StoreIoError> {
        let len = (header.len() + pfns.len() * PAGE) as u64;
        let header = (self.hal.virt_to_phys(header.as_ptr()), header.len() as u64);
        let stand_in = self.stand_in;
        let pages = pfns.iter().map(|&pfn| match stand_in {
            Some((held, at)) if held == pfn => (at, PAGE as u64),
            _ => (pfn * PAGE as u64, PAGE as u64),
        });
        // SAFETY: every piece is read by the device (a write to the disk),
        // never written: the header is the writer's buffer, borrowed for
        // this call (in ksave, in its own image); each page is memory the
        // save's plan listed (in ksave, caller RAM or NVS that Plan::pages
        // listed, and the caller is stopped while ksave runs), or its
        // stand-in (take_page_from's contract).
        unsafe { self.transfer(Direction::Write, offset, len, core::iter::once(header).chain(pages)) }
    }

    fn write_bytes(&mut self, offset: u64, bytes: &[u8]) -> Result<(), StoreIoError> {
        let mut at = 0;
        for piece in self.map.pieces(offset, bytes.len() as u64)? {
            self.disk.write(&self.hal, piece.lba, &bytes[at..at + piece.bytes as usize])?;
            at += piece.bytes as usize;
        }
        Ok(())
    }
}

impl<D: BlockDevice, H: Hal> Device for DiskStore<'_, D, H> {
    fn flush(&mut self) -> Result<(), StoreIoError> {
        Ok(self.disk.flush()?)
    }
}
