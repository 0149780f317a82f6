//! What the mounted file systems say about having been mounted: recorded at
//! hibernate into the image's header ([`FsSeen`]), compared by `ksave
//! resume` before it hands the machine to ksave. A file system mounted
//! since (by a live system, another OS, or a kernel whose initramfs has no
//! ksave) has moved on from what the image's kernel holds in its memory:
//! resuming would undo those writes and corrupt it.
//!
//! Only what a mount provably changes is kept: ext2/3/4 count read-write
//! mounts and stamp the last one's time in the superblock
//! (fs/ext4/super.c, ext4_setup_super; the superblock at byte 1024,
//! `s_mtime` at 0x2C, `s_mnt_count` at 0x34, the magic 0xEF53 at 0x38).
//! A file system on a partition is found again by its PARTUUID, one on a
//! device-mapper volume (dm-crypt, LVM) by its own superblock UUID. XFS
//! keeps no mount count, and btrfs's generation moves with every
//! transaction commit, including those between the record and the jump: for
//! them no change can be proven, and the initramfs guard alone stands.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ksave_format::header::{FS_EXT4, FS_EXT4_BY_UUID, FsSeen, MAX_FILESYSTEMS, ext_mount_counters};
use ksave_format::verdict::Refusal;

use crate::mounts::{self, Mount};
use crate::sys;

/// The ext2/3/4 superblock's mount count and last mount time, read from
/// `device`; `None` if it holds no ext superblock.
pub fn ext4_mounts(device: &Path) -> Option<(u32, u64)> {
    ext_mount_counters(&superblock(device)?)
}

/// The ext2/3/4 superblock's UUID (`s_uuid`, at 0x68), read from `device`.
fn ext4_uuid(device: &Path) -> Option<[u8; 16]> {
    let sb = superblock(device)?;
    ext_mount_counters(&sb)?;
    sb[0x68..0x78].try_into().ok()
}

/// The mounted ext2/3/4 file systems on GPT partitions, as their
/// superblocks are now; and the local file systems not recorded (another
/// kind, or not on a partition with a PARTUUID), one line each, for the
/// user.
pub fn seen() -> (Vec<FsSeen>, Vec<String>) {
    let (mut seen, mut unrecorded) = (Vec::new(), Vec::new());
    let mut devices: Vec<String> = Vec::new();
    for Mount { dev, point, fstype, .. } in mounts::all() {
        let point = point.display();
        // Block devices only (major 0 is the kernel's anonymous devices:
        // tmpfs, proc, overlay; and btrfs's, named by its source), each
        // once (bind mounts).
        if devices.contains(&dev) {
            continue;
        }
        if dev.starts_with("0:") {
            if fstype == "btrfs" {
                devices.push(dev);
                unrecorded.push(format!("btrfs at {point}"));
            }
            continue;
        }
        devices.push(dev.clone());
        let Some(device) = device_of(&dev) else { continue };
        let ext = matches!(fstype.as_str(), "ext2" | "ext3" | "ext4");
        let part = sys::partition_info(&device).ok();
        // On a partition: by its PARTUUID; on a device-mapper volume
        // (dm-crypt, LVM): by the file system's own UUID.
        let dm = Path::new("/sys/dev/block").join(&dev).join("dm").exists();
        let id = match (&part, dm) {
            (Some(part), _) => Some((part.guid.to_bytes(), FS_EXT4)),
            (None, true) => ext4_uuid(&device).map(|uuid| (uuid, FS_EXT4_BY_UUID)),
            (None, false) => None,
        };
        match (ext, id, ext4_mounts(&device)) {
            (true, Some((id, kind)), Some((mounts, mounted_at))) if seen.len() < MAX_FILESYSTEMS => seen.push(FsSeen { partuuid: id, kind, mounts, mounted_at }),
            _ => unrecorded.push(format!("{fstype} on {} at {point}", device.display())),
        }
    }
    (seen, unrecorded)
}

/// /dev/NAME of the block device "major:minor".
fn device_of(dev: &str) -> Option<PathBuf> {
    let target = std::fs::read_link(Path::new("/sys/dev/block").join(dev)).ok()?;
    Some(Path::new("/dev").join(target.file_name()?))
}

/// The first file system of `recorded` that says it was mounted since:
/// found by its PARTUUID, an ext superblock with another mount count or
/// last mount time. One that cannot be found or read proves nothing (and
/// the resumed kernel will say so of its own).
pub fn mounted_since(recorded: &[FsSeen]) -> Option<Refusal> {
    recorded.iter().find_map(|fs| match fs.kind {
        FS_EXT4 => {
            let part = sys::partition_by_guid(diskdrv::part::Guid::from_bytes(fs.partuuid)).ok()?;
            fs.mounted_since(&superblock(&part.device)?)
        }
        // Every block device whose ext superblock carries that UUID (an
        // unlocked dm-crypt volume, an LVM volume; a snapshot of it too: any
        // that says it was mounted since refuses).
        FS_EXT4_BY_UUID => block_devices().into_iter().filter(|d| ext4_uuid(d) == Some(fs.partuuid)).find_map(|d| fs.mounted_since(&superblock(&d)?)),
        _ => None,
    })
}

/// /dev/NAME of every block device the kernel lists.
fn block_devices() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/class/block").map(|d| d.flatten().map(|e| Path::new("/dev").join(e.file_name())).collect()).unwrap_or_default()
}

/// The 1024 bytes at byte 1024 of `device`: where an ext superblock lies.
fn superblock(device: &Path) -> Option<[u8; 1024]> {
    let mut sb = [0u8; 1024];
    File::open(device).ok()?.read_exact_at(&mut sb, 1024).ok()?;
    Some(sb)
}
