//! DMA remapping units (IOMMUs). With translation on, a device's DMA goes
//! through the OS's page tables for it, and ksave's buffers and the pages
//! it writes are not mapped there: commands time out and the unit logs
//! faults. So while ksave drives disks, translation is off, and it is put
//! back exactly as found afterwards ([`TranslationOff`]'s `Drop`).
//!
//! Linux usually has done this already: a kexec jump runs `syscore_suspend`,
//! and the IOMMU drivers' suspend hooks (`iommu_suspend` in
//! drivers/iommu/intel/iommu.c, `amd_iommu_suspend`) turn translation off;
//! `syscore_resume` turns it on again after the jump back. ksave checks
//! rather than assumes.

use bootinfo::acpi::RemappingUnit;

use crate::Hal;
use crate::hal::poll;

// VT-d registers (Intel VT-d 4.x, 11.4.4 and 11.4.5; Linux: DMAR_GCMD_REG,
// DMAR_GSTS_REG, DMA_GCMD_TE in drivers/iommu/intel/iommu.h).
const VTD_GCMD: u64 = 0x18;
const VTD_GSTS: u64 = 0x1C;
/// Translation enable / status.
const VTD_TE: u32 = 1 << 31;
/// The persistent bits of GSTS that GCMD writes must preserve (TES, QIES,
/// IRES, CFIS); the others are one-shot commands, written as 0.
const VTD_PERSISTENT: u32 = 1 << 31 | 1 << 26 | 1 << 25 | 1 << 23;
// AMD-Vi IOMMU Control Register, MMIO offset 0018h, bit 0 IommuEn (AMD I/O
// Virtualization Technology (IOMMU) Specification; Linux: MMIO_CONTROL_OFFSET,
// CONTROL_IOMMU_EN in drivers/iommu/amd/amd_iommu_types.h).
const AMD_CONTROL: u64 = 0x18;
const AMD_ENABLE: u32 = 1 << 0;

/// Most units handled.
pub const MAX_UNITS: usize = 8;
/// Microseconds a unit may take to change translation.
const SWITCH_US: u64 = 1_000_000;

/// Why translation could not be turned off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IommuError {
    /// A VT-d unit did not report translation off in time.
    Stuck(u64),
    /// An AMD-Vi unit has translation on; ksave does not switch AMD-Vi.
    AmdViOn(u64),
    /// A unit's registers cannot be reached.
    Unreachable(u64),
}

impl core::fmt::Display for IommuError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Stuck(base) => write!(f, "VT-d unit at {base:#x} did not turn translation off"),
            Self::AmdViOn(base) => write!(f, "AMD-Vi unit at {base:#x} has DMA translation on, which ksave does not switch off yet"),
            Self::Unreachable(base) => write!(f, "IOMMU registers at {base:#x} are outside ksave's reach"),
        }
    }
}

/// Whether `unit` translates DMA now.
pub fn translating(hal: &impl Hal, unit: RemappingUnit) -> bool {
    match unit {
        RemappingUnit::Vtd(base) => hal.mmio_read32(base + VTD_GSTS) & VTD_TE != 0,
        RemappingUnit::AmdVi(base) => hal.mmio_read32(base + AMD_CONTROL) & AMD_ENABLE != 0,
    }
}

/// Sets or clears VT-d's TE the way 11.4.4 asks, and waits for GSTS.TES.
fn vtd_set_translation(hal: &impl Hal, base: u64, on: bool) -> bool {
    let persistent = hal.mmio_read32(base + VTD_GSTS) & VTD_PERSISTENT;
    let command = if on { persistent | VTD_TE } else { persistent & !VTD_TE };
    hal.mmio_write32(base + VTD_GCMD, command);
    poll(hal, SWITCH_US, || (hal.mmio_read32(base + VTD_GSTS) & VTD_TE != 0) == on)
}

/// While alive, every listed unit's translation is off; dropped, the units
/// ksave switched off translate again.
pub struct TranslationOff<H: Hal> {
    hal: H,
    switched: [u64; MAX_UNITS],
    count: usize,
}

impl<H: Hal> TranslationOff<H> {
    /// Turns translation off on every unit of `units` that has it on.
    /// Nothing is left switched on failure.
    ///
    /// # Safety
    /// Each unit's registers must be mapped uncached, and no device may be
    /// doing DMA that relies on translation while this guard lives (at a
    /// kexec jump the caller's devices are frozen).
    pub unsafe fn new(hal: H, units: &[RemappingUnit]) -> Result<Self, IommuError> {
        let mut guard = Self { hal, switched: [0; MAX_UNITS], count: 0 };
        for &unit in units.iter().take(MAX_UNITS) {
            if !translating(&guard.hal, unit) {
                continue;
            }
            match unit {
                RemappingUnit::Vtd(base) => {
                    // Recorded first: a unit stuck half way is put back too.
                    guard.switched[guard.count] = base;
                    guard.count += 1;
                    if !vtd_set_translation(&guard.hal, base, false) {
                        return Err(IommuError::Stuck(base));
                    }
                }
                RemappingUnit::AmdVi(base) => return Err(IommuError::AmdViOn(base)),
            }
        }
        Ok(guard)
    }

    /// How many units ksave switched off.
    pub fn switched(&self) -> usize {
        self.count
    }
}

impl<H: Hal> Drop for TranslationOff<H> {
    fn drop(&mut self) {
        for &base in &self.switched[..self.count] {
            vtd_set_translation(&self.hal, base, true);
        }
    }
}
