//! The config section of ksave.elf (`.ksave_config`, one block): what the
//! host tool tells ksave before loading it. ksave ships it unconfigured.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use bootinfo::acpi::RemappingUnit;
use uguid::Guid;

use crate::header::{FsSeen, FsSeenLe, MAX_FILESYSTEMS, RangeLe};
use crate::seal::{DataKey, KEY_LEN};
use crate::store::Claim;
use crate::{CRC32C, PAGE, Range};

/// "KSAVECFG".
pub const MAGIC: [u8; 8] = *b"KSAVECFG";
/// Config layout version: 3 added the store's claim and the file systems
/// seen, 4 the file store's map, 5 the data key of a sealed image. A
/// ksave.elf of another layout is not configured (an older one would
/// ignore the claim, write a file's partition from its start, or write an
/// encrypted store in plaintext).
pub const VERSION: u32 = 5;
/// Where the data key lies in the block, so that ksave can wipe it there.
pub const DATA_KEY_AT: usize = 3296;
/// Most RAM ranges the config carries.
pub const MAX_RANGES: usize = 128;
/// Most ACPI NVS ranges the config carries.
pub const MAX_NVS: usize = crate::header::MAX_NVS_RANGES;
/// Most IOMMUs the config carries.
pub const MAX_IOMMUS: usize = 8;
/// Bytes of the host info text.
pub const INFO_LEN: usize = 256;
const STATE_CONFIGURED: u32 = 1;
/// Largest VMCOREINFO note accepted: the kernel's text is one page plus the
/// note's head and name (`VMCOREINFO_NOTE_SIZE`, include/linux/vmcore_info.h).
pub const MAX_VMCOREINFO: u64 = 8192;

/// The block as it lies in the section (docs/FORMAT.md), little-endian.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawConfig {
    magic: [u8; 8],
    version: U32,
    state: U32,
    nonce: U64,
    created_unix: U64,
    partition_guid: [u8; 16],
    partition_first_lba: U64,
    partition_sectors: U64,
    /// Bit 0 LZ4, bit 1 the fault self-test, bit 2 a data key, bit 3 free
    /// pages as found.
    lz4: U32,
    ram_count: U32,
    ram: [RangeLe; MAX_RANGES],
    info: [u8; INFO_LEN],
    mailbox: U64,
    /// Bit 0: the signature below is known.
    facs_known: U32,
    facs_signature: U32,
    nvs_count: U32,
    nvs: [RangeLe; MAX_NVS],
    iommu_count: U32,
    /// Register bases; bit 0 set for AMD-Vi, clear for VT-d.
    iommus: [U64; MAX_IOMMUS],
    /// The VMCOREINFO note (physical start, end); empty: none.
    vmcoreinfo: RangeLe,
    claim_id: [u8; 16],
    claim_disk: [u8; 16],
    fs_count: U32,
    filesystems: [FsSeenLe; MAX_FILESYSTEMS],
    /// The file store's map, in bytes from the partition's start; 0: the
    /// partition is the store.
    file_map: U64,
    /// The CRC-32C of the map's entries.
    file_map_crc: U32,
    /// A sealed image's data key (bit 2 of `lz4` says there is one).
    data_key: [u8; KEY_LEN],
    pad: [u8; PAGE - DATA_KEY_AT - KEY_LEN - 4],
    crc: U32,
}

const _: () = assert!(size_of::<RawConfig>() == PAGE && core::mem::offset_of!(RawConfig, ram) == 72 && core::mem::offset_of!(RawConfig, data_key) == DATA_KEY_AT);

/// The block as built into ksave.elf: magic, version, not configured.
pub const SHIPPED: [u8; PAGE] = {
    let mut b = [0u8; PAGE];
    let mut i = 0;
    while i < 8 {
        b[i] = MAGIC[i];
        i += 1;
    }
    b[8] = VERSION as u8;
    b
};

/// What ksave needs to know to save.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// This save attempt's nonce.
    pub nonce: u64,
    /// When the host tool wrote the config (seconds since the epoch).
    pub created_unix: u64,
    /// The target partition's unique GUID.
    pub partition_guid: Guid,
    /// Its first LBA, as the host sees it (cross-checked by ksave).
    pub partition_first_lba: u64,
    /// Its size in sectors, as the host sees it.
    pub partition_sectors: u64,
    /// Compress with LZ4 where it pays.
    pub lz4: bool,
    /// Tests only: fault on purpose once the *writing* header is on disk,
    /// to prove a CPU exception during a save returns to the caller.
    pub selftest_fault_in_save: bool,
    /// The host proved that the kernel relies on nothing in its free pages
    /// ([`crate::header::FLAG_FREE_AS_FOUND`]); false in any doubt.
    pub free_as_found: bool,
    /// The save codes and seals its pages on this CPU alone, leaving the
    /// others offline (`ksave hibernate --one-cpu`).
    pub one_cpu: bool,
    /// The caller's RAM.
    pub ram: [Range; MAX_RANGES],
    /// How many of `ram` are used.
    pub ram_count: usize,
    /// Host info for the image header (hostname, kernel release).
    pub info: [u8; INFO_LEN],
    /// Physical address of the host tool's [`mailbox`](crate::mailbox)
    /// page, or 0 for none.
    pub mailbox: u64,
    /// This boot's ACPI FACS hardware signature, as the host read it
    /// (/sys/firmware/acpi/tables/FACS), if it could.
    pub facs_signature: Option<u32>,
    /// The caller's ACPI NVS ranges ("ACPI Non-volatile Storage" in its
    /// firmware map), saved with the RAM.
    pub nvs: [Range; MAX_NVS],
    /// How many of `nvs` are used.
    pub nvs_count: usize,
    /// The DMA remapping units the firmware's ACPI tables list (DMAR,
    /// IVRS), which ksave must keep from translating its DMA.
    pub iommus: [RemappingUnit; MAX_IOMMUS],
    /// How many of `iommus` are used.
    pub iommu_count: usize,
    /// Where the saved kernel's VMCOREINFO note is (`/sys/kernel/vmcoreinfo`),
    /// from which ksave finds its free pages; empty: none, save them all.
    pub vmcoreinfo: Range,
    /// The claim `ksave setup` wrote on the store: ksave writes there only
    /// if the store still carries it.
    pub claim: Claim,
    /// The mounted file systems as the host saw them just before the jump,
    /// for the image's header.
    pub filesystems: [FsSeen; MAX_FILESYSTEMS],
    /// How many of `filesystems` are used.
    pub fs_count: usize,
    /// The store is a file in the partition: where its map begins.
    pub file_map: Option<FileMapAt>,
    /// The store is encrypted: the data key to seal (save) or open
    /// (resume) the image with (docs/ENCRYPTION.md). ksave wipes it in its
    /// config block once it is done ([`DATA_KEY_AT`]).
    pub data_key: Option<DataKey>,
}

/// Where a file store's map is ([`crate::filemap`]), and which map the
/// host checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileMapAt {
    /// Bytes from the partition's start to the map (the file's first
    /// block), a multiple of a page and never 0.
    pub offset: u64,
    /// The CRC-32C of the map's entries, as the host read and checked them.
    pub crc: u32,
}

/// Why a config block was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// No config section magic: not a ksave image.
    BadMagic,
    /// The image was never configured (`ksave load` does that).
    NotConfigured,
    /// Another layout version.
    Version(u32),
    /// Checksum mismatch: damaged.
    Checksum,
    /// A field makes no sense.
    Field(&'static str),
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadMagic => write!(f, "no ksave config section"),
            Self::NotConfigured => {
                write!(f, "ksave.elf is not configured: load it with `ksave load`")
            }
            Self::Version(v) => write!(f, "config version {v}, this ksave reads {VERSION}"),
            Self::Checksum => write!(f, "config checksum mismatch"),
            Self::Field(what) => write!(f, "config field invalid: {what}"),
        }
    }
}

impl Config {
    /// An empty config (no RAM, no partition).
    pub fn new() -> Self {
        Self {
            nonce: 0,
            created_unix: 0,
            partition_guid: Guid::ZERO,
            partition_first_lba: 0,
            partition_sectors: 0,
            lz4: false,
            selftest_fault_in_save: false,
            free_as_found: false,
            one_cpu: false,
            ram: [Range::default(); MAX_RANGES],
            ram_count: 0,
            info: [0; INFO_LEN],
            mailbox: 0,
            facs_signature: None,
            nvs: [Range::default(); MAX_NVS],
            nvs_count: 0,
            iommus: [RemappingUnit::Vtd(0); MAX_IOMMUS],
            iommu_count: 0,
            vmcoreinfo: Range { start: 0, end: 0 },
            claim: Claim { id: [0; 16], disk: [0; 16] },
            filesystems: [FsSeen { partuuid: [0; 16], kind: 0, mounts: 0, mounted_at: 0 }; MAX_FILESYSTEMS],
            fs_count: 0,
            file_map: None,
            data_key: None,
        }
    }

    /// The RAM ranges in use.
    pub fn ram(&self) -> &[Range] {
        &self.ram[..self.ram_count]
    }

    /// The ACPI NVS ranges.
    pub fn nvs(&self) -> &[Range] {
        &self.nvs[..self.nvs_count]
    }

    /// The file systems recorded.
    pub fn filesystems(&self) -> &[FsSeen] {
        &self.filesystems[..self.fs_count]
    }

    /// The IOMMUs.
    pub fn iommus(&self) -> &[RemappingUnit] {
        &self.iommus[..self.iommu_count]
    }

    /// The info text.
    pub fn info(&self) -> &str {
        let end = self.info.iter().position(|&b| b == 0).unwrap_or(INFO_LEN);
        core::str::from_utf8(&self.info[..end]).unwrap_or("")
    }

    /// Encodes into the section's block.
    pub fn encode(&self, b: &mut [u8; PAGE]) {
        let mut ram = [RangeLe::default(); MAX_RANGES];
        for (slot, r) in ram.iter_mut().zip(self.ram()) {
            *slot = (*r).into();
        }
        let mut nvs = [RangeLe::default(); MAX_NVS];
        for (slot, r) in nvs.iter_mut().zip(self.nvs()) {
            *slot = (*r).into();
        }
        let mut iommus = [U64::ZERO; MAX_IOMMUS];
        for (slot, unit) in iommus.iter_mut().zip(self.iommus()) {
            *slot = match *unit {
                RemappingUnit::Vtd(base) => base,
                RemappingUnit::AmdVi(base) => base | 1,
            }
            .into();
        }
        let raw = RawConfig {
            magic: MAGIC,
            version: VERSION.into(),
            state: STATE_CONFIGURED.into(),
            nonce: self.nonce.into(),
            created_unix: self.created_unix.into(),
            partition_guid: self.partition_guid.to_bytes(),
            partition_first_lba: self.partition_first_lba.into(),
            partition_sectors: self.partition_sectors.into(),
            lz4: (self.lz4 as u32 | (self.selftest_fault_in_save as u32) << 1 | (self.data_key.is_some() as u32) << 2 | (self.free_as_found as u32) << 3 | (self.one_cpu as u32) << 4).into(),
            ram_count: (self.ram_count as u32).into(),
            ram,
            info: self.info,
            mailbox: self.mailbox.into(),
            facs_known: (self.facs_signature.is_some() as u32).into(),
            facs_signature: self.facs_signature.unwrap_or(0).into(),
            nvs_count: (self.nvs_count as u32).into(),
            nvs,
            iommu_count: (self.iommu_count as u32).into(),
            iommus,
            vmcoreinfo: self.vmcoreinfo.into(),
            claim_id: self.claim.id,
            claim_disk: self.claim.disk,
            fs_count: (self.fs_count as u32).into(),
            filesystems: self.filesystems.map(FsSeenLe::from),
            file_map: self.file_map.map_or(0, |m| m.offset).into(),
            file_map_crc: self.file_map.map_or(0, |m| m.crc).into(),
            data_key: self.data_key.as_ref().map_or([0; KEY_LEN], |k| k.0),
            pad: [0; _],
            crc: 0.into(),
        };
        b.copy_from_slice(raw.as_bytes());
        let crc = CRC32C.checksum(&b[..PAGE - 4]);
        b[PAGE - 4..].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes and checks the section's block.
    pub fn decode(b: &[u8; PAGE]) -> Result<Self, ConfigError> {
        let raw = RawConfig::ref_from_bytes(b).expect("a block is a config's size");
        if raw.magic != MAGIC {
            return Err(ConfigError::BadMagic);
        }
        if raw.state.get() != STATE_CONFIGURED {
            return Err(ConfigError::NotConfigured);
        }
        if CRC32C.checksum(&b[..PAGE - 4]) != raw.crc.get() {
            return Err(ConfigError::Checksum);
        }
        if raw.version.get() != VERSION {
            return Err(ConfigError::Version(raw.version.get()));
        }
        let mut c = Self::new();
        c.nonce = raw.nonce.get();
        c.created_unix = raw.created_unix.get();
        c.partition_guid = Guid::from_bytes(raw.partition_guid);
        c.partition_first_lba = raw.partition_first_lba.get();
        c.partition_sectors = raw.partition_sectors.get();
        c.lz4 = raw.lz4.get() & 1 != 0;
        c.selftest_fault_in_save = raw.lz4.get() & 2 != 0;
        c.free_as_found = raw.lz4.get() & 8 != 0;
        c.one_cpu = raw.lz4.get() & 16 != 0;
        c.ram_count = raw.ram_count.get() as usize;
        if c.ram_count == 0 || c.ram_count > MAX_RANGES {
            return Err(ConfigError::Field("RAM range count"));
        }
        c.ram_count = decode_ranges(&raw.ram[..c.ram_count], &mut c.ram).ok_or(ConfigError::Field("RAM ranges"))?;
        c.nvs_count = raw.nvs_count.get() as usize;
        if c.nvs_count > MAX_NVS {
            return Err(ConfigError::Field("NVS range count"));
        }
        c.nvs_count = decode_ranges(&raw.nvs[..c.nvs_count], &mut c.nvs).ok_or(ConfigError::Field("NVS ranges"))?;
        if c.nvs().iter().any(|n| c.ram().iter().any(|r| n.start < r.end && r.start < n.end)) {
            return Err(ConfigError::Field("NVS range overlaps RAM"));
        }
        c.iommu_count = raw.iommu_count.get() as usize;
        if c.iommu_count > MAX_IOMMUS {
            return Err(ConfigError::Field("IOMMU count"));
        }
        for (unit, raw) in c.iommus.iter_mut().zip(&raw.iommus[..c.iommu_count]) {
            let v = raw.get();
            *unit = if v & 1 != 0 { RemappingUnit::AmdVi(v & !1) } else { RemappingUnit::Vtd(v) };
        }
        if c.partition_guid.is_zero() || c.partition_sectors == 0 {
            return Err(ConfigError::Field("partition"));
        }
        c.vmcoreinfo = raw.vmcoreinfo.into();
        if c.vmcoreinfo.start > c.vmcoreinfo.end || c.vmcoreinfo.end - c.vmcoreinfo.start > MAX_VMCOREINFO {
            return Err(ConfigError::Field("vmcoreinfo note"));
        }
        c.claim = Claim { id: raw.claim_id, disk: raw.claim_disk };
        c.fs_count = raw.fs_count.get() as usize;
        if c.fs_count > MAX_FILESYSTEMS {
            return Err(ConfigError::Field("file system count"));
        }
        c.filesystems = raw.filesystems.map(FsSeen::from);
        let map = raw.file_map.get();
        if !map.is_multiple_of(PAGE as u64) || (map == 0 && raw.file_map_crc.get() != 0) {
            return Err(ConfigError::Field("file map offset"));
        }
        c.file_map = (map != 0).then(|| FileMapAt { offset: map, crc: raw.file_map_crc.get() });
        c.data_key = (raw.lz4.get() & 4 != 0).then(|| DataKey(raw.data_key));
        c.info = raw.info;
        c.mailbox = raw.mailbox.get();
        c.facs_signature = (raw.facs_known.get() & 1 != 0).then(|| raw.facs_signature.get());
        Ok(c)
    }
}

/// Copies page-aligned, sorted, disjoint, non-empty ranges into `out`;
/// `None` if any is not.
fn decode_ranges(raw: &[RangeLe], out: &mut [Range]) -> Option<usize> {
    for (i, r) in raw.iter().map(|r| Range::from(*r)).enumerate() {
        if r.start >= r.end || r.start % PAGE as u64 != 0 || r.end % PAGE as u64 != 0 || (i > 0 && r.start < out[i - 1].end) {
            return None;
        }
        out[i] = r;
    }
    Some(raw.len())
}

impl Default for Config {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_claim_and_the_file_systems_travel_in_the_config() {
        let mut c = Config::new();
        c.partition_guid = Guid::from_bytes([1; 16]);
        c.partition_sectors = 8;
        c.ram[0] = Range { start: 0, end: 0x1000 };
        c.ram_count = 1;
        c.claim = Claim { id: [5; 16], disk: [6; 16] };
        c.filesystems[1] = FsSeen { partuuid: [2; 16], kind: crate::header::FS_EXT4, mounts: 3, mounted_at: 4 };
        c.fs_count = 2;
        c.file_map = Some(FileMapAt { offset: 1 << 30, crc: 0x1234_5678 });
        c.data_key = Some(DataKey([0x77; KEY_LEN]));
        c.free_as_found = true;
        let mut block = [0u8; PAGE];
        c.encode(&mut block);
        assert_eq!(block[DATA_KEY_AT..DATA_KEY_AT + KEY_LEN], [0x77; KEY_LEN]);
        assert_eq!(Config::decode(&block), Ok(c));
    }
}
