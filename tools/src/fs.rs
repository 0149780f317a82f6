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
//! device-mapper volume (dm-crypt, LVM) by its own superblock UUID.
//! btrfs's superblock generation moves with every transaction commit, and
//! a read-write mount that changes anything commits; it is read after the
//! file systems are frozen for the jump (freeze.rs), when no commit can
//! follow until the resume, so any other generation is proof of a write.
//! XFS keeps no mount count: for it no change can be proven, and the
//! initramfs guard alone stands.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ksave_format::header::{
    BTRFS_SUPERBLOCK_AT, EXT_SUPERBLOCK_AT, FS_BTRFS, FS_BTRFS_BY_UUID, FS_EXT4, FS_EXT4_BY_UUID, FsSeen, MAX_FILESYSTEMS, btrfs_generation, ext_mount_counters,
};
use ksave_format::verdict::Refusal;

use crate::mounts;
use crate::sys;

/// The ext2/3/4 superblock's mount count and last mount time, read from
/// `device`; `None` if it holds no ext superblock.
pub fn ext4_mounts(device: &Path) -> Option<(u32, u64)> {
    ext_mount_counters(&superblock(device, EXT_SUPERBLOCK_AT)?)
}

/// The ext2/3/4 superblock's UUID (`s_uuid`, at 0x68), read from `device`.
fn ext4_uuid(device: &Path) -> Option<[u8; 16]> {
    let sb = superblock(device, EXT_SUPERBLOCK_AT)?;
    ext_mount_counters(&sb)?;
    sb[0x68..0x78].try_into().ok()
}

/// The btrfs superblock's fsid and generation, read from `device`.
fn btrfs_super(device: &Path) -> Option<([u8; 16], u64)> {
    btrfs_generation(&superblock(device, BTRFS_SUPERBLOCK_AT)?)
}

/// The mounted ext2/3/4 and btrfs file systems, as their superblocks are
/// now (on a GPT partition: by its PARTUUID; on a device-mapper volume,
/// dm-crypt or LVM: by the file system's own UUID); and the local file
/// systems not recorded (another kind, or on neither), one line each, for
/// the user. Read after the freeze (freeze.rs), btrfs's generation is the
/// one the disk keeps until the resume.
pub fn seen() -> (Vec<FsSeen>, Vec<String>) {
    let (mut seen, mut unrecorded) = (Vec::new(), Vec::new());
    let mut devices: Vec<PathBuf> = Vec::new();
    for mount in mounts::all() {
        // The block device each local file system is mounted from, each
        // once (bind mounts, btrfs subvolumes). The table gives btrfs an
        // anonymous device (major 0, as tmpfs, proc, overlay): its source
        // names the real one.
        let device = match mount.fstype.as_str() {
            "btrfs" => Some(PathBuf::from(&mount.source)).filter(|s| s.starts_with("/dev/")),
            _ if mount.dev.starts_with("0:") => None,
            _ => device_of(&mount.dev),
        };
        let Some(device) = device.map(|d| std::fs::canonicalize(&d).unwrap_or(d)) else { continue };
        if devices.contains(&device) {
            continue;
        }
        devices.push(device.clone());
        let part = sys::partition_info(&device).ok().map(|p| p.guid.to_bytes());
        let dm = device.file_name().is_some_and(|name| Path::new("/sys/class/block").join(name).join("dm").exists());
        let named = |by_uuid: Option<[u8; 16]>, kind: u32, kind_by_uuid: u32| match (part, dm) {
            (Some(guid), _) => Some((guid, kind)),
            (None, true) => by_uuid.map(|uuid| (uuid, kind_by_uuid)),
            (None, false) => None,
        };
        let record = match mount.fstype.as_str() {
            "ext2" | "ext3" | "ext4" => ext4_mounts(&device).and_then(|(mounts, mounted_at)| {
                let (id, kind) = named(ext4_uuid(&device), FS_EXT4, FS_EXT4_BY_UUID)?;
                Some(FsSeen { partuuid: id, kind, mounts, mounted_at })
            }),
            "btrfs" => btrfs_super(&device).and_then(|(fsid, generation)| {
                let (id, kind) = named(Some(fsid), FS_BTRFS, FS_BTRFS_BY_UUID)?;
                Some(FsSeen { partuuid: id, kind, mounts: 0, mounted_at: generation })
            }),
            _ => None,
        };
        match record {
            Some(fs) if seen.len() < MAX_FILESYSTEMS => seen.push(fs),
            _ => unrecorded.push(format!("{} on {} at {}", mount.fstype, device.display(), mount.point.display())),
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
        FS_EXT4 | FS_BTRFS => {
            let part = sys::partition_by_guid(diskdrv::part::Guid::from_bytes(fs.partuuid)).ok()?;
            fs.mounted_since(&superblock(&part.device, fs.superblock_at())?)
        }
        // Every block device whose superblock carries that UUID (an
        // unlocked dm-crypt volume, an LVM volume; a snapshot of it too: any
        // that says it was mounted since refuses).
        FS_EXT4_BY_UUID => block_devices().into_iter().filter(|d| ext4_uuid(d) == Some(fs.partuuid)).find_map(|d| fs.mounted_since(&superblock(&d, EXT_SUPERBLOCK_AT)?)),
        FS_BTRFS_BY_UUID => block_devices().into_iter().filter(|d| btrfs_super(d).is_some_and(|(fsid, _)| fsid == fs.partuuid)).find_map(|d| fs.mounted_since(&superblock(&d, BTRFS_SUPERBLOCK_AT)?)),
        _ => None,
    })
}

/// /dev/NAME of every block device the kernel lists.
fn block_devices() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/class/block").map(|d| d.flatten().map(|e| Path::new("/dev").join(e.file_name())).collect()).unwrap_or_default()
}

/// The 1024 bytes at byte `at` of `device`: where a superblock lies.
fn superblock(device: &Path, at: u64) -> Option<[u8; 1024]> {
    let mut sb = [0u8; 1024];
    File::open(device).ok()?.read_exact_at(&mut sb, at).ok()?;
    Some(sb)
}
