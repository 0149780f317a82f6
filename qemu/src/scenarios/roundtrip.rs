//! The kexec-jump round trip: kernel A -> ksave -> A, twice.

use anyhow::{Context, Result, ensure};
use ksave_tools::elfimage::ImageLayout;

use super::{Kernel, Report, SECOND, kernel_on};
use crate::{Vm, VmConfig, build_input};

/// Kernel A boots, fills tmpfs with random data, loads ksave with
/// `kexec --load-preserve-context`, jumps to it twice (the second time
/// without reloading) and checks its data after each return; then powers off.
/// Plain kexec-tools, ksave.elf not configured: a kernel that does not
/// reload its GDT after the jump back (6.1) must get its own GDT found from
/// what ksave is given at entry.
pub fn kexec_round_trip(kernel: Kernel, echo: bool) -> Result<Report> {
    let elf = build_input("ksave.elf")?;
    let layout = ImageLayout::parse(&std::fs::read(&elf)?).context("reading build/ksave.elf")?;
    let scenario = format!("roundtrip ksave.mem_min={:#x} ksave.mem_max={:#x}", layout.start, layout.end - 1);
    let config = kernel_on(kernel, &format!("kexec-roundtrip-{kernel:?}").to_lowercase(), &scenario)?;
    let mut vm = Vm::start(VmConfig { echo, ..config })?;
    let mut report = Report::new(&format!("kexec jump round trip (kernel A -> ksave -> A, twice), {kernel:?}"));

    let init = vm.expect("ksave-test: scenario roundtrip", 90 * SECOND)?;
    report.add_ms("kernel A boot to /init", init.at);
    vm.expect("sha256 before:", 60 * SECOND)?;
    for round in 1..=2 {
        let jump = vm.expect(&format!("jump {round}: kexec -e"), 60 * SECOND)?;
        let banner = vm.expect(&format!("entered by kexec jump (entry {round})"), 30 * SECOND)?;
        let map = vm.expect("backup map:", 10 * SECOND)?;
        ensure!(map.text.contains("exactly ksave's own range"), "jump {round}: backup map not as expected: {}", map.text);
        let gdt = vm.expect("ksave:   return GDT:", 10 * SECOND)?;
        ensure!(
            gdt.text.contains("the kernel's own at") || gdt.text.contains("the kernel reloads its own"),
            "jump {round}: the way back is not safe: {}",
            gdt.text
        );
        vm.expect("ksave: returning to caller", 10 * SECOND)?;
        let back = vm.expect(&format!("back from jump {round}"), 30 * SECOND)?;
        vm.expect(&format!("sha256 after jump {round} matches"), 60 * SECOND)?;
        report.add_ms(format!("jump {round}: `kexec -e` to ksave banner"), banner.at - jump.at);
        report.add_ms(format!("jump {round}: ksave banner to A running again"), back.at - banner.at);
    }
    vm.expect("KSAVE-TEST-RESULT: PASS", 30 * SECOND)?;
    vm.refute_seen("CPU exception")?;
    vm.refute_seen("ksave: panic")?;
    vm.refute_seen("WARNING: this kernel does not reload its GDT")?;
    // poweroff -f ends QEMU with 0: only the PASS line above makes it a pass.
    vm.expect_exit(0, 30 * SECOND)?;
    report.add_ms("VM total run time", vm.elapsed());
    report.add("ksave footprint", (layout.footprint() / 1024) as f64, "KiB");
    Ok(report)
}
