//! The ACPI hardware signature (ACPI 6.5, 5.2.10 FACS): firmware changes it
//! when the hardware configuration changed between boots, and an OS must
//! then not resume a hibernation image. Found RSDP -> XSDT (or RSDT) ->
//! FADT ("FACP") -> FACS, every table's checksum checked on the way.

use crate::PhysRead;

/// Where to look for the RSDP on a BIOS machine (ACPI 6.5, 5.2.5.1): the
/// first KiB of the EBDA, then 0xE0000-0xFFFFF, on 16-byte boundaries.
pub const BIOS_AREA: (u64, u64) = (0xE_0000, 0x10_0000);

/// Why no signature was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    /// No RSDP with a valid checksum.
    NoRsdp,
    /// A table is unreadable or its checksum is wrong.
    BadTable(u64),
    /// No FADT, or it names no FACS.
    NoFacs,
}

impl core::fmt::Display for AcpiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoRsdp => write!(f, "no ACPI RSDP found"),
            Self::BadTable(a) => write!(f, "ACPI table at {a:#x} unreadable or its checksum is wrong"),
            Self::NoFacs => write!(f, "no FACS in the ACPI tables"),
        }
    }
}

/// Reads `buf.len()` bytes at `addr` through aligned u64 reads.
fn read_bytes(mem: &impl PhysRead, addr: u64, buf: &mut [u8]) -> Option<()> {
    for (i, b) in buf.iter_mut().enumerate() {
        let a = addr.checked_add(i as u64)?;
        *b = mem.read_u64(a & !7)?.to_le_bytes()[(a & 7) as usize];
    }
    Some(())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn sums_to_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |s, x| s.wrapping_add(*x)) == 0
}

/// The RSDP at `addr`, if it is one: its RSDT and (revision 2+) XSDT.
pub fn rsdp_at(mem: &impl PhysRead, addr: u64) -> Option<(u32, u64)> {
    let mut r = [0u8; 36];
    read_bytes(mem, addr, &mut r[..20])?;
    if &r[..8] != b"RSD PTR " || !sums_to_zero(&r[..20]) {
        return None;
    }
    let rsdt = u32_at(&r, 16);
    if r[15] < 2 {
        return Some((rsdt, 0));
    }
    read_bytes(mem, addr, &mut r)?;
    sums_to_zero(&r).then(|| (rsdt, u64_at(&r, 24)))
}

/// Scans `[start, end)` on 16-byte boundaries for the RSDP.
pub fn find_rsdp(mem: &impl PhysRead, start: u64, end: u64) -> Option<(u32, u64)> {
    (start..end).step_by(16).find_map(|a| rsdp_at(mem, a))
}

/// A table's length, after checking its checksum (at most `max` bytes are
/// summed: FADT and the root tables are small).
fn checked_len(mem: &impl PhysRead, addr: u64, max: u32) -> Result<u32, AcpiError> {
    let mut head = [0u8; 8];
    read_bytes(mem, addr, &mut head).ok_or(AcpiError::BadTable(addr))?;
    let len = u32_at(&head, 4);
    if !(36..=max).contains(&len) {
        return Err(AcpiError::BadTable(addr));
    }
    let mut sum = 0u8;
    for i in 0..len as u64 {
        let mut b = [0u8; 1];
        read_bytes(mem, addr + i, &mut b).ok_or(AcpiError::BadTable(addr))?;
        sum = sum.wrapping_add(b[0]);
    }
    if sum != 0 {
        return Err(AcpiError::BadTable(addr));
    }
    Ok(len)
}

/// The FACS hardware signature, from the root tables an RSDP names
/// (`rsdt`, and `xsdt` when not 0, which wins).
pub fn hardware_signature(mem: &impl PhysRead, rsdt: u32, xsdt: u64) -> Result<u32, AcpiError> {
    let (fadt, len) = find_table(mem, rsdt, xsdt, b"FACP")?.ok_or(AcpiError::NoFacs)?;
    let mut f = [0u8; 148];
    let n = (len as usize).min(f.len());
    read_bytes(mem, fadt, &mut f[..n]).ok_or(AcpiError::BadTable(fadt))?;
    // X_FIRMWARE_CTRL (ACPI 2.0+, offset 132) wins over FIRMWARE_CTRL (36).
    let x = if n >= 140 { u64_at(&f, 132) } else { 0 };
    let facs = if x != 0 { x } else { u32_at(&f, 36) as u64 };
    if facs == 0 {
        return Err(AcpiError::NoFacs);
    }
    let mut head = [0u8; 12];
    read_bytes(mem, facs, &mut head).ok_or(AcpiError::BadTable(facs))?;
    if &head[..4] != b"FACS" {
        return Err(AcpiError::NoFacs);
    }
    Ok(u32_at(&head, 8))
}

/// An IOMMU (DMA remapping unit) the firmware's tables list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemappingUnit {
    /// Intel VT-d, from a DMAR DRHD structure: its register base (VT-d 3.x,
    /// 8.3).
    Vtd(u64),
    /// AMD-Vi, from an IVRS IVHD block (types 10h, 11h, 40h): its MMIO base at
    /// offset 8 (AMD IOMMU specification, IVRS; Linux: `struct ivhd_header`
    /// in drivers/iommu/amd/init.c).
    AmdVi(u64),
}

/// The remapping units in a DMAR or IVRS table (`table`: the whole table as
/// read, header included), into `out`; returns how many. A table of
/// another signature, or one cut short, yields what could be read.
pub fn remapping_units(table: &[u8], out: &mut [RemappingUnit]) -> usize {
    if table.len() < 48 {
        return 0;
    }
    let len = (u32_at(table, 4) as usize).min(table.len());
    let dmar = &table[..4] == b"DMAR";
    if !dmar && &table[..4] != b"IVRS" {
        return 0;
    }
    // Both tables' structures start at 48 (DMAR: header, width, flags, 10
    // reserved; IVRS: header, IVinfo, 8 reserved).
    let mut at = 48;
    let mut n = 0;
    while at + 16 <= len && n < out.len() {
        let (kind, size) = if dmar {
            (u16::from_le_bytes([table[at], table[at + 1]]) as u8, u16::from_le_bytes([table[at + 2], table[at + 3]]) as usize)
        } else {
            (table[at], u16::from_le_bytes([table[at + 2], table[at + 3]]) as usize)
        };
        if size < 4 {
            break;
        }
        let base = u64_at(table, at + 8);
        let unit = match (dmar, kind) {
            (true, 0) => Some(RemappingUnit::Vtd(base)),
            // IVHD types 10h, 11h, 40h each describe one IOMMU; several
            // blocks may describe the same one.
            (false, 0x10 | 0x11 | 0x40) => Some(RemappingUnit::AmdVi(base)),
            _ => None,
        };
        if let Some(u) = unit
            && base != 0
            && !out[..n].contains(&u)
        {
            out[n] = u;
            n += 1;
        }
        at += size;
    }
    n
}

/// The address and length of the table with signature `sig` that the
/// root tables an RSDP names list.
pub fn find_table(mem: &impl PhysRead, rsdt: u32, xsdt: u64, sig: &[u8; 4]) -> Result<Option<(u64, u32)>, AcpiError> {
    let (root, entry) = if xsdt != 0 { (xsdt, 8) } else { (rsdt as u64, 4) };
    let len = checked_len(mem, root, 64 * 1024)?;
    for at in (root + 36..root + len as u64).step_by(entry) {
        let mut e = [0u8; 8];
        read_bytes(mem, at, &mut e[..entry]).ok_or(AcpiError::BadTable(root))?;
        let table = u64::from_le_bytes(e);
        let mut head = [0u8; 8];
        read_bytes(mem, table, &mut head).ok_or(AcpiError::BadTable(table))?;
        if &head[..4] == sig {
            return Ok(Some((table, checked_len(mem, table, 1 << 20)?)));
        }
    }
    Ok(None)
}

/// Copies `buf.len()` bytes of physical memory at `addr` (a table
/// [`find_table`] found).
pub fn read_table(mem: &impl PhysRead, addr: u64, buf: &mut [u8]) -> Option<()> {
    read_bytes(mem, addr, buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::vec::Vec;

    struct Mem(Vec<u8>);

    impl PhysRead for Mem {
        fn read_u64(&self, addr: u64) -> Option<u64> {
            let a = addr as usize;
            Some(u64::from_le_bytes(self.0.get(a..a + 8)?.try_into().unwrap()))
        }
    }

    fn fix_checksum(t: &mut [u8], at: usize) {
        t[at] = 0;
        t[at] = 0u8.wrapping_sub(t.iter().fold(0u8, |s, x| s.wrapping_add(*x)));
    }

    fn table(sig: &[u8; 4], len: usize) -> Vec<u8> {
        let mut t = std::vec![0u8; len];
        t[..4].copy_from_slice(sig);
        t[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        t
    }

    /// RSDP (revision 2) at 0xE0010, XSDT at 0x1000 naming a FADT at
    /// 0x2000 whose X_FIRMWARE_CTRL is a FACS at 0x3000 with signature 0x1234.
    fn machine() -> Mem {
        let mut m = std::vec![0u8; 0x10_0000];
        let mut rsdp = [0u8; 36];
        rsdp[..8].copy_from_slice(b"RSD PTR ");
        rsdp[15] = 2;
        rsdp[16..20].copy_from_slice(&0x4000u32.to_le_bytes());
        rsdp[20..24].copy_from_slice(&36u32.to_le_bytes());
        rsdp[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
        fix_checksum(&mut rsdp[..20], 8);
        fix_checksum(&mut rsdp, 32);
        m[0xE_0010..0xE_0010 + 36].copy_from_slice(&rsdp);
        let mut xsdt = table(b"XSDT", 36 + 16);
        xsdt[36..44].copy_from_slice(&0x5000u64.to_le_bytes()); // some other table
        xsdt[44..52].copy_from_slice(&0x2000u64.to_le_bytes());
        fix_checksum(&mut xsdt, 9);
        m[0x1000..0x1000 + xsdt.len()].copy_from_slice(&xsdt);
        m[0x5000..0x5004].copy_from_slice(b"APIC");
        let mut fadt = table(b"FACP", 244);
        fadt[132..140].copy_from_slice(&0x3000u64.to_le_bytes());
        fix_checksum(&mut fadt, 9);
        m[0x2000..0x2000 + fadt.len()].copy_from_slice(&fadt);
        m[0x3000..0x3004].copy_from_slice(b"FACS");
        m[0x3008..0x300c].copy_from_slice(&0x1234u32.to_le_bytes());
        Mem(m)
    }

    #[test]
    fn reads_the_hardware_signature_through_the_xsdt() {
        let m = machine();
        let (rsdt, xsdt) = find_rsdp(&m, BIOS_AREA.0, BIOS_AREA.1).unwrap();
        assert_eq!((rsdt, xsdt), (0x4000, 0x1000));
        assert_eq!(hardware_signature(&m, rsdt, xsdt), Ok(0x1234));
    }

    #[test]
    fn finds_the_vtd_and_amd_vi_units() {
        let mut dmar = table(b"DMAR", 48);
        // DRHD (type 0, 16 bytes), RMRR (type 1), DRHD.
        for (kind, base) in [(0u16, 0xfed9_0000u64), (1, 0x1234), (0, 0xfed9_1000)] {
            let mut s = [0u8; 16];
            s[..2].copy_from_slice(&kind.to_le_bytes());
            s[2..4].copy_from_slice(&16u16.to_le_bytes());
            s[8..].copy_from_slice(&base.to_le_bytes());
            dmar.extend_from_slice(&s);
        }
        let len = dmar.len() as u32;
        dmar[4..8].copy_from_slice(&len.to_le_bytes());
        let mut out = [RemappingUnit::Vtd(0); 4];
        let n = remapping_units(&dmar, &mut out);
        assert_eq!(&out[..n], &[RemappingUnit::Vtd(0xfed9_0000), RemappingUnit::Vtd(0xfed9_1000)]);
        // IVRS: two IVHD blocks (10h, 40h) of one IOMMU, then an IVMD.
        let mut ivrs = table(b"IVRS", 48);
        for (kind, size) in [(0x10u8, 24u16), (0x40, 40), (0x20, 32)] {
            let mut s = std::vec![0u8; size as usize];
            s[0] = kind;
            s[2..4].copy_from_slice(&size.to_le_bytes());
            s[8..16].copy_from_slice(&0xfeb8_0000u64.to_le_bytes());
            ivrs.extend_from_slice(&s);
        }
        let len = ivrs.len() as u32;
        ivrs[4..8].copy_from_slice(&len.to_le_bytes());
        let n = remapping_units(&ivrs, &mut out);
        assert_eq!(&out[..n], &[RemappingUnit::AmdVi(0xfeb8_0000)]);
        assert_eq!(remapping_units(&table(b"FACP", 48), &mut out), 0);
    }

    #[test]
    fn a_damaged_table_is_an_error_not_a_guess() {
        let mut m = machine();
        m.0[0x2000 + 50] ^= 1; // FADT checksum now wrong
        assert_eq!(hardware_signature(&m, 0x4000, 0x1000), Err(AcpiError::BadTable(0x2000)));
        let mut m = machine();
        m.0[0xE_0010 + 3] ^= 1; // RSDP signature
        assert_eq!(find_rsdp(&m, BIOS_AREA.0, BIOS_AREA.1), None);
        let mut m = machine();
        m.0[0x3000] = b'X';
        assert_eq!(hardware_signature(&m, 0x4000, 0x1000), Err(AcpiError::NoFacs));
    }
}
