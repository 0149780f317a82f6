//! Raw disk images for the VMs: made with `truncate` and `sgdisk`, attached
//! to QEMU's AHCI, PIIX IDE, NVMe or virtio-blk, and checked byte for byte
//! afterwards.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// The unique GUID of the test partition (partition 1 of every test disk).
pub const PART_GUID: &str = "9B3C2C1A-5E1F-4B4A-8C6F-2A1D3E4F5A6B";
/// The test partition starts here.
pub const PART_FIRST_LBA: u64 = 2048;

/// Where a disk is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bus {
    /// Port 0 of an ICH9 AHCI HBA.
    Ahci,
    /// The PIIX3 IDE primary master.
    IdePrimary,
    /// The PIIX3 IDE secondary master.
    IdeSecondary,
    /// Namespace 1 of an NVMe controller with 512-byte blocks.
    Nvme,
    /// The same with 4096-byte logical blocks (a 4Kn namespace).
    Nvme4k,
    /// A virtio-blk PCI device.
    Virtio,
    /// A virtio-blk device behind a PCIe root port (on a q35): OVMF puts
    /// its 64-bit prefetchable BAR above 4 GiB (at 896 GiB), as firmware
    /// with "above 4G decoding" and cloud VMs do.
    VirtioRootPort,
}

impl Bus {
    /// How ksave names this position in its log.
    pub fn ksave_name(self) -> &'static str {
        match self {
            Self::Ahci => "port 0",
            Self::IdePrimary => "primary master",
            Self::IdeSecondary => "secondary master",
            Self::Nvme | Self::Nvme4k => "NVMe",
            Self::Virtio | Self::VirtioRootPort => "virtio-blk",
        }
    }

    /// Whether this bus needs a PCIe machine (a q35).
    pub fn needs_pcie(self) -> bool {
        self == Self::VirtioRootPort
    }

    /// The logical block size of a disk on this bus.
    pub fn block_size(self) -> u64 {
        if self == Self::Nvme4k { 4096 } else { 512 }
    }

    /// QEMU arguments attaching the disk image `path` here, through
    /// blkdebug with `blkdebug_config` if given.
    pub fn qemu_args(self, path: &std::path::Path, blkdebug_config: Option<&str>) -> Vec<String> {
        let file = match blkdebug_config {
            Some(cfg) => format!("file.driver=blkdebug,file.config={cfg},file.image.filename={}", path.display()),
            None => format!("file={}", path.display()),
        };
        let drive = |extra: &str| format!("{extra},format=raw,{file}");
        match self {
            Bus::Ahci => {
                vec!["-device".into(), "ahci,id=ahci".into(), "-drive".into(), drive("if=none,id=d0"), "-device".into(), "ide-hd,drive=d0,bus=ahci.0".into()]
            }
            Bus::IdePrimary => vec!["-drive".into(), drive("if=ide,index=0")],
            Bus::IdeSecondary => vec!["-drive".into(), drive("if=ide,index=2")],
            Bus::Nvme => vec!["-drive".into(), drive("if=none,id=d0"), "-device".into(), "nvme,serial=ksave0001,drive=d0".into()],
            Bus::Nvme4k => vec![
                "-drive".into(),
                drive("if=none,id=d0"),
                "-device".into(),
                "nvme,serial=ksave0001,drive=d0,logical_block_size=4096,physical_block_size=4096".into(),
            ],
            Bus::Virtio => vec!["-drive".into(), drive("if=none,id=d0"), "-device".into(), "virtio-blk-pci,drive=d0".into()],
            Bus::VirtioRootPort => vec![
                "-device".into(),
                "pcie-root-port,id=rp0,chassis=1".into(),
                "-drive".into(),
                drive("if=none,id=d0"),
                "-device".into(),
                "virtio-blk-pci,drive=d0,bus=rp0".into(),
            ],
        }
    }

    /// How ksave names a failed write or read on this bus, up to the LBA.
    pub fn ksave_error(self, write: bool) -> &'static str {
        match (self, write) {
            (Self::Nvme | Self::Nvme4k, true) => "NVMe command 0x01 at LBA",
            (Self::Nvme | Self::Nvme4k, false) => "NVMe command 0x02 at LBA",
            (Self::Virtio | Self::VirtioRootPort, true) => "virtio-blk write at LBA",
            (Self::Virtio | Self::VirtioRootPort, false) => "virtio-blk read at LBA",
            (_, true) => "device error on command 0x35 at LBA",
            (_, false) => "device error on command 0x25 at LBA",
        }
    }
}

/// A disk image file with a GPT: the test partition, then a second one.
pub struct TestDisk {
    /// The image file.
    pub path: PathBuf,
    /// Its bytes as made, to check that nothing outside the partition moved.
    original: Vec<u8>,
    /// Last LBA of the test partition.
    pub part_last_lba: u64,
}

impl TestDisk {
    /// First LBA of partition 2 (right after the test partition).
    pub fn second_lba(&self) -> u64 {
        self.part_last_lba + 1
    }

    /// Bytes of partition 2's start (up to `len`).
    pub fn read_second(&self, len: usize) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        std::fs::File::open(&self.path)?.read_exact_at(&mut buf, self.second_lba() * 512)?;
        Ok(buf)
    }
}

impl TestDisk {
    /// Makes `build/disks/NAME.img` of `size_mib` with a `part_mib`
    /// partition 1 of GUID [`PART_GUID`] at LBA 2048. A sparse file.
    pub fn create(name: &str, size_mib: u64, part_mib: u64) -> Result<Self> {
        Self::make(name, size_mib, part_mib, false)
    }

    /// [`TestDisk::create`] for a disk on `bus`: with a GPT in that bus's
    /// block size. LBAs here stay 512-byte sectors.
    pub fn create_on(bus: Bus, name: &str, size_mib: u64, part_mib: u64) -> Result<Self> {
        let mut disk = Self::make(name, size_mib, part_mib, false)?;
        if bus.block_size() != 512 {
            disk.write_gpt(bus.block_size() as usize, size_mib)?;
            if !disk.original.is_empty() {
                disk.original = std::fs::read(&disk.path)?;
            }
        }
        Ok(disk)
    }

    /// Replaces sgdisk's GPT (512-byte sectors: it takes that for any image
    /// file) with the same partitions in `block_size` blocks.
    fn write_gpt(&self, block_size: usize, size_mib: u64) -> Result<()> {
        use diskdrv::part::{self, Entry, Guid};
        use std::os::unix::fs::FileExt;
        let per_block = block_size as u64 / 512;
        let blocks = (size_mib << 20) / block_size as u64;
        let linux = Guid::try_parse("0FC63DAF-8483-4772-8E79-3D69D8477DE4").unwrap();
        let first = Entry {
            type_guid: part::KSAVE_STORE_TYPE,
            unique: Guid::try_parse(PART_GUID).unwrap(),
            first_lba: PART_FIRST_LBA / per_block,
            last_lba: (self.part_last_lba + 1) / per_block - 1,
        };
        let entry_blocks = (128 * 128) as u64 / block_size as u64;
        let second_guid = Guid::try_parse("5C0D1F2E-3A4B-4C5D-8E6F-7A8B9C0D1E2F").unwrap();
        let second = Entry { type_guid: linux, unique: second_guid, first_lba: first.last_lba + 1, last_lba: blocks - 2 - entry_blocks };
        let (mut head, mut tail) = (vec![0u8; part::gpt_head_len(block_size)], vec![0u8; part::gpt_tail_len(block_size)]);
        part::build_gpt(block_size, blocks, Guid::try_parse("A1B2C3D4-0000-4000-8000-000000004096").unwrap(), &[first, second], &mut head, &mut tail);
        let file = std::fs::OpenOptions::new().write(true).open(&self.path)?;
        file.write_all_at(&head, 0)?;
        file.write_all_at(&tail, (size_mib << 20) - tail.len() as u64)?;
        Ok(())
    }

    /// As [`TestDisk::create`], but every block is written on the host
    /// first, so that benchmarks measure the emulated disk, not the host
    /// file system allocating blocks.
    pub fn create_allocated(name: &str, size_mib: u64, part_mib: u64) -> Result<Self> {
        Self::make(name, size_mib, part_mib, true)
    }

    fn make(name: &str, size_mib: u64, part_mib: u64, allocate: bool) -> Result<Self> {
        let dir = crate::build_dir().join("disks");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.img"));
        let _ = std::fs::remove_file(&path);
        if allocate {
            let mut f = std::fs::File::create(&path)?;
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..size_mib {
                std::io::Write::write_all(&mut f, &zeros)?;
            }
            f.sync_all()?;
        } else {
            run(Command::new("truncate").arg("-s").arg(format!("{size_mib}M")).arg(&path))?;
        }
        let part_last_lba = PART_FIRST_LBA + part_mib * 2048 - 1;
        run(Command::new("sgdisk")
            .arg(format!("--new=1:{PART_FIRST_LBA}:{part_last_lba}"))
            .arg(format!("--partition-guid=1:{PART_GUID}"))
            .arg(format!("--typecode=1:{}", diskdrv::part::KSAVE_STORE_TYPE))
            .arg(format!("--new=2:{}:0", part_last_lba + 1))
            .arg(&path))?;
        let original = if size_mib <= 128 { std::fs::read(&path)? } else { Vec::new() };
        Ok(Self { path, original, part_last_lba })
    }

    /// QEMU arguments attaching the disk at `bus`, through blkdebug with
    /// `blkdebug_config` if given.
    pub fn qemu_args(&self, bus: Bus, blkdebug_config: Option<&str>) -> Vec<String> {
        bus.qemu_args(&self.path, blkdebug_config)
    }

    /// Writes a blkdebug rule failing every `iotype` ("read"/"write") I/O
    /// that touches `sector`, and returns its path.
    pub fn blkdebug_rule(&self, iotype: &str, sector: u64) -> Result<String> {
        let path = self.path.with_extension(format!("{iotype}-error.cfg"));
        let event = if iotype == "read" { "read_aio" } else { "write_aio" };
        std::fs::write(&path, format!("[inject-error]\nevent = \"{event}\"\niotype = \"{iotype}\"\nerrno = \"5\"\nsector = \"{sector}\"\n"))?;
        Ok(path.display().to_string())
    }

    /// Checks the partition holds ksave's self-test pattern in every sector
    /// and that every byte outside it is as made.
    pub fn check_self_test_pattern(&self) -> Result<()> {
        let now = std::fs::read(&self.path)?;
        ensure!(now.len() == self.original.len(), "disk image changed size");
        let (start, end) = ((PART_FIRST_LBA * 512) as usize, ((self.part_last_lba + 1) * 512) as usize);
        if let Some(i) = (0..start).chain(end..now.len()).find(|&i| now[i] != self.original[i]) {
            bail!("byte {i} (LBA {}) outside the partition changed", i / 512);
        }
        let mut expect = [0u8; 512];
        for (i, sector) in now[start..end].chunks(512).enumerate() {
            let lba = PART_FIRST_LBA + i as u64;
            diskdrv::testpattern::sector(lba, &mut expect);
            ensure!(sector == expect, "LBA {lba} does not hold the self-test pattern");
        }
        Ok(())
    }

    /// Checks that nothing outside the partition changed.
    pub fn check_outside_unchanged(&self) -> Result<()> {
        let (start, end) = ((PART_FIRST_LBA * 512) as usize, ((self.part_last_lba + 1) * 512) as usize);
        self.check_unchanged_since(&self.original, Some(start..end))
    }

    /// A CRC-32C of the whole disk image, read in 4 MiB pieces: for images
    /// too large to keep a copy of.
    pub fn digest(&self) -> Result<u32> {
        use std::io::Read;
        let mut file = std::fs::File::open(&self.path)?;
        let mut buf = vec![0u8; 4 << 20];
        // Slice-by-16 here: images of several GiB (ksave's own CRC32C uses
        // the small table).
        static FAST_CRC32C: crc::Crc<u32, crc::Table<16>> = crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);
        let mut digest = FAST_CRC32C.digest();
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                return Ok(digest.finalize());
            }
            digest.update(&buf[..n]);
        }
    }

    /// Fails if any byte of the disk image differs from `before`, except in
    /// `except` (byte offsets).
    pub fn check_unchanged_since(&self, before: &[u8], except: Option<std::ops::Range<usize>>) -> Result<()> {
        let now = std::fs::read(&self.path)?;
        ensure!(now.len() == before.len(), "the disk image changed size: {} -> {} bytes", before.len(), now.len());
        let skip = except.unwrap_or(0..0);
        for (from, to) in [(0, skip.start), (skip.end, now.len())] {
            if now[from..to] == before[from..to] {
                continue; // memcmp: the common case, fast on 500 MiB images
            }
            if let Some(i) = (from..to).find(|&i| now[i] != before[i]) {
                bail!("byte {i} (LBA {}) of the disk changed", i / 512);
            }
        }
        Ok(())
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?} (run qemu/deps.sh)"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}
