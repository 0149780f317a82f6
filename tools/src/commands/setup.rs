//! `ksave setup`: choose the partition images go to.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail, ensure};
use diskdrv::part::Guid;
use ksave_tools::setup::{self, Setup};
use ksave_tools::sys;

/// What the Debian package installs for initramfs-tools (dist/mkdeb.sh).
const INITRAMFS_HOOK: &str = "/usr/share/initramfs-tools/hooks/ksave";

pub fn run(partition: Option<PathBuf>, partuuid: Option<String>, lz4: bool, elf: PathBuf, no_precheck: bool) -> Result<ExitCode> {
    let part = match (partition, partuuid) {
        (Some(dev), _) => sys::partition_info(&dev)?,
        (_, Some(text)) => sys::partition_by_guid(Guid::try_parse(&text).ok().with_context(|| format!("{text} is not a GUID"))?)?,
        _ => unreachable!("clap requires one"),
    };
    // ksave drives the disk itself: refuse now what it could not reach at
    // the jump.
    let disk_name = part.disk.file_name().context("odd disk path")?.to_string_lossy().to_string();
    let controller = sys::controller_of(std::path::Path::new("/sys"), &disk_name)?;
    let Some(kind) = controller.kind else {
        bail!("{} is on {disk_name} behind {controller}, which ksave cannot drive (it drives AHCI, IDE, NVMe and virtio-blk)", part.device.display());
    };
    ensure!(elf.exists(), "{} does not exist (--elf)", elf.display());
    let setup = Setup::new(&part, lz4, elf);
    if !no_precheck {
        super::precheck(&setup)?;
    }
    setup.save(&setup::path())?;
    println!(
        "ksave: images go to {} (PARTUUID {}, LBA {}, {} MiB) on {} ({} {}); recorded in {}",
        part.device.display(),
        part.guid,
        part.first_lba,
        part.sectors / 2048,
        part.disk.display(),
        kind.name(),
        controller.address,
        setup::path().display()
    );
    if let Some(note) = sys::free_pages_note() {
        println!("ksave: note: {note}");
    }
    // Installed from the package, the initramfs resumes: it must carry this
    // setup, so build it again now rather than leave a step to remember.
    if std::path::Path::new(INITRAMFS_HOOK).exists() {
        println!("ksave: updating the initramfs (update-initramfs -u), which resumes from this partition");
        let status = std::process::Command::new("update-initramfs").arg("-u").status().context("running update-initramfs")?;
        ensure!(status.success(), "update-initramfs -u failed ({status}): the next boot would not resume an image");
    }
    Ok(ExitCode::SUCCESS)
}
