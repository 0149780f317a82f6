//! Sealed images (docs/ENCRYPTION.md): the real encoder with a data key
//! against the real decoder: no plaintext page on the store, and every
//! forgery or tampering refused before a page is handed out.

mod common;

use common::*;
use ksave_format::PAGE;
use ksave_format::chunk::{self, Encoding};
use ksave_format::header::{DATA_OFFSET, FLAG_SEALED, Header, META_OFFSET};
use ksave_format::reader::ReadError;
use ksave_format::seal::{DataKey, KEY_LEN};
use ksave_format::writer::{bytes_at_most, worst_case_bytes};

const KEY: DataKey = DataKey([0x42; KEY_LEN]);

/// A sealed save of `mem`, which holds a free block of 16 pages at 0x10.
fn save_sealed(mem: &Mem, lz4: bool, key: &DataKey, align: u32) -> (Vec<u8>, ksave_format::writer::Totals) {
    let mut disk = Disk::new(8 << 20, align, mem);
    let mut free = Blocks([(0x10, 16)].into_iter().collect());
    let (_, totals) = save_with(&mut disk, mem, &RAM, &NVS, lz4, &mut free, Some(key)).unwrap();
    (disk.bytes, totals)
}

/// `mem` as a save with the free block reads back: zeros there.
fn without_free(mem: &Mem) -> Mem {
    Mem(mem.0.iter().map(|(&pfn, page)| (pfn, if (0x10..0x20).contains(&pfn) { Box::new([0; PAGE]) } else { page.clone() })).collect())
}

/// Whether any stored page of `mem` (that is not all zeros) lies in
/// `image` in plaintext, at any 512-byte boundary.
fn holds_plaintext(mem: &Mem, image: &[u8]) -> bool {
    let pages: std::collections::HashSet<&[u8]> = mem.0.values().filter(|p| p.iter().any(|&b| b != 0)).map(|p| &p[..512]).collect();
    image.chunks_exact(512).any(|s| pages.contains(s))
}

#[test]
fn a_sealed_image_reads_back_with_its_key_and_holds_no_plaintext() {
    let mem = memory(11);
    for (lz4, align) in [(false, 512), (true, 512), (true, 4096)] {
        let (image, totals) = save_sealed(&mem, lz4, &KEY, align);
        assert!(!holds_plaintext(&mem, &image), "lz4 {lz4} align {align}");
        let w = walk_with(&image, Some(&KEY)).unwrap();
        assert!(w.header.sealed() && totals.flags & FLAG_SEALED != 0);
        assert_same(&without_free(&mem), &w.loaded.pages);
        assert_eq!(w.loaded.free, [(0x10, 16)]);
        // Raw chunks hold at most 64 pages; the counts before a save
        // still bound what it writes.
        assert!(w.loaded.chunks.iter().all(|c| c.pages as usize <= chunk::SEALED_RAW_PAGES || c.encoding == Encoding::Free));
        assert!(DATA_OFFSET + totals.data_bytes <= worst_case_bytes(mem.0.len() as u64, true));
        assert!(DATA_OFFSET + totals.data_bytes <= bytes_at_most(totals.pages_stored, 0, 0, true));
    }
    // The plain save of the same memory does hold it: the search works.
    let (plain, _) = save(&mem, false, 8 << 20).unwrap();
    assert!(holds_plaintext(&mem, &plain));
}

#[test]
fn a_sealed_image_is_refused_without_its_key_with_another_key_and_where_a_key_is_expected_a_plain_one() {
    let mem = memory(12);
    let (image, _) = save_sealed(&mem, true, &KEY, 512);
    assert!(matches!(walk_with(&image, None).err(), Some(ReadError::Seal(_))));
    assert!(matches!(walk_with(&image, Some(&DataKey([0x43; KEY_LEN]))).err(), Some(ReadError::Seal(_))));
    let (plain, _) = save(&mem, true, 8 << 20).unwrap();
    assert!(matches!(walk_with(&plain, Some(&KEY)).err(), Some(ReadError::Seal(_))));
}

/// Rewrites the header block of `image` after `edit`, with a valid CRC
/// (as anyone can).
fn edit_header(image: &[u8], edit: impl Fn(&mut Header)) -> Vec<u8> {
    let mut v = image.to_vec();
    let mut h = Header::decode(v[..PAGE].try_into().unwrap()).unwrap();
    edit(&mut h);
    h.encode((&mut v[..PAGE]).try_into().unwrap());
    v
}

#[test]
fn every_tampering_is_refused() {
    let mem = memory(13);
    let (image, _) = save_sealed(&mem, true, &KEY, 512);
    let chunks = walk_with(&image, Some(&KEY)).unwrap().loaded.chunks;
    let refused = |v: &[u8]| walk_with(v, Some(&KEY)).is_err();
    // The header: a field with its CRC made good (the re-entry address an
    // attacker wants); the tag cleared; the flag cleared (a "plain" image).
    assert!(refused(&edit_header(&image, |h| h.reentry = 0x4141_4141)));
    assert!(refused(&edit_header(&image, |h| h.tag = [0; 16])));
    assert!(refused(&edit_header(&image, |h| h.flags &= !FLAG_SEALED)));
    // The metadata, with the header's CRC of it made good.
    let mut v = image.clone();
    // The first RAM range's end, one page further: still a valid list.
    v[META_OFFSET as usize + 9] ^= 0x10;
    let h = Header::decode(v[..PAGE].try_into().unwrap()).unwrap();
    let meta_len = 16 * (h.ram_ranges + h.backup_pairs + h.nvs_ranges) as usize;
    let meta_crc = ksave_format::CRC32C.checksum(&v[META_OFFSET as usize..META_OFFSET as usize + meta_len]);
    assert!(matches!(walk_with(&edit_header(&v, |h| h.meta_crc = meta_crc), Some(&KEY)).err(), Some(ReadError::Seal(_))));
    // A byte of each kind of chunk's payload, and a chunk header's pfn
    // with its CRC made good.
    for kind in [Encoding::Raw, Encoding::Lz4, Encoding::Free] {
        let c = chunks.iter().find(|c| c.encoding == kind).unwrap_or_else(|| panic!("a {kind:?} chunk"));
        let head = kind.header_len();
        if kind != Encoding::Free {
            let mut v = image.clone();
            v[c.offset as usize + head + 7] ^= 1;
            assert!(refused(&v), "{kind:?} payload");
        }
        let mut v = image.clone();
        let h = &mut v[c.offset as usize..c.offset as usize + head];
        h[40] ^= 1;
        let crc = ksave_format::CRC32C.checksum(&h[..head - 4]).to_le_bytes();
        h[head - 4..].copy_from_slice(&crc);
        assert!(refused(&v), "{kind:?} header");
    }
}

#[test]
fn an_image_forged_with_a_key_of_the_attackers_choosing_is_refused() {
    let mem = memory(14);
    let attacker = DataKey([0x66; KEY_LEN]);
    let (forged, _) = save_sealed(&mem, true, &attacker, 512);
    assert!(walk_with(&forged, Some(&attacker)).is_ok());
    assert!(matches!(walk_with(&forged, Some(&KEY)).err(), Some(ReadError::Seal(_))));
}
