//! The NVMe driver against the register-level fake controller.

mod common;

use common::*;
use diskdrv::fakes::{self, FakeHal, Machine, Namespace, NvmeController};
use diskdrv::nvme::{MAX_COMMAND_PAGES, NvmeDisk, NvmeMemory, PRP_LIST_PAGES};
use diskdrv::{BlockDevice, Direction, DiskError};

fn machine(namespaces: &[(u64, u8)]) -> (FakeHal, Vec<fakes::Disk>) {
    let hal = FakeHal::default();
    let disks: Vec<_> = namespaces.iter().map(|&(sectors, _)| fakes::disk(sectors)).collect();
    let ns = disks.iter().zip(namespaces).map(|(d, &(_, lbads))| Namespace { disk: d.clone(), lbads }).collect();
    hal.add_nvme(NvmeController::new(ns));
    (hal, disks)
}

fn controller(hal: &FakeHal) -> std::cell::RefMut<'_, NvmeController> {
    std::cell::RefMut::map(hal.0.nvme.borrow_mut(), |c| c.as_mut().unwrap())
}

fn open<'m>(hal: &FakeHal, index: usize, mem: &'m mut NvmeMemory) -> Result<NvmeDisk<'m, FakeHal>, DiskError> {
    // SAFETY: the fake controller is this test's alone.
    unsafe { NvmeDisk::open(hal.clone(), Machine::NVME_BAR, index, mem) }
}

#[test]
fn identifies_each_namespace_and_refuses_a_missing_one() {
    let (hal, _) = machine(&[(1 << 20, 9), (4096, 9)]);
    let mem = low(NvmeMemory::new());
    let d = open(&hal, 0, mem).unwrap();
    assert_eq!(d.info().model.as_str(), "ksave fake SSD");
    assert_eq!(d.info().serial.as_str(), "FAKE0001");
    assert_eq!((d.nsid(), d.info().blocks), (1, 1 << 20));
    d.close();
    let d = open(&hal, 1, mem).unwrap();
    assert_eq!((d.nsid(), d.info().blocks), (2, 4096));
    d.close();
    assert_eq!(open(&hal, 2, mem).err(), Some(DiskError::NoDevice));
    assert!(!controller(&hal).enabled(), "a refused open gives the controller back disabled");
}

#[test]
fn scattered_pages_go_out_in_one_command_and_come_back() {
    let (hal, disks) = machine(&[(1 << 20, 9)]);
    let mem = low(NvmeMemory::new());
    controller(&hal).mdts = 0; // no limit: the PRP lists decide
    let mut d = open(&hal, 0, mem).unwrap();
    let src = pages(600);
    let segs = scattered(src); // 300 separate pages
    let data = pattern(1000, 300 * 4096);
    fill(&segs, &data);
    d.transfer(Direction::Write, 1000, &segs).unwrap();
    let stats = controller(&hal).stats.clone();
    assert_eq!((stats.io_commands, stats.max_pages, stats.max_list_pages), (1, 300, 1), "300 pages, one PRP list page");
    assert_eq!(disks[0].borrow().bytes(1000, 2400), data);
    let dst = pages(300);
    let back = [segment(dst, 0, 300 * 4096)];
    d.transfer(Direction::Read, 1000, &back).unwrap();
    assert_eq!(gather(&back), data);
}

#[test]
fn a_long_command_chains_its_prp_list_across_pages() {
    let (hal, disks) = machine(&[(1 << 20, 9)]);
    let mem = low(NvmeMemory::new());
    controller(&hal).mdts = 0;
    let mut d = open(&hal, 0, mem).unwrap();
    // 1000 pages from a buffer that starts 512 bytes into a page: PRP1
    // carries an offset (so 1001 pages), and the list needs two pages.
    let buf = pages(1002);
    let seg = [segment(buf, 512, 1000 * 4096)];
    let data = pattern(7, 1000 * 4096);
    fill(&seg, &data);
    d.transfer(Direction::Write, 7, &seg).unwrap();
    let stats = controller(&hal).stats.clone();
    assert_eq!((stats.io_commands, stats.max_pages, stats.max_list_pages), (1, 1001, 2));
    assert_eq!(disks[0].borrow().bytes(7, 1000 * 8), data);
    // Beyond what one command's lists hold: split, nothing lost.
    let n = MAX_COMMAND_PAGES as usize + 10;
    let big = pages(n);
    let seg = [segment(big, 0, n * 4096)];
    let data = pattern(50_000, n * 4096);
    fill(&seg, &data);
    d.transfer(Direction::Write, 50_000, &seg).unwrap();
    let stats = controller(&hal).stats.clone();
    assert_eq!((stats.io_commands, stats.max_list_pages), (3, PRP_LIST_PAGES as u64));
    assert_eq!(disks[0].borrow().bytes(50_000, n as u64 * 8), data);
}

#[test]
fn mdts_and_sub_page_segments_split_commands() {
    let (hal, disks) = machine(&[(1 << 20, 9)]);
    let mem = low(NvmeMemory::new());
    controller(&hal).mdts = 2; // 4 pages a command
    let mut d = open(&hal, 0, mem).unwrap();
    let buf = pages(16);
    let seg = [segment(buf, 0, 16 * 4096)];
    let data = pattern(0, 16 * 4096);
    fill(&seg, &data);
    d.transfer(Direction::Write, 0, &seg).unwrap();
    let stats = controller(&hal).stats.clone();
    assert_eq!((stats.io_commands, stats.max_pages), (4, 4));
    assert_eq!(disks[0].borrow().bytes(0, 128), data);
    // Two 512-byte pieces in different pages cannot share a PRP list.
    let small = pages(2);
    let segs = [segment(small, 1024, 512), segment(small, 4096 + 2048, 512)];
    let data = pattern(300, 1024);
    fill(&segs, &data);
    d.transfer(Direction::Write, 300, &segs).unwrap();
    assert_eq!(controller(&hal).stats.io_commands, 6);
    assert_eq!(disks[0].borrow().bytes(300, 2), data);
}

#[test]
fn the_queues_wrap_and_the_phase_flips() {
    let (hal, disks) = machine(&[(1 << 20, 9)]);
    let mem = low(NvmeMemory::new());
    let mut d = open(&hal, 0, mem).unwrap();
    let sector = &mut pages(1)[0].0[..512];
    for i in 0..300u64 {
        sector.fill(i as u8);
        d.write(&hal, i, sector).unwrap();
    }
    d.flush().unwrap();
    assert_eq!(controller(&hal).stats.flushes, 1);
    for i in 0..300u64 {
        assert_eq!(disks[0].borrow().sector(i), [i as u8; 512]);
    }
}

#[test]
fn a_media_error_is_reported_with_its_status() {
    let (hal, _) = machine(&[(1 << 20, 9)]);
    let mem = low(NvmeMemory::new());
    let mut d = open(&hal, 0, mem).unwrap();
    controller(&hal).faults.write_error_at = Some(12);
    let buf = pages(1);
    let err = d.transfer(Direction::Write, 10, &[segment(buf, 0, 4096)]).unwrap_err();
    assert_eq!(err, DiskError::Nvme { opcode: 0x01, lba: 10, status: 2 << 8 | 0x80 });
    assert!(err.to_string().contains("write fault"), "{err}");
    // The queue carries on after an error status.
    d.transfer(Direction::Write, 100, &[segment(buf, 0, 4096)]).unwrap();
    controller(&hal).faults.read_error_at = Some(100);
    let err = d.transfer(Direction::Read, 100, &[segment(buf, 0, 512)]).unwrap_err();
    assert_eq!(err, DiskError::Nvme { opcode: 0x02, lba: 100, status: 2 << 8 | 0x81 });
}

#[test]
fn a_command_that_never_completes_times_out_and_resets_the_controller() {
    let (hal, disks) = machine(&[(1 << 20, 9)]);
    let mem = low(NvmeMemory::new());
    let mut d = open(&hal, 0, mem).unwrap();
    let enables = controller(&hal).stats.enables;
    controller(&hal).faults.hang_io = true;
    let buf = pages(1);
    let err = d.transfer(Direction::Write, 5, &[segment(buf, 0, 4096)]).unwrap_err();
    assert!(matches!(err, DiskError::Timeout { command: 0x01, lba: 5, .. }), "{err:?}");
    assert_eq!(controller(&hal).stats.enables, enables + 1, "reset and set up again");
    // The reset controller works: a failure record can still be written.
    controller(&hal).faults.hang_io = false;
    let data = pattern(5, 4096);
    fill(&[segment(buf, 0, 4096)], &data);
    d.transfer(Direction::Write, 5, &[segment(buf, 0, 4096)]).unwrap();
    assert_eq!(disks[0].borrow().bytes(5, 8), data);
}

#[test]
fn close_disables_and_puts_the_registers_back() {
    let (hal, _) = machine(&[(1 << 20, 9)]);
    let before = {
        let mut c = controller(&hal);
        c.intms = 0b101;
        (c.aqa, c.asq, c.acq, c.intms)
    };
    let mem = low(NvmeMemory::new());
    let d = open(&hal, 0, mem).unwrap();
    assert_eq!(controller(&hal).intms, !0, "polled: interrupts masked while open");
    d.close();
    let c = controller(&hal);
    assert!(!c.enabled(), "left disabled for the kernel's own reset");
    assert_eq!((c.aqa, c.asq, c.acq, c.intms), before);
}

#[test]
fn out_of_range_is_refused_and_odd_block_sizes_too() {
    let (hal, _) = machine(&[(1000, 9), (8000, 10)]);
    let mem = low(NvmeMemory::new());
    let mut d = open(&hal, 0, mem).unwrap();
    let buf = pages(1);
    let err = d.transfer(Direction::Read, 999, &[segment(buf, 0, 1024)]).unwrap_err();
    assert!(matches!(err, DiskError::OutOfRange { .. }));
    d.close();
    assert!(matches!(open(&hal, 1, mem).err(), Some(DiskError::Unsupported(_))), "1 KiB blocks");
}

/// A 4Kn namespace: LBAs count 4 KiB blocks, requests carry whole blocks
/// (a 512-byte one is refused), and the GPT is read in 4 KiB blocks.
#[test]
fn a_4k_namespace_moves_whole_blocks_and_its_gpt_is_found() {
    let (hal, disks) = machine(&[(1 << 16, 12)]);
    let mem = low(NvmeMemory::new());
    let mut d = open(&hal, 0, mem).unwrap();
    assert_eq!((d.info().blocks, d.info().block_size), (1 << 13, 4096));
    let buf = pages(8);
    let seg = [segment(buf, 0, 8 * 4096)];
    let data = pattern(0, 8 * 4096);
    fill(&seg, &data);
    d.transfer(Direction::Write, 100, &seg).unwrap();
    assert_eq!(disks[0].borrow().bytes(800, 64), data, "block 100 is sector 800");
    assert!(matches!(d.transfer(Direction::Read, 0, &[segment(buf, 0, 512)]), Err(DiskError::BadSegment(_))));
    // A GPT made for 4 KiB blocks, found through the driver.
    let guid = diskdrv::part::Guid::try_parse("9B3C2C1A-5E1F-4B4A-8C6F-2A1D3E4F5A6B").unwrap();
    let part = diskdrv::part::Entry { type_guid: guid, unique: guid, first_lba: 256, last_lba: 1279 };
    let (mut head, mut tail) = (vec![0u8; diskdrv::part::gpt_head_len(4096)], vec![0u8; diskdrv::part::gpt_tail_len(4096)]);
    diskdrv::part::build_gpt(4096, 1 << 13, guid, &[part], &mut head, &mut tail);
    let sectors = 1u64 << 16;
    for (i, s) in head.chunks(512).enumerate() {
        disks[0].borrow_mut().set_sector(i as u64, s);
    }
    let tail_at = sectors - tail.len() as u64 / 512;
    for (i, s) in tail.chunks(512).enumerate() {
        disks[0].borrow_mut().set_sector(tail_at + i as u64, s);
    }
    let block = low([0u8; diskdrv::MAX_BLOCK]);
    let found = diskdrv::part::find_gpt_partition(&mut d, &hal, guid, block).unwrap();
    assert_eq!((found.first_lba, found.blocks()), (256, 1024));
    // The backup is found when the primary header is damaged.
    disks[0].borrow_mut().set_sector(8, &[0u8; 512]);
    let found = diskdrv::part::find_gpt_partition(&mut d, &hal, guid, block).unwrap();
    assert_eq!((found.first_lba, found.source), (256, diskdrv::part::Source::GptBackup));
}

#[test]
fn commands_overlap_and_an_error_in_the_middle_keeps_the_queues_in_step() {
    let (hal, disks) = machine(&[(1 << 20, 9)]);
    let mem = low(NvmeMemory::new());
    controller(&hal).mdts = 2; // 4 pages a command: 16 commands below
    let mut d = open(&hal, 0, mem).unwrap();
    let buf = pages(64);
    let seg = [segment(buf, 0, 64 * 4096)];
    let data = pattern(1000, 64 * 4096);
    fill(&seg, &data);
    d.transfer(Direction::Write, 1000, &seg).unwrap();
    let stats = controller(&hal).stats.clone();
    assert_eq!(stats.io_commands, 16);
    assert_eq!(stats.max_unreaped, PRP_LIST_PAGES as u64, "a command in flight per PRP list page");
    assert_eq!(disks[0].borrow().bytes(1000, 512), data);
    // The fifth command (LBAs 1160-1191) fails; the ones in flight beside
    // it are reaped, and the queue works for the next transfer.
    controller(&hal).faults.write_error_at = Some(1170);
    let err = d.transfer(Direction::Write, 1000, &seg).unwrap_err();
    assert_eq!(err, DiskError::Nvme { opcode: 0x01, lba: 1160, status: 2 << 8 | 0x80 });
    controller(&hal).faults.write_error_at = None;
    d.transfer(Direction::Write, 1000, &seg).unwrap();
    let back = pages(64);
    d.transfer(Direction::Read, 1000, &[segment(back, 0, 64 * 4096)]).unwrap();
    assert_eq!(gather(&[segment(back, 0, 64 * 4096)]), data);
}
