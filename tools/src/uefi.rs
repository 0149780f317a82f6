//! ksave.efi on the installed system (docs/UEFI.md): its copy in the EFI
//! system partition and its boot entry (`ksave setup --uefi`), why that
//! cannot work on a machine, and the reason ksave.efi kept in a firmware
//! variable when it did not resume.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::filestore::set_immutable;
use crate::mounts::{self, Mount};
use crate::sys;

/// efivarfs: a file per variable, NAME-VENDORGUID, its first 4 bytes the
/// attributes.
const EFIVARS: &str = "/sys/firmware/efi/efivars";
/// EFI_GLOBAL_VARIABLE (UEFI 2.10, 3.3): SecureBoot.
const GLOBAL: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
/// ksave's own variables' vendor GUID (src/efi.rs, VENDOR).
pub const VENDOR: &str = "6b5f3a1e-8c1d-4e0f-9b7a-5d2c4e6f8a01";
/// The boot entry's label: setup replaces entries so labelled, and the
/// package's removal deletes them (dist/maintscript.sh).
pub const LABEL: &str = "ksave";
/// Where the package installs ksave.efi (dist/stage.sh).
pub const INSTALLED: &str = "/usr/lib/ksave/ksave.efi";
/// ksave.efi in the ESP, as the firmware names it.
const LOADER: &str = "\\EFI\\ksave\\ksave.efi";

/// The variable `name` of `vendor`, without its attributes.
fn variable(name: &str, vendor: &str) -> Option<Vec<u8>> {
    let bytes = std::fs::read(Path::new(EFIVARS).join(format!("{name}-{vendor}"))).ok()?;
    bytes.get(4..).map(<[u8]>::to_vec)
}

/// The EFI system partition, mounted where distributions mount it.
pub fn esp() -> Option<Mount> {
    mounts::all().into_iter().find(|m| (m.point == Path::new("/boot/efi") || m.point == Path::new("/efi")) && m.fstype == "vfat")
}

/// Why `ksave setup --uefi` cannot work on this machine, if it cannot.
pub fn why_not() -> Option<String> {
    if !Path::new("/sys/firmware/efi").exists() {
        return Some("this system was not started by UEFI firmware".into());
    }
    if !mounts::all().iter().any(|m| m.fstype == "efivarfs") {
        return Some(format!("efivarfs is not mounted at {EFIVARS}: the boot entry cannot be made"));
    }
    if variable("SecureBoot", GLOBAL).is_some_and(|v| v.first() == Some(&1)) {
        return Some(
            "Secure Boot is on: the firmware starts only signed images, and ksave.efi is not signed (the initramfs resumes instead; a kernel in lockdown cannot hibernate with ksave anyway)"
                .into(),
        );
    }
    let encrypted = sys::encryption_in_use();
    if !encrypted.is_empty() {
        return Some(format!(
            "this machine encrypts {}: its images are sealed, and only the initramfs, once the volume is unlocked, can resume them (ksave.efi would refuse every one)",
            encrypted.join(" and ")
        ));
    }
    if !sys::on_path("efibootmgr") {
        return Some("efibootmgr is not installed: it makes the boot entry".into());
    }
    if esp().is_none() {
        return Some("no EFI system partition (vfat) is mounted at /boot/efi or /efi".into());
    }
    if !Path::new(INSTALLED).exists() {
        return Some(format!("{INSTALLED} is missing (ksave's package installs it)"));
    }
    None
}

/// The disk and partition number of the block device "major:minor".
fn disk_and_partition(dev: &str) -> Result<(PathBuf, u32)> {
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{dev}")).with_context(|| format!("no block device {dev}"))?;
    let number = std::fs::read_to_string(sys.join("partition")).with_context(|| format!("{} is not a partition", sys.display()))?;
    let disk = sys.parent().and_then(Path::file_name).context("the partition's disk")?;
    Ok((Path::new("/dev").join(disk), number.trim().parse()?))
}

/// The distribution's loader on the ESP, which ksave.efi starts when it
/// does not resume: shim if there is one (Secure Boot's chain), else GRUB.
fn next_loader(esp: &Path) -> Option<String> {
    let mut vendors: Vec<_> = std::fs::read_dir(esp.join("EFI")).ok()?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    vendors.sort();
    ["shimx64.efi", "grubx64.efi"].iter().find_map(|loader| {
        vendors
            .iter()
            .filter(|v| !v.eq_ignore_ascii_case("ksave") && !v.eq_ignore_ascii_case("boot"))
            .find(|v| esp.join("EFI").join(v).join(loader).is_file())
            .map(|v| format!("\\EFI\\{v}\\{loader}"))
    })
}

/// The boot entries labelled [`LABEL`], by number, from `efibootmgr`'s
/// listing ("Boot0003* ksave", a tab and the path after it from v18).
pub fn entries(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("Boot")?;
            let (number, label) = rest.split_at_checked(4)?;
            let label = label.strip_prefix('*').unwrap_or(label).strip_prefix(' ')?;
            let label = label.split('\t').next()?.trim_end();
            (number.chars().all(|c| c.is_ascii_hexdigit()) && label == LABEL).then(|| number.to_string())
        })
        .collect()
}

fn efibootmgr(args: &[&str]) -> Result<String> {
    let out = Command::new("efibootmgr").args(args).output().context("running efibootmgr")?;
    ensure!(out.status.success(), "efibootmgr {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Puts ksave.efi into the ESP and makes its boot entry, first in
/// `BootOrder`, with `resume_args` (and the next loader) as its load
/// options; any older ksave entry goes. Returns the options.
pub fn install(resume_args: &str) -> Result<String> {
    if let Some(why) = why_not() {
        bail!("--uefi: {why}");
    }
    let esp = esp().context("the ESP")?;
    let dir = esp.point.join("EFI").join("ksave");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join("ksave.efi.new");
    std::fs::copy(INSTALLED, &tmp).with_context(|| format!("copying {INSTALLED} into {}", dir.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join("ksave.efi"))?;
    let (disk, part) = disk_and_partition(&esp.dev)?;
    for entry in entries(&efibootmgr(&[])?) {
        efibootmgr(&["-q", "-b", &entry, "-B"])?;
    }
    let options = match next_loader(&esp.point) {
        Some(next) => format!("{resume_args} ksave.next={next}"),
        None => resume_args.to_string(),
    };
    let part = part.to_string();
    let disk = disk.display().to_string();
    // --create puts the new entry first in BootOrder; --unicode passes the
    // options as UCS-2, which ksave.efi reads (src/efi.rs).
    efibootmgr(&["-q", "--create", "--disk", &disk, "--part", &part, "--label", LABEL, "--loader", LOADER, "--unicode", &options])?;
    Ok(options)
}

/// Why ksave.efi did not resume at its last start, if it kept a reason
/// (the variable KsaveRefusal); the variable is deleted once read, so
/// each reason is told once.
pub fn take_refusal() -> Option<String> {
    let path = Path::new(EFIVARS).join(format!("KsaveRefusal-{VENDOR}"));
    let why = variable("KsaveRefusal", VENDOR)?;
    // efivarfs makes a variable it does not know immutable.
    let _ = set_immutable(&path, false);
    let _ = std::fs::remove_file(&path);
    Some(String::from_utf8_lossy(&why).trim_end_matches('\0').to_string())
}

/// Mounts efivarfs if the firmware is UEFI and nothing has (an initramfs).
pub fn mount_efivarfs() {
    if Path::new(EFIVARS).is_dir() && !mounts::all().iter().any(|m| m.fstype == "efivarfs") {
        let _ = Command::new("mount").args(["-t", "efivarfs", "efivarfs", EFIVARS]).status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ksave_entries_are_found_in_efibootmgr_listings_old_and_new() {
        let listing = "BootCurrent: 0001\nTimeout: 0 seconds\nBootOrder: 0003,0001\nBoot0001* UEFI QEMU DVD-ROM QM00003 \tPciRoot(0x0)/Pci(0x1,0x1)\nBoot0003* ksave\tHD(4,GPT,x)/File(\\EFI\\ksave\\ksave.efi)\nBoot0004 ksave\nBoot0005* ksave2\n";
        assert_eq!(entries(listing), ["0003", "0004"]);
    }
}
