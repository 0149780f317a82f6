//! PCI enumeration and BAR decoding against fake configuration space.

use diskdrv::fakes::FakeHal;
use diskdrv::pci::{self, Address, Bar, Storage, command};

fn machine() -> FakeHal {
    let hal = FakeHal::default();
    hal.add_pci((0, 0, 0), (0x8086, 0x29C0), (0x06, 0x00, 0x00), [0; 6]); // host bridge
    // Multifunction device 1: function 1 is PIIX IDE with BMIDE at 0xC040.
    hal.add_pci((0, 1, 0), (0x8086, 0x7000), (0x06, 0x01, 0x00), [0; 6]);
    hal.0.pci.borrow_mut().get_mut(&(0, 1, 0)).unwrap()[3] |= 0x80 << 16;
    hal.add_pci((0, 1, 1), (0x8086, 0x7010), (0x01, 0x01, 0x80), [0, 0, 0, 0, 0xC041, 0]);
    // AHCI on bus 2; ABAR is BAR5 and 32-bit (AHCI 1.3.1 2.1.11).
    hal.add_pci((2, 3, 0), (0x8086, 0x2922), (0x01, 0x06, 0x01), [0, 0, 0, 0, 0, 0xFEB0_0000]);
    // A device with a 64-bit prefetchable BAR0/1 above 4 GiB.
    hal.add_pci((2, 4, 0), (0x1af4, 0x1000), (0x02, 0x00, 0x00), [0x0000_000C, 0x0000_0008, 0, 0, 0, 0]);
    hal
}

#[test]
fn finds_ide_and_ahci_controllers_on_any_bus() {
    let hal = machine();
    let mut found = Vec::new();
    pci::find_storage(&hal, |s| found.push(s));
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(matches!(found[0], Storage::Ide { prog_if: 0x80, bus_master: Some(0xC040), .. }), "{:?}", found[0]);
    match found[1] {
        Storage::Ahci { function, abar } => {
            assert_eq!(function.address, Address { bus: 2, device: 3, function: 0 });
            assert_eq!(abar, 0xFEB0_0000);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bars_decode_memory_io_and_unused() {
    let hal = machine();
    let ide = Address { bus: 0, device: 1, function: 1 };
    assert_eq!(pci::bar(&hal, ide, 4), Bar::Io(0xC040));
    assert_eq!(pci::bar(&hal, ide, 0), Bar::Unused);
    let nic = Address { bus: 2, device: 4, function: 0 };
    assert_eq!(pci::bar(&hal, nic, 0), Bar::Memory(0x8_0000_0000));
}

#[test]
fn enable_sets_bits_and_restore_puts_the_old_value_back() {
    let hal = machine();
    let ahci = Address { bus: 2, device: 3, function: 0 };
    let old = pci::enable(&hal, ahci, command::MEMORY | command::BUS_MASTER);
    assert_eq!(old, 0);
    assert_eq!(pci::read32(&hal, ahci, 4) as u16, command::MEMORY | command::BUS_MASTER);
    pci::restore_command(&hal, ahci, old);
    assert_eq!(pci::read32(&hal, ahci, 4) as u16, 0);
}
