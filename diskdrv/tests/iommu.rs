//! Switching DMA translation off and back on, against a fake VT-d unit.

use bootinfo::acpi::RemappingUnit;
use diskdrv::fakes::{FakeHal, FakeVtd, Machine};
use diskdrv::iommu::{IommuError, TranslationOff, translating};

const TES: u32 = 1 << 31;
const QIES: u32 = 1 << 26;
const IRES: u32 = 1 << 25;

fn vtd(hal: &FakeHal) -> FakeVtd {
    hal.0.vtd.borrow().clone().unwrap()
}

#[test]
fn translation_goes_off_for_ksave_and_comes_back_with_the_rest_kept() {
    let hal = FakeHal::default();
    *hal.0.vtd.borrow_mut() = Some(FakeVtd { gsts: TES | QIES | IRES, ..FakeVtd::default() });
    let unit = RemappingUnit::Vtd(Machine::VTD_BASE);
    // SAFETY: the fake unit is this test's alone; no DMA relies on it.
    let guard = unsafe { TranslationOff::new(hal.clone(), &[unit]) }.unwrap();
    assert_eq!(guard.switched(), 1);
    assert!(!translating(&hal, unit));
    assert_eq!(vtd(&hal).gsts, QIES | IRES, "queued invalidation and interrupt remapping untouched");
    drop(guard);
    assert_eq!(vtd(&hal).gsts, TES | QIES | IRES, "given back as found");
    assert_eq!(vtd(&hal).commands, [QIES | IRES, TES | QIES | IRES]);
}

#[test]
fn a_unit_already_off_is_left_alone_and_amd_vi_on_is_refused() {
    let hal = FakeHal::default();
    *hal.0.vtd.borrow_mut() = Some(FakeVtd { gsts: IRES, ..FakeVtd::default() });
    // SAFETY: as above.
    let guard = unsafe { TranslationOff::new(hal.clone(), &[RemappingUnit::Vtd(Machine::VTD_BASE)]) }.unwrap();
    assert_eq!(guard.switched(), 0);
    drop(guard);
    assert!(vtd(&hal).commands.is_empty(), "nothing written");
}

#[test]
fn an_amd_vi_unit_translating_is_refused() {
    // The fake's register at 0x18 stands in for AMD-Vi's control register
    // (IommuEn is bit 0); reads there return 0 but for this test's value.
    let hal = FakeHal::default();
    *hal.0.vtd.borrow_mut() = Some(FakeVtd::default());
    let amd = RemappingUnit::AmdVi(Machine::VTD_BASE);
    // SAFETY: as above.
    assert!(unsafe { TranslationOff::new(hal.clone(), &[amd]) }.is_ok(), "IommuEn clear: nothing to do");
    hal.0.vtd.borrow_mut().as_mut().unwrap().control = 1;
    // SAFETY: as above.
    let refused = unsafe { TranslationOff::new(hal.clone(), &[amd]) }.err();
    assert_eq!(refused, Some(IommuError::AmdViOn(Machine::VTD_BASE)));
}
