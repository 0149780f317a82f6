//! `ksave setup`: choose the partition images go to.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail, ensure};
use diskdrv::part::{Guid, KSAVE_STORE_TYPE};
use ksave_format::PAGE;
use ksave_tools::imagefile::ImageFile;
use ksave_tools::setup::{self, FileStore, Setup};
use ksave_tools::{filestore, ready, store, sys, uefi};

/// How setup goes about it.
pub struct How {
    /// Skip the size check (tests of ksave's own).
    pub no_precheck: bool,
    /// Set the partition's type to ksave's store.
    pub claim: bool,
    /// Without asking.
    pub yes: bool,
    /// Take a plaintext store on a machine that encrypts its root or swap.
    pub allow_plaintext: bool,
    /// Resume straight from the firmware: ksave.efi in the ESP, with its
    /// boot entry first (docs/UEFI.md).
    pub uefi: bool,
}

/// What refuses a setup before it changes anything: lockdown, and a way
/// in (--uefi) that cannot work here.
fn refuse_early(how: &How) -> Result<()> {
    if let Some(why) = sys::lockdown() {
        bail!("{why}");
    }
    if how.uefi
        && let Some(why) = uefi::why_not()
    {
        bail!("--uefi: {why}");
    }
    Ok(())
}

/// Refuses a plaintext store on a machine that encrypts its root file
/// system or a swap, unless told: the image is all of RAM, keys included.
fn refuse_plaintext(how: &How) -> Result<()> {
    let encrypted = sys::encryption_in_use();
    if encrypted.is_empty() || how.allow_plaintext {
        return Ok(());
    }
    bail!(
        "this machine encrypts {}, and this store is not encrypted: an image there would hold all of RAM, the volume's key too, in plaintext. Put the store in a file on the encrypted root instead (`ksave setup --file /var/lib/ksave/image`: images there are sealed), or give --allow-plaintext to insist",
        encrypted.join(" and ")
    )
}

pub fn run(partition: Option<PathBuf>, partuuid: Option<String>, lz4: bool, elf: PathBuf, how: &How) -> Result<ExitCode> {
    refuse_early(how)?;
    refuse_plaintext(how)?;
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
    finish(how)
}

/// What every setup ends with: a note on free pages, the initramfs rebuilt
/// to carry the new setup, and logind told whether to offer hibernation
/// (dist/systemd/sleep-generator asks `ksave can-hibernate`).
fn finish(how: &How) -> Result<ExitCode> {
    if let Some(note) = sys::free_pages_note() {
        println!("ksave: note: {note}");
    }
    let setup = Setup::load(&setup::path())?;
    // Installed from a package, the initramfs resumes: it must carry this
    // setup, so build it again now rather than leave a step to remember.
    // The first generator whose hook is installed and whose command is
    // there, as the packages choose (dist/maintscript.sh).
    let generator = ready::INITRAMFS_GENERATORS.iter().find(|(hook, command)| Path::new(hook).exists() && sys::on_path(command[0]));
    if let Some((_, command)) = generator {
        let line = command.join(" ");
        println!("ksave: updating every installed kernel's initramfs ({line}), which resumes from this store");
        let status = std::process::Command::new(command[0]).args(&command[1..]).status().with_context(|| format!("running {line}"))?;
        ensure!(status.success(), "{line} failed ({status}): a boot could leave an image stale");
        ready::mark_resume_path(&setup).context("recording that the initramfs resumes from this setup")?;
    }
    if Path::new("/run/systemd/system").exists() {
        // The generator runs again, and logind reads what it wrote when it starts.
        for args in [&["daemon-reload"][..], &["try-restart", "systemd-logind.service"]] {
            let _ = std::process::Command::new("systemctl").args(args).status();
        }
    }
    if how.uefi {
        let options = uefi::install(&setup.resume_args())?;
        println!("ksave: ksave.efi is in the ESP, its boot entry \"{}\" first: the firmware resumes without a second kernel (options \"{options}\")", uefi::LABEL);
    }
    match ready::why_not(&setup) {
        None => println!("ksave: ready: `systemctl hibernate` (and hybrid-sleep, suspend-then-hibernate) goes through ksave"),
        Some(why) => println!("ksave: set up, but this machine cannot hibernate with ksave now: {why}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `ksave setup --file`: the image in a file (docs/FILESTORE.md). Creates
/// it (or takes one of ksave's own again), finds where it lies down to the
/// partition, writes its map and the claim into its first pages, checks
/// that writing them moved nothing, and makes it immutable.
pub fn run_file(path: &Path, size: Option<&str>, lz4: bool, elf: PathBuf, how: &How) -> Result<ExitCode> {
    refuse_early(how)?;
    ensure!(elf.exists(), "{} does not exist (--elf)", elf.display());
    ensure!(path.is_absolute(), "{}: give the file's absolute path (the initramfs and the boot entry name it)", path.display());
    let size = size.map(parse_size).transpose()?;
    let existing = if path.exists() {
        ensure!(
            filestore::is_image_file(path),
            "{} exists and is not a ksave image file (it does not begin with ksave's map): ksave would overwrite it; remove it or name another file",
            path.display()
        );
        let len = std::fs::metadata(path)?.len();
        if let Some(size) = size {
            ensure!(len == size, "{} exists with {} MiB, not {} MiB: remove it first to change its size", path.display(), len >> 20, size >> 20);
        }
        filestore::set_immutable(path, false)?;
        true
    } else {
        let size = size.unwrap_or(default_file_size()?);
        println!("ksave: creating {} ({} MiB, every block written)", path.display(), size >> 20);
        filestore::create(path, size)?;
        false
    };
    match claim_file(path, existing, lz4, elf, how) {
        Ok(()) => finish(how),
        Err(e) if !existing => {
            // Nothing of ksave's is in it yet: take it back.
            let _ = filestore::set_immutable(path, false);
            match std::fs::remove_file(path) {
                Ok(()) => Err(e.context(format!("{} removed again", path.display()))),
                Err(r) => Err(e.context(format!("{} could not be removed again ({r}): remove it by hand", path.display()))),
            }
        }
        Err(e) => {
            // Set up before: pinned again as it was.
            let _ = filestore::set_immutable(path, true);
            Err(e)
        }
    }
}

/// Half of RAM (and a MiB for the map). Linux's own default image size,
/// `image_size`, is 2/5 of RAM (kernel/power/snapshot.c), but that is what
/// Linux shrinks memory to before it saves (hibernate_preallocate_memory
/// frees page cache); ksave frees nothing unless asked (--drop-caches), so
/// it needs room for the pages in use: 31% of RAM on the Debian test
/// system in use (159 of 512 MiB, make bench). A save that needs more than
/// the file holds is refused before anything is written, and the tool says
/// what would help.
fn default_file_size() -> Result<u64> {
    let ram: u64 = sys::ram_ranges()?.iter().map(|r| r.end - r.start).sum();
    Ok((ram / 2).next_multiple_of(1 << 20) + (1 << 20))
}

/// Locates `path`, writes its map and claim, pins it, records the setup.
fn claim_file(path: &Path, existing: bool, lz4: bool, elf: PathBuf, how: &How) -> Result<()> {
    let no_precheck = how.no_precheck;
    let mut located = filestore::locate(path)?;
    if located.volume.is_none() {
        refuse_plaintext(how)?;
    }
    let part = located.partition.clone();
    let part = &part;
    let disk_name = part.disk.file_name().context("odd disk path")?.to_string_lossy().to_string();
    let controller = sys::controller_of(Path::new("/sys"), &disk_name)?;
    let Some(kind) = controller.kind else {
        bail!("{} is on {disk_name} behind {controller}, which ksave cannot drive (it drives AHCI, IDE, NVMe and virtio-blk)", path.display());
    };
    ensure!(
        located.extents.len() <= ksave_format::filemap::MAX_EXTENTS,
        "{} lies in {} pieces, ksave keeps at most {}: make it on a less fragmented file system, or smaller",
        path.display(),
        located.extents.len(),
        ksave_format::filemap::MAX_EXTENTS
    );
    // Set up again: keep the claim of this disk its image header carries
    // (it may hold an image), if the new map leaves the header where it is.
    // Read as any image file is, O_DIRECT: ksave wrote it under the file
    // system.
    let volume = located.volume.clone();
    // An encrypted store starts afresh: its old image cannot be read
    // through the file system to check it.
    let kept = if existing && volume.is_none() {
        let mut old = ImageFile::open(path, false)?;
        let in_place = old.extents()[0].lba * 512 == ksave_format::filemap::pages_for(located.extents.len()) * PAGE as u64;
        old.header().ok().map(|h| h.claim).filter(|c| in_place && c.is_claimed() && c.disk == part.disk_guid.to_bytes())
    } else {
        None
    };
    let claim = match kept {
        Some(claim) => claim,
        None => store::new_claim(part.disk_guid)?,
    };
    // Written in place, the blocks must be the ones mapped. btrfs copies a
    // NOCOW file's block on its first write after a relocation (a balance)
    // all the same: then the map is made again and written once more.
    let mut tries = 0;
    let crc = loop {
        let (map, crc) = filestore::encode_map(&located.extents, claim.id, volume.is_some());
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        match &volume {
            // Above dm-crypt: the map and the claim go where ksave reads
            // them, onto the partition under the encryption; the key block
            // (no key yet) through the volume, encrypted as the file system.
            Some(v) => {
                filestore::write_raw(&part.device, &located.extents, 0, &map)?;
                filestore::write_raw(&part.device, &located.extents, map.len() as u64 + PAGE as u64, &store::claim_header(claim))?;
                let at = v.byte_of(map.len() as u64).context("the key block is beyond the file")?;
                ksave_tools::keyblock::clear(&ksave_tools::setup::KeyVolume { dm_uuid: v.dm_uuid.clone(), at })?;
            }
            None => {
                file.write_all_at(&map, 0)?;
                if kept.is_none() {
                    file.write_all_at(&store::claim_header(claim), map.len() as u64)?;
                }
            }
        }
        file.sync_all()?;
        if let Err(e) = filestore::drop_cached_pages(&file) {
            println!("ksave: note: the image file's cached pages stay in memory until the kernel reclaims them (fadvise: {e})");
        }
        let again = filestore::locate(path)?;
        if again.extents == located.extents {
            break crc;
        }
        tries += 1;
        ensure!(tries < 3, "{}'s blocks moved each time its map was written: the file system relocates written blocks, which ksave cannot follow", path.display());
        located = again;
    };
    filestore::set_immutable(path, true)?;
    let mut setup = Setup::new(part, claim, lz4, elf);
    let key = match &volume {
        Some(v) => {
            let map_bytes = ksave_format::filemap::pages_for(located.extents.len()) * PAGE as u64;
            Some(ksave_tools::setup::KeyVolume { dm_uuid: v.dm_uuid.clone(), at: v.byte_of(map_bytes).context("the key block is beyond the file")? })
        }
        None => None,
    };
    setup.file = Some(FileStore { path: path.to_path_buf(), map_offset: located.extents[0].offset, map_crc: crc, key });
    // What ksave will read: the map through the partition, the claim.
    let mut image = ImageFile::open_setup(&setup, false)?;
    ensure!(image.header()?.claim == claim, "{}: the claim just written does not read back through the partition", image.description);
    if !no_precheck {
        super::precheck(&setup)?;
    }
    setup.save(&setup::path())?;
    let layers = if located.layers.is_empty() { String::new() } else { format!(" through {}", located.layers.join(", ")) };
    println!(
        "ksave: images go to {} ({}, {} MiB in {} extents, map at byte {}) in {}{layers} (PARTUUID {}) on {} ({} {}); recorded in {}",
        path.display(),
        located.fs,
        image.bytes() >> 20,
        located.extents.len(),
        located.extents[0].offset,
        part.device.display(),
        part.guid,
        part.disk.display(),
        kind.name(),
        controller.address,
        setup::path().display()
    );
    match &volume {
        Some(v) => println!(
            "ksave: the file lies on the encrypted volume {} ({}): every image is sealed (AES-256-GCM) under a key kept only in the store's key block there; the initramfs resumes it once the volume is unlocked",
            v.device.display(),
            v.dm_uuid
        ),
        None => println!("ksave: a bootloader resumes it with: {}", setup.resume_args()),
    }
    Ok(())
}

/// "2G", "1536M", "1073741824": bytes, whole MiB.
fn parse_size(text: &str) -> Result<u64> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let n: u64 = digits.parse().with_context(|| format!("{text} is not a size (e.g. 2G, 1536M)"))?;
    let shift = match unit.to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => bail!("{text}: unknown unit (K, M, G, T)"),
    };
    let bytes = n.checked_shl(shift).filter(|b| b >> shift == n).with_context(|| format!("{text} is too large"))?;
    ensure!(bytes >= 16 << 20 && bytes.is_multiple_of(1 << 20), "{text}: the size must be whole MiB, at least 16 MiB");
    Ok(bytes)
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

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_are_whole_mib() {
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1536M").unwrap(), 1536 << 20);
        assert_eq!(parse_size("1536MiB").unwrap(), 1536 << 20);
        assert_eq!(parse_size("1073741824").unwrap(), 1 << 30);
        assert!(parse_size("1T").is_ok());
        assert!(parse_size("8M").is_err(), "below 16 MiB");
        assert!(parse_size("100000K").is_err(), "not whole MiB");
        assert!(parse_size("2X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err(), "overflow");
    }
}
