//! Resuming a saved kernel from its image, and going back into it. Two ways
//! in: [`from_bootloader`] (GRUB multiboot2, QEMU multiboot1) and
//! [`from_kexec`] (a plain kexec from a freshly booted kernel C, whose
//! `ksave resume` wrote the config).
//!
//! Nothing outside ksave is written until the whole image has been read and
//! every check has passed: the RAM map, the CPU vendor, ksave's own range,
//! the ACPI NVS map, the state, and every chunk's checksum. Then every RAM
//! and NVS page is zeroed or loaded, the image is marked invalidated on
//! disk (never resumed twice), and ksave calls the saved re-entry address
//! as the kexec-jump protocol does.

use bootinfo::acpi::RemappingUnit;
use bootinfo::memmap::{MemoryMap, Region, RegionKind};
use diskdrv::ide::Mode;
use diskdrv::part::Guid;
use diskdrv::{BlockDevice, Direction, DiskError};
use ksave_format::PayloadHasher;
use ksave_format::chunk::LZ4_GROUP;
use ksave_format::config::{MAX_NVS, MAX_RANGES};
use ksave_format::header::{FLAG_IOMMU_LEFT_ON, META_BLOCKS, State};
use ksave_format::reader::{self, Source};
use ksave_format::{PAGE, Range};

use crate::disks::{self, AnyDisk};
use crate::hw::{self, KsaveHal};
use crate::layout::image_range;
use crate::message::Message;
use crate::work::{self, Work};
use crate::{caller, config, cpu, paging, physmem, println};

/// The partition, read through the disk driver.
struct DiskSource<'d, 'm> {
    disk: &'d mut AnyDisk<'m>,
    first_lba: u64,
    bytes: u64,
}

impl Source for DiskSource<'_, '_> {
    type Error = DiskError;
    /// Reads are whole blocks: the image aligns everything to the block size.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let block = self.disk.info().block_size as u64;
        if offset + buf.len() as u64 > self.bytes {
            return Err(DiskError::OutOfRange { lba: self.first_lba + offset / block, count: buf.len() as u64 / block, capacity: self.bytes / block });
        }
        self.disk.read(&KsaveHal, self.first_lba + offset / block, buf)
    }
}

/// A refusal: why the image is not resumed. Nothing outside ksave was
/// written when one is returned, unless `memory_lost`: then loading had
/// begun, the image is invalidated, and the machine must be reset.
pub struct Refusal {
    /// Why.
    pub why: Message,
    /// This boot's memory was given up: only a reset is left.
    pub memory_lost: bool,
}

impl Refusal {
    /// A refusal after loading began.
    fn late(self) -> Self {
        Self { memory_lost: true, ..self }
    }
}

macro_rules! refuse {
    ($($arg:tt)*) => { Refusal { why: Message::format(format_args!($($arg)*)), memory_lost: false } };
}

/// Started by a bootloader with `ksave.resume=GUID`: resumes the image in
/// this boot's RAM map, or returns why not (nothing was written; the
/// bootloader's next entry boots normally, and a later boot may try again).
pub fn from_bootloader(guid: Guid, map: &MemoryMap, iommus: &[RemappingUnit], facs_now: Result<u32, Message>) -> Refusal {
    let mut ram = [Range::default(); MAX_RANGES];
    let mut nvs = [Range::default(); MAX_NVS];
    // The host tool takes the same whole pages of the same kinds from
    // /sys/firmware/memmap (tools/src/sys.rs); more ranges than fit make
    // the maps differ, which refuses.
    let ram = page_aligned(map.ram(), &mut ram);
    let nvs = page_aligned(map.regions().iter().filter(|r| r.kind == RegionKind::AcpiNvs), &mut nvs);
    run(guid, Memory { ram, nvs }, iommus, false, facs_now)
}

/// The whole pages of `regions`, in `out`.
fn page_aligned<'a, 'o>(regions: impl Iterator<Item = &'a Region>, out: &'o mut [Range]) -> &'o [Range] {
    let mut n = 0;
    for page in regions.filter_map(|r| Range { start: r.start, end: r.end }.page_aligned()) {
        if n < out.len() {
            out[n] = page;
            n += 1;
        }
    }
    &out[..n]
}

/// This boot's memory that an image fills: RAM, and the ACPI NVS that
/// Linux's own hibernation saves and puts back (kernel/power/suspend_nvs.c).
/// Each page aligned and sorted.
#[derive(Clone, Copy)]
struct Memory<'a> {
    ram: &'a [Range],
    nvs: &'a [Range],
}

impl Memory<'_> {
    fn ranges(&self) -> impl Iterator<Item = &Range> {
        self.ram.iter().chain(self.nvs)
    }
}

/// Started by a plain kexec (no caller to return to): `ksave resume` in
/// kernel C wrote the partition and C's RAM map into the config. C is gone,
/// so a refusal invalidates the image (the next boot does not try it
/// again) and resets the machine into a normal boot.
pub fn from_kexec() -> ! {
    println!("ksave {}: started by kexec with no caller to return to: resuming", env!("CARGO_PKG_VERSION"));
    match config::load() {
        Ok(config) => {
            let facs_now = config.facs_signature.ok_or_else(|| Message::format(format_args!("the host could not read /sys/firmware/acpi/tables/FACS")));
            let here = Memory { ram: config.ram(), nvs: config.nvs() };
            let refusal = run(config.partition_guid, here, config.iommus(), true, facs_now);
            println!("ksave: not resuming: {}", refusal.why.as_str());
        }
        Err(e) => println!("ksave: not resuming: {e}"),
    }
    println!("ksave: resetting into a normal boot");
    cpu::reset()
}

/// Resumes the image on partition `guid` of a machine whose memory is
/// `here`. Returns only to refuse; then, if
/// `invalidate_refused`, a complete image is marked invalidated with the
/// reason, so that no later boot tries it again.
fn run(guid: Guid, here: Memory, iommus: &[RemappingUnit], invalidate_refused: bool, facs_now: Result<u32, Message>) -> Refusal {
    // RAM above 4 GiB on a CPU without 1 GiB pages; what stays unmapped is
    // refused below, before anything is written.
    if let Some(end) = here.ranges().map(|r| r.end).max()
        && let Err(e) = paging::map_ram_to(end)
    {
        println!("ksave: resume: {e}");
    }
    println!("ksave: resume: looking for the image on partition {guid} (TSC {} MHz)", hw::calibrate_tsc());
    let mut part = match disks::open_partition(guid, Mode::Dma, iommus) {
        Ok(p) => p,
        Err(e) => return refuse!("{e}"),
    };
    let work = work::take();
    let (first_lba, bytes) = (part.first_lba(), part.bytes());
    match check_and_load(&mut part.disk, first_lba, bytes, here, &facs_now, work) {
        Err(refusal) => {
            if invalidate_refused || refusal.memory_lost {
                invalidate_with(&mut part.disk, first_lba, &mut work.block, refusal.why.as_str());
            }
            if refusal.memory_lost {
                // The firmware's structures the controller pointed at are gone.
                part.stop();
            } else {
                part.close();
            }
            refusal
        }
        Ok(back) => {
            // Memory is the saved kernel's now: leave the controller stopped
            // rather than point it back at firmware addresses inside it.
            part.stop();
            println!("ksave: resume: jumping to the saved kernel at {:#x}", back.reentry);
            jump_to_saved_kernel(&back)
        }
    }
}

/// What going back into the saved kernel needs, from its image header.
struct WayBack {
    /// The re-entry address to `call`.
    reentry: u64,
    /// The GDT to leave in GDTR (base 0: none).
    gdt: (u64, u16),
    /// The kernel's return path runs in 5-level paging.
    la57: bool,
}

fn check_and_load(disk: &mut AnyDisk, first_lba: u64, bytes: u64, here: Memory, facs_now: &Result<u32, Message>, work: &mut Work) -> Result<WayBack, Refusal> {
    let start = hw::now_us();
    let Work { block, raw_header, lz4_in, lz4_out, .. } = work;
    let mut src = DiskSource { disk, first_lba, bytes };
    let mut header = reader::read_header(&mut src, block).map_err(|e| refuse!("no resumable image: {e}"))?;
    match header.state {
        State::Complete => {}
        State::Invalidated => {
            return Err(refuse!("the image was already resumed or invalidated: an image is never resumed twice"));
        }
        State::Writing => return Err(refuse!("the image is incomplete: its save never committed")),
        State::Failed => {
            return Err(refuse!("no image: the last save failed ({})", header.message()));
        }
    }
    let (own_start, own_end) = image_range();
    if header.image != (Range { start: own_start, end: own_end }) {
        return Err(refuse!("the image was saved by a ksave at {:#x}-{:#x}, this one is at {own_start:#x}-{own_end:#x}", header.image.start, header.image.end));
    }
    if header.flags & FLAG_IOMMU_LEFT_ON != 0 {
        return Err(refuse!(
            "the saved kernel's IOMMU was translating at its jump (no suspend hook: CONFIG_SUSPEND off), which a fresh boot cannot recreate: the image is a snapshot only"
        ));
    }
    if header.cpu_vendor != ksave_format::cpu_vendor() {
        return Err(refuse!("the image was saved on another CPU vendor"));
    }
    let la57 = header.cr4_needed & paging::CR4_LA57 != 0;
    if la57 && !paging::cpu_has_la57() {
        return Err(refuse!("the saved kernel runs with 5-level paging (CR4.LA57), which this CPU does not have"));
    }
    // The firmware changes the hardware signature when the hardware
    // changed; a signature that cannot be read is doubt, and doubt refuses.
    match (header.facs_signature, facs_now) {
        (None, _) => {}
        (Some(saved), Ok(now)) if saved == *now => {}
        (Some(saved), Ok(now)) => {
            return Err(refuse!("the ACPI hardware signature changed ({saved:#x} when saved, {now:#x} now): the hardware configuration changed"));
        }
        (Some(_), Err(why)) => {
            return Err(refuse!("the image records an ACPI hardware signature, and this boot's cannot be read: {}", why.as_str()));
        }
    }
    // The metadata is read into the LZ4 buffer: only its copy (`saved`)
    // is needed once the chunks are read.
    let meta_buf = (&mut lz4_in[..META_BLOCKS as usize * PAGE]).try_into().expect("the LZ4 buffer holds the metadata");
    let meta = reader::read_meta(&mut src, &header, meta_buf).map_err(|e| refuse!("bad image metadata: {e}"))?;
    let saved_ram: u64 = meta.ram_ranges().map(|r| r.end - r.start).sum();
    let here_ram: u64 = here.ram.iter().map(|r| r.end - r.start).sum();
    if !meta.ram_ranges().eq(here.ram.iter().copied()) {
        return Err(refuse!(
            "RAM map differs: the image holds {} MiB in {} ranges, this machine has {} MiB in {} ranges",
            saved_ram >> 20,
            header.ram_ranges,
            here_ram >> 20,
            here.ram.len()
        ));
    }
    // The saved kernel's firmware calls expect their NVS where it was.
    if !meta.nvs_ranges().eq(here.nvs.iter().copied()) {
        return Err(refuse!("ACPI NVS map differs: the image holds {} ranges, this machine has {}", header.nvs_ranges, here.nvs.len()));
    }
    if here.ranges().any(|r| r.end > paging::identity_end()) {
        return Err(refuse!("RAM above ksave's identity map ({} GiB)", paging::identity_end() >> 30));
    }

    // One pass: each chunk is loaded as it is read and checked, and every
    // page the image does not store is zeroed on the way. From here on the
    // machine's memory is the saved kernel's: this boot's firmware,
    // bootloader or kernel C is given up (ksave itself, the disk's DMA
    // memory and everything below are in ksave's own range), so a chunk
    // that fails its check now invalidates the image (it is damaged) and
    // resets the machine; nothing is lost, as the image was the only copy.
    let saved = reader::Saved::of(&meta, &header);
    let verified = hw::now_us();
    let own = Range { start: own_start, end: own_end };
    let mut loader = Loader { here, own, next: 0, zeroed: 0 };
    let bufs = reader::Buffers { header: raw_header, lz4_in: lz4_out, lz4_out: lz4_in };
    let loaded = reader::visit_chunks(&mut src, &header, &saved, bufs, &mut loader);
    if let Err(e) = loaded {
        return Err(Refusal::late(refuse!("image damaged: {e}")));
    }
    loader.zero_to(u64::MAX);
    let load_done = hw::now_us();
    println!(
        "ksave: resume: {} pages loaded, {} zeroed ({} free, {} zero when saved) in {} ms",
        header.pages_stored,
        loader.zeroed,
        header.pages_free,
        header.pages_zero,
        (load_done - verified) / 1000
    );

    // Never twice: the image is invalidated before the saved kernel runs.
    header.state = State::Invalidated;
    header.encode(block);
    let invalidated = src.disk.write(&KsaveHal, first_lba, block).and_then(|()| src.disk.flush());
    if let Err(e) = invalidated {
        println!("ksave: resume: FATAL: could not invalidate the image, so not resuming it: {e}");
        cpu::stop(crate::qemu::ExitCode::Failure);
    }
    println!(
        "ksave: resume: loaded in {} ms (checks {} ms, one pass {} ms); image invalidated",
        (hw::now_us() - start) / 1000,
        (verified - start) / 1000,
        (load_done - verified) / 1000
    );
    crate::metric!(
        resume_check_ms = (verified - start) / 1000,
        resume_load_ms = (load_done - verified) / 1000,
        pages_stored = header.pages_stored,
        stack_kib = cpu::stack_used().div_ceil(1024),
    );
    Ok(WayBack { reentry: header.reentry, gdt: header.return_gdt, la57 })
}

/// Loads a checked image's pages in one pass (a [`reader::Visitor`]): raw
/// chunks by DMA straight into their pages, LZ4 pages decoded and copied,
/// and every page of this machine's RAM and NVS the image does not store
/// zeroed (pages that were zero or free when saved, and pages no image
/// holds, like the firmware's). Relies on stored pages coming in ascending
/// order, which the reader checks.
struct Loader<'a> {
    here: Memory<'a>,
    own: Range,
    /// The first page not yet loaded or zeroed.
    next: u64,
    /// Pages zeroed.
    zeroed: u64,
}

impl Loader<'_> {
    /// Zeroes every page of this machine's memory from `next` up to `pfn`
    /// (exclusive), outside ksave's own range.
    fn zero_to(&mut self, pfn: u64) {
        if pfn <= self.next {
            return;
        }
        let (from, to) = (self.next * PAGE as u64, pfn.saturating_mul(PAGE as u64));
        for r in self.here.ranges() {
            let (start, end) = (r.start.max(from), r.end.min(to));
            for (s, e) in [(start, end.min(self.own.start)), (start.max(self.own.end), end)] {
                if s < e {
                    // SAFETY: RAM or NVS of this machine's map, inside the
                    // identity map (checked before loading), outside ksave:
                    // nothing of ours lives there, and this boot's firmware
                    // and bootloader were given up.
                    unsafe { physmem::zero(s, (e - s) as usize) };
                    self.zeroed += (e - s) / PAGE as u64;
                }
            }
        }
        self.next = pfn;
    }
}

impl<'d, 'm> reader::Visitor<DiskSource<'d, 'm>> for Loader<'_> {
    fn page(&mut self, pfn: u64, data: &[u8; PAGE]) {
        self.zero_to(pfn);
        // SAFETY: the reader checked the page lies in the saved RAM or NVS
        // (equal to this machine's) and outside ksave's range.
        unsafe { physmem::write(pfn * PAGE as u64, data) };
        self.next = pfn + 1;
    }

    fn raw_pages(&mut self, src: &mut DiskSource<'d, 'm>, at: u64, pfns: &[u64], buf: &mut [u8; LZ4_GROUP * PAGE]) -> Result<u64, DiskError> {
        // The gaps first: the pages are written by the device below.
        for &pfn in pfns {
            self.zero_to(pfn);
            self.next = pfn + 1;
        }
        let block = src.disk.info().block_size as u64;
        let pages = pfns.iter().map(|pfn| (pfn * PAGE as u64, PAGE as u64));
        // SAFETY: the device writes these pages (a disk read). Each is RAM
        // or NVS of this machine that the reader checked lies in the saved
        // memory and outside ksave's range, and this boot gave that memory
        // up to the saved kernel (check_and_load).
        unsafe { disks::transfer_pieces(src.disk, Direction::Read, src.first_lba + at / block, pages)? };
        // The check, over the pages where they now lie.
        let mut hasher = PayloadHasher::new();
        for &pfn in pfns {
            let page = &mut buf[..PAGE];
            // SAFETY: a page the device just filled (above); copied out in
            // asm because page 0 is RAM but null to Rust.
            unsafe { physmem::read(pfn * PAGE as u64, page) };
            hasher.update(page);
        }
        Ok(hasher.digest())
    }
}

/// Marks a complete image invalidated, with `why` as its message.
fn invalidate_with(disk: &mut AnyDisk, first_lba: u64, block: &mut [u8; PAGE], why: &str) {
    if disk.read(&KsaveHal, first_lba, block).is_err() {
        return;
    }
    let Ok(mut header) = ksave_format::header::Header::decode(block) else {
        return;
    };
    if header.state != State::Complete {
        return;
    }
    header.state = State::Invalidated;
    header.set_message(why);
    header.encode(block);
    match disk.write(&KsaveHal, first_lba, block).and_then(|()| disk.flush()) {
        Ok(()) => println!("ksave: image invalidated, so no later boot tries it again"),
        Err(e) => println!("ksave: could not invalidate the refused image: {e}"),
    }
}

/// Goes into the saved kernel the way a kexec jump returns: a `call` of its
/// re-entry address in its control page, in its paging mode, with its GDT.
/// A cold boot left EFER.NXE clear, but the saved kernel's page tables,
/// which relocate_kernel_64.S's virtual_mapped loads before
/// restore_processor_state() puts EFER back (arch/x86/power/cpu.c), carry
/// NX bits, reserved without it. Its way back loads its identity table and
/// then its own CR3 before it restores CR4: both are read in the paging
/// mode the CPU is in, so that must be the kernel's (4- or 5-level).
fn jump_to_saved_kernel(back: &WayBack) -> ! {
    const MSR_EFER: u32 = 0xC000_0080;
    const EFER_NXE: u64 = 1 << 11;
    // SAFETY: EFER.NXE only enables the XD bit in page tables (Intel SDM
    // vol. 3A 4.1.3); ksave's own tables set no XD bits. LA57 was checked
    // against CPUID before anything was written (check_and_load); ksave runs
    // from its own image with interrupts off. The re-entry address and GDT
    // are the ones the image recorded, in the saved kernel's memory, just
    // restored and identity-mapped by ksave's tables.
    unsafe {
        paging::set_la57(back.la57);
        x86::msr::wrmsr(MSR_EFER, x86::msr::rdmsr(MSR_EFER) | EFER_NXE);
        caller::enter_saved_kernel(back.reentry, back.gdt)
    }
}
