//! `ksave setup`: choose the partition images go to.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail, ensure};
use diskdrv::part::{Guid, KSAVE_STORE_TYPE};
use ksave_tools::setup::{self, Setup};
use ksave_tools::{store, sys};

/// What the Debian package installs for initramfs-tools (dist/mkdeb.sh).
const INITRAMFS_HOOK: &str = "/usr/share/initramfs-tools/hooks/ksave";

/// How setup goes about it.
pub struct How {
    /// Skip the size check (tests of ksave's own).
    pub no_precheck: bool,
    /// Set the partition's type to ksave's store.
    pub claim: bool,
    /// Without asking.
    pub yes: bool,
}

pub fn run(partition: Option<PathBuf>, partuuid: Option<String>, lz4: bool, elf: PathBuf, how: &How) -> Result<ExitCode> {
    if let Some(why) = sys::lockdown() {
        bail!("{why}");
    }
    let mut part = match (partition, partuuid) {
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
    // Nothing else may have it: refuse with everything found. A store that
    // carries a claim of this disk already (set up again) may hold an image.
    let existing = store::read_header(&part.device)?.map(|h| h.claim).filter(|c| c.is_claimed() && c.disk == part.disk_guid.to_bytes());
    let why = store::refusals(&part, &store::occupants(&part)?, how.claim, existing.is_some());
    if !why.is_empty() {
        bail!("{} cannot be ksave's store (its next image would overwrite what is there):\n  {}", part.device.display(), why.join("\n  "));
    }
    // Every check that can still refuse, before the partition table changes.
    ensure!(elf.exists(), "{} does not exist (--elf)", elf.display());
    if !how.no_precheck {
        super::precheck(&Setup::new(&part, Default::default(), lz4, elf.clone()))?;
    }
    if how.claim && part.type_guid != KSAVE_STORE_TYPE {
        let question = format!(
            "change the partition type of {} (partition {} of {}) from {} to ksave's store {}",
            part.device.display(),
            part.number,
            part.disk.display(),
            part.type_guid,
            KSAVE_STORE_TYPE
        );
        ensure!(how.yes || confirm(&question)?, "not changed: {question} was declined");
        println!("ksave: {question}");
        store::set_store_type(&part)?;
        part = sys::partition_info(&part.device)?;
        ensure!(part.type_guid == KSAVE_STORE_TYPE, "{} is still of type {} after sfdisk", part.device.display(), part.type_guid);
    }
    // The claim: the one already on the store if it names this disk (set
    // up again), else a new one.
    let claim = match existing {
        Some(claim) => claim,
        None => store::new_claim(part.disk_guid)?,
    };
    let setup = Setup::new(&part, claim, lz4, elf);
    if existing.is_none() {
        store::write_claim(&part.device, claim)?;
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
        // Every installed kernel's (-k all): an older kernel picked at boot
        // without this setup would mount the root under a valid image.
        // Kernels installed later get the hook from their own postinst.
        println!("ksave: updating every installed kernel's initramfs (update-initramfs -u -k all), which resumes from this partition");
        let status = std::process::Command::new("update-initramfs").args(["-u", "-k", "all"]).status().context("running update-initramfs")?;
        ensure!(status.success(), "update-initramfs -u -k all failed ({status}): a boot could leave an image stale");
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks `question` on the terminal; only "y" or "yes" is yes. Without a
/// terminal nothing is changed: --yes says so on the command line.
fn confirm(question: &str) -> Result<bool> {
    use std::io::{BufRead, IsTerminal, Write};
    ensure!(std::io::stdin().is_terminal(), "--claim would {question}: give --yes as well to do that without a terminal to ask on");
    print!("ksave: {question}? [y/N] ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes"))
}
