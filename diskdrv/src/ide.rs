//! A polling legacy IDE driver: ATA/ATAPI-8 register protocol with PIO, and
//! bus-master DMA as the Intel PIIX/PIIX3 datasheet's "Bus Master IDE"
//! section describes it (BMIC/BMIS/BMIDTP, PRD tables).

use core::sync::atomic::{Ordering, fence};

use crate::ata::{self, status};
use crate::hal::poll;
use crate::{BlockDevice, Direction, DiskError, DiskInfo, Hal, Pieces, SECTOR, Segment, check_request};

/// Command and control block ports of a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Channel {
    /// Command block base (data register).
    pub command: u16,
    /// Control block (alternate status / device control).
    pub control: u16,
    /// Bus-master registers of this channel (BAR4, +8 for the secondary).
    pub bus_master: Option<u16>,
}

impl Channel {
    /// The primary channel at its legacy ports.
    pub const fn primary(bus_master_base: Option<u16>) -> Self {
        Self { command: 0x1F0, control: 0x3F6, bus_master: bus_master_base }
    }

    /// The secondary channel at its legacy ports.
    pub const fn secondary(bus_master_base: Option<u16>) -> Self {
        Self { command: 0x170, control: 0x376, bus_master: match bus_master_base {
            Some(b) => Some(b + 8),
            None => None,
        } }
    }
}

/// Which drive on the channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drive {
    /// Device 0.
    Master,
    /// Device 1.
    Slave,
}

/// How data moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Through the data port, word by word.
    Pio,
    /// By the bus-master engine from a PRD table.
    Dma,
}

// Command block registers.
const DATA: u16 = 0;
const ERROR: u16 = 1;
const COUNT: u16 = 2;
const LBA0: u16 = 3;
const LBA1: u16 = 4;
const LBA2: u16 = 5;
const DEVICE: u16 = 6;
const STATUS_COMMAND: u16 = 7;
// Device control bits.
const NIEN: u8 = 1 << 1;
/// Bit 3 of device control, obsolete; libata sets it (ATA_DEVCTL_OBS).
const DEVCTL_OBS: u8 = 1 << 3;
const SRST: u8 = 1 << 2;
// Bus-master registers.
const BMIC: u16 = 0;
const BMIS: u16 = 2;
const BMIDTP: u16 = 4;
const BMIC_START: u8 = 1 << 0;
const BMIC_TO_MEMORY: u8 = 1 << 3;
const BMIS_ACTIVE: u8 = 1 << 0;
const BMIS_ERROR: u8 = 1 << 1;
const BMIS_INTERRUPT: u8 = 1 << 2;

/// PRD entries in the table; 512 x 64 KiB covers one 48-bit command.
pub const PRD_ENTRIES: usize = 512;
const PRD_MAX: u64 = 64 * 1024;
const COMMAND_US: u64 = 30_000_000;

/// One PRD (PIIX: base address, byte count with 0 = 64 KiB, EOT in bit 15
/// of the last word).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Prd {
    base: u32,
    count: u16,
    flags: u16,
}

/// DMA memory for one channel: the PRD table must be dword aligned and not
/// cross 64 KiB, which 4 KiB alignment guarantees.
#[repr(C, align(4096))]
pub struct IdeMemory {
    prdt: [Prd; PRD_ENTRIES],
}

impl IdeMemory {
    /// Zeroed memory, for statics.
    pub const fn new() -> Self {
        Self { prdt: [Prd { base: 0, count: 0, flags: 0 }; PRD_ENTRIES] }
    }
}

impl Default for IdeMemory {
    fn default() -> Self {
        Self::new()
    }
}

/// An ATA disk on an IDE channel.
pub struct IdeDisk<'m, H: Hal> {
    hal: H,
    channel: Channel,
    drive: Drive,
    mode: Mode,
    mem: &'m mut IdeMemory,
    info: DiskInfo,
}

impl<'m, H: Hal> IdeDisk<'m, H> {
    /// Finds and identifies `drive` on `channel`, with interrupts off at
    /// the device. `Mode::Dma` needs the channel's bus-master registers and
    /// a disk that does DMA.
    ///
    /// # Safety
    /// The channel's ports must belong to an IDE controller nothing else
    /// drives while the disk is open, with I/O decoding (and for DMA bus
    /// mastering) enabled; `mem` must be reachable by its DMA.
    pub unsafe fn open(hal: H, channel: Channel, drive: Drive, mode: Mode, mem: &'m mut IdeMemory) -> Result<Self, DiskError> {
        let blank = DiskInfo { model: Default::default(), serial: Default::default(), blocks: 0, block_size: 512, lba48: false, dma: false };
        let mut disk = Self { hal, channel, drive, mode, mem, info: blank };
        disk.hal.outb(channel.control, NIEN);
        disk.identify()?;
        if mode == Mode::Dma && (channel.bus_master.is_none() || !disk.info.dma) {
            return Err(DiskError::Unsupported("DMA asked for, but no bus-master registers or no DMA on the disk"));
        }
        Ok(disk)
    }

    /// Gives the channel back (see the `Drop` impl, which does it on every
    /// path, errors included).
    pub fn close(self) {}

    fn reg(&self, r: u16) -> u16 {
        self.channel.command + r
    }

    fn status(&self) -> u8 {
        self.hal.inb(self.reg(STATUS_COMMAND))
    }

    /// Alternate status: reading it does not clear a pending interrupt, and
    /// four reads make the 400 ns a device needs after selection.
    fn settle(&self) {
        for _ in 0..4 {
            self.hal.inb(self.channel.control);
        }
    }

    fn select(&self, lba_high_nibble: u8) {
        let dev = 0xE0 | if self.drive == Drive::Slave { 0x10 } else { 0 } | (lba_high_nibble & 0x0F);
        self.hal.outb(self.reg(DEVICE), dev);
        self.settle();
    }

    fn wait_not_busy(&self, command: u8, lba: u64, us: u64) -> Result<u8, DiskError> {
        let mut st = 0;
        if poll(&self.hal, us, || {
            st = self.status();
            st & status::BSY == 0
        }) {
            Ok(st)
        } else {
            self.reset();
            Err(DiskError::Timeout { command, lba, waiting_for: "BSY to clear" })
        }
    }

    fn device_error(&self, command: u8, lba: u64, st: u8) -> DiskError {
        DiskError::Device { command, lba, status: st, error: self.hal.inb(self.reg(ERROR)) }
    }

    /// Software reset of the channel (SRST), after a timeout.
    fn reset(&self) {
        self.hal.outb(self.channel.control, NIEN | SRST);
        let t = self.hal.now_us();
        poll(&self.hal, 100, || self.hal.now_us() >= t + 5);
        self.hal.outb(self.channel.control, NIEN);
        poll(&self.hal, 2_000_000, || self.status() & status::BSY == 0);
    }

    fn identify(&mut self) -> Result<(), DiskError> {
        self.select(0);
        let st = self.status();
        if st == 0xFF || st == 0x7F {
            return Err(DiskError::NoDevice); // floating bus: no device
        }
        for r in [COUNT, LBA0, LBA1, LBA2] {
            self.hal.outb(self.reg(r), 0);
        }
        self.hal.outb(self.reg(STATUS_COMMAND), ata::IDENTIFY);
        if self.status() == 0 {
            return Err(DiskError::NoDevice);
        }
        let st = self.wait_not_busy(ata::IDENTIFY, 0, 5_000_000)?;
        // ATAPI and SATA bridges answer with a signature in LBA1/LBA2.
        if self.hal.inb(self.reg(LBA1)) != 0 || self.hal.inb(self.reg(LBA2)) != 0 {
            return Err(DiskError::Unsupported("not an ATA disk (ATAPI signature)"));
        }
        if st & status::ERR != 0 {
            return Err(self.device_error(ata::IDENTIFY, 0, st));
        }
        self.wait_drq(ata::IDENTIFY, 0)?;
        let mut words = [0u16; 256];
        self.hal.inw_repeat(self.reg(DATA), &mut words);
        self.info = ata::parse_identify(&words)?;
        Ok(())
    }

    fn wait_drq(&self, command: u8, lba: u64) -> Result<(), DiskError> {
        let st = self.wait_not_busy(command, lba, COMMAND_US)?;
        if st & (status::ERR | status::DF) != 0 {
            return Err(self.device_error(command, lba, st));
        }
        if st & status::DRQ == 0 {
            return Err(DiskError::Device { command, lba, status: st, error: 0 });
        }
        Ok(())
    }

    /// Loads the task file for a command on `count` sectors at `lba`.
    fn task_file(&self, lba: u64, count: u64) {
        if self.info.lba48 {
            self.select(0);
            let c = count as u16; // 65536 encodes as 0
            // 48-bit: high-order bytes first (the "previous" register
            // contents), then low-order (ATA8-ACS 4.14, 48-bit addressing).
            self.hal.outb(self.reg(COUNT), (c >> 8) as u8);
            self.hal.outb(self.reg(LBA0), (lba >> 24) as u8);
            self.hal.outb(self.reg(LBA1), (lba >> 32) as u8);
            self.hal.outb(self.reg(LBA2), (lba >> 40) as u8);
            self.hal.outb(self.reg(COUNT), c as u8);
        } else {
            self.select((lba >> 24) as u8);
            self.hal.outb(self.reg(COUNT), count as u8); // 256 encodes as 0
        }
        self.hal.outb(self.reg(LBA0), lba as u8);
        self.hal.outb(self.reg(LBA1), (lba >> 8) as u8);
        self.hal.outb(self.reg(LBA2), (lba >> 16) as u8);
        // Device register again: LBA mode (and bits 27:24 for 28-bit).
        let high = if self.info.lba48 { 0 } else { (lba >> 24) as u8 };
        let dev = 0xE0 | if self.drive == Drive::Slave { 0x10 } else { 0 } | (high & 0x0F);
        self.hal.outb(self.reg(DEVICE), dev);
    }

    fn pio(&mut self, dir: Direction, lba: u64, count: u64, data: &mut Pieces) -> Result<(), DiskError> {
        let command = match (dir, self.info.lba48) {
            (Direction::Read, true) => ata::READ_SECTORS_EXT,
            (Direction::Write, true) => ata::WRITE_SECTORS_EXT,
            (Direction::Read, false) => ata::READ_SECTORS,
            (Direction::Write, false) => ata::WRITE_SECTORS,
        };
        self.task_file(lba, count);
        self.hal.outb(self.reg(STATUS_COMMAND), command);
        for i in 0..count {
            self.settle();
            self.wait_drq(command, lba + i)?;
            let piece = data.next_piece(SECTOR, None).expect("request sized to the data");
            let ptr = self.hal.phys_to_virt(piece.addr).cast::<u16>();
            // SAFETY: the caller handed us this physical range for the
            // transfer (BlockDevice::transfer); Hal::phys_to_virt maps it,
            // and check_request made it 512-aligned and 512 long.
            let words = unsafe { core::slice::from_raw_parts_mut(ptr, 256) };
            match dir {
                Direction::Read => self.hal.inw_repeat(self.reg(DATA), words),
                Direction::Write => self.hal.outw_repeat(self.reg(DATA), words),
            }
        }
        self.settle();
        let st = self.wait_not_busy(command, lba, COMMAND_US)?;
        if st & (status::ERR | status::DF) != 0 {
            return Err(self.device_error(command, lba, st));
        }
        Ok(())
    }

    fn dma(&mut self, dir: Direction, lba: u64, count: u64, data: &mut Pieces) -> Result<(), DiskError> {
        let bm = self.channel.bus_master.expect("checked at open");
        let command = ata::dma_command(dir == Direction::Write, self.info.lba48);
        let mut left = count * SECTOR;
        let mut n = 0;
        while left > 0 {
            let piece = data.next_piece(left.min(PRD_MAX), Some(PRD_MAX)).expect("request sized to the data");
            if (piece.addr + piece.len - 1) >> 32 != 0 {
                return Err(DiskError::BadSegment(piece)); // PRDs hold 32-bit addresses
            }
            self.mem.prdt[n] = Prd { base: piece.addr as u32, count: piece.len as u16, flags: 0 };
            left -= piece.len;
            n += 1;
        }
        self.mem.prdt[n - 1].flags = 0x8000; // end of table
        let table = self.hal.virt_to_phys(self.mem.prdt.as_ptr().cast());
        if table >> 32 != 0 {
            // BMIDTP holds 32 bits: a higher table would be truncated.
            return Err(DiskError::BadSegment(Segment::part(table, size_of::<IdeMemory>() as u64)));
        }
        let to_memory = if dir == Direction::Read { BMIC_TO_MEMORY } else { 0 };
        fence(Ordering::SeqCst);
        self.hal.outb(bm + BMIC, to_memory); // stopped, direction set
        self.hal.outl(bm + BMIDTP, table as u32);
        self.hal.outb(bm + BMIS, BMIS_ERROR | BMIS_INTERRUPT); // write 1 to clear
        self.task_file(lba, count);
        self.hal.outb(self.reg(STATUS_COMMAND), command);
        self.hal.outb(bm + BMIC, to_memory | BMIC_START);
        let mut bmis = 0;
        let finished = poll(&self.hal, COMMAND_US, || {
            bmis = self.hal.inb(bm + BMIS);
            bmis & (BMIS_INTERRUPT | BMIS_ERROR) != 0 || bmis & BMIS_ACTIVE == 0
        });
        self.hal.outb(bm + BMIC, to_memory); // stop the engine in every case
        fence(Ordering::SeqCst);
        if !finished {
            self.reset();
            return Err(DiskError::Timeout { command, lba, waiting_for: "bus-master DMA" });
        }
        let st = self.wait_not_busy(command, lba, COMMAND_US)?;
        self.hal.outb(bm + BMIS, BMIS_ERROR | BMIS_INTERRUPT);
        if st & (status::ERR | status::DF) != 0 {
            return Err(self.device_error(command, lba, st));
        }
        if bmis & BMIS_ERROR != 0 {
            return Err(DiskError::Interface { command, lba, detail: bmis as u32 });
        }
        Ok(())
    }
}

impl<H: Hal> Drop for IdeDisk<'_, H> {
    /// Gives the channel back as the OS's driver keeps it: bus master
    /// stopped, and device interrupts on again. The device control register
    /// cannot be read back, so ksave writes what Linux's libata leaves
    /// there (`ap->ctl = ATA_DEVCTL_OBS`, drivers/ata/libata-sff.c) and
    /// caches as its last value.
    fn drop(&mut self) {
        if let Some(bm) = self.channel.bus_master {
            self.hal.outb(bm + BMIC, 0);
        }
        self.hal.outb(self.channel.control, DEVCTL_OBS);
    }
}

impl<H: Hal> BlockDevice for IdeDisk<'_, H> {
    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn transfer(&mut self, dir: Direction, lba: u64, segments: &[Segment]) -> Result<(), DiskError> {
        let total = check_request(&self.info, lba, segments)?;
        let max = if self.info.lba48 { ata::MAX_SECTORS_LBA48 } else { ata::MAX_SECTORS_LBA28 };
        let mut data = Pieces::new(segments);
        let mut done = 0;
        while done < total {
            let at = lba + done;
            let count = match self.mode {
                Mode::Pio => (total - done).min(max),
                Mode::Dma => data.fit_blocks((total - done).min(max), crate::SECTOR, PRD_ENTRIES, PRD_MAX, Some(PRD_MAX)),
            };
            if !self.info.lba48 && at + count > ata::LBA28_LIMIT {
                return Err(DiskError::Unsupported("LBA beyond 28 bits on a disk without LBA48"));
            }
            match self.mode {
                Mode::Pio => self.pio(dir, at, count, &mut data)?,
                Mode::Dma => self.dma(dir, at, count, &mut data)?,
            }
            done += count;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        let command = if self.info.lba48 { ata::FLUSH_CACHE_EXT } else { ata::FLUSH_CACHE };
        self.select(0);
        self.hal.outb(self.reg(STATUS_COMMAND), command);
        self.settle();
        let st = self.wait_not_busy(command, 0, COMMAND_US)?;
        if st & (status::ERR | status::DF) != 0 {
            return Err(self.device_error(command, 0, st));
        }
        Ok(())
    }
}
