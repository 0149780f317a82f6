//! End-to-end scenarios. Each returns a [`Report`] of what it measured, or an
//! error with the console lines that led to it.

use std::fmt;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ksave_tools::elfimage::ImageLayout;

use crate::disk::{Bus, PART_FIRST_LBA, PART_GUID, TestDisk};
use crate::{Vm, VmConfig, build_input};

/// What a scenario measured, for the demo, the test log and `make bench`.
#[derive(Debug, Default)]
pub struct Report {
    /// Scenario name.
    pub name: String,
    /// Measurements, in order.
    pub figures: Vec<Figure>,
}

/// One measurement.
#[derive(Clone, Debug)]
pub struct Figure {
    /// What was measured.
    pub what: String,
    /// Its value, in `unit`.
    pub value: f64,
    /// "ms", "KiB", "MiB".
    pub unit: &'static str,
}

impl Report {
    fn new(name: &str) -> Self {
        Self { name: name.into(), figures: Vec::new() }
    }

    fn add(&mut self, what: impl Into<String>, value: f64, unit: &'static str) {
        self.figures.push(Figure { what: what.into(), value, unit });
    }

    fn add_ms(&mut self, what: impl Into<String>, d: Duration) {
        self.add(what, d.as_secs_f64() * 1000.0, "ms");
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "== {}", self.name)?;
        for fig in &self.figures {
            writeln!(f, "   {:<44} {:>8.0} {}", fig.what, fig.value, fig.unit)?;
        }
        Ok(())
    }
}

const SECOND: Duration = Duration::from_secs(1);

/// Kernel A with its initramfs, running `ksave.test=SCENARIO` (the rest of
/// `scenario` goes on the command line too).
fn kernel_a(name: &str, scenario: &str) -> Result<VmConfig> {
    Ok(VmConfig::new(name).arg([
        "-kernel".to_string(),
        build_input("bzImage")?.display().to_string(),
        "-initrd".into(),
        build_input("initramfs.cpio.gz")?.display().to_string(),
        "-append".into(),
        // quiet: kernel info messages (link resets, ...) would otherwise land in
        // the middle of the lines the tests read.
        format!("console=ttyS0,115200 panic=-1 quiet ksave.test={scenario}"),
    ]))
}

/// Kernel A boots, fills tmpfs with random data, loads ksave with
/// `kexec --load-preserve-context`, jumps to it twice (the second time
/// without reloading) and checks its data after each return; then powers off.
pub fn kexec_round_trip(echo: bool) -> Result<Report> {
    let elf = build_input("ksave.elf")?;
    let layout = ImageLayout::parse(&std::fs::read(&elf)?).context("reading build/ksave.elf")?;
    let scenario = format!("roundtrip ksave.mem_min={:#x} ksave.mem_max={:#x}", layout.start, layout.end - 1);
    let config = kernel_a("kexec-roundtrip", &scenario)?;
    let mut vm = Vm::start(VmConfig { echo, ..config })?;
    let mut report = Report::new("kexec jump round trip (kernel A -> ksave -> A, twice)");

    let init = vm.expect("ksave-test: scenario roundtrip", 90 * SECOND)?;
    report.add_ms("kernel A boot to /init", init.at);
    vm.expect("sha256 before:", 60 * SECOND)?;
    for round in 1..=2 {
        let jump = vm.expect(&format!("jump {round}: kexec -e"), 60 * SECOND)?;
        let banner = vm.expect(&format!("entered by kexec jump (entry {round})"), 30 * SECOND)?;
        let map = vm.expect("backup map:", 10 * SECOND)?;
        ensure!(map.text.contains("exactly ksave's own range"), "jump {round}: backup map not as expected: {}", map.text);
        vm.expect("ksave: returning to caller", 10 * SECOND)?;
        let back = vm.expect(&format!("back from jump {round}"), 30 * SECOND)?;
        vm.expect(&format!("sha256 after jump {round} matches"), 60 * SECOND)?;
        report.add_ms(format!("jump {round}: `kexec -e` to ksave banner"), banner.at - jump.at);
        report.add_ms(format!("jump {round}: ksave banner to A running again"), back.at - banner.at);
    }
    vm.expect("KSAVE-TEST-RESULT: PASS", 30 * SECOND)?;
    vm.refute_seen("CPU exception")?;
    vm.refute_seen("ksave: panic")?;
    // poweroff -f ends QEMU with 0: only the PASS line above makes it a pass.
    vm.expect_exit(0, 30 * SECOND)?;
    report.add_ms("VM total run time", vm.elapsed());
    report.add("ksave footprint", (layout.footprint() / 1024) as f64, "KiB");
    Ok(report)
}

/// A CPU model with 1 GiB pages, so ksave maps 0-512 GiB (QEMU's default
/// qemu64 has none, and ksave then maps 0-4 GiB).
const CPU_WITH_1G_PAGES: &str = "qemu64,pdpe1gb=on";

fn boot_ksave_directly(name: &str, append: &str, echo: bool) -> Result<Vm> {
    let elf = build_input("ksave.elf")?;
    let config = VmConfig::new(name).arg(["-cpu", CPU_WITH_1G_PAGES, "-kernel", &elf.display().to_string(), "-append", append]);
    Vm::start(VmConfig { echo, ..config })
}

/// QEMU boots ksave.elf by multiboot 1 (`-kernel`): ksave prints its banner
/// and the memory map and exits through isa-debug-exit with success.
pub fn multiboot1_boot(echo: bool) -> Result<Report> {
    let vm = boot_ksave_directly("multiboot1", "ksave.demo", echo)?;
    let report = Report::new("multiboot 1 boot (QEMU -kernel ksave.elf, 1 GiB pages)");
    check_multiboot_banner(vm, "multiboot1", "identity map 0-512 GiB", report)
}

/// SeaBIOS boots GRUB from build/grub.iso, GRUB boots ksave by multiboot2;
/// the same checks as for multiboot 1.
pub fn multiboot2_grub_boot(echo: bool) -> Result<Report> {
    let iso = build_input("grub.iso")?;
    let config = VmConfig::new("multiboot2-grub").arg(["-cdrom", &iso.display().to_string()]);
    let vm = Vm::start(VmConfig { echo, ..config })?;
    let report = Report::new("multiboot 2 boot (GRUB -> ksave.elf, no 1 GiB pages)");
    check_multiboot_banner(vm, "multiboot2", "identity map 0-4 GiB", report)
}

fn check_multiboot_banner(mut vm: Vm, protocol: &str, identity_map: &str, mut report: Report) -> Result<Report> {
    let banner = vm.expect(&format!("booted by {protocol}"), 60 * SECOND)?;
    let cmdline = vm.expect("command line", 5 * SECOND)?;
    ensure!(cmdline.text.contains("ksave.demo"), "command line not passed through: {}", cmdline.text);
    let visible = vm.expect("memory visible:", 5 * SECOND)?;
    ensure!(visible.text.contains(identity_map), "expected {identity_map:?}: {}", visible.text);
    let map = vm.expect("memory map:", 5 * SECOND)?;
    // 512 MiB guest: the map must show nearly all of it as RAM.
    let ram_mib: u64 = map
        .text
        .split(", ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no RAM size in {:?}", map.text))?;
    ensure!((500..=512).contains(&ram_mib), "memory map shows {ram_mib} MiB of RAM in a 512 MiB guest");
    vm.expect("KiB RAM", 5 * SECOND)?;
    vm.expect("nothing to restore", 5 * SECOND)?;
    vm.expect_exit(33, 10 * SECOND)?;
    report.add_ms("QEMU start to ksave banner", banner.at);
    report.add("RAM in the multiboot memory map", ram_mib as f64, "MiB");
    report.add_ms("VM total run time", vm.elapsed());
    Ok(report)
}

/// ksave's self-test provokes a page fault: the handler must report vector,
/// error code, RIP, CR2 and a call chain, then exit with the exception code.
pub fn exception_report(echo: bool) -> Result<Report> {
    let mut vm = boot_ksave_directly("exception", "ksave.selftest=page-fault", echo)?;
    let mut report = Report::new("CPU exception report (provoked page fault)");
    let fault = vm.expect("CPU exception 14 (page fault)", 30 * SECOND)?;
    ensure!(fault.text.contains("CR2 0x10000000000,"), "fault address missing: {}", fault.text);
    ensure!(fault.text.contains("RIP 0x2"), "RIP not inside ksave: {}", fault.text);
    let chain = vm.expect("call chain:", 5 * SECOND)?;
    ensure!(chain.text.split_whitespace().count() > 3, "empty call chain: {}", chain.text);
    vm.expect_exit(37, 10 * SECOND)?;
    report.add_ms("VM total run time", vm.elapsed());
    Ok(report)
}

fn ksave_with_disk(name: &str, append: &str, disk: &TestDisk, bus: Bus, blkdebug: Option<&str>, echo: bool) -> Result<Vm> {
    let elf = build_input("ksave.elf")?;
    let config = VmConfig::new(name).arg(["-kernel".to_string(), elf.display().to_string(), "-append".into(), append.into()]).arg(disk.qemu_args(bus, blkdebug));
    Vm::start(VmConfig { echo, ..config })
}

/// ksave's disk self-test: find the partition by GUID on a disk at `bus`,
/// write the pattern over it with `ide_mode` ("dma"/"pio"), read it back and
/// verify; the host then checks the image file byte for byte.
pub fn disk_self_test(bus: Bus, ide_mode: &str, echo: bool) -> Result<Report> {
    let name = format!("disk-selftest-{bus:?}-{ide_mode}").to_lowercase();
    let disk = TestDisk::create(&name, 64, 8)?;
    let append = format!("ksave.selftest=disk ksave.part={PART_GUID} ksave.ide={ide_mode}");
    let mut vm = ksave_with_disk(&name, &append, &disk, bus, None, echo)?;
    let mut report = Report::new(&format!("disk self-test, {bus:?} ({ide_mode}), 8 MiB partition"));
    let found = vm.expect("has the partition", 30 * SECOND)?;
    ensure!(found.text.contains(bus.ksave_name()), "partition found at the wrong place: {}", found.text);
    let pass = vm.expect("disk test: PASS", 120 * SECOND)?;
    vm.expect_exit(33, 10 * SECOND)?;
    disk.check_self_test_pattern().context("checking the disk image on the host")?;
    let rates: Vec<f64> = pass.text.split(['(', ' ']).filter_map(|w| w.parse().ok()).collect();
    if let [_, write, read] = rates[..] {
        report.add("write", write, "MB/s");
        report.add("read and verify", read, "MB/s");
    }
    report.add_ms("VM total run time", vm.elapsed());
    Ok(report)
}

/// A blkdebug-injected I/O error (`iotype` "write" or "read") inside the
/// partition: ksave reports it clearly and stops with the failure code, in
/// time, and writes nothing outside the partition.
pub fn disk_error(bus: Bus, iotype: &str, echo: bool) -> Result<Report> {
    let name = format!("disk-{iotype}-error-{bus:?}").to_lowercase();
    let disk = TestDisk::create(&name, 64, 8)?;
    let bad_sector = PART_FIRST_LBA + 3000;
    let rule = disk.blkdebug_rule(iotype, bad_sector)?;
    let append = format!("ksave.selftest=disk ksave.part={PART_GUID}");
    let mut vm = ksave_with_disk(&name, &append, &disk, bus, Some(&rule), echo)?;
    let mut report = Report::new(&format!("injected {iotype} error, {bus:?}"));
    let failed = vm.expect("disk test: FAILED", 60 * SECOND)?;
    let command = if iotype == "read" { "0x25" } else { "0x35" };
    ensure!(
        failed.text.contains(&format!("device error on command {command} at LBA")),
        "not the clear {iotype} error expected: {}",
        failed.text
    );
    // The failing command is the 1 MiB chunk holding the bad sector.
    let chunk_start = PART_FIRST_LBA + (bad_sector - PART_FIRST_LBA) / 2048 * 2048;
    ensure!(failed.text.contains(&format!("LBA {chunk_start}:")), "wrong LBA reported: {}", failed.text);
    vm.expect_exit(35, 10 * SECOND)?;
    disk.check_outside_unchanged()?;
    report.add_ms("QEMU start to the error report", failed.at);
    Ok(report)
}

/// One 256 MiB (by default) write-then-read of ksave's disk bench at `bus`.
pub fn disk_bench(bus: Bus, ide_mode: &str, mib: u64) -> Result<Report> {
    let name = format!("bench-ksave-{bus:?}-{ide_mode}").to_lowercase();
    let disk = TestDisk::create_allocated(&name, mib + 40, mib + 8)?;
    let append = format!("ksave.bench=disk ksave.bench_mib={mib} ksave.part={PART_GUID} ksave.ide={ide_mode}");
    let mut vm = ksave_with_disk(&name, &append, &disk, bus, None, false)?;
    let line = vm.expect("ksave-bench:", 600 * SECOND)?;
    vm.expect_exit(33, 10 * SECOND)?;
    // "ksave-bench: MODE: write N MiB in T ms = X MB/s; read N MiB in T ms = Y MB/s"
    let rates: Vec<f64> = line.text.split(" = ").skip(1).filter_map(|s| s.split(' ').next()?.parse().ok()).collect();
    let [write, read] = rates[..] else { anyhow::bail!("unreadable bench line: {}", line.text) };
    let mut report = Report::new(&format!("ksave {bus:?} {ide_mode}"));
    report.add("write", write, "MB/s");
    report.add("read", read, "MB/s");
    Ok(report)
}

/// Linux (kernel A) writing and reading `mib` MiB of the same kind of disk
/// with `dd bs=4M oflag=direct` / `iflag=direct`.
pub fn linux_dd(bus: Bus, mib: u64) -> Result<Report> {
    let name = format!("bench-dd-{bus:?}").to_lowercase();
    let disk = TestDisk::create_allocated(&name, mib + 40, mib + 8)?;
    let config = kernel_a(&name, &format!("dd ksave.dd_mib={mib}"))?.arg(disk.qemu_args(bus, None));
    let mut vm = Vm::start(config)?;
    let mut report = Report::new(&format!("Linux dd {bus:?}"));
    for what in ["write", "read"] {
        let start = vm.expect(&format!("dd {what}: start"), 120 * SECOND)?;
        let done = vm.expect(&format!("dd {what}: done"), 600 * SECOND)?;
        let secs = (done.at - start.at).as_secs_f64();
        report.add(what, (mib << 20) as f64 / secs / 1e6, "MB/s");
    }
    vm.expect("KSAVE-TEST-RESULT: PASS", 60 * SECOND)?;
    vm.expect_exit(0, 30 * SECOND)?;
    Ok(report)
}

/// How a hibernate run should end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// A complete image, checked on the host.
    Ok,
    /// The partition is smaller than the worst case.
    TooSmall,
    /// The recorded partition GUID is not on the disk.
    WrongGuid,
    /// The disk fails a write (blkdebug).
    IoError,
}

/// Kernel A holds `memtest_mib` MiB of known data and runs `ksave
/// hibernate --snapshot` to an AHCI disk. With [`Expect::Ok`] the host
/// then checks the image with `ksave verify` and `ksave export`: every
/// memtest page must be in the core file at its physical address. The
/// failure cases must leave A running with its data intact and hibernate
/// failing with the reason.
pub fn hibernate_snapshot(expect: Expect, lz4: bool, memtest_mib: u64, echo: bool) -> Result<Report> {
    hibernate_run(expect, lz4, memtest_mib, echo, false)
}

/// [`hibernate_snapshot`] for `make bench`: the disk image is written on
/// the host first, so the save measures the emulated disk, not the host
/// file system allocating blocks.
pub fn hibernate_bench(lz4: bool) -> Result<Report> {
    hibernate_run(Expect::Ok, lz4, 256, false, true)
}

fn hibernate_run(expect: Expect, lz4: bool, memtest_mib: u64, echo: bool, allocated: bool) -> Result<Report> {
    let name = format!("hibernate-{expect:?}{}", if lz4 { "-lz4" } else { "" }).to_lowercase();
    let part_mib = if expect == Expect::TooSmall { 64 } else { 520 };
    let disk = if allocated { TestDisk::create_allocated(&name, part_mib + 20, part_mib)? } else { TestDisk::create(&name, part_mib + 20, part_mib)? };
    let rule = match expect {
        Expect::IoError => Some(disk.blkdebug_rule("write", PART_FIRST_LBA + 20_000)?),
        _ => None,
    };
    // The LZ4 runs load through kexec-tools, the others through kexec_load(2).
    let scenario = format!(
        "hibernate ksave.partuuid={PART_GUID} ksave.memtest_mib={memtest_mib} ksave.expect={}{}",
        format!("{expect:?}").to_lowercase().replace("toosmall", "too-small").replace("wrongguid", "wrong-guid").replace("ioerror", "io-error"),
        if lz4 { " ksave.lz4=1 ksave.kexec_tools=1" } else { "" }
    );
    let config = kernel_a(&name, &scenario)?.arg(disk.qemu_args(Bus::Ahci, rule.as_deref()));
    let mut vm = Vm::start(VmConfig { echo, ..config })?;
    let mut report = Report::new(&format!("hibernate --snapshot, {expect:?}{}, {memtest_mib} MiB memtest", if lz4 { ", LZ4" } else { "" }));
    if expect == Expect::TooSmall {
        vm.expect("setup refused (as it must)", 120 * SECOND)?;
    }
    vm.expect("memtest: ready", 300 * SECOND)?;
    match expect {
        Expect::Ok => {
            let jump = vm.expect("ksave-test: jump", 30 * SECOND)?;
            let loaded = vm.expect("ksave: loaded in", 30 * SECOND)?;
            let banner = vm.expect("entered by kexec jump", 30 * SECOND)?;
            let first = vm.expect("ksave: image header written", 60 * SECOND)?;
            // "loaded in N ms, holding about K KiB": printed just before the jump.
            if let Some(kib) = loaded.text.split("about ").nth(1).and_then(|s| s.split(' ').next()?.parse().ok()) {
                report.add("caller memory held while loaded", kib, "KiB");
            }
            report.add_ms("the jump to the first sector written", first.at - loaded.at);
            let saved = vm.expect("ksave: saved", 600 * SECOND)?;
            let back = vm.expect("ksave: image complete", 60 * SECOND)?;
            report.add_ms("`ksave hibernate` to ksave's banner", banner.at - jump.at);
            report.add_ms("ksave's banner to the first sector written", first.at - banner.at);
            report.add_ms("`ksave hibernate` to the first sector written", first.at - jump.at);
            report.add_ms("ksave's banner to A running again", back.at - banner.at);
            // "saved N pages (M MiB, L LZ4) in T ms = R MB/s of RAM; Z zero pages
            // left out; image I MiB; disk D ms, CPU C ms": each figure follows
            // the words before it.
            let field = |after: &str| -> Option<f64> { saved.text.split(after).nth(1)?.split([' ', ')']).next()?.parse().ok() };
            for (after, what, unit) in [
                (" = ", "save rate over all RAM", "MB/s"),
                ("image ", "image size", "MiB"),
                (" in ", "save time in ksave", "ms"),
                ("disk ", "  of which disk transfers", "ms"),
                ("RAM; ", "zero pages left out", "pages"),
                ("pages (", "data stored", "MiB"),
            ] {
                if let Some(v) = field(after) {
                    report.add(what, v, unit);
                }
            }
        }
        _ => {
            let refused = vm.expect("hibernation FAILED, not powering off", 300 * SECOND)?;
            let why = match expect {
                Expect::TooSmall => "ksave could not save: partition holds 64 MiB",
                Expect::WrongGuid => "no record of this attempt",
                _ => "ksave could not save: disk error: device error on command 0x35",
            };
            // The last refusal is ksave's own (after the host's, where there is one).
            let mut line = refused;
            while !line.text.contains(why) {
                line = vm.expect("hibernation FAILED", 300 * SECOND).with_context(|| format!("no refusal saying {why:?}"))?;
            }
            vm.expect("hibernate refused (as it must)", 10 * SECOND)?;
        }
    }
    vm.expect("memtest: data intact", 120 * SECOND)?;
    vm.expect("still running, memory intact", 60 * SECOND)?;
    vm.expect("KSAVE-TEST-RESULT: PASS", 60 * SECOND)?;
    vm.refute_seen("CPU exception")?;
    vm.refute_seen("ksave: panic")?;
    vm.expect_exit(0, 60 * SECOND)?;
    report.add_ms("VM total run time", vm.elapsed());
    if expect == Expect::Ok {
        check_image_on_host(&disk, &mut report)?;
    }
    Ok(report)
}

/// `ksave verify` and `ksave export` on the disk image file, then every
/// memtest page compared at its physical address in the core file.
fn check_image_on_host(disk: &TestDisk, report: &mut Report) -> Result<()> {
    let cli = build_input("ksave")?;
    let run = |args: &[&str]| -> Result<String> {
        let out = std::process::Command::new(&cli).args(args).output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.success(), "ksave {} failed: {text}", args.join(" "));
        Ok(text)
    };
    let img = disk.path.display().to_string();
    let verified = run(&["verify", &img])?;
    ensure!(verified.contains("OK:"), "ksave verify: {verified}");
    let inspected: serde_json::Value = serde_json::from_str(&run(&["inspect", "--json", &img])?)?;
    ensure!(inspected["state"] == "complete" && inspected["checks"] == "ok", "ksave inspect --json: {inspected}");
    report.add("chunks (raw + LZ4)", (inspected["chunks_raw"].as_u64().unwrap_or(0) + inspected["chunks_lz4"].as_u64().unwrap_or(0)) as f64, "chunks");
    let core = disk.path.with_extension("core");
    let t = std::time::Instant::now();
    run(&["export", "--elf", &core.display().to_string(), &img])?;
    report.add_ms("host: ksave export", t.elapsed());
    let readelf = std::process::Command::new("readelf").arg("-l").arg(&core).output()?;
    let listing = String::from_utf8_lossy(&readelf.stdout);
    ensure!(readelf.status.success() && listing.contains("CORE") && listing.contains("LOAD"), "readelf -l: {listing}");

    let manifest = crate::memdata::Manifest::decode(&disk.read_second(8 << 20)?)?;
    let data = std::fs::read(&core)?;
    let elf = object::read::elf::ElfFile64::<object::Endianness>::parse(&data[..])?;
    use object::read::elf::ProgramHeader as _;
    let endian = elf.endian();
    let segments: Vec<_> = elf.elf_program_headers().iter().map(|p| (p.p_paddr(endian), p.p_memsz(endian), p.p_offset(endian))).collect();
    let mut expected = [0u8; crate::memdata::PAGE];
    for (i, pfn) in manifest.pfns.iter().enumerate() {
        let addr = pfn * crate::memdata::PAGE as u64;
        let (start, _, offset) = segments
            .iter()
            .find(|(s, len, _)| (*s..s + len).contains(&addr))
            .with_context(|| format!("page {i} at {addr:#x} is in no PT_LOAD of the core"))?;
        let at = (offset + addr - start) as usize;
        crate::memdata::fill_page(manifest.seed, i as u64, &mut expected);
        ensure!(data[at..at + expected.len()] == expected, "page {i} (frame {pfn:#x}) differs in the exported image");
    }
    report.add("memtest pages checked in the export", manifest.pfns.len() as f64, "pages");
    let _ = std::fs::remove_file(&core);

    // Invalidated, the image must never verify again.
    run(&["invalidate", &img])?;
    let out = std::process::Command::new(&cli).args(["verify", &img]).output()?;
    ensure!(!out.status.success(), "verify passed an invalidated image");
    let status: serde_json::Value = serde_json::from_str(&run(&["status", "--json", &img])?)?;
    ensure!(status["state"] == "invalidated", "status after invalidate: {status}");
    Ok(())
}

/// How the machine comes back after `ksave hibernate` powered it off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumeBy {
    /// QEMU `-kernel ksave.elf` (multiboot 1) with `ksave.resume=GUID`.
    Multiboot1,
    /// Kernel C boots; `ksave resume` in its initramfs kexecs ksave.
    KernelC,
    /// GRUB's menu boots ksave by multiboot 2 (build/grub-resume.iso).
    Grub,
}

/// The full story: kernel A holds 256 MiB of known data, a counting
/// process, a tmpfs file; `ksave hibernate` powers off; a fresh QEMU (same
/// memory, CPUs and disk) boots ksave, which resumes A; A checks everything
/// and hibernates again; a third QEMU resumes it again.
pub fn hibernate_resume(by: ResumeBy, memtest_mib: u64, echo: bool) -> Result<Report> {
    let name = format!("resume-{by:?}").to_lowercase();
    let disk = TestDisk::create(&name, 560, 520)?;
    let mut report = Report::new(&format!("hibernate, power off, resume by {by:?}, twice ({memtest_mib} MiB memtest)"));
    let config = kernel_a(&name, &format!("resume ksave.partuuid={PART_GUID} ksave.memtest_mib={memtest_mib}"))?.arg(disk.qemu_args(Bus::Ahci, None));
    let mut vm = Vm::start(VmConfig { echo, ..config })?;
    let start = vm.expect("ksave-test: hibernating (1)", 300 * SECOND)?;
    let complete = vm.expect("ksave: image complete", 120 * SECOND)?;
    vm.expect("ksave: powering off", 60 * SECOND)?;
    vm.expect_exit(0, 60 * SECOND)?;
    report.add_ms("hibernate: start to power-off", vm.elapsed() - start.at);
    if let Some(mib) = complete.text.split(", ").find_map(|f| f.strip_suffix(" MiB on disk")?.parse::<f64>().ok()) {
        report.add("image size", mib, "MiB");
    }
    for round in 1..=2 {
        let resume = match by {
            ResumeBy::Multiboot1 => VmConfig::new(&format!("{name}-{round}")).arg([
                "-kernel".to_string(),
                build_input("ksave.elf")?.display().to_string(),
                "-append".into(),
                format!("ksave.resume={PART_GUID}"),
            ]),
            ResumeBy::KernelC => kernel_a(&format!("{name}-{round}"), &format!("resume-c ksave.partuuid={PART_GUID}"))?,
            ResumeBy::Grub => grub_resume_menu(&format!("{name}-{round}"))?,
        }
        .arg(disk.qemu_args(Bus::Ahci, None));
        let mut vm = Vm::start(VmConfig { echo, ..resume })?;
        let jump = vm.expect("ksave: resume: jumping to the saved kernel", 300 * SECOND)?;
        let running = vm.expect("ksave: resumed from the image", 60 * SECOND)?;
        let back = vm.expect(&format!("ksave-test: resumed ({round})"), 300 * SECOND)?;
        report.add_ms(format!("resume {round}: power-on to the jump into A"), jump.at);
        report.add_ms(format!("resume {round}: power-on to A running"), running.at);
        report.add_ms(format!("resume {round}: power-on to A checked and running"), back.at);
        if round == 1 {
            vm.expect("ksave-test: hibernating (2)", 60 * SECOND)?;
            vm.expect("ksave: powering off", 120 * SECOND)?;
        } else {
            vm.expect("KSAVE-TEST-RESULT: PASS", 60 * SECOND)?;
        }
        vm.refute_seen("CPU exception")?;
        vm.expect_exit(0, 60 * SECOND)?;
    }
    Ok(report)
}

/// Boots the GRUB resume menu on `disk` with `memory_mib` of RAM and the
/// given extra QEMU arguments; resets restart the machine.
fn resume_vm(name: &str, disk: &TestDisk, memory_mib: u32, extra: &[&str], echo: bool) -> Result<Vm> {
    let config = grub_resume_menu(name)?.arg(disk.qemu_args(Bus::Ahci, None)).arg(extra.iter().copied());
    Vm::start(VmConfig { echo, memory_mib, reboot: true, ..config })
}

/// Restore refuses what it must, says why, writes nothing, and the machine
/// boots normally (GRUB's menu goes on to Linux): a bit-flipped image, a
/// truncated one, one made with another `-m`, one made on another CPU
/// vendor, and a second resume of one image. From kernel C, a damaged image
/// is refused by ksave, invalidated, and the next boot carries on normally.
pub fn restore_refusals(echo: bool) -> Result<Report> {
    let name = "refusals";
    let disk = TestDisk::create(name, 560, 520)?;
    let mut report = Report::new("restore refusals");
    // A complete image: kernel A takes a snapshot and powers off.
    let config = kernel_a(name, &format!("hibernate ksave.partuuid={PART_GUID} ksave.memtest_mib=16 ksave.expect=ok"))?
        .arg(disk.qemu_args(Bus::Ahci, None));
    let mut vm = Vm::start(VmConfig { echo, ..config })?;
    vm.expect("KSAVE-TEST-RESULT: PASS", 300 * SECOND)?;
    vm.expect_exit(0, 60 * SECOND)?;

    let part = PART_FIRST_LBA * 512;
    let image = std::fs::read(&disk.path)?;
    let header = ksave_format::header::Header::decode(image[part as usize..part as usize + 4096].try_into()?)
        .map_err(|e| anyhow::anyhow!("no image after the snapshot: {e}"))?;
    let data = part + ksave_format::header::DATA_OFFSET;
    let variant = |suffix: &str, change: &dyn Fn(&mut Vec<u8>)| -> Result<TestDisk> {
        let copy = TestDisk::create(&format!("{name}-{suffix}"), 560, 520)?;
        let mut bytes = image.clone();
        change(&mut bytes);
        std::fs::write(&copy.path, bytes)?;
        Ok(copy)
    };
    let flipped = variant("bitflip", &|b| b[(data + 4096 + 100) as usize] ^= 0x08)?;
    let truncated = variant("truncated", &|b| {
        let from = (data + header.data_bytes / 2) as usize;
        b[from..(data + header.data_bytes) as usize].fill(0);
    })?;

    let mut refused = |label: &str, disk: &TestDisk, memory: u32, extra: &[&str], why: &str| -> Result<()> {
        let mut vm = resume_vm(&format!("{name}-{label}"), disk, memory, extra, echo)?;
        let line = vm.expect("ksave: not resuming:", 120 * SECOND)?;
        ensure!(line.text.contains(why), "{label}: expected a refusal saying {why:?}, got {:?}", line.text);
        vm.expect("handing over to a normal boot", 5 * SECOND)?;
        let normal = vm.expect("ksave-test: normal boot reached userspace", 180 * SECOND)?;
        vm.expect_exit(0, 60 * SECOND)?;
        report.add_ms(format!("{label}: power-on to refusal"), line.at);
        report.add_ms(format!("{label}: power-on to the normal boot's userspace"), normal.at);
        Ok(())
    };
    refused("bit flip", &flipped, 512, &[], "image damaged: chunk 0")?;
    refused("truncated", &truncated, 512, &[], "image damaged: chunk")?;
    refused("other -m", &disk, 384, &[], "RAM map differs")?;
    // qemu64 reports AuthenticAMD: the image was made on "AMD".
    refused("other CPU vendor", &disk, 512, &["-cpu", "qemu64,vendor=GenuineIntel"], "another CPU vendor")?;

    // Resumed once, the image is never resumed again.
    let mut vm = resume_vm(&format!("{name}-resume"), &disk, 512, &[], echo)?;
    vm.expect("ksave: resumed from the image", 120 * SECOND)?;
    vm.expect("KSAVE-TEST-RESULT: PASS", 120 * SECOND)?;
    vm.expect_exit(0, 60 * SECOND)?;
    refused("second resume", &disk, 512, &[], "already resumed")?;

    // From kernel C: the host sees a complete image, ksave finds it damaged,
    // invalidates it and resets; the next boot of C finds nothing to resume.
    let damaged = variant("c-bitflip", &|b| b[(data + 4096 + 100) as usize] ^= 0x08)?;
    let config = kernel_a(&format!("{name}-c"), &format!("resume-c ksave.partuuid={PART_GUID}"))?.arg(damaged.qemu_args(Bus::Ahci, None));
    let mut vm = Vm::start(VmConfig { echo, reboot: true, ..config })?;
    vm.expect("image invalidated, so no later boot tries it again", 120 * SECOND)?;
    let line = vm.expect("ksave: not resuming:", 10 * SECOND)?;
    ensure!(line.text.contains("image damaged"), "kernel C: unexpected refusal {:?}", line.text);
    vm.expect("ksave: nothing to resume: the image is invalidated", 180 * SECOND)?;
    vm.expect("booting normally", 10 * SECOND)?;
    vm.expect_exit(0, 60 * SECOND)?;
    report.add_ms("kernel C, damaged image: power-on to the normal boot", vm.elapsed());
    Ok(report)
}

/// A VM booting build/grub-resume.iso. CD first: SeaBIOS would otherwise try
/// the test disk, whose protective MBR has a boot signature but no code.
fn grub_resume_menu(name: &str) -> Result<VmConfig> {
    Ok(VmConfig::new(name).arg(["-boot".to_string(), "d".into(), "-cdrom".into(), build_input("grub-resume.iso")?.display().to_string()]))
}

/// GRUB's resume menu on a disk with no image: ksave says why, sets the
/// CMOS bit and resets; GRUB then boots the Linux entry, which reaches
/// userspace.
pub fn grub_no_image_boots_normally(echo: bool) -> Result<Report> {
    let name = "grub-no-image";
    let disk = TestDisk::create(name, 64, 32)?;
    let config = grub_resume_menu(name)?.arg(disk.qemu_args(Bus::Ahci, None));
    let mut vm = Vm::start(VmConfig { echo, reboot: true, ..config })?;
    let mut report = Report::new("GRUB menu, no image: normal boot");
    let refusal = vm.expect("ksave: not resuming:", 120 * SECOND)?;
    ensure!(refusal.text.contains("no resumable image"), "unexpected refusal: {}", refusal.text);
    vm.expect("CMOS 0x7e:0 set for the bootloader; resetting", 10 * SECOND)?;
    let normal = vm.expect("ksave-test: normal boot reached userspace", 180 * SECOND)?;
    vm.expect("KSAVE-TEST-RESULT: PASS", 30 * SECOND)?;
    vm.expect_exit(0, 60 * SECOND)?;
    report.add_ms("power-on to the refusal", refusal.at);
    report.add_ms("power-on to the normal boot's userspace", normal.at);
    Ok(report)
}

/// Linux's own hibernation in the same VM with the same load: swap on the
/// test partition, `echo disk > /sys/power/state`, power off; then boot the
/// same kernel with `resume=`.
/// Linux needs free RAM for a copy of every page it saves, and memtest's
/// pages are locked: at 256 MiB of a 512 MiB VM it refuses ("Image
/// allocation is 11435 pages short", seen here), so compare at less.
pub fn linux_hibernate_resume(memtest_mib: u64, echo: bool) -> Result<Report> {
    let name = "linux-hibernate";
    let disk = TestDisk::create(name, 560, 520)?;
    let mut report = Report::new(&format!("Linux hibernation (swap, nocompress), same VM, {memtest_mib} MiB memtest"));
    // loglevel after quiet, and consoles kept during the write: the
    // hibernation code reports its own sizes and rates.
    let args = format!("ksave.memtest_mib={memtest_mib} hibernate=nocompress loglevel=7 no_console_suspend");
    let config = kernel_a(name, &format!("linux-hibernate {args}"))?.arg(disk.qemu_args(Bus::Ahci, None));
    let mut vm = Vm::start(VmConfig { echo, ..config })?;
    let start = vm.expect("ksave-test: linux: hibernating", 300 * SECOND)?;
    let wrote = vm.expect("PM: hibernation: Wrote", 600 * SECOND)?;
    vm.expect_exit(0, 120 * SECOND)?;
    report.add_ms("hibernate: start to power-off", vm.elapsed() - start.at);
    // "Wrote 265396 kbytes in 4.53 seconds (58.58 MB/s)"
    if let Some(kib) = wrote.text.split("Wrote ").nth(1).and_then(|s| s.split(' ').next()?.parse::<f64>().ok()) {
        report.add("image size", kib / 1024.0, "MiB");
    }
    let config = kernel_a(&format!("{name}-resume"), &format!("linux-resume-failed {args} resume=/dev/sda1 resumewait"))?
        .arg(disk.qemu_args(Bus::Ahci, None));
    let mut vm = Vm::start(VmConfig { echo, ..config })?;
    let back = vm.expect("ksave-test: linux: resumed", 600 * SECOND)?;
    report.add_ms("resume: power-on to A running", back.at);
    vm.expect("KSAVE-TEST-RESULT: PASS", 120 * SECOND)?;
    vm.expect_exit(0, 60 * SECOND)?;
    Ok(report)
}
