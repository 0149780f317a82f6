//! What the host needs to know about `ksave.elf` before loading it: its one
//! PT_LOAD (physical range, file bytes) and entry point.

use anyhow::{Context, Result, bail, ensure};
use object::elf::{FileHeader64, PT_LOAD};
use object::read::elf::{FileHeader, ProgramHeader};
use object::write::elf as elfw;
use object::{Endianness, elf};

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

/// An ELF64 file header and `loads` as its program headers, laid out by
/// object's writer: the bytes that go at the start of the file. Segment
/// data goes at or after [`headers_len`].
pub fn elf_headers(e_type: elf::FileType, entry: u64, loads: &[elfw::ProgramHeader]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut w = elfw::Writer::new(Endianness::Little, true, &mut out);
    w.reserve_file_header();
    w.reserve_program_headers(loads.len() as u32);
    w.write_file_header(&elfw::FileHeader {
        os_abi: elf::ELFOSABI_NONE,
        abi_version: 0,
        e_type,
        e_machine: elf::EM_X86_64,
        e_entry: entry,
        e_flags: Default::default(),
    })?;
    w.write_align_program_headers();
    for load in loads {
        w.write_program_header(load);
    }
    Ok(out)
}

/// Bytes [`elf_headers`] takes for `loads` program headers.
pub fn headers_len(loads: usize) -> u64 {
    (size_of::<elf::FileHeader64<Endianness>>() + loads * size_of::<elf::ProgramHeader64<Endianness>>()) as u64
}

/// A PT_LOAD of `filesz` bytes at file `offset`, loaded at physical (and
/// virtual) `paddr`, `memsz` bytes in memory.
pub fn load_header(offset: u64, paddr: u64, filesz: u64, memsz: u64) -> elfw::ProgramHeader {
    elfw::ProgramHeader {
        p_type: elf::PT_LOAD,
        p_flags: elf::PF_R | elf::PF_W,
        p_offset: offset,
        p_vaddr: paddr,
        p_paddr: paddr,
        p_filesz: filesz,
        p_memsz: memsz,
        p_align: 4096,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with the given PT_LOADs (paddr, filesz, memsz),
    /// each holding the headers' bytes from offset 0.
    fn elf(loads: &[(u64, u64, u64)], entry: u64) -> Vec<u8> {
        let loads: Vec<_> = loads.iter().map(|&(paddr, filesz, memsz)| load_header(0, paddr, filesz, memsz)).collect();
        elf_headers(elf::ET_EXEC, entry, &loads).unwrap()
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
