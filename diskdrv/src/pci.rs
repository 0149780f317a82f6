//! PCI configuration space through configuration mechanism #1 (ports
//! 0xCF8/0xCFC, PCI Local Bus Specification 3.0, 3.2.2.3.2), and finding
//! the mass-storage controllers the drivers know.

use crate::Hal;

/// PCI vendor of virtio devices, and the block device's IDs (transitional,
/// modern; virtio 1.1, 4.1.2): discovery's, so they live with it.
pub const VIRTIO_VENDOR: u16 = 0x1AF4;
/// Device IDs of a virtio block device.
pub const VIRTIO_BLOCK_DEVICES: [u16; 2] = [0x1001, 0x1042];

const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;

/// Command register bits (PCI 3.0, 6.2.2).
pub mod command {
    /// Respond to I/O space accesses.
    pub const IO: u16 = 1 << 0;
    /// Respond to memory space accesses.
    pub const MEMORY: u16 = 1 << 1;
    /// May act as a bus master (needed for DMA).
    pub const BUS_MASTER: u16 = 1 << 2;
}

/// A function's place on the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Address {
    /// Bus number.
    pub bus: u8,
    /// Device number, 0-31.
    pub device: u8,
    /// Function number, 0-7.
    pub function: u8,
}

impl core::fmt::Display for Address {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// Reads a config-space dword (`offset` is rounded down to 4).
pub fn read32(hal: &impl Hal, at: Address, offset: u8) -> u32 {
    hal.outl(CONFIG_ADDRESS, config_address(at, offset));
    hal.inl(CONFIG_DATA)
}

/// Writes a config-space dword.
pub fn write32(hal: &impl Hal, at: Address, offset: u8, value: u32) {
    hal.outl(CONFIG_ADDRESS, config_address(at, offset));
    hal.outl(CONFIG_DATA, value);
}

fn config_address(at: Address, offset: u8) -> u32 {
    0x8000_0000 | (at.bus as u32) << 16 | (at.device as u32) << 11 | (at.function as u32) << 8 | (offset & 0xFC) as u32
}

/// One function's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    /// Where it is.
    pub address: Address,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Base class, subclass, programming interface.
    pub class: (u8, u8, u8),
}

/// Calls `found` for every function present on buses 0-255.
pub fn enumerate(hal: &impl Hal, mut found: impl FnMut(Function)) {
    for bus in 0..=255u8 {
        for device in 0..32u8 {
            let first = Address { bus, device, function: 0 };
            if read32(hal, first, 0) & 0xFFFF == 0xFFFF {
                continue;
            }
            // Header type bit 7: more functions than function 0.
            let functions = if read32(hal, first, 0x0C) >> 16 & 0x80 != 0 { 8 } else { 1 };
            for function in 0..functions {
                let address = Address { bus, device, function };
                let id = read32(hal, address, 0);
                if id & 0xFFFF == 0xFFFF {
                    continue;
                }
                let class = read32(hal, address, 0x08);
                found(Function {
                    address,
                    vendor: id as u16,
                    device: (id >> 16) as u16,
                    class: ((class >> 24) as u8, (class >> 16) as u8, (class >> 8) as u8),
                });
            }
        }
    }
}

/// A base address register's decoded value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bar {
    /// Memory space (64-bit BARs take two slots).
    Memory(u64),
    /// I/O space.
    Io(u16),
    /// Not implemented or not assigned.
    Unused,
}

/// Decodes BAR `index` (0-5) of a type 0 header.
pub fn bar(hal: &impl Hal, at: Address, index: u8) -> Bar {
    let offset = 0x10 + 4 * index;
    let low = read32(hal, at, offset);
    if low & 1 == 1 {
        let port = (low & 0xFFFC) as u16;
        return if port == 0 { Bar::Unused } else { Bar::Io(port) };
    }
    let base = (low & 0xFFFF_FFF0) as u64;
    let addr = if low >> 1 & 0b11 == 0b10 && index < 5 { base | (read32(hal, at, offset + 4) as u64) << 32 } else { base };
    if addr == 0 { Bar::Unused } else { Bar::Memory(addr) }
}

/// Sets `bits` in the command register and returns its old value, for
/// [`restore_command`].
pub fn enable(hal: &impl Hal, at: Address, bits: u16) -> u16 {
    let dword = read32(hal, at, 0x04);
    // The upper half is the status register: writing its bits back as read
    // would clear its write-one-to-clear flags, so write zeros there.
    write32(hal, at, 0x04, (dword as u16 | bits) as u32);
    dword as u16
}

/// Puts back a command register saved by [`enable`].
pub fn restore_command(hal: &impl Hal, at: Address, old: u16) {
    write32(hal, at, 0x04, old as u32);
}

/// A storage controller the drivers can drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// Class 01/06/01: SATA, AHCI 1.0 interface.
    Ahci {
        /// The function.
        function: Function,
        /// ABAR (BAR5).
        abar: u64,
    },
    /// Class 01/01: IDE.
    Ide {
        /// The function.
        function: Function,
        /// Programming interface (native/compatibility mode per channel).
        prog_if: u8,
        /// Bus-master IDE register base (BAR4), if any.
        bus_master: Option<u16>,
    },
    /// A virtio block device (vendor 1AF4, transitional or modern).
    VirtioBlk {
        /// The function.
        function: Function,
    },
    /// Class 01/08/02: NVM Express.
    Nvme {
        /// The function.
        function: Function,
        /// Controller registers (BAR0, 64-bit).
        bar: u64,
    },
}

/// The kinds of storage controller the drivers drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageKind {
    /// SATA, AHCI 1.0 interface.
    Ahci,
    /// IDE.
    Ide,
    /// NVM Express.
    Nvme,
    /// A virtio block device.
    VirtioBlk,
}

impl StorageKind {
    /// What a PCI function with these IDs and class is, if the drivers
    /// drive it. The one list: discovery here and `ksave setup` use it.
    pub fn of(vendor: u16, device: u16, class: (u8, u8, u8)) -> Option<Self> {
        if vendor == VIRTIO_VENDOR {
            return VIRTIO_BLOCK_DEVICES.contains(&device).then_some(Self::VirtioBlk);
        }
        match class {
            (0x01, 0x06, 0x01) => Some(Self::Ahci),
            (0x01, 0x01, _) => Some(Self::Ide),
            (0x01, 0x08, 0x02) => Some(Self::Nvme),
            _ => None,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ahci => "AHCI",
            Self::Ide => "IDE",
            Self::Nvme => "NVMe",
            Self::VirtioBlk => "virtio-blk",
        }
    }
}

/// Every AHCI, IDE, NVMe and virtio-blk controller, in bus order.
pub fn find_storage(hal: &impl Hal, mut found: impl FnMut(Storage)) {
    enumerate(hal, |f| match StorageKind::of(f.vendor, f.device, f.class) {
        Some(StorageKind::VirtioBlk) => found(Storage::VirtioBlk { function: f }),
        Some(StorageKind::Ahci) => {
            if let Bar::Memory(abar) = bar(hal, f.address, 5) {
                found(Storage::Ahci { function: f, abar });
            }
        }
        Some(StorageKind::Ide) => {
            let prog_if = f.class.2;
            let bus_master = match bar(hal, f.address, 4) {
                Bar::Io(port) => Some(port),
                _ => None,
            };
            found(Storage::Ide { function: f, prog_if, bus_master });
        }
        Some(StorageKind::Nvme) => {
            if let Bar::Memory(bar) = bar(hal, f.address, 0) {
                found(Storage::Nvme { function: f, bar });
            }
        }
        None => {}
    });
}
