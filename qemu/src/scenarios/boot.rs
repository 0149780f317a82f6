//! ksave booted by a bootloader with nothing to resume: multiboot 1 and 2,
//! and the CPU exception report.

use anyhow::{Result, ensure};

use super::{Report, SECOND};
use crate::{Vm, VmConfig, build_input};

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
    vm.expect("memory map:", 5 * SECOND)?;
    vm.expect("KiB RAM", 5 * SECOND)?;
    // 512 MiB guest: the map must show nearly all of it as RAM.
    let ram_mib = vm.expect_metrics("ram_mib", 5 * SECOND)?.get("ram_mib")?;
    ensure!((500.0..=512.0).contains(&ram_mib), "memory map shows {ram_mib} MiB of RAM in a 512 MiB guest");
    vm.expect("nothing to restore", 5 * SECOND)?;
    vm.expect_exit(33, 10 * SECOND)?;
    report.add_ms("QEMU start to ksave banner", banner.at);
    report.add("RAM in the multiboot memory map", ram_mib, "MiB");
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
