//! What the host needs to know about `ksave.elf` before loading it: its one
//! PT_LOAD (physical range, file bytes) and entry point.

use anyhow::{Context, Result, bail, ensure};
use object::elf::{FileHeader64, PT_LOAD};
use object::read::elf::{FileHeader, ProgramHeader};
use object::Endianness;

/// The loadable part of a ksave image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLayout {
    /// Physical load address (`p_paddr`).
    pub start: u64,
    /// One past the last byte, bss included (`p_paddr + p_memsz`).
    pub end: u64,
    /// Bytes backed by the file (`p_filesz`).
    pub file_size: u64,
    /// Where those bytes are in the file (`p_offset`).
    pub file_offset: u64,
    /// The 64-bit kexec-jump entry (`e_entry`).
    pub entry: u64,
}

impl ImageLayout {
    /// Reads the layout of an ELF64 image with exactly one PT_LOAD.
    pub fn parse(data: &[u8]) -> Result<Self> {
        let header = FileHeader64::<Endianness>::parse(data).context("not an ELF64 file")?;
        let endian = header.endian()?;
        let loads: Vec<_> = header
            .program_headers(endian, data)?
            .iter()
            .filter(|ph| ph.p_type(endian) == PT_LOAD)
            .collect();
        let [load] = loads.as_slice() else {
            bail!("expected exactly one PT_LOAD, found {}", loads.len());
        };
        let start = load.p_paddr(endian);
        let memsz = load.p_memsz(endian);
        ensure!(start % 4096 == 0, "PT_LOAD at {start:#x} is not page aligned");
        let layout = Self {
            start,
            end: start + memsz.next_multiple_of(4096),
            file_size: load.p_filesz(endian),
            file_offset: load.p_offset(endian),
            entry: header.e_entry(endian),
        };
        ensure!(layout.file_offset + layout.file_size <= data.len() as u64, "PT_LOAD runs past the end of the file");
        ensure!(
            (layout.start..layout.end).contains(&layout.entry),
            "entry {:#x} outside the image {:#x}..{:#x}",
            layout.entry,
            layout.start,
            layout.end
        );
        Ok(layout)
    }

    /// Bytes of memory the image occupies.
    pub fn footprint(&self) -> u64 {
        self.end - self.start
    }

    /// kexec-tools arguments that load the image for a jump with no backup
    /// segments beyond its own pages (kexec-tools adds them over the whole
    /// `--mem-min..--mem-max` range).
    pub fn kexec_range_args(&self) -> [String; 2] {
        [format!("--mem-min={:#x}", self.start), format!("--mem-max={:#x}", self.end - 1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with the given PT_LOADs (paddr, filesz, memsz).
    fn elf(loads: &[(u64, u64, u64)], entry: u64) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 56 * loads.len()];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little endian
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&(loads.len() as u16).to_le_bytes());
        for (i, &(paddr, filesz, memsz)) in loads.iter().enumerate() {
            let ph = &mut f[64 + 56 * i..64 + 56 * (i + 1)];
            ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
            ph[16..24].copy_from_slice(&paddr.to_le_bytes()); // vaddr
            ph[24..32].copy_from_slice(&paddr.to_le_bytes());
            ph[8..16].copy_from_slice(&0u64.to_le_bytes()); // p_offset: the headers
            ph[32..40].copy_from_slice(&filesz.to_le_bytes());
            ph[40..48].copy_from_slice(&memsz.to_le_bytes());
        }
        f
    }

    #[test]
    fn reads_the_single_load_range() {
        let layout = ImageLayout::parse(&elf(&[(0x200_0000, 0x40, 0x4_1234)], 0x200_0010)).unwrap();
        assert_eq!(layout.start, 0x200_0000);
        assert_eq!(layout.end, 0x204_2000);
        assert_eq!(layout.footprint(), 0x4_2000);
        assert_eq!(layout.kexec_range_args(), ["--mem-min=0x2000000", "--mem-max=0x2041fff"]);
    }

    #[test]
    fn rejects_two_loads_and_stray_entries() {
        let err = ImageLayout::parse(&elf(&[(0x1000, 1, 1), (0x2000, 1, 1)], 0x1000)).unwrap_err();
        assert!(err.to_string().contains("exactly one PT_LOAD"), "{err}");
        let err = ImageLayout::parse(&elf(&[(0x1000, 1, 1)], 0x9000)).unwrap_err();
        assert!(err.to_string().contains("outside the image"), "{err}");
        let err = ImageLayout::parse(&elf(&[(0x1000, 1 << 20, 1 << 20)], 0x1000)).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
        let err = ImageLayout::parse(&elf(&[(0x1000, 1, 1)], 0x9000)).unwrap_err();
        assert!(err.to_string().contains("outside the image"), "{err}");
        assert!(ImageLayout::parse(b"not an elf").is_err());
    }
}
