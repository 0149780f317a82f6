//! A polling virtio-blk driver (virtio 1.1, modern PCI transport, one split
//! virtqueue).
//!
//! One request in flight, polled to completion with a deadline: a header
//! descriptor, one descriptor per data piece straight from and to the
//! caller's pages, and a status byte. The `virtio-drivers` crate was
//! weighed: its block driver takes one contiguous buffer per request (a
//! save's scattered pages would cost one request each) and its PCI root
//! reads config space through ECAM, where ksave uses ports 0xCF8/0xCFC.
//!
//! What ksave relies on when it gives the device back: a kexec jump runs
//! the freeze callback, `virtblk_freeze` (drivers/block/virtio_blk.c), which
//! resets the device and deletes its queues; the way back runs
//! `virtio_device_restore` (drivers/virtio/virtio.c), which resets it again
//! and negotiates from scratch. So ksave finds the device reset, and leaves
//! it reset (device status 0: no queue, no DMA).

use core::sync::atomic::{Ordering, fence};

use crate::hal::{mmio_write64 as write64, poll};
use crate::pci::{self, Address, Bar};
use crate::{BlockDevice, Direction, DiskError, DiskInfo, Hal, Pieces, SECTOR, Segment, check_request};


// Virtio PCI capability types (4.1.4).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_DEVICE: u8 = 4;

// Common configuration registers (4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0C;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_ENABLE: u64 = 0x1C;
const QUEUE_NOTIFY_OFF: u64 = 0x1E;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

// Device status bits (2.1).
const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;
const FAILED: u8 = 128;

// Feature bits (5.2.3, 6).
const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_VERSION_1: u64 = 1 << 32;
const WANTED: u64 = F_SIZE_MAX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH | F_VERSION_1;

// Request types and status (5.2.6).
/// Request type: read.
pub const T_IN: u32 = 0;
/// Request type: write.
pub const T_OUT: u32 = 1;
/// Request type: flush.
pub const T_FLUSH: u32 = 4;
const S_OK: u8 = 0;

const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;

/// Descriptors of the one virtqueue: a header, up to `QUEUE - 2` data
/// pieces, a status byte.
pub const QUEUE: usize = 128;
/// Microseconds to wait for a request.
const REQUEST_US: u64 = 30_000_000;
/// Microseconds to wait for a reset.
const RESET_US: u64 = 1_000_000;

/// Where a virtio device's registers are, from its PCI capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transport {
    /// Common configuration.
    pub common: u64,
    /// Notification area.
    pub notify: u64,
    /// Bytes between queue notification addresses, per queue_notify_off.
    pub notify_multiplier: u32,
    /// Device-specific configuration.
    pub device: u64,
    /// The MMIO spans above, (address, length), for mapping.
    pub spans: [(u64, u64); 3],
}

impl Transport {
    /// Reads the virtio vendor capabilities of the function at `at`
    /// (4.1.4). `Unsupported` for a legacy-only device.
    pub fn find(hal: &impl Hal, at: Address) -> Result<Self, DiskError> {
        let legacy_only = DiskError::Unsupported("virtio device without the modern (1.0) PCI interface");
        if pci::read32(hal, at, 0x04) >> 16 & 0x10 == 0 {
            return Err(legacy_only); // no capability list
        }
        let (mut common, mut notify, mut device) = (None, None, None);
        let mut ptr = pci::read32(hal, at, 0x34) as u8 & 0xFC;
        for _ in 0..48 {
            if ptr == 0 {
                break;
            }
            let head = pci::read32(hal, at, ptr);
            let (id, next, kind) = (head as u8, (head >> 8) as u8 & 0xFC, (head >> 24) as u8);
            if id == 0x09 {
                let bar = pci::read32(hal, at, ptr + 4) as u8;
                let offset = pci::read32(hal, at, ptr + 8) as u64;
                let length = pci::read32(hal, at, ptr + 12) as u64;
                let base = match (bar < 6).then(|| pci::bar(hal, at, bar)) {
                    Some(Bar::Memory(base)) => Some(base + offset),
                    _ => None,
                };
                match (kind, base) {
                    (CAP_COMMON, Some(b)) if common.is_none() => common = Some((b, length)),
                    (CAP_NOTIFY, Some(b)) if notify.is_none() => notify = Some((b, length, pci::read32(hal, at, ptr + 16))),
                    (CAP_DEVICE, Some(b)) if device.is_none() => device = Some((b, length)),
                    _ => {}
                }
            }
            ptr = next;
        }
        let (Some(common), Some(notify), Some(device)) = (common, notify, device) else { return Err(legacy_only) };
        Ok(Self {
            common: common.0,
            notify: notify.0,
            notify_multiplier: notify.2,
            device: device.0,
            spans: [common, (notify.0, notify.1), device],
        })
    }
}

/// A split virtqueue descriptor (2.6.5).
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// The driver's ring (2.6.6).
#[repr(C, align(2))]
struct AvailRing {
    flags: u16,
    idx: u16,
    ring: [u16; QUEUE],
    used_event: u16,
}

/// The device's ring (2.6.8).
#[repr(C, align(4))]
struct UsedRing {
    flags: u16,
    idx: u16,
    /// (descriptor chain head, bytes written) pairs.
    ring: [[u32; 2]; QUEUE],
    avail_event: u16,
}

/// A request's header (5.2.6), read by the device.
#[repr(C, align(16))]
struct RequestHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

/// Memory the device reads and writes by DMA: the virtqueue's three parts,
/// a request header and its status byte. It must stay put while a disk is
/// open.
#[repr(C, align(4096))]
pub struct VirtioMemory {
    desc: [Descriptor; QUEUE],
    avail: AvailRing,
    used: UsedRing,
    header: RequestHeader,
    status: u8,
}

impl VirtioMemory {
    /// Zeroed memory, for statics.
    pub const fn new() -> Self {
        Self {
            desc: [Descriptor { addr: 0, len: 0, flags: 0, next: 0 }; QUEUE],
            avail: AvailRing { flags: 0, idx: 0, ring: [0; QUEUE], used_event: 0 },
            used: UsedRing { flags: 0, idx: 0, ring: [[0; 2]; QUEUE], avail_event: 0 },
            header: RequestHeader { kind: 0, reserved: 0, sector: 0 },
            status: 0,
        }
    }
}

impl Default for VirtioMemory {
    fn default() -> Self {
        Self::new()
    }
}

/// An open virtio-blk device.
pub struct VirtioBlk<'m, H: Hal> {
    hal: H,
    transport: Transport,
    mem: &'m mut VirtioMemory,
    queue_size: u16,
    notify_at: u64,
    /// Data descriptors a request may use (SEG_MAX and the queue).
    max_pieces: usize,
    /// Bytes a data descriptor may carry (SIZE_MAX).
    piece_max: u64,
    flush: bool,
    read_only: bool,
    /// The used ring index last seen.
    used_seen: u16,
    info: DiskInfo,
}

impl<'m, H: Hal> VirtioBlk<'m, H> {
    /// Resets the device, negotiates features, sets up queue 0 in `mem`
    /// and reads the capacity.
    ///
    /// # Safety
    /// `transport` must describe a virtio-blk device that nothing else
    /// drives until this disk is closed, with memory decoding and bus
    /// mastering enabled and its spans mapped uncached; `mem` must be
    /// reachable by the device's DMA.
    pub unsafe fn open(hal: H, transport: Transport, mem: &'m mut VirtioMemory) -> Result<Self, DiskError> {
        let blank = DiskInfo { model: crate::heapless_str::Str40::from_ascii_trimmed(b"virtio-blk"), serial: Default::default(), blocks: 0, block_size: 512, lba48: true, dma: true };
        let mut disk = Self {
            hal,
            transport,
            mem,
            queue_size: 0,
            notify_at: 0,
            max_pieces: QUEUE - 2,
            piece_max: u32::MAX as u64 / SECTOR * SECTOR,
            flush: false,
            read_only: false,
            used_seen: 0,
            info: blank,
        };
        // On error, dropping `disk` resets the device.
        disk.start()?;
        Ok(disk)
    }

    fn common(&self, reg: u64) -> u64 {
        self.transport.common + reg
    }

    fn status(&self) -> u8 {
        self.hal.mmio_read8(self.common(DEVICE_STATUS))
    }

    fn add_status(&self, bits: u8) {
        self.hal.mmio_write8(self.common(DEVICE_STATUS), self.status() | bits);
    }

    /// Status 0, and wait for the device to say so (4.1.4.3.2).
    fn reset(&self) -> bool {
        self.hal.mmio_write8(self.common(DEVICE_STATUS), 0);
        poll(&self.hal, RESET_US, || self.status() == 0)
    }

    /// The initialization sequence of 3.1.1.
    fn start(&mut self) -> Result<(), DiskError> {
        let failed = |what| DiskError::Timeout { command: 0, lba: 0, waiting_for: what };
        if !self.reset() {
            return Err(failed("virtio device reset"));
        }
        self.add_status(ACKNOWLEDGE);
        self.add_status(DRIVER);
        let hal = &self.hal;
        let mut offered = 0u64;
        for half in 0..2 {
            hal.mmio_write32(self.common(DEVICE_FEATURE_SELECT), half);
            offered |= (hal.mmio_read32(self.common(DEVICE_FEATURE)) as u64) << (32 * half);
        }
        if offered & F_VERSION_1 == 0 {
            self.add_status(FAILED);
            return Err(DiskError::Unsupported("virtio device without VIRTIO_F_VERSION_1"));
        }
        let accepted = offered & WANTED;
        for half in 0..2 {
            hal.mmio_write32(self.common(DRIVER_FEATURE_SELECT), half);
            hal.mmio_write32(self.common(DRIVER_FEATURE), (accepted >> (32 * half)) as u32);
        }
        self.add_status(FEATURES_OK);
        if self.status() & FEATURES_OK == 0 {
            self.add_status(FAILED);
            return Err(DiskError::Unsupported("virtio device refused ksave's features"));
        }
        // Device configuration (5.2.4).
        let device = self.transport.device;
        let capacity = hal.mmio_read32(device) as u64 | (hal.mmio_read32(device + 4) as u64) << 32;
        if accepted & F_SIZE_MAX != 0 {
            self.piece_max = (hal.mmio_read32(device + 8) as u64).max(SECTOR) / SECTOR * SECTOR;
        }
        if accepted & F_SEG_MAX != 0 {
            self.max_pieces = (hal.mmio_read32(device + 12) as usize).clamp(1, QUEUE - 2);
        }
        // Requests and the capacity count 512-byte sectors whatever the
        // block size (5.2.4), which requests must be whole multiples of.
        let block = if accepted & F_BLK_SIZE != 0 { hal.mmio_read32(device + 20) } else { SECTOR as u32 };
        if block != 512 && block != 4096 {
            self.add_status(FAILED);
            return Err(DiskError::Unsupported("virtio-blk with blocks of other than 512 or 4096 bytes"));
        }
        self.flush = accepted & F_FLUSH != 0;
        self.read_only = accepted & F_RO != 0;
        self.info.block_size = block;
        self.info.blocks = capacity / (block as u64 / SECTOR);

        // Queue 0 (4.1.5.1.3).
        hal.mmio_write16(self.common(QUEUE_SELECT), 0);
        let max = hal.mmio_read16(self.common(QUEUE_SIZE));
        if max < 3 {
            self.add_status(FAILED);
            return Err(DiskError::Unsupported("virtio-blk queue 0 missing or too small"));
        }
        // A power of two the device allows, at most ours (a split queue's
        // size is a power of two, 2.6).
        let size = 1u16 << (max.min(QUEUE as u16).ilog2());
        self.queue_size = size;
        self.max_pieces = self.max_pieces.min(size as usize - 2);
        *self.mem = VirtioMemory::new();
        self.used_seen = 0;
        hal.mmio_write16(self.common(QUEUE_SIZE), size);
        let phys = |p: *const u8| hal.virt_to_phys(p);
        write64(hal, self.common(QUEUE_DESC), phys(self.mem.desc.as_ptr().cast()));
        write64(hal, self.common(QUEUE_DRIVER), phys((&raw const self.mem.avail).cast()));
        write64(hal, self.common(QUEUE_DEVICE), phys((&raw const self.mem.used).cast()));
        let notify_off = hal.mmio_read16(self.common(QUEUE_NOTIFY_OFF)) as u64;
        self.notify_at = self.transport.notify + notify_off * self.transport.notify_multiplier as u64;
        hal.mmio_write16(self.common(QUEUE_ENABLE), 1);
        fence(Ordering::SeqCst);
        self.add_status(DRIVER_OK);
        Ok(())
    }

    /// One request: the header, `bytes` of `data` (sized by the caller),
    /// the status; polled to completion. `lba` counts the disk's blocks.
    fn request(&mut self, kind: u32, lba: u64, data: &mut Pieces, bytes: u64) -> Result<(), DiskError> {
        let size = self.queue_size as usize;
        // The header's sector counts 512 bytes whatever the block size (5.2.6).
        let sector = lba * (self.info.block_size as u64 / SECTOR);
        self.mem.header = RequestHeader { kind, reserved: 0, sector };
        self.mem.status = 0xFF;
        let header = self.hal.virt_to_phys((&raw const self.mem.header).cast());
        let status = self.hal.virt_to_phys(&raw const self.mem.status);
        let data_flags = if kind == T_IN { DESC_NEXT | DESC_WRITE } else { DESC_NEXT };
        self.mem.desc[0] = Descriptor { addr: header, len: 16, flags: DESC_NEXT, next: 1 };
        let mut n = 1;
        let mut left = bytes;
        while left > 0 {
            let piece = data.next_piece(left.min(self.piece_max), None).expect("the caller sized the request");
            self.mem.desc[n] = Descriptor { addr: piece.addr, len: piece.len as u32, flags: data_flags, next: (n + 1) as u16 };
            left -= piece.len;
            n += 1;
        }
        debug_assert!(n < size);
        self.mem.desc[n] = Descriptor { addr: status, len: 1, flags: DESC_WRITE, next: 0 };
        let avail = &raw mut self.mem.avail;
        // SAFETY: our own ring; the device reads it only after the index
        // moves, which the fences order after the entry and descriptors.
        unsafe {
            let idx = core::ptr::read_volatile(&raw const (*avail).idx);
            core::ptr::write_volatile(&raw mut (*avail).ring[idx as usize % size], 0);
            fence(Ordering::SeqCst);
            core::ptr::write_volatile(&raw mut (*avail).idx, idx.wrapping_add(1));
        }
        fence(Ordering::SeqCst);
        self.hal.mmio_write16(self.notify_at, 0);
        let used_idx = &raw const self.mem.used.idx;
        let seen = self.used_seen;
        // SAFETY: our own ring, written by the device: read volatile.
        let done = poll(&self.hal, REQUEST_US, || unsafe { core::ptr::read_volatile(used_idx) } != seen);
        fence(Ordering::SeqCst);
        if !done {
            // A device that does not answer is reset and set up again, so
            // that a failure record can still be written.
            let _ = self.start();
            return Err(DiskError::Timeout { command: kind as u8, lba, waiting_for: "virtio-blk used ring" });
        }
        self.used_seen = seen.wrapping_add(1);
        // SAFETY: as above; the device wrote it before moving the index.
        let status = unsafe { core::ptr::read_volatile(&raw const self.mem.status) };
        if status != S_OK {
            return Err(DiskError::Virtio { request: kind as u8, lba, status });
        }
        Ok(())
    }

    /// Resets the device: for when the memory its queue was in now belongs
    /// to someone else (after a restore). The same as [`Self::close`].
    pub fn stop(self) {}

    /// Resets the device, as the caller's freeze left it (module docs; the
    /// `Drop` impl does it on every path).
    pub fn close(self) {}
}

impl<H: Hal> Drop for VirtioBlk<'_, H> {
    fn drop(&mut self) {
        self.reset();
    }
}

impl<H: Hal> BlockDevice for VirtioBlk<'_, H> {
    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn transfer(&mut self, dir: Direction, lba: u64, segments: &[Segment]) -> Result<(), DiskError> {
        let total = check_request(&self.info, lba, segments)?;
        if dir == Direction::Write && self.read_only {
            return Err(DiskError::Unsupported("virtio-blk device is read-only"));
        }
        let kind = if dir == Direction::Write { T_OUT } else { T_IN };
        let mut data = Pieces::new(segments);
        let mut done = 0;
        while done < total {
            let block = self.info.block_size as u64;
            let count = data.fit_blocks(total - done, block, self.max_pieces, self.piece_max, None);
            self.request(kind, lba + done, &mut data, count * block)?;
            done += count;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        // A device that does not offer VIRTIO_BLK_F_FLUSH has no write-back
        // cache to flush: Linux assumes so too (virtblk_get_cache_mode,
        // drivers/block/virtio_blk.c).
        if !self.flush {
            return Ok(());
        }
        self.request(T_FLUSH, 0, &mut Pieces::new(&[]), 0)
    }
}
