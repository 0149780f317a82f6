//! Whether a partition may be ksave's image store, and its claim.
//!
//! `ksave setup` takes a partition only when nothing else has it: not
//! mounted, not an active swap, held by nothing (LVM, md, dm-crypt), no
//! signature libblkid knows (as `wipefs` lists them: file systems, swap,
//! LUKS, BitLocker, RAID and LVM members, partition tables), not the EFI system partition, and of
//! ksave's own partition type ([`part::KSAVE_STORE_TYPE`]). Then it writes
//! the claim ([`Claim`]) into the store's header, and every hibernate checks
//! all of it again and that the claim is still there before the jump (ksave
//! checks the claim once more before it writes).

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use diskdrv::part::{self, Guid};
use ksave_format::PAGE;
use ksave_format::header::{DATA_OFFSET, Header};
use ksave_format::store::{Claim, Claimed};

use crate::sys::PartInfo;

/// What else has, or says it has, a partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Occupants {
    /// Where it is mounted (/proc/self/mountinfo).
    pub mounts: Vec<String>,
    /// It is an active swap area (/proc/swaps).
    pub swap: bool,
    /// Devices built on it (/sys/class/block/NAME/holders: dm, md, LVM).
    pub holders: Vec<String>,
    /// The signatures libblkid finds on it ([`probe_signatures`]).
    pub signatures: Vec<Signature>,
}

/// A signature libblkid found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Signature {
    /// Its type, e.g. "ext4", "crypto_LUKS", "swap", "LVM2_member".
    pub kind: String,
    /// Its usage, e.g. "filesystem", "crypto", "raid", "partition-table".
    pub usage: String,
    /// Where its magic lies, in bytes from the partition's start.
    pub offset: Option<u64>,
}

/// Why `part` may not be ksave's store, one line each; none: it may.
/// `claiming`: the user asked to set ksave's partition type, so another
/// type is no refusal (everything else still is). `claimed`: its header
/// carries ksave's claim, so a signature whose magic lies in the image's
/// chunks (from [`DATA_OFFSET`] on: a page of RAM that held a superblock)
/// is the image's data, not another owner (one made since setup would have
/// broken the header, which its own superblock or label overlaps or which
/// mkfs zeroes).
pub fn refusals(part: &PartInfo, found: &Occupants, claiming: bool, claimed: bool) -> Vec<String> {
    let mut why = Vec::new();
    let dev = part.device.display();
    for at in &found.mounts {
        why.push(format!("{dev} is mounted at {at}"));
    }
    if found.swap {
        why.push(format!("{dev} is an active swap area (swapoff it, and take it out of /etc/fstab, first)"));
    }
    if !found.holders.is_empty() {
        why.push(format!("{dev} is in use by {} (an LVM volume, RAID array or dm-crypt mapping is built on it)", found.holders.join(", ")));
    }
    for Signature { kind, usage, offset } in &found.signatures {
        if claimed && offset.is_some_and(|at| at >= DATA_OFFSET) {
            continue;
        }
        let usage = if usage.is_empty() { String::new() } else { format!(" {usage}") };
        let at = offset.map(|o| format!(" at byte {o}")).unwrap_or_default();
        why.push(format!("{dev} holds a {kind}{usage} signature{at} (wipefs): if its data is no longer wanted, erase it with `wipefs -a {dev}` and run setup again"));
    }
    if part.type_guid == part::ESP_TYPE {
        why.push(format!("{dev} is the EFI system partition"));
    } else if part.type_guid != part::KSAVE_STORE_TYPE && !claiming {
        why.push(format!(
            "{dev} is of partition type {}, not ksave's store ({}): make it one with `ksave setup --claim` (or `sfdisk --part-type {} {} {}`)",
            part.type_guid,
            part::KSAVE_STORE_TYPE,
            part.disk.display(),
            part.number,
            part::KSAVE_STORE_TYPE
        ));
    }
    why
}

/// What the running system says has `part` (see [`Occupants`]).
pub fn occupants(part: &PartInfo) -> Result<Occupants> {
    let rdev = std::fs::metadata(&part.device).with_context(|| format!("{}", part.device.display()))?.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let dev = format!("{major}:{minor}");
    let mounts = crate::mounts::all().into_iter().filter(|m| m.dev == dev).map(|m| m.point.display().to_string()).collect();
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    // The first column of each line after the heading; a swap file's rdev
    // is 0, never a partition's.
    let swap = swaps.lines().skip(1).filter_map(|l| l.split_whitespace().next()).any(|path| std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == rdev));
    let name = part.device.file_name().context("not a device path")?;
    let holders = match std::fs::read_dir(Path::new("/sys/class/block").join(name).join("holders")) {
        Ok(dir) => dir.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().to_string())).collect(),
        Err(_) => Vec::new(),
    };
    let signatures = probe_signatures(&part.device)?;
    Ok(Occupants { mounts, swap, holders, signatures })
}

/// Every signature libblkid finds on `device`, with its offset: `wipefs`
/// without options only lists them (util-linux; where `blkid -p` reports
/// one and gives up on several, this names them all).
fn probe_signatures(device: &Path) -> Result<Vec<Signature>> {
    let out = Command::new("wipefs")
        .args(["--noheadings", "--output", "OFFSET,TYPE,USAGE"])
        .arg(device)
        .output()
        .context("running wipefs (util-linux), which ksave needs to see what is on a partition")?;
    if !out.status.success() {
        bail!("wipefs {} failed ({}): {}", device.display(), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(parse_wipefs(&String::from_utf8_lossy(&out.stdout)))
}

/// `wipefs --noheadings --output OFFSET,TYPE,USAGE` lines: "0x438 ext4
/// filesystem", "0x1fe PMBR partition-table".
fn parse_wipefs(text: &str) -> Vec<Signature> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let offset = u64::from_str_radix(words.next()?.trim_start_matches("0x"), 16).ok();
            let kind = words.next()?.to_string();
            Some(Signature { kind, usage: words.collect::<Vec<_>>().join(" "), offset })
        })
        .collect()
}

/// A new claim for a store on the disk `disk_guid`: 16 random bytes.
pub fn new_claim(disk_guid: Guid) -> Result<Claim> {
    let mut id = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|f| f.read_exact_at(&mut id, 0)).context("reading /dev/urandom")?;
    Ok(Claim { id, disk: disk_guid.to_bytes() })
}

/// The store's header block, if it holds a ksave header at all.
pub fn read_header(device: &Path) -> Result<Option<Header>> {
    Ok(Header::decode(&header_block(device)?).ok())
}

/// Proof that `part` carries `claim` in its header, read from the device.
pub fn check_claim(part: &PartInfo, claim: &Claim) -> Result<Claimed> {
    Claimed::check(&header_block(&part.device)?, part.disk_guid.to_bytes(), claim).map_err(|e| anyhow::anyhow!("{}: {e}; refusing to write it", part.device.display()))
}

/// The store's first block, where its header (and claim) lies.
fn header_block(device: &Path) -> Result<[u8; PAGE]> {
    let mut block = [0u8; PAGE];
    File::open(device).and_then(|f| f.read_exact_at(&mut block, 0)).with_context(|| format!("reading {}", device.display()))?;
    Ok(block)
}

/// The header block setup writes into a store: the claim, no image (state
/// *invalidated*).
pub fn claim_header(claim: Claim) -> [u8; PAGE] {
    let mut block = [0u8; PAGE];
    let when = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Header::claiming(claim, &format!("store claimed by ksave setup at {when} (seconds since the epoch); no image yet")).encode(&mut block);
    block
}

/// Writes `claim` into the store `device`'s header (no image: state
/// *invalidated*), and makes it durable.
pub fn write_claim(device: &Path, claim: Claim) -> Result<()> {
    let block = claim_header(claim);
    let file = std::fs::OpenOptions::new().write(true).open(device).with_context(|| format!("opening {} to write the claim", device.display()))?;
    file.write_all_at(&block, 0).and_then(|()| file.sync_all()).with_context(|| format!("writing the claim to {}", device.display()))
}

/// Sets `part`'s partition type to ksave's store (sfdisk, util-linux:
/// it rewrites both GPT copies and tells the kernel).
pub fn set_store_type(part: &PartInfo) -> Result<()> {
    let status = Command::new("sfdisk")
        .arg("--part-type")
        .arg(&part.disk)
        .arg(part.number.to_string())
        .arg(part::KSAVE_STORE_TYPE.to_string())
        .status()
        .context("running sfdisk (util-linux)")?;
    if !status.success() {
        bail!("sfdisk --part-type {} {} failed ({status})", part.disk.display(), part.number);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(type_guid: Guid) -> PartInfo {
        PartInfo {
            device: "/dev/sda2".into(),
            disk: "/dev/sda".into(),
            guid: Guid::try_parse("9B3C2C1A-5E1F-4B4A-8C6F-2A1D3E4F5A6B").unwrap(),
            first_lba: 2048,
            sectors: 1 << 20,
            number: 2,
            type_guid,
            disk_guid: Guid::ZERO,
        }
    }

    const LINUX_DATA: Guid = Guid::parse_or_panic("0FC63DAF-8483-4772-8E79-3D69D8477DE4");

    #[test]
    fn only_an_unused_partition_of_ksaves_type_is_taken() {
        assert!(refusals(&part(part::KSAVE_STORE_TYPE), &Occupants::default(), false, false).is_empty());
        // Another type: refused, unless the user asked to claim it.
        let why = refusals(&part(LINUX_DATA), &Occupants::default(), false, false);
        assert_eq!(why.len(), 1);
        assert!(why[0].contains("not ksave's store") && why[0].contains("ksave setup --claim"), "{why:?}");
        assert!(refusals(&part(LINUX_DATA), &Occupants::default(), true, false).is_empty());
        // The ESP never, claimed or not.
        assert!(refusals(&part(part::ESP_TYPE), &Occupants::default(), true, false)[0].contains("EFI system partition"));
        // A superblock inside a claimed store's chunks is image data; one in
        // its first blocks, or on a store without the claim, is not.
        let sig = |at: u64| Occupants { signatures: vec![Signature { kind: "iso9660".into(), usage: "filesystem".into(), offset: Some(at) }], ..Default::default() };
        assert!(refusals(&part(part::KSAVE_STORE_TYPE), &sig(32769), false, true).is_empty());
        assert_eq!(refusals(&part(part::KSAVE_STORE_TYPE), &sig(32769), false, false).len(), 1);
        assert_eq!(refusals(&part(part::KSAVE_STORE_TYPE), &sig(1080), false, true).len(), 1);
        // Everything in use is named, whatever the type.
        let busy = Occupants {
            mounts: vec!["/home".into()],
            swap: true,
            holders: vec!["dm-0".into()],
            signatures: vec![Signature { kind: "crypto_LUKS".into(), usage: "crypto".into(), offset: Some(0) }],
        };
        let why = refusals(&part(part::KSAVE_STORE_TYPE), &busy, true, true);
        assert_eq!(why.len(), 4, "{why:?}");
        assert!(why[0].contains("mounted at /home"));
        assert!(why[1].contains("active swap"));
        assert!(why[2].contains("in use by dm-0"));
        assert!(why[3].contains("crypto_LUKS crypto signature at byte 0") && why[3].contains("wipefs -a /dev/sda2"));
    }

    #[test]
    fn wipefs_lines_are_read() {
        let out = "0x438  ext4 filesystem\n0x1fe    PMBR partition-table\n";
        assert_eq!(
            parse_wipefs(out),
            [
                Signature { kind: "ext4".into(), usage: "filesystem".into(), offset: Some(0x438) },
                Signature { kind: "PMBR".into(), usage: "partition-table".into(), offset: Some(0x1fe) }
            ]
        );
        assert!(parse_wipefs("").is_empty());
    }
}
