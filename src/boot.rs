//! ksave started by a bootloader (multiboot 1 or 2): read the memory map and
//! the command line.

use bootinfo::memmap::{MemoryMap, RegionKind};
use bootinfo::multiboot1;
use multiboot2::{BootInformation, BootInformationHeader};

use diskdrv::ide::Mode;
use diskdrv::part::Guid;
use ksave_format::Range;

use crate::restore;

use crate::cpu::stop;
use crate::disktest::{self, Job};
use crate::cmdline;
use crate::layout::image_range;
use crate::paging;
use crate::physmem;
use crate::println;
use crate::qemu::ExitCode;

/// What a bootloader told us.
struct BootInfo<'a> {
    protocol: &'static str,
    cmdline: &'a str,
    map: MemoryMap,
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
    run(&BootInfo { protocol: "multiboot1", cmdline, map }, info)
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
    run(&BootInfo { protocol: "multiboot2", cmdline, map }, info)
}

/// Reports what the bootloader said, then does what the command line asks
/// (a self-test, a resume, a disk test) or stops.
fn run(boot: &BootInfo, info: u64) -> ! {
    let (start, end) = image_range();
    println!("ksave {}: booted by {} (info at {info:#x})", env!("CARGO_PKG_VERSION"), boot.protocol);
    println!("ksave:   command line \"{}\"", boot.cmdline);
    println!("ksave:   own load range {start:#x}-{end:#x} ({} KiB)", (end - start) / 1024);
    println!("ksave:   memory visible: {}", paging::Describe);
    println!("ksave:   memory map: {} regions, {} MiB RAM", boot.map.regions().len(), boot.map.ram_bytes() >> 20);
    for region in boot.map.regions() {
        println!("ksave:     {region}");
    }
    let selftest = cmdline::get(boot.cmdline, "ksave.selftest");
    if selftest == Some("page-fault") {
        println!("ksave: self-test: reading {UNMAPPED:#x}, which no page table maps");
        // SAFETY: a deliberate page fault to prove the exception path; the
        // handler reports it and stops, so the read never completes.
        unsafe { core::ptr::read_volatile(UNMAPPED as *const u64) };
    }
    if !boot.map.is_ram(start, end - start) {
        fail("ksave's own load range is not RAM in this memory map");
    }
    if let Some(text) = cmdline::get(boot.cmdline, "ksave.resume") {
        let Some(guid) = Guid::parse(text) else { fail("ksave.resume= needs the image partition's PARTUUID") };
        let mut ram = [Range::default(); 128];
        let mut n = 0;
        for page in boot.map.ram().filter_map(|r| Range { start: r.start, end: r.end }.page_aligned()) {
            if n < ram.len() {
                ram[n] = page;
                n += 1;
            }
        }
        let refusal = restore::run(guid, &ram[..n], false);
        println!("ksave: not resuming: {}", refusal.0.as_str());
        println!("ksave: no image to resume: handing over to a normal boot");
        // ksave.no_image=cmos:BYTE:BIT: a bootloader entry that tests that
        // CMOS bit boots the normal entry instead (qemu/mkgrubiso.sh).
        if let Some(flag) = cmdline::get(boot.cmdline, "ksave.no_image").and_then(|v| v.strip_prefix("cmos:")) {
            match parse_cmos_bit(flag) {
                Some((byte, bit)) => {
                    set_cmos_bit(byte, bit);
                    println!("ksave: CMOS {byte:#x}:{bit} set for the bootloader; resetting");
                    crate::cpu::reset();
                }
                None => println!("ksave: ksave.no_image=cmos:{flag} is not BYTE:BIT (byte 0x40-0x7f)"),
            }
        }
        stop(ExitCode::NoImage);
    }
    let ide_mode = match cmdline::get(boot.cmdline, "ksave.ide") {
        Some("pio") => Mode::Pio,
        _ => Mode::Dma,
    };
    let bench_mib = cmdline::get(boot.cmdline, "ksave.bench_mib").and_then(|v| v.parse().ok()).unwrap_or(256);
    let job = match (selftest, cmdline::get(boot.cmdline, "ksave.bench")) {
        (Some("disk"), _) => Some(Job::SelfTest),
        (_, Some("disk")) => Some(Job::Bench { mib: bench_mib }),
        _ => None,
    };
    if let Some(job) = job {
        let Some(guid) = cmdline::get(boot.cmdline, "ksave.part") else { fail("a disk test needs ksave.part=PARTUUID") };
        stop(disktest::run(job, guid, ide_mode, &boot.map));
    }
    println!("ksave: nothing to restore: this build only reports; stopping");
    stop(ExitCode::Success)
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
