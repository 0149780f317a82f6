//! ksave's disk drivers on QEMU's real controllers: the self-test and
//! injected I/O errors.

use anyhow::{Context, Result, ensure};

use super::{Report, SECOND};
use crate::disk::{Bus, PART_FIRST_LBA, PART_GUID, TestDisk};
use crate::{Vm, VmConfig, build_input};

pub(super) fn ksave_with_disk(name: &str, append: &str, disk: &TestDisk, bus: Bus, blkdebug: Option<&str>, echo: bool) -> Result<Vm> {
    let elf = build_input("ksave.elf")?;
    let config = VmConfig::new(name).arg(["-kernel".to_string(), elf.display().to_string(), "-append".into(), append.into()]).arg(disk.qemu_args(bus, blkdebug));
    Vm::start(VmConfig { echo, ..config })
}

/// ksave's disk self-test: find the partition by GUID on a disk at `bus`,
/// write the pattern over it with `ide_mode` ("dma"/"pio"), read it back and
/// verify; the host then checks the image file byte for byte.
pub fn disk_self_test(bus: Bus, ide_mode: &str, echo: bool) -> Result<Report> {
    let name = format!("disk-selftest-{bus:?}-{ide_mode}").to_lowercase();
    let disk = TestDisk::create_on(bus, &name, 64, 8)?;
    let append = format!("ksave.selftest=disk ksave.part={PART_GUID} ksave.ide={ide_mode}");
    let mut vm = ksave_with_disk(&name, &append, &disk, bus, None, echo)?;
    let mut report = Report::new(&format!("disk self-test, {bus:?} ({ide_mode}), 8 MiB partition"));
    let found = vm.expect("has the partition", 30 * SECOND)?;
    ensure!(found.text.contains(bus.ksave_name()), "partition found at the wrong place: {}", found.text);
    vm.expect("disk test: PASS", 120 * SECOND)?;
    let rates = vm.expect_metrics("write_mb_s", 5 * SECOND)?;
    vm.expect_exit(33, 10 * SECOND)?;
    disk.check_self_test_pattern().context("checking the disk image on the host")?;
    report.add("write", rates.get("write_mb_s")?, "MB/s");
    report.add("read and verify", rates.get("read_verify_mb_s")?, "MB/s");
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
    ensure!(failed.text.contains(bus.ksave_error(iotype == "write")), "not the clear {iotype} error expected: {}", failed.text);
    // The failing command is the 1 MiB chunk holding the bad sector.
    let chunk_start = PART_FIRST_LBA + (bad_sector - PART_FIRST_LBA) / 2048 * 2048;
    ensure!(failed.text.contains(&format!("LBA {chunk_start}:")), "wrong LBA reported: {}", failed.text);
    vm.expect_exit(35, 10 * SECOND)?;
    disk.check_outside_unchanged()?;
    report.add_ms("QEMU start to the error report", failed.at);
    Ok(report)
}

/// The disk self-test overwrites its whole partition, so it refuses one
/// that is not provably a spare store of ksave's: a partition of another
/// type (retyped Linux data), and ksave's own while it holds a complete
/// image still to be resumed. Not a byte of the disk changes.
pub fn disk_test_refuses_what_is_not_a_spare_store(echo: bool) -> Result<Report> {
    use ksave_format::header::{Header, State};
    use std::process::Command;
    let mut report = Report::new("the disk self-test refuses a partition not ksave's, and ksave's holding an image");
    let name = "disk-selftest-refusals";
    let disk = TestDisk::create(name, 64, 8)?;
    let retype = |code: &str| -> Result<()> {
        let out = Command::new("sgdisk").arg(format!("--typecode=1:{code}")).arg(&disk.path).output()?;
        ensure!(out.status.success(), "sgdisk --typecode: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    let mut selftest_refuses = |case: &str, why: &str| -> Result<()> {
        let before = std::fs::read(&disk.path)?;
        let append = format!("ksave.selftest=disk ksave.part={PART_GUID}");
        let mut vm = ksave_with_disk(&format!("{name}-{case}"), &append, &disk, Bus::Ahci, None, echo)?;
        let refused = vm.expect("disk test: FAILED: refused to write partition", 60 * SECOND)?;
        ensure!(refused.text.contains(why), "refused, but not because {why}: {}", refused.text);
        vm.expect_exit(35, 10 * SECOND)?;
        ensure!(std::fs::read(&disk.path)? == before, "the disk changed");
        report.add_ms(format!("{case}: QEMU start to the refusal"), refused.at);
        Ok(())
    };
    retype("0FC63DAF-8483-4772-8E79-3D69D8477DE4")?;
    selftest_refuses("linux-data", "its type is not ksave's store type")?;
    retype(&diskdrv::part::KSAVE_STORE_TYPE.to_string())?;
    {
        use std::os::unix::fs::FileExt;
        let mut page = [0u8; ksave_format::PAGE];
        Header::new(State::Complete, 0x5eed).encode(&mut page);
        std::fs::OpenOptions::new().write(true).open(&disk.path)?.write_all_at(&page, PART_FIRST_LBA * 512)?;
    }
    selftest_refuses("complete-image", "it holds a complete image")?;
    Ok(report)
}
