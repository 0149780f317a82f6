//! Saving the kexec caller's RAM to the configured partition.
//!
//! Nothing of the caller is written: its pages are read (zero check,
//! checksum, LZ4) and DMA'd from where they lie; ksave's own working memory is in its
//! image; device registers are put back as found.

use bootinfo::kexec::{self, CallerContext};
use diskdrv::ide::Mode;
use diskdrv::part::Guid;
use diskdrv::{BlockDevice, Direction, DiskError, SECTOR, Segment};
use ksave_format::header::{self, DATA_OFFSET, Header, META_OFFSET, State, fail};
use ksave_format::writer::{self, Memory, Sink, Writer, worst_case_bytes};
use ksave_format::{BackupPair, PAGE, Range};

use crate::disks::{self, AnyDisk, Controllers};
use crate::hw::{self, KsaveHal};
use crate::layout::image_range;
use crate::physmem::IdentityMapped;
use crate::message::Message;
use crate::work::{self, Work};
use crate::{config, paging, println};
use diskdrv::Hal as _;

/// Why a save did not happen, with the code for the status record.
pub struct Failure {
    code: u32,
    message: Message,
}

macro_rules! fail {
    ($code:expr, $($arg:tt)*) => { Failure { code: $code, message: Message::format(format_args!($($arg)*)) } };
}

/// The caller's pages, read through the identity map. Page 0 is real RAM,
/// but no Rust reference may point at address 0: it is read through a copy.
struct CallerMemory<'a> {
    end: u64,
    page0: &'a [u8; PAGE],
}

impl<'a> CallerMemory<'a> {
    fn new(end: u64, page0: &'a mut [u8; PAGE]) -> Self {
        // SAFETY: copies physical page 0 (identity-mapped RAM) into our own
        // buffer. In asm because address 0 is null to the compiler, and any
        // Rust-level access to it would be undefined behaviour.
        unsafe {
            core::arch::asm!("rep movsb", inout("rdi") page0.as_mut_ptr() => _, inout("rsi") 0usize => _, inout("rcx") PAGE => _, options(nostack, preserves_flags));
        }
        Self { end, page0 }
    }
}

impl Memory for CallerMemory<'_> {
    fn page(&self, pfn: u64) -> Option<&[u8; PAGE]> {
        let addr = pfn.checked_mul(PAGE as u64)?;
        if addr.checked_add(PAGE as u64)? > self.end {
            return None;
        }
        if addr == 0 {
            return Some(self.page0);
        }
        // SAFETY: the page is inside the identity map, non-null, and RAM the
        // config listed; the caller is stopped, so nothing writes it while
        // we read.
        Some(unsafe { &*(addr as *const [u8; PAGE]) })
    }
}

/// Chunks go to the partition by DMA: headers from ksave's buffers, raw
/// pages straight from the caller's memory.
struct DiskSink<'d, 'm> {
    disk: &'d mut AnyDisk<'m>,
    first_lba: u64,
    progress: Progress,
    /// Microseconds spent in disk transfers (the rest of a save is CPU work).
    disk_us: u64,
}

const MAX_SEGMENTS: usize = writer::MAX_RAW_PAGES + 1;

impl Sink for DiskSink<'_, '_> {
    type Error = DiskError;

    fn write_raw(&mut self, offset: u64, header: &[u8], pfns: &[u64]) -> Result<(), DiskError> {
        let mut segs = [Segment { addr: 0, len: 0 }; MAX_SEGMENTS];
        segs[0] = Segment { addr: KsaveHal.virt_to_phys(header.as_ptr()), len: header.len() as u64 };
        let mut n = 1;
        for pfn in pfns {
            let addr = pfn * PAGE as u64;
            let last = &mut segs[n - 1];
            if n > 1 && last.addr + last.len == addr {
                last.len += PAGE as u64; // physically contiguous: one segment
            } else {
                segs[n] = Segment { addr, len: PAGE as u64 };
                n += 1;
            }
        }
        let t = hw::now_us();
        self.disk.transfer(Direction::Write, self.first_lba + offset / SECTOR, &segs[..n])?;
        self.disk_us += hw::now_us() - t;
        self.progress.tick(offset + header.len() as u64 + (pfns.len() * PAGE) as u64);
        Ok(())
    }

    fn write_bytes(&mut self, offset: u64, bytes: &[u8]) -> Result<(), DiskError> {
        let t = hw::now_us();
        self.disk.write(&KsaveHal, self.first_lba + offset / SECTOR, bytes)?;
        self.disk_us += hw::now_us() - t;
        self.progress.tick(offset + bytes.len() as u64);
        Ok(())
    }
}

/// Console progress: every tenth of the worst case, with the rate so far.
struct Progress {
    start_us: u64,
    worst: u64,
    next: u64,
}

impl Progress {
    fn tick(&mut self, written: u64) {
        if written >= self.next {
            let us = (hw::now_us() - self.start_us).max(1);
            println!("ksave: saving: {:>3}% of the worst case, {} MiB written, {} MB/s", written * 100 / self.worst, written >> 20, written / us);
            self.next += self.worst / 10;
        }
    }
}

/// What a successful save wrote.
pub struct Summary {
    disk_us: u64,
    pages_stored: u64,
    pages_zero: u64,
    bytes: u64,
    us: u64,
    lz4_pages: u64,
    lz4_skipped: u64,
}

/// Saves the caller's RAM; every outcome is reported on the console, and a
/// failure once the partition is known also in a status record on it.
pub fn run(ctx: &CallerContext) {
    let config = match config::load() {
        Ok(c) => c,
        Err(e) => {
            println!("ksave: not saving: {e}");
            return;
        }
    };
    let per_us = hw::calibrate_tsc();
    let guid = Guid(config.partition_guid);
    println!("ksave: saving to partition {guid} (TSC {per_us} MHz, nonce {:#018x})", config.nonce);
    let mut controllers = Controllers::new();
    let mem = disks::disk_memory();
    let located = match disks::find_partition(guid, Mode::Dma, mem, &mut controllers) {
        Ok(l) => l,
        Err(e) => {
            println!("ksave: save FAILED: {e}; nothing written");
            controllers.restore();
            return;
        }
    };
    let (location, partition) = located;
    let mut disk = match disks::open(location, Mode::Dma, mem) {
        Ok((d, _)) => d,
        Err(e) => {
            println!("ksave: save FAILED: {location}: {e}; nothing written");
            controllers.restore();
            return;
        }
    };
    let start = hw::now_us();
    let bufs = work::take();
    match save(&config, ctx, &mut disk, partition.first_lba, partition.sectors(), bufs, start) {
        Ok(s) => println!(
            "ksave: saved {} pages ({} MiB, {} LZ4, {} raw untried) in {} ms = {} MB/s of RAM; {} zero pages left out; image {} MiB; disk {} ms, CPU {} ms",
            s.pages_stored,
            s.pages_stored * PAGE as u64 >> 20,
            s.lz4_pages,
            s.lz4_skipped,
            s.us / 1000,
            (s.pages_stored + s.pages_zero) * PAGE as u64 / s.us.max(1),
            s.pages_zero,
            s.bytes >> 20,
            s.disk_us / 1000,
            (s.us - s.disk_us) / 1000
        ),
        Err(f) => {
            println!("ksave: save FAILED: {}", f.message.as_str());
            let mut h = Header::new(State::Failed, config.nonce);
            h.fail_code = f.code;
            h.created_unix = config.created_unix;
            h.set_message(f.message.as_str());
            h.encode(&mut bufs.block);
            let written = disk.write(&KsaveHal, partition.first_lba, &bufs.block).and_then(|()| disk.flush());
            match written {
                Ok(()) => println!("ksave: failure recorded on the partition"),
                Err(e) => println!("ksave: could not record the failure either: {e}"),
            }
        }
    }
    disk.close();
    controllers.restore();
}

fn save(
    config: &ksave_format::config::Config,
    ctx: &CallerContext,
    disk: &mut AnyDisk,
    first_lba: u64,
    sectors: u64,
    bufs: &mut Work,
    start: u64,
) -> Result<Summary, Failure> {
    let io = |e: DiskError| fail!(fail::IO, "disk error: {e}");
    if first_lba != config.partition_first_lba || sectors != config.partition_sectors {
        return Err(fail!(
            fail::PARTITION,
            "partition is LBA {first_lba}+{sectors} here but {}+{} to the host: refusing",
            config.partition_first_lba,
            config.partition_sectors
        ));
    }
    let (image_start, image_end) = image_range();
    let image = Range { start: image_start, end: image_end };
    let ram = config.ram();
    let reach = paging::identity_end();
    if let Some(r) = ram.iter().find(|r| r.end > reach) {
        return Err(fail!(fail::MEMORY, "RAM {:#x}-{:#x} is beyond ksave's identity map ({} GiB)", r.start, r.end, reach >> 30));
    }

    // The backup map must be exactly ksave's own pages, sources in RAM: one
    // walk collects the pairs the image records, then they are checked.
    let is_ram = |a: u64| ram.iter().any(|r| r.contains(a));
    let mut pairs = [BackupPair::default(); header::MAX_BACKUP_PAIRS];
    let mut npairs = 0;
    let mut too_many = false;
    kexec::walk(ctx.backup_head, &IdentityMapped, is_ram, |d| match pairs.get_mut(npairs) {
        Some(slot) => {
            *slot = BackupPair { dest: d.dest, src: d.src };
            npairs += 1;
        }
        None => too_many = true,
    })
    .map_err(|e| fail!(fail::BACKUP_MAP, "backup map rejected: {e:?}"))?;
    if too_many {
        return Err(fail!(fail::BACKUP_MAP, "backup map lists more than {} pages: refusing", pairs.len()));
    }
    let mut seen = [0u64; 64];
    let displaced = pairs[..npairs].iter().map(|p| kexec::Displaced { dest: p.dest, src: p.src });
    let cov = kexec::coverage_of(displaced, image_start, image_end, &mut seen);
    if !cov.is_exact() {
        return Err(fail!(
            fail::BACKUP_MAP,
            "backup map is not exactly ksave's pages ({} outside, {} twice, {} uncovered, {} sources inside): refusing",
            cov.outside,
            cov.duplicates,
            cov.uncovered,
            cov.sources_inside
        ));
    }
    // Worst case first: a partition that might not hold it is refused now.
    let own_pages = ram.iter().map(|r| r.pages().filter(|p| image.contains(p * PAGE as u64)).count() as u64).sum::<u64>();
    let pages = ram.iter().map(|r| r.pages().count() as u64).sum::<u64>() - own_pages;
    let worst = worst_case_bytes(pages);
    let capacity = sectors * SECTOR;
    if worst > capacity {
        return Err(fail!(
            fail::TOO_SMALL,
            "partition holds {} MiB, the worst case for {} MiB of RAM needs {} MiB: nothing saved",
            capacity >> 20,
            pages * PAGE as u64 >> 20,
            worst.div_ceil(1 << 20)
        ));
    }

    let mut h = Header::new(State::Writing, config.nonce);
    h.created_unix = config.created_unix;
    h.encode(&mut bufs.block);
    disk.write(&KsaveHal, first_lba, &bufs.block).and_then(|()| disk.flush()).map_err(io)?;
    println!("ksave: image header written ({} ms after entry)", (hw::now_us() - start) / 1000);
    let (meta_len, meta_crc) = header::encode_meta(ram, &pairs[..npairs], &mut bufs.meta);
    let meta_bytes = &bufs.meta[..meta_len.next_multiple_of(SECTOR as usize).max(SECTOR as usize)];
    disk.write(&KsaveHal, first_lba + META_OFFSET / SECTOR, meta_bytes).map_err(io)?;

    let wbufs = writer::Buffers { raw_header: &mut bufs.raw_header, lz4_in: &mut bufs.lz4_in, lz4_out: &mut bufs.lz4_out };
    let mut w = Writer::new(config.nonce, config.lz4, capacity, wbufs);
    let mem = CallerMemory::new(reach, &mut bufs.page0);
    let mut sink = DiskSink { disk, first_lba, progress: Progress { start_us: start, worst, next: worst / 10 }, disk_us: 0 };
    let werr = |e| match e {
        writer::WriteError::Sink(d) => io(d),
        writer::WriteError::Unreachable(pfn) => fail!(fail::MEMORY, "page {pfn:#x} unreachable"),
        writer::WriteError::Full => fail!(fail::TOO_SMALL, "partition full"),
    };
    for r in ram {
        for pfn in r.pages() {
            if !image.contains(pfn * PAGE as u64) {
                w.add_page(pfn, &mem, &mut sink).map_err(werr)?;
            }
        }
    }
    let totals = w.finish(&mut sink).map_err(werr)?;
    sink.disk.flush().map_err(io)?;

    // The commit record, last.
    let us = hw::now_us() - start;
    let mut h = Header::new(State::Complete, config.nonce);
    h.created_unix = config.created_unix;
    h.reentry = ctx.reentry;
    h.image = image;
    h.ram_ranges = ram.len() as u32;
    h.backup_pairs = npairs as u32;
    h.meta_crc = meta_crc;
    h.record(&totals);
    h.save_us = us;
    h.cpu_vendor = ksave_format::cpu_vendor();
    h.set_message(config.info());
    h.encode(&mut bufs.block);
    sink.disk.write(&KsaveHal, first_lba, &bufs.block).and_then(|()| sink.disk.flush()).map_err(io)?;
    Ok(Summary {
        disk_us: sink.disk_us,
        pages_stored: totals.pages_stored,
        pages_zero: totals.pages_zero,
        bytes: DATA_OFFSET + totals.data_bytes,
        us,
        lz4_pages: totals.pages_lz4,
        lz4_skipped: totals.pages_lz4_skipped,
    })
}
