//! Resuming a saved kernel from its image, and going back into it. Two ways
//! in: [`from_bootloader`] (GRUB multiboot2, QEMU multiboot1) and
//! [`from_kexec`] (a plain kexec from a freshly booted kernel C, whose
//! `ksave resume` wrote the config).
//!
//! The checks, the load and the invalidation are
//! [`ksave_core::resume::check_and_load`]'s: nothing outside ksave is
//! written until the image's header and metadata have passed the one
//! verdict (`ksave_format::verdict::resumable`: the state, ksave's own
//! range, the CPU, the hardware signature, the RAM and ACPI NVS maps); then
//! every RAM and NVS page is zeroed or loaded as its chunk checks, and the
//! image is invalidated on disk (never resumed twice). Here: this boot's
//! memory map, the disk, the console, and the call of the saved re-entry
//! address as the kexec-jump protocol does.

use bootinfo::acpi::RemappingUnit;
use bootinfo::memmap::{MemoryMap, Region, RegionKind};
use diskdrv::ide::Mode;
use ksave_core::Message;
use ksave_core::resume::{self, Buffers, Machine, Refused, Resumed, WayBack, WhenRefused};
use diskdrv::part::Guid;
use ksave_format::header::{FS_BTRFS, FS_EXT4, FS_XFS, META_BLOCKS, State};
use ksave_format::{PAGE, Range, reader};
use ksave_format::config::{MAX_NVS, MAX_RANGES};
use ksave_format::seal::Seal;
use ksave_format::verdict::Refusal;

use crate::disks::{self, StoreAt};
use crate::hw;
use crate::layout::image_range;
use crate::physmem::IdentityMapped;
use crate::work::{self, Work};
use crate::{config, cpu, paging, println, smp, wayback};

/// Says why the image is not resumed on the console, with the code for the
/// harness.
pub fn report(refused: &Refused) {
    match &refused.detail {
        Some(d) => println!("ksave: not resuming: {} ({})", refused.refusal, d.as_str()),
        None => println!("ksave: not resuming: {}", refused.refusal),
    }
    crate::metric!(refusal = refused.refusal.code(), memory_lost = refused.memory_lost as u8);
}

/// Started by a bootloader with `ksave.resume=GUID`: resumes the image in
/// this boot's RAM map, or returns why not (nothing was written; the
/// bootloader's next entry boots normally, and a later boot may try again).
pub fn from_bootloader(at: StoreAt, map: &MemoryMap, iommus: &[RemappingUnit], facs_now: Result<u32, Message>) -> Refused {
    let mut ram = [Range::default(); MAX_RANGES];
    let mut nvs = [Range::default(); MAX_NVS];
    run(at, Memory::of(map, &mut ram, &mut nvs), iommus, false, true, facs_now, None)
}

/// Started by UEFI firmware as ksave.efi, before it leaves the firmware
/// (efi.rs): every check of a bootloader start, on the firmware's disks,
/// with nothing written. Ok with the image's identity (its nonce and its
/// chunks' CRC), which a start that could not finish keeps in a firmware
/// variable.
pub fn check_from_firmware(at: StoreAt, map: &MemoryMap, facs_now: Result<u32, Message>) -> Result<[u8; 12], Refused> {
    let mut ram = [Range::default(); MAX_RANGES];
    let mut nvs = [Range::default(); MAX_NVS];
    let here = Memory::of(map, &mut ram, &mut nvs);
    // ksave's page tables are not in use yet: the reach they will have.
    let reach = paging::identity_end_once_mapped(here.ranges().map(|r| r.end).max().unwrap_or(0));
    let mut part = disks::open_firmware_partition(at).map_err(|e| Refused::with(Refusal::NoStore, format_args!("{e}")))?;
    let Work { block, raw_header, lz4_in, .. } = work::take();
    let checked = before_verdict(&mut part, None, true, block, raw_header).and_then(|()| {
        let meta_buf = (&mut lz4_in[..META_BLOCKS as usize * PAGE]).try_into().expect("the work buffer holds the metadata");
        resume::check(&mut part.store(), &machine(here, &facs_now, reach), block, meta_buf)
    });
    part.close();
    let header = checked?;
    if header.sealed() {
        return Err(Refused::new(Refusal::Sealed("the image is encrypted: the initramfs resumes it once the volume is unlocked")));
    }
    let mut identity = [0u8; 12];
    identity[..8].copy_from_slice(&header.nonce.to_le_bytes());
    identity[8..].copy_from_slice(&header.chunks_crc.to_le_bytes());
    Ok(identity)
}

/// What every way in checks once the store is open, before the verdict:
/// an encrypted store's image only with its key, and (`check_filesystems`)
/// the file systems the image saw, unchanged.
fn before_verdict(part: &mut disks::OpenPartition, seal: Option<&Seal>, check_filesystems: bool, block: &mut [u8; PAGE], buf: &mut [u8; PAGE]) -> Result<(), Refused> {
    if part.encrypted && seal.is_none() {
        return Err(Refused::new(Refusal::Sealed("the image file lies on an encrypted volume: the initramfs resumes it once the volume is unlocked")));
    }
    if check_filesystems {
        filesystems_unchanged(part, block, buf)?;
    }
    Ok(())
}

/// Maps this boot's memory up to its end: RAM above 4 GiB on a CPU
/// without 1 GiB pages. What stays unmapped is refused by the verdict
/// (its reach), before anything is written.
fn reach(here: Memory) {
    if let Some(end) = here.ranges().map(|r| r.end).max()
        && let Err(e) = paging::map_ram_to(end)
    {
        println!("ksave: resume: {e}");
    }
}

/// This machine as the verdict sees it, its memory reached up to `reach`.
fn machine<'a>(here: Memory<'a>, facs_now: &'a Result<u32, Message>, reach: u64) -> Machine<'a> {
    let (own_start, own_end) = image_range();
    Machine {
        ram: here.ram,
        nvs: here.nvs,
        cpu_vendor: ksave_format::cpu_vendor(),
        la57: paging::cpu_has_la57(),
        facs_signature: facs_now.as_ref().copied().map_err(Message::as_str),
        own: Range { start: own_start, end: own_end },
        reach,
    }
}

/// Refuses the image if a file system it saw says it was mounted since,
/// or cannot be found and read: ksave reads their superblocks on the
/// store's disk, the one it has open (kinds [`FS_EXT4`], [`FS_BTRFS`] and [`FS_XFS`],
/// by PARTUUID; one recorded by its own UUID lies on a device-mapper
/// volume, which only Linux assembles). An image that is not complete or not readable is left
/// to the verdict, which says why.
fn filesystems_unchanged(part: &mut disks::OpenPartition, block: &mut [u8; PAGE], buf: &mut [u8; PAGE]) -> Result<(), Refused> {
    let Ok(header) = reader::read_header(&mut part.store(), block) else { return Ok(()) };
    if header.state != State::Complete {
        return Ok(());
    }
    for fs in header.filesystems() {
        let readable = matches!(fs.kind, FS_EXT4 | FS_BTRFS | FS_XFS);
        let superblock = if readable { part.superblock(Guid::from_bytes(fs.partuuid), fs.superblock_at(), buf) } else { None };
        match superblock.map(|sb| fs.mounted_since(sb)) {
            Some(None) => {}
            Some(Some(mounted)) => return Err(Refused::new(mounted)),
            None => return Err(Refused::new(Refusal::FilesystemUnchecked(fs.id()))),
        }
    }
    Ok(())
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

impl<'a> Memory<'a> {
    /// The RAM and ACPI NVS of a bootloader's (or the firmware's) memory
    /// map. The host tool takes the same whole pages of the same kinds
    /// from /sys/firmware/memmap (tools/src/sys.rs); more ranges than fit
    /// make the maps differ, which refuses.
    fn of(map: &MemoryMap, ram: &'a mut [Range; MAX_RANGES], nvs: &'a mut [Range; MAX_NVS]) -> Self {
        let ram = page_aligned(map.ram(), ram);
        let nvs = page_aligned(map.regions().iter().filter(|r| r.kind == RegionKind::AcpiNvs), nvs);
        Self { ram, nvs }
    }

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
            // The host tool compared the file systems with every device Linux sees.
            report(&run(crate::save::store_at(&config), here, config.iommus(), true, false, facs_now, config::seal()));
        }
        Err(e) => println!("ksave: not resuming: {e}"),
    }
    println!("ksave: resetting into a normal boot");
    cpu::reset()
}

/// Resumes the image in the store `at` of a machine whose memory is
/// `here`. Returns only to refuse; then, if `invalidate_refused`, the image
/// is marked invalidated with the reason, so that no later boot tries it
/// again.
/// `seal`: the image's cipher, from the key `ksave resume` read on the
/// unlocked volume (an encrypted store's image is resumed only with it).
/// `check_filesystems`: no host tool has compared the file systems the
/// image saw with what they say now (a bootloader start): ksave does.
fn run(at: StoreAt, here: Memory, iommus: &[RemappingUnit], invalidate_refused: bool, check_filesystems: bool, facs_now: Result<u32, Message>, seal: Option<&Seal>) -> Refused {
    reach(here);
    match at.file {
        Some(f) => println!("ksave: resume: looking for the image in the file at byte {} of partition {} (TSC {} MHz)", f.offset, at.guid, hw::calibrate_tsc()),
        None => println!("ksave: resume: looking for the image on partition {} (TSC {} MHz)", at.guid, hw::calibrate_tsc()),
    }
    let mut part = match disks::open_partition(at, Mode::Dma, iommus) {
        Ok(p) => p,
        Err(e) => return Refused::with(Refusal::NoStore, format_args!("{e}")),
    };
    let Work { block, raw_header, lz4_in, lz4_out, sealed_chunks: [sealed_chunk, ..], read_ahead, .. } = work::take();
    if let Err(refused) = before_verdict(&mut part, seal, check_filesystems, block, raw_header) {
        part.close();
        return refused;
    }
    let machine = machine(here, &facs_now, paging::identity_end());
    let bufs = Buffers { block, chunk_header: raw_header, coded: lz4_out, pages: lz4_in, seal: seal.map(|s| (s, sealed_chunk)), read_ahead };
    let when_refused = if invalidate_refused { WhenRefused::Invalidate } else { WhenRefused::KeepImage };
    let mut cpus = smp::Cpus::new();
    // SAFETY: `machine` is this boot's RAM and NVS map (the bootloader's or
    // kernel C's, the one the verdict compares), its reach ksave's identity
    // map, through which IdentityMapped and the disk's DMA reach memory;
    // ksave's code, data, stack, work buffers and the disk's DMA memory all
    // lie in its own load range (linker.ld), and every other page of this
    // boot (firmware, bootloader, kernel C) is given up to the saved kernel,
    // the other CPUs' start-up page too (smp.rs).
    let outcome = unsafe { resume::check_and_load(&mut part.store(), &machine, &mut IdentityMapped, bufs, hw::now_us, when_refused, Some(&mut cpus)) };
    let (jobs_helped, jobs_own) = cpus.jobs_run().unwrap_or_default();
    if jobs_helped + jobs_own > 0 {
        println!("ksave: resume: {jobs_helped} jobs run by the other CPUs, {jobs_own} by this one");
    }
    // Every other CPU back to wait for a start-up IPI, before anything
    // else: the saved kernel starts them itself.
    drop(cpus);
    match outcome {
        Err(refused) => {
            match &refused.invalidated {
                Some(Ok(())) => println!("ksave: image invalidated, so no later boot tries it again"),
                Some(Err(e)) => println!("ksave: could not invalidate the refused image: {}", e.as_str()),
                None => {}
            }
            if refused.memory_lost {
                // The firmware's structures the controller pointed at are gone.
                part.stop();
            } else {
                part.close();
            }
            refused
        }
        Ok(Resumed { loaded, way_back }) => {
            println!(
                "ksave: resume: {} pages loaded, {} zeroed, {} free left as found (of {} free, {} zero when saved) in {} ms",
                loaded.pages_stored,
                loaded.pages_zeroed,
                loaded.pages_left,
                loaded.pages_free,
                loaded.pages_zero,
                loaded.load_us / 1000
            );
            let back = match way_back {
                Ok(back) => back,
                Err(e) => {
                    println!("ksave: resume: FATAL: could not invalidate the image, so not resuming it: {}", e.as_str());
                    cpu::stop(crate::qemu::ExitCode::Failure);
                }
            };
            println!(
                "ksave: resume: loaded in {} ms (checks {} ms, one pass {} ms); image invalidated",
                loaded.total_us / 1000,
                loaded.check_us / 1000,
                loaded.load_us / 1000
            );
            crate::metric!(
                resume_check_ms = loaded.check_us / 1000,
                resume_load_ms = loaded.load_us / 1000,
                pages_stored = loaded.pages_stored,
                pages_zeroed = loaded.pages_zeroed,
                pages_left = loaded.pages_left,
                jobs_helped = jobs_helped,
                jobs_own = jobs_own,
                stack_kib = cpu::stack_used().div_ceil(1024),
            );
            // Memory is the saved kernel's now: leave the controller stopped
            // rather than point it back at firmware addresses inside it.
            part.stop();
            println!("ksave: resume: jumping to the saved kernel at {:#x}", back.reentry);
            jump_to_saved_kernel(&back)
        }
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
