//! A fake virtio-blk device (virtio 1.1, modern PCI transport): common and
//! device configuration, feature negotiation, one split virtqueue, and
//! requests run when the queue is notified, backed by a [`Disk`].

use std::vec::Vec;

use super::{Disk, touches};

/// Where the fake's structures lie in its BAR (see [`super::Machine::VIRTIO_BAR`]).
pub const COMMON: u64 = 0x0000;
/// Device configuration.
pub const DEVICE: u64 = 0x2000;
/// Notifications; queue 0's notify offset is 0.
pub const NOTIFY: u64 = 0x3000;
/// Bytes between notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;

/// What the fake virtio-blk should get wrong, and what it offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioSetup {
    /// Feature bits offered.
    pub features: u64,
    /// SEG_MAX in the device configuration.
    pub seg_max: u32,
    /// BLK_SIZE in the device configuration.
    pub blk_size: u32,
    /// Largest queue the device allows.
    pub queue_max: u16,
    /// Fail any write touching this sector (status IOERR).
    pub write_error_at: Option<u64>,
    /// Take requests and never complete them.
    pub hang: bool,
}

impl Default for VirtioSetup {
    fn default() -> Self {
        // VERSION_1, FLUSH, SEG_MAX, BLK_SIZE, as QEMU offers them.
        Self { features: 1 << 32 | 1 << 9 | 1 << 2 | 1 << 6, seg_max: 126, blk_size: 512, queue_max: 256, write_error_at: None, hang: false }
    }
}

/// What the fake saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VirtioStats {
    /// Read and write requests done.
    pub requests: u64,
    /// The most data descriptors one request used.
    pub max_pieces: u64,
    /// FLUSH requests.
    pub flushes: u64,
    /// Resets (device status written 0).
    pub resets: u64,
    /// The features the driver accepted.
    pub accepted: u64,
}

/// A split virtqueue descriptor as the device reads it (virtio 1.1, 2.6.5).
#[repr(C)]
#[derive(Clone, Copy)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// A fake virtio-blk device.
pub struct VirtioBlkDevice {
    /// The blocks.
    pub disk: Disk,
    /// What it offers and gets wrong.
    pub setup: VirtioSetup,
    /// What happened.
    pub stats: VirtioStats,
    /// Device status.
    pub status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_size: u16,
    queue_enable: u16,
    desc: u64,
    avail: u64,
    used: u64,
    last_avail: u16,
}

impl VirtioBlkDevice {
    /// A reset device holding `disk`.
    pub fn new(disk: Disk, setup: VirtioSetup) -> Self {
        Self {
            disk,
            setup,
            stats: VirtioStats::default(),
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_size: setup.queue_max,
            queue_enable: 0,
            desc: 0,
            avail: 0,
            used: 0,
            last_avail: 0,
        }
    }

    fn reset(&mut self) {
        let (disk, setup, mut stats) = (self.disk.clone(), self.setup, self.stats.clone());
        stats.resets += 1;
        *self = Self::new(disk, setup);
        self.stats = stats;
    }

    /// A read of `width` bytes at `offset` in the BAR.
    pub fn read(&self, offset: u64, width: u8) -> u32 {
        let capacity = self.disk.borrow().sectors;
        match (offset, width) {
            (0x04, 4) => (self.setup.features >> (32 * self.device_feature_select.min(1))) as u32,
            (0x14, 1) => self.status as u32,
            (0x18, 2) => self.queue_size as u32,
            (0x1C, 2) => self.queue_enable as u32,
            (0x1E, 2) => 0,
            (o, 4) if (DEVICE..DEVICE + 0x40).contains(&o) => match o - DEVICE {
                0 => capacity as u32,
                4 => (capacity >> 32) as u32,
                12 => self.setup.seg_max,
                20 => self.setup.blk_size,
                _ => 0,
            },
            (o, w) => panic!("virtio fake: read of {w} bytes at {o:#x}, which the driver should not do"),
        }
    }

    /// A write of `width` bytes at `offset` in the BAR.
    pub fn write(&mut self, offset: u64, width: u8, value: u32) {
        let set_low = |r: &mut u64, v: u32| *r = *r & !0xFFFF_FFFF | v as u64;
        let set_high = |r: &mut u64, v: u32| *r = *r & 0xFFFF_FFFF | (v as u64) << 32;
        match (offset, width) {
            (0x00, 4) => self.device_feature_select = value,
            (0x08, 4) => self.driver_feature_select = value,
            (0x0C, 4) => {
                if self.driver_feature_select == 0 {
                    set_low(&mut self.driver_features, value)
                } else {
                    set_high(&mut self.driver_features, value)
                }
            }
            (0x14, 1) => self.set_status(value as u8),
            (0x16, 2) => assert_eq!(value, 0, "the fake has queue 0 only"),
            (0x18, 2) => {
                assert!(value as u16 <= self.setup.queue_max && (value as u16).is_power_of_two(), "queue size {value}");
                self.queue_size = value as u16;
            }
            (0x1C, 2) => self.queue_enable = value as u16,
            (0x20, 4) => set_low(&mut self.desc, value),
            (0x24, 4) => set_high(&mut self.desc, value),
            (0x28, 4) => set_low(&mut self.avail, value),
            (0x2C, 4) => set_high(&mut self.avail, value),
            (0x30, 4) => set_low(&mut self.used, value),
            (0x34, 4) => set_high(&mut self.used, value),
            (NOTIFY, 2) => self.notified(),
            (o, w) => panic!("virtio fake: write of {w} bytes at {o:#x}, which the driver should not do"),
        }
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & 8 != 0 && self.status & 8 == 0 {
            // FEATURES_OK only for a subset of what was offered.
            if self.driver_features & !self.setup.features != 0 {
                value &= !8;
            } else {
                self.stats.accepted = self.driver_features;
            }
        }
        self.status = value;
    }

    fn notified(&mut self) {
        assert!(self.status & 4 != 0 && self.queue_enable == 1, "notified before DRIVER_OK and queue enable");
        let size = self.queue_size as u64;
        loop {
            // SAFETY: the driver's ring for queue 0 (test-only).
            let avail_idx = unsafe { core::ptr::read_volatile((self.avail + 2) as *const u16) };
            if avail_idx == self.last_avail || self.setup.hang {
                return;
            }
            // SAFETY: as above.
            let head = unsafe { core::ptr::read_volatile((self.avail + 4 + 2 * (self.last_avail as u64 % size)) as *const u16) };
            self.last_avail = self.last_avail.wrapping_add(1);
            let mut chain = Vec::new();
            let mut at = head;
            loop {
                // SAFETY: a descriptor of the table the driver gave.
                let d = unsafe { core::ptr::read_volatile((self.desc + 16 * at as u64) as *const Descriptor) };
                let (addr, len, flags, next) = (d.addr, d.len, d.flags, d.next);
                chain.push((addr, len as u64, flags));
                if flags & 1 == 0 {
                    break;
                }
                at = next;
                assert!(chain.len() <= size as usize, "descriptor loop");
            }
            let (header, rest) = chain.split_first().expect("a request");
            let (status, data) = rest.split_last().expect("a status descriptor");
            assert_eq!((header.1, header.2 & 2), (16, 0), "the header is 16 device-readable bytes");
            assert_eq!((status.1, status.2 & 2), (1, 2), "the status is one device-writable byte");
            // SAFETY: the request header the driver's first descriptor names.
            let kind = unsafe { core::ptr::read_volatile(header.0 as *const u32) };
            // SAFETY: as above.
            let sector = unsafe { core::ptr::read_volatile((header.0 + 8) as *const u64) };
            let bytes: u64 = data.iter().map(|d| d.1).sum();
            let result = match kind {
                0 | 1 => {
                    let write = kind == 1;
                    assert!(data.iter().all(|d| (d.2 & 2 == 0) == write), "data descriptors' WRITE flag must match the request");
                    assert!(data.len() as u32 <= self.setup.seg_max, "{} data descriptors, SEG_MAX is {}", data.len(), self.setup.seg_max);
                    let sectors = bytes / 512;
                    let out_of_range = !bytes.is_multiple_of(512) || sector + sectors > self.disk.borrow().sectors;
                    if out_of_range || (write && touches(self.setup.write_error_at, sector, sectors)) {
                        1
                    } else {
                        let regions: Vec<_> = data.iter().map(|d| (d.0, d.1)).collect();
                        super::dma(&self.disk, sector, &regions, !write);
                        self.stats.requests += 1;
                        self.stats.max_pieces = self.stats.max_pieces.max(data.len() as u64);
                        0
                    }
                }
                4 => {
                    self.stats.flushes += 1;
                    0
                }
                _ => 2,
            };
            // SAFETY: the status byte the driver's last descriptor names.
            unsafe { core::ptr::write_volatile(status.0 as *mut u8, result) };
            // SAFETY: the used ring the driver gave (index, then entries).
            let used_idx = unsafe { core::ptr::read_volatile((self.used + 2) as *const u16) };
            let slot = self.used + 4 + 8 * (used_idx as u64 % size);
            let written = if kind == 0 { bytes as u32 + 1 } else { 1 };
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile(slot as *mut [u32; 2], [head as u32, written]) };
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile((self.used + 2) as *mut u16, used_idx.wrapping_add(1)) };
        }
    }
}
