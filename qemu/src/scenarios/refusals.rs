//! Restore refuses what it must, writes nothing, and the machine boots
//! normally.

use anyhow::{Context, Result, ensure};

use ksave_format::verdict::code;

use super::{Report, SECOND, grub_resume_menu, kernel_a};
use crate::disk::{Bus, PART_FIRST_LBA, PART_GUID, TestDisk};
use crate::{Vm, VmConfig};

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
    let config = kernel_a(name, &format!("hibernate ksave.partuuid={PART_GUID} ksave.memtest_mib=16 ksave.expect=ok"))?.arg(disk.qemu_args(Bus::Ahci, None));
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

    // Every refusal found before loading writes nothing: the disk is byte
    // for byte as before. A damaged chunk is found while loading (restore
    // reads the image once): that image is invalidated with the reason, and
    // only its header block changes.
    let header_block = part as usize..part as usize + 4096;
    let mut refused = |label: &str, disk: &TestDisk, memory: u32, extra: &[&str], expected: u32| -> Result<()> {
        let damaged = expected == code::DAMAGED;
        let before = std::fs::read(&disk.path)?;
        let mut vm = resume_vm(&format!("{name}-{label}"), disk, memory, extra, echo)?;
        let line = vm.expect_refusal(expected, 120 * SECOND).context(label.to_string())?;
        ensure!(line.get("memory_lost")? == damaged as u8 as f64, "{label}: this boot's memory {} given up", if damaged { "was not" } else { "was" });
        vm.expect("handing over to a normal boot", 5 * SECOND)?;
        let normal = vm.expect("ksave-test: normal boot reached userspace", 180 * SECOND)?;
        vm.expect_exit(0, 60 * SECOND)?;
        let may_change = damaged.then(|| header_block.clone());
        disk.check_unchanged_since(&before, may_change).with_context(|| format!("{label}: the refused boot wrote to the disk"))?;
        if damaged {
            let after = std::fs::read(&disk.path)?;
            let h = ksave_format::header::Header::decode(after[header_block.clone()].try_into()?).map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
            ensure!(h.state == ksave_format::header::State::Invalidated, "{label}: the damaged image was left {} ({:?})", h.state.name(), h.message());
        }
        report.add_ms(format!("{label}: power-on to refusal"), line.at);
        report.add_ms(format!("{label}: power-on to the normal boot's userspace"), normal.at);
        Ok(())
    };
    refused("bit flip", &flipped, 512, &[], code::DAMAGED)?;
    refused("truncated", &truncated, 512, &[], code::DAMAGED)?;
    refused("other -m", &disk, 384, &[], code::RAM_MAP_DIFFERS)?;
    // qemu64 reports AuthenticAMD: the image was made on "AMD".
    refused("other CPU vendor", &disk, 512, &["-cpu", "qemu64,vendor=GenuineIntel"], code::OTHER_CPU_VENDOR)?;
    // Firmware that reports other hardware: the recorded signature differs.
    let saved = header.facs_signature.context("the image records no ACPI hardware signature")?;
    let facs_changed = variant("facs", &|b| {
        let mut h = header.clone();
        h.facs_signature = Some(saved ^ 0x5a5a);
        h.encode((&mut b[part as usize..part as usize + 4096]).try_into().unwrap());
    })?;
    refused("ACPI hardware signature", &facs_changed, 512, &[], code::HARDWARE_CHANGED)?;

    // Resumed once, the image is never resumed again.
    let mut vm = resume_vm(&format!("{name}-resume"), &disk, 512, &[], echo)?;
    vm.expect("ksave: resumed from the image", 120 * SECOND)?;
    vm.expect("KSAVE-TEST-RESULT: PASS", 120 * SECOND)?;
    vm.expect_exit(0, 60 * SECOND)?;
    refused("second resume", &disk, 512, &[], code::ALREADY_RESUMED)?;

    // From kernel C: the host sees a complete image, ksave finds it damaged,
    // invalidates it and resets; the next boot of C finds nothing to resume.
    let damaged = variant("c-bitflip", &|b| b[(data + 4096 + 100) as usize] ^= 0x08)?;
    let before = std::fs::read(&damaged.path)?;
    let config = kernel_a(&format!("{name}-c"), &format!("resume-c ksave.partuuid={PART_GUID}"))?.arg(damaged.qemu_args(Bus::Ahci, None));
    let mut vm = Vm::start(VmConfig { echo, reboot: true, ..config })?;
    vm.expect("image invalidated, so no later boot tries it again", 120 * SECOND)?;
    vm.expect_refusal(code::DAMAGED, 10 * SECOND).context("kernel C")?;
    // The next boot's `ksave resume` finds it invalidated.
    vm.expect_refusal(code::ALREADY_RESUMED, 180 * SECOND).context("kernel C, the boot after")?;
    vm.expect("booting normally", 10 * SECOND)?;
    vm.expect_exit(0, 60 * SECOND)?;
    // The header block says invalidated, with the reason; nothing else moved.
    damaged.check_unchanged_since(&before, Some(header_block.clone())).context("kernel C: the refusal wrote beyond the image header")?;
    let after = std::fs::read(&damaged.path)?;
    let refused = ksave_format::header::Header::decode(after[header_block.clone()].try_into()?)
        .map_err(|e| anyhow::anyhow!("kernel C: header after the refusal: {e}"))?;
    ensure!(refused.state == ksave_format::header::State::Invalidated, "kernel C: the refused image was left {}", refused.state.name());
    ensure!(!refused.message().is_empty(), "kernel C: the invalidated header does not say why");
    report.add_ms("kernel C, damaged image: power-on to the normal boot", vm.elapsed());

    // An earlier boot handed the image to ksave, which could not finish
    // (say no disk it drives) and could not mark it: kernel C's `ksave
    // resume` finds the mark and invalidates it instead of looping.
    let attempted = variant("c-attempted", &|b| {
        let mut h = header.clone();
        h.flags |= ksave_format::header::FLAG_RESUME_ATTEMPTED;
        h.encode((&mut b[part as usize..part as usize + 4096]).try_into().unwrap());
    })?;
    let config = kernel_a(&format!("{name}-c-attempted"), &format!("resume-c ksave.partuuid={PART_GUID}"))?.arg(attempted.qemu_args(Bus::Ahci, None));
    let mut vm = Vm::start(VmConfig { echo, ..config })?;
    vm.expect_refusal(code::EARLIER_ATTEMPT_UNFINISHED, 120 * SECOND)?;
    vm.expect("booting normally", 10 * SECOND)?;
    vm.refute_seen("entered by kexec")?;
    vm.expect_exit(0, 60 * SECOND)?;
    let after = std::fs::read(&attempted.path)?;
    let h = ksave_format::header::Header::decode(after[header_block].try_into()?).map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(h.state == ksave_format::header::State::Invalidated, "the unfinished attempt's image was left {}", h.state.name());
    Ok(report)
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
    let refusal = vm.expect_refusal(code::NO_IMAGE, 120 * SECOND)?;
    vm.expect("CMOS 0x7e:0 set for the bootloader; resetting", 10 * SECOND)?;
    let normal = vm.expect("ksave-test: normal boot reached userspace", 180 * SECOND)?;
    vm.expect("KSAVE-TEST-RESULT: PASS", 30 * SECOND)?;
    vm.expect_exit(0, 60 * SECOND)?;
    report.add_ms("power-on to the refusal", refusal.at);
    report.add_ms("power-on to the normal boot's userspace", normal.at);
    Ok(report)
}
