//! btrfs: FIEMAP gives a file's extents in btrfs's logical address space;
//! its chunk tree says where each chunk of that space lies on the devices.
//! This maps a file's extents to its one device, as `btrfs
//! inspect-internal map-swapfile` (btrfs-progs) and the kernel's
//! `btrfs_swap_activate()` (fs/btrfs/inode.c) do: only a single-device file
//! system, and only chunks of one stripe with no RAID or DUP profile.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use ksave_format::filemap::FileExtent;

use crate::filestore::push_merged;

/// BTRFS_IOC_TREE_SEARCH, _IOWR(0x94, 17, struct btrfs_ioctl_search_args)
/// (include/uapi/linux/btrfs.h): 4096 bytes.
const IOC_TREE_SEARCH: libc::c_ulong = 0xD000_9411;
/// BTRFS_IOC_FS_INFO, _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args): 1024.
const IOC_FS_INFO: libc::c_ulong = 0x8400_941F;
/// BTRFS_IOC_DEV_INFO, _IOWR(0x94, 30, struct btrfs_ioctl_dev_info_args): 4096.
const IOC_DEV_INFO: libc::c_ulong = 0xD000_941E;
/// BTRFS_IOC_BALANCE_PROGRESS, _IOR(0x94, 34, struct btrfs_ioctl_balance_args):
/// 1024; fails with ENOTCONN when no balance is running.
const IOC_BALANCE_PROGRESS: libc::c_ulong = 0x8400_9422;
/// The chunk tree, its chunk items' objectid and key type
/// (include/uapi/linux/btrfs_tree.h).
const CHUNK_TREE_OBJECTID: u64 = 3;
const FIRST_CHUNK_TREE_OBJECTID: u64 = 256;
const CHUNK_ITEM_KEY: u32 = 228;
/// Block group profile bits (BTRFS_BLOCK_GROUP_*), with their names.
const PROFILES: [(u64, &str); 8] = [
    (1 << 3, "RAID0"),
    (1 << 4, "RAID1"),
    (1 << 5, "DUP"),
    (1 << 6, "RAID10"),
    (1 << 7, "RAID5"),
    (1 << 8, "RAID6"),
    (1 << 9, "RAID1C3"),
    (1 << 10, "RAID1C4"),
];

/// A chunk: `length` bytes of the logical address space from `logical`,
/// with its type bits and stripes (device id, byte offset on it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Its first logical byte.
    pub logical: u64,
    /// Its length.
    pub length: u64,
    /// BTRFS_BLOCK_GROUP_* bits.
    pub flags: u64,
    /// (devid, physical offset) of each stripe.
    pub stripes: Vec<(u64, u64)>,
}

impl Chunk {
    /// The name of its RAID or DUP profile; none for `single`.
    pub fn profile(&self) -> Option<&'static str> {
        PROFILES.iter().find(|(bit, _)| self.flags & bit != 0).map(|(_, name)| *name)
    }
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Reads the items of a TREE_SEARCH result buffer (`nr` of them): each a
/// struct btrfs_ioctl_search_header (transid, objectid, offset, type, len)
/// and `len` bytes of item; the chunk items among them as [`Chunk`]s.
pub fn parse_chunks(buf: &[u8], nr: u32) -> Result<Vec<Chunk>> {
    let mut out = Vec::new();
    let mut at = 0;
    for _ in 0..nr {
        ensure!(at + 32 <= buf.len(), "chunk tree search: truncated result");
        let (offset, kind, len) = (le64(buf, at + 16), le32(buf, at + 24), le32(buf, at + 28) as usize);
        let item = buf.get(at + 32..at + 32 + len).context("chunk tree search: truncated item")?;
        at += 32 + len;
        if kind != CHUNK_ITEM_KEY {
            continue;
        }
        // struct btrfs_chunk: length, owner, stripe_len, type, io_align,
        // io_width, sector_size, num_stripes u16, sub_stripes u16, then
        // num_stripes struct btrfs_stripe (devid, offset, dev_uuid[16]).
        ensure!(item.len() >= 48, "chunk item too short");
        let stripes = u16::from_le_bytes([item[44], item[45]]) as usize;
        ensure!(item.len() >= 48 + 32 * stripes, "chunk item shorter than its stripes");
        out.push(Chunk {
            logical: offset,
            length: le64(item, 0),
            flags: le64(item, 24),
            stripes: (0..stripes).map(|i| (le64(item, 48 + 32 * i), le64(item, 56 + 32 * i))).collect(),
        });
    }
    Ok(out)
}

/// Maps `extents` (btrfs logical addresses) to byte offsets on the one
/// device of the file system, through `chunks`.
pub fn to_device(extents: &[FileExtent], chunks: &[Chunk]) -> Result<Vec<FileExtent>> {
    let mut out = Vec::new();
    for e in extents {
        let (mut at, end) = (e.offset, e.offset + e.bytes);
        while at < end {
            let chunk = chunks.iter().find(|c| c.logical <= at && at < c.logical + c.length).with_context(|| format!("no chunk holds logical byte {at}"))?;
            if let Some(profile) = chunk.profile() {
                bail!("the file lies in a {profile} chunk: ksave writes one copy only, on one device (btrfs data profile `single` only)");
            }
            ensure!(chunk.stripes.len() == 1, "the file lies in a chunk of {} stripes: ksave needs one", chunk.stripes.len());
            let n = (end - at).min(chunk.logical + chunk.length - at);
            push_merged(&mut out, FileExtent { offset: chunk.stripes[0].1 + (at - chunk.logical), bytes: n });
            at += n;
        }
    }
    Ok(out)
}

/// Every chunk of the file system `file` is on (TREE_SEARCH of the chunk
/// tree: root only).
fn chunks(file: &File) -> Result<Vec<Chunk>> {
    let mut all = Vec::new();
    let mut min_offset = 0u64;
    loop {
        let mut args = vec![0u64; 4096 / 8];
        // struct btrfs_ioctl_search_key: tree_id, min/max_objectid,
        // min/max_offset, min/max_transid (u64), min/max_type, nr_items.
        args[0] = CHUNK_TREE_OBJECTID;
        args[1] = FIRST_CHUNK_TREE_OBJECTID;
        args[2] = FIRST_CHUNK_TREE_OBJECTID;
        args[3] = min_offset;
        args[4] = u64::MAX;
        args[5] = 0;
        args[6] = u64::MAX;
        args[7] = CHUNK_ITEM_KEY as u64 | (CHUNK_ITEM_KEY as u64) << 32;
        args[8] = 4096; // nr_items: as many as fit
        // SAFETY: `args` is a 4096-byte struct btrfs_ioctl_search_args; the
        // kernel writes the results into its buffer part only.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), IOC_TREE_SEARCH, args.as_mut_ptr()) };
        ensure!(rc == 0, "reading btrfs's chunk tree (BTRFS_IOC_TREE_SEARCH, root only): {}", std::io::Error::last_os_error());
        let nr = args[8] as u32;
        if nr == 0 {
            return Ok(all);
        }
        let bytes: Vec<u8> = args[13..].iter().flat_map(|w| w.to_le_bytes()).collect();
        let found = parse_chunks(&bytes, nr)?;
        let Some(last) = found.last().map(|c| c.logical) else { return Ok(all) };
        all.extend(found);
        match last.checked_add(1) {
            Some(next) => min_offset = next,
            None => return Ok(all),
        }
    }
}

/// The one device of the btrfs `file` is on, and the file's `extents`
/// (btrfs logical) mapped to it. Refuses RAID and DUP chunks by their
/// profile's name, and file systems on several devices.
pub fn map(file: &File, extents: &[FileExtent]) -> Result<(PathBuf, Vec<FileExtent>)> {
    // A balance relocates data chunks as it goes, from a kernel thread the
    // jump does not stop: not while one runs (or is paused).
    let mut progress = vec![0u64; 1024 / 8];
    // SAFETY: a 1024-byte struct btrfs_ioctl_balance_args for the kernel
    // to fill.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), IOC_BALANCE_PROGRESS, progress.as_mut_ptr()) };
    let e = std::io::Error::last_os_error();
    ensure!(rc != 0 && e.raw_os_error() == Some(libc::ENOTCONN), "a btrfs balance is running or paused: it moves data, the image file's too; let it finish or cancel it (btrfs balance cancel){}", if rc != 0 { format!(" ({e})") } else { String::new() });
    let chunks = chunks(file)?;
    let on_device = to_device(extents, &chunks)?;
    let mut info = vec![0u64; 1024 / 8];
    // SAFETY: a 1024-byte struct btrfs_ioctl_fs_info_args for the kernel
    // to fill.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), IOC_FS_INFO, info.as_mut_ptr()) };
    ensure!(rc == 0, "BTRFS_IOC_FS_INFO: {}", std::io::Error::last_os_error());
    let (max_id, devices) = (info[0], info[1]);
    ensure!(devices == 1, "the file system is btrfs on {devices} devices: ksave writes the image to one device, so only a single-device btrfs");
    // The one device's id is the highest (1 unless it was replaced).
    let mut dev = vec![0u64; 4096 / 8];
    dev[0] = max_id;
    // SAFETY: a 4096-byte struct btrfs_ioctl_dev_info_args with devid set.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), IOC_DEV_INFO, dev.as_mut_ptr()) };
    ensure!(rc == 0, "BTRFS_IOC_DEV_INFO: {}", std::io::Error::last_os_error());
    let raw: Vec<u8> = dev[3072 / 8..].iter().flat_map(|w| w.to_le_bytes()).collect();
    let path = PathBuf::from(String::from_utf8_lossy(&raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())]).to_string());
    ensure!(path.is_absolute(), "btrfs did not name its device");
    ensure!(chunks.iter().all(|c| c.stripes.iter().all(|&(id, _)| id == max_id)), "btrfs chunks lie on another device than {}", path.display());
    Ok((path, on_device))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn item(logical: u64, length: u64, flags: u64, stripes: &[(u64, u64)]) -> Vec<u8> {
        let mut chunk = vec![0u8; 48 + 32 * stripes.len()];
        chunk[0..8].copy_from_slice(&length.to_le_bytes());
        chunk[24..32].copy_from_slice(&flags.to_le_bytes());
        chunk[44..46].copy_from_slice(&(stripes.len() as u16).to_le_bytes());
        for (i, (devid, offset)) in stripes.iter().enumerate() {
            chunk[48 + 32 * i..56 + 32 * i].copy_from_slice(&devid.to_le_bytes());
            chunk[56 + 32 * i..64 + 32 * i].copy_from_slice(&offset.to_le_bytes());
        }
        let mut head = vec![0u8; 32];
        head[8..16].copy_from_slice(&FIRST_CHUNK_TREE_OBJECTID.to_le_bytes());
        head[16..24].copy_from_slice(&logical.to_le_bytes());
        head[24..28].copy_from_slice(&CHUNK_ITEM_KEY.to_le_bytes());
        head[28..32].copy_from_slice(&(chunk.len() as u32).to_le_bytes());
        head.extend(chunk);
        head
    }

    #[test]
    fn a_file_in_single_chunks_maps_to_its_device() {
        // Two data chunks (type DATA = 1), laid out on the device out of
        // logical order, as mkfs and allocation leave them.
        let buf = [item(1 << 30, 256 * MIB, 1, &[(1, 500 * MIB)]), item((1 << 30) + 256 * MIB, 256 * MIB, 1, &[(1, 20 * MIB)])].concat();
        let chunks = parse_chunks(&buf, 2).unwrap();
        assert_eq!(chunks[1], Chunk { logical: (1 << 30) + 256 * MIB, length: 256 * MIB, flags: 1, stripes: vec![(1, 20 * MIB)] });
        // An extent across the chunk boundary splits in two.
        let extents = [FileExtent { offset: (1 << 30) + 255 * MIB, bytes: 2 * MIB }];
        assert_eq!(to_device(&extents, &chunks).unwrap(), [FileExtent { offset: 755 * MIB, bytes: MIB }, FileExtent { offset: 20 * MIB, bytes: MIB }]);
    }

    #[test]
    fn raid_and_dup_chunks_are_refused_by_name() {
        let raid1 = parse_chunks(&item(1 << 30, 256 * MIB, 1 | 1 << 4, &[(1, 0), (2, 0)]), 1).unwrap();
        let e = to_device(&[FileExtent { offset: 1 << 30, bytes: MIB }], &raid1).unwrap_err();
        assert!(e.to_string().contains("RAID1 chunk"), "{e}");
        let dup = parse_chunks(&item(1 << 30, 256 * MIB, 1 | 1 << 5, &[(1, 0), (1, 256 * MIB)]), 1).unwrap();
        assert!(to_device(&[FileExtent { offset: 1 << 30, bytes: MIB }], &dup).unwrap_err().to_string().contains("DUP chunk"));
        assert!(to_device(&[FileExtent { offset: 0, bytes: MIB }], &dup).unwrap_err().to_string().contains("no chunk"));
    }
}
