//! Saving the kexec caller's RAM to the configured partition: open the
//! partition, run the stages (`ksave_core::save`: the partition is the one
//! the host set up, every RAM page is reachable, the backup map is exactly
//! ksave's pages, the partition holds the worst case), pick the free pages
//! to leave out, then write the image by the format's commit protocol.
//! Every outcome is reported on the console; a failure once the partition
//! is open also in a record on it.
//!
//! Nothing of the caller is written: its pages are read (zero check,
//! checksum, LZ4) and DMA'd from where they lie; ksave's own working memory
//! is in its image; device registers are put back as found.

use diskdrv::ide::Mode;
use freepages::vmcoreinfo::Rule;
use ksave_core::Message;
use ksave_core::save::{Failure, FoundPartition, HostPartition, Stages, Summary};
use ksave_format::commit::{self, Device, FreePages, NoneFree, Plan, Step};
use ksave_format::config::Config;
use ksave_format::header::{DATA_OFFSET, META_BYTES, fail};
use ksave_format::reader::Source;
use ksave_format::store::Claimed;
use ksave_format::writer::{self, ChunkSealer, GroupCoder, Memory, Sink};
use ksave_core::helpers::{QueueCoder, QueueSealer};
use ksave_format::{PAGE, Range};

use crate::disks::{self, CloseOnException, FileAt, OpenPartition, StoreAt};
use crate::free::CallerFree;
use crate::hw;
use crate::jump::Caller;
use crate::layout::image_range;
use crate::physmem;
use crate::disks::DiskStore;
use ksave_core::store::StoreIoError;
use crate::work::{self, Work};
use crate::{paging, println, smp};

/// The caller's pages, read through the identity map. Page 0 is real RAM,
/// but no Rust reference may point at address 0: it is read through a copy.
/// The page the other CPUs start in is read from its stand-in.
struct CallerMemory<'a> {
    end: u64,
    page0: &'a [u8; PAGE],
    /// The start-up page's frame and its stand-in's address.
    held: Option<(u64, u64)>,
}

impl<'a> CallerMemory<'a> {
    fn new(end: u64, page0: &'a mut [u8; PAGE], held: Option<(u64, u64)>) -> Self {
        // SAFETY: physical page 0 is identity-mapped RAM (physmem::read
        // copies it in asm: address 0 is null to the compiler).
        unsafe { physmem::read(0, page0) };
        Self { end, page0, held }
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
        if let Some((held, stand_in)) = self.held
            && held == pfn
        {
            // SAFETY: the stand-in is a page of ksave's image, written only
            // when the other CPUs are parked, after the save.
            return Some(unsafe { &*(stand_in as *const [u8; PAGE]) });
        }
        // SAFETY: the page is inside the identity map, non-null, and RAM or
        // ACPI NVS the config listed (Plan::pages yields no other); the caller is stopped, so nothing writes it while
        // we read.
        Some(unsafe { &*(addr as *const [u8; PAGE]) })
    }
}

/// Chunks go to the image store by DMA: headers from ksave's buffers, raw
/// pages straight from the caller's memory; timed, with progress.
struct DiskSink<'d> {
    store: DiskStore<'d>,
    /// Fault on purpose at [`Step::HeaderWritten`] (config self-test).
    fault_at_header: bool,
    progress: Progress,
    /// Microseconds spent in disk transfers (the rest of a save is CPU work).
    disk_us: u64,
}

impl<'d> DiskSink<'d> {
    fn new(part: &'d mut OpenPartition, start_us: u64, worst: u64) -> Self {
        Self { store: part.store(), fault_at_header: false, progress: Progress { start_us, worst, next: worst / 10 }, disk_us: 0 }
    }
}

impl Device for DiskSink<'_> {
    fn flush(&mut self) -> Result<(), StoreIoError> {
        self.store.flush()
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
    type Error = StoreIoError;

    fn write_raw(&mut self, offset: u64, header: &[u8], pfns: &[u64]) -> Result<(), StoreIoError> {
        let t = hw::now_us();
        self.store.write_raw(offset, header, pfns)?;
        self.disk_us += hw::now_us() - t;
        self.progress.tick(offset + (header.len() + pfns.len() * PAGE) as u64);
        Ok(())
    }

    fn write_bytes(&mut self, offset: u64, bytes: &[u8]) -> Result<(), StoreIoError> {
        let t = hw::now_us();
        self.store.write_bytes(offset, bytes)?;
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

/// Saves `caller`'s RAM as `config` says, or says why not: then, once the
/// partition is open, the reason is also recorded on it (the caller bails
/// out with it, which leaves it in the host tool's mailbox too).
#[inline(never)] // its own frame, so that the stack it needs can be read off
pub fn run(config: &Config, caller: &Caller) -> Result<(), Failure> {
    let at = store_at(config);
    match at.file {
        Some(f) => println!("ksave: saving to the image file at byte {} of partition {} (TSC {} MHz, nonce {:#018x})", f.offset, at.guid, hw::calibrate_tsc(), config.nonce),
        None => println!("ksave: saving to partition {} (TSC {} MHz, nonce {:#018x})", at.guid, hw::calibrate_tsc(), config.nonce),
    }
    let mut part = match disks::open_partition(at, Mode::Dma, config.iommus()) {
        Ok(p) => p,
        Err(e) => {
            println!("ksave: save FAILED: {e}; nothing written");
            return Err(Failure::new(fail::PARTITION, format_args!("{e}; nothing written")));
        }
    };
    let start = hw::now_us();
    let work = work::take();
    let guard = CloseOnException::register(&mut part);
    let outcome = match claimed(&mut part, config, &mut work.block) {
        Ok(claimed) => {
            let outcome = save(config, caller, &mut part, claimed, work, start);
            if let Err(f) = &outcome {
                println!("ksave: save FAILED: {}", f.message.as_str());
                record(&mut part, &claimed, config, f, &mut work.block);
            }
            outcome
        }
        Err(f) => {
            println!("ksave: save FAILED: {}", f.message.as_str());
            Err(f)
        }
    };
    if let Ok((summary, disk_us)) = &outcome {
        report(summary, *disk_us);
    }
    drop(guard);
    part.close();
    outcome.map(|_| ())
}

/// The proof that the partition is ksave's store: its header carries the
/// claim the config names, and it lies on the disk the claim names. Read
/// into `block` before anything is written.
fn claimed(part: &mut OpenPartition, config: &Config, block: &mut [u8; PAGE]) -> Result<Claimed, Failure> {
    if let Err(e) = part.store().read_at(0, block) {
        return Err(Failure::new(fail::IO, format_args!("disk error reading the store's header: {e}; nothing written")));
    }
    ksave_core::save::check_claim(block, part.partition.disk.to_bytes(), &config.claim)
}

/// Writes a *failed* record of `failure` for the host tool to read, on the
/// store `claimed` proves ksave's.
#[inline(never)]
fn record(part: &mut OpenPartition, claimed: &Claimed, config: &Config, failure: &Failure, block: &mut [u8; PAGE]) {
    let mut sink = DiskSink::new(part, hw::now_us(), u64::MAX);
    match commit::record_failure(&mut sink, claimed, config.nonce, config.created_unix, failure.code, failure.message.as_str(), block) {
        Ok(()) => println!("ksave: failure recorded on the partition"),
        Err(e) => println!("ksave: could not record the failure either: {e}"),
    }
}

/// Records why ksave did not even try (found before the save began), so
/// that `ksave hibernate` can say it.
pub fn record_refusal(config: &Config, code: u32, why: core::fmt::Arguments) {
    let refusal = Failure::new(code, why);
    let mut part = match disks::open_partition(store_at(config), Mode::Dma, config.iommus()) {
        Ok(p) => p,
        Err(e) => {
            println!("ksave: could not record the failure either: {e}");
            return;
        }
    };
    // Only on the partition the host set up, and only if it is ksave's, as
    // for a save.
    let block = &mut work::take().block;
    let checked = ksave_core::save::check_partition(&found_partition(&part), &host_partition(config)).and_then(|()| claimed(&mut part, config, block));
    match checked {
        Ok(claimed) => record(&mut part, &claimed, config, &refusal, block),
        Err(e) => println!("ksave: could not record the failure either: {}", e.message.as_str()),
    }
    part.close();
}

/// The stages, in order; the first that fails says why. Then the image.
/// Returns what was written, and the microseconds spent in disk transfers.
#[inline(never)]
fn save(config: &Config, caller: &Caller, part: &mut OpenPartition, claimed: Claimed, work: &mut Work, start: u64) -> Result<(Summary, u64), Failure> {
    let Caller { ctx, backup, return_gdt, .. } = *caller;
    let (image_start, image_end) = image_range();
    // An encrypted store takes only sealed images; the key is the config
    // block's (wiped on the way out: cpu::forget_secrets).
    let seal = crate::config::seal();
    if part.encrypted && seal.is_none() {
        return Err(Failure::new(
            fail::CONFIG,
            format_args!("the image file lies on an encrypted volume and the config carries no key to seal the image with: nothing written"),
        ));
    }
    let stages = Stages {
        plan: Plan {
            nonce: config.nonce,
            created_unix: config.created_unix,
            lz4: config.lz4,
            capacity: part.store().bytes(),
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
            filesystems: config.filesystems(),
            sealed: seal.is_some(),
            free_as_found: config.free_as_found,
        },
        claimed,
        found: found_partition(part),
        host: host_partition(config),
        reach: paging::identity_end(),
        backup: backup.outcome(),
        started_us: start,
    };
    let ready = stages.check()?;
    // Free pages: read through the caller's view of its memory, which
    // exists when the backup map is exact (required above).
    let mut caller_free = match (&caller.kernel, caller.view) {
        (Ok(info), Some(view)) => CallerFree::new(info, view, config.ram(), backup).map(|free| (*info, free)),
        (Ok(_), None) => Err(Message::format(format_args!("the backup map is not exactly ksave's pages"))),
        (Err(why), _) => Err(why.clone()),
    };
    // A second walk of the same free pages, to count what this save needs
    // before it writes when the store is smaller than the worst case.
    let mut counting_free = caller_free.as_ref().ok().and_then(|(info, _)| CallerFree::new(info, caller.view?, config.ram(), backup).ok());
    let (mut none, mut none_counting) = (NoneFree, NoneFree);
    let counting: &mut dyn FreePages = match counting_free {
        Some(ref mut free) => free,
        None => &mut none_counting,
    };
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
    // The image, by the format's commit protocol.
    let Work { block, page0, raw_header, lz4_in, lz4_out, sealed_chunks, read_ahead, .. } = work;
    if seal.is_some() {
        println!("ksave: sealing the image (AES-256-GCM, the key from the config)");
    }
    if config.one_cpu {
        smp::keep_to_one_cpu();
    }
    // The other CPUs code LZ4 and seal raw chunks (parked again when `cpus`
    // goes, before the jump back): a plain save has nothing to share.
    let mut cpus = smp::Cpus::new();
    // SAFETY: the config's RAM is the caller's (the host listed it), and
    // the start-up page's contents go back into it when they are parked.
    let started = (config.lz4 || seal.is_some()).then(|| unsafe { cpus.for_save(config.ram()) });
    let held = started.and_then(|(_, held)| held);
    // SAFETY: this CPU alone submits; coding jobs touch only their slots.
    let mut coder = started.map(|(queue, _)| unsafe { QueueCoder::new(queue) });
    // SAFETY: this CPU alone submits; the sealer goes before `cpus`, which
    // parks the other CPUs before the chunks' buffers are used again.
    let mut sealer = seal.zip(started).map(|(seal, (queue, _))| unsafe { QueueSealer::new(queue, seal, sealed_chunks) });
    let mem = CallerMemory::new(paging::identity_end(), page0, held);
    let mut sink = DiskSink::new(part, start, ready.worst_case_bytes());
    if let Some((pfn, stand_in)) = held {
        // SAFETY: the stand-in is a page of ksave's image, not written
        // until the other CPUs are parked, after the save.
        unsafe { sink.store.take_page_from(pfn, stand_in) };
    }
    sink.fault_at_header = config.selftest_fault_in_save;
    let meta = (&mut lz4_in[..META_BYTES]).try_into().expect("the work buffer holds the metadata");
    let scratch = (&mut lz4_out[..META_BYTES]).try_into().expect("the work buffer holds the metadata");
    let coder = coder.as_mut().map(|c| c as &mut dyn GroupCoder);
    // The restore's read-ahead window gathers the save's chunks for the disk.
    let seal = seal.zip(sealer.as_mut()).map(|(seal, sealer)| (seal, sealer as &mut dyn ChunkSealer));
    let writer = writer::Buffers { raw_header, coder, write_behind: Some(&mut read_ahead[..]), seal };
    let summary = ready.write(&mut sink, &mem, free, counting, free_rule, commit::Buffers { block, meta, scratch, writer }, hw::now_us)?;
    if let Some((queue, _)) = started {
        let (jobs_helped, jobs_own) = queue.jobs_run();
        println!("ksave: {jobs_helped} jobs (groups coded, chunks sealed) run by the other CPUs, {jobs_own} by this one");
        crate::metric!(jobs_helped = jobs_helped, jobs_own = jobs_own);
    }
    Ok((summary, sink.disk_us))
}

/// Where the config says the store is: a partition, or a file in it whose
/// map is the one the host checked.
pub fn store_at(config: &Config) -> StoreAt {
    StoreAt { guid: config.partition_guid, file: config.file_map.map(|m| FileAt { offset: m.offset, expected_crc: Some(m.crc) }) }
}

/// The partition as found by GUID, in the disk's blocks.
fn found_partition(part: &OpenPartition) -> FoundPartition {
    FoundPartition { first_lba: part.first_lba(), blocks: part.partition.blocks(), block_size: part.block_size() }
}

/// The partition as the host saw it (sysfs counts 512-byte sectors).
fn host_partition(config: &Config) -> HostPartition {
    HostPartition { first_sector: config.partition_first_lba, sectors: config.partition_sectors }
}

fn report(s: &Summary, disk_us: u64) {
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
        disk_us / 1000,
        (s.us - disk_us) / 1000
    );
    crate::metric!(
        save_ms = s.us / 1000,
        pages_stored = t.pages_stored,
        pages_zero = t.pages_zero,
        pages_free = t.pages_free,
        pages_lz4 = t.pages_lz4,
        image_bytes = DATA_OFFSET + t.data_bytes,
        disk_ms = disk_us / 1000,
        ram_mb_s = (t.pages_stored + t.pages_zero + t.pages_free) * PAGE as u64 / s.us.max(1),
        stack_kib = crate::cpu::stack_used().div_ceil(1024),
    );
}
