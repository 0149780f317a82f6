//! GPT and MBR lookup on a fake AHCI disk holding real GPT structures.

mod common;

use common::*;
use crc::{CRC_32_ISO_HDLC, Crc};
use diskdrv::ahci::{AhciDisk, AhciMemory};
use diskdrv::fakes::{self, FakeHal, Hba, Machine};
use diskdrv::part::{Guid, PartError, Partition, Source, find_gpt_partition, find_mbr_partition};

const CRC32: Crc<u32> = Crc::<u32>::new(&CRC_32_ISO_HDLC);
const SECTORS: u64 = 65536;
const WANTED: &str = "9B3C2C1A-5E1F-4B4A-8C6F-2A1D3E4F5A6B";
/// The Linux file system data partition type.
const LINUX_DATA: Guid = Guid::parse_or_panic("0FC63DAF-8483-4772-8E79-3D69D8477DE4");
const OTHER: &str = "11111111-2222-3333-4444-555555555555";

/// Writes a GPT (as sgdisk would: 128 entries of 128 bytes, primary at
/// LBA 1-33, backup at the end) with the given (GUID, first, last).
/// The test disk's GPT disk GUID.
const DISK: Guid = Guid::parse_or_panic("D15C0000-1111-4222-8333-444455556666");

fn write_gpt(disk: &fakes::Disk, parts: &[(&str, u64, u64)]) {
    let mut entries = vec![0u8; 128 * 128];
    for (i, (guid, first, last)) in parts.iter().enumerate() {
        let e = &mut entries[128 * i..128 * (i + 1)];
        // The wanted partition is ksave's store, the other one Linux data.
        let type_guid = if *guid == WANTED { diskdrv::part::KSAVE_STORE_TYPE } else { LINUX_DATA };
        e[0..16].copy_from_slice(&type_guid.to_bytes());
        e[16..32].copy_from_slice(&Guid::try_parse(guid).unwrap().to_bytes());
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&last.to_le_bytes());
    }
    let entries_crc = CRC32.checksum(&entries);
    let header = |my: u64, alt: u64, entries_lba: u64| {
        let mut h = [0u8; 512];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&my.to_le_bytes());
        h[32..40].copy_from_slice(&alt.to_le_bytes());
        h[40..48].copy_from_slice(&34u64.to_le_bytes());
        h[48..56].copy_from_slice(&(SECTORS - 34).to_le_bytes());
        h[56..72].copy_from_slice(&DISK.to_bytes());
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = CRC32.checksum(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    };
    let mut d = disk.borrow_mut();
    d.set_sector(1, &header(1, SECTORS - 1, 2));
    d.set_sector(SECTORS - 1, &header(SECTORS - 1, 1, SECTORS - 33));
    for (i, chunk) in entries.chunks(512).enumerate() {
        d.set_sector(2 + i as u64, chunk);
        d.set_sector(SECTORS - 33 + i as u64, chunk);
    }
}

fn corrupt(disk: &fakes::Disk, lba: u64, byte: usize) {
    let mut s = disk.borrow().sector(lba);
    s[byte] ^= 0x40;
    disk.borrow_mut().set_sector(lba, &s);
}

fn lookup(disk: &fakes::Disk, guid: &str) -> Result<Partition, PartError> {
    let hal = FakeHal::default();
    hal.add_hba(Hba::new(vec![Some(disk.clone())], true));
    let mut mem = Box::new(AhciMemory::new());
    // SAFETY: the fake HBA is this test's alone.
    let mut d = unsafe { AhciDisk::open(hal.clone(), Machine::ABAR, 0, &mut mem) }.unwrap();
    let buf = low([0u8; 4096]);
    find_gpt_partition(&mut d, &hal, Guid::try_parse(guid).unwrap(), buf)
}

fn disk_with_two_partitions() -> fakes::Disk {
    let disk = fakes::disk(SECTORS);
    write_gpt(&disk, &[(OTHER, 2048, 4095), (WANTED, 4096, 40959)]);
    disk
}

#[test]
fn finds_a_partition_by_unique_guid() {
    let disk = disk_with_two_partitions();
    let p = lookup(&disk, WANTED).unwrap();
    assert_eq!(p, Partition { first_lba: 4096, last_lba: 40959, source: Source::GptPrimary, disk: DISK, type_guid: diskdrv::part::KSAVE_STORE_TYPE });
    assert_eq!(p.blocks(), 36864);
    assert_eq!(lookup(&disk, OTHER).unwrap().type_guid, LINUX_DATA);
    assert_eq!(lookup(&disk, "DEADBEEF-0000-0000-0000-000000000000"), Err(PartError::NotFound));
}

#[test]
fn a_corrupted_primary_header_falls_back_to_the_backup() {
    let disk = disk_with_two_partitions();
    corrupt(&disk, 1, 60);
    let p = lookup(&disk, WANTED).unwrap();
    assert_eq!((p.first_lba, p.source), (4096, Source::GptBackup));
}

#[test]
fn a_corrupted_primary_entry_array_falls_back_to_the_backup() {
    let disk = disk_with_two_partitions();
    corrupt(&disk, 2, 130); // inside entry 1
    let p = lookup(&disk, WANTED).unwrap();
    assert_eq!((p.first_lba, p.source), (4096, Source::GptBackup));
}

#[test]
fn both_copies_damaged_is_no_valid_gpt() {
    let disk = disk_with_two_partitions();
    corrupt(&disk, 1, 60);
    corrupt(&disk, SECTORS - 1, 60);
    assert_eq!(lookup(&disk, WANTED), Err(PartError::NoValidGpt));
    let blank = fakes::disk(SECTORS);
    assert_eq!(lookup(&blank, WANTED), Err(PartError::NoValidGpt));
}

#[test]
fn a_partition_outside_the_usable_range_is_not_trusted() {
    let disk = fakes::disk(SECTORS);
    write_gpt(&disk, &[(WANTED, 4096, SECTORS + 100)]);
    assert_eq!(lookup(&disk, WANTED), Err(PartError::NotFound));
}

#[test]
fn mbr_fallback_by_index() {
    let disk = fakes::disk(SECTORS);
    let mut mbr = [0u8; 512];
    mbr[446 + 4] = 0x83;
    mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&8192u32.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    disk.borrow_mut().set_sector(0, &mbr);
    let hal = FakeHal::default();
    hal.add_hba(Hba::new(vec![Some(disk)], true));
    let mut mem = Box::new(AhciMemory::new());
    // SAFETY: the fake HBA is this test's alone.
    let mut d = unsafe { AhciDisk::open(hal.clone(), Machine::ABAR, 0, &mut mem) }.unwrap();
    let buf = low([0u8; 4096]);
    let p = find_mbr_partition(&mut d, &hal, 0, buf).unwrap();
    assert_eq!(p, Partition { first_lba: 2048, last_lba: 10239, source: Source::Mbr, disk: Guid::ZERO, type_guid: Guid::ZERO });
    assert_eq!(find_mbr_partition(&mut d, &hal, 1, buf), Err(PartError::NoMbrPartition));
}
