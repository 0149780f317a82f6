//! The image in a file (`ksave setup --file`): the whole story on ext4,
//! with the file deliberately fragmented, and on XFS on LVM; resumed once
//! by kernel C and once by QEMU `-kernel` with `ksave.file=`.

use anyhow::{Context, Result, ensure};

use ksave_format::verdict::code;

use super::{Kernel, Machine, Report, SECOND, kernel_on};
use crate::disk::{Bus, TestDisk};
use crate::{Vm, VmConfig, build_input};

/// The file system the image file is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFs {
    /// ext4 on a partition, the file in hundreds of pieces; refused once
    /// it has moved.
    Ext4Fragmented,
    /// XFS on an LVM volume of two linear segments; refused once its
    /// blocks are shared by a reflink.
    XfsOnLvm,
    /// btrfs: refused on RAID1 over two devices; then on one device,
    /// refused once a balance has moved the file.
    Btrfs,
    /// XFS on the partition ([`written_since_is_refused`]).
    Xfs,
    /// btrfs on the partition alone ([`written_since_is_refused`]).
    BtrfsSingle,
}

impl FileFs {
    fn arg(self) -> &'static str {
        match self {
            Self::Ext4Fragmented => "ext4",
            Self::XfsOnLvm => "xfs-lvm",
            Self::Btrfs => "btrfs",
            Self::Xfs => "xfs",
            Self::BtrfsSingle => "btrfs-single",
        }
    }
}

/// Hibernate into a file, power off, resume (kernel C, then multiboot),
/// twice; then the refusals and the file system's own check
/// (qemu/initramfs/scenarios/file-store.sh).
pub fn file_store_story(fs: FileFs, echo: bool) -> Result<Report> {
    // 320 MiB: the file holds the worst case for it (about 330 MiB), and
    // fits a file system whose free space is half holes.
    let bus = if fs == FileFs::XfsOnLvm { Bus::Ahci } else { Bus::Virtio };
    let machine = Machine { memory_mib: 320, ..Machine::qemu64(Kernel::Linux6_12).on(bus) };
    let name = format!("file-{}", fs.arg());
    // btrfs's RAID1 needs partition 1 as its second device.
    let part_mib = if fs == FileFs::Btrfs { 256 } else { 16 };
    let disk = TestDisk::create_on(bus, &name, part_mib + 900, part_mib)?;
    let mut report = Report::new(&format!("hibernate into a file on {} ({bus:?}), power off, resume by kernel C and by multiboot", fs.arg()));
    let config = kernel_on(machine.kernel, &name, &format!("file-store ksave.fs={} ksave.memtest_mib=64", fs.arg()))?.arg(disk.qemu_args(bus, None));
    let mut vm = Vm::start(VmConfig { echo, ..machine.apply(config)? })?;
    if fs == FileFs::Btrfs {
        vm.expect("ksave-test: refused: RAID1", 300 * SECOND)?;
    }
    let setup = vm.expect("ksave-test: image file:", 600 * SECOND)?;
    // "image file: N extents; ksave.resume=GUID ksave.file=BYTES"
    let extents: f64 = setup.text.split("image file: ").nth(1).and_then(|t| t.split_whitespace().next()?.parse().ok()).context("no extent count")?;
    let resume_args = setup.text.split("; ").nth(1).context("no resume arguments")?.trim().to_string();
    let value = |key: &str| resume_args.split_whitespace().find_map(|w| w.strip_prefix(key)).map(str::to_string).with_context(|| format!("no {key} in {resume_args}"));
    let (guid, file_at) = (value("ksave.resume=")?, value("ksave.file=")?);
    report.add("image file extents", extents, "");
    if fs == FileFs::Ext4Fragmented {
        // Over 252: a map of more than one page, read through its own extents.
        ensure!(extents > 252.0, "the fragmented file has only {extents} extents");
    }
    for round in 1..=2 {
        let start = vm.expect(&format!("ksave-test: hibernating ({round})"), 600 * SECOND)?;
        vm.expect("ksave: image complete", 180 * SECOND)?;
        let saved = vm.expect_metrics("image_bytes", 5 * SECOND)?;
        vm.expect("ksave: powering off", 60 * SECOND)?;
        vm.expect_exit(0, 60 * SECOND)?;
        report.add_ms(format!("hibernate {round}: start to power-off"), vm.elapsed() - start.at);
        if round == 1 {
            // A plaintext store holds the memory as it was: the search the
            // encrypted story makes (and must come back empty) finds it here.
            let found = super::memtest_pages_on(&disk.path, 64 << 8)?;
            ensure!(found > 10_000, "only {found} of memtest's pages found in the plaintext image");
            report.add("memtest pages found in the plaintext store", found as f64, "");
        }
        report.add(format!("image {round}"), saved.get("image_bytes")? / 1048576.0, "MiB");
        let resume = if round == 1 {
            kernel_on(machine.kernel, &format!("{name}-{round}"), &format!("resume-c ksave.partuuid={guid} ksave.file={file_at}"))?
        } else {
            VmConfig::new(&format!("{name}-{round}")).arg([
                "-kernel".to_string(),
                build_input("ksave.elf")?.display().to_string(),
                "-append".into(),
                resume_args.clone(),
            ])
        }
        .arg(disk.qemu_args(bus, None));
        if round == 2 && fs == FileFs::XfsOnLvm {
            // Recorded by its own UUID, the XFS on LVM is beyond ksave's
            // reach on a bootloader start: refused, the image kept for a
            // kernel to check and resume.
            let mut refused = Vm::start(VmConfig { echo, ..machine.apply(resume)? })?;
            refused.expect_refusal(code::FILESYSTEM_UNCHECKED, 300 * SECOND).context("multiboot, an XFS on LVM recorded")?;
            refused.refute_seen("image invalidated")?;
            refused.expect_exit(39, 60 * SECOND)?;
            vm = Vm::start(VmConfig {
                echo,
                ..machine.apply(kernel_on(machine.kernel, &format!("{name}-{round}-c"), &format!("resume-c ksave.partuuid={guid} ksave.file={file_at}"))?.arg(disk.qemu_args(bus, None)))?
            })?;
        } else {
            vm = Vm::start(VmConfig { echo, ..machine.apply(resume)? })?;
        }
        vm.expect("ksave:   image file:", 300 * SECOND)?;
        let jump = vm.expect("ksave: resume: jumping to the saved kernel", 300 * SECOND)?;
        let back = vm.expect(&format!("ksave-test: resumed ({round})"), 300 * SECOND)?;
        let by = if round == 1 || fs == FileFs::XfsOnLvm { "kernel C" } else { "multiboot" };
        report.add_ms(format!("resume {round} by {by}: power-on to the jump"), jump.at);
        report.add_ms(format!("resume {round} by {by}: power-on to A checked"), back.at);
    }
    vm.expect("ksave-test: extents unchanged", 120 * SECOND)?;
    vm.expect("ksave-test: refused: no longer immutable", 120 * SECOND)?;
    let refusal = if fs == FileFs::XfsOnLvm { "shared with another file" } else { "blocks moved since setup" };
    vm.expect(&format!("ksave-test: refused: {refusal}"), 120 * SECOND)?;
    vm.expect("ksave-test: set up again: a snapshot taken and verified", 300 * SECOND)?;
    vm.expect(&format!("ksave-test: {} clean", fs.arg()), 300 * SECOND)?;
    vm.expect("KSAVE-TEST-RESULT: PASS", 60 * SECOND)?;
    vm.refute_seen("CPU exception")?;
    vm.expect_exit(0, 60 * SECOND)?;
    Ok(report)
}

/// Never after a write (issue 20): the image in a file on `fs` ([`FileFs::Xfs`]
/// on the partition, log internal, or [`FileFs::BtrfsSingle`]), hibernated
/// and resumed by kernel C (`ksave resume` and ksave both check the file
/// system: unchanged); hibernated again, and a live system mounts it
/// read-write and writes a file. ksave on a bootloader start refuses (XFS:
/// the log's head sector the freeze left is another; btrfs: the
/// generation moved) and keeps the image; so does `ksave resume` in kernel
/// C.
pub fn written_since_is_refused(fs: FileFs, echo: bool) -> Result<Report> {
    let (label, said) = match fs {
        FileFs::Xfs => ("XFS", "the XFS file system with PARTUUID"),
        FileFs::BtrfsSingle => ("btrfs", "the btrfs file system with PARTUUID"),
        _ => anyhow::bail!("no written-since story on {fs:?}"),
    };
    let machine = Machine { memory_mib: 320, ..Machine::qemu64(Kernel::Linux6_12).on(Bus::Ahci) };
    let name = format!("file-{}-written", fs.arg());
    let disk = TestDisk::create_on(machine.bus, &name, 16 + 900, 16)?;
    let mut report = Report::new(&format!("an image in a file on {label}, written by a live system: refused by ksave and by ksave resume"));
    let config = kernel_on(machine.kernel, &name, &format!("file-store ksave.fs={} ksave.memtest_mib=16", fs.arg()))?.arg(disk.qemu_args(machine.bus, None));
    let mut vm = Vm::start(VmConfig { echo, ..machine.apply(config)? })?;
    let setup = vm.expect("ksave-test: image file:", 600 * SECOND)?;
    let resume_args = setup.text.split("; ").nth(1).context("no resume arguments")?.trim().to_string();
    let value = |key: &str| resume_args.split_whitespace().find_map(|w| w.strip_prefix(key)).map(str::to_string).with_context(|| format!("no {key} in {resume_args}"));
    let (guid, file_at) = (value("ksave.resume=")?, value("ksave.file=")?);
    let kernel_c = |label: &str| -> Result<VmConfig> {
        Ok(kernel_on(machine.kernel, &format!("{name}-{label}"), &format!("resume-c ksave.partuuid={guid} ksave.file={file_at}"))?.arg(disk.qemu_args(machine.bus, None)))
    };
    for round in 1..=2 {
        vm.expect(&format!("ksave-test: hibernating ({round})"), 600 * SECOND)?;
        let recorded = vm.expect(&format!("ksave: recorded: {label} PARTUUID"), 180 * SECOND)?;
        // The file's partition (partition 2), the one the XFS is on.
        ensure!(recorded.text.to_lowercase().contains(&guid.to_lowercase()), "not the {label} of the image file recorded: {}", recorded.text);
        vm.expect("ksave: powering off", 180 * SECOND)?;
        vm.expect_exit(0, 60 * SECOND)?;
        if round == 1 {
            // Nothing wrote to it: resumed.
            vm = Vm::start(VmConfig { echo, ..machine.apply(kernel_c("1")?)? })?;
            vm.expect("ksave: resume: jumping to the saved kernel", 300 * SECOND)?;
            let back = vm.expect("ksave-test: resumed (1)", 300 * SECOND)?;
            report.add_ms(format!("resume by kernel C, the {label} unchanged: power-on to A checked"), back.at);
        }
    }
    let live = kernel_on(machine.kernel, &format!("{name}-live"), &format!("live-mount ksave.root_partuuid={}", guid.to_lowercase()))?.arg(disk.qemu_args(machine.bus, None));
    let mut vm = Vm::start(VmConfig { echo, ..machine.apply(live)? })?;
    vm.expect("ksave-test: mounted the hibernated system's root", 180 * SECOND)?;
    vm.expect("KSAVE-TEST-RESULT: PASS", 60 * SECOND)?;
    vm.expect_exit(0, 60 * SECOND)?;
    let multiboot = VmConfig::new(&format!("{name}-multiboot"))
        .arg(["-kernel".to_string(), build_input("ksave.elf")?.display().to_string(), "-append".into(), resume_args.clone()])
        .arg(disk.qemu_args(machine.bus, None));
    let mut vm = Vm::start(VmConfig { echo, ..machine.apply(multiboot)? })?;
    let refusal = vm.expect_refusal(code::FILESYSTEM_MOUNTED, 300 * SECOND).with_context(|| format!("multiboot after a live system wrote the {label}"))?;
    report.add_ms("multiboot: power-on to the refusal", refusal.at);
    vm.expect_exit(39, 60 * SECOND)?;
    let mut vm = Vm::start(VmConfig { echo, ..machine.apply(kernel_c("2")?)? })?;
    vm.expect_refusal(code::FILESYSTEM_MOUNTED, 300 * SECOND).with_context(|| format!("kernel C after a live system wrote the {label}"))?;
    vm.expect(said, 10 * SECOND)?;
    vm.refute_seen("ksave: resume: jumping to the saved kernel")?;
    Ok(report)
}

/// `make bench`: the same memory (256 MiB of memtest data in a 512 MiB VM,
/// AHCI) saved into ksave's partition and into a 1 GiB file on ext4 on the
/// same disk, in turns, three times each, each resumed by QEMU `-kernel`
/// (medians); then the time `ksave
/// hibernate` spends finding the file's blocks again, for a 1 GiB file in
/// one extent and in hundreds (qemu/initramfs/scenarios/file-bench.sh).
pub fn file_bench(echo: bool) -> Result<Report> {
    let bus = Bus::Ahci;
    let machine = Machine::qemu64(Kernel::Linux6_12).on(bus);
    let name = "bench-file";
    let part_mib = 600;
    // Every block of the disk image allocated on the host: a sparse one
    // makes the first write of a block slower than a rewrite, and the file
    // is written once by setup before ksave writes it.
    let disk = TestDisk::create_allocated(name, part_mib + 3600, part_mib)?;
    let mut report = Report::new("the same memory into ksave's partition and into a file on ext4, same disk (AHCI), resumed by QEMU -kernel");
    let config = kernel_on(machine.kernel, name, &format!("file-bench ksave.partuuid={} ksave.memtest_mib=256", crate::disk::PART_GUID))?.arg(disk.qemu_args(bus, None));
    let mut vm = Vm::start(VmConfig { echo, ..machine.apply(config)? })?;
    let setup = vm.expect("ksave-test: image file:", 600 * SECOND)?;
    let extents: f64 = setup.text.split("image file: ").nth(1).and_then(|t| t.split_whitespace().next()?.parse().ok()).context("no extent count")?;
    report.add("1 GiB file on a fresh ext4: extents", extents, "");
    let file_args = setup.text.split("; ").nth(1).context("no resume arguments")?.trim().to_string();
    let partition_args = format!("ksave.resume={}", crate::disk::PART_GUID);
    // Per store: save ms, disk ms, load ms, image bytes; three rounds each.
    let mut runs: [Vec<[f64; 4]>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=6 {
        let (store, index, args) = if round % 2 == 1 { ("partition", 0, &partition_args) } else { ("file", 1, &file_args) };
        vm.expect(&format!("ksave-test: hibernating ({round}, {store})"), 600 * SECOND)?;
        if store == "file" && round == 2 {
            report.add("1 GiB file on a fresh ext4: ksave hibernate finding its blocks", vm.expect_metrics("store_check_ms", 60 * SECOND)?.get("store_check_ms")?, "ms");
        }
        let saved = vm.expect_metrics("save_ms", 600 * SECOND)?;
        vm.expect("ksave: powering off", 60 * SECOND)?;
        vm.expect_exit(0, 60 * SECOND)?;
        let resume = VmConfig::new(&format!("{name}-{round}")).arg(["-kernel".to_string(), build_input("ksave.elf")?.display().to_string(), "-append".into(), args.clone()]);
        vm = Vm::start(VmConfig { echo, ..machine.apply(resume.arg(disk.qemu_args(bus, None)))? })?;
        let loaded = vm.expect_metrics("resume_load_ms", 300 * SECOND)?;
        runs[index].push([saved.get("save_ms")?, saved.get("disk_ms")?, loaded.get("resume_load_ms")?, saved.get("image_bytes")?]);
    }
    for (index, store) in [(0, "partition"), (1, "file")] {
        let median = |k: usize| {
            let mut v: Vec<f64> = runs[index].iter().map(|r| r[k]).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let bytes = median(3);
        report.add(format!("{store}: image (median of 3)"), bytes / 1048576.0, "MiB");
        report.add(format!("{store}: save rate (image / ksave's save time)"), bytes / 1e3 / median(0), "MB/s");
        report.add(format!("{store}: save, disk transfers alone"), bytes / 1e3 / median(1).max(1.0), "MB/s");
        report.add(format!("{store}: resume rate (image / ksave's load time)"), bytes / 1e3 / median(2).max(1.0), "MB/s");
    }
    let fragmented = vm.expect("ksave-test: fragmented file:", 900 * SECOND)?;
    let extents: f64 = fragmented.text.split("file: ").nth(1).and_then(|t| t.split_whitespace().next()?.parse().ok()).context("no extent count")?;
    report.add("fragmented 1 GiB file: extents", extents, "");
    report.add("fragmented 1 GiB file: ksave hibernate finding its blocks", vm.expect_metrics("store_check_ms", 120 * SECOND)?.get("store_check_ms")?, "ms");
    vm.expect("ksave-test: bench done", 300 * SECOND)?;
    vm.expect_exit(0, 60 * SECOND)?;
    Ok(report)
}
