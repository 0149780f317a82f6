//! One module a command; what two commands share is here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, ensure};
use ksave_format::PAGE;
use ksave_tools::setup::Setup;
use ksave_tools::sys;

use crate::cli::Command;

mod export;
mod hibernate;
mod image;
mod inspect;
mod invalidate;
mod load;
mod resume;
mod setup;
mod show;
mod status;
mod verify;

/// Runs one command.
pub fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Setup { partition, partuuid, lz4, elf, no_precheck, claim, yes } => setup::run(partition, partuuid, lz4, elf, &setup::How { no_precheck, claim, yes }),
        Command::Load { kexec_tools } => load::run(kexec_tools),
        Command::Hibernate { poweroff: _, snapshot, kexec_tools, all_pages, drop_caches, no_precheck, selftest_fault_in_save } => {
            let how = hibernate::How { snapshot, kexec_tools, all_pages, drop_caches, no_precheck, selftest_fault_in_save };
            hibernate::run(&how)
        }
        Command::Resume { partuuid, elf, or_invalidate } => resume::run(partuuid, elf, or_invalidate),
        Command::Status { path, json } => status::run(path, json),
        Command::Inspect { path, json, free_runs } => inspect::run(&path, json, free_runs.as_deref()),
        Command::Verify { path } => verify::run(&path),
        Command::Invalidate { path, partuuid, reason } => invalidate::run(path, partuuid, reason),
        Command::Export { elf, path, force } => export::run(&elf, &path, force),
        Command::Image { elf, kexec_args } => image::run(&elf, kexec_args),
    }
}

/// `path`, or the partition `ksave setup` recorded.
fn path_or_setup(path: Option<PathBuf>) -> Result<PathBuf> {
    match path {
        Some(p) => Ok(p),
        None => Ok(Setup::load(&ksave_tools::setup::path())?.device),
    }
}

/// Before every jump: the partition set up is still ksave's store alone:
/// nothing else has it (mounted, swap, holders, a signature, its type), and
/// its header still carries the claim setup wrote (a file system made on it
/// since breaks the header). ksave checks the claim again before it writes
/// (--no-precheck leaves that to it, for its tests).
fn check_store(setup: &Setup) -> Result<()> {
    // ksave finds it by its GUID: on exactly one disk (a clone attached
    // since setup would make it guess), and where setup saw it.
    let part = sys::partition_by_guid(setup.guid).context("the partition set up")?;
    ensure!(
        part.device == setup.device,
        "PARTUUID {} is {} now, {} when set up: run `ksave setup` again",
        setup.guid,
        part.device.display(),
        setup.device.display()
    );
    let claimed = ksave_tools::store::check_claim(&part, &setup.claim);
    let why = ksave_tools::store::refusals(&part, &ksave_tools::store::occupants(&part)?, false, claimed.is_ok());
    ensure!(why.is_empty(), "{} is no longer ksave's store alone, refusing to write it:\n  {}", part.device.display(), why.join("\n  "));
    claimed.map(|_| ())
}

/// The host's own checks before a jump: the partition is still the one set
/// up, and it holds the worst case for this machine's RAM.
fn precheck(setup: &Setup) -> Result<()> {
    let part = sys::partition_info(&setup.device).with_context(|| format!("the configured partition {}", setup.device.display()))?;
    ensure!(
        part.guid == setup.guid && part.first_lba == setup.first_lba && part.sectors == setup.sectors,
        "{} is no longer the partition set up (PARTUUID {} LBA {}+{}, now {} {}+{}): run `ksave setup` again",
        setup.device.display(),
        setup.guid,
        setup.first_lba,
        setup.sectors,
        part.guid,
        part.first_lba,
        part.sectors
    );
    let unlisted = sys::ram_outside_firmware_map()?;
    if let Some((r, name)) = unlisted.first() {
        anyhow::bail!(
            "{name} at {:#x}-{:#x} ({} MiB{}) is RAM the firmware map does not list (added by a driver: virtio-mem, dax/kmem, CXL): ksave would neither save nor restore it. Take it offline or unplug it first",
            r.start,
            r.end,
            (r.end - r.start) >> 20,
            if unlisted.len() > 1 { format!(", and {} more ranges", unlisted.len() - 1) } else { String::new() }
        );
    }
    let pages: u64 = sys::ram_ranges()?.iter().map(|r| r.pages().count() as u64).sum();
    let worst = ksave_format::writer::worst_case_bytes(pages);
    ensure!(
        worst <= setup.sectors * 512,
        "{} holds {} MiB, an image of this machine's {} MiB of RAM may need {} MiB",
        setup.device.display(),
        setup.sectors / 2048,
        (pages * PAGE as u64) >> 20,
        worst.div_ceil(1 << 20)
    );
    Ok(())
}
