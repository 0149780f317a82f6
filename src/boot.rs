//! ksave started by a bootloader (multiboot 1 or 2): read the memory map and
//! the command line, then do the one thing the command line asks ([`Mode`]).

use bootinfo::acpi::RemappingUnit;
use bootinfo::memmap::{MemoryMap, RegionKind};
use bootinfo::multiboot1;
use bootinfo::{PhysRead, acpi};
use diskdrv::ide;
use diskdrv::iommu::MAX_UNITS;
use diskdrv::part::Guid;
use ksave_core::Message;
use multiboot2::{BootInformation, BootInformationHeader};

use crate::cpu::stop;
use crate::disks::{FileAt, StoreAt};
use crate::disktest::{self, Job};
use crate::layout::image_range;
use crate::physmem::IdentityMapped;
use crate::qemu::ExitCode;
use crate::{cmdline, paging, physmem, println, resume, smp};

/// What a bootloader told us.
struct BootInfo<'a> {
    protocol: &'static str,
    cmdline: &'a str,
    map: MemoryMap,
    /// The ACPI RSDP's root tables (RSDT, XSDT or 0), if one was found.
    rsdp: Option<(u32, u64)>,
}

/// The RSDP on a BIOS machine: the first KiB of the EBDA (its segment is
/// the word at 0x40E), then 0xE0000-0xFFFFF (ACPI 6.5, 5.2.5.1).
fn bios_rsdp() -> Option<(u32, u64)> {
    let ebda = IdentityMapped.read_u64(0x408).map(|w| ((w >> 48) & 0xffff) << 4);
    let in_ebda = ebda.filter(|&e| (0x8_0000..0xA_0000).contains(&e)).and_then(|e| acpi::find_rsdp(&IdentityMapped, e, e + 1024));
    in_ebda.or_else(|| acpi::find_rsdp(&IdentityMapped, acpi::BIOS_AREA.0, acpi::BIOS_AREA.1))
}

pub fn run_multiboot1(info: u64) -> ! {
    // SAFETY: EBX of a multiboot 1 entry points at the information structure,
    // in RAM below 4 GiB (Multiboot 0.6.96 section 3.2).
    let parsed = multiboot1::Info::parse(unsafe { physmem::bytes(info, multiboot1::INFO_SIZE) });
    let Some(parsed) = parsed else { fail("multiboot1 information structure unreadable") };
    let mut map = MemoryMap::new();
    match parsed.mmap {
        Some((addr, len)) => {
            // SAFETY: the loader's mmap buffer, in RAM below 4 GiB.
            let bytes = unsafe { physmem::bytes(addr as u64, len as usize) };
            if let Err(e) = multiboot1::add_mmap(bytes, &mut map) {
                fail_fmt(format_args!("multiboot1 memory map unusable: {e:?}"));
            }
        }
        None => fail("multiboot1 loader gave no memory map"),
    }
    // SAFETY: the loader's NUL-terminated command line, in RAM below 4 GiB.
    let cmdline = parsed.cmdline.map(|a| unsafe { c_str(a as u64) }).unwrap_or("");
    run(&BootInfo { protocol: "multiboot1", cmdline, map, rsdp: bios_rsdp() }, info)
}

pub fn run_multiboot2(info: u64) -> ! {
    // SAFETY: EBX of a multiboot2 entry points at the boot information, 8-byte
    // aligned, in RAM below 4 GiB (Multiboot2 1.0 section 3.2).
    let mbi = match unsafe { BootInformation::load(info as *const BootInformationHeader) } {
        Ok(mbi) => mbi,
        Err(e) => fail_fmt(format_args!("multiboot2 boot information unreadable: {e:?}")),
    };
    let mut map = MemoryMap::new();
    let Some(tag) = mbi.memory_map_tag() else { fail("multiboot2 loader gave no memory map") };
    for area in tag.memory_areas() {
        if let Err(e) = map.add(area.start_address(), area.size(), RegionKind::from_e820(u32::from(area.typ()))) {
            fail_fmt(format_args!("multiboot2 memory map unusable: {e:?}"));
        }
    }
    let cmdline = mbi.command_line_tag().and_then(|t| t.cmdline().ok()).unwrap_or("");
    // GRUB copies the RSDP into a tag (UEFI machines have no BIOS area).
    let rsdp = match (mbi.rsdp_v2_tag(), mbi.rsdp_v1_tag()) {
        (Some(v2), _) => Some((0, v2.xsdt_address() as u64)),
        (None, Some(v1)) => Some((v1.rsdt_address() as u32, 0)),
        (None, None) => bios_rsdp(),
    };
    run(&BootInfo { protocol: "multiboot2", cmdline, map, rsdp }, info)
}

/// Started by UEFI firmware as ksave.efi, which has checked the image and
/// left boot services (efi.rs): `handover` is what it read.
pub fn run_uefi(handover: u64) -> ! {
    // SAFETY: ksave_efi_take_over passes the address of efi::HANDOVER, in
    // ksave's .data, written before and untouched since.
    let handover = unsafe { &*(handover as *const crate::efi::Handover) };
    run(&BootInfo { protocol: "UEFI", cmdline: handover.cmdline(), map: handover.map.clone(), rsdp: handover.rsdp }, handover as *const _ as u64)
}

/// What a bootloader start was asked to do.
pub enum Mode<'a> {
    /// `ksave.selftest=page-fault`: prove the exception path.
    FaultSelfTest,
    /// `ksave.resume=GUID [ksave.file=BYTES] [ksave.no_image=cmos:BYTE:BIT]`:
    /// resume the image in that partition (or in the file whose first byte
    /// lies BYTES into it: `ksave status` prints the line), else hand back
    /// to the bootloader.
    Resume { at: StoreAt, no_image: Option<&'a str> },
    /// `ksave.selftest=disk` or `ksave.bench=disk [ksave.bench_mib=N]`, with
    /// `ksave.part=GUID [ksave.ide=pio]`.
    DiskTest { job: Job, guid: Guid, ide: ide::Mode },
    /// Nothing asked: report and stop.
    Report,
}

impl<'a> Mode<'a> {
    /// The mode a command line (or ksave.efi's load options) asks for.
    pub fn parse(line: &'a str) -> Result<Self, &'static str> {
        let get = |key| cmdline::get(line, key);
        let guid = |key, why| get(key).and_then(|v| Guid::try_parse(v).ok()).ok_or(why);
        let job = match (get("ksave.selftest"), get("ksave.bench")) {
            (Some("page-fault"), _) => return Ok(Self::FaultSelfTest),
            (Some("disk"), _) => Some(Job::SelfTest),
            (_, Some("disk")) => Some(Job::Bench { mib: get("ksave.bench_mib").and_then(|v| v.parse().ok()).unwrap_or(256) }),
            _ => None,
        };
        if get("ksave.resume").is_some() {
            let guid = guid("ksave.resume", "ksave.resume= needs the image partition's PARTUUID")?;
            let file = match get("ksave.file") {
                Some(v) => match v.parse::<u64>() {
                    Ok(offset) if offset != 0 && offset.is_multiple_of(ksave_format::PAGE as u64) => Some(FileAt { offset, expected_crc: None }),
                    _ => return Err("ksave.file= needs the image file's byte offset in its partition (a non-zero multiple of 4096)"),
                },
                None => None,
            };
            return Ok(Self::Resume { at: StoreAt { guid, file }, no_image: get("ksave.no_image") });
        }
        match job {
            Some(job) => {
                let guid = guid("ksave.part", "a disk test needs ksave.part=PARTUUID")?;
                let ide = if get("ksave.ide") == Some("pio") { ide::Mode::Pio } else { ide::Mode::Dma };
                Ok(Self::DiskTest { job, guid, ide })
            }
            None => Ok(Self::Report),
        }
    }
}

/// Reports what the bootloader said, then runs the [`Mode`] asked for.
fn run(boot: &BootInfo, info: u64) -> ! {
    report(boot, info);
    let mode = Mode::parse(boot.cmdline).unwrap_or_else(|why| fail(why));
    if let Mode::FaultSelfTest = mode {
        fault_self_test();
    }
    let (start, end) = image_range();
    if !boot.map.is_ram(start, end - start) {
        fail("ksave's own load range is not RAM in this memory map");
    }
    let (units, unit_count) = remapping_units(boot.rsdp);
    let iommus = &units[..unit_count];
    match mode {
        Mode::FaultSelfTest => unreachable!("handled above"),
        Mode::Resume { at, no_image } => {
            if cmdline::get(boot.cmdline, "ksave.helpers") == Some("0") {
                smp::keep_to_one_cpu();
            }
            let facs_now = match boot.rsdp {
                Some((rsdt, xsdt)) => acpi::hardware_signature(&IdentityMapped, rsdt, xsdt).map_err(|e| Message::format(format_args!("{e}"))),
                None => Err(Message::format(format_args!("{}", acpi::AcpiError::NoRsdp))),
            };
            // Read now: the command line is in memory a resume may give up.
            let cmos_flag = no_image.and_then(|v| v.strip_prefix("cmos:")).map(|flag| parse_cmos_bit(flag).ok_or(flag.len()));
            let refusal = resume::from_bootloader(at, &boot.map, iommus, facs_now);
            resume::report(&refusal);
            match cmos_flag {
                Some(Ok((byte, bit))) => {
                    println!("ksave: no image to resume: handing over to a normal boot");
                    hand_over_by_cmos(byte, bit)
                }
                Some(Err(_)) => println!("ksave: ksave.no_image=cmos: is not BYTE:BIT (byte 0x40-0x7f)"),
                // ksave.efi kept the image's identity before it left the
                // firmware: the next start hands this image to the next
                // loader instead of trying it again.
                None if boot.protocol == "UEFI" => {
                    println!("ksave: not resumed after leaving the firmware: resetting; the next start leaves this image to the next loader");
                    crate::cpu::reset()
                }
                None if refusal.memory_lost => {
                    println!("ksave: no image to resume, and this boot's memory was given up: resetting");
                    crate::cpu::reset()
                }
                None => {}
            }
            // Without a hand-over ksave cannot start another system: say so
            // rather than seem to (README, "Booting without an image").
            println!(
                "ksave: no image to resume, and this boot entry names no way back to a normal boot (ksave.no_image=cmos:BYTE:BIT with a bootloader menu that tests it): halting; reset and choose a normal boot entry"
            );
            stop(ExitCode::NoImage)
        }
        Mode::DiskTest { job, guid, ide } => stop(disktest::run(job, guid, ide, &boot.map, iommus)),
        Mode::Report => {
            println!("ksave: nothing to restore: this build only reports; stopping");
            stop(ExitCode::Success)
        }
    }
}

/// The DMA remapping units the firmware's DMAR and IVRS tables list (the
/// first 4 KiB of each: DMAR puts its DRHD structures first).
fn remapping_units(rsdp: Option<(u32, u64)>) -> ([RemappingUnit; MAX_UNITS], usize) {
    let mut units = [RemappingUnit::Vtd(0); MAX_UNITS];
    let mut n = 0;
    let Some((rsdt, xsdt)) = rsdp else {
        return (units, 0);
    };
    for sig in [b"DMAR", b"IVRS"] {
        let Ok(Some((addr, len))) = acpi::find_table(&IdentityMapped, rsdt, xsdt, sig) else {
            continue;
        };
        let mut table = [0u8; 4096];
        let len = (len as usize).min(table.len());
        if acpi::read_table(&IdentityMapped, addr, &mut table[..len]).is_some() {
            n += acpi::remapping_units(&table[..len], &mut units[n..]);
        }
    }
    (units, n)
}

fn report(boot: &BootInfo, info: u64) {
    let (start, end) = image_range();
    println!("ksave {}: booted by {} (info at {info:#x})", env!("CARGO_PKG_VERSION"), boot.protocol);
    println!("ksave:   command line \"{}\"", boot.cmdline);
    println!("ksave:   own load range {start:#x}-{end:#x} ({} KiB)", (end - start) / 1024);
    println!("ksave:   memory visible: {}", paging::Describe);
    println!("ksave:   memory map: {} regions, {} MiB RAM", boot.map.regions().len(), boot.map.ram_bytes() >> 20);
    for region in boot.map.regions() {
        println!("ksave:     {region}");
    }
    crate::metric!(ram_mib = boot.map.ram_bytes() >> 20, regions = boot.map.regions().len());
}

fn fault_self_test() -> ! {
    println!("ksave: self-test: reading {UNMAPPED:#x}, which no page table maps");
    // SAFETY: a deliberate page fault to prove the exception path; the
    // handler reports it and stops, so the read never completes.
    unsafe { core::ptr::read_volatile(UNMAPPED as *const u64) };
    fail("the self-test page fault did not fault")
}

/// `ksave.no_image=cmos:BYTE:BIT`: a bootloader entry that tests that CMOS
/// bit boots the normal entry instead (qemu/mkgrubiso.sh).
fn hand_over_by_cmos(byte: u8, bit: u8) -> ! {
    set_cmos_bit(byte, bit);
    println!("ksave: CMOS {byte:#x}:{bit} set for the bootloader; resetting");
    crate::cpu::reset()
}

/// 1 TiB: canonical, and beyond any identity map ksave builds (PML4 entry 2
/// is empty).
const UNMAPPED: u64 = 0x100_0000_0000;

fn fail(why: &str) -> ! {
    fail_fmt(format_args!("{why}"))
}

fn fail_fmt(why: core::fmt::Arguments) -> ! {
    println!("ksave: error: {why}");
    stop(ExitCode::Failure)
}

/// A NUL-terminated string in physical memory, cut at 4 KiB and at the first
/// non-UTF-8 byte.
///
/// # Safety
/// `addr` must be readable RAM below 4 GiB.
unsafe fn c_str<'a>(addr: u64) -> &'a str {
    // SAFETY: upheld by the caller; at most 4 KiB are read, and the search
    // stops at the NUL.
    let bytes = unsafe { physmem::bytes(addr, 4096) };
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    match core::str::from_utf8(&bytes[..len]) {
        Ok(s) => s,
        Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
    }
}

/// "0x7e:0" -> (0x7e, 0). Only the extended CMOS bytes 0x40-0x7f, which no
/// standard checksum covers (0x10-0x2d are summed at 0x2e, IBM PC/AT).
fn parse_cmos_bit(text: &str) -> Option<(u8, u8)> {
    let (byte, bit) = text.split_once(':')?;
    let byte = u8::from_str_radix(byte.trim_start_matches("0x"), 16).ok()?;
    let bit: u8 = bit.parse().ok()?;
    ((0x40..0x80).contains(&byte) && bit < 8).then_some((byte, bit))
}

/// Sets a bit in CMOS RAM through the RTC's index/data ports (MC146818:
/// 0x70 index with bit 7 = NMI disable, 0x71 data).
fn set_cmos_bit(byte: u8, bit: u8) {
    // SAFETY: index then data, as the MC146818 wants; the byte is outside
    // the RTC registers and the checksummed area (parse_cmos_bit).
    unsafe {
        x86::io::outb(0x70, 0x80 | byte);
        let v = x86::io::inb(0x71);
        x86::io::outb(0x70, 0x80 | byte);
        x86::io::outb(0x71, v | (1 << bit));
    }
}
