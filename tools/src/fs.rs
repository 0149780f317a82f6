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
//! XFS writes every change, and the unmount record of every read-write
//! mount, to its log at the head: the sector there, read after the freeze,
//! is another after any such write. An XFS with its log on another device
//! is not recorded, and the initramfs guard alone stands for it.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ksave_format::header::{
    BTRFS_SUPERBLOCK_AT, EXT_SUPERBLOCK_AT, FS_BTRFS, FS_BTRFS_BY_UUID, FS_EXT4, FS_EXT4_BY_UUID, FS_XFS, FS_XFS_BY_UUID, FsSeen, MAX_FILESYSTEMS, SUPERBLOCK_BYTES,
    btrfs_generation, ext_mount_counters, xfs_log_head,
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

/// The XFS superblock's UUID, read from `device`; `None` if it holds no
/// XFS.
fn xfs_uuid(device: &Path) -> Option<[u8; 16]> {
    let sb = superblock(device, 0)?;
    (&sb[0..4] == b"XFSB").then(|| sb[0x20..0x30].try_into().unwrap())
}

/// The mounted XFS on `device`: its UUID, where its log's head sector lies
/// and that sector's CRC-32C. The head is the kernel's
/// (/sys/fs/xfs/DEV/log/log_head_lsn, "cycle:block"): where the log's next
/// write goes.
fn xfs_head(device: &Path) -> Option<([u8; 16], u64, u32)> {
    let name = device.file_name()?.to_str()?;
    let lsn = std::fs::read_to_string(format!("/sys/fs/xfs/{name}/log/log_head_lsn")).ok()?;
    let block: u64 = lsn.trim().split_once(':')?.1.parse().ok()?;
    let (uuid, at) = xfs_log_head(&superblock(device, 0)?, block)?;
    Some((uuid, at, ksave_format::CRC32C.checksum(&superblock(device, at)?)))
}

/// The mounted ext2/3/4, btrfs and XFS file systems, as their superblocks
/// (and XFS's log head) are now (on a GPT partition: by its PARTUUID; on a device-mapper volume,
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
            "xfs" => xfs_head(&device).and_then(|(uuid, at, crc)| {
                let (id, kind) = named(Some(uuid), FS_XFS, FS_XFS_BY_UUID)?;
                Some(FsSeen { partuuid: id, kind, mounts: crc, mounted_at: at })
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

/// The first file system of `recorded` that says it was mounted since
/// ([`FsSeen::mounted_since`]), found by its PARTUUID or its own UUID. One
/// that cannot be found or read proves nothing (and the resumed kernel
/// will say so of its own). By UUID, every device that carries it must
/// agree: a classic LVM snapshot of a btrfs or XFS volume, taken before
/// the hibernation, holds an older state and makes the resume refused.
pub fn mounted_since(recorded: &[FsSeen]) -> Option<Refusal> {
    recorded.iter().find_map(|fs| match fs.kind {
        FS_EXT4 | FS_BTRFS | FS_XFS => {
            let part = sys::partition_by_guid(diskdrv::part::Guid::from_bytes(fs.partuuid)).ok()?;
            fs.mounted_since(&superblock(&part.device, fs.superblock_at())?)
        }
        // Every block device whose superblock carries that UUID (an
        // unlocked dm-crypt volume, an LVM volume; a snapshot of it too: any
        // that says it was mounted since refuses).
        FS_EXT4_BY_UUID => block_devices().into_iter().filter(|d| ext4_uuid(d) == Some(fs.partuuid)).find_map(|d| fs.mounted_since(&superblock(&d, EXT_SUPERBLOCK_AT)?)),
        FS_BTRFS_BY_UUID => block_devices().into_iter().filter(|d| btrfs_super(d).is_some_and(|(fsid, _)| fsid == fs.partuuid)).find_map(|d| fs.mounted_since(&superblock(&d, BTRFS_SUPERBLOCK_AT)?)),
        FS_XFS_BY_UUID => block_devices().into_iter().filter(|d| xfs_uuid(d) == Some(fs.partuuid)).find_map(|d| fs.mounted_since(&superblock(&d, fs.superblock_at())?)),
        _ => None,
    })
}

/// /dev/NAME of every block device the kernel lists.
fn block_devices() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/class/block").map(|d| d.flatten().map(|e| Path::new("/dev").join(e.file_name())).collect()).unwrap_or_default()
}

/// The [`SUPERBLOCK_BYTES`] at byte `at` (a multiple of 512) of `device`:
/// a superblock, or XFS's log head sector. Read past the page cache
/// (O_DIRECT): XFS writes its log around it, so a cached copy could be
/// stale.
fn superblock(device: &Path, at: u64) -> Option<[u8; SUPERBLOCK_BYTES]> {
    use std::os::unix::fs::OpenOptionsExt;
    const ALIGN: usize = 4096; // any disk's logical block size, at most
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(device).ok()?;
    let mut buf = vec![0u8; 2 * ALIGN];
    let skew = buf.as_ptr().align_offset(ALIGN);
    let page = &mut buf[skew..skew + ALIGN];
    let base = at - at % ALIGN as u64;
    file.read_exact_at(page, base).ok()?;
    let within = (at - base) as usize;
    page.get(within..within + SUPERBLOCK_BYTES)?.try_into().ok()
}
