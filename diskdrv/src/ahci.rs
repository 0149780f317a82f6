//! A polling AHCI driver (Serial ATA AHCI 1.3.1) for one port of one HBA.
//!
//! One command at a time in slot 0, each with up to [`PRDT_ENTRIES`]
//! scatter-gather entries, polled to completion. Every register the driver
//! changes is saved when a port is opened and put back when it is closed, so
//! the kernel that owns the HBA finds it as it left it.

use core::sync::atomic::{Ordering, fence};

use crate::ata::{self, status};
use crate::hal::poll;
use crate::{BlockDevice, Direction, DiskError, DiskInfo, Hal, Pieces, Segment, check_request};

/// Scatter-gather entries in the one command table.
pub const PRDT_ENTRIES: usize = 1024;
/// Largest byte count of one PRD entry (DBC is 22 bits, section 4.2.3.3).
const PRD_MAX: u64 = 4 << 20;

// Generic host control registers (section 3.1).
const CAP: u64 = 0x00;
const GHC: u64 = 0x04;
const PI: u64 = 0x0C;
const CAP2: u64 = 0x24;
const BOHC: u64 = 0x28;
const CAP_S64A: u32 = 1 << 31;
const GHC_AE: u32 = 1 << 31;
const CAP2_BOH: u32 = 1 << 0;
const BOHC_BOS: u32 = 1 << 0;
const BOHC_OOS: u32 = 1 << 1;
const BOHC_BB: u32 = 1 << 4;

// Port registers (section 3.3), at 0x100 + 0x80 * port.
const PX_CLB: u64 = 0x00;
const PX_CLBU: u64 = 0x04;
const PX_FB: u64 = 0x08;
const PX_FBU: u64 = 0x0C;
const PX_IS: u64 = 0x10;
const PX_IE: u64 = 0x14;
const PX_CMD: u64 = 0x18;
const PX_TFD: u64 = 0x20;
const PX_SIG: u64 = 0x24;
const PX_SSTS: u64 = 0x28;
const PX_SCTL: u64 = 0x2C;
const PX_SERR: u64 = 0x30;
const PX_CI: u64 = 0x38;
const CMD_ST: u32 = 1 << 0;
const CMD_FRE: u32 = 1 << 4;
const CMD_FR: u32 = 1 << 14;
const CMD_CR: u32 = 1 << 15;
const IS_TFES: u32 = 1 << 30;
const IS_FATAL: u32 = (1 << 29) | (1 << 28) | (1 << 27) | (1 << 24) | (1 << 23); // HBFS HBDS IFS OFS IPMS
/// PxSIG of an ATA disk (section 3.3.9; ATAPI is 0xEB140101).
pub const SIG_ATA: u32 = 0x0000_0101;

/// Microseconds to wait for a command.
const COMMAND_US: u64 = 30_000_000;
/// Microseconds to wait for the port's engines and the link.
const PORT_US: u64 = 1_000_000;

/// One command header (section 4.2.2).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CommandHeader {
    flags: u32,
    prdbc: u32,
    ctba: u32,
    ctbau: u32,
    reserved: [u32; 4],
}

/// One physical region descriptor (section 4.2.3.3).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Prd {
    dba: u32,
    dbau: u32,
    reserved: u32,
    dbc: u32,
}

/// The command table (section 4.2.3), 128-byte aligned.
#[repr(C, align(128))]
struct CommandTable {
    cfis: [u8; 64],
    acmd: [u8; 16],
    reserved: [u8; 48],
    prdt: [Prd; PRDT_ENTRIES],
}

/// Memory the HBA reads and writes by DMA for one port: command list
/// (1 KiB aligned), received FIS area (256 aligned), one command table and
/// a sector buffer for IDENTIFY. It must stay put while a port is open.
#[repr(C, align(1024))]
pub struct AhciMemory {
    command_list: [CommandHeader; 32],
    received_fis: [u8; 256],
    identify: [u16; 256],
    table: CommandTable,
}

impl AhciMemory {
    /// Zeroed memory, for statics.
    pub const fn new() -> Self {
        Self {
            command_list: [CommandHeader { flags: 0, prdbc: 0, ctba: 0, ctbau: 0, reserved: [0; 4] }; 32],
            received_fis: [0; 256],
            identify: [0; 256],
            table: CommandTable {
                cfis: [0; 64],
                acmd: [0; 16],
                reserved: [0; 48],
                prdt: [Prd { dba: 0, dbau: 0, reserved: 0, dbc: 0 }; PRDT_ENTRIES],
            },
        }
    }
}

impl Default for AhciMemory {
    fn default() -> Self {
        Self::new()
    }
}

/// Ports of the HBA at `abar` with an ATA disk attached (link up, disk
/// signature), as a bit mask.
pub fn disk_ports(hal: &impl Hal, abar: u64) -> u32 {
    let implemented = hal.mmio_read32(abar + PI);
    (0..32)
        .filter(|&p| implemented & (1 << p) != 0)
        .filter(|&p| {
            let base = abar + 0x100 + 0x80 * p as u64;
            hal.mmio_read32(base + PX_SSTS) & 0xF == 3 && hal.mmio_read32(base + PX_SIG) == SIG_ATA
        })
        .fold(0, |mask, p| mask | 1 << p)
}

/// Port registers as found, put back on close.
#[derive(Clone, Copy, Debug)]
struct Saved {
    ghc: u32,
    clb: u32,
    clbu: u32,
    fb: u32,
    fbu: u32,
    cmd: u32,
    ie: u32,
}

/// An open AHCI port with an ATA disk behind it.
pub struct AhciDisk<'m, H: Hal> {
    hal: H,
    abar: u64,
    base: u64,
    mem: &'m mut AhciMemory,
    s64a: bool,
    info: DiskInfo,
    saved: Saved,
}

impl<'m, H: Hal> AhciDisk<'m, H> {
    /// Takes the HBA from firmware if needed, points `port` at `mem`,
    /// starts it and identifies the disk.
    ///
    /// # Safety
    /// `abar` must be the ABAR of an AHCI HBA that nothing else drives
    /// until this disk is closed, with memory decoding and bus mastering
    /// enabled; `mem` must be reachable by the HBA's DMA.
    pub unsafe fn open(hal: H, abar: u64, port: u8, mem: &'m mut AhciMemory) -> Result<Self, DiskError> {
        let base = abar + 0x100 + 0x80 * port as u64;
        if port >= 32 || hal.mmio_read32(abar + PI) & (1 << port) == 0 {
            return Err(DiskError::NoDevice);
        }
        let saved = Saved {
            ghc: hal.mmio_read32(abar + GHC),
            clb: hal.mmio_read32(base + PX_CLB),
            clbu: hal.mmio_read32(base + PX_CLBU),
            fb: hal.mmio_read32(base + PX_FB),
            fbu: hal.mmio_read32(base + PX_FBU),
            cmd: hal.mmio_read32(base + PX_CMD),
            ie: hal.mmio_read32(base + PX_IE),
        };
        let s64a = hal.mmio_read32(abar + CAP) & CAP_S64A != 0;
        let blank = DiskInfo { model: Default::default(), serial: Default::default(), blocks: 0, block_size: 512, lba48: false, dma: true };
        let mut disk = Self { hal, abar, base, mem, s64a, info: blank, saved };
        disk.take_ownership();
        disk.hal.mmio_write32(abar + GHC, disk.saved.ghc | GHC_AE);
        // On error the port may already point at `mem`: dropping `disk`
        // gives it back as found.
        disk.start_port()?;
        disk.identify()?;
        Ok(disk)
    }

    /// BIOS/OS handoff (section 10.6.3): ask firmware to let go, and wait
    /// for it if it says it is busy.
    fn take_ownership(&mut self) {
        let hal = &self.hal;
        if hal.mmio_read32(self.abar + CAP2) & CAP2_BOH == 0 {
            return;
        }
        let bohc = hal.mmio_read32(self.abar + BOHC);
        if bohc & BOHC_BOS == 0 {
            return;
        }
        hal.mmio_write32(self.abar + BOHC, bohc | BOHC_OOS);
        let released = poll(hal, 25_000, || hal.mmio_read32(self.abar + BOHC) & BOHC_BOS == 0);
        if !released && hal.mmio_read32(self.abar + BOHC) & BOHC_BB != 0 {
            poll(hal, 2_000_000, || hal.mmio_read32(self.abar + BOHC) & BOHC_BOS == 0);
        }
    }

    fn get(&self, reg: u64) -> u32 {
        self.hal.mmio_read32(self.base + reg)
    }

    fn set(&self, reg: u64, value: u32) {
        self.hal.mmio_write32(self.base + reg, value)
    }

    /// Stops the command list and FIS receive engines (section 10.1.2).
    fn stop_engines(&self) -> bool {
        self.set(PX_CMD, self.get(PX_CMD) & !CMD_ST);
        let cr = poll(&self.hal, PORT_US / 2, || self.get(PX_CMD) & CMD_CR == 0);
        self.set(PX_CMD, self.get(PX_CMD) & !CMD_FRE);
        let fr = poll(&self.hal, PORT_US / 2, || self.get(PX_CMD) & CMD_FR == 0);
        cr && fr
    }

    /// COMRESET (section 10.4.2): DET=1 for at least 1 ms, then DET=0 and
    /// wait for the link to come back.
    fn comreset(&self) -> Result<(), DiskError> {
        let sctl = self.get(PX_SCTL) & !0xF;
        self.set(PX_SCTL, sctl | 1);
        let t = self.hal.now_us();
        poll(&self.hal, 2_000, || self.hal.now_us() >= t + 1_000);
        self.set(PX_SCTL, sctl);
        if !poll(&self.hal, PORT_US, || self.get(PX_SSTS) & 0xF == 3) {
            return Err(DiskError::NoDevice);
        }
        self.set(PX_SERR, !0);
        Ok(())
    }

    /// Points the port at our memory and starts it; resets the link if the
    /// engines will not stop or the device stays busy.
    fn start_port(&mut self) -> Result<(), DiskError> {
        // No link (PxSSTS.DET != 3): one COMRESET, in case power management
        // or firmware left the PHY offline; comreset says NoDevice if that
        // does not bring it up.
        if self.get(PX_SSTS) & 0xF != 3 {
            self.stop_engines();
            self.comreset()?;
        }
        if !self.stop_engines() {
            self.comreset()?;
            if !self.stop_engines() {
                return Err(DiskError::Timeout { command: 0, lba: 0, waiting_for: "port engines to stop" });
            }
        }
        let clb = self.hal.virt_to_phys(self.mem.command_list.as_ptr().cast());
        let fb = self.hal.virt_to_phys(self.mem.received_fis.as_ptr());
        let ctba = self.hal.virt_to_phys((&raw const self.mem.table).cast());
        if !self.s64a && (clb | fb | ctba) >> 32 != 0 {
            return Err(DiskError::BadSegment(Segment::part(clb, size_of::<AhciMemory>() as u64)));
        }
        self.set(PX_CLB, clb as u32);
        self.set(PX_CLBU, (clb >> 32) as u32);
        self.set(PX_FB, fb as u32);
        self.set(PX_FBU, (fb >> 32) as u32);
        self.set(PX_IE, 0); // polled: no interrupts
        self.set(PX_SERR, !0);
        self.set(PX_IS, !0);
        self.set(PX_CMD, self.get(PX_CMD) | CMD_FRE);
        let ready = || self.get(PX_TFD) as u8 & (status::BSY | status::DRQ) == 0;
        if !poll(&self.hal, PORT_US, ready) {
            self.comreset()?;
            if !poll(&self.hal, 5 * PORT_US, ready) {
                return Err(DiskError::Timeout { command: 0, lba: 0, waiting_for: "device ready after reset" });
            }
        }
        self.set(PX_CMD, self.get(PX_CMD) | CMD_ST);
        Ok(())
    }

    /// After an error: stop, clear errors, restart (resetting if needed).
    fn recover(&mut self) {
        self.stop_engines();
        self.set(PX_SERR, !0);
        self.set(PX_IS, !0);
        let _ = self.start_port();
    }

    fn identify(&mut self) -> Result<(), DiskError> {
        let buf = Segment::part(self.hal.virt_to_phys(self.mem.identify.as_ptr().cast()), 512);
        self.command(ata::IDENTIFY, 0, 0, Direction::Read, &mut Pieces::new(&[buf]), 512)?;
        fence(Ordering::SeqCst);
        self.info = ata::parse_identify(&self.mem.identify)?;
        Ok(())
    }

    /// Issues one command in slot 0 with up to `bytes` of `data` and polls
    /// it to completion.
    fn command(&mut self, command: u8, lba: u64, count: u64, dir: Direction, data: &mut Pieces, bytes: u64) -> Result<(), DiskError> {
        let mut prds = 0;
        let mut left = bytes;
        while left > 0 && prds < PRDT_ENTRIES {
            let Some(piece) = data.next_piece(left.min(PRD_MAX), None) else { break };
            if !self.s64a && (piece.addr + piece.len - 1) >> 32 != 0 {
                return Err(DiskError::BadSegment(piece));
            }
            self.mem.table.prdt[prds] = Prd {
                dba: piece.addr as u32,
                dbau: (piece.addr >> 32) as u32,
                reserved: 0,
                dbc: (piece.len - 1) as u32,
            };
            prds += 1;
            left -= piece.len;
        }
        debug_assert_eq!(left, 0, "caller sized the command to fit the PRDT");
        let fis = &mut self.mem.table.cfis;
        fis.fill(0);
        fis[0] = 0x27; // Register FIS, host to device (SATA 3.x 10.5.5)
        fis[1] = 0x80; // C: this is a command
        fis[2] = command;
        fis[4] = lba as u8;
        fis[5] = (lba >> 8) as u8;
        fis[6] = (lba >> 16) as u8;
        fis[7] = 0x40; // device: LBA mode
        fis[8] = (lba >> 24) as u8;
        fis[9] = (lba >> 32) as u8;
        fis[10] = (lba >> 40) as u8;
        fis[12] = count as u8; // 65536 encodes as 0
        fis[13] = (count >> 8) as u8;
        let ctba = self.hal.virt_to_phys((&raw const self.mem.table).cast());
        let write_bit = if dir == Direction::Write { 1 << 6 } else { 0 };
        self.mem.command_list[0] = CommandHeader {
            flags: (prds as u32) << 16 | write_bit | 5, // PRDTL, W, CFL = 5 dwords
            prdbc: 0,
            ctba: ctba as u32,
            ctbau: (ctba >> 32) as u32,
            reserved: [0; 4],
        };
        // The HBA must see the tables before the doorbell.
        fence(Ordering::SeqCst);
        self.set(PX_IS, !0);
        self.set(PX_CI, 1);
        let mut error = None;
        let done = poll(&self.hal, COMMAND_US, || {
            let is = self.get(PX_IS);
            if is & (IS_TFES | IS_FATAL) != 0 {
                error = Some(is);
                return true;
            }
            self.get(PX_CI) & 1 == 0
        });
        fence(Ordering::SeqCst);
        let tfd = self.get(PX_TFD);
        let (status, err) = (tfd as u8, (tfd >> 8) as u8);
        if !done {
            self.recover();
            return Err(DiskError::Timeout { command, lba, waiting_for: "command completion (PxCI)" });
        }
        if let Some(is) = error {
            let serr = self.get(PX_SERR);
            self.recover();
            return Err(if is & IS_TFES != 0 {
                DiskError::Device { command, lba, status, error: err }
            } else {
                DiskError::Interface { command, lba, detail: is | serr }
            });
        }
        if status & (status::ERR | status::DF) != 0 {
            self.recover();
            return Err(DiskError::Device { command, lba, status, error: err });
        }
        // The HBA writes the bytes it moved into the header (PRDBC, section
        // 4.2.2); a success that moved less would leave holes in the image.
        // SAFETY: the command list is ours and the HBA is done with slot 0
        // (PxCI clear); a volatile read sees what it wrote by DMA.
        let moved = unsafe { core::ptr::read_volatile(&raw const self.mem.command_list[0].prdbc) } as u64;
        if moved != bytes {
            self.recover();
            return Err(DiskError::Short { command, lba, asked: bytes, moved });
        }
        Ok(())
    }

    /// Stops the port and leaves it stopped, with interrupts off: for when the
    /// memory the firmware's command list pointed at now belongs to someone
    /// else (after a restore), and restarting it would let the HBA DMA there.
    pub fn stop(self) {
        self.stop_engines();
        self.set(PX_SERR, !0);
        self.set(PX_IS, !0);
        self.set(PX_IE, 0);
        // Not the restore of `Drop`: the saved pointers lead into memory
        // that is no longer the firmware's.
        core::mem::forget(self);
    }

    /// Stops the port and puts back every register as it was found (see
    /// the `Drop` impl, which does it on every path, errors included).
    pub fn close(self) {}

    fn restore_registers(&self) {
        self.stop_engines();
        self.set(PX_CLB, self.saved.clb);
        self.set(PX_CLBU, self.saved.clbu);
        self.set(PX_FB, self.saved.fb);
        self.set(PX_FBU, self.saved.fbu);
        self.set(PX_SERR, !0);
        self.set(PX_IS, !0);
        self.set(PX_IE, self.saved.ie);
        if self.saved.cmd & CMD_FRE != 0 {
            self.set(PX_CMD, self.get(PX_CMD) | CMD_FRE);
        }
        if self.saved.cmd & CMD_ST != 0 {
            self.set(PX_CMD, self.get(PX_CMD) | CMD_ST);
        }
        self.hal.mmio_write32(self.abar + GHC, self.saved.ghc | (self.hal.mmio_read32(self.abar + GHC) & GHC_AE));
    }
}

impl<H: Hal> Drop for AhciDisk<'_, H> {
    fn drop(&mut self) {
        self.restore_registers();
    }
}

impl<H: Hal> BlockDevice for AhciDisk<'_, H> {
    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn transfer(&mut self, dir: Direction, lba: u64, segments: &[Segment]) -> Result<(), DiskError> {
        let total = check_request(&self.info, lba, segments)?;
        let lba48 = self.info.lba48;
        let max = if lba48 { ata::MAX_SECTORS_LBA48 } else { ata::MAX_SECTORS_LBA28 };
        let command = ata::dma_command(dir == Direction::Write, lba48);
        let mut data = Pieces::new(segments);
        let mut done = 0;
        while done < total {
            // As many sectors as fit the count field and the PRDT.
            let count = data.fit_blocks((total - done).min(max), crate::SECTOR, PRDT_ENTRIES, PRD_MAX, None);
            let at = lba + done;
            if !lba48 && at + count > ata::LBA28_LIMIT {
                return Err(DiskError::Unsupported("LBA beyond 28 bits on a disk without LBA48"));
            }
            self.command(command, at, count, dir, &mut data, count * crate::SECTOR)?;
            done += count;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        let command = if self.info.lba48 { ata::FLUSH_CACHE_EXT } else { ata::FLUSH_CACHE };
        self.command(command, 0, 0, Direction::Write, &mut Pieces::new(&[]), 0)
    }
}
