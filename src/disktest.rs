//! Disk modes for a bootloader start: the self-test (write a known pattern
//! over a partition, read it back, verify) and the throughput bench.

use bootinfo::acpi::RemappingUnit;
use bootinfo::memmap::MemoryMap;
use diskdrv::ide::Mode;
use diskdrv::part::Guid;
use diskdrv::{BlockDevice, Direction, DiskError, Segment, testpattern};

use crate::disks;
use crate::hw::{self, KsaveHal};
use crate::layout::image_range;
use crate::println;
use crate::qemu::ExitCode;
use diskdrv::Hal as _;

/// Bytes moved per command in the self-test.
const CHUNK: u64 = 1 << 20;
/// Bench transfers go in commands this large (one 48-bit command at most).
const BENCH_CHUNK: u64 = 32 << 20;

/// What to do.
pub enum Job {
    /// Pattern over the whole partition, then verify.
    SelfTest,
    /// Write then read `mib` MiB at the partition's start, timed.
    Bench { mib: u64 },
}

/// Runs `job` on the partition `guid`; returns how it ended.
pub fn run(job: Job, guid: Guid, ide_mode: Mode, map: &MemoryMap, iommus: &[RemappingUnit]) -> ExitCode {
    println!("ksave: disk test: TSC {} MHz; looking for partition {guid}", hw::calibrate_tsc());
    let mut part = match disks::open_partition(disks::StoreAt { guid, file: None }, ide_mode, iommus) {
        Ok(p) => p,
        Err(e) => {
            println!("ksave: disk test: FAILED: {e}");
            return ExitCode::Failure;
        }
    };
    let mode = match (&part.disk, ide_mode) {
        (disks::AnyDisk::Ahci(_), _) => "AHCI DMA",
        (disks::AnyDisk::Nvme(_), _) => "NVMe",
        (disks::AnyDisk::Virtio(_), _) => "virtio",
        (_, Mode::Dma) => "IDE DMA",
        (_, Mode::Pio) => "IDE PIO",
    };
    if let Err(why) = spare_store_of_ksaves(&mut part) {
        println!("ksave: disk test: FAILED: refused to write partition {guid}: {why}");
        part.close();
        return ExitCode::Failure;
    }
    let p = part.partition;
    println!(
        "ksave: disk test: {} ({mode}, {}-byte blocks), partition LBA {}-{} ({} MiB, {:?})",
        part.location,
        part.block_size(),
        p.first_lba,
        p.last_lba,
        part.bytes() >> 20,
        p.source
    );
    // Both tests count 512-byte sectors, as the host checks the pattern.
    let span = Span { per_block: part.block_size() as u64 / 512, first: p.first_lba * (part.block_size() as u64 / 512), sectors: part.bytes() / 512 };
    let outcome = match job {
        Job::SelfTest => self_test(&mut part.disk, span, map),
        Job::Bench { mib } => bench(&mut part.disk, span, mib, mode, map),
    };
    part.close();
    match outcome {
        Ok(()) => ExitCode::Success,
        Err(e) => {
            println!("ksave: disk test: FAILED: {e}");
            ExitCode::Failure
        }
    }
}

/// The disk tests overwrite the whole partition: only one of ksave's own
/// type, and not while it holds an image still to be resumed.
fn spare_store_of_ksaves(part: &mut disks::OpenPartition) -> Result<(), &'static str> {
    use ksave_format::header::{Header, State};
    use ksave_format::reader::Source as _;
    if part.partition.type_guid != diskdrv::part::KSAVE_STORE_TYPE {
        return Err("its type is not ksave's store type (173DB3CF-DE7F-42FC-B307-BAA2FE510158), so it may hold anything");
    }
    // Into a buffer that can take DMA (page aligned, in ksave's image).
    let page = &mut crate::work::take().block;
    part.store().read_at(0, page).map_err(|_| "its first page could not be read")?;
    if Header::decode(page).is_ok_and(|h| h.state == State::Complete) {
        return Err("it holds a complete image, not resumed yet");
    }
    Ok(())
}

/// A free RAM range of `bytes` for data buffers: a bootloader start leaves
/// all RAM but ksave's own to us. Starts at 64 MiB, clear of what loaders
/// use low down.
fn scratch(map: &MemoryMap, bytes: u64) -> Result<u64, &'static str> {
    let (image_start, image_end) = image_range();
    let mut addr = 64 << 20;
    while addr + bytes <= crate::paging::identity_end().min(4 << 30) {
        let clear_of_image = addr + bytes <= image_start || addr >= image_end;
        if map.is_ram(addr, bytes) && clear_of_image {
            return Ok(addr);
        }
        addr += 2 << 20;
    }
    Err("no free RAM for data buffers")
}

fn mb_per_s(bytes: u64, us: u64) -> u64 {
    bytes / us.max(1)
}

/// The partition in 512-byte sectors, and sectors per disk block.
#[derive(Clone, Copy)]
struct Span {
    per_block: u64,
    first: u64,
    sectors: u64,
}

fn self_test(disk: &mut impl BlockDevice, span: Span, map: &MemoryMap) -> Result<(), Failure> {
    let Span { per_block, first, sectors } = span;
    let buf = scratch(map, CHUNK).map_err(Failure::Setup)?;
    // SAFETY: `buf` is free RAM (see scratch), identity-mapped, CHUNK long.
    let mem = unsafe { core::slice::from_raw_parts_mut(KsaveHal.phys_to_virt(buf), CHUNK as usize) };
    let bytes = sectors * 512;
    let t0 = hw::now_us();
    let mut lba = first;
    while lba < first + sectors {
        let n = (first + sectors - lba).min(CHUNK / 512);
        for (i, s) in mem[..(n * 512) as usize].chunks_mut(512).enumerate() {
            testpattern::sector(lba + i as u64, s);
        }
        disk.write(&KsaveHal, lba / per_block, &mem[..(n * 512) as usize])?;
        lba += n;
    }
    disk.flush()?;
    let t1 = hw::now_us();
    let mut expect = [0u8; 512];
    let mut lba = first;
    while lba < first + sectors {
        let n = (first + sectors - lba).min(CHUNK / 512);
        mem[..(n * 512) as usize].fill(0);
        disk.read(&KsaveHal, lba / per_block, &mut mem[..(n * 512) as usize])?;
        for (i, s) in mem[..(n * 512) as usize].chunks(512).enumerate() {
            testpattern::sector(lba + i as u64, &mut expect);
            if s != expect {
                return Err(Failure::Mismatch(lba + i as u64));
            }
        }
        lba += n;
    }
    let t2 = hw::now_us();
    println!(
        "ksave: disk test: PASS: wrote and verified {} MiB (write {} MB/s, read+verify {} MB/s)",
        bytes >> 20,
        mb_per_s(bytes, t1 - t0),
        mb_per_s(bytes, t2 - t1)
    );
    crate::metric!(write_mb_s = mb_per_s(bytes, t1 - t0), read_verify_mb_s = mb_per_s(bytes, t2 - t1));
    Ok(())
}

fn bench(disk: &mut impl BlockDevice, span: Span, mib: u64, mode: &str, map: &MemoryMap) -> Result<(), Failure> {
    let Span { per_block, first, sectors } = span;
    let bytes = mib << 20;
    if bytes > sectors * 512 {
        return Err(Failure::Setup("partition smaller than the bench size"));
    }
    // Data comes from (and goes to) free RAM where it lies, as a save would.
    // Touch it first (untimed): a save reads RAM the caller has used, and
    // under QEMU untouched guest RAM costs a host page fault on first DMA.
    let buf = scratch(map, bytes).map_err(Failure::Setup)?;
    // SAFETY: `buf` is free RAM (see scratch), identity-mapped, `bytes` long.
    unsafe { core::slice::from_raw_parts_mut(KsaveHal.phys_to_virt(buf), bytes as usize) }.fill(0x5a);
    let run = |disk: &mut dyn FnMut(u64, u64) -> Result<(), DiskError>| -> Result<u64, DiskError> {
        let t0 = hw::now_us();
        let mut done = 0;
        while done < bytes {
            let n = (bytes - done).min(BENCH_CHUNK);
            disk(done, n)?;
            done += n;
        }
        Ok(hw::now_us() - t0)
    };
    // SAFETY: `run` passes off + n <= bytes, so the segment is inside
    // `buf`: free RAM that scratch() found, not MMIO, that nothing else
    // uses while the bench runs.
    let write_us = run(&mut |off, n| disk.transfer(Direction::Write, (first + off / 512) / per_block, &[unsafe { Segment::new(buf + off, n) }]))?;
    let flush_t0 = hw::now_us();
    disk.flush()?;
    let write_us = write_us + (hw::now_us() - flush_t0);
    // SAFETY: as for the write above: inside `buf`, free RAM that nothing
    // else reads or writes while the bench runs, so the device may overwrite it.
    let read_us = run(&mut |off, n| disk.transfer(Direction::Read, (first + off / 512) / per_block, &[unsafe { Segment::new(buf + off, n) }]))?;
    println!(
        "ksave-bench: {mode}: write {mib} MiB in {} ms = {} MB/s; read {mib} MiB in {} ms = {} MB/s",
        write_us / 1000,
        mb_per_s(bytes, write_us),
        read_us / 1000,
        mb_per_s(bytes, read_us)
    );
    crate::metric!(bench_write_mb_s = mb_per_s(bytes, write_us), bench_read_mb_s = mb_per_s(bytes, read_us));
    Ok(())
}

/// How a disk test failed.
enum Failure {
    Setup(&'static str),
    Disk(DiskError),
    Mismatch(u64),
}

impl From<DiskError> for Failure {
    fn from(e: DiskError) -> Self {
        Self::Disk(e)
    }
}

impl core::fmt::Display for Failure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Setup(why) => f.write_str(why),
            Self::Disk(e) => write!(f, "{e}"),
            Self::Mismatch(lba) => write!(f, "read back differs from what was written at LBA {lba}"),
        }
    }
}
