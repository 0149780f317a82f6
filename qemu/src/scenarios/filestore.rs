//! The image in a file (`ksave setup --file`): the whole story on ext4,
//! with the file deliberately fragmented, and on XFS on LVM; resumed once
//! by kernel C and once by QEMU `-kernel` with `ksave.file=`.

use anyhow::{Context, Result, ensure};

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
}

impl FileFs {
    fn arg(self) -> &'static str {
        match self {
            Self::Ext4Fragmented => "ext4",
            Self::XfsOnLvm => "xfs-lvm",
            Self::Btrfs => "btrfs",
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
        vm = Vm::start(VmConfig { echo, ..machine.apply(resume)? })?;
        vm.expect("ksave:   image file:", 300 * SECOND)?;
        let jump = vm.expect("ksave: resume: jumping to the saved kernel", 300 * SECOND)?;
        let back = vm.expect(&format!("ksave-test: resumed ({round})"), 300 * SECOND)?;
        let by = if round == 1 { "kernel C" } else { "multiboot" };
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
