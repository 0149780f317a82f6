//! The UEFI memory map (GetMemoryMap, UEFI 2.10 7.2.3) as the e820 map
//! Linux's EFI stub builds from it (`setup_e820`,
//! drivers/firmware/efi/libstub/x86-stub.c): the map a kernel booted on
//! this firmware saw in /sys/firmware/memmap, which an image's RAM and NVS
//! maps are compared with.

use crate::memmap::{MapError, MemoryMap, RegionKind};

/// EFI_MEMORY_TYPE values (UEFI 2.10, table 7.5).
mod ty {
    pub const RESERVED: u32 = 0;
    pub const LOADER_CODE: u32 = 1;
    pub const LOADER_DATA: u32 = 2;
    pub const BOOT_SERVICES_CODE: u32 = 3;
    pub const BOOT_SERVICES_DATA: u32 = 4;
    pub const RUNTIME_SERVICES_CODE: u32 = 5;
    pub const RUNTIME_SERVICES_DATA: u32 = 6;
    pub const CONVENTIONAL: u32 = 7;
    pub const UNUSABLE: u32 = 8;
    pub const ACPI_RECLAIM: u32 = 9;
    pub const ACPI_NVS: u32 = 10;
    pub const MMIO: u32 = 11;
    pub const MMIO_PORT_SPACE: u32 = 12;
    pub const PAL_CODE: u32 = 13;
    pub const PERSISTENT: u32 = 14;
}

/// The kind Linux's stub gives a descriptor of type `typ`; `None` for the
/// ones it leaves out of e820 (unaccepted memory, unknown types).
pub fn kind(typ: u32) -> Option<RegionKind> {
    Some(match typ {
        // Free once the firmware's boot services are gone, as for Linux.
        ty::LOADER_CODE | ty::LOADER_DATA | ty::BOOT_SERVICES_CODE | ty::BOOT_SERVICES_DATA | ty::CONVENTIONAL => RegionKind::Ram,
        ty::ACPI_RECLAIM => RegionKind::AcpiReclaimable,
        ty::ACPI_NVS => RegionKind::AcpiNvs,
        ty::UNUSABLE => RegionKind::Defective,
        // e820 type 7 (persistent memory): not RAM to ksave.
        ty::PERSISTENT | ty::RESERVED | ty::RUNTIME_SERVICES_CODE | ty::RUNTIME_SERVICES_DATA | ty::MMIO | ty::MMIO_PORT_SPACE | ty::PAL_CODE => {
            RegionKind::Reserved
        }
        _ => return None,
    })
}

/// Adds every descriptor of the map `bytes` (each `desc_size` bytes: type
/// u32 at 0, physical start u64 at 8, pages u64 at 24) to `map`.
pub fn add_memory_map(bytes: &[u8], desc_size: usize, map: &mut MemoryMap) -> Result<(), MapError> {
    if desc_size < 32 {
        return Ok(());
    }
    for d in bytes.chunks_exact(desc_size) {
        let u32_at = |at: usize| u32::from_le_bytes(d[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(d[at..at + 8].try_into().expect("8 bytes"));
        if let Some(kind) = kind(u32_at(0)) {
            map.add(u64_at(8), u64_at(24).saturating_mul(4096), kind)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn descriptor(typ: u32, start: u64, pages: u64) -> [u8; 48] {
        let mut d = [0u8; 48];
        d[0..4].copy_from_slice(&typ.to_le_bytes());
        d[8..16].copy_from_slice(&start.to_le_bytes());
        d[24..32].copy_from_slice(&pages.to_le_bytes());
        d
    }

    #[test]
    fn boot_services_and_loader_memory_join_ram_and_runtime_memory_splits_it() {
        let mut bytes = Vec::new();
        for (typ, start, pages) in [
            (ty::CONVENTIONAL, 0, 0xa0),
            (ty::BOOT_SERVICES_CODE, 0x10_0000, 0x100),
            (ty::LOADER_CODE, 0x20_0000, 0x100),
            (ty::RUNTIME_SERVICES_DATA, 0x30_0000, 0x10),
            (ty::CONVENTIONAL, 0x31_0000, 0xf0),
            (ty::ACPI_NVS, 0x40_0000, 4),
            (15, 0x50_0000, 4), // unaccepted: left out, as Linux's stub does without support
        ] {
            bytes.extend_from_slice(&descriptor(typ, start, pages));
        }
        let mut map = MemoryMap::new();
        add_memory_map(&bytes, 48, &mut map).unwrap();
        let ram: Vec<_> = map.ram().map(|r| (r.start, r.end)).collect();
        assert_eq!(ram, [(0, 0xa_0000), (0x10_0000, 0x30_0000), (0x31_0000, 0x40_0000)]);
        assert!(map.regions().iter().any(|r| r.kind == RegionKind::AcpiNvs && r.start == 0x40_0000 && r.end == 0x40_4000));
        assert!(!map.regions().iter().any(|r| r.start == 0x50_0000));
    }
}
