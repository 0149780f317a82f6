//! The setup file (default /etc/ksave.conf): which partition, and how.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use diskdrv::part::Guid;

use ksave_format::store::Claim;

use crate::sys::PartInfo;

/// What `ksave setup` recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setup {
    /// The target partition's device.
    pub device: PathBuf,
    /// Its unique GUID.
    pub guid: Guid,
    /// Its first LBA, for ksave's cross-check.
    pub first_lba: u64,
    /// Its size in sectors.
    pub sectors: u64,
    /// Compress with LZ4.
    pub lz4: bool,
    /// The ksave image to load.
    pub elf: PathBuf,
    /// The claim setup wrote on the partition (its id and the disk's GUID).
    pub claim: Claim,
    /// A file store: the file in the partition, and its map.
    pub file: Option<FileStore>,
}

/// A file store as setup recorded it (docs/FORMAT.md, "File stores").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStore {
    /// The file.
    pub path: PathBuf,
    /// Its map's first byte (the file's first block), from the partition's
    /// start.
    pub map_offset: u64,
    /// The CRC-32C of the map's entries.
    pub map_crc: u32,
    /// The file lies above dm-crypt: where its key block is.
    pub key: Option<KeyVolume>,
}

/// Where an encrypted store's key block is (docs/ENCRYPTION.md): a page of
/// the file, read and written through the volume the file system is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyVolume {
    /// The volume's device-mapper UUID (found again once it is unlocked).
    pub dm_uuid: String,
    /// The key block's byte on it.
    pub at: u64,
}

/// Where the setup file lives: $KSAVE_CONF, else /etc/ksave.conf.
pub fn path() -> PathBuf {
    std::env::var_os("KSAVE_CONF").map(PathBuf::from).unwrap_or_else(|| "/etc/ksave.conf".into())
}

impl Setup {
    /// A setup for `part`, which carries `claim`.
    pub fn new(part: &PartInfo, claim: Claim, lz4: bool, elf: PathBuf) -> Self {
        Self { device: part.device.clone(), guid: part.guid, first_lba: part.first_lba, sectors: part.sectors, lz4, elf, claim, file: None }
    }

    /// The store, for people: the partition, or the file and its partition.
    pub fn describe(&self) -> String {
        match &self.file {
            Some(f) => format!("{} (in {})", f.path.display(), self.device.display()),
            None => self.device.display().to_string(),
        }
    }

    /// What a bootloader puts on ksave's command line to resume from this
    /// store.
    pub fn resume_args(&self) -> String {
        match &self.file {
            Some(f) => format!("ksave.resume={} ksave.file={}", self.guid, f.map_offset),
            None => format!("ksave.resume={}", self.guid),
        }
    }

    /// Writes the setup file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut text = format!(
            "# written by `ksave setup`\ndevice={}\npartuuid={}\nfirst_lba={}\nsectors={}\nlz4={}\nelf={}\nclaim={}\ndisk_guid={}\n",
            self.device.display(),
            self.guid,
            self.first_lba,
            self.sectors,
            self.lz4 as u8,
            self.elf.display(),
            self.claim.id.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            Guid::from_bytes(self.claim.disk)
        );
        if let Some(f) = &self.file {
            text += &format!("file={}\nfile_map={}\nfile_map_crc={:08x}\n", f.path.display(), f.map_offset, f.map_crc);
            if let Some(k) = &f.key {
                text += &format!("key_volume={}\nkey_at={}\n", k.dm_uuid, k.at);
            }
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Reads the setup file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {} (run `ksave setup` first)", path.display()))?;
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .with_context(|| format!("{}: no {key}=", path.display()))
        };
        let guid = get("partuuid")?;
        let Ok(guid) = Guid::try_parse(guid) else { bail!("{}: partuuid={guid} is not a GUID", path.display()) };
        let stale = || format!("{}: set up by an older ksave, without a claim on the partition: run `ksave setup` again", path.display());
        let id = get("claim").with_context(stale)?;
        let id: [u8; 16] = (0..16)
            .map(|i| id.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect::<Option<Vec<u8>>>()
            .and_then(|v| v.try_into().ok())
            .with_context(|| format!("{}: claim={id} is not 32 hex digits", path.display()))?;
        let disk = get("disk_guid").with_context(stale)?;
        let Ok(disk) = Guid::try_parse(disk) else { bail!("{}: disk_guid={disk} is not a GUID", path.display()) };
        let file = match get("file") {
            Ok(file) => {
                let map_offset: u64 = get("file_map")?.parse().context("file_map")?;
                ensure!(map_offset != 0 && map_offset.is_multiple_of(4096), "{}: file_map={map_offset} is not a file's first block", path.display());
                let key = match get("key_volume") {
                    Ok(uuid) => Some(KeyVolume { dm_uuid: uuid.to_string(), at: get("key_at")?.parse().context("key_at")? }),
                    Err(_) => None,
                };
                Some(FileStore { path: file.into(), map_offset, map_crc: u32::from_str_radix(get("file_map_crc")?, 16).context("file_map_crc")?, key })
            }
            Err(_) => None,
        };
        Ok(Self {
            file,
            claim: Claim { id, disk: disk.to_bytes() },
            device: get("device")?.into(),
            guid,
            first_lba: get("first_lba")?.parse().context("first_lba")?,
            sectors: get("sectors")?.parse().context("sectors")?,
            lz4: get("lz4")? == "1",
            elf: get("elf")?.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_file_round_trips() {
        let dir = std::env::temp_dir().join(format!("ksave-setup-{}", std::process::id()));
        let path = dir.join("ksave.conf");
        let part = PartInfo {
            device: "/dev/sda1".into(),
            disk: "/dev/sda".into(),
            guid: Guid::try_parse("9B3C2C1A-5E1F-4B4A-8C6F-2A1D3E4F5A6B").unwrap(),
            first_lba: 2048,
            sectors: 1 << 20,
            number: 1,
            type_guid: diskdrv::part::KSAVE_STORE_TYPE,
            disk_guid: Guid::try_parse("A1B2C3D4-0000-4000-8000-000000004096").unwrap(),
        };
        let claim = Claim { id: *b"0123456789abcdef", disk: part.disk_guid.to_bytes() };
        let setup = Setup::new(&part, claim, true, "/usr/lib/ksave/ksave.elf".into());
        setup.save(&path).unwrap();
        assert_eq!(Setup::load(&path).unwrap(), setup);
        let file = Setup { file: Some(FileStore { path: "/var/lib/ksave/image".into(), map_offset: 1 << 30, map_crc: 0xdead_beef, key: None }), ..setup.clone() };
        file.save(&path).unwrap();
        assert_eq!(Setup::load(&path).unwrap(), file);
        let mut sealed = file.clone();
        sealed.file.as_mut().unwrap().key = Some(KeyVolume { dm_uuid: "CRYPT-LUKS2-0123-root".into(), at: 5 << 20 });
        sealed.save(&path).unwrap();
        assert_eq!(Setup::load(&path).unwrap(), sealed);
        assert_eq!(file.resume_args(), "ksave.resume=9b3c2c1a-5e1f-4b4a-8c6f-2a1d3e4f5a6b ksave.file=1073741824");
        std::fs::write(&path, "device=/dev/sda1\npartuuid=nope\n").unwrap();
        assert!(Setup::load(&path).unwrap_err().to_string().contains("not a GUID"));
        // A setup file from before claims: set up again.
        let unclaimed = format!("device=/dev/sda1\npartuuid={}\nfirst_lba=2048\nsectors=8\nlz4=0\nelf=/x\n", part.guid);
        std::fs::write(&path, unclaimed).unwrap();
        assert!(Setup::load(&path).unwrap_err().to_string().contains("without a claim"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
