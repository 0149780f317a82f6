//! The setup file (default /etc/ksave.conf): which partition, and how.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use diskdrv::part::Guid;

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
}

/// Where the setup file lives: $KSAVE_CONF, else /etc/ksave.conf.
pub fn path() -> PathBuf {
    std::env::var_os("KSAVE_CONF").map(PathBuf::from).unwrap_or_else(|| "/etc/ksave.conf".into())
}

impl Setup {
    /// A setup for `part`.
    pub fn new(part: &PartInfo, lz4: bool, elf: PathBuf) -> Self {
        Self { device: part.device.clone(), guid: part.guid, first_lba: part.first_lba, sectors: part.sectors, lz4, elf }
    }

    /// Writes the setup file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = format!(
            "# written by `ksave setup`\ndevice={}\npartuuid={}\nfirst_lba={}\nsectors={}\nlz4={}\nelf={}\n",
            self.device.display(),
            self.guid,
            self.first_lba,
            self.sectors,
            self.lz4 as u8,
            self.elf.display()
        );
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
        Ok(Self {
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
        };
        let setup = Setup::new(&part, true, "/usr/lib/ksave/ksave.elf".into());
        setup.save(&path).unwrap();
        assert_eq!(Setup::load(&path).unwrap(), setup);
        std::fs::write(&path, "device=/dev/sda1\npartuuid=nope\n").unwrap();
        assert!(Setup::load(&path).unwrap_err().to_string().contains("not a GUID"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
