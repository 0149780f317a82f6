//! The image header (block 0 of the partition) and the metadata blocks.
//!
//! The header is written twice: first with state [`State::Writing`] before
//! any data, last with [`State::Complete`] after every chunk is written and
//! flushed. Its CRC covers the whole block, so a torn rewrite reads as
//! invalid, never as complete.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{BackupPair, CRC32C, MAX_ALIGN, PAGE, Range};

/// "KSAVEIMG".
pub const MAGIC: [u8; 8] = *b"KSAVEIMG";
/// The format version this code writes and reads.
pub const VERSION: u32 = 2;
/// Blocks (4 KiB) of metadata after the header.
pub const META_BLOCKS: u64 = 4;
/// The metadata blocks' bytes.
pub const META_BYTES: usize = META_BLOCKS as usize * PAGE;
/// Byte offset of the metadata.
pub const META_OFFSET: u64 = PAGE as u64;
/// Byte offset of the first chunk.
pub const DATA_OFFSET: u64 = PAGE as u64 * (1 + META_BLOCKS);
/// Most RAM ranges an image can hold.
pub const MAX_RAM_RANGES: usize = 128;
/// Most ACPI NVS ranges an image can hold.
pub const MAX_NVS_RANGES: usize = 16;
/// Most backup pairs an image can hold (ksave's footprint in pages, with room).
pub const MAX_BACKUP_PAIRS: usize = (META_BLOCKS as usize * PAGE - (MAX_RAM_RANGES + MAX_NVS_RANGES) * 16) / 16;
/// Bytes of the message field.
pub const MESSAGE_LEN: usize = 256;
/// Most mounted file systems an image records ([`FsSeen`]).
pub const MAX_FILESYSTEMS: usize = 16;

/// What a mounted file system said about its mounts when the image was
/// saved: a resume is refused when it says something else, proof that it
/// was mounted since (a live system, another OS, an older kernel without
/// ksave's initramfs). Only what a mount provably changes is kept: ext2/3/4
/// count their read-write mounts and stamp the time of the last one in the
/// superblock (fs/ext4/super.c, ext4_setup_super); btrfs's superblock
/// generation moves with every transaction commit (fs/btrfs/transaction.c);
/// XFS writes every change, and the unmount record of every read-write
/// mount, to its log at the log's head (fs/xfs/xfs_log.c), so the sector at
/// the head changes. All are final once the file system is frozen for the
/// jump (the tool reads them after the freeze).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsSeen {
    /// Which file system: the partition's unique GUID (its PARTUUID),
    /// on-disk byte order ([`FS_EXT4`], [`FS_BTRFS`], [`FS_XFS`]); or the
    /// file system's own UUID ([`FS_EXT4_BY_UUID`], [`FS_BTRFS_BY_UUID`],
    /// [`FS_XFS_BY_UUID`]).
    pub partuuid: [u8; 16],
    /// One of the `FS_` kinds.
    pub kind: u32,
    /// ext4: `s_mnt_count`, read-write mounts since the last check. btrfs:
    /// 0. XFS: the CRC-32C of the log's sector at its head.
    pub mounts: u32,
    /// ext4: `s_mtime`, when it was last mounted (seconds since the epoch).
    /// btrfs: the superblock's generation. XFS: where on the device the
    /// log's head sector lies, in bytes.
    pub mounted_at: u64,
}

impl FsSeen {
    /// The file system's name as udev and blkid show it.
    pub fn id(&self) -> FsId {
        FsId { kind: self.kind, bytes: self.partuuid }
    }

    /// A btrfs kind ([`FS_BTRFS`], [`FS_BTRFS_BY_UUID`]).
    pub fn is_btrfs(&self) -> bool {
        matches!(self.kind, FS_BTRFS | FS_BTRFS_BY_UUID)
    }

    /// An XFS kind ([`FS_XFS`], [`FS_XFS_BY_UUID`]).
    pub fn is_xfs(&self) -> bool {
        matches!(self.kind, FS_XFS | FS_XFS_BY_UUID)
    }

    /// Where on its device what tells lies, in bytes: the superblock (ext,
    /// btrfs), the log's head sector (XFS).
    pub fn superblock_at(&self) -> u64 {
        match self.kind {
            FS_BTRFS | FS_BTRFS_BY_UUID => BTRFS_SUPERBLOCK_AT,
            FS_XFS | FS_XFS_BY_UUID => self.mounted_at,
            _ => EXT_SUPERBLOCK_AT,
        }
    }

    /// The refusal if what tells (the [`SUPERBLOCK_BYTES`] at
    /// [`FsSeen::superblock_at`] of its device) now says it was mounted
    /// since: ext, another mount count or last mount time; btrfs, another
    /// generation or file system; XFS, another log head sector; ext and
    /// btrfs, no such superblock at all.
    pub fn mounted_since(&self, superblock: &[u8; SUPERBLOCK_BYTES]) -> Option<crate::verdict::Refusal> {
        if self.is_xfs() {
            return (crate::CRC32C.checksum(superblock) != self.mounts).then_some(crate::verdict::Refusal::XfsLogWritten(self.id()));
        }
        if self.is_btrfs() {
            let generation = btrfs_generation(superblock).filter(|(fsid, _)| self.kind == FS_BTRFS || *fsid == self.partuuid).map_or(u64::MAX, |(_, g)| g);
            return (generation != self.mounted_at).then_some(crate::verdict::Refusal::FilesystemWritten { id: self.id(), generation: (self.mounted_at, generation) });
        }
        let (mounts, mounted_at) = ext_mount_counters(superblock).unwrap_or((u32::MAX, u64::MAX));
        (mounts != self.mounts || mounted_at != self.mounted_at).then_some(crate::verdict::Refusal::FilesystemMounted {
            id: self.id(),
            mounts: (self.mounts, mounts),
            mounted_at: (self.mounted_at, mounted_at),
        })
    }
}

/// How much of a superblock (or XFS log sector) is read: every field the
/// checks use lies in its first 512 bytes, one sector of any disk.
pub const SUPERBLOCK_BYTES: usize = 512;

/// Where an ext2/3/4 superblock lies on its device, in bytes.
pub const EXT_SUPERBLOCK_AT: u64 = 1024;
/// Where btrfs's primary superblock lies on each of its devices, in bytes
/// (fs/btrfs/disk-io.h, BTRFS_SUPER_INFO_OFFSET).
pub const BTRFS_SUPERBLOCK_AT: u64 = 65536;

/// `(fsid, generation)` of a btrfs superblock (the bytes at
/// [`BTRFS_SUPERBLOCK_AT`]: `fsid` at 0x20, the magic "_BHRfS_M" at 0x40,
/// `generation` at 0x48; include/uapi/linux/btrfs_tree.h,
/// btrfs_super_block); `None` without the magic.
pub fn btrfs_generation(superblock: &[u8; SUPERBLOCK_BYTES]) -> Option<([u8; 16], u64)> {
    let sb = superblock;
    (&sb[0x40..0x48] == b"_BHRfS_M").then(|| (sb[0x20..0x30].try_into().unwrap(), u64::from_le_bytes(sb[0x48..0x50].try_into().unwrap())))
}

/// `(sb_uuid, where its log's head sector lies)` of an XFS superblock (the
/// 512 bytes at byte 0 of its device, big-endian: the magic "XFSB" at 0,
/// `sb_blocksize` at 0x4, `sb_uuid` at 0x20, `sb_logstart` at 0x30,
/// `sb_agblocks` at 0x54, `sb_agblklog` at 0x7c; fs/xfs/libxfs/xfs_format.h)
/// and the head's block in the log (512-byte units, as
/// /sys/fs/xfs/DEV/log/log_head_lsn gives it). `None` without the magic,
/// or with the log on another device (`sb_logstart` 0).
pub fn xfs_log_head(superblock: &[u8; SUPERBLOCK_BYTES], head_block: u64) -> Option<([u8; 16], u64)> {
    let sb = superblock;
    let be32 = |at: usize| u32::from_be_bytes(sb[at..at + 4].try_into().unwrap()) as u64;
    if &sb[0..4] != b"XFSB" {
        return None;
    }
    let log_start = u64::from_be_bytes(sb[0x30..0x38].try_into().unwrap());
    let agblklog = u32::from(sb[0x7c]);
    if log_start == 0 || agblklog >= 64 {
        return None;
    }
    // XFS_FSB_TO_DADDR: a file system block number is (AG << agblklog) |
    // block in the AG; an AG spans sb_agblocks blocks.
    let (ag, block) = (log_start >> agblklog, log_start & ((1 << agblklog) - 1));
    let at = ag.checked_mul(be32(0x54))?.checked_add(block)?.checked_mul(be32(0x4))?.checked_add(head_block.checked_mul(512)?)?;
    Some((sb[0x20..0x30].try_into().unwrap(), at))
}

/// `(s_mnt_count, s_mtime)` of an ext2/3/4 superblock (the 1024 bytes at
/// byte 1024 of its device: `s_mtime` at 0x2C, `s_mnt_count` at 0x34, the
/// magic 0xEF53 at 0x38; fs/ext4/super.c `ext4_setup_super` moves both at
/// every read-write mount); `None` without the magic.
pub fn ext_mount_counters(superblock: &[u8; SUPERBLOCK_BYTES]) -> Option<(u32, u64)> {
    let sb = superblock;
    (u16::from_le_bytes([sb[0x38], sb[0x39]]) == 0xEF53).then(|| {
        let mounts = u16::from_le_bytes([sb[0x34], sb[0x35]]) as u32;
        let mtime = u32::from_le_bytes([sb[0x2C], sb[0x2D], sb[0x2E], sb[0x2F]]) as u64;
        (mounts, mtime)
    })
}

/// A recorded file system's name: `PARTUUID x` (a GPT GUID, its first
/// three fields little-endian on disk) or `UUID x` (ext4's `s_uuid`, bytes
/// in order), as udev and blkid write them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsId {
    kind: u32,
    bytes: [u8; 16],
}

impl core::fmt::Display for FsId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if matches!(self.kind, FS_EXT4_BY_UUID | FS_BTRFS_BY_UUID | FS_XFS_BY_UUID) {
            let b = u128::from_be_bytes(self.bytes);
            let hex = |shift: u32, bits: u32| (b >> shift) & ((1u128 << bits) - 1);
            write!(f, "UUID {:08x}-{:04x}-{:04x}-{:04x}-{:012x}", hex(96, 32), hex(80, 16), hex(64, 16), hex(48, 16), hex(0, 48))
        } else {
            write!(f, "PARTUUID {}", uguid::Guid::from_bytes(self.bytes))
        }
    }
}

/// [`FsSeen::kind`]: an ext2/3/4 superblock on the partition named by its
/// PARTUUID.
pub const FS_EXT4: u32 = 1;
/// [`FsSeen::kind`]: an ext2/3/4 superblock found by its own UUID
/// (`s_uuid`): one on a device-mapper volume (dm-crypt, LVM), which has no
/// PARTUUID.
pub const FS_EXT4_BY_UUID: u32 = 2;
/// [`FsSeen::kind`]: a btrfs superblock on the partition named by its
/// PARTUUID (the device it is mounted from).
pub const FS_BTRFS: u32 = 3;
/// [`FsSeen::kind`]: a btrfs superblock found by its own fsid: one on a
/// device-mapper volume.
pub const FS_BTRFS_BY_UUID: u32 = 4;
/// [`FsSeen::kind`]: an XFS, its log internal, on the partition named by
/// its PARTUUID.
pub const FS_XFS: u32 = 5;
/// [`FsSeen::kind`]: an XFS found by its own `sb_uuid`: one on a
/// device-mapper volume.
pub const FS_XFS_BY_UUID: u32 = 6;

/// [`FsSeen`] as it lies in the header and the config.
#[derive(Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FsSeenLe {
    partuuid: [u8; 16],
    kind: U32,
    mounts: U32,
    mounted_at: U64,
}

impl From<FsSeen> for FsSeenLe {
    fn from(f: FsSeen) -> Self {
        Self { partuuid: f.partuuid, kind: f.kind.into(), mounts: f.mounts.into(), mounted_at: f.mounted_at.into() }
    }
}

impl From<FsSeenLe> for FsSeen {
    fn from(f: FsSeenLe) -> Self {
        Self { partuuid: f.partuuid, kind: f.kind.get(), mounts: f.mounts.get(), mounted_at: f.mounted_at.get() }
    }
}

/// Where an image stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum State {
    /// A save has begun and not finished: never restorable.
    Writing = 1,
    /// Every chunk is on disk and flushed.
    Complete = 2,
    /// Resumed once, or invalidated by the user: never restorable again.
    Invalidated = 3,
    /// The save failed; the message says why. Not an image.
    Failed = 4,
}

impl State {
    fn from_u32(v: u32) -> Option<Self> {
        [Self::Writing, Self::Complete, Self::Invalidated, Self::Failed].into_iter().find(|s| *s as u32 == v)
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Writing => "writing",
            Self::Complete => "complete",
            Self::Invalidated => "invalidated",
            Self::Failed => "failed",
        }
    }
}

/// The header's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Where the image stands.
    pub state: State,
    /// The save attempt's nonce (from the config the host tool wrote).
    pub nonce: u64,
    /// When the host tool loaded ksave (seconds since the epoch).
    pub created_unix: u64,
    /// The caller's re-entry address.
    pub reentry: u64,
    /// ksave's own load range.
    pub image: Range,
    /// Image flags (`FLAG_*`).
    pub flags: u32,
    /// RAM ranges in the metadata blocks.
    pub ram_ranges: u32,
    /// Backup pairs in the metadata blocks.
    pub backup_pairs: u32,
    /// CRC-32C of the metadata bytes in use.
    pub meta_crc: u32,
    /// Chunks written.
    pub chunks: u64,
    /// Bytes of chunk data after [`DATA_OFFSET`].
    pub data_bytes: u64,
    /// Non-zero pages stored.
    pub pages_stored: u64,
    /// All-zero pages left out.
    pub pages_zero: u64,
    /// CRC-32C over every chunk header's CRC, in order: ties the set.
    pub chunks_crc: u32,
    /// Microseconds the save took.
    pub save_us: u64,
    /// Failure code for [`State::Failed`] (`FAIL_*`), else 0.
    pub fail_code: u32,
    /// Creation info, or what went wrong (NUL-padded UTF-8).
    pub message: [u8; MESSAGE_LEN],
    /// CPUID leaf 0 vendor string of the CPU that saved: restore refuses
    /// another vendor.
    pub cpu_vendor: [u8; 12],
    /// The GDT to load before going back into the saved kernel (its own
    /// per-CPU GDT, by virtual address), or base 0 for none: kernels before
    /// the "Restore GDT on return from ::preserve_context kexec" fix load
    /// segments from whatever GDTR holds.
    pub return_gdt: (u64, u16),
    /// CR4 bits the saved kernel's return path needs before it restores its
    /// own CR4 ([`CR4_NEEDED`]): LA57, its paging mode.
    pub cr4_needed: u64,
    /// The ACPI FACS hardware signature when the image was saved, if known:
    /// firmware changes it when the hardware changed, and such an image is
    /// not resumed (ACPI 6.5, 5.2.10).
    pub facs_signature: Option<u32>,
    /// ACPI NVS ranges in the metadata blocks (after the backup pairs):
    /// firmware memory that is not RAM but that the saved kernel's firmware
    /// calls rely on, saved and put back as Linux's own hibernation does
    /// (kernel/power/suspend_nvs.c).
    pub nvs_ranges: u32,
    /// Bytes every chunk starts on and is padded to: the logical block
    /// size of the disk it was written to (512 or 4096), so that every read
    /// and write is whole blocks. 0 on disk means 512.
    pub align: u32,
    /// Pages left out because the saved kernel's allocator held them free
    /// (listed in free-run chunks).
    pub pages_free: u64,
    /// How free pages were recognized (`freepages::vmcoreinfo::Rule::code`;
    /// 0: they were not, every non-zero page was saved).
    pub free_rule: u32,
    /// The store's claim ([`crate::store::Claim`]), kept by every header
    /// written after `ksave setup`.
    pub claim: crate::store::Claim,
    /// The mounted file systems the saved system had, as they were.
    pub filesystems: [FsSeen; MAX_FILESYSTEMS],
    /// How many of `filesystems` are used.
    pub fs_count: u32,
    /// A sealed image's tag of its metadata ([`crate::seal::Seal::meta_tag`]);
    /// zero in a plain one.
    pub meta_tag: [u8; crate::seal::TAG_LEN],
    /// A sealed image's tag of this header ([`crate::seal::Seal::header_tag`]);
    /// zero in a plain one.
    pub tag: [u8; crate::seal::TAG_LEN],
}

/// The CR4 bits recorded in [`Header::cr4_needed`]: relocate_kernel's way
/// back loads the kernel's identity table, then its own CR3, before it
/// restores CR4 (arch/x86/kernel/relocate_kernel_64.S): both are read in
/// the paging mode the CPU is in, which must be the kernel's.
pub const CR4_NEEDED: u64 = 1 << 12;

/// Some chunks are LZ4-compressed.
pub const FLAG_LZ4: u32 = 1 << 0;
/// A fresh kernel's `ksave resume` handed this image to ksave. Found again
/// at a later boot, the attempt did not finish (ksave invalidates what it
/// resumes): the image is invalidated then, so that no boot loops on it.
pub const FLAG_RESUME_ATTEMPTED: u32 = 1 << 1;
/// The saved kernel's IOMMU was translating DMA at its jump (a kernel whose
/// IOMMU driver has no suspend hook: CONFIG_SUSPEND off). ksave switched
/// translation off for its own DMA and on again for the way back, but a
/// fresh boot cannot recreate the kernel's translation state: such an image
/// is a snapshot only, never resumed.
pub const FLAG_IOMMU_LEFT_ON: u32 = 1 << 2;

/// The image is sealed (docs/ENCRYPTION.md): every chunk's payload is
/// encrypted and every chunk header, this header and the metadata are
/// authenticated under a data key kept in the store's key block.
pub const FLAG_SEALED: u32 = 1 << 3;

/// The saved kernel was proven, at hibernate, to rely on nothing in the
/// pages it holds free (neither `init_on_free` nor page poisoning): a
/// resume leaves the free pages the image lists as it finds them, instead
/// of zeroing them. Clear (every older image): they are zeroed.
pub const FLAG_FREE_AS_FOUND: u32 = 1 << 4;

/// Why a header was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Not a ksave header at all.
    BadMagic,
    /// Made by another format version.
    Version(u32),
    /// The CRC does not match: torn or corrupted.
    Checksum,
    /// A field is out of range.
    Field(&'static str),
}

impl core::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadMagic => write!(f, "no ksave image header"),
            Self::Version(v) => write!(f, "image format version {v}, this ksave reads {VERSION}"),
            Self::Checksum => write!(f, "header checksum mismatch (torn or corrupted)"),
            Self::Field(what) => write!(f, "header field out of range: {what}"),
        }
    }
}

impl Header {
    /// A header with everything zero but `state` and `nonce`.
    pub fn new(state: State, nonce: u64) -> Self {
        Self {
            state,
            nonce,
            created_unix: 0,
            reentry: 0,
            image: Range::default(),
            flags: 0,
            ram_ranges: 0,
            backup_pairs: 0,
            meta_crc: 0,
            chunks: 0,
            data_bytes: 0,
            pages_stored: 0,
            pages_zero: 0,
            chunks_crc: 0,
            save_us: 0,
            fail_code: 0,
            message: [0; MESSAGE_LEN],
            cpu_vendor: [0; 12],
            return_gdt: (0, 0),
            cr4_needed: 0,
            facs_signature: None,
            nvs_ranges: 0,
            align: 512,
            pages_free: 0,
            free_rule: 0,
            claim: crate::store::Claim { id: [0; 16], disk: [0; 16] },
            filesystems: [FsSeen { partuuid: [0; 16], kind: 0, mounts: 0, mounted_at: 0 }; MAX_FILESYSTEMS],
            fs_count: 0,
            meta_tag: [0; crate::seal::TAG_LEN],
            tag: [0; crate::seal::TAG_LEN],
        }
    }

    /// Whether the image is sealed ([`FLAG_SEALED`]).
    pub fn sealed(&self) -> bool {
        self.flags & FLAG_SEALED != 0
    }

    /// The block a sealed header's tag covers (all but its tag and CRC):
    /// this header as its save wrote it complete, whatever the state and
    /// the resume mark say now (an invalidated image is refused by its
    /// state; its key block is destroyed besides).
    pub fn tagged_block(&self, b: &mut [u8; PAGE]) {
        let mut h = self.clone();
        h.state = State::Complete;
        h.flags &= !FLAG_RESUME_ATTEMPTED;
        h.tag = [0; crate::seal::TAG_LEN];
        h.encode(b);
    }

    /// The file systems recorded.
    pub fn filesystems(&self) -> &[FsSeen] {
        &self.filesystems[..(self.fs_count as usize).min(MAX_FILESYSTEMS)]
    }

    /// The header `ksave setup` writes on a store it claims: no image
    /// (state [`State::Invalidated`], never restorable), the claim, and
    /// `message` saying so.
    pub fn claiming(claim: crate::store::Claim, message: &str) -> Self {
        let mut h = Self::new(State::Invalidated, 0);
        h.claim = claim;
        h.set_message(message);
        h
    }

    /// Sets the message (cut at [`MESSAGE_LEN`] bytes on a char boundary).
    pub fn set_message(&mut self, text: &str) {
        self.message = [0; MESSAGE_LEN];
        let mut n = text.len().min(MESSAGE_LEN);
        while !text.is_char_boundary(n) {
            n -= 1;
        }
        self.message[..n].copy_from_slice(&text.as_bytes()[..n]);
    }

    /// The message text.
    pub fn message(&self) -> &str {
        let end = self.message.iter().position(|&b| b == 0).unwrap_or(MESSAGE_LEN);
        core::str::from_utf8(&self.message[..end]).unwrap_or("(not UTF-8)")
    }

    /// Encodes into one block.
    pub fn encode(&self, b: &mut [u8; PAGE]) {
        let raw = RawHeader {
            magic: MAGIC,
            version: VERSION.into(),
            state: (self.state as u32).into(),
            nonce: self.nonce.into(),
            created_unix: self.created_unix.into(),
            reentry: self.reentry.into(),
            image: self.image.into(),
            page_size: (PAGE as u32).into(),
            flags: self.flags.into(),
            ram_ranges: self.ram_ranges.into(),
            backup_pairs: self.backup_pairs.into(),
            meta_crc: self.meta_crc.into(),
            chunks_crc: self.chunks_crc.into(),
            chunks: self.chunks.into(),
            data_bytes: self.data_bytes.into(),
            pages_stored: self.pages_stored.into(),
            pages_zero: self.pages_zero.into(),
            save_us: self.save_us.into(),
            fail_code: self.fail_code.into(),
            reserved: [0; _],
            message: self.message,
            cpu_vendor: self.cpu_vendor,
            reserved2: [0; _],
            return_gdt_base: self.return_gdt.0.into(),
            return_gdt_limit: self.return_gdt.1.into(),
            reserved3: [0; _],
            cr4_needed: self.cr4_needed.into(),
            facs_known: (self.facs_signature.is_some() as u32).into(),
            facs_signature: self.facs_signature.unwrap_or(0).into(),
            nvs_ranges: self.nvs_ranges.into(),
            align: self.align.into(),
            pages_free: self.pages_free.into(),
            free_rule: self.free_rule.into(),
            reserved4: [0; _],
            claim_id: self.claim.id,
            claim_disk: self.claim.disk,
            fs_count: self.fs_count.into(),
            reserved5: [0; _],
            filesystems: self.filesystems.map(FsSeenLe::from),
            pad: [0; _],
            meta_tag: self.meta_tag,
            tag: self.tag,
            crc: 0.into(),
        };
        b.copy_from_slice(raw.as_bytes());
        let crc = CRC32C.checksum(&b[..PAGE - 4]);
        b[PAGE - 4..].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes and checks one block.
    pub fn decode(b: &[u8; PAGE]) -> Result<Self, HeaderError> {
        let raw = RawHeader::ref_from_bytes(b).expect("a block is a header's size");
        if raw.magic != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if CRC32C.checksum(&b[..PAGE - 4]) != raw.crc.get() {
            return Err(HeaderError::Checksum);
        }
        if raw.version.get() != VERSION {
            return Err(HeaderError::Version(raw.version.get()));
        }
        let state = State::from_u32(raw.state.get()).ok_or(HeaderError::Field("state"))?;
        if raw.page_size.get() != PAGE as u32 {
            return Err(HeaderError::Field("page size"));
        }
        let h = Self {
            state,
            nonce: raw.nonce.get(),
            created_unix: raw.created_unix.get(),
            reentry: raw.reentry.get(),
            image: raw.image.into(),
            flags: raw.flags.get(),
            ram_ranges: raw.ram_ranges.get(),
            backup_pairs: raw.backup_pairs.get(),
            meta_crc: raw.meta_crc.get(),
            chunks_crc: raw.chunks_crc.get(),
            chunks: raw.chunks.get(),
            data_bytes: raw.data_bytes.get(),
            pages_stored: raw.pages_stored.get(),
            pages_zero: raw.pages_zero.get(),
            save_us: raw.save_us.get(),
            fail_code: raw.fail_code.get(),
            message: raw.message,
            cpu_vendor: raw.cpu_vendor,
            return_gdt: (raw.return_gdt_base.get(), raw.return_gdt_limit.get()),
            cr4_needed: raw.cr4_needed.get(),
            facs_signature: (raw.facs_known.get() & 1 != 0).then(|| raw.facs_signature.get()),
            nvs_ranges: raw.nvs_ranges.get(),
            align: match raw.align.get() {
                0 => 512,
                a => a,
            },
            pages_free: raw.pages_free.get(),
            free_rule: raw.free_rule.get(),
            claim: crate::store::Claim { id: raw.claim_id, disk: raw.claim_disk },
            filesystems: raw.filesystems.map(FsSeen::from),
            fs_count: raw.fs_count.get(),
            meta_tag: raw.meta_tag,
            tag: raw.tag,
        };
        if h.fs_count as usize > MAX_FILESYSTEMS {
            return Err(HeaderError::Field("file system count"));
        }
        if h.align != 512 && h.align != MAX_ALIGN {
            return Err(HeaderError::Field("alignment"));
        }
        if h.ram_ranges as usize > MAX_RAM_RANGES {
            return Err(HeaderError::Field("RAM range count"));
        }
        if h.backup_pairs as usize > MAX_BACKUP_PAIRS {
            return Err(HeaderError::Field("backup pair count"));
        }
        if h.nvs_ranges as usize > MAX_NVS_RANGES {
            return Err(HeaderError::Field("NVS range count"));
        }
        if h.image.start > h.image.end {
            return Err(HeaderError::Field("ksave range"));
        }
        Ok(h)
    }
}

/// The header block as it lies on disk (docs/FORMAT.md), little-endian.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHeader {
    magic: [u8; 8],
    version: U32,
    state: U32,
    nonce: U64,
    created_unix: U64,
    reentry: U64,
    image: RangeLe,
    page_size: U32,
    flags: U32,
    ram_ranges: U32,
    backup_pairs: U32,
    meta_crc: U32,
    chunks_crc: U32,
    chunks: U64,
    data_bytes: U64,
    pages_stored: U64,
    pages_zero: U64,
    save_us: U64,
    fail_code: U32,
    reserved: [u8; 4],
    message: [u8; MESSAGE_LEN],
    cpu_vendor: [u8; 12],
    reserved2: [u8; 4],
    return_gdt_base: U64,
    return_gdt_limit: U16,
    reserved3: [u8; 6],
    cr4_needed: U64,
    facs_known: U32,
    facs_signature: U32,
    nvs_ranges: U32,
    align: U32,
    pages_free: U64,
    free_rule: U32,
    reserved4: [u8; 4],
    claim_id: [u8; 16],
    claim_disk: [u8; 16],
    fs_count: U32,
    reserved5: [u8; 4],
    filesystems: [FsSeenLe; MAX_FILESYSTEMS],
    pad: [u8; crate::seal::META_TAG_AT - 496 - 32 * MAX_FILESYSTEMS],
    meta_tag: [u8; crate::seal::TAG_LEN],
    tag: [u8; crate::seal::TAG_LEN],
    crc: U32,
}

const _: () = assert!(
    size_of::<RawHeader>() == PAGE
        && core::mem::offset_of!(RawHeader, message) == 128
        && core::mem::offset_of!(RawHeader, cr4_needed) == 416
        && core::mem::offset_of!(RawHeader, pages_free) == 440
        && core::mem::offset_of!(RawHeader, claim_id) == 456
        && core::mem::offset_of!(RawHeader, filesystems) == 496
        && core::mem::offset_of!(RawHeader, meta_tag) == crate::seal::META_TAG_AT
);

/// Two little-endian u64s: a [`Range`] or a [`BackupPair`] on disk.
#[derive(Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RangeLe {
    first: U64,
    second: U64,
}

impl From<Range> for RangeLe {
    fn from(r: Range) -> Self {
        Self { first: r.start.into(), second: r.end.into() }
    }
}

impl From<RangeLe> for Range {
    fn from(r: RangeLe) -> Self {
        Self { start: r.first.get(), end: r.second.get() }
    }
}

impl From<BackupPair> for RangeLe {
    fn from(p: BackupPair) -> Self {
        Self { first: p.dest.into(), second: p.src.into() }
    }
}

impl From<RangeLe> for BackupPair {
    fn from(r: RangeLe) -> Self {
        Self { dest: r.first.get(), src: r.second.get() }
    }
}

/// Failure codes of a [`State::Failed`] record.
pub mod fail {
    /// The config section is missing or invalid.
    pub const CONFIG: u32 = 1;
    /// The backup map could not be proven right.
    pub const BACKUP_MAP: u32 = 2;
    /// The partition is smaller than the worst case.
    pub const TOO_SMALL: u32 = 3;
    /// A disk error.
    pub const IO: u32 = 4;
    /// The partition does not match what the host recorded.
    pub const PARTITION: u32 = 5;
    /// RAM the config lists is not reachable.
    pub const MEMORY: u32 = 6;
    /// The kexec caller's control page did not verify.
    pub const CONTEXT: u32 = 7;
    /// ksave took a CPU exception (reported through the mailbox).
    pub const EXCEPTION: u32 = 8;
    /// ksave panicked: a bug in ksave (reported through the mailbox).
    pub const PANIC: u32 = 9;
    /// The store does not carry the config's claim: nothing was written
    /// there, not even this record (reported through the mailbox).
    pub const NOT_CLAIMED: u32 = 10;
}

/// What the metadata blocks list: the memory saved and where the caller's
/// displaced pages are.
#[derive(Clone, Copy)]
pub struct MetaLists<'a> {
    /// RAM ranges saved.
    pub ram: &'a [Range],
    /// The caller's backup pairs.
    pub backup: &'a [BackupPair],
    /// ACPI NVS ranges saved.
    pub nvs: &'a [Range],
}

/// Bytes of metadata for `ram` ranges, `backup` pairs and `nvs` ranges.
pub fn meta_len(ram: usize, backup: usize, nvs: usize) -> usize {
    size_of::<RangeLe>() * (ram + backup + nvs)
}

/// Writes the RAM ranges, the backup pairs, then the NVS ranges into `out`
/// (the metadata blocks); returns the bytes used and their CRC.
pub fn encode_meta(lists: MetaLists, out: &mut [u8]) -> (usize, u32) {
    let MetaLists { ram, backup, nvs } = lists;
    assert!(ram.len() <= MAX_RAM_RANGES && backup.len() <= MAX_BACKUP_PAIRS && nvs.len() <= MAX_NVS_RANGES);
    let len = meta_len(ram.len(), backup.len(), nvs.len());
    let slots = <[RangeLe]>::mut_from_bytes(&mut out[..len]).expect("metadata fits its blocks");
    let items = ram.iter().map(|r| RangeLe::from(*r)).chain(backup.iter().map(|p| RangeLe::from(*p))).chain(nvs.iter().map(|r| RangeLe::from(*r)));
    for (slot, item) in slots.iter_mut().zip(items) {
        *slot = item;
    }
    (len, CRC32C.checksum(&out[..len]))
}

/// The metadata, checked against its header.
pub struct Meta<'a> {
    bytes: &'a [u8],
    ram: &'a [RangeLe],
    backup: &'a [RangeLe],
    nvs: &'a [RangeLe],
}

impl<'a> Meta<'a> {
    /// Checks `bytes` (the metadata blocks) against the header's counts and CRC.
    pub fn parse(header: &Header, bytes: &'a [u8]) -> Result<Self, HeaderError> {
        let (ram, backup, nvs) = (header.ram_ranges as usize, header.backup_pairs as usize, header.nvs_ranges as usize);
        let len = meta_len(ram, backup, nvs);
        if bytes.len() < len {
            return Err(HeaderError::Field("metadata length"));
        }
        if CRC32C.checksum(&bytes[..len]) != header.meta_crc {
            return Err(HeaderError::Checksum);
        }
        let items = <[RangeLe]>::ref_from_bytes(&bytes[..len]).map_err(|_| HeaderError::Field("metadata length"))?;
        let (ram, rest) = items.split_at(ram);
        let (backup, nvs) = rest.split_at(backup);
        let meta = Self { bytes: &bytes[..len], ram, backup, nvs };
        let bad = |r: Range| r.start > r.end || !r.start.is_multiple_of(PAGE as u64) || !r.end.is_multiple_of(PAGE as u64);
        // Sorted and apart (docs/FORMAT.md): no page is saved, or counted, twice.
        let unsorted = |rs: &[RangeLe]| rs.windows(2).any(|w| Range::from(w[1]).start < Range::from(w[0]).end);
        if meta.ram_ranges().any(bad) || unsorted(meta.ram) {
            return Err(HeaderError::Field("RAM range"));
        }
        if meta.nvs_ranges().any(bad) || unsorted(meta.nvs) {
            return Err(HeaderError::Field("NVS range"));
        }
        if meta.nvs_ranges().any(|n| meta.ram_ranges().any(|r| n.start < r.end && r.start < n.end)) {
            return Err(HeaderError::Field("NVS range overlaps RAM"));
        }
        Ok(meta)
    }

    /// The metadata bytes in use (a sealed image's tag covers them).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The RAM ranges saved.
    pub fn ram_ranges(&self) -> impl Iterator<Item = Range> + '_ {
        self.ram.iter().map(|r| Range::from(*r))
    }

    /// The ACPI NVS ranges saved.
    pub fn nvs_ranges(&self) -> impl Iterator<Item = Range> + '_ {
        self.nvs.iter().map(|r| Range::from(*r))
    }

    /// Every range whose pages the image holds: RAM, then NVS.
    pub fn saved_ranges(&self) -> impl Iterator<Item = Range> + '_ {
        self.ram_ranges().chain(self.nvs_ranges())
    }

    /// The backup pairs.
    pub fn backup_pairs(&self) -> impl Iterator<Item = BackupPair> + '_ {
        self.backup.iter().map(|p| BackupPair::from(*p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::string::ToString;

    fn ext_superblock(mounts: u16, mtime: u32) -> [u8; SUPERBLOCK_BYTES] {
        let mut sb = [0u8; SUPERBLOCK_BYTES];
        sb[0x38..0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        sb[0x34..0x36].copy_from_slice(&mounts.to_le_bytes());
        sb[0x2C..0x30].copy_from_slice(&mtime.to_le_bytes());
        sb
    }

    #[test]
    fn an_ext4_superblock_says_its_mounts() {
        assert_eq!(ext_mount_counters(&[0u8; SUPERBLOCK_BYTES]), None);
        assert_eq!(ext_mount_counters(&ext_superblock(7, 1_700_000_000)), Some((7, 1_700_000_000)));
    }

    #[test]
    fn a_mount_since_is_a_refusal_and_nothing_else_is() {
        let fs = FsSeen { partuuid: [1; 16], kind: FS_EXT4, mounts: 7, mounted_at: 100 };
        assert_eq!(fs.mounted_since(&ext_superblock(7, 100)), None);
        assert_eq!(fs.mounted_since(&ext_superblock(8, 200)).map(|r| r.code()), Some(crate::verdict::code::FILESYSTEM_MOUNTED));
        // A mount count wrapped or reset by e2fsck, the same time: changed.
        assert!(fs.mounted_since(&ext_superblock(0, 100)).is_some());
        assert!(fs.mounted_since(&ext_superblock(7, 101)).is_some());
        // No ext superblock there any more (reformatted): changed.
        assert!(fs.mounted_since(&[0u8; SUPERBLOCK_BYTES]).is_some());
    }

    /// A btrfs superblock (its first 512 bytes, at 64 KiB) of `fsid` at
    /// `generation`.
    fn btrfs_superblock(fsid: [u8; 16], generation: u64) -> [u8; SUPERBLOCK_BYTES] {
        let mut sb = [0u8; SUPERBLOCK_BYTES];
        sb[0x20..0x30].copy_from_slice(&fsid);
        sb[0x40..0x48].copy_from_slice(b"_BHRfS_M");
        sb[0x48..0x50].copy_from_slice(&generation.to_le_bytes());
        sb
    }

    #[test]
    fn a_btrfs_written_since_is_a_refusal_and_nothing_else_is() {
        let by_partuuid = FsSeen { partuuid: [1; 16], kind: FS_BTRFS, mounts: 0, mounted_at: 41 };
        assert_eq!(by_partuuid.superblock_at(), 65536);
        assert_eq!(btrfs_generation(&btrfs_superblock([9; 16], 41)), Some(([9; 16], 41)));
        assert_eq!(by_partuuid.mounted_since(&btrfs_superblock([9; 16], 41)), None);
        let written = by_partuuid.mounted_since(&btrfs_superblock([9; 16], 42)).unwrap();
        assert_eq!(written.code(), crate::verdict::code::FILESYSTEM_MOUNTED);
        // No btrfs there any more, or an ext superblock where it was.
        assert!(by_partuuid.mounted_since(&[0u8; SUPERBLOCK_BYTES]).is_some());
        // Found by its fsid: another fsid at the same generation is not it.
        let by_uuid = FsSeen { partuuid: [9; 16], kind: FS_BTRFS_BY_UUID, mounts: 0, mounted_at: 41 };
        assert_eq!(by_uuid.mounted_since(&btrfs_superblock([9; 16], 41)), None);
        assert!(by_uuid.mounted_since(&btrfs_superblock([8; 16], 41)).is_some());
        assert_eq!(by_uuid.id().to_string(), "UUID 09090909-0909-0909-0909-090909090909");
    }

    #[test]
    fn an_xfs_log_head_is_found_and_a_write_there_is_a_refusal() {
        // mkfs.xfs's layout for a 1 GiB file system: 4 KiB blocks, AGs of
        // 65536 blocks (agblklog 16), the log in AG 2 at block 10.
        let mut sb = [0u8; SUPERBLOCK_BYTES];
        sb[0..4].copy_from_slice(b"XFSB");
        sb[4..8].copy_from_slice(&4096u32.to_be_bytes());
        sb[0x20..0x30].copy_from_slice(&[7; 16]);
        sb[0x30..0x38].copy_from_slice(&((2u64 << 16) | 10).to_be_bytes());
        sb[0x54..0x58].copy_from_slice(&65536u32.to_be_bytes());
        sb[0x7c] = 16;
        assert_eq!(xfs_log_head(&sb, 3), Some(([7; 16], (2 * 65536 + 10) * 4096 + 3 * 512)));
        // An external log, or no XFS: nothing to record.
        let mut external = sb;
        external[0x30..0x38].fill(0);
        assert_eq!(xfs_log_head(&external, 3), None);
        assert_eq!(xfs_log_head(&[0; SUPERBLOCK_BYTES], 3), None);
        let head = [0x5a; SUPERBLOCK_BYTES];
        let fs = FsSeen { partuuid: [1; 16], kind: FS_XFS, mounts: crate::CRC32C.checksum(&head), mounted_at: 4096 };
        assert_eq!(fs.superblock_at(), 4096);
        assert_eq!(fs.mounted_since(&head), None);
        let mut written = head;
        written[0..4].copy_from_slice(&0xFEED_BABEu32.to_be_bytes()); // a log record's magic
        assert_eq!(fs.mounted_since(&written).map(|r| r.code()), Some(crate::verdict::code::FILESYSTEM_MOUNTED));
    }

    #[test]
    fn a_file_system_is_named_as_blkid_names_it() {
        let bytes = [0xb0, 0x41, 0xe9, 0x1b, 0x48, 0xca, 0x95, 0x44, 0xa8, 0x6d, 0x4f, 0xa0, 0xcc, 0x0f, 0x15, 0x1d];
        let by_uuid = FsSeen { partuuid: bytes, kind: FS_EXT4_BY_UUID, mounts: 0, mounted_at: 0 };
        assert_eq!(by_uuid.id().to_string(), "UUID b041e91b-48ca-9544-a86d-4fa0cc0f151d");
        let by_partuuid = FsSeen { kind: FS_EXT4, ..by_uuid };
        assert_eq!(by_partuuid.id().to_string(), "PARTUUID 1be941b0-ca48-4495-a86d-4fa0cc0f151d");
    }

    #[test]
    fn the_file_systems_seen_round_trip_and_are_bounded() {
        let mut h = Header::new(State::Complete, 7);
        h.filesystems[0] = FsSeen { partuuid: [0xab; 16], kind: FS_EXT4, mounts: 12, mounted_at: 1_700_000_123 };
        h.fs_count = 1;
        let mut block = [0u8; PAGE];
        h.encode(&mut block);
        let back = Header::decode(&block).unwrap();
        assert_eq!(back.filesystems(), &h.filesystems[..1]);
        h.fs_count = MAX_FILESYSTEMS as u32 + 1;
        h.encode(&mut block);
        assert_eq!(Header::decode(&block), Err(HeaderError::Field("file system count")));
    }
}
