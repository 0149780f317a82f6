//! The AHCI driver against the register-level fake HBA.

mod common;

use common::*;
use diskdrv::ahci::{AhciDisk, AhciMemory, disk_ports};
use diskdrv::fakes::{self, FakeHal, Hba, Machine};
use diskdrv::{BlockDevice, Direction, DiskError, Segment};

fn machine(sectors: u64) -> (FakeHal, fakes::Disk) {
    let hal = FakeHal::default();
    let disk = fakes::disk(sectors);
    hal.add_hba(Hba::new(vec![None, Some(disk.clone())], true));
    (hal, disk)
}

fn open<'m>(hal: &FakeHal, mem: &'m mut AhciMemory) -> AhciDisk<'m, FakeHal> {
    // SAFETY: the fake HBA is this test's alone.
    unsafe { AhciDisk::open(hal.clone(), Machine::ABAR, 1, mem) }.expect("open port 1")
}

#[test]
fn finds_the_disk_port_and_identifies_it() {
    let (hal, _) = machine(1 << 20);
    assert_eq!(disk_ports(&hal, Machine::ABAR), 0b10);
    let mut mem = Box::new(AhciMemory::new());
    let disk = open(&hal, &mut mem);
    assert_eq!(disk.info().model.as_str(), "FAKE AHCI DISK");
    assert_eq!(disk.info().blocks, 1 << 20);
    assert!(disk.info().lba48);
    // Port 0 has no link: refused after one COMRESET, without a command.
    let mut mem0 = Box::new(AhciMemory::new());
    // SAFETY: as above.
    let empty = unsafe { AhciDisk::open(hal.clone(), Machine::ABAR, 0, &mut mem0) };
    assert_eq!(empty.err(), Some(DiskError::NoDevice));
    assert_eq!(hal.0.hba.borrow().as_ref().unwrap().commands, 1, "only port 1's IDENTIFY");
}

#[test]
fn scattered_pages_go_out_in_one_command_and_come_back() {
    let (hal, disk) = machine(1 << 20);
    let mut mem = Box::new(AhciMemory::new());
    let mut d = open(&hal, &mut mem);
    let src = pages(600);
    let segs = scattered(src); // 300 separate pages
    let data = pattern(1000, 300 * 4096);
    fill(&segs, &data);
    let before = hal.0.hba.borrow().as_ref().unwrap().commands;
    d.transfer(Direction::Write, 1000, &segs).unwrap();
    let hba_commands = hal.0.hba.borrow().as_ref().unwrap().commands - before;
    assert_eq!(hba_commands, 1, "300 pages fit one command's PRDT");
    assert_eq!(hal.0.hba.borrow().as_ref().unwrap().max_prds, 300);
    assert_eq!(disk.borrow().bytes(1000, 2400), data);
    let dst = pages(300);
    let back = [segment(dst, 0, 300 * 4096)];
    d.transfer(Direction::Read, 1000, &back).unwrap();
    assert_eq!(gather(&back), data);
}

#[test]
fn more_pages_than_the_prdt_holds_split_into_commands() {
    let (hal, disk) = machine(1 << 20);
    let mut mem = Box::new(AhciMemory::new());
    let mut d = open(&hal, &mut mem);
    let src = pages(2 * 1500);
    let segs = scattered(src); // 1500 pages > 1024 PRD entries
    let data = pattern(7, 1500 * 4096);
    fill(&segs, &data);
    d.transfer(Direction::Write, 7, &segs).unwrap();
    assert_eq!(hal.0.hba.borrow().as_ref().unwrap().max_prds, 1024);
    assert_eq!(disk.borrow().bytes(7, 1500 * 8), data);
}

#[test]
fn lba48_addresses_above_2_pow_28() {
    let sectors = (1 << 28) + 4096;
    let (hal, disk) = machine(sectors);
    let mut mem = Box::new(AhciMemory::new());
    let mut d = open(&hal, &mut mem);
    let buf = pages(1);
    let seg = [segment(buf, 0, 4096)];
    let lba = (1u64 << 28) + 17;
    fill(&seg, &pattern(lba, 4096));
    d.transfer(Direction::Write, lba, &seg).unwrap();
    assert_eq!(disk.borrow().bytes(lba, 8), pattern(lba, 4096));
    // The last sector is reachable; one past it is not.
    let one = [segment(buf, 0, 512)];
    d.transfer(Direction::Write, sectors - 1, &one).unwrap();
    assert_eq!(
        d.transfer(Direction::Write, sectors, &one),
        Err(DiskError::OutOfRange { lba: sectors, count: 1, capacity: sectors })
    );
}

#[test]
fn misaligned_segments_are_refused() {
    let (hal, _) = machine(4096);
    let mut mem = Box::new(AhciMemory::new());
    let mut d = open(&hal, &mut mem);
    let buf = pages(1);
    // SAFETY: inside `buf`, owned by the test; refused before any DMA anyway.
    let odd = unsafe { Segment::new(buf.as_ptr() as u64 + 2, 512) };
    assert_eq!(d.transfer(Direction::Read, 0, &[odd]), Err(DiskError::BadSegment(odd)));
    // SAFETY: as `odd`: inside `buf`, refused before any DMA.
    let short = unsafe { Segment::new(buf.as_ptr() as u64, 100) };
    assert_eq!(d.transfer(Direction::Read, 0, &[short]), Err(DiskError::BadSegment(short)));
}

#[test]
fn a_device_error_is_reported_with_its_lba_and_the_port_recovers() {
    let (hal, disk) = machine(1 << 16);
    let mut mem = Box::new(AhciMemory::new());
    let mut d = open(&hal, &mut mem);
    hal.0.hba.borrow_mut().as_mut().unwrap().ports[1].faults.write_error_at = Some(100);
    let buf = pages(2);
    let seg = [segment(buf, 0, 8192)];
    let err = d.transfer(Direction::Write, 96, &seg).unwrap_err();
    assert_eq!(err, DiskError::Device { command: 0x35, lba: 96, status: 0x51, error: 0x10 });
    assert!(err.to_string().contains("LBA 96"), "{err}");
    // Elsewhere the port works again.
    fill(&seg, &pattern(200, 8192));
    d.transfer(Direction::Write, 200, &seg).unwrap();
    assert_eq!(disk.borrow().bytes(200, 16), pattern(200, 8192));
    hal.0.hba.borrow_mut().as_mut().unwrap().ports[1].faults.read_error_at = Some(201);
    assert!(matches!(d.transfer(Direction::Read, 200, &seg), Err(DiskError::Device { command: 0x25, lba: 200, error: 0x40, .. })));
}

/// A command the HBA completes with fewer bytes than asked (PRDBC) is an
/// error: a save must not count a partly written chunk as written.
#[test]
fn a_short_byte_count_is_an_error() {
    let (hal, _) = machine(1 << 16);
    let mut mem = Box::new(AhciMemory::new());
    let mut d = open(&hal, &mut mem);
    hal.0.hba.borrow_mut().as_mut().unwrap().ports[1].faults.short_count = true;
    let buf = pages(2);
    let err = d.transfer(Direction::Write, 40, &[segment(buf, 0, 8192)]).unwrap_err();
    assert_eq!(err, DiskError::Short { command: 0x35, lba: 40, asked: 8192, moved: 7680 });
    assert!(err.to_string().contains("7680 of 8192 bytes"), "{err}");
    hal.0.hba.borrow_mut().as_mut().unwrap().ports[1].faults.short_count = false;
    d.transfer(Direction::Write, 40, &[segment(buf, 0, 8192)]).unwrap();
}

#[test]
fn a_command_that_never_completes_times_out() {
    let (hal, _) = machine(1 << 16);
    let mut mem = Box::new(AhciMemory::new());
    let mut d = open(&hal, &mut mem);
    hal.0.hba.borrow_mut().as_mut().unwrap().ports[1].faults.hang = true;
    let buf = pages(1);
    let err = d.transfer(Direction::Write, 5, &[segment(buf, 0, 4096)]).unwrap_err();
    assert!(matches!(err, DiskError::Timeout { command: 0x35, lba: 5, .. }), "{err:?}");
}

#[test]
fn a_busy_port_gets_a_comreset() {
    let (hal, _) = machine(1 << 16);
    {
        let mut hba = hal.0.hba.borrow_mut();
        let port = &mut hba.as_mut().unwrap().ports[1];
        port.faults.busy_until_reset = true;
    }
    hal.mmio_write32(Machine::ABAR + 0x100 + 0x80 + 0x14, 0); // any write makes the fake show BSY
    let mut mem = Box::new(AhciMemory::new());
    let d = open(&hal, &mut mem);
    assert_eq!(d.info().blocks, 1 << 16);
    assert_eq!(hal.0.hba.borrow().as_ref().unwrap().ports[1].comresets, 1);
}

#[test]
fn without_s64a_memory_above_4_gib_is_refused() {
    let hal = FakeHal::default();
    hal.add_hba(Hba::new(vec![Some(fakes::disk(4096))], false));
    let mut mem = Box::new(AhciMemory::new());
    // Host heap addresses lie above 4 GiB on x86_64 Linux, which is what
    // this test needs to show the refusal.
    assert!((&*mem as *const AhciMemory as u64) >> 32 != 0, "test memory below 4 GiB");
    // SAFETY: the fake HBA is this test's alone.
    let result = unsafe { AhciDisk::open(hal.clone(), Machine::ABAR, 0, &mut mem) };
    assert!(matches!(result, Err(DiskError::BadSegment(_))), "{:?}", result.err());
}

#[test]
fn close_puts_back_the_registers_it_found() {
    let (hal, _) = machine(4096);
    let port = Machine::ABAR + 0x100 + 0x80;
    hal.mmio_write32(port, 0x1234_5000); // CLB (offset 0) as "Linux" left it
    hal.mmio_write32(port + 0x08, 0x1234_6000); // FB
    hal.mmio_write32(port + 0x14, 0x7d40_00ff); // IE
    hal.mmio_write32(port + 0x18, 0x11); // FRE | ST
    let mut mem = Box::new(AhciMemory::new());
    let d = open(&hal, &mut mem);
    assert_ne!(hal.mmio_read32(port), 0x1234_5000); // CLB
    d.close();
    assert_eq!(hal.mmio_read32(port), 0x1234_5000);
    assert_eq!(hal.mmio_read32(port + 0x08), 0x1234_6000);
    assert_eq!(hal.mmio_read32(port + 0x14), 0x7d40_00ff);
    assert_eq!(hal.mmio_read32(port + 0x18) & 0x11, 0x11);
}

#[test]
fn a_failed_open_puts_back_the_registers_it_found() {
    let (hal, _) = machine(4096);
    let port = Machine::ABAR + 0x100 + 0x80;
    hal.mmio_write32(port, 0x1234_5000); // CLB (offset 0) as "Linux" left it
    hal.mmio_write32(port + 0x08, 0x1234_6000); // FB
    hal.0.hba.borrow_mut().as_mut().unwrap().ports[1].faults.hang = true; // IDENTIFY never completes
    let mut mem = Box::new(AhciMemory::new());
    // SAFETY: the fake HBA is this test's alone.
    let result = unsafe { AhciDisk::open(hal.clone(), Machine::ABAR, 1, &mut mem) };
    assert!(matches!(result.err(), Some(DiskError::Timeout { command: 0xEC, .. })));
    assert_eq!(hal.mmio_read32(port), 0x1234_5000, "CLB left pointing at our memory");
    assert_eq!(hal.mmio_read32(port + 0x08), 0x1234_6000, "FB left pointing at our memory");
}

use diskdrv::Hal as _;
