//! `ksave-qemu`: runs a harness scenario with the console on the terminal.

use anyhow::{Result, bail};
use ksave_qemu::scenarios;

fn main() -> Result<()> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "demo".into());
    if which == "debian" {
        return ksave_qemu::scenarios::debian_shell();
    }
    if which == "bench-hibernation" {
        return ksave_qemu::bench::hibernation_table(1, 128);
    }
    if which == "bench-debian" {
        return ksave_qemu::bench::debian_table(bench_runs());
    }
    if which == "bench-debian-uefi" {
        return ksave_qemu::bench::debian_uefi_table(bench_runs());
    }
    if which == "bench-file" {
        return ksave_qemu::bench::file_table();
    }
    if which == "bench-encrypted" {
        return ksave_qemu::bench::encrypted_table();
    }
    if which == "bench-efi-read" {
        return ksave_qemu::bench::efi_read_table(bench_runs());
    }
    if which == "bench-resume-ram" {
        return ksave_qemu::bench::resume_by_ram_table(bench_runs(), 128);
    }
    if which == "bench-resume-cpus" {
        return ksave_qemu::bench::resume_by_cpus_table(bench_runs(), 128);
    }
    if which == "bench-disks" {
        return ksave_qemu::bench::disk_table(bench_runs(), 256);
    }
    if which == "bench" {
        let runs = bench_runs();
        ksave_qemu::bench::repeat("kexec jump round trip", runs, |echo| scenarios::kexec_round_trip(scenarios::Kernel::Linux6_12, echo))?;
        ksave_qemu::bench::disk_table(runs, 256)?;
        ksave_qemu::bench::save_table(runs)?;
        ksave_qemu::bench::hibernation_table(runs, 128)?;
        ksave_qemu::bench::resume_by_ram_table(runs, 128)?;
        ksave_qemu::bench::resume_by_cpus_table(runs, 128)?;
        ksave_qemu::bench::efi_read_table(runs)?;
        ksave_qemu::bench::file_table()?;
        ksave_qemu::bench::encrypted_table()?;
        ksave_qemu::bench::debian_table(runs)?;
        return ksave_qemu::bench::debian_uefi_table(runs);
    }
    if which == "demo" {
        // The whole story: the kexec-jump round trip, then hibernate, power
        // off and resume (twice), with every console on the terminal.
        let round_trip = scenarios::kexec_round_trip(scenarios::Kernel::Linux6_12, true)?;
        let story = scenarios::hibernate_resume(scenarios::ResumeBy::Multiboot1, 256, true)?;
        println!("\n{round_trip}\n{story}");
        println!("PASS");
        return Ok(());
    }
    let report = match which.as_str() {
        "roundtrip" => scenarios::kexec_round_trip(scenarios::Kernel::Linux6_12, true)?,
        "multiboot" => scenarios::multiboot1_boot(true)?,
        "grub" => scenarios::multiboot2_grub_boot(true)?,
        "exception" => scenarios::exception_report(true)?,
        "hibernate" => scenarios::hibernate_snapshot(scenarios::Expect::Ok, false, 256, true)?,
        "resume" => scenarios::hibernate_resume(scenarios::ResumeBy::Multiboot1, 256, true)?,
        "resume-c" => scenarios::hibernate_resume(scenarios::ResumeBy::KernelC, 256, true)?,
        "resume-grub" => scenarios::hibernate_resume(scenarios::ResumeBy::Grub, 256, true)?,
        "resume-efi" => scenarios::hibernate_resume_on(
            scenarios::Machine::qemu64(scenarios::Kernel::Linux6_12).uefi().on(ksave_qemu::disk::Bus::VirtioRootPort),
            scenarios::ResumeBy::UefiApp,
            256,
            true,
        )?,
        "grub-no-image" => scenarios::grub_no_image_boots_normally(true)?,
        "linux-hibernate" => scenarios::linux_hibernate_resume(128, true)?,
        "debian-bios" => scenarios::debian_hibernate_resume(scenarios::Firmware::Bios, true)?,
        "debian-uefi" => scenarios::debian_hibernate_resume(scenarios::Firmware::Uefi, true)?,
        "debian-stale" => scenarios::debian_stale_and_damaged_images(true)?,
        "debian-luks" => scenarios::debian_encrypted_root(true)?,
        "debian-dracut" => scenarios::debian_dracut_sleep_modes(true)?,
        "file-ext4" => scenarios::file_store_story(scenarios::FileFs::Ext4Fragmented, true)?,
        "file-xfs-lvm" => scenarios::file_store_story(scenarios::FileFs::XfsOnLvm, true)?,
        "file-btrfs" => scenarios::file_store_story(scenarios::FileFs::Btrfs, true)?,
        "encrypted" => scenarios::encrypted_store_story(true)?,
        other => bail!(
            "unknown scenario {other:?}: demo, roundtrip, multiboot, grub, exception, hibernate, resume, resume-c, resume-grub, resume-efi, grub-no-image, linux-hibernate, debian-bios, debian-uefi, debian-stale, debian-luks, debian-dracut, file-ext4, file-xfs-lvm, file-btrfs, debian, bench, bench-hibernation, bench-resume-ram, bench-resume-cpus, bench-efi-read, bench-disks, bench-file, bench-encrypted, encrypted, bench-debian or bench-debian-uefi"
        ),
    };
    println!("\n{report}");
    println!("PASS");
    Ok(())
}

/// How many times `make bench` repeats each figure: KSAVE_BENCH_RUNS, 3 by default.
fn bench_runs() -> usize {
    std::env::var("KSAVE_BENCH_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(3)
}
