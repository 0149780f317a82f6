//! Polling disk drivers for ksave: PCI discovery, AHCI, legacy IDE, NVMe,
//! virtio-blk and partition lookup.
//!
//! The drivers reach hardware only through [`Hal`], so they run unchanged on
//! a machine and against the register-level fakes in [`fakes`] (feature
//! `fakes`) on the host. They use no interrupts: every command is issued and
//! polled to completion with a deadline, so a dead device is an error, never
//! a hang.
//!
//! Data moves by DMA straight between the disk and physical ranges
//! ([`Segment`]), so a caller can write pages where they lie.
#![no_std]
#![deny(missing_docs)]

#[cfg(feature = "fakes")]
extern crate std;

pub mod ahci;
pub mod ata;
pub mod hal;
pub mod ide;
pub mod iommu;
pub mod nvme;
pub mod part;
pub mod pci;
pub mod virtio;
#[cfg(feature = "fakes")]
pub mod fakes;

use core::fmt;

pub use hal::Hal;

/// Bytes in a sector: the unit of DMA alignment, of ATA and virtio
/// addressing, and the smallest logical block.
pub const SECTOR: u64 = 512;
/// The largest logical block the drivers take (4Kn NVMe namespaces and
/// virtio devices; ATA disks must have 512-byte blocks: IDENTIFY word 106).
pub const MAX_BLOCK: usize = 4096;

/// A physical memory range taking part in a transfer: a device will read
/// it (a write to the disk) or overwrite it (a read), by DMA, wherever it
/// is. Only `unsafe` code can make one ([`Segment::new`]), so that safe
/// code cannot point a device at memory it does not own; the safe ways in
/// are [`BlockDevice::read`] and [`BlockDevice::write`] on a borrowed
/// buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    addr: u64,
    len: u64,
}

impl Segment {
    /// The range `[addr, addr + len)` of bus (physical) addresses.
    ///
    /// # Safety
    ///
    /// For as long as any transfer given this segment runs, the range must
    /// be memory that the device may read and, for a
    /// [`Direction::Read`], overwrite: memory the caller owns or whose
    /// owner is stopped, that nothing else reads or writes meanwhile, and
    /// that is not MMIO.
    pub const unsafe fn new(addr: u64, len: u64) -> Self {
        Self { addr, len }
    }

    /// A part of a segment already handed in (or of the driver's own DMA
    /// memory): it inherits that segment's promise.
    pub(crate) const fn part(addr: u64, len: u64) -> Self {
        Self { addr, len }
    }

    /// Physical address.
    pub const fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub const fn len(&self) -> u64 {
        self.len
    }

    /// Whether the segment is empty.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What IDENTIFY told us about a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Model string, trimmed.
    pub model: heapless_str::Str40,
    /// Serial number, trimmed.
    pub serial: heapless_str::Str40,
    /// Capacity in logical blocks.
    pub blocks: u64,
    /// Bytes in a logical block: 512 or 4096. LBAs count these.
    pub block_size: u32,
    /// The disk takes 48-bit LBA commands.
    pub lba48: bool,
    /// The disk (and path to it) does DMA.
    pub dma: bool,
}

/// A transfer direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Disk to memory.
    Read,
    /// Memory to disk.
    Write,
}

/// Why a disk operation failed. Every variant says where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskError {
    /// No device answered.
    NoDevice,
    /// The device reported an error (ATA status and error registers).
    Device {
        /// The command that failed.
        command: u8,
        /// First LBA of the failed command.
        lba: u64,
        /// ATA status register.
        status: u8,
        /// ATA error register.
        error: u8,
    },
    /// The controller reported a bus or interface error.
    Interface {
        /// The command that failed.
        command: u8,
        /// First LBA of the failed command.
        lba: u64,
        /// Controller-specific status (AHCI PxIS / PxSERR, IDE BMIS).
        detail: u32,
    },
    /// An NVMe command completed with an error status (NVMe Base 1.4,
    /// section 4.6.1: status code type in bits 10:8, status code in 7:0).
    Nvme {
        /// The command's opcode.
        opcode: u8,
        /// Its first LBA (0 for admin commands and FLUSH).
        lba: u64,
        /// Status code type and status code.
        status: u16,
    },
    /// A virtio-blk request completed with an error status (virtio 1.1,
    /// 5.2.6: 1 I/O error, 2 unsupported).
    Virtio {
        /// The request type (0 read, 1 write, 4 flush).
        request: u8,
        /// Its first sector.
        lba: u64,
        /// The status byte.
        status: u8,
    },
    /// The command completed, but moved fewer bytes than asked (AHCI
    /// PRDBC).
    Short {
        /// The command.
        command: u8,
        /// Its first LBA.
        lba: u64,
        /// Bytes asked for.
        asked: u64,
        /// Bytes the controller says it moved.
        moved: u64,
    },
    /// The device did not finish in time.
    Timeout {
        /// The command that did not finish.
        command: u8,
        /// First LBA of that command.
        lba: u64,
        /// What was being waited for.
        waiting_for: &'static str,
    },
    /// The request is beyond the end of the disk.
    OutOfRange {
        /// First LBA asked for.
        lba: u64,
        /// Sectors asked for.
        count: u64,
        /// Sectors the disk has.
        capacity: u64,
    },
    /// A segment is not usable for DMA: not sector-sized, odd, or above
    /// what the controller can address.
    BadSegment(Segment),
    /// The disk is something these drivers do not drive (e.g. ATAPI, 4K
    /// logical sectors, no LBA).
    Unsupported(&'static str),
    /// The firmware's Block I/O protocol failed a read (UEFI 2.10, 13.9:
    /// its EFI_STATUS).
    Firmware {
        /// First LBA asked for.
        lba: u64,
        /// The status, with the error bit.
        status: u64,
    },
}

/// An NVMe status: status code type and status code (NVMe 1.4, 4.6.1), as
/// [`DiskError::Nvme`] carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvmeStatus(pub u16);

impl NvmeStatus {
    /// Status code type (0 generic, 1 command specific, 2 media/data integrity, 3 path).
    pub fn code_type(self) -> u8 {
        (self.0 >> 8 & 7) as u8
    }

    /// Status code.
    pub fn code(self) -> u8 {
        self.0 as u8
    }

    /// What it means, for the common ones.
    pub fn meaning(self) -> &'static str {
        match (self.code_type(), self.code()) {
            (0, 0x02) => "invalid field in command",
            (0, 0x04) => "data transfer error",
            (0, 0x06) => "internal error",
            (0, 0x0B) => "invalid namespace or format",
            (0, 0x80) => "LBA out of range",
            (0, 0x81) => "capacity exceeded",
            (0, 0x82) => "namespace not ready",
            (2, 0x80) => "write fault",
            (2, 0x81) => "unrecovered read error",
            (2, 0x86) => "access denied",
            _ => "see the NVMe status code tables",
        }
    }
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NoDevice => write!(f, "no device"),
            Self::Firmware { lba, status } => write!(f, "firmware Block I/O read at LBA {lba}: status {status:#x}"),
            Self::Device { command, lba, status, error } => {
                write!(f, "device error on command {command:#04x} at LBA {lba}: status {status:#04x}, error {error:#04x}")
            }
            Self::Interface { command, lba, detail } => {
                write!(f, "interface error on command {command:#04x} at LBA {lba}: {detail:#x}")
            }
            Self::Nvme { opcode, lba, status } => {
                let s = NvmeStatus(status);
                write!(f, "NVMe command {opcode:#04x} at LBA {lba}: status type {} code {:#04x} ({})", s.code_type(), s.code(), s.meaning())
            }
            Self::Virtio { request, lba, status } => {
                let what = match request {
                    0 => "read",
                    1 => "write",
                    4 => "flush",
                    _ => "request",
                };
                let why = match status {
                    1 => "I/O error",
                    2 => "unsupported",
                    _ => "unknown status",
                };
                write!(f, "virtio-blk {what} at LBA {lba}: {why} (status {status})")
            }
            Self::Short { command, lba, asked, moved } => {
                write!(f, "short transfer on command {command:#04x} at LBA {lba}: {moved} of {asked} bytes moved")
            }
            Self::Timeout { command, lba, waiting_for } => {
                write!(f, "timeout on command {command:#04x} at LBA {lba} waiting for {waiting_for}")
            }
            Self::OutOfRange { lba, count, capacity } => {
                write!(f, "LBA {lba}+{count} beyond the disk's {capacity} sectors")
            }
            Self::BadSegment(s) => write!(f, "segment {:#x}+{:#x} unusable for DMA", s.addr, s.len),
            Self::Unsupported(what) => write!(f, "unsupported: {what}"),
        }
    }
}

/// A disk that moves whole sectors between itself and physical memory.
pub trait BlockDevice {
    /// What the disk said about itself.
    fn info(&self) -> &DiskInfo;

    /// Moves `sum(segments.len) / block_size` blocks starting at `lba`, in
    /// segment order. Segments must start on a 512-byte boundary and hold
    /// whole blocks, so that every command carries whole blocks however it
    /// is split.
    fn transfer(&mut self, dir: Direction, lba: u64, segments: &[Segment]) -> Result<(), DiskError>;

    /// Makes written data durable (FLUSH CACHE EXT).
    fn flush(&mut self) -> Result<(), DiskError>;

    /// Reads sectors into a buffer in identity-mapped memory.
    fn read(&mut self, hal: &impl Hal, lba: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        // SAFETY: `buf` is borrowed mutably for the whole (polled, finished
        // on return) transfer; `Hal::virt_to_phys` gives its bus address.
        let seg = unsafe { Segment::new(hal.virt_to_phys(buf.as_ptr()), buf.len() as u64) };
        self.transfer(Direction::Read, lba, &[seg])
    }

    /// Writes sectors from a buffer in identity-mapped memory.
    fn write(&mut self, hal: &impl Hal, lba: u64, buf: &[u8]) -> Result<(), DiskError> {
        // SAFETY: a write only reads `buf`, which is borrowed for the whole
        // transfer; `Hal::virt_to_phys` gives its bus address.
        let seg = unsafe { Segment::new(hal.virt_to_phys(buf.as_ptr()), buf.len() as u64) };
        self.transfer(Direction::Write, lba, &[seg])
    }
}

/// Checks a request against the disk and returns its block count.
pub(crate) fn check_request(info: &DiskInfo, lba: u64, segments: &[Segment]) -> Result<u64, DiskError> {
    let block = info.block_size as u64;
    let mut bytes = 0u64;
    for s in segments {
        if s.len == 0 || !s.len.is_multiple_of(block) || !s.addr.is_multiple_of(SECTOR) {
            return Err(DiskError::BadSegment(*s));
        }
        bytes += s.len;
    }
    let count = bytes / block;
    if lba.checked_add(count).is_none_or(|end| end > info.blocks) {
        return Err(DiskError::OutOfRange { lba, count, capacity: info.blocks });
    }
    Ok(count)
}

/// Walks a segment list in pieces: each call to [`Pieces::next_piece`] gives
/// at most `max` bytes that do not cross a `boundary`-aligned address (IDE
/// PRDs may not cross 64 KiB) from the current position.
#[derive(Clone, Copy)]
pub(crate) struct Pieces<'a> {
    segments: &'a [Segment],
    index: usize,
    offset: u64,
}

impl<'a> Pieces<'a> {
    pub(crate) fn new(segments: &'a [Segment]) -> Self {
        Self { segments, index: 0, offset: 0 }
    }

    /// The next piece, or `None` at the end.
    pub(crate) fn next_piece(&mut self, max: u64, boundary: Option<u64>) -> Option<Segment> {
        let seg = self.segments.get(self.index)?;
        let addr = seg.addr + self.offset;
        let mut len = (seg.len - self.offset).min(max);
        if let Some(b) = boundary {
            len = len.min(b - addr % b);
        }
        self.offset += len;
        if self.offset == seg.len {
            self.index += 1;
            self.offset = 0;
        }
        Some(Segment::part(addr, len))
    }

    /// How many of `want` blocks of `block` bytes one command can carry
    /// from here with `entries` descriptors of at most `prd_max` bytes,
    /// none crossing `boundary`; at least one.
    pub(crate) fn fit_blocks(&self, want: u64, block: u64, entries: usize, prd_max: u64, boundary: Option<u64>) -> u64 {
        let mut probe = *self;
        let limit = want * block;
        let mut bytes = 0;
        for _ in 0..entries {
            match probe.next_piece((limit - bytes).min(prd_max), boundary) {
                Some(p) => bytes += p.len,
                None => break,
            }
            if bytes == limit {
                break;
            }
        }
        (bytes / block).max(1)
    }

}

/// A fixed-capacity string for IDENTIFY's model and serial fields.
pub mod heapless_str {
    use core::fmt;

    /// Up to 40 ASCII bytes.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub struct Str40 {
        bytes: [u8; 40],
        len: u8,
    }

    impl Default for Str40 {
        fn default() -> Self {
            Self { bytes: [0; 40], len: 0 }
        }
    }

    impl Str40 {
        /// From ASCII bytes, trimming spaces and NULs at both ends.
        pub fn from_ascii_trimmed(raw: &[u8]) -> Self {
            let is_pad = |b: &u8| *b == b' ' || *b == 0;
            let start = raw.iter().position(|b| !is_pad(b)).unwrap_or(raw.len());
            let end = raw.iter().rposition(|b| !is_pad(b)).map_or(start, |e| e + 1);
            let mut s = Self::default();
            for (i, &b) in raw[start..end].iter().take(40).enumerate() {
                s.bytes[i] = if b.is_ascii_graphic() || b == b' ' { b } else { b'?' };
                s.len = i as u8 + 1;
            }
            s
        }

        /// The text.
        pub fn as_str(&self) -> &str {
            core::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("")
        }
    }

    impl fmt::Debug for Str40 {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{:?}", self.as_str())
        }
    }

    impl fmt::Display for Str40 {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.as_str())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_respect_max_and_boundaries() {
        let segs = [Segment::part(0x1_f000, 0x3000), Segment::part(0x40000, 0x200)];
        let mut p = Pieces::new(&segs);
        assert_eq!(p.next_piece(0x10000, Some(0x10000)), Some(Segment::part(0x1_f000, 0x1000)));
        assert_eq!(p.next_piece(0x1000, Some(0x10000)), Some(Segment::part(0x20000, 0x1000)));
        assert_eq!(p.next_piece(0x10000, None), Some(Segment::part(0x21000, 0x1000)));
        assert_eq!(p.next_piece(0x10000, None), Some(Segment::part(0x40000, 0x200)));
        assert_eq!(p.next_piece(0x10000, None), None);
    }

    #[test]
    fn commands_are_sized_to_descriptors_and_counts() {
        // Sixteen scattered pages: two descriptors carry two pages.
        let pages: [Segment; 16] = core::array::from_fn(|i| Segment::part(0x10_0000 * i as u64, 4096));
        let p = Pieces::new(&pages);
        assert_eq!(p.fit_blocks(1000, SECTOR, 2, 1 << 22, None), 16);
        assert_eq!(p.fit_blocks(5, SECTOR, 2, 1 << 22, None), 5);
        // One contiguous 1 MiB run split at 64 KiB: 4 descriptors, 256 KiB.
        let run = [Segment::part(0x1_0000, 1 << 20)];
        assert_eq!(Pieces::new(&run).fit_blocks(65536, SECTOR, 4, 65536, Some(65536)), 512);
    }

    #[test]
    fn requests_are_checked() {
        let info = DiskInfo { model: Default::default(), serial: Default::default(), blocks: 100, block_size: 512, lba48: true, dma: true };
        assert_eq!(check_request(&info, 98, &[Segment::part(0x1000, 1024)]), Ok(2));
        assert!(matches!(check_request(&info, 99, &[Segment::part(0x1000, 1024)]), Err(DiskError::OutOfRange { .. })));
        assert!(matches!(check_request(&info, 0, &[Segment::part(0x1000, 100)]), Err(DiskError::BadSegment(_))));
        assert!(matches!(check_request(&info, u64::MAX, &[Segment::part(0, 512)]), Err(DiskError::OutOfRange { .. })));
    }

    #[test]
    fn identify_strings_are_trimmed() {
        let s = heapless_str::Str40::from_ascii_trimmed(b"  QEMU HARDDISK   \0");
        assert_eq!(s.as_str(), "QEMU HARDDISK");
        assert_eq!(heapless_str::Str40::from_ascii_trimmed(b"    ").as_str(), "");
    }
}

/// The disk self-test's data: every sector's bytes depend on its LBA alone,
/// so whoever checks a disk (ksave, the host harness, the tests) can
/// regenerate what must be there.
pub mod testpattern {
    /// Fills `out` with sector `lba`'s pattern (xorshift64 seeded by the LBA).
    pub fn sector(lba: u64, out: &mut [u8]) {
        let mut x = lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x6b73_6176_652d_7465; // "ksave-te"
        for chunk in out.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }
}
