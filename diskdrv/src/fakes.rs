//! Register-level fakes for host tests: PCI configuration space, an AHCI
//! HBA, IDE channels and an NVMe controller, each backed by in-memory
//! disks.
//!
//! On the host a "physical address" is the address of the byte in this
//! process: the fakes do their DMA through raw pointers to the buffers the
//! drivers were given, exactly where a device would.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::vec;
use std::vec::Vec;

use crate::Hal;
use crate::ata::{self, identify_data};

mod nvme;
mod virtio;
pub use nvme::{Namespace, NvmeController, NvmeFaults, NvmeStats};
pub use virtio::{VirtioBlkDevice, VirtioSetup, VirtioStats};

/// An in-memory disk, shared with the test so it can look at the bytes.
pub type Disk = Rc<RefCell<SparseDisk>>;

/// A zeroed disk of `sectors` sectors.
pub fn disk(sectors: u64) -> Disk {
    Rc::new(RefCell::new(SparseDisk { sectors, written: BTreeMap::new() }))
}

/// A disk that stores only the sectors ever written, so a test can have a
/// disk larger than 2^28 sectors (128 GiB).
pub struct SparseDisk {
    /// Capacity in sectors.
    pub sectors: u64,
    written: BTreeMap<u64, [u8; 512]>,
}

impl SparseDisk {
    /// The contents of sector `lba` (zeros if never written).
    pub fn sector(&self, lba: u64) -> [u8; 512] {
        assert!(lba < self.sectors, "sector {lba} beyond the disk");
        self.written.get(&lba).copied().unwrap_or([0; 512])
    }

    /// Stores sector `lba`.
    pub fn set_sector(&mut self, lba: u64, data: &[u8]) {
        assert!(lba < self.sectors, "sector {lba} beyond the disk");
        self.written.insert(lba, data.try_into().expect("one sector"));
    }

    /// Bytes of `count` sectors from `lba`.
    pub fn bytes(&self, lba: u64, count: u64) -> Vec<u8> {
        (lba..lba + count).flat_map(|l| self.sector(l)).collect()
    }

    /// Numbers of the sectors ever written.
    pub fn written(&self) -> impl Iterator<Item = u64> + '_ {
        self.written.keys().copied()
    }
}

/// What a fake device should get wrong.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Fail (ERR, IDNF) any write touching this LBA.
    pub write_error_at: Option<u64>,
    /// Fail (ERR, UNC) any read touching this LBA.
    pub read_error_at: Option<u64>,
    /// Accept commands but never finish them.
    pub hang: bool,
    /// Stay busy until the link (AHCI) or channel (IDE) is reset.
    pub busy_until_reset: bool,
    /// AHCI: complete reads and writes but report one sector less in PRDBC.
    pub short_count: bool,
}

/// The whole fake machine behind a [`FakeHal`].
#[derive(Default)]
pub struct Machine {
    clock: Cell<u64>,
    pci_address: Cell<u32>,
    /// Config space by (bus, device, function).
    pub pci: RefCell<BTreeMap<(u8, u8, u8), [u32; 64]>>,
    /// The AHCI HBA, mapped at [`Machine::ABAR`].
    pub hba: RefCell<Option<Hba>>,
    /// IDE channels by command block base port.
    pub ide: RefCell<BTreeMap<u16, IdeChannel>>,
    /// The NVMe controller, mapped at [`Machine::NVME_BAR`].
    pub nvme: RefCell<Option<NvmeController>>,
    /// The virtio-blk device, mapped at [`Machine::VIRTIO_BAR`].
    pub virtio: RefCell<Option<VirtioBlkDevice>>,
    /// A VT-d remapping unit, mapped at [`Machine::VTD_BASE`].
    pub vtd: RefCell<Option<FakeVtd>>,
}

/// A VT-d remapping unit's global command and status (VT-d 11.4.4-5):
/// status follows the command's persistent bits, so a command that drops
/// one (queued invalidation, interrupt remapping) turns that feature off.
#[derive(Clone, Debug, Default)]
pub struct FakeVtd {
    /// GSTS.
    pub gsts: u32,
    /// Every GCMD written.
    pub commands: Vec<u32>,
    /// What a read at 0x18 returns (AMD-Vi's control register, for the
    /// AMD-Vi test: VT-d's GCMD there is write-only).
    pub control: u32,
}

impl Machine {
    /// Where the fake HBA's registers are.
    pub const ABAR: u64 = 0xFEB0_0000;
    /// Bus-master IDE base of the fake IDE controller.
    pub const BMIDE: u16 = 0xC040;
    /// Where the fake NVMe controller's registers are (16 KiB).
    pub const NVME_BAR: u64 = 0xFEC0_0000;
    /// Where the fake virtio-blk device's BAR 4 is (16 KiB).
    pub const VIRTIO_BAR: u64 = 0xFED0_0000;
    /// Where the fake VT-d unit's registers are (4 KiB).
    pub const VTD_BASE: u64 = 0xFED9_0000;
}

/// The fakes' HAL. Clones share one machine.
#[derive(Clone, Default)]
pub struct FakeHal(pub Rc<Machine>);

// SAFETY: the fakes emulate devices in this process; "physical" addresses
// are this process's addresses, so virt_to_phys and phys_to_virt are the
// identity the contract asks for, and the clock only moves forward.
unsafe impl Hal for FakeHal {
    fn inb(&self, port: u16) -> u8 {
        self.io_read(port, 1) as u8
    }
    fn inw(&self, port: u16) -> u16 {
        self.io_read(port, 2) as u16
    }
    fn inl(&self, port: u16) -> u32 {
        self.io_read(port, 4)
    }
    fn outb(&self, port: u16, value: u8) {
        self.io_write(port, 1, value as u32)
    }
    fn outw(&self, port: u16, value: u16) {
        self.io_write(port, 2, value as u32)
    }
    fn outl(&self, port: u16, value: u32) {
        self.io_write(port, 4, value)
    }
    fn mmio_read8(&self, addr: u64) -> u8 {
        self.mmio_read(addr, 1) as u8
    }
    fn mmio_write8(&self, addr: u64, value: u8) {
        self.mmio_write(addr, 1, value as u32)
    }
    fn mmio_read16(&self, addr: u64) -> u16 {
        self.mmio_read(addr, 2) as u16
    }
    fn mmio_write16(&self, addr: u64, value: u16) {
        self.mmio_write(addr, 2, value as u32)
    }
    fn mmio_read32(&self, addr: u64) -> u32 {
        self.mmio_read(addr, 4)
    }
    fn mmio_write32(&self, addr: u64, value: u32) {
        self.mmio_write(addr, 4, value)
    }
    fn virt_to_phys(&self, ptr: *const u8) -> u64 {
        ptr as u64
    }
    fn phys_to_virt(&self, addr: u64) -> *mut u8 {
        addr as *mut u8
    }
    fn now_us(&self) -> u64 {
        // Time passes as the driver polls: 50 us a look at the clock.
        let t = self.0.clock.get() + 50;
        self.0.clock.set(t);
        t
    }
}

impl FakeHal {
    /// Adds a PCI function with the given class and BARs.
    pub fn add_pci(&self, at: (u8, u8, u8), ids: (u16, u16), class: (u8, u8, u8), bars: [u32; 6]) {
        let mut space = [0u32; 64];
        space[0] = (ids.1 as u32) << 16 | ids.0 as u32;
        space[2] = (class.0 as u32) << 24 | (class.1 as u32) << 16 | (class.2 as u32) << 8;
        space[4..10].copy_from_slice(&bars);
        self.0.pci.borrow_mut().insert(at, space);
    }

    /// Installs an AHCI HBA with `ports` ports, disks on some of them.
    pub fn add_hba(&self, hba: Hba) {
        *self.0.hba.borrow_mut() = Some(hba);
    }

    fn mmio_read(&self, addr: u64, width: u8) -> u32 {
        if (Machine::VIRTIO_BAR..Machine::VIRTIO_BAR + 0x4000).contains(&addr) {
            let dev = self.0.virtio.borrow();
            return dev.as_ref().expect("MMIO read with no fake virtio device").read(addr - Machine::VIRTIO_BAR, width);
        }
        assert_eq!(width, 4, "AHCI, NVMe and VT-d registers are read as dwords");
        if (Machine::VTD_BASE..Machine::VTD_BASE + 0x1000).contains(&addr) {
            let vtd = self.0.vtd.borrow();
            let vtd = vtd.as_ref().expect("MMIO read with no fake VT-d unit");
            return match addr - Machine::VTD_BASE {
                0x1C => vtd.gsts,
                0x18 => vtd.control,
                _ => 0,
            };
        }
        if (Machine::NVME_BAR..Machine::NVME_BAR + 0x4000).contains(&addr) {
            let nvme = self.0.nvme.borrow();
            return nvme.as_ref().expect("MMIO read with no fake NVMe controller").read(addr - Machine::NVME_BAR);
        }
        let mut hba = self.0.hba.borrow_mut();
        let hba = hba.as_mut().expect("MMIO read with no fake HBA");
        hba.read(addr - Machine::ABAR)
    }

    fn mmio_write(&self, addr: u64, width: u8, value: u32) {
        if (Machine::VIRTIO_BAR..Machine::VIRTIO_BAR + 0x4000).contains(&addr) {
            let mut dev = self.0.virtio.borrow_mut();
            return dev.as_mut().expect("MMIO write with no fake virtio device").write(addr - Machine::VIRTIO_BAR, width, value);
        }
        assert_eq!(width, 4, "AHCI, NVMe and VT-d registers are written as dwords");
        if (Machine::VTD_BASE..Machine::VTD_BASE + 0x1000).contains(&addr) {
            let mut vtd = self.0.vtd.borrow_mut();
            let vtd = vtd.as_mut().expect("MMIO write with no fake VT-d unit");
            assert_eq!(addr - Machine::VTD_BASE, 0x18, "only GCMD is written");
            assert_eq!(value & (1 << 30 | 1 << 29 | 1 << 27 | 1 << 24), 0, "one-shot commands written with TE");
            vtd.commands.push(value);
            vtd.gsts = value & (1 << 31 | 1 << 26 | 1 << 25 | 1 << 23);
            return;
        }
        if (Machine::NVME_BAR..Machine::NVME_BAR + 0x4000).contains(&addr) {
            let mut nvme = self.0.nvme.borrow_mut();
            return nvme.as_mut().expect("MMIO write with no fake NVMe controller").write(addr - Machine::NVME_BAR, value);
        }
        let mut hba = self.0.hba.borrow_mut();
        let hba = hba.as_mut().expect("MMIO write with no fake HBA");
        hba.write(addr - Machine::ABAR, value)
    }

    /// Installs a virtio-blk device at PCI `at` with its BAR 4 at
    /// [`Machine::VIRTIO_BAR`] and the vendor capabilities that say where
    /// its structures are (virtio 1.1, 4.1.4).
    pub fn add_virtio_blk(&self, at: (u8, u8, u8), device: VirtioBlkDevice) {
        let bar4 = Machine::VIRTIO_BAR as u32 | 0b100; // 64-bit memory
        self.add_pci(at, (0x1AF4, 0x1042), (0x01, 0x00, 0x00), [0, 0, 0, 0, bar4, 0]);
        let mut pci = self.0.pci.borrow_mut();
        let space = pci.get_mut(&at).unwrap();
        space[1] = 0x0010_0000; // status: capability list
        space[0x34 / 4] = 0x40;
        let cap = |next: u32, len: u32, kind: u32| 0x09 | next << 8 | len << 16 | kind << 24;
        space[0x40 / 4..0x50 / 4].copy_from_slice(&[cap(0x50, 16, 1), 4, virtio::COMMON as u32, 0x38]);
        space[0x50 / 4..0x60 / 4].copy_from_slice(&[cap(0x60, 16, 4), 4, virtio::DEVICE as u32, 0x40]);
        space[0x60 / 4..0x74 / 4].copy_from_slice(&[cap(0, 20, 2), 4, virtio::NOTIFY as u32, 0x100, virtio::NOTIFY_MULTIPLIER]);
        drop(pci);
        *self.0.virtio.borrow_mut() = Some(device);
    }

    /// Installs an NVMe controller at [`Machine::NVME_BAR`].
    pub fn add_nvme(&self, controller: NvmeController) {
        *self.0.nvme.borrow_mut() = Some(controller);
    }

    /// Installs an IDE channel at its command block base.
    pub fn add_ide(&self, channel: IdeChannel) {
        self.0.ide.borrow_mut().insert(channel.command, channel);
    }

    fn io_read(&self, port: u16, width: u8) -> u32 {
        match port {
            0xCFC..=0xCFF => {
                let a = self.0.pci_address.get();
                let key = ((a >> 16) as u8, (a >> 11 & 0x1F) as u8, (a >> 8 & 7) as u8);
                let dword = self.0.pci.borrow().get(&key).map_or(!0, |s| s[(a as usize & 0xFC) / 4]);
                dword >> (8 * (port - 0xCFC)) & mask(width)
            }
            _ => {
                let mut ide = self.0.ide.borrow_mut();
                let (base, ch) = find_channel(&mut ide, port).unwrap_or_else(|| panic!("read of unclaimed port {port:#x}"));
                ch.read(port - base, width)
            }
        }
    }

    fn io_write(&self, port: u16, width: u8, value: u32) {
        match port {
            0xCF8 => self.0.pci_address.set(value),
            0xCFC..=0xCFF => {
                let a = self.0.pci_address.get();
                let key = ((a >> 16) as u8, (a >> 11 & 0x1F) as u8, (a >> 8 & 7) as u8);
                if let Some(space) = self.0.pci.borrow_mut().get_mut(&key) {
                    let reg = (a as usize & 0xFC) / 4;
                    let shift = 8 * (port - 0xCFC) as u32;
                    space[reg] = space[reg] & !(mask(width) << shift) | (value & mask(width)) << shift;
                }
            }
            _ => {
                let mut ide = self.0.ide.borrow_mut();
                let (base, ch) = find_channel(&mut ide, port).unwrap_or_else(|| panic!("write of unclaimed port {port:#x}"));
                ch.write(port - base, width, value)
            }
        }
    }
}

fn mask(width: u8) -> u32 {
    if width == 4 { !0 } else { (1 << (8 * width as u32)) - 1 }
}

/// Finds the channel owning `port` and returns the base that `port` is
/// relative to: command block ports as 0-7, control as 0x100, bus master
/// as 0x200 + offset.
fn find_channel(ide: &mut BTreeMap<u16, IdeChannel>, port: u16) -> Option<(u16, &mut IdeChannel)> {
    for ch in ide.values_mut() {
        if (ch.command..ch.command + 8).contains(&port) {
            return Some((ch.command, ch));
        }
        if port == ch.control {
            return Some((ch.control - 0x100, ch));
        }
        if let Some(bm) = ch.bus_master
            && (bm..bm + 8).contains(&port)
        {
            return Some((bm - 0x200, ch));
        }
    }
    None
}

/// Copies between a disk and the DMA regions a driver described. Regions
/// may split sectors (IDE PRDs at 64 KiB boundaries), so go byte-wise
/// through a sector-sized window.
fn dma(disk: &Disk, lba: u64, regions: &[(u64, u64)], to_memory: bool) {
    let mut disk = disk.borrow_mut();
    let mut pos = lba * 512;
    for &(addr, len) in regions {
        // SAFETY: test-only; addr/len describe a buffer the driver under
        // test owns and handed to the "device" for this command.
        let mem = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len as usize) };
        let mut done = 0usize;
        while done < mem.len() {
            let (sector, offset) = (pos / 512, (pos % 512) as usize);
            let n = (512 - offset).min(mem.len() - done);
            let mut data = disk.sector(sector);
            if to_memory {
                mem[done..done + n].copy_from_slice(&data[offset..offset + n]);
            } else {
                data[offset..offset + n].copy_from_slice(&mem[done..done + n]);
                disk.set_sector(sector, &data);
            }
            done += n;
            pos += n as u64;
        }
    }
}

fn touches(at: Option<u64>, lba: u64, count: u64) -> bool {
    at.is_some_and(|x| (lba..lba + count).contains(&x))
}

// ------------------------------------------------------------------ AHCI

/// A fake AHCI HBA (registers per AHCI 1.3.1 section 3).
pub struct Hba {
    /// CAP (S64A in bit 31).
    pub cap: u32,
    ghc: u32,
    /// Ports.
    pub ports: Vec<HbaPort>,
    /// Commands completed, for assertions.
    pub commands: u32,
    /// Most PRD entries seen in one command.
    pub max_prds: u32,
}

/// One fake port.
#[derive(Default)]
pub struct HbaPort {
    regs: [u32; 32],
    /// The disk behind it, if any.
    pub disk: Option<Disk>,
    /// What it gets wrong.
    pub faults: Faults,
    /// COMRESETs seen.
    pub comresets: u32,
}

impl Hba {
    /// An HBA whose port `i` has `disks[i]`; 64-bit addressing if `s64a`.
    pub fn new(disks: Vec<Option<Disk>>, s64a: bool) -> Self {
        let ports = disks
            .into_iter()
            .map(|disk| {
                let mut p = HbaPort { disk, ..Default::default() };
                if p.disk.is_some() {
                    p.regs[0x28 / 4] = 0x113; // SSTS: DET=3, gen 1, active
                    p.regs[0x24 / 4] = 0x101; // SIG: ATA disk
                    p.regs[0x20 / 4] = 0x50; // TFD: DRDY
                }
                p
            })
            .collect::<Vec<_>>();
        Self { cap: if s64a { 1 << 31 } else { 0 } | (ports.len() as u32 - 1), ghc: 0, ports, commands: 0, max_prds: 0 }
    }

    fn read(&mut self, off: u64) -> u32 {
        match off {
            0x00 => self.cap,
            0x04 => self.ghc,
            0x0C => (1u32 << self.ports.len()) - 1,
            0x24 | 0x28 => 0,
            o if o >= 0x100 => {
                let (p, r) = (((o - 0x100) / 0x80) as usize, ((o - 0x100) % 0x80 / 4) as usize);
                self.ports[p].regs[r]
            }
            _ => 0,
        }
    }

    fn write(&mut self, off: u64, v: u32) {
        if off == 0x04 {
            self.ghc = v;
            return;
        }
        if off < 0x100 {
            return;
        }
        let (p, r) = (((off - 0x100) / 0x80) as usize, ((off - 0x100) % 0x80 / 4) as usize);
        let port = &mut self.ports[p];
        match r * 4 {
            0x10 | 0x30 => port.regs[r] &= !v, // IS, SERR: write 1 to clear
            0x18 => {
                // CMD: CR follows ST, FR follows FRE; stopping clears CI.
                let mut cmd = v & !((1 << 15) | (1 << 14));
                if v & 1 != 0 {
                    cmd |= 1 << 15;
                } else {
                    port.regs[0x38 / 4] = 0;
                }
                if v & (1 << 4) != 0 {
                    cmd |= 1 << 14;
                }
                port.regs[r] = cmd;
            }
            0x20 | 0x24 | 0x28 => {} // read-only
            0x2C => {
                port.regs[r] = v;
                if v & 0xF == 1 {
                    port.regs[0x28 / 4] = 0; // link down while DET=1
                } else if port.disk.is_some() {
                    port.regs[0x28 / 4] = 0x113;
                    port.regs[0x20 / 4] = 0x50;
                    port.faults.busy_until_reset = false;
                    port.comresets += 1;
                }
            }
            0x38 => {
                port.regs[r] |= v;
                if v & 1 != 0 && port.regs[0x18 / 4] & 1 != 0 {
                    self.execute(p);
                }
            }
            _ => port.regs[r] = v,
        }
        let port = &mut self.ports[p];
        if port.faults.busy_until_reset {
            port.regs[0x20 / 4] = 0x80;
        }
    }

    /// Runs the command in slot 0 of port `p` (section 5.5).
    fn execute(&mut self, p: usize) {
        let port = &mut self.ports[p];
        if port.faults.hang || port.faults.busy_until_reset {
            return;
        }
        let clb = (port.regs[1] as u64) << 32 | port.regs[0] as u64;
        // SAFETY: test-only; CLB points at the AhciMemory the driver owns,
        // and the header and table it describes are laid out per section 4.
        let (flags, ctba) = unsafe {
            let h = clb as *const u32;
            (*h, (*h.add(3) as u64) << 32 | *h.add(2) as u64)
        };
        let prdtl = flags >> 16;
        // SAFETY: as above; the command table holds the FIS and PRDT.
        let fis = unsafe { std::slice::from_raw_parts(ctba as *const u8, 20) };
        let regions: Vec<(u64, u64)> = (0..prdtl as usize)
            .map(|i| {
                // SAFETY: as above; PRDTL entries follow at offset 0x80.
                let e = unsafe { std::slice::from_raw_parts((ctba + 0x80 + 16 * i as u64) as *const u32, 4) };
                ((e[1] as u64) << 32 | e[0] as u64, (e[3] & 0x3F_FFFF) as u64 + 1)
            })
            .collect();
        self.max_prds = self.max_prds.max(prdtl);
        self.commands += 1;
        let port = &mut self.ports[p];
        let lba = (0..6).fold(0u64, |acc, i| acc | (fis[[4, 5, 6, 8, 9, 10][i]] as u64) << (8 * i));
        let count = match (fis[12] as u64) | (fis[13] as u64) << 8 {
            0 => 65536,
            c => c,
        };
        let disk = port.disk.clone().expect("command to an empty port");
        let bytes: u64 = regions.iter().map(|r| r.1).sum();
        let result = match fis[2] {
            ata::IDENTIFY => {
                let sectors = disk.borrow().sectors;
                let words = identify_data("FAKE AHCI DISK", "F1", sectors, true);
                let mut raw = [0u8; 512];
                for (i, w) in words.iter().enumerate() {
                    raw[2 * i..2 * i + 2].copy_from_slice(&w.to_le_bytes());
                }
                // SAFETY: test-only; one 512-byte PRD given for IDENTIFY.
                unsafe { std::ptr::copy_nonoverlapping(raw.as_ptr(), regions[0].0 as *mut u8, 512) };
                Ok(())
            }
            ata::READ_DMA_EXT | ata::WRITE_DMA_EXT => {
                let write = fis[2] == ata::WRITE_DMA_EXT;
                let end = disk.borrow().sectors;
                if bytes != count * 512 || lba + count > end || (write && touches(port.faults.write_error_at, lba, count)) {
                    Err(0x10) // IDNF (a failed write reports it too)
                } else if !write && touches(port.faults.read_error_at, lba, count) {
                    Err(0x40) // UNC
                } else {
                    dma(&disk, lba, &regions, !write);
                    Ok(())
                }
            }
            ata::FLUSH_CACHE_EXT => Ok(()),
            _ => Err(0x04), // ABRT
        };
        match result {
            Ok(()) => {
                port.regs[0x20 / 4] = 0x50;
                port.regs[0x38 / 4] &= !1;
                let short = port.faults.short_count && matches!(fis[2], ata::READ_DMA_EXT | ata::WRITE_DMA_EXT);
                let moved = if short { bytes - 512 } else { bytes };
                // SAFETY: test-only; PRDBC is the header's second dword.
                unsafe { *((clb + 4) as *mut u32) = moved as u32 };
            }
            Err(error) => {
                port.regs[0x20 / 4] = (error as u32) << 8 | 0x51;
                port.regs[0x10 / 4] |= 1 << 30; // TFES; CI stays set until ST clears
            }
        }
    }
}

// ------------------------------------------------------------------- IDE

/// A fake IDE channel with up to two drives.
pub struct IdeChannel {
    /// Command block base.
    pub command: u16,
    /// Control block port.
    pub control: u16,
    /// Bus-master registers of this channel.
    pub bus_master: Option<u16>,
    /// Master and slave disks.
    pub drives: [Option<Disk>; 2],
    /// What the channel gets wrong.
    pub faults: Faults,
    /// Software resets seen.
    pub resets: u32,
    /// The last value written to the device control register.
    pub device_control: u8,
    /// DMA commands completed.
    pub dma_commands: u32,
    /// PIO commands completed.
    pub pio_commands: u32,
    /// Whether the drives report 48-bit LBA.
    pub lba48: bool,
    regs: [u8; 8],
    hob: [u8; 8],
    status: u8,
    error: u8,
    selected: usize,
    pio: Option<Pio>,
    dma: Option<(bool, u64, u64)>,
    bmic: u8,
    bmis: u8,
    bmidtp: u32,
}

struct Pio {
    write: bool,
    lba: u64,
    left: u64,
    buf: Vec<u8>,
    pos: usize,
    identify: bool,
}

impl IdeChannel {
    /// A channel at `command`/`control` with these drives.
    pub fn new(command: u16, control: u16, bus_master: Option<u16>, drives: [Option<Disk>; 2]) -> Self {
        Self {
            command,
            control,
            bus_master,
            drives,
            faults: Faults::default(),
            resets: 0,
            device_control: 0,
            dma_commands: 0,
            pio_commands: 0,
            lba48: true,
            regs: [0; 8],
            hob: [0; 8],
            status: 0x50,
            error: 0,
            selected: 0,
            pio: None,
            dma: None,
            bmic: 0,
            bmis: 0,
            bmidtp: 0,
        }
    }

    fn status(&self) -> u8 {
        if self.drives.iter().all(Option::is_none) {
            0xFF // floating bus
        } else if self.drives[self.selected].is_none() {
            0
        } else {
            self.status
        }
    }

    fn read(&mut self, reg: u16, width: u8) -> u32 {
        match reg {
            0 => {
                let pio = self.pio.as_mut().expect("data read with no PIO transfer");
                let v = u16::from_le_bytes([pio.buf[pio.pos], pio.buf[pio.pos + 1]]);
                pio.pos += 2;
                if pio.pos == 512 {
                    self.next_pio_sector();
                }
                v as u32
            }
            1 => self.error as u32,
            2..=6 => self.regs[reg as usize] as u32,
            7 | 0x100 => self.status() as u32,
            0x200 => self.bmic as u32,
            0x202 => self.bmis as u32,
            0x204 => self.bmidtp,
            _ => panic!("fake IDE: read of register {reg:#x} width {width}"),
        }
    }

    fn write(&mut self, reg: u16, _width: u8, v: u32) {
        match reg {
            0 => {
                let pio = self.pio.as_mut().expect("data write with no PIO transfer");
                pio.buf[pio.pos..pio.pos + 2].copy_from_slice(&(v as u16).to_le_bytes());
                pio.pos += 2;
                if pio.pos == 512 {
                    self.next_pio_sector();
                }
            }
            1..=5 => {
                self.hob[reg as usize] = self.regs[reg as usize];
                self.regs[reg as usize] = v as u8;
            }
            6 => {
                self.regs[6] = v as u8;
                self.selected = (v as usize >> 4) & 1;
            }
            7 => self.command(v as u8),
            0x100 => {
                self.device_control = v as u8;
                if v as u8 & 0x04 != 0 {
                    self.resets += 1;
                    self.faults.busy_until_reset = false;
                    self.faults.hang = false;
                    self.pio = None;
                    self.dma = None;
                    self.status = 0x50;
                }
            }
            0x200 => {
                let start = v as u8 & 1 != 0 && self.bmic & 1 == 0;
                self.bmic = v as u8;
                if start {
                    self.bmis |= 1;
                    self.run_dma();
                } else if v as u8 & 1 == 0 {
                    self.bmis &= !1;
                }
            }
            0x202 => self.bmis &= !(v as u8 & 0x06),
            0x204 => self.bmidtp = v,
            _ => panic!("fake IDE: write of register {reg:#x}"),
        }
    }

    fn lba_and_count(&self, ext: bool) -> (u64, u64) {
        let r = &self.regs;
        if ext {
            let h = &self.hob;
            let lba = r[3] as u64 | (r[4] as u64) << 8 | (r[5] as u64) << 16 | (h[3] as u64) << 24 | (h[4] as u64) << 32 | (h[5] as u64) << 40;
            let count = match r[2] as u64 | (h[2] as u64) << 8 {
                0 => 65536,
                c => c,
            };
            (lba, count)
        } else {
            let lba = r[3] as u64 | (r[4] as u64) << 8 | (r[5] as u64) << 16 | ((r[6] & 0xF) as u64) << 24;
            (lba, if r[2] == 0 { 256 } else { r[2] as u64 })
        }
    }

    fn fail(&mut self, error: u8) {
        self.status = 0x51;
        self.error = error;
        self.pio = None;
        self.dma = None;
    }

    fn command(&mut self, cmd: u8) {
        let Some(disk) = self.drives[self.selected].clone() else { return };
        if self.faults.hang || self.faults.busy_until_reset {
            self.status = 0x80;
            return;
        }
        let sectors = disk.borrow().sectors;
        let ext = matches!(cmd, ata::READ_SECTORS_EXT | ata::WRITE_SECTORS_EXT | ata::READ_DMA_EXT | ata::WRITE_DMA_EXT);
        let (lba, count) = self.lba_and_count(ext);
        let write = matches!(cmd, ata::WRITE_SECTORS | ata::WRITE_SECTORS_EXT | ata::WRITE_DMA | ata::WRITE_DMA_EXT);
        self.error = 0;
        match cmd {
            ata::IDENTIFY => {
                self.regs[4] = 0;
                self.regs[5] = 0;
                let words = identify_data("FAKE IDE DISK", "I1", sectors, self.lba48);
                let buf = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                self.pio = Some(Pio { write: false, lba: 0, left: 1, buf, pos: 0, identify: true });
                self.status = 0x58;
            }
            ata::READ_SECTORS | ata::READ_SECTORS_EXT | ata::WRITE_SECTORS | ata::WRITE_SECTORS_EXT => {
                if lba + count > sectors {
                    return self.fail(0x10);
                }
                if write && touches(self.faults.write_error_at, lba, count) {
                    return self.fail(0x10);
                }
                if !write && touches(self.faults.read_error_at, lba, count) {
                    return self.fail(0x40);
                }
                let mut pio = Pio { write, lba, left: count, buf: vec![0; 512], pos: 0, identify: false };
                if !write {
                    pio.buf.copy_from_slice(&disk.borrow().sector(lba));
                }
                self.pio = Some(pio);
                self.status = 0x58;
            }
            ata::READ_DMA | ata::READ_DMA_EXT | ata::WRITE_DMA | ata::WRITE_DMA_EXT => {
                if lba + count > sectors {
                    return self.fail(0x10);
                }
                self.dma = Some((write, lba, count));
                self.status = 0xD0; // BSY until the engine runs
            }
            ata::FLUSH_CACHE | ata::FLUSH_CACHE_EXT => self.status = 0x50,
            _ => self.fail(0x04),
        }
    }

    fn next_pio_sector(&mut self) {
        let disk = self.drives[self.selected].clone().unwrap();
        let pio = self.pio.as_mut().unwrap();
        if pio.identify {
            self.pio = None;
            self.status = 0x50;
            return;
        }
        if pio.write {
            disk.borrow_mut().set_sector(pio.lba, &pio.buf);
        }
        pio.lba += 1;
        pio.left -= 1;
        pio.pos = 0;
        if pio.left == 0 {
            self.pio = None;
            self.status = 0x50;
            self.pio_commands += 1;
        } else if !pio.write {
            pio.buf.copy_from_slice(&disk.borrow().sector(pio.lba));
        }
    }

    /// The bus-master engine: walks the PRD table and moves the data.
    fn run_dma(&mut self) {
        let Some((write, lba, count)) = self.dma.take() else { return };
        if self.faults.hang {
            return; // stays active, never interrupts
        }
        let to_memory = self.bmic & 0x08 != 0;
        assert_eq!(to_memory, !write, "BMIC direction disagrees with the command");
        let mut regions = Vec::new();
        let mut at = self.bmidtp as u64;
        loop {
            // SAFETY: test-only; BMIDTP points at the IdeMemory PRD table the
            // driver owns, 8 bytes an entry (PIIX bus-master PRD format).
            let (base, len, flags) = unsafe {
                let p = at as *const u32;
                let w = *p.add(1);
                (*p as u64, (w & 0xFFFF) as u64, w >> 16)
            };
            let len = if len == 0 { 65536 } else { len };
            assert!(base / 65536 == (base + len - 1) / 65536, "PRD crosses a 64 KiB boundary");
            regions.push((base, len));
            if flags & 0x8000 != 0 {
                break;
            }
            at += 8;
        }
        let bytes: u64 = regions.iter().map(|r| r.1).sum();
        let disk = self.drives[self.selected].clone().unwrap();
        let error = if bytes != count * 512 {
            Some(0x04)
        } else if write && touches(self.faults.write_error_at, lba, count) {
            Some(0x10)
        } else if !write && touches(self.faults.read_error_at, lba, count) {
            Some(0x40)
        } else {
            dma(&disk, lba, &regions, to_memory);
            None
        };
        self.bmis = (self.bmis & !1) | 0x04;
        match error {
            Some(e) => self.fail(e),
            None => {
                self.status = 0x50;
                self.dma_commands += 1;
            }
        }
    }
}
