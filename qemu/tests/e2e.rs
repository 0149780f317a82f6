//! End-to-end: real kernels, real kexec, real QEMU. Needs the VM inputs that
//! `make test` builds first (build/ksave.elf, bzImage, initramfs.cpio.gz).

use ksave_qemu::disk::Bus;
use ksave_qemu::scenarios::{self, Expect};

fn run(scenario: impl Fn(bool) -> anyhow::Result<scenarios::Report>) {
    match scenario(false) {
        Ok(report) => println!("{report}"),
        Err(e) => panic!("{e:#}"),
    }
}

#[test]
fn kexec_jump_round_trip_and_reentry() {
    run(scenarios::kexec_round_trip);
}

#[test]
fn multiboot1_boot_reports_memory_map() {
    run(scenarios::multiboot1_boot);
}

#[test]
fn multiboot2_boot_by_grub_reports_memory_map() {
    run(scenarios::multiboot2_grub_boot);
}

#[test]
fn cpu_exception_is_reported_not_a_triple_fault() {
    run(scenarios::exception_report);
}

#[test]
fn disk_self_test_on_ahci() {
    run(|echo| scenarios::disk_self_test(Bus::Ahci, "dma", echo));
}

#[test]
fn disk_self_test_on_ide_primary_dma() {
    run(|echo| scenarios::disk_self_test(Bus::IdePrimary, "dma", echo));
}

#[test]
fn disk_self_test_on_ide_secondary_dma() {
    run(|echo| scenarios::disk_self_test(Bus::IdeSecondary, "dma", echo));
}

#[test]
fn disk_self_test_on_ide_secondary_pio() {
    run(|echo| scenarios::disk_self_test(Bus::IdeSecondary, "pio", echo));
}

#[test]
fn injected_write_error_on_ahci_is_reported() {
    run(|echo| scenarios::disk_error(Bus::Ahci, "write", echo));
}

#[test]
fn injected_read_error_on_ide_is_reported() {
    run(|echo| scenarios::disk_error(Bus::IdePrimary, "read", echo));
}

#[test]
fn hibernate_snapshot_writes_a_verifiable_image() {
    run(|echo| scenarios::hibernate_snapshot(Expect::Ok, false, 256, echo));
}

#[test]
fn hibernate_with_lz4_writes_a_verifiable_image() {
    run(|echo| scenarios::hibernate_snapshot(Expect::Ok, true, 64, echo));
}

#[test]
fn hibernate_refuses_a_partition_too_small() {
    run(|echo| scenarios::hibernate_snapshot(Expect::TooSmall, false, 16, echo));
}

#[test]
fn hibernate_refuses_a_missing_partition() {
    run(|echo| scenarios::hibernate_snapshot(Expect::WrongGuid, false, 16, echo));
}

#[test]
fn hibernate_reports_a_disk_write_error() {
    run(|echo| scenarios::hibernate_snapshot(Expect::IoError, false, 16, echo));
}
