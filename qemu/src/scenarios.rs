//! End-to-end scenarios. Each returns a [`Report`] of what it measured, or an
//! error with the console lines that led to it.

use std::fmt;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ksave_tools::elfimage::ImageLayout;

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

/// Kernel A boots, fills tmpfs with random data, loads ksave with
/// `kexec --load-preserve-context`, jumps to it twice (the second time
/// without reloading) and checks its data after each return; then powers off.
pub fn kexec_round_trip(echo: bool) -> Result<Report> {
    let elf = build_input("ksave.elf")?;
    let layout = ImageLayout::parse(&std::fs::read(&elf)?).context("reading build/ksave.elf")?;
    let append = format!(
        "console=ttyS0,115200 panic=-1 ksave.test=roundtrip ksave.mem_min={:#x} ksave.mem_max={:#x}",
        layout.start,
        layout.end - 1
    );
    let config = VmConfig::new("kexec-roundtrip").arg([
        "-kernel".into(),
        build_input("bzImage")?.display().to_string(),
        "-initrd".into(),
        build_input("initramfs.cpio.gz")?.display().to_string(),
        "-append".into(),
        append,
    ]);
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
