//! A file as ksave's store (`ksave setup --file`): where its blocks lie on
//! the disk, found from the file system (FIEMAP; on btrfs through its
//! chunk tree, [`crate::btrfs`]) and the block layers below
//! it (a partition, or LVM's device-mapper `linear` targets), never
//! guessed; anything else is refused with its name.
//!
//! ksave writes those blocks itself, under the file system, as the kernel's
//! swap-file code does: so the file must be all allocated and written (no
//! holes, unwritten, delayed or inline extents), its extents its own (not
//! shared by a reflink), stored as they are (not compressed or encrypted),
//! and pinned (immutable: the file system neither writes, truncates nor
//! reflinks it; see docs/FILESTORE.md for what each file system promises
//! against moving it). `ksave hibernate` derives the extents again before
//! every jump and refuses if they are not the map's.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use ksave_format::PAGE;
use ksave_format::filemap::{self, FileExtent};

use crate::sys::{self, PartInfo};

/// FS_IOC_FIEMAP, _IOWR('f', 11, struct fiemap) (linux/fs.h).
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// FIEMAP_FLAG_SYNC: write dirty data back before mapping
/// (linux/fiemap.h).
const FIEMAP_FLAG_SYNC: u32 = 1;
/// FS_IOC_GETFLAGS / FS_IOC_SETFLAGS (linux/fs.h; long-sized argument on
/// x86_64, though the kernel reads an int).
const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
const FS_IOC_SETFLAGS: libc::c_ulong = 0x4008_6602;
/// FS_IMMUTABLE_FL, FS_JOURNAL_DATA_FL and FS_NOCOW_FL (linux/fs.h).
const FS_IMMUTABLE_FL: libc::c_int = 0x10;
const FS_JOURNAL_DATA_FL: libc::c_int = 0x4000;
const FS_NOCOW_FL: libc::c_int = 0x0080_0000;
/// FS_IOC_FSGETXATTR, _IOR('X', 31, struct fsxattr) (linux/fs.h), and
/// FS_XFLAG_REALTIME in its fsx_xflags.
const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801C_581F;
const FS_XFLAG_REALTIME: u32 = 0x1;

/// statfs f_type of the file systems taken (linux/magic.h).
const EXT4_SUPER_MAGIC: i64 = 0xEF53;
const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;

/// One extent as FIEMAP reports it (struct fiemap_extent), in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapped {
    /// Offset in the file.
    pub logical: u64,
    /// Offset on the file system's device (btrfs: its logical address).
    pub physical: u64,
    /// Length.
    pub length: u64,
    /// FIEMAP_EXTENT_* flags.
    pub flags: u32,
}

/// FIEMAP_EXTENT_* flags that make an extent unusable, and why
/// (linux/fiemap.h; Documentation/filesystems/fiemap.rst).
const REFUSED_FLAGS: [(u32, &str); 9] = [
    (0x2, "its location is not known (FIEMAP_EXTENT_UNKNOWN)"),
    (0x4, "it is not allocated yet (delayed allocation)"),
    (0x8, "it is encoded (compressed)"),
    (0x80, "it is encrypted (fscrypt)"),
    (0x100, "it is not aligned to blocks"),
    (0x200, "it is inline in the file system's metadata"),
    (0x400, "it is packed with other files' tails"),
    (0x800, "it is unwritten (preallocated): the file system would read it as zeros"),
    (0x2000, "it is shared with another file (a reflink or a snapshot): writing it would change that file"),
];

/// Checks the FIEMAP extents of a file of `size` bytes: from byte 0 to
/// `size` without a hole, every extent whole pages and usable as it lies.
/// Returns every reason it is not, one line each.
pub fn check_mapped(extents: &[Mapped], size: u64) -> Vec<String> {
    let mut why = Vec::new();
    let mut next = 0u64;
    for (i, e) in extents.iter().enumerate() {
        if e.logical != next {
            why.push(format!("the file has a hole at byte {next} (fill it: ksave writes every byte of its file at setup)"));
        }
        for (flag, what) in REFUSED_FLAGS {
            if e.flags & flag != 0 {
                why.push(format!("extent {i} (file byte {}): {what}", e.logical));
            }
        }
        if !e.physical.is_multiple_of(PAGE as u64) || !e.length.is_multiple_of(PAGE as u64) {
            why.push(format!("extent {i} (file byte {}) is not whole pages", e.logical));
        }
        next = e.logical + e.length;
    }
    if next < size {
        why.push(format!("the file's blocks end at byte {next}, before its size {size}"));
    }
    why
}

/// The file's extents by FIEMAP, after syncing its data.
pub fn fiemap(file: &File) -> Result<Vec<Mapped>> {
    const BATCH: usize = 256;
    // struct fiemap (32 bytes) and BATCH struct fiemap_extent (56 bytes).
    let mut buf = vec![0u64; (32 + 56 * BATCH) / 8];
    let mut out = Vec::new();
    let mut start = 0u64;
    loop {
        buf.fill(0);
        buf[0] = start;
        buf[1] = u64::MAX - start;
        buf[2] = FIEMAP_FLAG_SYNC as u64; // fm_flags; fm_mapped_extents 0 (high half)
        buf[3] = BATCH as u64; // fm_extent_count; fm_reserved 0
        // SAFETY: `buf` is a struct fiemap followed by room for BATCH
        // extents, as fm_extent_count says; the kernel writes no more.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, buf.as_mut_ptr()) };
        ensure!(rc == 0, "FIEMAP: {} (the file system cannot say where the file's blocks are)", std::io::Error::last_os_error());
        let mapped = (buf[2] >> 32) as usize;
        let mut last = false;
        for i in 0..mapped.min(BATCH) {
            let e = &buf[4 + 7 * i..4 + 7 * i + 7];
            let m = Mapped { logical: e[0], physical: e[1], length: e[2], flags: e[5] as u32 };
            last = m.flags & 1 != 0;
            start = m.logical + m.length;
            out.push(m);
        }
        if mapped == 0 || last {
            return Ok(out);
        }
    }
}

/// A device-mapper table line: `len` sectors at `start` of the mapped
/// device are `target`; for `linear`, at sector `offset` of `device`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmSegment {
    /// First sector of the mapped device.
    pub start: u64,
    /// Sectors.
    pub len: u64,
    /// The target type (`linear`, `striped`, `crypt`, `thin`, ...).
    pub target: String,
    /// `linear` and `crypt`: the device below, "major:minor".
    pub device: String,
    /// `linear` and `crypt`: the sector on it.
    pub offset: u64,
}

/// The targets whose sectors lie, in order, at an offset on one device
/// below: ksave can follow them to the disk. `crypt` (dm-crypt, LUKS)
/// encrypts each sector in place (its IV from the sector number), so its
/// blocks are where they are, ciphertext (docs/ENCRYPTION.md).
const FOLLOWED: [&str; 2] = ["linear", "crypt"];

/// Reads `dmsetup table` output.
pub fn parse_dm_table(text: &str) -> Result<Vec<DmSegment>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            ensure!(f.len() >= 3, "odd device-mapper table line: {line}");
            let (start, len) = (f[0].parse()?, f[1].parse()?);
            let (device, offset) = match f[2] {
                "linear" => {
                    ensure!(f.len() == 5, "odd linear target: {line}");
                    (f[3].to_string(), f[4].parse()?)
                }
                // start len crypt <cipher> <key> <iv_offset> <device> <offset> [#opt <opt>...]
                // (Documentation/admin-guide/device-mapper/dm-crypt.rst).
                "crypt" => {
                    ensure!(f.len() >= 8, "odd crypt target: {line}");
                    // With integrity (authenticated encryption) the sectors
                    // carry tags on a dm-integrity device below.
                    ensure!(!f[8..].iter().any(|o| o.starts_with("integrity:")), "an authenticated dm-crypt (integrity) volume: ksave cannot follow its sectors ({line})");
                    (f[6].to_string(), f[7].parse()?)
                }
                _ => (String::new(), 0),
            };
            Ok(DmSegment { start, len, target: f[2].to_string(), device, offset })
        })
        .collect()
}

/// Maps `extents` (bytes on the mapped device) through `table` to the
/// device below, which must be one: every byte of them in `linear` targets
/// onto the same device. Returns that device and the extents on it.
pub fn through_linear(extents: &[FileExtent], table: &[DmSegment], name: &str) -> Result<(String, Vec<FileExtent>)> {
    let mut below: Option<&str> = None;
    let mut out = Vec::new();
    for e in extents {
        let (mut at, end) = (e.offset, e.offset + e.bytes);
        while at < end {
            let sector = at / 512;
            let seg = table
                .iter()
                .find(|s| s.start <= sector && sector < s.start + s.len)
                .with_context(|| format!("{name} maps nothing at byte {at}"))?;
            ensure!(
                FOLLOWED.contains(&seg.target.as_str()),
                "the file lies on {name}, a device-mapper {} target: ksave writes only through partitions, LVM linear volumes and dm-crypt ({})",
                seg.target,
                match seg.target.as_str() {
                    "striped" | "raid" | "mirror" => "its blocks are spread over several disks",
                    "thin" | "thin-pool" | "snapshot" | "snapshot-origin" => "its blocks move as the pool allocates them",
                    "cache" | "writecache" => "a cache holds some of its blocks",
                    _ => "ksave cannot follow it to the disk",
                }
            );
            ensure!(below.is_none_or(|d| d == seg.device), "the file lies on {name}, whose linear targets span several devices ({} and {}): ksave needs it on one", below.unwrap_or(""), seg.device);
            below = Some(&seg.device);
            let seg_end = (seg.start + seg.len) * 512;
            let n = (end - at).min(seg_end - at);
            push_merged(&mut out, FileExtent { offset: seg.offset * 512 + (at - seg.start * 512), bytes: n });
            at += n;
        }
    }
    Ok((below.context("no extents")?.to_string(), out))
}

/// Appends `e`, merged into the last extent when it continues it.
pub fn push_merged(out: &mut Vec<FileExtent>, e: FileExtent) {
    match out.last_mut() {
        Some(last) if last.offset + last.bytes == e.offset => last.bytes += e.bytes,
        _ => out.push(e),
    }
}

/// The block device a file system lies on, when it is above dm-crypt: the
/// store's key block is written and read through it, so that on disk it is
/// encrypted as the file system is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    /// Its device-mapper UUID (`CRYPT-LUKS2-...`, `LVM-...`): how the
    /// initramfs finds it again once unlocked.
    pub dm_uuid: String,
    /// Its node, e.g. /dev/dm-0.
    pub device: PathBuf,
    /// The file's extents on it, in bytes.
    pub extents: Vec<FileExtent>,
}

impl Volume {
    /// Where byte `at` of the file lies on the volume.
    pub fn byte_of(&self, mut at: u64) -> Option<u64> {
        for e in &self.extents {
            if at < e.bytes {
                return Some(e.offset + at);
            }
            at -= e.bytes;
        }
        None
    }
}

/// The node of the device-mapper device whose UUID is `uuid`, if it is
/// there (unlocked, activated).
pub fn dm_device_by_uuid(uuid: &str) -> Option<PathBuf> {
    std::fs::read_dir("/sys/block").ok()?.flatten().find_map(|d| {
        let found = std::fs::read_to_string(d.path().join("dm/uuid")).ok()?;
        (found.trim() == uuid).then(|| PathBuf::from("/dev").join(d.file_name()))
    })
}

/// Where a file lies: the partition, the layers between, its extents in
/// bytes from the partition's start (merged, in file order).
#[derive(Clone, Debug)]
pub struct Located {
    /// The partition it is in.
    pub partition: PartInfo,
    /// The file system's name.
    pub fs: &'static str,
    /// The block layers between the file system and the partition, for
    /// people (e.g. "dm-0 (LVM vg-root, linear)").
    pub layers: Vec<String>,
    /// The extents.
    pub extents: Vec<FileExtent>,
    /// The file system's device, when dm-crypt lies below it.
    pub volume: Option<Volume>,
}

/// The name of the file system `path` is on, if ksave takes it.
pub fn file_system_name(path: &Path) -> Result<&'static str> {
    file_system(&File::open(path)?, path)
}

/// The file system `file` is on, by name; refuses others.
fn file_system(file: &File, path: &Path) -> Result<&'static str> {
    // SAFETY: statfs is plain data, fully written by fstatfs on success.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a statfs to fill.
    ensure!(unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } == 0, "statfs {}: {}", path.display(), std::io::Error::last_os_error());
    Ok(match st.f_type {
        EXT4_SUPER_MAGIC => "ext4",
        XFS_SUPER_MAGIC => "xfs",
        BTRFS_SUPER_MAGIC => "btrfs",
        other => bail!("{} is on a file system of type {other:#x} (statfs): ksave takes files on ext4, XFS and btrfs", path.display()),
    })
}

/// Finds where `path` lies on its disk, down to the partition, refusing
/// anything it cannot prove.
pub fn locate(path: &Path) -> Result<Located> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let meta = file.metadata()?;
    ensure!(meta.file_type().is_file(), "{} is not a regular file", path.display());
    let fs = file_system(&file, path)?;
    ensure!(meta.len().is_multiple_of(PAGE as u64) && meta.len() > 0, "{}'s size is not whole pages", path.display());
    // Only what lies inside the file is ours (blocks past the end may be
    // speculative preallocation, delayed or unwritten).
    let mapped: Vec<Mapped> = fiemap(&file)?.into_iter().filter(|m| m.logical < meta.len()).collect();
    let why = check_mapped(&mapped, meta.len());
    ensure!(why.is_empty(), "{} cannot be ksave's store as it lies:\n  {}", path.display(), why.join("\n  "));
    let extents = within(&mapped, meta.len());
    let flags = inode_flags(&file)?;
    if fs == "ext4" {
        // Journalled data reaches its blocks at a checkpoint, perhaps after
        // ksave wrote them: it would write setup's bytes over an image.
        ensure!(flags & FS_JOURNAL_DATA_FL == 0, "{}: its data is journalled (chattr +j): its blocks are written late, over ksave's", path.display());
        ensure!(
            !crate::mounts::of(path).is_some_and(|m| m.all_options().any(|o| o == "data=journal")),
            "{} is on ext4 mounted data=journal: its data blocks are written at journal checkpoints, perhaps over ksave's",
            path.display()
        );
    }
    if fs == "xfs" {
        // A realtime file's FIEMAP addresses are on the realtime device,
        // which FIEMAP does not name (the kernel's swap code refuses them).
        let mut fsx = [0u32; 7];
        // SAFETY: a 28-byte struct fsxattr for the kernel to fill.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FSGETXATTR, fsx.as_mut_ptr()) };
        ensure!(rc == 0, "FS_IOC_FSGETXATTR: {}", std::io::Error::last_os_error());
        ensure!(fsx[0] & FS_XFLAG_REALTIME == 0, "{} is an XFS realtime file: its blocks are on the realtime device", path.display());
    }
    let (dev, extents) = if fs == "btrfs" {
        // Not copy-on-write: btrfs would put the blocks elsewhere on the
        // next write, and checksums the data of files that are.
        ensure!(
            flags & FS_NOCOW_FL != 0,
            "{} is copy-on-write on btrfs (no chattr +C before its data): remove it and run setup again, which makes it NOCOW",
            path.display()
        );
        let (device, extents) = crate::btrfs::map(&file, &extents).with_context(|| format!("{} on btrfs", path.display()))?;
        (std::fs::metadata(&device).with_context(|| format!("{}", device.display()))?.rdev(), extents)
    } else {
        (meta.dev(), extents)
    };
    let top = extents.clone();
    let (partition, layers, encrypted, extents) = down_to_partition(path, dev, extents)?;
    let volume = if encrypted {
        let sys = PathBuf::from(format!("/sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev)));
        let name = std::fs::canonicalize(&sys)?.file_name().context("odd sysfs path")?.to_string_lossy().to_string();
        let dm_uuid = std::fs::read_to_string(sys.join("dm/uuid")).with_context(|| format!("{name}: no device-mapper UUID"))?.trim().to_string();
        ensure!(!dm_uuid.is_empty(), "{} lies on {name}, which has no device-mapper UUID to find it by at boot", path.display());
        Some(Volume { dm_uuid, device: PathBuf::from("/dev").join(name), extents: top })
    } else {
        None
    };
    Ok(Located { partition, fs, layers, extents, volume })
}

/// The file's first `size` bytes of `mapped`, merged: a file system may
/// map blocks past the end of a file (XFS's speculative preallocation),
/// which it frees and gives to other files later.
pub fn within(mapped: &[Mapped], size: u64) -> Vec<FileExtent> {
    let mut extents = Vec::new();
    for m in mapped.iter().filter(|m| m.logical < size) {
        push_merged(&mut extents, FileExtent { offset: m.physical, bytes: m.length.min(size - m.logical) });
    }
    extents
}

/// Follows `extents` of `path` (bytes on the device `dev`) down the block
/// layers to the partition: returns it, the layers passed, whether one was
/// dm-crypt, and the extents in it.
fn down_to_partition(path: &Path, dev: u64, mut extents: Vec<FileExtent>) -> Result<(PartInfo, Vec<String>, bool, Vec<FileExtent>)> {
    let (mut major, mut minor) = (libc::major(dev), libc::minor(dev));
    let mut layers = Vec::new();
    let mut encrypted = false;
    loop {
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let name = std::fs::canonicalize(&sys).ok().and_then(|p| Some(p.file_name()?.to_string_lossy().to_string())).with_context(|| format!("the file system's device {major}:{minor} is not a block device"))?;
        if sys.join("partition").exists() {
            let partition = sys::partition_info(&PathBuf::from("/dev").join(&name))?;
            let part_bytes = partition.sectors * 512;
            if let Some(e) = extents.iter().find(|e| e.offset + e.bytes > part_bytes) {
                bail!("{} maps to byte {} of {}, beyond its end", path.display(), e.offset, name);
            }
            return Ok((partition, layers, encrypted, extents));
        }
        if sys.join("dm").exists() {
            let dm_name = std::fs::read_to_string(sys.join("dm/name"))?.trim().to_string();
            let uuid = std::fs::read_to_string(sys.join("dm/uuid")).unwrap_or_default();
            let out = std::process::Command::new("dmsetup").args(["table", "-j", &major.to_string(), "-m", &minor.to_string()]).output().context("running dmsetup (LVM's device-mapper tool)")?;
            ensure!(out.status.success(), "dmsetup table {dm_name}: {}", String::from_utf8_lossy(&out.stderr).trim());
            let table = parse_dm_table(&String::from_utf8_lossy(&out.stdout))?;
            let crypt = table.iter().any(|s| s.target == "crypt");
            encrypted |= crypt;
            let what = if crypt {
                format!("{name} (dm-crypt {dm_name})")
            } else if uuid.starts_with("LVM-") {
                format!("{name} (LVM {dm_name}, linear)")
            } else {
                format!("{name} (device-mapper {dm_name}, linear)")
            };
            let (below, mapped) = through_linear(&extents, &table, &format!("{name} ({dm_name})"))?;
            layers.push(what);
            extents = mapped;
            let (ma, mi) = below.split_once(':').with_context(|| format!("{dm_name}'s table names {below}, not major:minor"))?;
            (major, minor) = (ma.parse()?, mi.parse()?);
            continue;
        }
        let kind = if sys.join("loop").exists() {
            let backing = std::fs::read_to_string(sys.join("loop/backing_file")).unwrap_or_default();
            format!("a loop device ({name}, backed by {})", backing.trim())
        } else if sys.join("md").exists() {
            format!("an md RAID array ({name}): its blocks are spread over several disks")
        } else if name.starts_with("nbd") || name.starts_with("rbd") || name.starts_with("drbd") {
            format!("a network block device ({name})")
        } else if name.starts_with("zram") {
            format!("a compressed RAM disk ({name})")
        } else {
            format!("{name}, a whole disk without a partition (ksave finds its store by its GPT partition)")
        };
        bail!("{} lies on {kind}: ksave writes only into partitions and LVM linear volumes on them", path.display());
    }
}

/// Writes `bytes` (whole pages) at byte `at` of the file whose `extents`
/// lie on `device`, straight onto the device, O_DIRECT: an encrypted
/// store's map and claim lie under dm-crypt, where ksave reads them.
pub fn write_raw(device: &Path, extents: &[FileExtent], mut at: u64, bytes: &[u8]) -> Result<()> {
    #[repr(C, align(4096))]
    struct Page([u8; PAGE]);
    ensure!(bytes.len().is_multiple_of(PAGE) && at.is_multiple_of(PAGE as u64), "raw writes are whole pages");
    let dev = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT | libc::O_DSYNC).open(device).with_context(|| format!("opening {}", device.display()))?;
    let mut page = Box::new(Page([0; PAGE]));
    for chunk in bytes.chunks(PAGE) {
        let mut offset = at;
        let on_disk = extents
            .iter()
            .find_map(|e| if offset < e.bytes { Some(e.offset + offset) } else { offset -= e.bytes; None })
            .with_context(|| format!("byte {at} is beyond the file"))?;
        page.0.copy_from_slice(chunk);
        dev.write_all_at(&page.0, on_disk).with_context(|| format!("writing {}", device.display()))?;
        at += PAGE as u64;
    }
    Ok(())
}

/// The map of `extents` as it is written into the file's first pages,
/// and its entries' CRC.
pub fn encode_map(extents: &[FileExtent], claim_id: [u8; 16], encrypted: bool) -> (Vec<u8>, u32) {
    let mut map = vec![0u8; filemap::pages_for(extents.len()) as usize * PAGE];
    let crc = filemap::encode(extents, claim_id, encrypted, &mut map);
    (map, crc)
}

/// Reads or sets the file's inode flags (FS_IOC_GETFLAGS/SETFLAGS).
fn inode_flags(file: &File) -> Result<libc::c_int> {
    let mut flags: libc::c_int = 0;
    // SAFETY: the kernel writes one int.
    ensure!(unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_GETFLAGS, &mut flags) } == 0, "reading the file's attributes: {}", std::io::Error::last_os_error());
    Ok(flags)
}

fn set_inode_flags(file: &File, flags: libc::c_int) -> Result<()> {
    // SAFETY: the kernel reads one int.
    ensure!(unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_SETFLAGS, &flags) } == 0, "setting the file's attributes: {}", std::io::Error::last_os_error());
    Ok(())
}

/// Whether the file is immutable (chattr +i).
pub fn is_immutable(path: &Path) -> Result<bool> {
    Ok(inode_flags(&File::open(path)?)? & FS_IMMUTABLE_FL != 0)
}

/// Sets or clears the immutable attribute (chattr +i / -i).
pub fn set_immutable(path: &Path, on: bool) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let flags = inode_flags(&file)?;
    let want = if on { flags | FS_IMMUTABLE_FL } else { flags & !FS_IMMUTABLE_FL };
    if want != flags {
        set_inode_flags(&file, want).with_context(|| format!("chattr {}i {}", if on { '+' } else { '-' }, path.display()))?;
    }
    Ok(())
}

/// Creates `path` (0600) of `size` bytes, every byte written, and synced:
/// no hole, no unwritten or delayed extent is left.
pub fn create(path: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    ensure!(size.is_multiple_of(1 << 20) && size > 0, "the size must be whole MiB");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).with_context(|| format!("creating {}", path.display()))?;
    // On copy-on-write file systems the file must not be: set before any
    // data (it is ignored where there is no copy-on-write).
    if let Ok(flags) = inode_flags(&file) {
        let _ = set_inode_flags(&file, flags | FS_NOCOW_FL);
    }
    let zeros = vec![0u8; 1 << 20];
    let written = (0..size >> 20).try_for_each(|_| file.write_all(&zeros)).and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(path);
        bail!("writing {} ({} MiB): {e}", path.display(), size >> 20);
    }
    Ok(())
}

/// Drops a file's clean cached pages (POSIX_FADV_DONTNEED): ksave writes
/// its blocks under the file system, so what is cached is stale, and a
/// hibernation would hold it as memory (zero pages a resume must zero).
/// Err: the kernel cannot (built without CONFIG_ADVISE_SYSCALLS).
pub fn drop_cached_pages(file: &File) -> std::io::Result<()> {
    // SAFETY: advice only; no memory is passed.
    match unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) } {
        0 => Ok(()),
        errno => Err(std::io::Error::from_raw_os_error(errno)),
    }
}

/// Whether a file begins with a ksave file map (written through the file
/// system by setup only, so its cached copy is the disk's).
pub fn is_image_file(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    if File::open(path).and_then(|f| f.read_exact_at(&mut magic, 0)).is_ok() && magic == filemap::MAGIC {
        return true;
    }
    // On an encrypted volume the map lies under dm-crypt, where ksave reads
    // it: read there (through the file system it reads as noise).
    let Ok(located) = locate(path) else { return false };
    let (Some(_), Some(first)) = (&located.volume, located.extents.first()) else { return false };
    File::open(&located.partition.device).and_then(|f| f.read_exact_at(&mut magic, first.offset)).is_ok() && magic == filemap::MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn only_a_whole_written_unshared_file_is_taken() {
        let ok = [Mapped { logical: 0, physical: 8 * MIB, length: MIB, flags: 0 }, Mapped { logical: MIB, physical: 2 * MIB, length: MIB, flags: 1 }];
        assert!(check_mapped(&ok, 2 * MIB).is_empty());
        let hole = [ok[0], Mapped { logical: 3 * MIB, ..ok[1] }];
        assert!(check_mapped(&hole, 4 * MIB)[0].contains("hole at byte 1048576"));
        let short = check_mapped(&ok, 3 * MIB);
        assert!(short[0].contains("end at byte 2097152"), "{short:?}");
        let shared = [Mapped { flags: 0x2000 | 1, ..ok[0] }];
        assert!(check_mapped(&shared, MIB)[0].contains("shared with another file"));
        let unwritten_encoded = [Mapped { flags: 0x800 | 0x8, ..ok[0] }];
        let why = check_mapped(&unwritten_encoded, MIB);
        assert_eq!(why.len(), 2, "{why:?}");
        let odd = [Mapped { physical: 8 * MIB + 512, ..ok[0] }];
        assert!(check_mapped(&odd, MIB)[0].contains("not whole pages"));
    }

    #[test]
    fn an_lvm_volume_maps_to_its_physical_volume() {
        // Two segments of one LV on one PV (as lvextend leaves them).
        let table = parse_dm_table("0 8192 linear 8:2 2048\n8192 4096 linear 8:2 409600\n").unwrap();
        let extents = [FileExtent { offset: 3 * MIB, bytes: 2 * MIB }];
        // Bytes 3-4 MiB are in segment 0 (sectors 6144-8191), 4-5 MiB in 1.
        let (below, out) = through_linear(&extents, &table, "dm-0").unwrap();
        assert_eq!(below, "8:2");
        assert_eq!(out, [FileExtent { offset: 2048 * 512 + 3 * MIB, bytes: MIB }, FileExtent { offset: 409600 * 512, bytes: MIB }]);
        // dm-crypt (LUKS2: data 16 MiB into the partition) is followed, an
        // authenticated one refused.
        let crypt = parse_dm_table("0 8192 crypt aes-xts-plain64 :64:logon:cryptsetup:x 0 8:2 32768 1 sector_size:4096\n").unwrap();
        let (below, out) = through_linear(&[FileExtent { offset: MIB, bytes: MIB }], &crypt, "dm-1").unwrap();
        assert_eq!((below.as_str(), out), ("8:2", vec![FileExtent { offset: 32768 * 512 + MIB, bytes: MIB }]));
        let e = parse_dm_table("0 8192 crypt capi:authenc(hmac(sha256),xts(aes))-random - 0 253:4 0 1 integrity:32:aead\n").unwrap_err();
        assert!(e.to_string().contains("integrity"), "{e}");
        // Other targets are refused by name.
        let striped = parse_dm_table("0 8192 striped 2 128 8:2 0 8:3 0\n").unwrap();
        assert!(through_linear(&[FileExtent { offset: 0, bytes: MIB }], &striped, "dm-2").unwrap_err().to_string().contains("several disks"));
        let two = parse_dm_table("0 2048 linear 8:2 0\n2048 2048 linear 8:3 0\n").unwrap();
        assert!(through_linear(&[FileExtent { offset: 0, bytes: 2 * MIB }], &two, "dm-3").unwrap_err().to_string().contains("several devices"));
    }

    #[test]
    fn blocks_past_the_end_are_not_the_files() {
        // XFS maps speculative preallocation past EOF: not ours to write.
        let mapped = [Mapped { logical: 0, physical: 8 * MIB, length: 2 * MIB, flags: 0 }, Mapped { logical: 2 * MIB, physical: 64 * MIB, length: 4 * MIB, flags: 1 }];
        assert_eq!(within(&mapped, 3 * MIB), [FileExtent { offset: 8 * MIB, bytes: 2 * MIB }, FileExtent { offset: 64 * MIB, bytes: MIB }]);
        assert_eq!(within(&mapped, MIB), [FileExtent { offset: 8 * MIB, bytes: MIB }]);
    }

    #[test]
    fn neighbours_merge() {
        let mut out = Vec::new();
        push_merged(&mut out, FileExtent { offset: 0, bytes: 4096 });
        push_merged(&mut out, FileExtent { offset: 4096, bytes: 4096 });
        push_merged(&mut out, FileExtent { offset: 65536, bytes: 4096 });
        assert_eq!(out, [FileExtent { offset: 0, bytes: 8192 }, FileExtent { offset: 65536, bytes: 4096 }]);
    }
}
