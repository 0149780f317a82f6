//! Resuming a saved kernel from its image, and going back into it. Two ways
//! in: [`from_bootloader`] (GRUB multiboot2, QEMU multiboot1) and
//! [`from_kexec`] (a plain kexec from a freshly booted kernel C, whose
//! `ksave resume` wrote the config).
//!
//! Nothing outside ksave is written until the image's header and metadata
//! have passed the one verdict ([`verdict::resumable`]: the state, ksave's
//! own range, the CPU, the hardware signature, the RAM and ACPI NVS maps).
//! Then every RAM and NVS page is zeroed or loaded as its chunk checks, the
//! image is invalidated on disk (never resumed twice), and ksave calls the
//! saved re-entry address as the kexec-jump protocol does.

use bootinfo::acpi::RemappingUnit;
use bootinfo::memmap::{MemoryMap, Region, RegionKind};
use diskdrv::Direction;
use diskdrv::ide::Mode;
use diskdrv::part::Guid;
use ksave_format::PayloadHasher;
use ksave_format::chunk::LZ4_GROUP;
use ksave_format::config::{MAX_NVS, MAX_RANGES};
use ksave_format::header::META_BLOCKS;
use ksave_format::reader::{self, ReadError};
use ksave_format::verdict::{self, Here, Refusal, Resumer};
use ksave_format::{PAGE, Range};

use crate::disks;
use crate::hw;
use crate::layout::image_range;
use crate::message::Message;
use crate::store::{DiskStore, StoreIoError};
use crate::work::{self, Work};
use crate::{config, cpu, paging, physmem, println, wayback};

/// Why the image is not resumed: the verdict's reason, what ksave knows
/// more (a disk's error, why the hardware signature is unknown), and
/// whether this boot's memory was given up (loading had begun: the image
/// is invalidated, and only a reset is left). Nothing outside ksave was
/// written unless `memory_lost`.
pub struct Refused {
    /// The reason, with its stable code.
    pub refusal: Refusal,
    /// More about it, if there is more to say.
    pub detail: Option<Message>,
    /// This boot's memory was given up: only a reset is left.
    pub memory_lost: bool,
}

impl Refused {
    fn new(refusal: Refusal) -> Self {
        Self { refusal, detail: None, memory_lost: false }
    }

    fn with(refusal: Refusal, detail: core::fmt::Arguments) -> Self {
        Self { detail: Some(Message::format(detail)), ..Self::new(refusal) }
    }

    /// Says why on the console, with the code for the harness.
    pub fn report(&self) {
        match &self.detail {
            Some(d) => println!("ksave: not resuming: {} ({})", self.refusal, d.as_str()),
            None => println!("ksave: not resuming: {}", self.refusal),
        }
        crate::metric!(refusal = self.refusal.code(), memory_lost = self.memory_lost as u8);
    }

    /// The text recorded in an invalidated header.
    fn why(&self) -> Message {
        match &self.detail {
            Some(d) => Message::format(format_args!("{} ({})", self.refusal, d.as_str())),
            None => Message::format(format_args!("{}", self.refusal)),
        }
    }
}

/// Started by a bootloader with `ksave.resume=GUID`: resumes the image in
/// this boot's RAM map, or returns why not (nothing was written; the
/// bootloader's next entry boots normally, and a later boot may try again).
pub fn from_bootloader(guid: Guid, map: &MemoryMap, iommus: &[RemappingUnit], facs_now: Result<u32, Message>) -> Refused {
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
            run(config.partition_guid, here, config.iommus(), true, facs_now).report();
        }
        Err(e) => println!("ksave: not resuming: {e}"),
    }
    println!("ksave: resetting into a normal boot");
    cpu::reset()
}

/// Resumes the image on partition `guid` of a machine whose memory is
/// `here`. Returns only to refuse; then, if `invalidate_refused`, the image
/// is marked invalidated with the reason, so that no later boot tries it
/// again.
fn run(guid: Guid, here: Memory, iommus: &[RemappingUnit], invalidate_refused: bool, facs_now: Result<u32, Message>) -> Refused {
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
        Err(e) => return Refused::with(Refusal::NoStore, format_args!("{e}")),
    };
    let work = work::take();
    let mut store = part.store();
    match check_and_load(&mut store, here, &facs_now, work) {
        Err(refused) => {
            if invalidate_refused || refused.memory_lost {
                match store.invalidate(Some(refused.why().as_str()), &mut work.block) {
                    Ok(_) => println!("ksave: image invalidated, so no later boot tries it again"),
                    Err(e) => println!("ksave: could not invalidate the refused image: {e}"),
                }
            }
            if refused.memory_lost {
                // The firmware's structures the controller pointed at are gone.
                part.stop();
            } else {
                part.close();
            }
            refused
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

/// The refusal a failed read of the image stands for.
fn unreadable(e: ReadError<StoreIoError>) -> Refused {
    match e {
        ReadError::Io(e) => Refused::with(Refusal::Unreadable, format_args!("{e}")),
        ReadError::Header(h) => Refused::new(Refusal::NoImage(h)),
        ReadError::Chunk { index, what, .. } => Refused::new(Refusal::Damaged { chunk: index, what }),
        ReadError::Totals(what) => Refused::new(Refusal::Damaged { chunk: u64::MAX, what }),
    }
}

fn check_and_load(store: &mut DiskStore, here: Memory, facs_now: &Result<u32, Message>, work: &mut Work) -> Result<WayBack, Refused> {
    let start = hw::now_us();
    let Work { block, raw_header, lz4_in, lz4_out, .. } = work;
    let header = reader::read_header(store, block).map_err(unreadable)?;
    // The metadata is read into the LZ4 buffer: only its copy (`saved`)
    // is needed once the chunks are read.
    let meta_buf = (&mut lz4_in[..META_BLOCKS as usize * PAGE]).try_into().expect("the LZ4 buffer holds the metadata");
    let meta = match reader::read_meta(store, &header, meta_buf) {
        Ok(meta) => Ok(meta),
        Err(ReadError::Header(e)) => Err(e),
        Err(e) => return Err(unreadable(e)),
    };
    let (own_start, own_end) = image_range();
    let own = Range { start: own_start, end: own_end };
    let verdict_here = Here {
        resumer: Resumer::Ksave,
        ram: here.ram,
        nvs: here.nvs,
        cpu_vendor: ksave_format::cpu_vendor(),
        la57: paging::cpu_has_la57(),
        facs_signature: facs_now.as_ref().ok().copied(),
        own: Some(own),
        reach: paging::identity_end(),
    };
    match verdict::resumable(&header, meta.as_ref().map_err(|e| *e), &verdict_here) {
        Ok(()) => {}
        Err(Refusal::SaveFailed) => return Err(Refused::with(Refusal::SaveFailed, format_args!("{}", header.message()))),
        Err(r @ Refusal::HardwareUnknown) => {
            let why = facs_now.as_ref().err().map_or("", |m| m.as_str());
            return Err(Refused::with(r, format_args!("{why}")));
        }
        Err(r) => return Err(Refused::new(r)),
    }
    let meta = meta.expect("the verdict passed the metadata");
    let la57 = header.cr4_needed & paging::CR4_LA57 != 0;

    // One pass: each chunk is loaded as it is read and checked, and every
    // page the image does not store is zeroed on the way. From here on the
    // machine's memory is the saved kernel's: this boot's firmware,
    // bootloader or kernel C is given up (ksave itself, the disk's DMA
    // memory and everything below are in ksave's own range), so a chunk
    // that fails its check now invalidates the image (it is damaged) and
    // resets the machine; nothing is lost, as the image was the only copy.
    let saved = reader::Saved::of(&meta, &header);
    let verified = hw::now_us();
    let mut loader = Loader { here, own, next: 0, zeroed: 0 };
    let bufs = reader::Buffers { header: raw_header, lz4_in: lz4_out, lz4_out: lz4_in };
    if let Err(e) = reader::visit_chunks(store, &header, &saved, bufs, &mut loader) {
        return Err(Refused { memory_lost: true, ..unreadable(e) });
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
    if let Err(e) = store.invalidate(None, block) {
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

impl<'d, 'm> reader::Visitor<DiskStore<'d, 'm>> for Loader<'_> {
    fn page(&mut self, pfn: u64, data: &[u8; PAGE]) {
        self.zero_to(pfn);
        // SAFETY: the reader checked the page lies in the saved RAM or NVS
        // (equal to this machine's) and outside ksave's range.
        unsafe { physmem::write(pfn * PAGE as u64, data) };
        self.next = pfn + 1;
    }

    fn raw_pages(&mut self, store: &mut DiskStore<'d, 'm>, at: u64, pfns: &[u64], buf: &mut [u8; LZ4_GROUP * PAGE]) -> Result<u64, StoreIoError> {
        // The gaps first: the pages are written by the device below.
        for &pfn in pfns {
            self.zero_to(pfn);
            self.next = pfn + 1;
        }
        let pages = pfns.iter().map(|pfn| (pfn * PAGE as u64, PAGE as u64));
        // SAFETY: the device writes these pages (a disk read). Each is RAM
        // or NVS of this machine that the reader checked lies in the saved
        // memory and outside ksave's range, and this boot gave that memory
        // up to the saved kernel (check_and_load).
        unsafe { store.transfer(Direction::Read, at, (pfns.len() * PAGE) as u64, pages)? };
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
        wayback::enter_saved_kernel(back.reentry, back.gdt)
    }
}
