//! The whole story: hibernate, power off, resume, twice, by each way in.

use anyhow::{Result, ensure};

use super::{Firmware, Kernel, Machine, Report, SECOND, grub_resume_menu, kernel_on};
use crate::disk::{Bus, PART_GUID, TestDisk};
use crate::{Vm, VmConfig, build_input};

/// How the machine comes back after `ksave hibernate` powered it off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumeBy {
    /// QEMU `-kernel ksave.elf` (multiboot 1) with `ksave.resume=GUID`.
    Multiboot1,
    /// Kernel C boots; `ksave resume` in its initramfs kexecs ksave.
    KernelC,
    /// GRUB's menu boots ksave by multiboot 2 (build/grub-resume.iso).
    Grub,
    /// OVMF starts GRUB EFI from the same ISO, which chainloads ksave.efi:
    /// the firmware's application, which checks the image while the
    /// firmware runs and resumes it after leaving it.
    UefiApp,
}

/// The full story: kernel A holds 256 MiB of known data, a counting
/// process, a tmpfs file; `ksave hibernate` powers off; a fresh QEMU (same
/// memory, CPUs and disk) boots ksave, which resumes A; A checks everything
/// and hibernates again; a third QEMU resumes it again. On UEFI, A also
/// marks an ACPI NVS page before each hibernation and finds the mark after
/// the resume: the image carried the firmware's NVS and ksave put it back.
pub fn hibernate_resume(by: ResumeBy, memtest_mib: u64, echo: bool) -> Result<Report> {
    hibernate_resume_on(Machine::qemu64(Kernel::Linux6_12), by, memtest_mib, echo)
}

/// [`hibernate_resume`] on `machine`.
pub fn hibernate_resume_on(machine: Machine, by: ResumeBy, memtest_mib: u64, echo: bool) -> Result<Report> {
    story(machine, by, memtest_mib, How { rounds: 2, ..How::of(by) }, echo)
}

/// [`hibernate_resume_on`], one round: for a machine whose claim is its
/// disk, kernel, memory or CPU (NVMe, virtio-blk, IDE; 6.1; RAM above 4
/// GiB; 5-level paging). Resuming a resumed kernel again is the AHCI,
/// GRUB, ksave.efi, IOMMU, file-store and Debian stories' second round.
pub fn hibernate_resume_once_on(machine: Machine, by: ResumeBy, memtest_mib: u64, echo: bool) -> Result<Report> {
    story(machine, by, memtest_mib, How { rounds: 1, ..How::of(by) }, echo)
}

/// [`hibernate_resume`] for `make bench`: on memory `lived_in` (churned
/// before each hibernation, as every test story does) or fresh from boot.
pub fn hibernate_resume_bench(by: ResumeBy, memtest_mib: u64, lived_in: bool) -> Result<Report> {
    story(Machine::qemu64(Kernel::Linux6_12), by, memtest_mib, How { lived_in, ..How::of(by) }, false)
}

/// One round on `machine` for `make bench`, on lived-in memory, with A
/// booted with `init_on_free=1` (every free page then zeroed by the resume)
/// or not (free pages left as found).
pub fn hibernate_resume_bench_on(machine: Machine, memtest_mib: u64, init_on_free: bool, lz4: bool, one_cpu: bool) -> Result<Report> {
    story(machine, ResumeBy::Multiboot1, memtest_mib, How { rounds: 1, lived_in: true, init_on_free, measure_read: false, lz4, one_cpu }, false)
}

/// The ksave.efi story for `make bench`, one round, ksave.efi reading
/// 64 MiB through the firmware's Block I/O first.
pub fn efi_read_bench() -> Result<Report> {
    let machine = Machine::qemu64(Kernel::Linux6_12).uefi().on(Bus::VirtioRootPort);
    story(machine, ResumeBy::UefiApp, 128, How { rounds: 1, measure_read: true, ..How::of(ResumeBy::UefiApp) }, false)
}

/// How a story runs.
#[derive(Clone, Copy)]
struct How {
    /// Hibernations and resumes (1 or 2).
    rounds: u32,
    /// Memory churned and freed before each hibernation.
    lived_in: bool,
    /// A boots with `init_on_free=1`: it trusts its free pages to be zero,
    /// so ksave must zero those it left out.
    init_on_free: bool,
    /// By ksave.efi, which first reads through the firmware's Block I/O to
    /// say how fast (build/grub-resume-measure.iso: `ksave.measure_read=`).
    measure_read: bool,
    /// The image compressed with LZ4 where it pays: the resume decodes it
    /// (on every CPU) rather than read raw pages into place.
    lz4: bool,
    /// The resume on one CPU (`ksave.helpers=0`; by QEMU -kernel only).
    one_cpu: bool,
}

impl How {
    /// Two rounds on lived-in memory; A trusts its free pages to be zero
    /// where the resume follows a boot that leaves its data all over RAM
    /// (kernel C; the firmware and GRUB EFI): ksave must have zeroed those
    /// it left out. (The other stories' A relies on nothing there: ksave
    /// leaves them as found.)
    fn of(by: ResumeBy) -> Self {
        Self {
            rounds: 2,
            lived_in: true,
            init_on_free: matches!(by, ResumeBy::KernelC | ResumeBy::UefiApp),
            measure_read: false,
            // The QEMU -kernel story's image is LZ4: coded chunks checked and
            // decoded on both CPUs; the others' are raw.
            lz4: by == ResumeBy::Multiboot1,
            one_cpu: false,
        }
    }
}

fn story(machine: Machine, by: ResumeBy, memtest_mib: u64, how: How, echo: bool) -> Result<Report> {
    let How { rounds, lived_in, init_on_free, measure_read, lz4, one_cpu } = how;
    let name = format!(
        "resume-{by:?}-{:?}-{:?}-{:?}-{}-{}m{}",
        machine.firmware,
        machine.bus,
        machine.kernel,
        machine.cpu,
        machine.memory_mib,
        if machine.iommu { "-iommu" } else { "" }
    )
    .to_lowercase()
    .replace('_', ".");
    let uefi = machine.firmware == Firmware::Uefi;
    let part_mib = machine.partition_mib();
    let disk = TestDisk::create_on(machine.bus, &name, part_mib + 40, part_mib)?;
    let mut report = Report::new(&format!(
        "hibernate, power off, resume by {by:?}, {} ({memtest_mib} MiB memtest; {:?}, {:?}, {:?}, -cpu {}, {} MiB)",
        if rounds == 1 { "once" } else { "twice" },
        machine.firmware, machine.bus, machine.kernel, machine.cpu, machine.memory_mib
    ));
    let nvs_mark = if uefi { " ksave.nvs_mark=1" } else { "" };
    let init_on_free = if init_on_free { " init_on_free=1 ksave.init_on_free=1" } else { "" };
    // Resumed by GRUB, A poisons its free pages (page_poison=1) and checks
    // the poison as it hands each out (mm/page_poison.c): ksave must save
    // them (no free page left out) and the poison must be back after the
    // resume.
    let poison = if by == ResumeBy::Grub { " page_poison=1 ksave.page_poison=1" } else { "" };
    let coded = lz4;
    let lz4 = if lz4 { " ksave.lz4=1" } else { "" };
    let one_cpu_save = if one_cpu { " ksave.one_cpu=1" } else { "" };
    let config = kernel_on(
        machine.kernel,
        &name,
        &format!("resume ksave.partuuid={PART_GUID} ksave.memtest_mib={memtest_mib}{nvs_mark}{init_on_free}{poison}{lz4}{one_cpu_save}{}", machine.kernel_args()),
    )?
    .arg(disk.qemu_args(machine.bus, None));
    let mut vm = Vm::start(VmConfig { echo, ..machine.apply(config)? })?;
    if machine.iommu {
        // Kernel A really translates its devices' DMA.
        vm.expect("ksave-test: DMA remapping on: iommu groups", 120 * SECOND)?;
    }
    if !poison.is_empty() {
        vm.expect("ksave-test: page poisoning: no free page left out", 300 * SECOND)?;
    } else if lived_in {
        let proven = vm.expect("ksave-test: free pages proven:", 300 * SECOND)?;
        let free: f64 = proven.text.split_whitespace().find_map(|w| w.parse().ok()).unwrap_or(0.0);
        report.add("snapshot of lived-in memory: pages left out as free", free, "pages");
    }
    let start = vm.expect("ksave-test: hibernating (1)", 300 * SECOND)?;
    if machine.bus == Bus::VirtioRootPort {
        // The registers are where the firmware put them, above 4 GiB.
        let found = vm.expect("ksave:   virtio-blk ", 120 * SECOND)?;
        let at = found.text.split(" at 0x").nth(1).and_then(|w| u64::from_str_radix(w.split(|c: char| !c.is_ascii_hexdigit()).next()?, 16).ok());
        ensure!(at.is_some_and(|a| a >= 1 << 32), "the virtio-blk registers are not above 4 GiB: {}", found.text);
        report.add("virtio-blk registers at", at.unwrap_or(0) as f64 / (1u64 << 30) as f64, "GiB");
    }
    if machine.iommu {
        let unit = vm.expect("ksave:   IOMMU Vtd(", 120 * SECOND)?;
        report.add("IOMMU translating at the jump (1 yes, 0 no)", unit.text.contains("translation on") as u8 as f64, "");
    }
    if coded {
        // The save's LZ4 coding: shared with the other CPUs unless kept to one.
        let jobs = vm.expect_metrics("jobs_helped", 300 * SECOND)?;
        let (helped, own) = (jobs.get("jobs_helped")?, jobs.get("jobs_own")?);
        if machine.cpus > 1 && !one_cpu {
            ensure!(helped > 0.0, "{} CPUs, yet the save coded every group on one ({own} groups)", machine.cpus);
        }
        report.add("save: groups coded by the other CPUs", helped, "groups");
        report.add("save: groups coded by the saving CPU", own, "groups");
    }
    vm.expect("ksave: image complete", 120 * SECOND)?;
    let saved = vm.expect_metrics("image_bytes", 5 * SECOND)?;
    report.add("save: ksave's save", saved.get("save_ms")?, "ms");
    vm.expect("ksave: powering off", 60 * SECOND)?;
    vm.expect_exit(0, 60 * SECOND)?;
    report.add_ms("hibernate: start to power-off", vm.elapsed() - start.at);
    report.add("image size", saved.get("image_bytes")? / 1048576.0, "MiB");
    report.add("pages in the image", saved.get("pages_stored")?, "pages");
    if let Some(without) = machine.cpu_without_la57() {
        // The same machine but for LA57: the image's kernel cannot run
        // there. Refused before anything is written, the machine boots
        // normally, and the image stays resumable for the right CPU.
        let before = disk.digest()?;
        let config = grub_resume_menu(&format!("{name}-no-la57"))?.arg(disk.qemu_args(machine.bus, None));
        let mut vm = Vm::start(VmConfig { echo, reboot: true, ..Machine { cpu: without, ..machine }.apply(config)? })?;
        let line = vm.expect_refusal(ksave_format::verdict::code::NO_LA57, 120 * SECOND)?;
        vm.expect("ksave-test: normal boot reached userspace", 180 * SECOND)?;
        vm.expect_exit(0, 60 * SECOND)?;
        ensure!(disk.digest()? == before, "the refused boot changed the disk");
        report.add_ms("without LA57: power-on to refusal", line.at);
    }
    if by == ResumeBy::UefiApp {
        // The disk on a controller the firmware drives and ksave does not
        // (virtio-scsi): ksave.efi checks the image through the firmware,
        // leaves it, and its own drivers find no disk. It can only reset;
        // the next start finds the image it took in KsaveTried and leaves
        // it to the next loader (GRUB's fallback: a normal boot). The image
        // is untouched, for the resumes below.
        let before = disk.digest()?;
        let scsi = [
            "-device".to_string(),
            "virtio-scsi-pci,id=scsi0".into(),
            "-drive".into(),
            format!("if=none,id=d0,format=raw,file={}", disk.path.display()),
            "-device".into(),
            "scsi-hd,drive=d0,bus=scsi0.0".into(),
        ];
        let config = grub_resume_menu(&format!("{name}-unreached"))?.arg(scsi);
        let mut vm = Vm::start(VmConfig { echo, reboot: true, ..machine.apply(config)? })?;
        vm.expect("ksave:   firmware disk 1:", 120 * SECOND)?;
        vm.expect_refusal(ksave_format::verdict::code::NO_STORE, 120 * SECOND)?;
        vm.expect("the next start leaves this image to the next loader", 30 * SECOND)?;
        vm.expect("an earlier start took this image and did not reach the saved kernel", 180 * SECOND)?;
        let normal = vm.expect("ksave-test: normal boot reached userspace", 180 * SECOND)?;
        vm.expect_exit(0, 60 * SECOND)?;
        ensure!(disk.digest()? == before, "the start that could not finish changed the disk");
        report.add_ms("ksave.efi's own drivers find no disk: power-on to a normal boot, through a reset", normal.at);
    }
    for round in 1..=rounds {
        let resume = match by {
            ResumeBy::Multiboot1 => VmConfig::new(&format!("{name}-{round}")).arg([
                "-kernel".to_string(),
                build_input("ksave.elf")?.display().to_string(),
                "-append".into(),
                format!("ksave.resume={PART_GUID}{}", if one_cpu { " ksave.helpers=0" } else { "" }),
            ]),
            ResumeBy::KernelC => {
                kernel_on(machine.kernel, &format!("{name}-{round}"), &format!("resume-c ksave.partuuid={PART_GUID}{}", machine.kernel_args()))?
            }
            ResumeBy::UefiApp if measure_read => VmConfig::new(&format!("{name}-{round}")).arg([
                "-boot".to_string(),
                "d".into(),
                "-cdrom".into(),
                build_input("grub-resume-measure.iso")?.display().to_string(),
            ]),
            ResumeBy::Grub | ResumeBy::UefiApp => grub_resume_menu(&format!("{name}-{round}"))?,
        }
        .arg(disk.qemu_args(machine.bus, None));
        let mut vm = Vm::start(VmConfig { echo, ..machine.apply(resume)? })?;
        if measure_read {
            let read = vm.expect_metrics("block_io_read_ms", 300 * SECOND)?;
            report.add(format!("resume {round}: firmware Block I/O read"), read.get("block_io_read_mib")? * 1.048576 / read.get("block_io_read_ms")? * 1000.0, "MB/s");
        }
        let loaded = vm.expect_metrics("resume_load_ms", 300 * SECOND)?;
        if round == 1 {
            report.add("resume 1: ksave's one pass, the image's bytes over its time", saved.get("image_bytes")? / loaded.get("resume_load_ms")? / 1000.0, "MB/s");
        }
        let left = loaded.get("pages_left")?;
        if !init_on_free.is_empty() {
            // The kernel's boot line says "heap free:on": nothing is left.
            ensure!(left == 0.0, "A zeroes its freed pages (init_on_free=1), yet ksave left {left} free pages as found");
        } else if poison.is_empty() && lived_in {
            // The kernel said "heap free:off": the free runs listed ahead
            // of the load are left, and the load costs what the image does.
            ensure!(left > 0.0, "A relies on nothing in its free pages, yet the resume zeroed every one");
        }
        report.add(format!("resume {round}: free pages left as found"), left, "pages");
        report.add(format!("resume {round}: pages zeroed"), loaded.get("pages_zeroed")?, "pages");
        report.add(format!("resume {round}: one pass over memory (load)"), loaded.get("resume_load_ms")?, "ms");
        let (helped, own) = (loaded.get("jobs_helped")?, loaded.get("jobs_own")?);
        if machine.cpus > 1 && !one_cpu {
            // The other CPUs took their share of the checks and decoding.
            ensure!(helped > 0.0, "{} CPUs, yet the resume's jobs all ran on one ({own} jobs)", machine.cpus);
        }
        report.add(format!("resume {round}: jobs on the other CPUs"), helped, "jobs");
        report.add(format!("resume {round}: jobs on the loading CPU"), own, "jobs");
        let jump = vm.expect("ksave: resume: jumping to the saved kernel", 300 * SECOND)?;
        let running = vm.expect("ksave: resumed from the image", 60 * SECOND)?;
        if uefi {
            vm.expect("ksave-test: ACPI NVS restored", 300 * SECOND)?;
        }
        let back = vm.expect(&format!("ksave-test: resumed ({round})"), 300 * SECOND)?;
        report.add_ms(format!("resume {round}: power-on to the jump into A"), jump.at);
        report.add_ms(format!("resume {round}: power-on to A running"), running.at);
        report.add_ms(format!("resume {round}: power-on to A checked and running"), back.at);
        if rounds == 1 {
            // A has checked everything and goes on to hibernate again: the
            // story ends here (the VM is stopped when dropped).
            vm.refute_seen("CPU exception")?;
            break;
        }
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
