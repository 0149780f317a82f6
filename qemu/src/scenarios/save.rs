//! Saving: `ksave hibernate --snapshot` on a live kernel A, the image
//! checked on the host, and every refusal leaving A running.

use anyhow::{Context, Result, ensure};
use ksave_format::header::fail;

use super::{Kernel, Machine, Report, SECOND, kernel_a, kernel_on};
use crate::disk::{Bus, PART_FIRST_LBA, PART_GUID, TestDisk};
use crate::{Vm, VmConfig, build_input};

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
    /// ksave takes a CPU exception in the middle of the save.
    CpuException,
    /// The store's disk has a clone (same PARTUUID, on virtio-blk): setup,
    /// the tool and ksave all refuse to guess which is meant.
    Cloned,
    /// Setup refuses what is not ksave's; a file system made on the store
    /// after setup is refused by the tool and by ksave, and stays intact.
    Reformatted,
    /// RAM a driver added (QEMU's virtio-mem, 128 MiB plugged): no image
    /// can hold it, so the tool refuses, naming it, before anything is
    /// loaded, --no-precheck or not.
    DriverRam,
}

/// Kernel A holds `memtest_mib` MiB of known data and runs `ksave
/// hibernate --snapshot` to an AHCI disk ([`hibernate_snapshot_on`]: on
/// `bus`). With [`Expect::Ok`] the host
/// then checks the image with `ksave verify` and `ksave export`: every
/// memtest page must be in the core file at its physical address. The
/// failure cases must leave A running with its data intact and hibernate
/// failing with the reason.
pub fn hibernate_snapshot(expect: Expect, lz4: bool, memtest_mib: u64, echo: bool) -> Result<Report> {
    hibernate_run(Bus::Ahci, expect, lz4, memtest_mib, echo, false)
}

/// [`hibernate_snapshot`] to a disk on `bus`.
pub fn hibernate_snapshot_on(bus: Bus, expect: Expect, lz4: bool, memtest_mib: u64, echo: bool) -> Result<Report> {
    hibernate_run(bus, expect, lz4, memtest_mib, echo, false)
}

pub(super) fn hibernate_run(bus: Bus, expect: Expect, lz4: bool, memtest_mib: u64, echo: bool, allocated: bool) -> Result<Report> {
    let name = format!("hibernate-{expect:?}{}-{bus:?}", if lz4 { "-lz4" } else { "" }).to_lowercase();
    let part_mib = if expect == Expect::TooSmall { 64 } else { 520 };
    let disk = if allocated { TestDisk::create_allocated(&name, part_mib + 20, part_mib)? } else { TestDisk::create(&name, part_mib + 20, part_mib)? };
    let rule = match expect {
        Expect::IoError => Some(disk.blkdebug_rule("write", PART_FIRST_LBA + 20_000)?),
        _ => None,
    };
    // The LZ4 runs load through kexec-tools, the others through kexec_load(2).
    let scenario = format!(
        "hibernate ksave.partuuid={PART_GUID} ksave.memtest_mib={memtest_mib} ksave.expect={}{}{}",
        format!("{expect:?}").to_lowercase().replace("toosmall", "too-small").replace("wrongguid", "wrong-guid").replace("ioerror", "io-error").replace("cpuexception", "cpu-exception").replace("driverram", "driver-ram"),
        if lz4 { " ksave.lz4=1 ksave.kexec_tools=1" } else { "" },
        if expect == Expect::DriverRam { " memhp_default_state=online" } else { "" }
    );
    let mut config = kernel_a(&name, &scenario)?.arg(disk.qemu_args(bus, rule.as_deref()));
    if expect == Expect::Cloned {
        let clone = disk.path.with_extension("clone.img");
        let copied = std::process::Command::new("cp").arg("--sparse=always").arg(&disk.path).arg(&clone).status()?;
        ensure!(copied.success(), "copying the disk for its clone failed ({copied})");
        config = config.arg(["-drive".to_string(), format!("if=none,id=clone,format=raw,file={}", clone.display()), "-device".into(), "virtio-blk-pci,drive=clone".into()]);
    }
    if expect == Expect::DriverRam {
        // Room for hotplugged memory (the -m options merge with the VM's),
        // and 128 MiB of it plugged at boot, onlined by the kernel.
        config = config.arg([
            "-m",
            "512M,maxmem=1G",
            "-object",
            "memory-backend-ram,id=vmem0,size=256M",
            "-device",
            "virtio-mem-pci,id=vmem,memdev=vmem0,requested-size=128M",
        ]);
    }
    let mut vm = Vm::start(VmConfig { echo, ..config })?;
    let mut report = Report::new(&format!("hibernate --snapshot, {expect:?}{}, {memtest_mib} MiB memtest, {bus:?}", if lz4 { ", LZ4" } else { "" }));
    if expect == Expect::TooSmall {
        vm.expect("setup took the small store, with a note", 120 * SECOND)?;
    }
    if expect == Expect::Reformatted {
        vm.expect("setup claimed", 120 * SECOND)?;
    }
    if expect == Expect::Cloned {
        vm.expect("a clone of the store's disk, made after setup", 120 * SECOND)?;
    }
    vm.expect("memtest: ready", 300 * SECOND)?;
    match expect {
        Expect::Ok => {
            let jump = vm.expect("ksave-test: jump", 30 * SECOND)?;
            let loaded = vm.expect("ksave: loaded in", 30 * SECOND)?;
            report.add("caller memory held while loaded", vm.expect_metrics("held_kib", 5 * SECOND)?.get("held_kib")?, "KiB");
            let banner = vm.expect("entered by kexec jump", 30 * SECOND)?;
            let first = vm.expect("ksave: image header written", 60 * SECOND)?;
            report.add_ms("the jump to the first sector written", first.at - loaded.at);
            if lz4 {
                // The other CPU, offline for the jump, took its share of the coding.
                let coded = vm.expect_metrics("jobs_helped", 600 * SECOND)?;
                let (helped, own) = (coded.get("jobs_helped")?, coded.get("jobs_own")?);
                ensure!(helped > 0.0, "2 CPUs, yet the save coded every group on one ({own} groups)");
                report.add("groups coded by the other CPU", helped, "groups");
                report.add("groups coded by the saving CPU", own, "groups");
            }
            vm.expect("ksave: saved", 600 * SECOND)?;
            let saved = vm.expect_metrics("save_ms", 5 * SECOND)?;
            let back = vm.expect("ksave: image complete", 60 * SECOND)?;
            report.add_ms("`ksave hibernate` to ksave's banner", banner.at - jump.at);
            report.add_ms("ksave's banner to the first sector written", first.at - banner.at);
            report.add_ms("`ksave hibernate` to the first sector written", first.at - jump.at);
            report.add_ms("ksave's banner to A running again", back.at - banner.at);
            const MIB: f64 = 1048576.0;
            report.add("save rate over all RAM", saved.get("ram_mb_s")?, "MB/s");
            report.add("image size", saved.get("image_bytes")? / MIB, "MiB");
            report.add("save time in ksave", saved.get("save_ms")?, "ms");
            report.add("  of which disk transfers", saved.get("disk_ms")?, "ms");
            report.add("zero pages left out", saved.get("pages_zero")?, "pages");
            report.add("data stored", saved.get("pages_stored")? * 4096.0 / MIB, "MiB");
        }
        Expect::DriverRam => {
            let ram = vm.expect("ksave-test: RAM a driver added:", 120 * SECOND)?;
            report.add("virtio-mem RAM plugged", ram.text.split_whitespace().find_map(|w| w.parse().ok()).unwrap_or(0.0), "MiB");
            vm.expect("ksave-test: hibernate refused the RAM a driver added, naming it, nothing loaded", 120 * SECOND)?;
        }
        _ => {
            // ksave's own failure first, then the tool's, which must pass
            // ksave's code (and reason) on: from the partition's record, or
            // from the mailbox when the partition is what failed.
            let expected = match expect {
                Expect::TooSmall => fail::TOO_SMALL,
                Expect::WrongGuid => fail::PARTITION,
                Expect::CpuException => fail::EXCEPTION,
                Expect::Reformatted => fail::NOT_CLAIMED,
                Expect::Cloned => fail::PARTITION,
                _ => fail::IO,
            };
            if expect == Expect::CpuException && lz4 {
                // The fault comes while the other CPU serves the coding:
                // ksave parks it on its way back, and A brings it online.
                vm.expect("more CPU(s) share the save", 300 * SECOND)?;
            }
            let ksave_says = vm.expect_metrics("save_failed", 300 * SECOND)?;
            ensure!(ksave_says.get("save_failed")? == expected as f64, "ksave failed with code {}, expected {expected}", ksave_says.get("save_failed")?);
            vm.expect("hibernation FAILED, not powering off", 60 * SECOND)?;
            let tool_says = vm.expect_metrics("save_failed", 10 * SECOND)?;
            ensure!(tool_says.get("save_failed")? == expected as f64, "the tool passed on code {}, ksave's was {expected}", tool_says.get("save_failed")?);
            vm.expect("hibernate refused (as it must)", 10 * SECOND)?;
            if expect == Expect::Reformatted {
                vm.expect("the file system on the store is intact", 60 * SECOND)?;
            }
        }
    }
    vm.expect("memtest: data intact", 120 * SECOND)?;
    vm.expect("still running, memory intact", 60 * SECOND)?;
    vm.expect("KSAVE-TEST-RESULT: PASS", 60 * SECOND)?;
    if expect != Expect::CpuException {
        vm.refute_seen("CPU exception")?;
    }
    vm.refute_seen("ksave: panic")?;
    vm.expect_exit(0, 60 * SECOND)?;
    report.add_ms("VM total run time", vm.elapsed());
    if expect == Expect::Ok {
        check_image_on_host(&disk, &mut report)?;
    }
    Ok(report)
}

/// Kernel 7.3, built without CONFIG_SUSPEND, on a q35 with QEMU's
/// intel-iommu and `intel_iommu=on`: its IOMMU still translates at the
/// jump. ksave switches translation off for its own DMA and back on for the
/// return, so a snapshot works and A's disk works after it; a power-off
/// hibernation is refused, since a fresh boot could not recreate the
/// IOMMU's state for the saved kernel.
pub fn hibernate_with_the_iommu_left_on(echo: bool) -> Result<Report> {
    let name = "hibernate-iommu-left-on";
    let machine = Machine::qemu64(Kernel::Linux7_3).with_iommu();
    let disk = TestDisk::create(name, 520 + 20, 520)?;
    let scenario = format!("hibernate ksave.partuuid={PART_GUID} ksave.memtest_mib=64 ksave.expect=iommu-left-on{}", machine.kernel_args());
    let config = kernel_on(machine.kernel, name, &scenario)?.arg(disk.qemu_args(Bus::Ahci, None));
    let mut vm = Vm::start(VmConfig { echo, ..machine.apply(config)? })?;
    let mut report = Report::new("hibernate with the IOMMU translating at the jump (Linux 7.3 without CONFIG_SUSPEND, intel-iommu)");
    let unit = vm.expect("ksave:   IOMMU Vtd(", 300 * SECOND)?;
    ensure!(unit.text.contains("translation on: switching it off"), "the IOMMU was expected translating at the jump: {}", unit.text);
    vm.expect("ksave: snapshot taken; still running", 120 * SECOND)?;
    vm.expect("hibernation FAILED, not powering off", 300 * SECOND)?;
    vm.expect_refusal(ksave_format::verdict::code::SNAPSHOT_ONLY, 10 * SECOND)?;
    vm.expect("hibernate refused (as it must)", 10 * SECOND)?;
    vm.expect("memtest: data intact", 120 * SECOND)?;
    vm.expect("KSAVE-TEST-RESULT: PASS", 60 * SECOND)?;
    vm.refute_seen("CPU exception")?;
    vm.expect_exit(0, 60 * SECOND)?;
    report.add_ms("VM total run time", vm.elapsed());
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
    let _ = std::fs::remove_file(&core);
    let t = std::time::Instant::now();
    run(&["export", "--elf", &core.display().to_string(), &img])?;
    report.add_ms("host: ksave export", t.elapsed());
    // All of RAM: the owner's alone, and never written over unasked.
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&core)?.permissions()) & 0o777;
    ensure!(mode == 0o600, "ksave export made the core file {mode:o}, not 600");
    ensure!(run(&["export", "--elf", &core.display().to_string(), &img]).is_err(), "ksave export overwrote an existing file without --force");
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
