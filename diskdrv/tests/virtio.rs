//! The virtio-blk driver against the register-level fake device.

mod common;

use common::*;
use diskdrv::fakes::{self, FakeHal, Machine, VirtioBlkDevice, VirtioSetup};
use diskdrv::pci::Address;
use diskdrv::virtio::{Transport, VirtioBlk, VirtioMemory};
use diskdrv::{BlockDevice, Direction, DiskError};

const AT: Address = Address { bus: 0, device: 5, function: 0 };

fn machine(sectors: u64, setup: VirtioSetup) -> (FakeHal, fakes::Disk) {
    let hal = FakeHal::default();
    let disk = fakes::disk(sectors);
    hal.add_virtio_blk((0, 5, 0), VirtioBlkDevice::new(disk.clone(), setup));
    (hal, disk)
}

fn device(hal: &FakeHal) -> std::cell::RefMut<'_, VirtioBlkDevice> {
    std::cell::RefMut::map(hal.0.virtio.borrow_mut(), |d| d.as_mut().unwrap())
}

fn open<'m>(hal: &FakeHal, mem: &'m mut VirtioMemory) -> Result<VirtioBlk<'m, FakeHal>, DiskError> {
    let transport = Transport::find(hal, AT)?;
    // SAFETY: the fake device is this test's alone.
    unsafe { VirtioBlk::open(hal.clone(), transport, mem) }
}

#[test]
fn finds_the_structures_negotiates_and_reads_the_capacity() {
    let (hal, _) = machine(1 << 20, VirtioSetup::default());
    let t = Transport::find(&hal, AT).unwrap();
    assert_eq!((t.common, t.device, t.notify, t.notify_multiplier), (Machine::VIRTIO_BAR, Machine::VIRTIO_BAR + 0x2000, Machine::VIRTIO_BAR + 0x3000, 4));
    let mem = low(VirtioMemory::new());
    let d = open(&hal, mem).unwrap();
    assert_eq!(d.info().blocks, 1 << 20);
    assert_eq!(device(&hal).status, 1 | 2 | 8 | 4, "ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK");
    assert_eq!(device(&hal).stats.accepted, 1 << 32 | 1 << 9 | 1 << 2 | 1 << 6);
}

#[test]
fn scattered_pages_go_out_in_one_request_and_come_back() {
    let (hal, disk) = machine(1 << 20, VirtioSetup::default());
    let mem = low(VirtioMemory::new());
    let mut d = open(&hal, mem).unwrap();
    let src = pages(200);
    let segs = scattered(src); // 100 separate pages
    let data = pattern(1000, 100 * 4096);
    fill(&segs, &data);
    d.transfer(Direction::Write, 1000, &segs).unwrap();
    let stats = device(&hal).stats.clone();
    assert_eq!((stats.requests, stats.max_pieces), (1, 100));
    assert_eq!(disk.borrow().bytes(1000, 800), data);
    let dst = pages(100);
    let back = [segment(dst, 0, 100 * 4096)];
    d.transfer(Direction::Read, 1000, &back).unwrap();
    assert_eq!(gather(&back), data);
}

#[test]
fn seg_max_splits_requests_and_the_rings_wrap() {
    let (hal, disk) = machine(1 << 20, VirtioSetup { seg_max: 4, ..VirtioSetup::default() });
    let mem = low(VirtioMemory::new());
    let mut d = open(&hal, mem).unwrap();
    let src = pages(20);
    let segs = scattered(src); // 10 pages, 4 a request
    let data = pattern(0, 10 * 4096);
    fill(&segs, &data);
    d.transfer(Direction::Write, 0, &segs).unwrap();
    let stats = device(&hal).stats.clone();
    assert_eq!((stats.requests, stats.max_pieces), (3, 4));
    assert_eq!(disk.borrow().bytes(0, 80), data);
    // Past the 128-entry rings, several times.
    let sector = &mut pages(1)[0].0[..512];
    for i in 0..300u64 {
        sector.fill(i as u8);
        d.write(&hal, 5000 + i, sector).unwrap();
    }
    d.flush().unwrap();
    assert_eq!(device(&hal).stats.flushes, 1);
    for i in 0..300u64 {
        assert_eq!(disk.borrow().sector(5000 + i), [i as u8; 512]);
    }
}

#[test]
fn an_io_error_is_reported_and_the_queue_carries_on() {
    let (hal, _) = machine(1 << 20, VirtioSetup { write_error_at: Some(12), ..VirtioSetup::default() });
    let mem = low(VirtioMemory::new());
    let mut d = open(&hal, mem).unwrap();
    let buf = pages(1);
    let err = d.transfer(Direction::Write, 10, &[segment(buf, 0, 4096)]).unwrap_err();
    assert_eq!(err, DiskError::Virtio { request: 1, lba: 10, status: 1 });
    assert!(err.to_string().contains("virtio-blk write at LBA 10: I/O error"), "{err}");
    d.transfer(Direction::Write, 100, &[segment(buf, 0, 4096)]).unwrap();
}

#[test]
fn a_request_that_never_completes_times_out_and_resets_the_device() {
    let (hal, disk) = machine(1 << 20, VirtioSetup::default());
    let mem = low(VirtioMemory::new());
    let mut d = open(&hal, mem).unwrap();
    let resets = device(&hal).stats.resets;
    device(&hal).setup.hang = true;
    let buf = pages(1);
    let err = d.transfer(Direction::Write, 5, &[segment(buf, 0, 4096)]).unwrap_err();
    assert!(matches!(err, DiskError::Timeout { command: 1, lba: 5, .. }), "{err:?}");
    assert_eq!(device(&hal).stats.resets, resets + 1, "reset and set up again");
    device(&hal).setup.hang = false;
    let data = pattern(5, 4096);
    fill(&[segment(buf, 0, 4096)], &data);
    d.transfer(Direction::Write, 5, &[segment(buf, 0, 4096)]).unwrap();
    assert_eq!(disk.borrow().bytes(5, 8), data);
}

#[test]
fn close_leaves_the_device_reset() {
    let (hal, _) = machine(1 << 20, VirtioSetup::default());
    let mem = low(VirtioMemory::new());
    let d = open(&hal, mem).unwrap();
    d.close();
    assert_eq!(device(&hal).status, 0);
}

#[test]
fn old_and_odd_block_devices_are_refused_and_left_reset() {
    let (hal, _) = machine(1 << 20, VirtioSetup { features: 1 << 9, ..VirtioSetup::default() });
    let mem = low(VirtioMemory::new());
    assert!(matches!(open(&hal, mem).err(), Some(DiskError::Unsupported(_))));
    assert_eq!(device(&hal).status, 0);
    let (hal, _) = machine(1 << 20, VirtioSetup { blk_size: 2048, ..VirtioSetup::default() });
    assert!(matches!(open(&hal, mem).err(), Some(DiskError::Unsupported(_))));
    assert_eq!(device(&hal).status, 0);
}

/// 4 KiB blocks: LBAs count blocks, requests' sector fields 512 bytes.
#[test]
fn a_4k_device_moves_whole_blocks() {
    let (hal, disk) = machine(1 << 16, VirtioSetup { blk_size: 4096, ..VirtioSetup::default() });
    let mem = low(VirtioMemory::new());
    let mut d = open(&hal, mem).unwrap();
    assert_eq!((d.info().blocks, d.info().block_size), (1 << 13, 4096));
    let buf = pages(4);
    let seg = [segment(buf, 0, 4 * 4096)];
    let data = pattern(0, 4 * 4096);
    fill(&seg, &data);
    d.transfer(Direction::Write, 10, &seg).unwrap();
    assert_eq!(disk.borrow().bytes(80, 32), data, "block 10 is sector 80");
    assert!(matches!(d.transfer(Direction::Write, 0, &[segment(buf, 0, 512)]), Err(DiskError::BadSegment(_))));
}
