//! The IDE driver against the fake IDE channels.

mod common;

use common::*;
use diskdrv::fakes::{self, FakeHal, IdeChannel, Machine};
use diskdrv::ide::{Channel, Drive, IdeDisk, IdeMemory, Mode};
use diskdrv::{BlockDevice, Direction, DiskError, Hal};

const PRIMARY: Channel = Channel::primary(Some(Machine::BMIDE));
const SECONDARY: Channel = Channel::secondary(Some(Machine::BMIDE));

fn machine(primary: [Option<fakes::Disk>; 2], secondary: [Option<fakes::Disk>; 2]) -> FakeHal {
    let hal = FakeHal::default();
    hal.add_ide(IdeChannel::new(0x1F0, 0x3F6, PRIMARY.bus_master, primary));
    hal.add_ide(IdeChannel::new(0x170, 0x376, SECONDARY.bus_master, secondary));
    hal
}

fn open<'m>(hal: &FakeHal, ch: Channel, drive: Drive, mode: Mode, mem: &'m mut IdeMemory) -> Result<IdeDisk<'m, FakeHal>, DiskError> {
    // SAFETY: the fake channels are this test's alone.
    unsafe { IdeDisk::open(hal.clone(), ch, drive, mode, mem) }
}

fn channel<R>(hal: &FakeHal, base: u16, f: impl FnOnce(&mut IdeChannel) -> R) -> R {
    f(hal.0.ide.borrow_mut().get_mut(&base).unwrap())
}

/// Writes then reads back 40 KiB at `lba` and checks disk and memory.
fn round_trip(d: &mut IdeDisk<FakeHal>, disk: &fakes::Disk, lba: u64) {
    let buf = pages(10);
    let seg = [segment(buf, 0, 40960)];
    let data = pattern(lba, 40960);
    fill(&seg, &data);
    d.transfer(Direction::Write, lba, &seg).unwrap();
    assert_eq!(disk.borrow().bytes(lba, 80), data);
    let back = pages(10);
    let seg = [segment(back, 0, 40960)];
    d.transfer(Direction::Read, lba, &seg).unwrap();
    assert_eq!(gather(&seg), data);
}

#[test]
fn every_drive_position_in_both_modes() {
    let disks: Vec<_> = (0..4).map(|_| fakes::disk(1 << 16)).collect();
    let hal = machine([Some(disks[0].clone()), Some(disks[1].clone())], [Some(disks[2].clone()), Some(disks[3].clone())]);
    let mut i = 0;
    for ch in [PRIMARY, SECONDARY] {
        for drive in [Drive::Master, Drive::Slave] {
            for mode in [Mode::Pio, Mode::Dma] {
                let mem = low(IdeMemory::new());
                let mut d = open(&hal, ch, drive, mode, mem).unwrap();
                assert_eq!(d.info().model.as_str(), "FAKE IDE DISK");
                round_trip(&mut d, &disks[i], 100 + 1000 * (mode == Mode::Dma) as u64);
            }
            i += 1;
        }
    }
    // Each channel saw 4 PIO commands (2 drives x write+read) and 4 DMA.
    for base in [0x1F0, 0x170] {
        assert_eq!(channel(&hal, base, |c| (c.pio_commands, c.dma_commands)), (4, 4));
    }
}

#[test]
fn dma_prds_never_cross_64_kib() {
    let disk = fakes::disk(1 << 16);
    let hal = machine([Some(disk.clone()), None], [None, None]);
    let mem = low(IdeMemory::new());
    let mut d = open(&hal, PRIMARY, Drive::Master, Mode::Dma, mem).unwrap();
    // 256 KiB starting 0x7000 past a 64 KiB boundary: the fake asserts no
    // PRD crosses one.
    let buf = pages(96);
    let base = buf.as_ptr() as u64;
    let offset = ((0x10000 - base % 0x10000) % 0x10000 + 0x7000) as usize;
    let seg = [segment(buf, offset, 256 * 1024)];
    let data = pattern(9, 256 * 1024);
    fill(&seg, &data);
    d.transfer(Direction::Write, 9, &seg).unwrap();
    assert_eq!(disk.borrow().bytes(9, 512), data);
}

#[test]
fn lba48_above_2_pow_28_and_28_bit_disks_split_at_256_sectors() {
    let big = fakes::disk((1 << 28) + 1024);
    let hal = machine([Some(big.clone()), None], [None, None]);
    let mem = low(IdeMemory::new());
    let mut d = open(&hal, PRIMARY, Drive::Master, Mode::Dma, mem).unwrap();
    round_trip(&mut d, &big, (1 << 28) + 3);

    let small = fakes::disk(100_000);
    let hal = machine([None, None], [Some(small.clone()), None]);
    channel(&hal, 0x170, |c| c.lba48 = false);
    let mem = low(IdeMemory::new());
    let mut d = open(&hal, SECONDARY, Drive::Master, Mode::Dma, mem).unwrap();
    assert!(!d.info().lba48);
    let buf = pages(75); // 600 sectors: 256 + 256 + 88
    let seg = [segment(buf, 0, 600 * 512)];
    fill(&seg, &pattern(1, 600 * 512));
    d.transfer(Direction::Write, 1, &seg).unwrap();
    assert_eq!(channel(&hal, 0x170, |c| c.dma_commands), 3);
    assert_eq!(small.borrow().bytes(1, 600), pattern(1, 600 * 512));
}

#[test]
fn device_errors_carry_the_failing_command_and_lba() {
    let disk = fakes::disk(1 << 16);
    let hal = machine([Some(disk.clone()), None], [None, None]);
    for mode in [Mode::Dma, Mode::Pio] {
        let mem = low(IdeMemory::new());
        let mut d = open(&hal, PRIMARY, Drive::Master, mode, mem).unwrap();
        channel(&hal, 0x1F0, |c| c.faults.write_error_at = Some(50));
        let buf = pages(2);
        let seg = [segment(buf, 0, 8192)];
        let err = d.transfer(Direction::Write, 48, &seg).unwrap_err();
        assert!(matches!(err, DiskError::Device { lba: 48, status: 0x51, error: 0x10, .. }), "{mode:?}: {err:?}");
        channel(&hal, 0x1F0, |c| c.faults = Default::default());
        channel(&hal, 0x1F0, |c| c.faults.read_error_at = Some(60));
        let err = d.transfer(Direction::Read, 56, &seg).unwrap_err();
        assert!(matches!(err, DiskError::Device { lba: 56, error: 0x40, .. }), "{mode:?}: {err:?}");
        channel(&hal, 0x1F0, |c| c.faults = Default::default());
        d.transfer(Direction::Read, 56, &seg).unwrap();
    }
}

#[test]
fn a_hung_channel_times_out_and_is_reset() {
    let disk = fakes::disk(1 << 16);
    let hal = machine([Some(disk), None], [None, None]);
    for mode in [Mode::Dma, Mode::Pio] {
        let mem = low(IdeMemory::new());
        let mut d = open(&hal, PRIMARY, Drive::Master, mode, mem).unwrap();
        channel(&hal, 0x1F0, |c| c.faults.hang = true);
        let buf = pages(1);
        let err = d.transfer(Direction::Write, 3, &[segment(buf, 0, 4096)]).unwrap_err();
        assert!(matches!(err, DiskError::Timeout { lba: 3, .. }), "{mode:?}: {err:?}");
    }
    assert_eq!(channel(&hal, 0x1F0, |c| c.resets), 2);
}

#[test]
fn absent_drives_and_empty_channels_are_no_device() {
    let hal = machine([Some(fakes::disk(1024)), None], [None, None]);
    assert_eq!(open(&hal, PRIMARY, Drive::Slave, Mode::Pio, low(IdeMemory::new())).err(), Some(DiskError::NoDevice));
    assert_eq!(open(&hal, SECONDARY, Drive::Master, Mode::Pio, low(IdeMemory::new())).err(), Some(DiskError::NoDevice));
    let no_bm = Channel::primary(None);
    assert!(matches!(open(&hal, no_bm, Drive::Master, Mode::Dma, low(IdeMemory::new())), Err(DiskError::Unsupported(_))));
}

#[test]
fn dma_memory_above_4_gib_is_refused_not_truncated() {
    let disk = fakes::disk(1024);
    let hal = machine([Some(disk), None], [None, None]);
    let mut high = Box::new(IdeMemory::new());
    assert!((&*high as *const IdeMemory as u64) >> 32 != 0, "test memory below 4 GiB");
    let mut d = open(&hal, PRIMARY, Drive::Master, Mode::Dma, &mut high).unwrap();
    let buf = pages(1);
    let err = d.transfer(Direction::Write, 0, &[segment(buf, 0, 4096)]).unwrap_err();
    assert!(matches!(err, DiskError::BadSegment(_)), "{err:?}");
    let high_buf = vec![Page([0; 4096]); 1];
    let mut low_mem_disk = open(&hal, PRIMARY, Drive::Master, Mode::Dma, low(IdeMemory::new())).unwrap();
    let err = low_mem_disk.transfer(Direction::Write, 0, &[segment(&high_buf, 0, 4096)]).unwrap_err();
    assert!(matches!(err, DiskError::BadSegment(_)), "{err:?}");
}

/// ksave keeps device interrupts off while it polls, and close gives the
/// channel back with them on, bus master stopped, as libata keeps it.
#[test]
fn close_turns_device_interrupts_back_on_and_stops_the_bus_master() {
    let disk = fakes::disk(1 << 16);
    let hal = machine([Some(disk.clone()), None], [None, None]);
    let mem = low(IdeMemory::new());
    let mut d = open(&hal, PRIMARY, Drive::Master, Mode::Dma, mem).unwrap();
    round_trip(&mut d, &disk, 10);
    assert_eq!(channel(&hal, 0x1F0, |c| c.device_control), 0x02, "nIEN while ksave drives it");
    d.close();
    assert_eq!(channel(&hal, 0x1F0, |c| c.device_control), 0x08, "nIEN clear, as libata leaves it");
    assert_eq!(hal.inb(Machine::BMIDE) & 1, 0, "bus master stopped");
}

/// The guard gives the channel back on an error path too: an open that
/// fails after turning device interrupts off turns them back on.
#[test]
fn a_failed_open_turns_device_interrupts_back_on() {
    let disk = fakes::disk(1 << 16);
    let hal = FakeHal::default();
    hal.add_ide(IdeChannel::new(0x1F0, 0x3F6, None, [Some(disk), None]));
    let mem = low(IdeMemory::new());
    let no_bus_master = Channel::primary(None);
    assert!(matches!(open(&hal, no_bus_master, Drive::Master, Mode::Dma, mem).err(), Some(DiskError::Unsupported(_))));
    assert_eq!(channel(&hal, 0x1F0, |c| c.device_control), 0x08, "nIEN clear again");
}
