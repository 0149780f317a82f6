//! The real encoder against the real decoder, and every corruption the
//! decoder must catch.

mod common;

use std::collections::BTreeMap;

use common::*;
use ksave_format::chunk;
use ksave_format::commit;
use ksave_format::header::{self, DATA_OFFSET, HeaderError, META_OFFSET, State};
use ksave_format::reader::ReadError;
use ksave_format::writer::{WriteError, worst_case_bytes};
use ksave_format::{PAGE, Range, config};

#[test]
fn raw_round_trip_elides_zero_pages() {
    let mem = memory(1);
    let (image, totals) = save(&mem, false, 8 << 20).unwrap();
    let zero = mem.0.values().filter(|p| p.iter().all(|&b| b == 0)).count() as u64;
    assert_eq!(totals.pages_zero, zero);
    assert_eq!(totals.pages_stored + zero, mem.0.len() as u64);
    assert_eq!(totals.pages_lz4, 0);
    assert_same(&mem, &load(&image).unwrap());
    assert!(DATA_OFFSET + totals.data_bytes <= worst_case_bytes(mem.0.len() as u64, false));
}

#[test]
fn lz4_round_trip_compresses_text_and_keeps_random_raw() {
    let mem = memory(2);
    let (raw_image, raw) = save(&mem, false, 8 << 20).unwrap();
    let (image, lz) = save(&mem, true, 8 << 20).unwrap();
    assert!(lz.pages_lz4 > 0, "text pages should compress");
    assert!(lz.pages_lz4_skipped > 0, "random runs should stop the LZ4 attempts for a while");
    assert_eq!(raw.pages_lz4_skipped, 0);
    assert!(lz.pages_lz4 < lz.pages_stored, "random pages should stay raw");
    // A third of the stored pages are text (they all but vanish), two
    // thirds random: about 0.7, plus the chunk headers and padding of
    // 8-page groups.
    assert!(lz.data_bytes < raw.data_bytes * 4 / 5, "{} vs {}", lz.data_bytes, raw.data_bytes);
    assert_same(&mem, &load(&image).unwrap());
    assert_same(&mem, &load(&raw_image).unwrap());
}

#[test]
fn a_partition_too_small_is_full_not_overrun() {
    let mem = memory(3);
    assert_eq!(save(&mem, false, 1 << 20).err(), Some(WriteError::Full));
}

fn flip(image: &[u8], at: usize) -> Vec<u8> {
    let mut v = image.to_vec();
    v[at] ^= 0x10;
    v
}

fn chunk_offsets(image: &[u8]) -> Vec<(u64, chunk::Encoding)> {
    load_all(image).unwrap().chunks.iter().map(|c| (c.offset, c.encoding)).collect()
}

#[test]
fn every_corruption_is_caught() {
    let mem = memory(4);
    let (image, _) = save(&mem, true, 8 << 20).unwrap();
    let chunks = chunk_offsets(&image);
    let raw = chunks.iter().find(|c| c.1 == chunk::Encoding::Raw).unwrap().0 as usize;
    let lz4 = chunks.iter().find(|c| c.1 == chunk::Encoding::Lz4).unwrap().0 as usize;

    assert_eq!(load(&flip(&image, 20)).err(), Some(ReadError::Header(HeaderError::Checksum)), "header bit");
    assert_eq!(load(&flip(&image, META_OFFSET as usize + 3)).err(), Some(ReadError::Header(HeaderError::Checksum)), "metadata bit");
    let err = load(&flip(&image, raw + 45)).unwrap_err();
    assert!(matches!(err, ReadError::Chunk { what: "header checksum", .. }), "raw chunk header: {err:?}");
    let err = load(&flip(&image, raw + PAGE + 1000)).unwrap_err();
    assert!(matches!(err, ReadError::Chunk { what: "payload checksum", .. }), "raw payload: {err:?}");
    let err = load(&flip(&image, lz4 + 512 + 7)).unwrap_err();
    assert!(matches!(err, ReadError::Chunk { what: "payload checksum", .. }), "lz4 payload: {err:?}");

    // Truncated: the last chunk is cut off.
    let err = load(&image[..used_len(&image) - 100]).unwrap_err();
    assert_eq!(err, ReadError::Io("read beyond the end"), "truncated");

    // Another format version, with a valid checksum.
    let mut other = image.clone();
    other[8] = header::VERSION as u8 + 1;
    let crc = ksave_format::CRC32C.checksum(&other[..PAGE - 4]);
    other[PAGE - 4..PAGE].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(load(&other).err(), Some(ReadError::Header(HeaderError::Version(header::VERSION + 1))));

    // Not ours at all.
    assert_eq!(load(&vec![0u8; 1 << 16]).err(), Some(ReadError::Header(HeaderError::BadMagic)));
}

#[test]
fn a_torn_save_never_looks_complete() {
    let mem = memory(5);
    let (mut image, _) = save(&mem, false, 8 << 20).unwrap();
    // The commit was torn: only its first sector reached the disk.
    let mut writing = [0u8; PAGE];
    header::Header::new(State::Writing, NONCE).encode(&mut writing);
    image[512..PAGE].copy_from_slice(&writing[512..]);
    assert_eq!(load(&image).err(), Some(ReadError::Header(HeaderError::Checksum)));
    // Never committed: the "writing" header is all there is.
    image[..PAGE].copy_from_slice(&writing);
    assert_eq!(load(&image).err(), Some(ReadError::Totals("not complete")));
}

#[test]
fn chunks_of_another_attempt_are_refused() {
    let mem = memory(6);
    let (image, _) = save(&mem, false, 8 << 20).unwrap();
    let mut h = header_of(&image);
    h.nonce ^= 1; // a header from a later attempt over an older image's chunks
    let mut forged = image.clone();
    h.encode((&mut forged[..PAGE]).try_into().unwrap());
    let err = load(&forged).unwrap_err();
    assert!(matches!(err, ReadError::Chunk { what: "from another save attempt", .. }), "{err:?}");
}

#[test]
fn config_round_trip_and_refusals() {
    assert_eq!(config::Config::decode(&config::SHIPPED), Err(config::ConfigError::NotConfigured));
    let mut c = config::Config::new();
    c.nonce = 7;
    c.partition_guid = uguid::Guid::from_bytes([0xab; 16]);
    c.partition_first_lba = 2048;
    c.partition_sectors = 1 << 20;
    c.lz4 = true;
    c.ram[0] = Range { start: 0, end: 0x9f000 };
    c.ram[1] = Range { start: 0x100000, end: 0x1ffe_0000 };
    c.ram_count = 2;
    c.nvs[0] = Range { start: 0x1ffe_0000, end: 0x2000_0000 };
    c.nvs_count = 1;
    c.iommus[0] = bootinfo::acpi::RemappingUnit::Vtd(0xfed9_0000);
    c.iommus[1] = bootinfo::acpi::RemappingUnit::AmdVi(0xfeb8_0000);
    c.iommu_count = 2;
    c.info[..11].copy_from_slice(b"host 6.12.1");
    let mut block = [0u8; PAGE];
    c.encode(&mut block);
    assert_eq!(config::Config::decode(&block), Ok(c.clone()));
    assert_eq!(config::Config::decode(&block).unwrap().info(), "host 6.12.1");
    let mut bad = block;
    bad[100] ^= 1;
    assert_eq!(config::Config::decode(&bad), Err(config::ConfigError::Checksum));
    let mut overlapping = c.clone();
    overlapping.ram[1].start = 0x9_0000;
    overlapping.encode(&mut block);
    assert_eq!(config::Config::decode(&block), Err(config::ConfigError::Field("RAM ranges")));
    let mut nvs_in_ram = c.clone();
    nvs_in_ram.nvs[0] = Range { start: 0x1000_0000, end: 0x1000_8000 };
    nvs_in_ram.nvs_count = 1;
    nvs_in_ram.encode(&mut block);
    assert_eq!(config::Config::decode(&block), Err(config::ConfigError::Field("NVS range overlaps RAM")));
    let mut none = c;
    none.ram_count = 0;
    none.encode(&mut block);
    assert_eq!(config::Config::decode(&block), Err(config::ConfigError::Field("RAM range count")));
    assert_eq!(config::Config::decode(&[0u8; PAGE]), Err(config::ConfigError::BadMagic));
}

/// The commit protocol: the header reads *writing* at the first flush and
/// at the data flush, and *complete* only at the last one.
#[test]
fn commit_protocol_flushes_writing_then_data_then_complete() {
    let mem = memory(9);
    let mut disk = Disk::new(8 << 20, 512, &mem);
    let (h, _) = save_to(&mut disk, &mem, &RAM, &NVS, false).unwrap();
    assert_eq!(h.nvs_ranges, 1);
    assert_eq!(disk.flushes, [Some(State::Writing), Some(State::Writing), Some(State::Complete)]);
    assert_eq!((h.state, h.cpu_vendor, h.message()), (State::Complete, *b"TestVendor!!", "test host 6.12"));
    let read = header::Header::decode(disk.bytes[..PAGE].try_into().unwrap()).unwrap();
    assert_eq!((read.return_gdt, read.cr4_needed), ((0xffff_8880_1f40_9000, 127), 1 << 12), "only LA57 is a need");
    assert_eq!(read.facs_signature, Some(0x1234));
    assert_eq!(load(&disk.bytes).unwrap().len() as u64, h.pages_stored);
}

/// A save that fails half-way leaves a *writing* header, never an image;
/// a failure record is never taken for one either.
#[test]
fn a_failed_save_leaves_no_image() {
    let mem = memory(10);
    let mut disk = Disk::new(1 << 20, 512, &mem);
    assert_eq!(save_to(&mut disk, &mem, &RAM, &NVS, false).err(), Some(WriteError::Full));
    assert_eq!(disk.flushes, [Some(State::Writing)]);
    assert_eq!(load(&disk.bytes).err(), Some(ReadError::Totals("not complete")));
    let mut block = [0u8; PAGE];
    commit::record_failure(&mut disk, &claimed(), NONCE, 0, header::fail::IO, "disk error", &mut block).unwrap();
    let h = header::Header::decode(disk.bytes[..PAGE].try_into().unwrap()).unwrap();
    assert_eq!((h.state, h.fail_code, h.message()), (State::Failed, header::fail::IO, "disk error"));
}

/// On a disk of 4 KiB blocks every write is whole blocks (the test disk
/// checks), LZ4 chunks are padded to a block, and the image reads back.
#[test]
fn a_4k_disk_gets_whole_blocks_and_the_image_reads_back() {
    let mem = memory(3);
    let mut disk = Disk::new(8 << 20, 4096, &mem);
    let (h, totals) = save_to(&mut disk, &mem, &RAM, &NVS, true).unwrap();
    assert_eq!(h.align, 4096);
    assert!(totals.pages_lz4 > 0, "LZ4 chunks were made");
    assert!(chunk_offsets(&disk.bytes).iter().all(|(off, _)| off % 4096 == 0), "every chunk starts a block");
    assert_same(&mem, &load(&disk.bytes).unwrap());
}

#[test]
fn free_pages_are_listed_not_stored_and_everything_stays_in_order() {
    for lz4 in [false, true] {
        let mem = memory(6);
        // Free blocks: one inside the first range, one whose head is below
        // ksave's range and whose pages run into it, one ending at a range end.
        let blocks = Blocks(BTreeMap::from([(0x10, 16), (0x11f8, 16), (0x3f8, 8)]));
        let mut disk = Disk::new(8 << 20, 512, &mem);
        let (h, totals) = save_with(&mut disk, &mem, &RAM, &NVS, lz4, &mut { blocks }, None).unwrap();
        // 0x11f8..0x1200 are free; 0x1200.. is ksave's, never listed.
        assert_eq!((h.pages_free, totals.pages_free, h.free_rule), (16 + 8 + 8, 32, 2));
        let loaded = load_all(&disk.bytes).unwrap();
        assert_eq!(loaded.free, [(0x10, 16), (0x3f8, 8), (0x11f8, 8)]);
        let is_free = |pfn: u64| loaded.free.iter().any(|&(f, n)| (f..f + n).contains(&pfn));
        assert!(loaded.pages.keys().all(|&p| !is_free(p)));
        // Every other page reads back as saved.
        for (pfn, data) in mem.0.iter().filter(|(p, _)| !is_free(**p)) {
            match loaded.pages.get(pfn) {
                Some(stored) => assert_eq!(&stored[..], &data[..], "page {pfn:#x}"),
                None => assert!(data.iter().all(|&b| b == 0), "non-zero page {pfn:#x} missing"),
            }
        }
        // Stored pages come in ascending order, whatever the encoding.
        assert!(loaded.pages.keys().is_sorted());
    }
}

#[test]
fn totals_that_do_not_add_up_are_refused() {
    let mem = memory(7);
    let (image, _) = save(&mem, false, 8 << 20).unwrap();
    let mut h = header_of(&image);
    // One zero page claimed too many: the counts no longer cover the memory.
    h.pages_zero += 1;
    let mut bad = image.clone();
    h.encode((&mut bad[..PAGE]).try_into().unwrap());
    assert_eq!(load(&bad).err(), Some(ReadError::Totals("stored, zero and free pages do not add up to the memory saved")));
}
