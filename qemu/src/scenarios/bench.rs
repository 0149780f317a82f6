//! Runs for `make bench` only: ksave's disk throughput, Linux's `dd` and
//! Linux's own hibernation as baselines in the same VM.

use anyhow::Result;

use super::disks::ksave_with_disk;
use super::save::{Expect, hibernate_run};
use super::{Kernel, Machine, Report, SECOND, kernel_a, kernel_on};
use crate::disk::{Bus, PART_GUID, TestDisk};
use crate::{Vm, VmConfig};

/// One 256 MiB (by default) write-then-read of ksave's disk bench at `bus`.
pub fn disk_bench(bus: Bus, ide_mode: &str, mib: u64) -> Result<Report> {
    let name = format!("bench-ksave-{bus:?}-{ide_mode}").to_lowercase();
    let disk = TestDisk::create_allocated(&name, mib + 40, mib + 8)?;
    let append = format!("ksave.bench=disk ksave.bench_mib={mib} ksave.part={PART_GUID} ksave.ide={ide_mode}");
    let mut vm = ksave_with_disk(&name, &append, &disk, bus, None, false)?;
    let rates = vm.expect_metrics("bench_write_mb_s", 600 * SECOND)?;
    vm.expect_exit(33, 10 * SECOND)?;
    let (write, read) = (rates.get("bench_write_mb_s")?, rates.get("bench_read_mb_s")?);
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

/// [`hibernate_snapshot`] for `make bench`: the disk image is written on
/// the host first, so the save measures the emulated disk, not the host
/// file system allocating blocks.
pub fn hibernate_bench(lz4: bool) -> Result<Report> {
    hibernate_run(Bus::Ahci, Expect::Ok, lz4, 256, false, true)
}

/// Linux's own hibernation in the same VM with the same load: swap on the
/// test partition, `echo disk > /sys/power/state`, power off; then boot the
/// same kernel with `resume=`.
/// Linux needs free RAM for a copy of every page it saves, and memtest's
/// pages are locked: at 256 MiB of a 512 MiB VM it refuses ("Image
/// allocation is 11435 pages short", seen here), so compare at less.
pub fn linux_hibernate_resume(memtest_mib: u64, echo: bool) -> Result<Report> {
    linux_hibernate_resume_on(memtest_mib, false, echo)
}

/// [`linux_hibernate_resume`] on memory `lived_in` (churned first, as the
/// ksave stories do) or fresh from boot.
pub fn linux_hibernate_resume_on(memtest_mib: u64, lived_in: bool, echo: bool) -> Result<Report> {
    linux_hibernate_resume_in(Machine::qemu64(Kernel::Linux6_12), memtest_mib, lived_in, echo)
}

/// [`linux_hibernate_resume_on`] on `machine` (its memory, CPU and chipset;
/// the disk on AHCI).
pub fn linux_hibernate_resume_in(machine: Machine, memtest_mib: u64, lived_in: bool, echo: bool) -> Result<Report> {
    let name = &format!("linux-hibernate{}-{}m", if lived_in { "-lived-in" } else { "" }, machine.memory_mib);
    // Swap for an image of up to 2/5 of RAM (the kernel's image_size).
    let swap_mib = (u64::from(machine.memory_mib) * 2 / 5).max(520);
    let disk = TestDisk::create(name, swap_mib + 40, swap_mib)?;
    let mut report = Report::new(&format!("Linux hibernation (swap, nocompress), same VM, {memtest_mib} MiB memtest"));
    // loglevel after quiet, and consoles kept during the write: the
    // hibernation code reports its own sizes and rates.
    let lived = if lived_in { " ksave.lived_in=1" } else { "" };
    let args = format!("ksave.memtest_mib={memtest_mib} hibernate=nocompress loglevel=7 no_console_suspend{lived}");
    let config = kernel_on(machine.kernel, name, &format!("linux-hibernate {args}{}", machine.kernel_args()))?.arg(disk.qemu_args(Bus::Ahci, None));
    let mut vm = Vm::start(VmConfig { echo, ..machine.apply(config)? })?;
    let start = vm.expect("ksave-test: linux: hibernating", 300 * SECOND)?;
    expect_linux_image(&mut vm, false, &mut report)?;
    vm.expect_exit(0, 120 * SECOND)?;
    report.add_ms("hibernate: start to power-off", vm.elapsed() - start.at);
    let resume_args = format!("linux-resume-failed {args} resume=/dev/sda1 resumewait{}", machine.kernel_args());
    let config = kernel_on(machine.kernel, &format!("{name}-resume"), &resume_args)?.arg(disk.qemu_args(Bus::Ahci, None));
    let mut vm = Vm::start(VmConfig { echo, ..machine.apply(config)? })?;
    let back = vm.expect("ksave-test: linux: resumed", 600 * SECOND)?;
    report.add_ms("resume: power-on to A running", back.at);
    vm.expect("KSAVE-TEST-RESULT: PASS", 120 * SECOND)?;
    vm.expect_exit(0, 60 * SECOND)?;
    Ok(report)
}

/// Waits for Linux's hibernation to report its image, and adds "pages in
/// the image" and "image size" (as written: after compression if
/// `compressed`) to `report`. The lines are KERN_INFO: the console must show
/// that level.
pub(super) fn expect_linux_image(vm: &mut Vm, compressed: bool, report: &mut Report) -> Result<()> {
    let number_after = |text: &str, marker: &str| text.split(marker).nth(1).and_then(|s| s.split(' ').next()?.parse::<f64>().ok());
    // "PM: hibernation: Image created (27177 pages copied, 1034 zero pages)"
    // (kernel/power/snapshot.c)
    let created = vm.expect("pages copied", 600 * SECOND)?;
    if let Some(pages) = number_after(&created.text, "(") {
        report.add("pages in the image", pages, "pages");
    }
    // "PM: hibernation: Wrote 265396 kbytes in 4.53 seconds (58.58 MB/s)",
    // then, compressed, "PM: Image size after compression: 80394 kbytes"
    // (kernel/power/hibernate.c, swap.c)
    let mut written = vm.expect("PM: hibernation: Wrote", 600 * SECOND)?;
    let mut marker = "Wrote ";
    if compressed {
        written = vm.expect("Image size after compression: ", 60 * SECOND)?;
        marker = "compression: ";
    }
    if let Some(kib) = number_after(&written.text, marker) {
        report.add("image size", kib / 1024.0, "MiB");
    }
    Ok(())
}
