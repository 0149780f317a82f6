//! Saving the kexec caller's RAM to the configured partition, in stages:
//! open the partition, check it is the one the host set up, check every RAM
//! page is reachable, require the backup map to be exactly ksave's pages,
//! refuse a partition below the worst case, then write the image by the
//! format's commit protocol. Every outcome is reported on the console; a
//! failure once the partition is open also in a record on it.
//!
//! Nothing of the caller is written: its pages are read (zero check,
//! checksum, LZ4) and DMA'd from where they lie; ksave's own working memory
//! is in its image; device registers are put back as found.

use bootinfo::kexec::CallerContext;
use diskdrv::ide::Mode;
use diskdrv::{BlockDevice, Direction, DiskError, SECTOR};
use freepages::vmcoreinfo::Rule;
use ksave_format::commit::{self, Device, FreePages, NoneFree, Plan, Step};
use ksave_format::config::Config;
use ksave_format::header::{DATA_OFFSET, fail};
use ksave_format::writer::{self, Memory, Sink, Totals, WriteError};
use ksave_format::{PAGE, Range};
use zerocopy::FromBytes;

use crate::caller::{BackupMap, KernelView, MapError};
use crate::disks::{self, AnyDisk, CloseOnException, OpenPartition};
use crate::free::CallerFree;
use crate::hw::{self, KsaveHal};
use crate::layout::image_range;
use crate::message::Message;
use crate::physmem;
use crate::work::{self, Work};
use crate::{paging, println};
use diskdrv::Hal as _;
use freepages::vmcoreinfo::Info;

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
        // SAFETY: physical page 0 is identity-mapped RAM (physmem::read
        // copies it in asm: address 0 is null to the compiler).
        unsafe { physmem::read(0, page0) };
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
        // SAFETY: the page is inside the identity map, non-null, and RAM or
        // ACPI NVS the config listed (Plan::pages yields no other); the caller is stopped, so nothing writes it while
        // we read.
        Some(unsafe { &*(addr as *const [u8; PAGE]) })
    }
}

/// Chunks go to the partition by DMA: headers from ksave's buffers, raw
/// pages straight from the caller's memory.
struct DiskSink<'d> {
    disk: &'d mut AnyDisk<'static>,
    /// Fault on purpose at [`Step::HeaderWritten`] (config self-test).
    fault_at_header: bool,
    first_lba: u64,
    progress: Progress,
    /// Microseconds spent in disk transfers (the rest of a save is CPU work).
    disk_us: u64,
}

impl<'d> DiskSink<'d> {
    fn new(part: &'d mut OpenPartition, start_us: u64, worst: u64) -> Self {
        let first_lba = part.first_lba();
        Self { disk: &mut part.disk, fault_at_header: false, first_lba, progress: Progress { start_us, worst, next: worst / 10 }, disk_us: 0 }
    }
}

impl Device for DiskSink<'_> {
    fn flush(&mut self) -> Result<(), DiskError> {
        self.disk.flush()
    }

    fn reached(&mut self, step: Step) {
        match step {
            Step::HeaderWritten => println!("ksave: image header written ({} ms after entry)", (hw::now_us() - self.progress.start_us) / 1000),
        }
        if self.fault_at_header {
            println!("ksave: self-test: faulting in the middle of the save");
            // SAFETY: a deliberate page fault (1 TiB is beyond every identity
            // map ksave builds); the handler reports it and returns to the
            // caller, so the read never completes.
            unsafe { core::ptr::read_volatile(0x100_0000_0000 as *const u64) };
        }
    }
}

impl Sink for DiskSink<'_> {
    type Error = DiskError;

    fn write_raw(&mut self, offset: u64, header: &[u8], pfns: &[u64]) -> Result<(), DiskError> {
        let t = hw::now_us();
        let block = self.disk.info().block_size as u64;
        let header = (KsaveHal.virt_to_phys(header.as_ptr()), header.len() as u64);
        let pages = pfns.iter().map(|pfn| (pfn * PAGE as u64, PAGE as u64));
        // SAFETY: every piece is read by the device (a write to the disk),
        // never written: the header is ksave's own buffer, borrowed for
        // this call; each page is caller RAM or NVS that Plan::pages
        // listed, and the caller is stopped while ksave runs.
        unsafe { disks::transfer_pieces(self.disk, Direction::Write, self.first_lba + offset / block, core::iter::once(header).chain(pages))? };
        self.disk_us += hw::now_us() - t;
        self.progress.tick(offset + header.1 + (pfns.len() * PAGE) as u64);
        Ok(())
    }

    fn write_bytes(&mut self, offset: u64, bytes: &[u8]) -> Result<(), DiskError> {
        let t = hw::now_us();
        let block = self.disk.info().block_size as u64;
        self.disk.write(&KsaveHal, self.first_lba + offset / block, bytes)?;
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
    totals: Totals,
    us: u64,
}

/// Saves the caller's RAM as `config` says; `backup` is the caller's
/// backup map, walked at entry.
#[inline(never)] // its own frame, so that the stack it needs can be read off
pub fn run(config: &Config, ctx: &CallerContext, backup: &BackupMap, return_gdt: Option<(u64, u16)>, view: Option<&KernelView>, kernel: Result<Info, Message>) {
    let guid = config.partition_guid;
    println!("ksave: saving to partition {guid} (TSC {} MHz, nonce {:#018x})", hw::calibrate_tsc(), config.nonce);
    let mut part = match disks::open_partition(guid, Mode::Dma, config.iommus()) {
        Ok(p) => p,
        Err(e) => {
            println!("ksave: save FAILED: {e}; nothing written");
            post_to_mailbox(config, fail::PARTITION, format_args!("{e}; nothing written"));
            return;
        }
    };
    let start = hw::now_us();
    let work = work::take();
    let guard = CloseOnException::register(&mut part);
    let caller = Caller { ctx, backup, return_gdt, view, kernel };
    match save(config, &caller, &mut part, work, start) {
        Ok(s) => report(&s),
        Err(f) => {
            println!("ksave: save FAILED: {}", f.message.as_str());
            record(&mut part, config, &f, &mut work.block);
            post_to_mailbox(config, f.code, format_args!("{}", f.message.as_str()));
        }
    }
    drop(guard);
    part.close();
}

/// Leaves the reason in the host tool's mailbox page too: the one place it
/// can be read when the partition is what failed. Only into a page the
/// config names that is the caller's RAM, outside ksave, and stamped for
/// this attempt; and only once the attempt has failed, so no image is
/// being made of that memory.
pub fn post_to_mailbox(config: &Config, code: u32, why: core::fmt::Arguments) {
    let pa = config.mailbox;
    let Some(pa_end) = pa.checked_add(PAGE as u64) else {
        return;
    };
    let (start, end) = image_range();
    let in_ram = config.ram().iter().any(|r| r.start <= pa && pa_end <= r.end);
    if pa == 0 || !pa.is_multiple_of(PAGE as u64) || !in_ram || (start..end).contains(&pa) || pa_end > paging::identity_end() {
        return;
    }
    // SAFETY: a whole page of the caller's RAM inside ksave's identity map
    // (checked above), not address 0; the caller is stopped, and the host
    // tool lent this page for exactly this (it checks the stamp below too).
    let page = unsafe { &mut *(pa as *mut [u8; PAGE]) };
    let Ok((mailbox, _)) = ksave_format::mailbox::Mailbox::mut_from_prefix(page) else {
        return;
    };
    if mailbox.is_for(config.nonce) {
        mailbox.post(code, Message::format(why).as_str());
        println!("ksave: reason left in the host tool's mailbox at {pa:#x}");
    }
}

/// Writes a *failed* record of `failure` for the host tool to read.
#[inline(never)]
fn record(part: &mut OpenPartition, config: &Config, failure: &Failure, block: &mut [u8; PAGE]) {
    let mut sink = DiskSink::new(part, hw::now_us(), u64::MAX);
    match commit::record_failure(&mut sink, config.nonce, config.created_unix, failure.code, failure.message.as_str(), block) {
        Ok(()) => println!("ksave: failure recorded on the partition"),
        Err(e) => println!("ksave: could not record the failure either: {e}"),
    }
}

/// Records why ksave did not even try (found before the save began), so
/// that `ksave hibernate` can say it.
pub fn record_refusal(config: &Config, code: u32, why: core::fmt::Arguments) {
    let refusal = Failure { code, message: Message::format(why) };
    post_to_mailbox(config, code, format_args!("{}", refusal.message.as_str()));
    let mut part = match disks::open_partition(config.partition_guid, Mode::Dma, config.iommus()) {
        Ok(p) => p,
        Err(e) => {
            println!("ksave: could not record the failure either: {e}");
            return;
        }
    };
    // Only on the partition the host set up, as for a save.
    match check_partition(config, &part) {
        Ok(()) => record(&mut part, config, &refusal, &mut work::take().block),
        Err(e) => println!("ksave: could not record the failure either: {}", e.message.as_str()),
    }
    part.close();
}

/// What ksave learned about the caller at entry.
struct Caller<'a> {
    ctx: &'a CallerContext,
    backup: &'a BackupMap,
    return_gdt: Option<(u64, u16)>,
    /// Its memory as it sees it (only with an exact backup map).
    view: Option<&'a KernelView<'a>>,
    /// Its own description (vmcoreinfo), or why there is none.
    kernel: Result<Info, Message>,
}

/// The stages, in order; the first that fails says why.
#[inline(never)]
fn save(config: &Config, caller: &Caller, part: &mut OpenPartition, work: &mut Work, start: u64) -> Result<Summary, Failure> {
    let Caller { ctx, backup, return_gdt, .. } = *caller;
    check_partition(config, part)?;
    let (image_start, image_end) = image_range();
    let plan = Plan {
        nonce: config.nonce,
        created_unix: config.created_unix,
        lz4: config.lz4,
        capacity: part.bytes(),
        align: part.block_size(),
        ram: config.ram(),
        nvs: config.nvs(),
        image: Range { start: image_start, end: image_end },
        backup: backup.pairs(),
        reentry: ctx.reentry,
        info: config.info(),
        cpu_vendor: ksave_format::cpu_vendor(),
        return_gdt: return_gdt.unwrap_or((0, 0)),
        cr4_needed: ctx.saved_cr4,
        facs_signature: config.facs_signature,
        iommu_left_on: part.iommus_switched() > 0,
        free_rule: 0,
    };
    check_reachable(&plan)?;
    require_exact(backup)?;
    let worst = check_capacity(&plan)?;
    // Free pages: read through the caller's view of its memory, which
    // exists when the backup map is exact (required above).
    let mut caller_free = match (&caller.kernel, caller.view) {
        (Ok(info), Some(view)) => CallerFree::new(info, view, config.ram(), backup).map(|free| (*info, free)),
        (Ok(_), None) => Err(Message::format(format_args!("the backup map is not exactly ksave's pages"))),
        (Err(why), _) => Err(why.clone()),
    };
    let mut none = NoneFree;
    let (free, free_rule): (&mut dyn FreePages, u32) = match caller_free {
        Ok((info, ref mut free)) => {
            let (rule, (major, minor)) = (info.rule.code(), info.version);
            println!("ksave: free pages: left out, as the {major}.{minor} kernel's allocator marks them ({})", Rule::describe(rule));
            (free, rule)
        }
        Err(ref why) => {
            println!("ksave: free pages: saved like any other ({})", why.as_str());
            (&mut none, 0)
        }
    };
    write_image(&Plan { free_rule, ..plan }, part, work, start, worst, config.selftest_fault_in_save, free)
}

/// The partition found by GUID must be where the host saw it. The host
/// counts 512-byte sectors (sysfs), the GPT the disk's blocks.
fn check_partition(config: &Config, part: &OpenPartition) -> Result<(), Failure> {
    let per_block = part.block_size() as u64 / SECTOR;
    let (first_lba, sectors) = (part.first_lba() * per_block, part.partition.blocks() * per_block);
    if first_lba != config.partition_first_lba || sectors != config.partition_sectors {
        return Err(fail!(
            fail::PARTITION,
            "partition is LBA {first_lba}+{sectors} here but {}+{} to the host: refusing",
            config.partition_first_lba,
            config.partition_sectors
        ));
    }
    Ok(())
}

/// Every RAM and NVS page must be inside ksave's identity map.
fn check_reachable(plan: &Plan) -> Result<(), Failure> {
    let reach = paging::identity_end();
    match plan.ram.iter().chain(plan.nvs).find(|r| r.end > reach) {
        Some(r) => Err(fail!(fail::MEMORY, "memory {:#x}-{:#x} is beyond ksave's identity map ({} GiB)", r.start, r.end, reach >> 30)),
        None => Ok(()),
    }
}

/// The backup map must list exactly ksave's own pages, with their sources
/// in RAM: only then is every caller page either in place or in a source.
fn require_exact(backup: &BackupMap) -> Result<(), Failure> {
    match backup.outcome() {
        Ok(cov) if cov.is_exact() => Ok(()),
        Ok(cov) => Err(fail!(
            fail::BACKUP_MAP,
            "backup map is not exactly ksave's pages ({} outside, {} twice, {} uncovered, {} sources inside): refusing",
            cov.outside,
            cov.duplicates,
            cov.uncovered,
            cov.sources_inside
        )),
        Err(MapError::Walk(e)) => Err(fail!(fail::BACKUP_MAP, "backup map rejected: {e:?}")),
        Err(MapError::TooLong) => Err(fail!(fail::BACKUP_MAP, "backup map lists more than {} pages: refusing", crate::caller::MAX_PAIRS)),
    }
}

/// Worst case first: a partition that might not hold it is refused before
/// anything is written. Returns the worst case in bytes.
fn check_capacity(plan: &Plan) -> Result<u64, Failure> {
    let worst = plan.worst_case_bytes();
    if worst > plan.capacity {
        return Err(fail!(
            fail::TOO_SMALL,
            "partition holds {} MiB, the worst case for {} MiB of RAM needs {} MiB: nothing saved",
            plan.capacity >> 20,
            (plan.page_count() * PAGE as u64) >> 20,
            worst.div_ceil(1 << 20)
        ));
    }
    Ok(worst)
}

/// The image, by the format's commit protocol.
fn write_image(
    plan: &Plan,
    part: &mut OpenPartition,
    work: &mut Work,
    start: u64,
    worst: u64,
    plan_fault: bool,
    free: &mut dyn FreePages,
) -> Result<Summary, Failure> {
    let Work { block, page0, raw_header, lz4_in, lz4_out } = work;
    let mem = CallerMemory::new(paging::identity_end(), page0);
    let mut sink = DiskSink::new(part, start, worst);
    sink.fault_at_header = plan_fault;
    let bufs = commit::Buffers { block, writer: writer::Buffers { raw_header, lz4_in, lz4_out } };
    let (header, totals) = commit::save(plan, &mem, free, &mut sink, bufs, hw::now_us, start).map_err(|e| match e {
        WriteError::Sink(d) => fail!(fail::IO, "disk error: {d}"),
        WriteError::Unreachable(pfn) => fail!(fail::MEMORY, "page {pfn:#x} unreachable"),
        WriteError::Full => fail!(fail::TOO_SMALL, "partition full"),
    })?;
    Ok(Summary { disk_us: sink.disk_us, totals, us: header.save_us })
}

fn report(s: &Summary) {
    let t = &s.totals;
    println!(
        "ksave: saved {} pages ({} MiB, {} LZ4, {} raw untried) in {} ms = {} MB/s of RAM; left out {} free and {} zero pages; image {} MiB; disk {} ms, CPU {} ms",
        t.pages_stored,
        (t.pages_stored * PAGE as u64) >> 20,
        t.pages_lz4,
        t.pages_lz4_skipped,
        s.us / 1000,
        (t.pages_stored + t.pages_zero + t.pages_free) * PAGE as u64 / s.us.max(1),
        t.pages_free,
        t.pages_zero,
        (DATA_OFFSET + t.data_bytes) >> 20,
        s.disk_us / 1000,
        (s.us - s.disk_us) / 1000
    );
    crate::metric!(
        save_ms = s.us / 1000,
        pages_stored = t.pages_stored,
        pages_zero = t.pages_zero,
        pages_free = t.pages_free,
        pages_lz4 = t.pages_lz4,
        image_bytes = DATA_OFFSET + t.data_bytes,
        disk_ms = s.disk_us / 1000,
        ram_mb_s = (t.pages_stored + t.pages_zero + t.pages_free) * PAGE as u64 / s.us.max(1),
        stack_kib = crate::cpu::stack_used().div_ceil(1024),
    );
}
