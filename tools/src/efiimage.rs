//! `ksave.efi`: ksave.elf's one segment, byte for byte, in a PE32+ file that
//! UEFI firmware starts as an application (docs/UEFI.md). Nothing is
//! relinked or copied: the same code, at the same address.
//!
//! ksave runs only at its link address (linker.ld): its page tables, its
//! multiboot headers and every absolute address in it assume it. So the
//! PE says "relocations stripped" with its image base one page below
//! ksave's start (the headers' page), and the firmware loads it there or
//! refuses it; EDK2 then allocates exactly that range (CoreLoadPeImage,
//! MdeModulePkg/Core/Dxe/Image/Image.c), and a boot manager that cannot
//! load an entry moves on to the next in `BootOrder`.

use anyhow::{Context, Result, ensure};
use object::pe;
use object::read::elf::ElfFile64;
use object::write::pe::{NtHeaders, Writer};
use object::{Endianness, Object, ObjectSymbol};

use crate::elfimage::ImageLayout;

/// The symbol of ksave's UEFI entry (asm/entry.s).
pub const EFI_ENTRY: &str = "ksave_efi_entry";

/// PE sections are page aligned in memory, as ksave's segment is.
const SECTION_ALIGNMENT: u32 = 4096;
const FILE_ALIGNMENT: u32 = 512;

/// ksave.efi made from the ksave.elf `elf`.
pub fn from_elf(elf: &[u8]) -> Result<Vec<u8>> {
    let layout = ImageLayout::parse(elf)?;
    let file = ElfFile64::<Endianness>::parse(elf).context("not an ELF64 file")?;
    let entry = file.symbols().find(|s| s.name() == Ok(EFI_ENTRY)).map(|s| s.address()).with_context(|| format!("no symbol {EFI_ENTRY}"))?;
    let bytes = &elf[layout.file_offset as usize..][..layout.file_size as usize];
    wrap(&layout, bytes, entry)
}

/// The PE file holding `bytes` (the segment's file part) at `layout`,
/// entered at `entry`.
fn wrap(layout: &ImageLayout, bytes: &[u8], entry: u64) -> Result<Vec<u8>> {
    ensure!((layout.start..layout.end).contains(&entry), "UEFI entry {entry:#x} outside the image");
    let mut out = Vec::new();
    let mut writer = Writer::new(true, SECTION_ALIGNMENT, FILE_ALIGNMENT, &mut out);
    writer.reserve_dos_header();
    writer.reserve_nt_headers(pe::IMAGE_NUMBEROF_DIRECTORY_ENTRIES);
    writer.reserve_section_headers(1);
    let memory = u32::try_from(layout.end - layout.start).context("image larger than 4 GiB")?;
    let flags = pe::IMAGE_SCN_CNT_CODE
        | pe::IMAGE_SCN_CNT_INITIALIZED_DATA
        | pe::IMAGE_SCN_MEM_EXECUTE
        | pe::IMAGE_SCN_MEM_READ
        | pe::IMAGE_SCN_MEM_WRITE;
    // Its memory beyond the file's bytes is ksave's bss: the loader zeroes it.
    let section = writer.reserve_section(*b".ksave\0\0", flags, memory, bytes.len() as u32);
    let image_base = layout.start.checked_sub(section.virtual_address.into()).context("image below its own headers")?;
    writer.write_empty_dos_header()?;
    writer.write_nt_headers(NtHeaders {
        machine: pe::IMAGE_FILE_MACHINE_AMD64,
        time_date_stamp: 0,
        characteristics: pe::IMAGE_FILE_EXECUTABLE_IMAGE | pe::IMAGE_FILE_RELOCS_STRIPPED | pe::IMAGE_FILE_LARGE_ADDRESS_AWARE,
        major_linker_version: 0,
        minor_linker_version: 0,
        address_of_entry_point: (entry - image_base) as u32,
        image_base,
        major_operating_system_version: 0,
        minor_operating_system_version: 0,
        major_image_version: 0,
        minor_image_version: 0,
        major_subsystem_version: 0,
        minor_subsystem_version: 0,
        subsystem: pe::IMAGE_SUBSYSTEM_EFI_APPLICATION,
        dll_characteristics: pe::DllFlags(0),
        size_of_stack_reserve: 0,
        size_of_stack_commit: 0,
        size_of_heap_reserve: 0,
        size_of_heap_commit: 0,
    });
    writer.write_section_headers();
    writer.write_section(section.file_offset, bytes);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::read::pe::PeFile64;
    use object::ObjectSection;

    #[test]
    fn the_segment_lands_at_its_own_address_unrelocatable_and_entered_where_asked() {
        let layout = ImageLayout { start: 0x200_0000, end: 0x200_6000, file_size: 0x1234, file_offset: 0, entry: 0x200_0100 };
        let bytes: Vec<u8> = (0..0x1234u32).map(|i| i as u8).collect();
        let efi = wrap(&layout, &bytes, 0x200_0200).unwrap();
        let parsed = PeFile64::parse(&*efi).unwrap();
        let header = parsed.nt_headers();
        assert_eq!(header.optional_header.subsystem.get(object::LittleEndian), pe::IMAGE_SUBSYSTEM_EFI_APPLICATION);
        assert!(header.file_header.characteristics.get(object::LittleEndian).contains(pe::IMAGE_FILE_RELOCS_STRIPPED));
        assert_eq!(parsed.entry(), 0x200_0200);
        assert_eq!(header.optional_header.size_of_image.get(object::LittleEndian) as u64, 0x6000 + 0x1000);
        let section = parsed.sections().next().unwrap();
        assert_eq!(section.address(), 0x200_0000);
        assert_eq!(section.size(), 0x6000);
        assert_eq!(&section.data().unwrap()[..bytes.len()], &bytes[..]);
        assert_eq!(parsed.segments().count(), 1);
        assert!(wrap(&layout, &bytes, 0x100_0000).is_err(), "an entry outside the image is refused");
    }
}
