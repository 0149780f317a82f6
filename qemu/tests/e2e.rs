//! End-to-end: real kernels, real kexec, real QEMU. Needs the VM inputs that
//! `make test` builds first (build/ksave.elf, bzImage, initramfs.cpio.gz).

use ksave_qemu::disk::Bus;
use ksave_qemu::scenarios::{self, Expect, FileFs, Kernel, Machine, ResumeBy};

fn run(scenario: impl Fn(bool) -> anyhow::Result<scenarios::Report>) {
    match scenario(false) {
        Ok(report) => println!("{report}"),
        Err(e) => panic!("{e:#}"),
    }
}

/// Plain kexec-tools and an unconfigured ksave.elf, on every kernel the
/// suite builds: 6.1 does not reload its GDT after the jump back, and
/// ksave finds it from the kernel's identity tables.
#[test]
fn kexec_jump_round_trip_and_reentry() {
    run(|echo| scenarios::kexec_round_trip(Kernel::Linux6_12, echo));
}

#[test]
fn kexec_jump_round_trip_on_linux_6_1() {
    run(|echo| scenarios::kexec_round_trip(Kernel::Linux6_1, echo));
}

#[test]
fn kexec_jump_round_trip_on_linux_7_3() {
    run(|echo| scenarios::kexec_round_trip(Kernel::Linux7_3, echo));
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

/// The disk self-test overwrites a partition only when it is provably a
/// spare store of ksave's: of ksave's type, and holding no complete image.
#[test]
fn the_disk_self_test_never_writes_a_partition_not_a_spare_store() {
    run(scenarios::disk_test_refuses_what_is_not_a_spare_store);
}

#[test]
fn disk_self_test_on_ahci() {
    run(|echo| scenarios::disk_self_test(Bus::Ahci, "dma", echo));
}

#[test]
fn disk_self_test_on_nvme() {
    run(|echo| scenarios::disk_self_test(Bus::Nvme, "dma", echo));
}

#[test]
fn disk_self_test_on_nvme_with_4k_blocks() {
    run(|echo| scenarios::disk_self_test(Bus::Nvme4k, "dma", echo));
}

#[test]
fn disk_self_test_on_virtio() {
    run(|echo| scenarios::disk_self_test(Bus::Virtio, "dma", echo));
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

/// Setup takes no partition that holds or serves anything (a file system,
/// a mount, an active swap, the ESP, another type unless claimed), and a
/// store made a file system after setup is never written: the tool and
/// ksave both refuse, and the file system stays intact. On virtio-blk.
#[test]
fn a_store_that_is_not_ksaves_is_never_written() {
    run(|echo| scenarios::hibernate_snapshot_on(Bus::Virtio, Expect::Reformatted, false, 16, echo));
}

/// A clone of the store's disk (one PARTUUID on two disks, AHCI and
/// virtio-blk): setup, the tool and ksave refuse to guess which is meant.
#[test]
fn a_partition_guid_on_two_disks_is_never_guessed() {
    run(|echo| scenarios::hibernate_snapshot(Expect::Cloned, false, 16, echo));
}

/// Nothing of RAM left out: RAM a driver added (QEMU's virtio-mem, which
/// the firmware map does not list) is refused by name, before anything is
/// loaded, whether the host's checks run or not.
#[test]
fn ram_a_driver_added_is_refused_by_name_before_anything_is_loaded() {
    run(|echo| scenarios::hibernate_snapshot(Expect::DriverRam, false, 16, echo));
}

#[test]
fn a_cpu_exception_during_a_save_returns_to_the_caller() {
    // With LZ4: the other CPU is coding when the saving one faults.
    run(|echo| scenarios::hibernate_snapshot(Expect::CpuException, true, 16, echo));
}

/// On NVMe: the AHCI and IDE write errors are the disk tests'.
#[test]
fn hibernate_reports_a_disk_write_error_on_nvme() {
    run(|echo| scenarios::hibernate_snapshot_on(Bus::Nvme, Expect::IoError, false, 16, echo));
}

/// The host tool writes a config into the real ksave.elf's section, and
/// what it wrote decodes back; a file without the section is refused.
#[test]
fn config_section_of_the_built_image_is_patched() {
    use ksave_format::config::{Config, ConfigError};
    let elf = std::fs::read(ksave_qemu::build_input("ksave.elf").unwrap()).unwrap();
    let section = |data: &[u8]| -> [u8; 4096] {
        use object::{Object, ObjectSection};
        let file = object::File::parse(data).unwrap();
        let s = file.section_by_name(".ksave_config").unwrap();
        let (off, len) = s.file_range().unwrap();
        data[off as usize..(off + len) as usize].try_into().unwrap()
    };
    assert_eq!(Config::decode(&section(&elf)), Err(ConfigError::NotConfigured), "ksave.elf ships unconfigured");
    let mut config = Config::new();
    config.nonce = 42;
    config.partition_guid = diskdrv::part::Guid::from_bytes([7; 16]);
    config.partition_sectors = 1000;
    config.ram[0] = ksave_format::Range { start: 0, end: 0x9f000 };
    config.ram_count = 1;
    let configured = ksave_tools::load::configure(&elf, &config).unwrap();
    assert_eq!(configured.len(), elf.len());
    assert_eq!(Config::decode(&section(&configured)), Ok(config.clone()));
    let not_ksave = std::fs::read("/proc/self/exe").unwrap();
    assert!(ksave_tools::load::configure(&not_ksave, &config).is_err());
}

#[test]
fn hibernate_power_off_and_resume_by_multiboot1_twice() {
    run(|echo| scenarios::hibernate_resume(scenarios::ResumeBy::Multiboot1, 256, echo));
}

#[test]
fn restore_refuses_damaged_foreign_and_used_images() {
    run(scenarios::restore_refusals);
}

/// On UEFI (OVMF), resumed by ksave.efi, which GRUB EFI chainloads: it
/// checks the image through the firmware's Block I/O, leaves the firmware
/// and loads it with its own driver. The firmware's ACPI NVS travels in the
/// image and is put back. The disk is a virtio-blk behind a PCIe root
/// port, whose registers OVMF puts at 896 GiB: ksave maps them, saving and
/// resuming. First, with the disk where ksave's own drivers cannot reach
/// it (virtio-scsi), a start that cannot finish resets, and the next one
/// returns the image to GRUB, which boots Linux.
#[test]
fn hibernate_power_off_and_resume_by_ksave_efi_on_uefi_twice() {
    let machine = Machine::qemu64(Kernel::Linux6_12).uefi().on(Bus::VirtioRootPort);
    run(|echo| scenarios::hibernate_resume_on(machine, scenarios::ResumeBy::UefiApp, 256, echo));
}

#[test]
fn hibernate_power_off_and_resume_by_grub_twice() {
    run(|echo| scenarios::hibernate_resume(scenarios::ResumeBy::Grub, 256, echo));
}

#[test]
fn grub_menu_with_no_image_boots_linux_normally() {
    run(scenarios::grub_no_image_boots_normally);
}

/// The whole story on 7.3 (the caller's words in a data section, 6.14 on),
/// with RAM above 4 GiB on a CPU without 1 GiB pages (qemu64, 5 GiB, q35).
#[test]
fn hibernate_power_off_and_resume_on_linux_7_3_with_ram_above_4_gib() {
    run(|echo| scenarios::hibernate_resume_once_on(Machine::qemu64_high_ram(Kernel::Linux7_3), ResumeBy::Multiboot1, 256, echo));
}

/// The whole story on 6.1: no GDT reload after the jump back.
#[test]
fn hibernate_power_off_and_resume_on_nvme() {
    let machine = Machine::qemu64(Kernel::Linux6_12).on(Bus::Nvme);
    run(|echo| scenarios::hibernate_resume_once_on(machine, scenarios::ResumeBy::Multiboot1, 256, echo));
}

/// A 4Kn namespace: every write whole 4 KiB blocks, the GPT in 4 KiB LBAs.
#[test]
fn hibernate_power_off_and_resume_on_nvme_with_4k_blocks() {
    let machine = Machine::qemu64(Kernel::Linux6_12).on(Bus::Nvme4k);
    run(|echo| scenarios::hibernate_resume_once_on(machine, scenarios::ResumeBy::Multiboot1, 256, echo));
}

#[test]
fn hibernate_power_off_and_resume_on_virtio() {
    let machine = Machine::qemu64(Kernel::Linux6_12).on(Bus::Virtio);
    run(|echo| scenarios::hibernate_resume_once_on(machine, scenarios::ResumeBy::Multiboot1, 256, echo));
}

/// DMA remapping on (q35, QEMU's intel-iommu, kernel A with
/// intel_iommu=on): ksave's DMA must reach memory, and A must get its
/// IOMMU back as it was.
#[test]
fn hibernate_power_off_and_resume_with_an_iommu() {
    let machine = Machine::qemu64(Kernel::Linux6_12).with_iommu();
    run(|echo| scenarios::hibernate_resume_on(machine, scenarios::ResumeBy::Multiboot1, 256, echo));
}

#[test]
fn hibernate_with_the_iommu_left_on_saves_a_snapshot_and_refuses_power_off() {
    run(scenarios::hibernate_with_the_iommu_left_on);
}

/// The IDE save path (the other stories save to AHCI, NVMe or virtio).
#[test]
fn hibernate_power_off_and_resume_on_ide() {
    let machine = Machine::qemu64(Kernel::Linux6_12).on(Bus::IdePrimary);
    run(|echo| scenarios::hibernate_resume_once_on(machine, scenarios::ResumeBy::Multiboot1, 256, echo));
}

#[test]
fn hibernate_into_a_fragmented_file_on_ext4_and_resume_twice() {
    run(|echo| scenarios::file_store_story(scenarios::FileFs::Ext4Fragmented, echo));
}

#[test]
fn an_image_on_an_encrypted_volume_is_sealed_and_resumed_only_after_the_unlock() {
    run(scenarios::encrypted_store_story);
}

#[test]
fn hibernate_into_a_file_on_btrfs_and_resume_twice() {
    run(|echo| scenarios::file_store_story(scenarios::FileFs::Btrfs, echo));
}

/// Never after a write: a live system writes the XFS the image file lies
/// on; ksave (multiboot) and `ksave resume` (kernel C) both refuse.
#[test]
fn an_image_on_xfs_written_since_is_refused() {
    run(|echo| scenarios::written_since_is_refused(FileFs::Xfs, echo));
}

/// The same on btrfs (its superblock generation).
#[test]
fn an_image_on_btrfs_written_since_is_refused() {
    run(|echo| scenarios::written_since_is_refused(FileFs::BtrfsSingle, echo));
}

#[test]
fn hibernate_into_a_file_on_xfs_on_lvm_and_resume_twice() {
    run(|echo| scenarios::file_store_story(scenarios::FileFs::XfsOnLvm, echo));
}

#[test]
fn hibernate_power_off_and_resume_on_linux_6_1() {
    run(|echo| scenarios::hibernate_resume_once_on(Machine::qemu64(Kernel::Linux6_1), ResumeBy::Multiboot1, 256, echo));
}

/// The same on 7.3.
#[test]
fn hibernate_power_off_and_resume_with_5_level_paging_on_linux_7_3() {
    run(|echo| scenarios::hibernate_resume_once_on(Machine::la57(Kernel::Linux7_3), ResumeBy::Multiboot1, 256, echo));
}

// Debian on SeaBIOS: the stale-image and encrypted-root stories (bookworm),
// and the dracut story (trixie, its root on btrfs as Fedora lays it out).

/// The same on UEFI (OVMF, GRUB EFI).
#[test]
fn debian_systemctl_hibernate_and_resume_twice_on_uefi() {
    run(|echo| scenarios::debian_hibernate_resume(scenarios::Firmware::Uefi, echo));
}

/// Debian: a boot with ksave.noresume invalidates the image before the root
/// is mounted, so the next boot does not resume it; a damaged image is
/// refused, the boot carries on and the journal says why.
#[test]
fn debian_never_resumes_a_stale_or_damaged_image() {
    run(scenarios::debian_stale_and_damaged_images);
}

/// Debian with its root on LUKS2 (cryptroot unlocks it at its prompt, where
/// the harness types): a plaintext store refused, `systemctl hibernate`
/// into a sealed image file, no plaintext of memory on the disk, three
/// wrong passphrases resume nothing, the right one resumes; twice.
#[test]
fn debian_with_an_encrypted_root_hibernates_sealed_and_resumes_after_the_unlock() {
    run(scenarios::debian_encrypted_root);
}

/// Debian 13 with dracut and ksave's RPM (issue 23): logind offers every
/// sleep that hibernates with no swap; `systemctl hibernate` resumed by
/// dracut's initrd, twice; suspend-then-hibernate (woken by the RTC, then
/// hibernated by ksave, resumed); hybrid-sleep (the power lost: resumed;
/// woken: the image invalidated); ksave.noresume leaves nothing to resume.
#[test]
fn debian_with_dracut_hibernates_through_every_sleep_that_saves() {
    run(scenarios::debian_dracut_sleep_modes);
}
