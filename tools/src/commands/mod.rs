//! One module a command; what two commands share is here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, ensure};
use ksave_format::PAGE;
use ksave_tools::imagefile::ImageFile;
use ksave_format::store::Claimed;
use ksave_tools::filestore;
use ksave_tools::setup::{FileStore, Setup};
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
        Command::Setup { file: Some(file), size, lz4, elf, no_precheck, allow_plaintext, uefi, .. } => {
            setup::run_file(&file, size.as_deref(), lz4, elf, &setup::How { no_precheck, claim: false, yes: false, allow_plaintext, uefi })
        }
        Command::Setup { partition, partuuid, lz4, elf, no_precheck, claim, yes, allow_plaintext, uefi, .. } => {
            setup::run(partition, partuuid, lz4, elf, &setup::How { no_precheck, claim, yes, allow_plaintext, uefi })
        }
        Command::Load { kexec_tools } => load::run(kexec_tools),
        Command::Hibernate { poweroff: _, snapshot, then_suspend, suspend_first, kexec_tools, all_pages, drop_caches, no_precheck, one_cpu, selftest_fault_in_save } => {
            let how = hibernate::How { snapshot, then_suspend, suspend_first, kexec_tools, all_pages, drop_caches, no_precheck, one_cpu, selftest_fault_in_save };
            hibernate::run(&how)
        }
        Command::Resume { partuuid, elf, file_at, key_at, or_invalidate } => resume::run(partuuid, elf, file_at, key_at, or_invalidate),
        Command::CanHibernate => status::can_hibernate(),
        Command::Status { path, json } => status::run(path, json),
        Command::Inspect { path, json, free_runs } => inspect::run(&path, json, free_runs.as_deref()),
        Command::Verify { path } => verify::run(&path),
        Command::Invalidate { path, partuuid, reason } => invalidate::run(path, partuuid, reason),
        Command::Export { elf, path, force } => export::run(&elf, &path, force),
        Command::Image { elf, kexec_args } => image::run(&elf, kexec_args),
    }
}

/// The image at `path`, or in the store `ksave setup` recorded.
fn open_store(path: Option<PathBuf>, write: bool) -> Result<ImageFile> {
    let setup = Setup::load(&ksave_tools::setup::path());
    match (path, setup) {
        // The image file set up: through its partition and map, as ksave
        // reads it (on an encrypted volume the map lies under dm-crypt, and
        // the key block is the setup's).
        (Some(p), Ok(setup)) if setup.file.as_ref().is_some_and(|f| same_file(&f.path, &p)) => ImageFile::open_setup(&setup, write),
        (Some(p), _) => ImageFile::open(&p, write),
        (None, setup) => ImageFile::open_setup(&setup?, write),
    }
}

/// Destroys an encrypted store's key block if it holds that store's key
/// (`claim`), and says what happened.
fn forget_key(volume: &ksave_tools::setup::KeyVolume, claim: [u8; 16]) -> String {
    use ksave_tools::keyblock::Destroyed;
    match ksave_tools::keyblock::destroy(volume, claim) {
        Ok(Destroyed::Key) => "ksave: the key block is destroyed".into(),
        Ok(Destroyed::NoKey) => "ksave: the key block holds no key".into(),
        Ok(Destroyed::NotOurs) => format!("ksave: what lies at the key block's place ({}:{}) is not this store's key block: left alone", volume.dm_uuid, volume.at),
        Err(e) => format!("ksave: the key block is left ({e:#}); the image is invalidated all the same"),
    }
}

/// Whether `a` and `b` name the same file.
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Before every jump: the partition set up is still ksave's store alone:
/// nothing else has it (mounted, swap, holders, a signature, its type), and
/// its header still carries the claim setup wrote (a file system made on it
/// since breaks the header). ksave checks the claim again before it writes
/// (--no-precheck leaves that to it, for its tests). A file store: see
/// [`check_file_store`], which nothing skips.
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
    if let Some(file) = &setup.file {
        return check_file_store(setup, &part, file);
    }
    let claimed = ksave_tools::store::check_claim(&part, &setup.claim);
    let why = ksave_tools::store::refusals(&part, &ksave_tools::store::occupants(&part)?, false, claimed.is_ok());
    ensure!(why.is_empty(), "{} is no longer ksave's store alone, refusing to write it:\n  {}", part.device.display(), why.join("\n  "));
    claimed.map(|_| ())
}

/// Before every jump, for a file store: it is still immutable, its blocks
/// are where its map says (FIEMAP and the layers below, derived again), the
/// map on the disk is the one setup wrote, and the image header in the file
/// carries the claim.
fn check_file_store(setup: &Setup, part: &sys::PartInfo, file: &FileStore) -> Result<()> {
    let path = file.path.display();
    let again = format!("run `ksave setup --file {path}` again");
    ensure!(filestore::is_immutable(&file.path).with_context(|| format!("{path}"))?, "{path} is no longer immutable (chattr -i): it may have been written or moved since setup; {again}");
    let located = filestore::locate(&file.path)?;
    ensure!(located.partition.guid == setup.guid, "{path} is in {} (PARTUUID {}) now, not in the partition set up: {again}", located.partition.device.display(), located.partition.guid);
    ensure!(
        located.volume.as_ref().map(|v| &v.dm_uuid) == file.key.as_ref().map(|k| &k.dm_uuid),
        "{path} lies {} now, not as set up: {again}",
        located.volume.as_ref().map_or("on no encrypted volume".into(), |v| format!("on the encrypted volume {}", v.dm_uuid))
    );
    let (_, crc) = filestore::encode_map(&located.extents, setup.claim.id, file.key.is_some());
    ensure!(
        crc == file.map_crc && located.extents.first().map(|e| e.offset) == Some(file.map_offset),
        "{path}'s blocks moved since setup ({} extents now, not those of its map): writing the old ones would overwrite other data; {again}",
        located.extents.len()
    );
    let mut image = ImageFile::open_setup(setup, false)?;
    let mut block = [0u8; PAGE];
    ksave_format::reader::Source::read_at(&mut image, 0, &mut block).with_context(|| format!("reading {}", image.description))?;
    Claimed::check(&block, part.disk_guid.to_bytes(), &setup.claim).map_err(|e| anyhow::anyhow!("{}: {e}; refusing to write it", image.description))?;
    Ok(())
}

/// RAM a driver added (virtio-mem, dax/kmem, CXL), said for the user: no
/// image can hold it (sys::ram_outside_firmware_map), so a hibernate is
/// refused while there is any, --no-precheck or not.
fn driver_ram() -> Result<Option<String>> {
    let unlisted = sys::ram_outside_firmware_map()?;
    Ok(unlisted.first().map(|(r, name)| {
        format!(
            "{name} at {:#x}-{:#x} ({} MiB{}) is RAM a driver added, which the firmware map does not list: ksave can neither save it nor restore into it at the next boot. Unplug it first (virtio-mem: the host sets the device's requested-size to 0)",
            r.start,
            r.end,
            (r.end - r.start) >> 20,
            if unlisted.len() > 1 { format!(", and {} more ranges", unlisted.len() - 1) } else { String::new() }
        )
    }))
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
    if let Some(what) = driver_ram()? {
        println!("ksave: note: {what}: `ksave hibernate` refuses while it is there");
    }
    let pages: u64 = sys::ram_ranges()?.iter().map(|r| r.pages().count() as u64).sum();
    let sealed = setup.file.as_ref().is_some_and(|f| f.key.is_some());
    let worst = ksave_format::writer::worst_case_bytes(pages, sealed);
    let bytes = if setup.file.is_some() { ImageFile::open_setup(setup, false)?.bytes() } else { setup.sectors * 512 };
    // Smaller than the worst case is allowed (a used system saves far less
    // than its RAM): ksave counts what a save needs before it writes, and
    // refuses one that does not fit. Too small for even the image's own
    // structures is no store.
    let least = ksave_format::writer::bytes_at_most(0, 0, 0, sealed) + (1 << 20);
    ensure!(bytes >= least, "{} holds {} KiB, too small for any image", setup.describe(), bytes >> 10);
    if worst > bytes {
        println!(
            "ksave: note: {} holds {} MiB, less than the worst case for this machine's {} MiB of RAM ({} MiB): a save that needs more is refused before it writes",
            setup.describe(),
            bytes >> 20,
            (pages * PAGE as u64) >> 20,
            worst.div_ceil(1 << 20)
        );
    }
    Ok(())
}
